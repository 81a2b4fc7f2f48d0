//! The NBD section of the report (issue 14, item 5): its data model (serialised in
//! `bench.json` under `nbd`), the ratios Vireo/Linux per figure, the goal's verdict, and its
//! Markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{Counters, SystemKind, TargetCheck, fmt_opt, verdict};
use crate::bench::nbd::{Operation, Pattern, PhaseOutcome};
use crate::client::nearest_rank;

/// Identifier of the host-side floor (qemu-nbd on the host, no VM).
pub const NBD_HOST_FLOOR: &str = "nbd-host-qemu-nbd";
/// Identifier of Vireo's NBD target.
pub const NBD_VIREO: &str = "nbd-vireo";
/// Identifier of the Linux guest's NBD target.
pub const NBD_LINUX: &str = "nbd-linux";

/// The NBD section: its settings and one entry per target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdSection {
    /// What was measured and how.
    pub settings: NbdSettings,
    /// Vireo, the Linux guest, the host floor (those measured).
    pub targets: Vec<NbdTarget>,
}

/// The NBD section's parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdSettings {
    /// The disk image's size in MiB (a raw file, written before each target with generation 0).
    pub image_mib: u64,
    /// Bytes per request.
    pub block_size: u32,
    /// Length of each figure, in seconds.
    pub seconds_per_figure: f64,
    /// Unrecorded (but checked) random reads on each target before its first figure, seconds.
    #[serde(default)]
    pub warmup_seconds: f64,
    /// The client counts measured (each client is one connection with one request in flight).
    pub clients: Vec<usize>,
    /// The `-drive` spec both guests get (the image path aside).
    pub drive: String,
    /// The `-device` spec of the disk.
    pub disk_device: String,
    /// The QEMU cache mode of both guests and of the host's qemu-nbd.
    pub cache_mode: String,
    /// What a write's acknowledgement means on each target.
    pub write_semantics: Vec<String>,
    /// How the reads are checked.
    pub verification: String,
}

/// One NBD target's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdTarget {
    /// `nbd-vireo`, `nbd-linux`, `nbd-host-qemu-nbd`.
    pub id: String,
    /// Label for the tables.
    pub label: String,
    /// Vireo, Linux or the floor.
    pub kind: SystemKind,
    /// The server's address and export name.
    pub server: String,
    /// The command lines run for it (QEMU for the guests, qemu-nbd for the floor).
    pub command_lines: Vec<String>,
    /// What `NBD_OPT_GO` told: size, transmission flags, block sizes.
    pub export: Option<crate::bench::nbd::ExportInfo>,
    /// One entry per (pattern, operation, clients).
    pub figures: Vec<NbdFigure>,
    /// The guest's counters over the whole section (its stats service), when it has them.
    pub counters: Option<Counters>,
    /// Remarks.
    pub notes: Vec<String>,
}

/// Request latency statistics, in microseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Requests.
    pub count: usize,
    /// Fastest.
    pub min_us: f64,
    /// Median (nearest rank).
    pub p50_us: f64,
    /// 99th percentile (nearest rank).
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// Vireo's figure over the Linux guest's.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct NbdRatio {
    /// Vireo's MiB/s over Linux's (≥ 1 matches).
    pub throughput: f64,
    /// Vireo's p50 latency over Linux's (≤ 1 matches).
    pub p50: f64,
    /// Vireo's p99 latency over Linux's (≤ 1 matches).
    pub p99: f64,
}

/// One figure: a pattern, an operation and a client count, for a fixed time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdFigure {
    /// Sequential or random.
    pub pattern: Pattern,
    /// Read or write.
    pub operation: Operation,
    /// Connections, each with one request in flight.
    pub clients: usize,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Bytes read and compared with what the disk holds (all of them, for reads).
    pub verified_bytes: u64,
    /// Wall time of the figure, in seconds.
    pub elapsed_s: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Requests per second.
    pub iops: f64,
    /// Per-request latency.
    pub latency: LatencyStats,
    /// The closing flush of a write figure, in ms.
    pub flush_ms: Option<f64>,
    /// Vireo over Linux (Vireo's rows only).
    pub vs_linux: Option<NbdRatio>,
    /// The guest's counters over the figure (its stats service before and after), per
    /// request in `per_packet`.
    #[serde(default)]
    pub counters: Option<Counters>,
    /// The host's TCP counters in the namespace over the figure (`/proc/net/snmp` and
    /// `/proc/net/netstat` changes: `RetransSegs`, `TCPTimeouts`, ...): the client side's
    /// retransmissions, which a lost segment towards the server shows up in.
    #[serde(default)]
    pub host_tcp: BTreeMap<String, i64>,
}

impl NbdFigure {
    /// The figure of a phase's outcome; `None` when no request completed.
    pub fn from_outcome(
        pattern: Pattern,
        operation: Operation,
        clients: usize,
        outcome: &PhaseOutcome,
    ) -> Option<NbdFigure> {
        let mut sorted = outcome.latencies_ns.clone();
        sorted.sort_unstable();
        let sorted = &sorted;
        if sorted.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        let rank = |per_mille| us(nearest_rank(sorted, per_mille).unwrap_or(0));
        let seconds = outcome.elapsed.as_secs_f64().max(1e-9);
        Some(NbdFigure {
            pattern,
            operation,
            clients,
            ops: outcome.ops,
            bytes: outcome.bytes,
            verified_bytes: outcome.verified_bytes,
            elapsed_s: outcome.elapsed.as_secs_f64(),
            mib_per_s: outcome.bytes as f64 / (1024.0 * 1024.0) / seconds,
            iops: outcome.ops as f64 / seconds,
            latency: LatencyStats {
                count: sorted.len(),
                min_us: rank(0),
                p50_us: rank(500),
                p99_us: rank(990),
                max_us: rank(1000),
                mean_us: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64 / 1e3,
            },
            flush_ms: outcome.flush.map(|d| d.as_secs_f64() * 1e3),
            vs_linux: None,
            counters: None,
            host_tcp: BTreeMap::new(),
        })
    }

    /// `sequential read, 1 client`.
    pub fn name(&self) -> String {
        format!(
            "{} {}, {} client{}",
            self.pattern.as_str(),
            self.operation.as_str(),
            self.clients,
            if self.clients == 1 { "" } else { "s" }
        )
    }

    fn key(&self) -> (Pattern, Operation, usize) {
        (self.pattern, self.operation, self.clients)
    }
}

impl NbdSection {
    fn target(&self, id: &str) -> Option<&NbdTarget> {
        self.targets.iter().find(|t| t.id == id)
    }

    /// Fills in Vireo's ratios over the Linux guest.
    pub fn derive(&mut self) {
        let Some(linux) = self.target(NBD_LINUX).cloned() else {
            return;
        };
        let reference: BTreeMap<_, _> = linux.figures.iter().map(|f| (f.key(), f)).collect();
        for target in &mut self.targets {
            if target.id != NBD_VIREO {
                continue;
            }
            for figure in &mut target.figures {
                figure.vs_linux = reference.get(&figure.key()).map(|theirs| NbdRatio {
                    throughput: figure.mib_per_s / theirs.mib_per_s,
                    p50: figure.latency.p50_us / theirs.latency.p50_us,
                    p99: figure.latency.p99_us / theirs.latency.p99_us,
                });
            }
        }
    }

    /// The goal "Vireo at least matches the Linux guest on every figure": throughput, p50 and
    /// p99 of every (pattern, operation, clients).
    pub fn check_target(&self) -> TargetCheck {
        let target = "NBD: Vireo at least matches the Linux guest on every figure (MiB/s, p50, \
                      p99 of each pattern, operation and client count)"
            .to_string();
        let vireo = self.target(NBD_VIREO);
        let figures: Vec<&NbdFigure> = vireo
            .map(|v| v.figures.iter().collect())
            .unwrap_or_default();
        let ratios: Vec<(&NbdFigure, NbdRatio)> = figures
            .iter()
            .filter_map(|f| Some((*f, f.vs_linux?)))
            .collect();
        if ratios.is_empty() || self.target(NBD_LINUX).is_none() {
            return TargetCheck {
                target,
                measured: "needs Vireo's and the Linux guest's NBD figures".to_string(),
                verdict: verdict(None),
            };
        }
        let mut missed = Vec::new();
        let mut checked = 0;
        for (figure, ratio) in &ratios {
            for (what, ok, value) in [
                ("MiB/s", ratio.throughput >= 1.0, ratio.throughput),
                ("p50", ratio.p50 <= 1.0, ratio.p50),
                ("p99", ratio.p99 <= 1.0, ratio.p99),
            ] {
                checked += 1;
                if !ok {
                    missed.push(format!("{} {what} {value:.2}×", figure.name()));
                }
            }
        }
        let complete = ratios.len() == figures.len();
        TargetCheck {
            target,
            measured: if missed.is_empty() {
                format!("all {checked} figures at or better than Linux")
            } else {
                format!(
                    "{} of {checked} met; missed (Vireo/Linux): {}",
                    checked - missed.len(),
                    missed.join("; ")
                )
            },
            verdict: verdict(complete.then_some(missed.is_empty())),
        }
    }

    /// The Markdown table: the targets side by side per figure, and Vireo/Linux.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(
            out,
            "### NBD\n\n{} KiB requests, one in flight per client, {:.1} s per figure after {:.1} s \
             of unrecorded random reads per target, on a {} MiB raw image; both guests: `-drive {}` `-device {}` (cache mode {}). Every read \
             compared with what the disk holds ({}).\n",
            s.block_size / 1024,
            s.seconds_per_figure,
            s.warmup_seconds,
            s.image_mib,
            s.drive,
            s.disk_device,
            s.cache_mode,
            s.verification
        );
        let mut header = "| Figure |".to_string();
        let mut rule = "| --- |".to_string();
        for target in &self.targets {
            let _ = write!(header, " {} MiB/s (IOPS) | p50 / p99, us |", target.label);
            rule.push_str(" ---: | ---: |");
        }
        header.push_str(" Vireo/Linux MiB/s | p50 | p99 |");
        rule.push_str(" ---: | ---: | ---: |");
        let _ = writeln!(out, "{header}\n{rule}");
        let rows: Vec<(Pattern, Operation, usize)> = {
            let mut keys = Vec::new();
            for target in &self.targets {
                for figure in &target.figures {
                    if !keys.contains(&figure.key()) {
                        keys.push(figure.key());
                    }
                }
            }
            keys
        };
        for key in rows {
            let mut name = None;
            let mut cells = String::new();
            for target in &self.targets {
                match target.figures.iter().find(|f| f.key() == key) {
                    Some(figure) => {
                        name.get_or_insert_with(|| figure.name());
                        let _ = write!(
                            cells,
                            " {:.2} ({:.0}) | {:.0} / {:.0} |",
                            figure.mib_per_s,
                            figure.iops,
                            figure.latency.p50_us,
                            figure.latency.p99_us
                        );
                    }
                    None => cells.push_str(" – | – |"),
                }
            }
            let ratio = self
                .target(NBD_VIREO)
                .and_then(|v| v.figures.iter().find(|f| f.key() == key))
                .and_then(|f| f.vs_linux);
            let show = |value: Option<f64>| match value {
                Some(v) if v.is_finite() => format!("{v:.2}×"),
                _ => "–".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} |{cells} {} | {} | {} |",
                name.unwrap_or_default(),
                show(ratio.map(|r| r.throughput)),
                show(ratio.map(|r| r.p50)),
                show(ratio.map(|r| r.p99)),
            );
        }
        let _ = writeln!(
            out,
            "\nVireo/Linux: MiB/s ≥ 1.00× and latency ≤ 1.00× mean Vireo matches or beats the \
             Linux guest on that figure. Closing flush of each write figure, ms: {}.\n",
            self.targets
                .iter()
                .map(|t| {
                    let flushes: Vec<String> = t
                        .figures
                        .iter()
                        .filter_map(|f| f.flush_ms)
                        .map(|ms| format!("{ms:.1}"))
                        .collect();
                    format!(
                        "{} {}",
                        t.label,
                        if flushes.is_empty() {
                            "–".to_string()
                        } else {
                            flushes.join("/")
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        for line in &s.write_semantics {
            let _ = writeln!(out, "- {line}");
        }
        let _ = writeln!(out);
        let guests: Vec<&NbdTarget> = self
            .targets
            .iter()
            .filter(|t| t.figures.iter().any(|f| f.counters.is_some()))
            .collect();
        if !guests.is_empty() {
            let _ = writeln!(
                out,
                "Guest counters per request over each figure (stats service before and after; \
                 Vireo's *busy* is its loop's `stack_busy_ns`, *stolen* the host's steal time \
                 the guest saw; *host RTOs / retransmits* are the client side's TCP timeouts and \
                 retransmitted segments over the whole figure, and *max* the slowest request):\n\n\
                 | Guest | Figure | interrupts | halts | kicks | RX pkts | TX pkts | busy, us | \
                 stolen, us | host RTOs / retransmits | max, ms |\n| --- | --- | ---: | ---: | ---: \
                 | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for target in guests {
                for figure in &target.figures {
                    let Some(counters) = &figure.counters else {
                        continue;
                    };
                    let per = |key: &str| fmt_opt(counters.per(key), 3);
                    let micros = |key: &str| fmt_opt(counters.per(key).map(|ns| ns / 1e3), 1);
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.1} |",
                        target.label,
                        figure.name(),
                        per("interrupts"),
                        per("halts"),
                        per("kicks"),
                        per("rx_packets"),
                        per("tx_packets"),
                        micros("stack_busy_ns"),
                        micros("stolen_ns"),
                        figure
                            .host_tcp
                            .get("TCPTimeouts")
                            .map_or("–".to_string(), i64::to_string),
                        figure
                            .host_tcp
                            .get("RetransSegs")
                            .map_or("–".to_string(), i64::to_string),
                        figure.latency.max_us / 1e3,
                    );
                }
            }
            let _ = writeln!(out);
        }
        for target in &self.targets {
            for line in &target.command_lines {
                let _ = writeln!(out, "- {}: `{line}`", target.label);
            }
        }
        let _ = writeln!(out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn figure(operation: Operation, latencies_us: &[u64]) -> NbdFigure {
        let outcome = PhaseOutcome {
            latencies_ns: latencies_us.iter().map(|us| us * 1000).collect(),
            ops: latencies_us.len() as u64,
            bytes: latencies_us.len() as u64 * 4096,
            verified_bytes: 0,
            elapsed: Duration::from_secs(1),
            flush: None,
        };
        NbdFigure::from_outcome(Pattern::Random, operation, 1, &outcome).expect("samples")
    }

    fn target(id: &str, kind: SystemKind, figures: Vec<NbdFigure>) -> NbdTarget {
        NbdTarget {
            id: id.to_string(),
            label: id.to_string(),
            kind,
            server: String::new(),
            command_lines: Vec::new(),
            export: None,
            figures,
            counters: None,
            notes: Vec::new(),
        }
    }

    fn section(vireo: Vec<NbdFigure>, linux: Vec<NbdFigure>) -> NbdSection {
        let mut section = NbdSection {
            settings: NbdSettings {
                image_mib: 64,
                block_size: 4096,
                seconds_per_figure: 1.0,
                warmup_seconds: 0.0,
                clients: vec![1],
                drive: String::new(),
                disk_device: String::new(),
                cache_mode: "writeback".to_string(),
                write_semantics: Vec::new(),
                verification: String::new(),
            },
            targets: vec![
                target(NBD_VIREO, SystemKind::Vireo, vireo),
                target(NBD_LINUX, SystemKind::Linux, linux),
            ],
        };
        section.derive();
        section
    }

    #[test]
    fn figures_use_nearest_rank_and_the_wall_time() {
        let f = figure(Operation::Read, &[5, 1, 4, 2, 3]);
        assert_eq!((f.latency.p50_us, f.latency.p99_us), (3.0, 5.0));
        assert_eq!((f.latency.min_us, f.latency.max_us), (1.0, 5.0));
        assert_eq!(f.iops, 5.0);
        assert!((f.mib_per_s - 5.0 * 4096.0 / 1048576.0).abs() < 1e-12);
    }

    #[test]
    fn the_goal_needs_every_figure_at_least_as_good() {
        let met = section(
            vec![
                figure(Operation::Read, &[10, 10, 10]),
                figure(Operation::Write, &[5, 5]),
            ],
            vec![
                figure(Operation::Read, &[10, 10, 10]),
                figure(Operation::Write, &[9, 9]),
            ],
        );
        let check = met.check_target();
        assert_eq!(check.verdict, "met", "{}", check.measured);
        // Slower p99 on one figure misses the goal, and the miss is named.
        let missed = section(
            vec![figure(Operation::Read, &[1, 1, 50])],
            vec![figure(Operation::Read, &[10, 10, 10])],
        );
        let check = missed.check_target();
        assert_eq!(check.verdict, "missed");
        assert!(
            check.measured.contains("random read, 1 client p99 5.00×"),
            "{}",
            check.measured
        );
        let table = missed.markdown();
        assert!(table.contains("| random read, 1 client |"), "{table}");
        assert!(table.contains("5.00×"), "{table}");
        // Without Linux there is no verdict.
        let alone = NbdSection {
            targets: vec![missed.targets[0].clone()],
            ..missed.clone()
        };
        assert_eq!(alone.check_target().verdict, "not measured");
    }
}
