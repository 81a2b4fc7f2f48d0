//! A device that misbehaves: used ids it never got (§2.7.8, §2.8.22) break the queue, which
//! the driver reports on every call as [`BlkError::Device`]; a used length that does not reach
//! the status byte, or a status outside 0..=2 (§5.2.6), fails that one request and leaves the
//! driver usable. Never a panic. Also configuration changes and DEVICE_NEEDS_RESET.

use super::device::{DiskConfig, World};
use super::{TIMEOUT_US, buffers_in, payload, qemu_features, read, small, up, world, write};
use crate::blk::{BlkError, BlkRequest, BlkStats};
use crate::queue::DeviceError;
use crate::queue::fake::for_both_formats;
use crate::spec::{DeviceStatus, blk_config};

#[test]
fn a_used_id_out_of_range_breaks_the_queue_and_is_reported_until_reset() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        model.borrow_mut().auto = false;
        let request = BlkRequest::Read {
            sector: 0,
            buffers: buffers_in(&world.dma, &[], &[512]),
        };
        blk.submit(request).expect("submitted");
        model
            .borrow_mut()
            .queue()
            .inject_used(999, 1)
            .expect("inject");
        let expected = BlkError::Device(DeviceError::IdOutOfRange {
            queue: 0,
            id: 999,
            size: 64,
        });
        assert_eq!(blk.poll().expect_err("hostile"), expected);
        assert_eq!(
            blk.poll().expect_err("still"),
            expected,
            "the queue stays broken"
        );
        assert_eq!(
            blk.broken(),
            Some(DeviceError::IdOutOfRange {
                queue: 0,
                id: 999,
                size: 64
            })
        );
        assert_eq!(
            expected.to_string(),
            "device broke the request queue: queue 0: used id 999 is outside a queue of 64"
        );
        // New requests are refused with the same error, their buffers handed back.
        let request = BlkRequest::Write {
            sector: 0,
            buffers: buffers_in(&world.dma, &payload(512, 1), &[512]),
        };
        let rejected = blk.submit(request).expect_err("broken");
        assert_eq!(rejected.error, expected);
        assert_eq!(rejected.buffers.len(), 1);
        assert_eq!(blk.stats().reads, 0);
        // Dropping the driver resets the device; a new one works.
        let resets = model.borrow().resets;
        drop(blk);
        assert_eq!(model.borrow().resets, resets + 1);
        assert_eq!(world.device(|state| state.status), 0);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up again");
        write(&mut blk, &world.dma, 0, &payload(512, 2), &[512]);
        assert_eq!(read(&mut blk, &world.dma, 0, &[512]), payload(512, 2));
    });
}

#[test]
fn a_used_id_not_in_flight_is_a_device_error() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        model.borrow_mut().auto = false;
        let request = BlkRequest::Read {
            sector: 0,
            buffers: buffers_in(&world.dma, &[], &[512]),
        };
        blk.submit(request).expect("submitted");
        model
            .borrow_mut()
            .queue()
            .inject_used(5, 1)
            .expect("inject");
        let error = blk.poll().expect_err("hostile");
        assert_eq!(
            error,
            BlkError::Device(DeviceError::IdNotInFlight { queue: 0, id: 5 })
        );
        assert!(blk.broken().is_some());
        let id = crate::blk::RequestId(0);
        assert_eq!(blk.wait(id, TIMEOUT_US).expect_err("broken"), error);
    });
}

#[test]
fn a_used_length_short_of_the_status_byte_fails_only_that_request() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        // A read of 512 bytes has 513 writable bytes: the data, then the status.
        for (short, lens, write_request) in [(512, 512, false), (0, 512, false), (0, 1024, true)] {
            model.borrow_mut().short_len = Some(short);
            let buffers = buffers_in(&world.dma, &payload(lens, 7), &[lens]);
            let request = if write_request {
                BlkRequest::Write { sector: 8, buffers }
            } else {
                BlkRequest::Read { sector: 8, buffers }
            };
            let done = blk.execute(request, TIMEOUT_US).expect("completed");
            let needed = if write_request { 1 } else { lens as u32 + 1 };
            assert_eq!(
                done.result,
                Err(BlkError::ShortCompletion { len: short, needed })
            );
            assert_eq!(done.buffers.len(), 1, "the buffer comes back");
        }
        assert_eq!(
            blk.stats(),
            BlkStats {
                errors: 3,
                kicks: 3,
                ..BlkStats::default()
            },
            "failed requests count as errors, not as reads or writes"
        );
        // The driver is still usable.
        model.borrow_mut().short_len = None;
        assert_eq!(blk.broken(), None);
        write(&mut blk, &world.dma, 8, &payload(512, 3), &[512]);
        assert_eq!(read(&mut blk, &world.dma, 8, &[512]), payload(512, 3));
        assert_eq!((blk.stats().reads, blk.stats().writes), (1, 1));
    });
}

#[test]
fn status_bytes_map_to_typed_errors_and_bad_ones_never_panic() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut blk = up(&world, &model, small()).expect("up");
        for (status, expected) in [
            (1u8, BlkError::IoError),
            (2, BlkError::Unsupported),
            (3, BlkError::BadStatus { status: 3 }),
            (0x80, BlkError::BadStatus { status: 0x80 }),
            (0xff, BlkError::BadStatus { status: 0xff }),
        ] {
            model.borrow_mut().status_override = Some(status);
            let request = BlkRequest::Read {
                sector: 0,
                buffers: buffers_in(&world.dma, &[], &[1024]),
            };
            let done = blk.execute(request, TIMEOUT_US).expect("completed");
            assert_eq!(done.result, Err(expected), "status {status:#x}");
            assert_eq!(done.buffers.len(), 1);
            assert!(!expected.to_string().is_empty());
            let done = blk.execute(BlkRequest::Flush, TIMEOUT_US).expect("flush");
            assert_eq!(done.result, Err(expected));
        }
        assert_eq!(
            BlkError::BadStatus { status: 3 }.to_string(),
            "the device wrote an invalid status byte 0x03"
        );
        let stats = blk.stats();
        assert_eq!((stats.errors, stats.reads, stats.flushes), (10, 0, 0));
        model.borrow_mut().status_override = None;
        assert_eq!(read(&mut blk, &world.dma, 0, &[1024]), vec![0; 1024]);
        assert_eq!(blk.stats().reads, 1);
    });
}

#[test]
fn a_resized_disk_is_seen_after_a_config_change_and_needs_reset_is_reported() {
    let world = World::new(qemu_features(), DiskConfig::default(), 64);
    let model = world.model();
    let mut blk = up(&world, &model, small()).expect("up");
    assert_eq!(blk.handle_config_change(), Ok(false));
    world.device(|state| {
        let at = blk_config::CAPACITY as usize;
        state.device_config[at..at + 8].copy_from_slice(&4096u64.to_le_bytes());
        state.generation = state.generation.wrapping_add(1);
    });
    assert_eq!(blk.handle_config_change(), Ok(true));
    assert_eq!(blk.capacity(), 4096);
    world.device(|state| state.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits());
    assert_eq!(blk.handle_config_change(), Err(BlkError::NeedsReset));
}
