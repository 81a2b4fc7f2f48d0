//! The stable smoke run of the fuzz entry points (part of `cargo test`, so of `cargo xtask
//! test` and CI): each entry point gets the seed corpus (built here, and the files in
//! `fuzz/seeds/`), 10,000 inputs from a fixed-seed PRNG and 10,000 mutations of the corpus,
//! and must not panic. A failing input is printed in hex, to be added to `fuzz/seeds/`.
//!
//! The seeds are scripts in the entry points' input languages ([`super::used_ring`],
//! [`super::net_frame`]); `write_seed_corpus` (ignored) regenerates the files from them.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

use super::{net_frame, net_frame_parsing, used_ring, used_ring_consumption};

/// Generated inputs per entry point.
const RANDOM_INPUTS: usize = 10_000;
/// Mutated corpus inputs per entry point.
const MUTATED_INPUTS: usize = 10_000;

/// splitmix64: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Builds inputs in the entry points' little-endian script format.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn u8(mut self, value: u8) -> Self {
        self.0.push(value);
        self
    }
    fn u16(mut self, value: u16) -> Self {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u32(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn bytes(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// used_ring seeds (operation codes of `used_ring::Harness::step`)

const RING_ADD: u8 = 0;
const RING_NOTIFY: u8 = 2;
const RING_DRAIN: u8 = 3;
const RING_ENABLE_CB: u8 = 5;
const RING_ENABLE_CB_DELAYED: u8 = 6;
const RING_DISABLE_CB: u8 = 7;
const RING_TAKE: u8 = 8;
const RING_COMPLETE: u8 = 9;
const RING_PUBLISH: u8 = 11;
const RING_HOSTILE: u8 = 12;

/// Adds `count` (1..=4) buffers of `readable` readable and `writable` writable 64-byte
/// segments (`writable` of 0..=3; `long` adds 15 more writable ones).
fn ring_add(script: Script, count: u8, readable: u8, writable: u8, long: bool) -> Script {
    let mut script = script.u8(RING_ADD).u8(count - 1);
    for _ in 0..count {
        let shape = readable | (writable << 2) | if long { 0x80 } else { 0 };
        script = script.u8(shape);
        let total = readable + writable + if long { 15 } else { 0 };
        for index in 0..total {
            script = script.u8(40);
            if index >= readable {
                // Whole pieces (no shortening).
                script = script.u8(0);
            }
        }
    }
    script
}

/// The device takes up to `count` buffers and completes the first `count` held with lengths
/// within capacity (`len` modulo capacity + 1), then publishes.
fn ring_take_and_complete(script: Script, count: u8, len: u32) -> Script {
    let mut script = script.u8(RING_TAKE).u8(count - 1);
    script = script.u8(RING_COMPLETE).u8(count - 1);
    for _ in 0..count {
        script = script.u8(0).u8(2).u32(len);
    }
    script.u8(1)
}

fn ring_round_trips(config: u8, size: u8, rounds: usize, shape: (u8, u8, bool)) -> Vec<u8> {
    let mut script = Script::default().u8(config).u8(size);
    for round in 0..rounds {
        script = ring_add(script, 4, shape.0, shape.1, shape.2);
        script = script.u8(RING_NOTIFY);
        script = ring_take_and_complete(script, 3, 17 + round as u32);
        script = script.u8(if round % 2 == 0 {
            RING_ENABLE_CB
        } else {
            RING_ENABLE_CB_DELAYED
        });
        script = script.u8(RING_DRAIN).u8(RING_DISABLE_CB);
        script = ring_take_and_complete(script, 1, 5);
        script = script.u8(RING_PUBLISH).u8(RING_DRAIN);
    }
    script.0
}

fn used_ring_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let split_event_idx = ring_round_trips(2, 3, 40, (1, 1, false));
    let packed_indirect = ring_round_trips(1 | 2 | 4, 4, 40, (2, 2, false));
    let split_long_chains = ring_round_trips(4, 5, 6, (0, 3, true));
    let packed_plain = ring_round_trips(1, 6, 30, (0, 1, false));
    // Hostile: an id out of range after honest traffic (split), a used descriptor with the
    // wrong wrap counter (packed), a used index far ahead (split).
    let mut split_bad_id = Script(ring_round_trips(0, 3, 2, (1, 1, false)));
    split_bad_id = ring_add(split_bad_id, 2, 0, 1, false);
    split_bad_id = split_bad_id
        .u8(RING_HOSTILE)
        .u8(0)
        .u16(0)
        .u8(1)
        .u32(999)
        .u32(8)
        .u16(0)
        .u8(1);
    split_bad_id = split_bad_id.u8(RING_PUBLISH).u8(RING_DRAIN).u8(RING_DRAIN);
    split_bad_id = ring_add(split_bad_id, 1, 0, 1, false).u8(RING_DRAIN);
    let mut packed_bad_wrap = Script(ring_round_trips(1, 2, 2, (0, 1, false)));
    packed_bad_wrap = ring_add(packed_bad_wrap, 2, 0, 1, false);
    packed_bad_wrap = packed_bad_wrap
        .u8(RING_HOSTILE)
        .u8(1)
        .u8(0)
        .u16(0)
        .u8(8)
        .u16(0);
    packed_bad_wrap = packed_bad_wrap
        .u8(RING_DRAIN)
        .u8(RING_ENABLE_CB)
        .u8(RING_DRAIN);
    let mut split_jump = Script(ring_round_trips(0, 2, 1, (0, 1, false)));
    split_jump = ring_add(split_jump, 1, 0, 1, false);
    split_jump = split_jump
        .u8(RING_HOSTILE)
        .u8(2)
        .u8(40)
        .u8(0)
        .u8(RING_DRAIN);
    vec![
        ("split_event_idx", split_event_idx),
        ("packed_indirect", packed_indirect),
        ("split_long_chains", split_long_chains),
        ("packed_plain", packed_plain),
        ("split_bad_id", split_bad_id.0),
        ("packed_bad_wrap", packed_bad_wrap.0),
        ("split_index_jump", split_jump.0),
    ]
}

// ---------------------------------------------------------------------------------------------
// net_frame seeds (operation codes of `net_frame::Harness::step`)

const NET_DELIVER: u8 = 0;
const NET_RECEIVE: u8 = 3;
const NET_RECYCLE: u8 = 5;
const NET_TRANSMIT: u8 = 6;
const NET_COMPLETE_TX: u8 = 8;
const NET_HOSTILE: u8 = 9;
const NET_CONFIG: u8 = 10;
const NET_ARM: u8 = 11;

/// Feature bits of the net script's configuration byte.
const NET_PACKED: u8 = 1;
const NET_EVENT_IDX: u8 = 2;
const NET_INDIRECT: u8 = 4;
const NET_MRG_RXBUF: u8 = 8;
const NET_CSUM: u8 = 16;
const NET_GUEST_CSUM: u8 = 32;
const NET_MTU: u8 = 64;
const NET_STATUS: u8 = 128;

/// A UDP/IPv4 frame (Ethernet II) with `payload` bytes and a zero UDP checksum.
fn udp_frame(payload: usize) -> Vec<u8> {
    let total = 20 + 8 + payload;
    let mut frame = vec![
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x55, 10, 0, 2, 2, 8, 0,
    ];
    frame.extend_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 2, 2, 10, 0, 2, 15,
    ]);
    frame[16..18].copy_from_slice(&(total as u16).to_be_bytes());
    frame.extend_from_slice(&[0x9c, 0x40, 0, 7]);
    frame.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend((0..payload).map(|index| index as u8));
    frame
}

/// The same as a TCP segment (20-byte header).
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut frame = udp_frame(payload + 12);
    frame[23] = 6;
    frame[34 + 12] = 5 << 4;
    frame
}

/// The helpers' part: offsets, mode (bit 0: offsets modulo the frame length) and frame.
fn helper_part(start: u16, offset: u16, mode: u8, frame: &[u8]) -> Script {
    let body = Script::default()
        .u16(start)
        .u16(offset)
        .u8(mode)
        .bytes(frame);
    Script::default().u16(body.0.len() as u16).bytes(&body.0)
}

/// The wire header (§5.1.6).
fn net_header(flags: u8, csum_start: u16, csum_offset: u16, num_buffers: u16) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[0] = flags;
    header[6..8].copy_from_slice(&csum_start.to_le_bytes());
    header[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    header
}

/// Delivers `header` + `frame` spread over buffers of the given stream byte counts (exact
/// lengths: mode bit 7), with `num_buffers` made consistent when `consistent`.
fn deliver(
    script: Script,
    header: [u8; 12],
    frame: &[u8],
    sizes: &[usize],
    consistent: bool,
) -> Script {
    let mut stream = header.to_vec();
    stream.extend_from_slice(frame);
    assert_eq!(sizes.iter().sum::<usize>(), stream.len());
    // Mode: exact lengths; NEEDS_CSUM and offsets as given (bits 1-2 = 2).
    let mode = 0x80 | 4 | u8::from(consistent);
    let mut script = script
        .u8(NET_DELIVER)
        .u8(sizes.len() as u8 - 1)
        .u8(mode)
        .bytes(&header);
    let mut at = NET_HEADER_LEN_FOR_SEEDS;
    for (index, &size) in sizes.iter().enumerate() {
        script = script.u16(size as u16);
        let body = if index == 0 {
            size - NET_HEADER_LEN_FOR_SEEDS
        } else {
            size
        };
        script = script.bytes(&stream[at..at + body]);
        at += body;
    }
    script
}

const NET_HEADER_LEN_FOR_SEEDS: usize = crate::net::NET_HEADER_LEN;

/// The UDP frame with its checksum field holding the pseudo-header sum, as a device with
/// NEEDS_CSUM hands it over; (frame, csum_start, csum_offset).
fn partial_udp(payload: usize) -> (Vec<u8>, u16, u16) {
    let mut frame = udp_frame(payload);
    let length = ((8 + payload) as u16).to_be_bytes();
    let pseudo = super::ones_complement_sum(&[&frame[26..34], &[0, 17], &length]);
    frame[40..42].copy_from_slice(&pseudo.to_be_bytes());
    (frame, 34, 6)
}

fn transmit(script: Script, frame: &[u8]) -> Script {
    script
        .u8(NET_TRANSMIT)
        .u16(frame.len() as u16)
        .bytes(frame)
        .u8(0)
}

fn net_traffic(config: u8, queue: u8, rounds: usize) -> Vec<u8> {
    let (partial, start, offset) = partial_udp(300);
    let mut script = helper_part(start, offset, 0, &partial)
        .u8(config)
        .u16(1500)
        .u8(queue);
    for round in 0..rounds {
        let frame = udp_frame(100 + round * 7);
        let plain = net_header(0, 0, 0, 1);
        script = deliver(script, plain, &frame, &[12 + frame.len()], true);
        script = deliver(
            script,
            net_header(1, start, offset, 1),
            &partial,
            &[12 + partial.len()],
            true,
        );
        // Too short, then a bad num_buffers: both dropped.
        script = deliver(script, plain, &frame[..10], &[22], true);
        if config & NET_MRG_RXBUF != 0 {
            script = deliver(
                script,
                net_header(0, 0, 0, 0),
                &frame,
                &[12 + frame.len()],
                false,
            );
            let big = udp_frame(2500);
            let sizes = [2048, 12 + big.len() - 2048];
            script = deliver(script, plain, &big, &sizes, true);
        }
        script = script.u8(NET_RECEIVE).u8(7);
        script = script.u8(NET_RECYCLE).u8(0).u8(NET_RECYCLE).u8(0);
        script = transmit(script, &udp_frame(64 + round));
        script = transmit(script, &tcp_frame(200));
        script = script.u8(NET_COMPLETE_TX).u8(NET_ARM).u8(1);
        script = script.u8(NET_CONFIG).u8(round as u8 & 1).u8(1);
    }
    script.u8(NET_RECEIVE).u8(7).0
}

fn net_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let all = NET_EVENT_IDX | NET_INDIRECT | NET_MRG_RXBUF | NET_CSUM | NET_GUEST_CSUM;
    let split = net_traffic(all | NET_MTU | NET_STATUS, 7, 12);
    let packed = net_traffic(all | NET_PACKED | NET_STATUS, 5, 12);
    let plain = net_traffic(NET_STATUS, 3, 8);
    // A TCP offload for the helpers, then a hostile used entry on the receive queue.
    let tcp = tcp_frame(64);
    let mut hostile = helper_part(0, 0, 0, &tcp).u8(all).u16(0).u8(7);
    hostile = deliver(
        hostile,
        net_header(0, 0, 0, 1),
        &udp_frame(10),
        &[12 + 52],
        true,
    );
    hostile = hostile
        .u8(NET_RECEIVE)
        .u8(0)
        .u8(NET_HOSTILE)
        .u8(1)
        .u8(0)
        .u16(0)
        .u8(1)
        .u32(999)
        .u32(64)
        .u16(0)
        .u8(NET_RECEIVE)
        .u8(3)
        .u8(NET_RECYCLE)
        .u8(0)
        .u8(NET_RECEIVE)
        .u8(0);
    vec![
        ("split_mergeable_csum", split),
        ("packed_mergeable_csum", packed),
        ("plain", plain),
        ("hostile_rx_id", hostile.0),
    ]
}

// ---------------------------------------------------------------------------------------------
// The runs

fn seed_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// The built seeds and every file of `fuzz/seeds/<target>` (which must exist).
fn corpus(target: &str, built: Vec<(&'static str, Vec<u8>)>) -> Vec<Vec<u8>> {
    let mut corpus: Vec<Vec<u8>> = built.into_iter().map(|(_, seed)| seed).collect();
    let dir = seed_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("seed corpus {}: {error}", dir.display()));
    let mut files = 0;
    for entry in entries {
        let path = entry.expect("directory entry").path();
        corpus.push(std::fs::read(&path).expect("seed file"));
        files += 1;
    }
    assert!(files > 0, "no seed files in {}", dir.display());
    corpus
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Runs `entry` on `input`; a panic is re-raised after printing the input.
fn feed(name: &str, entry: fn(&[u8]), input: &[u8]) {
    if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| entry(input))) {
        eprintln!(
            "{name} panicked on input ({} bytes): {}",
            input.len(),
            hex(input)
        );
        panic::resume_unwind(panic);
    }
}

/// One of: flip a bit, set a byte, insert, delete, duplicate a range, splice another input.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(6) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let count = 1 + rng.below(8);
                let bytes = rng.bytes(count);
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                input.drain(at..end);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(64)).min(len);
                let copy = input[at..end].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
        }
    }
    input
}

/// `prefix` shapes the start of half the generated inputs (e.g. a short helper part for
/// `net_frame_parsing`, so that the driver script is not swallowed by a random length).
fn smoke(
    name: &str,
    entry: fn(&[u8]),
    corpus: &[Vec<u8>],
    seed: u64,
    prefix: fn(&mut Rng) -> Vec<u8>,
) {
    for input in corpus {
        feed(name, entry, input);
    }
    let mut rng = Rng(seed);
    for index in 0..RANDOM_INPUTS {
        let len = rng.below(1024);
        let mut input = if index % 2 == 0 {
            prefix(&mut rng)
        } else {
            Vec::new()
        };
        input.extend(rng.bytes(len));
        feed(name, entry, &input);
    }
    for _ in 0..MUTATED_INPUTS {
        let input = mutate(&mut rng, corpus);
        feed(name, entry, &input);
    }
}

#[test]
fn used_ring_consumption_survives_the_corpus_and_20000_generated_inputs() {
    let corpus = corpus("used_ring", used_ring_seeds());
    // Small queues wrap their rings and indices more often.
    let small_queue = |rng: &mut Rng| vec![rng.next() as u8, rng.below(4) as u8];
    smoke(
        "used_ring_consumption",
        used_ring_consumption,
        &corpus,
        0x7573_6564,
        small_queue,
    );
}

#[test]
fn net_frame_parsing_survives_the_corpus_and_20000_generated_inputs() {
    let corpus = corpus("net_frame", net_frame_seeds());
    let short_helper_part = |rng: &mut Rng| {
        let len = rng.below(80);
        let mut prefix = (len as u16).to_le_bytes().to_vec();
        prefix.extend(rng.bytes(len));
        prefix
    };
    smoke(
        "net_frame_parsing",
        net_frame_parsing,
        &corpus,
        0x6e65_7466,
        short_helper_part,
    );
}

#[test]
fn used_ring_seeds_reach_the_checks() {
    let seeds = used_ring_seeds();
    for (name, seed) in &seeds {
        let summary = used_ring::run_with_summary(seed);
        assert!(summary.added > 0, "{name}: {summary:?}");
        let hostile = name.contains("bad") || name.contains("jump");
        assert!(
            summary.popped > 0 || hostile,
            "{name}: nothing came back: {summary:?}"
        );
        let expected = match *name {
            "split_bad_id" => Some("IdOutOfRange"),
            "packed_bad_wrap" => Some("BadWrapCounter"),
            "split_index_jump" => Some("UsedIndexJumped"),
            _ => None,
        };
        let broken = summary.broken.map(|error| format!("{error:?}"));
        assert_eq!(
            broken.as_deref().and_then(|error| error.split(' ').next()),
            expected,
            "{name}: {summary:?}"
        );
    }
}

#[test]
fn net_frame_seeds_reach_the_checks() {
    for (name, seed) in net_frame_seeds() {
        let summary = net_frame::run_with_summary(&seed);
        assert!(summary.up, "{name}");
        if name == "hostile_rx_id" {
            assert!(summary.rx_broken, "{name}: {summary:?}");
            assert!(summary.offloads_checked > 0, "{name}: {summary:?}");
            continue;
        }
        assert!(!summary.rx_broken, "{name}: {summary:?}");
        assert!(summary.frames_checked >= 16, "{name}: {summary:?}");
        assert_eq!(
            summary.frames_checked, summary.frames_received,
            "{name}: every frame was checked"
        );
        assert!(summary.drops_checked >= 8, "{name}: {summary:?}");
        assert!(summary.tx_checked >= 16, "{name}: {summary:?}");
        assert!(summary.checksums_checked > 0, "{name}: {summary:?}");
        assert!(summary.offloads_checked > 0, "{name}: {summary:?}");
    }
}

/// Regenerates `fuzz/seeds/` from the seed builders:
/// `cargo test -p vireo-virtio -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand after changing the seed builders"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("used_ring", used_ring_seeds()),
        ("net_frame", net_frame_seeds()),
    ] {
        let dir = seed_dir(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, seed) in seeds {
            std::fs::write(dir.join(format!("{name}.bin")), seed).expect("seed file");
        }
    }
}
