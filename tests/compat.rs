//! The QEMU compatibility matrix (issue 7): the kernel boots, prints `ready` and serves exact UDP
//! and TCP echo on every machine, RAM size, vCPU count and device shape below. One QEMU per test,
//! each with a wall-clock limit; a failure prints the QEMU command line and the whole serial log.
//!
//! The base axes are covered pairwise in six boots: every pair of values of {machine q35/pc,
//! RAM 64 MiB/512 MiB/4 GiB, 1/4 vCPUs, transitional/modern-only device} appears in some test.
//! Then one test per device shape: `page-per-vq=on` (on q35 and on pc), `mq=on` on a multi-queue
//! tap, `host_mtu=9000` with jumbo frames end to end over a tap, and a second virtio-net device
//! that must be left alone. The receive modes and the NIC options of the net issue
//! (`mrg_rxbuf`, `csum`, `vectors`, `mq` over user networking, `host_mtu=1400`) are in
//! `tests/echo.rs`; `packed`, `event_idx`, `indirect_desc` and `rx_queue_size` in
//! `tests/matrix.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    NET_RUN_LIMIT, READY_WAIT, TapGuest, boot_tap_with, count_lines, on_guest,
    root_networking_or_skip,
};
use xtask::client::{ClientError, EchoReport};
use xtask::{
    Guest, IcmpEchoOptions, Machine, NetNs, QemuCommand, RunError, RunOptions, TapConfig,
    UdpEchoClient, boot_on_user_net, icmp_echo, tcp_echo, tcp_echo_concurrent,
};

/// Wait for each UDP/ICMP echo.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the first echo after `ready` may take (ARP, first packets).
const WARM_UP: Duration = Duration::from_secs(20);
/// Limit for a whole TCP exchange.
const TCP_WAIT: Duration = Duration::from_secs(60);

/// Whether the legacy interface is on (QEMU's default, PCI device id 0x1000) or off
/// (`disable-legacy=on`, modern-only 0x1041).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Transitional,
    Modern,
}

impl Device {
    /// The NIC spec on netdev `n0`, with `extra` options.
    fn nic(self, extra: &str) -> String {
        let mut spec = "virtio-net-pci,netdev=n0".to_string();
        if self == Device::Modern {
            spec.push_str(",disable-legacy=on");
        }
        if !extra.is_empty() {
            spec.push(',');
            spec.push_str(extra);
        }
        spec
    }

    /// What the guest logs for the device it drives.
    fn log_word(self) -> &'static str {
        match self {
            Device::Transitional => "(1af4:1000, transitional): driving it",
            Device::Modern => "(1af4:1041, modern): driving it",
        }
    }
}

/// Warms up, then ping-pongs 10 datagrams of each size, each echoed exactly (a lost datagram
/// may be sent again, up to 3 times).
fn udp_sizes(target: SocketAddr, sizes: &[usize]) -> Result<EchoReport, ClientError> {
    let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
    client.warm_up(WARM_UP, Duration::from_millis(250))?;
    let mut report = EchoReport::default();
    for &size in sizes {
        for _ in 0..10 {
            client.exchange(size, 3, &mut report)?;
        }
    }
    Ok(report)
}

/// Fails unless some serial line contains `needle`.
fn expect_line(guest: &Guest, needle: &str) -> Result<(), RunError> {
    if count_lines(guest, needle) == 0 {
        return Err(guest.check_failed(format!("no serial line contains {needle:?}")));
    }
    Ok(())
}

/// The number in `memory: N MiB RAM` of the boot log.
fn logged_ram_mib(guest: &Guest) -> Option<u64> {
    guest.lines().iter().find_map(|line| {
        let rest = line.text.split("memory: ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Boots on user networking with the given machine, RAM, vCPUs and device, checks the boot log
/// (RAM seen, CPUs in the MADT, the device kind driven, and `expect` lines), then UDP echo of 1,
/// 64, 1400 and 1472 bytes and a 256 KiB TCP echo, all exact.
fn user_net_case(
    machine: Machine,
    memory_mib: u64,
    cpus: u32,
    device: Device,
    extra: &str,
    expect: &[&str],
) -> Result<(), RunError> {
    let base = QemuCommand::for_kernel(common::kernel())
        .map_err(RunError::setup)?
        .machine(machine)
        .memory_mib(memory_mib)
        .smp(cpus);
    let booted = boot_on_user_net(
        &base,
        &device.nic(extra),
        RunOptions {
            timeout: NET_RUN_LIMIT,
            echo: false,
        },
        READY_WAIT,
    )?;
    let guest = &booted.guest;
    println!("running: {}", guest.command_line());
    println!(
        "ready after {:.3} s: {}",
        booted.ready_at.as_secs_f64(),
        booted.ready.text
    );
    match logged_ram_mib(guest) {
        // The firmware keeps a little RAM for itself; 8 MiB is plenty of slack.
        Some(mib) if mib <= memory_mib && mib + 8 >= memory_mib => {}
        other => {
            return Err(guest.check_failed(format!(
                "booted with {memory_mib} MiB, the guest reports {other:?} MiB"
            )));
        }
    }
    expect_line(guest, &format!("MADT {cpus} CPUs"))?;
    expect_line(guest, device.log_word())?;
    for needle in expect {
        expect_line(guest, needle)?;
    }
    let udp = on_guest(
        guest,
        udp_sizes(booted.net.udp_echo(), &[1, 64, 1400, 1472]),
    )?;
    let tcp = on_guest(guest, tcp_echo(booted.net.tcp_echo(), 256 * 1024, TCP_WAIT))?;
    println!(
        "{machine} {memory_mib} MiB {cpus} vCPU(s) {device:?} {extra}: UDP echo exact {} \
         (retransmits {}); {}; TCP 256 KiB exact in {:.1} ms",
        udp.received,
        udp.retransmits,
        udp.summary().map(|s| s.to_string()).unwrap_or_default(),
        tcp.transfer.as_secs_f64() * 1e3
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Machine x RAM x vCPUs x device kind, pairwise
// ---------------------------------------------------------------------------------------------

#[test]
fn q35_64mib_1cpu_transitional() -> Result<(), RunError> {
    user_net_case(Machine::Q35, 64, 1, Device::Transitional, "", &[])
}

#[test]
fn q35_512mib_4cpus_modern() -> Result<(), RunError> {
    user_net_case(Machine::Q35, 512, 4, Device::Modern, "", &[])
}

/// On q35 with 4 GiB the heap (and so every DMA buffer) lies above 4 GiB.
#[test]
fn q35_4gib_4cpus_transitional() -> Result<(), RunError> {
    user_net_case(Machine::Q35, 4096, 4, Device::Transitional, "", &[])
}

#[test]
fn pc_64mib_4cpus_modern() -> Result<(), RunError> {
    user_net_case(Machine::Pc, 64, 4, Device::Modern, "", &[])
}

#[test]
fn pc_512mib_1cpu_transitional() -> Result<(), RunError> {
    user_net_case(Machine::Pc, 512, 1, Device::Transitional, "", &[])
}

#[test]
fn pc_4gib_1cpu_modern() -> Result<(), RunError> {
    user_net_case(Machine::Pc, 4096, 1, Device::Modern, "", &[])
}

// ---------------------------------------------------------------------------------------------
// Device shapes
// ---------------------------------------------------------------------------------------------

/// `page-per-vq=on`: each queue's notify address is a page apart (`notify_off_multiplier`
/// 4096), read from the capability rather than assumed.
#[test]
fn q35_page_per_vq_modern() -> Result<(), RunError> {
    user_net_case(
        Machine::Q35,
        128,
        1,
        Device::Modern,
        "page-per-vq=on",
        &["notify_off_multiplier 4096"],
    )
}

#[test]
fn pc_page_per_vq_transitional() -> Result<(), RunError> {
    user_net_case(
        Machine::Pc,
        128,
        1,
        Device::Transitional,
        "page-per-vq=on",
        &["notify_off_multiplier 4096"],
    )
}

/// A second virtio-net device (modern-only, on its own user network) sits after the first: the
/// first is driven, the second is reported and left alone, and echo works through the first.
#[test]
fn second_virtio_net_device_is_left_alone() -> Result<(), RunError> {
    let base = QemuCommand::for_kernel(common::kernel())
        .map_err(RunError::setup)?
        .netdev("user,id=n1")
        .device("virtio-net-pci,netdev=n1,disable-legacy=on,addr=0x5,mac=52:54:00:12:34:99");
    let booted = boot_on_user_net(
        &base,
        "virtio-net-pci,netdev=n0,addr=0x3",
        RunOptions {
            timeout: NET_RUN_LIMIT,
            echo: false,
        },
        READY_WAIT,
    )?;
    let guest = &booted.guest;
    println!("running: {}", guest.command_line());
    println!("ready: {}", booted.ready.text);
    expect_line(
        guest,
        "00:03.0 virtio-net (1af4:1000, transitional): driving it",
    )?;
    expect_line(
        guest,
        "00:05.0 virtio-net (1af4:1041, modern): another virtio-net device, left alone",
    )?;
    if booted.ready.mac.eq_ignore_ascii_case("52:54:00:12:34:99") {
        return Err(guest.check_failed(format!(
            "the ready line names the second device's MAC: {:?}",
            booted.ready.text
        )));
    }
    let udp = on_guest(guest, udp_sizes(booted.net.udp_echo(), &[1, 1472]))?;
    on_guest(guest, tcp_echo(booted.net.tcp_echo(), 256 * 1024, TCP_WAIT))?;
    println!(
        "two virtio-net devices: the first serves (UDP echo exact {}, TCP 256 KiB exact), the \
         second is left alone",
        udp.received
    );
    Ok(())
}

/// A guest on a tap in a namespace, with `tap` and the NIC spec `nic` on netdev `n0`
/// (`queues` for a multi-queue tap).
fn boot_tap_nic(
    prefix: &str,
    tap: TapConfig,
    queues: Option<u32>,
    nic: &str,
) -> Result<TapGuest, RunError> {
    boot_tap_with(prefix, std::slice::from_ref(&tap), |command| {
        command
            .netdev(NetNs::tap_netdev("n0", &tap.name, queues))
            .device(nic)
    })
}

/// `mq=on` on a two-queue tap (`queues=2`, `ip tuntap add ... multi_queue`): the guest
/// negotiates MQ and uses one queue pair, so QEMU must steer every flow to it. UDP (1 to 1472
/// bytes), ICMP and TCP (one 1 MiB connection and 16 concurrent ones, whose flows the tap
/// spreads over its queues) are exact.
#[test]
fn tap_mq_on_multi_queue_tap() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let tap = TapConfig {
        multi_queue: true,
        ..TapConfig::default()
    };
    let booted = boot_tap_nic(
        "compat-mq",
        tap,
        Some(2),
        "virtio-net-pci,netdev=n0,mq=on,vectors=6",
    )?;
    let guest = &booted.guest;
    let features = guest
        .lines()
        .into_iter()
        .find(|line| line.text.contains("negotiated features"))
        .map(|line| line.text)
        .unwrap_or_default();
    if !features.split_whitespace().any(|word| word == "MQ") {
        return Err(guest.check_failed(format!(
            "mq=on on a two-queue tap, but MQ was not negotiated: {features:?}"
        )));
    }
    let details = booted
        .netns
        .ip(["-d", "-o", "link", "show", "dev", "tap0"])
        .map_err(|error| guest.failure(error))?;
    if !details.contains("multi_queue") {
        return Err(guest.check_failed(format!("tap0 is not multi-queue: {details}")));
    }
    let target = SocketAddr::from((booted.ready.ip, 7));
    let ip = booted.ready.ip;
    let udp = booted.client(move || udp_sizes(target, &[1, 64, 1400, 1472]))?;
    let icmp = booted.client(move || {
        icmp_echo(
            ip,
            IcmpEchoOptions {
                count: 10,
                size: 56,
                timeout: ECHO_WAIT,
                attempts: 3,
            },
        )
    })?;
    booted.client(move || tcp_echo(target, 1 << 20, TCP_WAIT))?;
    let many = booted.client(move || tcp_echo_concurrent(target, 16, 16 * 1024, TCP_WAIT))?;
    println!(
        "mq=on, two-queue tap: UDP echo exact {}, ICMP echo exact {}, TCP 1 MiB exact, {} \
         concurrent TCP connections exact",
        udp.received,
        icmp.received,
        many.len()
    );
    Ok(())
}

/// `host_mtu=9000` with the tap's MTU at 9000: the guest takes the MTU, and jumbo frames go end
/// to end. UDP datagrams of 8900 and 8972 bytes (the largest that fits 9000 without
/// fragmentation) and ICMP echo of 8972 bytes come back exactly, and 1 MiB of TCP echo (with
/// segments up to the jumbo MSS) is exact.
#[test]
fn tap_jumbo_frames_host_mtu_9000() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let tap = TapConfig {
        mtu: Some(9000),
        ..TapConfig::default()
    };
    let booted = boot_tap_nic(
        "compat-jumbo",
        tap,
        None,
        "virtio-net-pci,netdev=n0,host_mtu=9000",
    )?;
    let guest = &booted.guest;
    expect_line(guest, "virtio-net: MTU 9000")?;
    let target = SocketAddr::from((booted.ready.ip, 7));
    let ip = booted.ready.ip;
    let udp = booted.client(move || udp_sizes(target, &[8900, 8972, 1472, 1]))?;
    let icmp = booted.client(move || {
        icmp_echo(
            ip,
            IcmpEchoOptions {
                count: 10,
                size: 8972,
                timeout: ECHO_WAIT,
                attempts: 3,
            },
        )
    })?;
    let tcp = booted.client(move || tcp_echo(target, 1 << 20, TCP_WAIT))?;
    let stats =
        booted.client(move || xtask::query_stats(SocketAddr::from((ip, 7007)), ECHO_WAIT, 3))?;
    println!("stats: {}", stats.line);
    println!(
        "host_mtu=9000: UDP echo exact {} (8900/8972/1472/1 bytes, retransmits {}), ICMP 8972 \
         bytes exact {}, TCP 1 MiB exact in {:.1} ms",
        udp.received,
        udp.retransmits,
        icmp.received,
        tcp.transfer.as_secs_f64() * 1e3
    );
    Ok(())
}
