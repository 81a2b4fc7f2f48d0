//! Host tests of the split and packed virtqueues against the fake device of [`super::fake`]:
//! targeted tests of each mechanism and each device misbehaviour, and long randomized runs
//! (a deterministic PRNG, so failures reproduce) of add / kick / use / pop / arm / disarm with
//! 16-bit index wrap-around, wrap counters and queue sizes from 1 to 32768.

use std::collections::HashMap;

use super::fake::{Completion, FNV_START, FakeDevice, KickRequest, fnv, for_both_formats, pattern};
use super::{
    CallbackState, DeviceError, MAX_INDIRECT_SEGMENTS, QueueError, QueueFeatures, QueueFormat,
    VirtQueue, need_event,
};
use crate::dma::host::HostDma;
use crate::dma::{DmaBuf, Part};

type Buf<'a> = Vec<Part<&'a HostDma>>;
type Queue<'a> = VirtQueue<&'a HostDma, Buf<'a>>;

const SPLIT: QueueFormat = QueueFormat::Split;
const PACKED: QueueFormat = QueueFormat::Packed;

fn features(format: QueueFormat, event_idx: bool, indirect: bool) -> QueueFeatures {
    QueueFeatures {
        format,
        event_idx,
        indirect,
    }
}

/// splitmix64: small, deterministic, good enough to drive the runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
    /// Uniform in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A queue and its fake device.
fn setup<'a>(hal: &'a HostDma, size: u16, features: QueueFeatures) -> (Queue<'a>, FakeDevice<'a>) {
    let queue = Queue::new(hal, 0, size, features).expect("queue");
    let device = FakeDevice::new(hal, features, size, queue.addresses());
    (queue, device)
}

/// A buffer of `readable` readable segments of `len` bytes (filled with `fill`) and
/// `writable` writable ones of `len` bytes.
fn buffer<'a>(hal: &'a HostDma, readable: usize, writable: usize, len: usize, fill: u8) -> Buf<'a> {
    let mut parts = Vec::new();
    for _ in 0..readable {
        let mut buf = DmaBuf::new(hal, len).expect("dma");
        buf.as_bytes_mut().fill(fill);
        parts.push(Part::readable(buf, len).expect("part"));
    }
    for _ in 0..writable {
        parts.push(Part::writable(DmaBuf::new(hal, len).expect("dma")).expect("part"));
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Construction and layout

#[test]
fn split_rejects_sizes_that_are_not_powers_of_two_and_packed_accepts_them() {
    let hal = HostDma::new();
    for size in [0u16, 3, 100, 32767] {
        let error = Queue::new(&hal, 2, size, features(SPLIT, false, false)).err();
        assert_eq!(
            error.map(|e| matches!(e, QueueError::InvalidSize { queue: 2, .. })),
            Some(true)
        );
    }
    for size in [1u16, 3, 100, 32767, 32768] {
        assert!(
            Queue::new(&hal, 0, size, features(PACKED, true, true)).is_ok(),
            "packed {size}"
        );
    }
    for size in [1u16, 2, 32768] {
        assert!(
            Queue::new(&hal, 0, size, features(SPLIT, true, true)).is_ok(),
            "split {size}"
        );
    }
    let error = Queue::new(&hal, 0, 0, features(PACKED, false, false)).err();
    assert!(matches!(
        error,
        Some(QueueError::InvalidSize { size: 0, .. })
    ));
    assert_eq!(
        hal.live_allocations(),
        0,
        "every queue freed its memory on drop"
    );
}

#[test]
fn ring_areas_meet_the_spec_alignments_for_the_transport() {
    let hal = HostDma::new();
    for_both_formats(|format| {
        let queue = Queue::new(&hal, 3, 256, features(format, true, false)).expect("queue");
        let config = queue.transport_config(Some(2));
        assert_eq!(config.desc % 16, 0, "{format:?} descriptor area");
        assert_eq!(config.driver % if format == SPLIT { 2 } else { 4 }, 0);
        assert_eq!(config.device % 4, 0);
        assert_eq!(
            (config.size, config.format, config.vector),
            (256, format, Some(2))
        );
    });
}

#[test]
fn ring_memory_allocation_failure_is_a_typed_error() {
    let hal = HostDma::new();
    hal.fail_after(0);
    let error = Queue::new(&hal, 0, 8, features(SPLIT, false, false)).err();
    assert!(matches!(error, Some(QueueError::Dma(_))), "{error:?}");
    assert_eq!(hal.live_allocations(), 0);
}

#[test]
fn features_from_negotiated_bits_pick_the_format_and_options() {
    use crate::spec::Features;
    let packed =
        QueueFeatures::from_negotiated((Features::RING_PACKED | Features::EVENT_IDX).bits());
    assert_eq!(packed, features(PACKED, true, false));
    let split = QueueFeatures::from_negotiated(Features::INDIRECT_DESC.bits());
    assert_eq!(split, features(SPLIT, false, true));
}

// ---------------------------------------------------------------------------------------------
// Adding buffers, chains and indirect tables

#[test]
fn split_and_packed_direct_chain_reaches_the_device_and_comes_back_with_its_length() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 8, features(format, false, false));
        queue.add(buffer(&hal, 2, 2, 100, 0x11)).expect("add");
        assert_eq!(
            queue.free_descriptors(),
            4,
            "{format:?}: one descriptor per segment"
        );
        assert!(queue.should_notify());
        assert_eq!(device.pop_available(8), Ok(1));
        let chain = device.popped[0].clone();
        assert_eq!(
            (chain.readable.len(), chain.writable.len(), chain.indirect),
            (2, 2, false)
        );
        assert_eq!(chain.slots, 4);
        let done = device.complete(&[(0, 150)]).expect("complete");
        assert_eq!(done[0].readable_hash, fnv(FNV_START, &[0x11; 200]));
        let used = queue.pop_used().expect("valid").expect("used");
        assert_eq!(used.len, 150);
        let written: Vec<u8> = used.buffer[2..]
            .iter()
            .flat_map(|part| part.buf().as_bytes().to_vec())
            .take(150)
            .collect();
        let (first, _) = chain.writable[0];
        let (second, _) = chain.writable[1];
        let expected: Vec<u8> = (0..100)
            .map(|k| pattern(first + k))
            .chain((0..50).map(|k| pattern(second + k)))
            .collect();
        assert_eq!(
            written, expected,
            "{format:?}: the device wrote where the buffer is"
        );
        assert_eq!(queue.free_descriptors(), 8);
        assert_eq!(queue.pop_used().expect("valid").map(|u| u.len), None);
    });
}

#[test]
fn split_and_packed_indirect_buffer_takes_one_ring_slot() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 4, features(format, false, true));
        queue.add(buffer(&hal, 1, 3, 64, 7)).expect("add");
        assert_eq!(queue.free_descriptors(), 3, "{format:?}");
        let stats = queue.stats();
        assert_eq!(
            (
                stats.indirect_buffers,
                stats.indirect_descriptors,
                stats.ring_descriptors
            ),
            (1, 4, 1)
        );
        device.pop_available(4).expect("pop");
        assert!(
            device.popped[0].indirect,
            "{format:?}: the device saw an indirect table"
        );
        assert_eq!(device.popped[0].writable.len(), 3);
        device.complete(&[(0, 192)]).expect("complete");
        assert_eq!(queue.pop_used().expect("valid").map(|u| u.len), Some(192));
        assert_eq!(queue.free_descriptors(), 4);
    });
}

#[test]
fn single_segment_and_over_long_buffers_do_not_use_indirect_tables() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 32, features(format, false, true));
        queue.add(buffer(&hal, 0, 1, 64, 0)).expect("add");
        queue
            .add(buffer(&hal, 1, MAX_INDIRECT_SEGMENTS, 16, 0))
            .expect("add");
        assert_eq!(queue.free_descriptors(), 32 - 1 - 17, "{format:?}");
        device.pop_available(2).expect("pop");
        assert!(!device.popped[0].indirect && !device.popped[1].indirect);
        assert_eq!(queue.stats().indirect_buffers, 0);
    });
}

#[test]
fn indirect_tables_exhausted_fall_back_to_direct_chains() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 1024, features(format, false, true));
        let arena = DmaBuf::new(&hal, 257 * 2 * 16)
            .expect("arena")
            .chunks(16)
            .expect("chunks");
        let mut chunks = arena.into_iter();
        for _ in 0..257 {
            let parts = vec![
                Part::readable(chunks.next().expect("chunk"), 16).expect("part"),
                Part::writable(chunks.next().expect("chunk")).expect("part"),
            ];
            queue.add(parts).expect("add");
        }
        assert_eq!(
            queue.stats().indirect_buffers,
            256,
            "{format:?}: the pool has 256 tables"
        );
        assert_eq!(queue.free_descriptors(), 1024 - 256 - 2);
        device.pop_available(300).expect("pop");
        assert!(!device.popped[256].indirect && device.popped[255].indirect);
    });
}

#[test]
fn full_ring_refuses_the_buffer_and_hands_it_back() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, _device) = setup(&hal, 4, features(format, false, false));
        queue.add(buffer(&hal, 1, 2, 8, 0)).expect("add");
        assert!(!queue.can_add(2));
        let failure = queue.add(buffer(&hal, 2, 0, 8, 0x42)).expect_err("full");
        assert_eq!(
            failure.error,
            QueueError::Full { needed: 2, free: 1 },
            "{format:?}"
        );
        assert_eq!(failure.buffer.len(), 2);
        assert!(
            failure.buffer[0]
                .buf()
                .as_bytes()
                .iter()
                .all(|&b| b == 0x42)
        );
        assert!(queue.can_add(1));
        queue.add(buffer(&hal, 1, 0, 8, 0)).expect("one slot left");
        assert_eq!(queue.free_descriptors(), 0);
    });
}

#[test]
fn malformed_buffers_are_refused_before_touching_the_ring() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, _device) = setup(&hal, 4, features(format, false, true));
        let empty = queue.add(Vec::new()).expect_err("empty");
        assert_eq!(empty.error, QueueError::EmptyBuffer);
        let mut backwards = buffer(&hal, 0, 1, 8, 0);
        backwards.extend(buffer(&hal, 1, 0, 8, 0));
        let order = queue.add(backwards).expect_err("order");
        assert_eq!(order.error, QueueError::ReadableAfterWritable { index: 1 });
        let long = queue.add(buffer(&hal, 5, 0, 8, 0)).expect_err("too many");
        assert_eq!(
            long.error,
            QueueError::TooManySegments {
                segments: 5,
                max: 4
            }
        );
        assert_eq!(
            (queue.free_descriptors(), queue.in_flight()),
            (4, 0),
            "{format:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Available-buffer notifications (kicks)

#[test]
fn need_event_is_wrap_safe() {
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(
        need_event(65535, 2, 65534),
        "event inside a window that wraps"
    );
    assert!(!need_event(2, 2, 65534));
    assert!(need_event(5, 10, 0) && !need_event(10, 10, 0) && !need_event(65535, 10, 0));
}

#[test]
fn split_and_packed_flags_suppress_kicks_without_event_idx() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 8, features(format, false, false));
        assert!(!queue.should_notify(), "nothing added, nothing to notify");
        queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        assert!(
            queue.should_notify(),
            "{format:?}: notifications enabled by default"
        );
        device.request_kicks(KickRequest::Never).expect("request");
        for _ in 0..3 {
            queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        }
        assert!(!queue.should_notify(), "{format:?}: the device said no");
        device.request_kicks(KickRequest::Always).expect("request");
        queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        assert!(queue.should_notify());
        let stats = queue.stats();
        assert_eq!((stats.kicks_needed, stats.kicks_suppressed), (2, 1));
    });
}

#[test]
fn split_and_packed_event_idx_kick_only_when_the_batch_crosses_avail_event() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = setup(&hal, 16, features(format, true, false));
        // The device wants to hear when entry/slot 5 is made available.
        device.request_kicks(KickRequest::At(5)).expect("request");
        for _ in 0..3 {
            queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        }
        assert!(!queue.should_notify(), "{format:?}: 0..3 does not reach 5");
        for _ in 0..3 {
            queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        }
        assert!(queue.should_notify(), "{format:?}: 3..6 passes 5");
        queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        assert!(!queue.should_notify(), "{format:?}: 6..7 is past the event");
    });
}

#[test]
fn split_event_idx_kick_decision_survives_16_bit_index_wrap() {
    let hal = HostDma::new();
    let (mut queue, mut device) = setup(&hal, 4, features(SPLIT, true, false));
    device
        .request_kicks(KickRequest::Never)
        .expect("flags are ignored with EVENT_IDX");
    // Cycle 65534 buffers through the ring so avail idx sits just below the wrap.
    for _ in 0..65534u32 {
        queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
        let _ = queue.should_notify();
        device.pop_available(1).expect("pop");
        device.complete(&[(0, 0)]).expect("complete");
        queue.pop_used().expect("valid").expect("used");
    }
    // avail idx is 65534; the device asks for entry 65536 = index 0 after the wrap.
    device
        .request_kicks(KickRequest::At(65536))
        .expect("request");
    queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
    assert!(!queue.should_notify(), "65534..65535 does not reach 0");
    queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
    queue.add(buffer(&hal, 1, 0, 8, 0)).expect("add");
    assert!(queue.should_notify(), "65535..1 (wrapped) passes 0");
}

// ---------------------------------------------------------------------------------------------
// Used-buffer notifications (interrupts) and the enable_cb race

#[test]
fn split_and_packed_disable_cb_suppresses_interrupts() {
    for event_idx in [false, true] {
        for_both_formats(|format| {
            let hal = HostDma::new();
            let (mut queue, mut device) = setup(&hal, 8, features(format, event_idx, false));
            queue.add(buffer(&hal, 0, 1, 8, 0)).expect("add");
            device.pop_available(1).expect("pop");
            device.complete(&[(0, 8)]).expect("complete");
            assert_eq!(
                device.interrupts, 1,
                "{format:?}/{event_idx}: enabled by default"
            );
            queue.pop_used().expect("valid").expect("used");
            queue.disable_cb();
            for _ in 0..4 {
                queue.add(buffer(&hal, 0, 1, 8, 0)).expect("add");
            }
            device.pop_available(4).expect("pop");
            device.complete(&[(0, 1), (1, 1)]).expect("complete");
            device.complete(&[(0, 1), (1, 1)]).expect("complete");
            assert_eq!(device.interrupts, 1, "{format:?}/{event_idx}: disabled");
        });
    }
}

/// A busy-polling driver disables notifications once and consumes forever: the device must
/// never interrupt, not even when the 16-bit used index wraps (with EVENT_IDX, split rings keep
/// `used_event` parked out of the device's reach). Each batch fills the whole ring before the
/// driver consumes anything, the farthest the device can get ahead of it.
#[test]
fn split_and_packed_disabled_queue_never_notifies_across_index_wraps() {
    for_both_formats(|format| {
        for event_idx in [false, true] {
            for size in [8u16, 256, 1024, 16384] {
                let hal = HostDma::new();
                let (mut queue, mut device) = setup(&hal, size, features(format, event_idx, false));
                queue.disable_cb();
                let mut spare: Vec<Buf<'_>> = (0..size).map(|_| buffer(&hal, 0, 1, 8, 0)).collect();
                let mut completed = 0u64;
                while completed < 140_000 {
                    let batch = spare.len();
                    for buf in spare.drain(..) {
                        queue.add(buf).map_err(|_| "ring full").expect("add");
                    }
                    device.pop_available(batch).expect("pop");
                    let picks: Vec<(usize, u32)> = (0..batch).map(|index| (index, 8)).collect();
                    device.complete(&picks).expect("complete");
                    while let Some(used) = queue.pop_used().expect("valid") {
                        spare.push(used.buffer);
                    }
                    assert_eq!(spare.len(), batch, "every buffer came back");
                    completed += batch as u64;
                }
                assert_eq!(
                    device.interrupts, 0,
                    "{format:?} event_idx={event_idx} size {size}: {completed} completions \
                     while disabled"
                );
            }
        }
    });
}

/// The lost-interrupt race: the device uses a buffer after the driver's last empty poll but
/// before it re-arms. The used ring is re-checked after the full fence, so `enable_cb`
/// reports the buffer instead of sleeping on an interrupt that was never sent.
#[test]
fn split_and_packed_enable_cb_race_buffer_used_before_rearm_is_reported() {
    for event_idx in [false, true] {
        for_both_formats(|format| {
            let hal = HostDma::new();
            let (mut queue, mut device) = setup(&hal, 8, features(format, event_idx, false));
            queue.disable_cb();
            queue.add(buffer(&hal, 0, 1, 8, 0)).expect("add");
            assert!(queue.should_notify());
            device.pop_available(1).expect("pop");
            assert!(
                queue.pop_used().expect("valid").is_none(),
                "driver's last empty poll"
            );
            device
                .complete(&[(0, 4)])
                .expect("device uses the buffer now");
            assert_eq!(
                device.interrupts, 0,
                "{format:?}/{event_idx}: notifications were off"
            );
            assert_eq!(
                queue.enable_cb(),
                CallbackState::UsedPending,
                "{format:?}/{event_idx}"
            );
            assert_eq!(queue.pop_used().expect("valid").map(|u| u.len), Some(4));
            // With nothing pending, arming succeeds and the next use does notify.
            assert_eq!(queue.enable_cb(), CallbackState::Armed);
            queue.add(buffer(&hal, 0, 1, 8, 0)).expect("add");
            device.pop_available(1).expect("pop");
            device.complete(&[(0, 4)]).expect("complete");
            assert_eq!(
                device.interrupts, 1,
                "{format:?}/{event_idx}: armed → notified"
            );
        });
    }
}

/// A 16-entry EVENT_IDX queue with callbacks off and 8 one-segment buffers the device took.
fn eight_taken<'a>(hal: &'a HostDma, format: QueueFormat) -> (Queue<'a>, FakeDevice<'a>) {
    let (mut queue, mut device) = setup(hal, 16, features(format, true, false));
    queue.disable_cb();
    for _ in 0..8 {
        queue.add(buffer(hal, 1, 0, 8, 0)).expect("add");
    }
    device.pop_available(8).expect("pop");
    (queue, device)
}

#[test]
fn split_and_packed_enable_cb_delayed_waits_for_three_quarters() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = eight_taken(&hal, format);
        assert_eq!(queue.enable_cb_delayed(), CallbackState::Armed);
        for used in 1..=8 {
            device.complete(&[(0, 0)]).expect("complete");
            let expected = u64::from(used > 6);
            assert_eq!(
                device.interrupts, expected,
                "{format:?}: after {used} of 8 used"
            );
        }
    });
}

#[test]
fn split_and_packed_enable_cb_delayed_reports_a_point_already_passed() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = eight_taken(&hal, format);
        let picks: Vec<(usize, u32)> = (0..7).map(|i| (i, 0)).collect();
        device.complete(&picks).expect("complete 7 of 8");
        assert_eq!(
            queue.enable_cb_delayed(),
            CallbackState::UsedPending,
            "{format:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Misbehaving device

/// A queue of 4 with one 2-segment buffer in flight (head/id 0) that the device has taken.
fn one_in_flight<'a>(hal: &'a HostDma, format: QueueFormat) -> (Queue<'a>, FakeDevice<'a>) {
    let (mut queue, mut device) = setup(hal, 4, features(format, false, false));
    queue.add(buffer(hal, 1, 1, 32, 0)).expect("add");
    device.pop_available(1).expect("pop");
    (queue, device)
}

fn assert_broken<'a>(queue: &mut Queue<'a>, hal: &'a HostDma, error: DeviceError) {
    assert_eq!(queue.pop_used().err(), Some(error));
    assert_eq!(queue.broken(), Some(error));
    assert_eq!(queue.pop_used().err(), Some(error), "stays broken");
    assert!(queue.has_used(), "a broken queue asks to be polled");
    let refused = queue.add(buffer(hal, 1, 0, 8, 0)).expect_err("broken");
    assert_eq!(refused.error, QueueError::Broken(error));
    assert!(error.to_string().contains("queue 0"), "{error}");
}

#[test]
fn misbehaving_device_used_id_out_of_range() {
    for id in [4, 9] {
        for_both_formats(|format| {
            let hal = HostDma::new();
            let (mut queue, mut device) = one_in_flight(&hal, format);
            device.inject_used(id, 0).expect("inject");
            let error = DeviceError::IdOutOfRange {
                queue: 0,
                id: u32::from(id),
                size: 4,
            };
            assert_broken(&mut queue, &hal, error);
        });
    }
}

#[test]
fn misbehaving_device_used_id_not_in_flight() {
    // Split: descriptor 1 is the second descriptor of the chain, not a head; 2 was never
    // posted. Packed: neither id was ever posted.
    for id in [1, 2] {
        for_both_formats(|format| {
            let hal = HostDma::new();
            let (mut queue, mut device) = one_in_flight(&hal, format);
            device.inject_used(id, 0).expect("inject");
            assert_broken(
                &mut queue,
                &hal,
                DeviceError::IdNotInFlight { queue: 0, id },
            );
        });
    }
}

#[test]
fn misbehaving_device_duplicate_completion() {
    for_both_formats(|format| {
        let hal = HostDma::new();
        let (mut queue, mut device) = one_in_flight(&hal, format);
        queue
            .add(buffer(&hal, 1, 0, 8, 0))
            .expect("a second buffer keeps one in flight (split head 2; packed id 1, slot 2)");
        device.complete(&[(0, 5)]).expect("complete");
        assert_eq!(queue.pop_used().expect("valid").map(|u| u.len), Some(5));
        // The device's next used position reports head/id 0 again.
        device.inject_used(0, 5).expect("the same head/id again");
        assert_broken(
            &mut queue,
            &hal,
            DeviceError::IdNotInFlight { queue: 0, id: 0 },
        );
    });
}

#[test]
fn misbehaving_device_used_len_exceeds_writable_capacity() {
    for len in [33, 1000] {
        for_both_formats(|format| {
            let hal = HostDma::new();
            let (mut queue, mut device) = one_in_flight(&hal, format);
            device.inject_used(0, len).expect("inject");
            let error = DeviceError::LengthTooLarge {
                queue: 0,
                id: 0,
                len,
                capacity: 32,
            };
            assert_broken(&mut queue, &hal, error);
        });
    }
}

/// Split: a used index past the ring (5) or past the buffers in flight (2 entries for one
/// buffer).
#[test]
fn misbehaving_device_split_used_idx_jumps_past_the_buffers_in_flight() {
    for published in [5, 2] {
        let hal = HostDma::new();
        let (mut queue, mut device) = one_in_flight(&hal, SPLIT);
        device.set_used_idx(published).expect("jump");
        let error = DeviceError::UsedIndexJumped {
            queue: 0,
            last_seen: 0,
            published,
            in_flight: 1,
        };
        assert_eq!(
            queue.enable_cb(),
            CallbackState::UsedPending,
            "a bogus idx {published} is reported"
        );
        assert_broken(&mut queue, &hal, error);
    }
}

#[test]
fn misbehaving_device_packed_wrong_wrap_counter() {
    let hal = HostDma::new();
    let (mut queue, mut device) = one_in_flight(&hal, PACKED);
    device
        .inject_packed_used(0, 0, false)
        .expect("used with the wrong wrap");
    let flags = 0;
    let error = DeviceError::BadWrapCounter {
        queue: 0,
        slot: 0,
        flags,
        expected_wrap: true,
    };
    assert_broken(&mut queue, &hal, error);
}

#[test]
fn misbehaving_device_packed_incoherent_flags() {
    let hal = HostDma::new();
    let (mut queue, mut device) = one_in_flight(&hal, PACKED);
    // AVAIL = 0, USED = 1 while the slot is in flight in lap 1 (AVAIL = 1, USED = 0).
    device.write_packed_flags(1 << 15).expect("flags");
    assert_broken(
        &mut queue,
        &hal,
        DeviceError::IncoherentFlags {
            queue: 0,
            slot: 0,
            flags: 1 << 15,
        },
    );
}

#[test]
fn misbehaving_device_packed_used_with_nothing_in_flight() {
    let hal = HostDma::new();
    let (mut queue, mut device) = setup(&hal, 4, features(PACKED, false, false));
    device.inject_packed_used(0, 0, true).expect("inject");
    let flags = (1 << 7) | (1 << 15);
    assert_broken(
        &mut queue,
        &hal,
        DeviceError::UsedWhileIdle {
            queue: 0,
            slot: 0,
            flags,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Randomized long runs

/// What the test expects back for one buffer in flight.
struct Expect {
    readable_hash: u64,
    writable: Vec<(u64, usize)>,
}

/// The driver's interrupt state as the harness models it.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Callbacks disabled at driver position `driver_used`, `interrupts` seen by then.
    Polling { interrupts: u64, driver_used: u64 },
    /// Armed and waiting: an interrupt must come once the device's used position passes
    /// `event`, and none before.
    Sleeping { interrupts: u64, event: u64 },
    /// Callbacks on but the driver is not waiting (after a pending re-arm or a wake-up).
    Awake,
}

struct Harness<'a> {
    rng: Rng,
    size: u16,
    features: QueueFeatures,
    queue: Queue<'a>,
    device: FakeDevice<'a>,
    arena: Vec<DmaBuf<&'a HostDma>>,
    outstanding: HashMap<u64, Expect>,
    completed: HashMap<u64, Completion>,
    driver_used: u64,
    mode: Mode,
    kicks_needed: u64,
    kick_checks: u64,
    added: u64,
    popped: u64,
    multi_segment_added: u64,
    saw_full: bool,
}

const CHUNK: usize = 64;

impl<'a> Harness<'a> {
    fn new(hal: &'a HostDma, size: u16, features: QueueFeatures, seed: u64) -> Self {
        let (mut queue, device) = setup(hal, size, features);
        let chunks = usize::from(size) * 4 + 64;
        let arena = DmaBuf::new(hal, chunks * CHUNK)
            .expect("arena")
            .chunks(CHUNK)
            .expect("chunks");
        queue.disable_cb();
        Self {
            rng: Rng(seed),
            size,
            features,
            queue,
            device,
            arena,
            outstanding: HashMap::new(),
            completed: HashMap::new(),
            driver_used: 0,
            mode: Mode::Polling {
                interrupts: 0,
                driver_used: 0,
            },
            kicks_needed: 0,
            kick_checks: 0,
            added: 0,
            popped: 0,
            multi_segment_added: 0,
            saw_full: false,
        }
    }

    fn context(&self) -> String {
        format!(
            "{:?} size {} {:?}",
            self.features.format, self.size, self.features
        )
    }

    /// Adds one random buffer; false when the ring (or the arena) is full.
    fn add_one(&mut self) -> bool {
        let roll = self.rng.below(100);
        let wanted = if roll < 70 {
            self.rng.range(1, 3)
        } else if roll < 92 {
            self.rng.range(4, MAX_INDIRECT_SEGMENTS as u64)
        } else {
            self.rng.range(MAX_INDIRECT_SEGMENTS as u64 + 1, 20)
        };
        self.add_segments(wanted as usize)
    }

    /// Adds one buffer of (at most) `wanted` segments with random directions and lengths.
    fn add_segments(&mut self, wanted: usize) -> bool {
        let segments = wanted.min(usize::from(self.size)).min(20);
        if self.arena.len() < segments {
            return false;
        }
        let readable = self.rng.range(0, segments as u64) as usize;
        let mut parts = Vec::with_capacity(segments);
        let mut hash = FNV_START;
        let mut writable = Vec::new();
        for index in 0..segments {
            let mut buf = self.arena.pop().expect("arena checked");
            if index < readable {
                let len = self.rng.range(1, CHUNK as u64) as usize;
                let seed = self.rng.next() as u8;
                for (k, byte) in buf.as_bytes_mut().iter_mut().enumerate() {
                    *byte = seed.wrapping_add(k as u8);
                }
                hash = fnv(hash, &buf.as_bytes()[..len]);
                parts.push(Part::readable(buf, len).expect("part"));
            } else {
                buf.as_bytes_mut().fill(0);
                writable.push((buf.phys(), buf.len()));
                parts.push(Part::writable(buf).expect("part"));
            }
        }
        let key = parts[0].buf().phys();
        let could = self.queue.can_add(segments);
        match self.queue.add(parts) {
            Ok(()) => {
                assert!(
                    could,
                    "{}: can_add said no but add succeeded",
                    self.context()
                );
                self.outstanding.insert(
                    key,
                    Expect {
                        readable_hash: hash,
                        writable,
                    },
                );
                self.added += 1;
                if segments > 1 {
                    self.multi_segment_added += 1;
                }
                true
            }
            Err(failure) => {
                assert!(
                    matches!(failure.error, QueueError::Full { .. }),
                    "{}: {:?}",
                    self.context(),
                    failure.error
                );
                assert!(
                    !could,
                    "{}: can_add said yes but add failed",
                    self.context()
                );
                self.saw_full = true;
                self.arena
                    .extend(failure.buffer.into_iter().map(Part::into_buf));
                false
            }
        }
    }

    fn kick_check(&mut self) {
        let expected = self.device.expects_kick().expect("fake");
        let got = self.queue.should_notify();
        assert_eq!(got, expected, "{}: kick decision", self.context());
        self.device.kick_checked().expect("fake");
        self.kick_checks += 1;
        if got {
            self.kicks_needed += 1;
        }
    }

    fn pop_one(&mut self) -> bool {
        let used = match self.queue.pop_used() {
            Ok(Some(used)) => used,
            Ok(None) => {
                assert!(
                    !self.device.used_ahead_of(self.driver_used),
                    "{}: the device used more than the driver can see",
                    self.context()
                );
                return false;
            }
            Err(error) => panic!("{}: honest device reported as {error}", self.context()),
        };
        let key = used.buffer[0].buf().phys();
        let expect = self
            .outstanding
            .remove(&key)
            .expect("returned exactly once");
        let done = self
            .completed
            .remove(&key)
            .expect("returned only after the device used it");
        assert_eq!(used.len, done.len, "{}: used length", self.context());
        assert_eq!(
            done.readable_hash,
            expect.readable_hash,
            "{}: device read",
            self.context()
        );
        if !self.features.indirect {
            assert!(!done.indirect);
        }
        let mut left = used.len as usize;
        for (part, &(phys, len)) in used
            .buffer
            .iter()
            .filter(|p| p.is_device_writable())
            .zip(&expect.writable)
        {
            let count = left.min(len);
            let bytes = &part.buf().as_bytes()[..count];
            assert!(
                bytes
                    .iter()
                    .enumerate()
                    .all(|(k, &b)| b == pattern(phys + k as u64)),
                "{}: written bytes",
                self.context()
            );
            left -= count;
        }
        self.driver_used += if self.features.format == SPLIT {
            1
        } else {
            u64::from(done.slots)
        };
        self.popped += 1;
        self.arena
            .extend(used.buffer.into_iter().map(Part::into_buf));
        true
    }

    fn device_complete(&mut self, count: usize) {
        let available = self.device.popped.len();
        let count = count.min(available);
        let mut indices: Vec<usize> = (0..available).collect();
        // Partial Fisher-Yates: `count` distinct indices in random order (out-of-order use).
        for i in 0..count {
            let j = i + self.rng.below((available - i) as u64) as usize;
            indices.swap(i, j);
        }
        let picks: Vec<(usize, u32)> = indices[..count]
            .iter()
            .map(|&index| {
                let capacity = self.device.popped[index].capacity();
                let len = match self.rng.below(4) {
                    0 => 0,
                    1 => capacity,
                    _ => self.rng.range(0, u64::from(capacity)) as u32,
                };
                (index, len)
            })
            .collect();
        for done in self.device.complete(&picks).expect("fake") {
            assert!(
                self.completed.insert(done.first_phys, done).is_none(),
                "completed twice"
            );
        }
        self.check_interrupts();
    }

    fn check_interrupts(&self) {
        let device = &self.device;
        match self.mode {
            Mode::Polling {
                interrupts,
                driver_used,
            } => {
                // With EVENT_IDX, split disable parks used_event 2^15 ahead and keeps it
                // there, which is exact below 32768 entries (see `SplitQueue::disable_cb`);
                // a 32768-entry ring may see one notification per wrap.
                let inexact =
                    self.features.format == SPLIT && self.features.event_idx && self.size >= 0x8000;
                if !inexact || device.used_linear - driver_used < 65535 {
                    assert_eq!(
                        device.interrupts,
                        interrupts,
                        "{}: interrupt while disabled",
                        self.context()
                    );
                }
            }
            Mode::Sleeping { interrupts, event } => {
                if device.used_linear > event {
                    assert!(
                        device.interrupts > interrupts,
                        "{}: stranded: used past the armed event without an interrupt",
                        self.context()
                    );
                } else {
                    assert_eq!(
                        device.interrupts,
                        interrupts,
                        "{}: interrupt before the armed event",
                        self.context()
                    );
                }
            }
            Mode::Awake => {}
        }
    }

    fn arm(&mut self) {
        let delayed = self.rng.chance(40);
        let delay = if delayed && self.features.event_idx {
            if self.features.format == SPLIT {
                u64::from(self.queue.in_flight()) * 3 / 4
            } else {
                u64::from(self.size - self.queue.free_descriptors()) * 3 / 4
            }
        } else {
            0
        };
        let state = if delayed {
            self.queue.enable_cb_delayed()
        } else {
            self.queue.enable_cb()
        };
        let passed = self.device.used_linear > self.driver_used + delay;
        assert_eq!(
            state == CallbackState::UsedPending,
            passed,
            "{}: re-check after arming",
            self.context()
        );
        self.mode = match state {
            CallbackState::Armed => Mode::Sleeping {
                interrupts: self.device.interrupts,
                event: self.driver_used + delay,
            },
            CallbackState::UsedPending => Mode::Awake,
        };
    }

    fn disable(&mut self) {
        self.queue.disable_cb();
        self.mode = Mode::Polling {
            interrupts: self.device.interrupts,
            driver_used: self.driver_used,
        };
    }

    fn change_kick_request(&mut self) {
        let request = if !self.features.event_idx {
            if self.rng.chance(50) {
                KickRequest::Always
            } else {
                KickRequest::Never
            }
        } else {
            let base = self.device.avail_linear;
            let ahead = if self.features.format == SPLIT {
                self.rng.below(u64::from(self.size))
            } else {
                let published = self.device.published().expect("fake");
                self.rng.range(0, published - base)
            };
            match (self.features.format, self.rng.below(4)) {
                (PACKED, 0) => KickRequest::Always,
                (PACKED, 1) => KickRequest::Never,
                _ => KickRequest::At(base + ahead),
            }
        };
        self.device.request_kicks(request).expect("fake");
    }

    fn step(&mut self) {
        let sleeping = matches!(self.mode, Mode::Sleeping { .. });
        match self.rng.below(100) {
            0..=24 => {
                let batch = self.rng.range(1, u64::from(self.size).min(48));
                for _ in 0..batch {
                    if !self.add_one() {
                        break;
                    }
                }
                if self.rng.chance(80) {
                    self.kick_check();
                }
            }
            25..=39 => {
                let max = self.rng.range(1, u64::from(self.size).min(64)) as usize;
                self.device.pop_available(max).expect("fake");
            }
            40..=59 => {
                let count = self.rng.range(1, u64::from(self.size).min(64)) as usize;
                self.device_complete(count);
            }
            60..=74 if !sleeping => {
                let count = self.rng.range(1, u64::from(self.size).min(64));
                for _ in 0..count {
                    if !self.pop_one() {
                        break;
                    }
                }
            }
            75..=82 if !sleeping => self.arm(),
            83..=88 => {
                if sleeping {
                    // Wake up (as on an interrupt or a poll timer) and keep callbacks on.
                    self.check_interrupts();
                    self.mode = Mode::Awake;
                } else {
                    self.disable();
                }
            }
            89..=95 => self.change_kick_request(),
            96 | 97 if !sleeping => self.fill_and_drain_some(),
            98 | 99 if !sleeping => self.cycle(),
            _ => {}
        }
    }

    /// One buffer all the way round: add, kick check, device takes and uses everything,
    /// driver pops everything.
    fn cycle(&mut self) {
        self.add_one();
        self.kick_check();
        self.device.pop_available(usize::MAX).expect("fake");
        let count = self.device.popped.len();
        self.device_complete(count);
        while self.pop_one() {}
    }

    /// Fills the ring to the brim, then lets the device use everything.
    fn fill_and_drain_some(&mut self) {
        while self.add_one() {}
        while self.add_segments(1) {}
        self.kick_check();
        assert!(
            !self.queue.can_add(1) || self.arena.is_empty(),
            "{}: full ring",
            self.context()
        );
        self.device.pop_available(usize::MAX).expect("fake");
        let count = self.device.popped.len();
        self.device_complete(count);
    }

    /// Everything back: the device uses all, the driver pops all.
    fn drain(&mut self) {
        self.disable();
        loop {
            self.device.pop_available(usize::MAX).expect("fake");
            let count = self.device.popped.len();
            self.device_complete(count);
            while self.pop_one() {}
            if self.outstanding.is_empty() {
                break;
            }
        }
        assert!(self.completed.is_empty());
        assert_eq!(self.queue.in_flight(), 0, "{}", self.context());
        assert_eq!(
            self.queue.free_descriptors(),
            self.size,
            "{}: every descriptor freed",
            self.context()
        );
        let stats = self.queue.stats();
        assert_eq!(
            (stats.buffers_added, stats.buffers_used),
            (self.added, self.popped)
        );
        assert_eq!(
            self.added,
            self.popped,
            "{}: every buffer came back",
            self.context()
        );
        assert_eq!(stats.kicks_needed, self.kicks_needed);
        assert!(stats.kicks_needed + stats.kicks_suppressed <= self.kick_checks);
        if self.features.indirect && self.multi_segment_added > 0 {
            assert!(
                stats.indirect_buffers > 0,
                "{}: indirect tables used",
                self.context()
            );
        }
        if !self.features.indirect {
            assert_eq!(stats.indirect_buffers, 0);
        }
    }
}

/// Runs the harness for every feature combination: at least `steps` steps, and on until the
/// device has used `min_used` entries (split) or slots (packed), so small rings are sure to
/// wrap their 16-bit indices. Returns (buffers added, largest used position) over the runs.
fn randomized_run(
    format: QueueFormat,
    size: u16,
    steps: u32,
    min_used: u64,
    seed: u64,
) -> (u64, u64) {
    let mut totals = (0, 0);
    for combo in 0..4u64 {
        let hal = HostDma::new();
        let features = features(format, combo & 1 != 0, combo & 2 != 0);
        let mut harness =
            Harness::new(&hal, size, features, seed ^ (combo << 32) ^ u64::from(size));
        let mut step = 0u32;
        while step < steps || harness.device.used_linear < min_used {
            harness.step();
            step += 1;
            assert!(
                step < 20_000_000,
                "{}: run does not progress",
                harness.context()
            );
        }
        harness.drain();
        assert!(
            harness.saw_full || size > 256,
            "{}: the run reached a full ring",
            harness.context()
        );
        totals.0 += harness.added;
        totals.1 = totals.1.max(harness.device.used_linear);
        drop(harness);
        assert_eq!(hal.live_allocations(), 0, "all DMA memory freed");
    }
    totals
}

/// Steps per size (large rings do fewer, bigger steps).
fn steps_for(size: u16) -> u32 {
    match size {
        0..=16 => 20_000,
        17..=512 => 30_000,
        _ => 400,
    }
}

/// Used entries past one 16-bit wrap of `avail.idx`/`used.idx` (and of `used_event`).
const PAST_WRAP: u64 = 70_000;

#[test]
fn randomized_split_small_rings_wrap_16_bit_indices() {
    for size in [1u16, 2, 4, 8, 16] {
        let (_, used) = randomized_run(SPLIT, size, steps_for(size), PAST_WRAP, 0x5eed_0001);
        assert!(
            used >= PAST_WRAP,
            "split size {size}: only {used} entries used"
        );
    }
}

#[test]
fn randomized_split_medium_and_max_rings() {
    for size in [64u16, 256, 32768] {
        randomized_run(SPLIT, size, steps_for(size), 0, 0x5eed_0002);
    }
}

#[test]
fn randomized_packed_small_rings_of_any_size() {
    for size in [1u16, 2, 3, 5, 7, 13] {
        let (_, used) = randomized_run(PACKED, size, steps_for(size), PAST_WRAP, 0x5eed_0003);
        assert!(
            used >= PAST_WRAP,
            "packed size {size}: only {used} slots used"
        );
    }
}

#[test]
fn randomized_packed_medium_and_max_rings() {
    for size in [100u16, 257, 32767, 32768] {
        randomized_run(PACKED, size, steps_for(size), 0, 0x5eed_0004);
    }
}
