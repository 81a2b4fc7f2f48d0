//! Recovery from a device failure (issue 7), the way the kernel's `KernelNic::recover`
//! (src/devices.rs) does it: traffic flows; the device breaks a queue's rules (a bad used id)
//! or sets DEVICE_NEEDS_RESET; the driver reports [`NetError::Device`] or
//! [`NetError::NeedsReset`]; the owner drops the driver, whose `Drop` resets the device before
//! any queue memory is freed; a new [`VirtioNet`] is built on the same device (a new transport
//! over the same PCI function and device model); traffic flows again, byte for byte.
//!
//! The order matters: the old driver must be dropped *before* the new one is built, because
//! its `Drop` resets the device, whoever is driving it by then
//! (`replacing_the_driver_before_dropping_the_old_one_leaves_the_new_one_without_a_device`).

use std::cell::RefCell;

use super::device::{NetModel, RX, TX, World};
use super::{Net, UDP, bits, bounce, ipv4_frame, qemu_features, raw_frame, send, small, up};
use crate::net::NetError;
use crate::queue::DeviceError;
use crate::spec::{DeviceStatus, Features};

fn both_formats() -> [u64; 2] {
    [0, bits(&[Features::RING_PACKED.bits()])]
}

/// Traffic in both directions, checked byte for byte: a UDP frame received in place, a
/// mergeable frame spread over two buffers, and a frame sent (non-IP, so that no checksum
/// offload changes it).
fn traffic(net: &mut Net<'_, '_>, model: &RefCell<NetModel<'_>>, seed: u64) {
    let frame = ipv4_frame(UDP, 200 + seed as usize, 0, 0, seed);
    assert_eq!(bounce(net, model, &frame), frame, "received frame");
    let long = ipv4_frame(UDP, 3000, 0, 0, seed + 1);
    assert_eq!(bounce(net, model, &long), long, "received mergeable frame");
    let outgoing = raw_frame(300, seed);
    let sent = send(net, model, &outgoing);
    assert_eq!(sent.frame, outgoing, "sent frame");
    assert_eq!(sent.header.flags, 0);
}

/// Whether the device was reset last (status 0 written and read back) with no queue left.
fn device_reset(world: &World, model: &RefCell<NetModel<'_>>) -> bool {
    let registers =
        world.device(|state| state.status_writes.last() == Some(&0) && state.status == 0);
    let model = model.borrow();
    registers && !model.has_queue(RX) && !model.has_queue(TX)
}

/// A used entry naming buffer id 999 at the device's next used position on `queue`.
fn inject_bad_id(model: &RefCell<NetModel<'_>>, queue: u16, packed: bool) {
    let mut model = model.borrow_mut();
    let device = model.queue(queue);
    if packed {
        // The first lap: used descriptors carry wrap counter 1.
        device.inject_packed_used(999, 64, true).expect("inject");
    } else {
        device.inject_split_used(999, 64).expect("inject");
    }
}

#[test]
fn a_bad_used_id_is_a_device_error_and_a_rebuilt_driver_carries_traffic_again() {
    for format in both_formats() {
        let packed = format != 0;
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        traffic(&mut net, &model, 1);

        inject_bad_id(&model, RX, packed);
        let error = net.receive().err();
        let Some(NetError::Device {
            queue: RX,
            error: DeviceError::IdOutOfRange { id: 999, .. },
        }) = error
        else {
            panic!("packed {packed}: expected a device error on the receive queue, got {error:?}");
        };
        assert_eq!(net.receive().err(), error, "the queue stays broken");
        let resets = model.borrow().resets;

        // The owner's recovery: drop (reset, then free), then build anew on the same device.
        drop(net);
        assert_eq!(
            model.borrow().resets,
            resets + 1,
            "dropping the driver resets"
        );
        assert!(device_reset(&world, &model), "packed {packed}");
        assert_eq!(world.dma.live_allocations(), 0, "all driver memory freed");

        let mut net = up(&world, &model, small()).expect("up again");
        assert!(world.device(|state| state.status & DeviceStatus::DRIVER_OK.bits() != 0));
        assert_eq!(net.stats().rx_packets, 0, "a new driver, new counters");
        for seed in 2..6 {
            traffic(&mut net, &model, seed);
        }
        let stats = net.stats();
        assert_eq!((stats.rx_packets, stats.tx_packets), (8, 4));
        assert_eq!(stats.rx_malformed, 0);
    }
}

#[test]
fn a_bad_used_id_on_the_transmit_queue_is_recovered_the_same_way() {
    for format in both_formats() {
        let packed = format != 0;
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        traffic(&mut net, &model, 1);
        model.borrow_mut().tx_auto = false;
        let frame = raw_frame(100, 9);
        let queued = net
            .transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame))
            .expect("transmit");
        assert_eq!(queued, Some(()));
        inject_bad_id(&model, TX, packed);
        let error = net.transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame));
        assert!(
            matches!(
                error,
                Err(NetError::Device {
                    queue: TX,
                    error: DeviceError::IdOutOfRange { id: 999, .. }
                })
            ),
            "packed {packed}: {error:?}"
        );

        drop(net);
        assert!(device_reset(&world, &model), "packed {packed}");
        assert_eq!(world.dma.live_allocations(), 0);
        model.borrow_mut().tx_auto = true;
        let mut net = up(&world, &model, small()).expect("up again");
        traffic(&mut net, &model, 2);
    }
}

#[test]
fn device_needs_reset_is_reported_and_a_rebuilt_driver_carries_traffic_again() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        traffic(&mut net, &model, 1);

        world.device(|state| state.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits());
        assert_eq!(net.handle_config_change(), Err(NetError::NeedsReset));
        assert_eq!(net.handle_config_change(), Err(NetError::NeedsReset));

        drop(net);
        assert!(device_reset(&world, &model));
        assert!(
            world.device(|state| state.status & DeviceStatus::DEVICE_NEEDS_RESET.bits() == 0),
            "the reset cleared DEVICE_NEEDS_RESET"
        );
        assert_eq!(world.dma.live_allocations(), 0);

        let mut net = up(&world, &model, small()).expect("up again");
        assert_eq!(net.handle_config_change(), Ok(None), "healthy again");
        for seed in 2..4 {
            traffic(&mut net, &model, seed);
        }
    }
}

#[test]
fn recovery_can_be_repeated() {
    let world = World::new(qemu_features());
    let model = world.model();
    for round in 0..5 {
        let mut net = up(&world, &model, small()).expect("up");
        traffic(&mut net, &model, round);
        if round % 2 == 0 {
            inject_bad_id(&model, RX, false);
            assert!(matches!(
                net.receive(),
                Err(NetError::Device { queue: RX, .. })
            ));
        } else {
            world.device(|state| state.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits());
            assert_eq!(net.handle_config_change(), Err(NetError::NeedsReset));
        }
        drop(net);
        assert!(device_reset(&world, &model), "round {round}");
        assert_eq!(world.dma.live_allocations(), 0, "round {round}");
    }
}

/// Documents why the owner must drop first: if the replacement is brought up while the old
/// driver still exists, dropping the old one afterwards resets the device under the new one
/// (status 0, every queue gone), and the new driver is left driving nothing.
#[test]
fn replacing_the_driver_before_dropping_the_old_one_leaves_the_new_one_without_a_device() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut old = up(&world, &model, small()).expect("up");
    traffic(&mut old, &model, 1);
    inject_bad_id(&model, RX, false);
    assert!(old.receive().is_err());

    let new = up(&world, &model, small()).expect("the replacement comes up");
    assert!(world.device(|state| state.status & DeviceStatus::DRIVER_OK.bits() != 0));
    drop(old);
    assert!(
        device_reset(&world, &model),
        "the old driver's Drop reset the device the new driver had just set up"
    );
    drop(new);
}
