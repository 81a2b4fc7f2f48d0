//! Host-side clients of the guest's services, one file per protocol: UDP echo ping-pong
//! ([`udp`]), TCP echo over one or many concurrent connections ([`tcp`]), ICMP echo through a
//! raw socket, root only ([`icmp`]), and the stats query on UDP 7007 ([`stats`]). This file owns
//! what they share: the error type, the payload patterns, the exact-echo check, and the RTT
//! statistics. Every client checks the echoed bytes exactly, measures round trips with the
//! monotonic clock, and bounds every wait with a timeout.
//!
//! The clients use whatever network namespace the calling thread is in: to reach a guest on a
//! tap, call them inside [`crate::NetNs::run`]; over QEMU user networking, point them at the
//! forwarded ports on 127.0.0.1 (see [`crate::UserNet`]).

pub mod icmp;
pub mod stats;
pub mod tcp;
pub mod udp;

use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::Duration;

pub use icmp::{
    IcmpEchoOptions, IcmpEchoReply, icmp_echo, icmp_echo_request, internet_checksum,
    parse_icmp_echo_reply,
};
pub use stats::{Stats, query_stats};
pub use tcp::{
    CONNECT_ATTEMPT, TcpEchoReport, tcp_connect, tcp_echo, tcp_echo_concurrent, tcp_echo_on,
};
pub use udp::{UdpEchoClient, UdpEchoOptions, udp_echo, udp_echo_sizes};

/// What a client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the client was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// No answer in time.
    #[error("no answer after {:.3} s waiting for {waiting_for}", after.as_secs_f64())]
    Timeout {
        /// What the client was waiting for.
        waiting_for: String,
        /// How long it waited.
        after: Duration,
    },
    /// An answer came back, but not the bytes sent.
    #[error("{what}: the echo differs from what was sent: {detail}")]
    Mismatch {
        /// Which exchange.
        what: String,
        /// How it differed.
        detail: String,
    },
    /// An answer that does not follow the protocol (e.g. an unparsable stats line).
    #[error("protocol error: {0}")]
    Protocol(String),
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}

pub(crate) fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Resolves `addr` (e.g. `10.0.2.15:7` or `127.0.0.1:40123`) to one socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    addr.to_socket_addrs()
        .map_err(io_error(format!("resolving {addr}")))?
        .next()
        .ok_or_else(|| ClientError::Protocol(format!("{addr} resolves to no address")))
}

/// The payload of datagram `seq` of `size` bytes: the sequence number (little endian) in the
/// first 8 bytes when there is room, then a pattern that depends on both, so that a stale or
/// corrupted echo is told apart from the expected one.
pub fn datagram_payload(seq: u64, size: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..size)
        .map(|i| pattern_byte(seq.wrapping_mul(0x9E37_79B9), i as u64))
        .collect();
    if size >= 8 {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
    }
    payload
}

/// Byte `offset` of the pattern stream `stream`: not periodic at small powers of two, so that a
/// dropped, duplicated or reordered segment shows up as a mismatch.
pub fn pattern_byte(stream: u64, offset: u64) -> u8 {
    let mixed = (offset ^ stream.rotate_left(17))
        .wrapping_add(stream)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 56) as u8
}

/// Describes where `got` first differs from `expected`.
pub fn describe_difference(expected: &[u8], got: &[u8]) -> String {
    if expected.len() != got.len() {
        return format!("sent {} bytes, got {} back", expected.len(), got.len());
    }
    match expected.iter().zip(got).position(|(a, b)| a != b) {
        Some(at) => format!(
            "byte {at} of {} is {:#04x}, expected {:#04x}",
            expected.len(),
            got[at],
            expected[at]
        ),
        None => "identical".to_string(),
    }
}

/// The `per_mille`/1000 quantile of `sorted` (ascending) by the nearest-rank rule, in integers:
/// the smallest sample with at least `per_mille`/1000 of the samples at or below it (0 gives
/// the minimum, 1000 the maximum). Every percentile the harness reports, in tables and in the
/// benchmark's CDF, comes from this one rule. `None` for no samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], per_mille: usize) -> Option<T> {
    let index = (sorted.len() * per_mille.min(1000)).div_ceil(1000);
    sorted.get(index.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// Round-trip time statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttSummary {
    /// Number of samples.
    pub count: usize,
    /// Fastest.
    pub min: Duration,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Slowest.
    pub max: Duration,
    /// Mean.
    pub mean: Duration,
}

impl RttSummary {
    /// Summarises `samples` (nearest-rank percentiles); `None` when there are none.
    pub fn from_samples(samples: &[Duration]) -> Option<RttSummary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |per_mille: usize| nearest_rank(&sorted, per_mille).unwrap_or_default();
        let total: Duration = sorted.iter().sum();
        Some(RttSummary {
            count: sorted.len(),
            min: sorted[0],
            p50: rank(500),
            p90: rank(900),
            p99: rank(990),
            p999: rank(999),
            max: sorted[sorted.len() - 1],
            mean: total / sorted.len() as u32,
        })
    }
}

impl fmt::Display for RttSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "n={} min={:.1}us p50={:.1}us p90={:.1}us p99={:.1}us p99.9={:.1}us max={:.1}us mean={:.1}us",
            self.count,
            us(self.min),
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.p999),
            us(self.max),
            us(self.mean)
        )
    }
}

/// The outcome of a series of echo exchanges (UDP or ICMP).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoReport {
    /// Requests sent, retransmissions included.
    pub sent: u64,
    /// Exact echoes received.
    pub received: u64,
    /// Requests that were sent again after a timeout.
    pub retransmits: u64,
    /// Stale echoes (of an earlier, already retransmitted request) that were skipped.
    pub stale: u64,
    /// Payload bytes echoed exactly.
    pub bytes: u64,
    /// One round-trip time per exact echo, from the last send of the request.
    pub rtts: Vec<Duration>,
}

impl EchoReport {
    /// RTT statistics of the exact echoes.
    pub fn summary(&self) -> Option<RttSummary> {
        RttSummary::from_samples(&self.rtts)
    }

    pub(crate) fn merge(&mut self, other: EchoReport) {
        self.sent += other.sent;
        self.received += other.received;
        self.retransmits += other.retransmits;
        self.stale += other.stale;
        self.bytes += other.bytes;
        self.rtts.extend(other.rtts);
    }
}

/// The IPv4 address and port of `target` when it is IPv4.
pub fn ipv4_of(target: SocketAddr) -> Option<SocketAddrV4> {
    match target {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_not_short_periodic() {
        let stream: Vec<u8> = (0..8192).map(|i| pattern_byte(7, i)).collect();
        for period in [1usize, 2, 4, 8, 16, 256, 1024, 4096] {
            assert_ne!(
                stream[..stream.len() - period],
                stream[period..],
                "{period}"
            );
        }
    }

    #[test]
    fn summary_percentiles() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let summary = RttSummary::from_samples(&samples).expect("samples");
        assert_eq!(summary.min, Duration::from_micros(1));
        assert_eq!(summary.p50, Duration::from_micros(500));
        assert_eq!(summary.p99, Duration::from_micros(990));
        assert_eq!(summary.p999, Duration::from_micros(999));
        assert_eq!(summary.max, Duration::from_micros(1000));
        assert!(RttSummary::from_samples(&[]).is_none());
    }
}
