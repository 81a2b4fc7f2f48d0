//! The virtqueue option matrix (virtqueue issue, "Integration"): virtio-net echoes exactly with
//! each of `packed=on`, `packed=off`, `event_idx=off`, `indirect_desc=off` and
//! `rx_queue_size=1024`, each in `mode=irq` and `mode=poll`, over QEMU user networking. One QEMU
//! per test (the two `event_idx_off` tests boot a second one afterwards, for the comparison
//! below), each with a wall-clock limit; a failure prints the QEMU command line and the whole
//! serial log.
//!
//! Each test:
//! 1. checks from the serial log that the option reached the driver (the negotiated feature
//!    bits, or the RX queue size) and that the `ready` line names the mode;
//! 2. echoes 20 UDP datagrams of 1400 bytes and 1 MiB over TCP, every byte checked;
//! 3. reads the stats service around a burst of UDP echoes and prints kicks and interrupts per
//!    echoed packet. In `mode=poll` the NIC's `interrupts` counter must not move during the
//!    burst: polling keeps receive interrupts disarmed.
//!
//! The `event_idx_off` tests then boot the default NIC (EVENT_IDX on) in the same mode, run the
//! same burst, and print one `EVENT_IDX comparison` line with both figures.

mod common;

use std::time::Duration;

use common::{
    BurstCounters, boot_user_net_with, negotiated_features, on_guest, udp_burst_counters,
};
use xtask::client::EchoReport;
use xtask::{RunError, UdpEchoClient, UserNetGuest, tcp_echo};

/// Wait for each UDP echo.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the first echo (ARP, the guest's first packets) may take after `ready`.
const WARM_UP: Duration = Duration::from_secs(20);
/// Limit for the TCP exchange.
const TCP_WAIT: Duration = Duration::from_secs(90);
/// UDP datagrams of 1400 bytes echoed exactly before the TCP echo.
const DATAGRAMS: u64 = 20;
/// Size of every UDP datagram.
const UDP_SIZE: usize = 1400;
/// Bytes of the TCP echo.
const TCP_BYTES: usize = 1 << 20;
/// UDP echoes in the measured burst between two stats queries.
const BURST: u64 = 1000;

/// What an option must show in the serial log.
#[derive(Clone, Copy)]
enum Expect {
    /// This name is among the negotiated features.
    Feature(&'static str),
    /// This name is not among the negotiated features.
    NoFeature(&'static str),
    /// The device offers this receive queue size; the driver uses at most that many entries.
    RxQueueSize(u32),
}

/// Boots with `virtio-net-pci,netdev=n0,<option>` and `mode=<mode>`, checks the mode and the
/// option's effect, and echoes UDP and TCP exactly. Returns the guest and its UDP client.
fn boot_and_echo(
    option: &str,
    mode: &str,
    expect: Option<Expect>,
) -> Result<(UserNetGuest, UdpEchoClient), RunError> {
    let nic = if option.is_empty() {
        xtask::DEFAULT_NIC.to_string()
    } else {
        format!("{},{option}", xtask::DEFAULT_NIC)
    };
    let booted = boot_user_net_with(&format!("mode={mode}"), &nic)?;
    let guest = &booted.guest;
    if booted.ready.mode != mode {
        return Err(guest.check_failed(format!(
            "booted with mode={mode}, but the ready line says mode={}",
            booted.ready.mode
        )));
    }
    let features = negotiated_features(guest)?;
    println!("negotiated: {}", features.join(" "));
    match expect {
        Some(Expect::Feature(name)) if !features.iter().any(|f| f == name) => {
            return Err(guest.check_failed(format!(
                "with {option} the driver should negotiate {name}; it negotiated {features:?}"
            )));
        }
        Some(Expect::NoFeature(name)) if features.iter().any(|f| f == name) => {
            return Err(guest.check_failed(format!(
                "with {option} the device does not offer {name}, yet the driver reports it \
                 negotiated: {features:?}"
            )));
        }
        Some(Expect::RxQueueSize(offered)) => {
            // The device offers `offered` entries; a modern driver may choose fewer (virtio 1.2
            // 4.1.4.3: queue_size is writable), so the check is that it chose a size the device
            // allows, and the test prints which.
            let chosen = rx_queue_size(guest)
                .ok_or_else(|| guest.check_failed("no `queues rx N` in the driver's serial log"))?;
            println!("{option}: the device offers {offered} RX entries; the driver uses {chosen}");
            if chosen == 0 || chosen > offered {
                return Err(guest.check_failed(format!(
                    "with {option} the driver reports an RX queue of {chosen} entries"
                )));
            }
        }
        _ => {}
    }

    let mut client = on_guest(
        guest,
        UdpEchoClient::connect(booted.net.udp_echo(), ECHO_WAIT),
    )?;
    on_guest(guest, client.warm_up(WARM_UP, Duration::from_millis(250)))?;
    let mut report = EchoReport::default();
    for _ in 0..DATAGRAMS {
        on_guest(guest, client.exchange(UDP_SIZE, 3, &mut report))?;
    }
    println!(
        "UDP: {} x {UDP_SIZE} bytes echoed exactly ({} retransmitted); {}",
        report.received,
        report.retransmits,
        report.summary().map(|s| s.to_string()).unwrap_or_default()
    );
    let tcp = on_guest(guest, tcp_echo(booted.net.tcp_echo(), TCP_BYTES, TCP_WAIT))?;
    println!(
        "TCP: {TCP_BYTES} bytes echoed exactly in {:.1} ms ({:.2} MB/s)",
        tcp.transfer.as_secs_f64() * 1e3,
        tcp.throughput() / 1e6
    );
    Ok((booted, client))
}

/// The receive queue size in the driver's `virtio-net: MTU M, queues rx N tx T` log line.
fn rx_queue_size(guest: &xtask::Guest) -> Option<u32> {
    guest.lines().iter().find_map(|line| {
        let rest = &line.text[line.text.find("queues rx ")? + "queues rx ".len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The measured burst, printed as one `counters` line; in `mode=poll` the NIC's interrupts must
/// not have moved.
fn burst(
    booted: &UserNetGuest,
    client: &mut UdpEchoClient,
    label: &str,
    mode: &str,
) -> Result<BurstCounters, RunError> {
    let counters = udp_burst_counters(booted, client, UDP_SIZE, BURST)?;
    println!(
        "counters [{label}, mode={mode}, {BURST} x {UDP_SIZE}-byte UDP echoes]: {}",
        counters.describe()
    );
    if mode == "poll" && counters.interrupts != 0 {
        return Err(booted.guest.check_failed(format!(
            "mode=poll keeps receive interrupts disarmed, yet `interrupts` grew by {} during a \
             burst of {BURST} UDP echoes (stats before: {:?}; after: {:?})",
            counters.interrupts, counters.before.line, counters.after.line
        )));
    }
    Ok(counters)
}

/// One cell of the matrix: boot, check the option, echo, measure.
fn matrix_cell(option: &str, mode: &str, expect: Option<Expect>) -> Result<(), RunError> {
    let (booted, mut client) = boot_and_echo(option, mode, expect)?;
    burst(&booted, &mut client, option, mode)?;
    Ok(())
}

/// The `event_idx=off` cell, then the default NIC (EVENT_IDX on) in the same mode with the same
/// burst, one QEMU after the other, and a line comparing the two.
fn event_idx_off_compared_with_on(mode: &str) -> Result<(), RunError> {
    let option = "event_idx=off";
    let off = {
        let (booted, mut client) =
            boot_and_echo(option, mode, Some(Expect::NoFeature("EVENT_IDX")))?;
        burst(&booted, &mut client, option, mode)?
        // The first QEMU ends here, before the second one starts.
    };
    let on = {
        let (booted, mut client) = boot_and_echo("", mode, Some(Expect::Feature("EVENT_IDX")))?;
        burst(&booted, &mut client, "default NIC, event_idx=on", mode)?
    };
    println!(
        "EVENT_IDX comparison, mode={mode}, {BURST} x {UDP_SIZE}-byte UDP echoes: \
         on: {:.3} kicks/pkt, {:.3} interrupts/pkt | off: {:.3} kicks/pkt, {:.3} interrupts/pkt",
        on.kicks_per_packet(),
        on.interrupts_per_packet(),
        off.kicks_per_packet(),
        off.interrupts_per_packet()
    );
    Ok(())
}

macro_rules! matrix_tests {
    ($($name:ident: $option:literal, $mode:literal, $expect:expr;)*) => {$(
        #[test]
        fn $name() -> Result<(), RunError> {
            matrix_cell($option, $mode, $expect)
        }
    )*};
}

matrix_tests! {
    matrix_packed_on_irq: "packed=on", "irq", Some(Expect::Feature("RING_PACKED"));
    matrix_packed_on_poll: "packed=on", "poll", Some(Expect::Feature("RING_PACKED"));
    matrix_packed_off_irq: "packed=off", "irq", Some(Expect::NoFeature("RING_PACKED"));
    matrix_packed_off_poll: "packed=off", "poll", Some(Expect::NoFeature("RING_PACKED"));
    matrix_indirect_desc_off_irq: "indirect_desc=off", "irq",
        Some(Expect::NoFeature("INDIRECT_DESC"));
    matrix_indirect_desc_off_poll: "indirect_desc=off", "poll",
        Some(Expect::NoFeature("INDIRECT_DESC"));
    matrix_rx_queue_size_1024_irq: "rx_queue_size=1024", "irq", Some(Expect::RxQueueSize(1024));
    matrix_rx_queue_size_1024_poll: "rx_queue_size=1024", "poll", Some(Expect::RxQueueSize(1024));
}

/// `event_idx=off` in `mode=irq`, compared with EVENT_IDX on in the same mode.
#[test]
fn matrix_event_idx_off_irq() -> Result<(), RunError> {
    event_idx_off_compared_with_on("irq")
}

/// `event_idx=off` in `mode=poll`, compared with EVENT_IDX on in the same mode.
#[test]
fn matrix_event_idx_off_poll() -> Result<(), RunError> {
    event_idx_off_compared_with_on("poll")
}
