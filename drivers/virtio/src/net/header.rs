//! `struct virtio_net_hdr` (§5.1.6) and the internet checksum work around it: parsing the
//! header of a received buffer, completing a partial checksum the device left (NEEDS_CSUM,
//! §5.1.6.4) or verifying a TCP/UDP checksum nothing vouched for, and preparing a frame for
//! checksum offload or TCP segmentation (GSO_TCPV4) on transmit (§5.1.6.2). The field
//! offsets come from [`crate::spec::VirtioNetHdr`]. Pure functions over byte slices: the
//! fuzz targets and the host tests call them directly.

use crate::spec::net_hdr;

/// Size of `struct virtio_net_hdr` with VERSION_1 (`num_buffers` always present, §5.1.6).
pub const NET_HEADER_LEN: usize = net_hdr::LEN;
/// `flags`: the checksum from `csum_start` must be completed (§5.1.6.2).
pub const HDR_F_NEEDS_CSUM: u8 = net_hdr::F_NEEDS_CSUM;
/// `flags`: the device validated the checksum (§5.1.6.4).
pub const HDR_F_DATA_VALID: u8 = net_hdr::F_DATA_VALID;
/// `gso_type`: no segmentation offload.
pub const HDR_GSO_NONE: u8 = net_hdr::GSO_NONE;

/// Ethernet header length.
pub(crate) const ETHERNET_HEADER_LEN: usize = 14;

/// The fields of `struct virtio_net_hdr` the receive path uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `flags`.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers`.
    pub num_buffers: u16,
}

/// Writes the header of a frame to send with checksum offload: NEEDS_CSUM, no segmentation,
/// and where the checksum starts and goes (§5.1.6.2). `header` is [`NET_HEADER_LEN`] bytes,
/// zeroed by the caller.
pub fn write_checksum_offload_header(header: &mut [u8], csum_start: u16, csum_offset: u16) {
    header[net_hdr::FLAGS] = HDR_F_NEEDS_CSUM;
    header[net_hdr::GSO_TYPE] = HDR_GSO_NONE;
    header[net_hdr::CSUM_START..net_hdr::CSUM_START + 2].copy_from_slice(&csum_start.to_le_bytes());
    header[net_hdr::CSUM_OFFSET..net_hdr::CSUM_OFFSET + 2]
        .copy_from_slice(&csum_offset.to_le_bytes());
}

/// `gso_type`: TCP over IPv4 segmentation (§5.1.6).
pub const HDR_GSO_TCPV4: u8 = 1;

/// Writes the header of a TCP/IPv4 frame for the device to segment (§5.1.6.2, HOST_TSO4):
/// NEEDS_CSUM from `csum_start`, GSO_TCPV4, `hdr_len` bytes of headers to repeat in each
/// segment and `gso_size` payload bytes per segment. `header` is [`NET_HEADER_LEN`] bytes.
pub fn write_segmentation_header(
    header: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
    hdr_len: u16,
    gso_size: u16,
) {
    write_checksum_offload_header(header, csum_start, csum_offset);
    header[net_hdr::GSO_TYPE] = HDR_GSO_TCPV4;
    header[net_hdr::HDR_LEN..net_hdr::HDR_LEN + 2].copy_from_slice(&hdr_len.to_le_bytes());
    header[net_hdr::GSO_SIZE..net_hdr::GSO_SIZE + 2].copy_from_slice(&gso_size.to_le_bytes());
}

/// For a frame to segment: `(hdr_len, gso_size)` when it is an IPv4 TCP segment whose
/// headers (Ethernet, IPv4, TCP with options) end at `hdr_len`, cut so that every segment
/// fills at most `mtu` bytes of IP packet; `None` for anything else (which cannot be
/// segmented, so must not exceed the MTU).
pub fn segmentation_layout(frame: &[u8], mtu: u16) -> Option<(u16, u16)> {
    let at = transport(frame)?;
    if at.checksum_offset != 16 || frame.len() < at.start + 20 {
        return None;
    }
    let tcp_header = usize::from(frame[at.start + 12] >> 4) * 4;
    let hdr_len = at.start + tcp_header;
    let ip_headers = hdr_len - ETHERNET_HEADER_LEN;
    if tcp_header < 20 || hdr_len > at.end || usize::from(mtu) <= ip_headers {
        return None;
    }
    Some((hdr_len as u16, (usize::from(mtu) - ip_headers) as u16))
}

/// Parses the 12-byte header at the start of `bytes` (zeros past the end).
pub fn parse_header(bytes: &[u8]) -> NetHeader {
    let byte = |index: usize| bytes.get(index).copied().unwrap_or(0);
    let le16 = |index: usize| u16::from_le_bytes([byte(index), byte(index + 1)]);
    NetHeader {
        flags: byte(net_hdr::FLAGS),
        gso_type: byte(net_hdr::GSO_TYPE),
        csum_start: le16(net_hdr::CSUM_START),
        csum_offset: le16(net_hdr::CSUM_OFFSET),
        num_buffers: le16(net_hdr::NUM_BUFFERS),
    }
}

/// The internet checksum (RFC 1071) accumulator over `bytes`, unfolded.
fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum (NEEDS_CSUM, §5.1.6.4): the ones' complement of the sum from
/// `start` to the end of the frame goes at `start + offset`. The field holds the pseudo-header
/// sum already. Returns false (the frame is malformed) when the offsets do not fit.
pub fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) -> bool {
    if !partial_checksum_fits(frame.len(), start, offset) {
        return false;
    }
    let start = usize::from(start);
    let field = start + usize::from(offset);
    // A computed 0 goes out as 0xffff, its ones'-complement equal: for UDP a 0 field means
    // "no checksum" (RFC 768); Linux does the same (CSUM_MANGLED_0).
    let checksum = match !fold(sum_words(&frame[start..], 0)) {
        0 => 0xffff,
        checksum => checksum,
    };
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// Where an unfragmented IPv4 TCP or UDP segment sits in an Ethernet frame.
struct Transport {
    /// Offset of the transport header in the frame.
    start: usize,
    /// Offset of the checksum field within the transport header.
    checksum_offset: usize,
    /// The pseudo-header sum (RFC 793 §3.1, RFC 768), folded.
    pseudo: u16,
    /// Offset of the end of the IP packet in the frame.
    end: usize,
}

/// Locates the TCP or UDP segment of an IPv4 frame; `None` for anything else (ARP, ICMP,
/// fragments, malformed lengths).
fn transport(frame: &[u8]) -> Option<Transport> {
    if frame.len() < ETHERNET_HEADER_LEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETHERNET_HEADER_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ip[0] >> 4 != 4
        || header_len < 20
        || total_len < header_len
        || total_len > ip.len()
        || fragment != 0
    {
        return None;
    }
    let protocol = ip[9];
    let checksum_offset: usize = match protocol {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    let segment_len = total_len - header_len;
    if segment_len < checksum_offset + 2 {
        return None;
    }
    let mut sum = sum_words(&ip[12..20], 0);
    sum = sum.wrapping_add(u32::from(protocol));
    sum = sum.wrapping_add(segment_len as u32);
    Some(Transport {
        start: ETHERNET_HEADER_LEN + header_len,
        checksum_offset,
        pseudo: fold(sum),
        end: ETHERNET_HEADER_LEN + total_len,
    })
}

/// For a TCP or UDP over IPv4 frame, stores the pseudo-header sum in the transport checksum
/// field and returns (`csum_start`, `csum_offset`) for NEEDS_CSUM (§5.1.6.2). Other frames
/// (ARP, ICMP, fragments, malformed) return `None` and keep the checksum the stack computed.
pub fn prepare_checksum_offload(frame: &mut [u8]) -> Option<(u16, u16)> {
    let at = transport(frame)?;
    let field = at.start + at.checksum_offset;
    frame[field..field + 2].copy_from_slice(&at.pseudo.to_be_bytes());
    Some((at.start as u16, at.checksum_offset as u16))
}

/// Verifies the TCP or UDP checksum of an unfragmented IPv4 frame (RFC 1071 over the
/// pseudo-header and the segment): `Some(true)` when it is right, `Some(false)` when it is
/// wrong, `None` when there is nothing to verify here (not IPv4 TCP/UDP, a fragment, a
/// malformed length, or UDP without a checksum, RFC 768); the stack decides about those.
pub fn verify_transport_checksum(frame: &[u8]) -> Option<bool> {
    let at = transport(frame)?;
    let field = at.start + at.checksum_offset;
    if at.checksum_offset == 6 && frame[field..field + 2] == [0, 0] {
        return None;
    }
    let sum = sum_words(&frame[at.start..at.end], u32::from(at.pseudo));
    Some(fold(sum) == 0xffff)
}

/// Whether a partial checksum's `csum_start`/`csum_offset` (NEEDS_CSUM) fit in a frame of
/// `length` bytes: what [`complete_checksum`] checks before writing.
pub fn partial_checksum_fits(length: usize, start: u16, offset: u16) -> bool {
    let start = usize::from(start);
    start < length && start + usize::from(offset) + 2 <= length
}
