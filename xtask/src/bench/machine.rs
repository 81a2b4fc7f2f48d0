//! The raw environment of a run, recorded in the JSON next to the figures: the host CPU, cores,
//! kernel, load, QEMU, the accelerator and the toolchain.

use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::host::{AccelChoice, Qemu};

/// What the benchmark ran on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    /// `model name` of the first CPU in `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Logical CPUs the OS lists in `/proc/cpuinfo`.
    pub cpus: usize,
    /// CPUs this process may run on.
    pub cpus_available: usize,
    /// Whether `/proc/cpuinfo` lists `vmx` or `svm`.
    pub cpu_virtualisation_flag: Option<String>,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel_release: String,
    /// `/proc/version`.
    pub kernel_version: String,
    /// `PRETTY_NAME` from `/etc/os-release`.
    pub os: String,
    /// Total RAM from `/proc/meminfo`, in MiB.
    pub memory_mib: u64,
    /// `/proc/loadavg` when the run started.
    pub load_average_at_start: String,
    /// Other QEMU processes running when the run started (they share the cores).
    pub other_qemu_processes_at_start: usize,
    /// The most QEMU processes not started by the benchmark seen at any step of the run.
    pub other_qemu_processes_max_during_run: usize,
    /// `/proc/loadavg` when the run ended.
    pub load_average_at_end: String,
    /// The QEMU binary.
    pub qemu_path: String,
    /// Its `--version` line.
    pub qemu_version: String,
    /// The accelerator (`tcg` or `kvm`).
    pub accelerator: String,
    /// Why that accelerator was chosen.
    pub accelerator_reason: String,
    /// `rustc --version` (the client and the kernel are built with it).
    pub rustc: String,
    /// The project's commit (`git rev-parse HEAD`), with `-dirty` when the tree has changes.
    pub git_commit: String,
    /// How idle host CPUs wait: the cpuidle driver and governor, each idle state, and haltpoll's
    /// poll budget. On a virtual host a halted CPU is woken by its hypervisor, which costs tens
    /// of microseconds per cross-CPU wake-up; every guest pays it on each wake of a QEMU thread.
    #[serde(default)]
    pub host_idle: String,
}

impl Environment {
    /// Reads the environment now.
    pub fn capture(qemu: &Qemu, accel: &AccelChoice) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let cpus = cpuinfo
            .lines()
            .filter(|line| line.split(':').next().map(str::trim) == Some("processor"))
            .count();
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string())
        };
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME="))
            .map(|value| value.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".to_string());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        Environment {
            cpu_model,
            cpus,
            cpus_available: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_virtualisation_flag: crate::host::cpu_virt_flag(&cpuinfo).map(str::to_string),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            kernel_version: read("/proc/version"),
            os,
            memory_mib,
            load_average_at_start: load_average(),
            other_qemu_processes_at_start: other_qemu_processes(),
            other_qemu_processes_max_during_run: 0,
            load_average_at_end: String::new(),
            qemu_path: qemu.path.display().to_string(),
            qemu_version: qemu.version_line.clone(),
            accelerator: accel.accel.as_str().to_string(),
            accelerator_reason: accel.reason.clone(),
            rustc: command_output("rustc", &["--version"]),
            git_commit: git_commit(),
            host_idle: host_idle(),
        }
    }
}

/// The host's idle configuration (see [`Environment::host_idle`]), e.g. `cpuidle haltpoll
/// (governor haltpoll): POLL, haltpoll idle; haltpoll guest_halt_poll_ns=0`.
pub fn host_idle() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| text.trim().to_string())
    };
    let root = "/sys/devices/system/cpu/cpuidle";
    let Some(driver) = read(&format!("{root}/current_driver")) else {
        return "no cpuidle (the kernel's default idle loop)".to_string();
    };
    let governor = read(&format!("{root}/current_governor"))
        .or_else(|| read(&format!("{root}/current_governor_ro")))
        .unwrap_or_else(|| "unknown".to_string());
    let states: Vec<String> = (0..16)
        .map_while(|index| {
            read(&format!(
                "/sys/devices/system/cpu/cpu0/cpuidle/state{index}/name"
            ))
        })
        .collect();
    let mut text = format!(
        "cpuidle {driver} (governor {governor}): {}",
        states.join(", ")
    );
    if let Some(poll_ns) = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        text.push_str(&format!("; haltpoll guest_halt_poll_ns={poll_ns}"));
    }
    text
}

/// `/proc/loadavg` now.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
}

/// QEMU processes running now that this process did not start (`/proc/*/comm` starting with
/// `qemu-system` and a parent other than this process; `ip netns exec` execs QEMU in place, so
/// the benchmark's own QEMU is its child).
pub fn other_qemu_processes() -> usize {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("qemu-system"))
        })
        .filter(|entry| {
            // Field 4 of /proc/PID/stat is the parent; the command (field 2) may hold spaces,
            // so split after its closing parenthesis.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
            parent.as_deref() != Some(me.as_str())
        })
        .count()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn git_commit() -> String {
    let commit = command_output("git", &["rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(crate::workspace_root())
        .output()
        .map(|output| !output.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// Formats a Unix time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc_timestamp(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let seconds = unix_seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}

/// One QEMU thread's scheduling totals from `/proc/PID/task/TID/schedstat` (Linux
/// `Documentation/scheduler/sched-stats.rst`): time on a CPU, time runnable but waiting on a
/// run queue, and time slices run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedTotals {
    /// Nanoseconds spent running.
    pub run_ns: u64,
    /// Nanoseconds spent runnable, waiting for a CPU.
    pub wait_ns: u64,
    /// Time slices run (each ends in a sleep or a preemption).
    pub slices: u64,
}

/// Parses one `schedstat` line: three decimal numbers.
pub fn parse_schedstat(text: &str) -> Option<SchedTotals> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let totals = SchedTotals {
        run_ns: fields.next()?.ok()?,
        wait_ns: fields.next()?.ok()?,
        slices: fields.next()?.ok()?,
    };
    fields.next().is_none().then_some(totals)
}

/// Every thread of process `pid` by its name (`comm`): `CPU 0/TCG` is the vCPU, `qemu-system-x86`
/// the main loop (the I/O thread that moves packets between the tap and the rings). Threads of
/// the same name are summed; an unreadable thread (it just exited) is left out.
pub fn thread_schedstats(pid: u32) -> std::collections::BTreeMap<String, SchedTotals> {
    let mut threads = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let Some(totals) = parse_schedstat(&stat) else {
            continue;
        };
        let sum: &mut SchedTotals = threads.entry(comm.trim().to_string()).or_default();
        sum.run_ns += totals.run_ns;
        sum.wait_ns += totals.wait_ns;
        sum.slices += totals.slices;
    }
    threads
}

#[cfg(test)]
mod sched_tests {
    use super::*;

    #[test]
    fn schedstat_lines_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_schedstat("1203 45 7\n"),
            Some(SchedTotals {
                run_ns: 1203,
                wait_ns: 45,
                slices: 7
            })
        );
        for bad in ["", "1 2", "1 2 x", "1 2 3 4", "-1 2 3"] {
            assert_eq!(parse_schedstat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_process_has_a_thread_that_ran() {
        let threads = thread_schedstats(std::process::id());
        assert!(!threads.is_empty());
        assert!(threads.values().any(|t| t.run_ns > 0 && t.slices > 0));
        assert!(thread_schedstats(u32::MAX).is_empty());
    }
}
