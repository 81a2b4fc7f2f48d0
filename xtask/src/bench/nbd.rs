//! The benchmark's NBD client and load generator (issue 14, item 5).
//!
//! [`NbdClient`] speaks the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`) from
//! the client's side: the fixed newstyle handshake ("Fixed newstyle negotiation", with
//! `NBD_FLAG_C_NO_ZEROES` when the server offers it), `NBD_OPT_GO` with an
//! `NBD_INFO_BLOCK_SIZE` request ("Option types"), then `NBD_CMD_READ`, `NBD_CMD_WRITE`,
//! `NBD_CMD_FLUSH` and `NBD_CMD_DISC` with simple replies only, one request in flight per
//! connection ("Transmission"). Several clients are several connections.
//!
//! [`DiskModel`] is what the disk holds: every 4 KiB block carries a pattern derived from its
//! index and a generation (0 for the image the host writes before the run, one more for each
//! write the benchmark made). Every read is compared with the model, so no speed is reported for
//! wrong bytes; every write moves its block's generation on.
//!
//! [`run_phase`] drives one figure: `clients` connections, each owning a disjoint slice of the
//! disk, doing sequential or random reads or writes of one block for a fixed time, with each
//! request's latency (send to complete reply, by the monotonic clock).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::nbd::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_FLUSH, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_GO, OPTION_REPLY_MAGIC, REP_ACK, REP_FLAG_ERROR,
    REP_INFO, decode_simple_reply, encode_option, encode_request, go_option_data,
};

/// The request size of every figure.
pub const BLOCK_SIZE: u32 = 4096;

/// How long one reply may take before the client gives up on the connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// An NBD client failure.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD {context}: {source}")]
    Io {
        /// What the client was doing.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The server's handshake is not what the protocol document says, or refused the export.
    #[error("NBD handshake: {0}")]
    Handshake(String),
    /// A reply that breaks the protocol (wrong magic or cookie).
    #[error("NBD transmission: {0}")]
    Protocol(String),
    /// The server answered a request with an error.
    #[error("NBD {command} of {length} bytes at {offset}: the server replied error {errno}")]
    Command {
        /// `read`, `write` or `flush`.
        command: &'static str,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        length: u32,
        /// The reply's error value ("Error values").
        errno: u32,
    },
    /// A read returned bytes that differ from what the disk holds.
    #[error("NBD read of block {block} (generation {generation}) returned wrong bytes: {detail}")]
    WrongBytes {
        /// The block index.
        block: u64,
        /// The generation the model expects.
        generation: u32,
        /// Where and how the bytes differ.
        detail: String,
    },
}

fn io_context(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { context, source }
}

/// What `NBD_OPT_GO` told about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Size in bytes (`NBD_INFO_EXPORT`).
    pub size: u64,
    /// Transmission flags (`NBD_INFO_EXPORT`).
    pub flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum (when the server sent it).
    pub block_sizes: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    /// Whether the export accepts `NBD_CMD_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.flags & FLAG_HAS_FLAGS != 0 && self.flags & FLAG_SEND_FLUSH != 0
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
}

/// One NBD connection in the transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    info: ExportInfo,
    cookie: u64,
    request: Vec<u8>,
}

fn read_u16(stream: &mut TcpStream, context: &'static str) -> Result<u16, NbdError> {
    let mut bytes = [0u8; 2];
    stream.read_exact(&mut bytes).map_err(io_context(context))?;
    Ok(u16::from_be_bytes(bytes))
}

fn read_u32(stream: &mut TcpStream, context: &'static str) -> Result<u32, NbdError> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes).map_err(io_context(context))?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64(stream: &mut TcpStream, context: &'static str) -> Result<u64, NbdError> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes).map_err(io_context(context))?;
    Ok(u64::from_be_bytes(bytes))
}

impl NbdClient {
    /// Connects to `address` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(
        address: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> Result<NbdClient, NbdError> {
        let mut stream = TcpStream::connect_timeout(&address, timeout)
            .map_err(io_context("connecting to the server"))?;
        stream
            .set_nodelay(true)
            .map_err(io_context("setting TCP_NODELAY"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(io_context("setting the read timeout"))?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(io_context("setting the write timeout"))?;
        let magic = read_u64(&mut stream, "reading the server's greeting")?;
        let option_magic = read_u64(&mut stream, "reading the server's greeting")?;
        if magic != NBDMAGIC || option_magic != IHAVEOPT {
            return Err(NbdError::Handshake(format!(
                "the greeting is {magic:#018x} {option_magic:#018x}, not NBDMAGIC IHAVEOPT \
                 (an oldstyle server, or not NBD)"
            )));
        }
        let handshake_flags = read_u16(&mut stream, "reading the handshake flags")?;
        if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Handshake(
                "the server does not offer the fixed newstyle handshake".to_string(),
            ));
        }
        let no_zeroes = handshake_flags & FLAG_NO_ZEROES != 0;
        let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        // NBD_OPT_GO: name length, name, one information request (NBD_INFO_BLOCK_SIZE).
        let mut message = client_flags.to_be_bytes().to_vec();
        encode_option(
            &mut message,
            OPT_GO,
            &go_option_data(export, &[INFO_BLOCK_SIZE]),
        );
        stream
            .write_all(&message)
            .map_err(io_context("sending NBD_OPT_GO"))?;
        let mut export_info = None;
        let mut block_sizes = None;
        loop {
            let magic = read_u64(&mut stream, "reading an option reply")?;
            let option = read_u32(&mut stream, "reading an option reply")?;
            let reply = read_u32(&mut stream, "reading an option reply")?;
            let length = read_u32(&mut stream, "reading an option reply")?;
            if magic != OPTION_REPLY_MAGIC || option != OPT_GO {
                return Err(NbdError::Handshake(format!(
                    "an option reply with magic {magic:#x} for option {option}"
                )));
            }
            if length > 1 << 16 {
                return Err(NbdError::Handshake(format!(
                    "an option reply of {length} bytes"
                )));
            }
            let mut payload = vec![0u8; length as usize];
            stream
                .read_exact(&mut payload)
                .map_err(io_context("reading an option reply's data"))?;
            if reply & REP_FLAG_ERROR != 0 {
                return Err(NbdError::Handshake(format!(
                    "NBD_OPT_GO for export {export:?} refused with reply type {reply:#x}: {}",
                    String::from_utf8_lossy(&payload)
                )));
            }
            match reply {
                REP_ACK => break,
                REP_INFO if payload.len() >= 2 => {
                    let kind = u16::from_be_bytes([payload[0], payload[1]]);
                    let field = |at: usize, width: usize| {
                        payload
                            .get(at..at + width)
                            .map(|bytes| bytes.iter().fold(0u64, |v, &b| v << 8 | u64::from(b)))
                    };
                    match kind {
                        INFO_EXPORT if payload.len() == 12 => {
                            export_info =
                                Some((field(2, 8).unwrap_or(0), field(10, 2).unwrap_or(0) as u16));
                        }
                        INFO_BLOCK_SIZE if payload.len() == 14 => {
                            block_sizes = Some((
                                field(2, 4).unwrap_or(0) as u32,
                                field(6, 4).unwrap_or(0) as u32,
                                field(10, 4).unwrap_or(0) as u32,
                            ));
                        }
                        // Other information is allowed and ignored ("NBD_REP_INFO").
                        _ => {}
                    }
                }
                _ => {
                    return Err(NbdError::Handshake(format!(
                        "an unexpected reply type {reply} to NBD_OPT_GO"
                    )));
                }
            }
        }
        let (size, flags) = export_info.ok_or_else(|| {
            NbdError::Handshake("NBD_OPT_GO ended without NBD_INFO_EXPORT".to_string())
        })?;
        Ok(NbdClient {
            stream,
            info: ExportInfo {
                size,
                flags,
                block_sizes,
            },
            cookie: 0,
            request: Vec::with_capacity(28 + BLOCK_SIZE as usize),
        })
    }

    /// What the export is.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    fn send(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<u64, NbdError> {
        self.cookie += 1;
        self.request.clear();
        encode_request(
            &mut self.request,
            0,
            command,
            self.cookie,
            offset,
            length,
            data,
        );
        self.stream
            .write_all(&self.request)
            .map_err(io_context("sending a request"))?;
        Ok(self.cookie)
    }

    fn reply(
        &mut self,
        command: &'static str,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        let mut header = [0u8; 16];
        self.stream
            .read_exact(&mut header)
            .map_err(io_context("reading a reply"))?;
        let (errno, got) = decode_simple_reply(&header).map_err(|magic| {
            NbdError::Protocol(format!(
                "a reply with magic {magic:#x} (structured replies were not negotiated)"
            ))
        })?;
        if got != cookie {
            return Err(NbdError::Protocol(format!(
                "a reply for cookie {got}, the only request in flight is {cookie}"
            )));
        }
        if errno != 0 {
            return Err(NbdError::Command {
                command,
                offset,
                length,
                errno,
            });
        }
        Ok(())
    }

    /// Reads `buffer.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buffer: &mut [u8]) -> Result<(), NbdError> {
        let length = buffer.len() as u32;
        let cookie = self.send(CMD_READ, offset, length, &[])?;
        self.reply("read", cookie, offset, length)?;
        self.stream
            .read_exact(buffer)
            .map_err(io_context("reading a read's data"))
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let length = data.len() as u32;
        let cookie = self.send(CMD_WRITE, offset, length, data)?;
        self.reply("write", cookie, offset, length)
    }

    /// `NBD_CMD_FLUSH`: returns once every acknowledged write is on stable storage.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.send(CMD_FLUSH, 0, 0, &[])?;
        self.reply("flush", cookie, 0, 0)
    }

    /// `NBD_CMD_DISC`, then closes the socket (the server sends no reply).
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.send(CMD_DISC, 0, 0, &[])?;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

/// The 64-bit mixer of SplitMix64: a well-spread value from any input.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// Fills `buffer` with block `block`'s content at `generation` for a run seeded `seed`: the
/// block index and the generation in the first 12 bytes (so that a wrong read says what it
/// got), then a stream that depends on all three.
pub fn fill_block(seed: u64, block: u64, generation: u32, buffer: &mut [u8]) {
    let start = mix(seed ^ mix(block) ^ (u64::from(generation) << 40));
    for (index, chunk) in buffer.chunks_mut(8).enumerate() {
        let word = mix(start.wrapping_add(index as u64)).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    if buffer.len() >= 12 {
        buffer[..8].copy_from_slice(&block.to_le_bytes());
        buffer[8..12].copy_from_slice(&generation.to_le_bytes());
    }
}

/// What every block of the disk holds: a generation per block.
#[derive(Clone, Debug)]
pub struct DiskModel {
    /// The run's seed.
    pub seed: u64,
    /// The generation of each block.
    pub generations: Vec<u32>,
}

impl DiskModel {
    /// A disk of `blocks` blocks, every one at generation 0.
    pub fn new(seed: u64, blocks: u64) -> DiskModel {
        DiskModel {
            seed,
            generations: vec![0; blocks as usize],
        }
    }

    /// Writes the image file of generation 0 (the disk before the run).
    pub fn write_image(&self, path: &Path) -> io::Result<()> {
        let mut file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for index in 0..self.generations.len() as u64 {
            fill_block(self.seed, index, 0, &mut block);
            file.write_all(&block)?;
        }
        file.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    }
}

/// The access pattern of a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Consecutive blocks, wrapping at the end of the client's slice.
    Sequential,
    /// Uniformly random blocks of the client's slice.
    Random,
}

/// The operation of a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// `NBD_CMD_READ`, every block checked against the model.
    Read,
    /// `NBD_CMD_WRITE` of a new generation.
    Write,
}

impl Pattern {
    /// `sequential` or `random`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
        }
    }
}

impl Operation {
    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// One connection with the slice of the disk it owns and its sequential cursor.
pub struct Worker {
    client: NbdClient,
    first_block: u64,
    generations: Vec<u32>,
    cursor: u64,
    rng: u64,
}

impl Worker {
    /// What the worker's connection negotiated.
    pub fn info(&self) -> ExportInfo {
        self.client.info()
    }

    /// Disconnects and gives the slice's generations back.
    fn finish(self) -> (u64, Vec<u32>) {
        let _ = self.client.disconnect();
        (self.first_block, self.generations)
    }
}

/// Opens `clients` connections to the export and gives each a disjoint, contiguous slice of
/// `model` (the model's generations move into the workers until [`close_workers`]).
pub fn open_workers(
    address: SocketAddr,
    export: &str,
    clients: usize,
    model: &mut DiskModel,
    connect_limit: Duration,
) -> Result<Vec<Worker>, NbdError> {
    let blocks = model.generations.len() as u64;
    let mut workers = Vec::with_capacity(clients);
    for index in 0..clients as u64 {
        let client = connect_retrying(address, export, connect_limit)?;
        let size = client.info().size;
        if size < blocks * u64::from(BLOCK_SIZE) {
            return Err(NbdError::Handshake(format!(
                "the export has {size} bytes, the benchmark's disk {}",
                blocks * u64::from(BLOCK_SIZE)
            )));
        }
        if client.info().read_only() {
            return Err(NbdError::Handshake("the export is read-only".to_string()));
        }
        let first = blocks * index / clients as u64;
        let end = blocks * (index + 1) / clients as u64;
        let generations = model.generations[first as usize..end as usize].to_vec();
        workers.push(Worker {
            client,
            first_block: first,
            generations,
            cursor: 0,
            rng: mix(model.seed ^ ((index + 1) * 0x1234_5678)),
        });
    }
    Ok(workers)
}

/// Disconnects the workers and puts their slices' generations back into `model`.
pub fn close_workers(workers: Vec<Worker>, model: &mut DiskModel) {
    for worker in workers {
        let (first, generations) = worker.finish();
        let first = first as usize;
        model.generations[first..first + generations.len()].copy_from_slice(&generations);
    }
}

/// Connects, retrying refused or reset connections (a server that is still starting, or that
/// still holds the slot of a connection that just closed) until `limit`.
pub fn connect_retrying(
    address: SocketAddr,
    export: &str,
    limit: Duration,
) -> Result<NbdClient, NbdError> {
    let began = Instant::now();
    loop {
        match NbdClient::connect(address, export, Duration::from_secs(2)) {
            Ok(client) => return Ok(client),
            Err(NbdError::Io { .. }) if began.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => return Err(error),
        }
    }
}

/// One figure's raw outcome.
#[derive(Clone, Debug, Default)]
pub struct PhaseOutcome {
    /// Every request's latency, in nanoseconds, all clients together.
    pub latencies_ns: Vec<u64>,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Bytes read that were compared with the model (equal to `bytes` for reads).
    pub verified_bytes: u64,
    /// From the common start to the last client's end.
    pub elapsed: Duration,
    /// The time the closing `NBD_CMD_FLUSH` of a write figure took (one client's).
    pub flush: Option<Duration>,
}

fn next_block(worker: &mut Worker, pattern: Pattern) -> u64 {
    let blocks = worker.generations.len() as u64;
    match pattern {
        Pattern::Sequential => {
            let block = worker.cursor % blocks;
            worker.cursor = worker.cursor.wrapping_add(1);
            block
        }
        Pattern::Random => {
            // xorshift64*, then Lemire's multiply-shift range reduction.
            worker.rng ^= worker.rng >> 12;
            worker.rng ^= worker.rng << 25;
            worker.rng ^= worker.rng >> 27;
            let value = worker.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((u128::from(value) * u128::from(blocks)) >> 64) as u64
        }
    }
}

/// What one worker did in a phase.
struct WorkerOutcome {
    latencies_ns: Vec<u64>,
    bytes: u64,
    verified: u64,
}

fn drive(
    worker: &mut Worker,
    seed: u64,
    pattern: Pattern,
    operation: Operation,
    start: &Barrier,
    duration: Duration,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<WorkerOutcome, NbdError> {
    let mut buffer = vec![0u8; BLOCK_SIZE as usize];
    let mut expected = vec![0u8; BLOCK_SIZE as usize];
    let mut outcome = WorkerOutcome {
        latencies_ns: Vec::with_capacity(1 << 16),
        bytes: 0,
        verified: 0,
    };
    start.wait();
    let end = Instant::now() + duration;
    while Instant::now() < end && !cancelled() {
        let local = next_block(worker, pattern);
        let block = worker.first_block + local;
        let offset = block * u64::from(BLOCK_SIZE);
        let generation = worker.generations[local as usize];
        match operation {
            Operation::Read => {
                let began = Instant::now();
                worker.client.read(offset, &mut buffer)?;
                outcome.latencies_ns.push(began.elapsed().as_nanos() as u64);
                fill_block(seed, block, generation, &mut expected);
                if buffer != expected {
                    return Err(NbdError::WrongBytes {
                        block,
                        generation,
                        detail: describe_block(&expected, &buffer),
                    });
                }
                outcome.verified += buffer.len() as u64;
            }
            Operation::Write => {
                let next = generation.wrapping_add(1);
                fill_block(seed, block, next, &mut buffer);
                let began = Instant::now();
                worker.client.write(offset, &buffer)?;
                outcome.latencies_ns.push(began.elapsed().as_nanos() as u64);
                worker.generations[local as usize] = next;
            }
        }
        outcome.bytes += u64::from(BLOCK_SIZE);
    }
    Ok(outcome)
}

/// Where `got` differs from `expected`, and which block and generation its header names.
fn describe_block(expected: &[u8], got: &[u8]) -> String {
    let at = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let header = |bytes: &[u8]| {
        let mut block = [0u8; 8];
        block.copy_from_slice(&bytes[..8]);
        let mut generation = [0u8; 4];
        generation.copy_from_slice(&bytes[8..12]);
        (u64::from_le_bytes(block), u32::from_le_bytes(generation))
    };
    let (block, generation) = header(got);
    format!(
        "first difference at byte {at} ({:#04x}, expected {:#04x}); the bytes read carry the \
         header of block {block} generation {generation}",
        got[at], expected[at]
    )
}

/// Runs one figure: every worker does `operation` in `pattern` for `duration`, all starting
/// together; a write figure ends with a flush (timed) when the export accepts one.
pub fn run_phase(
    workers: &mut [Worker],
    seed: u64,
    pattern: Pattern,
    operation: Operation,
    duration: Duration,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<PhaseOutcome, NbdError> {
    let start = Barrier::new(workers.len() + 1);
    let (results, elapsed) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|worker| {
                let start = &start;
                scope.spawn(move || {
                    drive(worker, seed, pattern, operation, start, duration, cancelled)
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let results: Vec<_> = handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(NbdError::Protocol("a client thread panicked".into())))
            })
            .collect();
        (results, began.elapsed())
    });
    let mut outcome = PhaseOutcome {
        elapsed,
        ..PhaseOutcome::default()
    };
    for result in results {
        let worker = result?;
        outcome.ops += worker.latencies_ns.len() as u64;
        outcome.bytes += worker.bytes;
        outcome.verified_bytes += worker.verified;
        outcome.latencies_ns.extend(worker.latencies_ns);
    }
    if operation == Operation::Write
        && let Some(worker) = workers.first_mut()
        && worker.client.info().can_flush()
    {
        let began = Instant::now();
        worker.client.flush()?;
        outcome.flush = Some(began.elapsed());
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::SIMPLE_REPLY_MAGIC;
    use std::net::TcpListener;

    #[test]
    fn blocks_differ_by_index_generation_and_seed() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_block(1, 7, 0, &mut a);
        fill_block(1, 7, 0, &mut b);
        assert_eq!(a, b, "the same block and generation are the same bytes");
        for (seed, block, generation) in [(1, 8, 0), (1, 7, 1), (2, 7, 0)] {
            fill_block(seed, block, generation, &mut b);
            assert_ne!(a, b, "seed {seed} block {block} generation {generation}");
            // Not just the header: the payload differs too.
            assert_ne!(a[12..], b[12..]);
        }
    }

    /// A minimal in-memory NBD server for the client's tests: the fixed newstyle handshake with
    /// NBD_OPT_GO, then READ/WRITE/FLUSH/DISC with simple replies. With `corrupt`, every read
    /// flips one byte.
    fn serve(listener: TcpListener, blocks: u64, seed: u64, corrupt: bool) {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut disk = vec![0u8; (blocks * 4096) as usize];
        for (index, chunk) in disk.chunks_mut(4096).enumerate() {
            fill_block(seed, index as u64, 0, chunk);
        }
        let mut greeting = Vec::new();
        greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        stream.write_all(&greeting).expect("greeting");
        let flags = read_u32(&mut stream, "flags").expect("client flags");
        assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(read_u64(&mut stream, "opt").expect("magic"), IHAVEOPT);
        assert_eq!(read_u32(&mut stream, "opt").expect("option"), OPT_GO);
        let length = read_u32(&mut stream, "opt").expect("length");
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).expect("option data");
        let reply = |stream: &mut TcpStream, kind: u32, data: &[u8]| {
            let mut message = Vec::new();
            message.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            message.extend_from_slice(&OPT_GO.to_be_bytes());
            message.extend_from_slice(&kind.to_be_bytes());
            message.extend_from_slice(&(data.len() as u32).to_be_bytes());
            message.extend_from_slice(data);
            stream.write_all(&message).expect("option reply");
        };
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(blocks * 4096).to_be_bytes());
        info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
        reply(&mut stream, REP_INFO, &info);
        reply(&mut stream, REP_ACK, &[]);
        loop {
            let mut header = [0u8; 28];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let command = u16::from_be_bytes([header[6], header[7]]);
            let cookie = &header[8..16];
            let offset = u64::from_be_bytes(header[16..24].try_into().expect("8 bytes")) as usize;
            let length = u32::from_be_bytes(header[24..28].try_into().expect("4 bytes")) as usize;
            let mut message = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            message.extend_from_slice(&0u32.to_be_bytes());
            message.extend_from_slice(cookie);
            match command {
                CMD_READ => {
                    message.extend_from_slice(&disk[offset..offset + length]);
                    if corrupt {
                        let last = message.len() - 1;
                        message[last] ^= 1;
                    }
                }
                CMD_WRITE => {
                    stream
                        .read_exact(&mut disk[offset..offset + length])
                        .expect("write data");
                }
                CMD_DISC => return,
                _ => {}
            }
            stream.write_all(&message).expect("reply");
        }
    }

    fn workers_against(corrupt: bool) -> (Vec<Worker>, DiskModel, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || serve(listener, 64, 99, corrupt));
        let mut model = DiskModel::new(99, 64);
        let workers =
            open_workers(address, "", 1, &mut model, Duration::from_secs(5)).expect("connect");
        (workers, model, server)
    }

    #[test]
    fn reads_see_writes_and_every_byte_is_checked() {
        let (mut workers, mut model, server) = workers_against(false);
        assert!(workers[0].client.info().can_flush());
        let never = || false;
        let short = Duration::from_millis(100);
        let read = run_phase(
            &mut workers,
            99,
            Pattern::Sequential,
            Operation::Read,
            short,
            &never,
        )
        .expect("reads of generation 0");
        assert!(read.ops > 0 && read.verified_bytes == read.bytes);
        let written = run_phase(
            &mut workers,
            99,
            Pattern::Random,
            Operation::Write,
            short,
            &never,
        )
        .expect("writes");
        assert!(written.ops > 0 && written.flush.is_some() && written.verified_bytes == 0);
        let reread = run_phase(
            &mut workers,
            99,
            Pattern::Random,
            Operation::Read,
            short,
            &never,
        )
        .expect("reads see the writes");
        assert_eq!(reread.verified_bytes, reread.bytes);
        close_workers(workers, &mut model);
        assert!(model.generations.iter().any(|&g| g > 0));
        server.join().expect("server");
    }

    #[test]
    fn a_wrong_byte_fails_the_figure() {
        let (mut workers, _, server) = workers_against(true);
        let never = || false;
        let error = run_phase(
            &mut workers,
            99,
            Pattern::Sequential,
            Operation::Read,
            Duration::from_millis(50),
            &never,
        )
        .expect_err("a corrupted read must fail");
        assert!(
            matches!(
                error,
                NbdError::WrongBytes {
                    block: 0,
                    generation: 0,
                    ..
                }
            ),
            "{error}"
        );
        drop(workers);
        server.join().expect("server");
    }
}
