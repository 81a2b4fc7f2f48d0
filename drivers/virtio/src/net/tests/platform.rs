//! Host states and device options beyond the defaults: VIRTIO_F_ACCESS_PLATFORM and a
//! translating DMA platform (§6.1), status without a configuration interrupt (§5.1.4), the MAC
//! address and its programming (§5.1.5, §5.1.6.5.2), the receive filter (§5.1.6.5.1), and
//! announce requests (§5.1.6.5.4).

use super::device::World;
use super::{GUEST_MAC, UDP, bits, bounce, ipv4_frame, qemu_features, raw_frame, send, small, up};
use crate::net::{
    LinkChange, MacOrigin, MacProgramming, NetError, NetOptions, RxFilter, ctrl,
    is_valid_station_mac, locally_administered_mac,
};
use crate::spec::{Features, NetFeatures, net_config};

const ACCESS_PLATFORM: u64 = Features::ACCESS_PLATFORM.bits();
/// A MAC the user asks for on the kernel command line.
const USER_MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
/// The generated fallback of these tests.
const FALLBACK_MAC: [u8; 6] = [0x06, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

/// Options that keep the software filter on (the point of several tests here).
fn filtering() -> NetOptions {
    NetOptions {
        drop_foreign: true,
        fallback_mac: FALLBACK_MAC,
        ..small()
    }
}

fn set_device_mac(world: &World, mac: [u8; 6]) {
    world.device(|state| state.device_config[..6].copy_from_slice(&mac));
}

/// Writes the `status` field (link bit, announce bit) without raising any interrupt.
fn set_status(world: &World, link_up: bool, announce: bool) {
    let at = net_config::STATUS as usize;
    let mut value = 0u16;
    if link_up {
        value |= net_config::STATUS_LINK_UP;
    }
    if announce {
        value |= net_config::STATUS_ANNOUNCE;
    }
    world.device(|state| {
        state.device_config[at..at + 2].copy_from_slice(&value.to_le_bytes());
        state.generation = state.generation.wrapping_add(1);
    });
}

/// The (class, command, data) of every control command the device received.
fn commands(model: &std::cell::RefCell<super::device::NetModel<'_>>) -> Vec<(u8, u8, Vec<u8>)> {
    model
        .borrow()
        .ctrl_commands
        .iter()
        .map(|command| (command.class, command.command, command.data.clone()))
        .collect()
}

/// A UDP frame from the host to `destination`.
fn frame_to(destination: [u8; 6]) -> Vec<u8> {
    let mut frame = ipv4_frame(UDP, 40, 0, 0, 3);
    frame[..6].copy_from_slice(&destination);
    frame
}

#[test]
fn access_platform_is_accepted_and_a_device_offering_it_reaches_driver_ok() {
    let world = World::new(qemu_features() | bits(&[ACCESS_PLATFORM]));
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up: FEATURES_OK accepted");
    assert_ne!(net.features() & ACCESS_PLATFORM, 0);
    let frame = ipv4_frame(UDP, 100, 0, 0, 1);
    assert_eq!(bounce(&mut net, &model, &frame), frame);
    // The fake refuses FEATURES_OK exactly as QEMU does when the bit is not acknowledged.
    let world = World::new(qemu_features() | bits(&[ACCESS_PLATFORM]));
    let model = world.model();
    let options = NetOptions {
        allowed_features: crate::net::DRIVER_FEATURES & !ACCESS_PLATFORM,
        ..small()
    };
    let error = up(&world, &model, options).expect_err("refused");
    assert!(
        matches!(error, NetError::Transport(_)),
        "a typed transport error: {error}"
    );
}

#[test]
fn a_translating_platform_carries_traffic_through_shared_addresses_only() {
    for format in [0, bits(&[Features::RING_PACKED.bits()])] {
        let world = World::new(qemu_features() | bits(&[ACCESS_PLATFORM]) | format);
        // Device addresses of shared buffers start at 2^52, far above any host address: the
        // device can reach a buffer only through a live share.
        world.dma.translate_shares(1 << 52);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        for seed in 0..40 {
            let frame = ipv4_frame(UDP, 64 + 30 * seed as usize, 0, 0, seed);
            assert_eq!(bounce(&mut net, &model, &frame), frame, "received {seed}");
            // A non-IP frame, so checksum offload leaves it exactly as written.
            let raw = raw_frame(60 + 25 * seed as usize, seed);
            assert_eq!(send(&mut net, &model, &raw).frame, raw, "sent {seed}");
        }
        let (shares, unshares, live) = world.dma.share_counts();
        assert!(
            shares > 80 && unshares > 40,
            "{shares} shares, {unshares} unshares"
        );
        assert_eq!(
            live,
            usize::from(net.rx.in_flight()) + usize::from(net.tx.in_flight()),
            "exactly the buffers the device holds are shared"
        );
        drop(net);
        let (shares, unshares, live) = world.dma.share_counts();
        assert_eq!(
            (shares, live),
            (unshares, 0),
            "every share ended, in-flight ones at teardown"
        );
        assert_eq!(world.dma.live_allocations(), 0);
    }
}

#[test]
fn without_a_config_interrupt_polling_the_status_sees_link_and_needs_reset() {
    let world = World::new(qemu_features());
    set_status(&world, false, false);
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert!(!net.link_up(), "the link is down at boot");
    assert_eq!(net.poll_status(), Ok(None));
    set_status(&world, true, false);
    assert_eq!(net.poll_status(), Ok(Some(LinkChange::Up)));
    assert!(net.link_up());
    assert_eq!(net.poll_status(), Ok(None), "reported once");
    set_status(&world, false, false);
    assert_eq!(net.poll_status(), Ok(Some(LinkChange::Down)));
    let stats = net.stats();
    assert_eq!((stats.status_polls, stats.config_changes), (4, 0));
    world.device(|state| state.status |= crate::spec::DeviceStatus::DEVICE_NEEDS_RESET.bits());
    assert_eq!(net.poll_status(), Err(NetError::NeedsReset));
}

#[test]
fn a_requested_mac_is_set_with_ctrl_mac_addr_and_the_filter_drops_promiscuous_mode() {
    let world = World::new(
        qemu_features()
            | bits(&[
                NetFeatures::CTRL_MAC_ADDR.bits(),
                NetFeatures::CTRL_RX_EXTRA.bits(),
            ]),
    );
    let model = world.model();
    let options = NetOptions {
        mac: Some(USER_MAC),
        ..filtering()
    };
    let mut net = up(&world, &model, options).expect("up");
    assert_eq!(net.mac(), USER_MAC);
    assert_eq!(net.mac_origin(), MacOrigin::Requested);
    assert_eq!(net.mac_programming(), MacProgramming::AddressSet);
    assert_eq!(net.rx_filter(), RxFilter::UnicastAndBroadcast);
    assert_eq!(
        commands(&model),
        vec![
            (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, USER_MAC.to_vec()),
            (ctrl::CLASS_RX, ctrl::RX_PROMISC, vec![0]),
            (ctrl::CLASS_RX, ctrl::RX_ALLMULTI, vec![0]),
            (ctrl::CLASS_RX, ctrl::RX_ALLUNI, vec![0]),
            (ctrl::CLASS_RX, ctrl::RX_NOMULTI, vec![1]),
            (ctrl::CLASS_RX, ctrl::RX_NOUNI, vec![0]),
            (ctrl::CLASS_RX, ctrl::RX_NOBCAST, vec![0]),
        ]
    );
    // Frames for us and broadcast pass; for the device's old MAC, another station or a
    // multicast group they are dropped and counted.
    let ours = frame_to(USER_MAC);
    assert_eq!(bounce(&mut net, &model, &ours), ours);
    let broadcast = frame_to([0xff; 6]);
    assert_eq!(bounce(&mut net, &model, &broadcast), broadcast);
    for foreign in [
        GUEST_MAC,
        [0x52, 0x54, 0, 0, 0, 9],
        [0x01, 0, 0x5e, 0, 0, 1],
    ] {
        model
            .borrow_mut()
            .deliver(super::device::WireHeader::default(), &frame_to(foreign));
        assert!(net.receive().expect("receive").is_none(), "{foreign:02x?}");
        net.flush().expect("flush");
    }
    let stats = net.stats();
    assert_eq!((stats.rx_foreign, stats.rx_packets), (3, 2));
    assert_eq!(
        model.borrow_mut().take_rx_buffers(),
        usize::from(net.queue_sizes().0),
        "dropped frames' buffers went back to the ring"
    );
}

#[test]
fn without_ctrl_mac_addr_the_requested_mac_goes_in_the_unicast_filter_table() {
    let world = World::new(qemu_features());
    let model = world.model();
    let options = NetOptions {
        mac: Some(USER_MAC),
        ..filtering()
    };
    let net = up(&world, &model, options).expect("up");
    assert_eq!(net.mac_programming(), MacProgramming::FilterTable);
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend_from_slice(&USER_MAC);
    table.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        commands(&model)[0],
        (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET, table)
    );
    assert_eq!(net.rx_filter(), RxFilter::UnicastAndBroadcast);
}

#[test]
fn a_device_that_cannot_be_told_the_mac_stays_promiscuous_and_the_driver_filters() {
    // No CTRL_RX, no CTRL_MAC_ADDR: nothing to tell the device with.
    let offered = qemu_features() & !bits(&[NetFeatures::CTRL_RX.bits()]);
    let world = World::new(offered);
    let model = world.model();
    let options = NetOptions {
        mac: Some(USER_MAC),
        ..filtering()
    };
    let mut net = up(&world, &model, options).expect("up");
    assert_eq!(net.mac_programming(), MacProgramming::NotTold);
    assert_eq!(net.rx_filter(), RxFilter::DeviceDefault);
    assert!(commands(&model).is_empty(), "no filter command was sent");
    model
        .borrow_mut()
        .deliver(super::device::WireHeader::default(), &frame_to(GUEST_MAC));
    assert!(net.receive().expect("receive").is_none());
    assert_eq!(net.stats().rx_foreign, 1);

    // With CTRL_RX but the table refused, promiscuous mode must stay on.
    let world = World::new(qemu_features());
    let model = world.model();
    model
        .borrow_mut()
        .ctrl_refused
        .push((ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET));
    let options = NetOptions {
        mac: Some(USER_MAC),
        ..filtering()
    };
    let net = up(&world, &model, options).expect("a refused filter is not fatal");
    assert_eq!(net.mac_programming(), MacProgramming::NotTold);
    assert_eq!(net.rx_filter(), RxFilter::MacNotTold);
    assert!(
        !commands(&model)
            .iter()
            .any(|(class, command, _)| (*class, *command) == (ctrl::CLASS_RX, ctrl::RX_PROMISC)),
        "promiscuous mode was left on"
    );
}

#[test]
fn a_refused_filter_command_is_reported_and_the_device_keeps_serving() {
    let world = World::new(qemu_features());
    let model = world.model();
    model
        .borrow_mut()
        .ctrl_refused
        .push((ctrl::CLASS_RX, ctrl::RX_PROMISC));
    let mut net = up(&world, &model, filtering()).expect("up");
    assert_eq!(
        net.rx_filter(),
        RxFilter::Failed(NetError::Control {
            class: ctrl::CLASS_RX,
            command: ctrl::RX_PROMISC,
            ack: Some(1)
        })
    );
    let ours = frame_to(GUEST_MAC);
    assert_eq!(bounce(&mut net, &model, &ours), ours);
}

#[test]
fn without_a_device_mac_or_with_an_invalid_one_the_fallback_is_used_and_told() {
    // No VIRTIO_NET_F_MAC at all.
    let offered = qemu_features() & !bits(&[NetFeatures::MAC.bits()]);
    let world = World::new(offered | bits(&[NetFeatures::CTRL_MAC_ADDR.bits()]));
    let model = world.model();
    let net = up(&world, &model, filtering()).expect("up");
    assert_eq!(net.mac(), FALLBACK_MAC);
    assert_eq!(net.mac_origin(), MacOrigin::Generated);
    assert_eq!(net.rejected_device_mac(), None);
    assert_eq!(net.mac_programming(), MacProgramming::AddressSet);
    assert_eq!(
        commands(&model)[0],
        (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, FALLBACK_MAC.to_vec())
    );
    drop(net);

    // A zero or multicast MAC in device config is rejected.
    for bad in [[0u8; 6], [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01], [0xff; 6]] {
        let world = World::new(qemu_features());
        set_device_mac(&world, bad);
        let model = world.model();
        let net = up(&world, &model, filtering()).expect("up");
        assert_eq!(net.mac(), FALLBACK_MAC, "{bad:02x?}");
        assert_eq!(net.mac_origin(), MacOrigin::Generated);
        assert_eq!(net.rejected_device_mac(), Some(bad));
        assert_eq!(net.mac_programming(), MacProgramming::FilterTable);
    }

    // An invalid requested MAC is ignored in favour of the device's.
    let world = World::new(qemu_features());
    let model = world.model();
    let options = NetOptions {
        mac: Some([0x01, 2, 3, 4, 5, 6]),
        ..filtering()
    };
    let net = up(&world, &model, options).expect("up");
    assert_eq!(
        (net.mac(), net.mac_origin()),
        (GUEST_MAC, MacOrigin::Device)
    );
    assert_eq!(net.mac_programming(), MacProgramming::DeviceDefault);
}

#[test]
fn station_mac_rules_and_generated_macs() {
    assert!(is_valid_station_mac(GUEST_MAC));
    assert!(!is_valid_station_mac([0; 6]));
    assert!(!is_valid_station_mac([0xff; 6]));
    assert!(!is_valid_station_mac([0x33, 0x33, 0, 0, 0, 1]));
    for random in [
        [0u8; 6],
        [0xff; 6],
        [0x01, 0, 0, 0, 0, 0],
        [0xfe, 1, 2, 3, 4, 5],
    ] {
        let mac = locally_administered_mac(random);
        assert!(is_valid_station_mac(mac), "{mac:02x?}");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(mac[1..], random[1..], "the other bits are the random ones");
    }
}

#[test]
fn an_announce_request_is_seen_on_config_change_and_acknowledged_once() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, filtering()).expect("up");
    assert!(!net.announce_requested());
    assert_eq!(net.ack_announce(1000), Ok(()), "nothing to acknowledge");
    let before = commands(&model).len();
    set_status(&world, true, true);
    assert_eq!(
        net.handle_config_change(),
        Ok(None),
        "the link did not change"
    );
    assert!(net.announce_requested());
    assert_eq!(net.ack_announce(1000), Ok(()));
    assert!(!net.announce_requested());
    let sent = commands(&model);
    assert_eq!(sent.len(), before + 1);
    assert_eq!(
        sent[before],
        (ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK, vec![])
    );
    assert_eq!(net.stats().announce_acks, 1);
    // The device cleared the bit on the ack: no second request.
    assert_eq!(net.poll_status(), Ok(None));
    assert!(!net.announce_requested());

    // Without GUEST_ANNOUNCE negotiated the bit is ignored.
    let world = World::new(qemu_features() & !bits(&[NetFeatures::GUEST_ANNOUNCE.bits()]));
    let model = world.model();
    let mut net = up(&world, &model, filtering()).expect("up");
    set_status(&world, true, true);
    assert_eq!(net.handle_config_change(), Ok(None));
    assert!(!net.announce_requested());
}
