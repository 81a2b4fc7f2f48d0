//! `cargo xtask bench`: Vireo's latency benchmark against the host tap (issue 6).
//!
//! One run, on one machine, with one QEMU binary and one set of device options, measures:
//! - Vireo in each mode (`irq`, `poll`, `adaptive`): UDP ping-pong RTT at 64 and 1400 bytes in
//!   two client forms (blocking and busy-polling receive), ICMP RTT, windowed echo throughput
//!   with its loss rate, boot-to-first-echo, and the guest's counters per echoed packet;
//! - the Linux guest peer (Debian's kernel and a busybox initramfs built here, see [`linux`]),
//!   measured the same way;
//! - the floors: UDP echo over the namespace's loopback, and a userspace tap reflector with no
//!   VM ([`crate::TapReflector`]).
//!
//! Everything runs in a private network namespace with a tap (`vhost=off`), created here and
//! always removed: [`crate::NetNs`] removes it on drop, which also runs on errors, on panics and
//! on Ctrl-C (a SIGINT/SIGTERM handler only sets a flag that every measuring loop checks, so the
//! run unwinds normally); a second Ctrl-C exits at once and leaves the namespace to the stale
//! sweep that runs before the next namespace is created.
//!
//! Results go to `bench-results/` (or `--out`): `bench.md` (tables), `bench.json` (every figure
//! and the raw environment), `bench-cdf.svg` (latency CDF) and the guests' serial logs.

pub mod linux;
pub mod machine;
pub mod measure;
mod progress;
pub mod report;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use self::machine::Environment;
use self::measure::ClientForm;
use self::progress::Progress;
use self::report::{
    BootResult, Counters, LINUX, LOOPBACK_FLOOR, NotMeasured, Report, RttRun, Settings, SystemKind,
    SystemResult, TAP_FLOOR, TAP_FLOOR_CROSS_CPU, ThroughputRun,
};
use crate::{
    DEFAULT_GUEST_IP, Guest, NetNs, Qemu, QemuCommand, RunOptions, TapDevice, TapReflector,
    choose_accel, is_root, log, query_stats, root_networking_available,
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
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<crate::Error> for BenchError {
    fn from(error: crate::Error) -> BenchError {
        BenchError(error.to_string())
    }
}

impl From<crate::RunError> for BenchError {
    fn from(error: crate::RunError) -> BenchError {
        BenchError(error.to_string())
    }
}

impl From<crate::ClientError> for BenchError {
    fn from(error: crate::ClientError) -> BenchError {
        BenchError(error.to_string())
    }
}

static CANCELLED: AtomicBool = AtomicBool::new(false);
static MAX_OTHER_QEMUS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Samples how many QEMU processes that are not the benchmark's run now (they share the cores
/// and make the figures noisier); the run records the maximum seen.
fn note_contention() {
    let others = machine::other_qemu_processes();
    MAX_OTHER_QEMUS.fetch_max(others, Ordering::Relaxed);
}

/// Fails with "interrupted" once SIGINT or SIGTERM arrived.
pub fn check_cancelled() -> Result<(), BenchError> {
    if CANCELLED.load(Ordering::Relaxed) {
        Err(BenchError(
            "interrupted (Ctrl-C): stopping; the namespace and QEMU are being removed".to_string(),
        ))
    } else {
        Ok(())
    }
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

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The short smoke run (Vireo in one mode and the floors, a few thousand samples).
    pub quick: bool,
    /// Where the results go.
    pub out_dir: PathBuf,
    /// A prebuilt kernel; else `cargo build --release -p vireo`.
    pub kernel: Option<PathBuf>,
    /// Measured UDP round trips per (system, size, form).
    pub samples: u64,
    /// Discarded round trips before each measurement.
    pub warmup: u64,
    /// UDP payload sizes.
    pub sizes: Vec<usize>,
    /// Client forms.
    pub forms: Vec<ClientForm>,
    /// Vireo's modes.
    pub modes: Vec<String>,
    /// Measured ICMP round trips.
    pub icmp_samples: u64,
    /// Datagrams in flight for throughput.
    pub window: u32,
    /// Length of a throughput run.
    pub throughput: Duration,
    /// Boots per guest configuration for boot-to-first-echo (the measuring boot included).
    pub boots: u32,
    /// Measure the Linux guest.
    pub linux: bool,
    /// Measure the floors.
    pub floors: bool,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Hold `/dev/cpu_dma_latency` at 0 for the run (idle host CPUs poll instead of halting).
    pub host_idle_poll: bool,
}

impl BenchOptions {
    /// The full benchmark.
    pub fn full() -> BenchOptions {
        BenchOptions {
            quick: false,
            out_dir: crate::workspace_root().join("bench-results"),
            kernel: None,
            samples: 100_000,
            warmup: 5_000,
            sizes: vec![64, 1400],
            forms: ClientForm::ALL.to_vec(),
            modes: vec!["irq".into(), "poll".into(), "adaptive".into()],
            icmp_samples: 10_000,
            window: 64,
            throughput: Duration::from_secs(5),
            boots: 5,
            linux: true,
            floors: true,
            memory_mib: 256,
            host_idle_poll: false,
        }
    }

    /// The smoke run: Vireo in poll mode and the floors, 64-byte payloads, a few thousand
    /// samples; no Linux guest.
    pub fn quick() -> BenchOptions {
        BenchOptions {
            quick: true,
            samples: 2_000,
            warmup: 200,
            sizes: vec![64],
            modes: vec!["poll".into()],
            icmp_samples: 300,
            window: 32,
            throughput: Duration::from_secs(1),
            boots: 1,
            linux: false,
            ..BenchOptions::full()
        }
    }

    /// Parses `cargo xtask bench` arguments.
    pub fn parse(args: &[String]) -> Result<BenchOptions, String> {
        let mut options = if args.iter().any(|a| a == "--quick") {
            BenchOptions::quick()
        } else {
            BenchOptions::full()
        };
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let mut value = || {
                iter.next()
                    .cloned()
                    .ok_or_else(|| format!("bench: {flag} needs a value"))
            };
            fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
                text.parse()
                    .map_err(|_| format!("bench: {flag}: {text:?} is not a valid number"))
            }
            match flag.as_str() {
                "--quick" => {}
                "--out" => options.out_dir = PathBuf::from(value()?),
                "--kernel" => options.kernel = Some(PathBuf::from(value()?)),
                "--samples" => options.samples = number(flag, &value()?)?,
                "--warmup" => options.warmup = number(flag, &value()?)?,
                "--icmp-samples" => options.icmp_samples = number(flag, &value()?)?,
                "--window" => options.window = number(flag, &value()?)?,
                "--boots" => options.boots = number::<u32>(flag, &value()?)?.max(1),
                "--memory" => {
                    options.memory_mib = crate::parse_memory_mib(&value()?)
                        .map_err(|e| format!("bench: --memory: {e}"))?
                }
                "--throughput-secs" => {
                    options.throughput = Duration::from_secs_f64(number(flag, &value()?)?)
                }
                "--sizes" => {
                    options.sizes = value()?
                        .split(',')
                        .map(|s| number(flag, s.trim()))
                        .collect::<Result<_, _>>()?
                }
                "--modes" => {
                    let modes: Vec<String> =
                        value()?.split(',').map(|s| s.trim().to_string()).collect();
                    if let Some(bad) = modes
                        .iter()
                        .find(|m| !matches!(m.as_str(), "irq" | "poll" | "adaptive"))
                    {
                        return Err(format!("bench: --modes: unknown mode {bad:?}"));
                    }
                    options.modes = modes;
                }
                "--forms" => {
                    options.forms = value()?
                        .split(',')
                        .map(|s| match s.trim() {
                            "blocking" => Ok(ClientForm::Blocking),
                            "spin" => Ok(ClientForm::Spin),
                            other => Err(format!("bench: --forms: unknown form {other:?}")),
                        })
                        .collect::<Result<_, _>>()?
                }
                "--no-linux" => options.linux = false,
                "--linux" => options.linux = true,
                "--no-floors" => options.floors = false,
                "--host-idle-poll" => options.host_idle_poll = true,
                other => return Err(format!("bench: unknown option {other:?}")),
            }
        }
        if options.sizes.is_empty() || options.forms.is_empty() || options.samples == 0 {
            return Err("bench: need at least one size, one client form and one sample".into());
        }
        Ok(options)
    }
}

/// The usage text of `cargo xtask bench`.
pub const USAGE: &str = "\
  bench [--quick] [--out DIR] [--kernel PATH] [--samples N] [--warmup N] [--sizes 64,1400]
        [--forms blocking,spin] [--modes irq,poll,adaptive] [--icmp-samples N] [--window N]
        [--throughput-secs S] [--boots N] [--memory SIZE] [--no-linux] [--no-floors]
        [--host-idle-poll]
        Latency benchmark (root): Vireo in each mode, the Linux guest peer and the floors
        (loopback, userspace tap reflector) over a tap in a private namespace. Writes
        bench.md, bench.json and bench-cdf.svg to DIR (default bench-results/).
        --host-idle-poll: hold /dev/cpu_dma_latency at 0 for the run, so that idle host
        CPUs poll instead of halting (as tuned's latency-performance profile does); the
        JSON and the table header record it.
        --quick: Vireo poll mode and the floors, 64 B, 2000 samples (a smoke run).
  bench --render DIR/bench.json
        Re-render bench.md and bench-cdf.svg from a run's JSON, without measuring.";

/// Where the outputs of a run went.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// The Markdown tables.
    pub markdown: PathBuf,
    /// The JSON.
    pub json: PathBuf,
    /// The SVG CDF.
    pub svg: PathBuf,
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
            .map_err(|e| BenchError(format!("--host-idle-poll: opening {path}: {e}")))?;
        file.write_all(&0i32.to_ne_bytes())
            .map_err(|e| BenchError(format!("--host-idle-poll: writing 0 to {path}: {e}")))?;
        Ok(CpuLatencyHold { _file: file })
    }
}

/// `cargo xtask bench ARGS`: runs the benchmark and returns the process exit status (0 when
/// every system asked for was measured or declared unmeasurable with a reason; 1 when a
/// measurement failed; 130 when interrupted).
pub fn main(args: &[String]) -> i32 {
    if let Some(position) = args.iter().position(|a| a == "--render") {
        let Some(json) = args.get(position + 1) else {
            eprintln!("error: bench: --render needs the path of a bench.json");
            return 2;
        };
        return match render(Path::new(json)) {
            Ok(outputs) => {
                println!(
                    "rendered {} and {}",
                    outputs.markdown.display(),
                    outputs.svg.display()
                );
                0
            }
            Err(error) => {
                eprintln!("error: {error}");
                1
            }
        };
    }
    let options = match BenchOptions::parse(args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}\n\nUsage: cargo xtask\n{USAGE}");
            return 2;
        }
    };
    match run(&options) {
        Ok((report, outputs, failures)) => {
            println!("{}", report::markdown(&report));
            println!(
                "results: {}, {}, {}",
                outputs.markdown.display(),
                outputs.json.display(),
                outputs.svg.display()
            );
            if failures.is_empty() {
                0
            } else {
                eprintln!("error: some measurements failed:");
                for failure in failures {
                    eprintln!("  - {failure}");
                }
                1
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            if CANCELLED.load(Ordering::Relaxed) {
                130
            } else {
                1
            }
        }
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
        return Err(BenchError(format!(
            "cargo xtask bench needs root networking (a private namespace with a tap): {reason}"
        )));
    }
    let qemu = Qemu::ensure()?;
    let accel = choose_accel()?;
    let kernel = match &options.kernel {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => {
            return Err(BenchError(format!(
                "--kernel {}: no such file",
                path.display()
            )));
        }
        None => crate::build_kernel(true)?,
    };
    log(&format!("bench: Vireo kernel {}", kernel.display()));
    std::fs::create_dir_all(&options.out_dir)
        .map_err(|e| BenchError(format!("creating {}: {e}", options.out_dir.display())))?;
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
            "{DEFAULT_GUEST_IP}/24 ({GUEST_MAC}, static neighbour entry on the host side), \
             host side 10.0.2.2/24 on tap0"
        ),
        host_idle_poll: options.host_idle_poll,
        teardown: "NetNs is removed on drop (normal end, error, panic); SIGINT/SIGTERM set a \
                   flag that every measuring loop checks, so Ctrl-C unwinds through the same \
                   drop; a second Ctrl-C exits at once and the stale-namespace sweep of the \
                   next run removes what is left"
            .to_string(),
    };

    let netns = NetNs::create("bench")?;
    // A permanent neighbour entry: no ARP on the host side, for every system alike (boot probes
    // then reach the guest the moment it listens, not after ARP's 1 s retry).
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
    // Every guest, Vireo or Linux, gets this same command line but for -kernel/-append/-initrd.
    let base_for = |kernel: &Path| {
        QemuCommand::new(&qemu, accel.accel, kernel)
            .memory_mib(options.memory_mib)
            .smp(1)
            .in_netns(netns.name())
            .netdev(NetNs::tap_netdev("n0", "tap0", None))
            .device(nic_spec())
    };
    let base = base_for(&kernel);
    let mut systems = Vec::new();
    note_contention();
    if options.floors {
        systems.push(measure_loopback_floor(&netns, options)?);
        systems.push(measure_tap_floor(&netns, options, 0)?);
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            systems.push(measure_tap_floor(&netns, options, 1)?);
        }
    }
    for mode in &options.modes {
        let spec = GuestSpec::vireo(&base, mode);
        match measure_guest(&netns, &spec, options) {
            Ok(result) => systems.push(result),
            Err(error) => {
                check_cancelled()?;
                log(&format!("bench: {} FAILED: {error}", spec.label));
                failures.push(format!("{}: {}", spec.label, first_lines(&error.0, 3)));
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
                failures.push(format!("Linux guest: {}", first_lines(&error.0, 3)));
                not_measured.push(NotMeasured {
                    what: "Linux guest".to_string(),
                    reason: format!("measurement failed: {error}"),
                });
            }
        }
    }
    netns.remove()?;

    let mut report = Report {
        schema: 1,
        command: if options.quick {
            "cargo xtask bench --quick".to_string()
        } else {
            "cargo xtask bench".to_string()
        },
        quick: options.quick,
        started_utc,
        wall_time_s: 0.0,
        environment,
        settings,
        systems,
        not_measured,
        targets: Vec::new(),
    };
    note_contention();
    report.environment.other_qemu_processes_max_during_run =
        MAX_OTHER_QEMUS.load(Ordering::Relaxed);
    report.environment.load_average_at_end = machine::load_average();
    report::derive(&mut report);
    report.targets = report::check_targets(&report);
    report.wall_time_s = began.elapsed().as_secs_f64();
    let outputs = write_outputs(&report, &options.out_dir)?;
    log(&format!(
        "bench: finished in {:.0} s; the namespace was removed",
        report.wall_time_s
    ));
    Ok((report, outputs, failures))
}

fn first_lines(text: &str, count: usize) -> String {
    text.lines().take(count).collect::<Vec<_>>().join(" / ")
}

/// Re-renders a run's `bench.md` and `bench-cdf.svg` (and the derived figures and target checks
/// in its JSON) from its `bench.json`, in the same directory: for a change to the tables or the
/// plot without measuring again.
pub fn render(json: &Path) -> Result<Outputs, BenchError> {
    let text = std::fs::read_to_string(json)
        .map_err(|e| BenchError(format!("reading {}: {e}", json.display())))?;
    let mut report: Report = serde_json::from_str(&text)
        .map_err(|e| BenchError(format!("{} is not a bench.json: {e}", json.display())))?;
    report::derive(&mut report);
    report.targets = report::check_targets(&report);
    let dir = json.parent().unwrap_or(Path::new("."));
    write_outputs(&report, dir)
}

/// Writes `bench.md`, `bench.json` and `bench-cdf.svg` into `dir`.
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Outputs, BenchError> {
    let outputs = Outputs {
        markdown: dir.join("bench.md"),
        json: dir.join("bench.json"),
        svg: dir.join("bench-cdf.svg"),
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))
    };
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| BenchError(format!("serialising the report: {e}")))?;
    write(&outputs.json, &json)?;
    write(
        &outputs.markdown,
        &format!("# Vireo benchmark\n\n{}", report::markdown(report)),
    )?;
    let size = report.settings.sizes.first().copied().unwrap_or(64);
    report::plot_cdf(report, size, &outputs.svg).map_err(BenchError)?;
    Ok(outputs)
}

/// How often boot probes are sent.
const BOOT_PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// One guest configuration to measure.
struct GuestSpec {
    id: String,
    label: String,
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
    fn vireo(base: &QemuCommand, mode: &str) -> GuestSpec {
        GuestSpec {
            id: format!("vireo-{mode}"),
            label: format!("Vireo ({mode})"),
            kind: SystemKind::Vireo,
            command: base
                .clone()
                .append(format!("ip={DEFAULT_GUEST_IP}/24 mode={mode}")),
            ready_marker: "vireo: ready",
            features_marker: "negotiated features",
            boot_limit: Duration::from_secs(30),
        }
    }

    fn linux(base: QemuCommand, image: &linux::LinuxImage) -> GuestSpec {
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
            return Err(BenchError(format!(
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

fn stats(netns: &NetNs) -> Result<crate::client::Stats, BenchError> {
    Ok(netns.run(|| query_stats(guest_address(STATS_PORT), Duration::from_millis(500), 5))??)
}

/// Boots a guest, measures it fully, then boots it again `boots - 1` times for the boot time
/// and the throughput (the table gives the median pps over all boots).
fn measure_guest(
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
    let mut bar = Progress::new(format!("{}: boot to first echo", spec.label), 1, "boots");
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

    let measured = measure_services(netns, &spec.label, options, true, None);
    let log_path = options.out_dir.join(format!("serial-{}.log", spec.id));
    guest.kill();
    let _ = std::fs::write(&log_path, guest.serial_log());
    let (udp, icmp, throughput) = measured.map_err(|error| {
        BenchError(format!(
            "{error}\n{}",
            guest.failure(crate::Error::Check("measurement failed".to_string()))
        ))
    })?;
    result.udp = udp;
    result.icmp = icmp;
    result.throughput = throughput;
    drop(guest);

    for index in 1..options.boots {
        let mut bar = Progress::new(
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

/// UDP ping-pong per size and form, ICMP and throughput against the echo service at the guest
/// address; with `counters`, the stats service is read before and after each UDP measurement.
fn measure_services(
    netns: &NetNs,
    label: &str,
    options: &BenchOptions,
    counters: bool,
    client_cpu: Option<usize>,
) -> Result<Measured, BenchError> {
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
            let mut bar = Progress::new(
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
            let mut run = RttRun::from_ping_pong("udp", size, Some(form), &raw)
                .ok_or_else(|| BenchError(format!("{label}: no UDP samples")))?;
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
    let result = throughput_run(netns, label, target, options, pin)?;
    let counters = match before {
        Some(before) => Some(Counters::between(&before, &stats(netns)?, result.received)),
        None => None,
    };
    let throughput = Some(ThroughputRun {
        pps_per_boot: vec![result.pps],
        result,
        counters,
        vs_linux: None,
    });
    Ok((udp, icmp, throughput))
}

/// The loopback floor: the same clients against a UDP echo server on 127.0.0.1 inside the
/// namespace (no tap, no VM). Client and server are pinned to CPU 0: on these virtual machines
/// a wake-up across CPUs costs tens of microseconds, and unpinned runs flip between the two
/// placements, so the floor is measured where it is lowest.
fn measure_loopback_floor(
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
                let mut bar = Progress::new(
                    format!("{label}: UDP {size} B {}", form.as_str()),
                    options.warmup + options.samples,
                    "round trips",
                );
                let raw = netns.run(|| {
                    measure::pin_current_thread(0);
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
                    .ok_or_else(|| BenchError("loopback floor: no samples".to_string()))?;
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
fn measure_tap_floor(
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
        .map_err(|e| BenchError(format!("attaching to tap0 for the reflector: {e}")))?;
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
    let measured = measure_services(netns, label, options, false, Some(0));
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

/// Checks that a run's files exist and are complete: the JSON parses and holds the environment
/// and, for each of `expected` (system ids), every UDP run with `samples` samples and a full CDF
/// (guests also with their QEMU command line, negotiated features, boot time and counters); the
/// Markdown has the tables and a row per system; the SVG is a whole document with a curve per
/// plotted system. Speeds are not checked.
pub fn validate_outputs(outputs: &Outputs, expected: &[&str], samples: u64) -> Result<(), String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let json: serde_json::Value = serde_json::from_str(&read(&outputs.json)?)
        .map_err(|e| format!("{} is not valid JSON: {e}", outputs.json.display()))?;
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("").trim().to_string();
    for key in [
        "cpu_model",
        "kernel_release",
        "qemu_version",
        "accelerator",
        "os",
    ] {
        if text(&json["environment"][key]).is_empty() {
            return Err(format!("bench.json: environment.{key} is empty"));
        }
    }
    if json["environment"]["cpus"].as_u64().unwrap_or(0) == 0 {
        return Err("bench.json: environment.cpus is missing".to_string());
    }
    let systems = json["systems"]
        .as_array()
        .ok_or("bench.json: no systems array")?;
    let markdown = read(&outputs.markdown)?;
    let svg = read(&outputs.svg)?;
    for table in ["| System | UDP", "| System | size |", "| Target |"] {
        if !markdown.contains(table) {
            return Err(format!("bench.md lacks the table starting {table:?}"));
        }
    }
    let svg_trimmed = svg.trim();
    if !(svg_trimmed.starts_with("<svg") || svg_trimmed.starts_with("<?xml"))
        || !svg_trimmed.ends_with("</svg>")
    {
        return Err("bench-cdf.svg is not a complete SVG document".to_string());
    }
    for id in expected {
        let system = systems
            .iter()
            .find(|s| s["id"] == *id)
            .ok_or_else(|| format!("bench.json: system {id:?} is missing"))?;
        let label = text(&system["label"]);
        let udp = system["udp"]
            .as_array()
            .filter(|runs| !runs.is_empty())
            .ok_or_else(|| format!("bench.json: {id} has no UDP runs"))?;
        for run in udp {
            let count = run["stats"]["count"].as_u64().unwrap_or(0);
            if count != samples {
                return Err(format!(
                    "bench.json: {id} has a UDP run of {count} samples, not {samples}"
                ));
            }
            if run["cdf_us"].as_array().map_or(0, Vec::len) != 1001 {
                return Err(format!(
                    "bench.json: {id} has a UDP run without its 1001-point CDF"
                ));
            }
            for key in [
                "min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
            ] {
                if run["stats"][key].as_f64().is_none_or(|v| v <= 0.0) {
                    return Err(format!("bench.json: {id}: {key} is missing"));
                }
            }
        }
        if system["throughput"]["sent"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("bench.json: {id} has no throughput run"));
        }
        if system["kind"] != "floor" {
            if system["qemu_command_lines"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                return Err(format!("bench.json: {id} has no QEMU command line"));
            }
            if text(&system["negotiated_features"]).is_empty() {
                return Err(format!("bench.json: {id} has no negotiated features"));
            }
            if system["boot"]["first_echo_ms"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                return Err(format!("bench.json: {id} has no boot-to-first-echo"));
            }
            if system["icmp"]["stats"]["count"].as_u64().unwrap_or(0) == 0 {
                return Err(format!("bench.json: {id} has no ICMP run"));
            }
            if !system["udp"][0]["counters"]["per_packet"].is_object() {
                return Err(format!("bench.json: {id} has no guest counters"));
            }
        }
        if !markdown.contains(&format!("| {label} |")) {
            return Err(format!("bench.md has no row for {label:?}"));
        }
        if !svg.contains(&label) {
            return Err(format!("bench-cdf.svg has no curve labelled {label:?}"));
        }
    }
    if !(svg.contains("<polyline") || svg.contains("<path")) {
        return Err("bench-cdf.svg draws no curve".to_string());
    }
    Ok(())
}

/// Whether this process can run the benchmark (root networking); the reason when not.
pub fn available() -> Result<(), String> {
    if !is_root() {
        return Err("cargo xtask bench needs root (a network namespace with a tap)".to_string());
    }
    root_networking_available()
}
