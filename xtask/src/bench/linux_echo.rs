//! The Linux guest's UDP echo server for `cargo xtask bench`. It is not part of the xtask crate:
//! the benchmark compiles this file on its own with rustc, statically linked
//! (`-C target-feature=+crt-static`), and puts it in the initramfs as /bin/echo-server.
//!
//! UDP 7: echoes each datagram back to its sender, as it came.
//! UDP 7007: answers any datagram with one line of key=value counters, like Vireo's stats service:
//! udp_echoed, interrupts (the sum of the virtio interrupt lines in /proc/interrupts), and
//! eth0's rx_packets/tx_packets.

use std::net::UdpSocket;
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
    let echoed = Arc::new(AtomicU64::new(0));
    {
        let echoed = Arc::clone(&echoed);
        thread::spawn(move || {
            let mut buffer = [0u8; 512];
            loop {
                if let Ok((_, from)) = stats.recv_from(&mut buffer) {
                    let line = stats_line(echoed.load(Ordering::Relaxed));
                    let _ = stats.send_to(line.as_bytes(), from);
                }
            }
        });
    }
    println!("linux-echo: ready ip=10.0.2.15/24 udp-echo=7 stats=7007");
    let mut buffer = vec![0u8; 65536];
    loop {
        if let Ok((length, from)) = echo.recv_from(&mut buffer) {
            if echo.send_to(&buffer[..length], from).is_ok() {
                echoed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
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

fn stats_line(echoed: u64) -> String {
    format!(
        "udp_echoed={echoed} interrupts={} rx_packets={} tx_packets={}\n",
        virtio_interrupts(),
        read_counter("/sys/class/net/eth0/statistics/rx_packets"),
        read_counter("/sys/class/net/eth0/statistics/tx_packets"),
    )
}
