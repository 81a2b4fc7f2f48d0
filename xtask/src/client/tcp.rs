//! TCP echo: one connection or many held open at once, each sending its own byte pattern
//! while reading the echo back on a second thread, every byte checked.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::{ClientError, io_error, is_timeout, pattern_byte};

/// The outcome of one TCP echo connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEchoReport {
    /// Bytes sent and read back exactly.
    pub bytes: u64,
    /// Time to connect.
    pub connect: Duration,
    /// Time from the first byte sent to the last byte echoed.
    pub transfer: Duration,
}

impl TcpEchoReport {
    /// Echo throughput in bytes per second.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.transfer.as_secs_f64().max(1e-9)
    }
}

/// Connects to the TCP echo service at `target` within `timeout`.
///
/// Each attempt waits at most [`CONNECT_ATTEMPT`]; a timed-out attempt is retried on a fresh
/// socket until `timeout`. QEMU user networking (libslirp) listens on a forwarded port with a
/// tiny backlog: when connections arrive back to back, the host kernel drops about every other
/// SYN (measured here: 26 of 64), and its own SYN retransmission would wait a whole second each
/// time.
pub fn tcp_connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let began = Instant::now();
    let stream = loop {
        let remaining = timeout.saturating_sub(began.elapsed());
        let attempt = remaining.min(CONNECT_ATTEMPT).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&target, attempt) {
            Ok(stream) => break stream,
            Err(error) if is_timeout(&error) && began.elapsed() < timeout => continue,
            Err(error) => {
                return Err(io_error(format!(
                    "connecting to TCP echo at {target} (after {:.1} s)",
                    began.elapsed().as_secs_f64()
                ))(error));
            }
        }
    };
    stream
        .set_nodelay(true)
        .map_err(io_error("setting TCP_NODELAY"))?;
    Ok(stream)
}

/// Sends `bytes` bytes of pattern stream `stream_id` over `stream` while reading the echo back
/// (on two threads, so flow control never deadlocks), checks every byte, then closes the
/// connection. The whole transfer must finish within `timeout`.
pub fn tcp_echo_on(
    stream: TcpStream,
    stream_id: u64,
    bytes: usize,
    timeout: Duration,
) -> Result<Duration, ClientError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let what = format!("TCP echo #{stream_id} of {bytes} bytes with {peer}");
    let began = Instant::now();
    let deadline = began + timeout;
    let writer = stream
        .try_clone()
        .map_err(io_error("cloning the TCP stream"))?;
    writer
        .set_write_timeout(Some(timeout))
        .map_err(io_error("setting the TCP write timeout"))?;
    let sender = thread::spawn(move || -> io::Result<()> {
        let mut writer = writer;
        let mut chunk = vec![0u8; 16 * 1024];
        let mut offset = 0usize;
        while offset < bytes {
            let length = chunk.len().min(bytes - offset);
            for (i, byte) in chunk[..length].iter_mut().enumerate() {
                *byte = pattern_byte(stream_id, (offset + i) as u64);
            }
            writer.write_all(&chunk[..length])?;
            offset += length;
        }
        writer.flush()
    });
    let mut reader = stream;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    let result = loop {
        if received == bytes {
            break Ok(began.elapsed());
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(ClientError::Timeout {
                waiting_for: format!("{what} ({received} bytes echoed so far)"),
                after: began.elapsed(),
            });
        }
        if let Err(error) = reader.set_read_timeout(Some(deadline - now)) {
            break Err(io_error("setting the TCP read timeout")(error));
        }
        let want = buffer.len().min(bytes - received);
        match reader.read(&mut buffer[..want]) {
            Ok(0) => {
                break Err(ClientError::Mismatch {
                    what: what.clone(),
                    detail: format!("the guest closed the connection after {received} bytes"),
                });
            }
            Ok(count) => {
                let mismatch = buffer[..count]
                    .iter()
                    .enumerate()
                    .find(|&(i, &b)| b != pattern_byte(stream_id, (received + i) as u64));
                if let Some((i, &b)) = mismatch {
                    let at = received + i;
                    break Err(ClientError::Mismatch {
                        what: what.clone(),
                        detail: format!(
                            "byte {at} is {b:#04x}, expected {:#04x}",
                            pattern_byte(stream_id, at as u64)
                        ),
                    });
                }
                received += count;
            }
            Err(error) if is_timeout(&error) => continue,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                break Err(io_error(format!(
                    "reading {what} ({received} bytes echoed so far)"
                ))(error));
            }
        }
    };
    // Closing both directions also ends the sender if it is still blocked.
    let _ = reader.shutdown(Shutdown::Both);
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the sender thread panicked")));
    let elapsed = result?;
    sent.map_err(io_error(format!("sending {what}")))?;
    Ok(elapsed)
}

/// How long one TCP connection attempt waits before [`tcp_connect`] tries again.
pub const CONNECT_ATTEMPT: Duration = Duration::from_millis(100);

/// One TCP echo connection: connect, send `bytes` bytes of a pattern, read them back exactly.
pub fn tcp_echo(
    target: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> Result<TcpEchoReport, ClientError> {
    let began = Instant::now();
    let stream = tcp_connect(target, timeout)?;
    let connect = began.elapsed();
    let transfer = tcp_echo_on(stream, 0, bytes, timeout.saturating_sub(connect))?;
    Ok(TcpEchoReport {
        bytes: bytes as u64,
        connect,
        transfer,
    })
}

/// `connections` TCP echo connections open at the same time: all are connected first (so that
/// the guest really holds them all at once), then each echoes `bytes_each` bytes of its own
/// pattern concurrently. Fails with the first connection's error.
pub fn tcp_echo_concurrent(
    target: SocketAddr,
    connections: usize,
    bytes_each: usize,
    timeout: Duration,
) -> Result<Vec<TcpEchoReport>, ClientError> {
    let began = Instant::now();
    let mut streams = Vec::with_capacity(connections);
    for index in 0..connections {
        let connect_began = Instant::now();
        let stream = tcp_connect(target, timeout).map_err(|error| match error {
            ClientError::Io { context, source } => ClientError::Io {
                context: format!("{context} (connection {index} of {connections})"),
                source,
            },
            other => other,
        })?;
        streams.push((stream, connect_began.elapsed()));
    }
    let remaining = timeout.saturating_sub(began.elapsed());
    let results: Vec<Result<TcpEchoReport, ClientError>> = thread::scope(|scope| {
        let workers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(index, (stream, connect))| {
                scope.spawn(move || {
                    tcp_echo_on(stream, index as u64 + 1, bytes_each, remaining).map(|transfer| {
                        TcpEchoReport {
                            bytes: bytes_each as u64,
                            connect,
                            transfer,
                        }
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| {
                    Err(ClientError::Protocol("a TCP worker panicked".to_string()))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_echo_against_a_local_reflector() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server = thread::spawn(move || {
            let handles: Vec<_> = (0..5)
                .map(|_| {
                    let (mut stream, _) = listener.accept().expect("accept");
                    thread::spawn(move || {
                        let mut reader = stream.try_clone().expect("clone");
                        let _ = io::copy(&mut reader, &mut stream);
                    })
                })
                .collect();
            for handle in handles {
                let _ = handle.join();
            }
        });
        let one = tcp_echo(address, 1 << 20, Duration::from_secs(10)).expect("1 MiB");
        assert_eq!(one.bytes, 1 << 20);
        let many = tcp_echo_concurrent(address, 4, 16 * 1024, Duration::from_secs(10))
            .expect("4 x 16 KiB");
        assert_eq!(many.len(), 4);
        server.join().expect("server");
    }
}
