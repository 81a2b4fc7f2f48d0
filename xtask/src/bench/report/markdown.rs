//! The Markdown report (`bench.md`): the summary table, the RTT detail table, the TCP throughput
//! table, the targets and what was not measured.

use std::fmt::Write as _;

use super::{Report, fmt_opt};
use crate::bench::measure::ClientForm;
use crate::bench::options::Section;

fn fmt_ratio(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.2}×"),
        _ => "–".to_string(),
    }
}

/// The Markdown report: the summary table, the RTT detail table, the targets and what was not
/// measured.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let env = &report.environment;
    let _ = writeln!(
        out,
        "Measured {} on {} ({} cores), {} {}, QEMU {}, accelerator {}; host kernel {}.",
        report.started_utc,
        env.cpu_model,
        env.cpus,
        env.os,
        if report.quick {
            "(quick smoke run)"
        } else {
            ""
        },
        env.qemu_version
            .strip_prefix("QEMU emulator version ")
            .unwrap_or(&env.qemu_version),
        env.accelerator,
        env.kernel_release,
    );
    let _ = writeln!(
        out,
        "Other QEMU processes on the machine: {} at the start, at most {} during the run; load \
         average {} at the start, {} at the end. Commit {}.",
        env.other_qemu_processes_at_start,
        env.other_qemu_processes_max_during_run,
        env.load_average_at_start,
        env.load_average_at_end,
        env.git_commit
    );
    let _ = writeln!(
        out,
        "Host idle: {}; {}.",
        if env.host_idle.is_empty() {
            "not recorded"
        } else {
            env.host_idle.as_str()
        },
        if report.settings.host_idle_poll {
            "`/dev/cpu_dma_latency` held at 0 by the benchmark (`--host-idle-poll`: idle CPUs \
             poll, so a wake-up across CPUs costs no halt exit)"
        } else {
            "left as it is (idle CPUs halt; `--host-idle-poll` makes them poll)"
        }
    );
    let s = &report.settings;
    let _ = writeln!(
        out,
        "\nEvery guest: `-M {} -m {}M -smp {}`, `-netdev {}`, `-device {}`; guest {}. \
         {} UDP round trips per row after {} discarded; ICMP {} round trips; throughput {} \
         datagrams of {} B in flight for {} s; {} boot(s) per guest. Wall time {:.0} s.\n",
        s.machine,
        s.memory_mib,
        s.smp,
        s.netdev,
        s.nic,
        s.addressing,
        s.udp_samples,
        s.warmup,
        s.icmp_samples,
        s.throughput_window,
        s.throughput_size,
        s.throughput_seconds,
        s.boots,
        report.wall_time_s
    );
    if report.systems.iter().any(|system| !system.udp.is_empty()) {
        echo_tables(report, &mut out);
    }
    if report.settings.sections.contains(&Section::Tcp) {
        tcp_table(report, &mut out);
    }
    if let Some(nbd) = &report.nbd {
        out.push_str(&nbd.markdown());
    }
    targets_and_gaps(report, &mut out);
    out
}

/// The echo section's tables: the summary per system and the RTT detail.
fn echo_tables(report: &Report, out: &mut String) {
    let s = &report.settings;
    let size = s.sizes.first().copied().unwrap_or(64);
    let _ = writeln!(
        *out,
        "| System | UDP {size} B p50 / p99 (blocking), us | p50 / p99 (spin), us | ICMP p50, us | \
         echo pps (loss) | boot to first echo (to `ready`), ms | kicks/pkt | irqs/pkt | RX desc/pkt | mode \
         switches/pkt | guest work/pkt, us | p50 vs Linux | pps vs Linux | boot vs Linux |"
    );
    let _ = writeln!(
        *out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for system in &report.systems {
        let pair = |form| {
            system
                .udp_run(size, form)
                .map(|r| format!("{:.1} / {:.1}", r.stats.p50_us, r.stats.p99_us))
                .unwrap_or_else(|| "–".to_string())
        };
        let counters = system
            .udp_run(size, ClientForm::Blocking)
            .and_then(|r| r.counters.as_ref());
        let per = |key: &str| fmt_opt(counters.and_then(|c| c.per(key)), 3);
        let throughput = system
            .throughput
            .as_ref()
            .map(|t| {
                let boots = if t.pps_per_boot.len() > 1 {
                    format!(", median of {}", t.pps_per_boot.len())
                } else {
                    String::new()
                };
                format!("{:.0} ({:.2}%{boots})", t.pps(), t.result.loss_rate * 100.0)
            })
            .unwrap_or_else(|| "–".to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system.label,
            pair(ClientForm::Blocking),
            pair(ClientForm::Spin),
            fmt_opt(system.icmp.as_ref().map(|r| r.stats.p50_us), 1),
            throughput,
            system.boot.as_ref().map_or_else(
                || "–".to_string(),
                |boot| {
                    if boot.ready_median_ms > 0.0 {
                        format!("{:.1} (ready {:.1})", boot.median_ms, boot.ready_median_ms)
                    } else {
                        format!("{:.1}", boot.median_ms)
                    }
                }
            ),
            per("kicks"),
            per("interrupts"),
            per("rx_descriptors"),
            per("mode_switches"),
            fmt_opt(
                counters
                    .and_then(|c| c.per("stack_busy_ns"))
                    .map(|ns| ns / 1000.0),
                1
            ),
            fmt_ratio(
                system
                    .udp_run(size, ClientForm::Blocking)
                    .and_then(|r| r.speedup_vs_linux_p50)
            ),
            fmt_ratio(system.throughput.as_ref().and_then(|t| t.vs_linux)),
            fmt_ratio(system.boot.as_ref().and_then(|b| b.speedup_vs_linux)),
        );
    }
    let _ = writeln!(
        *out,
        "\nRatios are *times better than the Linux guest* (Linux's RTT or boot time over this \
         one's; this pps over Linux's). Counters are per echoed packet over the {size} B \
         blocking ping-pong run, from the guest's stats service before and after. *Guest \
         work* is the time Vireo's loop spent running the stack and flushing the rings on passes \
         that moved packets (its `stack_busy_ns`, by the guest's TSC), the rest of the round \
         trip is waiting: QEMU and the host.\n"
    );
    let _ = writeln!(
        *out,
        "| System | size | client | min | p50 | p90 | p99 | p99.9 | max | mean | overhead p50 / p99 | \
         overhead vs Linux p50 / p99 |"
    );
    let _ = writeln!(
        *out,
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for system in &report.systems {
        for run in system.udp.iter().chain(system.icmp.iter()) {
            let st = &run.stats;
            let _ = writeln!(
                *out,
                "| {} | {} B | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} / {} | {} / {} |",
                system.label,
                run.size,
                match run.form {
                    Some(form) => form.as_str().to_string(),
                    None => format!("{} (blocking)", run.protocol.to_uppercase()),
                },
                st.min_us,
                st.p50_us,
                st.p90_us,
                st.p99_us,
                st.p999_us,
                st.max_us,
                st.mean_us,
                fmt_opt(run.overhead_p50_us, 1),
                fmt_opt(run.overhead_p99_us, 1),
                fmt_ratio(run.overhead_ratio_vs_linux_p50),
                fmt_ratio(run.overhead_ratio_vs_linux_p99),
            );
        }
    }
    let _ = writeln!(
        *out,
        "\nAll times in microseconds. *Overhead* is the RTT minus the tap-reflector floor's at \
         the same percentile, size and client form; *overhead vs Linux* is this overhead over \
         the Linux guest's (the poll-mode target is ≤ 0.33×).\n"
    );
}

/// The TCP section's table: one row per system and connection count.
fn tcp_table(report: &Report, out: &mut String) {
    let s = &report.settings;
    let _ = writeln!(
        out,
        "TCP echo throughput: each connection streams {} MiB each way (the client writes and \
         reads concurrently and checks every echoed byte against its seeded pattern); MB/s is \
         10^6 bytes echoed per second, from the first byte sent to the last byte of the slowest \
         connection checked; the median of {} run(s) per row, every run's figure in brackets.\n",
        s.tcp_bytes_each >> 20,
        s.tcp_repeats
    );
    let _ = writeln!(
        out,
        "| System | connections | MiB each way | time, s | MB/s | vs Linux | frames in / out | \
         kicks/frame in | irqs/frame in | guest work/frame in, us |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"
    );
    for system in &report.systems {
        for run in &system.tcp {
            let r = &run.result;
            let counters = run.counters.as_ref();
            let delta = |key: &str| counters.and_then(|c| c.deltas.get(key).copied());
            let frames = match (delta("rx_packets"), delta("tx_packets")) {
                (Some(rx), Some(tx)) => format!("{rx} / {tx}"),
                _ => "–".to_string(),
            };
            let per = |key: &str| fmt_opt(counters.and_then(|c| c.per(key)), 3);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.1}{} | {} | {} | {} | {} | {} |",
                system.label,
                r.connections,
                (r.checked_bytes >> 20),
                r.seconds,
                r.mb_per_s,
                if run.repeats_mb_per_s.len() > 1 {
                    let all: Vec<String> = run
                        .repeats_mb_per_s
                        .iter()
                        .map(|v| format!("{v:.0}"))
                        .collect();
                    format!(" [{}]", all.join(", "))
                } else {
                    String::new()
                },
                fmt_ratio(run.vs_linux),
                frames,
                per("kicks"),
                per("interrupts"),
                fmt_opt(
                    counters
                        .and_then(|c| c.per("stack_busy_ns"))
                        .map(|ns| ns / 1000.0),
                    2
                ),
            );
        }
    }
    let _ = writeln!(
        out,
        "\n*vs Linux* is this MB/s over the Linux guest's with as many connections. Frames are the \
         guest's received and sent frames over the run (its stats before and after); the \
         per-frame figures are per received frame.\n"
    );
}

/// The targets and what was not measured.
fn targets_and_gaps(report: &Report, out: &mut String) {
    if !report.targets.is_empty() {
        let _ = writeln!(out, "| Target | Measured | Verdict |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for check in &report.targets {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                check.target, check.measured, check.verdict
            );
        }
        let _ = writeln!(out);
    }
    if !report.not_measured.is_empty() {
        let _ = writeln!(out, "Not measured in this run:\n");
        for missing in &report.not_measured {
            let _ = writeln!(out, "- **{}**: {}", missing.what, missing.reason);
        }
        let _ = writeln!(out);
    }
}
