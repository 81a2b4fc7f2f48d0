//! The hardware-independent half of Vireo's networking, compiled into the kernel and tested
//! on the host:
//!
//! * [`device`]: smoltcp's `Device` over any [`device::Nic`] (zero copy), with the receive
//!   budget and the TCP services' listen backlog (the SYN gate, per port);
//! * [`isn`]: RFC 6528 initial sequence numbers, by a sequence-number translation between
//!   smoltcp and the NIC (smoltcp has no ISN hook), keyed from the CSPRNG;
//! * [`service`]: the service API, the [`service::Service`] trait every service implements;
//! * [`services`]: the service host (the interface, its sockets, the DHCPv4 client) and the
//!   services (UDP/TCP echo on port 7 with the SYN-flood defence, the stats service on UDP
//!   port 7007, discard on UDP port 9);
//! * [`NicControl`]: what the kernel's network loop (`src/net_loop/` in the binary) needs from a
//!   NIC besides packets.
//!
//! Nothing here touches hardware or reads a clock: the time, the random secrets and the
//! platform's stats keys come in as parameters, so the host tests in `tests` drive the same
//! code over an in-memory NIC.

use core::fmt::Write;

pub mod device;
pub mod isn;
pub mod service;
pub mod services;

#[cfg(test)]
mod tests;

/// What the loop needs besides packets: interrupt control and housekeeping.
pub trait NicControl {
    /// Arms receive interrupts; returns true if work is already pending (do not halt).
    fn arm_rx_interrupt(&mut self) -> bool;
    /// Disarms receive interrupts.
    fn disarm_rx_interrupt(&mut self);
    /// Publishes refilled receive buffers and queued transmissions, notifying the device if it
    /// asked to be.
    fn flush(&mut self);
    /// Nanoseconds spent in [`crate::net::device::Nic::publish`] so far (the flushes in the
    /// middle of a stack poll), which the loop adds to its own flush time (`kick_ns`).
    fn publish_ns(&self) -> u64;
    /// Handles a configuration change (link status) and device errors; called when the
    /// config interrupt fired or periodically.
    fn housekeeping(&mut self);
    /// Whether the link is up.
    fn link_up(&self) -> bool;
    /// Whether housekeeping must run now (the device failed and must be reset).
    fn needs_attention(&self) -> bool;
    /// Whether received frames are waiting in the used ring (cheap: one load).
    fn rx_pending(&self) -> bool;
    /// Appends the driver's counters (`key=value` pairs, space separated, leading space).
    fn write_stats(&self, out: &mut dyn Write);
    /// Whether the network is owed a gratuitous ARP: the link came up (at boot, after a
    /// link-down or a device reset) or the device asked (VIRTIO_NET_S_ANNOUNCE), and the link
    /// is up now.
    fn announce_pending(&self) -> bool;
    /// The announcement went out: acknowledges a device request (VIRTIO_NET_CTRL_ANNOUNCE_ACK).
    fn announced(&mut self);
}
