//! Measuring each system of the benchmark: a guest (Vireo in one mode, or the Linux peer) booted
//! for boot-to-first-echo and measured with every client of the sections asked for (latency:
//! UDP/ICMP/echo rate; tcp: TCP echo throughput), and the floors with no VM (loopback UDP and
//! TCP, the tap reflector on the same or the other CPU). Each returns a [`SystemResult`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::machine::thread_schedstats;
use super::options::{BenchOptions, Section};
use super::report::{
    BootResult, Counters, LINUX, LOOPBACK_FLOOR, LOOPBACK_TCP_FLOOR, RttRun, SystemKind,
    SystemResult, TAP_FLOOR, TAP_FLOOR_CROSS_CPU, TcpRun, ThreadShare, ThroughputRun,
};
use super::{
    BenchError, ECHO_PORT, GUEST_MAC_BYTES, STATS_PORT, check_cancelled, linux, measure,
    note_contention,
};
use crate::log;
use crate::progress::Progress;
use crate::{
    DEFAULT_GUEST_IP, Guest, NetNs, QemuCommand, RunOptions, TapDevice, TapReflector, query_stats,
};

/// How often boot probes are sent.
pub(super) const BOOT_PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// One guest configuration to measure.
pub(super) struct GuestSpec {
    id: String,
    pub(super) label: String,
    kind: SystemKind,
    command: QemuCommand,
    /// A serial line that says the guest serves (checked after the first echo).
    ready_marker: &'static str,
    /// The serial line that carries the negotiated features.
    features_marker: &'static str,
    /// How long the first echo may take.
    boot_limit: Duration,
}

impl GuestSpec {
    /// Vireo in `mode`; `baseline` marks the `--baseline-kernel` build (its id and label get
    /// a `baseline` suffix, for the before/after table).
    pub(super) fn vireo(base: &QemuCommand, mode: &str, baseline: bool) -> GuestSpec {
        GuestSpec {
            id: if baseline {
                format!("vireo-{mode}-baseline")
            } else {
                format!("vireo-{mode}")
            },
            label: if baseline {
                format!("Vireo ({mode}, baseline)")
            } else {
                format!("Vireo ({mode})")
            },
            kind: SystemKind::Vireo,
            command: base
                .clone()
                .append(format!("ip={DEFAULT_GUEST_IP}/24 mode={mode}")),
            ready_marker: "vireo: ready",
            features_marker: "negotiated features",
            boot_limit: Duration::from_secs(30),
        }
    }

    pub(super) fn linux(base: QemuCommand, image: &linux::LinuxImage) -> GuestSpec {
        GuestSpec {
            id: LINUX.to_string(),
            label: format!("Linux {} guest", image.version),
            kind: SystemKind::Linux,
            command: image.command(base),
            ready_marker: linux::READY_MARKER,
            features_marker: linux::FEATURES_MARKER,
            boot_limit: Duration::from_secs(180),
        }
    }
}

fn guest_address(port: u16) -> SocketAddr {
    SocketAddr::from((DEFAULT_GUEST_IP, port))
}

/// Boots `spec` once and returns the time from spawn to the first echo, with the guest still
/// running.
fn boot_and_probe(
    netns: &NetNs,
    spec: &GuestSpec,
) -> Result<(Guest, Duration, Option<Duration>), BenchError> {
    check_cancelled()?;
    let started = Instant::now();
    let mut guest = Guest::spawn(
        &spec.command,
        RunOptions {
            timeout: Duration::from_secs(7 * 24 * 3600),
            echo: false,
        },
    )?;
    let probe = netns.run(|| {
        measure::first_echo(
            guest_address(ECHO_PORT),
            started,
            BOOT_PROBE_INTERVAL,
            spec.boot_limit,
        )
    })?;
    let (first_echo, _) = match probe {
        Ok(found) => found,
        Err(error) => {
            guest.kill();
            return Err(BenchError::Failed(format!(
                "{error}\n{}",
                guest.failure(crate::Error::Check("no first echo".to_string()))
            )));
        }
    };
    let ready = guest
        .wait_for_line(spec.ready_marker, Duration::from_secs(10))
        .ok()
        .map(|line| line.at);
    Ok((guest, first_echo, ready))
}

pub(super) fn stats(netns: &NetNs) -> Result<crate::client::Stats, BenchError> {
    Ok(netns.run(|| query_stats(guest_address(STATS_PORT), Duration::from_millis(500), 5))??)
}

/// Boots a guest, measures it fully, then boots it again `boots - 1` times for the boot time
/// and the throughput (the table gives the median pps over all boots).
pub(super) fn measure_guest(
    netns: &NetNs,
    spec: &GuestSpec,
    options: &BenchOptions,
) -> Result<SystemResult, BenchError> {
    log(&format!(
        "bench: {}: {}",
        spec.label,
        spec.command.command_line()
    ));
    let mut result = SystemResult::new(&spec.id, &spec.label, spec.kind);
    result.qemu_command_lines.push(spec.command.command_line());
    let mut boot = BootResult::default();
    let mut bar = Progress::new(
        "[bench]",
        format!("{}: boot to first echo", spec.label),
        1,
        "boots",
    );
    let (mut guest, first_echo, ready) = boot_and_probe(netns, spec)?;
    boot.first_echo_ms.push(first_echo.as_secs_f64() * 1e3);
    boot.ready_line_ms
        .extend(ready.map(|at| at.as_secs_f64() * 1e3));
    bar.finish(&format!("{:.1} ms", first_echo.as_secs_f64() * 1e3));
    let lines = guest.lines();
    result.ready_line = lines
        .iter()
        .find(|l| l.text.contains(spec.ready_marker))
        .map(|l| l.text.trim().to_string());
    result.negotiated_features = lines
        .iter()
        .find(|l| l.text.contains(spec.features_marker))
        .map(|l| {
            let text = l.text.trim().to_string();
            // The Linux guest prints the sysfs bit string; add the word in hex.
            match text
                .strip_prefix(linux::FEATURES_MARKER)
                .and_then(|rest| linux::features_hex(rest.split_whitespace().next()?))
            {
                Some(hex) => format!("{text} (features word {hex})"),
                None => text,
            }
        });
    note_contention();

    let latency = options.sections.contains(&Section::Echo);
    let measured = (|| -> Result<(Measured, Vec<TcpRun>), BenchError> {
        let services = if latency {
            measure_services(netns, &spec.label, options, Some(guest.pid()), None)?
        } else {
            (Vec::new(), None, None)
        };
        let tcp = if options.sections.contains(&Section::Tcp) {
            measure_tcp_at(netns, &spec.label, guest_address(ECHO_PORT), true, options)?
        } else {
            Vec::new()
        };
        Ok((services, tcp))
    })();
    let log_path = options.out_dir.join(format!("serial-{}.log", spec.id));
    guest.kill();
    let _ = std::fs::write(&log_path, guest.serial_log());
    let ((udp, icmp, throughput), tcp) = measured.map_err(|error| {
        BenchError::Failed(format!(
            "{error}\n{}",
            guest.failure(crate::Error::Check("measurement failed".to_string()))
        ))
    })?;
    result.udp = udp;
    result.icmp = icmp;
    result.throughput = throughput;
    result.tcp = tcp;
    drop(guest);

    // The further boots are the latency section's (boot time, echo rate per boot).
    let boots = if latency { options.boots } else { 1 };
    for index in 1..boots {
        let mut bar = Progress::new(
            "[bench]",
            format!("{}: boot {}/{}", spec.label, index + 1, options.boots),
            1,
            "boots",
        );
        let (mut guest, first_echo, ready) = boot_and_probe(netns, spec)?;
        bar.finish(&format!("{:.1} ms", first_echo.as_secs_f64() * 1e3));
        if let Some(throughput) = result.throughput.as_mut() {
            check_cancelled()?;
            let label = format!("{}: boot {}/{}", spec.label, index + 1, options.boots);
            let run = throughput_run(netns, &label, guest_address(ECHO_PORT), options, || {})?;
            throughput.pps_per_boot.push(run.pps);
        }
        guest.kill();
        boot.first_echo_ms.push(first_echo.as_secs_f64() * 1e3);
        boot.ready_line_ms
            .extend(ready.map(|at| at.as_secs_f64() * 1e3));
    }
    boot.finish();
    result.boot = Some(boot);
    Ok(result)
}

type Measured = (Vec<RttRun>, Option<RttRun>, Option<ThroughputRun>);

/// One windowed throughput run (64-byte datagrams, `options.window` in flight for
/// `options.throughput`) against `target` from inside the namespace, with its progress bar;
/// `pin` runs first on the client's thread.
fn throughput_run(
    netns: &NetNs,
    label: &str,
    target: SocketAddr,
    options: &BenchOptions,
    pin: impl FnOnce() + Send,
) -> Result<measure::Throughput, BenchError> {
    let mut bar = Progress::new(
        "[bench]",
        format!("{label}: throughput, {} in flight", options.window),
        options.throughput.as_millis() as u64,
        "ms",
    );
    let result = netns.run(|| {
        pin();
        measure::udp_throughput(target, 64, options.window, options.throughput, &mut bar)
    })??;
    bar.finish(&format!(
        "{:.0} pps, loss {:.2}%",
        result.pps,
        result.loss_rate * 100.0
    ));
    Ok(result)
}

/// One UDP ping-pong measurement of `size` bytes in client form `form` against `target`, run
/// inside the namespace on the thread `pin` places, with a progress bar (returned unfinished,
/// for the caller's closing figure).
fn ping_pong_run(
    netns: &NetNs,
    label: &str,
    target: SocketAddr,
    size: usize,
    form: measure::ClientForm,
    options: &BenchOptions,
    pin: impl Fn() + Send + Sync,
) -> Result<(RttRun, measure::PingPong, Progress), BenchError> {
    let mut bar = Progress::new(
        "[bench]",
        format!("{label}: UDP {size} B {}", form.as_str()),
        options.warmup + options.samples,
        "round trips",
    );
    let raw = netns.run(|| {
        pin();
        measure::udp_ping_pong(
            target,
            size,
            options.warmup,
            options.samples,
            form,
            &mut bar,
        )
    })??;
    let run = RttRun::from_ping_pong("udp", size, Some(form), &raw)
        .ok_or_else(|| BenchError::Failed(format!("{label}: no UDP samples")))?;
    Ok((run, raw, bar))
}

/// UDP ping-pong per size and form, ICMP and throughput against the echo service at the guest
/// address; with a guest (`qemu_pid`), the stats service and QEMU's thread scheduling are read
/// before and after each UDP and throughput measurement.
fn measure_services(
    netns: &NetNs,
    label: &str,
    options: &BenchOptions,
    qemu_pid: Option<u32>,
    client_cpu: Option<usize>,
) -> Result<Measured, BenchError> {
    let counters = qemu_pid.is_some();
    let sched = || qemu_pid.map(thread_schedstats);
    let shares = |before: Option<_>, packets: u64| match (before, sched()) {
        (Some(before), Some(after)) => ThreadShare::between(&before, &after, packets),
        _ => Vec::new(),
    };
    let pin = move || {
        if let Some(cpu) = client_cpu {
            measure::pin_current_thread(cpu);
        }
    };
    let target = guest_address(ECHO_PORT);
    let mut udp = Vec::new();
    for &size in &options.sizes {
        for &form in &options.forms {
            check_cancelled()?;
            let before = if counters { Some(stats(netns)?) } else { None };
            let sched_before = sched();
            let (mut run, raw, mut bar) =
                ping_pong_run(netns, label, target, size, form, options, pin)?;
            run.threads = shares(sched_before, options.warmup + options.samples);
            if let Some(before) = before {
                let after = stats(netns)?;
                run.counters = Some(Counters::between(
                    &before,
                    &after,
                    options.warmup + options.samples,
                ));
            }
            bar.finish(&format!(
                "p50 {:.1} us, p99 {:.1} us{}",
                run.stats.p50_us,
                run.stats.p99_us,
                if raw.timeouts > 0 {
                    format!(", {} timeouts", raw.timeouts)
                } else {
                    String::new()
                }
            ));
            udp.push(run);
        }
    }
    check_cancelled()?;
    let icmp = if options.icmp_samples > 0 {
        let warmup = (options.warmup / 10).max(10);
        let mut bar = Progress::new(
            "[bench]",
            format!("{label}: ICMP 56 B"),
            warmup + options.icmp_samples,
            "round trips",
        );
        let address = match target.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
        };
        let raw = netns.run(|| {
            pin();
            measure::icmp_ping_pong(address, 56, warmup, options.icmp_samples, &mut bar)
        })??;
        let run = RttRun::from_ping_pong("icmp", 56, None, &raw);
        bar.finish(
            &run.as_ref()
                .map(|r| format!("p50 {:.1} us", r.stats.p50_us))
                .unwrap_or_default(),
        );
        run
    } else {
        None
    };
    check_cancelled()?;
    let before = if counters { Some(stats(netns)?) } else { None };
    let sched_before = sched();
    let result = throughput_run(netns, label, target, options, pin)?;
    let threads = shares(sched_before, result.received);
    let counters = match before {
        Some(before) => Some(Counters::between(&before, &stats(netns)?, result.received)),
        None => None,
    };
    let throughput = Some(ThroughputRun {
        pps_per_boot: vec![result.pps],
        result,
        counters,
        vs_linux: None,
        threads,
    });
    Ok((udp, icmp, throughput))
}

/// TCP echo throughput against the echo service at `target` (a guest's port 7, or the
/// loopback floor's server): one run per connection count, each connection streaming
/// `options.tcp_bytes` each way; with `guest_counters`, the guest's stats service is read
/// before and after each run (counters per received frame).
fn measure_tcp_at(
    netns: &NetNs,
    label: &str,
    target: SocketAddr,
    guest_counters: bool,
    options: &BenchOptions,
) -> Result<Vec<TcpRun>, BenchError> {
    let mut runs = Vec::new();
    let read_stats = || -> Result<Option<crate::client::Stats>, BenchError> {
        guest_counters.then(|| stats(netns)).transpose()
    };
    for &connections in &options.tcp_connections {
        let total = connections * options.tcp_bytes;
        let mut measured = Vec::with_capacity(options.tcp_repeats);
        for repeat in 1..=options.tcp_repeats {
            check_cancelled()?;
            let mut bar = Progress::new(
                "[bench]",
                format!(
                    "{label}: TCP echo, {connections} connection(s) x {} MiB each way, run \
                     {repeat}/{}",
                    options.tcp_bytes >> 20,
                    options.tcp_repeats
                ),
                1,
                "runs",
            );
            let before = read_stats()?;
            // Generous: 1 MB/s would still finish; a stalled connection fails the run.
            let timeout = Duration::from_secs(60 + (total as u64 * 2) / 1_000_000);
            let result = netns.run(|| {
                measure::tcp_throughput(target, connections, options.tcp_bytes, timeout)
            })??;
            let counters = match (before, read_stats()?) {
                (Some(before), Some(after)) => Some(Counters::per_received_frame(&before, &after)),
                _ => None,
            };
            bar.finish(&format!(
                "{:.1} MB/s ({:.2} s, {} bytes checked)",
                result.mb_per_s, result.seconds, result.checked_bytes
            ));
            note_contention();
            measured.push((result, counters));
        }
        let repeats_mb_per_s: Vec<f64> = measured.iter().map(|(r, _)| r.mb_per_s).collect();
        // The median run (the lower middle one for an even count): a single run of a second
        // or less swings with the host's scheduling.
        measured.sort_by(|a, b| a.0.mb_per_s.total_cmp(&b.0.mb_per_s));
        let (result, counters) = measured.swap_remove((measured.len() - 1) / 2);
        runs.push(TcpRun {
            result,
            repeats_mb_per_s,
            counters,
            vs_linux: None,
        });
    }
    Ok(runs)
}

/// The loopback TCP floor: the same TCP client against a thread-per-connection echo server on
/// 127.0.0.1 inside the namespace (no tap, no VM): what the host's stack and the client alone
/// can move, so a guest's figure is read against it.
pub(super) fn measure_loopback_tcp_floor(
    netns: &NetNs,
    options: &BenchOptions,
) -> Result<SystemResult, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = Arc::clone(&stop);
    let (address, server) = netns.run(move || {
        measure::loopback_tcp_echo_server(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), server_stop)
    })??;
    let label = "Floor: host loopback TCP";
    let mut result = SystemResult::new(LOOPBACK_TCP_FLOOR, label, SystemKind::Floor);
    result.notes.push(format!(
        "a host TCP echo server at {address} inside the namespace (a thread per connection), \
         same client: the host's stack and the client alone, no tap, no VM"
    ));
    let measured = measure_tcp_at(netns, label, address, false, options);
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    result.tcp = measured?;
    Ok(result)
}

/// The loopback floor: the same clients against a UDP echo server on 127.0.0.1 inside the
/// namespace (no tap, no VM). Client and server are pinned to CPU 0: on these virtual machines
/// a wake-up across CPUs costs tens of microseconds, and unpinned runs flip between the two
/// placements, so the floor is measured where it is lowest.
pub(super) fn measure_loopback_floor(
    netns: &NetNs,
    options: &BenchOptions,
) -> Result<SystemResult, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = Arc::clone(&stop);
    let (address, server) = netns.run(move || {
        measure::pin_current_thread(0);
        measure::loopback_echo_server(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), server_stop)
    })??;
    let label = "Floor: host loopback UDP";
    let mut result = SystemResult::new(LOOPBACK_FLOOR, label, SystemKind::Floor);
    result.notes.push(format!(
        "a host UDP echo thread at {address} inside the namespace, client and server pinned to \
         CPU 0: the host's socket path alone"
    ));
    let target = address;
    let measured = (|| -> Result<(Vec<RttRun>, Option<ThroughputRun>), BenchError> {
        let mut udp = Vec::new();
        for &size in &options.sizes {
            for &form in &options.forms {
                check_cancelled()?;
                let (run, _, mut bar) =
                    ping_pong_run(netns, label, target, size, form, options, || {
                        measure::pin_current_thread(0);
                    })?;
                bar.finish(&format!("p50 {:.1} us", run.stats.p50_us));
                udp.push(run);
            }
        }
        let result = throughput_run(netns, label, target, options, || {
            measure::pin_current_thread(0);
        })?;
        Ok((
            udp,
            Some(ThroughputRun {
                pps_per_boot: vec![result.pps],
                result,
                counters: None,
                vs_linux: None,
                threads: Vec::new(),
            }),
        ))
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    let (udp, throughput) = measured?;
    result.udp = udp;
    result.throughput = throughput;
    Ok(result)
}

/// The tap floor: a userspace reflector on the tap answers as the guest (ARP, ICMP, UDP echo),
/// so a round trip crosses the host's stack and the tap twice with no VM. The client runs on
/// CPU 0 and the reflector on `reflector_cpu`: on the same CPU this is the lowest the host side
/// can go (the floor the guest overhead is computed against); on the other CPU it adds the two
/// cross-CPU wake-ups that a QEMU I/O thread on the other core pays.
pub(super) fn measure_tap_floor(
    netns: &NetNs,
    options: &BenchOptions,
    reflector_cpu: usize,
) -> Result<SystemResult, BenchError> {
    let reflector = netns
        .run(|| {
            measure::pin_current_thread(reflector_cpu);
            TapDevice::attach("tap0", false)
                .map(|tap| TapReflector::start(tap, DEFAULT_GUEST_IP, GUEST_MAC_BYTES))
        })?
        .map_err(|e| BenchError::Failed(format!("attaching to tap0 for the reflector: {e}")))?;
    let same = reflector_cpu == 0;
    let (id, label) = if same {
        (TAP_FLOOR, "Floor: tap reflector (no VM)")
    } else {
        (TAP_FLOOR_CROSS_CPU, "Floor: tap reflector, other CPU")
    };
    let mut result = SystemResult::new(id, label, SystemKind::Floor);
    result.notes.push(format!(
        "a userspace thread on tap0 answering as the guest (same IP and MAC), pinned to CPU \
         {reflector_cpu} with the client on CPU 0: the host side's cost alone (socket, routing, \
         tap, {})",
        if same {
            "a same-CPU wake-up each way"
        } else {
            "a cross-CPU wake-up each way"
        }
    ));
    let measured = measure_services(netns, label, options, None, Some(0));
    let counters = Arc::clone(&reflector.counters);
    let _ = reflector.stop();
    let (udp, icmp, throughput) = measured?;
    result.notes.push(format!(
        "the reflector answered {} UDP and {} ICMP",
        counters.udp_echoes.load(Ordering::Relaxed),
        counters.icmp_replies.load(Ordering::Relaxed)
    ));
    result.udp = udp;
    result.icmp = icmp;
    result.throughput = throughput;
    Ok(result)
}
