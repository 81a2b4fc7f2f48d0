//! The hardware seam: the two traits the kernel implements so that this crate never touches
//! hardware itself.
//!
//! * [`DeviceMemory`]: volatile loads and stores to memory the device can see (its BAR
//!   registers and DMA buffers), addressed as a [`Window`] plus a byte offset, and 16-bit I/O
//!   port writes for a notification capability in an I/O BAR.
//! * [`Hal`]: DMA allocation, uncached MMIO mapping, a bounded busy-wait, and the per-transfer
//!   DMA address seam ([`Hal::share`]/[`Hal::unshare`]) described below.
//!
//! # DMA addresses and VIRTIO_F_ACCESS_PLATFORM
//!
//! With VIRTIO_F_ACCESS_PLATFORM negotiated (§6.1) the device accesses memory through the
//! platform's DMA translation (an IOMMU, or the shared-memory rules of a confidential-computing
//! guest) instead of by guest-physical address. The driver therefore never invents a device
//! address; every address it gives the device comes from this trait, in two ways:
//!
//! * **Long-lived memory** (descriptor tables, rings, event suppression areas, indirect tables,
//!   and the pages packet buffers are carved from): [`Hal::dma_alloc`] returns the address the
//!   device must use in [`DmaBuffer::phys`], like Linux's coherent DMA allocations. An IOMMU HAL
//!   maps the pages there; a confidential guest allocates them from memory shared with the
//!   host.
//! * **Each transfer** (a receive buffer posted, a frame sent, a control command): when a
//!   buffer is handed to a queue it becomes a [`crate::dma::Part`], whose construction calls
//!   [`Hal::share`] and uses the address it returns in the descriptor; when the device gives it
//!   back, turning the part into a buffer again calls [`Hal::unshare`] *before* the driver reads
//!   a byte of it. A bounce-buffer HAL copies out in `share` (device-readable parts) and back
//!   in `unshare` (device-writable parts); a strict IOMMU HAL maps and unmaps there. The queues
//!   only ever see the address in the segment, so such a HAL needs no change to them.
//!
//! The kernel's HAL implements the identity mapping: there is no IOMMU it programs, so bus
//! addresses are guest-physical addresses and `share`/`unshare` are the defaults below. That is
//! what §6.1 asks of a driver that accepts ACCESS_PLATFORM on such a platform (the IOMMU, if
//! any, is left disabled, translating nothing).
//!
//! The kernel implements both with `read_volatile`/`write_volatile` and port instructions. Host
//! tests implement them with a fake device that reacts to register writes, so every line of the
//! driver runs in `cargo test`.

use core::fmt;

/// Size of a page, the unit of DMA allocation.
pub const PAGE_SIZE: usize = 4096;

/// A window of device-visible memory, by virtual address: a region of a BAR mapped by
/// [`Hal::map_mmio`], or a DMA buffer from [`Hal::dma_alloc`].
///
/// A `Window` is a plain value and can be made up by anyone, so it carries no authority by
/// itself: see the soundness contract on [`DeviceMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// Virtual address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Window {
    /// Whether an access of `width` bytes at `offset` lies entirely inside the window.
    pub const fn contains(&self, offset: u64, width: u64) -> bool {
        match offset.checked_add(width) {
            Some(end) => end <= self.len,
            None => false,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.base, self.len)
    }
}

/// Volatile access to device-visible memory and I/O ports.
///
/// # Contract for implementors
/// * **Volatile**: every call performs exactly one load or store of exactly the stated width
///   (1, 2 or 4 bytes), at exactly `window.base + offset`, in program order with respect to
///   the other calls of this trait. It is never merged, split, elided, cached or reordered by
///   the compiler (use `core::ptr::read_volatile`/`write_volatile` on a correctly typed
///   pointer, or `in`/`out` instructions). Values are little-endian, as the device sees them.
/// * **Alignment**: the driver only issues naturally aligned accesses (`offset` and
///   `window.base + offset` are multiples of the width) for MMIO windows.
/// * **Soundness**: these are safe functions, so an implementation must never touch memory
///   outside a window it handed out itself (from [`Hal::map_mmio`] or [`Hal::dma_alloc`]),
///   whatever arguments it gets: it checks that `[base + offset, base + offset + width)` lies
///   inside one of its live mappings, and otherwise reads all ones and ignores writes. The
///   driver never relies on that path; it bounds-checks every access against the region the
///   device advertised.
/// * Reads may have side effects on the device (the ISR register clears on read, §4.1.4.5).
pub trait DeviceMemory {
    /// Loads one byte at `window.base + offset`.
    fn read8(&self, window: Window, offset: u64) -> u8;
    /// Loads one aligned little-endian 16-bit value at `window.base + offset`.
    fn read16(&self, window: Window, offset: u64) -> u16;
    /// Loads one aligned little-endian 32-bit value at `window.base + offset`.
    fn read32(&self, window: Window, offset: u64) -> u32;
    /// Stores one byte at `window.base + offset`.
    fn write8(&self, window: Window, offset: u64, value: u8);
    /// Stores one aligned little-endian 16-bit value at `window.base + offset`.
    fn write16(&self, window: Window, offset: u64, value: u16);
    /// Stores one aligned little-endian 32-bit value at `window.base + offset`.
    fn write32(&self, window: Window, offset: u64, value: u32);
    /// Writes a 16-bit value to I/O port `port` (`out dx, ax` on x86): the doorbell of a
    /// notification capability in an I/O BAR (QEMU's `modern-pio-notify=on`). The driver only
    /// passes ports inside an I/O BAR of the device it drives.
    fn port_write16(&self, port: u16, value: u16);
}

/// A physically contiguous DMA allocation from [`Hal::dma_alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaBuffer {
    /// Where the driver accesses it, through [`DeviceMemory`]; `window.len` is
    /// `pages * PAGE_SIZE`.
    pub window: Window,
    /// The physical (bus) address the device uses, page-aligned.
    pub phys: u64,
    /// Number of pages.
    pub pages: usize,
}

/// Errors a [`Hal`] implementation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalError {
    /// No physically contiguous run of this many pages is available.
    OutOfDmaMemory {
        /// Pages requested.
        pages: usize,
    },
    /// A buffer could not be shared with the device for a transfer ([`Hal::share`]: no
    /// bounce space or IOMMU mapping left).
    ShareFailed {
        /// Bus address of the buffer.
        phys: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The physical range could not be mapped (not device memory, or no virtual space left).
    MapFailed {
        /// Physical address requested.
        phys: u64,
        /// Length requested.
        len: u64,
    },
}

impl fmt::Display for HalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OutOfDmaMemory { pages } => {
                write!(f, "out of DMA memory ({pages} contiguous pages requested)")
            }
            Self::ShareFailed { phys, len } => {
                write!(
                    f,
                    "cannot share DMA buffer {phys:#x}+{len:#x} with the device"
                )
            }
            Self::MapFailed { phys, len } => {
                write!(f, "cannot map MMIO {phys:#x}+{len:#x}")
            }
        }
    }
}

/// The platform services the driver needs besides register access.
///
/// The transport holds its `Hal` by value; the kernel's implementation is typically a
/// zero-sized type, and `&T` implements `Hal` for every `T: Hal`.
pub trait Hal: DeviceMemory {
    /// Allocates `pages` (at least 1) zeroed, physically contiguous, page-aligned pages that
    /// the device may read and write by DMA, mapped write-back cacheable (x86 DMA is
    /// coherent). The memory stays valid until passed to [`Hal::dma_free`].
    fn dma_alloc(&self, pages: usize) -> Result<DmaBuffer, HalError>;

    /// Frees a buffer from [`Hal::dma_alloc`]. The driver calls it only after the device can no
    /// longer access the buffer (after a reset, or before the queue was enabled).
    fn dma_free(&self, buffer: DmaBuffer);

    /// Maps `len` bytes of device memory at physical address `phys` uncached (strong
    /// uncacheable on x86) and returns the window. `phys` and `len` need not be page-aligned;
    /// the implementation rounds the mapping out to pages, and the returned window covers
    /// exactly `[phys, phys + len)`. Mapping the same range twice may return the same window.
    fn map_mmio(&self, phys: u64, len: u64) -> Result<Window, HalError>;

    /// Busy-waits for at least `micros` microseconds. The driver uses it only for bounded polls
    /// (the reset handshake of §4.1.4.3.2); the delay need not be precise but must not be
    /// shorter than asked, so that timeouts are real.
    fn spin_delay_us(&self, micros: u32);

    /// Hands `len` bytes at bus address `phys` (inside a live [`Hal::dma_alloc`] buffer) to the
    /// device for one transfer in `direction`, and returns the address the device must use for
    /// them (see the module docs). Called every time a buffer is made available to a queue.
    /// The default is the identity: no IOMMU, no bounce buffers.
    fn share(&self, phys: u64, len: usize, direction: DmaDirection) -> Result<u64, HalError> {
        let _ = (len, direction);
        Ok(phys)
    }

    /// Ends a transfer started by [`Hal::share`]: called once the device has given the buffer
    /// back (or been reset) and before the driver reads it. `device_address` is what `share`
    /// returned. The default does nothing.
    fn unshare(&self, device_address: u64, phys: u64, len: usize, direction: DmaDirection) {
        let _ = (device_address, phys, len, direction);
    }
}

/// Which way the data of one transfer flows (see [`Hal::share`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// The device reads the buffer (a frame to send, a control command).
    ToDevice,
    /// The device writes the buffer (a receive buffer, a control ack).
    FromDevice,
}

impl<T: DeviceMemory + ?Sized> DeviceMemory for &T {
    fn read8(&self, window: Window, offset: u64) -> u8 {
        (**self).read8(window, offset)
    }
    fn read16(&self, window: Window, offset: u64) -> u16 {
        (**self).read16(window, offset)
    }
    fn read32(&self, window: Window, offset: u64) -> u32 {
        (**self).read32(window, offset)
    }
    fn write8(&self, window: Window, offset: u64, value: u8) {
        (**self).write8(window, offset, value)
    }
    fn write16(&self, window: Window, offset: u64, value: u16) {
        (**self).write16(window, offset, value)
    }
    fn write32(&self, window: Window, offset: u64, value: u32) {
        (**self).write32(window, offset, value)
    }
    fn port_write16(&self, port: u16, value: u16) {
        (**self).port_write16(port, value)
    }
}

impl<T: Hal + ?Sized> Hal for &T {
    fn dma_alloc(&self, pages: usize) -> Result<DmaBuffer, HalError> {
        (**self).dma_alloc(pages)
    }
    fn dma_free(&self, buffer: DmaBuffer) {
        (**self).dma_free(buffer)
    }
    fn map_mmio(&self, phys: u64, len: u64) -> Result<Window, HalError> {
        (**self).map_mmio(phys, len)
    }
    fn spin_delay_us(&self, micros: u32) {
        (**self).spin_delay_us(micros)
    }
    fn share(&self, phys: u64, len: usize, direction: DmaDirection) -> Result<u64, HalError> {
        (**self).share(phys, len, direction)
    }
    fn unshare(&self, device_address: u64, phys: u64, len: usize, direction: DmaDirection) {
        (**self).unshare(device_address, phys, len, direction)
    }
}
