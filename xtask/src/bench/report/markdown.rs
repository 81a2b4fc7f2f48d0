//! The Markdown report (`bench.md`): the summary table, the RTT detail table, the TCP throughput
//! table, the targets and what was not measured.

use std::fmt::Write as _;

use super::{Counters, Report, SystemKind, ThreadShare, fmt_opt};
use crate::bench::measure::ClientForm;
use crate::bench::options::Section;
use crate::bench::output::is_vcpu_thread;

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
    breakdown(out, report);
    cpu_budget(out, report);
    comparisons(out, report);
}

/// Microseconds per packet of a nanosecond counter.
fn per_us(counters: &Counters, key: &str) -> Option<f64> {
    counters.per(key).map(|ns| ns / 1000.0)
}

/// The vCPU thread (`CPU 0/TCG`) or QEMU's main loop, the I/O thread (`qemu-system-x86`).
fn thread_of(threads: &[ThreadShare], vcpu: bool) -> Option<&ThreadShare> {
    threads.iter().find(|t| {
        if vcpu {
            is_vcpu_thread(&t.thread)
        } else {
            t.thread.starts_with("qemu-system")
        }
    })
}

/// One thread's share, `run / wait` us per packet.
fn thread_cell(threads: &[ThreadShare], vcpu: bool) -> String {
    thread_of(threads, vcpu)
        .map(|t| {
            format!(
                "{:.1} / {:.1} ({:.2})",
                t.run_us_per_packet, t.wait_us_per_packet, t.slices_per_packet
            )
        })
        .unwrap_or_else(|| "–".to_string())
}

/// Where each Vireo run's time went, per echoed packet: the guest's TSC counters (the driver's
/// receive and transmit, the ring flushes, the stack, waiting spinning or halted, stolen time),
/// and how the host scheduled QEMU's vCPU and I/O threads over the same run.
fn breakdown(out: &mut String, report: &Report) {
    let _ = writeln!(
        out,
        "| System | run | rx | tx | kick | stack + services | idle passes | spinning (stolen) | \
         halted | halts | yields | vCPU run / wait (slices) | I/O thread run / wait (slices) |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |"
    );
    let mut rows = 0;
    for system in &report.systems {
        let runs = system
            .udp
            .iter()
            .map(|r| {
                (
                    format!(
                        "UDP {} B {}",
                        r.size,
                        r.form.map(ClientForm::as_str).unwrap_or("")
                    ),
                    r.counters.as_ref(),
                    &r.threads,
                )
            })
            .chain(system.throughput.as_ref().map(|t| {
                (
                    format!("pps, {} in flight", t.result.window),
                    t.counters.as_ref(),
                    &t.threads,
                )
            }));
        for (name, counters, threads) in runs {
            if system.kind == SystemKind::Floor {
                continue;
            }
            let us = |key: &str| fmt_opt(counters.and_then(|c| per_us(c, key)), 2);
            // The stack's own time: all of the loop's passes minus what the driver and the
            // flushes took inside them.
            let stack = counters.and_then(|c| {
                let passes = per_us(c, "stack_busy_ns")? + per_us(c, "idle_pass_ns")?;
                Some(passes - per_us(c, "rx_ns")? - per_us(c, "tx_ns")? - per_us(c, "kick_ns")?)
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                system.label,
                name,
                us("rx_ns"),
                us("tx_ns"),
                us("kick_ns"),
                fmt_opt(stack, 2),
                us("idle_pass_ns"),
                us("spin_ns"),
                us("stolen_ns"),
                us("halted_ns"),
                fmt_opt(counters.and_then(|c| c.per("halts")), 3),
                fmt_opt(
                    counters.and_then(|c| c.deltas.get("yields").map(|&v| v as f64)),
                    0
                ),
                thread_cell(threads, true),
                thread_cell(threads, false),
            );
            rows += 1;
        }
    }
    let _ = writeln!(
        out,
        "\n{}Per echoed packet, in microseconds. Guest columns come from Vireo's stats line \
         (its TSC): *rx* the driver's receive and recycle (empty polls included), *tx* its \
         transmit (smoltcp writing the frame included), *kick* the ring flushes (a notification \
         is an MMIO exit), *stack + services* the rest of the loop's passes (smoltcp, the \
         services), *idle passes* the part of all passes spent in passes that found nothing, *spinning* the wait \
         in the poll loop with the part the host took from it (*stolen*: gaps over 20 us), \
         *halted* the wait in `hlt`; *yields* is how often the adaptive guard switched to \
         halting in the whole run. The thread columns are QEMU's threads over the same run, from \
         `/proc/PID/task/*/schedstat`: time on a CPU / time runnable but waiting for one, us \
         per packet (time slices per packet).\n",
        if rows == 0 { "(No guest runs.) " } else { "" }
    );
}

/// The after/before table of `--baseline-kernel`.
fn comparisons(out: &mut String, report: &Report) {
    if report.comparisons.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "| Mode | figure | baseline kernel | kernel under test | after / before |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: |");
    for c in &report.comparisons {
        let better = if c.higher_is_better {
            c.ratio > 1.0
        } else {
            c.ratio < 1.0
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.2}{} |",
            c.mode,
            c.figure,
            c.before,
            c.after,
            c.ratio,
            if better { " (better)" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "\nThe kernel under test against `--baseline-kernel`, each mode measured with the \
         baseline right before, in the same run and namespace.\n"
    );
}

/// The host's CPU per echo in each pps run: the client thread, QEMU's vCPU, its I/O thread and
/// the rest of QEMU; with every core busy, the echo rate cannot exceed the cores' time over
/// their sum.
fn cpu_budget(out: &mut String, report: &Report) {
    let cores = report.environment.cpus_available.max(1) as f64;
    let mut rows = Vec::new();
    for system in &report.systems {
        let Some(t) = &system.throughput else {
            continue;
        };
        let client = t.result.client_cpu_us_per_echo;
        let thread = |vcpu| thread_of(&t.threads, vcpu).map(|s| s.run_us_per_packet);
        let (vcpu, io) = (thread(true), thread(false));
        let rest: f64 = t
            .threads
            .iter()
            .filter(|s| !is_vcpu_thread(&s.thread) && !s.thread.starts_with("qemu-system"))
            .map(|s| s.run_us_per_packet)
            .sum::<f64>()
            .max(0.0);
        let total = client.map(|c| c + vcpu.unwrap_or(0.0) + io.unwrap_or(0.0) + rest);
        rows.push(format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            system.label,
            t.pps(),
            fmt_opt(client, 2),
            fmt_opt(vcpu, 2),
            fmt_opt(io, 2),
            if t.threads.is_empty() {
                "–".to_string()
            } else {
                format!("{rest:.2}")
            },
            fmt_opt(total, 2),
            fmt_opt(total.map(|us| cores * 1e6 / us), 0),
        ));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "| System | echo pps | client CPU/echo | vCPU | QEMU I/O thread | other QEMU threads | \
         host CPU/echo | {cores:.0} cores / host CPU per echo |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(
        out,
        "\nCPU time per echo in the pps run (the measuring boot), us: the client thread's own \
         (`/proc/thread-self/schedstat`) and QEMU's threads' (`/proc/PID/task/*/schedstat`). \
         The last column is the echo rate at which the host's cores would all be busy with this \
         work alone: no system can echo faster on this host without a cheaper host side.\n"
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
