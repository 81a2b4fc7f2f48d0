//! The smoltcp `Device` adapter over a [`Nic`]: zero copy in both directions. The RX token
//! reads the frame in place in the driver's receive buffer and recycles the buffer when
//! smoltcp is done; the TX token lets smoltcp write straight into a transmit buffer. Driver
//! errors reach smoltcp as "no packet" and are counted, never a panic.
//!
//! It also gates SYNs per TCP port ([`SynCredits`]): the listen backlog smoltcp lacks, which
//! the services declare through [`crate::net::service::Service::syn_credits`].

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
    /// The frame's bytes, writable (the caller owns the buffer until it recycles it): for
    /// header rewrites in place ([`crate::net::isn`]).
    fn frame_mut(rx: &mut Self::Rx) -> &mut [u8];
    /// Whether every received TCP/UDP frame's checksum is already trusted: verified by the
    /// driver, or vouched for by the device (virtio-net NEEDS_CSUM/DATA_VALID, §5.1.6.4). The
    /// stack then skips its own TCP/UDP verification; the IPv4 header's is always checked.
    fn rx_checksums_verified(&self) -> bool;
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
    /// With TCP segmentation offload: the longest IPv4 TCP frame `transmit` takes for the
    /// device to cut into segments that fit [`Nic::max_frame`]; `None` without.
    fn max_segmented_frame(&self) -> Option<usize>;
    /// Hands what is queued so far to the device now (publishes the rings, notifies if the
    /// device asked), in the middle of a stack poll: the device starts sending the first
    /// frames of a burst while the stack builds the rest.
    fn publish(&mut self);
}

/// Frames one stack poll takes at most, so that a flood cannot starve transmission, timers
/// and housekeeping (the NAPI budget).
pub const RX_BUDGET: usize = 64;

/// TCP ports gated at most ([`SynCredits`]); a port beyond these is not gated.
pub const MAX_GATED_PORTS: usize = 8;

/// How many SYNs to each gated TCP port one stack poll may hand to the stack: the free
/// listening sockets of the service on that port. A port not listed is not gated. Fixed
/// capacity, so building it per poll does not allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynCredits {
    ports: [(u16, usize); MAX_GATED_PORTS],
    len: usize,
}

impl Default for SynCredits {
    fn default() -> Self {
        Self::new()
    }
}

impl SynCredits {
    /// No port gated.
    pub const fn new() -> Self {
        Self {
            ports: [(0, 0); MAX_GATED_PORTS],
            len: 0,
        }
    }

    /// `credits` SYNs to `port`, no other port gated.
    pub fn one(port: u16, credits: usize) -> Self {
        let mut gate = Self::new();
        gate.set(port, credits);
        gate
    }

    /// Gates `port` at `credits` SYNs (replacing its earlier credit). Beyond
    /// [`MAX_GATED_PORTS`] ports, the port stays ungated (logged at debug level).
    pub fn set(&mut self, port: u16, credits: usize) {
        if let Some(entry) = self.ports[..self.len]
            .iter_mut()
            .find(|entry| entry.0 == port)
        {
            entry.1 = credits;
        } else if self.len < MAX_GATED_PORTS {
            self.ports[self.len] = (port, credits);
            self.len += 1;
        } else {
            log::debug!("net: no SYN gate for TCP port {port} (at most {MAX_GATED_PORTS})");
        }
    }

    /// The credit left for `port`, `None` when it is not gated.
    pub fn get(&self, port: u16) -> Option<usize> {
        self.ports[..self.len]
            .iter()
            .find(|entry| entry.0 == port)
            .map(|entry| entry.1)
    }

    /// Takes one SYN to `port` through: true when it may pass (not gated, or credit left,
    /// which is then spent), false when it must be held.
    fn admit(&mut self, port: u16) -> bool {
        match self.ports[..self.len]
            .iter_mut()
            .find(|entry| entry.0 == port)
        {
            None => true,
            Some((_, 0)) => false,
            Some((_, credits)) => {
                *credits = credits.saturating_sub(1);
                true
            }
        }
    }
}

/// smoltcp's view of the NIC.
///
/// It also gives the TCP services a listen backlog, which smoltcp lacks: a SYN to a gated
/// port is handed to the stack only while a listening socket is free for it ([`SynCredits`]).
/// A SYN beyond that is held (in `held`, ahead of every later frame, so order is kept) until
/// the next poll, after the service has added listeners; without this, a burst of connections
/// would find no listener and get resets.
pub struct NicDevice<'a, N: Nic> {
    nic: &'a RefCell<N>,
    held: &'a RefCell<Option<N::Rx>>,
    budget: usize,
    syn_credits: SynCredits,
}

impl<'a, N: Nic> NicDevice<'a, N> {
    /// Wraps the NIC for one stack poll, with a fresh receive budget and `syn_credits` SYNs to
    /// each gated port allowed through.
    pub fn new(
        nic: &'a RefCell<N>,
        held: &'a RefCell<Option<N::Rx>>,
        syn_credits: SynCredits,
    ) -> Self {
        Self {
            nic,
            held,
            budget: RX_BUDGET,
            syn_credits,
        }
    }
}

impl<N: Nic> NicDevice<'_, N> {
    /// Hands the frames queued so far to the device ([`Nic::publish`]).
    pub fn publish(&self) {
        self.nic.borrow_mut().publish();
    }

    /// With TCP segmentation offload, the MSS bookkeeping between the wire and the stack:
    /// the link's MSS (the MTU's) and the stack's (the segmented frame's); `None` without.
    pub fn segmentation(&self) -> Option<crate::net::isn::MssRewrite> {
        let nic = self.nic.borrow();
        let largest = nic.max_segmented_frame()?;
        let mss = |frame: usize| u16::try_from(frame.checked_sub(14 + 40)?).ok();
        Some(crate::net::isn::MssRewrite {
            link_mss: mss(nic.max_frame())?,
            stack_mss: mss(largest)?,
        })
    }
}

/// The destination port of `frame` when it is an IPv4 TCP segment with SYN set and ACK clear
/// (a connection attempt), else `None`.
pub fn tcp_syn_port(frame: &[u8]) -> Option<u16> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 6 || header_len < 20 || ip.len() < header_len + 14 {
        return None;
    }
    let tcp = &ip[header_len..];
    let flags = tcp[13];
    (flags & 0x02 != 0 && flags & 0x10 == 0).then(|| u16::from_be_bytes([tcp[2], tcp[3]]))
}

/// Whether `frame` is an IPv4 TCP segment with SYN set and ACK clear, to `port`.
pub fn is_tcp_syn_to(frame: &[u8], port: u16) -> bool {
    tcp_syn_port(frame) == Some(port)
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

/// A receive token that can hand the frame out writable: the TCP sequence-number translation
/// rewrites received headers in place with it instead of copying each frame.
pub trait RxTokenMut: phy::RxToken {
    /// Like [`phy::RxToken::consume`], with the frame writable.
    fn consume_mut<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R;
}

impl<N: Nic> RxTokenMut for RxToken<'_, N> {
    fn consume_mut<R, F: FnOnce(&mut [u8]) -> R>(mut self, f: F) -> R {
        let result = f(N::frame_mut(&mut self.rx));
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
        // A refused frame longer than the MTU (segmentation offload) gets a heap buffer of
        // its length: rare, and smoltcp must be given the length it asked for.
        let mut small = [0u8; 9216];
        let mut large = alloc::vec::Vec::new();
        let scratch: &mut [u8] = if length <= small.len() {
            &mut small[..length]
        } else {
            large.resize(length, 0);
            &mut large
        };
        match fill.take() {
            Some(f) => f(scratch),
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
        if let Some(port) = tcp_syn_port(N::frame(&rx))
            && !self.syn_credits.admit(port)
        {
            // No free listener: keep the SYN (and so everything behind it) for the next
            // poll, by which time the service has added listeners.
            *self.held.borrow_mut() = Some(rx);
            return None;
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
        let nic = self.nic.borrow();
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        // With segmentation offload the stack may build TCP segments beyond the MTU (the
        // MSS it sees and announces is adjusted in `crate::net::isn`, see `segmentation`).
        capabilities.max_transmission_unit = nic.max_segmented_frame().unwrap_or(nic.max_frame());
        capabilities.max_burst_size = None;
        // Transmit: left to the device under offload (the driver writes the pseudo-header sum
        // and sets NEEDS_CSUM). Receive: skipped when the driver verified or the device
        // vouched (see `Nic::rx_checksums_verified`).
        let checksum = match (nic.rx_checksums_verified(), nic.tx_checksum_offload()) {
            (false, false) => Checksum::Both,
            (false, true) => Checksum::Rx,
            (true, false) => Checksum::Tx,
            (true, true) => Checksum::None,
        };
        capabilities.checksum.tcp = checksum;
        capabilities.checksum.udp = checksum;
        capabilities
    }
}
