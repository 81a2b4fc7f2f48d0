//! The smoltcp `Device` adapter over a [`Nic`]: zero copy in both directions. The RX token
//! reads the frame in place in the driver's receive buffer and recycles the buffer when
//! smoltcp is done; the TX token lets smoltcp write straight into a transmit buffer. Driver
//! errors reach smoltcp as "no packet" and are counted, never a panic.

use core::cell::RefCell;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// What the network loop needs from a NIC driver.
pub trait Nic {
    /// A received frame, owned by the caller until recycled.
    type Rx;
    /// Takes the next received frame, if any.
    fn receive(&mut self) -> Option<Self::Rx>;
    /// The frame's bytes (Ethernet header first). An associated function, not a method: the
    /// frame is readable without borrowing the NIC, because smoltcp transmits its reply from
    /// inside the receive closure.
    fn frame(rx: &Self::Rx) -> &[u8];
    /// Gives the buffer back to the device.
    fn recycle(&mut self, rx: Self::Rx);
    /// Whether a frame can be sent now (reclaiming completed transmissions first).
    fn can_transmit(&mut self) -> bool;
    /// Sends one frame of `length` bytes, written by `fill` straight into the transmit buffer.
    /// Returns `None` when it could not be sent (ring full, too long, device error).
    fn transmit<R>(&mut self, length: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R>;
    /// The largest Ethernet frame (without FCS) the device accepts.
    fn max_frame(&self) -> usize;
    /// Whether the device completes TCP/UDP checksums of sent frames (the stack then leaves
    /// them to it).
    fn tx_checksum_offload(&self) -> bool;
}

/// Frames one stack poll takes at most, so that a flood cannot starve transmission, timers
/// and housekeeping (the NAPI budget).
pub const RX_BUDGET: usize = 64;

/// smoltcp's view of the NIC.
pub struct NicDevice<'a, N: Nic> {
    nic: &'a RefCell<N>,
    budget: usize,
}

impl<'a, N: Nic> NicDevice<'a, N> {
    /// Wraps the NIC for one stack poll, with a fresh receive budget.
    pub fn new(nic: &'a RefCell<N>) -> Self {
        Self {
            nic,
            budget: RX_BUDGET,
        }
    }
}

/// Receive token: one received frame.
pub struct RxToken<'a, N: Nic> {
    nic: &'a RefCell<N>,
    rx: N::Rx,
}

/// Transmit token: a promise of one transmit slot.
pub struct TxToken<'a, N: Nic> {
    nic: &'a RefCell<N>,
}

impl<N: Nic> phy::RxToken for RxToken<'_, N> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(N::frame(&self.rx));
        self.nic.borrow_mut().recycle(self.rx);
        result
    }
}

impl<N: Nic> phy::TxToken for TxToken<'_, N> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, length: usize, f: F) -> R {
        let mut nic = self.nic.borrow_mut();
        // smoltcp's token API requires a result even when the frame cannot be sent: fill a
        // scratch buffer then, which drops the frame (counted by the driver) instead of
        // panicking. `can_transmit` made that rare: only a frame longer than the MTU gets here.
        let mut fill = Some(f);
        let sent = nic.transmit(length, |buffer| {
            let f = fill.take();
            f.map(|f| f(buffer))
        });
        match sent.flatten() {
            Some(result) => result,
            None => {
                let mut scratch = [0u8; 9216];
                let length = length.min(scratch.len());
                match fill.take() {
                    Some(f) => f(&mut scratch[..length]),
                    // `fill` was consumed by the driver's closure, which always produces Some.
                    None => unreachable_fill(),
                }
            }
        }
    }
}

#[cold]
fn unreachable_fill() -> ! {
    crate::console::fatal(format_args!(
        "net: transmit closure consumed without a result"
    ))
}

impl<N: Nic> phy::Device for NicDevice<'_, N> {
    type RxToken<'b>
        = RxToken<'b, N>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b, N>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.budget == 0 {
            return None;
        }
        let rx = self.nic.borrow_mut().receive()?;
        self.budget -= 1;
        Some((RxToken { nic: self.nic, rx }, TxToken { nic: self.nic }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.nic
            .borrow_mut()
            .can_transmit()
            .then_some(TxToken { nic: self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = self.nic.borrow().max_frame();
        capabilities.max_burst_size = None;
        if self.nic.borrow().tx_checksum_offload() {
            // Verify on receive, leave transmit to the device (the driver writes the
            // pseudo-header sum and sets NEEDS_CSUM).
            capabilities.checksum.tcp = Checksum::Rx;
            capabilities.checksum.udp = Checksum::Rx;
        }
        capabilities
    }
}
