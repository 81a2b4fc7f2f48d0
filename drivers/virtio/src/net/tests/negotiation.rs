//! Feature negotiation (§5.1.3, §6): what is negotiated for each offer that matters, and that
//! the driver then behaves accordingly (buffer sizes, offloads, queue layout, control queue,
//! notification suppression, indirect descriptors).

use super::device::{RX, TX, World};
use super::{ICMP, TCP, UDP, bits, bounce, ipv4_frame, qemu_features, send, small, up};
use crate::error::TransportError;
use crate::net::{DRIVER_FEATURES, HDR_F_NEEDS_CSUM, NetError, NetOptions, buffer_len_for_mtu};
use crate::queue::QueueFormat;
use crate::queue::fake::KickRequest;
use crate::spec::{DeviceStatus, Features, NetFeatures, net_config};

const VERSION_1: u64 = Features::VERSION_1.bits();

fn set_mtu(world: &World, mtu: u16) {
    let at = net_config::MTU as usize;
    world.device(|state| state.device_config[at..at + 2].copy_from_slice(&mtu.to_le_bytes()));
}

fn set_max_pairs(world: &World, pairs: u16) {
    let at = net_config::MAX_VIRTQUEUE_PAIRS as usize;
    world.device(|state| {
        state.device_config[at..at + 2].copy_from_slice(&pairs.to_le_bytes());
        // Two queues per pair plus the control queue.
        let queues = usize::from(pairs.clamp(1, 64)) * 2 + 1;
        state.queue_max_sizes = vec![256; queues];
    });
}

#[test]
fn negotiates_every_offered_feature_the_driver_supports_and_nothing_else() {
    let extras = bits(&[
        Features::RING_PACKED.bits(),
        Features::ACCESS_PLATFORM.bits(),
        NetFeatures::MQ.bits(),
        NetFeatures::CTRL_RX_EXTRA.bits(),
        NetFeatures::CTRL_MAC_ADDR.bits(),
        Features::IN_ORDER.bits(),
        Features::NOTIFICATION_DATA.bits(),
        NetFeatures::CTRL_VLAN.bits(),
    ]);
    let offered = qemu_features() | extras;
    let world = World::new(offered);
    let model = world.model();
    let net = up(&world, &model, small()).expect("up");
    assert_eq!(net.offered_features(), offered);
    assert_eq!(
        net.features(),
        DRIVER_FEATURES,
        "all supported bits, no others"
    );
    let written = world.device(|state| {
        u64::from(state.driver_features[0]) | (u64::from(state.driver_features[1]) << 32)
    });
    assert_eq!(written, DRIVER_FEATURES, "what the device register holds");
    assert_eq!(model.borrow().features(), DRIVER_FEATURES);
    assert_eq!(net.mac(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
}

#[test]
fn version_1_missing_is_refused_with_a_typed_error_and_the_device_marked_failed() {
    let offered = qemu_features() & !bits(&[VERSION_1]);
    let world = World::new(offered);
    let model = world.model();
    let error = up(&world, &model, small()).expect_err("a legacy-only device");
    assert_eq!(
        error,
        NetError::Transport(TransportError::Version1NotOffered {
            device_features: offered
        })
    );
    let writes = world.device(|state| state.status_writes.clone());
    assert!(
        writes
            .last()
            .is_some_and(|w| w & DeviceStatus::FAILED.bits() != 0),
        "{writes:?}"
    );
    assert!(!model.borrow().has_queue(RX), "no queue was set up");
    assert_eq!(world.dma.live_allocations(), 0);
}

#[test]
fn mrg_rxbuf_off_posts_buffers_for_the_whole_mtu_and_ignores_num_buffers() {
    let world = World::new(bits(&[VERSION_1, NetFeatures::MTU.bits()]));
    set_mtu(&world, 9000);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert_eq!(net.features() & bits(&[NetFeatures::MRG_RXBUF.bits()]), 0);
    let capacities = model.borrow_mut().rx_capacities();
    assert_eq!(capacities.len(), 64);
    assert!(
        capacities
            .iter()
            .all(|&c| c as usize == buffer_len_for_mtu(9000) && c as usize >= 12 + 14 + 9000),
        "{capacities:?}"
    );
    // A 9014-byte frame in one buffer, num_buffers 0 (the device need not set it).
    let jumbo = ipv4_frame(UDP, 9000 - 28, 0, 0, 1);
    assert_eq!(jumbo.len(), 9014);
    assert_eq!(bounce(&mut net, &model, &jumbo), jumbo);
    // Without MRG_RXBUF a nonsensical num_buffers is not looked at.
    let frame = ipv4_frame(UDP, 100, 0, 0, 2);
    model
        .borrow_mut()
        .deliver_split(Default::default(), &frame, &[12 + frame.len()], 7);
    let received = net.receive().expect("receive").expect("frame");
    assert_eq!(received.bytes(), frame.as_slice());
    net.recycle(received).expect("recycle");
    assert_eq!(net.stats().rx_malformed, 0);
    assert_eq!(net.stats().rx_merged, 0);
}

#[test]
fn mrg_rxbuf_on_reads_num_buffers() {
    let world = World::new(bits(&[VERSION_1, NetFeatures::MRG_RXBUF.bits()]));
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert_ne!(net.features() & bits(&[NetFeatures::MRG_RXBUF.bits()]), 0);
    let frame = ipv4_frame(UDP, 400, 0, 0, 3);
    model.borrow_mut().deliver_split(
        Default::default(),
        &frame,
        &[200, 12 + frame.len() - 200],
        2,
    );
    let received = net.receive().expect("receive").expect("frame");
    assert_eq!(received.bytes(), frame.as_slice());
    net.recycle(received).expect("recycle");
    assert_eq!(net.stats().rx_merged, 1);
}

#[test]
fn csum_and_guest_csum_are_negotiated_independently_and_steer_transmit_offload() {
    for (csum, guest_csum) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut offered = bits(&[VERSION_1]);
        if csum {
            offered |= bits(&[NetFeatures::CSUM.bits()]);
        }
        if guest_csum {
            offered |= bits(&[NetFeatures::GUEST_CSUM.bits()]);
        }
        let world = World::new(offered);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        assert_eq!(net.features(), offered);
        assert_eq!(net.tx_checksum_offload(), csum);
        assert_eq!(net.rx_checksum_offload(), guest_csum);
        let frame = ipv4_frame(TCP, 100, 0, 0, 4);
        let sent = send(&mut net, &model, &frame);
        let expected = if csum { HDR_F_NEEDS_CSUM } else { 0 };
        assert_eq!(
            sent.header.flags, expected,
            "csum {csum} guest_csum {guest_csum}"
        );
        if !csum {
            assert_eq!(sent.frame, frame, "untouched without CSUM");
        }
        assert_eq!(net.stats().tx_checksum_offloaded, u64::from(csum));
    }
}

#[test]
fn mtu_comes_from_config_only_when_offered_allowed_and_sane() {
    // (offered, allowed, config mtu, expected)
    let cases = [
        (true, true, 1400, 1400),
        (true, true, 9000, 9000),
        (true, true, 68, 68),
        (true, true, 65535, 65535),
        (true, true, 67, 1500),
        (true, true, 0, 1500),
        (false, true, 1400, 1500),
        (true, false, 1400, 1500),
    ];
    for (offered, allowed, config, expected) in cases {
        let mut features = bits(&[VERSION_1, NetFeatures::MRG_RXBUF.bits()]);
        if offered {
            features |= bits(&[NetFeatures::MTU.bits()]);
        }
        let world = World::new(features);
        set_mtu(&world, config);
        let model = world.model();
        let mut options = NetOptions {
            rx_queue_size: 4,
            tx_queue_size: 4,
            drop_foreign: false,
            ..NetOptions::default()
        };
        if !allowed {
            options.allowed_features &= !bits(&[NetFeatures::MTU.bits()]);
        }
        let net = up(&world, &model, options).expect("up");
        let negotiated = net.features() & bits(&[NetFeatures::MTU.bits()]) != 0;
        assert_eq!(negotiated, offered && allowed);
        assert_eq!(
            net.mtu(),
            expected,
            "offered {offered} allowed {allowed} mtu {config}"
        );
        assert_eq!(net.max_frame(), usize::from(expected) + 14);
        let capacities = model.borrow_mut().rx_capacities();
        assert!(
            capacities
                .iter()
                .all(|&c| c as usize == buffer_len_for_mtu(expected)),
            "mtu {config}: {capacities:?}"
        );
    }
}

#[test]
fn mq_with_ctrl_vq_puts_the_control_queue_after_all_pairs_and_sets_one_pair() {
    let world = World::new(bits(&[
        VERSION_1,
        NetFeatures::CTRL_VQ.bits(),
        NetFeatures::MQ.bits(),
    ]));
    set_max_pairs(&world, 4);
    let model = world.model();
    let net = up(&world, &model, small()).expect("up");
    assert_eq!(
        net.features(),
        bits(&[
            VERSION_1,
            NetFeatures::CTRL_VQ.bits(),
            NetFeatures::MQ.bits()
        ])
    );
    let model = model.borrow();
    assert_eq!(
        model.ctrl_queue,
        Some(8),
        "control queue is 2 * max_virtqueue_pairs"
    );
    assert!((2..8).all(|index| !model.has_queue(index)), "one pair only");
    assert_eq!(model.ctrl_commands.len(), 1);
    let command = &model.ctrl_commands[0];
    assert_eq!((command.queue, command.class, command.command), (8, 4, 0));
    assert_eq!(
        command.data,
        1u16.to_le_bytes(),
        "virtqueue_pairs = 1, le16"
    );
    assert!(command.ack_capacity >= 1);
    assert!(command.after_driver_ok, "sent once the device is live");
}

#[test]
fn mq_without_ctrl_vq_is_not_negotiated() {
    let world = World::new(bits(&[VERSION_1, NetFeatures::MQ.bits()]));
    set_max_pairs(&world, 4);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert_eq!(net.features(), bits(&[VERSION_1]));
    assert_eq!(model.borrow().ctrl_queue, None);
    let frame = ipv4_frame(UDP, 60, 0, 0, 5);
    assert_eq!(send(&mut net, &model, &frame).frame, frame);
    assert_eq!(bounce(&mut net, &model, &frame), frame);
}

#[test]
fn mq_is_dropped_when_the_caller_disallows_ctrl_vq() {
    let world = World::new(bits(&[
        VERSION_1,
        NetFeatures::CTRL_VQ.bits(),
        NetFeatures::MQ.bits(),
    ]));
    set_max_pairs(&world, 2);
    let model = world.model();
    let options = NetOptions {
        allowed_features: DRIVER_FEATURES & !bits(&[NetFeatures::CTRL_VQ.bits()]),
        ..small()
    };
    let net = up(&world, &model, options).expect("up");
    assert_eq!(
        net.features(),
        bits(&[VERSION_1]),
        "MQ depends on CTRL_VQ (§5.1.3.1)"
    );
    assert_eq!(model.borrow().ctrl_queue, None);
}

#[test]
fn ctrl_vq_without_mq_sets_up_the_control_queue_at_2_and_sends_no_command() {
    let world = World::new(bits(&[VERSION_1, NetFeatures::CTRL_VQ.bits()]));
    let model = world.model();
    let net = up(&world, &model, small()).expect("up");
    assert_eq!(
        net.features(),
        bits(&[VERSION_1, NetFeatures::CTRL_VQ.bits()])
    );
    assert_eq!(model.borrow().ctrl_queue, Some(2));
    assert!(model.borrow().ctrl_commands.is_empty());
}

#[test]
fn mq_with_an_out_of_range_max_pairs_uses_one_pair() {
    for pairs in [0u16, 0x8001, 0xffff] {
        let world = World::new(bits(&[
            VERSION_1,
            NetFeatures::CTRL_VQ.bits(),
            NetFeatures::MQ.bits(),
        ]));
        set_max_pairs(&world, pairs);
        let model = world.model();
        let _net = up(&world, &model, small()).expect("up");
        assert_eq!(
            model.borrow().ctrl_queue,
            Some(2),
            "max_virtqueue_pairs {pairs}"
        );
        assert_eq!(model.borrow().ctrl_commands.len(), 1);
    }
}

#[test]
fn ring_packed_is_used_exactly_when_offered_and_allowed_and_carries_traffic() {
    for (offered, allowed) in [(true, true), (true, false), (false, true)] {
        let mut features = qemu_features();
        if offered {
            features |= bits(&[Features::RING_PACKED.bits()]);
        }
        let world = World::new(features);
        let model = world.model();
        let mut options = small();
        if !allowed {
            options.allowed_features &= !bits(&[Features::RING_PACKED.bits()]);
        }
        let mut net = up(&world, &model, options).expect("up");
        let packed = offered && allowed;
        let expected = if packed {
            QueueFormat::Packed
        } else {
            QueueFormat::Split
        };
        assert_eq!(net.rx.format(), expected);
        assert_eq!(net.tx.format(), expected);
        assert_eq!(format!("{net:?}").contains("packed"), packed);
        let frame = ipv4_frame(UDP, 300, 0, 0, 6);
        assert_eq!(bounce(&mut net, &model, &frame), frame);
        let tcp = ipv4_frame(TCP, 300, 0, 0, 7);
        assert_eq!(send(&mut net, &model, &tcp).header.flags, HDR_F_NEEDS_CSUM);
    }
}

/// Sends one frame with the transmit side stalled; returns whether a doorbell was written.
fn kicked_by_one_send(
    net: &mut super::Net<'_, '_>,
    world: &World,
    model: &std::cell::RefCell<super::device::NetModel<'_>>,
) -> bool {
    let before = world.doorbells();
    let tx_before = model.borrow().doorbells.get(&TX).copied().unwrap_or(0);
    let frame = ipv4_frame(ICMP, 20, 0, 0, 8);
    let sent = net
        .transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame))
        .expect("transmit");
    assert_eq!(sent, Some(()));
    net.flush().expect("flush");
    let kicked = world.doorbells() > before;
    let tx_after = model.borrow().doorbells.get(&TX).copied().unwrap_or(0);
    assert_eq!(
        tx_after > tx_before,
        kicked,
        "the doorbell was the transmit queue's"
    );
    kicked
}

#[test]
fn without_event_idx_no_notify_flag_suppresses_kicks_and_with_it_avail_event_places_them() {
    for format_bits in [0, bits(&[Features::RING_PACKED.bits()])] {
        // No EVENT_IDX: the device's "don't notify" (VIRTQ_USED_F_NO_NOTIFY, or
        // RING_EVENT_FLAGS_DISABLE for packed) is honoured, and lifting it brings kicks back.
        let world = World::new(bits(&[VERSION_1]) | format_bits);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        assert_eq!(net.features() & bits(&[Features::EVENT_IDX.bits()]), 0);
        model.borrow_mut().tx_auto = false;
        model
            .borrow_mut()
            .queue(TX)
            .request_kicks(KickRequest::Never)
            .expect("request");
        let suppressed = net.stats().kicks_suppressed;
        assert!(!kicked_by_one_send(&mut net, &world, &model));
        assert!(!kicked_by_one_send(&mut net, &world, &model));
        assert_eq!(net.stats().kicks_suppressed, suppressed + 2);
        model
            .borrow_mut()
            .queue(TX)
            .request_kicks(KickRequest::Always)
            .expect("request");
        assert!(kicked_by_one_send(&mut net, &world, &model));

        // EVENT_IDX: the device asks to hear about the third buffer from now only.
        let world = World::new(bits(&[VERSION_1, Features::EVENT_IDX.bits()]) | format_bits);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        assert_ne!(net.features() & bits(&[Features::EVENT_IDX.bits()]), 0);
        model.borrow_mut().tx_auto = false;
        let published = model.borrow_mut().queue(TX).published().expect("published");
        model
            .borrow_mut()
            .queue(TX)
            .request_kicks(KickRequest::At(published + 2))
            .expect("request");
        let kicks: Vec<bool> = (0..4)
            .map(|_| kicked_by_one_send(&mut net, &world, &model))
            .collect();
        assert_eq!(
            kicks,
            [false, false, true, false],
            "packed: {}",
            format_bits != 0
        );
        assert_eq!(
            net.stats().kicks,
            world.doorbells() as u64,
            "every doorbell counted"
        );
    }
}

#[test]
fn receive_interrupts_follow_arm_and_disarm_and_transmit_completions_raise_none() {
    for extra in [
        0,
        bits(&[Features::EVENT_IDX.bits()]),
        bits(&[Features::RING_PACKED.bits()]),
        bits(&[Features::RING_PACKED.bits(), Features::EVENT_IDX.bits()]),
    ] {
        let world = World::new(bits(&[VERSION_1]) | extra);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let frame = ipv4_frame(UDP, 50, 0, 0, 9);
        let interrupts = |model: &std::cell::RefCell<super::device::NetModel<'_>>| {
            model.borrow_mut().queue(RX).interrupts
        };
        // Armed at start-up: a frame raises one.
        model.borrow_mut().deliver(Default::default(), &frame);
        assert_eq!(interrupts(&model), 1, "features {extra:#x}");
        // Disarmed: none, and arming again reports the frames already waiting.
        net.disarm_rx_interrupt();
        model.borrow_mut().deliver(Default::default(), &frame);
        assert_eq!(interrupts(&model), 1);
        assert!(
            net.arm_rx_interrupt(),
            "frames are pending: poll before waiting"
        );
        while let Some(received) = net.receive().expect("receive") {
            net.recycle(received).expect("recycle");
        }
        net.flush().expect("flush");
        assert!(!net.arm_rx_interrupt(), "empty ring: safe to wait");
        model.borrow_mut().deliver(Default::default(), &frame);
        assert_eq!(interrupts(&model), 2);
        // Transmit completions are reclaimed on the send path, never interrupted for.
        for seed in 0..10 {
            send(&mut net, &model, &ipv4_frame(UDP, 10, 0, 0, seed));
        }
        assert_eq!(model.borrow_mut().queue(TX).interrupts, 0);
    }
}

#[test]
fn indirect_desc_carries_the_two_part_control_command_in_one_slot() {
    for indirect in [false, true] {
        let mut features = bits(&[
            VERSION_1,
            NetFeatures::CTRL_VQ.bits(),
            NetFeatures::MQ.bits(),
        ]);
        if indirect {
            features |= bits(&[Features::INDIRECT_DESC.bits()]);
        }
        let world = World::new(features);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        {
            let model = model.borrow();
            let command = &model.ctrl_commands[0];
            assert_eq!(command.indirect, indirect);
            assert_eq!(command.slots, if indirect { 1 } else { 2 });
        }
        // Single-segment frames never go through a table.
        let frame = ipv4_frame(UDP, 64, 0, 0, 10);
        assert_eq!(send(&mut net, &model, &frame).elements, 1);
        assert_eq!(net.tx.stats().indirect_buffers, 0);
        assert_eq!(net.rx.stats().indirect_buffers, 0);
    }
}

#[test]
fn every_combination_of_optional_features_negotiates_consistently_and_passes_traffic() {
    let optional = [
        NetFeatures::MRG_RXBUF.bits(),
        NetFeatures::CSUM.bits(),
        NetFeatures::GUEST_CSUM.bits(),
        NetFeatures::MTU.bits(),
        NetFeatures::MAC.bits(),
        NetFeatures::STATUS.bits(),
        NetFeatures::CTRL_VQ.bits(),
        NetFeatures::MQ.bits(),
        Features::EVENT_IDX.bits(),
        Features::INDIRECT_DESC.bits(),
        Features::RING_PACKED.bits(),
    ];
    let mut combinations = 0;
    for mask in 0u32..1 << optional.len() {
        combinations += 1;
        let chosen: Vec<u64> = (0..optional.len())
            .filter(|&bit| mask & (1 << bit) != 0)
            .map(|bit| optional[bit])
            .collect();
        let offered = bits(&[VERSION_1]) | bits(&chosen);
        let has = |mask: u64| offered & mask != 0;
        let world = World::new(offered);
        set_mtu(&world, 1400);
        let model = world.model();
        let options = NetOptions {
            rx_queue_size: 8,
            tx_queue_size: 8,
            drop_foreign: false,
            ..NetOptions::default()
        };
        let mut net = up(&world, &model, options).expect("up");
        let mut expected = offered;
        if !has(NetFeatures::CTRL_VQ.bits()) {
            expected &= !bits(&[NetFeatures::MQ.bits()]);
        }
        assert_eq!(net.features(), expected, "offered {offered:#x}");
        let format = if has(Features::RING_PACKED.bits()) {
            QueueFormat::Packed
        } else {
            QueueFormat::Split
        };
        assert_eq!(net.rx.format(), format);
        assert_eq!(
            net.mtu(),
            if has(NetFeatures::MTU.bits()) {
                1400
            } else {
                1500
            }
        );
        let mac = if has(NetFeatures::MAC.bits()) {
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        } else {
            NetOptions::default().fallback_mac
        };
        assert_eq!(net.mac(), mac);
        assert!(net.link_up());
        let ctrl = has(NetFeatures::CTRL_VQ.bits());
        assert_eq!(model.borrow().ctrl_queue.is_some(), ctrl);
        let mq = ctrl && has(NetFeatures::MQ.bits());
        assert_eq!(model.borrow().ctrl_commands.len(), usize::from(mq));
        let tcp = ipv4_frame(TCP, 200, 0, 0, u64::from(mask));
        let sent = send(&mut net, &model, &tcp);
        let offload = has(NetFeatures::CSUM.bits());
        assert_eq!(sent.header.flags == HDR_F_NEEDS_CSUM, offload);
        let udp = ipv4_frame(UDP, 1000, 0, 0, u64::from(mask));
        assert_eq!(bounce(&mut net, &model, &udp), udp, "offered {offered:#x}");
        drop(net);
        assert_eq!(world.dma.live_allocations(), 0, "offered {offered:#x}");
    }
    assert_eq!(combinations, 2048);
}

#[test]
fn guest_tso4_is_taken_only_with_guest_csum_and_mergeable_buffers() {
    let tso = NetFeatures::GUEST_TSO4.bits();
    let world = World::new(qemu_features());
    let model = world.model();
    let net = up(&world, &model, small()).expect("up");
    assert_eq!(net.features() & tso, tso, "offered with both: negotiated");
    for missing in [
        NetFeatures::GUEST_CSUM.bits(),
        NetFeatures::MRG_RXBUF.bits(),
    ] {
        let world = World::new(qemu_features() & !missing);
        let model = world.model();
        let net = up(&world, &model, small()).expect("up");
        assert_eq!(
            net.features() & tso,
            0,
            "without {missing:#x} the driver must not take large segments"
        );
    }
}

#[test]
fn with_guest_tso4_a_64_kib_segment_arrives_whole_in_one_large_buffer() {
    use crate::net::{LARGE_RX_BUFFER_LEN, LARGE_RX_BUFFERS};
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert_ne!(net.features() & NetFeatures::GUEST_TSO4.bits(), 0);
    let capacities = model.borrow_mut().rx_capacities();
    assert_eq!(capacities.len(), 64);
    assert!(
        capacities
            .iter()
            .all(|&c| c as usize == LARGE_RX_BUFFER_LEN && c as usize >= 12 + 4 + 14 + 65535),
        "{capacities:?}"
    );
    // The largest segment the device may send: an IPv4 packet of 65535 bytes.
    let segment = ipv4_frame(TCP, 65535 - 40, 0, 0, 9);
    assert_eq!(segment.len(), 14 + 65535);
    assert_eq!(bounce(&mut net, &model, &segment), segment);
    assert_eq!(
        net.stats().rx_merged,
        0,
        "handed up in place, not copied together"
    );
    drop(net);
    assert_eq!(world.dma.live_allocations(), 0);

    // A large ring gets at most LARGE_RX_BUFFERS of them (not 1024 × 64 KiB).
    let world = World::new(qemu_features());
    world.device(|state| state.queue_max_sizes = vec![1024, 256, 64]);
    let model = world.model();
    let net = up(
        &world,
        &model,
        NetOptions {
            rx_queue_size: 1024,
            ..small()
        },
    )
    .expect("up");
    assert_eq!(net.queue_sizes().0, 1024);
    assert_eq!(model.borrow_mut().rx_capacities().len(), LARGE_RX_BUFFERS);
    assert_eq!(net.rx_buffers(), (LARGE_RX_BUFFERS, LARGE_RX_BUFFER_LEN));
    drop(net);
}

#[test]
fn a_guest_without_memory_for_large_receive_buffers_takes_segments_as_mergeable_chains() {
    let world = World::new(qemu_features());
    // 64 large buffers would take 1025 pages: refuse anything over 1024.
    world.dma.limit_allocations(1024);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up without the large pool");
    assert_ne!(net.features() & NetFeatures::GUEST_TSO4.bits(), 0);
    assert_eq!(net.rx_buffers(), (64, buffer_len_for_mtu(1500)));
    let segment = ipv4_frame(TCP, 65535 - 40, 0, 0, 10);
    assert_eq!(bounce(&mut net, &model, &segment), segment);
    assert_eq!(net.stats().rx_merged, 1, "copied together from a chain");
    drop(net);
    assert_eq!(world.dma.live_allocations(), 0);
}
