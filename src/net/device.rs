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
///
/// It also gives the TCP echo service a listen backlog, which smoltcp lacks: a SYN to
/// `syn_port` is handed to the stack only while a listening socket is free for it
/// (`syn_credits`). A SYN beyond that is held (in `held`, ahead of every later frame, so order is
/// kept) until the next poll, after the service has added listeners; without this, a burst of
/// connections would find no listener and get resets.
pub struct NicDevice<'a, N: Nic> {
    nic: &'a RefCell<N>,
    held: &'a RefCell<Option<N::Rx>>,
    budget: usize,
    syn_port: u16,
    syn_credits: usize,
}

impl<'a, N: Nic> NicDevice<'a, N> {
    /// Wraps the NIC for one stack poll, with a fresh receive budget and `syn_credits` SYNs to
    /// `syn_port` allowed through.
    pub fn new(
        nic: &'a RefCell<N>,
        held: &'a RefCell<Option<N::Rx>>,
        syn_port: u16,
        syn_credits: usize,
    ) -> Self {
        Self {
            nic,
            held,
            budget: RX_BUDGET,
            syn_port,
            syn_credits,
        }
    }
}

/// Whether `frame` is an IPv4 TCP segment with SYN set and ACK clear, to `port`.
pub fn is_tcp_syn_to(frame: &[u8], port: u16) -> bool {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 6 || header_len < 20 || ip.len() < header_len + 14 {
        return false;
    }
    let tcp = &ip[header_len..];
    let flags = tcp[13];
    u16::from_be_bytes([tcp[2], tcp[3]]) == port && flags & 0x02 != 0 && flags & 0x10 == 0
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
        // The result is kept outside the driver's closure, so it survives a driver that wrote
        // the frame and then failed to queue it.
        let mut fill = Some(f);
        let mut result = None;
        nic.transmit(length, |buffer| {
            if let Some(f) = fill.take() {
                result = Some(f(buffer));
            }
        });
        if let Some(result) = result {
            return result;
        }
        let mut scratch = [0u8; 9216];
        let length = length.min(scratch.len());
        match fill.take() {
            Some(f) => f(&mut scratch[..length]),
            // `fill` is taken only together with setting `result`, which was `None`.
            None => unreachable!("net: transmit closure consumed without a result"),
        }
    }
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
        let held = self.held.borrow_mut().take();
        let rx = match held {
            Some(rx) => rx,
            None => self.nic.borrow_mut().receive()?,
        };
        if is_tcp_syn_to(N::frame(&rx), self.syn_port) {
            if self.syn_credits == 0 {
                // No free listener: keep the SYN (and so everything behind it) for the next
                // poll, by which time the echo service has added listeners.
                *self.held.borrow_mut() = Some(rx);
                return None;
            }
            self.syn_credits -= 1;
        }
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
