//! Every QEMU option and host state of issue 12, booted for real: VIRTIO_F_ACCESS_PLATFORM
//! (`iommu_platform=on`) on q35 and pc, the shared-vector MSI-X layouts (`vectors=2`,
//! `vectors=1`), the NIC behind a `pcie-root-port` (q35) and a `pci-bridge` (pc), the
//! polling-only path (no MSI-X, no I/O APIC) with the link down at boot, the MAC from the
//! command line, DHCPv4 on user networking (lease and renewals), and on a tap in a private
//! namespace (root): the device's receive filter, the gratuitous ARP at link-up (first echo
//! within 50 ms of `ready` with no neighbour entry on the host), QMP `announce-self`, and a DHCP
//! server that never answers.
//!
//! One QEMU per boot, each with a wall-clock limit; a failure prints the QEMU command line and
//! the whole serial log.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    NET_RUN_LIMIT, READY_WAIT, TapGuest, boot_tap_with, boot_user_net_with, count_lines, on_guest,
    root_networking_or_skip, wait_for_count,
};
use xtask::client::{ClientError, EchoReport};
use xtask::faults::{PacketSocket, ethernet, ipv4_header, udp_datagram};
use xtask::{
    Guest, Machine, NetNs, QemuCommand, RunError, RunOptions, Stats, TapConfig, UdpEchoClient,
    UserNet, UserNetGuest, query_stats, tcp_echo, unique_temp_path, wait_for_ready,
};

/// Wait for each UDP echo.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the first echo after `ready` may take.
const WARM_UP: Duration = Duration::from_secs(20);
/// Limit for a TCP exchange.
const TCP_WAIT: Duration = Duration::from_secs(60);

/// UDP echo of 64 and 1400 bytes (10 each) and a 256 KiB TCP echo, every byte checked.
fn echo_exact(guest: &Guest, udp: SocketAddr, tcp: SocketAddr) -> Result<(), RunError> {
    let report = on_guest(
        guest,
        (|| -> Result<EchoReport, ClientError> {
            let mut client = UdpEchoClient::connect(udp, ECHO_WAIT)?;
            client.warm_up(WARM_UP, Duration::from_millis(250))?;
            let mut report = EchoReport::default();
            for size in [64, 1400] {
                for _ in 0..10 {
                    client.exchange(size, 3, &mut report)?;
                }
            }
            Ok(report)
        })(),
    )?;
    let tcp_report = on_guest(guest, tcp_echo(tcp, 256 * 1024, TCP_WAIT))?;
    println!(
        "echo exact: {} UDP datagrams, {} TCP bytes in {:.1} ms",
        report.received,
        256 * 1024,
        tcp_report.transfer.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Starts QEMU for `command` with the networked wall-clock limit, printing the command line.
fn spawn(command: &QemuCommand) -> Result<Guest, RunError> {
    println!("running: {}", command.command_line());
    Guest::spawn(
        command,
        RunOptions {
            timeout: NET_RUN_LIMIT,
            echo: false,
        },
    )
}

/// A guest with `ip=dhcp` on the tap of `netns`, started (not waited for).
fn dhcp_guest_in(netns: &NetNs) -> Result<Guest, RunError> {
    let command = QemuCommand::for_kernel(common::kernel())
        .map_err(RunError::setup)?
        .in_netns(netns.name())
        .append("ip=dhcp")
        .netdev(NetNs::tap_netdev("n0", "tap0", None))
        .device(xtask::DEFAULT_NIC);
    spawn(&command)
}

/// Fails unless some serial line contains `needle`.
fn expect_line(guest: &Guest, needle: &str) -> Result<(), RunError> {
    if count_lines(guest, needle) == 0 {
        return Err(guest.check_failed(format!("no serial line contains {needle:?}")));
    }
    Ok(())
}

/// Boots on user networking with `machine`, `nic` (on netdev `n0`), `append` and `extra`
/// QEMU arguments, checks the `expect` lines of the boot log and exact echo, then shuts down.
fn user_net_case(
    machine: Machine,
    nic: &str,
    append: &str,
    extra: &[&str],
    expect: &[&str],
) -> Result<UserNetGuest, RunError> {
    let booted = common::boot_user_net_on(machine, append, extra, nic)?;
    for needle in expect {
        expect_line(&booted.guest, needle)?;
    }
    echo_exact(&booted.guest, booted.net.udp_echo(), booted.net.tcp_echo())?;
    Ok(booted)
}

fn user_stats(booted: &UserNetGuest) -> Result<Stats, RunError> {
    on_guest(&booted.guest, query_stats(booted.net.stats(), ECHO_WAIT, 3))
}

fn counter(guest: &Guest, stats: &Stats, key: &str) -> Result<u64, RunError> {
    stats
        .counter(key)
        .map_err(|error| guest.failure(xtask::Error::Client(error)))
}

// ---------------------------------------------------------------------------------------------
// User networking
// ---------------------------------------------------------------------------------------------

/// `iommu_platform=on` without a vIOMMU: QEMU refuses FEATURES_OK unless ACCESS_PLATFORM is
/// accepted; the guest accepts it, says how it maps DMA, and serves on q35 and on pc.
#[test]
fn access_platform_on_q35_and_pc_negotiates_and_serves() -> Result<(), RunError> {
    for machine in [Machine::Q35, Machine::Pc] {
        let mut booted = user_net_case(
            machine,
            "virtio-net-pci,netdev=n0,disable-legacy=on,iommu_platform=on",
            "",
            &[],
            &[
                "ACCESS_PLATFORM negotiated",
                "identity mapping",
                "negotiated features",
            ],
        )?;
        let negotiated = common::negotiated_features(&booted.guest)?;
        if !negotiated.iter().any(|name| name == "ACCESS_PLATFORM") {
            return Err(booted
                .guest
                .check_failed(format!("ACCESS_PLATFORM not negotiated: {negotiated:?}")));
        }
        booted.guest.kill();
    }
    Ok(())
}

/// `vectors=2` and `vectors=1`: too few MSI-X entries for separate config, rx and tx vectors,
/// so the guest shares one vector; in `mode=irq` the echo works only if that vector delivers.
#[test]
fn shared_msix_vector_layouts_vectors_2_and_1_serve_in_irq_mode() -> Result<(), RunError> {
    for vectors in [2, 1] {
        let mut booted = user_net_case(
            Machine::Q35,
            &format!("virtio-net-pci,netdev=n0,vectors={vectors}"),
            "mode=irq",
            &[],
            &["interrupts: MSI-X (one shared vector)"],
        )?;
        let stats = user_stats(&booted)?;
        if counter(&booted.guest, &stats, "interrupts")? == 0 {
            return Err(booted.guest.check_failed("no NIC interrupt was counted"));
        }
        booted.guest.kill();
    }
    Ok(())
}

/// The NIC on bus 1 behind a PCI Express root port (q35) and behind a PCI-to-PCI bridge (pc):
/// enumeration follows the bridges and the device is driven with its interrupts.
#[test]
fn nic_behind_a_pcie_root_port_and_a_pci_bridge_serves() -> Result<(), RunError> {
    let cases: [(Machine, &[&str], &str); 2] = [
        (
            Machine::Q35,
            &[
                "-device",
                "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,addr=0x5",
            ],
            "virtio-net-pci,netdev=n0,bus=rp1",
        ),
        (
            Machine::Pc,
            &["-device", "pci-bridge,id=br1,chassis_nr=1,addr=0x5"],
            "virtio-net-pci,netdev=n0,bus=br1,addr=0x3",
        ),
    ];
    for (machine, extra, nic) in cases {
        let mut booted = user_net_case(
            machine,
            nic,
            "mode=irq",
            extra,
            &["virtio: 0000:01:", "interrupts: MSI-X"],
        )?;
        booted.guest.kill();
    }
    Ok(())
}

/// No MSI-X (`vectors=0`) and no I/O APIC route (`-M pc,acpi=off`: no MADT): the polling-only
/// path. QEMU starts paused; the link is set down before the guest runs, so it boots with the
/// link down and must say so, not `ready`. Setting it up over QMP must be seen by the status
/// timer alone (no config interrupt exists): then `ready`, exact echo, `status_polls` moving
/// and no NIC interrupt.
#[test]
fn polling_only_link_down_at_boot_then_up_via_qmp() -> Result<(), RunError> {
    let socket = unique_temp_path("vireo-pollonly", "qmp");
    let net = UserNet::allocate().map_err(RunError::setup)?;
    let command = QemuCommand::for_kernel(common::kernel())
        .map_err(RunError::setup)?
        .machine(Machine::Pc)
        .args(["-machine", "acpi=off", "-S"])
        .qmp_socket(&socket)
        .netdev(net.netdev("n0"))
        .device("virtio-net-pci,netdev=n0,vectors=0");
    let mut guest = spawn(&command)?;
    let mut qmp = guest.qmp(Duration::from_secs(10))?;
    qmp.set_link("n0", false)
        .map_err(|error| guest.failure(error))?;
    qmp.execute("cont", None)
        .map_err(|error| guest.failure(error))?;
    wait_for_count(
        &guest,
        "net: link down; `ready` follows when it comes up",
        1,
        READY_WAIT,
    )?;
    expect_line(&guest, "interrupts: none (polling only)")?;
    std::thread::sleep(Duration::from_millis(500));
    if count_lines(&guest, "vireo: ready") != 0 {
        return Err(guest.check_failed("`ready` printed while the link was down"));
    }
    let up_at = Instant::now();
    qmp.set_link("n0", true)
        .map_err(|error| guest.failure(error))?;
    let (ready, _) = wait_for_ready(&mut guest, Duration::from_secs(10))?;
    println!(
        "ready {:.1} ms after QMP set_link up: {}",
        up_at.elapsed().as_secs_f64() * 1e3,
        ready.text
    );
    expect_line(&guest, "virtio-net: link up")?;
    echo_exact(&guest, net.udp_echo(), net.tcp_echo())?;
    let stats = on_guest(&guest, query_stats(net.stats(), ECHO_WAIT, 3))?;
    println!("stats: {}", stats.line);
    let polls = counter(&guest, &stats, "status_polls")?;
    let interrupts = counter(&guest, &stats, "interrupts")?;
    if polls == 0 || interrupts != 0 || !stats.line.contains("link=up") {
        return Err(guest.check_failed(format!(
            "expected status_polls > 0, interrupts = 0 and link=up: {}",
            stats.line
        )));
    }
    drop(qmp);
    guest.kill();
    Ok(())
}

/// `mac=` on the command line: the guest uses it (ready line), tells the device
/// (VIRTIO_NET_CTRL_MAC_ADDR_SET), and echo works, which it could not if the device still
/// filtered on its own MAC. A multicast `mac=` gets a `cmdline:` line and the device's MAC.
#[test]
fn mac_from_the_command_line_is_used_and_told_to_the_device() -> Result<(), RunError> {
    let mut booted = boot_user_net_with(
        "mac=02:aa:bb:cc:dd:ee",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
    )?;
    if booted.ready.mac != "02:aa:bb:cc:dd:ee" {
        return Err(booted
            .guest
            .check_failed(format!("ready line MAC {}", booted.ready.mac)));
    }
    expect_line(&booted.guest, "set with VIRTIO_NET_CTRL_MAC_ADDR_SET")?;
    expect_line(&booted.guest, "receive filter: promiscuous off")?;
    echo_exact(&booted.guest, booted.net.udp_echo(), booted.net.tcp_echo())?;
    let stats = user_stats(&booted)?;
    if counter(&booted.guest, &stats, "rx_foreign")? != 0 {
        return Err(booted
            .guest
            .check_failed(format!("frames for other MACs arrived: {}", stats.line)));
    }
    booted.guest.kill();

    let mut booted = boot_user_net_with(
        "mac=01:00:5e:00:00:01",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:57",
    )?;
    expect_line(
        &booted.guest,
        "cmdline: invalid mac= value '01:00:5e:00:00:01': not a station address",
    )?;
    if booted.ready.mac != "52:54:00:12:34:57" {
        return Err(booted
            .guest
            .check_failed(format!("ready line MAC {}", booted.ready.mac)));
    }
    echo_exact(&booted.guest, booted.net.udp_echo(), booted.net.tcp_echo())?;
    booted.guest.kill();
    Ok(())
}

/// `ip=dhcp` under QEMU user networking works out of the box (QEMU's built-in DHCP server),
/// and with the lease capped at 4 s (`dhcp-max-lease=4`) the client renews: 12 s later the
/// lease was never lost and echo still works.
#[test]
fn dhcp_on_user_networking_leases_and_renews() -> Result<(), RunError> {
    let mut booted = boot_user_net_with("ip=dhcp dhcp-max-lease=4", xtask::DEFAULT_NIC)?;
    if booted.ready.ip != Ipv4Addr::new(10, 0, 2, 15) || booted.ready.prefix != 24 {
        return Err(booted
            .guest
            .check_failed(format!("leased {}", booted.ready.text)));
    }
    expect_line(&booted.guest, "addressing=dhcp")?;
    expect_line(
        &booted.guest,
        "dhcp: leased 10.0.2.15/24 from server 10.0.2.2, router 10.0.2.2",
    )?;
    echo_exact(&booted.guest, booted.net.udp_echo(), booted.net.tcp_echo())?;
    std::thread::sleep(Duration::from_secs(12));
    let stats = user_stats(&booted)?;
    println!("after 12 s: {}", stats.line);
    if counter(&booted.guest, &stats, "dhcp_lost")? != 0
        || counter(&booted.guest, &stats, "dhcp_leases")? == 0
    {
        return Err(booted
            .guest
            .check_failed(format!("the 4 s lease was not renewed: {}", stats.line)));
    }
    echo_exact(&booted.guest, booted.net.udp_echo(), booted.net.tcp_echo())?;
    booted.guest.kill();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tap in a private namespace (root)
// ---------------------------------------------------------------------------------------------

fn tap_boot(
    prefix: &str,
    nic: &str,
    append: &str,
    qmp: Option<&std::path::Path>,
) -> Result<TapGuest, RunError> {
    boot_tap_with(prefix, &[TapConfig::default()], |command| {
        let mut command = command
            .netdev(NetNs::tap_netdev("n0", "tap0", None))
            .device(nic);
        if !append.is_empty() {
            command = command.append(append);
        }
        match qmp {
            Some(socket) => command.qmp_socket(socket),
            None => command,
        }
    })
}

fn tap_stats(booted: &TapGuest) -> Result<Stats, RunError> {
    let target = SocketAddr::from((booted.ready.ip, 7007));
    booted.client(move || query_stats(target, ECHO_WAIT, 3))
}

fn tap_warm_up(booted: &TapGuest) -> Result<(), RunError> {
    let target = SocketAddr::from((booted.ready.ip, 7));
    booted.client(move || {
        let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
        client.warm_up(WARM_UP, Duration::from_millis(250))
    })?;
    Ok(())
}

/// Frames written onto the tap to a foreign unicast MAC and to a multicast group: with
/// VIRTIO_NET_F_CTRL_RX the device drops them (`rx_foreign` stays 0); with `ctrl_rx=off` it
/// delivers them and the driver drops and counts every one.
#[test]
fn foreign_frames_are_dropped_by_the_device_with_ctrl_rx_and_counted_without()
-> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    const FRAMES: u64 = 200;
    for (nic, device_filters) in [
        ("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56", true),
        (
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,ctrl_rx=off",
            false,
        ),
    ] {
        let mut booted = tap_boot("platform-filter", nic, "", None)?;
        tap_warm_up(&booted)?;
        let before = tap_stats(&booted)?;
        let sent = booted.client(move || -> Result<u64, ClientError> {
            let socket = PacketSocket::open("tap0").map_err(|error| ClientError::Io {
                context: "opening a packet socket on tap0".to_string(),
                source: error,
            })?;
            let host_mac =
                xtask::faults::interface_mac("tap0").map_err(|error| ClientError::Io {
                    context: "reading tap0's MAC".to_string(),
                    source: error,
                })?;
            let mut sent = 0;
            for index in 0..FRAMES {
                let destination = if index % 2 == 0 {
                    [0x52, 0x54, 0x00, 0xde, 0xad, 0x01]
                } else {
                    [0x01, 0x00, 0x5e, 0x00, 0x00, 0x42]
                };
                let (host, guest) = (Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 15));
                let udp = udp_datagram(host, guest, 40000, 7, &[index as u8; 32]);
                let mut packet = ipv4_header(host, guest, 17, udp.len(), index as u16, 0).to_vec();
                packet.extend_from_slice(&udp);
                let frame = ethernet(destination, host_mac, 0x0800, &packet);
                socket.send(&frame).map_err(|error| ClientError::Io {
                    context: "writing a frame".to_string(),
                    source: error,
                })?;
                sent += 1;
            }
            Ok(sent)
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let after = tap_stats(&booted)?;
        let foreign = counter(&booted.guest, &after, "rx_foreign")?
            - counter(&booted.guest, &before, "rx_foreign")?;
        let echoed = counter(&booted.guest, &after, "udp_echoed")?
            - counter(&booted.guest, &before, "udp_echoed")?;
        println!(
            "{nic}: {sent} foreign frames written, rx_foreign +{foreign}, udp_echoed +{echoed}"
        );
        // Without the device's filter the host's own multicast chatter on the tap (IPv6
        // neighbour discovery, MLD) arrives too, so at least the frames written.
        let as_expected = if device_filters {
            foreign == 0
        } else {
            foreign >= sent
        };
        if !as_expected || echoed != 0 {
            return Err(booted.guest.check_failed(format!(
                "expected rx_foreign +{} and no echo, saw +{foreign} and {echoed}",
                if device_filters {
                    "0".to_string()
                } else {
                    format!(">={sent}")
                }
            )));
        }
        booted.guest.kill();
    }
    Ok(())
}

/// A fresh tap and no neighbour entry for the guest on the host: a client that starts sending
/// before the guest boots (one datagram per millisecond) makes the host's ARP entry for the
/// guest incomplete; the guest's gratuitous ARP at link-up completes it, so the first echo is
/// answered within 50 ms of `ready` instead of after the host's 1 s ARP retry.
#[test]
fn first_echo_on_a_fresh_tap_within_50_ms_of_ready() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let netns = NetNs::create_with("platform-announce", &[TapConfig::default()])
        .map_err(RunError::setup)?;
    let command = QemuCommand::for_kernel(common::kernel())
        .map_err(RunError::setup)?
        .in_netns(netns.name())
        .netdev(NetNs::tap_netdev("n0", "tap0", None))
        .device(xtask::DEFAULT_NIC);
    println!("running: {}", command.command_line());
    let target = SocketAddr::from((Ipv4Addr::new(10, 0, 2, 15), 7));
    std::thread::scope(|scope| -> Result<(), RunError> {
        let prober = scope.spawn(|| {
            netns.run(move || -> Result<Instant, ClientError> {
                let socket =
                    std::net::UdpSocket::bind("10.0.2.2:0").map_err(|error| ClientError::Io {
                        context: "binding the probe socket".to_string(),
                        source: error,
                    })?;
                socket
                    .set_read_timeout(Some(Duration::from_millis(1)))
                    .map_err(|error| ClientError::Io {
                        context: "setting a timeout".to_string(),
                        source: error,
                    })?;
                let limit = Instant::now() + Duration::from_secs(60);
                let mut buffer = [0u8; 64];
                while Instant::now() < limit {
                    // Unreachable until the neighbour resolves: errors are expected.
                    let _ = socket.send_to(b"probe-before-ready", target);
                    if let Ok((length, _)) = socket.recv_from(&mut buffer)
                        && &buffer[..length] == b"probe-before-ready"
                    {
                        return Ok(Instant::now());
                    }
                }
                Err(ClientError::Timeout {
                    waiting_for: "the first echo of the probes".to_string(),
                    after: Duration::from_secs(60),
                })
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut guest = Guest::spawn(
            &command,
            RunOptions {
                timeout: NET_RUN_LIMIT,
                echo: false,
            },
        )?;
        let started = Instant::now() - guest.elapsed();
        let (_, ready_line) = wait_for_ready(&mut guest, READY_WAIT)?;
        let first_echo = match prober.join() {
            Ok(Ok(Ok(at))) => at,
            Ok(Ok(Err(error))) => return Err(guest.failure(xtask::Error::Client(error))),
            Ok(Err(error)) => return Err(guest.failure(error)),
            Err(_) => return Err(guest.check_failed("the probe thread panicked")),
        };
        let echo_at = first_echo.duration_since(started);
        let after_ready = echo_at.as_secs_f64() - ready_line.at.as_secs_f64();
        println!(
            "ready at {:.1} ms, first echo at {:.1} ms: {:.1} ms after ready",
            ready_line.at.as_secs_f64() * 1e3,
            echo_at.as_secs_f64() * 1e3,
            after_ready * 1e3
        );
        if after_ready > 0.050 {
            return Err(guest.check_failed(format!(
                "first echo {:.1} ms after ready (goal: 50 ms)",
                after_ready * 1e3
            )));
        }
        guest.kill();
        Ok(())
    })
}

/// QMP `announce-self`: with VIRTIO_NET_F_GUEST_ANNOUNCE QEMU asks the guest (status bit
/// VIRTIO_NET_S_ANNOUNCE and a config interrupt); the guest sends a gratuitous ARP and
/// acknowledges with VIRTIO_NET_CTRL_ANNOUNCE_ACK.
#[test]
fn qmp_announce_self_is_answered_with_a_gratuitous_arp_and_acknowledged() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let socket = unique_temp_path("vireo-announce", "qmp");
    let mut booted = tap_boot(
        "platform-announce-self",
        xtask::DEFAULT_NIC,
        "",
        Some(&socket),
    )?;
    tap_warm_up(&booted)?;
    let before = tap_stats(&booted)?;
    let mut qmp = booted.guest.qmp(Duration::from_secs(10))?;
    qmp.execute(
        "announce-self",
        Some(r#"{"initial":50,"max":100,"rounds":1,"step":50}"#),
    )
    .map_err(|error| booted.guest.failure(error))?;
    wait_for_count(
        &booted.guest,
        "virtio-net: the device asks for an announcement",
        1,
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let after = tap_stats(&booted)?;
    println!("after announce-self: {}", after.line);
    let acks = counter(&booted.guest, &after, "announce_acks")?
        - counter(&booted.guest, &before, "announce_acks")?;
    let announces = counter(&booted.guest, &after, "announces")?
        - counter(&booted.guest, &before, "announces")?;
    if acks != 1 || announces != 1 {
        return Err(booted.guest.check_failed(format!(
            "expected one gratuitous ARP and one ANNOUNCE_ACK, saw {announces} and {acks}"
        )));
    }
    tap_warm_up(&booted)?;
    drop(qmp);
    booted.guest.kill();
    Ok(())
}

/// `ip=dhcp` on a tap with no DHCP server: the guest keeps asking, says so on the console, and
/// neither panics nor claims `ready`.
#[test]
fn dhcp_server_that_never_answers_is_reported_and_survived() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let netns =
        NetNs::create_with("platform-nodhcp", &[TapConfig::default()]).map_err(RunError::setup)?;
    let mut guest = dhcp_guest_in(&netns)?;
    wait_for_count(&guest, "dhcp: asking for an address", 1, READY_WAIT)?;
    wait_for_count(&guest, "dhcp: no lease after", 2, Duration::from_secs(30))?;
    if count_lines(&guest, "PANIC") != 0 || count_lines(&guest, "vireo: ready") != 0 {
        return Err(guest.check_failed("a PANIC or a `ready` without an address"));
    }
    if let Some(exit) = guest.exit() {
        return Err(guest.check_failed(format!("the guest exited: {exit:?}")));
    }
    guest.kill();
    drop(netns);
    Ok(())
}

/// `ip=dhcp` on a tap whose DHCP server starts 4 s after the guest (busybox `udhcpd`, a real
/// server, from Debian's `busybox-static`, installed when missing): the guest logs that no
/// lease came, keeps asking, then takes the lease the late server offers (address, /24,
/// router), prints `ready` and echoes exactly.
#[test]
fn dhcp_server_that_answers_late_gives_a_lease_and_echo() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    xtask::ensure_packages(&[("busybox", "busybox-static")])
        .map_err(|error| RunError::setup(error.into()))?;
    let netns = NetNs::create_with("platform-latedhcp", &[TapConfig::default()])
        .map_err(RunError::setup)?;
    let mut guest = dhcp_guest_in(&netns)?;
    wait_for_count(&guest, "dhcp: asking for an address", 1, READY_WAIT)?;
    std::thread::sleep(Duration::from_secs(4));
    if count_lines(&guest, "vireo: ready") != 0 {
        return Err(guest.check_failed("`ready` before any DHCP server existed"));
    }
    let config = unique_temp_path("vireo-udhcpd", "conf");
    let leases = unique_temp_path("vireo-udhcpd", "leases");
    let pidfile = unique_temp_path("vireo-udhcpd", "pid");
    std::fs::write(
        &config,
        format!(
            "start 10.0.2.15\nend 10.0.2.15\ninterface tap0\nmax_leases 1\n\
             option subnet 255.255.255.0\noption router 10.0.2.2\noption lease 600\n\
             lease_file {}\npidfile {}\n",
            leases.display(),
            pidfile.display()
        ),
    )
    .map_err(|error| {
        guest.failure(xtask::Error::Io {
            context: "writing udhcpd.conf".to_string(),
            source: error,
        })
    })?;
    std::fs::write(&leases, b"").map_err(|error| {
        guest.failure(xtask::Error::Io {
            context: "creating the lease file".to_string(),
            source: error,
        })
    })?;
    let mut server = netns
        .command("busybox")
        .args(["udhcpd", "-f"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|error| {
            guest.failure(xtask::Error::Io {
                context: "starting busybox udhcpd in the namespace".to_string(),
                source: error,
            })
        })?;
    let started = Instant::now();
    let outcome = (|| -> Result<(), RunError> {
        let (ready, _) = wait_for_ready(&mut guest, Duration::from_secs(20))?;
        println!(
            "ready {:.1} s after the late server started: {}",
            started.elapsed().as_secs_f64(),
            ready.text
        );
        expect_line(&guest, "dhcp: no lease after")?;
        expect_line(
            &guest,
            "dhcp: leased 10.0.2.15/24 from server 10.0.2.2, router 10.0.2.2",
        )?;
        if ready.ip != Ipv4Addr::new(10, 0, 2, 15) || !ready.text.contains("addressing=dhcp") {
            return Err(guest.check_failed(format!("unexpected ready line {}", ready.text)));
        }
        let target = SocketAddr::from((ready.ip, 7));
        let report = match netns.run(move || -> Result<EchoReport, ClientError> {
            let mut client = UdpEchoClient::connect(target, ECHO_WAIT)?;
            client.warm_up(WARM_UP, Duration::from_millis(250))?;
            let mut report = EchoReport::default();
            for size in [64, 1400] {
                for _ in 0..10 {
                    client.exchange(size, 3, &mut report)?;
                }
            }
            Ok(report)
        }) {
            Ok(result) => on_guest(&guest, result)?,
            Err(error) => return Err(guest.failure(error)),
        };
        println!(
            "echo exact over the leased address: {} datagrams",
            report.received
        );
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    for path in [&config, &leases, &pidfile] {
        let _ = std::fs::remove_file(path);
    }
    outcome?;
    guest.kill();
    Ok(())
}

/// The TCP initial sequence number the guest puts on the wire for a connection from the host's
/// port `source_port` to its echo port, read from the SYN-ACK captured on the tap.
fn wire_isn(booted: &TapGuest, source_port: u16) -> Result<u32, RunError> {
    let guest = SocketAddr::from((booted.ready.ip, 7));
    booted.client(move || -> Result<u32, ClientError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| ClientError::Io { context, source }
        };
        let capture =
            xtask::faults::PacketCapture::open("tap0").map_err(io("capturing on tap0"))?;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(io("a TCP socket"))?;
        socket.set_reuse_address(true).map_err(io("SO_REUSEADDR"))?;
        socket
            .bind(&SocketAddr::from((Ipv4Addr::new(10, 0, 2, 2), source_port)).into())
            .map_err(io("binding the source port"))?;
        socket
            .connect_timeout(&guest.into(), Duration::from_secs(5))
            .map_err(io("connecting to the echo port"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let Some(frame) = capture.next_frame().map_err(io("reading the capture"))? else {
                continue;
            };
            // Ethernet, IPv4 (protocol 6) from the guest, TCP from port 7 with SYN and ACK.
            if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
                continue;
            }
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let tcp = &frame[14 + ihl..];
            let flags = tcp[13];
            let from = u16::from_be_bytes([tcp[0], tcp[1]]);
            let to = u16::from_be_bytes([tcp[2], tcp[3]]);
            if from == 7 && to == source_port && flags & 0x12 == 0x12 {
                drop(socket);
                return Ok(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]));
            }
        }
        Err(ClientError::Timeout {
            waiting_for: "the guest's SYN-ACK on tap0".to_string(),
            after: Duration::from_secs(5),
        })
    })
}

/// RFC 6528 in practice: two boots with the same QEMU command line and a deterministic clock
/// (`-icount shift=0`) give different ISNs for the same 4-tuple when an entropy device or
/// RDRAND (`-cpu max`) is there (the ISNs of a second source port are printed beside them).
#[test]
fn tcp_isns_differ_between_identical_boots_with_an_entropy_device() -> Result<(), RunError> {
    if !root_networking_or_skip() {
        return Ok(());
    }
    let setups: [(&[&str], &str); 2] = [
        (
            &["-device", "virtio-rng-pci"],
            "entropy: seeded from virtio-rng (32 bytes)",
        ),
        (&["-cpu", "max"], "entropy: seeded from RDRAND"),
    ];
    for (source_args, source_line) in setups {
        let mut isns = Vec::new();
        for boot in 0..2 {
            let mut booted = boot_tap_with("platform-isn", &[TapConfig::default()], |command| {
                command
                    .args(["-icount", "shift=0"])
                    .args(source_args.iter().copied())
                    .netdev(NetNs::tap_netdev("n0", "tap0", None))
                    .device(xtask::DEFAULT_NIC)
            })?;
            expect_line(&booted.guest, source_line)?;
            tap_warm_up(&booted)?;
            let first = wire_isn(&booted, 40007)?;
            let second = wire_isn(&booted, 40008)?;
            println!(
                "boot {boot}: ISN {first:#010x} from port 40007, {second:#010x} from port 40008"
            );
            isns.push(first);
            if isns.len() == 2 && isns[0] == isns[1] {
                return Err(booted.guest.check_failed(format!(
                    "two identical boots gave the same ISN {first:#010x} for the same 4-tuple"
                )));
            }
            booted.guest.kill();
        }
    }
    Ok(())
}
