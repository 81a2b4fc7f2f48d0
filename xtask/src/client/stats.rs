//! The stats service (UDP 7007): one request datagram, one line of `key=value` counters back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::udp::bind_udp_for;
use super::{ClientError, io_error, is_timeout};

/// The stats service's answer: one line of space-separated `key=value` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The line as received (without the line ending).
    pub line: String,
    /// The pairs, by key.
    pub fields: BTreeMap<String, String>,
}

impl Stats {
    /// Parses a stats line. Every space-separated word must be `key=value` with a non-empty key.
    pub fn parse(line: &str) -> Result<Stats, ClientError> {
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        let mut fields = BTreeMap::new();
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    fields.insert(key.to_string(), value.to_string());
                }
                _ => {
                    return Err(ClientError::Protocol(format!(
                        "stats word {word:?} is not key=value in {line:?}"
                    )));
                }
            }
        }
        if fields.is_empty() {
            return Err(ClientError::Protocol(format!("empty stats line {line:?}")));
        }
        Ok(Stats { line, fields })
    }

    /// A counter's value, when present and numeric.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// A counter's value, or an error naming the key and the line.
    pub fn counter(&self, key: &str) -> Result<u64, ClientError> {
        self.get(key).ok_or_else(|| {
            ClientError::Protocol(format!(
                "no numeric counter {key:?} in the stats line {:?}",
                self.line
            ))
        })
    }
}

/// Asks the stats service at `target` (UDP 7007) for its line: sends one datagram, waits up to
/// `timeout` per attempt, up to `attempts` times.
pub fn query_stats(
    target: SocketAddr,
    timeout: Duration,
    attempts: u32,
) -> Result<Stats, ClientError> {
    let socket = bind_udp_for(target)?;
    socket
        .connect(target)
        .map_err(io_error(format!("connecting a UDP socket to {target}")))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(io_error("setting the UDP read timeout"))?;
    let began = Instant::now();
    let mut buffer = vec![0u8; 65536];
    for _ in 0..attempts.max(1) {
        socket
            .send(b"stats\n")
            .map_err(io_error(format!("sending a stats request to {target}")))?;
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let text = std::str::from_utf8(&buffer[..length]).map_err(|_| {
                    ClientError::Protocol(format!("the stats answer from {target} is not UTF-8"))
                })?;
                return Stats::parse(text);
            }
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(io_error(format!("receiving stats from {target}"))(error)),
        }
    }
    Err(ClientError::Timeout {
        waiting_for: format!("the stats line from {target}"),
        after: began.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::thread;

    #[test]
    fn parses_stats_lines() {
        let stats = Stats::parse("udp_echoed=12 mode=adaptive interrupts=3 heap_used=123456\n")
            .expect("valid");
        assert_eq!(stats.get("udp_echoed"), Some(12));
        assert_eq!(stats.get("mode"), None);
        assert_eq!(
            stats.fields.get("mode").map(String::as_str),
            Some("adaptive")
        );
        assert!(stats.counter("kicks").is_err());
        assert!(Stats::parse("udp_echoed=1 garbage").is_err());
        assert!(Stats::parse("\n").is_err());
    }

    #[test]
    fn stats_query_against_a_local_server() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = server.local_addr().expect("address");
        let responder = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            let (_, from) = server.recv_from(&mut buffer).expect("recv");
            server
                .send_to(b"udp_echoed=7 mode=poll kicks=2\n", from)
                .expect("send");
        });
        let stats = query_stats(address, Duration::from_secs(2), 1).expect("stats");
        assert_eq!(stats.get("udp_echoed"), Some(7));
        assert_eq!(stats.line, "udp_echoed=7 mode=poll kicks=2");
        responder.join().expect("responder");
    }
}
