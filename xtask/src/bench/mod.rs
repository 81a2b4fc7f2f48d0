//! `cargo xtask bench`: Vireo's latency benchmark against the host tap (issue 6) and its NBD
//! section (issue 14).
//!
//! One run, on one machine, with one QEMU binary and one set of device options, measures:
//! - Vireo in each mode (`irq`, `poll`, `adaptive`): UDP ping-pong RTT at 64 and 1400 bytes in
//!   two client forms (blocking and busy-polling receive), ICMP RTT, windowed echo throughput
//!   with its loss rate, boot-to-first-echo, and the guest's counters per echoed packet;
//! - the Linux guest peer (Debian's kernel and a busybox initramfs built here, see [`linux`]),
//!   measured the same way;
//! - the floors: UDP echo over the namespace's loopback, and a userspace tap reflector with no
//!   VM ([`crate::TapReflector`]);
//! - the NBD section (issue 14, `--sections nbd` or `--nbd-only`): 4 KiB sequential and random
//!   reads and writes with one and several clients against Vireo's NBD export, the Linux guest's
//!   `nbd-server` and `qemu-nbd` on the host, on the same raw image ([`nbd`] is the client,
//!   `nbd_section` the targets).
//!
//! Everything runs in a private network namespace with a tap (`vhost=off`), created here and
//! always removed: [`crate::NetNs`] removes it on drop, which also runs on errors, on panics and
//! on Ctrl-C (a SIGINT/SIGTERM handler only sets a flag that every measuring loop checks, so the
//! run unwinds normally); a second Ctrl-C exits at once and leaves the namespace to the stale
//! sweep that runs before the next namespace is created.
//!
//! Results go to `bench-results/` (or `--out`): `bench.md` (tables), `bench.json` (every figure
//! and the raw environment), `bench-cdf.svg` (latency CDF), `bench-nbd.svg` (NBD bars) and the
//! guests' serial logs.
//!
//! This file orchestrates a run (environment, namespace, the systems in turn, cancellation);
//! [`options`] is the command line, `systems` measures one system, [`measure`] holds the
//! clients, [`report`] the results and their rendering, [`output`] the files.

pub mod linux;
pub mod machine;
pub mod measure;
pub mod nbd;
mod nbd_section;
pub mod options;
pub mod output;
pub mod report;
mod systems;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use self::machine::Environment;
pub use self::options::{BenchArgs, BenchOptions, Section};
pub use self::output::{Outputs, render, validate_nbd_outputs, validate_outputs, write_outputs};
use self::report::{NotMeasured, Report, Settings};
use self::systems::{
    BOOT_PROBE_INTERVAL, GuestSpec, measure_guest, measure_loopback_floor,
    measure_loopback_tcp_floor, measure_tap_floor,
};
use crate::{
    DEFAULT_GUEST_IP, NetNs, Qemu, QemuCommand, choose_accel, is_root, log,
    root_networking_available,
};

/// The guest's MAC, set explicitly on the NIC so that the host's static neighbour entry (and the
/// tap reflector) use the same one for every system.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

const GUEST_MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The guest's UDP echo port.
const ECHO_PORT: u16 = 7;

/// The guest's stats port.
const STATS_PORT: u16 = 7007;

/// A benchmark failure, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// SIGINT or SIGTERM arrived; the run is unwinding.
    #[error("interrupted (Ctrl-C): stopping; the namespace and QEMU are being removed")]
    Cancelled,
    /// The harness failed (QEMU, the namespace, a build).
    #[error(transparent)]
    Harness(#[from] crate::Error),
    /// A guest run failed; the text carries the QEMU command line and the serial log.
    #[error(transparent)]
    Run(#[from] crate::RunError),
    /// A client of the guest's services failed.
    #[error(transparent)]
    Client(#[from] crate::ClientError),
    /// The NBD client failed (or read wrong bytes).
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    /// Anything else, described.
    #[error("{0}")]
    Failed(String),
}

static CANCELLED: AtomicBool = AtomicBool::new(false);

static MAX_OTHER_QEMUS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Samples how many QEMU processes that are not the benchmark's run now (they share the cores
/// and make the figures noisier); the run records the maximum seen.
pub(crate) fn note_contention() {
    let others = machine::other_qemu_processes();
    MAX_OTHER_QEMUS.fetch_max(others, Ordering::Relaxed);
}

/// Fails with [`BenchError::Cancelled`] once SIGINT or SIGTERM arrived.
pub fn check_cancelled() -> Result<(), BenchError> {
    if cancelled() {
        Err(BenchError::Cancelled)
    } else {
        Ok(())
    }
}

/// Whether SIGINT or SIGTERM arrived during a run (the command then exits with 130).
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::Relaxed)
}

/// What SIGINT and SIGTERM do: the first sets the cancel flag (every measuring loop checks it,
/// so the run unwinds and drops the namespace); the second exits at once.
fn on_signal() {
    if CANCELLED.swap(true, Ordering::SeqCst) {
        eprintln!(
            "\n[bench] second interrupt: exiting now; the namespace is left to the stale sweep \
             of the next run (cargo xtask netns sweep)"
        );
        std::process::exit(130);
    }
    eprintln!(
        "\n[bench] interrupted: finishing the current step and tearing down (press Ctrl-C \
         again to exit at once)"
    );
}

/// Installs the SIGINT/SIGTERM handling (once per process): signal-hook's handler only queues
/// the signal, and a thread of its own runs [`on_signal`] outside the handler.
fn install_signal_handlers() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let spawned = Signals::new([SIGINT, SIGTERM]).and_then(|mut signals| {
            std::thread::Builder::new()
                .name("bench-signals".to_string())
                .spawn(move || signals.forever().for_each(|_| on_signal()))
        });
        if let Err(error) = spawned {
            log(&format!(
                "bench: warning: Ctrl-C will not tear down cleanly: installing the signal \
                 handler failed: {error}"
            ));
        }
    });
}

/// A PM QoS request for zero CPU wake-up latency, held while the value lives: the kernel keeps
/// it while the file stays open and drops it when the file is closed (Linux
/// `Documentation/power/pm_qos_interface.rst`), so the host is back to its own setting when the
/// run ends, however it ends.
struct CpuLatencyHold {
    _file: std::fs::File,
}

impl CpuLatencyHold {
    fn zero() -> Result<CpuLatencyHold, BenchError> {
        use std::io::Write as _;
        let path = "/dev/cpu_dma_latency";
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| BenchError::Failed(format!("--host-idle-poll: opening {path}: {e}")))?;
        file.write_all(&0i32.to_ne_bytes()).map_err(|e| {
            BenchError::Failed(format!("--host-idle-poll: writing 0 to {path}: {e}"))
        })?;
        Ok(CpuLatencyHold { _file: file })
    }
}

/// The QEMU `-device` spec of the NIC every guest gets.
pub fn nic_spec() -> String {
    format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}")
}

/// Runs the benchmark. Returns the report, where it was written, and the measurements that
/// failed (they are also listed in the report's `not_measured`).
pub fn run(options: &BenchOptions) -> Result<(Report, Outputs, Vec<String>), BenchError> {
    let began = Instant::now();
    let started_utc = machine::utc_timestamp(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    install_signal_handlers();
    if let Err(reason) = root_networking_available() {
        return Err(BenchError::Failed(format!(
            "cargo xtask bench needs root networking (a private namespace with a tap): {reason}"
        )));
    }
    let qemu = Qemu::ensure()?;
    let accel = choose_accel()?;
    let kernel = match &options.kernel {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => {
            return Err(BenchError::Failed(format!(
                "--kernel {}: no such file",
                path.display()
            )));
        }
        None => crate::build_kernel(true)?,
    };
    log(&format!("bench: Vireo kernel {}", kernel.display()));
    if let Some(path) = &options.baseline_kernel {
        if !path.is_file() {
            return Err(BenchError::Failed(format!(
                "--baseline-kernel {}: no such file",
                path.display()
            )));
        }
        log(&format!("bench: baseline kernel {}", path.display()));
    }
    std::fs::create_dir_all(&options.out_dir)
        .map_err(|e| BenchError::Failed(format!("creating {}: {e}", options.out_dir.display())))?;
    let mut not_measured = Vec::new();
    let mut failures = Vec::new();
    let linux_image = if options.linux {
        match linux::prepare(&options.out_dir) {
            Ok(image) => Some(image),
            Err(reason) => {
                log(&format!(
                    "bench: NOTE: the Linux guest cannot be measured: {reason}"
                ));
                not_measured.push(NotMeasured {
                    what: "Linux guest".to_string(),
                    reason,
                });
                None
            }
        }
    } else {
        not_measured.push(NotMeasured {
            what: "Linux guest".to_string(),
            reason: if options.quick {
                "skipped by --quick (the smoke run measures Vireo and the floors only)".to_string()
            } else {
                "skipped by --no-linux".to_string()
            },
        });
        None
    };
    let _idle_hold = if options.host_idle_poll {
        let hold = CpuLatencyHold::zero()?;
        log("bench: holding /dev/cpu_dma_latency at 0 for the run (--host-idle-poll)");
        Some(hold)
    } else {
        None
    };
    let environment = Environment::capture(&qemu, &accel);
    if environment.other_qemu_processes_at_start > 0 {
        log(&format!(
            "bench: warning: {} other QEMU process(es) are running and share the {} cores; \
             the figures will be noisier",
            environment.other_qemu_processes_at_start, environment.cpus
        ));
    }
    let settings = Settings {
        udp_samples: options.samples,
        warmup: options.warmup,
        sizes: options.sizes.clone(),
        client_forms: options.forms.clone(),
        modes: options.modes.clone(),
        icmp_samples: options.icmp_samples,
        icmp_size: 56,
        throughput_window: options.window,
        throughput_size: 64,
        throughput_seconds: options.throughput.as_secs_f64(),
        boots: options.boots,
        boot_probe_interval_ms: BOOT_PROBE_INTERVAL.as_secs_f64() * 1e3,
        machine: "q35".to_string(),
        memory_mib: options.memory_mib,
        smp: 1,
        netdev: NetNs::tap_netdev("n0", "tap0", None),
        nic: nic_spec(),
        addressing: format!(
            "{DEFAULT_GUEST_IP}/24 ({GUEST_MAC}, {}), host side 10.0.2.2/24 on tap0",
            if options.static_neigh {
                "static neighbour entry on the host side (--static-neigh)"
            } else {
                "no neighbour entry on the host side: it resolves the guest by ARP"
            }
        ),
        host_idle_poll: options.host_idle_poll,
        static_neigh: options.static_neigh,
        sections: options.sections.clone(),
        tcp_bytes_each: options.tcp_bytes as u64,
        tcp_connections: options.tcp_connections.clone(),
        tcp_repeats: options.tcp_repeats,
        teardown: "NetNs is removed on drop (normal end, error, panic); SIGINT/SIGTERM set a \
                   flag that every measuring loop checks, so Ctrl-C unwinds through the same \
                   drop; a second Ctrl-C exits at once and the stale-namespace sweep of the \
                   next run removes what is left"
            .to_string(),
    };

    let netns = NetNs::create("bench")?;
    // With --static-neigh, a permanent neighbour entry: no ARP on the host side, for every
    // system alike (boot probes then reach the guest the moment it listens). Without it the
    // host's first probe leaves an incomplete neighbour entry that only the guest's own
    // announcement (or ARP's 1 s retry) completes: the boot figure shows which a guest does.
    if options.static_neigh {
        netns.ip([
            "neigh",
            "replace",
            &DEFAULT_GUEST_IP.to_string(),
            "lladdr",
            GUEST_MAC,
            "dev",
            "tap0",
            "nud",
            "permanent",
        ])?;
    }
    // Every guest, Vireo or Linux, gets this same command line but for -kernel/-append/-initrd.
    let base_for = |kernel: &Path| {
        QemuCommand::new(&qemu, accel.accel, kernel)
            .memory_mib(options.memory_mib)
            .smp(1)
            .in_netns(netns.name())
            .netdev(NetNs::tap_netdev("n0", "tap0", None))
            .device(nic_spec())
            // Thread names (`CPU 0/TCG`, the main loop `qemu-system-x86`) for the schedstat
            // columns; it changes nothing else.
            .args(["-name", "bench,debug-threads=on"])
    };
    let base = base_for(&kernel);
    let baseline_base = options.baseline_kernel.as_deref().map(base_for);
    let mut systems = Vec::new();
    note_contention();
    // The guests run for the echo section, the TCP section, or both (one boot each).
    if options.sections.contains(&Section::Echo) || options.sections.contains(&Section::Tcp) {
        if options.floors && options.sections.contains(&Section::Echo) {
            systems.push(measure_loopback_floor(&netns, options)?);
            systems.push(measure_tap_floor(&netns, options, 0)?);
            if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
                systems.push(measure_tap_floor(&netns, options, 1)?);
            }
        }
        if options.floors && options.sections.contains(&Section::Tcp) {
            systems.push(measure_loopback_tcp_floor(&netns, options)?);
        }
        // With a baseline kernel, each mode is measured with it right before the kernel under
        // test, so that the pair sees the same host.
        let vireo_specs = options.modes.iter().flat_map(|mode| {
            let baseline = baseline_base
                .as_ref()
                .map(|base| GuestSpec::vireo(base, mode, true));
            baseline
                .into_iter()
                .chain(std::iter::once(GuestSpec::vireo(&base, mode, false)))
        });
        for spec in vireo_specs {
            match measure_guest(&netns, &spec, options) {
                Ok(result) => systems.push(result),
                Err(error) => {
                    check_cancelled()?;
                    log(&format!("bench: {} FAILED: {error}", spec.label));
                    failures.push(format!(
                        "{}: {}",
                        spec.label,
                        first_lines(&error.to_string(), 3)
                    ));
                    not_measured.push(NotMeasured {
                        what: spec.label.clone(),
                        reason: format!("measurement failed: {error}"),
                    });
                }
            }
        }
        if let Some(image) = &linux_image {
            let spec = GuestSpec::linux(base_for(&image.vmlinuz), image);
            match measure_guest(&netns, &spec, options) {
                Ok(result) => systems.push(result),
                Err(error) => {
                    check_cancelled()?;
                    log(&format!("bench: Linux guest FAILED: {error}"));
                    failures.push(format!(
                        "Linux guest: {}",
                        first_lines(&error.to_string(), 3)
                    ));
                    not_measured.push(NotMeasured {
                        what: "Linux guest".to_string(),
                        reason: format!("measurement failed: {error}"),
                    });
                }
            }
        }
    }
    let nbd = if options.sections.contains(&Section::Nbd) {
        let inputs = nbd_section::SectionInputs {
            netns: &netns,
            options,
            base_for: &base_for,
            kernel: &kernel,
            linux_image: linux_image.as_ref(),
        };
        Some(nbd_section::run(&inputs, &mut not_measured, &mut failures)?)
    } else {
        None
    };
    netns.remove()?;

    let mut report = Report {
        schema: 1,
        command: command_line(options),
        quick: options.quick,
        started_utc,
        wall_time_s: 0.0,
        environment,
        settings,
        systems,
        not_measured,
        targets: Vec::new(),
        nbd,
        comparisons: Vec::new(),
    };
    note_contention();
    report.environment.other_qemu_processes_max_during_run =
        MAX_OTHER_QEMUS.load(Ordering::Relaxed);
    report.environment.load_average_at_end = machine::load_average();
    report::derive(&mut report);
    report.targets = report::check_targets(&report);
    report.comparisons = report::compare_baselines(&report.systems);
    report.wall_time_s = began.elapsed().as_secs_f64();
    let outputs = write_outputs(&report, &options.out_dir)?;
    log(&format!(
        "bench: finished in {:.0} s; the namespace was removed",
        report.wall_time_s
    ));
    Ok((report, outputs, failures))
}

/// `cargo xtask bench` with the arguments this process got after `bench` (or, when it was not
/// started as `cargo xtask bench`, e.g. from a test, the run's kind).
fn command_line(options: &BenchOptions) -> String {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "bench") {
        Some(at) => std::iter::once("cargo xtask bench")
            .chain(args[at + 1..].iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        None if options.quick => "cargo xtask bench --quick".to_string(),
        None => "cargo xtask bench".to_string(),
    }
}

fn first_lines(text: &str, count: usize) -> String {
    text.lines().take(count).collect::<Vec<_>>().join(" / ")
}

/// Whether this process can run the benchmark (root networking); the reason when not.
pub fn available() -> Result<(), String> {
    if !is_root() {
        return Err("cargo xtask bench needs root (a network namespace with a tap)".to_string());
    }
    root_networking_available()
}
