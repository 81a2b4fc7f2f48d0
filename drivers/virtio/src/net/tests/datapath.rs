//! The data path: receive in place and mergeable reassembly (§5.1.6.3, §5.1.6.4), malformed
//! receive buffers, transmit back-pressure and the MTU limit (§5.1.6.2, §5.1.4.2), and the
//! refill/reclaim accounting over a million packets.

use super::device::{HEADER, WireHeader, World};
use super::{
    IP_AT, Net, TCP, UDP, bits, bounce, ipv4_frame, payload, qemu_features, raw_frame, send, small,
    up,
};
use crate::net::{NetOptions, buffer_len_for_mtu};
use crate::spec::{Features, NetFeatures, net_config};

fn both_formats() -> [u64; 2] {
    [0, bits(&[Features::RING_PACKED.bits()])]
}

/// Byte counts for spreading `total` header+frame bytes over `buffers` buffers: the first
/// holds the header and Ethernet header at least, the others get uneven shares (some of a
/// single byte).
fn uneven_sizes(total: usize, buffers: usize) -> Vec<usize> {
    assert!(total >= HEADER + 14 + buffers - 1);
    let mut sizes = vec![1; buffers];
    sizes[0] = HEADER + 14;
    let mut left = total - sizes.iter().sum::<usize>();
    let mut index = 0;
    while left > 0 {
        let share = (left / 2).max(1).min(left);
        sizes[index % buffers] += share;
        left -= share;
        index += 3;
    }
    sizes
}

/// Receives every frame waiting, recycles them and flushes; returns their bytes.
fn drain(net: &mut Net<'_, '_>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while let Some(frame) = net.receive().expect("receive") {
        frames.push(frame.bytes().to_vec());
        net.recycle(frame).expect("recycle");
    }
    net.flush().expect("flush");
    frames
}

#[test]
fn a_single_buffer_frame_is_handed_up_in_place() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let frame = ipv4_frame(UDP, 1472, 0, 0, 1);
        assert_eq!(frame.len(), 1514);
        let used = model.borrow_mut().deliver(WireHeader::default(), &frame);
        assert_eq!(used, 1);
        let received = net.receive().expect("receive").expect("frame");
        assert_eq!(received.bytes(), frame.as_slice());
        assert_eq!(received.in_place, Some((HEADER, frame.len())), "no copy");
        assert!(received.merged.is_empty());
        net.recycle(received).expect("recycle");
        let stats = net.stats();
        assert_eq!(
            (stats.rx_packets, stats.rx_bytes, stats.rx_merged),
            (1, 1514, 0)
        );
    }
}

#[test]
fn mergeable_frames_of_2_to_n_buffers_are_reassembled_byte_exact() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let ring = usize::from(net.queue_sizes().0);
        assert_eq!(ring, 64);
        let mut merged = 0;
        for buffers in (2..=10).chain([31, 63, ring]) {
            let frame = ipv4_frame(UDP, 1000 + buffers, 0, 0, buffers as u64);
            let sizes = uneven_sizes(HEADER + frame.len(), buffers);
            model
                .borrow_mut()
                .deliver_split(WireHeader::default(), &frame, &sizes, buffers as u16);
            let received = net.receive().expect("receive").expect("frame");
            assert_eq!(
                received.bytes(),
                frame.as_slice(),
                "{buffers} buffers: {sizes:?}"
            );
            assert_eq!(received.parts.len(), buffers);
            net.recycle(received).expect("recycle");
            net.flush().expect("flush");
            merged += 1;
            assert_eq!(net.stats().rx_merged, merged);
            assert_eq!(
                model.borrow_mut().take_rx_buffers(),
                ring,
                "every buffer of the frame went back to the ring"
            );
        }
        // A frame filling whole buffers the way QEMU does (each full before the next).
        let capacity = model.borrow_mut().rx_capacities()[0] as usize;
        let frame = payload(3 * capacity - HEADER, 77);
        let sizes = [capacity, capacity, capacity];
        model
            .borrow_mut()
            .deliver_split(WireHeader::default(), &frame, &sizes, 3);
        assert_eq!(drain(&mut net), [frame]);
        let stats = net.stats();
        assert_eq!(stats.rx_malformed, 0);
        assert_eq!(stats.rx_packets, merged + 1);
    }
}

#[test]
fn num_buffers_larger_than_what_arrived_drops_the_frame_counts_it_and_recycles_its_buffers() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let posted = net.stats().rx_buffers_posted;
        assert_eq!(posted, 64);
        let frame = ipv4_frame(UDP, 600, 0, 0, 2);
        // Says 4, only 2 arrive.
        let sizes = uneven_sizes(HEADER + frame.len(), 2);
        model
            .borrow_mut()
            .deliver_split(WireHeader::default(), &frame, &sizes, 4);
        assert!(net.receive().expect("receive").is_none(), "dropped");
        net.flush().expect("flush");
        let stats = net.stats();
        assert_eq!((stats.rx_malformed, stats.rx_packets), (1, 0));
        assert_eq!(stats.rx_buffers_posted, posted + 2, "both buffers reposted");
        assert_eq!(model.borrow_mut().take_rx_buffers(), 64);
        assert_eq!(net.rx.in_flight(), 64);
        // The ring still works.
        assert_eq!(bounce(&mut net, &model, &frame), frame);
    }
}

#[test]
fn num_buffers_zero_or_beyond_the_queue_size_is_dropped_and_the_buffer_recycled() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let frame = ipv4_frame(UDP, 100, 0, 0, 3);
        for (round, num_buffers) in [0u16, 65, 1000, u16::MAX].into_iter().enumerate() {
            model.borrow_mut().deliver_split(
                WireHeader::default(),
                &frame,
                &[HEADER + frame.len()],
                num_buffers,
            );
            assert!(
                net.receive().expect("receive").is_none(),
                "num_buffers {num_buffers}"
            );
            net.flush().expect("flush");
            assert_eq!(net.stats().rx_malformed, round as u64 + 1);
            assert_eq!(model.borrow_mut().take_rx_buffers(), 64);
        }
        assert_eq!(net.stats().rx_packets, 0);
        assert_eq!(bounce(&mut net, &model, &frame), frame);
    }
}

#[test]
fn runt_buffers_shorter_than_the_two_headers_are_dropped_and_recycled() {
    for features in [qemu_features(), bits(&[Features::VERSION_1.bits()])] {
        let world = World::new(features);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        let header = WireHeader {
            num_buffers: 1,
            ..WireHeader::default()
        };
        for (round, len) in [0usize, 1, 11, 12, 13, 25].into_iter().enumerate() {
            let mut chunk = header.bytes().to_vec();
            chunk.resize(len.max(HEADER), 0xee);
            chunk.truncate(len);
            model.borrow_mut().deliver_chunks(&[chunk]);
            assert!(
                net.receive().expect("receive").is_none(),
                "{len}-byte buffer"
            );
            net.flush().expect("flush");
            assert_eq!(net.stats().rx_malformed, round as u64 + 1);
            assert_eq!(model.borrow_mut().take_rx_buffers(), 64);
        }
        // The smallest acceptable: header and a bare Ethernet header.
        let mut chunk = header.bytes().to_vec();
        chunk.extend_from_slice(&[0xab; 14]);
        model.borrow_mut().deliver_chunks(&[chunk]);
        let frames = drain(&mut net);
        assert_eq!(frames, [vec![0xab; 14]]);
    }
}

#[test]
fn a_full_transmit_ring_is_back_pressure_fill_is_not_called_and_the_drop_is_counted() {
    for format in both_formats() {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        model.borrow_mut().tx_auto = false;
        let frame = raw_frame(200, 4);
        for _ in 0..64 {
            assert!(net.can_transmit());
            let sent = net
                .transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame))
                .expect("transmit");
            assert_eq!(sent, Some(()));
        }
        net.flush().expect("flush");
        assert!(!net.can_transmit(), "ring full");
        let mut called = false;
        let sent = net
            .transmit(frame.len(), |_| called = true)
            .expect("back-pressure is not an error");
        assert_eq!(sent, None);
        assert!(!called, "fill must not run when the frame cannot be queued");
        let stats = net.stats();
        assert_eq!(
            (stats.tx_packets, stats.tx_full, stats.tx_oversize),
            (64, 1, 0)
        );
        assert!(net.tx_pool.is_empty());
        // The device catches up; the send path reclaims and accepts again.
        assert_eq!(model.borrow_mut().process_tx(), 64);
        assert!(net.can_transmit());
        assert_eq!(net.tx_pool.len(), 64, "every buffer reclaimed");
        let sent = net
            .transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame))
            .expect("transmit");
        assert_eq!(sent, Some(()));
        net.flush().expect("flush");
        assert_eq!(model.borrow_mut().process_tx(), 1);
        let model = model.borrow();
        assert_eq!(model.tx_frames.len(), 65);
        assert!(model.tx_frames.iter().all(|sent| sent.frame == frame));
    }
}

#[test]
fn frames_longer_than_the_mtu_or_empty_are_refused_without_calling_fill() {
    // (config MTU or None for no VIRTIO_NET_F_MTU, largest frame); no segmentation offload
    // (HOST_TSO4 is tested below).
    for (mtu, largest) in [(None, 1514usize), (Some(1400u16), 1414), (Some(9000), 9014)] {
        let mut features = qemu_features() & !NetFeatures::HOST_TSO4.bits();
        if mtu.is_none() {
            features &= !bits(&[NetFeatures::MTU.bits()]);
        }
        let world = World::new(features);
        if let Some(mtu) = mtu {
            let at = net_config::MTU as usize;
            world.device(|state| {
                state.device_config[at..at + 2].copy_from_slice(&mtu.to_le_bytes())
            });
        }
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        assert_eq!(net.max_frame(), largest);
        let buffer_room = buffer_len_for_mtu(net.mtu()) - HEADER;
        let mut dropped = 0;
        for length in [0, largest + 1, largest + 4, buffer_room, buffer_room + 1] {
            let mut called = false;
            let sent = net.transmit(length, |_| called = true).expect("transmit");
            assert_eq!(sent, None, "MTU {mtu:?}: a {length}-byte frame");
            assert!(!called);
            dropped += 1;
            assert_eq!(net.stats().tx_oversize, dropped);
            assert_eq!(net.stats().tx_full, 0);
        }
        let frame = raw_frame(largest, 5);
        assert_eq!(
            send(&mut net, &model, &frame).frame,
            frame,
            "exactly the MTU"
        );
        assert_eq!(net.stats().tx_packets, 1);
    }
}

/// xorshift64*: a small deterministic generator for the long run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next() % (high - low + 1) as u64) as usize
    }
}

/// Frame number `sequence`: a non-IP EtherType (so no checksum offload touches it), the
/// sequence number, then filler.
fn numbered_frame(sequence: u64, len: usize) -> Vec<u8> {
    let mut frame = raw_frame(len, sequence);
    frame[14..22].copy_from_slice(&sequence.to_le_bytes());
    frame
}

/// Sends and echoes `packets` frames in random batches with random sizes, receive buffers
/// randomly merged, and checks the accounting at the end.
fn long_run(extra_features: u64, packets: u64, seed: u64) {
    let world = World::new(qemu_features() | extra_features);
    let model = world.model();
    let options = NetOptions {
        rx_queue_size: 256,
        tx_queue_size: 256,
        drop_foreign: false,
        ..NetOptions::default()
    };
    let mut net = up(&world, &model, options).expect("up");
    let (rx_size, tx_size) = net.queue_sizes();
    let allocations = world.dma.live_allocations();
    let mut rng = Rng(seed);
    let (mut sent, mut received, mut bytes, mut merged, mut buffers_used) = (0u64, 0u64, 0, 0, 0);
    let max_frame = net.max_frame();
    while sent < packets {
        let batch = rng.range(1, 48).min((packets - sent) as usize);
        let mut expected = Vec::with_capacity(batch);
        for _ in 0..batch {
            let len = if rng.next().is_multiple_of(8) {
                rng.range(22, max_frame)
            } else {
                rng.range(60, 160)
            };
            let frame = numbered_frame(sent, len);
            let queued = net
                .transmit(len, |buffer| buffer.copy_from_slice(&frame))
                .expect("transmit");
            assert_eq!(queued, Some(()), "packet {sent}");
            sent += 1;
            bytes += len as u64;
            expected.push(frame);
        }
        net.flush().expect("flush");
        let mut model_ref = model.borrow_mut();
        model_ref.process_tx();
        let frames = std::mem::take(&mut model_ref.tx_frames);
        assert_eq!(frames.len(), batch, "the device got the whole batch");
        for (tx, frame) in frames.iter().zip(&expected) {
            assert_eq!(&tx.frame, frame);
            assert_eq!(tx.header, WireHeader::default());
            // Echo it, in one buffer or spread over up to four.
            let buffers = if rng.next().is_multiple_of(4) && frame.len() >= 40 {
                rng.range(2, 4)
            } else {
                1
            };
            let sizes = if buffers == 1 {
                vec![HEADER + frame.len()]
            } else {
                merged += 1;
                uneven_sizes(HEADER + frame.len(), buffers)
            };
            buffers_used += buffers as u64;
            model_ref.deliver_split(WireHeader::default(), frame, &sizes, buffers as u16);
        }
        drop(model_ref);
        let echoed = drain(&mut net);
        assert_eq!(echoed, expected, "echo of batch ending at {sent}");
        received += echoed.len() as u64;
    }
    assert_eq!(received, packets);

    // Every receive buffer is back in the ring, the transmit pool is full again.
    assert_eq!(model.borrow_mut().take_rx_buffers(), usize::from(rx_size));
    assert_eq!(net.rx.in_flight(), rx_size);
    assert!(net.can_transmit());
    assert_eq!(net.tx_pool.len(), usize::from(tx_size));
    assert_eq!(net.tx.in_flight(), 0);
    assert_eq!(
        world.dma.live_allocations(),
        allocations,
        "no allocation leaked"
    );
    // Counters are exact.
    let stats = net.stats();
    assert_eq!((stats.tx_packets, stats.rx_packets), (packets, packets));
    assert_eq!((stats.tx_bytes, stats.rx_bytes), (bytes, bytes));
    assert_eq!(stats.rx_merged, merged);
    assert_eq!(
        (stats.rx_malformed, stats.tx_full, stats.tx_oversize),
        (0, 0, 0)
    );
    assert_eq!(stats.rx_buffers_posted, u64::from(rx_size) + buffers_used);
    assert_eq!(net.rx.stats().buffers_used, buffers_used);
    assert_eq!(net.tx.stats().buffers_used, packets);
    assert_eq!(
        stats.kicks,
        world.doorbells() as u64,
        "kicks counts doorbells exactly"
    );
    let doorbells = model.borrow().doorbells.clone();
    assert_eq!(
        doorbells.values().sum::<u64>(),
        stats.kicks,
        "every doorbell (rx, tx, and the control queue's filter commands at start-up)"
    );
}

#[test]
fn a_million_packets_leave_every_rx_buffer_posted_the_tx_pool_full_and_counters_exact() {
    long_run(0, 1_000_000, 0x5eed_0001);
}

#[test]
fn packed_ring_long_run_leaves_every_rx_buffer_posted_the_tx_pool_full_and_counters_exact() {
    long_run(bits(&[Features::RING_PACKED.bits()]), 200_000, 0x5eed_0002);
}

#[test]
fn buffer_len_for_mtu_fits_the_frame_and_is_a_multiple_of_64() {
    for mtu in [68u16, 576, 1500, 1501, 2000, 9000, 65535] {
        let len = buffer_len_for_mtu(mtu);
        assert!(len >= 2048 && len.is_multiple_of(64), "{mtu}: {len}");
        assert!(len >= HEADER + 14 + 4 + usize::from(mtu), "{mtu}: {len}");
        assert!(len < (HEADER + 14 + 4 + usize::from(mtu)).max(2048) + 64);
    }
}

#[test]
fn with_host_tso4_tcp_frames_beyond_the_mtu_go_out_for_the_device_to_segment() {
    use crate::net::{HDR_F_NEEDS_CSUM, HDR_GSO_TCPV4, MAX_SEGMENTED_FRAME};
    let world = World::new(qemu_features());
    let at = net_config::MTU as usize;
    world.device(|state| state.device_config[at..at + 2].copy_from_slice(&1500u16.to_le_bytes()));
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    assert_eq!(net.max_segmented_frame(), Some(MAX_SEGMENTED_FRAME));
    // TCP, with and without options: NEEDS_CSUM over the segment, GSO_TCPV4, the headers to
    // repeat, and segments that fill the MTU exactly.
    for (options, payload) in [(0usize, 20_000usize), (3, 60_000), (0, 1461)] {
        let frame = ipv4_frame(TCP, payload, 0, 0, 7);
        // `options` TCP option words: widen the data offset over the first payload bytes.
        let mut frame = frame;
        frame[IP_AT + 20 + 12] = ((5 + options as u8) << 4) | (frame[IP_AT + 20 + 12] & 0x0f);
        let sent = send(&mut net, &model, &frame);
        let field = IP_AT + 20 + 16;
        let mut expected = frame.clone();
        expected[field..field + 2].copy_from_slice(&sent.frame[field..field + 2]);
        assert_eq!(
            sent.frame, expected,
            "only the checksum field (now the pseudo-header sum) differs"
        );
        let header = sent.header;
        let hdr_len = IP_AT + 20 + 20 + 4 * options;
        assert_eq!(header.flags, HDR_F_NEEDS_CSUM);
        assert_eq!(header.gso_type, HDR_GSO_TCPV4);
        assert_eq!(usize::from(header.hdr_len), hdr_len);
        assert_eq!(usize::from(header.gso_size), 1500 - 40 - 4 * options);
        assert_eq!((header.csum_start, header.csum_offset), (34, 16));
    }
    let stats = net.stats();
    assert_eq!((stats.tx_segmented, stats.tx_oversize), (3, 0));
    // Beyond the MTU but not TCP: cannot be segmented, so it is dropped after fill ran.
    let udp = ipv4_frame(UDP, 5_000, 0, 0, 8);
    let mut called = false;
    let sent = net
        .transmit(udp.len(), |buffer| {
            buffer.copy_from_slice(&udp);
            called = true;
        })
        .expect("transmit");
    assert_eq!((sent, called), (None, true));
    assert_eq!(net.stats().tx_oversize, 1);
    // Beyond the largest segmented frame: refused before fill.
    let sent = net
        .transmit(MAX_SEGMENTED_FRAME + 1, |_| panic!("fill must not run"))
        .expect("transmit");
    assert_eq!(sent, None);
    assert_eq!(net.stats().tx_oversize, 2);
    // Every large buffer in flight: can_transmit says no (the stack learns a frame's length
    // only after asking), and says yes again once the device returns them.
    model.borrow_mut().tx_auto = false;
    let big = ipv4_frame(TCP, 4_000, 0, 0, 9);
    let mut queued = 0;
    while net.can_transmit() {
        let sent = net
            .transmit(big.len(), |buffer| buffer.copy_from_slice(&big))
            .expect("transmit");
        assert_eq!(sent, Some(()));
        queued += 1;
        assert!(queued <= 64, "the large pool never ran dry");
    }
    assert_eq!(queued, 16, "16 large buffers");
    net.flush().expect("flush");
    assert_eq!(model.borrow_mut().process_tx(), 16);
    assert!(net.can_transmit());
}
