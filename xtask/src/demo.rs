//! `cargo xtask demo`, the main job, as library code: the binary only parses its arguments with
//! [`DemoConfig::parse`], calls [`run_demo`] and prints the [`DemoSummary`] or the
//! [`DemoError`]. The test suite (`tests/demo.rs`) runs the same [`run_demo`] against the debug
//! kernel (`--kernel PATH`), so the demo a user runs is the demo CI runs.
//!
//! The steps: make sure QEMU is there, build the kernel (or take `--kernel`), boot it with
//! `-device virtio-net-pci` on QEMU user networking with the guest's UDP/TCP echo and stats
//! ports forwarded to free ports on 127.0.0.1, wait for `ready`, echo UDP datagrams and 1 MiB of
//! TCP (every byte checked), measure UDP round trips with a progress bar on stderr, read the
//! stats service around them, then shut the guest down through QMP `quit`.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::client::{
    ClientError, EchoReport, RttSummary, Stats, TcpEchoReport, UdpEchoClient, query_stats, tcp_echo,
};
use crate::command::{GuestMode, QemuCommand};
use crate::error::Error;
use crate::host::{Qemu, choose_accel, log};
use crate::progress::Progress;
use crate::qmp::QmpError;
use crate::runner::{GuestExit, RunError, RunOptions, SerialLine, unique_temp_path};
use crate::usernet::{DEFAULT_NIC, UserNet, boot_on_user_net_forwarding};

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

/// Everything `cargo xtask demo` takes on its command line.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// A prebuilt kernel to boot instead of building one (`--kernel PATH`).
    pub kernel: Option<PathBuf>,
    /// Build the release kernel (the default) rather than the debug one (`--debug`).
    pub release: bool,
    /// Wall-clock limit for the whole QEMU run, boot included (`--timeout SECS`).
    pub timeout: Duration,
    /// The guest's receive mode (`--mode irq|poll|adaptive`); the kernel's default when unset.
    pub mode: Option<String>,
    /// The exchanges after `ready` (`--rtts N`, `--tcp-bytes N`).
    pub options: DemoOptions,
    /// Copy the guest's serial console to stdout as it arrives.
    pub echo_serial: bool,
    /// A raw disk image to attach as a virtio-blk disk (`--blk IMAGE`); the guest then runs
    /// its `blk-check` on it, which writes its last block.
    pub blk: Option<PathBuf>,
    /// Attach a virtio-rng device (`--rng`); the guest seeds its CSPRNG from it.
    pub rng: bool,
    /// Export the disk over NBD (`--nbd`): `services=echo,stats,nbd`, with `--blk`'s image or
    /// a fresh 64 MiB one, and show real clients using it (see [`nbd_demo`]).
    pub nbd: bool,
}

impl Default for DemoConfig {
    fn default() -> DemoConfig {
        DemoConfig {
            kernel: None,
            release: true,
            timeout: Duration::from_secs(120),
            mode: None,
            options: DemoOptions::default(),
            echo_serial: true,
            blk: None,
            rng: false,
            nbd: false,
        }
    }
}

/// `cargo xtask demo`'s flags (clap). [`DemoConfig::parse`] and the binary both go through it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DemoArgs {
    /// Build and boot the debug kernel instead of the release one.
    #[arg(long, conflicts_with = "release")]
    pub debug: bool,
    /// Build and boot the release kernel (the default).
    #[arg(long, hide = true)]
    pub release: bool,
    /// Boot this kernel image and build nothing.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The guest's receive mode (the kernel's default, adaptive, when left out).
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<GuestMode>,
    /// Wall-clock limit for the whole QEMU run, boot included, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// UDP round trips to measure (64 bytes, one in flight).
    #[arg(long, value_name = "N", default_value_t = DemoOptions::default().round_trips)]
    pub rtts: u64,
    /// Bytes for the TCP echo.
    #[arg(long, value_name = "N", default_value_t = DemoOptions::default().tcp_bytes)]
    pub tcp_bytes: usize,
    /// Attach this raw image as a virtio-blk disk; the guest checks it at boot (`blk-check`:
    /// reads the first blocks, writes its pattern over the last block, flushes, reads back)
    /// and the summary shows the disk.
    #[arg(long, value_name = "IMAGE")]
    pub blk: Option<PathBuf>,
    /// Attach a virtio-rng device; the guest seeds its CSPRNG from it and the summary shows
    /// the entropy line.
    #[arg(long)]
    pub rng: bool,
    /// Export the disk over NBD (services=echo,stats,nbd; the --blk image, or a fresh 64 MiB
    /// one): nbdinfo lists it, qemu-io writes and reads back patterns at 1 MiB, nbdcopy reads
    /// the whole export; exits 0 only when every byte matches. Needs nbdinfo, nbdcopy
    /// (libnbd-bin) and qemu-io (qemu-utils), installed when running as root.
    #[arg(long)]
    pub nbd: bool,
}

/// `demo` alone, for [`DemoConfig::parse`].
#[derive(clap::Parser)]
#[command(name = "demo")]
struct DemoCommand {
    #[command(flatten)]
    args: DemoArgs,
}

impl From<&DemoArgs> for DemoConfig {
    fn from(args: &DemoArgs) -> DemoConfig {
        DemoConfig {
            kernel: args.kernel.clone(),
            release: !args.debug,
            timeout: Duration::from_secs(args.timeout.max(1)),
            mode: args.mode.map(|mode| mode.as_str().to_string()),
            options: DemoOptions {
                round_trips: args.rtts,
                tcp_bytes: args.tcp_bytes,
            },
            echo_serial: true,
            blk: args.blk.clone(),
            rng: args.rng,
            nbd: args.nbd,
        }
    }
}

impl DemoConfig {
    /// Parses `cargo xtask demo`'s arguments (everything after `demo`) with the command's own
    /// parser. The error is clap's message, usage included.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<DemoConfig, String> {
        use clap::Parser as _;
        let words = std::iter::once(OsString::from("demo")).chain(args);
        DemoCommand::try_parse_from(words)
            .map(|command| DemoConfig::from(&command.args))
            .map_err(|error| error.render().to_string())
    }
}

/// Why the demo failed. Each variant names its cause; the ones with a guest carry the QEMU
/// command line and the whole serial log. `Debug` shows the same text as `Display`, so that a
/// test returning `Result<_, DemoError>` prints it readably.
#[derive(thiserror::Error)]
pub enum DemoError {
    /// QEMU is not installed (or not usable); the error says how to get it.
    #[error("demo failed: no QEMU: {0}")]
    NoQemu(Error),
    /// The host environment is not usable (e.g. an invalid `VIREO_ACCEL`).
    #[error("demo failed: the host environment is not usable: {0}")]
    Setup(Error),
    /// Building the kernel failed.
    #[error("demo failed: the kernel build failed: {0}")]
    Build(Error),
    /// The kernel image given with `--kernel` does not exist.
    #[error("demo failed: no kernel image: {0}")]
    KernelMissing(Error),
    /// The guest never printed its `ready` line (it panicked, hung, or QEMU failed).
    #[error("demo failed: the guest never became ready: {error}\n{failure}", error = .0.error, failure = .0)]
    NeverReady(RunError),
    /// An echo failed: missing, wrong bytes, or a service that did not answer.
    #[error("demo failed: an echo failed: {error}\n{failure}", error = .0.error, failure = .0)]
    Echo(RunError),
    /// `--nbd`: a client program is missing and cannot be installed here.
    #[error("demo failed: an NBD client is missing: {0}")]
    NbdClientMissing(crate::host::InstallError),
    /// `--nbd`: a client failed, or the bytes it read back did not match.
    #[error("demo failed: the NBD export failed: {error}\n{failure}", error = .0.error, failure = .0)]
    Nbd(RunError),
    /// The guest served every echo but did not shut down cleanly through QMP `quit`.
    #[error("demo failed: the guest did not shut down cleanly: {error}\n{failure}", error = .0.error, failure = .0)]
    Shutdown(RunError),
}

impl DemoError {
    /// A one-line name of the cause (what `Display` says after `demo failed: `).
    pub fn cause(&self) -> &'static str {
        match self {
            DemoError::NoQemu(_) => "no QEMU",
            DemoError::Setup(_) => "the host environment is not usable",
            DemoError::Build(_) => "the kernel build failed",
            DemoError::KernelMissing(_) => "no kernel image",
            DemoError::NeverReady(_) => "the guest never became ready",
            DemoError::Echo(_) => "an echo failed",
            DemoError::NbdClientMissing(_) => "an NBD client is missing",
            DemoError::Nbd(_) => "the NBD export failed",
            DemoError::Shutdown(_) => "the guest did not shut down cleanly",
        }
    }
}

impl fmt::Debug for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the demo measured after `ready`.
#[derive(Clone, Debug)]
pub struct DemoMeasurements {
    /// The warm-up probes sent before the first echo came back.
    pub probes: u64,
    /// The echoes of 1, 64, 1400 and 1472 bytes.
    pub udp: EchoReport,
    /// The TCP echo.
    pub tcp: TcpEchoReport,
    /// The measured round trips (64 bytes each).
    pub round_trips: EchoReport,
    /// The wall-clock time of the round trips.
    pub round_trip_time: Duration,
    /// The stats line right before the round trips.
    pub stats_before: Stats,
    /// The stats line right after them.
    pub stats_after: Stats,
}

impl DemoMeasurements {
    /// How much `key` grew over the round trips.
    pub fn counter_delta(&self, key: &str) -> Option<u64> {
        self.stats_after
            .get(key)?
            .checked_sub(self.stats_before.get(key)?)
    }

    /// `key`'s growth over the round trips per UDP datagram the guest echoed in that window.
    pub fn per_echoed_packet(&self, key: &str) -> Option<f64> {
        let echoed = self.counter_delta("udp_echoed").filter(|&e| e > 0)?;
        Some(self.counter_delta(key)? as f64 / echoed as f64)
    }
}

/// The demo's result: what ran and what it measured. `Display` is the summary the demo prints.
#[derive(Clone, Debug)]
pub struct DemoSummary {
    /// The QEMU command line.
    pub command_line: String,
    /// The kernel booted.
    pub kernel: PathBuf,
    /// When `ready` arrived, from spawning QEMU.
    pub ready_at: Duration,
    /// The `ready` line.
    pub ready_line: String,
    /// The guest's receive mode (from the `ready` line).
    pub mode: String,
    /// The negotiated virtio-net feature bits and their names (from the serial log).
    pub features: Option<(u64, Vec<String>)>,
    /// The other devices' lines of the boot log (`virtio-blk: ...`, `blk-check: ...`).
    pub devices: Vec<String>,
    /// The forwarded ports.
    pub net: UserNet,
    /// The exchanges.
    pub measurements: DemoMeasurements,
    /// How QEMU ended after `quit`.
    pub exit: GuestExit,
    /// How long QEMU took to exit after `quit`.
    pub shutdown: Duration,
    /// What the NBD clients did (`--nbd`).
    pub nbd: Option<NbdDemoReport>,
}

impl DemoSummary {
    /// RTT statistics of the measured round trips.
    pub fn rtt(&self) -> Option<RttSummary> {
        self.measurements.round_trips.summary()
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.measurements;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(f, "==> summary")?;
        writeln!(f, "    kernel:      {}", self.kernel.display())?;
        writeln!(
            f,
            "    ready:       after {:.3} s: {}",
            self.ready_at.as_secs_f64(),
            self.ready_line.trim()
        )?;
        writeln!(f, "    mode:        {}", self.mode)?;
        match &self.features {
            Some((bits, names)) => writeln!(f, "    features:    {} ({bits:#x})", names.join(" "))?,
            None => writeln!(
                f,
                "    features:    (no `negotiated features` line in the log)"
            )?,
        }
        for device in &self.devices {
            writeln!(f, "    device:      {device}")?;
        }
        writeln!(
            f,
            "    forwards:    UDP echo {}, TCP echo {}, stats {}",
            self.net.udp_echo(),
            self.net.tcp_echo(),
            self.net.stats()
        )?;
        writeln!(
            f,
            "    UDP echo:    {} datagrams of 1..1472 bytes, all exact ({} retransmitted)",
            m.udp.received, m.udp.retransmits
        )?;
        writeln!(
            f,
            "    TCP echo:    {} bytes, every byte exact, {:.2} MB/s",
            m.tcp.bytes,
            m.tcp.throughput() / 1e6
        )?;
        match self.rtt() {
            Some(rtt) => writeln!(
                f,
                "    UDP RTT:     n={} min {:.1} us  p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  \
                 max {:.1} us  ({:.0} round trips/s, {} retransmitted)",
                rtt.count,
                us(rtt.min),
                us(rtt.p50),
                us(rtt.p90),
                us(rtt.p99),
                us(rtt.max),
                m.round_trips.received as f64 / m.round_trip_time.as_secs_f64().max(1e-9),
                m.round_trips.retransmits
            )?,
            None => writeln!(f, "    UDP RTT:     (no round trips measured)")?,
        }
        let per = |key: &str| {
            m.per_echoed_packet(key)
                .map(|ratio| format!("{ratio:.2}"))
                .unwrap_or_else(|| "n/a".to_string())
        };
        let delta = |key: &str| {
            m.counter_delta(key)
                .map(|d| format!("+{d}"))
                .unwrap_or_else(|| "n/a".to_string())
        };
        writeln!(
            f,
            "    counters:    over the round trips: udp_echoed {}, kicks {} ({} per packet), \
             interrupts {} ({} per packet)",
            delta("udp_echoed"),
            delta("kicks"),
            per("kicks"),
            delta("interrupts"),
            per("interrupts")
        )?;
        writeln!(f, "    stats:       {}", m.stats_after.line)?;
        if let Some(nbd) = &self.nbd {
            writeln!(
                f,
                "    NBD:         {} ({} bytes, {}): qemu-io wrote and read back {} bytes at \
                 offset {}, nbdcopy read the whole export in {:.2} s ({:.1} MiB/s); every byte \
                 matches, in the export and in the image",
                nbd.uri,
                nbd.size,
                nbd.flags,
                nbd.written,
                NBD_DEMO_OFFSET,
                nbd.copy_time.as_secs_f64(),
                nbd.size as f64 / (1u64 << 20) as f64 / nbd.copy_time.as_secs_f64().max(1e-9)
            )?;
        }
        let exit = match self.exit {
            GuestExit::QemuStatus(code) => format!("status {code}"),
            other => other.to_string(),
        };
        write!(
            f,
            "    shutdown:    QMP quit; QEMU exited with {exit} after {:.3} s",
            self.shutdown.as_secs_f64()
        )
    }
}

/// The `virtio-net: negotiated features 0x...: NAME NAME ...` line of a serial log: the bits and
/// the names.
pub fn negotiated_features(lines: &[SerialLine]) -> Option<(u64, Vec<String>)> {
    // The NIC's line only: other devices log their own `negotiated features` lines.
    const MARKER: &str = "virtio-net: negotiated features ";
    lines.iter().find_map(|line| {
        let rest = &line.text[line.text.find(MARKER)? + MARKER.len()..];
        let (bits, names) = rest.split_once(':').unwrap_or((rest, ""));
        let bits = u64::from_str_radix(bits.trim().trim_start_matches("0x"), 16).ok()?;
        Some((bits, names.split_whitespace().map(str::to_string).collect()))
    })
}

/// Runs the demo: QEMU, kernel, boot on user networking, the exchanges, the summary and a
/// clean shutdown. Progress goes to stdout (steps) and stderr (the harness log and the progress
/// bar); the caller prints the returned summary.
pub fn run_demo(config: &DemoConfig) -> Result<DemoSummary, DemoError> {
    let qemu = Qemu::ensure().map_err(|error| match error {
        Error::InvalidAccel { .. } | Error::InvalidSetting { .. } => DemoError::Setup(error),
        other => DemoError::NoQemu(other),
    })?;
    let accel = choose_accel().map_err(DemoError::Setup)?.accel;
    let kernel = match &config.kernel {
        Some(path) if path.is_file() => {
            log(&format!("demo: using the kernel {}", path.display()));
            path.clone()
        }
        Some(path) => {
            return Err(DemoError::KernelMissing(Error::KernelMissing {
                path: path.clone(),
            }));
        }
        None => crate::build_kernel(config.release).map_err(DemoError::Build)?,
    };
    let qmp_socket = unique_temp_path("vireo-demo-qmp", "sock");
    let mut base = QemuCommand::new(&qemu, accel, &kernel).qmp_socket(&qmp_socket);
    let mut append = Vec::new();
    if let Some(mode) = &config.mode {
        append.push(format!("mode={mode}"));
    }
    if let Some(image) = &config.blk {
        if !image.is_file() {
            return Err(DemoError::Setup(Error::InvalidSetting {
                name: "--blk",
                value: image.display().to_string(),
                expected: "an existing raw disk image file",
            }));
        }
        append.push("blk-check".to_string());
        let bytes = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
        if config.nbd && bytes < NBD_DEMO_MIN_IMAGE_BYTES {
            return Err(DemoError::Setup(Error::InvalidSetting {
                name: "--blk",
                value: format!("{} ({bytes} bytes)", image.display()),
                expected: "with --nbd, an image of at least 4 MiB (the demo writes at 1 MiB and 2 MiB)",
            }));
        }
    }
    // `--nbd` without `--blk`: a fresh image, removed at the end.
    let scratch_image = match (&config.blk, config.nbd) {
        (None, true) => Some(ScratchImage::new(NBD_DEMO_IMAGE_BYTES).map_err(DemoError::Setup)?),
        _ => None,
    };
    let disk = config
        .blk
        .clone()
        .or_else(|| scratch_image.as_ref().map(|image| image.path.clone()));
    if config.nbd {
        // Before booting: a missing client is a clear error, not a half-run demo.
        crate::nbd::ensure_nbd_tools().map_err(DemoError::NbdClientMissing)?;
        append.push("services=echo,stats,nbd".to_string());
    }
    if let Some(image) = &disk {
        base = base
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=blk0",
                image.display()
            ))
            .device("virtio-blk-pci,drive=blk0");
    }
    if config.rng {
        base = base.device("virtio-rng-pci");
    }
    if !append.is_empty() {
        base = base.append(append.join(" "));
    }
    log(&format!(
        "demo: booting the kernel with {DEFAULT_NIC} on QEMU user networking; the guest's UDP \
         echo (7), TCP echo (7) and stats (UDP 7007) ports are forwarded to free ports on \
         127.0.0.1"
    ));
    let booted = boot_on_user_net_forwarding(
        &base,
        DEFAULT_NIC,
        RunOptions {
            timeout: config.timeout,
            echo: config.echo_serial,
        },
        config.timeout,
        config.nbd,
    )
    .map_err(DemoError::NeverReady)?;
    let mut guest = booted.guest;
    let net = booted.net;
    log(&format!(
        "guest ready after {:.3} s: ip {} mac {} mode {}; forwards: UDP echo {}, TCP echo {}, \
         stats {}",
        booted.ready_at.as_secs_f64(),
        booted.ready.ip,
        booted.ready.mac,
        booted.ready.mode,
        net.udp_echo(),
        net.tcp_echo(),
        net.stats()
    ));
    let measurements = demo_exchanges(&net, config.options)
        .map_err(|error| DemoError::Echo(guest.failure(Error::Client(error))))?;
    let nbd = match (config.nbd, net.nbd(), &disk) {
        (true, Some(address), Some(image)) => Some(
            nbd_demo(address, image)
                .map_err(|message| DemoError::Nbd(guest.check_failed(message)))?,
        ),
        _ => None,
    };

    // A clean shutdown: QMP `quit`, then QEMU must exit on its own.
    log("demo: shutting the guest down (QMP quit)");
    let asked = Instant::now();
    let mut qmp = guest
        .qmp(Duration::from_secs(5))
        .map_err(DemoError::Shutdown)?;
    match qmp.execute("quit", None) {
        Ok(_) => {}
        // QEMU may close the socket before its reply arrives; the exit below is what counts.
        Err(QmpError::Closed) => {}
        Err(error) => return Err(DemoError::Shutdown(guest.failure(error))),
    }
    drop(qmp);
    let exit = guest
        .wait_exit(Duration::from_secs(15))
        .map_err(DemoError::Shutdown)?;
    let shutdown = asked.elapsed();
    if exit != GuestExit::QemuStatus(0) {
        return Err(DemoError::Shutdown(guest.check_failed(format!(
            "after QMP quit QEMU should exit with status 0, but it ended with {exit}"
        ))));
    }
    let _ = std::fs::remove_file(&qmp_socket);
    if let (Some(_), Some(image)) = (&nbd, &disk) {
        // What the clients wrote is in the image, seen from the host after QEMU exited.
        let contents = std::fs::read(image).map_err(|error| {
            DemoError::Nbd(guest.check_failed(format!("reading {}: {error}", image.display())))
        })?;
        if let Err(message) = check_nbd_pattern(&contents) {
            return Err(DemoError::Nbd(guest.check_failed(format!(
                "in the image after QEMU exited: {message}"
            ))));
        }
    }
    drop(scratch_image);
    Ok(DemoSummary {
        command_line: guest.command_line().to_string(),
        kernel,
        ready_at: booted.ready_at,
        ready_line: booted.ready.text.clone(),
        mode: booted.ready.mode.clone(),
        features: negotiated_features(&guest.lines()),
        devices: guest
            .lines()
            .into_iter()
            .map(|line| line.text)
            .filter(|text| {
                (text.contains("virtio-blk: ") && !text.contains("negotiated features"))
                    || text.contains("blk-check: ")
                    || text.contains("virtio-rng: ")
                    || text.contains("entropy: ")
                    || text.contains("nbd: ")
            })
            .map(|text| text.split("] ").last().unwrap_or(&text).trim().to_string())
            .collect(),
        net,
        measurements,
        exit,
        shutdown,
        nbd,
    })
}

/// The demo's exchanges with a ready guest on user networking, printed step by step on stdout:
/// the stats line, UDP echo of 1, 64, 1400 and 1472 bytes with RTTs, a TCP echo, many UDP round
/// trips with a progress bar (stderr) and RTT percentiles, and the stats line again with the
/// counter deltas over the round trips. Any echo that is not exact (or missing) is an error.
pub fn demo_exchanges(
    net: &UserNet,
    options: DemoOptions,
) -> Result<DemoMeasurements, ClientError> {
    let DemoOptions {
        round_trips: rtts,
        tcp_bytes,
    } = options;
    let step = |text: String| println!("\n==> {text}");
    step(format!(
        "stats: one datagram to {} (guest UDP 7007)",
        net.stats()
    ));
    let first = query_stats(net.stats(), Duration::from_secs(2), 5)?;
    println!("    {}", first.line);

    step(format!(
        "UDP echo: waiting for the first echo from {} (guest UDP 7), then 8 datagrams of \
         1, 64, 1400 and 1472 bytes, each checked byte for byte",
        net.udp_echo()
    ));
    let mut client = UdpEchoClient::connect(net.udp_echo(), Duration::from_secs(2))?;
    let probes = client.warm_up(Duration::from_secs(15), Duration::from_millis(250))?;
    println!("    first echo after {probes} probe(s)");
    let mut udp = EchoReport::default();
    for size in [1, 64, 1400, 1472, 1, 64, 1400, 1472] {
        let rtt = client.exchange(size, 3, &mut udp)?;
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
        "UDP round trips: {rtts} ping-pongs of 64 bytes to {}, one in flight, between two \
         stats queries",
        net.udp_echo()
    ));
    let stats_before = query_stats(net.stats(), Duration::from_secs(2), 5)?;
    let mut round_trips = EchoReport::default();
    let mut bar = Progress::new("[demo]", "UDP round trips", rtts, "round trips");
    let began = Instant::now();
    for done in 1..=rtts {
        let rtt = client.exchange(64, 3, &mut round_trips)?;
        bar.set_message(format!("last RTT {:.1} us", rtt.as_secs_f64() * 1e6));
        bar.set(done);
    }
    let round_trip_time = began.elapsed();
    bar.finish(&format!(
        "{:.0} round trips/s",
        round_trips.received as f64 / round_trip_time.as_secs_f64().max(1e-9)
    ));
    let stats_after = query_stats(net.stats(), Duration::from_secs(2), 5)?;
    if let Some(summary) = round_trips.summary() {
        println!(
            "    {summary}\n    {:.0} round trips/s; {} retransmitted, {} stale",
            round_trips.received as f64 / round_trip_time.as_secs_f64().max(1e-9),
            round_trips.retransmits,
            round_trips.stale
        );
    }
    println!("    stats before: {}", stats_before.line);
    println!("    stats after:  {}", stats_after.line);
    Ok(DemoMeasurements {
        probes,
        udp,
        tcp,
        round_trips,
        round_trip_time,
        stats_before,
        stats_after,
    })
}

/// The size of the image `--nbd` makes when no `--blk` is given.
pub const NBD_DEMO_IMAGE_BYTES: u64 = 64 << 20;
/// Where `--nbd` writes its patterns: 1 MiB of 0xa5 at 1 MiB, then 3000 bytes of 0x5a at an
/// unaligned offset right after.
pub const NBD_DEMO_OFFSET: u64 = 1 << 20;
const NBD_DEMO_BLOCK: u64 = 1 << 20;
const NBD_DEMO_TAIL: (u64, u64) = ((2 << 20) + 1000, 3000);
/// The smallest `--blk` image `--nbd` takes (its patterns end past 2 MiB).
const NBD_DEMO_MIN_IMAGE_BYTES: u64 = 4 << 20;
/// How long one NBD client program may run in the demo.
const NBD_TOOL_LIMIT: Duration = Duration::from_secs(120);

/// A sparse raw image in the temporary directory, removed on drop.
struct ScratchImage {
    path: PathBuf,
}

impl ScratchImage {
    fn new(bytes: u64) -> Result<ScratchImage, Error> {
        let path = unique_temp_path("vireo-demo-disk", "img");
        let made = std::fs::File::create(&path).and_then(|file| file.set_len(bytes));
        made.map_err(|source| Error::Io {
            context: format!("making the demo's disk image {}", path.display()),
            source,
        })?;
        Ok(ScratchImage { path })
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What `--nbd`'s clients did.
#[derive(Clone, Debug)]
pub struct NbdDemoReport {
    /// The export's URI.
    pub uri: String,
    /// Its size, from nbdinfo.
    pub size: u64,
    /// Its flags, from nbdinfo (`read-write, flush, fua, trim, zero`).
    pub flags: String,
    /// Bytes qemu-io wrote and read back.
    pub written: u64,
    /// How long nbdcopy took to read the whole export.
    pub copy_time: Duration,
}

/// Checks the patterns `--nbd` wrote in `contents` (the whole export or image).
fn check_nbd_pattern(contents: &[u8]) -> Result<(), String> {
    let (tail_offset, tail_length) = NBD_DEMO_TAIL;
    let block = contents
        .get(NBD_DEMO_OFFSET as usize..(NBD_DEMO_OFFSET + NBD_DEMO_BLOCK) as usize)
        .ok_or("too short for the 1 MiB pattern")?;
    if let Some(at) = block.iter().position(|&byte| byte != 0xa5) {
        return Err(format!(
            "byte {} is not 0xa5",
            NBD_DEMO_OFFSET as usize + at
        ));
    }
    let tail = contents
        .get(tail_offset as usize..(tail_offset + tail_length) as usize)
        .ok_or("too short for the unaligned pattern")?;
    if let Some(at) = tail.iter().position(|&byte| byte != 0x5a) {
        return Err(format!("byte {} is not 0x5a", tail_offset as usize + at));
    }
    Ok(())
}

/// `--nbd`'s clients against the export forwarded to `address` (the guest serves `image`),
/// printed step by step: nbdinfo lists it (its size must be the image's), qemu-io writes 1 MiB
/// of 0xa5 at 1 MiB and 3000 bytes of 0x5a at an unaligned offset, reads both back with
/// pattern checks and flushes, and nbdcopy reads the whole export into a file whose bytes at
/// those places must match. Any failure is an error naming what went wrong.
pub fn nbd_demo(
    address: std::net::SocketAddr,
    image: &std::path::Path,
) -> Result<NbdDemoReport, String> {
    use crate::nbd::{nbd_uri, run_tool};
    let step = |text: String| println!("\n==> {text}");
    let uri = nbd_uri(address);
    let image_bytes = std::fs::metadata(image)
        .map_err(|error| format!("reading {}: {error}", image.display()))?
        .len();
    // The disk holds whole 512-byte sectors.
    let size = image_bytes / 512 * 512;
    let (tail_offset, tail_length) = NBD_DEMO_TAIL;
    if size < tail_offset + tail_length {
        return Err(format!(
            "the image is {image_bytes} bytes; --nbd needs at least {} bytes to write its patterns",
            tail_offset + tail_length
        ));
    }

    step(format!(
        "NBD: nbdinfo {uri} (the guest's TCP 10809, export 'vireo')"
    ));
    let info = run_tool(
        Command::new("nbdinfo").args(["--json", &uri]),
        NBD_TOOL_LIMIT,
    )
    .map_err(|error| error.to_string())?;
    let json: serde_json::Value =
        serde_json::from_str(&info.stdout).map_err(|error| format!("nbdinfo --json: {error}"))?;
    let export = &json["exports"][0];
    let reported = export["export-size"].as_u64().unwrap_or(0);
    let flag = |key: &str, name: &'static str| (export[key] == true).then_some(name);
    let flags: Vec<&str> = [
        Some(if export["is_read_only"] == true {
            "read-only"
        } else {
            "read-write"
        }),
        flag("can_flush", "flush"),
        flag("can_fua", "fua"),
        flag("can_trim", "trim"),
        flag("can_zero", "zero"),
    ]
    .into_iter()
    .flatten()
    .collect();
    println!(
        "    export 'vireo': {reported} bytes, {}; block sizes {} / {} / {} (minimum / preferred / maximum)",
        flags.join(", "),
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"]
    );
    if reported != size {
        return Err(format!(
            "nbdinfo says the export has {reported} bytes; the image has {size}"
        ));
    }
    if export["is_read_only"] == true {
        return Err("the export is read-only; the demo needs to write".to_string());
    }

    step(format!(
        "NBD: qemu-io writes 1 MiB of 0xa5 at {NBD_DEMO_OFFSET} and {tail_length} bytes of \
         0x5a at {tail_offset} (unaligned), reads both back with pattern checks, flushes"
    ));
    let commands = [
        format!("write -P 0xa5 {NBD_DEMO_OFFSET} {NBD_DEMO_BLOCK}"),
        format!("write -P 0x5a {tail_offset} {tail_length}"),
        format!("read -P 0xa5 {NBD_DEMO_OFFSET} {NBD_DEMO_BLOCK}"),
        format!("read -P 0x5a {tail_offset} {tail_length}"),
        "flush".to_string(),
    ];
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for command in &commands {
        qemu_io.args(["-c", command]);
    }
    qemu_io.arg(&uri);
    let io = run_tool(&mut qemu_io, NBD_TOOL_LIMIT).map_err(|error| error.to_string())?;
    for line in io.stdout.lines() {
        println!("    {line}");
    }
    if io.stdout.contains("verification failed") {
        return Err(format!("qemu-io read back other bytes:\n{}", io.stdout));
    }

    step(format!(
        "NBD: nbdcopy reads the whole export ({size} bytes) into a file"
    ));
    let copy = ScratchImage::new(0).map_err(|error| error.to_string())?;
    let copy_text = copy.path.display().to_string();
    let read = run_tool(
        Command::new("nbdcopy").args([&uri, &copy_text]),
        NBD_TOOL_LIMIT,
    )
    .map_err(|error| error.to_string())?;
    let contents =
        std::fs::read(&copy.path).map_err(|error| format!("reading the copy: {error}"))?;
    if contents.len() as u64 != size {
        return Err(format!("nbdcopy read {} bytes of {size}", contents.len()));
    }
    check_nbd_pattern(&contents).map_err(|message| format!("nbdcopy's copy: {message}"))?;
    println!(
        "    {size} bytes in {:.2} s; the patterns are there, byte for byte",
        read.elapsed.as_secs_f64()
    );
    Ok(NbdDemoReport {
        uri,
        size,
        flags: flags.join(", "),
        written: NBD_DEMO_BLOCK + tail_length,
        copy_time: read.elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_demo_arguments() {
        let config = DemoConfig::parse(strings(&[
            "--kernel",
            "/tmp/k",
            "--mode",
            "poll",
            "--rtts",
            "300",
            "--tcp-bytes",
            "4096",
            "--timeout",
            "30",
        ]))
        .expect("valid arguments");
        assert_eq!(config.kernel, Some(PathBuf::from("/tmp/k")));
        assert_eq!(config.mode.as_deref(), Some("poll"));
        assert_eq!(config.options.round_trips, 300);
        assert_eq!(config.options.tcp_bytes, 4096);
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert!(config.release);
        assert!(
            !DemoConfig::parse(strings(&["--debug"]))
                .expect("valid")
                .release
        );
        assert!(DemoConfig::parse(strings(&["--mode", "turbo"])).is_err());
        assert!(DemoConfig::parse(strings(&["--rtts"])).is_err());
        assert!(DemoConfig::parse(strings(&["--rtts", "x"])).is_err());
        assert!(DemoConfig::parse(strings(&["--bogus"])).is_err());
        assert!(DemoConfig::parse(strings(&["--debug", "--release"])).is_err());
        let defaults = DemoConfig::parse(strings(&[])).expect("valid");
        assert_eq!(defaults.options.round_trips, 2000);
        assert_eq!(defaults.options.tcp_bytes, 1 << 20);
        assert_eq!(defaults.timeout, Duration::from_secs(120));
        assert!(defaults.release && defaults.mode.is_none());
    }

    #[test]
    fn nbd_flag_parses_and_its_errors_name_the_cause() {
        let config = DemoConfig::parse(strings(&["--nbd"])).expect("valid");
        assert!(config.nbd && config.blk.is_none());
        assert!(!DemoConfig::parse(strings(&[])).expect("valid").nbd);
        let missing = DemoError::NbdClientMissing(crate::host::InstallError::NotRoot {
            packages: "libnbd-bin qemu-utils".to_string(),
            command: crate::host::apt_command(&["libnbd-bin", "qemu-utils"], true),
        });
        assert_eq!(missing.cause(), "an NBD client is missing");
        let text = missing.to_string();
        assert!(
            text.starts_with("demo failed: an NBD client is missing: "),
            "{text}"
        );
        assert!(
            text.contains("sudo apt-get update && sudo apt-get install -y libnbd-bin qemu-utils"),
            "{text}"
        );
    }

    #[test]
    fn the_nbd_patterns_are_checked_byte_for_byte() {
        let (tail_offset, tail_length) = NBD_DEMO_TAIL;
        let mut contents = vec![0u8; 4 << 20];
        contents[NBD_DEMO_OFFSET as usize..(NBD_DEMO_OFFSET + NBD_DEMO_BLOCK) as usize].fill(0xa5);
        contents[tail_offset as usize..(tail_offset + tail_length) as usize].fill(0x5a);
        assert_eq!(check_nbd_pattern(&contents), Ok(()));
        contents[tail_offset as usize + 2999] = 0;
        assert_eq!(
            check_nbd_pattern(&contents),
            Err(format!("byte {} is not 0x5a", tail_offset + 2999))
        );
        assert!(check_nbd_pattern(&contents[..1 << 20]).is_err());
    }

    #[test]
    fn finds_the_negotiated_features_line() {
        let line = |text: &str| SerialLine {
            text: text.to_string(),
            at: Duration::ZERO,
        };
        let log = [
            line("[   0.07] virtio-net: offered features 0x0000010130bf8024: MAC CTRL_VQ"),
            line(
                "[   0.07] virtio-net: negotiated features 0x0000000130038020: MAC MRG_RXBUF \
                 EVENT_IDX VERSION_1",
            ),
        ];
        let (bits, names) = negotiated_features(&log).expect("found");
        assert_eq!(bits, 0x1_3003_8020);
        assert_eq!(names, ["MAC", "MRG_RXBUF", "EVENT_IDX", "VERSION_1"]);
        assert!(negotiated_features(&log[..1]).is_none());
    }
}
