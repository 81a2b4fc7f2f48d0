//! The kernel's side of the virtio crate's hardware seam: [`KernelHal`] implements
//! `virtio::hal::DeviceMemory` (volatile MMIO and port I/O) and `virtio::hal::Hal` (DMA pages,
//! uncached MMIO mappings, busy-wait) on top of `mem` and `arch`.
//!
//! `DeviceMemory` methods are safe, so they check every access against the windows this HAL
//! handed out (MMIO mappings, live DMA buffers) and read all ones / drop writes outside them.
//! MMIO windows are recorded lock-free (append-only; devices are never unmapped), so the
//! doorbell and ISR paths take no lock.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;
use virtio::hal::{DeviceMemory, DmaBuffer, Hal, HalError, PAGE_SIZE, Window};

use crate::{arch, mem};

const MAX_MMIO_WINDOWS: usize = 64;

/// MMIO windows handed out: (base, length) pairs, append-only.
static MMIO_BASES: [AtomicU64; MAX_MMIO_WINDOWS] = [const { AtomicU64::new(0) }; MAX_MMIO_WINDOWS];
static MMIO_LENGTHS: [AtomicU64; MAX_MMIO_WINDOWS] =
    [const { AtomicU64::new(0) }; MAX_MMIO_WINDOWS];
static MMIO_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Serialises appends to the MMIO table.
static MMIO_APPEND: Mutex<()> = Mutex::new(());
/// Live DMA buffers: (base, length).
static DMA_LIVE: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// The kernel's HAL; zero-sized, all state is global.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelHal;

fn inside(base: u64, length: u64, address: u64, width: u64) -> bool {
    address >= base
        && address
            .checked_add(width)
            .is_some_and(|end| end <= base + length)
}

/// Whether `[address, address + width)` lies in a window this HAL handed out.
fn accessible(window: Window, offset: u64, width: u64) -> Option<u64> {
    if !window.contains(offset, width) {
        return None;
    }
    let address = window.base.checked_add(offset)?;
    if address % width != 0 {
        return None;
    }
    let count = MMIO_COUNT.load(Ordering::Acquire);
    for slot in 0..count {
        let base = MMIO_BASES[slot].load(Ordering::Relaxed);
        let length = MMIO_LENGTHS[slot].load(Ordering::Relaxed);
        if inside(base, length, address, width) {
            return Some(address);
        }
    }
    let live = arch::interrupts::without_interrupts(|| {
        DMA_LIVE
            .lock()
            .iter()
            .any(|&(base, length)| inside(base, length, address, width))
    });
    live.then_some(address)
}

macro_rules! volatile_access {
    ($read:ident, $write:ident, $type:ty) => {
        fn $read(&self, window: Window, offset: u64) -> $type {
            match accessible(window, offset, core::mem::size_of::<$type>() as u64) {
                // SAFETY: `accessible` checked that the naturally aligned access lies inside an
                // uncached MMIO mapping or a live DMA buffer that this HAL created; both stay
                // mapped while the access runs (MMIO is never unmapped; DMA buffers are freed
                // only through `dma_free`, which removes them from the table first).
                Some(address) => unsafe { core::ptr::read_volatile(address as *const $type) },
                None => <$type>::MAX,
            }
        }

        fn $write(&self, window: Window, offset: u64, value: $type) {
            if let Some(address) = accessible(window, offset, core::mem::size_of::<$type>() as u64)
            {
                // SAFETY: as for the read.
                unsafe { core::ptr::write_volatile(address as *mut $type, value) }
            }
        }
    };
}

impl DeviceMemory for KernelHal {
    volatile_access!(read8, write8, u8);
    volatile_access!(read16, write16, u16);
    volatile_access!(read32, write32, u32);

    fn port_write16(&self, port: u16, value: u16) {
        arch::outw(port, value);
    }
}

// SAFETY: `dma_alloc` returns pages from `mem::dma_alloc`: zeroed, page-aligned, physically
// contiguous heap memory, identity mapped write-back (so `window.base` is both the virtual
// address and, as `phys`, the bus address of the same bytes), owned by nobody else until
// `dma_free` hands them back to the heap. The pointer comes from the global allocator, whose
// provenance is exposed by the integer round trip.
unsafe impl virtio::dma::DmaHal for KernelHal {}

impl Hal for KernelHal {
    fn dma_alloc(&self, pages: usize) -> Result<DmaBuffer, HalError> {
        let region = mem::dma_alloc(pages).map_err(|_| HalError::OutOfDmaMemory { pages })?;
        let window = Window {
            base: region.virtual_address.as_ptr() as u64,
            len: region.length as u64,
        };
        arch::interrupts::without_interrupts(|| DMA_LIVE.lock().push((window.base, window.len)));
        Ok(DmaBuffer {
            window,
            phys: region.physical,
            pages,
        })
    }

    fn dma_free(&self, buffer: DmaBuffer) {
        let removed = arch::interrupts::without_interrupts(|| {
            let mut live = DMA_LIVE.lock();
            let position = live.iter().position(|&(base, length)| {
                base == buffer.window.base && length == buffer.window.len
            });
            position.map(|index| live.swap_remove(index))
        });
        if removed.is_none() {
            log::error!(
                "hal: dma_free of {} which is not a live DMA buffer; ignored",
                buffer.window
            );
            return;
        }
        let Some(virtual_address) = core::ptr::NonNull::new(buffer.window.base as *mut u8) else {
            return;
        };
        let region = mem::DmaRegion {
            virtual_address,
            physical: buffer.phys,
            length: buffer.pages * PAGE_SIZE,
        };
        // SAFETY: the buffer was live in the table (so it came from `dma_alloc` with this
        // length and was not freed before), and the driver frees only buffers the device can no
        // longer access (the Hal contract).
        unsafe { mem::dma_free(region) };
    }

    fn map_mmio(&self, phys: u64, len: u64) -> Result<Window, HalError> {
        let base = mem::map_mmio(phys, len).map_err(|_| HalError::MapFailed { phys, len })?;
        let _guard = MMIO_APPEND.lock();
        let count = MMIO_COUNT.load(Ordering::Relaxed);
        let already = (0..count).any(|slot| {
            MMIO_BASES[slot].load(Ordering::Relaxed) == base
                && MMIO_LENGTHS[slot].load(Ordering::Relaxed) == len
        });
        if !already {
            if count == MAX_MMIO_WINDOWS {
                return Err(HalError::MapFailed { phys, len });
            }
            MMIO_BASES[count].store(base, Ordering::Relaxed);
            MMIO_LENGTHS[count].store(len, Ordering::Relaxed);
            MMIO_COUNT.store(count + 1, Ordering::Release);
        }
        Ok(Window { base, len })
    }

    fn spin_delay_us(&self, micros: u32) {
        arch::clock::spin_for_ns(u64::from(micros) * 1000);
    }
}
