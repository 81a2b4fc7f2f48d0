//! Host-side clients of the guest's services: UDP echo ping-pong, TCP echo (one or many
//! concurrent connections), ICMP echo (raw socket, root only), and the stats query on UDP 7007.
//! Every client checks the echoed bytes exactly, measures round trips with the monotonic clock,
//! and bounds every wait with a timeout.
//!
//! The clients use whatever network namespace the calling thread is in: to reach a guest on a
//! tap, call them inside [`crate::NetNs::run`]; over QEMU user networking, point them at the
//! forwarded ports on 127.0.0.1 (see [`crate::UserNet`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

/// What a client can fail with.
#[derive(Debug)]
pub enum ClientError {
    /// A socket operation failed.
    Io {
        /// What the client was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// No answer in time.
    Timeout {
        /// What the client was waiting for.
        waiting_for: String,
        /// How long it waited.
        after: Duration,
    },
    /// An answer came back, but not the bytes sent.
    Mismatch {
        /// Which exchange.
        what: String,
        /// How it differed.
        detail: String,
    },
    /// An answer that does not follow the protocol (e.g. an unparsable stats line).
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io { context, source } => write!(f, "{context}: {source}"),
            ClientError::Timeout { waiting_for, after } => write!(
                f,
                "no answer after {:.3} s waiting for {waiting_for}",
                after.as_secs_f64()
            ),
            ClientError::Mismatch { what, detail } => {
                write!(f, "{what}: the echo differs from what was sent: {detail}")
            }
            ClientError::Protocol(message) => write!(f, "protocol error: {message}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}

fn is_timeout(error: &io::Error) -> bool {
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

    fn merge(&mut self, other: EchoReport) {
        self.sent += other.sent;
        self.received += other.received;
        self.retransmits += other.retransmits;
        self.stale += other.stale;
        self.bytes += other.bytes;
        self.rtts.extend(other.rtts);
    }
}

/// A UDP echo client: ping-pong (one request in flight), exact payload check, RTT per echo.
pub struct UdpEchoClient {
    socket: UdpSocket,
    target: SocketAddr,
    timeout: Duration,
    next_seq: u64,
    buffer: Vec<u8>,
}

impl UdpEchoClient {
    /// A socket connected to `target` (bound to the matching loopback or wildcard address),
    /// waiting up to `timeout` for each echo.
    pub fn connect(target: SocketAddr, timeout: Duration) -> Result<UdpEchoClient, ClientError> {
        let socket = bind_udp_for(target)?;
        socket
            .connect(target)
            .map_err(io_error(format!("connecting a UDP socket to {target}")))?;
        Ok(UdpEchoClient {
            socket,
            target,
            timeout,
            next_seq: 0,
            buffer: vec![0; 65536],
        })
    }

    /// The echo service's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sends one datagram of `size` bytes and waits for its exact echo. Returns the RTT.
    /// `attempts` (at least 1) bounds the sends of the same request after timeouts; every
    /// attempt is counted in `report`.
    pub fn exchange(
        &mut self,
        size: usize,
        attempts: u32,
        report: &mut EchoReport,
    ) -> Result<Duration, ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = datagram_payload(seq, size);
        let what = format!("UDP echo #{seq} ({size} bytes) to {}", self.target);
        let began = Instant::now();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                report.retransmits += 1;
            }
            let sent_at = Instant::now();
            self.socket
                .send(&payload)
                .map_err(io_error(format!("sending {what}")))?;
            report.sent += 1;
            let deadline = sent_at + self.timeout;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                self.socket
                    .set_read_timeout(Some(deadline - now))
                    .map_err(io_error("setting the UDP read timeout"))?;
                let length = match self.socket.recv(&mut self.buffer) {
                    Ok(length) => length,
                    Err(error) if is_timeout(&error) => break,
                    Err(error) => return Err(io_error(format!("receiving {what}"))(error)),
                };
                let rtt = sent_at.elapsed();
                let got = &self.buffer[..length];
                if got == payload.as_slice() {
                    report.received += 1;
                    report.bytes += size as u64;
                    report.rtts.push(rtt);
                    return Ok(rtt);
                }
                if is_stale_echo(got, seq, size) {
                    report.stale += 1;
                    continue;
                }
                return Err(ClientError::Mismatch {
                    what,
                    detail: describe_difference(&payload, got),
                });
            }
        }
        Err(ClientError::Timeout {
            waiting_for: format!("{what} ({} attempt(s))", attempts.max(1)),
            after: began.elapsed(),
        })
    }

    /// Sends small probes every `interval` until one is echoed (ARP and the guest's first
    /// packets may take a moment), or fails after `limit`. Returns the number of probes sent.
    pub fn warm_up(&mut self, limit: Duration, interval: Duration) -> Result<u64, ClientError> {
        let began = Instant::now();
        let saved = self.timeout;
        self.timeout = interval;
        let mut report = EchoReport::default();
        let result = loop {
            match self.exchange(1, 1, &mut report) {
                Ok(_) => break Ok(report.sent),
                Err(ClientError::Timeout { .. }) if began.elapsed() < limit => continue,
                Err(ClientError::Timeout { .. }) => {
                    break Err(ClientError::Timeout {
                        waiting_for: format!(
                            "a first UDP echo from {} ({} probes sent)",
                            self.target, report.sent
                        ),
                        after: began.elapsed(),
                    });
                }
                Err(ClientError::Io { source, .. })
                    if source.kind() == io::ErrorKind::ConnectionRefused
                        && began.elapsed() < limit =>
                {
                    thread::sleep(interval);
                    continue;
                }
                Err(other) => break Err(other),
            }
        };
        self.timeout = saved;
        result
    }
}

fn is_stale_echo(got: &[u8], seq: u64, size: usize) -> bool {
    if got.len() != size {
        return false;
    }
    if size >= 8 {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&got[..8]);
        let earlier = u64::from_le_bytes(tag);
        earlier < seq && got == datagram_payload(earlier, size).as_slice()
    } else {
        (seq.saturating_sub(64)..seq).any(|earlier| got == datagram_payload(earlier, size))
    }
}

fn bind_udp_for(target: SocketAddr) -> Result<UdpSocket, ClientError> {
    let local: SocketAddr = if target.ip().is_loopback() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    UdpSocket::bind(local).map_err(io_error(format!("binding a UDP socket on {local}")))
}

/// Options of a UDP echo run.
#[derive(Clone, Copy, Debug)]
pub struct UdpEchoOptions {
    /// Datagrams to exchange.
    pub count: u64,
    /// Payload size in bytes (0 to 65507).
    pub size: usize,
    /// Wait for each echo.
    pub timeout: Duration,
    /// Sends of one request before giving up (1 = no retransmission).
    pub attempts: u32,
}

impl Default for UdpEchoOptions {
    fn default() -> UdpEchoOptions {
        UdpEchoOptions {
            count: 10,
            size: 64,
            timeout: Duration::from_secs(2),
            attempts: 1,
        }
    }
}

/// Ping-pongs `options.count` datagrams with the UDP echo service at `target`, each checked
/// exactly.
pub fn udp_echo(target: SocketAddr, options: UdpEchoOptions) -> Result<EchoReport, ClientError> {
    let mut client = UdpEchoClient::connect(target, options.timeout)?;
    let mut report = EchoReport::default();
    for _ in 0..options.count {
        client.exchange(options.size, options.attempts, &mut report)?;
    }
    Ok(report)
}

/// The outcome of one TCP echo connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEchoReport {
    /// Bytes sent and read back exactly.
    pub bytes: u64,
    /// Time to connect.
    pub connect: Duration,
    /// Time from the first byte sent to the last byte echoed.
    pub transfer: Duration,
}

impl TcpEchoReport {
    /// Echo throughput in bytes per second.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.transfer.as_secs_f64().max(1e-9)
    }
}

/// Connects to the TCP echo service at `target` within `timeout`.
///
/// Each attempt waits at most [`CONNECT_ATTEMPT`]; a timed-out attempt is retried on a fresh
/// socket until `timeout`. QEMU user networking (libslirp) listens on a forwarded port with a
/// tiny backlog: when connections arrive back to back, the host kernel drops about every other
/// SYN (measured here: 26 of 64), and its own SYN retransmission would wait a whole second each
/// time.
pub fn tcp_connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let began = Instant::now();
    let stream = loop {
        let remaining = timeout.saturating_sub(began.elapsed());
        let attempt = remaining.min(CONNECT_ATTEMPT).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&target, attempt) {
            Ok(stream) => break stream,
            Err(error) if is_timeout(&error) && began.elapsed() < timeout => continue,
            Err(error) => {
                return Err(io_error(format!(
                    "connecting to TCP echo at {target} (after {:.1} s)",
                    began.elapsed().as_secs_f64()
                ))(error));
            }
        }
    };
    stream
        .set_nodelay(true)
        .map_err(io_error("setting TCP_NODELAY"))?;
    Ok(stream)
}

/// Sends `bytes` bytes of pattern stream `stream_id` over `stream` while reading the echo back
/// (on two threads, so flow control never deadlocks), checks every byte, then closes the
/// connection. The whole transfer must finish within `timeout`.
pub fn tcp_echo_on(
    stream: TcpStream,
    stream_id: u64,
    bytes: usize,
    timeout: Duration,
) -> Result<Duration, ClientError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let what = format!("TCP echo #{stream_id} of {bytes} bytes with {peer}");
    let began = Instant::now();
    let deadline = began + timeout;
    let writer = stream
        .try_clone()
        .map_err(io_error("cloning the TCP stream"))?;
    writer
        .set_write_timeout(Some(timeout))
        .map_err(io_error("setting the TCP write timeout"))?;
    let sender = thread::spawn(move || -> io::Result<()> {
        let mut writer = writer;
        let mut chunk = vec![0u8; 16 * 1024];
        let mut offset = 0usize;
        while offset < bytes {
            let length = chunk.len().min(bytes - offset);
            for (i, byte) in chunk[..length].iter_mut().enumerate() {
                *byte = pattern_byte(stream_id, (offset + i) as u64);
            }
            writer.write_all(&chunk[..length])?;
            offset += length;
        }
        writer.flush()
    });
    let mut reader = stream;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    let result = loop {
        if received == bytes {
            break Ok(began.elapsed());
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(ClientError::Timeout {
                waiting_for: format!("{what} ({received} bytes echoed so far)"),
                after: began.elapsed(),
            });
        }
        if let Err(error) = reader.set_read_timeout(Some(deadline - now)) {
            break Err(io_error("setting the TCP read timeout")(error));
        }
        let want = buffer.len().min(bytes - received);
        match reader.read(&mut buffer[..want]) {
            Ok(0) => {
                break Err(ClientError::Mismatch {
                    what: what.clone(),
                    detail: format!("the guest closed the connection after {received} bytes"),
                });
            }
            Ok(count) => {
                let mismatch = buffer[..count]
                    .iter()
                    .enumerate()
                    .find(|&(i, &b)| b != pattern_byte(stream_id, (received + i) as u64));
                if let Some((i, &b)) = mismatch {
                    let at = received + i;
                    break Err(ClientError::Mismatch {
                        what: what.clone(),
                        detail: format!(
                            "byte {at} is {b:#04x}, expected {:#04x}",
                            pattern_byte(stream_id, at as u64)
                        ),
                    });
                }
                received += count;
            }
            Err(error) if is_timeout(&error) => continue,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                break Err(io_error(format!(
                    "reading {what} ({received} bytes echoed so far)"
                ))(error));
            }
        }
    };
    // Closing both directions also ends the sender if it is still blocked.
    let _ = reader.shutdown(Shutdown::Both);
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the sender thread panicked")));
    let elapsed = result?;
    sent.map_err(io_error(format!("sending {what}")))?;
    Ok(elapsed)
}

/// How long one TCP connection attempt waits before [`tcp_connect`] tries again.
pub const CONNECT_ATTEMPT: Duration = Duration::from_millis(100);

/// One TCP echo connection: connect, send `bytes` bytes of a pattern, read them back exactly.
pub fn tcp_echo(
    target: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> Result<TcpEchoReport, ClientError> {
    let began = Instant::now();
    let stream = tcp_connect(target, timeout)?;
    let connect = began.elapsed();
    let transfer = tcp_echo_on(stream, 0, bytes, timeout.saturating_sub(connect))?;
    Ok(TcpEchoReport {
        bytes: bytes as u64,
        connect,
        transfer,
    })
}

/// `connections` TCP echo connections open at the same time: all are connected first (so that
/// the guest really holds them all at once), then each echoes `bytes_each` bytes of its own
/// pattern concurrently. Fails with the first connection's error.
pub fn tcp_echo_concurrent(
    target: SocketAddr,
    connections: usize,
    bytes_each: usize,
    timeout: Duration,
) -> Result<Vec<TcpEchoReport>, ClientError> {
    let began = Instant::now();
    let mut streams = Vec::with_capacity(connections);
    for index in 0..connections {
        let connect_began = Instant::now();
        let stream = tcp_connect(target, timeout).map_err(|error| match error {
            ClientError::Io { context, source } => ClientError::Io {
                context: format!("{context} (connection {index} of {connections})"),
                source,
            },
            other => other,
        })?;
        streams.push((stream, connect_began.elapsed()));
    }
    let remaining = timeout.saturating_sub(began.elapsed());
    let results: Vec<Result<TcpEchoReport, ClientError>> = thread::scope(|scope| {
        let workers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(index, (stream, connect))| {
                scope.spawn(move || {
                    tcp_echo_on(stream, index as u64 + 1, bytes_each, remaining).map(|transfer| {
                        TcpEchoReport {
                            bytes: bytes_each as u64,
                            connect,
                            transfer,
                        }
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| {
                    Err(ClientError::Protocol("a TCP worker panicked".to_string()))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

/// The stats service's answer: one line of space-separated `key=value` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The line as received (without the line ending).
    pub line: String,
    /// The pairs, by key.
    pub fields: BTreeMap<String, String>,
}

impl Stats {
    /// Parses a stats line. Every space-separated word must be `key=value` with a non-empty key.
    pub fn parse(line: &str) -> Result<Stats, ClientError> {
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        let mut fields = BTreeMap::new();
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    fields.insert(key.to_string(), value.to_string());
                }
                _ => {
                    return Err(ClientError::Protocol(format!(
                        "stats word {word:?} is not key=value in {line:?}"
                    )));
                }
            }
        }
        if fields.is_empty() {
            return Err(ClientError::Protocol(format!("empty stats line {line:?}")));
        }
        Ok(Stats { line, fields })
    }

    /// A counter's value, when present and numeric.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// A counter's value, or an error naming the key and the line.
    pub fn counter(&self, key: &str) -> Result<u64, ClientError> {
        self.get(key).ok_or_else(|| {
            ClientError::Protocol(format!(
                "no numeric counter {key:?} in the stats line {:?}",
                self.line
            ))
        })
    }
}

/// Asks the stats service at `target` (UDP 7007) for its line: sends one datagram, waits up to
/// `timeout` per attempt, up to `attempts` times.
pub fn query_stats(
    target: SocketAddr,
    timeout: Duration,
    attempts: u32,
) -> Result<Stats, ClientError> {
    let socket = bind_udp_for(target)?;
    socket
        .connect(target)
        .map_err(io_error(format!("connecting a UDP socket to {target}")))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(io_error("setting the UDP read timeout"))?;
    let began = Instant::now();
    let mut buffer = vec![0u8; 65536];
    for _ in 0..attempts.max(1) {
        socket
            .send(b"stats\n")
            .map_err(io_error(format!("sending a stats request to {target}")))?;
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let text = std::str::from_utf8(&buffer[..length]).map_err(|_| {
                    ClientError::Protocol(format!("the stats answer from {target} is not UTF-8"))
                })?;
                return Stats::parse(text);
            }
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(io_error(format!("receiving stats from {target}"))(error)),
        }
    }
    Err(ClientError::Timeout {
        waiting_for: format!("the stats line from {target}"),
        after: began.elapsed(),
    })
}

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request packet (header plus payload).
pub fn icmp_echo_request(identifier: u16, sequence: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    packet.extend_from_slice(&identifier.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(payload);
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// A raw ICMPv4 socket (needs root or CAP_NET_RAW), in the calling thread's namespace.
struct RawIcmpSocket {
    fd: OwnedFd,
}

impl RawIcmpSocket {
    fn open() -> Result<RawIcmpSocket, ClientError> {
        // SAFETY: socket(2) takes no pointers; a negative result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            return Err(io_error("opening a raw ICMP socket (needs root)")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawIcmpSocket { fd })
    }

    fn sockaddr(target: Ipv4Addr) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(target.octets()),
            },
            sin_zero: [0; 8],
        }
    }

    fn send_to(&self, packet: &[u8], target: Ipv4Addr) -> io::Result<()> {
        let address = RawIcmpSocket::sockaddr(target);
        // SAFETY: the buffer and the address are valid for the lengths passed, for the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Receives one IPv4 packet (header included) within `timeout`; `Ok(None)` on timeout.
    fn recv(&self, buffer: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the call.
        let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(None);
        }
        // SAFETY: the buffer is valid and writable for its length, for the call.
        let length = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if length < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(Some(length as usize))
        }
    }
}

/// A parsed ICMP echo reply inside an IPv4 packet.
#[derive(Debug, PartialEq, Eq)]
pub struct IcmpEchoReply<'a> {
    /// The sender.
    pub source: Ipv4Addr,
    /// The echo identifier.
    pub identifier: u16,
    /// The echo sequence number.
    pub sequence: u16,
    /// The payload.
    pub payload: &'a [u8],
    /// Whether the ICMP checksum verifies.
    pub checksum_ok: bool,
}

/// Parses an IPv4 packet holding an ICMP echo reply; `None` for anything else.
pub fn parse_icmp_echo_reply(packet: &[u8]) -> Option<IcmpEchoReply<'_>> {
    let version_ihl = *packet.first()?;
    let header = usize::from(version_ihl & 0x0F) * 4;
    if version_ihl >> 4 != 4 || header < 20 || packet.len() < header + 8 || packet[9] != 1 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = total.clamp(header + 8, packet.len());
    let icmp = &packet[header..end];
    if icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    Some(IcmpEchoReply {
        source: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        identifier: u16::from_be_bytes([icmp[4], icmp[5]]),
        sequence: u16::from_be_bytes([icmp[6], icmp[7]]),
        payload: &icmp[8..],
        checksum_ok: internet_checksum(icmp) == 0,
    })
}

/// Options of an ICMP echo run.
#[derive(Clone, Copy, Debug)]
pub struct IcmpEchoOptions {
    /// Requests to exchange.
    pub count: u64,
    /// Payload size in bytes.
    pub size: usize,
    /// Wait for each reply.
    pub timeout: Duration,
    /// Sends of one request before giving up.
    pub attempts: u32,
}

impl Default for IcmpEchoOptions {
    fn default() -> IcmpEchoOptions {
        IcmpEchoOptions {
            count: 5,
            size: 56,
            timeout: Duration::from_secs(2),
            attempts: 1,
        }
    }
}

/// Pings `target` through a raw ICMP socket (root), one request in flight, checking that each
/// reply carries the identifier, sequence number and payload sent, with a valid checksum.
pub fn icmp_echo(target: Ipv4Addr, options: IcmpEchoOptions) -> Result<EchoReport, ClientError> {
    let socket = RawIcmpSocket::open()?;
    let identifier = (std::process::id() as u16) ^ 0x5649;
    let mut report = EchoReport::default();
    let mut buffer = vec![0u8; 65536];
    for index in 0..options.count {
        let sequence = index as u16;
        let payload = datagram_payload(index, options.size);
        let request = icmp_echo_request(identifier, sequence, &payload);
        let what = format!("ICMP echo #{index} ({} bytes) to {target}", options.size);
        let began = Instant::now();
        let mut answered = false;
        for attempt in 0..options.attempts.max(1) {
            if attempt > 0 {
                report.retransmits += 1;
            }
            let sent_at = Instant::now();
            socket
                .send_to(&request, target)
                .map_err(io_error(format!("sending {what}")))?;
            report.sent += 1;
            let deadline = sent_at + options.timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let Some(length) = socket
                    .recv(&mut buffer, left)
                    .map_err(io_error(format!("receiving {what}")))?
                else {
                    break;
                };
                let rtt = sent_at.elapsed();
                let Some(reply) = parse_icmp_echo_reply(&buffer[..length]) else {
                    continue; // our own request (on loopback) or unrelated ICMP
                };
                if reply.source != target || reply.identifier != identifier {
                    continue;
                }
                if reply.sequence != sequence {
                    report.stale += 1;
                    continue;
                }
                if !reply.checksum_ok || reply.payload != payload.as_slice() {
                    return Err(ClientError::Mismatch {
                        what,
                        detail: if reply.checksum_ok {
                            describe_difference(&payload, reply.payload)
                        } else {
                            "bad ICMP checksum".to_string()
                        },
                    });
                }
                report.received += 1;
                report.bytes += options.size as u64;
                report.rtts.push(rtt);
                answered = true;
                break;
            }
            if answered {
                break;
            }
        }
        if !answered {
            return Err(ClientError::Timeout {
                waiting_for: format!("{what} ({} attempt(s))", options.attempts.max(1)),
                after: began.elapsed(),
            });
        }
    }
    Ok(report)
}

/// Runs [`udp_echo`] for each size in turn and merges the reports.
pub fn udp_echo_sizes(
    target: SocketAddr,
    sizes: &[usize],
    per_size: u64,
    timeout: Duration,
    attempts: u32,
) -> Result<EchoReport, ClientError> {
    let mut total = EchoReport::default();
    for &size in sizes {
        total.merge(udp_echo(
            target,
            UdpEchoOptions {
                count: per_size,
                size,
                timeout,
                attempts,
            },
        )?);
    }
    Ok(total)
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
    fn payloads_differ_by_sequence_and_carry_it() {
        let a = datagram_payload(1, 64);
        let b = datagram_payload(2, 64);
        assert_ne!(a, b);
        assert_eq!(&a[..8], &1u64.to_le_bytes());
        assert!(is_stale_echo(&a, 2, 64));
        assert!(!is_stale_echo(&b, 2, 64));
        assert_eq!(datagram_payload(5, 1).len(), 1);
        assert!(is_stale_echo(&datagram_payload(3, 1), 5, 1));
    }

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

    #[test]
    fn parses_stats_lines() {
        let stats = Stats::parse("udp_echoed=12 mode=adaptive interrupts=3 heap_used=123456\n")
            .expect("valid");
        assert_eq!(stats.get("udp_echoed"), Some(12));
        assert_eq!(stats.get("mode"), None);
        assert_eq!(
            stats.fields.get("mode").map(String::as_str),
            Some("adaptive")
        );
        assert!(stats.counter("kicks").is_err());
        assert!(Stats::parse("udp_echoed=1 garbage").is_err());
        assert!(Stats::parse("\n").is_err());
    }

    #[test]
    fn icmp_request_round_trips_through_the_parser() {
        let request = icmp_echo_request(0x1234, 7, b"hello");
        assert_eq!(internet_checksum(&request), 0);
        let mut reply = request.clone();
        reply[0] = ICMP_ECHO_REPLY;
        reply[2..4].copy_from_slice(&[0, 0]);
        let checksum = internet_checksum(&reply);
        reply[2..4].copy_from_slice(&checksum.to_be_bytes());
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        let total = (packet.len() + reply.len()) as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&reply);
        let parsed = parse_icmp_echo_reply(&packet).expect("an echo reply");
        assert_eq!(parsed.source, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!((parsed.identifier, parsed.sequence), (0x1234, 7));
        assert_eq!(parsed.payload, b"hello");
        assert!(parsed.checksum_ok);
    }

    #[test]
    fn udp_echo_against_a_local_reflector() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = server.local_addr().expect("address");
        let reflector = thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            for _ in 0..6 {
                let (length, from) = server.recv_from(&mut buffer).expect("recv");
                server.send_to(&buffer[..length], from).expect("send");
            }
        });
        let report =
            udp_echo_sizes(address, &[1, 64, 1472], 2, Duration::from_secs(2), 1).expect("echo");
        assert_eq!(
            (report.sent, report.received, report.bytes),
            (6, 6, 2 * (1 + 64 + 1472))
        );
        reflector.join().expect("reflector");
    }

    #[test]
    fn stats_query_against_a_local_server() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = server.local_addr().expect("address");
        let responder = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            let (_, from) = server.recv_from(&mut buffer).expect("recv");
            server
                .send_to(b"udp_echoed=7 mode=poll kicks=2\n", from)
                .expect("send");
        });
        let stats = query_stats(address, Duration::from_secs(2), 1).expect("stats");
        assert_eq!(stats.get("udp_echoed"), Some(7));
        assert_eq!(stats.line, "udp_echoed=7 mode=poll kicks=2");
        responder.join().expect("responder");
    }

    #[test]
    fn tcp_echo_against_a_local_reflector() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server = thread::spawn(move || {
            let handles: Vec<_> = (0..5)
                .map(|_| {
                    let (mut stream, _) = listener.accept().expect("accept");
                    thread::spawn(move || {
                        let mut reader = stream.try_clone().expect("clone");
                        let _ = io::copy(&mut reader, &mut stream);
                    })
                })
                .collect();
            for handle in handles {
                let _ = handle.join();
            }
        });
        let one = tcp_echo(address, 1 << 20, Duration::from_secs(10)).expect("1 MiB");
        assert_eq!(one.bytes, 1 << 20);
        let many = tcp_echo_concurrent(address, 4, 16 * 1024, Duration::from_secs(10))
            .expect("4 x 16 KiB");
        assert_eq!(many.len(), 4);
        server.join().expect("server");
    }
}
