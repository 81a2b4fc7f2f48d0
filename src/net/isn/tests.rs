//! Host tests of the sequence-number translation on hand-built segments. Checksums are
//! verified with an RFC 1071 sum written here, sharing no code with the module.

use std::vec::Vec;

use super::{IsnTranslation, MssRewrite, adjust_checksum};

const GUEST: [u8; 4] = [10, 0, 2, 15];
const HOST: [u8; 4] = [10, 0, 2, 2];
const KEY: [u8; 16] = *b"sixteen byte key";

/// RFC 1071: the one's complement of the one's complement sum of 16-bit words.
fn rfc1071(chunks: &[&[u8]]) -> u16 {
    let mut bytes = Vec::new();
    for chunk in chunks {
        bytes.extend_from_slice(chunk);
    }
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the TCP checksum of an Ethernet/IPv4/TCP frame (20-byte IP header) verifies.
fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    let segment = &frame[34..];
    let length = (segment.len() as u16).to_be_bytes();
    let pseudo = [&ip[12..20], &[0, 6], &length[..]].concat();
    rfc1071(&[&pseudo, segment]) == 0
}

/// Fills in the TCP checksum (the field must be zero first).
fn set_tcp_checksum(frame: &mut [u8]) {
    frame[34 + 16..34 + 18].fill(0);
    let ip = frame[14..34].to_vec();
    let segment = frame[34..].to_vec();
    let length = (segment.len() as u16).to_be_bytes();
    let pseudo = [&ip[12..20], &[0, 6], &length[..]].concat();
    let checksum = rfc1071(&[&pseudo, &segment]);
    frame[34 + 16..34 + 18].copy_from_slice(&checksum.to_be_bytes());
}

struct Segment {
    source: ([u8; 4], u16),
    destination: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    flags: u8,
    options: Vec<u8>,
    payload: Vec<u8>,
}

fn seg(source: ([u8; 4], u16), destination: ([u8; 4], u16), seq: u32, ack: u32) -> Segment {
    Segment {
        source,
        destination,
        seq,
        ack,
        flags: 0x10,
        options: Vec::new(),
        payload: b"some payload bytes".to_vec(),
    }
}

/// An Ethernet + IPv4 + TCP frame with a correct TCP checksum.
fn frame(segment: &Segment) -> Vec<u8> {
    assert_eq!(segment.options.len() % 4, 0);
    let tcp_len = 20 + segment.options.len();
    let total = 20 + tcp_len + segment.payload.len();
    let mut frame = vec![0u8; 14 + total];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&segment.source.0);
    ip[16..20].copy_from_slice(&segment.destination.0);
    let tcp = &mut frame[34..];
    tcp[0..2].copy_from_slice(&segment.source.1.to_be_bytes());
    tcp[2..4].copy_from_slice(&segment.destination.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&segment.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&segment.ack.to_be_bytes());
    tcp[12] = ((tcp_len / 4) as u8) << 4;
    tcp[13] = segment.flags;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    tcp[20..tcp_len].copy_from_slice(&segment.options);
    tcp[tcp_len..].copy_from_slice(&segment.payload);
    set_tcp_checksum(&mut frame);
    frame
}

fn seq_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[38..42].try_into().expect("4"))
}

fn ack_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[42..46].try_into().expect("4"))
}

#[test]
fn a_round_trip_through_the_translation_is_the_identity_for_the_stack() {
    let translation = IsnTranslation::new(KEY);
    let guest = (GUEST, 7);
    let host = (HOST, 49_152);
    let offset = translation.offset(GUEST, 7, HOST, 49_152);
    for stack_seq in [0u32, 1, 0x7fff_ffff, 0xffff_fff0, offset.wrapping_neg()] {
        // The stack sends with its own number; the wire carries it plus F.
        let mut out = frame(&seg(guest, host, stack_seq, 12345));
        assert!(translation.outgoing(&mut out, true));
        assert_eq!(seq_of(&out), stack_seq.wrapping_add(offset));
        assert_eq!(ack_of(&out), 12345, "the peer's numbers are not touched");
        assert!(tcp_checksum_ok(&out), "checksum after outgoing");
        // The peer acknowledges what it saw; the stack gets its own number back.
        let mut reply = frame(&seg(host, guest, 12345, seq_of(&out).wrapping_add(18)));
        assert!(translation.incoming(&mut reply));
        assert_eq!(ack_of(&reply), stack_seq.wrapping_add(18));
        assert_eq!(seq_of(&reply), 12345, "the peer's numbers are not touched");
        assert!(tcp_checksum_ok(&reply), "checksum after incoming");
    }
}

#[test]
fn the_offset_differs_per_four_tuple_and_per_key() {
    let translation = IsnTranslation::new(KEY);
    let base = translation.offset(GUEST, 7, HOST, 49_152);
    assert_ne!(base, translation.offset(GUEST, 7, HOST, 49_153));
    assert_ne!(base, translation.offset(GUEST, 7, [10, 0, 2, 3], 49_152));
    assert_ne!(base, translation.offset(GUEST, 8, HOST, 49_152));
    assert_ne!(
        base,
        translation.offset(HOST, 49_152, GUEST, 7),
        "direction matters"
    );
    assert_ne!(
        base,
        IsnTranslation::new([0; 16]).offset(GUEST, 7, HOST, 49_152)
    );
    assert_eq!(
        base,
        IsnTranslation::new(KEY).offset(GUEST, 7, HOST, 49_152)
    );
}

#[test]
fn sack_edges_are_translated_and_the_checksum_follows() {
    let translation = IsnTranslation::new(KEY);
    let offset = translation.offset(GUEST, 7, HOST, 40_000);
    let edges = [1000u32, 2000, 0xffff_ff00, 0x0000_0100];
    // NOP, NOP, SACK with two blocks (2 + 16 bytes): 20 bytes of options.
    let mut options = vec![1, 1, 5, 18];
    for edge in edges {
        options.extend_from_slice(&edge.to_be_bytes());
    }
    let mut segment = seg((HOST, 40_000), (GUEST, 7), 5, 77);
    segment.options = options;
    let mut wire = frame(&segment);
    assert!(translation.incoming(&mut wire));
    assert_eq!(ack_of(&wire), 77u32.wrapping_sub(offset));
    for (index, edge) in edges.iter().enumerate() {
        let at = 34 + 20 + 4 + 4 * index;
        let value = u32::from_be_bytes(wire[at..at + 4].try_into().expect("4"));
        assert_eq!(value, edge.wrapping_sub(offset), "edge {index}");
    }
    assert!(tcp_checksum_ok(&wire));
}

#[test]
fn checksums_stay_valid_for_many_numbers_and_a_bad_one_stays_bad() {
    let translation = IsnTranslation::new(KEY);
    let mut state = 0x1234_5678_9abc_def0u64;
    for round in 0..2000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let seq = (state >> 32) as u32;
        let ack = state as u32;
        let port = 1024 + (round as u16);
        let mut segment = seg((GUEST, 7), (HOST, port), seq, ack);
        segment.payload = (0..(round % 37)).map(|byte| byte as u8).collect();
        let mut out = frame(&segment);
        translation.outgoing(&mut out, true);
        assert!(tcp_checksum_ok(&out), "outgoing round {round}");
        let mut incoming = frame(&seg((HOST, port), (GUEST, 7), ack, seq));
        translation.incoming(&mut incoming);
        assert!(tcp_checksum_ok(&incoming), "incoming round {round}");
    }
    let mut corrupted = frame(&seg((HOST, 1), (GUEST, 7), 1, 2));
    corrupted[34 + 16] ^= 0x40;
    translation.incoming(&mut corrupted);
    assert!(
        !tcp_checksum_ok(&corrupted),
        "a corrupted segment is still rejected"
    );
}

#[test]
fn rfc1624_adjustment_matches_a_recomputation() {
    // A field change from all zeros to all ones and back, and arbitrary words.
    for (checksum, old, new) in [
        (0x1234u16, 0u32, 0xffff_ffffu32),
        (0xffff, 0xffff_ffff, 0),
        (0x0000, 0x8000_0001, 0x7fff_fffe),
        (0xdead, 0x0102_0304, 0x0102_0304),
    ] {
        // Model: a segment whose only words are the field and a filler making the checksum.
        let adjusted = adjust_checksum(checksum, old, new);
        let sum = |field: u32, check: u16| {
            let mut total = u32::from(check) + (field >> 16) + (field & 0xffff);
            while total > 0xffff {
                total = (total & 0xffff) + (total >> 16);
            }
            total
        };
        // Both before and after, field + checksum sum to the same one's complement value.
        let before = sum(old, checksum);
        let after = sum(new, adjusted);
        assert!(
            before == after || (before % 0xffff == after % 0xffff),
            "{checksum:#x} {old:#x} {new:#x}: {before:#x} vs {after:#x}"
        );
    }
}

#[test]
fn with_checksum_offload_the_field_is_left_to_the_device() {
    let translation = IsnTranslation::new(KEY);
    let mut out = frame(&seg((GUEST, 7), (HOST, 50_000), 10, 20));
    // The stack leaves the field for the device: here, a pseudo-header sum stand-in.
    out[34 + 16..34 + 18].copy_from_slice(&[0xab, 0xcd]);
    assert!(translation.outgoing(&mut out, false));
    assert_eq!(&out[34 + 16..34 + 18], &[0xab, 0xcd]);
    assert_eq!(
        seq_of(&out),
        10u32.wrapping_add(translation.offset(GUEST, 7, HOST, 50_000))
    );
}

#[test]
fn other_frames_pass_untouched_and_truncated_ones_never_panic() {
    let translation = IsnTranslation::new(KEY);
    let tcp = frame(&seg((GUEST, 7), (HOST, 50_000), 10, 20));
    let mut udp = tcp.clone();
    udp[14 + 9] = 17;
    let mut fragment = tcp.clone();
    fragment[14 + 6] = 0x20; // MF
    let mut arp = tcp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut ipv6 = tcp.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut bad_offset = tcp.clone();
    bad_offset[34 + 12] = 0x40; // data offset 4 words
    let mut long_offset = tcp.clone();
    long_offset[34 + 12] = 0xf0; // past the segment
    for (name, original) in [
        ("udp", udp),
        ("fragment", fragment),
        ("arp", arp),
        ("ipv6", ipv6),
        ("bad offset", bad_offset),
        ("long offset", long_offset),
    ] {
        let mut copy = original.clone();
        assert!(!translation.outgoing(&mut copy, true), "{name}");
        assert!(!translation.incoming(&mut copy), "{name}");
        assert_eq!(copy, original, "{name}");
    }
    // Every prefix of a segment with options (the IP total length then lies).
    let mut segment = seg((HOST, 1), (GUEST, 7), 1, 2);
    segment.options = vec![5, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1];
    let full = frame(&segment);
    for length in 0..full.len() {
        let mut prefix = full[..length].to_vec();
        translation.incoming(&mut prefix);
        translation.outgoing(&mut prefix, true);
    }
    // Malformed option lists end the walk without panicking.
    for options in [
        vec![5, 0, 1, 1],
        vec![5, 1, 1, 1],
        vec![5, 200, 1, 1],
        vec![2, 4, 5, 180],
    ] {
        let mut segment = seg((HOST, 1), (GUEST, 7), 1, 2);
        segment.options = options;
        let mut wire = frame(&segment);
        assert!(translation.incoming(&mut wire));
        assert!(tcp_checksum_ok(&wire));
    }
}

fn mss_of(frame: &[u8]) -> Option<u16> {
    let options = &frame[54..14 + 20 + usize::from(frame[14 + 20 + 12] >> 4) * 4];
    let mut at = 0;
    while at + 1 < options.len() {
        match options[at] {
            0 => return None,
            1 => at += 1,
            2 => return Some(u16::from_be_bytes([options[at + 2], options[at + 3]])),
            _ => at += usize::from(options[at + 1]).max(2),
        }
    }
    None
}

fn syn_with_mss(flags: u8, mss: u16, leading_nops: usize) -> Vec<u8> {
    let mut segment = seg((HOST, 40000), (GUEST, 7), 1000, 0);
    segment.flags = flags;
    segment.payload.clear();
    let mut options = vec![1u8; leading_nops];
    options.extend_from_slice(&[2, 4]);
    options.extend_from_slice(&mss.to_be_bytes());
    // Window scale (3 bytes) and padding to a 32-bit boundary.
    options.extend_from_slice(&[1, 3, 3, 7]);
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    segment.options = options;
    frame(&segment)
}

const SEGMENTATION: MssRewrite = MssRewrite {
    link_mss: 1460,
    stack_mss: 65481,
};

#[test]
fn segmentation_raises_a_full_sized_peer_mss_and_leaves_a_smaller_one() {
    for flags in [0x02, 0x12] {
        for (peer, expected) in [
            (1460, 65481),
            (8960, 65481),
            (65481, 65481),
            (1400, 1400),
            (536, 536),
        ] {
            let mut syn = syn_with_mss(flags, peer, 0);
            let changed = SEGMENTATION.incoming(&mut syn);
            assert_eq!(mss_of(&syn), Some(expected), "peer MSS {peer}");
            assert_eq!(changed, expected != peer);
            assert!(tcp_checksum_ok(&syn), "checksum after raising {peer}");
        }
    }
    // Not a SYN: an MSS option (invalid there) is not touched.
    let mut ack = syn_with_mss(0x10, 1460, 0);
    assert!(!SEGMENTATION.incoming(&mut ack));
    assert_eq!(mss_of(&ack), Some(1460));
}

#[test]
fn segmentation_lowers_the_stacks_own_mss_to_the_links() {
    for stack_checksum in [true, false] {
        let mut syn_ack = syn_with_mss(0x12, 65481, 0);
        assert!(SEGMENTATION.outgoing(&mut syn_ack, stack_checksum));
        assert_eq!(mss_of(&syn_ack), Some(1460));
        // With checksum offload the field is the device's: only a full one is kept valid.
        assert_eq!(tcp_checksum_ok(&syn_ack), stack_checksum);
    }
    let mut small = syn_with_mss(0x12, 1200, 0);
    assert!(!SEGMENTATION.outgoing(&mut small, true));
    assert_eq!(mss_of(&small), Some(1200));
}

#[test]
fn an_mss_option_off_the_16_bit_grid_is_left_alone() {
    // One NOP before it: the option starts at an odd offset; not rewritten (the connection
    // then sends link-sized segments), never mangled.
    let mut syn = syn_with_mss(0x02, 1460, 1);
    let before = syn.clone();
    assert!(!SEGMENTATION.incoming(&mut syn));
    assert_eq!(syn, before);
    // Truncated SYNs never panic.
    let full = syn_with_mss(0x02, 1460, 0);
    for cut in 0..full.len() {
        let mut truncated = full[..cut].to_vec();
        let _ = SEGMENTATION.incoming(&mut truncated);
        let _ = SEGMENTATION.outgoing(&mut truncated, true);
    }
}
