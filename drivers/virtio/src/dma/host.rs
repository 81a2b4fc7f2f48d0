//! Host-test DMA: real page-aligned host memory behind the [`Hal`] traits, plus the device's
//! side of it (loads and stores by bus address, bounds-checked against live allocations), so
//! the fake devices of the tests read the rings exactly as the driver wrote them. Compiled only
//! for tests and the fuzz targets.

use core::cell::{Cell, RefCell};
use std::alloc::Layout;
use std::collections::BTreeMap;

use super::DmaHal;
use crate::hal::{DeviceMemory, DmaBuffer, DmaDirection, Hal, HalError, PAGE_SIZE, Window};

/// A device access outside every live allocation (a driver bug the tests catch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    /// Bus address of the access.
    pub phys: u64,
    /// Width.
    pub len: usize,
}

/// Real memory; bus address == virtual address. With [`HostDma::translate_shares`] it
/// also plays a translating platform (an IOMMU): every [`Hal::share`] gets a device address
/// in a separate window, and the device side resolves such addresses only while shared.
#[derive(Default)]
pub(crate) struct HostDma {
    live: RefCell<BTreeMap<u64, usize>>,
    fail_after: Cell<Option<usize>>,
    /// Allocations of more pages than this fail (a guest short of memory).
    max_pages: Cell<Option<usize>>,
    delayed_us: Cell<u64>,
    /// Device address of bus address 0 for shared buffers, when translating.
    share_window: Cell<Option<u64>>,
    /// Live shares: device address -> (bus address, length, direction).
    shared: RefCell<BTreeMap<u64, (u64, usize, DmaDirection)>>,
    shares: Cell<u64>,
    unshares: Cell<u64>,
}

impl HostDma {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Makes every allocation after the next `count` fail.
    pub(crate) fn fail_after(&self, count: usize) {
        self.fail_after.set(Some(count));
    }

    /// Makes every allocation of more than `pages` pages fail.
    pub(crate) fn limit_allocations(&self, pages: usize) {
        self.max_pages.set(Some(pages));
    }

    /// Total busy-wait requested through `spin_delay_us`, in microseconds.
    pub(crate) fn delayed_us(&self) -> u64 {
        self.delayed_us.get()
    }

    /// Number of allocations not yet freed.
    pub(crate) fn live_allocations(&self) -> usize {
        self.live.borrow().len()
    }

    /// From now on, shared buffers get device addresses `window + bus address` (the
    /// window must lie above every host address), as an IOMMU would give.
    pub(crate) fn translate_shares(&self, window: u64) {
        self.share_window.set(Some(window));
    }

    /// (shares, unshares) so far, and the shares still live.
    pub(crate) fn share_counts(&self) -> (u64, u64, usize) {
        (
            self.shares.get(),
            self.unshares.get(),
            self.shared.borrow().len(),
        )
    }

    /// The bus address behind a device address: translated through a live share when it
    /// lies in the share window, else unchanged (ring memory is not shared per transfer).
    fn resolve(&self, address: u64, len: usize) -> Result<u64, Fault> {
        let fault = Fault { phys: address, len };
        let Some(window) = self.share_window.get() else {
            return Ok(address);
        };
        if address < window {
            return Ok(address);
        }
        let shared = self.shared.borrow();
        let (&start, &(phys, size, _)) = shared.range(..=address).next_back().ok_or(fault)?;
        let end = address.checked_add(len as u64).ok_or(fault)?;
        if end > start + size as u64 {
            return Err(fault);
        }
        Ok(phys + (address - start))
    }

    /// The pointer for `[phys, phys + len)` if it lies inside one live allocation.
    fn locate(&self, address: u64, len: usize) -> Result<*mut u8, Fault> {
        let phys = self.resolve(address, len)?;
        let fault = Fault { phys, len };
        let live = self.live.borrow();
        let (&base, &size) = live.range(..=phys).next_back().ok_or(fault)?;
        let end = phys.checked_add(len as u64).ok_or(fault)?;
        if end > base + size as u64 {
            return Err(fault);
        }
        let address = usize::try_from(phys).map_err(|_| fault)?;
        Ok(core::ptr::with_exposed_provenance_mut::<u8>(address))
    }

    /// Device-side copy out of guest memory.
    pub(crate) fn read(&self, phys: u64, out: &mut [u8]) -> Result<(), Fault> {
        let pointer = self.locate(phys, out.len())?;
        for (index, byte) in out.iter_mut().enumerate() {
            // SAFETY: `locate` proved `[phys, phys + len)` lies in a live allocation made
            // by `dma_alloc` below; tests are single-threaded and the driver holds no
            // reference to device-visible bytes it has handed over.
            *byte = unsafe { pointer.add(index).read_volatile() };
        }
        Ok(())
    }

    /// Device-side copy into guest memory.
    pub(crate) fn write(&self, phys: u64, data: &[u8]) -> Result<(), Fault> {
        let pointer = self.locate(phys, data.len())?;
        for (index, byte) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { pointer.add(index).write_volatile(*byte) };
        }
        Ok(())
    }

    pub(crate) fn read_u16(&self, phys: u64) -> Result<u16, Fault> {
        let mut bytes = [0; 2];
        self.read(phys, &mut bytes)?;
        Ok(u16::from_le_bytes(bytes))
    }
    pub(crate) fn read_u32(&self, phys: u64) -> Result<u32, Fault> {
        let mut bytes = [0; 4];
        self.read(phys, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }
    pub(crate) fn read_u64(&self, phys: u64) -> Result<u64, Fault> {
        let mut bytes = [0; 8];
        self.read(phys, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }
    pub(crate) fn write_u16(&self, phys: u64, value: u16) -> Result<(), Fault> {
        self.write(phys, &value.to_le_bytes())
    }
    pub(crate) fn write_u32(&self, phys: u64, value: u32) -> Result<(), Fault> {
        self.write(phys, &value.to_le_bytes())
    }
}

impl Drop for HostDma {
    fn drop(&mut self) {
        for (&base, &size) in self.live.borrow().iter() {
            if let Ok(layout) = Layout::from_size_align(size, PAGE_SIZE) {
                let pointer = core::ptr::with_exposed_provenance_mut::<u8>(base as usize);
                // SAFETY: `base` came from `alloc_zeroed` with this layout and was not
                // freed (it is still in `live`).
                unsafe { std::alloc::dealloc(pointer, layout) };
            }
        }
    }
}

impl DeviceMemory for HostDma {
    fn read8(&self, window: Window, offset: u64) -> u8 {
        let mut byte = [0xff];
        let _ = self.read(window.base.wrapping_add(offset), &mut byte);
        byte[0]
    }
    fn read16(&self, window: Window, offset: u64) -> u16 {
        self.read_u16(window.base.wrapping_add(offset))
            .unwrap_or(u16::MAX)
    }
    fn read32(&self, window: Window, offset: u64) -> u32 {
        self.read_u32(window.base.wrapping_add(offset))
            .unwrap_or(u32::MAX)
    }
    fn write8(&self, window: Window, offset: u64, value: u8) {
        let _ = self.write(window.base.wrapping_add(offset), &[value]);
    }
    fn write16(&self, window: Window, offset: u64, value: u16) {
        let _ = self.write_u16(window.base.wrapping_add(offset), value);
    }
    fn write32(&self, window: Window, offset: u64, value: u32) {
        let _ = self.write_u32(window.base.wrapping_add(offset), value);
    }
    fn port_write16(&self, _port: u16, _value: u16) {}
}

impl Hal for HostDma {
    fn dma_alloc(&self, pages: usize) -> Result<DmaBuffer, HalError> {
        let failed = HalError::OutOfDmaMemory { pages };
        if let Some(left) = self.fail_after.get() {
            if left == 0 {
                return Err(failed);
            }
            self.fail_after.set(Some(left - 1));
        }
        if self.max_pages.get().is_some_and(|max| pages > max) {
            return Err(failed);
        }
        let size = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&size| size > 0)
            .ok_or(failed)?;
        let layout = Layout::from_size_align(size, PAGE_SIZE).map_err(|_| failed)?;
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        if pointer.is_null() {
            return Err(failed);
        }
        let base = pointer.expose_provenance() as u64;
        self.live.borrow_mut().insert(base, size);
        Ok(DmaBuffer {
            window: Window {
                base,
                len: size as u64,
            },
            phys: base,
            pages,
        })
    }

    fn dma_free(&self, buffer: DmaBuffer) {
        let Some(size) = self.live.borrow_mut().remove(&buffer.phys) else {
            panic!("dma_free of an unknown buffer {:#x}", buffer.phys);
        };
        if let Ok(layout) = Layout::from_size_align(size, PAGE_SIZE) {
            let pointer = core::ptr::with_exposed_provenance_mut::<u8>(buffer.phys as usize);
            // SAFETY: allocated above with this layout, removed from `live` so freed once.
            unsafe { std::alloc::dealloc(pointer, layout) };
        }
    }

    fn map_mmio(&self, phys: u64, len: u64) -> Result<Window, HalError> {
        Err(HalError::MapFailed { phys, len })
    }

    fn spin_delay_us(&self, micros: u32) {
        self.delayed_us
            .set(self.delayed_us.get() + u64::from(micros));
    }

    fn share(&self, phys: u64, len: usize, direction: DmaDirection) -> Result<u64, HalError> {
        self.shares.set(self.shares.get() + 1);
        let Some(window) = self.share_window.get() else {
            return Ok(phys);
        };
        let device_address = window + phys;
        let previous = self
            .shared
            .borrow_mut()
            .insert(device_address, (phys, len, direction));
        assert!(previous.is_none(), "buffer {phys:#x} shared twice");
        Ok(device_address)
    }

    fn unshare(&self, device_address: u64, phys: u64, len: usize, direction: DmaDirection) {
        self.unshares.set(self.unshares.get() + 1);
        if self.share_window.get().is_some() {
            let entry = self.shared.borrow_mut().remove(&device_address);
            assert_eq!(
                entry,
                Some((phys, len, direction)),
                "unshare of {device_address:#x} does not match its share"
            );
        }
    }
}

// SAFETY: `dma_alloc` returns fresh zeroed, page-aligned `alloc_zeroed` memory of
// `pages * PAGE_SIZE` bytes with exposed provenance, identity "bus" addresses, owned by
// the caller until `dma_free` (which alone deallocates it). The device-side `read`/`write`
// helpers are the fake device's DMA, which the contract allows.
unsafe impl DmaHal for HostDma {}
