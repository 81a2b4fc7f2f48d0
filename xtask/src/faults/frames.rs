//! The frames of the fault tests: Ethernet, IPv4, UDP, TCP and ARP builders with correct
//! checksums, and [`FrameFactory`], which makes every kind of malformed frame and the SYNs of a
//! flood, reproducibly from a seed. Pure functions: nothing here touches a socket.

use std::fmt;
use std::net::Ipv4Addr;

use super::Endpoints;
use crate::client::internet_checksum;

/// A small deterministic generator (xorshift64*): reproducible fault sequences from a seed,
/// without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: usize, high: usize) -> usize {
        low + self.below((high - low + 1) as u64) as usize
    }

    /// Fills `bytes` with random bytes.
    pub fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// `count` random bytes.
    pub fn bytes(&mut self, count: usize) -> Vec<u8> {
        let mut bytes = vec![0; count];
        self.fill(&mut bytes);
        bytes
    }
}

/// The kinds of bad input [`FrameFactory::malformed`] makes. None of them is a valid request to
/// any of the guest's services, so a correct guest echoes none of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Malformation {
    /// 14 to 59 bytes: an Ethernet header and a cut-off IPv4 or ARP start.
    Runt,
    /// The guest's MAC, then random bytes (random ethertype and length).
    RandomBytes,
    /// IPv4 with a header length below 5 words, or longer than the packet.
    BadIhl,
    /// IPv4 whose total length claims more bytes than the frame holds.
    TotalLengthTooLong,
    /// IPv4 whose total length is shorter than its own header (or than the UDP header).
    TotalLengthTooShort,
    /// IPv4 with a version other than 4 under the IPv4 ethertype.
    BadVersion,
    /// A UDP echo request whose IPv4 header checksum is wrong.
    BadIpChecksum,
    /// A UDP echo request (port 7) whose UDP checksum is wrong.
    BadUdpChecksum,
    /// A UDP datagram whose length field disagrees with the IPv4 payload.
    BadUdpLength,
    /// A TCP segment to port 7 whose checksum is wrong.
    BadTcpChecksum,
    /// An ICMP echo request whose checksum is wrong.
    BadIcmpChecksum,
    /// An IPv4 fragment (more-fragments set, or a non-zero offset) of a UDP echo request whose
    /// other fragments never come.
    Fragment,
    /// ARP with a bad hardware or protocol type, bad lengths, an unknown operation, a
    /// truncated body, or a request for another address (never a claim for a real host).
    ArpGarbage,
    /// An ethertype nobody speaks (IPX, AppleTalk, made-up values, and IPv6).
    UnknownEthertype,
    /// 802.1Q and 802.1ad (QinQ) tagged frames around a UDP echo request with a bad checksum.
    VlanTagged,
    /// Longer than a 1500-byte MTU allows (up to 9014 bytes; needs a tap MTU above 1500).
    Oversize,
}

impl Malformation {
    /// Every kind, in a fixed order.
    pub const ALL: [Malformation; 16] = [
        Malformation::Runt,
        Malformation::RandomBytes,
        Malformation::BadIhl,
        Malformation::TotalLengthTooLong,
        Malformation::TotalLengthTooShort,
        Malformation::BadVersion,
        Malformation::BadIpChecksum,
        Malformation::BadUdpChecksum,
        Malformation::BadUdpLength,
        Malformation::BadTcpChecksum,
        Malformation::BadIcmpChecksum,
        Malformation::Fragment,
        Malformation::ArpGarbage,
        Malformation::UnknownEthertype,
        Malformation::VlanTagged,
        Malformation::Oversize,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Malformation::Runt => "runt",
            Malformation::RandomBytes => "random-bytes",
            Malformation::BadIhl => "bad-ihl",
            Malformation::TotalLengthTooLong => "total-length-too-long",
            Malformation::TotalLengthTooShort => "total-length-too-short",
            Malformation::BadVersion => "bad-ip-version",
            Malformation::BadIpChecksum => "bad-ip-checksum",
            Malformation::BadUdpChecksum => "bad-udp-checksum",
            Malformation::BadUdpLength => "bad-udp-length",
            Malformation::BadTcpChecksum => "bad-tcp-checksum",
            Malformation::BadIcmpChecksum => "bad-icmp-checksum",
            Malformation::Fragment => "ipv4-fragment",
            Malformation::ArpGarbage => "arp-garbage",
            Malformation::UnknownEthertype => "unknown-ethertype",
            Malformation::VlanTagged => "vlan-tagged",
            Malformation::Oversize => "oversize",
        }
    }
}

impl fmt::Display for Malformation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the SYNs of a flood claim to come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynSource {
    /// The host side of the tap (its real IP and MAC) from random ports: the host's own stack
    /// answers each SYN-ACK with a reset.
    Host,
    /// Made-up peers 10.0.2.100 to 10.0.2.199 (on the guest's subnet, inside the namespace) that
    /// never answer, not even ARP: the classic spoofed flood.
    Spoofed,
}

const ETHERTYPE_IPV4: u16 = 0x0800;

const ETHERTYPE_ARP: u16 = 0x0806;

const ETHERTYPE_VLAN: u16 = 0x8100;

const ETHERTYPE_QINQ: u16 = 0x88A8;

const PROTO_ICMP: u8 = 1;

const PROTO_TCP: u8 = 6;

const PROTO_UDP: u8 = 17;

/// The guest's echo port.
const ECHO_PORT: u16 = 7;

/// An Ethernet frame: destination, source, ethertype, payload.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A 20-byte IPv4 header (no options) with a correct checksum.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    identification: u16,
    flags_fragment: u16,
) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0] = 0x45;
    let total = (20 + payload_len).min(usize::from(u16::MAX)) as u16;
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header[4..6].copy_from_slice(&identification.to_be_bytes());
    header[6..8].copy_from_slice(&flags_fragment.to_be_bytes());
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// The TCP/UDP checksum of `segment` (checksum field included as it is) under the IPv4
/// pseudo-header.
pub fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(12 + segment.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.push(0);
    data.push(protocol);
    data.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    data.extend_from_slice(segment);
    internet_checksum(&data)
}

/// A UDP datagram with a correct checksum (never 0: 0 means "no checksum" over IPv4).
pub fn udp_datagram(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    let checksum = match transport_checksum(src, dst, PROTO_UDP, &datagram) {
        0 => 0xFFFF,
        sum => sum,
    };
    datagram[6..8].copy_from_slice(&checksum.to_be_bytes());
    datagram
}

/// A TCP segment with a correct checksum: 20-byte header, then `options` (a multiple of 4
/// bytes), then `payload`.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let mut segment = Vec::with_capacity(header_len + payload.len());
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&ack.to_be_bytes());
    segment.push(((header_len / 4) as u8) << 4);
    segment.push(flags);
    segment.extend_from_slice(&64240u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]);
    segment.extend_from_slice(options);
    segment.extend_from_slice(payload);
    let checksum = transport_checksum(src, dst, PROTO_TCP, &segment);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Makes the frames of the fault tests, all addressed to the guest.
pub struct FrameFactory {
    ends: Endpoints,
    rng: Rng,
    identification: u16,
}

impl FrameFactory {
    /// A factory for `ends`, reproducible from `seed`.
    pub fn new(ends: Endpoints, seed: u64) -> FrameFactory {
        FrameFactory {
            ends,
            rng: Rng::new(seed),
            identification: 1,
        }
    }

    /// The random generator (to pick kinds with the same seed).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn next_id(&mut self) -> u16 {
        self.identification = self.identification.wrapping_add(1);
        self.identification
    }

    fn to_guest(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        ethernet(self.ends.guest_mac, self.ends.host_mac, ethertype, payload)
    }

    fn host_port(&mut self) -> u16 {
        40000 + self.rng.below(20000) as u16
    }

    /// A valid IPv4 packet from the host to the guest carrying `payload` of `protocol`.
    fn ipv4_to_guest(&mut self, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let id = self.next_id();
        let mut packet = ipv4_header(
            self.ends.host_ip,
            self.ends.guest_ip,
            protocol,
            payload.len(),
            id,
            0,
        )
        .to_vec();
        packet.extend_from_slice(payload);
        packet
    }

    /// A UDP echo request (port 7) whose UDP checksum is off by a random non-zero amount.
    fn udp_echo_bad_checksum(&mut self, payload_len: usize) -> Vec<u8> {
        let payload = self.rng.bytes(payload_len);
        let port = self.host_port();
        let mut datagram = udp_datagram(
            self.ends.host_ip,
            self.ends.guest_ip,
            port,
            ECHO_PORT,
            &payload,
        );
        corrupt_checksum(&mut datagram[6..8], &mut self.rng);
        datagram
    }

    /// A valid UDP echo request datagram (used inside frames broken elsewhere).
    fn udp_echo_datagram(&mut self, payload_len: usize) -> Vec<u8> {
        let payload = self.rng.bytes(payload_len);
        let port = self.host_port();
        udp_datagram(
            self.ends.host_ip,
            self.ends.guest_ip,
            port,
            ECHO_PORT,
            &payload,
        )
    }

    /// One malformed frame of `kind`.
    pub fn malformed(&mut self, kind: Malformation) -> Vec<u8> {
        match kind {
            Malformation::Runt => {
                // An IPv4 or ARP start cut anywhere before 60 bytes (the Ethernet minimum).
                let ethertype = if self.rng.below(2) == 0 {
                    ETHERTYPE_IPV4
                } else {
                    ETHERTYPE_ARP
                };
                let inner = if ethertype == ETHERTYPE_IPV4 {
                    let datagram = self.udp_echo_datagram(64);
                    self.ipv4_to_guest(PROTO_UDP, &datagram)
                } else {
                    arp_packet(
                        1,
                        self.ends.host_mac,
                        self.ends.host_ip,
                        [0; 6],
                        self.ends.guest_ip,
                    )
                };
                // Cut inside the IPv4 header or the UDP header (or the ARP body), so that the
                // packet is never whole.
                let keep = self.rng.between(0, 27).min(inner.len());
                self.to_guest(ethertype, &inner[..keep])
            }
            Malformation::RandomBytes => {
                let length = self.rng.between(14, 1514);
                let mut frame = self.rng.bytes(length);
                frame[..6].copy_from_slice(&self.ends.guest_mac);
                // Keep the random ethertype, except that a random IPv4 "packet" must not carry
                // a valid header checksum by accident: flip its checksum if it would verify.
                if length >= 34
                    && frame[12..14] == ETHERTYPE_IPV4.to_be_bytes()
                    && internet_checksum(&frame[14..34]) == 0
                {
                    frame[24] ^= 0xFF;
                }
                frame
            }
            Malformation::BadIhl => {
                let length = self.rng.between(0, 64);
                let datagram = self.udp_echo_datagram(length);
                let mut packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                // IHL 0..=4 (below the minimum) or 15 (60 bytes of header, more than a short
                // packet holds, or eating the UDP header).
                let ihl = match self.rng.below(6) {
                    5 => 15,
                    small => small as u8,
                };
                packet[0] = 0x40 | ihl;
                fix_ipv4_checksum(&mut packet);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::TotalLengthTooLong => {
                let length = self.rng.between(0, 256);
                let datagram = self.udp_echo_datagram(length);
                let mut packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                let actual = packet.len();
                let claimed = self.rng.between(actual + 1, 65535) as u16;
                packet[2..4].copy_from_slice(&claimed.to_be_bytes());
                fix_ipv4_checksum(&mut packet);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::TotalLengthTooShort => {
                let length = self.rng.between(1, 256);
                let datagram = self.udp_echo_datagram(length);
                let mut packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                // Shorter than the IPv4 header itself, or cutting into the UDP header.
                let claimed = self.rng.between(0, 27) as u16;
                packet[2..4].copy_from_slice(&claimed.to_be_bytes());
                fix_ipv4_checksum(&mut packet);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadVersion => {
                let length = self.rng.between(0, 128);
                let datagram = self.udp_echo_datagram(length);
                let mut packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                let versions = [0u8, 1, 5, 6, 7, 15];
                let version = versions[self.rng.below(versions.len() as u64) as usize];
                packet[0] = (version << 4) | 5;
                fix_ipv4_checksum(&mut packet);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadIpChecksum => {
                let length = self.rng.between(0, 512);
                let datagram = self.udp_echo_datagram(length);
                let mut packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                corrupt_checksum(&mut packet[10..12], &mut self.rng);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadUdpChecksum => {
                let length = self.rng.between(1, 1472);
                let datagram = self.udp_echo_bad_checksum(length);
                let packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadUdpLength => {
                let length = self.rng.between(8, 512);
                let mut datagram = self.udp_echo_datagram(length);
                let actual = datagram.len();
                // Longer than the IPv4 payload, or shorter than the UDP header; the checksum
                // is recomputed so that only the length is wrong.
                let claimed = if self.rng.below(2) == 0 {
                    self.rng.between(actual + 1, 65535)
                } else {
                    self.rng.between(0, 7)
                } as u16;
                datagram[4..6].copy_from_slice(&claimed.to_be_bytes());
                datagram[6..8].copy_from_slice(&[0, 0]);
                let checksum = match transport_checksum(
                    self.ends.host_ip,
                    self.ends.guest_ip,
                    PROTO_UDP,
                    &datagram,
                ) {
                    0 => 0xFFFF,
                    sum => sum,
                };
                datagram[6..8].copy_from_slice(&checksum.to_be_bytes());
                let packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadTcpChecksum => {
                let port = self.host_port();
                let seq = self.rng.next_u64() as u32;
                let flags = [
                    tcp_flags::SYN,
                    tcp_flags::ACK | tcp_flags::PSH,
                    tcp_flags::RST,
                    tcp_flags::FIN | tcp_flags::ACK,
                ][self.rng.below(4) as usize];
                let length = self.rng.between(0, 256);
                let payload = self.rng.bytes(length);
                let mut segment = tcp_segment(
                    self.ends.host_ip,
                    self.ends.guest_ip,
                    port,
                    ECHO_PORT,
                    seq,
                    0,
                    flags,
                    &[],
                    &payload,
                );
                corrupt_checksum(&mut segment[16..18], &mut self.rng);
                let packet = self.ipv4_to_guest(PROTO_TCP, &segment);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::BadIcmpChecksum => {
                let length = self.rng.between(0, 1024);
                let payload = self.rng.bytes(length);
                let mut icmp = crate::client::icmp_echo_request(
                    self.rng.next_u64() as u16,
                    self.rng.next_u64() as u16,
                    &payload,
                );
                corrupt_checksum(&mut icmp[2..4], &mut self.rng);
                let packet = self.ipv4_to_guest(PROTO_ICMP, &icmp);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::Fragment => {
                // A fragment of a bigger UDP echo request: either the first one (MF set, the
                // UDP header claims the whole datagram) or a later one (offset > 0). The rest
                // never comes, and the UDP checksum covers bytes that are never sent.
                let length = self.rng.between(64, 2000);
                let whole = self.udp_echo_datagram(length);
                let id = self.next_id();
                let first = self.rng.below(2) == 0;
                let (offset_units, part) = if first {
                    let cut = (self.rng.between(8, whole.len() - 8) / 8) * 8;
                    (0usize, &whole[..cut.max(8)])
                } else {
                    let units = self.rng.between(1, (whole.len() - 1) / 8);
                    (units, &whole[units * 8..])
                };
                let more = if first || self.rng.below(2) == 0 {
                    0x2000
                } else {
                    0
                };
                let flags_fragment = more | (offset_units as u16 & 0x1FFF);
                let mut packet = ipv4_header(
                    self.ends.host_ip,
                    self.ends.guest_ip,
                    PROTO_UDP,
                    part.len(),
                    id,
                    flags_fragment,
                )
                .to_vec();
                packet.extend_from_slice(part);
                self.to_guest(ETHERTYPE_IPV4, &packet)
            }
            Malformation::ArpGarbage => self.arp_garbage(),
            Malformation::UnknownEthertype => {
                let ethertypes = [0x8137u16, 0x809B, 0x88B5, 0x88B6, 0x1234, 0xFFFF, 0x86DD];
                let ethertype = ethertypes[self.rng.below(ethertypes.len() as u64) as usize];
                let length = self.rng.between(0, 1500);
                let payload = self.rng.bytes(length);
                self.to_guest(ethertype, &payload)
            }
            Malformation::VlanTagged => {
                let length = self.rng.between(1, 1400);
                let datagram = self.udp_echo_bad_checksum(length);
                let packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                let vid = (self.rng.below(4094) + 1) as u16;
                let mut tagged = Vec::new();
                let outer = if self.rng.below(3) == 0 {
                    // QinQ: an 802.1ad tag around an 802.1Q one.
                    tagged.extend_from_slice(&vid.to_be_bytes());
                    tagged.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                    ETHERTYPE_QINQ
                } else {
                    ETHERTYPE_VLAN
                };
                tagged.extend_from_slice(&((vid + 1) & 0x0FFF).to_be_bytes());
                tagged.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                tagged.extend_from_slice(&packet);
                self.to_guest(outer, &tagged)
            }
            Malformation::Oversize => {
                // 1515 to 9014 bytes: a UDP datagram to a closed port (9, discard), a UDP echo
                // request with a bad checksum, or random bytes under the IPv4 ethertype.
                let length = self.rng.between(1515, 9014);
                let payload_len = length - 14 - 20 - 8;
                match self.rng.below(3) {
                    0 => {
                        let payload = self.rng.bytes(payload_len);
                        let port = self.host_port();
                        let datagram =
                            udp_datagram(self.ends.host_ip, self.ends.guest_ip, port, 9, &payload);
                        let packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                        self.to_guest(ETHERTYPE_IPV4, &packet)
                    }
                    1 => {
                        let datagram = self.udp_echo_bad_checksum(payload_len);
                        let packet = self.ipv4_to_guest(PROTO_UDP, &datagram);
                        self.to_guest(ETHERTYPE_IPV4, &packet)
                    }
                    _ => {
                        let body = self.rng.bytes(length - 14);
                        let mut frame = self.to_guest(ETHERTYPE_IPV4, &body);
                        if internet_checksum(&frame[14..34]) == 0 {
                            frame[24] ^= 0xFF;
                        }
                        frame
                    }
                }
            }
        }
    }

    fn arp_garbage(&mut self) -> Vec<u8> {
        let ends = self.ends;
        // A stranger on the subnet (never the host itself: a well-formed ARP from the host's
        // address with a wrong MAC would be a legitimate cache update, not garbage).
        let stranger_ip = Ipv4Addr::new(10, 0, 2, 100 + self.rng.below(100) as u8);
        let mut stranger_mac = self.rng.bytes(6);
        stranger_mac[0] = (stranger_mac[0] & 0xFE) | 0x02;
        let stranger_mac: [u8; 6] = stranger_mac.try_into().unwrap_or([2, 0, 0, 0, 0, 1]);
        let mut arp = arp_packet(1, ends.host_mac, ends.host_ip, [0; 6], ends.guest_ip);
        match self.rng.below(7) {
            // Hardware type not Ethernet.
            0 => arp[0..2].copy_from_slice(&(2 + self.rng.below(100) as u16).to_be_bytes()),
            // Protocol type not IPv4.
            1 => arp[2..4].copy_from_slice(&0x86DDu16.to_be_bytes()),
            // Address lengths that lie.
            2 => {
                arp[4] = self.rng.below(256) as u8;
                arp[5] = self.rng.below(256) as u8;
                if arp[4] == 6 && arp[5] == 4 {
                    arp[4] = 8;
                }
            }
            // Unknown operation.
            3 => arp[6..8].copy_from_slice(&(3 + self.rng.below(1000) as u16).to_be_bytes()),
            // Truncated body.
            4 => arp.truncate(self.rng.between(0, 27)),
            // A request for somebody else, from a stranger.
            5 => {
                arp = arp_packet(
                    1,
                    stranger_mac,
                    stranger_ip,
                    [0; 6],
                    Ipv4Addr::new(10, 0, 2, 200 + self.rng.below(50) as u8),
                );
            }
            // A broadcast or multicast sender (must not enter any cache).
            _ => {
                arp = arp_packet(2, [0xFF; 6], stranger_ip, ends.guest_mac, ends.guest_ip);
            }
        }
        let dst = if self.rng.below(2) == 0 {
            ends.guest_mac
        } else {
            [0xFF; 6]
        };
        ethernet(dst, ends.host_mac, ETHERTYPE_ARP, &arp)
    }

    /// One SYN to the guest's echo port from `source`.
    pub fn syn(&mut self, source: SynSource) -> Vec<u8> {
        let (src_mac, src_ip) = match source {
            SynSource::Host => (self.ends.host_mac, self.ends.host_ip),
            SynSource::Spoofed => {
                let mut mac = self.rng.bytes(6);
                mac[0] = (mac[0] & 0xFE) | 0x02;
                (
                    mac.try_into().unwrap_or([2, 0, 0, 0, 0, 1]),
                    Ipv4Addr::new(10, 0, 2, 100 + self.rng.below(100) as u8),
                )
            }
        };
        let port = self.host_port();
        let seq = self.rng.next_u64() as u32;
        // MSS 1460, SACK permitted, window scale 7 (what a real client offers).
        let options = [2, 4, 0x05, 0xB4, 4, 2, 1, 3, 3, 7];
        let mut padded = options.to_vec();
        padded.resize(12, 1);
        padded[10] = 1;
        padded[11] = 0;
        let segment = tcp_segment(
            src_ip,
            self.ends.guest_ip,
            port,
            ECHO_PORT,
            seq,
            0,
            tcp_flags::SYN,
            &padded,
            &[],
        );
        let id = self.next_id();
        let mut packet = ipv4_header(
            src_ip,
            self.ends.guest_ip,
            PROTO_TCP,
            segment.len(),
            id,
            0x4000,
        )
        .to_vec();
        packet.extend_from_slice(&segment);
        ethernet(self.ends.guest_mac, src_mac, ETHERTYPE_IPV4, &packet)
    }
}

/// An ARP packet for Ethernet/IPv4 (28 bytes).
pub fn arp_packet(
    operation: u16,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4];
    arp.extend_from_slice(&operation.to_be_bytes());
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip.octets());
    arp.extend_from_slice(&target_mac);
    arp.extend_from_slice(&target_ip.octets());
    arp
}

fn fix_ipv4_checksum(packet: &mut [u8]) {
    packet[10..12].copy_from_slice(&[0, 0]);
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// Adds a random non-zero amount to a 16-bit checksum field, so that it can no longer verify
/// (and never becomes 0, which means "no checksum" for UDP over IPv4).
fn corrupt_checksum(field: &mut [u8], rng: &mut Rng) {
    let old = u16::from_be_bytes([field[0], field[1]]);
    // 0x0000 and 0xFFFF are the same value in ones' complement (and 0 means "no checksum" for
    // UDP): never pick either, nor the old value.
    let mut new = old.wrapping_add(1 + rng.below(0xFFFD) as u16);
    while new == old || new == 0 || new == 0xFFFF {
        new = new.wrapping_add(1);
    }
    field.copy_from_slice(&new.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> Endpoints {
        Endpoints {
            guest_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            guest_ip: Ipv4Addr::new(10, 0, 2, 15),
            host_mac: [0x02, 0, 0, 0, 0, 1],
            host_ip: Ipv4Addr::new(10, 0, 2, 2),
        }
    }

    /// Whether `frame` is a well-formed UDP echo request to the guest (what must never be
    /// produced by the malformed kinds).
    fn is_valid_udp_echo(frame: &[u8], ends: &Endpoints) -> bool {
        if frame.len() < 14 + 28 || frame[12..14] != [8, 0] || frame[..6] != ends.guest_mac {
            return false;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0F) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ip.len() {
            return false;
        }
        if internet_checksum(&ip[..ihl]) != 0 || ip[9] != PROTO_UDP {
            return false;
        }
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0 || ip[16..20] != ends.guest_ip.octets()
        {
            return false;
        }
        let udp = &ip[ihl..total];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if udp[2..4] != [0, 7] || udp_len < 8 || udp_len > udp.len() {
            return false;
        }
        udp[6..8] == [0, 0]
            || transport_checksum(
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                ends.guest_ip,
                PROTO_UDP,
                &udp[..udp_len],
            ) == 0
    }

    #[test]
    fn valid_builders_verify() {
        let e = ends();
        let datagram = udp_datagram(e.host_ip, e.guest_ip, 40000, 7, b"hello");
        assert_eq!(
            transport_checksum(e.host_ip, e.guest_ip, PROTO_UDP, &datagram),
            0
        );
        let mut packet =
            ipv4_header(e.host_ip, e.guest_ip, PROTO_UDP, datagram.len(), 1, 0).to_vec();
        assert_eq!(internet_checksum(&packet), 0);
        packet.extend_from_slice(&datagram);
        let frame = ethernet(e.guest_mac, e.host_mac, ETHERTYPE_IPV4, &packet);
        assert!(is_valid_udp_echo(&frame, &e));
        let segment = tcp_segment(e.host_ip, e.guest_ip, 1, 7, 5, 0, tcp_flags::SYN, &[], &[]);
        assert_eq!(
            transport_checksum(e.host_ip, e.guest_ip, PROTO_TCP, &segment),
            0
        );
    }

    #[test]
    fn no_malformed_frame_is_a_valid_echo_request() {
        let e = ends();
        let mut factory = FrameFactory::new(e, 42);
        for kind in Malformation::ALL {
            for _ in 0..2000 {
                let frame = factory.malformed(kind);
                assert!(frame.len() >= 14, "{kind}: {} bytes", frame.len());
                assert!(frame.len() <= 9014, "{kind}: {} bytes", frame.len());
                assert!(
                    !is_valid_udp_echo(&frame, &e),
                    "{kind} produced a valid UDP echo request: {frame:02x?}"
                );
                if kind == Malformation::Runt {
                    assert!(frame.len() < 60, "runt of {} bytes", frame.len());
                }
                if kind == Malformation::Oversize {
                    assert!(frame.len() > 1514);
                }
            }
        }
    }

    #[test]
    fn checksum_corruption_never_verifies() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let e = ends();
            let mut datagram = udp_datagram(e.host_ip, e.guest_ip, 1, 7, &rng.bytes(17));
            corrupt_checksum(&mut datagram[6..8], &mut rng);
            assert_ne!(
                transport_checksum(e.host_ip, e.guest_ip, PROTO_UDP, &datagram),
                0
            );
            assert_ne!(datagram[6..8], [0, 0]);
        }
    }

    #[test]
    fn syns_are_valid_segments() {
        let e = ends();
        let mut factory = FrameFactory::new(e, 1);
        for source in [SynSource::Host, SynSource::Spoofed] {
            let frame = factory.syn(source);
            let ip = &frame[14..];
            assert_eq!(internet_checksum(&ip[..20]), 0);
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            assert_eq!(transport_checksum(src, e.guest_ip, PROTO_TCP, &ip[20..]), 0);
            assert_eq!(ip[20 + 13], tcp_flags::SYN);
            match source {
                SynSource::Host => assert_eq!(src, e.host_ip),
                SynSource::Spoofed => assert!((100..200).contains(&ip[15])),
            }
        }
    }
}
