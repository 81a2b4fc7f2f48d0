//! UDP echo: a ping-pong client (one datagram in flight) that checks every echo exactly, tells
//! a late echo of an earlier request from a wrong one, and retransmits after a timeout.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use super::{ClientError, EchoReport, datagram_payload, describe_difference, io_error, is_timeout};

/// A UDP echo client: ping-pong (one request in flight), exact payload check, RTT per echo.
pub struct UdpEchoClient {
    socket: UdpSocket,
    target: SocketAddr,
    timeout: Duration,
    next_seq: u64,
    buffer: Vec<u8>,
}

impl UdpEchoClient {
    /// A socket connected to `target` (bound to the matching loopback or wildcard address),
    /// waiting up to `timeout` for each echo.
    pub fn connect(target: SocketAddr, timeout: Duration) -> Result<UdpEchoClient, ClientError> {
        let socket = bind_udp_for(target)?;
        socket
            .connect(target)
            .map_err(io_error(format!("connecting a UDP socket to {target}")))?;
        Ok(UdpEchoClient {
            socket,
            target,
            timeout,
            next_seq: 0,
            buffer: vec![0; 65536],
        })
    }

    /// The echo service's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sends one datagram of `size` bytes and waits for its exact echo. Returns the RTT.
    /// `attempts` (at least 1) bounds the sends of the same request after timeouts; every
    /// attempt is counted in `report`.
    pub fn exchange(
        &mut self,
        size: usize,
        attempts: u32,
        report: &mut EchoReport,
    ) -> Result<Duration, ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = datagram_payload(seq, size);
        let what = format!("UDP echo #{seq} ({size} bytes) to {}", self.target);
        let began = Instant::now();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                report.retransmits += 1;
            }
            let sent_at = Instant::now();
            self.socket
                .send(&payload)
                .map_err(io_error(format!("sending {what}")))?;
            report.sent += 1;
            let deadline = sent_at + self.timeout;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                self.socket
                    .set_read_timeout(Some(deadline - now))
                    .map_err(io_error("setting the UDP read timeout"))?;
                let length = match self.socket.recv(&mut self.buffer) {
                    Ok(length) => length,
                    Err(error) if is_timeout(&error) => break,
                    Err(error) => return Err(io_error(format!("receiving {what}"))(error)),
                };
                let rtt = sent_at.elapsed();
                let got = &self.buffer[..length];
                if got == payload.as_slice() {
                    report.received += 1;
                    report.bytes += size as u64;
                    report.rtts.push(rtt);
                    return Ok(rtt);
                }
                if is_stale_echo(got, seq, size) {
                    report.stale += 1;
                    continue;
                }
                return Err(ClientError::Mismatch {
                    what,
                    detail: describe_difference(&payload, got),
                });
            }
        }
        Err(ClientError::Timeout {
            waiting_for: format!("{what} ({} attempt(s))", attempts.max(1)),
            after: began.elapsed(),
        })
    }

    /// Sends small probes every `interval` until one is echoed (ARP and the guest's first
    /// packets may take a moment), or fails after `limit`. Returns the number of probes sent.
    pub fn warm_up(&mut self, limit: Duration, interval: Duration) -> Result<u64, ClientError> {
        let began = Instant::now();
        let saved = self.timeout;
        self.timeout = interval;
        let mut report = EchoReport::default();
        let result = loop {
            match self.exchange(1, 1, &mut report) {
                Ok(_) => break Ok(report.sent),
                Err(ClientError::Timeout { .. }) if began.elapsed() < limit => continue,
                Err(ClientError::Timeout { .. }) => {
                    break Err(ClientError::Timeout {
                        waiting_for: format!(
                            "a first UDP echo from {} ({} probes sent)",
                            self.target, report.sent
                        ),
                        after: began.elapsed(),
                    });
                }
                Err(ClientError::Io { source, .. })
                    if source.kind() == io::ErrorKind::ConnectionRefused
                        && began.elapsed() < limit =>
                {
                    thread::sleep(interval);
                    continue;
                }
                Err(other) => break Err(other),
            }
        };
        self.timeout = saved;
        result
    }
}

fn is_stale_echo(got: &[u8], seq: u64, size: usize) -> bool {
    if got.len() != size {
        return false;
    }
    if size >= 8 {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&got[..8]);
        let earlier = u64::from_le_bytes(tag);
        earlier < seq && got == datagram_payload(earlier, size).as_slice()
    } else {
        (seq.saturating_sub(64)..seq).any(|earlier| got == datagram_payload(earlier, size))
    }
}

pub(crate) fn bind_udp_for(target: SocketAddr) -> Result<UdpSocket, ClientError> {
    let local: SocketAddr = if target.ip().is_loopback() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    UdpSocket::bind(local).map_err(io_error(format!("binding a UDP socket on {local}")))
}

/// Options of a UDP echo run.
#[derive(Clone, Copy, Debug)]
pub struct UdpEchoOptions {
    /// Datagrams to exchange.
    pub count: u64,
    /// Payload size in bytes (0 to 65507).
    pub size: usize,
    /// Wait for each echo.
    pub timeout: Duration,
    /// Sends of one request before giving up (1 = no retransmission).
    pub attempts: u32,
}

impl Default for UdpEchoOptions {
    fn default() -> UdpEchoOptions {
        UdpEchoOptions {
            count: 10,
            size: 64,
            timeout: Duration::from_secs(2),
            attempts: 1,
        }
    }
}

/// Ping-pongs `options.count` datagrams with the UDP echo service at `target`, each checked
/// exactly.
pub fn udp_echo(target: SocketAddr, options: UdpEchoOptions) -> Result<EchoReport, ClientError> {
    let mut client = UdpEchoClient::connect(target, options.timeout)?;
    let mut report = EchoReport::default();
    for _ in 0..options.count {
        client.exchange(options.size, options.attempts, &mut report)?;
    }
    Ok(report)
}

/// Runs [`udp_echo`] for each size in turn and merges the reports.
pub fn udp_echo_sizes(
    target: SocketAddr,
    sizes: &[usize],
    per_size: u64,
    timeout: Duration,
    attempts: u32,
) -> Result<EchoReport, ClientError> {
    let mut total = EchoReport::default();
    for &size in sizes {
        total.merge(udp_echo(
            target,
            UdpEchoOptions {
                count: per_size,
                size,
                timeout,
                attempts,
            },
        )?);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_by_sequence_and_carry_it() {
        let a = datagram_payload(1, 64);
        let b = datagram_payload(2, 64);
        assert_ne!(a, b);
        assert_eq!(&a[..8], &1u64.to_le_bytes());
        assert!(is_stale_echo(&a, 2, 64));
        assert!(!is_stale_echo(&b, 2, 64));
        assert_eq!(datagram_payload(5, 1).len(), 1);
        assert!(is_stale_echo(&datagram_payload(3, 1), 5, 1));
    }

    #[test]
    fn udp_echo_against_a_local_reflector() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = server.local_addr().expect("address");
        let reflector = thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            for _ in 0..6 {
                let (length, from) = server.recv_from(&mut buffer).expect("recv");
                server.send_to(&buffer[..length], from).expect("send");
            }
        });
        let report =
            udp_echo_sizes(address, &[1, 64, 1472], 2, Duration::from_secs(2), 1).expect("echo");
        assert_eq!(
            (report.sent, report.received, report.bytes),
            (6, 6, 2 * (1 + 64 + 1472))
        );
        reflector.join().expect("reflector");
    }
}
