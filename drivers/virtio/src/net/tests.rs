//! Host tests of the virtio-net driver against a fake virtio-net device ([`device`]): feature
//! negotiation, receive (in place and mergeable), checksums in both directions, transmit
//! back-pressure, the control queue, link status, vectors, long-run accounting and a
//! misbehaving device.
//!
//! Frames are built here from scratch and checksums are verified with an implementation of
//! RFC 1071 that shares no code with the driver's.

mod checksum;
mod control;
mod datapath;
mod device;
mod misbehaving;
mod negotiation;
mod platform;
mod recovery;

use std::cell::RefCell;

use device::{NetModel, NetTransport, World};

use super::{NetError, NetOptions, VirtioNet};
use crate::dma::host::HostDma;
use crate::spec::{Features, NetFeatures};

/// The driver under test.
type Net<'m, 'w> = VirtioNet<&'w HostDma, NetTransport<'m, 'w>>;

/// Feature mask of the given bit numbers.
fn bits(masks: &[u64]) -> u64 {
    masks.iter().fold(0, |all, mask| all | mask)
}

/// What QEMU 7.2's `virtio-net-pci` offers by default that this driver cares about, plus a
/// few it does not (TSO/UFO), which must never be negotiated.
fn qemu_features() -> u64 {
    bits(&[
        Features::VERSION_1.bits(),
        Features::INDIRECT_DESC.bits(),
        Features::EVENT_IDX.bits(),
        NetFeatures::CSUM.bits(),
        NetFeatures::GUEST_CSUM.bits(),
        NetFeatures::MAC.bits(),
        NetFeatures::MRG_RXBUF.bits(),
        NetFeatures::STATUS.bits(),
        NetFeatures::CTRL_VQ.bits(),
        NetFeatures::MTU.bits(),
        NetFeatures::GUEST_TSO4.bits(),
        NetFeatures::HOST_TSO4.bits(),
        NetFeatures::HOST_UFO.bits(),
        NetFeatures::CTRL_RX.bits(),
        NetFeatures::GUEST_ANNOUNCE.bits(),
    ])
}

/// Brings the driver up on `world`.
fn up<'m, 'w>(
    world: &'w World,
    model: &'m RefCell<NetModel<'w>>,
    options: NetOptions,
) -> Result<Net<'m, 'w>, NetError> {
    VirtioNet::new(&world.dma, world.transport(model), options)
}

/// Small-ring options so the tests run quickly (rx 64, tx 64).
fn small() -> NetOptions {
    NetOptions {
        rx_queue_size: 64,
        tx_queue_size: 64,
        // The frames here are built for both directions (destination: the host's MAC).
        drop_foreign: false,
        ..NetOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const HOST_IP: [u8; 4] = [10, 0, 2, 2];
/// IP protocol numbers.
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
/// Offset of the IPv4 header in an untagged Ethernet frame.
const IP_AT: usize = 14;

/// Deterministic filler.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|index| (index.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

/// An IPv4 frame (Ethernet II) carrying `protocol`: a UDP (8-byte) or TCP (20-byte) header
/// with a zero checksum, or an ICMP echo header, then `payload_len` bytes. `options` is the
/// number of 4-byte IPv4 option words; `fragment` is the raw flags/fragment-offset field. The
/// IPv4 header checksum is correct.
fn ipv4_frame(
    protocol: u8,
    payload_len: usize,
    options: usize,
    fragment: u16,
    seed: u64,
) -> Vec<u8> {
    let transport_header = match protocol {
        TCP => 20,
        UDP | ICMP => 8,
        _ => 0,
    };
    let ip_header = 20 + 4 * options;
    let total = ip_header + transport_header + payload_len;
    let mut frame = Vec::with_capacity(IP_AT + total);
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0u8; ip_header];
    ip[0] = 0x40 | (ip_header / 4) as u8;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&(seed as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&fragment.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&HOST_IP);
    ip[16..20].copy_from_slice(&GUEST_IP);
    // Options: NOPs (type 1).
    ip[20..].fill(1);
    let header_checksum = !rfc1071(&[&ip]);
    ip[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    let segment_len = transport_header + payload_len;
    match protocol {
        TCP => {
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&7u16.to_be_bytes());
            tcp[4..8].copy_from_slice(&(seed as u32).to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x18;
            tcp[14..16].copy_from_slice(&0xfaf0u16.to_be_bytes());
            frame.extend_from_slice(&tcp);
        }
        UDP => {
            let mut udp = [0u8; 8];
            udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            udp[2..4].copy_from_slice(&7u16.to_be_bytes());
            udp[4..6].copy_from_slice(&(segment_len as u16).to_be_bytes());
            frame.extend_from_slice(&udp);
        }
        ICMP => {
            frame.extend_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        }
        _ => {}
    }
    frame.extend_from_slice(&payload(payload_len, seed));
    if protocol == ICMP {
        let icmp_checksum = !rfc1071(&[&frame[IP_AT + ip_header..]]);
        let at = IP_AT + ip_header + 2;
        frame[at..at + 2].copy_from_slice(&icmp_checksum.to_be_bytes());
    }
    frame
}

/// A `len`-byte frame with a non-IP EtherType (0x88b5, local experimental), so that no
/// checksum offload touches it, and filler from `seed`.
fn raw_frame(len: usize, seed: u64) -> Vec<u8> {
    let mut frame = payload(len, seed);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    frame
}

/// An ARP request (42 bytes).
fn arp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&GUEST_IP);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&HOST_IP);
    frame
}

// ---------------------------------------------------------------------------------------------
// An independent internet checksum (RFC 1071, RFC 768, RFC 793)

/// The folded 16-bit ones'-complement sum of the byte strings, each taken as big-endian words
/// (an odd final byte padded with zero). Sums in a u64 and folds once at the end.
fn rfc1071(parts: &[&[u8]]) -> u16 {
    let mut total: u64 = 0;
    for part in parts {
        let mut index = 0;
        while index < part.len() {
            let high = u64::from(part[index]);
            let low = part.get(index + 1).copied().map_or(0, u64::from);
            total += (high << 8) | low;
            index += 2;
        }
    }
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// Where the transport header and its checksum field are in an IPv4 frame:
/// (`csum_start`, `csum_offset`, protocol, segment length).
fn l4_layout(frame: &[u8]) -> (usize, usize, u8, usize) {
    let ihl = usize::from(frame[IP_AT] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[IP_AT + 2], frame[IP_AT + 3]]));
    let protocol = frame[IP_AT + 9];
    let offset = if protocol == TCP { 16 } else { 6 };
    (IP_AT + ihl, offset, protocol, total - ihl)
}

/// The IPv4 pseudo-header (RFC 793 §3.1, RFC 768) of the frame's transport segment.
fn pseudo_header(frame: &[u8]) -> Vec<u8> {
    let (_, _, protocol, segment_len) = l4_layout(frame);
    let mut pseudo = frame[IP_AT + 12..IP_AT + 20].to_vec();
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(segment_len as u16).to_be_bytes());
    pseudo
}

/// The correct TCP/UDP checksum of the frame's segment (ignoring what its field holds; a UDP
/// result of 0 is sent as 0xffff, RFC 768).
fn l4_checksum(frame: &[u8]) -> u16 {
    let (start, offset, protocol, segment_len) = l4_layout(frame);
    let mut segment = frame[start..start + segment_len].to_vec();
    segment[offset] = 0;
    segment[offset + 1] = 0;
    let checksum = !rfc1071(&[&pseudo_header(frame), &segment]);
    if protocol == UDP && checksum == 0 {
        0xffff
    } else {
        checksum
    }
}

/// The frame with its TCP/UDP checksum filled in correctly.
fn with_l4_checksum(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (start, offset, _, _) = l4_layout(frame);
    out[start + offset..start + offset + 2].copy_from_slice(&l4_checksum(frame).to_be_bytes());
    out
}

/// Whether the frame's TCP/UDP checksum verifies (the receiver's check: the sum over the
/// pseudo-header and the segment, field included, is all ones).
fn l4_verifies(frame: &[u8]) -> bool {
    let (start, _, _, segment_len) = l4_layout(frame);
    rfc1071(&[&pseudo_header(frame), &frame[start..start + segment_len]]) == 0xffff
}

/// The frame as a device hands it over with NEEDS_CSUM (a partial checksum, as Linux's
/// CHECKSUM_PARTIAL): the field holds the folded pseudo-header sum, not complemented.
/// Returns the frame, `csum_start` and `csum_offset`.
fn partial_checksum(frame: &[u8]) -> (Vec<u8>, u16, u16) {
    let mut out = frame.to_vec();
    let (start, offset, _, _) = l4_layout(frame);
    let pseudo = rfc1071(&[&pseudo_header(frame)]);
    out[start + offset..start + offset + 2].copy_from_slice(&pseudo.to_be_bytes());
    (out, start as u16, offset as u16)
}

#[test]
fn independent_checksum_matches_a_known_udp_datagram() {
    // RFC 1071 §3's worked example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert_eq!(
        rfc1071(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
        0xddf2
    );
    let frame = with_l4_checksum(&ipv4_frame(UDP, 33, 0, 0, 9));
    assert!(l4_verifies(&frame));
    let mut broken = frame.clone();
    *broken.last_mut().expect("payload") ^= 1;
    assert!(!l4_verifies(&broken));
}

// ---------------------------------------------------------------------------------------------
// Exchanges

/// Transmits `frame` (flushing) and returns what the device took off the transmit queue.
fn send(net: &mut Net<'_, '_>, model: &RefCell<NetModel<'_>>, frame: &[u8]) -> device::TxFrame {
    let sent = net
        .transmit(frame.len(), |buffer| buffer.copy_from_slice(frame))
        .expect("transmit");
    assert_eq!(sent, Some(()), "the frame was queued");
    net.flush().expect("flush");
    let mut model = model.borrow_mut();
    if model.tx_frames.is_empty() {
        model.process_tx();
    }
    assert_eq!(model.tx_frames.len(), 1, "the device got exactly one frame");
    model.tx_frames.remove(0)
}

/// Delivers `frame` (no offload flags) and returns the bytes the driver handed up, after
/// recycling the buffers.
fn bounce(net: &mut Net<'_, '_>, model: &RefCell<NetModel<'_>>, frame: &[u8]) -> Vec<u8> {
    model
        .borrow_mut()
        .deliver(device::WireHeader::default(), frame);
    let received = net.receive().expect("receive").expect("a frame");
    let bytes = received.bytes().to_vec();
    net.recycle(received).expect("recycle");
    net.flush().expect("flush");
    assert!(
        net.receive().expect("receive").is_none(),
        "exactly one frame"
    );
    bytes
}
