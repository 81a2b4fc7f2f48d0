//! A device that breaks the ring rules (§2.7.8, §2.8.22) on the receive or transmit queue:
//! each violation is a [`NetError::Device`] naming the queue, repeated until the device is
//! reset, and never a panic. Violations both ring formats can suffer run once per format
//! ([`for_both_formats`]); the used index (split) and the wrap counter (packed) have their own.

use std::cell::RefCell;

use super::device::{NetModel, RX, TX, WireHeader, World};
use super::{Net, UDP, bits, ipv4_frame, qemu_features, small, up};
use crate::net::NetError;
use crate::queue::fake::for_both_formats;
use crate::queue::{DeviceError, QueueFormat};
use crate::spec::Features;

/// A QEMU-like device offering `format`'s rings.
fn world(format: QueueFormat) -> World {
    match format {
        QueueFormat::Split => World::new(qemu_features()),
        QueueFormat::Packed => World::new(qemu_features() | bits(&[Features::RING_PACKED.bits()])),
    }
}

/// Brings up a device with `format`'s rings and its automatic transmit completion off,
/// transmits `frame`, and hands the driver and the device model to `body`.
fn with_frame_in_flight(
    format: QueueFormat,
    frame: &[u8],
    body: impl FnOnce(&mut Net<'_, '_>, &RefCell<NetModel<'_>>),
) {
    let world = world(format);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    model.borrow_mut().tx_auto = false;
    let sent = net
        .transmit(frame.len(), |buffer| buffer.copy_from_slice(frame))
        .expect("transmit");
    assert_eq!(sent, Some(()));
    body(&mut net, &model);
}

#[test]
fn rx_used_id_out_of_range_is_a_device_error_never_a_panic() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        model
            .borrow_mut()
            .queue(RX)
            .inject_used(999, 100)
            .expect("inject");
        let expected = NetError::Device {
            queue: RX,
            error: DeviceError::IdOutOfRange {
                queue: RX,
                id: 999,
                size: 64,
            },
        };
        assert_eq!(net.receive().err(), Some(expected));
        assert_eq!(
            net.receive().err(),
            Some(expected),
            "the queue stays broken"
        );
        assert!(
            net.rx_pending(),
            "a broken queue reports work so the caller polls and sees it"
        );
        assert_eq!(
            expected.to_string(),
            "queue 0: queue 0: used id 999 is outside a queue of 64"
        );
    });
}

#[test]
fn rx_used_len_beyond_the_buffer_is_a_device_error() {
    for excess in [1, 4096] {
        for_both_formats(|format| {
            let world = world(format);
            let model = world.model();
            let mut net = up(&world, &model, small()).expect("up");
            let (id, capacity) = {
                let mut model = model.borrow_mut();
                model.take_rx_buffers();
                let chain = model.queue(RX).popped[0].clone();
                (chain.id, chain.capacity())
            };
            model
                .borrow_mut()
                .queue(RX)
                .inject_used(id, capacity + excess)
                .expect("inject");
            assert_eq!(
                net.receive().err(),
                Some(NetError::Device {
                    queue: RX,
                    error: DeviceError::LengthTooLarge {
                        queue: RX,
                        id,
                        len: capacity + excess,
                        capacity,
                    },
                })
            );
        });
    }
}

#[test]
fn split_rx_used_index_jumping_past_the_ring_is_a_device_error() {
    let world = world(QueueFormat::Split);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    model
        .borrow_mut()
        .queue(RX)
        .set_used_idx(1000)
        .expect("inject");
    assert!(matches!(
        net.receive(),
        Err(NetError::Device {
            queue: RX,
            error: DeviceError::UsedIndexJumped {
                published: 1000,
                ..
            }
        })
    ));
}

#[test]
fn rx_bad_entry_in_the_middle_of_a_mergeable_frame_is_a_device_error() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        // First buffer of a two-buffer frame arrives, then a completion of a buffer never
        // posted.
        let frame = ipv4_frame(UDP, 100, 0, 0, 1);
        let mut first = WireHeader {
            num_buffers: 2,
            ..WireHeader::default()
        }
        .bytes()
        .to_vec();
        first.extend_from_slice(&frame[..60]);
        model.borrow_mut().deliver_chunks(&[first]);
        model
            .borrow_mut()
            .queue(RX)
            .inject_used(64, 10)
            .expect("inject");
        assert!(matches!(
            net.receive(),
            Err(NetError::Device {
                queue: RX,
                error: DeviceError::IdOutOfRange { id: 64, .. }
            })
        ));
        assert_eq!(net.stats().rx_packets, 0);
    });
}

#[test]
fn tx_completion_of_a_buffer_not_in_flight_is_a_device_error_on_the_send_path() {
    let frame = ipv4_frame(UDP, 100, 0, 0, 2);
    // With one frame in flight, a completion naming another descriptor (split) or buffer id
    // (packed).
    for id in [5, 40] {
        for_both_formats(|format| {
            with_frame_in_flight(format, &frame, |net, model| {
                model
                    .borrow_mut()
                    .queue(TX)
                    .inject_used(id, 0)
                    .expect("inject");
                assert!(!net.can_transmit(), "a broken queue takes nothing");
                let mut called = false;
                let result = net.transmit(frame.len(), |_| called = true);
                assert_eq!(
                    result.err(),
                    Some(NetError::Device {
                        queue: TX,
                        error: DeviceError::IdNotInFlight { queue: TX, id },
                    })
                );
                assert!(!called);
                assert!(!net.can_transmit(), "a broken queue takes nothing");
            });
        });
    }
}

#[test]
fn tx_completion_with_nothing_in_flight_is_a_device_error() {
    let frame = ipv4_frame(UDP, 100, 0, 0, 2);
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        model
            .borrow_mut()
            .queue(TX)
            .inject_used(0, 0)
            .expect("inject");
        let result = net.transmit(frame.len(), |_| ());
        // Split: any completion is a used index running ahead; packed: a used descriptor
        // where nothing was made available.
        let reported = match format {
            QueueFormat::Split => matches!(
                result,
                Err(NetError::Device {
                    queue: TX,
                    error: DeviceError::UsedIndexJumped { in_flight: 0, .. }
                })
            ),
            QueueFormat::Packed => matches!(
                result,
                Err(NetError::Device {
                    queue: TX,
                    error: DeviceError::UsedWhileIdle { queue: TX, .. }
                })
            ),
        };
        assert!(reported, "{result:?}");
    });
}

#[test]
fn tx_length_on_a_transmit_buffer_is_a_device_error() {
    let frame = ipv4_frame(UDP, 100, 0, 0, 2);
    for_both_formats(|format| {
        // Nothing in a transmit buffer is device-writable.
        with_frame_in_flight(format, &frame, |net, model| {
            net.flush().expect("flush");
            let id = {
                let mut model = model.borrow_mut();
                let queue = model.queue(TX);
                queue.pop_available(usize::MAX).expect("pop");
                queue.popped[0].id
            };
            model
                .borrow_mut()
                .queue(TX)
                .inject_used(id, 1)
                .expect("inject");
            assert_eq!(
                net.transmit(frame.len(), |_| ()).err(),
                Some(NetError::Device {
                    queue: TX,
                    error: DeviceError::LengthTooLarge {
                        queue: TX,
                        id,
                        len: 1,
                        capacity: 0,
                    },
                })
            );
        });
    });
}

#[test]
fn packed_tx_wrong_wrap_counter_is_a_device_error() {
    let frame = ipv4_frame(UDP, 100, 0, 0, 3);
    with_frame_in_flight(QueueFormat::Packed, &frame, |net, model| {
        net.flush().expect("flush");
        // Used with the wrong wrap counter (AVAIL = USED = 0 in the first lap).
        model
            .borrow_mut()
            .queue(TX)
            .inject_packed_used(0, 0, false)
            .expect("inject");
        let result = net.transmit(frame.len(), |_| ());
        assert!(
            matches!(
                result,
                Err(NetError::Device {
                    queue: TX,
                    error: DeviceError::BadWrapCounter { .. }
                })
            ),
            "{result:?}"
        );
    });
}

#[test]
fn a_broken_queue_is_recovered_by_dropping_the_driver_which_resets_first() {
    for_both_formats(|format| {
        let world = world(format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        {
            // The largest id each format's used element can carry.
            let mut model = model.borrow_mut();
            let queue = model.queue(RX);
            match format {
                QueueFormat::Split => queue.inject_split_used(u32::MAX, u32::MAX),
                QueueFormat::Packed => queue.inject_used(u16::MAX, u32::MAX),
            }
            .expect("inject");
        }
        assert!(net.receive().is_err());
        let resets = model.borrow().resets;
        drop(net);
        assert_eq!(
            model.borrow().resets,
            resets + 1,
            "reset before the memory was freed"
        );
        assert_eq!(world.dma.live_allocations(), 0);
        // A fresh driver on the same device works.
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up again");
        let frame = ipv4_frame(UDP, 10, 0, 0, 4);
        assert_eq!(super::bounce(&mut net, &model, &frame), frame);
    });
}
