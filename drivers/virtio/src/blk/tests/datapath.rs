//! The data path (§5.2.6): byte-exact reads and writes, multi-segment chains with and without
//! indirect descriptors, several requests in flight completed out of order, flush, GET_ID,
//! discard and write zeroes, the checks made before submission (§5.2.6.1), the bounded
//! blocking helper, and the counters. Bodies that do not depend on the ring format run for
//! both ([`for_both_formats`]).

use super::device::{DISK_ID, DiskConfig, World};
use super::{
    TIMEOUT_US, bits, buffers_in, bytes_of, format_bits, payload, qemu_features, read, small, up,
    world, write,
};
use crate::blk::{
    BlkError, BlkOptions, BlkRange, BlkRequest, BlkStats, LengthProblem, RequestKind, id_string,
};
use crate::dma::DmaBuf;
use crate::queue::fake::for_both_formats;
use crate::spec::{BlkFeatures, Features, blk_req};

#[test]
fn reads_and_writes_are_byte_exact_at_several_offsets_and_sizes() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        let capacity = blk.capacity();
        let mut expected = BlkStats::default();
        for (seed, (sector, len)) in [
            (0u64, 512usize),
            (1, 1024),
            (7, 4096),
            (100, 512 * 13),
            (capacity - 8, 4096),
            (capacity - 1, 512),
        ]
        .into_iter()
        .enumerate()
        {
            let data = payload(len, seed as u64);
            write(&mut blk, &world.dma, sector, &data, &[len]);
            let at = sector as usize * 512;
            assert_eq!(
                &model.borrow().disk[at..at + len],
                data.as_slice(),
                "the disk holds the write at sector {sector}"
            );
            assert_eq!(read(&mut blk, &world.dma, sector, &[len]), data);
            expected.reads += 1;
            expected.writes += 1;
            expected.read_bytes += len as u64;
            expected.written_bytes += len as u64;
        }
        // Neighbours of a write are untouched.
        let before = model.borrow().disk[512 * 200..512 * 203].to_vec();
        write(&mut blk, &world.dma, 201, &payload(512, 99), &[512]);
        let disk = model.borrow().disk.clone();
        assert_eq!(disk[512 * 200..512 * 201], before[..512]);
        assert_eq!(disk[512 * 202..512 * 203], before[1024..]);
        expected.writes += 1;
        expected.written_bytes += 512;
        assert_eq!(blk.stats().kicks, 13, "one doorbell per request");
        expected.kicks = 13;
        assert_eq!(blk.stats(), expected);
        // Every request had the §5.2.6 shape: header (sector for reads/writes, reserved 0).
        for seen in &model.borrow().seen {
            assert_eq!(seen.reserved, 0);
            assert!([blk_req::T_IN, blk_req::T_OUT].contains(&seen.request_type));
        }
        world.pci.assert_clean();
    });
}

#[test]
fn multi_segment_requests_use_indirect_tables_only_when_negotiated() {
    for indirect in [true, false] {
        for_both_formats(|format| {
            let mut features = qemu_features() | format_bits(format);
            if !indirect {
                features &= !Features::INDIRECT_DESC.bits();
            }
            let world = World::new(features, DiskConfig::default(), 256);
            let model = world.model();
            let mut blk = up(&world, &model, small()).expect("up");
            let lens = [512, 1536, 1024, 512];
            let data = payload(3584, 5);
            write(&mut blk, &world.dma, 64, &data, &lens);
            assert_eq!(read(&mut blk, &world.dma, 64, &[1024, 2048, 512]), data);
            let model = model.borrow();
            let (write_seen, read_seen) = (&model.seen[0], &model.seen[1]);
            assert_eq!(
                write_seen.readable_elements,
                1 + lens.len(),
                "header + 4 data"
            );
            assert_eq!(write_seen.writable_elements, 1, "the status");
            assert_eq!(write_seen.data_out, data);
            assert_eq!(read_seen.readable_elements, 1, "the header");
            assert_eq!(read_seen.writable_elements, 3 + 1, "3 data + status");
            assert_eq!(read_seen.data_in, 3584);
            assert_eq!(write_seen.indirect, indirect);
            assert_eq!(read_seen.indirect, indirect);
            let slots = if indirect { 1 } else { 6 };
            assert_eq!(write_seen.slots, slots, "ring slots of the write");
            let queue = blk.queue_stats();
            assert_eq!(queue.indirect_buffers, if indirect { 2 } else { 0 });
        });
    }
}

#[test]
fn several_requests_in_flight_complete_out_of_order_with_their_own_data() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        for sector in 0..4u64 {
            let data = payload(1024, sector);
            let at = sector as usize * 2048;
            model.borrow_mut().disk[at..at + 1024].copy_from_slice(&data);
        }
        model.borrow_mut().auto = false;
        let ids: Vec<_> = (0..4u64)
            .map(|index| {
                let request = BlkRequest::Read {
                    sector: index * 4,
                    buffers: buffers_in(&world.dma, &[], &[1024]),
                };
                blk.submit(request).expect("submitted")
            })
            .collect();
        assert_eq!(blk.in_flight(), 4);
        assert!(blk.poll().expect("poll").is_none(), "nothing completed yet");
        assert_eq!(model.borrow_mut().take(), 4, "all four reached the device");
        model.borrow_mut().complete(&[2, 0, 3, 1]);
        let mut order = Vec::new();
        while let Some(done) = blk.poll().expect("poll") {
            assert_eq!(done.result, Ok(()));
            assert_eq!(done.kind, RequestKind::Read);
            let index = ids.iter().position(|&id| id == done.id).expect("known id");
            assert_eq!(
                bytes_of(&done),
                payload(1024, index as u64),
                "request {index}'s data"
            );
            order.push(index);
        }
        assert_eq!(order, [2, 0, 3, 1], "completions in the device's order");
        assert_eq!(blk.in_flight(), 0);
        assert_eq!(blk.stats().reads, 4);
        assert_eq!(blk.stats().read_bytes, 4096);
    });
}

#[test]
fn waiting_for_one_request_keeps_the_others_completions_for_poll() {
    let world = world(crate::queue::QueueFormat::Split);
    let model = world.model();
    let mut blk = up(&world, &model, small()).expect("up");
    model.borrow_mut().auto = false;
    let read = |sector| BlkRequest::Read {
        sector,
        buffers: buffers_in(&world.dma, &[], &[512]),
    };
    let first = blk.submit(read(0)).expect("first");
    let second = blk.submit(read(1)).expect("second");
    model.borrow_mut().take();
    model.borrow_mut().complete(&[0, 1]);
    let done = blk.wait(second, TIMEOUT_US).expect("second completes");
    assert_eq!(done.id, second);
    assert!(blk.pending());
    let done = blk.poll().expect("poll").expect("the first, kept");
    assert_eq!(done.id, first);
    assert!(blk.poll().expect("poll").is_none());
    assert_eq!(
        blk.wait(first, TIMEOUT_US).expect_err("gone"),
        BlkError::UnknownRequest { id: Some(first) }
    );
}

#[test]
fn the_blocking_helper_gives_up_after_its_bound_and_the_request_completes_later() {
    let world = world(crate::queue::QueueFormat::Split);
    let model = world.model();
    let mut blk = up(&world, &model, small()).expect("up");
    model.borrow_mut().auto = false;
    let before = world.dma.delayed_us();
    let request = BlkRequest::Write {
        sector: 3,
        buffers: buffers_in(&world.dma, &payload(512, 3), &[512]),
    };
    let rejected = blk.execute(request, 500).expect_err("no answer");
    let Some(id) = rejected.in_flight else {
        panic!("the request reached the device: {rejected:?}");
    };
    assert_eq!(rejected.error, BlkError::Timeout { id });
    assert!(
        rejected.buffers.is_empty(),
        "the device still owns the buffer"
    );
    let waited = world.dma.delayed_us() - before;
    assert!((500..=510).contains(&waited), "bounded wait of {waited} µs");
    model.borrow_mut().process();
    let done = blk.poll().expect("poll").expect("completed later");
    assert_eq!((done.id, done.result), (id, Ok(())));
    assert_eq!(bytes_of(&done), payload(512, 3), "the buffer comes back");
    assert_eq!(model.borrow().disk[1536..2048], payload(512, 3));
}

#[test]
fn flush_is_sent_with_sector_zero_only_when_negotiated() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        let done = blk.execute(BlkRequest::Flush, TIMEOUT_US).expect("flush");
        assert_eq!((done.kind, done.result), (RequestKind::Flush, Ok(())));
        assert!(done.buffers.is_empty());
        assert_eq!(model.borrow().flushes, 1);
        let seen = model.borrow().seen[0].clone();
        assert_eq!((seen.request_type, seen.sector), (blk_req::T_FLUSH, 0));
        assert_eq!((seen.readable_elements, seen.writable_elements), (1, 1));
        assert_eq!(blk.stats().flushes, 1);

        let world = World::new(
            (qemu_features() | format_bits(format)) & !BlkFeatures::FLUSH.bits(),
            DiskConfig::default(),
            256,
        );
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        let rejected = blk.submit(BlkRequest::Flush).expect_err("no FLUSH");
        assert_eq!(
            rejected.error,
            BlkError::NotNegotiated {
                feature: BlkFeatures::FLUSH
            }
        );
        assert_eq!(
            rejected.error.to_string(),
            "the request needs VIRTIO_BLK_F_FLUSH, which was not negotiated"
        );
        assert_eq!(model.borrow().doorbells, 0, "nothing reached the device");
        assert_eq!(blk.queue_stats().buffers_added, 0);
        assert_eq!(blk.stats().rejected, 1);
    });
}

#[test]
fn get_id_returns_the_device_id_in_a_20_byte_buffer() {
    let world = world(crate::queue::QueueFormat::Split);
    let model = world.model();
    let mut blk = up(&world, &model, small()).expect("up");
    let buffer = DmaBuf::new(&world.dma, blk_req::ID_BYTES).expect("buffer");
    let done = blk
        .execute(BlkRequest::GetId { buffer }, TIMEOUT_US)
        .expect("get id");
    assert_eq!((done.kind, done.result), (RequestKind::GetId, Ok(())));
    assert_eq!(id_string(done.buffers[0].as_bytes()), DISK_ID);
    let seen = model.borrow().seen[0].clone();
    assert_eq!(
        (seen.request_type, seen.sector, seen.data_in),
        (blk_req::T_GET_ID, 0, 20)
    );
    assert_eq!(
        id_string(b"12345678901234567890abc"),
        b"12345678901234567890"
    );

    let buffer = DmaBuf::new(&world.dma, 16).expect("buffer");
    let rejected = blk.submit(BlkRequest::GetId { buffer }).expect_err("short");
    assert_eq!(
        rejected.error,
        BlkError::BadLength {
            len: 16,
            problem: LengthProblem::IdBuffer
        }
    );
    assert_eq!(rejected.buffers.len(), 1, "the buffer comes back");
}

#[test]
fn discard_and_write_zeroes_are_sent_when_offered_and_refused_when_not() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        write(&mut blk, &world.dma, 16, &payload(4096, 1), &[4096]);
        let request = BlkRequest::WriteZeroes {
            ranges: vec![BlkRange {
                sector: 18,
                sectors: 4,
            }],
            unmap: true,
        };
        let done = blk.execute(request, TIMEOUT_US).expect("write zeroes");
        assert_eq!(done.result, Ok(()));
        assert!(done.buffers.is_empty(), "the segments were the driver's");
        assert_eq!(model.borrow().zeroed, [(18, 4, true)]);
        let back = read(&mut blk, &world.dma, 16, &[4096]);
        let mut expected = payload(4096, 1);
        expected[1024..3072].fill(0);
        assert_eq!(back, expected);
        let request = BlkRequest::Discard {
            ranges: vec![BlkRange {
                sector: 100,
                sectors: 8,
            }],
        };
        let done = blk.execute(request, TIMEOUT_US).expect("discard");
        assert_eq!(done.result, Ok(()));
        assert_eq!(model.borrow().discarded, [(100, 8)]);
        let seen = model.borrow().seen.last().cloned().expect("seen");
        assert_eq!((seen.request_type, seen.sector), (blk_req::T_DISCARD, 0));
        assert_eq!(seen.data_out.len(), blk_req::SEGMENT_LEN);
        let stats = blk.stats();
        assert_eq!((stats.discards, stats.write_zeroes), (1, 1));
        // One range per command (max_*_seg 1) and at most 32768 sectors each.
        let two = vec![
            BlkRange {
                sector: 0,
                sectors: 1
            };
            2
        ];
        let rejected = blk
            .submit(BlkRequest::Discard { ranges: two })
            .expect_err("2");
        assert!(matches!(
            rejected.error,
            BlkError::BadLength {
                problem: LengthProblem::TooManyRanges { ranges: 2, max: 1 },
                ..
            }
        ));
        let long = vec![BlkRange {
            sector: 0,
            sectors: 32769,
        }];
        let rejected = blk
            .submit(BlkRequest::WriteZeroes {
                ranges: long,
                unmap: false,
            })
            .expect_err("long");
        assert!(matches!(
            rejected.error,
            BlkError::BadLength {
                problem: LengthProblem::RangeTooLong {
                    sectors: 32769,
                    max: 32768
                },
                ..
            }
        ));
        let past = vec![BlkRange {
            sector: 2047,
            sectors: 2,
        }];
        let rejected = blk
            .submit(BlkRequest::Discard { ranges: past })
            .expect_err("past");
        assert!(matches!(rejected.error, BlkError::OutOfRange { .. }));

        let world = World::new(
            bits(&[Features::VERSION_1.bits()]) | format_bits(format),
            DiskConfig::default(),
            256,
        );
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        let range = vec![BlkRange {
            sector: 0,
            sectors: 1,
        }];
        let rejected = blk
            .submit(BlkRequest::Discard {
                ranges: range.clone(),
            })
            .expect_err("no DISCARD");
        assert_eq!(
            rejected.error,
            BlkError::NotNegotiated {
                feature: BlkFeatures::DISCARD
            }
        );
        let rejected = blk
            .submit(BlkRequest::WriteZeroes {
                ranges: range,
                unmap: false,
            })
            .expect_err("no WRITE_ZEROES");
        assert_eq!(
            rejected.error,
            BlkError::NotNegotiated {
                feature: BlkFeatures::WRITE_ZEROES
            }
        );
        assert_eq!(model.borrow().doorbells, 0);
        assert_eq!(blk.queue_stats().buffers_added, 0);
    });
}

#[test]
fn a_read_only_device_refuses_writes_without_touching_the_queue() {
    for_both_formats(|format| {
        let world = World::new(
            qemu_features() | format_bits(format) | BlkFeatures::RO.bits(),
            DiskConfig::default(),
            256,
        );
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        assert!(blk.read_only());
        let data = payload(1024, 8);
        let request = BlkRequest::Write {
            sector: 0,
            buffers: buffers_in(&world.dma, &data, &[512, 512]),
        };
        let rejected = blk.submit(request).expect_err("read-only");
        assert_eq!(rejected.error, BlkError::ReadOnly);
        assert_eq!(
            rejected.error.to_string(),
            "the device is read-only (VIRTIO_BLK_F_RO)"
        );
        assert_eq!(rejected.in_flight, None);
        let back: Vec<u8> = rejected
            .buffers
            .iter()
            .flat_map(|b| b.as_bytes().to_vec())
            .collect();
        assert_eq!(back, data, "both buffers come back untouched");
        let range = vec![BlkRange {
            sector: 0,
            sectors: 8,
        }];
        for request in [
            BlkRequest::Discard {
                ranges: range.clone(),
            },
            BlkRequest::WriteZeroes {
                ranges: range.clone(),
                unmap: false,
            },
        ] {
            assert_eq!(
                blk.submit(request).expect_err("ro").error,
                BlkError::ReadOnly
            );
        }
        assert_eq!(
            blk.queue_stats().buffers_added,
            0,
            "the queue was not touched"
        );
        assert_eq!(model.borrow().doorbells, 0);
        assert!(model.borrow().disk.iter().all(|&b| b == 0));
        // Reads and flushes still work.
        assert_eq!(read(&mut blk, &world.dma, 0, &[512]), vec![0; 512]);
        blk.execute(BlkRequest::Flush, TIMEOUT_US).expect("flush");
        let stats = blk.stats();
        assert_eq!(
            (stats.rejected, stats.writes, stats.reads, stats.flushes),
            (3, 0, 1, 1)
        );
    });
}

#[test]
fn out_of_range_misaligned_and_badly_sized_requests_are_refused_before_submission() {
    let disk = DiskConfig {
        capacity: 1024,
        blk_size: 4096,
        seg_max: 3,
        size_max: 8192,
        ..DiskConfig::default()
    };
    let world = World::new(qemu_features() | BlkFeatures::SIZE_MAX.bits(), disk, 64);
    let model = world.model();
    let mut blk = up(&world, &model, small()).expect("up");
    let dma = &world.dma;
    let cases: Vec<(u64, Vec<usize>, BlkError)> = vec![
        (
            1024,
            vec![4096],
            BlkError::OutOfRange {
                sector: 1024,
                sectors: 8,
                capacity: 1024,
            },
        ),
        (
            1016,
            vec![8192],
            BlkError::OutOfRange {
                sector: 1016,
                sectors: 16,
                capacity: 1024,
            },
        ),
        (
            u64::MAX - 7,
            vec![4096],
            BlkError::OutOfRange {
                sector: u64::MAX - 7,
                sectors: 8,
                capacity: 1024,
            },
        ),
        (
            1,
            vec![4096],
            BlkError::Misaligned {
                sector: 1,
                block_size: 4096,
            },
        ),
        (
            0,
            vec![512],
            BlkError::BadLength {
                len: 512,
                problem: LengthProblem::NotBlockMultiple { block_size: 4096 },
            },
        ),
        (
            0,
            vec![],
            BlkError::BadLength {
                len: 0,
                problem: LengthProblem::Zero,
            },
        ),
        (
            0,
            vec![4096, 4096, 4096, 4096],
            BlkError::BadLength {
                len: 0,
                problem: LengthProblem::TooManySegments {
                    segments: 4,
                    max: 3,
                },
            },
        ),
        (
            0,
            vec![12288],
            BlkError::BadLength {
                len: 12288,
                problem: LengthProblem::SegmentTooLarge {
                    segment: 12288,
                    size_max: 8192,
                },
            },
        ),
    ];
    for (sector, lens, expected) in cases {
        for write in [false, true] {
            let buffers = buffers_in(dma, &[], &lens);
            let request = if write {
                BlkRequest::Write { sector, buffers }
            } else {
                BlkRequest::Read { sector, buffers }
            };
            let rejected = blk.submit(request).expect_err("refused");
            assert_eq!(rejected.error, expected, "sector {sector}, {lens:?}");
            assert_eq!(rejected.buffers.len(), lens.len(), "buffers handed back");
            assert!(!rejected.error.to_string().is_empty());
        }
    }
    assert_eq!(blk.queue_stats().buffers_added, 0);
    assert_eq!(model.borrow().doorbells, 0);
    // The last block and three segments at the limits are fine.
    let data = payload(4096 * 3, 4);
    write(&mut blk, dma, 1000, &data, &[8192, 2048, 2048]);
    assert_eq!(read(&mut blk, dma, 1000, &[4096, 4096, 4096]), data);
    write(&mut blk, dma, 1016, &payload(4096, 5), &[4096]);
}

#[test]
fn requests_beyond_the_queue_are_refused_as_busy_until_completions_are_polled() {
    let world = World::new(
        bits(&[Features::VERSION_1.bits()]),
        DiskConfig::default(),
        8,
    );
    let model = world.model();
    let mut blk = up(
        &world,
        &model,
        BlkOptions {
            queue_size: 8,
            ..small()
        },
    )
    .expect("up");
    model.borrow_mut().auto = false;
    let read = |sector| BlkRequest::Read {
        sector,
        buffers: buffers_in(&world.dma, &[], &[512]),
    };
    // Three descriptors per request without indirect tables: two fit in 8.
    blk.submit(read(0)).expect("first");
    blk.submit(read(1)).expect("second");
    let rejected = blk.submit(read(2)).expect_err("full");
    assert_eq!(rejected.error, BlkError::Busy { in_flight: 2 });
    assert_eq!(rejected.buffers.len(), 1);
    model.borrow_mut().process();
    assert!(blk.poll().expect("poll").is_some());
    blk.submit(read(2)).expect("room again");
}

#[test]
fn completions_raise_no_interrupt_until_the_caller_arms_it() {
    for_both_formats(|format| {
        let world = World::new(
            bits(&[Features::VERSION_1.bits()]) | format_bits(format),
            DiskConfig::default(),
            64,
        );
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        model.borrow_mut().auto = false;
        let read = |sector| BlkRequest::Read {
            sector,
            buffers: buffers_in(&world.dma, &[], &[512]),
        };
        blk.submit(read(0)).expect("first");
        model.borrow_mut().process();
        assert_eq!(
            model.borrow_mut().queue().interrupts,
            0,
            "polling by default"
        );
        assert!(blk.pending());
        assert!(
            blk.arm_interrupt(),
            "a completion is already waiting: poll first"
        );
        assert!(blk.poll().expect("poll").is_some());
        assert!(!blk.arm_interrupt(), "armed with nothing pending");
        blk.submit(read(1)).expect("second");
        model.borrow_mut().process();
        assert_eq!(
            model.borrow_mut().queue().interrupts,
            1,
            "the armed interrupt"
        );
        blk.disarm_interrupt();
        assert!(blk.poll().expect("poll").is_some());
        blk.submit(read(2)).expect("third");
        model.borrow_mut().process();
        assert_eq!(model.borrow_mut().queue().interrupts, 1, "disarmed again");
    });
}
