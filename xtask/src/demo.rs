//! `cargo xtask demo`'s exchanges with a guest that serves echo: library code, so that the test
//! suite runs the same steps against the debug kernel.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::client::{ClientError, EchoReport, Stats, UdpEchoClient, query_stats, tcp_echo};
use crate::usernet::UserNet;

/// What the demo does after the guest is ready.
#[derive(Clone, Copy, Debug)]
pub struct DemoOptions {
    /// UDP round trips to measure (64 bytes, one in flight).
    pub round_trips: u64,
    /// Bytes for the TCP echo.
    pub tcp_bytes: usize,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            round_trips: 2000,
            tcp_bytes: 1 << 20,
        }
    }
}

/// The demo's exchanges with a ready guest on user networking, printed step by step on stdout:
/// the stats line, UDP echo of 1, 64, 1400 and 1472 bytes with RTTs, a TCP echo, many UDP round
/// trips with a progress bar and RTT percentiles, and the stats line again with the counter
/// deltas. Any echo that is not exact (or missing) is an error.
pub fn demo_exchanges(net: &UserNet, options: DemoOptions) -> Result<(), ClientError> {
    let DemoOptions {
        round_trips: rtts,
        tcp_bytes,
    } = options;
    let step = |text: String| println!("\n==> {text}");
    step(format!(
        "stats: one datagram to {} (guest UDP 7007)",
        net.stats()
    ));
    let before = query_stats(net.stats(), Duration::from_secs(2), 5)?;
    println!("    {}", before.line);

    step(format!(
        "UDP echo: waiting for the first echo from {} (guest UDP 7), then 8 datagrams of \
         1, 64, 1400 and 1472 bytes, each checked byte for byte",
        net.udp_echo()
    ));
    let mut client = UdpEchoClient::connect(net.udp_echo(), Duration::from_secs(2))?;
    let probes = client.warm_up(Duration::from_secs(15), Duration::from_millis(250))?;
    println!("    first echo after {probes} probe(s)");
    let mut report = EchoReport::default();
    for size in [1, 64, 1400, 1472, 1, 64, 1400, 1472] {
        let rtt = client.exchange(size, 3, &mut report)?;
        println!(
            "    {size:>5} bytes: exact echo, RTT {:>9.1} us",
            rtt.as_secs_f64() * 1e6
        );
    }

    step(format!(
        "TCP echo: {tcp_bytes} bytes over one connection to {} (guest TCP 7), read back and \
         checked byte for byte",
        net.tcp_echo()
    ));
    let tcp = tcp_echo(net.tcp_echo(), tcp_bytes, Duration::from_secs(60))?;
    println!(
        "    exact; connect {:.1} ms, transfer {:.1} ms, {:.2} MB/s",
        tcp.connect.as_secs_f64() * 1e3,
        tcp.transfer.as_secs_f64() * 1e3,
        tcp.throughput() / 1e6
    );

    step(format!(
        "UDP round trips: {rtts} ping-pongs of 64 bytes to {}, one in flight",
        net.udp_echo()
    ));
    let mut many = EchoReport::default();
    let began = Instant::now();
    for done in 1..=rtts {
        client.exchange(64, 3, &mut many)?;
        if done % 50 == 0 || done == rtts {
            let width = 40;
            let filled = (done * width / rtts.max(1)) as usize;
            print!(
                "\r    [{}{}] {done}/{rtts}",
                "#".repeat(filled),
                "-".repeat(width as usize - filled)
            );
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    if let Some(summary) = many.summary() {
        println!(
            "    {summary}\n    {:.0} round trips/s; {} retransmitted, {} stale",
            many.received as f64 / began.elapsed().as_secs_f64(),
            many.retransmits,
            many.stale
        );
    }

    step(format!("stats again: {}", net.stats()));
    let after = query_stats(net.stats(), Duration::from_secs(2), 5)?;
    println!("    {}", after.line);
    print_counter_deltas(&before, &after, report.sent + many.sent + probes);
    Ok(())
}

/// Prints how the counters moved between two stats lines.
pub fn print_counter_deltas(before: &Stats, after: &Stats, udp_sent: u64) {
    let echoed = after
        .get("udp_echoed")
        .zip(before.get("udp_echoed"))
        .map(|(a, b)| a.saturating_sub(b));
    if let Some(echoed) = echoed {
        println!("    udp_echoed grew by {echoed} (this demo sent {udp_sent} UDP echo requests)");
    }
    let per_packet = |key: &str| {
        let delta = after.get(key)?.checked_sub(before.get(key)?)?;
        let packets = echoed.filter(|&e| e > 0)?;
        Some(delta as f64 / packets as f64)
    };
    for key in ["kicks", "interrupts"] {
        if let Some(ratio) = per_packet(key) {
            println!("    {key} per UDP echo: {ratio:.2}");
        }
    }
}
