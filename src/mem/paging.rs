//! Page tables: identity mappings for RAM (write-back) and MMIO (uncached), built from the PVH
//! memory map, replacing the boot code's 4 GiB bootstrap tables.
//!
//! Every mapping is an identity mapping (virtual = physical), so DMA addresses are the
//! addresses Rust uses. 2 MiB pages are used where a range covers a whole aligned 2 MiB block,
//! 4 KiB pages elsewhere; a 2 MiB page is split when part of it needs other attributes (the
//! stack guard, an MMIO window). Page-table pages come from a fixed pool in BSS.
//!
//! Tables, entries and their flags are the `x86_64` crate's [`PageTable`], `PageTableEntry` and
//! [`PageTableFlags`] (Intel SDM vol. 3, §4.5, "4-Level Paging"); this module only decides what
//! to map and owns the pool.

use core::fmt;

use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};

/// Attribute bits a split 2 MiB page hands to its 4 KiB pages.
const LEAF_ATTRIBUTES: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::WRITE_THROUGH)
    .union(PageTableFlags::NO_CACHE);
/// The flags of an entry that points at a next-level table.
const TABLE_FLAGS: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

const PAGE: u64 = 4096;
const LARGE_PAGE: u64 = 2 * 1024 * 1024;
/// Identity mappings must stay below the 48-bit canonical limit (and the 52-bit physical one).
const MAX_PHYSICAL: u64 = 1 << 47;

/// How a range is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// Normal RAM.
    WriteBack,
    /// Device registers: PCD | PWT, which is UC with the power-on PAT.
    Uncached,
}

/// Mapping failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The pool of page-table pages is exhausted.
    OutOfTablePages,
    /// The range is empty, wraps, or lies beyond the identity-mappable space.
    BadRange {
        /// Start of the range.
        start: u64,
        /// Length of the range.
        length: u64,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfTablePages => f.write_str("out of page-table pages"),
            Self::BadRange { start, length } => {
                write!(f, "cannot identity-map {length:#x} bytes at {start:#x}")
            }
        }
    }
}

const POOL_PAGES: usize = 192;

#[repr(C, align(4096))]
struct Pool([PageTable; POOL_PAGES]);

/// Page-table pages. Reached only through raw pointers by `Mapper`, which the caller
/// serialises (it lives behind the `mem` module's mutex).
static mut POOL: Pool = Pool([const { PageTable::new() }; POOL_PAGES]);

/// The physical (identity-mapped) address of a pool table.
fn table_address(table: *mut PageTable) -> PhysAddr {
    PhysAddr::new(table as u64)
}

/// The page tables and their allocator.
pub struct Mapper {
    pml4: *mut PageTable,
    used: usize,
}

// SAFETY: `Mapper` owns the pool pages it hands out; the raw pointers refer to a static, and all
// access is serialised by the mutex that holds the one `Mapper`.
unsafe impl Send for Mapper {}

impl Mapper {
    /// A mapper with an empty PML4 (nothing mapped).
    pub fn new() -> Result<Self, MapError> {
        let mut mapper = Mapper {
            pml4: core::ptr::null_mut(),
            used: 0,
        };
        mapper.pml4 = mapper.allocate_table()?;
        Ok(mapper)
    }

    /// Page-table pages used so far, and the pool size.
    pub fn pool_usage(&self) -> (usize, usize) {
        (self.used, POOL_PAGES)
    }

    /// The PML4's frame, for CR3.
    pub fn root(&self) -> PhysFrame {
        PhysFrame::containing_address(table_address(self.pml4))
    }

    fn allocate_table(&mut self) -> Result<*mut PageTable, MapError> {
        if self.used == POOL_PAGES {
            return Err(MapError::OutOfTablePages);
        }
        // SAFETY: `used < POOL_PAGES`, so the index is in bounds; each pool page is handed out
        // once, and the pool is zeroed BSS (a zeroed table maps nothing).
        let table = unsafe { core::ptr::addr_of_mut!(POOL.0[self.used]) };
        self.used += 1;
        Ok(table)
    }

    /// The next-level table behind `entry`, creating it (or splitting a 2 MiB page into 4 KiB
    /// pages with the same attributes) when needed.
    fn next_table(
        &mut self,
        table: *mut PageTable,
        index: usize,
        splittable: bool,
    ) -> Result<*mut PageTable, MapError> {
        // SAFETY: `table` is a pool page (or the PML4) owned by this mapper, which is reached
        // only through it (behind the `mem` mutex), so the short-lived reference aliases no
        // other; index < 512.
        let (flags, address) = unsafe {
            let entry = &(&*table)[index];
            (entry.flags(), entry.addr())
        };
        let present = flags.contains(PageTableFlags::PRESENT);
        let huge = flags.contains(PageTableFlags::HUGE_PAGE);
        if present && !huge {
            return Ok(address.as_u64() as *mut PageTable);
        }
        let new_table = self.allocate_table()?;
        if present && splittable {
            let base = address.align_down(LARGE_PAGE);
            let attributes = flags & LEAF_ATTRIBUTES;
            for small in 0..512usize {
                // SAFETY: `new_table` is a fresh pool page owned by this mapper.
                unsafe {
                    (&mut *new_table)[small].set_addr(base + small as u64 * PAGE, attributes)
                };
            }
        }
        // SAFETY: as above; the parent entry now points at the new table.
        unsafe { (&mut *table)[index].set_addr(table_address(new_table), TABLE_FLAGS) };
        Ok(new_table)
    }

    /// Identity-maps `[start, start + length)` (rounded out to pages) with `caching`.
    /// Remapping an already mapped page replaces its attributes (the caller flushes the TLB).
    pub fn map(&mut self, start: u64, length: u64, caching: Caching) -> Result<(), MapError> {
        let end = start
            .checked_add(length)
            .filter(|&end| length > 0 && end <= MAX_PHYSICAL);
        let Some(end) = end else {
            return Err(MapError::BadRange { start, length });
        };
        let attributes = PageTableFlags::PRESENT
            | PageTableFlags::WRITABLE
            | match caching {
                Caching::WriteBack => PageTableFlags::empty(),
                Caching::Uncached => PageTableFlags::WRITE_THROUGH | PageTableFlags::NO_CACHE,
            };
        let mut address = start & !(PAGE - 1);
        let end = end.div_ceil(PAGE) * PAGE;
        while address < end {
            let pml4_index = ((address >> 39) & 511) as usize;
            let pdpt_index = ((address >> 30) & 511) as usize;
            let pd_index = ((address >> 21) & 511) as usize;
            let pdpt = self.next_table(self.pml4, pml4_index, false)?;
            let pd = self.next_table(pdpt, pdpt_index, false)?;
            // SAFETY: `pd` is a table owned by this mapper.
            let pd_flags = unsafe { (&*pd)[pd_index].flags() };
            let whole_large_page =
                address.is_multiple_of(LARGE_PAGE) && end - address >= LARGE_PAGE;
            let already_split = pd_flags.contains(PageTableFlags::PRESENT)
                && !pd_flags.contains(PageTableFlags::HUGE_PAGE);
            if whole_large_page && !already_split {
                // SAFETY: as above; `address` is 2 MiB aligned and below MAX_PHYSICAL.
                unsafe {
                    (&mut *pd)[pd_index].set_addr(
                        PhysAddr::new(address),
                        attributes | PageTableFlags::HUGE_PAGE,
                    )
                };
                address += LARGE_PAGE;
                continue;
            }
            let pt = self.next_table(pd, pd_index, true)?;
            let pt_index = ((address >> 12) & 511) as usize;
            // SAFETY: as above; `address` is 4 KiB aligned and below MAX_PHYSICAL.
            unsafe { (&mut *pt)[pt_index].set_addr(PhysAddr::new(address), attributes) };
            address += PAGE;
        }
        Ok(())
    }

    /// Removes the 4 KiB page at `address` (splitting a 2 MiB page if needed), so that any
    /// access to it faults: used for the stack guard.
    pub fn unmap_page(&mut self, address: u64) -> Result<(), MapError> {
        let pdpt = self.next_table(self.pml4, ((address >> 39) & 511) as usize, false)?;
        let pd = self.next_table(pdpt, ((address >> 30) & 511) as usize, false)?;
        let pt = self.next_table(pd, ((address >> 21) & 511) as usize, true)?;
        // SAFETY: `pt` is a table owned by this mapper; the index is < 512.
        unsafe { (&mut *pt)[((address >> 12) & 511) as usize].set_unused() };
        Ok(())
    }
}
