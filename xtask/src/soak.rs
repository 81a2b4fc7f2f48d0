//! `cargo xtask soak --minutes N`: a long run of mixed UDP, TCP and ICMP echo at a steady,
//! sustainable rate against the release kernel on a tap in a private namespace (root). Every
//! minute it reports the echoes sent and answered per protocol, the loss, the RTT percentiles,
//! and the guest's `heap_used`/`heap_peak`; at the end, the totals and a verdict. The run is
//! clean when nothing was lost and the heap is flat: `heap_used` back to its level after warm-up
//! once the traffic stops, and that level the lowest sample of every interval.
//!
//! The clients run inside the namespace and talk to the guest at 10.0.2.15 only.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::{
    ClientError, EchoReport, IcmpEchoOptions, RttSummary, Stats, UdpEchoClient, icmp_echo,
    query_stats, tcp_echo,
};
use crate::command::QemuCommand;
use crate::error::Error;
use crate::host::log;
use crate::netns::{NetNs, enter_netns, run_in_netns};
use crate::runner::{Guest, RunOptions};
use crate::usernet::{DEFAULT_NIC, wait_for_ready};

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Length of the run.
    pub duration: Duration,
    /// UDP echoes per second (ping-pong, 64 to 1472 bytes).
    pub udp_rate: u32,
    /// ICMP echoes per second (56 bytes).
    pub icmp_rate: u32,
    /// TCP echo connections per second.
    pub tcp_rate: u32,
    /// Bytes echoed per TCP connection.
    pub tcp_bytes: usize,
    /// The guest's `mode=`.
    pub mode: String,
    /// How often to report (one line per interval).
    pub interval: Duration,
    /// How often to sample the guest's stats.
    pub stats_every: Duration,
    /// A UDP or ICMP echo not back within this is lost.
    pub echo_timeout: Duration,
}

impl Default for SoakOptions {
    fn default() -> SoakOptions {
        SoakOptions {
            duration: Duration::from_secs(600),
            udp_rate: 500,
            icmp_rate: 50,
            tcp_rate: 10,
            tcp_bytes: 16 * 1024,
            mode: "adaptive".to_string(),
            interval: Duration::from_secs(60),
            stats_every: Duration::from_secs(10),
            echo_timeout: Duration::from_millis(500),
        }
    }
}

/// Echoes of one protocol in one interval.
#[derive(Clone, Debug, Default)]
pub struct ProtocolWindow {
    /// Requests sent (UDP datagrams, ICMP requests, TCP connections).
    pub sent: u64,
    /// Exact answers.
    pub answered: u64,
    /// One time per answer: the RTT (UDP, ICMP) or the connect-to-last-byte time (TCP).
    pub times: Vec<Duration>,
    /// The first few failures, for the report.
    pub failures: Vec<String>,
}

impl ProtocolWindow {
    fn record(&mut self, result: Result<Duration, String>) {
        self.sent += 1;
        match result {
            Ok(time) => {
                self.answered += 1;
                self.times.push(time);
            }
            Err(error) => {
                if self.failures.len() < 5 {
                    self.failures.push(error);
                }
            }
        }
    }

    fn merge(&mut self, other: &ProtocolWindow) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.times.extend_from_slice(&other.times);
        for failure in &other.failures {
            if self.failures.len() < 5 {
                self.failures.push(failure.clone());
            }
        }
    }

    /// Requests that got no exact answer.
    pub fn lost(&self) -> u64 {
        self.sent - self.answered
    }

    /// Percentiles of the answer times.
    pub fn summary(&self) -> Option<RttSummary> {
        RttSummary::from_samples(&self.times)
    }

    fn describe(&self, name: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut text = format!(
            "{name} {}/{} lost {} ({:.3}%)",
            self.answered,
            self.sent,
            self.lost(),
            100.0 * self.lost() as f64 / self.sent.max(1) as f64
        );
        if let Some(s) = self.summary() {
            let _ = write!(
                text,
                " p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0} us",
                us(s.p50),
                us(s.p99),
                us(s.p999),
                us(s.max)
            );
        }
        text
    }
}

/// One interval of the run.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// UDP echo.
    pub udp: ProtocolWindow,
    /// ICMP echo.
    pub icmp: ProtocolWindow,
    /// TCP echo connections.
    pub tcp: ProtocolWindow,
    /// The guest's `heap_used` samples in this interval.
    pub heap_used: Vec<u64>,
    /// The guest's `heap_peak` samples in this interval.
    pub heap_peak: Vec<u64>,
}

/// The whole run.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// One entry per interval.
    pub windows: Vec<Window>,
    /// The guest's stats after warm-up.
    pub first_stats: Option<Stats>,
    /// The guest's stats at the end.
    pub last_stats: Option<Stats>,
    /// Wall-clock length of the traffic phase.
    pub elapsed: Duration,
    /// The QEMU command line.
    pub command_line: String,
    /// Lines of the serial log that say something went wrong (`PANIC`, `resetting`, `error`).
    pub alarming_lines: Vec<String>,
    /// Set when QEMU ended before the run did: how.
    pub guest_ended: Option<String>,
}

impl SoakReport {
    /// All intervals together.
    pub fn total(&self) -> Window {
        let mut total = Window::default();
        for window in &self.windows {
            total.udp.merge(&window.udp);
            total.icmp.merge(&window.icmp);
            total.tcp.merge(&window.tcp);
            total.heap_used.extend_from_slice(&window.heap_used);
            total.heap_peak.extend_from_slice(&window.heap_peak);
        }
        total
    }

    /// Whether nothing was lost, the heap was flat and the serial log is quiet.
    pub fn clean(&self) -> bool {
        let total = self.total();
        let lost = total.udp.lost() + total.icmp.lost() + total.tcp.lost();
        lost == 0
            && self.heap_flat()
            && self.alarming_lines.is_empty()
            && self.guest_ended.is_none()
    }

    /// The heap's baseline does not move: with the traffic stopped, `heap_used` is back to its
    /// level after warm-up, and the smallest sample of every interval is that level. (A sample
    /// taken while TCP connections are open is higher by their buffers, and `heap_peak` follows
    /// the most connections open at once; neither is a leak.)
    pub fn heap_flat(&self) -> bool {
        let used = |stats: &Option<Stats>| stats.as_ref().and_then(|s| s.get("heap_used"));
        let (Some(base), Some(end)) = (used(&self.first_stats), used(&self.last_stats)) else {
            return false;
        };
        end == base
            && self.windows.iter().all(|window| {
                window
                    .heap_used
                    .iter()
                    .min()
                    .is_none_or(|&lowest| lowest == base)
            })
    }

    /// The summary as Markdown (also printed at the end of the run).
    pub fn markdown(&self, options: &SoakOptions) -> String {
        let total = self.total();
        let mut text = String::new();
        let _ = writeln!(
            text,
            "Soak: {:.1} min, mode={}, UDP {}/s (64-1472 bytes), ICMP {}/s (56 bytes), TCP {} \
             connections/s of {} bytes; a UDP/ICMP echo not back within {} ms counts as lost.\n",
            self.elapsed.as_secs_f64() / 60.0,
            options.mode,
            options.udp_rate,
            options.icmp_rate,
            options.tcp_rate,
            options.tcp_bytes,
            options.echo_timeout.as_millis()
        );
        let _ = writeln!(
            text,
            "| interval | UDP answered/sent | UDP p50 / p99 / p99.9 / max (us) | ICMP answered/sent | \
             ICMP p50 / p99 (us) | TCP answered/sent | TCP p50 / p99 (ms) | heap_used | heap_peak |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|---|---|---|---|");
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        for (index, window) in self.windows.iter().enumerate() {
            let udp = window.udp.summary();
            let icmp = window.icmp.summary();
            let tcp = window.tcp.summary();
            let _ = writeln!(
                text,
                "| {} | {}/{} | {} | {}/{} | {} | {}/{} | {} | {} | {} |",
                index + 1,
                window.udp.answered,
                window.udp.sent,
                udp.map(|s| format!(
                    "{:.0} / {:.0} / {:.0} / {:.0}",
                    us(s.p50),
                    us(s.p99),
                    us(s.p999),
                    us(s.max)
                ))
                .unwrap_or_default(),
                window.icmp.answered,
                window.icmp.sent,
                icmp.map(|s| format!("{:.0} / {:.0}", us(s.p50), us(s.p99)))
                    .unwrap_or_default(),
                window.tcp.answered,
                window.tcp.sent,
                tcp.map(|s| format!(
                    "{:.2} / {:.2}",
                    s.p50.as_secs_f64() * 1e3,
                    s.p99.as_secs_f64() * 1e3
                ))
                .unwrap_or_default(),
                span(&window.heap_used),
                span(&window.heap_peak),
            );
        }
        let _ = writeln!(text);
        let _ = writeln!(text, "- {}", total.udp.describe("UDP"));
        let _ = writeln!(text, "- {}", total.icmp.describe("ICMP"));
        let _ = writeln!(text, "- {}", total.tcp.describe("TCP"));
        let _ = writeln!(
            text,
            "- heap_used {} over {} samples; heap_peak {}",
            span(&total.heap_used),
            total.heap_used.len(),
            span(&total.heap_peak)
        );
        if let Some(stats) = &self.last_stats {
            let keys = [
                "rx_packets",
                "tx_packets",
                "udp_echoed",
                "tcp_accepted",
                "tcp_connected",
                "rx_dropped",
                "tx_full",
                "device_resets",
                "kicks",
                "interrupts",
            ];
            let fields: Vec<String> = keys
                .iter()
                .filter_map(|key| stats.fields.get(*key).map(|value| format!("{key}={value}")))
                .collect();
            let _ = writeln!(text, "- guest at the end: {}", fields.join(" "));
        }
        if let Some(ended) = &self.guest_ended {
            let _ = writeln!(text, "- {ended}");
        }
        for line in &self.alarming_lines {
            let _ = writeln!(text, "- serial: {line}");
        }
        let _ = writeln!(
            text,
            "- verdict: {}",
            if self.clean() {
                "clean (nothing lost, heap flat)"
            } else {
                "NOT clean"
            }
        );
        text
    }
}

fn span(values: &[u64]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(low), Some(high)) if low == high => format!("{low}"),
        (Some(low), Some(high)) => format!("{low}..{high}"),
        _ => "-".to_string(),
    }
}

/// Runs `send` at `rate` per second until `stop`, on an absolute schedule (a late send does not
/// cause a burst to catch up).
fn paced(rate: u32, stop: &AtomicBool, mut send: impl FnMut()) {
    if rate == 0 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
            continue;
        }
        send();
        next += period;
        if Instant::now() > next + Duration::from_secs(1) {
            next = Instant::now();
        }
    }
}

/// Builds the release kernel, boots it on a tap in a new namespace and runs the soak.
pub fn soak(kernel: &std::path::Path, options: &SoakOptions) -> Result<SoakReport, Error> {
    let netns = NetNs::create("soak")?;
    let command = QemuCommand::for_kernel(kernel)?
        .in_netns(netns.name())
        .netdev(NetNs::tap_netdev("n0", "tap0", None))
        .device(DEFAULT_NIC)
        .append(format!("mode={}", options.mode));
    log(&format!("running: {}", command.command_line()));
    let limit = options.duration + Duration::from_secs(600);
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: limit,
            echo: false,
        },
    )
    .map_err(|failure| Error::Check(failure.to_string()))?;
    let (ready, line) = wait_for_ready(&mut guest, Duration::from_secs(60))
        .map_err(|failure| Error::Check(failure.to_string()))?;
    log(&format!(
        "ready after {:.3} s: {}",
        line.at.as_secs_f64(),
        ready.text
    ));
    let guest_ip = ready.ip;
    let echo = SocketAddr::from((guest_ip, 7));
    let stats_at = SocketAddr::from((guest_ip, 7007));
    let timeout = options.echo_timeout;
    let first_stats = run_in_netns(netns.name(), || -> Result<Stats, ClientError> {
        let mut client = UdpEchoClient::connect(echo, Duration::from_secs(2))?;
        client.warm_up(Duration::from_secs(20), Duration::from_millis(250))?;
        query_stats(stats_at, Duration::from_secs(2), 3)
    })??;
    log(&format!("stats after warm-up: {}", first_stats.line));

    let windows: Mutex<Vec<Window>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let began = Instant::now();
    let interval = options.interval;
    let bucket = |at: Instant| ((at - began).as_secs_f64() / interval.as_secs_f64()) as usize;
    let with_window = |index: usize, update: &mut dyn FnMut(&mut Window)| {
        let mut all = windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while all.len() <= index {
            all.push(Window::default());
        }
        update(&mut all[index]);
    };
    let last_stats = Mutex::new(None);
    let guest_gone = AtomicBool::new(false);
    // The traffic threads enter the namespace; the reporter stays outside it, where
    // `ip netns pids` sees QEMU alone.
    let handle = netns.handle()?;
    let name = netns.name().to_string();
    let enter = || enter_netns(&handle, &name).is_ok();
    {
        thread::scope(|scope| {
            scope.spawn(|| {
                if !enter() {
                    return;
                }
                // One socket per size: an echo that comes back after its timeout then reaches
                // only its own socket, where the next exchange of the same size recognises it
                // as stale (by its sequence number) and skips it.
                let sizes = [64usize, 512, 1400, 1472];
                let Ok(mut clients) = sizes
                    .iter()
                    .map(|_| UdpEchoClient::connect(echo, timeout))
                    .collect::<Result<Vec<_>, _>>()
                else {
                    return;
                };
                let mut index = 0;
                paced(options.udp_rate, &stop, || {
                    let slot = index % sizes.len();
                    index += 1;
                    let at = Instant::now();
                    let mut report = EchoReport::default();
                    let result = clients[slot]
                        .exchange(sizes[slot], 1, &mut report)
                        .map_err(|error| error.to_string());
                    with_window(bucket(at), &mut |window| window.udp.record(result.clone()));
                });
            });
            scope.spawn(|| {
                if !enter() {
                    return;
                }
                paced(options.icmp_rate, &stop, || {
                    let at = Instant::now();
                    let result = icmp_echo(
                        guest_ip,
                        IcmpEchoOptions {
                            count: 1,
                            size: 56,
                            timeout,
                            attempts: 1,
                        },
                    )
                    .map(|report| report.rtts.first().copied().unwrap_or_default())
                    .map_err(|error| error.to_string());
                    with_window(bucket(at), &mut |window| window.icmp.record(result.clone()));
                });
            });
            scope.spawn(|| {
                if !enter() {
                    return;
                }
                paced(options.tcp_rate, &stop, || {
                    let at = Instant::now();
                    let result = tcp_echo(echo, options.tcp_bytes, Duration::from_secs(10))
                        .map(|report| report.connect + report.transfer)
                        .map_err(|error| error.to_string());
                    with_window(bucket(at), &mut |window| window.tcp.record(result.clone()));
                });
            });
            scope.spawn(|| {
                if !enter() {
                    return;
                }
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        let at = Instant::now();
                        if let Ok(stats) = query_stats(stats_at, Duration::from_secs(2), 3) {
                            let used = stats.get("heap_used");
                            let peak = stats.get("heap_peak");
                            with_window(bucket(at), &mut |window| {
                                window.heap_used.extend(used);
                                window.heap_peak.extend(peak);
                            });
                            *last_stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
                        }
                        next += options.stats_every;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            });
            // The reporter: one line per finished interval, then stop at the end.
            let mut reported = 0;
            let mut last_check = Instant::now();
            loop {
                let elapsed = began.elapsed();
                let finished = (elapsed.as_secs_f64() / interval.as_secs_f64()) as usize;
                while reported < finished {
                    let window = windows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(reported)
                        .cloned()
                        .unwrap_or_default();
                    println!(
                        "[soak] interval {:>3}: {}; {}; {}; heap_used {} heap_peak {}",
                        reported + 1,
                        window.udp.describe("UDP"),
                        window.icmp.describe("ICMP"),
                        window.tcp.describe("TCP"),
                        span(&window.heap_used),
                        span(&window.heap_peak)
                    );
                    reported += 1;
                }
                if elapsed >= options.duration {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                // QEMU is the only process in the namespace: when it is gone, stop at once.
                if last_check.elapsed() >= Duration::from_secs(2) {
                    last_check = Instant::now();
                    if netns.pids().is_empty() {
                        println!(
                            "[soak] QEMU is gone after {:.1} min; stopping the traffic",
                            elapsed.as_secs_f64() / 60.0
                        );
                        guest_gone.store(true, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let elapsed = began.elapsed();
    let mut guest_ended = None;
    if guest_gone.load(Ordering::Relaxed) {
        let exit = guest.wait_exit(Duration::from_secs(5));
        let failure = guest.failure(Error::Check(format!(
            "QEMU ended {:.1} min into the soak ({})",
            elapsed.as_secs_f64() / 60.0,
            match &exit {
                Ok(exit) => exit.to_string(),
                Err(error) => error.error.to_string(),
            }
        )));
        // The whole serial log and QEMU's stderr: what the guest said before it went.
        println!("{failure}");
        guest_ended = Some(failure.error.to_string());
    }
    // Final sample, once the traffic has stopped (none when the guest is gone).
    let final_stats = if guest_ended.is_none() {
        run_in_netns(netns.name(), || {
            thread::sleep(Duration::from_millis(500));
            query_stats(stats_at, Duration::from_secs(2), 3).ok()
        })?
    } else {
        None
    };
    let mut all = windows.into_inner().unwrap_or_else(|p| p.into_inner());
    let keep = ((options.duration.as_secs_f64() / interval.as_secs_f64()).ceil() as usize).max(1);
    all.truncate(keep);
    if let (Some(last), Some(stats)) = (all.last_mut(), &final_stats) {
        last.heap_used.extend(stats.get("heap_used"));
        last.heap_peak.extend(stats.get("heap_peak"));
    }
    let alarming_lines = guest
        .lines()
        .into_iter()
        .map(|line| line.text)
        .filter(|text| {
            text.contains("PANIC") || text.contains("resetting") || text.contains("ERROR")
        })
        .collect();
    let report = SoakReport {
        windows: all,
        first_stats: Some(first_stats),
        last_stats: final_stats.or(last_stats.into_inner().unwrap_or_default()),
        elapsed,
        command_line: guest.command_line().to_string(),
        alarming_lines,
        guest_ended,
    };
    guest.kill();
    drop(netns);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_flatness_and_cleanliness() {
        let window = |used: &[u64], peak: &[u64], lost: bool| {
            let mut w = Window::default();
            w.udp.record(Ok(Duration::from_micros(100)));
            if lost {
                w.udp.record(Err("timeout".to_string()));
            }
            w.heap_used = used.to_vec();
            w.heap_peak = peak.to_vec();
            w
        };
        let stats = |used: u64| Stats::parse(&format!("heap_used={used}")).ok();
        let mut report = SoakReport {
            windows: vec![
                window(&[10, 10], &[20, 20], false),
                window(&[10, 42], &[52], false),
            ],
            first_stats: stats(10),
            last_stats: stats(10),
            ..SoakReport::default()
        };
        assert!(report.heap_flat());
        assert!(report.clean());
        report.windows.push(window(&[11, 12], &[52], false));
        assert!(!report.heap_flat());
        report.windows.pop();
        report.last_stats = stats(11);
        assert!(!report.heap_flat());
        report.last_stats = stats(10);
        report.windows.push(window(&[10], &[20], true));
        assert!(report.heap_flat());
        assert!(!report.clean());
        assert_eq!(report.total().udp.lost(), 1);
        let text = report.markdown(&SoakOptions::default());
        assert!(text.contains("| 3 | 1/2 |"), "{text}");
        assert!(text.contains("NOT clean"));
    }

    #[test]
    fn spans() {
        assert_eq!(span(&[]), "-");
        assert_eq!(span(&[5, 5]), "5");
        assert_eq!(span(&[7, 5, 6]), "5..7");
    }
}
