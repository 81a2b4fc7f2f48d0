//! Echo tests: the kernel under QEMU serving UDP, TCP and ICMP echo and the stats service
//! (README, "The guest contract"). One QEMU per test, each with a wall-clock limit; a failure
//! prints the QEMU command line and the whole serial log.
//!
//! - Over QEMU user networking (no root): the guest's ports are forwarded to 127.0.0.1. UDP echo
//!   of 1, 64, 1400 and 1472 bytes, TCP echo of 1 MiB, 64 concurrent TCP connections of
//!   16 KiB each, the stats line with its counters moving, and `services=` adding discard.
//! - Over a tap in a private network namespace (root; CI runs them and never skips them): UDP,
//!   ICMP and TCP echo in each receive mode (`mode=irq`, `mode=poll`, `mode=adaptive`). The
//!   clients run inside the namespace and talk to 10.0.2.15 only.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{TapGuest, boot_tap, boot_user_net, on_guest, root_networking_or_skip};
use xtask::client::EchoReport;
use xtask::{
    IcmpEchoOptions, RunError, Stats, UdpEchoClient, icmp_echo, query_stats, tcp_echo,
    tcp_echo_concurrent,
};

/// Wait for each UDP/ICMP echo.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the first echo (ARP, the guest's first packets) may take after `ready`.
const WARM_UP: Duration = Duration::from_secs(20);
/// Limit for a whole TCP exchange.
const TCP_WAIT: Duration = Duration::from_secs(90);
/// Datagrams per size.
const DATAGRAMS: u64 = 20;
/// The guest's default address, inside the test namespace.
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Warms up, then ping-pongs `count` datagrams of `size` bytes, each echoed exactly (a lost
/// datagram may be sent again, up to 3 times, and is counted).
fn udp_exchange(
    target: SocketAddr,
    size: usize,
    count: u64,
) -> Result<EchoReport, xtask::ClientError> {
    let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
    client.warm_up(WARM_UP, Duration::from_millis(250))?;
    let mut report = EchoReport::default();
    for _ in 0..count {
        client.exchange(size, 3, &mut report)?;
    }
    Ok(report)
}

fn print_report(what: &str, report: &EchoReport) {
    println!(
        "{what}: sent {} exact {} retransmits {} stale {}; {}",
        report.sent,
        report.received,
        report.retransmits,
        report.stale,
        report.summary().map(|s| s.to_string()).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------------
// User networking
// ---------------------------------------------------------------------------------------------

fn user_udp_echo(size: usize) -> Result<(), RunError> {
    let booted = boot_user_net("")?;
    let report = on_guest(
        &booted.guest,
        udp_exchange(booted.net.udp_echo(), size, DATAGRAMS),
    )?;
    print_report(&format!("UDP echo, {size} bytes"), &report);
    if report.received != DATAGRAMS {
        return Err(booted.guest.check_failed(format!(
            "{} of {DATAGRAMS} datagrams of {size} bytes came back exact",
            report.received
        )));
    }
    Ok(())
}

#[test]
fn user_udp_echo_exact_1_byte() -> Result<(), RunError> {
    user_udp_echo(1)
}

#[test]
fn user_udp_echo_exact_64_bytes() -> Result<(), RunError> {
    user_udp_echo(64)
}

#[test]
fn user_udp_echo_exact_1400_bytes() -> Result<(), RunError> {
    user_udp_echo(1400)
}

/// 1472 bytes: the largest payload that fits a 1500-byte MTU without fragmentation.
#[test]
fn user_udp_echo_exact_1472_bytes() -> Result<(), RunError> {
    user_udp_echo(1472)
}

/// The `ready` line carries the default address, QEMU's default MAC and the default mode.
#[test]
fn user_ready_line_names_ip_mac_and_mode() -> Result<(), RunError> {
    let booted = boot_user_net("")?;
    let ready = &booted.ready;
    if ready.ip != GUEST || ready.prefix != 24 || ready.mode != "adaptive" {
        return Err(booted.guest.check_failed(format!(
            "expected ip=10.0.2.15/24 mode=adaptive in the ready line, got {:?}",
            ready.text
        )));
    }
    if !ready.mac.eq_ignore_ascii_case("52:54:00:12:34:56") {
        return Err(booted.guest.check_failed(format!(
            "expected QEMU's default MAC 52:54:00:12:34:56, got {}",
            ready.mac
        )));
    }
    Ok(())
}

/// `services=` chooses the services: with discard added, the `ready` line names it after the
/// default services, the stats line carries its counters after the stats service's, echo still
/// works, and an unknown name gets a `cmdline:` line and is skipped.
#[test]
fn user_services_on_the_command_line_add_discard() -> Result<(), RunError> {
    let booted = boot_user_net("services=echo,stats,discard,bogus")?;
    let guest = &booted.guest;
    if !booted
        .ready
        .text
        .ends_with("udp-echo=7 tcp-echo=7 stats=7007 discard=9")
    {
        return Err(guest.check_failed(format!(
            "expected the ready line to end with the services' words, got {:?}",
            booted.ready.text
        )));
    }
    if common::count_lines(
        guest,
        "cmdline: unknown service 'bogus' in services= skipped",
    ) != 1
    {
        return Err(guest.check_failed("no `cmdline:` line names the unknown service 'bogus'"));
    }
    let mut client = on_guest(
        guest,
        UdpEchoClient::connect(booted.net.udp_echo(), ECHO_WAIT),
    )?;
    on_guest(guest, client.warm_up(WARM_UP, Duration::from_millis(250)))?;
    let stats = on_guest(guest, query_stats(booted.net.stats(), ECHO_WAIT, 3))?;
    println!("stats: {}", stats.line);
    if stats.get("discard_datagrams") != Some(0)
        || stats.get("discard_bytes") != Some(0)
        || !stats
            .line
            .contains(" discard_datagrams=0 discard_bytes=0 dhcp_leases=0 dhcp_lost=0 ")
    {
        return Err(guest.check_failed(format!(
            "expected discard's counters before the host's in the stats line: {:?}",
            stats.line
        )));
    }
    Ok(())
}

#[test]
fn user_tcp_echo_1mib_exact() -> Result<(), RunError> {
    let booted = boot_user_net("")?;
    let report = on_guest(
        &booted.guest,
        tcp_echo(booted.net.tcp_echo(), 1 << 20, TCP_WAIT),
    )?;
    println!(
        "1 MiB echoed exactly: connect {:.1} ms, transfer {:.1} ms ({:.2} MB/s)",
        report.connect.as_secs_f64() * 1e3,
        report.transfer.as_secs_f64() * 1e3,
        report.throughput() / 1e6
    );
    Ok(())
}

/// 64 connections open at once (all connected before any data flows), each echoing 16 KiB of
/// its own pattern.
#[test]
fn user_tcp_echo_64_concurrent_connections_16kib_each() -> Result<(), RunError> {
    let booted = boot_user_net("")?;
    let reports = on_guest(
        &booted.guest,
        tcp_echo_concurrent(booted.net.tcp_echo(), 64, 16 * 1024, TCP_WAIT),
    )?;
    let slowest = reports.iter().map(|r| r.transfer).max().unwrap_or_default();
    let slowest_connect = reports.iter().map(|r| r.connect).max().unwrap_or_default();
    println!(
        "{} connections x 16 KiB echoed exactly; slowest connect {:.1} ms, slowest transfer \
         {:.1} ms",
        reports.len(),
        slowest_connect.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3
    );
    if reports.len() != 64 {
        return Err(booted
            .guest
            .check_failed(format!("{} of 64 connections completed", reports.len())));
    }
    Ok(())
}

/// Counters every stats line must carry (README, guest contract).
const REQUIRED_COUNTERS: [&str; 14] = [
    "udp_echoed",
    "interrupts",
    "kicks",
    "heap_used",
    "uptime_ms",
    "rx_ns",
    "tx_ns",
    "kick_ns",
    "idle_pass_ns",
    "spin_ns",
    "halted_ns",
    "yields",
    "stalls",
    "typical_gap_ns",
];

/// The time the loop spent, by the guest's TSC, that echoing must make grow.
const TIMED_WHILE_ECHOING: [&str; 4] = ["rx_ns", "tx_ns", "kick_ns", "stack_busy_ns"];

/// The stats line parses as `key=value` words with the required counters, `udp_echoed` grows
/// by exactly the number of datagrams echoed between two queries, the loop's time breakdown
/// grows with them, and the adaptive guard names a known regime.
#[test]
fn user_stats_line_parses_and_udp_echoed_grows() -> Result<(), RunError> {
    let booted = boot_user_net("")?;
    let guest = &booted.guest;
    let net = booted.net;
    // Warm up first, so that the probes are counted before the first query.
    let mut client = on_guest(guest, UdpEchoClient::connect(net.udp_echo(), ECHO_WAIT))?;
    on_guest(guest, client.warm_up(WARM_UP, Duration::from_millis(250)))?;
    let before = on_guest(guest, query_stats(net.stats(), ECHO_WAIT, 3))?;
    println!("stats before: {}", before.line);
    let check_required = |stats: &Stats| -> Result<(), RunError> {
        let missing: Vec<&str> = REQUIRED_COUNTERS
            .into_iter()
            .filter(|key| stats.get(key).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(guest.check_failed(format!(
                "the stats line lacks numeric {missing:?}: {:?}",
                stats.line
            )))
        }
    };
    check_required(&before)?;
    let sent = 25;
    let mut report = EchoReport::default();
    for _ in 0..sent {
        // One attempt each: the count must match exactly.
        on_guest(guest, client.exchange(100, 1, &mut report))?;
    }
    let after = on_guest(guest, query_stats(net.stats(), ECHO_WAIT, 3))?;
    println!("stats after {sent} echoes: {}", after.line);
    check_required(&after)?;
    let counter = |stats: &Stats, key: &str| on_guest(guest, stats.counter(key));
    let echoed = counter(&after, "udp_echoed")?.saturating_sub(counter(&before, "udp_echoed")?);
    if echoed != sent {
        return Err(guest.check_failed(format!(
            "udp_echoed grew by {echoed}, expected {sent} (before {:?}, after {:?})",
            before.line, after.line
        )));
    }
    if counter(&after, "uptime_ms")? < counter(&before, "uptime_ms")? {
        return Err(guest.check_failed("uptime_ms went backwards".to_string()));
    }
    for key in TIMED_WHILE_ECHOING {
        if counter(&after, key)? <= counter(&before, key)? {
            return Err(guest.check_failed(format!(
                "{key} did not grow over {sent} echoes (before {:?}, after {:?})",
                before.line, after.line
            )));
        }
    }
    let regime = after.fields.get("spin_regime").map(String::as_str);
    if !matches!(regime, Some("spinning" | "halting")) {
        return Err(guest.check_failed(format!(
            "spin_regime is {regime:?}, expected spinning or halting: {:?}",
            after.line
        )));
    }
    for key in ["rx_packets", "tx_packets"] {
        if let (Some(b), Some(a)) = (before.get(key), after.get(key))
            && a < b + sent
        {
            return Err(guest.check_failed(format!(
                "{key} grew by {} for {sent} echoed datagrams",
                a.saturating_sub(b)
            )));
        }
    }
    Ok(())
}

/// What a user-networking variant must show in the serial log besides echoing.
#[derive(Clone, Copy)]
enum LogCheck {
    /// Nothing beyond the echoes.
    None,
    /// The `ready` line names this mode.
    Mode(&'static str),
    /// The driver negotiated this feature (`virtio-net: negotiated features ...`).
    Negotiated(&'static str),
    /// The kernel printed a `cmdline:` line naming each of these words.
    CmdlineErrors(&'static [&'static str]),
}

/// UDP echo of `udp_size` bytes and a TCP echo of `tcp_bytes`, both exact, on a guest booted
/// with `append` and the NIC `nic` (which must say `netdev=n0`) over user networking, after
/// `check` on its serial log.
fn user_udp_and_tcp(
    append: &str,
    nic: &str,
    udp_size: usize,
    tcp_bytes: usize,
    check: LogCheck,
) -> Result<(), RunError> {
    let booted = common::boot_user_net_with(append, nic)?;
    let guest = &booted.guest;
    match check {
        LogCheck::None => {}
        LogCheck::Mode(mode) if booted.ready.mode != mode => {
            return Err(guest.check_failed(format!(
                "booted with mode={mode}, but the ready line says mode={}",
                booted.ready.mode
            )));
        }
        LogCheck::Mode(_) => {}
        LogCheck::Negotiated(name) => {
            let features = common::negotiated_features(guest)?;
            println!("negotiated: {}", features.join(" "));
            if !features.iter().any(|f| f == name) {
                return Err(guest.check_failed(format!(
                    "with {nic} the driver should negotiate {name}; it negotiated {features:?}"
                )));
            }
        }
        LogCheck::CmdlineErrors(words) => {
            let complaints: Vec<String> = guest
                .lines()
                .into_iter()
                .filter(|line| line.text.contains("cmdline:"))
                .map(|line| line.text)
                .collect();
            println!("cmdline lines: {complaints:#?}");
            for word in words {
                if !complaints.iter().any(|line| line.contains(word)) {
                    return Err(guest.check_failed(format!(
                        "no `cmdline:` line names {word:?} (append {append:?})"
                    )));
                }
            }
            if booted.ready.mode != "adaptive" {
                return Err(guest.check_failed(format!(
                    "a bad mode should fall back to the default adaptive, got mode={}",
                    booted.ready.mode
                )));
            }
        }
    }
    let report = on_guest(
        guest,
        udp_exchange(booted.net.udp_echo(), udp_size, DATAGRAMS),
    )?;
    print_report(&format!("UDP echo, {udp_size} bytes"), &report);
    let tcp = on_guest(guest, tcp_echo(booted.net.tcp_echo(), tcp_bytes, TCP_WAIT))?;
    println!(
        "{tcp_bytes}-byte TCP echo exact in {:.1} ms",
        tcp.transfer.as_secs_f64() * 1e3
    );
    Ok(())
}

/// One test per receive mode and per NIC option of the net issue, over user networking.
macro_rules! user_variant_tests {
    ($($name:ident: $append:expr, $nic:expr, $udp_size:expr, $tcp_bytes:expr, $check:expr;)*) => {$(
        #[test]
        fn $name() -> Result<(), RunError> {
            user_udp_and_tcp($append, $nic, $udp_size, $tcp_bytes, $check)
        }
    )*};
}

const MIB: usize = 1 << 20;
const KIB_256: usize = 256 * 1024;

user_variant_tests! {
    // Each mode: 1400-byte UDP and 1 MiB of TCP, exact (ICMP in each mode is over the tap below).
    user_mode_irq_udp_tcp: "mode=irq", xtask::DEFAULT_NIC, 1400, MIB, LogCheck::Mode("irq");
    user_mode_poll_udp_tcp: "mode=poll", xtask::DEFAULT_NIC, 1400, MIB, LogCheck::Mode("poll");
    user_mode_adaptive_udp_tcp: "mode=adaptive", xtask::DEFAULT_NIC, 1400, MIB,
        LogCheck::Mode("adaptive");
    user_nic_mrg_rxbuf_off_udp_tcp: "", "virtio-net-pci,netdev=n0,mrg_rxbuf=off", 1400, KIB_256,
        LogCheck::None;
    user_nic_csum_off_udp_tcp: "", "virtio-net-pci,netdev=n0,csum=off,guest_csum=off", 1400,
        KIB_256, LogCheck::None;
    user_nic_vectors_0_udp_tcp: "", "virtio-net-pci,netdev=n0,vectors=0", 1400, KIB_256,
        LogCheck::None;
    // QEMU accepts mq=on on user networking (one queue pair behind it) and offers MQ, so the
    // driver negotiates it and sets the pairs through the control queue; no multi-queue tap is
    // needed.
    user_nic_mq_on_udp_tcp: "", "virtio-net-pci,netdev=n0,mq=on,vectors=10", 1400, KIB_256,
        LogCheck::Negotiated("MQ");
    // The guest's MTU is 1400: 1372 bytes of UDP payload fill it exactly.
    user_nic_host_mtu_1400_udp_tcp: "", "virtio-net-pci,netdev=n0,host_mtu=1400", 1372, KIB_256,
        LogCheck::Negotiated("MTU");
    // Unknown and malformed keys get `cmdline:` lines and the defaults; the guest still serves.
    user_bad_cmdline_still_serves: "bogus=1 mode=turbo log=loud", xtask::DEFAULT_NIC, 1400,
        KIB_256, LogCheck::CmdlineErrors(&["bogus", "turbo", "loud"]);
}

// ---------------------------------------------------------------------------------------------
// Tap in a private network namespace (root)
// ---------------------------------------------------------------------------------------------

fn boot_tap_mode(mode: &str) -> Result<Option<TapGuest>, RunError> {
    if !root_networking_or_skip() {
        return Ok(None);
    }
    let booted = boot_tap(&format!("echo-{mode}"), &format!("mode={mode}"))?;
    if booted.ready.mode != mode {
        return Err(booted.guest.check_failed(format!(
            "booted with mode={mode}, but the ready line says mode={}",
            booted.ready.mode
        )));
    }
    Ok(Some(booted))
}

fn tap_udp_echo(mode: &str) -> Result<(), RunError> {
    let Some(booted) = boot_tap_mode(mode)? else {
        return Ok(());
    };
    let target = SocketAddr::from((booted.ready.ip, 7));
    for size in [1, 64, 1400, 1472] {
        let report = booted.client(move || udp_exchange(target, size, DATAGRAMS))?;
        print_report(&format!("tap, mode={mode}, UDP echo {size} bytes"), &report);
    }
    Ok(())
}

fn tap_icmp_echo(mode: &str) -> Result<(), RunError> {
    let Some(booted) = boot_tap_mode(mode)? else {
        return Ok(());
    };
    let target = booted.ready.ip;
    // ARP and the first packets: allow the first ping a few retries.
    booted.client(move || {
        icmp_echo(
            target,
            IcmpEchoOptions {
                count: 1,
                size: 8,
                timeout: Duration::from_millis(500),
                attempts: 40,
            },
        )
    })?;
    for size in [0, 56, 1472] {
        let report = booted.client(move || {
            icmp_echo(
                target,
                IcmpEchoOptions {
                    count: 10,
                    size,
                    timeout: ECHO_WAIT,
                    attempts: 3,
                },
            )
        })?;
        print_report(
            &format!("tap, mode={mode}, ICMP echo {size} bytes"),
            &report,
        );
    }
    Ok(())
}

fn tap_tcp_echo(mode: &str) -> Result<(), RunError> {
    let Some(booted) = boot_tap_mode(mode)? else {
        return Ok(());
    };
    let target = SocketAddr::from((booted.ready.ip, 7));
    let single = booted.client(move || tcp_echo(target, 1 << 20, TCP_WAIT))?;
    println!(
        "tap, mode={mode}: 1 MiB echoed exactly in {:.1} ms ({:.2} MB/s)",
        single.transfer.as_secs_f64() * 1e3,
        single.throughput() / 1e6
    );
    let many = booted.client(move || tcp_echo_concurrent(target, 16, 16 * 1024, TCP_WAIT))?;
    println!(
        "tap, mode={mode}: {} concurrent connections x 16 KiB echoed exactly",
        many.len()
    );
    Ok(())
}

macro_rules! tap_mode_tests {
    ($($mode:literal: $udp:ident, $icmp:ident, $tcp:ident;)*) => {$(
        #[test]
        fn $udp() -> Result<(), RunError> {
            tap_udp_echo($mode)
        }

        #[test]
        fn $icmp() -> Result<(), RunError> {
            tap_icmp_echo($mode)
        }

        #[test]
        fn $tcp() -> Result<(), RunError> {
            tap_tcp_echo($mode)
        }
    )*};
}

tap_mode_tests! {
    "irq": tap_irq_udp_echo, tap_irq_icmp_echo, tap_irq_tcp_echo;
    "poll": tap_poll_udp_echo, tap_poll_icmp_echo, tap_poll_tcp_echo;
    "adaptive": tap_adaptive_udp_echo, tap_adaptive_icmp_echo, tap_adaptive_tcp_echo;
}
