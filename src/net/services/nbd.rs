//! An NBD server (the NBD protocol document, NetworkBlockDevice/nbd `doc/proto.md`) on TCP
//! port 10809, serving one export over any [`BlockDevice`]. Built on the service API
//! ([`crate::net::service::Service`]); not among the default services.
//!
//! What it speaks, by the document's sections:
//!
//! * "Fixed newstyle negotiation": `NBDMAGIC`, `IHAVEOPT`, the handshake flags
//!   `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`; client flags other than those two close
//!   the connection ("Client flags": the server MUST drop it);
//! * "Option types": `NBD_OPT_EXPORT_NAME` (an unknown name closes the connection, as it
//!   MUST), `NBD_OPT_ABORT` (acknowledged, then closed), `NBD_OPT_LIST` (one
//!   `NBD_REP_SERVER`), `NBD_OPT_INFO` and `NBD_OPT_GO` (`NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE`, or `NBD_REP_ERR_UNKNOWN`); any other option gets
//!   `NBD_REP_ERR_UNSUP`, a malformed one `NBD_REP_ERR_INVALID`, one with more data than
//!   [`OPTION_DATA_MAX`] `NBD_REP_ERR_TOO_BIG` (its data skipped, never stored);
//! * "Transmission" with simple replies only: `NBD_CMD_READ`, `NBD_CMD_WRITE`,
//!   `NBD_CMD_DISC`, `NBD_CMD_FLUSH`, and `NBD_CMD_TRIM` / `NBD_CMD_WRITE_ZEROES` when the
//!   device has them, with `NBD_CMD_FLAG_FUA` (a write's reply waits for its completion, a FUA
//!   write's for a flush after it: "Ordering of messages and writes"); replies may go out of
//!   order (the document allows it), each with its request's cookie;
//! * "Error values": `NBD_EINVAL` for a range past the end of a read or trim, a misaligned
//!   offset or length, a length beyond the maximum payload, an unknown command or flag;
//!   `NBD_ENOSPC` for a write or write-zeroes past the end; `NBD_EPERM` for writes on a
//!   read-only export; the device's errors as `NBD_EIO` / `NBD_ENOSPC` / `NBD_EPERM`;
//! * "Terminating the transmission phase": a bad request magic, or a write whose payload is
//!   beyond what the document says a server must tolerate (2^25 bytes, "Size constraints"),
//!   is a hard disconnect; other connections are unaffected.
//!
//! Connections are a fixed pool of TCP sockets ([`NbdConfig::connections`]), each listening
//! until a client takes it; the free ones are the port's listen backlog
//! ([`Service::syn_credits`]). A client still haggling after 10 s, or a connection still open
//! 5 s after it was closed or started draining, is reset, so no client holds a slot outside
//! transmission (an idle transmission is legitimate and kept).
//!
//! Every buffer is bounded: a write's payload is read only when it fits the maximum payload
//! (otherwise it is skipped and refused), option data beyond [`OPTION_DATA_MAX`] is skipped,
//! each connection has at most [`NbdConfig::max_in_flight`] device requests and takes no new one while
//! the data of those in flight and of its unsent replies exceeds one maximum payload (so it
//! holds about two maximum payloads at most, plus a write's), and a connection whose replies
//! back up (the client not reading) is not read further. The reply buffer gives back what
//! was sent while more replies queue, so it stays within about twice that budget
//! (`nbd_output_peak` on the stats line). Data buffers are recycled per connection. The device is never waited for: requests are submitted with an id and
//! their completions polled ([`BlockDevice`]); while the device has requests in flight,
//! [`Service::poll_at`] asks for polling at once ([`BlockDevice::pending`]).

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};

use crate::block::{BlockDevice, BlockDeviceInfo, BlockError, BlockRequest};
use crate::net::service::{Service, ServiceContext};

/// The IANA port for NBD ("Newstyle negotiation").
pub const NBD_PORT: u16 = 10809;
/// Device requests in flight per connection, at most, by default ([`NbdConfig::max_in_flight`]).
pub const MAX_IN_FLIGHT: usize = 8;
/// Option data kept, at most (an export name is at most 4 KiB, "Option types").
pub const OPTION_DATA_MAX: u32 = 8192;
/// Write payloads beyond this are a hard disconnect ("Size constraints": payloads up to 2^25
/// bytes SHOULD NOT be deemed a denial of service; longer ones may be).
const SKIP_LIMIT: u32 = 1 << 25;
/// Replies waiting to be sent beyond this stop the reading of further requests.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// A connection we closed, or that drains its last replies, and that is still open this long
/// after is reset, so a client cannot hold a slot after its session ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client still haggling this long after it connected is reset (a slot is not held by a
/// client that never gets to transmission; an idle transmission is legitimate and kept).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_FUA: u16 = 1 << 3;
const FLAG_SEND_TRIM: u16 = 1 << 5;
const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// `NBD_EPERM`.
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// `NBD_EINVAL`.
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const NBD_ENOSPC: u32 = 28;

const TCP_BUFFER: usize = 64 * 1024;
const REQUEST_HEADER: usize = 28;
const OPTION_HEADER: usize = 16;

/// How the service is set up.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// The export's name (the empty name, the default export, is accepted too).
    pub export_name: String,
    /// Connections served at once (each a TCP socket, listening while free).
    pub connections: usize,
    /// The maximum payload advertised in `NBD_INFO_BLOCK_SIZE` (capped by the device's
    /// maximum transfer).
    pub max_payload: u32,
    /// Serve the export read-only even if the device is writable.
    pub read_only: bool,
    /// Device requests one connection may have in flight ([`MAX_IN_FLIGHT`] by default; the
    /// kernel shares its disk's queue depth among the connections).
    pub max_in_flight: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            export_name: String::from("vireo"),
            connections: 4,
            max_payload: 1 << 20,
            read_only: false,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

/// The service's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections that entered transmission.
    pub exports: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections closed by the server for a protocol violation.
    pub violations: u64,
    /// Connections reset for outstaying a handshake or a close.
    pub timeouts: u64,
}

/// Where a connection is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Listening; no client.
    Idle,
    /// Greeting sent; waiting for the client flags.
    ClientFlags,
    /// Option haggling.
    Options,
    /// Transmission.
    Transmission,
    /// `NBD_CMD_DISC` or `NBD_OPT_ABORT`: finish what is in flight, send, then close.
    Draining,
    /// Closed by us; waiting for the socket to finish closing.
    Closed,
}

impl Phase {
    /// How long a connection may stay in this phase.
    fn time_limit(self) -> Option<Duration> {
        match self {
            Self::ClientFlags | Self::Options => Some(HANDSHAKE_TIMEOUT),
            Self::Draining | Self::Closed => Some(CLOSE_TIMEOUT),
            Self::Idle | Self::Transmission => None,
        }
    }
}

/// What to do once skipped bytes are gone.
#[derive(Clone, Copy, Debug)]
enum AfterSkip {
    /// Send this option reply (option, reply type).
    OptionReply(u32, u32),
    /// Send an error reply (cookie, error).
    Error(u64, u32),
}

/// One connection.
struct Connection {
    handle: SocketHandle,
    /// Bumped each time the slot is reset, so completions of a former client are dropped.
    generation: u64,
    phase: Phase,
    no_zeroes: bool,
    /// Bytes received of the current header or option.
    input: Vec<u8>,
    /// A write's payload being received: the request and its buffer.
    payload: Option<(Request, Vec<u8>, usize)>,
    /// Bytes to discard, then what to send.
    skip: Option<(u64, AfterSkip)>,
    /// Bytes to send, from `sent` on.
    output: Vec<u8>,
    sent: usize,
    in_flight: usize,
    /// Bytes of data buffers its requests in flight hold.
    buffered: usize,
    spare: Vec<Vec<u8>>,
    /// Buffers kept for reuse, at most (its requests in flight, at most).
    spare_max: usize,
    /// The phase last seen by [`NbdService::serve`], and since when.
    observed: Phase,
    since: Instant,
}

/// A transmission request, parsed.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

/// A device request of a connection, in flight.
#[derive(Debug)]
struct InFlight {
    id: u64,
    slot: usize,
    generation: u64,
    cookie: u64,
    /// A read (its reply carries the data).
    read: bool,
    /// A flush must follow before the reply (FUA).
    then_flush: bool,
    /// Bytes of data buffer it holds (counted in its connection's `buffered`).
    bytes: usize,
}

/// The device and the requests in flight on it.
struct Backend<D> {
    device: D,
    info: BlockDeviceInfo,
    read_only: bool,
    max_payload: u32,
    next_id: u64,
    in_flight: Vec<InFlight>,
    /// Requests the device refused for now, retried in order.
    deferred: VecDeque<(u64, BlockRequest)>,
    /// Requests the device refused for now (its queue full) and that waited (`nbd_deferred`).
    deferrals: u64,
}

impl<D: BlockDevice> Backend<D> {
    fn submit(&mut self, entry: InFlight, request: BlockRequest) {
        let id = entry.id;
        self.in_flight.push(entry);
        if !self.deferred.is_empty() {
            self.deferrals += 1;
            self.deferred.push_back((id, request));
        } else if let Err(request) = self.device.submit(id, request) {
            self.deferrals += 1;
            self.deferred.push_back((id, request));
        }
    }

    fn retry_deferred(&mut self) -> bool {
        let mut activity = false;
        while let Some((id, request)) = self.deferred.pop_front() {
            if let Err(request) = self.device.submit(id, request) {
                self.deferred.push_front((id, request));
                break;
            }
            activity = true;
        }
        activity
    }

    fn new_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if self.info.flush {
            flags |= FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        }
        if self.info.trim {
            flags |= FLAG_SEND_TRIM;
        }
        if self.info.write_zeroes {
            flags |= FLAG_SEND_WRITE_ZEROES;
        }
        flags
    }
}

/// An NBD server over a block device.
pub struct NbdService<D> {
    config: NbdConfig,
    port: u16,
    backend: Backend<D>,
    connections: Vec<Connection>,
    counters: NbdCounters,
    /// The largest reply buffer a connection held, in bytes (`nbd_output_peak`).
    output_peak: usize,
}

fn listener(port: u16) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    // Listening on a fresh socket with a non-zero port cannot fail.
    let _ = socket.listen(port);
    socket
}

fn error_code(error: BlockError) -> u32 {
    match error {
        BlockError::Io => NBD_EIO,
        BlockError::NoSpace => NBD_ENOSPC,
        BlockError::ReadOnly => NBD_EPERM,
        BlockError::Invalid | BlockError::Unsupported => NBD_EINVAL,
    }
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(array)
}

impl Connection {
    fn new(handle: SocketHandle, spare_max: usize) -> Self {
        Self {
            handle,
            generation: 0,
            phase: Phase::Idle,
            no_zeroes: false,
            input: Vec::new(),
            payload: None,
            skip: None,
            output: Vec::new(),
            sent: 0,
            in_flight: 0,
            buffered: 0,
            spare: Vec::new(),
            spare_max,
            observed: Phase::Idle,
            since: Instant::ZERO,
        }
    }

    /// Back to listening state, dropping everything of the former client.
    fn reset(&mut self) {
        self.generation += 1;
        self.phase = Phase::Idle;
        self.no_zeroes = false;
        self.input.clear();
        self.payload = None;
        self.skip = None;
        self.output.clear();
        self.sent = 0;
        self.in_flight = 0;
        self.buffered = 0;
    }

    /// Notes when the phase changed.
    fn observe(&mut self, now: Instant) {
        if self.phase != self.observed {
            self.observed = self.phase;
            self.since = now;
        }
    }

    /// When the connection outstays its phase, if its phase has a limit.
    fn deadline(&self) -> Option<Instant> {
        self.phase.time_limit().map(|limit| self.since + limit)
    }

    fn pending_output(&self) -> usize {
        self.output.len() - self.sent
    }

    fn buffer(&mut self, length: usize) -> Vec<u8> {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.resize(length, 0);
        buffer
    }

    fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < self.spare_max {
            self.spare.push(buffer);
        }
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.output
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&kind.to_be_bytes());
        self.output
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.extend_from_slice(data);
    }

    fn simple_reply(&mut self, cookie: u64, error: u32, data: &[u8]) {
        self.output
            .extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&error.to_be_bytes());
        self.output.extend_from_slice(&cookie.to_be_bytes());
        self.output.extend_from_slice(data);
    }

    /// A hard disconnect: nothing more is read or sent.
    fn violation(&mut self, socket: &mut tcp::Socket<'static>, counters: &mut NbdCounters) {
        counters.violations += 1;
        self.close(socket);
    }

    /// Closes our side; [`CLOSE_TIMEOUT`] later, the connection is reset if still open.
    fn close(&mut self, socket: &mut tcp::Socket<'static>) {
        socket.close();
        self.reset();
        self.phase = Phase::Closed;
    }
}

impl<D: BlockDevice> NbdService<D> {
    /// An NBD server of `device` on port 10809 (bound later, by [`Service::bind`]).
    pub fn new(device: D, config: NbdConfig) -> Self {
        let info = device.info();
        let max_payload = config
            .max_payload
            .min(info.max_transfer)
            .max(info.preferred_block);
        Self {
            port: NBD_PORT,
            backend: Backend {
                read_only: config.read_only || info.read_only,
                device,
                info,
                max_payload,
                next_id: 0,
                in_flight: Vec::new(),
                deferred: VecDeque::new(),
                deferrals: 0,
            },
            connections: Vec::new(),
            counters: NbdCounters::default(),
            output_peak: 0,
            config,
        }
    }

    /// Its counters.
    pub fn counters(&self) -> NbdCounters {
        self.counters
    }

    /// The device (tests look inside).
    pub fn device(&self) -> &D {
        &self.backend.device
    }

    /// Forgets the requests of former clients that the device has not taken yet, so that
    /// clients coming and going cannot grow the queue of deferred requests.
    fn drop_stale_deferred(&mut self) {
        let connections = &self.connections;
        let in_flight = &mut self.backend.in_flight;
        self.backend.deferred.retain(|(id, _)| {
            let Some(index) = in_flight.iter().position(|entry| entry.id == *id) else {
                return false;
            };
            let entry = &in_flight[index];
            let live = connections
                .get(entry.slot)
                .is_some_and(|connection| connection.generation == entry.generation);
            if !live {
                in_flight.swap_remove(index);
            }
            live
        });
    }

    /// Takes the device's completions and queues the replies.
    fn complete(&mut self) -> bool {
        let mut activity = false;
        while let Some(completion) = self.backend.device.poll() {
            activity = true;
            let Some(index) = self
                .backend
                .in_flight
                .iter()
                .position(|entry| entry.id == completion.id)
            else {
                continue;
            };
            let entry = self.backend.in_flight.swap_remove(index);
            let Some(connection) = self
                .connections
                .get_mut(entry.slot)
                .filter(|connection| connection.generation == entry.generation)
            else {
                continue;
            };
            if entry.then_flush && completion.result.is_ok() {
                if let Some(buffer) = completion.buffer {
                    connection.recycle(buffer);
                }
                let id = self.backend.new_id();
                let flush = InFlight {
                    id,
                    then_flush: false,
                    ..entry
                };
                self.backend.submit(flush, BlockRequest::Flush);
                continue;
            }
            connection.in_flight -= 1;
            connection.buffered -= entry.bytes;
            self.counters.requests += 1;
            match completion.result {
                Ok(()) => {
                    let data = completion.buffer.filter(|_| entry.read);
                    connection.simple_reply(entry.cookie, 0, data.as_deref().unwrap_or(&[]));
                    if let Some(buffer) = data {
                        connection.recycle(buffer);
                    }
                }
                Err(error) => {
                    self.counters.errors += 1;
                    connection.simple_reply(entry.cookie, error_code(error), &[]);
                    if let Some(buffer) = completion.buffer {
                        connection.recycle(buffer);
                    }
                }
            }
        }
        activity
    }

    fn serve(&mut self, slot: usize, sockets: &mut SocketSet<'static>, now: Instant) -> bool {
        let connection = &mut self.connections[slot];
        let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
        let mut activity = false;
        connection.observe(now);
        if socket.is_open()
            && connection
                .deadline()
                .is_some_and(|deadline| now >= deadline)
        {
            // The reset goes out when the interface next dispatches; the socket listens
            // again on the next pass (listening now would forget the peer, and the reset).
            socket.abort();
            self.counters.timeouts += 1;
            return true;
        }
        if !socket.is_open() {
            // Closed (by either side): listen again.
            connection.reset();
            let _ = socket.listen(self.port);
            return true;
        }
        if connection.phase == Phase::Idle && socket.may_send() {
            self.counters.accepted += 1;
            connection.phase = Phase::ClientFlags;
            connection.output.extend_from_slice(&NBDMAGIC.to_be_bytes());
            connection.output.extend_from_slice(&IHAVEOPT.to_be_bytes());
            connection
                .output
                .extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            activity = true;
        }
        if connection.phase != Phase::Idle && connection.phase != Phase::Closed {
            // The client closed its side: nothing more will come.
            if !socket.may_recv() && !socket.can_recv() && connection.phase != Phase::Draining {
                connection.phase = Phase::Draining;
            }
            activity |= self.read(slot, sockets);
        }
        let connection = &mut self.connections[slot];
        let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
        self.output_peak = self.output_peak.max(connection.output.capacity());
        // Send what is waiting.
        if connection.pending_output() > 0 && socket.can_send() {
            let sent = socket
                .send_slice(&connection.output[connection.sent..])
                .unwrap_or(0);
            connection.sent += sent;
            if connection.sent == connection.output.len() {
                connection.output.clear();
                connection.sent = 0;
            } else if connection.sent >= connection.output.len() / 2 {
                // Replies keep coming while earlier ones are being sent: give back what went
                // out, or the buffer would grow with everything ever sent. Moving the unsent
                // half at most costs no more than the bytes sent since the last move.
                connection.output.drain(..connection.sent);
                connection.sent = 0;
            }
            activity |= sent > 0;
        }
        if connection.phase == Phase::Draining
            && connection.in_flight == 0
            && connection.pending_output() == 0
        {
            connection.close(socket);
            activity = true;
        }
        connection.observe(now);
        activity
    }

    /// Reads and handles what the client sent, as far as buffers allow.
    fn read(&mut self, slot: usize, sockets: &mut SocketSet<'static>) -> bool {
        let mut activity = false;
        loop {
            let connection = &mut self.connections[slot];
            let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
            if matches!(
                connection.phase,
                Phase::Draining | Phase::Closed | Phase::Idle
            ) {
                return activity;
            }
            // A write's payload (a zero-length one is complete at once).
            if let Some((request, mut buffer, filled)) = connection.payload.take() {
                let got = if filled < buffer.len() {
                    socket.recv_slice(&mut buffer[filled..]).unwrap_or(0)
                } else {
                    0
                };
                activity |= got > 0;
                if filled + got < buffer.len() {
                    connection.payload = Some((request, buffer, filled + got));
                    if got == 0 {
                        return activity;
                    }
                    continue;
                }
                self.write(slot, request, buffer);
                activity = true;
                continue;
            }
            if !socket.can_recv() {
                return activity;
            }
            // Skipping refused data.
            if let Some((remaining, after)) = connection.skip {
                let taken = socket
                    .recv(|bytes| {
                        let take = bytes
                            .len()
                            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                        (take, take)
                    })
                    .unwrap_or(0);
                activity |= taken > 0;
                let remaining = remaining - taken as u64;
                if remaining > 0 {
                    connection.skip = Some((remaining, after));
                    continue;
                }
                connection.skip = None;
                match after {
                    AfterSkip::OptionReply(option, kind) => {
                        connection.option_reply(option, kind, &[]);
                    }
                    AfterSkip::Error(cookie, error) => {
                        self.counters.requests += 1;
                        self.counters.errors += 1;
                        connection.simple_reply(cookie, error, &[]);
                    }
                }
                continue;
            }
            // Back-pressure: no new option or request while the socket or the device is
            // behind (a client that never reads its replies cannot grow the output), nor while
            // the data of requests in flight and of replies waiting exceeds one maximum
            // payload (so a connection holds at most about two maximum payloads and a
            // write's).
            if connection.pending_output() > OUTPUT_HIGH_WATER
                || (connection.phase == Phase::Transmission
                    && (connection.in_flight >= self.config.max_in_flight.max(1)
                        || connection.buffered + connection.pending_output()
                            > self.backend.max_payload as usize))
            {
                return activity;
            }
            let need = match connection.phase {
                Phase::ClientFlags => 4,
                Phase::Options if connection.input.len() < OPTION_HEADER => OPTION_HEADER,
                Phase::Options => OPTION_HEADER + be_u32(&connection.input[12..16]) as usize,
                _ => REQUEST_HEADER,
            };
            let have = connection.input.len();
            let mut chunk = [0u8; 64];
            let want = (need - have).min(chunk.len());
            let got = socket.recv_slice(&mut chunk[..want]).unwrap_or(0);
            activity |= got > 0;
            connection.input.extend_from_slice(&chunk[..got]);
            if connection.input.len() < need {
                continue;
            }
            match connection.phase {
                Phase::ClientFlags => self.client_flags(slot, sockets),
                Phase::Options => self.option(slot, sockets),
                _ => self.request(slot, sockets),
            }
        }
    }

    fn client_flags(&mut self, slot: usize, sockets: &mut SocketSet<'static>) {
        let connection = &mut self.connections[slot];
        let flags = be_u32(&connection.input);
        connection.input.clear();
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
            connection.violation(socket, &mut self.counters);
            return;
        }
        connection.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        connection.phase = Phase::Options;
    }

    fn export_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.export_name.as_bytes()
    }

    /// Handles an option header, and its data once complete.
    fn option(&mut self, slot: usize, sockets: &mut SocketSet<'static>) {
        let connection = &mut self.connections[slot];
        let magic = be_u64(&connection.input);
        let option = be_u32(&connection.input[8..12]);
        let length = be_u32(&connection.input[12..16]);
        if magic != IHAVEOPT {
            let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
            connection.violation(socket, &mut self.counters);
            return;
        }
        if length > OPTION_DATA_MAX {
            connection.input.clear();
            if option == OPT_EXPORT_NAME {
                // No name that long exists, and this option cannot fail: the session ends.
                let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
                connection.violation(socket, &mut self.counters);
                return;
            }
            connection.skip = Some((
                u64::from(length),
                AfterSkip::OptionReply(option, REP_ERR_TOO_BIG),
            ));
            return;
        }
        if connection.input.len() < OPTION_HEADER + length as usize {
            // The data is still to come (the reader asks for it, knowing the length).
            return;
        }
        let data: Vec<u8> = connection.input[OPTION_HEADER..].to_vec();
        connection.input.clear();
        match option {
            OPT_EXPORT_NAME => {
                if !self.export_matches(&data) {
                    let connection = &mut self.connections[slot];
                    let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
                    connection.close(socket);
                    return;
                }
                let size = self.backend.info.size;
                let flags = self.backend.transmission_flags();
                let connection = &mut self.connections[slot];
                connection.output.extend_from_slice(&size.to_be_bytes());
                connection.output.extend_from_slice(&flags.to_be_bytes());
                if !connection.no_zeroes {
                    connection.output.extend_from_slice(&[0; 124]);
                }
                connection.phase = Phase::Transmission;
                self.counters.exports += 1;
            }
            OPT_ABORT => {
                connection.option_reply(option, REP_ACK, &[]);
                connection.phase = Phase::Draining;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    connection.option_reply(option, REP_ERR_INVALID, &[]);
                    return;
                }
                let name = self.config.export_name.as_bytes();
                let mut entry = Vec::with_capacity(4 + name.len());
                entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                entry.extend_from_slice(name);
                let connection = &mut self.connections[slot];
                connection.option_reply(option, REP_SERVER, &entry);
                connection.option_reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => self.info_or_go(slot, option, &data),
            _ => connection.option_reply(option, REP_ERR_UNSUP, &[]),
        }
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`.
    fn info_or_go(&mut self, slot: usize, option: u32, data: &[u8]) {
        // Name length, name, the number of information requests, the requests.
        let well_formed = data.len() >= 6 && {
            let name_length = be_u32(data) as usize;
            name_length <= data.len() - 6 && {
                let count = be_u16(&data[4 + name_length..]) as usize;
                data.len() == 4 + name_length + 2 + 2 * count
            }
        };
        if !well_formed {
            self.connections[slot].option_reply(option, REP_ERR_INVALID, &[]);
            return;
        }
        let name = &data[4..4 + be_u32(data) as usize];
        if !self.export_matches(name) {
            self.connections[slot].option_reply(option, REP_ERR_UNKNOWN, &[]);
            return;
        }
        let info = self.backend.info;
        let mut export = [0u8; 12];
        export[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&info.size.to_be_bytes());
        export[10..].copy_from_slice(&self.backend.transmission_flags().to_be_bytes());
        let mut sizes = [0u8; 14];
        sizes[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        sizes[2..6].copy_from_slice(&info.min_block.to_be_bytes());
        sizes[6..10].copy_from_slice(&info.preferred_block.to_be_bytes());
        sizes[10..].copy_from_slice(&self.backend.max_payload.to_be_bytes());
        let connection = &mut self.connections[slot];
        connection.option_reply(option, REP_INFO, &export);
        connection.option_reply(option, REP_INFO, &sizes);
        connection.option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            connection.phase = Phase::Transmission;
            self.counters.exports += 1;
        }
    }

    /// Checks a request's range: `Err(error)` when it is misaligned, too long, or past the
    /// end (`beyond` is the error for the latter).
    fn check_range(&self, request: &Request, payload: bool, beyond: u32) -> Result<(), u32> {
        let info = &self.backend.info;
        let block = u64::from(info.min_block.max(1));
        if !request.offset.is_multiple_of(block) || !u64::from(request.length).is_multiple_of(block)
        {
            return Err(NBD_EINVAL);
        }
        if payload && request.length > self.backend.max_payload {
            return Err(NBD_EINVAL);
        }
        match request.offset.checked_add(u64::from(request.length)) {
            Some(end) if end <= info.size => Ok(()),
            _ => Err(beyond),
        }
    }

    /// Handles a transmission request header.
    fn request(&mut self, slot: usize, sockets: &mut SocketSet<'static>) {
        let connection = &mut self.connections[slot];
        let input = &connection.input;
        let magic = be_u32(input);
        let request = Request {
            flags: be_u16(&input[4..]),
            kind: be_u16(&input[6..]),
            cookie: be_u64(&input[8..]),
            offset: be_u64(&input[16..]),
            length: be_u32(&input[24..]),
        };
        connection.input.clear();
        if magic != REQUEST_MAGIC {
            let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
            connection.violation(socket, &mut self.counters);
            return;
        }
        let info = self.backend.info;
        let fua_allowed = if info.flush { CMD_FLAG_FUA } else { 0 };
        let known_flags = match request.kind {
            CMD_WRITE_ZEROES => fua_allowed | CMD_FLAG_NO_HOLE,
            _ => fua_allowed,
        };
        let fua = request.flags & CMD_FLAG_FUA != 0;
        if request.kind == CMD_WRITE {
            if request.length > self.backend.max_payload {
                if request.length > SKIP_LIMIT {
                    let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
                    connection.violation(socket, &mut self.counters);
                } else {
                    connection.skip = Some((
                        u64::from(request.length),
                        AfterSkip::Error(request.cookie, NBD_EINVAL),
                    ));
                }
                return;
            }
            let buffer = connection.buffer(request.length as usize);
            connection.payload = Some((request, buffer, 0));
            return;
        }
        let result = match request.kind {
            CMD_DISC => {
                connection.phase = Phase::Draining;
                return;
            }
            _ if request.flags & !known_flags != 0 => Err(NBD_EINVAL),
            CMD_READ => self.check_range(&request, true, NBD_EINVAL).map(|()| {
                let connection = &mut self.connections[slot];
                let buffer = connection.buffer(request.length as usize);
                BlockRequest::Read {
                    offset: request.offset,
                    buffer,
                }
            }),
            CMD_FLUSH if info.flush => {
                if request.offset != 0 || request.length != 0 {
                    Err(NBD_EINVAL)
                } else {
                    Ok(BlockRequest::Flush)
                }
            }
            CMD_TRIM if info.trim => {
                self.write_check(&request, NBD_EINVAL)
                    .map(|()| BlockRequest::Trim {
                        offset: request.offset,
                        length: u64::from(request.length),
                    })
            }
            CMD_WRITE_ZEROES if info.write_zeroes => {
                self.write_check(&request, NBD_ENOSPC)
                    .map(|()| BlockRequest::WriteZeroes {
                        offset: request.offset,
                        length: u64::from(request.length),
                    })
            }
            _ => Err(NBD_EINVAL),
        };
        self.dispatch(slot, request, result, fua);
    }

    /// The checks of a request that modifies the export.
    fn write_check(&self, request: &Request, beyond: u32) -> Result<(), u32> {
        if self.backend.read_only {
            return Err(NBD_EPERM);
        }
        self.check_range(request, false, beyond)
    }

    /// A write whose payload arrived.
    fn write(&mut self, slot: usize, request: Request, buffer: Vec<u8>) {
        let fua_allowed = if self.backend.info.flush {
            CMD_FLAG_FUA
        } else {
            0
        };
        let result = if request.flags & !fua_allowed != 0 {
            Err(NBD_EINVAL)
        } else {
            self.write_check(&request, NBD_ENOSPC)
        };
        let result = match result {
            Ok(()) => Ok(BlockRequest::Write {
                offset: request.offset,
                buffer,
            }),
            Err(error) => {
                self.connections[slot].recycle(buffer);
                Err(error)
            }
        };
        let fua = request.flags & CMD_FLAG_FUA != 0;
        self.dispatch(slot, request, result, fua);
    }

    /// Submits a checked request, or answers a refused one at once.
    fn dispatch(
        &mut self,
        slot: usize,
        request: Request,
        result: Result<BlockRequest, u32>,
        fua: bool,
    ) {
        match result {
            Err(error) => {
                self.counters.requests += 1;
                self.counters.errors += 1;
                self.connections[slot].simple_reply(request.cookie, error, &[]);
            }
            Ok(block_request) => {
                let bytes = match &block_request {
                    BlockRequest::Read { buffer, .. } | BlockRequest::Write { buffer, .. } => {
                        buffer.len()
                    }
                    _ => 0,
                };
                let connection = &mut self.connections[slot];
                connection.in_flight += 1;
                connection.buffered += bytes;
                let generation = connection.generation;
                let read = matches!(block_request, BlockRequest::Read { .. });
                let modifies = matches!(
                    block_request,
                    BlockRequest::Write { .. }
                        | BlockRequest::Trim { .. }
                        | BlockRequest::WriteZeroes { .. }
                );
                let id = self.backend.new_id();
                let entry = InFlight {
                    id,
                    slot,
                    generation,
                    cookie: request.cookie,
                    read,
                    then_flush: fua && modifies,
                    bytes,
                };
                self.backend.submit(entry, block_request);
            }
        }
    }
}

impl<D: BlockDevice> Service for NbdService<D> {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn max_sockets(&self) -> usize {
        self.config.connections
    }

    fn bind(&mut self, sockets: &mut SocketSet<'static>) {
        let port = self.port;
        self.connections = (0..self.config.connections)
            .map(|_| Connection::new(sockets.add(listener(port)), self.config.max_in_flight))
            .collect();
    }

    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool {
        self.drop_stale_deferred();
        let mut activity = self.backend.retry_deferred();
        activity |= self.complete();
        for slot in 0..self.connections.len() {
            activity |= self.serve(slot, context.sockets, context.now);
        }
        activity |= self.backend.retry_deferred();
        // Submissions of this pass may already be complete (a memory device); their replies
        // go out on the next pass, which the activity asks for.
        activity
    }

    /// The first connection to outstay its phase (a handshake or a close that takes too
    /// long); now, while the device may have completions waiting.
    fn poll_at(&self, now: Instant) -> Option<Instant> {
        if self.backend.device.pending() {
            return Some(now);
        }
        self.connections
            .iter()
            .filter_map(Connection::deadline)
            .min()
    }

    fn write_stats(&self, out: &mut dyn Write) {
        let counters = self.counters;
        let _ = write!(
            out,
            " nbd_accepted={} nbd_exports={} nbd_requests={} nbd_errors={} nbd_violations={} nbd_timeouts={} nbd_output_peak={} nbd_deferred={}",
            counters.accepted,
            counters.exports,
            counters.requests,
            counters.errors,
            counters.violations,
            counters.timeouts,
            self.output_peak,
            self.backend.deferrals,
        );
    }

    fn describe(&self, out: &mut dyn Write) {
        let _ = write!(out, " nbd={}", self.port);
    }

    fn tcp_ports(&self) -> &[u16] {
        core::slice::from_ref(&self.port)
    }

    fn syn_credits(&self, sockets: &SocketSet<'static>, port: u16) -> usize {
        if port != self.port {
            return usize::MAX;
        }
        self.connections
            .iter()
            .filter(|connection| sockets.get::<tcp::Socket>(connection.handle).is_listening())
            .count()
    }
}
