//! ICMP echo through a raw socket (root or CAP_NET_RAW): request building, reply parsing with
//! the checksum verified, and a ping-pong client.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{ClientError, EchoReport, datagram_payload, describe_difference, io_error, is_timeout};

const ICMP_ECHO_REQUEST: u8 = 8;

const ICMP_ECHO_REPLY: u8 = 0;

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request packet (header plus payload).
pub fn icmp_echo_request(identifier: u16, sequence: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    packet.extend_from_slice(&identifier.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(payload);
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// A raw ICMPv4 socket (needs root or CAP_NET_RAW), in the calling thread's namespace.
struct RawIcmpSocket {
    socket: Socket,
}

impl RawIcmpSocket {
    fn open() -> Result<RawIcmpSocket, ClientError> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .map_err(io_error("opening a raw ICMP socket (needs root)"))?;
        Ok(RawIcmpSocket { socket })
    }

    fn send_to(&self, packet: &[u8], target: Ipv4Addr) -> io::Result<()> {
        let address = SockAddr::from(SocketAddrV4::new(target, 0));
        self.socket.send_to(packet, &address).map(drop)
    }

    /// Receives one IPv4 packet (header included) within `timeout`; `Ok(None)` on timeout.
    fn recv(&self, buffer: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match (&self.socket).read(buffer) {
            Ok(length) => Ok(Some(length)),
            Err(error) if is_timeout(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// A parsed ICMP echo reply inside an IPv4 packet.
#[derive(Debug, PartialEq, Eq)]
pub struct IcmpEchoReply<'a> {
    /// The sender.
    pub source: Ipv4Addr,
    /// The echo identifier.
    pub identifier: u16,
    /// The echo sequence number.
    pub sequence: u16,
    /// The payload.
    pub payload: &'a [u8],
    /// Whether the ICMP checksum verifies.
    pub checksum_ok: bool,
}

/// Parses an IPv4 packet holding an ICMP echo reply; `None` for anything else.
pub fn parse_icmp_echo_reply(packet: &[u8]) -> Option<IcmpEchoReply<'_>> {
    let version_ihl = *packet.first()?;
    let header = usize::from(version_ihl & 0x0F) * 4;
    if version_ihl >> 4 != 4 || header < 20 || packet.len() < header + 8 || packet[9] != 1 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = total.clamp(header + 8, packet.len());
    let icmp = &packet[header..end];
    if icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    Some(IcmpEchoReply {
        source: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        identifier: u16::from_be_bytes([icmp[4], icmp[5]]),
        sequence: u16::from_be_bytes([icmp[6], icmp[7]]),
        payload: &icmp[8..],
        checksum_ok: internet_checksum(icmp) == 0,
    })
}

/// Options of an ICMP echo run.
#[derive(Clone, Copy, Debug)]
pub struct IcmpEchoOptions {
    /// Requests to exchange.
    pub count: u64,
    /// Payload size in bytes.
    pub size: usize,
    /// Wait for each reply.
    pub timeout: Duration,
    /// Sends of one request before giving up.
    pub attempts: u32,
}

impl Default for IcmpEchoOptions {
    fn default() -> IcmpEchoOptions {
        IcmpEchoOptions {
            count: 5,
            size: 56,
            timeout: Duration::from_secs(2),
            attempts: 1,
        }
    }
}

/// Pings `target` through a raw ICMP socket (root), one request in flight, checking that each
/// reply carries the identifier, sequence number and payload sent, with a valid checksum.
pub fn icmp_echo(target: Ipv4Addr, options: IcmpEchoOptions) -> Result<EchoReport, ClientError> {
    let socket = RawIcmpSocket::open()?;
    let identifier = (std::process::id() as u16) ^ 0x5649;
    let mut report = EchoReport::default();
    let mut buffer = vec![0u8; 65536];
    for index in 0..options.count {
        let sequence = index as u16;
        let payload = datagram_payload(index, options.size);
        let request = icmp_echo_request(identifier, sequence, &payload);
        let what = format!("ICMP echo #{index} ({} bytes) to {target}", options.size);
        let began = Instant::now();
        let mut answered = false;
        for attempt in 0..options.attempts.max(1) {
            if attempt > 0 {
                report.retransmits += 1;
            }
            let sent_at = Instant::now();
            socket
                .send_to(&request, target)
                .map_err(io_error(format!("sending {what}")))?;
            report.sent += 1;
            let deadline = sent_at + options.timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let Some(length) = socket
                    .recv(&mut buffer, left)
                    .map_err(io_error(format!("receiving {what}")))?
                else {
                    break;
                };
                let rtt = sent_at.elapsed();
                let Some(reply) = parse_icmp_echo_reply(&buffer[..length]) else {
                    continue; // our own request (on loopback) or unrelated ICMP
                };
                if reply.source != target || reply.identifier != identifier {
                    continue;
                }
                if reply.sequence != sequence {
                    report.stale += 1;
                    continue;
                }
                if !reply.checksum_ok || reply.payload != payload.as_slice() {
                    return Err(ClientError::Mismatch {
                        what,
                        detail: if reply.checksum_ok {
                            describe_difference(&payload, reply.payload)
                        } else {
                            "bad ICMP checksum".to_string()
                        },
                    });
                }
                report.received += 1;
                report.bytes += options.size as u64;
                report.rtts.push(rtt);
                answered = true;
                break;
            }
            if answered {
                break;
            }
        }
        if !answered {
            return Err(ClientError::Timeout {
                waiting_for: format!("{what} ({} attempt(s))", options.attempts.max(1)),
                after: began.elapsed(),
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_request_round_trips_through_the_parser() {
        let request = icmp_echo_request(0x1234, 7, b"hello");
        assert_eq!(internet_checksum(&request), 0);
        let mut reply = request.clone();
        reply[0] = ICMP_ECHO_REPLY;
        reply[2..4].copy_from_slice(&[0, 0]);
        let checksum = internet_checksum(&reply);
        reply[2..4].copy_from_slice(&checksum.to_be_bytes());
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        let total = (packet.len() + reply.len()) as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&reply);
        let parsed = parse_icmp_echo_reply(&packet).expect("an echo reply");
        assert_eq!(parsed.source, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!((parsed.identifier, parsed.sequence), (0x1234, 7));
        assert_eq!(parsed.payload, b"hello");
        assert!(parsed.checksum_ok);
    }
}
