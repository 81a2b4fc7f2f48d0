//! Checksums in both directions (§5.1.6.2 transmit offload, §5.1.6.4 NEEDS_CSUM and
//! DATA_VALID on receive), verified with the independent RFC 1071 code of the parent module.

use super::device::{HEADER, WireHeader, World};
use super::{
    ICMP, IP_AT, TCP, UDP, arp_frame, bits, ipv4_frame, l4_checksum, l4_layout, l4_verifies,
    partial_checksum, pseudo_header, qemu_features, rfc1071, send, small, up, with_l4_checksum,
};
use crate::net::{HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, HDR_GSO_NONE, parse_header};
use crate::spec::{Features, NetFeatures};

fn needs_csum(start: u16, offset: u16) -> WireHeader {
    WireHeader {
        flags: HDR_F_NEEDS_CSUM,
        csum_start: start,
        csum_offset: offset,
        ..WireHeader::default()
    }
}

#[test]
fn needs_csum_completion_gives_the_correct_tcp_and_udp_checksum() {
    for format in [0, bits(&[Features::RING_PACKED.bits()])] {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        assert!(net.rx_checksum_offload());
        let mut completed = 0;
        for protocol in [TCP, UDP] {
            for options in [0, 1, 10] {
                for payload_len in [0, 1, 2, 17, 1000, 1400] {
                    let seed = u64::from(protocol) * 1000 + payload_len as u64;
                    let frame = ipv4_frame(protocol, payload_len, options, 0, seed);
                    let (partial, start, offset) = partial_checksum(&frame);
                    assert_eq!(usize::from(start), IP_AT + 20 + 4 * options);
                    model
                        .borrow_mut()
                        .deliver(needs_csum(start, offset), &partial);
                    let received = net.receive().expect("receive").expect("frame");
                    let bytes = received.bytes().to_vec();
                    net.recycle(received).expect("recycle");
                    net.flush().expect("flush");
                    assert_eq!(
                        bytes,
                        with_l4_checksum(&frame),
                        "protocol {protocol}, {options} option words, {payload_len} bytes"
                    );
                    assert!(l4_verifies(&bytes));
                    completed += 1;
                    assert_eq!(net.stats().rx_checksums_completed, completed);
                }
            }
        }
        assert_eq!(net.stats().rx_malformed, 0);
    }
}

#[test]
fn needs_csum_is_completed_over_a_frame_merged_from_several_buffers() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    for protocol in [TCP, UDP] {
        let frame = ipv4_frame(protocol, 900, 0, 0, 11);
        let (partial, start, offset) = partial_checksum(&frame);
        // The checksum field (at 14 + 20 + 16 or + 6) lands in the second buffer.
        let sizes = [HEADER + 40, 300, partial.len() - 340];
        model
            .borrow_mut()
            .deliver_split(needs_csum(start, offset), &partial, &sizes, 3);
        let received = net.receive().expect("receive").expect("frame");
        assert_eq!(received.bytes(), with_l4_checksum(&frame).as_slice());
        assert!(l4_verifies(received.bytes()));
        net.recycle(received).expect("recycle");
        net.flush().expect("flush");
    }
    let stats = net.stats();
    assert_eq!((stats.rx_merged, stats.rx_checksums_completed), (2, 2));
}

#[test]
fn a_udp_checksum_that_computes_to_zero_is_sent_as_all_ones() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    // Make the ones'-complement sum all ones by choosing the last payload word, so that the
    // complement (the checksum) is zero, which UDP must transmit as 0xffff (RFC 768).
    let mut frame = ipv4_frame(UDP, 64, 0, 0, 12);
    let (start, _, _, _) = l4_layout(&frame);
    let last = frame.len() - 2;
    frame[last..].fill(0);
    let sum = rfc1071(&[&pseudo_header(&frame), &frame[start..]]);
    frame[last..].copy_from_slice(&(!sum).to_be_bytes());
    assert_eq!(
        rfc1071(&[&pseudo_header(&frame), &frame[start..]]),
        0xffff,
        "the test frame's checksum computes to zero"
    );
    assert_eq!(l4_checksum(&frame), 0xffff);
    let (partial, csum_start, csum_offset) = partial_checksum(&frame);
    model
        .borrow_mut()
        .deliver(needs_csum(csum_start, csum_offset), &partial);
    let received = net.receive().expect("receive").expect("frame");
    let field = usize::from(csum_start + csum_offset);
    assert_eq!(
        received.bytes()[field..field + 2],
        [0xff, 0xff],
        "0x0000 would mean 'no checksum'"
    );
    assert!(l4_verifies(received.bytes()));
    net.recycle(received).expect("recycle");
}

#[test]
fn needs_csum_with_csum_start_or_offset_outside_the_frame_is_dropped_and_counted() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    let frame = ipv4_frame(UDP, 100, 0, 0, 13);
    let (partial, start, _) = partial_checksum(&frame);
    let len = partial.len() as u16;
    let bad = [
        (len, 0),
        (len + 100, 0),
        (u16::MAX, 0),
        (start, len - start - 1),
        (start, len - start),
        (start, u16::MAX),
        (u16::MAX, u16::MAX),
    ];
    for (round, (csum_start, csum_offset)) in bad.into_iter().enumerate() {
        model
            .borrow_mut()
            .deliver(needs_csum(csum_start, csum_offset), &partial);
        assert!(
            net.receive().expect("receive").is_none(),
            "csum_start {csum_start} csum_offset {csum_offset}"
        );
        net.flush().expect("flush");
        assert_eq!(net.stats().rx_malformed, round as u64 + 1);
        assert_eq!(model.borrow_mut().take_rx_buffers(), 64, "buffer recycled");
    }
    // The same over a merged frame.
    let sizes = [HEADER + 60, partial.len() - 60];
    model
        .borrow_mut()
        .deliver_split(needs_csum(len, 0), &partial, &sizes, 2);
    assert!(net.receive().expect("receive").is_none());
    net.flush().expect("flush");
    assert_eq!(model.borrow_mut().take_rx_buffers(), 64);
    let stats = net.stats();
    assert_eq!(stats.rx_malformed, bad.len() as u64 + 1);
    assert_eq!((stats.rx_packets, stats.rx_checksums_completed), (0, 0));
    // The last field position that fits is accepted.
    model
        .borrow_mut()
        .deliver(needs_csum(start, len - start - 2), &partial);
    assert!(net.receive().expect("receive").is_some());
}

#[test]
fn data_valid_frames_are_handed_up_unchanged() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    // A checksum field the driver must not touch (the device vouched for the packet).
    let mut frame = with_l4_checksum(&ipv4_frame(TCP, 300, 0, 0, 14));
    let (start, offset, _, _) = l4_layout(&frame);
    frame[start + offset] ^= 0x5a;
    let header = WireHeader {
        flags: HDR_F_DATA_VALID,
        ..WireHeader::default()
    };
    model.borrow_mut().deliver(header, &frame);
    let received = net.receive().expect("receive").expect("frame");
    assert_eq!(received.bytes(), frame.as_slice());
    net.recycle(received).expect("recycle");
    assert_eq!(net.stats().rx_checksums_completed, 0);
}

#[test]
fn tx_offload_sets_needs_csum_start_offset_and_the_pseudo_header_sum_for_tcp_and_udp() {
    for format in [0, bits(&[Features::RING_PACKED.bits()])] {
        let world = World::new(qemu_features() | format);
        let model = world.model();
        let mut net = up(&world, &model, small()).expect("up");
        for protocol in [TCP, UDP] {
            for options in [0, 1, 10] {
                for payload_len in [0, 1, 333, 1400 - 20 - 4 * options - 20] {
                    let mut frame = ipv4_frame(protocol, payload_len, options, 0, 15);
                    // Whatever the stack left in the field is replaced.
                    let (start, offset, _, _) = l4_layout(&frame);
                    frame[start + offset..start + offset + 2].copy_from_slice(&[0xde, 0xad]);
                    let sent = send(&mut net, &model, &frame);
                    let what = format!("protocol {protocol}, {options} words, {payload_len}");
                    assert_eq!(sent.header.flags, HDR_F_NEEDS_CSUM, "{what}");
                    assert_eq!(sent.header.gso_type, HDR_GSO_NONE);
                    assert_eq!(
                        usize::from(sent.header.csum_start),
                        IP_AT + 20 + 4 * options
                    );
                    assert_eq!(
                        sent.header.csum_offset,
                        if protocol == TCP { 16 } else { 6 },
                        "{what}"
                    );
                    let field = start + offset;
                    let pseudo = rfc1071(&[&pseudo_header(&frame)]);
                    assert_eq!(
                        sent.frame[field..field + 2],
                        pseudo.to_be_bytes(),
                        "pseudo-header sum, not complemented ({what})"
                    );
                    assert_eq!(sent.frame[..field], frame[..field]);
                    assert_eq!(sent.frame[field + 2..], frame[field + 2..]);
                    // What the device then does (§5.1.6.2): checksum from csum_start to the
                    // end, stored at csum_start + csum_offset; the result must verify.
                    let mut on_wire = sent.frame.clone();
                    let checksum = !rfc1071(&[&on_wire[start..]]);
                    on_wire[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
                    assert!(l4_verifies(&on_wire), "{what}");
                }
            }
        }
    }
}

#[test]
fn tx_offload_leaves_arp_icmp_fragments_and_non_ipv4_frames_alone() {
    let world = World::new(qemu_features());
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    let mut ipv6 = ipv4_frame(UDP, 40, 0, 0, 16);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut truncated = with_l4_checksum(&ipv4_frame(TCP, 100, 0, 0, 17));
    truncated.truncate(truncated.len() - 1);
    let mut bad_version = with_l4_checksum(&ipv4_frame(UDP, 10, 0, 0, 18));
    bad_version[IP_AT] = 0x65;
    let frames = [
        ("ARP", arp_frame()),
        ("ICMP", ipv4_frame(ICMP, 56, 0, 0, 19)),
        (
            "UDP first fragment (MF)",
            ipv4_frame(UDP, 200, 0, 0x2000, 20),
        ),
        ("UDP later fragment", ipv4_frame(UDP, 200, 0, 0x0010, 21)),
        ("TCP last fragment", ipv4_frame(TCP, 200, 0, 0x0020, 22)),
        ("IPv6", ipv6),
        ("IPv4 shorter than its total length", truncated),
        ("IP version 6 in an IPv4 EtherType", bad_version),
        ("other IP protocol", ipv4_frame(47, 30, 0, 0, 23)),
    ];
    for (what, frame) in &frames {
        let sent = send(&mut net, &model, frame);
        assert_eq!(sent.header, WireHeader::default(), "{what}");
        assert_eq!(&sent.frame, frame, "{what}: untouched");
    }
    assert_eq!(net.stats().tx_checksum_offloaded, 0);
    // Don't Fragment alone is not a fragment: offloaded.
    let frame = ipv4_frame(UDP, 200, 0, 0x4000, 24);
    assert_eq!(
        send(&mut net, &model, &frame).header.flags,
        HDR_F_NEEDS_CSUM
    );
}

#[test]
fn without_csum_the_stack_checksum_goes_out_untouched() {
    let world = World::new(qemu_features() & !bits(&[NetFeatures::CSUM.bits()]));
    let model = world.model();
    let mut net = up(&world, &model, small()).expect("up");
    for protocol in [TCP, UDP] {
        let frame = with_l4_checksum(&ipv4_frame(protocol, 100, 0, 0, 25));
        let sent = send(&mut net, &model, &frame);
        assert_eq!(sent.header, WireHeader::default());
        assert_eq!(sent.frame, frame);
    }
}

#[test]
fn parse_header_reads_little_endian_fields_and_zero_fills_short_input() {
    let header = WireHeader {
        flags: 3,
        gso_type: 4,
        hdr_len: 0x1122,
        gso_size: 0x3344,
        csum_start: 0x0102,
        csum_offset: 0x0304,
        num_buffers: 0x0506,
    };
    let parsed = parse_header(&header.bytes());
    assert_eq!(
        (
            parsed.flags,
            parsed.gso_type,
            parsed.csum_start,
            parsed.csum_offset,
            parsed.num_buffers
        ),
        (3, 4, 0x0102, 0x0304, 0x0506)
    );
    let short = parse_header(&header.bytes()[..7]);
    assert_eq!(
        (short.csum_start, short.csum_offset, short.num_buffers),
        (0x02, 0, 0)
    );
}

#[test]
fn verify_unvouched_passes_vouched_frames_as_they_are_and_verifies_the_rest() {
    use crate::net::{NetOptions, RxChecksums};
    let world = World::new(qemu_features());
    let model = world.model();
    let options = NetOptions {
        rx_checksums: RxChecksums::VerifyUnvouched,
        ..small()
    };
    let mut net = up(&world, &model, options).expect("up");
    assert_eq!(net.rx_checksums(), RxChecksums::VerifyUnvouched);
    let receive = |net: &mut crate::net::VirtioNet<_, _>| {
        let received = net.receive().expect("receive");
        let bytes = received.as_ref().map(|frame| frame.bytes().to_vec());
        if let Some(frame) = received {
            net.recycle(frame).expect("recycle");
        }
        net.flush().expect("flush");
        bytes
    };
    for protocol in [TCP, UDP] {
        for payload_len in [0, 1, 1000, 1400] {
            let frame = with_l4_checksum(&ipv4_frame(protocol, payload_len, 0, 0, 40));
            // NEEDS_CSUM: handed up untouched (the partial sum left in place, not completed).
            let (partial, start, offset) = partial_checksum(&frame);
            model
                .borrow_mut()
                .deliver(needs_csum(start, offset), &partial);
            assert_eq!(receive(&mut net), Some(partial.clone()));
            // DATA_VALID: handed up even with a wrong checksum in the field (the device
            // checked the wire's; the driver does not look again).
            let mut wrong = frame.clone();
            let (l4, field, _, _) = l4_layout(&wrong);
            wrong[l4 + field] ^= 0x5a;
            let valid = WireHeader {
                flags: HDR_F_DATA_VALID,
                ..WireHeader::default()
            };
            model.borrow_mut().deliver(valid, &wrong);
            assert_eq!(receive(&mut net), Some(wrong.clone()));
            // Nothing vouches: a right checksum passes, a wrong one is dropped and counted.
            model.borrow_mut().deliver(WireHeader::default(), &frame);
            assert_eq!(receive(&mut net), Some(frame.clone()));
            model.borrow_mut().deliver(WireHeader::default(), &wrong);
            assert_eq!(
                receive(&mut net),
                None,
                "a wrong checksum nobody vouched for"
            );
        }
    }
    // Not TCP/UDP: nothing to verify here, the stack decides.
    let icmp = ipv4_frame(ICMP, 64, 0, 0, 41);
    model.borrow_mut().deliver(WireHeader::default(), &icmp);
    assert_eq!(receive(&mut net), Some(icmp));
    let stats = net.stats();
    assert_eq!(
        stats.rx_checksums_vouched, 16,
        "8 NEEDS_CSUM and 8 DATA_VALID"
    );
    assert_eq!(stats.rx_checksums_verified, 8);
    assert_eq!(stats.rx_checksum_bad, 8);
    assert_eq!(
        (stats.rx_checksums_completed, stats.rx_malformed),
        (0, 8),
        "the bad ones count as dropped (rx_malformed) too"
    );
    assert_eq!(stats.rx_packets, 8 * 3 + 1);
    // NEEDS_CSUM offsets must still fit the frame.
    let frame = ipv4_frame(UDP, 100, 0, 0, 42);
    let (partial, _, _) = partial_checksum(&frame);
    model
        .borrow_mut()
        .deliver(needs_csum(partial.len() as u16, 0), &partial);
    assert_eq!(receive(&mut net), None);
    assert_eq!(net.stats().rx_malformed, 9);
}
