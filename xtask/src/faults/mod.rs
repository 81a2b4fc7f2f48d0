//! Fault injection against a guest on a tap inside a private namespace (issue 7): malformed
//! Ethernet frames written raw onto the tap through an `AF_PACKET` socket, a TCP SYN flood, a
//! UDP flood at the host's maximum send rate, and TCP connection churn with resets; plus the
//! host-side counters of the tap and the guest-side accounting of receive buffers.
//!
//! One concern per file: [`frames`] builds the frames (pure functions, unit-tested), [`raw`]
//! owns the raw socket and the host's interface counters, [`inject`] drives the injections and
//! floods. This file holds the two ends of the tap and the guest-side accounting read from its
//! stats line.
//!
//! Everything here must run on a thread inside the test namespace (see [`crate::NetNs::run`]):
//! the packet socket binds to that namespace's tap, the counters come from
//! `/proc/thread-self/net/dev`, and every frame is addressed to the guest's MAC and IP on that
//! tap. Nothing is sent anywhere else (README.md, "Network safety").

pub mod frames;
pub mod inject;
pub mod raw;

use std::fmt;
use std::net::Ipv4Addr;

pub use frames::{
    FrameFactory, Malformation, Rng, SynSource, arp_packet, ethernet, ipv4_header, tcp_flags,
    tcp_segment, transport_checksum, udp_datagram,
};
pub use inject::{
    ChurnKind, ChurnReport, FloodReport, InjectionReport, Pacing, inject_malformed,
    set_linger_zero, syn_flood, tcp_churn, udp_flood,
};
pub use raw::{
    InterfaceCounters, PacketCapture, PacketSocket, interface_counters, interface_mac,
    parse_net_dev, parse_snmp_tcp, tcp_resets_sent,
};

use crate::client::{ClientError, Stats};

/// The two ends of the tap: the guest (the target of every frame) and the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The guest's MAC (from its `ready` line).
    pub guest_mac: [u8; 6],
    /// The guest's IPv4 address.
    pub guest_ip: Ipv4Addr,
    /// The tap's own MAC, inside the namespace.
    pub host_mac: [u8; 6],
    /// The tap's address (10.0.2.2 by default).
    pub host_ip: Ipv4Addr,
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Receive-buffer accounting from a stats line: every buffer the driver posted
/// (`rx_descriptors`) is either back in the ring or was consumed by a frame (`rx_packets`) or a
/// drop (`rx_dropped`). Exact when no frame spanned several buffers (`rx_merged` = 0); with
/// merged frames the ring holds fewer than `in_ring` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxRingAccount {
    /// `rx_descriptors`: buffers posted since the driver started.
    pub posted: u64,
    /// `rx_packets + rx_dropped + rx_foreign`: buffers the device filled and the driver took
    /// back.
    pub consumed: u64,
    /// `posted - consumed`: buffers the device holds now.
    pub in_ring: i64,
    /// `rx_merged`: frames that took more than one buffer.
    pub merged: u64,
}

impl RxRingAccount {
    /// Computes the account from a stats line.
    pub fn from_stats(stats: &Stats) -> Result<RxRingAccount, ClientError> {
        let posted = stats.counter("rx_descriptors")?;
        let consumed = stats.counter("rx_packets")?
            + stats.counter("rx_dropped")?
            + stats.counter("rx_foreign")?;
        Ok(RxRingAccount {
            posted,
            consumed,
            in_ring: posted as i64 - consumed as i64,
            merged: stats.get("rx_merged").unwrap_or(0),
        })
    }
}

impl fmt::Display for RxRingAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx_descriptors {} - (rx_packets + rx_dropped + rx_foreign) {} = {} buffers in the ring (rx_merged {})",
            self.posted, self.consumed, self.in_ring, self.merged
        )
    }
}

/// The receive queue size from the guest's `virtio-net: MTU N, queues rx R tx T` log line.
pub fn rx_queue_size_from_log<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    lines.into_iter().find_map(|line| {
        let rest = line.split("queues rx ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_ring_account_and_queue_size() {
        let stats = Stats::parse(
            "rx_packets=100 rx_dropped=2 rx_foreign=3 rx_descriptors=361 rx_merged=0 heap_used=1",
        )
        .expect("stats");
        let account = RxRingAccount::from_stats(&stats).expect("account");
        assert_eq!(
            (account.consumed, account.in_ring),
            (105, 256),
            "foreign frames' buffers went back to the ring too"
        );
        let without_foreign =
            Stats::parse("rx_packets=100 rx_dropped=2 rx_descriptors=358").expect("stats");
        assert!(RxRingAccount::from_stats(&without_foreign).is_err());
        assert_eq!(
            rx_queue_size_from_log(["x", "virtio-net: MTU 1500, queues rx 256 tx 256, link up"]),
            Some(256)
        );
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
    }
}
