//! The injections: malformed frames and SYN floods written through a [`PacketSocket`] at a
//! pace the tap's queue can take, a UDP flood at the host's maximum send rate, and TCP
//! connection churn with resets; each returns what it did.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::frames::{FrameFactory, Malformation, Rng, SynSource};
use super::raw::PacketSocket;
use crate::client::{ClientError, pattern_byte, tcp_echo_on};

/// What an injection wrote.
#[derive(Clone, Debug, Default)]
pub struct InjectionReport {
    /// Frames written, by kind.
    pub by_kind: BTreeMap<String, u64>,
    /// Frames written in all.
    pub written: u64,
    /// Writes the host refused (e.g. `EMSGSIZE`, `ENOBUFS`), by error.
    pub refused: BTreeMap<String, u64>,
    /// Time spent writing.
    pub elapsed: Duration,
}

impl InjectionReport {
    fn count(&mut self, kind: &str, result: io::Result<()>) {
        match result {
            Ok(()) => {
                self.written += 1;
                *self.by_kind.entry(kind.to_string()).or_default() += 1;
            }
            Err(error) => *self.refused.entry(error.to_string()).or_default() += 1,
        }
    }

    /// Adds another report's counts.
    pub fn merge(&mut self, other: &InjectionReport) {
        self.written += other.written;
        for (kind, count) in &other.by_kind {
            *self.by_kind.entry(kind.clone()).or_default() += count;
        }
        for (error, count) in &other.refused {
            *self.refused.entry(error.clone()).or_default() += count;
        }
        self.elapsed += other.elapsed;
    }
}

impl fmt::Display for InjectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} frames written in {:.2} s (",
            self.written,
            self.elapsed.as_secs_f64()
        )?;
        let mut first = true;
        for (kind, count) in &self.by_kind {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{kind} {count}")?;
        }
        f.write_str(")")?;
        if !self.refused.is_empty() {
            write!(f, "; refused by the host: {:?}", self.refused)?;
        }
        Ok(())
    }
}

/// How fast to write: `burst` frames, then a pause. Keeps the tap's queue (1000 frames) from
/// overflowing, so that the frames reach the guest rather than the tap's drop counter.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Frames per burst.
    pub burst: u32,
    /// Pause after each burst.
    pub pause: Duration,
}

impl Default for Pacing {
    fn default() -> Pacing {
        Pacing {
            burst: 32,
            pause: Duration::from_micros(500),
        }
    }
}

/// Writes `count` malformed frames of kinds picked at random from `kinds` (evenly) onto
/// `socket`, at `pacing`.
pub fn inject_malformed(
    socket: &PacketSocket,
    factory: &mut FrameFactory,
    kinds: &[Malformation],
    count: u64,
    pacing: Pacing,
) -> InjectionReport {
    let began = Instant::now();
    let mut report = InjectionReport::default();
    for index in 0..count {
        let kind = kinds[factory.rng().below(kinds.len() as u64) as usize];
        let frame = factory.malformed(kind);
        report.count(kind.name(), socket.send(&frame));
        pace(index, pacing);
    }
    report.elapsed = began.elapsed();
    report
}

/// Writes `count` SYNs to the guest's echo port from `source` onto `socket`, at `pacing`.
pub fn syn_flood(
    socket: &PacketSocket,
    factory: &mut FrameFactory,
    source: SynSource,
    count: u64,
    pacing: Pacing,
) -> InjectionReport {
    let began = Instant::now();
    let mut report = InjectionReport::default();
    let kind = match source {
        SynSource::Host => "tcp-syn-from-host",
        SynSource::Spoofed => "tcp-syn-spoofed",
    };
    for index in 0..count {
        let frame = factory.syn(source);
        report.count(kind, socket.send(&frame));
        pace(index, pacing);
    }
    report.elapsed = began.elapsed();
    report
}

fn pace(index: u64, pacing: Pacing) {
    if pacing.burst > 0
        && (index + 1).is_multiple_of(u64::from(pacing.burst))
        && !pacing.pause.is_zero()
    {
        thread::sleep(pacing.pause);
    }
}

/// What a UDP flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    /// Datagrams the host accepted for sending.
    pub datagrams: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Sends the host refused (`ENOBUFS`, `EAGAIN`): its queues were full.
    pub refused: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

impl FloodReport {
    /// Datagrams per second.
    pub fn rate(&self) -> f64 {
        self.datagrams as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sends UDP datagrams to `target` as fast as the host allows for `duration`, cycling through
/// `sizes`, from `threads` sockets at once. Echoes coming back are never read (the sockets'
/// receive queues overflow, which costs the host nothing).
pub fn udp_flood(
    target: SocketAddr,
    sizes: &[usize],
    duration: Duration,
    threads: usize,
) -> io::Result<FloodReport> {
    let datagrams = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let began = Instant::now();
    let deadline = began + duration;
    let largest = sizes.iter().copied().max().unwrap_or(64);
    let payload: Vec<u8> = (0..largest)
        .map(|i| pattern_byte(0xF100D, i as u64))
        .collect();
    let sockets = (0..threads.max(1))
        .map(|_| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(target)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<io::Result<Vec<UdpSocket>>>()?;
    thread::scope(|scope| {
        for (worker, socket) in sockets.iter().enumerate() {
            let (datagrams, bytes, refused, payload) = (&datagrams, &bytes, &refused, &payload);
            scope.spawn(move || {
                let mut index = worker;
                let (mut sent, mut sent_bytes, mut errors) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        let size = sizes[index % sizes.len()];
                        index += 1;
                        match socket.send(&payload[..size]) {
                            Ok(_) => {
                                sent += 1;
                                sent_bytes += size as u64;
                            }
                            Err(_) => {
                                errors += 1;
                                thread::yield_now();
                            }
                        }
                    }
                }
                datagrams.fetch_add(sent, Ordering::Relaxed);
                bytes.fetch_add(sent_bytes, Ordering::Relaxed);
                refused.fetch_add(errors, Ordering::Relaxed);
            });
        }
    });
    Ok(FloodReport {
        datagrams: datagrams.into_inner(),
        bytes: bytes.into_inner(),
        refused: refused.into_inner(),
        elapsed: began.elapsed(),
    })
}

/// How [`tcp_churn`] treats connection number `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnKind {
    /// Echo a random amount exactly, then close normally (FIN both ways).
    Echo,
    /// Send data, read part of the echo, then reset (`SO_LINGER` 0) while the guest is still
    /// echoing.
    ResetMidTransfer,
    /// Connect, then reset at once, before any data.
    ResetAfterConnect,
}

impl ChurnKind {
    /// The plan: every 5th connection is reset mid-transfer, every 10th (offset 3) right after
    /// connecting, the rest echo and close.
    pub fn for_index(index: usize) -> ChurnKind {
        if index % 5 == 4 {
            ChurnKind::ResetMidTransfer
        } else if index % 10 == 3 {
            ChurnKind::ResetAfterConnect
        } else {
            ChurnKind::Echo
        }
    }
}

/// What a churn run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChurnReport {
    /// Connections opened.
    pub opened: u64,
    /// Connections that echoed exactly and closed normally.
    pub echoed: u64,
    /// Connections reset after part of the echo came back.
    pub reset_mid_transfer: u64,
    /// Connections reset right after connecting.
    pub reset_after_connect: u64,
    /// Bytes echoed exactly.
    pub bytes_echoed: u64,
}

/// Sets `SO_LINGER` to {on, 0 s}, so that closing the socket sends a reset.
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Opens `connections` TCP connections to the echo service at `target`, `concurrency` at a
/// time, each treated as [`ChurnKind::for_index`] says; echoed connections carry 1 to
/// `max_bytes` bytes of their own pattern and are checked exactly. Fails on the first
/// connection that cannot connect or whose echo differs (with its index).
pub fn tcp_churn(
    target: SocketAddr,
    connections: usize,
    concurrency: usize,
    max_bytes: usize,
    timeout: Duration,
) -> Result<ChurnReport, ClientError> {
    let next = AtomicU64::new(0);
    let workers = concurrency.clamp(1, connections.max(1));
    let results: Vec<Result<ChurnReport, ClientError>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let next = &next;
                scope.spawn(move || -> Result<ChurnReport, ClientError> {
                    let mut report = ChurnReport::default();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if index >= connections {
                            return Ok(report);
                        }
                        churn_one(target, index, max_bytes, timeout, &mut report).map_err(
                            |error| ClientError::Protocol(format!("connection #{index}: {error}")),
                        )?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(ClientError::Protocol("a churn worker panicked".to_string()))
                })
            })
            .collect()
    });
    let mut total = ChurnReport::default();
    for result in results {
        let report = result?;
        total.opened += report.opened;
        total.echoed += report.echoed;
        total.reset_mid_transfer += report.reset_mid_transfer;
        total.reset_after_connect += report.reset_after_connect;
        total.bytes_echoed += report.bytes_echoed;
    }
    Ok(total)
}

fn churn_one(
    target: SocketAddr,
    index: usize,
    max_bytes: usize,
    timeout: Duration,
    report: &mut ChurnReport,
) -> Result<(), ClientError> {
    let stream = crate::client::tcp_connect(target, timeout)?;
    report.opened += 1;
    let mut rng = Rng::new(0xC0FFEE ^ index as u64);
    let io_error = |what: &str| {
        let what = what.to_string();
        move |source: io::Error| ClientError::Io {
            context: what,
            source,
        }
    };
    match ChurnKind::for_index(index) {
        ChurnKind::Echo => {
            let bytes = rng.between(1, max_bytes.max(1));
            tcp_echo_on(stream, index as u64, bytes, timeout)?;
            report.echoed += 1;
            report.bytes_echoed += bytes as u64;
        }
        ChurnKind::ResetMidTransfer => {
            // 8 KiB fits the host's send buffer, so the write never blocks; read the first
            // part of the echo, so that the guest is known to be mid-echo, then reset.
            let bytes = 8192;
            let data: Vec<u8> = (0..bytes)
                .map(|i| pattern_byte(index as u64, i as u64))
                .collect();
            let mut writer = stream.try_clone().map_err(io_error("cloning the stream"))?;
            writer
                .write_all(&data)
                .map_err(io_error("sending before the reset"))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(io_error("setting the read timeout"))?;
            let mut echoed = vec![0u8; 1024];
            let mut reader = &stream;
            reader
                .read_exact(&mut echoed)
                .map_err(io_error("reading the start of the echo"))?;
            if echoed[..] != data[..1024] {
                return Err(ClientError::Mismatch {
                    what: format!("TCP churn connection #{index} (reset mid-transfer)"),
                    detail: crate::client::describe_difference(&data[..1024], &echoed),
                });
            }
            set_linger_zero(&stream).map_err(io_error("setting SO_LINGER 0"))?;
            drop(writer);
            drop(stream);
            report.reset_mid_transfer += 1;
        }
        ChurnKind::ResetAfterConnect => {
            set_linger_zero(&stream).map_err(io_error("setting SO_LINGER 0"))?;
            drop(stream);
            report.reset_after_connect += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_plan_mixes_kinds() {
        let kinds: Vec<ChurnKind> = (0..20).map(ChurnKind::for_index).collect();
        let count = |kind| kinds.iter().filter(|&&k| k == kind).count();
        assert_eq!(count(ChurnKind::ResetMidTransfer), 4);
        assert_eq!(count(ChurnKind::ResetAfterConnect), 2);
        assert_eq!(count(ChurnKind::Echo), 14);
    }
}
