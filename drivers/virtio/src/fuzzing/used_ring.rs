//! [`super::used_ring_consumption`]: a queue, a model of what is in flight, and a hostile
//! device, all scripted by the fuzz input.
//!
//! Input layout: one byte of configuration (bit 0 packed, bit 1 EVENT_IDX, bit 2
//! INDIRECT_DESC), one byte of size (split: 2^(b % 9); packed: 1 + b), then operations of one
//! byte each followed by their arguments (see [`Harness::step`]).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::Input;
use super::device::{RingDevice, Taken};
use crate::dma::host::HostDma;
use crate::dma::{DmaBuf, Part};
use crate::queue::{
    AddError, CallbackState, DeviceError, QueueError, QueueFeatures, QueueFormat, VirtQueue,
};

type Buffer<'a> = Vec<Part<&'a HostDma>>;

/// Bytes per piece of the buffer pool.
const PIECE: usize = 64;
/// Operations per input, at most.
const MAX_STEPS: usize = 4096;

/// What a run did, for the smoke test to see that the checks were reached.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(not(test), allow(dead_code, reason = "read by the smoke test only"))]
pub(super) struct Summary {
    /// Buffers added.
    pub added: u64,
    /// Buffers returned by `pop_used` (each checked).
    pub popped: u64,
    /// The device error that broke the queue, if any.
    pub broken: Option<DeviceError>,
}

pub(super) fn run(data: &[u8]) {
    let _ = run_with_summary(data);
}

pub(super) fn run_with_summary(data: &[u8]) -> Summary {
    let mut input = Input::new(data);
    let config = input.u8();
    let format = if config & 1 != 0 {
        QueueFormat::Packed
    } else {
        QueueFormat::Split
    };
    let features = QueueFeatures {
        format,
        event_idx: config & 2 != 0,
        indirect: config & 4 != 0,
    };
    let size_byte = input.u8();
    let size = match format {
        QueueFormat::Split => 1u16 << (size_byte % 9),
        QueueFormat::Packed => 1 + u16::from(size_byte),
    };
    let hal = HostDma::new();
    let summary = {
        let Some(mut harness) = Harness::new(&hal, features, size) else {
            return Summary::default();
        };
        let mut steps = 0;
        while !input.is_empty() && steps < MAX_STEPS {
            harness.step(&mut input);
            harness.check();
            steps += 1;
        }
        // Whatever the device did, draining ends in an error or an empty ring.
        harness.drain();
        harness.check();
        harness.summary
        // The queue (with the buffers in flight), the pool and the device go here.
    };
    assert_eq!(
        hal.live_allocations(),
        0,
        "ring, tables and buffers are all freed with the queue"
    );
    summary
}

struct Harness<'a> {
    queue: VirtQueue<&'a HostDma, Buffer<'a>>,
    device: RingDevice<'a>,
    size: u16,
    /// Pool pieces not in any buffer.
    stash: Vec<DmaBuf<&'a HostDma>>,
    /// In flight, by the bus address of the first segment: the writable capacity.
    in_flight: BTreeMap<u64, u32>,
    /// Buffers the device took and has not completed.
    held: Vec<Taken>,
    summary: Summary,
}

impl<'a> Harness<'a> {
    fn new(hal: &'a HostDma, features: QueueFeatures, size: u16) -> Option<Self> {
        let queue = VirtQueue::new(hal, 0, size, features).ok()?;
        let device = RingDevice::new(hal, features.format, size, queue.addresses());
        // Enough pieces for every slot plus long chains; one allocation.
        let pieces = 2 * usize::from(size) + 40;
        let stash = DmaBuf::new(hal, pieces * PIECE).ok()?.chunks(PIECE).ok()?;
        Some(Self {
            queue,
            device,
            size,
            stash,
            in_flight: BTreeMap::new(),
            held: Vec::new(),
            summary: Summary::default(),
        })
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 14 {
            0 | 1 => {
                for _ in 0..=input.u8() % 4 {
                    self.add(input);
                }
            }
            2 => {
                let _ = self.queue.should_notify();
            }
            3 | 4 => self.drain(),
            5 => {
                let state = self.queue.enable_cb();
                self.armed(state);
            }
            6 => {
                let state = self.queue.enable_cb_delayed();
                self.armed(state);
            }
            7 => self.queue.disable_cb(),
            8 => {
                for _ in 0..=input.u8() % 8 {
                    match self.device.take() {
                        Some(taken) => self.held.push(taken),
                        None => break,
                    }
                }
            }
            9 | 10 => {
                for _ in 0..=input.u8() % 4 {
                    self.complete(input);
                }
                if input.bool() {
                    self.device.publish();
                }
            }
            11 => self.device.publish(),
            12 => self.hostile(input),
            _ => {
                let _ = self.queue.has_used();
                let _ = self.queue.free_descriptors();
                let _ = self.queue.can_add(usize::from(input.u8()));
            }
        }
    }

    /// Builds a buffer from the pool (readable pieces with data-chosen lengths, then writable
    /// pieces, possibly shortened) and adds it, checking the outcome against `can_add`.
    ///
    /// Arguments: a shape byte (bits 0-1 readable segments, 2-3 writable ones, bit 7 fifteen
    /// more writable ones), then per segment a length byte and, for writable ones, a byte
    /// whose bit 0 shortens the piece to that length. They are read whatever the pool holds,
    /// so that a script means the same in every state.
    fn add(&mut self, input: &mut Input<'_>) {
        let shape = input.u8();
        let readable = usize::from(shape & 3);
        let mut writable = usize::from((shape >> 2) & 3);
        if shape & 0x80 != 0 {
            // Longer than an indirect table takes: a direct chain.
            writable += 15;
        }
        let segments = readable + writable;
        let choices: Vec<(usize, bool)> = (0..segments)
            .map(|index| {
                let wanted = usize::from(input.u8());
                (wanted, index >= readable && input.bool())
            })
            .collect();
        if segments > self.stash.len() {
            return;
        }
        let mut buffer: Buffer<'a> = Vec::with_capacity(segments);
        let mut capacity = 0u32;
        for (index, &(wanted, shorten)) in choices.iter().enumerate() {
            let Some(piece) = self.stash.pop() else {
                break;
            };
            let wanted = wanted % (piece.len() + 1);
            let part = if index < readable {
                Part::readable(piece, wanted)
            } else if shorten {
                match piece.split_at(wanted) {
                    Ok((head, _tail)) => Part::writable(head),
                    Err((piece, _)) => Part::writable(piece),
                }
            } else {
                Part::writable(piece)
            };
            match part {
                Ok(part) => {
                    if part.is_device_writable() {
                        capacity += part.len();
                    }
                    buffer.push(part);
                }
                Err((piece, error)) => panic!("a piece of {} bytes: {error}", piece.len()),
            }
        }
        let key = buffer.first().map(|part| part.buf().phys());
        let broken = self.queue.broken();
        let fits = self.queue.can_add(segments);
        match self.queue.add(buffer) {
            Ok(()) => {
                assert!(fits, "add succeeded where can_add({segments}) said no");
                assert!(broken.is_none(), "a broken queue accepted a buffer");
                let key = key.expect("an accepted buffer has a segment");
                let previous = self.in_flight.insert(key, capacity);
                assert!(previous.is_none(), "buffer {key:#x} added twice");
                self.summary.added += 1;
            }
            Err(AddError { error, buffer }) => {
                let expected_reason = match (broken, error) {
                    (Some(device), QueueError::Broken(reported)) => device == reported,
                    (None, QueueError::EmptyBuffer) => segments == 0,
                    (None, QueueError::TooManySegments { .. }) => segments > usize::from(self.size),
                    (None, QueueError::Full { .. }) => !fits,
                    _ => false,
                };
                assert!(
                    expected_reason,
                    "add of {segments} segments failed with {error} (broken: {broken:?})"
                );
                self.stash.extend(buffer.into_iter().map(Part::into_buf));
            }
        }
    }

    /// Completes one held buffer (chosen by the input) with a data-chosen length: mostly
    /// within its capacity, sometimes just past it, sometimes anything.
    ///
    /// Arguments: a pick byte, a mode byte, then a u32 (modes 0 and 2..) or a u8 (mode 1).
    fn complete(&mut self, input: &mut Input<'_>) {
        let pick = usize::from(input.u8());
        let mode = input.u8() % 8;
        let value = if mode == 1 {
            u32::from(input.u8())
        } else {
            input.u32()
        };
        if self.held.is_empty() {
            return;
        }
        let taken = self.held.swap_remove(pick % self.held.len());
        let capacity = taken.capacity();
        let len = match mode {
            0 => value,
            1 => capacity.saturating_add(1 + value),
            _ => value % capacity.saturating_add(1),
        };
        self.device.complete(&taken, len);
    }

    /// One act of a hostile device.
    fn hostile(&mut self, input: &mut Input<'_>) {
        match input.u8() % 5 {
            0 => {
                let (slot, relative) = (input.u16(), input.bool());
                let (id, len, flags) = (input.u32(), input.u32(), input.u16());
                self.device.raw_used(slot, relative, id, len, flags);
                if input.bool() {
                    // Publish it (split) or move past it (packed).
                    self.device.raw_index(1, None);
                }
            }
            1 => {
                // An id the driver might have in flight, with a small length.
                let slot = u16::from(input.u8() % 4);
                let id = u32::from(input.u16() % self.size);
                let len = u32::from(input.u8());
                let flags = input.u16();
                self.device.raw_used(slot, true, id, len, flags);
            }
            2 => {
                let delta = u16::from(input.u8());
                let absolute = if input.bool() {
                    Some(input.u16())
                } else {
                    None
                };
                self.device.raw_index(delta, absolute);
            }
            3 => self.device.scribble(input.u32(), input.u16()),
            _ => {
                // Take a buffer but complete a different slot's worth (packed: skip slots).
                let (extra, len) = (input.u8() % 3, input.u32() % 256);
                if let Some(mut lying) = self.device.take() {
                    lying.slots = lying.slots.wrapping_add(u16::from(extra));
                    self.device.complete(&lying, len);
                }
            }
        }
    }

    /// `pop_used` until the ring is empty or the queue breaks, checking every buffer.
    fn drain(&mut self) {
        // Each success returns one of the buffers in flight, so this ends.
        for _ in 0..=usize::from(self.size) + 1 {
            match self.queue.pop_used() {
                Ok(None) => return,
                Ok(Some(used)) => {
                    let key = used.buffer.first().map(|part| part.buf().phys());
                    let key = key.expect("a used buffer has a segment");
                    let Some(capacity) = self.in_flight.remove(&key) else {
                        panic!("buffer {key:#x} returned but not in flight (twice or never added)");
                    };
                    assert!(
                        used.len <= capacity,
                        "used len {} exceeds the buffer's {capacity} writable bytes",
                        used.len
                    );
                    let writable: u32 = used
                        .buffer
                        .iter()
                        .filter(|part| part.is_device_writable())
                        .map(Part::len)
                        .sum();
                    assert_eq!(writable, capacity, "the buffer came back whole");
                    self.summary.popped += 1;
                    self.stash
                        .extend(used.buffer.into_iter().map(Part::into_buf));
                }
                Err(error) => {
                    self.broke(error);
                    return;
                }
            }
        }
        panic!("pop_used returned more buffers than were in flight");
    }

    fn broke(&mut self, error: DeviceError) {
        if let Some(first) = self.summary.broken {
            assert_eq!(
                error, first,
                "a broken queue keeps reporting the same error"
            );
        }
        self.summary.broken = Some(error);
        let queue_index = match error {
            DeviceError::UsedIndexJumped { queue, .. }
            | DeviceError::IdOutOfRange { queue, .. }
            | DeviceError::IdNotInFlight { queue, .. }
            | DeviceError::LengthTooLarge { queue, .. }
            | DeviceError::BadWrapCounter { queue, .. }
            | DeviceError::IncoherentFlags { queue, .. }
            | DeviceError::UsedWhileIdle { queue, .. } => queue,
        };
        assert_eq!(queue_index, 0, "the error names this queue");
    }

    fn armed(&self, state: CallbackState) {
        if self.summary.broken.is_some() {
            assert_eq!(
                state,
                CallbackState::UsedPending,
                "a broken queue tells the caller to poll"
            );
        }
    }

    /// The invariants that hold after every step.
    fn check(&mut self) {
        assert_eq!(
            usize::from(self.queue.in_flight()),
            self.in_flight.len(),
            "in-flight count"
        );
        let stats = self.queue.stats();
        assert_eq!(stats.buffers_added, self.summary.added);
        assert_eq!(stats.buffers_used, self.summary.popped);
        assert!(self.queue.free_descriptors() <= self.size);
        assert_eq!(self.queue.broken(), self.summary.broken);
        if let Some(error) = self.summary.broken {
            assert_eq!(self.queue.pop_used().err(), Some(error), "stays broken");
            assert!(self.queue.has_used(), "a broken queue asks to be polled");
            assert!(!self.queue.can_add(1), "a broken queue takes no buffers");
        }
    }
}
