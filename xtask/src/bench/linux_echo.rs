//! The Linux guest's UDP echo server for `cargo xtask bench`. It is not part of the xtask crate:
//! the benchmark compiles this file on its own with rustc, statically linked
//! (`-C target-feature=+crt-static`), and puts it in the initramfs as /bin/echo-server.
//!
//! UDP 7: echoes each datagram back to its sender, as it came.
//! TCP 7: echoes every byte of every connection (RFC 862), any number of connections at once:
//! a thread per connection (blocking reads and writes through the kernel's socket buffers, as a
//! plain Linux service would be written), the same design as the UDP server's thread.
//! UDP 7007: answers any datagram with one line of key=value counters, like Vireo's stats service:
//! udp_echoed, tcp_accepted, tcp_bytes_echoed, interrupts (the sum of the virtio interrupt lines
//! in /proc/interrupts), and eth0's rx_packets/tx_packets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

fn main() {
    let echo = match UdpSocket::bind("0.0.0.0:7") {
        Ok(socket) => socket,
        Err(error) => {
            println!("linux-echo: FAILED: binding UDP port 7: {error}");
            std::process::exit(1);
        }
    };
    let stats = match UdpSocket::bind("0.0.0.0:7007") {
        Ok(socket) => socket,
        Err(error) => {
            println!("linux-echo: FAILED: binding UDP port 7007: {error}");
            std::process::exit(1);
        }
    };
    let tcp = match TcpListener::bind("0.0.0.0:7") {
        Ok(listener) => listener,
        Err(error) => {
            println!("linux-echo: FAILED: binding TCP port 7: {error}");
            std::process::exit(1);
        }
    };
    let counters = Arc::new(Counters::default());
    {
        let counters = Arc::clone(&counters);
        thread::spawn(move || {
            let mut buffer = [0u8; 512];
            loop {
                if let Ok((_, from)) = stats.recv_from(&mut buffer) {
                    let line = stats_line(&counters);
                    let _ = stats.send_to(line.as_bytes(), from);
                }
            }
        });
    }
    {
        let counters = Arc::clone(&counters);
        thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                counters.tcp_accepted.fetch_add(1, Ordering::Relaxed);
                let counters = Arc::clone(&counters);
                thread::spawn(move || echo_tcp(stream, &counters));
            }
        });
    }
    println!("linux-echo: ready ip=10.0.2.15/24 udp-echo=7 tcp-echo=7 stats=7007");
    let echoed = &counters.udp_echoed;
    let mut buffer = vec![0u8; 65536];
    loop {
        if let Ok((length, from)) = echo.recv_from(&mut buffer) {
            if echo.send_to(&buffer[..length], from).is_ok() {
                echoed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    udp_echoed: AtomicU64,
    tcp_accepted: AtomicU64,
    tcp_bytes_echoed: AtomicU64,
}

/// Echoes one TCP connection until the peer closes it (or it fails), then closes it.
fn echo_tcp(mut stream: TcpStream, counters: &Counters) {
    let _ = stream.set_nodelay(true);
    let mut buffer = vec![0u8; 128 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(length) => {
                if stream.write_all(&buffer[..length]).is_err() {
                    break;
                }
                counters
                    .tcp_bytes_echoed
                    .fetch_add(length as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn read_counter(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn virtio_interrupts() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .filter(|line| line.contains("virtio"))
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .map_while(|word| word.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn stats_line(counters: &Counters) -> String {
    format!(
        "udp_echoed={} tcp_accepted={} tcp_bytes_echoed={} interrupts={} rx_packets={} \
         tx_packets={}\n",
        counters.udp_echoed.load(Ordering::Relaxed),
        counters.tcp_accepted.load(Ordering::Relaxed),
        counters.tcp_bytes_echoed.load(Ordering::Relaxed),
        virtio_interrupts(),
        read_counter("/sys/class/net/eth0/statistics/rx_packets"),
        read_counter("/sys/class/net/eth0/statistics/tx_packets"),
    )
}
