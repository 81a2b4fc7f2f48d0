//! Fault tests (issue 7): the kernel under bad input, load and link faults, on a tap in a
//! private network namespace (root; CI runs them and never skips them). One QEMU per test, each
//! with a wall-clock limit; a failure prints the QEMU command line and the whole serial log.
//!
//! - `malformed_frames_then_echo_is_exact`: more than 10^4 malformed frames of 16 kinds written
//!   raw onto the tap at the guest's MAC; then UDP, TCP and ICMP echo are exact, and the
//!   counters account for every frame that reached the guest.
//! - `syn_flood_from_host_then_listeners_recover`: 2000 SYNs from the host's address, whose
//!   stack resets every SYN-ACK; every listening socket must come back.
//! - `spoofed_syn_flood_then_tcp_echo_recovers`: SYNs from made-up peers that never answer.
//! - `udp_flood_then_echo_ring_and_heap_recover`: ~10 s of UDP at the host's maximum rate; then
//!   echo works at once, every receive buffer is back in the ring and `heap_used` is back to
//!   its level before the flood.
//! - `tcp_churn_2000_connections_no_leak`: 2000 connections opened, used and closed, some reset
//!   mid-transfer; then `tcp_connected` and `heap_used` are back to their baseline.
//! - `link_flap_10_times_echo_resumes`: QMP `set_link` off and on ten times; each is logged and
//!   echo resumes by itself.
//!
//! Each test prints what it survived (frames, datagrams, connections, flaps).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{TapGuest, boot_tap_with, count_lines, root_networking_or_skip, wait_for_count};
use xtask::client::{ClientError, EchoReport};
use xtask::faults::{
    Endpoints, FrameFactory, InterfaceCounters, Malformation, Pacing, PacketSocket, RxRingAccount,
    SynSource, inject_malformed, interface_counters, interface_mac, parse_mac,
    rx_queue_size_from_log, syn_flood, tcp_churn, tcp_resets_sent, udp_flood,
};
use xtask::{
    DEFAULT_NIC, IcmpEchoOptions, NetNs, RunError, Stats, TapConfig, UdpEchoClient, icmp_echo,
    query_stats, tcp_echo, tcp_echo_concurrent, unique_temp_path,
};

/// Wait for each UDP/ICMP echo.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the first echo after `ready` may take (ARP, first packets).
const WARM_UP: Duration = Duration::from_secs(20);
/// Limit for a whole TCP exchange.
const TCP_WAIT: Duration = Duration::from_secs(60);
/// The tap the guest is on.
const TAP: &str = "tap0";
/// Malformed frames written in `malformed_frames_then_echo_is_exact` (besides the SYNs).
const MALFORMED_FRAMES: u64 = 12_000;
/// SYNs of each flood.
const SYN_FLOOD: u64 = 2_000;
/// How long the UDP flood lasts.
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// Connections of the churn test.
const CHURN_CONNECTIONS: usize = 2_000;
/// Link flaps.
const FLAPS: usize = 10;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Boots a guest on `tap` (host side 10.0.2.2/24) with the default NIC, optionally with a QMP
/// socket.
fn boot(prefix: &str, tap: TapConfig, qmp: Option<&std::path::Path>) -> Result<TapGuest, RunError> {
    boot_tap_with(prefix, std::slice::from_ref(&tap), |command| {
        let command = command
            .netdev(NetNs::tap_netdev("n0", &tap.name, None))
            .device(DEFAULT_NIC);
        match qmp {
            Some(socket) => command.qmp_socket(socket),
            None => command,
        }
    })
}

fn echo_target(booted: &TapGuest) -> SocketAddr {
    SocketAddr::from((booted.ready.ip, 7))
}

fn stats_target(booted: &TapGuest) -> SocketAddr {
    SocketAddr::from((booted.ready.ip, 7007))
}

fn stats(booted: &TapGuest) -> Result<Stats, RunError> {
    let target = stats_target(booted);
    booted.client(move || query_stats(target, ECHO_WAIT, 3))
}

fn counter(booted: &TapGuest, stats: &Stats, key: &str) -> Result<u64, RunError> {
    stats
        .counter(key)
        .map_err(|error| booted.guest.failure(xtask::Error::Client(error)))
}

/// `after[key] - before[key]`, failing if the counter went backwards.
fn grew(booted: &TapGuest, before: &Stats, after: &Stats, key: &str) -> Result<u64, RunError> {
    let (b, a) = (counter(booted, before, key)?, counter(booted, after, key)?);
    a.checked_sub(b).ok_or_else(|| {
        booted.guest.check_failed(format!(
            "counter {key} went backwards: {:?} then {:?}",
            before.line, after.line
        ))
    })
}

/// The first exact UDP echo after `ready`.
fn warm_up(booted: &TapGuest) -> Result<(), RunError> {
    let target = echo_target(booted);
    booted.client(move || {
        let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
        client.warm_up(WARM_UP, Duration::from_millis(250))
    })?;
    Ok(())
}

/// Polls the stats until `done` holds for them (or `limit` passes), and returns the last ones.
fn stats_until(
    booted: &TapGuest,
    limit: Duration,
    what: &str,
    done: impl Fn(&Stats) -> bool,
) -> Result<Stats, RunError> {
    let began = Instant::now();
    loop {
        let now = stats(booted)?;
        if done(&now) {
            return Ok(now);
        }
        if began.elapsed() >= limit {
            return Err(booted.guest.check_failed(format!(
                "after {:.1} s the stats still do not show {what}: {:?}",
                limit.as_secs_f64(),
                now.line
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tap's counters, read inside the namespace.
fn tap_counters(booted: &TapGuest) -> Result<InterfaceCounters, RunError> {
    booted.client(|| {
        interface_counters(TAP).map_err(|source| ClientError::Io {
            context: format!("reading {TAP}'s counters"),
            source,
        })
    })
}

/// The guest never reset its device and never panicked, and QEMU still runs.
fn check_device_healthy(booted: &TapGuest, stats: &Stats) -> Result<(), RunError> {
    let resets = counter(booted, stats, "device_resets")?;
    let reset_lines = count_lines(&booted.guest, "resetting the device");
    let panics = count_lines(&booted.guest, "PANIC");
    if resets != 0 || reset_lines != 0 || panics != 0 {
        return Err(booted.guest.check_failed(format!(
            "bad input from the wire must never break the device: device_resets={resets}, \
             {reset_lines} `resetting the device` lines, {panics} `PANIC` lines"
        )));
    }
    if stats.fields.get("link").map(String::as_str) != Some("up") {
        return Err(booted
            .guest
            .check_failed(format!("expected link=up in {:?}", stats.line)));
    }
    Ok(())
}

/// UDP echo of 1, 64, 1400 and 1472 bytes (10 each), ICMP echo of 56 and 1472 bytes (10 each),
/// a 256 KiB TCP echo and 16 concurrent TCP connections of 16 KiB: all exact. A lost UDP or
/// ICMP echo may be sent again, up to 3 times; the retransmissions are printed.
fn echo_all(booted: &TapGuest, label: &str) -> Result<(), RunError> {
    let target = echo_target(booted);
    let ip = booted.ready.ip;
    let udp = booted.client(move || -> Result<EchoReport, ClientError> {
        let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
        client.warm_up(WARM_UP, Duration::from_millis(250))?;
        let mut report = EchoReport::default();
        for size in [1, 64, 1400, 1472] {
            for _ in 0..10 {
                client.exchange(size, 3, &mut report)?;
            }
        }
        Ok(report)
    })?;
    let mut icmp = EchoReport::default();
    for size in [56, 1472] {
        let report = booted.client(move || {
            icmp_echo(
                ip,
                IcmpEchoOptions {
                    count: 10,
                    size,
                    timeout: ECHO_WAIT,
                    attempts: 3,
                },
            )
        })?;
        icmp.sent += report.sent;
        icmp.received += report.received;
        icmp.retransmits += report.retransmits;
    }
    let single = booted.client(move || tcp_echo(target, 256 * 1024, TCP_WAIT))?;
    let many = booted.client(move || tcp_echo_concurrent(target, 16, 16 * 1024, TCP_WAIT))?;
    println!(
        "{label}: UDP echo exact {}/{} (retransmits {}); ICMP echo exact {}/{} (retransmits {}); \
         TCP 256 KiB exact in {:.1} ms; {} concurrent TCP connections x 16 KiB exact",
        udp.received,
        40,
        udp.retransmits,
        icmp.received,
        20,
        icmp.retransmits,
        single.transfer.as_secs_f64() * 1e3,
        many.len()
    );
    Ok(())
}

/// The endpoints of the tap: the guest's MAC and IP from its `ready` line, the tap's own MAC.
fn endpoints(booted: &TapGuest) -> Result<Endpoints, RunError> {
    let guest_mac = parse_mac(&booted.ready.mac).ok_or_else(|| {
        booted
            .guest
            .check_failed(format!("unparsable MAC in {:?}", booted.ready.text))
    })?;
    let host_mac = booted.client(|| {
        interface_mac(TAP).map_err(|source| ClientError::Io {
            context: format!("reading {TAP}'s MAC"),
            source,
        })
    })?;
    Ok(Endpoints {
        guest_mac,
        guest_ip: booted.ready.ip,
        host_mac,
        host_ip: Ipv4Addr::new(10, 0, 2, 2),
    })
}

/// Opens a packet socket on the tap (inside the namespace) and runs `work` with it.
fn with_packet_socket<T: Send>(
    booted: &TapGuest,
    work: impl FnOnce(&PacketSocket) -> T + Send,
) -> Result<T, RunError> {
    booted.client(|| {
        let socket = PacketSocket::open(TAP).map_err(|source| ClientError::Io {
            context: format!("opening an AF_PACKET socket on {TAP}"),
            source,
        })?;
        Ok(work(&socket))
    })
}

/// The host stack's TCP resets sent so far (inside the namespace).
fn host_resets_sent(booted: &TapGuest) -> Result<u64, RunError> {
    booted.client(|| {
        tcp_resets_sent().map_err(|source| ClientError::Io {
            context: "reading Tcp OutRsts".to_string(),
            source,
        })
    })
}

fn heap_used(booted: &TapGuest, stats: &Stats) -> Result<u64, RunError> {
    counter(booted, stats, "heap_used")
}

// ---------------------------------------------------------------------------------------------
// Malformed frames and SYN floods
// ---------------------------------------------------------------------------------------------

/// More than 10^4 malformed frames of every kind in [`Malformation::ALL`], written raw onto the
/// tap at the guest's MAC (the tap's MTU is 9000 so that oversize frames get through it; the
/// guest keeps its 1500). Afterwards:
/// - every frame the tap handed to QEMU reached the guest's driver (the device's filter is off,
///   `ctrl_rx=off`; `rx_packets + rx_dropped + rx_foreign` grew by at least the tap's transmit
///   count, and that count is at least 10^4);
/// - none of them was echoed or opened a connection (`udp_echoed` and `tcp_accepted` did not
///   move: no malformed frame is a valid request);
/// - the device was never reset, `heap_used` is back to its level before, and UDP, TCP and ICMP
///   echo are exact.
#[test]
fn malformed_frames_then_echo_is_exact() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let tap = TapConfig {
        mtu: Some(9000),
        ..TapConfig::default()
    };
    // The device's receive filter off (`ctrl_rx=off`: QEMU stays promiscuous), so that every
    // frame the tap hands over reaches the driver and can be accounted for, the host's own
    // multicast chatter included (the filter itself is tested in tests/platform.rs).
    let booted = boot_tap_with("faults-malformed", std::slice::from_ref(&tap), |command| {
        command
            .netdev(NetNs::tap_netdev("n0", &tap.name, None))
            .device(format!("{DEFAULT_NIC},ctrl_rx=off"))
    })?;
    warm_up(&booted)?;
    let ends = endpoints(&booted)?;
    let before = stats(&booted)?;
    let tap_before = tap_counters(&booted)?;
    println!("stats before: {}", before.line);

    let malformed = with_packet_socket(&booted, |socket| {
        let mut factory = FrameFactory::new(ends, 0x5EED_0007);
        inject_malformed(
            socket,
            &mut factory,
            &Malformation::ALL,
            MALFORMED_FRAMES,
            Pacing::default(),
        )
    })?;
    println!("malformed: {malformed}");
    // Let the guest drain the tap's queue.
    std::thread::sleep(Duration::from_millis(500));
    let after = stats(&booted)?;
    let tap_after = tap_counters(&booted)?;
    println!("stats after: {}", after.line);
    let handed = tap_after.tx_packets - tap_before.tx_packets;
    let tap_dropped = tap_after.tx_dropped - tap_before.tx_dropped;
    let rx_packets = grew(&booted, &before, &after, "rx_packets")?;
    let rx_dropped = grew(&booted, &before, &after, "rx_dropped")?
        + grew(&booted, &before, &after, "rx_foreign")?;
    let received = rx_packets + rx_dropped;
    println!(
        "{} malformed frames written; the tap handed {handed} frames to QEMU and dropped          {tap_dropped}; the guest's driver took {received} (rx_packets +{rx_packets},          rx_dropped +{rx_dropped}, rx_merged +{}) and sent {} (tx_packets; tx_full +{})",
        malformed.written,
        grew(&booted, &before, &after, "rx_merged")?,
        grew(&booted, &before, &after, "tx_packets")?,
        grew(&booted, &before, &after, "tx_full")?,
    );
    if malformed.written < MALFORMED_FRAMES {
        return Err(booted
            .guest
            .check_failed(format!("the host refused some writes: {malformed}")));
    }
    if handed < 10_000 {
        return Err(booted.guest.check_failed(format!(
            "only {handed} frames got through the tap to QEMU ({tap_dropped} dropped): fewer \
             than 10^4 reached the guest"
        )));
    }
    if received < handed {
        return Err(booted.guest.check_failed(format!(
            "the tap handed {handed} frames to QEMU but the guest's driver counts only {received} \
             (rx_packets + rx_dropped + rx_foreign): {:?} then {:?}",
            before.line, after.line
        )));
    }
    for key in ["udp_echoed", "tcp_accepted"] {
        let moved = grew(&booted, &before, &after, key)?;
        if moved != 0 {
            return Err(booted.guest.check_failed(format!(
                "{key} grew by {moved}: a malformed frame was taken for a valid request"
            )));
        }
    }
    check_device_healthy(&booted, &after)?;
    let heap_before = heap_used(&booted, &before)?;
    let heap_after = heap_used(&booted, &after)?;
    if heap_after != heap_before {
        return Err(booted.guest.check_failed(format!(
            "heap_used {heap_before} before the malformed frames, {heap_after} after"
        )));
    }
    echo_all(&booted, "after the malformed frames")?;
    check_device_healthy(&booted, &stats(&booted)?)?;
    println!(
        "survived: {} malformed frames of {} kinds; {handed} reached the guest; heap_used \
         {heap_before} -> {heap_after}",
        malformed.written,
        malformed.by_kind.len(),
    );
    Ok(())
}

/// 2000 SYNs to the echo port from the host's own address and random ports, written raw onto
/// the tap. The host's stack answers every SYN-ACK with a reset, so every half-open connection
/// must go back to listening: `tcp_connected` returns to 0, then UDP, TCP (16 connections at
/// once) and ICMP echo are exact.
#[test]
fn syn_flood_from_host_then_listeners_recover() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let booted = boot("faults-syn", TapConfig::default(), None)?;
    warm_up(&booted)?;
    let ends = endpoints(&booted)?;
    let before = stats(&booted)?;
    let resets_before = host_resets_sent(&booted)?;
    let syns = with_packet_socket(&booted, |socket| {
        let mut factory = FrameFactory::new(ends, 0x5EED_0005);
        syn_flood(
            socket,
            &mut factory,
            SynSource::Host,
            SYN_FLOOD,
            Pacing::default(),
        )
    })?;
    println!("SYN flood: {syns}");
    let after = stats_until(&booted, Duration::from_secs(20), "tcp_connected=0", |s| {
        s.get("tcp_connected") == Some(0)
    })
    .map_err(|failure| {
        // Say whether the host did its part: one reset per SYN-ACK it received.
        let resets = host_resets_sent(&booted)
            .map(|now| (now - resets_before).to_string())
            .unwrap_or_else(|_| "?".to_string());
        booted.guest.check_failed(format!(
            "{}; meanwhile the host's stack sent {resets} TCP resets (Tcp OutRsts) in answer \
             to the guest's SYN-ACKs",
            match &failure.error {
                xtask::Error::Check(message) => message.clone(),
                other => other.to_string(),
            }
        ))
    })?;
    println!("stats after: {}", after.line);
    let accepted = grew(&booted, &before, &after, "tcp_accepted")?;
    println!(
        "guest: tcp_accepted +{accepted}, tcp_half_open_reset +{}, tx_packets +{} (SYN-ACKs \
         and resets)",
        grew(&booted, &before, &after, "tcp_half_open_reset")?,
        grew(&booted, &before, &after, "tx_packets")?
    );
    if accepted == 0 || accepted > syns.written {
        return Err(booted.guest.check_failed(format!(
            "tcp_accepted grew by {accepted} for {} SYNs (expected 1..={})",
            syns.written, syns.written
        )));
    }
    check_device_healthy(&booted, &after)?;
    echo_all(&booted, "after the SYN flood")?;
    println!("survived: {} SYNs from the host", syns.written);
    Ok(())
}

/// 2000 SYNs from made-up peers on the guest's subnet (10.0.2.100-199) that never answer, not
/// even ARP. UDP and ICMP echo must work at once, and TCP echo must work again within 30 s: a
/// half-open connection must not hold a listening socket forever (the guest counts the ones it
/// resets in `tcp_half_open_reset`).
#[test]
fn spoofed_syn_flood_then_tcp_echo_recovers() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let booted = boot("faults-synflood", TapConfig::default(), None)?;
    warm_up(&booted)?;
    let ends = endpoints(&booted)?;
    let before = stats(&booted)?;
    let syns = with_packet_socket(&booted, |socket| {
        let mut factory = FrameFactory::new(ends, 0x5EED_5A5A);
        syn_flood(
            socket,
            &mut factory,
            SynSource::Spoofed,
            SYN_FLOOD,
            Pacing::default(),
        )
    })?;
    println!("spoofed SYN flood: {syns}");
    let target = echo_target(&booted);
    let ip = booted.ready.ip;
    booted.client(move || -> Result<(), ClientError> {
        let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
        let mut report = EchoReport::default();
        for _ in 0..10 {
            client.exchange(64, 3, &mut report)?;
        }
        icmp_echo(
            ip,
            IcmpEchoOptions {
                count: 5,
                size: 56,
                timeout: ECHO_WAIT,
                attempts: 3,
            },
        )?;
        Ok(())
    })?;
    let during = stats(&booted)?;
    println!("stats after the flood: {}", during.line);
    let began = Instant::now();
    let limit = Duration::from_secs(30);
    let mut last_error = None;
    while began.elapsed() < limit {
        match booted.client(move || tcp_echo(target, 16 * 1024, Duration::from_secs(3))) {
            Ok(report) => {
                println!(
                    "TCP echo works again {:.1} s after the flood (connect {:.1} ms)",
                    began.elapsed().as_secs_f64(),
                    report.connect.as_secs_f64() * 1e3
                );
                last_error = None;
                break;
            }
            Err(error) => {
                last_error = Some(error.error.to_string());
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    if let Some(error) = last_error {
        let now = stats(&booted)?;
        return Err(booted.guest.check_failed(format!(
            "TCP echo still fails {:.0} s after {} spoofed SYNs (last error: {error}); \
             tcp_connected went {} -> {} (tcp_accepted +{}): half-open connections hold the \
             listening sockets. Stats: {:?}",
            limit.as_secs_f64(),
            syns.written,
            counter(&booted, &before, "tcp_connected")?,
            counter(&booted, &now, "tcp_connected")?,
            grew(&booted, &before, &now, "tcp_accepted")?,
            now.line
        )));
    }
    let recovered = stats(&booted)?;
    let reset = grew(&booted, &before, &recovered, "tcp_half_open_reset")?;
    println!(
        "guest: tcp_accepted +{}, tcp_half_open_reset +{reset}",
        grew(&booted, &before, &recovered, "tcp_accepted")?
    );
    if reset == 0 {
        return Err(booted.guest.check_failed(format!(
            "TCP recovered from {} spoofed SYNs, but tcp_half_open_reset did not move: {:?}",
            syns.written, recovered.line
        )));
    }
    echo_all(&booted, "after the spoofed SYN flood")?;
    check_device_healthy(&booted, &stats(&booted)?)?;
    println!("survived: {} spoofed SYNs", syns.written);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// UDP flood
// ---------------------------------------------------------------------------------------------

/// UDP datagrams of 18 to 1472 bytes to the echo port at the host's maximum send rate (two
/// sending threads) for 10 s. Then:
/// - echo works at once: probes sent every 20 ms from the end of the flood get an exact echo
///   within 1 s;
/// - every receive buffer is back in the ring: `rx_descriptors - rx_packets - rx_dropped`
///   equals the receive queue size the guest logged, as before the flood (no datagram of this
///   size spans two buffers: `rx_merged` stays 0);
/// - `heap_used` is back to its level before the flood; the device was never reset.
#[test]
fn udp_flood_then_echo_ring_and_heap_recover() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let booted = boot("faults-udpflood", TapConfig::default(), None)?;
    warm_up(&booted)?;
    let lines = booted.guest.lines();
    let queue_size = rx_queue_size_from_log(lines.iter().map(|line| line.text.as_str()))
        .ok_or_else(|| {
            booted
                .guest
                .check_failed("no `queues rx N` in the serial log".to_string())
        })?;
    let before = stats(&booted)?;
    let ring_before = on(&booted, RxRingAccount::from_stats(&before))?;
    println!("stats before: {}", before.line);
    println!("before the flood: {ring_before}");
    if ring_before.in_ring != queue_size as i64 {
        return Err(booted.guest.check_failed(format!(
            "before the flood: {ring_before}, but the receive queue has {queue_size} entries"
        )));
    }
    let tap_before = tap_counters(&booted)?;
    let target = echo_target(&booted);
    let flood = booted.client(move || {
        udp_flood(target, &[18, 64, 256, 1472], FLOOD_TIME, 2).map_err(|source| ClientError::Io {
            context: "flooding".to_string(),
            source,
        })
    })?;
    let flood_end = Instant::now();
    // Echo at once: probe every 20 ms from the moment the flood stops. Probes sent while the
    // tap's queue and the guest's socket buffers still hold the flood's backlog may be lost.
    let first = booted.client(move || -> Result<(Duration, EchoReport), ClientError> {
        let mut client = UdpEchoClient::connect(target, Duration::from_millis(20))?;
        let mut report = EchoReport::default();
        client.exchange(64, 50, &mut report)?;
        Ok((flood_end.elapsed(), report))
    })?;
    let tap_after = tap_counters(&booted)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = stats(&booted)?;
    let ring_after = on(&booted, RxRingAccount::from_stats(&after))?;
    println!("stats after: {}", after.line);
    println!(
        "flood: {} datagrams ({:.1} MB) in {:.1} s = {:.0} datagrams/s; {} sends refused by the \
         host; the tap handed {} frames to QEMU and dropped {}",
        flood.datagrams,
        flood.bytes as f64 / 1e6,
        flood.elapsed.as_secs_f64(),
        flood.rate(),
        flood.refused,
        tap_after.tx_packets - tap_before.tx_packets,
        tap_after.tx_dropped - tap_before.tx_dropped
    );
    println!(
        "guest: rx_packets +{} udp_echoed +{} udp_echo_dropped +{} tx_packets +{} tx_full +{} \
         rx_dropped +{} kicks +{} interrupts +{}",
        grew(&booted, &before, &after, "rx_packets")?,
        grew(&booted, &before, &after, "udp_echoed")?,
        grew(&booted, &before, &after, "udp_echo_dropped")?,
        grew(&booted, &before, &after, "tx_packets")?,
        grew(&booted, &before, &after, "tx_full")?,
        grew(&booted, &before, &after, "rx_dropped")?,
        grew(&booted, &before, &after, "kicks")?,
        grew(&booted, &before, &after, "interrupts")?,
    );
    println!(
        "first echo after the flood: exact {:.1} ms after it stopped ({} probe(s) of 20 ms)",
        first.0.as_secs_f64() * 1e3,
        first.1.sent
    );
    if first.0 > Duration::from_secs(1) {
        return Err(booted.guest.check_failed(format!(
            "the first exact echo came {:.1} ms after the flood stopped (limit 1 s)",
            first.0.as_secs_f64() * 1e3
        )));
    }
    println!("after the flood: {ring_after}");
    if grew(&booted, &before, &after, "rx_packets")? < flood.datagrams / 100 {
        return Err(booted.guest.check_failed(format!(
            "the flood barely reached the guest: rx_packets grew by {} for {} datagrams sent",
            grew(&booted, &before, &after, "rx_packets")?,
            flood.datagrams
        )));
    }
    if ring_after.merged != 0 || ring_after.in_ring != queue_size as i64 {
        return Err(booted.guest.check_failed(format!(
            "receive buffers are missing after the flood: {ring_after}; the queue has \
             {queue_size} entries (before: {ring_before})"
        )));
    }
    let (heap_before, heap_after) = (heap_used(&booted, &before)?, heap_used(&booted, &after)?);
    println!(
        "heap_used {heap_before} before, {heap_after} after; heap_peak {} -> {}",
        counter(&booted, &before, "heap_peak")?,
        counter(&booted, &after, "heap_peak")?
    );
    if heap_after != heap_before {
        return Err(booted.guest.check_failed(format!(
            "heap_used {heap_before} before the flood, {heap_after} after"
        )));
    }
    check_device_healthy(&booted, &after)?;
    echo_all(&booted, "after the UDP flood")?;
    println!(
        "survived: a {:.0} s UDP flood of {} datagrams ({:.0}/s)",
        flood.elapsed.as_secs_f64(),
        flood.datagrams,
        flood.rate()
    );
    Ok(())
}

fn on<T>(booted: &TapGuest, result: Result<T, ClientError>) -> Result<T, RunError> {
    common::on_guest(&booted.guest, result)
}

// ---------------------------------------------------------------------------------------------
// TCP churn
// ---------------------------------------------------------------------------------------------

/// 2000 TCP connections, 8 at a time: most echo 1 byte to 16 KiB exactly and close normally;
/// every 5th is reset (`SO_LINGER` 0) after part of its echo came back, every 10th right after
/// connecting. Then `tcp_connected` is back to 0, `heap_used` to its level before, every
/// connection that exchanged data was counted in `tcp_accepted`, and echo is exact.
#[test]
fn tcp_churn_2000_connections_no_leak() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let booted = boot("faults-churn", TapConfig::default(), None)?;
    warm_up(&booted)?;
    let before = stats(&booted)?;
    println!("stats before: {}", before.line);
    if counter(&booted, &before, "tcp_connected")? != 0 {
        return Err(booted.guest.check_failed(format!(
            "tcp_connected is not 0 at the start: {:?}",
            before.line
        )));
    }
    let target = echo_target(&booted);
    let began = Instant::now();
    let churn =
        booted.client(move || tcp_churn(target, CHURN_CONNECTIONS, 8, 16 * 1024, TCP_WAIT))?;
    let elapsed = began.elapsed();
    println!(
        "churn: {} connections in {:.1} s: {} echoed and closed ({} bytes), {} reset \
         mid-transfer, {} reset right after connecting",
        churn.opened,
        elapsed.as_secs_f64(),
        churn.echoed,
        churn.bytes_echoed,
        churn.reset_mid_transfer,
        churn.reset_after_connect
    );
    let after = stats_until(&booted, Duration::from_secs(20), "tcp_connected=0", |s| {
        s.get("tcp_connected") == Some(0)
    })?;
    println!("stats after: {}", after.line);
    let accepted = grew(&booted, &before, &after, "tcp_accepted")?;
    let aborted = grew(&booted, &before, &after, "tcp_aborted")?;
    println!("guest: tcp_accepted +{accepted}, tcp_aborted +{aborted}");
    if churn.opened != CHURN_CONNECTIONS as u64 {
        return Err(booted.guest.check_failed(format!(
            "{} of {CHURN_CONNECTIONS} connections opened",
            churn.opened
        )));
    }
    let exchanged = churn.echoed + churn.reset_mid_transfer;
    if accepted < exchanged || accepted > churn.opened {
        return Err(booted.guest.check_failed(format!(
            "tcp_accepted grew by {accepted}; {exchanged} connections exchanged data and {} \
             were opened",
            churn.opened
        )));
    }
    let (heap_before, heap_after) = (heap_used(&booted, &before)?, heap_used(&booted, &after)?);
    println!(
        "heap_used {heap_before} before, {heap_after} after; heap_peak {} -> {}",
        counter(&booted, &before, "heap_peak")?,
        counter(&booted, &after, "heap_peak")?
    );
    if heap_after != heap_before {
        return Err(booted.guest.check_failed(format!(
            "heap_used {heap_before} before the churn, {heap_after} after"
        )));
    }
    check_device_healthy(&booted, &after)?;
    echo_all(&booted, "after the churn")?;
    println!(
        "survived: {} TCP connections ({} reset mid-transfer, {} reset after connect)",
        churn.opened, churn.reset_mid_transfer, churn.reset_after_connect
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Link flaps
// ---------------------------------------------------------------------------------------------

/// QMP `set_link n0 off`, then `on`, ten times. Each change is logged on the console
/// (`virtio-net: link down`, `virtio-net: link up`), and after each `up` UDP echo resumes by
/// itself within 5 s. Afterwards the stats say `link=up` and all echo is exact.
#[test]
fn link_flap_10_times_echo_resumes() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let socket = unique_temp_path("vireo-flap", "qmp");
    let mut booted = boot("faults-flap", TapConfig::default(), Some(&socket))?;
    warm_up(&booted)?;
    let before = stats(&booted)?;
    let mut qmp = booted.guest.qmp(Duration::from_secs(10))?;
    let target = echo_target(&booted);
    let mut resumed = Vec::new();
    for flap in 1..=FLAPS {
        qmp.set_link("n0", false)
            .map_err(|error| booted.guest.failure(error))?;
        let down = wait_for_count(
            &booted.guest,
            "virtio-net: link down",
            flap,
            Duration::from_secs(5),
        )?;
        qmp.set_link("n0", true)
            .map_err(|error| booted.guest.failure(error))?;
        let up = wait_for_count(
            &booted.guest,
            "virtio-net: link up",
            flap,
            Duration::from_secs(5),
        )?;
        let began = Instant::now();
        let report = booted.client(move || -> Result<EchoReport, ClientError> {
            let mut client = UdpEchoClient::connect(target, Duration::from_millis(250))?;
            let mut report = EchoReport::default();
            client.exchange(64, 20, &mut report)?;
            Ok(report)
        })?;
        resumed.push(began.elapsed());
        println!(
            "flap {flap}: `link down` logged after {:.1} ms, `link up` after {:.1} ms, echo \
             resumed after {:.1} ms ({} send(s))",
            down.as_secs_f64() * 1e3,
            up.as_secs_f64() * 1e3,
            began.elapsed().as_secs_f64() * 1e3,
            report.sent
        );
    }
    let downs = count_lines(&booted.guest, "virtio-net: link down");
    let ups = count_lines(&booted.guest, "virtio-net: link up");
    if downs != FLAPS || ups != FLAPS {
        return Err(booted.guest.check_failed(format!(
            "{FLAPS} flaps logged {downs} `link down` and {ups} `link up` lines"
        )));
    }
    let after = stats(&booted)?;
    println!("stats after: {}", after.line);
    check_device_healthy(&booted, &after)?;
    println!(
        "config_changes +{}",
        grew(&booted, &before, &after, "config_changes")?
    );
    // Every link-up is announced with one gratuitous ARP (RFC 5227 announcement).
    let announces = grew(&booted, &before, &after, "announces")?;
    if announces != FLAPS as u64 {
        return Err(booted.guest.check_failed(format!(
            "{FLAPS} link-ups announced with {announces} gratuitous ARPs"
        )));
    }
    echo_all(&booted, "after the link flaps")?;
    drop(qmp);
    let slowest = resumed.iter().max().copied().unwrap_or_default();
    println!(
        "survived: {FLAPS} link flaps; echo resumed each time, at worst {:.1} ms after `up`",
        slowest.as_secs_f64() * 1e3
    );
    booted.guest.kill();
    Ok(())
}
