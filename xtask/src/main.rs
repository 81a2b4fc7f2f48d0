//! `cargo xtask`: Vireo's host command line (`run`, `test`, `demo`, `client`, `netns`, `bench`,
//! `soak`). clap parses the arguments and generates `--help` for every command; each command is
//! a function here that returns the process exit status or an `anyhow` error, which `main`
//! prints as `error: ...` and turns into status 1. Everything else lives in the library.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use xtask::bench::{self, BenchArgs};
use xtask::client::{EchoReport, resolve};
use xtask::soak::SoakOptions;
use xtask::{
    ClientError, DEFAULT_NIC, DemoArgs, DemoConfig, Error, Guest, GuestMode, IcmpEchoOptions,
    Machine, NetNs, Qemu, QemuCommand, RunError, RunOptions, UdpEchoOptions, UserNet, build_kernel,
    cargo, choose_accel, icmp_echo, is_ci, log, parse_memory_mib, query_stats, run_in_netns,
    shell_quote, tcp_echo, tcp_echo_concurrent, udp_echo, workspace_root,
};

const ENVIRONMENT: &str = "\
Environment:
  VIREO_QEMU   QEMU binary to use (default: qemu-system-x86_64 on PATH)
  VIREO_ACCEL  kvm or tcg (default: kvm only with a usable /dev/kvm and vmx/svm)
  CI=true      nothing may be skipped; `test` runs with --no-fail-fast";

/// Vireo's host tooling: build, boot, test, demo, benchmark and soak the unikernel under QEMU.
/// Every command prints what it runs, including the full QEMU command line.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", after_help = ENVIRONMENT)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel and boot it with the serial console on this terminal
    ///
    /// Runs until the guest exits and exits with QEMU's status (33 = guest success, 35 = guest
    /// failure). `--net user` adds a virtio-net NIC with the guest's UDP/TCP echo and stats ports
    /// forwarded to free ports on 127.0.0.1 and prints them; `--net tap` (root) runs QEMU in a
    /// private network namespace on a tap (host side 10.0.2.2/24).
    Run(RunArgs),
    /// Run the whole workspace's tests (cargo nextest, else cargo test)
    ///
    /// Makes sure QEMU is there first (installing it when root). ARGS go to the runner; with
    /// CI=true it adds --no-fail-fast. The output ends with the runner's own summary and the
    /// exit status is the runner's.
    Test(TestArgs),
    /// The main job: the echo demo on QEMU user networking (no root)
    ///
    /// Builds the release kernel (or boots --kernel), boots it with a virtio-net NIC, waits for
    /// `ready`, then shows UDP echo with RTTs, a TCP echo of 1 MiB, N UDP round trips with a
    /// progress bar and a summary (features, mode, RTT percentiles, kicks and interrupts per
    /// packet); QMP `quit` shuts the guest down. Exits 0 only if every echo was exact.
    Demo(DemoArgs),
    /// Run one host client against a guest's services
    ///
    /// Every echo is checked byte for byte and its round-trip time printed.
    Client(ClientArgs),
    /// Check, list or sweep the root-networking fixture (namespaces with a tap)
    Netns {
        #[command(subcommand)]
        action: Option<NetnsAction>,
    },
    /// The latency and TCP throughput benchmark (root)
    ///
    /// Over a tap in a private namespace: Vireo in each mode, a Linux guest peer and the floors
    /// (loopback, userspace tap reflector). Writes bench.md, bench.json, bench-cdf.svg (echo),
    /// bench-nbd.svg (NBD) and bench-tcp.svg (TCP) to --out (default bench-results/).
    Bench(Box<BenchArgs>),
    /// A long mixed-traffic run against the release kernel on a tap (root)
    ///
    /// UDP, ICMP and TCP echo at a steady rate for N minutes: per-interval loss, RTT
    /// percentiles and heap_used/heap_peak, then a verdict; writes a Markdown summary. Exits 0
    /// only when clean.
    Soak(SoakArgs),
}

/// How `run` connects the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Net {
    /// No NIC.
    None,
    /// A virtio-net NIC on QEMU user networking, the guest's ports forwarded to 127.0.0.1.
    User,
    /// (root) A virtio-net NIC on a tap in a private namespace (host side 10.0.2.2/24).
    Tap,
}

#[derive(Args)]
struct RunArgs {
    /// Build and boot the release kernel (default: the debug one).
    #[arg(long)]
    release: bool,
    /// The machine model.
    #[arg(long, short = 'M', value_name = "q35|pc", default_value = "q35")]
    machine: Machine,
    /// Guest RAM: `64`, `512M`, `4G`.
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "128", value_parser = parse_memory_mib)]
    memory: u64,
    /// vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    smp: u32,
    /// The `-cpu` model (QEMU's default when left out).
    #[arg(long, value_name = "MODEL")]
    cpu: Option<String>,
    /// The kernel command line (`-append`).
    #[arg(long, value_name = "CMDLINE")]
    append: Option<String>,
    /// How the guest is connected.
    #[arg(long, value_enum, default_value_t = Net::None)]
    net: Net,
    /// Kill QEMU after this many seconds (default: run until the guest exits or Ctrl-C).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Extra QEMU arguments, after `--`.
    #[arg(last = true, value_name = "EXTRA QEMU ARGS")]
    extra: Vec<OsString>,
}

#[derive(Args)]
struct TestArgs {
    /// Arguments for the test runner (`cargo nextest run --workspace` or `cargo test
    /// --workspace`), e.g. `-p vireo --test demo`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

#[derive(Args)]
struct ClientArgs {
    /// Run the client inside this network namespace (an `ip netns` name; root).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    kind: ClientKind,
}

#[derive(Subcommand)]
enum ClientKind {
    /// UDP ping-pong, one datagram in flight.
    UdpEcho {
        /// The echo service, e.g. `127.0.0.1:PORT` or `10.0.2.15:7`.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// Datagrams to exchange.
        #[arg(long, value_name = "N", default_value_t = 10)]
        count: u64,
        /// Payload bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 64)]
        size: usize,
        /// Wait for each echo, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout: u64,
        /// Sends of one datagram before giving up.
        #[arg(long, value_name = "N", default_value_t = 1)]
        attempts: u32,
    },
    /// TCP echo; with several connections, all connect first and then transfer concurrently.
    TcpEcho {
        /// The echo service, e.g. `127.0.0.1:PORT` or `10.0.2.15:7`.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// Bytes per connection.
        #[arg(long, value_name = "N", default_value_t = 1 << 20)]
        bytes: usize,
        /// Connections held open at once.
        #[arg(long, value_name = "N", default_value_t = 1)]
        connections: usize,
        /// Limit for the whole echo, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Ping through a raw socket (root).
    IcmpEcho {
        /// The guest's IPv4 address.
        #[arg(long, value_name = "IP")]
        addr: Ipv4Addr,
        /// Requests to exchange.
        #[arg(long, value_name = "N", default_value_t = 10)]
        count: u64,
        /// Payload bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 64)]
        size: usize,
        /// Wait for each reply, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout: u64,
        /// Sends of one request before giving up.
        #[arg(long, value_name = "N", default_value_t = 1)]
        attempts: u32,
    },
    /// Print the guest's stats line.
    Stats {
        /// The stats service, e.g. `127.0.0.1:PORT` or `10.0.2.15:7007`.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// Wait for the answer, in milliseconds (3 attempts).
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum NetnsAction {
    /// (root, the default) Create a namespace with a tap, ping the host side from inside, run
    /// UDP and ICMP echo over the tap against a userspace reflector, remove it.
    Check,
    /// The vireo-* namespaces and whether their creator still runs.
    List,
    /// Remove the vireo-* namespaces whose creator is gone.
    Sweep,
}

#[derive(Args)]
struct SoakArgs {
    /// Length of the run in minutes.
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    minutes: f64,
    /// UDP echoes per second (64 to 1472 bytes).
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().udp_rate)]
    udp_rate: u32,
    /// ICMP echoes per second (56 bytes).
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().icmp_rate)]
    icmp_rate: u32,
    /// TCP echo connections per second.
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().tcp_rate)]
    tcp_rate: u32,
    /// Bytes echoed per TCP connection.
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().tcp_bytes)]
    tcp_bytes: usize,
    /// The guest's receive mode.
    #[arg(long, value_enum, default_value_t = GuestMode::Adaptive)]
    mode: GuestMode,
    /// Seconds per reported interval.
    #[arg(long, value_name = "SECS", default_value_t = SoakOptions::default().interval.as_secs())]
    interval: u64,
    /// Where the Markdown summary goes (default: target/soak/soak-<time>.md).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Set for the test runner that `cargo xtask test` starts, to refuse a recursive start.
const INSIDE_TEST_ENV: &str = "VIREO_XTASK_INSIDE_TEST";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Test(args) => test(args.args),
        Cmd::Demo(args) => demo(&args),
        Cmd::Client(args) => client(args),
        Cmd::Netns { action } => netns(action.unwrap_or(NetnsAction::Check)),
        Cmd::Bench(args) => bench(&args),
        Cmd::Soak(args) => soak(args),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(error) => {
            // The messages already carry their causes, so the top one is printed alone.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn prepare_qemu() -> Result<(Qemu, xtask::Accel)> {
    let qemu = Qemu::ensure()?;
    let accel = choose_accel()?.accel;
    Ok((qemu, accel))
}

/// `cargo xtask run`: build, boot with the serial console on the terminal, return QEMU's status.
fn run(args: RunArgs) -> Result<i32> {
    let (qemu, accel) = prepare_qemu()?;
    let kernel = build_kernel(args.release)?;
    let mut command = QemuCommand::new(&qemu, accel, kernel)
        .machine(args.machine)
        .memory_mib(args.memory)
        .smp(args.smp)
        .args(args.extra);
    if let Some(cpu) = args.cpu {
        command = command.cpu(cpu);
    }
    if let Some(append) = args.append {
        command = command.append(append);
    }
    // Declared before the guest so that it is dropped (and removed) after QEMU is gone.
    let mut _namespace = None;
    match args.net {
        Net::None => {}
        Net::User => {
            let forwards = UserNet::allocate()?;
            command = command.netdev(forwards.netdev("n0")).device(DEFAULT_NIC);
            log(&format!(
                "user networking: the guest's ports are forwarded to 127.0.0.1; once it prints \
                 `ready`:\n    UDP echo (guest UDP 7):     {udp}   try: nc -u 127.0.0.1 {}\n    \
                 TCP echo (guest TCP 7):     {tcp}   try: nc 127.0.0.1 {}\n    \
                 stats    (guest UDP 7007):  {stats}   try: echo | nc -u -w1 127.0.0.1 {}",
                forwards.udp_echo_port,
                forwards.tcp_echo_port,
                forwards.stats_port,
                udp = forwards.udp_echo(),
                tcp = forwards.tcp_echo(),
                stats = forwards.stats(),
            ));
        }
        Net::Tap => {
            let namespace = NetNs::create("run")?;
            command = command
                .in_netns(namespace.name())
                .netdev(NetNs::tap_netdev("n0", "tap0", None))
                .device(DEFAULT_NIC);
            log(&format!(
                "tap networking in namespace {0}: host side 10.0.2.2/24 on tap0; try \
                 `cargo xtask client udp-echo --netns {0} --addr 10.0.2.15:7`",
                namespace.name()
            ));
            _namespace = Some(namespace);
        }
    }
    // Without --timeout the run is interactive: it lasts until the guest exits or Ctrl-C.
    let limit = Duration::from_secs(args.timeout.unwrap_or(7 * 24 * 3600));
    log(&format!("running: {}", command.command_line()));
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: limit,
            echo: true,
        },
    )
    .map_err(|failure| anyhow!(brief(&failure)))?;
    let exit = guest
        .wait_exit(limit)
        .map_err(|failure| anyhow!(brief(&failure)))?;
    log(&format!(
        "QEMU exited ({exit}) after {:.3} s",
        guest.elapsed().as_secs_f64()
    ));
    Ok(exit.exit_code())
}

/// The error and command line of a failed run, without the serial log (which `run` already
/// showed live).
fn brief(failure: &RunError) -> String {
    let mut text = format!(
        "{}\ncommand (copy-paste to reproduce):\n    {}",
        failure.error, failure.command_line
    );
    if let Some(exit) = failure.exit {
        text.push_str(&format!("\nQEMU ended: {exit}"));
    }
    if !failure.qemu_stderr.trim().is_empty() {
        text.push_str(&format!(
            "\nQEMU stderr:\n{}",
            failure.qemu_stderr.trim_end()
        ));
    }
    text
}

/// `cargo xtask test`: make sure QEMU is there, then hand over to the test runner. Nothing is
/// printed after the runner, so the output ends with its own summary.
fn test(passthrough: Vec<OsString>) -> Result<i32> {
    // Both log what they found (QEMU path and version; accelerator and why).
    Qemu::ensure()?;
    choose_accel()?;
    // The tap tests drive `ip` (iproute2); a minimal Debian may lack it. As root, install it.
    // Not as root (or without apt-get) the tap tests say so themselves (and fail under CI=true).
    // The NBD tests' real clients (libnbd-bin, qemu-utils) too, once, here: the tests would
    // install them themselves, but in parallel processes apt-get would race for its lock.
    if xtask::is_root() {
        let mut wanted = vec![("ip", "iproute2")];
        wanted.extend(xtask::nbd::NBD_TOOLS);
        match xtask::ensure_packages(&wanted) {
            Ok(()) | Err(xtask::InstallError::NoAptGet { .. }) => {}
            Err(error) => return Err(Error::from(error).into()),
        }
    }
    // Checked after the environment so that the harness's own tests can run `xtask test` to see
    // its QEMU and VIREO_ACCEL errors, but can never start the suite again from inside it.
    if std::env::var_os(INSIDE_TEST_ENV).is_some() {
        bail!(
            "`cargo xtask test` is already running ({INSIDE_TEST_ENV} is set); not starting it again"
        );
    }
    let nextest = Command::new(cargo())
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    let mut runner_args: Vec<OsString> = if nextest {
        vec!["nextest".into(), "run".into(), "--workspace".into()]
    } else {
        vec!["test".into(), "--workspace".into()]
    };
    let chose_fail_fast = passthrough
        .iter()
        .any(|arg| arg == "--fail-fast" || arg == "--no-fail-fast");
    if is_ci() && !chose_fail_fast {
        // In CI every test must run and be counted, not just those before the first failure.
        runner_args.push("--no-fail-fast".into());
    }
    runner_args.extend(passthrough);
    let shown: Vec<String> = runner_args
        .iter()
        .map(|arg| shell_quote(arg.as_os_str()))
        .collect();
    log(&format!(
        "test runner: {} (cargo {}){}",
        if nextest {
            "cargo-nextest"
        } else {
            "cargo test (cargo-nextest is not installed)"
        },
        shown.join(" "),
        if is_ci() {
            "; CI=true: nothing is skipped"
        } else {
            ""
        }
    ));
    let status = Command::new(cargo())
        .current_dir(workspace_root())
        .env(INSIDE_TEST_ENV, "1")
        .args(&runner_args)
        .status()
        .map_err(|source| Error::Spawn {
            program: "cargo".to_string(),
            source,
        })?;
    Ok(status.code().unwrap_or(1))
}

/// `cargo xtask demo`: the library's [`xtask::run_demo`] (the test suite runs the same code),
/// then its summary. Exits 0 only when every echo came back exact and the guest shut down
/// cleanly; otherwise the error names the cause.
fn demo(args: &DemoArgs) -> Result<i32> {
    let summary = xtask::run_demo(&DemoConfig::from(args))?;
    println!("\n{summary}");
    if args.nbd {
        log(
            "demo: every echo came back exact; the NBD clients read back every byte they wrote; the guest shut down cleanly",
        );
    } else {
        log("demo: every echo came back exact; the guest shut down cleanly");
    }
    Ok(0)
}

/// `cargo xtask client ...`: the host clients on the command line.
fn client(args: ClientArgs) -> Result<i32> {
    let name = match &args.kind {
        ClientKind::UdpEcho { .. } => "udp-echo",
        ClientKind::TcpEcho { .. } => "tcp-echo",
        ClientKind::IcmpEcho { .. } => "icmp-echo",
        ClientKind::Stats { .. } => "stats",
    };
    let kind = args.kind;
    let work = move || -> Result<(), ClientError> {
        match kind {
            ClientKind::UdpEcho {
                addr,
                count,
                size,
                timeout,
                attempts,
            } => {
                let target = resolve(&addr)?;
                let timeout = Duration::from_millis(timeout);
                println!("UDP echo: {count} x {size} bytes to {target}, timeout {timeout:?}");
                let report = udp_echo(
                    target,
                    UdpEchoOptions {
                        count,
                        size,
                        timeout,
                        attempts,
                    },
                )?;
                print_echo_report(&report);
            }
            ClientKind::TcpEcho {
                addr,
                bytes,
                connections,
                timeout,
            } => {
                let target = resolve(&addr)?;
                let timeout = Duration::from_secs(timeout);
                println!(
                    "TCP echo: {connections} connection(s) x {bytes} bytes to {target}, \
                     timeout {timeout:?}"
                );
                let reports = if connections == 1 {
                    vec![tcp_echo(target, bytes, timeout)?]
                } else {
                    tcp_echo_concurrent(target, connections, bytes, timeout)?
                };
                let total: u64 = reports.iter().map(|r| r.bytes).sum();
                let slowest = reports.iter().map(|r| r.transfer).max().unwrap_or_default();
                println!(
                    "{total} bytes echoed exactly over {} connection(s); slowest transfer {:.1} ms",
                    reports.len(),
                    slowest.as_secs_f64() * 1e3
                );
            }
            ClientKind::IcmpEcho {
                addr,
                count,
                size,
                timeout,
                attempts,
            } => {
                let timeout = Duration::from_millis(timeout);
                println!("ICMP echo: {count} x {size} bytes to {addr}, timeout {timeout:?}");
                let report = icmp_echo(
                    addr,
                    IcmpEchoOptions {
                        count,
                        size,
                        timeout,
                        attempts,
                    },
                )?;
                print_echo_report(&report);
            }
            ClientKind::Stats { addr, timeout } => {
                let target: SocketAddr = resolve(&addr)?;
                let stats = query_stats(target, Duration::from_millis(timeout), 3)?;
                println!("{}", stats.line);
            }
        }
        Ok(())
    };
    match &args.netns {
        Some(namespace) => {
            log(&format!(
                "running the {name} client inside network namespace {namespace}"
            ));
            run_in_netns(namespace, work)??;
        }
        None => work()?,
    }
    Ok(0)
}

fn print_echo_report(report: &EchoReport) {
    for (index, rtt) in report.rtts.iter().enumerate().take(20) {
        println!(
            "  #{index}: exact echo, RTT {:.1} us",
            rtt.as_secs_f64() * 1e6
        );
    }
    if report.rtts.len() > 20 {
        println!("  ... {} more", report.rtts.len() - 20);
    }
    if let Some(summary) = report.summary() {
        println!("{summary}");
    }
    println!(
        "sent {} received {} (exact) retransmits {} stale {}",
        report.sent, report.received, report.retransmits, report.stale
    );
}

/// `cargo xtask netns check|list|sweep`.
fn netns(action: NetnsAction) -> Result<i32> {
    match action {
        NetnsAction::Check => {
            let report = xtask::netns_self_test()?;
            println!(
                "netns check passed ({} checks, namespace {} created and removed)",
                report.checks.len(),
                report.namespace
            );
        }
        NetnsAction::List => {
            for name in xtask::list_namespaces() {
                let owner = xtask::namespace_owner(&name)
                    .map(|pid| {
                        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                        format!("pid {pid} ({})", if alive { "running" } else { "gone" })
                    })
                    .unwrap_or_else(|| "not named by this harness".to_string());
                println!("{name}\t{owner}");
            }
        }
        NetnsAction::Sweep => {
            let removed = xtask::sweep_stale_namespaces();
            println!("removed {} stale namespace(s): {removed:?}", removed.len());
        }
    }
    Ok(0)
}

/// The plots a run wrote (the CDF with the echo section, the bars with the NBD section), each
/// after ", ".
fn plots(outputs: &bench::Outputs) -> String {
    [&outputs.svg, &outputs.nbd_svg, &outputs.tcp_svg]
        .into_iter()
        .filter(|path| path.is_file())
        .map(|path| format!(", {}", path.display()))
        .collect()
}

/// `cargo xtask bench`: the latency benchmark ([`xtask::bench`]). Exits 0 when every system
/// asked for was measured or declared unmeasurable with a reason, 1 when a measurement failed,
/// 130 when interrupted.
fn bench(args: &BenchArgs) -> Result<i32> {
    if let Some(json) = &args.render {
        let outputs = bench::render(json)?;
        println!("rendered {}{}", outputs.markdown.display(), plots(&outputs));
        return Ok(0);
    }
    let options = args.options().map_err(|message| anyhow!(message))?;
    let (report, outputs, failures) = match bench::run(&options) {
        Ok(done) => done,
        Err(error) if bench::cancelled() => {
            eprintln!("error: {error}");
            return Ok(130);
        }
        Err(error) => return Err(error.into()),
    };
    println!("{}", bench::report::markdown(&report));
    println!(
        "results: {}, {}{}",
        outputs.markdown.display(),
        outputs.json.display(),
        plots(&outputs)
    );
    if failures.is_empty() {
        return Ok(0);
    }
    eprintln!("error: some measurements failed:");
    for failure in failures {
        eprintln!("  - {failure}");
    }
    Ok(1)
}

/// `cargo xtask soak`: a long mixed-traffic run against the release kernel on a tap (root).
fn soak(args: SoakArgs) -> Result<i32> {
    let minutes = args.minutes;
    if minutes.is_nan() || minutes <= 0.0 {
        bail!("soak: --minutes must be positive");
    }
    let mut options = SoakOptions {
        udp_rate: args.udp_rate,
        icmp_rate: args.icmp_rate,
        tcp_rate: args.tcp_rate,
        tcp_bytes: args.tcp_bytes,
        mode: args.mode.as_str().to_string(),
        interval: Duration::from_secs(args.interval.max(1)),
        ..SoakOptions::default()
    };
    options.duration = Duration::try_from_secs_f64(minutes * 60.0)
        .with_context(|| format!("soak: --minutes {minutes}"))?;
    xtask::root_networking_available().map_err(|reason| anyhow!(reason))?;
    prepare_qemu()?;
    let kernel = build_kernel(true)?;
    log(&format!(
        "soak: {minutes} min of UDP {}/s, ICMP {}/s and TCP {} connections/s ({} bytes each) \
         against the release kernel (mode={}) on a tap in a private namespace",
        options.udp_rate, options.icmp_rate, options.tcp_rate, options.tcp_bytes, options.mode
    ));
    let report = xtask::soak::soak(&kernel, &options)?;
    let summary = report.markdown(&options);
    println!("\n{summary}");
    let out = args.out.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        xtask::target_dir()
            .join("soak")
            .join(format!("soak-{secs}.md"))
    });
    if let Some(parent) = out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let text = format!("{summary}\nQEMU: `{}`\n", report.command_line);
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    log(&format!("soak summary written to {}", out.display()));
    Ok(if report.clean() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(words: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(words.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_every_trailing_argument_on() {
        let Ok(Cli {
            command: Cmd::Test(args),
        }) = parse(&["test", "-p", "vireo", "--test", "demo", "--no-capture"])
        else {
            panic!("`test ARGS` must parse");
        };
        assert_eq!(args.args, ["-p", "vireo", "--test", "demo", "--no-capture"]);
        for (words, passed) in [
            (&["test", "--", "--help"][..], &["--help"][..]),
            (
                &["test", "--no-fail-fast", "-E", "test(x)"],
                &["--no-fail-fast", "-E", "test(x)"],
            ),
            (&["test"], &[]),
        ] {
            match parse(words) {
                Ok(Cli {
                    command: Cmd::Test(args),
                }) => assert_eq!(args.args, passed, "{words:?}"),
                _ => panic!("{words:?} must parse"),
            }
        }
    }

    #[test]
    fn run_takes_its_flags_and_extra_qemu_arguments() {
        let Ok(Cli {
            command: Cmd::Run(args),
        }) = parse(&[
            "run", "-M", "pc", "--memory", "4G", "--smp", "4", "--net", "user", "--append",
            "selftest", "--", "-d", "int",
        ])
        else {
            panic!("`run` must parse");
        };
        assert_eq!(args.machine, Machine::Pc);
        assert_eq!((args.memory, args.smp, args.net), (4096, 4, Net::User));
        assert_eq!(args.append.as_deref(), Some("selftest"));
        assert_eq!(args.extra, ["-d", "int"]);
        assert!(parse(&["run", "--machine", "virt"]).is_err());
        assert!(parse(&["run", "--net", "bridge"]).is_err());
    }

    #[test]
    fn clients_netns_and_soak_parse() {
        assert!(matches!(
            parse(&[
                "client",
                "udp-echo",
                "--addr",
                "127.0.0.1:7",
                "--netns",
                "vireo-x-1-0"
            ]),
            Ok(Cli {
                command: Cmd::Client(ClientArgs {
                    netns: Some(_),
                    kind: ClientKind::UdpEcho { count: 10, .. }
                })
            })
        ));
        assert!(parse(&["client", "icmp-echo", "--addr", "not-an-ip"]).is_err());
        assert!(parse(&["client", "stats"]).is_err(), "--addr is required");
        assert!(matches!(
            parse(&["netns"]),
            Ok(Cli {
                command: Cmd::Netns { action: None }
            })
        ));
        assert!(matches!(
            parse(&["soak", "--minutes", "0.5", "--mode", "poll"]),
            Ok(Cli {
                command: Cmd::Soak(SoakArgs {
                    mode: GuestMode::Poll,
                    ..
                })
            })
        ));
    }

    #[test]
    fn wrong_flags_get_clap_errors() {
        let error = parse(&["demo", "--bogus"]).err().expect("an error");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument);
        let error = parse(&["demo", "--rtts", "many"]).err().expect("an error");
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
        let error = parse(&["bogus"]).err().expect("an error");
        assert_eq!(error.kind(), ErrorKind::InvalidSubcommand);
        let help = parse(&["bench", "--help"]).err().expect("help");
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("--host-idle-poll"));
    }
}
