//! Memory: the PVH start info (memory map, command line, RSDP), the identity page tables, the
//! kernel heap, DMA-able memory and uncached MMIO mappings.
//!
//! Everything is identity mapped, so a virtual address is its physical address: DMA buffers need
//! no translation table, and `virt_to_phys` is the identity. RAM comes from the memory map;
//! MMIO windows are mapped uncached on demand, wherever PCI put them (above 4 GiB too).

pub mod paging;
pub mod rt;

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;
use spin::Mutex;

pub use paging::{Caching, MapError};

/// The kernel heap: `linked_list_allocator`'s first-fit heap, plus the peak of its use.
struct TrackedHeap {
    heap: LockedHeap,
    peak: AtomicUsize,
}

// SAFETY: allocation and deallocation are delegated to `linked_list_allocator::Heap` under its
// lock, which upholds the GlobalAlloc contract; the extra bookkeeping reads `used()` only.
unsafe impl GlobalAlloc for TrackedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heap = self.heap.lock();
        match heap.allocate_first_fit(layout) {
            Ok(pointer) => {
                self.peak.fetch_max(heap.used(), Ordering::Relaxed);
                pointer.as_ptr()
            }
            Err(()) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        if let Some(pointer) = NonNull::new(pointer) {
            // SAFETY: the caller passes a pointer from `alloc` with the same layout.
            unsafe { self.heap.lock().deallocate(pointer, layout) };
        }
    }
}

#[global_allocator]
static HEAP: TrackedHeap = TrackedHeap {
    heap: LockedHeap::empty(),
    peak: AtomicUsize::new(0),
};

static MAPPER: Mutex<Option<paging::Mapper>> = Mutex::new(None);

const PAGE_SIZE: u64 = 4096;

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;

/// The PVH start info as QEMU's loader writes it (version 1 layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    module_count: u32,
    module_list_address: u64,
    cmdline_address: u64,
    rsdp_address: u64,
    memory_map_address: u64,
    memory_map_entries: u32,
    reserved: u32,
}

/// One PVH memory-map entry (E820 semantics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryRegion {
    /// Start address.
    pub address: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
    pub kind: u32,
    reserved: u32,
}

const E820_RAM: u32 = 1;
const E820_ACPI: u32 = 3;
const E820_NVS: u32 = 4;

const MAX_REGIONS: usize = 64;
const MAX_CMDLINE: usize = 2048;

/// What the boot loader told us, copied out of its memory.
pub struct BootInfo {
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_length: usize,
    /// Whether the command line was longer than we keep.
    pub cmdline_truncated: bool,
    /// Physical address of the ACPI RSDP (0 if none was given).
    pub rsdp_address: u64,
}

impl BootInfo {
    /// The memory map.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The command line bytes (without the terminating NUL).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_length]
    }

    /// Total RAM in the memory map.
    pub fn total_ram(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|region| region.kind == E820_RAM)
            .map(|region| region.size)
            .sum()
    }
}

/// Errors of memory bring-up.
#[derive(Clone, Copy, Debug)]
pub enum MemError {
    /// The start info's magic is wrong: not booted through PVH.
    BadStartInfo {
        /// What was found.
        magic: u32,
    },
    /// Version 0 start info has no memory map.
    NoMemoryMap,
    /// No usable RAM region for the heap.
    NoHeapRegion,
    /// Page-table construction failed.
    Map(MapError),
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadStartInfo { magic } => {
                write!(
                    f,
                    "PVH start info magic is {magic:#x}, expected {PVH_MAGIC:#x}"
                )
            }
            Self::NoMemoryMap => f.write_str("PVH start info carries no memory map"),
            Self::NoHeapRegion => f.write_str("no usable RAM above the kernel for the heap"),
            Self::Map(error) => write!(f, "page tables: {error}"),
        }
    }
}

/// Copies the start info, memory map and command line out of the loader's memory. Runs on
/// the boot page tables, which identity-map the first 4 GiB where QEMU puts all of these.
pub fn read_boot_info(start_info_address: u32) -> Result<BootInfo, MemError> {
    // SAFETY: QEMU passes the physical address of an `hvm_start_info` in %ebx, below 4 GiB and
    // identity mapped by the boot tables; the struct is plain integers, read unaligned-safe.
    let info =
        unsafe { core::ptr::read_unaligned(start_info_address as usize as *const StartInfo) };
    if info.magic != PVH_MAGIC {
        return Err(MemError::BadStartInfo { magic: info.magic });
    }
    if info.version < 1 || info.memory_map_address == 0 {
        return Err(MemError::NoMemoryMap);
    }
    let mut boot = BootInfo {
        regions: [MemoryRegion::default(); MAX_REGIONS],
        region_count: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_length: 0,
        cmdline_truncated: false,
        rsdp_address: info.rsdp_address,
    };
    let count = (info.memory_map_entries as usize).min(MAX_REGIONS);
    for index in 0..count {
        let address =
            info.memory_map_address as usize + index * core::mem::size_of::<MemoryRegion>();
        // SAFETY: the loader's memory map has `memory_map_entries` entries at that address,
        // below 4 GiB; we read at most MAX_REGIONS of them.
        boot.regions[index] = unsafe { core::ptr::read_unaligned(address as *const MemoryRegion) };
    }
    boot.region_count = count;
    if info.cmdline_address != 0 {
        let base = info.cmdline_address as usize;
        let mut length = 0;
        loop {
            // SAFETY: the command line is a NUL-terminated string from the loader, below
            // 4 GiB; the loop stops at the NUL or after MAX_CMDLINE bytes.
            let byte = unsafe { core::ptr::read_volatile((base + length) as *const u8) };
            if byte == 0 {
                break;
            }
            if length == MAX_CMDLINE {
                boot.cmdline_truncated = true;
                break;
            }
            boot.cmdline[length] = byte;
            length += 1;
        }
        boot.cmdline_length = length;
    }
    Ok(boot)
}

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static kernel_stack_guard: u8;
    static kernel_stack_bottom: u8;
    static kernel_stack_top: u8;
}

/// The kernel image's physical range.
pub fn kernel_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

/// The kernel stack (bottom, top) and its guard page.
pub fn kernel_stack() -> (u64, u64, u64) {
    (
        core::ptr::addr_of!(kernel_stack_bottom) as u64,
        core::ptr::addr_of!(kernel_stack_top) as u64,
        core::ptr::addr_of!(kernel_stack_guard) as u64,
    )
}

/// What `init` set up, for the boot log.
#[derive(Clone, Copy, Debug)]
pub struct MemSummary {
    /// Heap start.
    pub heap_start: u64,
    /// Heap size.
    pub heap_size: u64,
    /// Page-table pages used, and available.
    pub table_pages: (usize, usize),
}

/// Builds the page tables from the memory map, switches to them, and starts the heap in the
/// largest RAM region that does not hold the kernel.
pub fn init(boot: &BootInfo) -> Result<MemSummary, MemError> {
    let mut mapper = paging::Mapper::new().map_err(MemError::Map)?;
    // The first MiB (BIOS data, the RSDP, the loader's structures) except page 0, which stays
    // unmapped so that null dereferences fault.
    mapper
        .map(PAGE_SIZE, 0x10_0000 - PAGE_SIZE, Caching::WriteBack)
        .map_err(MemError::Map)?;
    for region in boot.regions() {
        if matches!(region.kind, E820_RAM | E820_ACPI | E820_NVS) && region.size > 0 {
            let start = region.address.max(PAGE_SIZE);
            let end = region.address.saturating_add(region.size);
            if end > start {
                mapper
                    .map(start, end - start, Caching::WriteBack)
                    .map_err(MemError::Map)?;
            }
        }
    }
    let (kernel_start, kernel_end) = kernel_range();
    mapper
        .map(kernel_start, kernel_end - kernel_start, Caching::WriteBack)
        .map_err(MemError::Map)?;
    let (_, _, guard) = kernel_stack();
    mapper.unmap_page(guard).map_err(MemError::Map)?;

    // SAFETY: the new tables identity-map the kernel image (code, data, stacks, the tables
    // themselves, which live in BSS), the first MiB and all RAM, so every address Rust holds
    // stays valid across the switch. Writing CR3 also flushes the TLB.
    unsafe {
        x86_64::registers::control::Cr3::write(
            mapper.root(),
            x86_64::registers::control::Cr3Flags::empty(),
        )
    };

    let (heap_start, heap_end) = boot
        .regions()
        .iter()
        .filter(|region| region.kind == E820_RAM)
        .map(|region| {
            let start = region.address.max(kernel_end).max(0x10_0000);
            let start = start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let end = region.address.saturating_add(region.size) & !(PAGE_SIZE - 1);
            (start, end.max(start))
        })
        .max_by_key(|(start, end)| end - start)
        .ok_or(MemError::NoHeapRegion)?;
    if heap_end - heap_start < 4 * 1024 * 1024 {
        return Err(MemError::NoHeapRegion);
    }
    // SAFETY: [heap_start, heap_end) is RAM from the memory map, identity mapped above, outside
    // the kernel image and the first MiB, and handed to the allocator exactly once.
    unsafe {
        HEAP.heap
            .lock()
            .init(heap_start as *mut u8, (heap_end - heap_start) as usize)
    };

    let table_pages = mapper.pool_usage();
    *MAPPER.lock() = Some(mapper);
    Ok(MemSummary {
        heap_start,
        heap_size: heap_end - heap_start,
        table_pages,
    })
}

/// Identity-maps `[physical, physical + length)` uncached for device registers and returns the
/// virtual address (equal to `physical`).
pub fn map_mmio(physical: u64, length: u64) -> Result<u64, MapError> {
    map_with(physical, length, Caching::Uncached)
}

/// Identity-maps firmware memory (ACPI tables) write-back and returns its virtual address.
pub fn map_firmware(physical: u64, length: u64) -> Result<u64, MapError> {
    map_with(physical, length, Caching::WriteBack)
}

fn map_with(physical: u64, length: u64, caching: Caching) -> Result<u64, MapError> {
    let mut guard = MAPPER.lock();
    let mapper = guard.as_mut().ok_or(MapError::BadRange {
        start: physical,
        length,
    })?;
    mapper.map(physical, length, caching)?;
    let mut page = physical & !(PAGE_SIZE - 1);
    while page < physical + length {
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(page));
        page += PAGE_SIZE;
    }
    Ok(physical)
}

/// Heap bytes in use and free.
pub fn heap_usage() -> (usize, usize) {
    let heap = HEAP.heap.lock();
    (heap.used(), heap.free())
}

/// The most heap bytes ever in use at once.
pub fn heap_peak() -> usize {
    HEAP.peak.load(Ordering::Relaxed)
}

/// Physically contiguous, page-aligned, zeroed memory that a device may DMA to and from.
#[derive(Debug)]
pub struct DmaRegion {
    /// Where Rust sees it (identity mapped: equal to `physical`).
    pub virtual_address: NonNull<u8>,
    /// What the device is told.
    pub physical: u64,
    /// Length in bytes (whole pages).
    pub length: usize,
}

/// DMA allocation failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// Zero pages, or a size that overflows.
    BadSize {
        /// Pages requested.
        pages: usize,
    },
    /// The heap has no contiguous run of that size.
    OutOfMemory {
        /// Pages requested.
        pages: usize,
    },
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadSize { pages } => write!(f, "bad DMA size of {pages} pages"),
            Self::OutOfMemory { pages } => write!(f, "no {pages} contiguous pages for DMA"),
        }
    }
}

/// Allocates `pages` zeroed, page-aligned, physically contiguous pages. The heap is one
/// identity-mapped RAM region, so heap memory is physically contiguous.
pub fn dma_alloc(pages: usize) -> Result<DmaRegion, DmaError> {
    let length = pages
        .checked_mul(PAGE_SIZE as usize)
        .filter(|&length| length > 0);
    let layout = length
        .and_then(|length| Layout::from_size_align(length, PAGE_SIZE as usize).ok())
        .ok_or(DmaError::BadSize { pages })?;
    // SAFETY: the layout has a non-zero size.
    let pointer = unsafe { alloc::alloc::alloc_zeroed(layout) };
    let virtual_address = NonNull::new(pointer).ok_or(DmaError::OutOfMemory { pages })?;
    Ok(DmaRegion {
        virtual_address,
        physical: pointer as u64,
        length: layout.size(),
    })
}

/// Returns a DMA region to the heap.
///
/// # Safety
/// The device must no longer access the region (its queue was reset or the buffer came back),
/// and the region must come from [`dma_alloc`] and not be freed twice.
pub unsafe fn dma_free(region: DmaRegion) {
    let layout = Layout::from_size_align(region.length, PAGE_SIZE as usize);
    if let Ok(layout) = layout {
        // SAFETY: the caller guarantees the region came from `dma_alloc` with this layout and
        // is no longer in use by anyone.
        unsafe { alloc::alloc::dealloc(region.virtual_address.as_ptr(), layout) };
    }
}

/// Return addresses found by following saved frame pointers from `rbp`, at most 16. Only frames
/// inside the kernel stack or the IST stacks are followed, so a corrupt chain stops the walk
/// rather than faulting.
pub fn backtrace(mut rbp: u64) -> [Option<u64>; 16] {
    let mut addresses = [None; 16];
    let (stack_bottom, stack_top, _) = kernel_stack();
    let (ist_bottom, ist_top) = crate::arch::gdt::ist_stack_range();
    let inside = |address: u64| {
        (stack_bottom..stack_top - 16).contains(&address)
            || (ist_bottom..ist_top - 16).contains(&address)
    };
    for slot in &mut addresses {
        if !rbp.is_multiple_of(8) || !inside(rbp) {
            break;
        }
        // SAFETY: rbp is 8-aligned and at least 16 bytes below the top of a mapped stack, so
        // both qwords of the frame record are readable.
        let (next, return_address) = unsafe {
            (
                core::ptr::read_volatile(rbp as *const u64),
                core::ptr::read_volatile((rbp + 8) as *const u64),
            )
        };
        if return_address == 0 {
            break;
        }
        *slot = Some(return_address);
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    addresses
}
