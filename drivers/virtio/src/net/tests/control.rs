//! The control queue's MQ command (§5.1.6.5, §5.1.6.5.6), link status and configuration
//! changes (§5.1.4, §4.1.4.5), DEVICE_NEEDS_RESET (§2.1.2) and MSI-X vector refusal
//! (§4.1.5.1.2).

use super::device::{CtrlReply, RX, TX, World};
use super::{UDP, bits, bounce, ipv4_frame, qemu_features, small, up};
use crate::error::TransportError;
use crate::net::{LinkChange, NetError, NetOptions, NetVectors};
use crate::spec::{self, Features, NetFeatures, net_config};
use crate::transport::Transport;

fn mq_world() -> World {
    World::new(qemu_features() | bits(&[NetFeatures::MQ.bits()]))
}

/// Whether the last status write was a reset (0).
fn reset_last(world: &World) -> bool {
    world.device(|state| state.status_writes.last() == Some(&0) && state.status == 0)
}

#[test]
fn mq_pairs_command_acked_ok_brings_the_device_up() {
    for format in [0, bits(&[Features::RING_PACKED.bits()])] {
        let world = World::new(qemu_features() | bits(&[NetFeatures::MQ.bits()]) | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        {
            let model = model.borrow();
            let mq: Vec<_> = model
                .ctrl_commands
                .iter()
                .filter(|command| command.class == 4)
                .collect();
            assert_eq!(mq.len(), 1);
            let command = mq[0];
            assert_eq!((command.class, command.command), (4, 0));
            assert_eq!(command.data, [1, 0]);
            assert_eq!(
                model.doorbells.get(&2),
                Some(&(model.ctrl_commands.len() as u64)),
                "one control doorbell per command"
            );
        }
        assert_eq!(
            world.dma.delayed_us(),
            0,
            "an immediate ack needs no waiting"
        );
        let frame = ipv4_frame(UDP, 80, 0, 0, 1);
        assert_eq!(bounce(&mut net, &model, &frame), frame);
    }
}

#[test]
fn mq_pairs_command_acked_with_an_error_is_a_control_error_and_the_device_is_reset() {
    let world = mq_world();
    let model = world.model();
    model.borrow_mut().ctrl_reply = CtrlReply::Ack(1);
    let error = up(&world, &model, small()).expect_err("refused");
    assert_eq!(
        error,
        NetError::Control {
            class: 4,
            command: 0,
            ack: Some(1)
        }
    );
    assert_eq!(error.to_string(), "control command 4.0 refused (ack 1)");
    assert_eq!(model.borrow().ctrl_commands.len(), 1);
    assert!(reset_last(&world), "reset before the queues were freed");
    assert_eq!(world.dma.live_allocations(), 0, "nothing leaked");
}

#[test]
fn mq_pairs_command_never_acked_times_out_without_hanging() {
    let world = mq_world();
    let model = world.model();
    model.borrow_mut().ctrl_reply = CtrlReply::Silent;
    let options = NetOptions {
        ctrl_timeout_us: 5_000,
        ..small()
    };
    let error = up(&world, &model, options).expect_err("timed out");
    assert_eq!(
        error,
        NetError::Control {
            class: 4,
            command: 0,
            ack: None
        }
    );
    assert_eq!(error.to_string(), "control command 4.0 timed out");
    assert_eq!(world.dma.delayed_us(), 5_000, "waited exactly the timeout");
    assert_eq!(
        model.borrow().ctrl_commands.len(),
        1,
        "the command was sent"
    );
    assert!(reset_last(&world));
    assert_eq!(world.dma.live_allocations(), 0);
}

fn set_link(world: &World, up: bool) {
    let at = net_config::STATUS as usize;
    let value = if up { net_config::STATUS_LINK_UP } else { 0 };
    world.device(|state| {
        state.device_config[at..at + 2].copy_from_slice(&value.to_le_bytes());
        state.generation = state.generation.wrapping_add(1);
        state.isr |= crate::spec::IsrStatus::DEVICE_CONFIG.bits();
    });
}

#[test]
fn link_status_changes_are_reported_on_config_change() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert!(net.link_up());
    assert_eq!(net.handle_config_change(), Ok(None), "nothing changed");
    set_link(&world, false);
    let isr = net.transport().read_isr();
    assert!(isr.config_changed() && !isr.queue_interrupt());
    assert_eq!(net.handle_config_change(), Ok(Some(LinkChange::Down)));
    assert!(!net.link_up());
    assert_eq!(net.handle_config_change(), Ok(None), "reported once");
    set_link(&world, true);
    assert!(net.transport().read_isr().config_changed());
    assert_eq!(net.handle_config_change(), Ok(Some(LinkChange::Up)));
    assert!(net.link_up());
    assert_eq!(net.stats().config_changes, 4);
}

#[test]
fn a_link_down_at_start_is_seen_and_without_status_the_link_is_always_up() {
    let world = World::new(qemu_features());
    set_link(&world, false);
    let model = world.model();
    let net = up(&world, &model, small()).expect("up");
    assert!(!net.link_up());
    drop(net);

    let world = World::new(qemu_features() & !bits(&[NetFeatures::STATUS.bits()]));
    set_link(&world, false);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert!(
        net.link_up(),
        "no VIRTIO_NET_F_STATUS: assume up (§5.1.4.2)"
    );
    set_link(&world, true);
    set_link(&world, false);
    assert_eq!(net.handle_config_change(), Ok(None));
    assert!(net.link_up());
}

#[test]
fn device_needs_reset_is_reported_by_handle_config_change() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    world.device(|state| {
        state.status |= crate::spec::DeviceStatus::DEVICE_NEEDS_RESET.bits();
        state.isr |= crate::spec::IsrStatus::DEVICE_CONFIG.bits();
    });
    assert_eq!(net.handle_config_change(), Err(NetError::NeedsReset));
    assert_eq!(
        NetError::NeedsReset.to_string(),
        "the device set DEVICE_NEEDS_RESET"
    );
    // Reported on every call until the driver resets (drops and rebuilds) the device.
    assert_eq!(net.handle_config_change(), Err(NetError::NeedsReset));
    drop(net);
    assert!(reset_last(&world));
    assert_eq!(world.dma.live_allocations(), 0);
}

#[test]
fn vectors_are_programmed_and_a_refused_vector_is_a_typed_transport_error() {
    // Accepted: three vectors on a device with three.
    let world = World::new(qemu_features());
    let model = world.model();
    let vectors = NetVectors {
        config: Some(2),
        rx: Some(0),
        tx: Some(1),
    };
    let net = up(&world, &model, NetOptions { vectors, ..small() }).expect("up");
    assert_eq!(net.vectors(), vectors);
    world.device(|state| {
        assert_eq!(state.config_vector, 2);
        assert_eq!(state.queues[&RX].vector, 0);
        assert_eq!(state.queues[&TX].vector, 1);
        assert_eq!(
            state.queues[&2].vector,
            spec::NO_VECTOR,
            "control queue: none"
        );
    });
    drop(net);

    // Refused (NO_VECTOR read back): a queue's vector, then the config vector.
    let cases = [
        (
            NetVectors {
                config: Some(0),
                rx: Some(3),
                tx: Some(1),
            },
            TransportError::VectorRefused {
                queue: Some(RX),
                vector: 3,
            },
        ),
        (
            NetVectors {
                config: Some(0),
                rx: Some(1),
                tx: Some(7),
            },
            TransportError::VectorRefused {
                queue: Some(TX),
                vector: 7,
            },
        ),
        (
            NetVectors {
                config: Some(5),
                rx: Some(0),
                tx: Some(1),
            },
            TransportError::VectorRefused {
                queue: None,
                vector: 5,
            },
        ),
    ];
    for (vectors, expected) in cases {
        let world = World::new(qemu_features());
        let model = world.model();
        let error = up(&world, &model, NetOptions { vectors, ..small() }).expect_err("refused");
        assert_eq!(error, NetError::Transport(expected));
        assert_eq!(
            world.dma.live_allocations(),
            0,
            "{expected:?}: nothing leaked"
        );
    }

    // With no MSI-X vectors at all (QEMU `vectors=0`) every vector is refused; none works.
    let world = World::new(qemu_features());
    world.device(|state| state.nvectors = 0);
    let model = world.model();
    let vectors = NetVectors {
        config: None,
        rx: Some(0),
        tx: None,
    };
    let error = up(&world, &model, NetOptions { vectors, ..small() }).expect_err("refused");
    assert_eq!(
        error,
        NetError::Transport(TransportError::VectorRefused {
            queue: Some(RX),
            vector: 0
        })
    );
    let model = world.model();
    let net = up(&world, &model, small()).expect("no vectors: polling or INTx");
    assert_eq!(net.vectors(), NetVectors::default());
}
