//! The benchmark's own clients: UDP ping-pong in two forms (blocking receive and busy-polling
//! receive), windowed UDP echo throughput, ICMP ping-pong and boot-to-first-echo probing. All of
//! them timestamp with the monotonic clock ([`Instant`]), check every echo byte for byte, bound
//! every wait, and stop early when the run is cancelled (Ctrl-C).
//!
//! They use whatever network namespace the calling thread is in: the benchmark calls them inside
//! [`crate::NetNs::run`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::socket::{MsgFlags, recv};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use socket2::SockRef;

use super::BenchError;
use crate::client::{
    EchoReport, IcmpEchoOptions, datagram_payload, describe_difference, icmp_echo,
};
use crate::progress::Progress;

/// How the client waits for an echo.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ClientForm {
    /// `recv(2)` on a blocking socket: the client thread sleeps until the echo arrives.
    Blocking,
    /// `recv(2)` with `MSG_DONTWAIT` in a loop: the client spins on a core until the echo
    /// arrives (no wake-up latency, but it competes with QEMU's threads for the 2 cores).
    Spin,
}

impl ClientForm {
    /// The short name used in tables, JSON and options.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientForm::Blocking => "blocking",
            ClientForm::Spin => "spin",
        }
    }

    /// Both forms, blocking first.
    pub const ALL: [ClientForm; 2] = [ClientForm::Blocking, ClientForm::Spin];
}

/// The raw outcome of one ping-pong run.
#[derive(Clone, Debug, Default)]
pub struct PingPong {
    /// One RTT per measured exchange (warm-up excluded), in nanoseconds.
    pub samples_ns: Vec<u64>,
    /// Datagrams sent, warm-up and retransmissions included.
    pub sent: u64,
    /// Exchanges that timed out and were sent again (with a new sequence number).
    pub timeouts: u64,
    /// Late echoes of timed-out exchanges that arrived afterwards and were skipped.
    pub stale: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
}

/// A bound on one exchange: past it, the request is counted as timed out and a new one is sent.
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(200);
/// A run fails when this many exchanges in a row time out (the peer is gone).
const MAX_CONSECUTIVE_TIMEOUTS: u64 = 25;

fn io_err(context: &str) -> impl FnOnce(io::Error) -> BenchError + '_ {
    move |error| BenchError::Failed(format!("{context}: {error}"))
}

fn bind_for(target: SocketAddr) -> Result<UdpSocket, BenchError> {
    let local: SocketAddr = if target.ip().is_loopback() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(local).map_err(io_err("binding the benchmark's UDP socket"))?;
    socket
        .connect(target)
        .map_err(io_err("connecting the benchmark's UDP socket"))?;
    set_buffer_sizes(&socket, 4 << 20);
    Ok(socket)
}

/// Raises SO_RCVBUF and SO_SNDBUF (best effort: the kernel caps them at its maxima).
fn set_buffer_sizes(socket: &UdpSocket, bytes: usize) {
    let socket = SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
}

/// Receives one datagram into `buffer` with `MSG_DONTWAIT`: `Ok(None)` when none is queued.
fn recv_nonblocking(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<Option<usize>> {
    match recv(socket.as_raw_fd(), buffer, MsgFlags::MSG_DONTWAIT) {
        Ok(length) => Ok(Some(length)),
        Err(Errno::EAGAIN) => Ok(None),
        Err(errno) => Err(errno.into()),
    }
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Waits up to `timeout` for one datagram in the given form; `Ok(None)` on timeout.
fn receive(
    socket: &UdpSocket,
    form: ClientForm,
    buffer: &mut [u8],
    timeout: Duration,
) -> io::Result<Option<usize>> {
    match form {
        ClientForm::Blocking => match socket.recv(buffer) {
            Ok(length) => Ok(Some(length)),
            Err(error) if is_timeout(&error) => Ok(None),
            Err(error) => Err(error),
        },
        ClientForm::Spin => {
            let deadline = Instant::now() + timeout;
            let mut spins: u32 = 0;
            loop {
                if let Some(length) = recv_nonblocking(socket, buffer)? {
                    return Ok(Some(length));
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && Instant::now() >= deadline {
                    return Ok(None);
                }
                std::hint::spin_loop();
            }
        }
    }
}

/// Ping-pongs `warmup + count` datagrams of `size` bytes with the UDP echo service at `target`
/// (one in flight), discards the first `warmup` RTTs and returns the rest. A timed-out exchange
/// is sent again under a new sequence number and counted in `timeouts`.
pub fn udp_ping_pong(
    target: SocketAddr,
    size: usize,
    warmup: u64,
    count: u64,
    form: ClientForm,
    progress: &mut Progress,
) -> Result<PingPong, BenchError> {
    let socket = bind_for(target)?;
    socket
        .set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(io_err("setting the UDP read timeout"))?;
    let mut buffer = vec![0u8; 65536];
    let mut result = PingPong {
        samples_ns: Vec::with_capacity(count as usize),
        ..PingPong::default()
    };
    let total = warmup + count;
    let mut seq: u64 = 0;
    let mut done: u64 = 0;
    let mut consecutive_timeouts = 0;
    let mut measured_from = None;
    // Each exchange gets its own payload (the sequence number and a pattern that depends on
    // it), built before the clock starts.
    while done < total {
        super::check_cancelled()?;
        if measured_from.is_none() && done >= warmup {
            measured_from = Some(Instant::now());
        }
        let payload = datagram_payload(seq, size);
        let sent_at = Instant::now();
        socket
            .send(&payload)
            .map_err(io_err("sending a UDP echo request"))?;
        result.sent += 1;
        let deadline = sent_at + EXCHANGE_TIMEOUT;
        let rtt = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            let Some(length) = receive(&socket, form, &mut buffer, left)
                .map_err(io_err("receiving a UDP echo"))?
            else {
                break None;
            };
            let rtt = sent_at.elapsed();
            let got = &buffer[..length];
            if got == payload.as_slice() {
                break Some(rtt);
            }
            if length == size && size >= 8 {
                let mut tag = [0u8; 8];
                tag.copy_from_slice(&got[..8]);
                if u64::from_le_bytes(tag) < seq {
                    result.stale += 1;
                    continue;
                }
            } else if length == size && size < 8 {
                // Too small to carry a sequence number: any same-size datagram after a timeout
                // may be a late echo.
                if result.timeouts > 0 {
                    result.stale += 1;
                    continue;
                }
            }
            return Err(BenchError::Failed(format!(
                "UDP echo #{seq} ({size} bytes) from {target}: the echo differs from what was \
                 sent: {}",
                describe_difference(&payload, got)
            )));
        };
        seq += 1;
        match rtt {
            Some(rtt) => {
                consecutive_timeouts = 0;
                if done >= warmup {
                    result.samples_ns.push(rtt.as_nanos() as u64);
                }
                done += 1;
                progress.set(done);
            }
            None => {
                result.timeouts += 1;
                consecutive_timeouts += 1;
                if consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS {
                    return Err(BenchError::Failed(format!(
                        "UDP echo to {target}: {consecutive_timeouts} exchanges in a row got no \
                         answer within {} ms (after {done} answered)",
                        EXCHANGE_TIMEOUT.as_millis()
                    )));
                }
            }
        }
    }
    result.elapsed = measured_from.map(|t| t.elapsed()).unwrap_or_default();
    Ok(result)
}

/// The outcome of a windowed throughput run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Throughput {
    /// Payload size in bytes.
    pub size: usize,
    /// Datagrams kept in flight.
    pub window: u32,
    /// Length of the sending phase in seconds.
    pub duration_s: f64,
    /// Datagrams sent.
    pub sent: u64,
    /// Exact echoes received (late ones included, up to the end of the drain).
    pub received: u64,
    /// Echoes received per second of the sending phase.
    pub pps: f64,
    /// `1 - received / sent`.
    pub loss_rate: f64,
    /// Times the window was declared lost after a quiet spell and refilled.
    pub window_resets: u64,
    /// The client thread's own CPU time per echo (its `/proc/thread-self/schedstat`), us: what
    /// the client costs the host's cores, for the CPU budget of the run.
    #[serde(default)]
    pub client_cpu_us_per_echo: Option<f64>,
}

/// The calling thread's CPU time so far, from `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    super::machine::parse_schedstat(&text).map(|totals| totals.run_ns)
}

/// Keeps `window` datagrams of `size` bytes in flight to the echo service at `target` for
/// `duration`, counting exact echoes. After `LOSS_WAIT` with no echo the datagrams in flight are
/// declared lost and the window is refilled; echoes that arrive later still count as received.
/// The echo rate and the loss rate come from the counts after a short drain.
pub fn udp_throughput(
    target: SocketAddr,
    size: usize,
    window: u32,
    duration: Duration,
    progress: &mut Progress,
) -> Result<Throughput, BenchError> {
    const LOSS_WAIT: Duration = Duration::from_millis(20);
    const DRAIN: Duration = Duration::from_millis(300);
    let socket = bind_for(target)?;
    socket
        .set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(io_err("setting the UDP read timeout"))?;
    let size = size.max(8);
    let mut buffer = vec![0u8; 65536];
    let mut template = datagram_payload(0, size);
    let pattern = template[8..].to_vec();
    let (mut sent, mut received, mut resets) = (0u64, 0u64, 0u64);
    // Echoes of sequence numbers below `counted_from` no longer hold a window slot.
    let mut counted_from: u64 = 0;
    let mut in_flight: u32 = 0;
    let mut last_echo = Instant::now();
    let cpu_before = thread_cpu_ns();
    let began = Instant::now();
    let end = began + duration;
    let check = |got: &[u8], received: &mut u64| -> Result<Option<u64>, BenchError> {
        if got.len() != size {
            return Err(BenchError::Failed(format!(
                "throughput run: got a {}-byte datagram back, sent {size}",
                got.len()
            )));
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&got[..8]);
        let seq = u64::from_le_bytes(tag);
        // The pattern after the tag is the same for every datagram of the run (fixed stream 0),
        // so the check is one comparison.
        if got[8..] != pattern[..] {
            return Err(BenchError::Failed(format!(
                "throughput run: echo #{seq} differs from what was sent: {}",
                describe_difference(&pattern, &got[8..])
            )));
        }
        *received += 1;
        Ok(Some(seq))
    };
    loop {
        super::check_cancelled()?;
        let now = Instant::now();
        if now >= end {
            break;
        }
        while in_flight < window {
            template[..8].copy_from_slice(&sent.to_le_bytes());
            match socket.send(&template) {
                Ok(_) => {
                    sent += 1;
                    in_flight += 1;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                // The host drops datagrams it cannot queue (ENOBUFS): count them as sent and
                // lost, like a datagram the guest dropped.
                Err(error) if error.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    sent += 1;
                }
                Err(error) => return Err(io_err("sending a throughput datagram")(error)),
            }
        }
        match socket.recv(&mut buffer) {
            Ok(length) => {
                if let Some(seq) = check(&buffer[..length], &mut received)?
                    && seq >= counted_from
                {
                    in_flight = in_flight.saturating_sub(1);
                }
                last_echo = Instant::now();
            }
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(io_err("receiving a throughput echo")(error)),
        }
        if last_echo.elapsed() >= LOSS_WAIT && in_flight > 0 {
            resets += 1;
            in_flight = 0;
            counted_from = sent;
            last_echo = Instant::now();
        }
        progress.set(began.elapsed().as_millis() as u64);
    }
    let duration_s = began.elapsed().as_secs_f64();
    let client_cpu_us_per_echo = match (cpu_before, thread_cpu_ns()) {
        (Some(before), Some(after)) if received > 0 => {
            Some(after.saturating_sub(before) as f64 / 1e3 / received as f64)
        }
        _ => None,
    };
    let drain_end = Instant::now() + DRAIN;
    while Instant::now() < drain_end && received < sent {
        match socket.recv(&mut buffer) {
            Ok(length) => {
                check(&buffer[..length], &mut received)?;
            }
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(io_err("receiving a throughput echo")(error)),
        }
    }
    Ok(Throughput {
        size,
        window,
        duration_s,
        sent,
        received,
        pps: received as f64 / duration_s.max(1e-9),
        loss_rate: if sent == 0 {
            0.0
        } else {
            1.0 - received.min(sent) as f64 / sent as f64
        },
        window_resets: resets,
        client_cpu_us_per_echo,
    })
}

/// ICMP ping-pong through a raw socket (root), in chunks so that progress shows and Ctrl-C is
/// honoured; the first `warmup` RTTs are discarded.
pub fn icmp_ping_pong(
    target: Ipv4Addr,
    size: usize,
    warmup: u64,
    count: u64,
    progress: &mut Progress,
) -> Result<PingPong, BenchError> {
    const CHUNK: u64 = 500;
    let mut all = EchoReport::default();
    let began = Instant::now();
    let mut measured_from = began;
    let total = warmup + count;
    let mut done = 0;
    while done < total {
        super::check_cancelled()?;
        if done == warmup {
            measured_from = Instant::now();
        }
        let chunk = CHUNK
            .min(total - done)
            .min(if done < warmup { warmup - done } else { CHUNK });
        let report = icmp_echo(
            target,
            IcmpEchoOptions {
                count: chunk,
                size,
                timeout: Duration::from_millis(500),
                attempts: 3,
            },
        )
        .map_err(|error| BenchError::Failed(format!("ICMP echo to {target}: {error}")))?;
        if done >= warmup {
            all.rtts.extend(report.rtts.iter().copied());
        }
        all.sent += report.sent;
        all.retransmits += report.retransmits;
        all.stale += report.stale;
        done += chunk;
        progress.set(done);
    }
    Ok(PingPong {
        samples_ns: all.rtts.iter().map(|d| d.as_nanos() as u64).collect(),
        sent: all.sent,
        timeouts: all.retransmits,
        stale: all.stale,
        elapsed: measured_from.elapsed(),
    })
}

/// Sends a small UDP probe to `target` every `interval` until one is echoed, and returns when
/// the first echo arrived, measured from `started`. Send errors (the tap has no reader yet, so
/// the host may refuse) are ignored while probing. Fails after `limit`.
pub fn first_echo(
    target: SocketAddr,
    started: Instant,
    interval: Duration,
    limit: Duration,
) -> Result<(Duration, u64), BenchError> {
    let socket = bind_for(target)?;
    let mut buffer = vec![0u8; 2048];
    let mut seq: u64 = 0;
    loop {
        super::check_cancelled()?;
        let payload = datagram_payload(seq, 16);
        seq += 1;
        let _ = socket.send(&payload);
        let deadline = Instant::now() + interval;
        loop {
            // poll-wait for the rest of the interval
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket
                .set_read_timeout(Some(left.max(Duration::from_micros(100))))
                .map_err(io_err("setting the UDP read timeout"))?;
            match socket.recv(&mut buffer) {
                Ok(length) => {
                    let got = &buffer[..length];
                    if length == 16 {
                        let mut tag = [0u8; 8];
                        tag.copy_from_slice(&got[..8]);
                        let echoed = u64::from_le_bytes(tag);
                        if echoed < seq && got == datagram_payload(echoed, 16).as_slice() {
                            return Ok((started.elapsed(), seq));
                        }
                    }
                }
                Err(error) if is_timeout(&error) => {}
                // ECONNREFUSED (an ICMP port unreachable while the peer's server starts) and
                // similar: keep probing.
                Err(_) => thread::sleep(left.min(interval)),
            }
        }
        if started.elapsed() >= limit {
            return Err(BenchError::Failed(format!(
                "no UDP echo from {target} within {:.1} s of QEMU's start ({seq} probes sent)",
                limit.as_secs_f64()
            )));
        }
    }
}

/// A UDP echo server on `address` (inside the caller's namespace) for the loopback floor; it
/// stops when `stop` is set (checked every 50 ms).
pub fn loopback_echo_server(
    address: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(SocketAddr, thread::JoinHandle<()>), BenchError> {
    let socket =
        UdpSocket::bind(address).map_err(io_err("binding the loopback floor's echo server"))?;
    set_buffer_sizes(&socket, 4 << 20);
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(io_err("setting the loopback server's timeout"))?;
    let local = socket
        .local_addr()
        .map_err(io_err("reading the loopback server's address"))?;
    let handle = thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((length, from)) = socket.recv_from(&mut buffer) {
                let _ = socket.send_to(&buffer[..length], from);
            }
        }
    });
    Ok((local, handle))
}

/// Pins the calling thread (and the threads it spawns afterwards) to `cpu`. Best effort: returns
/// false when the kernel refused (e.g. the CPU is not in this process's set).
pub fn pin_current_thread(cpu: usize) -> bool {
    let mut set = CpuSet::new();
    set.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

/// The outcome of one TCP echo throughput run: `connections` connections opened first, then
/// each streaming `bytes_each` bytes of its own seeded pattern to the echo service while reading
/// the echo back concurrently, every echoed byte checked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TcpThroughput {
    /// Connections held open and streaming at once.
    pub connections: usize,
    /// Bytes each connection sent (and read back).
    pub bytes_each: u64,
    /// Bytes echoed and checked, over all connections (each way).
    pub checked_bytes: u64,
    /// From the start of the transfers to the end of the slowest one, in seconds.
    pub seconds: f64,
    /// Echo throughput, `checked_bytes / seconds`, in MB/s (10^6 bytes per second, each way).
    pub mb_per_s: f64,
    /// Each connection's own transfer time, in seconds.
    pub per_connection_s: Vec<f64>,
    /// The slowest connection's connect time, in milliseconds.
    pub connect_ms_max: f64,
}

/// Runs the TCP echo throughput measurement against `target` (see [`TcpThroughput`]); fails on
/// the first connection error or differing byte, or when the whole run outlasts `timeout`.
pub fn tcp_throughput(
    target: SocketAddr,
    connections: usize,
    bytes_each: usize,
    timeout: Duration,
) -> Result<TcpThroughput, BenchError> {
    let reports = crate::client::tcp_echo_concurrent(target, connections, bytes_each, timeout)?;
    let per_connection_s: Vec<f64> = reports.iter().map(|r| r.transfer.as_secs_f64()).collect();
    let seconds = per_connection_s.iter().copied().fold(0.0, f64::max);
    let checked_bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    if checked_bytes != (connections * bytes_each) as u64 {
        return Err(BenchError::Failed(format!(
            "TCP throughput: {checked_bytes} bytes checked, expected {}",
            connections * bytes_each
        )));
    }
    Ok(TcpThroughput {
        connections,
        bytes_each: bytes_each as u64,
        checked_bytes,
        seconds,
        mb_per_s: checked_bytes as f64 / seconds.max(1e-9) / 1e6,
        per_connection_s,
        connect_ms_max: reports
            .iter()
            .map(|r| r.connect.as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
    })
}

/// A TCP echo server on `address` (inside the caller's namespace) for the loopback TCP floor:
/// a thread per connection, echoing every byte until the peer closes; the accept loop stops
/// when `stop` is set (checked every 50 ms).
pub fn loopback_tcp_echo_server(
    address: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(SocketAddr, thread::JoinHandle<()>), BenchError> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(address)
        .map_err(io_err("binding the loopback TCP floor's echo server"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("making the loopback TCP listener non-blocking"))?;
    let local = listener
        .local_addr()
        .map_err(io_err("reading the loopback TCP server's address"))?;
    let handle = thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_nodelay(true);
                    thread::spawn(move || {
                        let mut buffer = vec![0u8; 128 * 1024];
                        while let Ok(length) = stream.read(&mut buffer) {
                            if length == 0 || stream.write_all(&buffer[..length]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    Ok((local, handle))
}
