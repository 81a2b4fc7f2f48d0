//! `cargo xtask`: Vireo's host command line (`run`, `test`, `demo`). Arguments are parsed by
//! hand to keep the tool free of dependencies; every command prints what it runs.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::Duration;

use xtask::client::{EchoReport, resolve};
use xtask::{
    ClientError, DEFAULT_NIC, DemoConfig, Error, Guest, IcmpEchoOptions, Machine, NetNs, Qemu,
    QemuCommand, RunError, RunOptions, UdpEchoOptions, UserNet, build_kernel, cargo, choose_accel,
    icmp_echo, is_ci, log, parse_memory_mib, query_stats, run_in_netns, shell_quote, tcp_echo,
    tcp_echo_concurrent, udp_echo, workspace_root,
};

const USAGE: &str = "\
Usage: cargo xtask <command> [options]

Commands:
  run   [--release] [--machine q35|pc] [--memory SIZE] [--smp N] [--cpu MODEL]
        [--append \"CMDLINE\"] [--net none|user|tap] [--timeout SECS]
        [-- EXTRA QEMU ARGS...]
        Build the kernel and boot it with the serial console on this terminal until it
        exits; exits with QEMU's status (33 = guest success, 35 = guest failure).
        --net user adds a virtio-net NIC with the guest's UDP/TCP echo and stats ports
        forwarded to free ports on 127.0.0.1 and prints them (try `nc -u 127.0.0.1 PORT`);
        --net tap (root) runs QEMU in a private network namespace on a tap (host side
        10.0.2.2/24).
  test  [ARGS...]
        Make sure QEMU is there (installs it when root), then run the whole workspace's
        tests: cargo nextest run --workspace (or cargo test --workspace without
        cargo-nextest). ARGS go to that runner.
  demo  [--debug] [--kernel PATH] [--mode irq|poll|adaptive] [--timeout SECS]
        [--rtts N] [--tcp-bytes N]
        Build the release kernel (or boot PATH) with a virtio-net NIC on QEMU user
        networking (no root), wait for `ready`, then show UDP echo with RTTs, a TCP echo
        of 1 MiB, N UDP round trips (default 2000) with a progress bar, and a summary
        (features, mode, RTT percentiles, kicks and interrupts per packet); QMP `quit`
        shuts the guest down. Exits 0 only if every echo was exact.
  client udp-echo --addr HOST:PORT [--count N] [--size BYTES] [--timeout MS]
                  [--attempts N] [--netns NAME]
  client tcp-echo --addr HOST:PORT [--bytes N] [--connections N] [--timeout SECS]
                  [--netns NAME]
  client icmp-echo --addr IP [--count N] [--size BYTES] [--timeout MS] [--netns NAME]
                   (raw socket: root)
  client stats --addr HOST:PORT [--timeout MS] [--netns NAME]
        Talk to a guest's services; every echo is checked byte for byte. --netns runs the
        client inside that network namespace (`ip netns` name; root).
  netns check | list | sweep
        check: create a namespace with a tap, ping the host side from inside, run UDP and
        ICMP echo over the tap against a userspace reflector, remove it (root).
        list: the vireo-* namespaces; sweep: remove those whose creator is gone.
  bench [--quick] [OPTIONS]   (root)
        Latency benchmark over a tap in a private namespace: Vireo in each mode, a Linux
        guest peer and the floors (loopback, tap reflector). Writes bench.md, bench.json
        and bench-cdf.svg to bench-results/. `cargo xtask bench --help` lists the options.
  soak  [--minutes N] [--udp-rate N] [--icmp-rate N] [--tcp-rate N] [--tcp-bytes N]
        [--mode irq|poll|adaptive] [--interval SECS] [--out FILE]
        (root) Boot the release kernel on a tap in a private namespace and run mixed
        UDP, ICMP and TCP echo at a steady rate for N minutes (default 10): per-interval
        loss, RTT percentiles and heap_used/heap_peak, then a verdict; writes a Markdown
        summary (default target/soak/soak-<time>.md); exits 0 only when clean.

Environment:
  VIREO_QEMU   QEMU binary to use (default: qemu-system-x86_64 on PATH)
  VIREO_ACCEL  kvm or tcg (default: kvm only with a usable /dev/kvm and vmx/svm)
  CI=true      nothing may be skipped; `test` runs with --no-fail-fast
";

/// Set for the test runner that `cargo xtask test` starts, to refuse a recursive start.
const INSIDE_TEST_ENV: &str = "VIREO_XTASK_INSIDE_TEST";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let command = args.remove(0);
    let result = match command.to_str() {
        Some("run") => run(args),
        Some("test") => test(args),
        Some("demo") => demo(args),
        Some("client") => client(args),
        Some("netns") => netns(args),
        Some("bench") => bench(args),
        Some("soak") => soak(args),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(0)
        }
        _ => Err(CliError::Usage(format!(
            "unknown command {:?}",
            command.to_string_lossy()
        ))),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(CliError::Usage(message)) => {
            eprintln!("error: {message}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

enum CliError {
    Usage(String),
    Failed(String),
}

impl From<Error> for CliError {
    fn from(error: Error) -> CliError {
        CliError::Failed(error.to_string())
    }
}

/// A small argument cursor: flags, flags with a value, and `--` for pass-through arguments.
struct Args {
    items: std::vec::IntoIter<OsString>,
}

impl Args {
    fn new(items: Vec<OsString>) -> Args {
        Args {
            items: items.into_iter(),
        }
    }

    fn next_flag(&mut self) -> Option<Result<String, CliError>> {
        let item = self.items.next()?;
        Some(
            item.into_string()
                .map_err(|bad| CliError::Usage(format!("argument {bad:?} is not UTF-8"))),
        )
    }

    fn value(&mut self, flag: &str) -> Result<String, CliError> {
        self.items
            .next()
            .and_then(|value| value.into_string().ok())
            .ok_or_else(|| CliError::Usage(format!("{flag} needs a (UTF-8) value")))
    }

    fn rest(&mut self) -> Vec<OsString> {
        self.items.by_ref().collect()
    }
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, CliError> {
    value
        .parse()
        .map_err(|_| CliError::Usage(format!("{flag}: {value:?} is not a valid number")))
}

fn prepare_qemu() -> Result<(Qemu, xtask::Accel), CliError> {
    let qemu = Qemu::ensure()?;
    let accel = choose_accel()?.accel;
    Ok((qemu, accel))
}

/// `cargo xtask run`: build, boot with the serial console on the terminal, return QEMU's status.
fn run(args: Vec<OsString>) -> Result<i32, CliError> {
    let mut args = Args::new(args);
    let mut release = false;
    let mut machine = Machine::default();
    let mut memory_mib = 128;
    let mut smp = 1;
    let mut cpu = None;
    let mut append = None;
    let mut timeout = None;
    let mut extra = Vec::new();
    let mut net = "none".to_string();
    while let Some(flag) = args.next_flag() {
        let flag = flag?;
        match flag.as_str() {
            "--release" => release = true,
            "--net" => net = args.value(&flag)?,
            "--machine" | "-M" => machine = args.value(&flag)?.parse()?,
            "--memory" | "-m" => memory_mib = parse_memory_mib(&args.value(&flag)?)?,
            "--smp" => smp = parse_number(&flag, &args.value(&flag)?)?,
            "--cpu" => cpu = Some(args.value(&flag)?),
            "--append" => append = Some(args.value(&flag)?),
            "--timeout" => timeout = Some(parse_number::<u64>(&flag, &args.value(&flag)?)?),
            "--" => extra = args.rest(),
            other => return Err(CliError::Usage(format!("run: unknown option {other:?}"))),
        }
    }
    let (qemu, accel) = prepare_qemu()?;
    let kernel = build_kernel(release)?;
    let mut command = QemuCommand::new(&qemu, accel, kernel)
        .machine(machine)
        .memory_mib(memory_mib)
        .smp(smp)
        .args(extra);
    if let Some(cpu) = cpu {
        command = command.cpu(cpu);
    }
    if let Some(append) = append {
        command = command.append(append);
    }
    // Declared before the guest so that it is dropped (and removed) after QEMU is gone.
    let mut _namespace = None;
    match net.as_str() {
        "none" => {}
        "user" => {
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
        "tap" => {
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
        other => {
            return Err(CliError::Usage(format!(
                "run: --net takes none, user or tap, not {other:?}"
            )));
        }
    }
    // Without --timeout the run is interactive: it lasts until the guest exits or Ctrl-C.
    let limit = Duration::from_secs(timeout.unwrap_or(7 * 24 * 3600));
    log(&format!("running: {}", command.command_line()));
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: limit,
            echo: true,
        },
    )
    .map_err(|failure| CliError::Failed(brief(&failure)))?;
    match guest.wait_exit(limit) {
        Ok(exit) => {
            log(&format!(
                "QEMU exited ({exit}) after {:.3} s",
                guest.elapsed().as_secs_f64()
            ));
            Ok(exit.exit_code())
        }
        Err(failure) => Err(CliError::Failed(brief(&failure))),
    }
}

/// The error and command line of a failed run, without the serial log (which `run` and `demo`
/// already showed live).
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
fn test(passthrough: Vec<OsString>) -> Result<i32, CliError> {
    // Both log what they found (QEMU path and version; accelerator and why).
    Qemu::ensure()?;
    choose_accel()?;
    // The tap tests drive `ip` (iproute2); a minimal Debian may lack it. As root, install it.
    // Not as root (or without apt-get) the tap tests say so themselves (and fail under CI=true).
    if xtask::is_root() {
        match xtask::ensure_packages(&[("ip", "iproute2")]) {
            Ok(()) | Err(xtask::InstallError::NoAptGet { .. }) => {}
            Err(error) => return Err(Error::from(error).into()),
        }
    }
    // Checked after the environment so that the harness's own tests can run `xtask test` to see
    // its QEMU and VIREO_ACCEL errors, but can never start the suite again from inside it.
    if std::env::var_os(INSIDE_TEST_ENV).is_some() {
        return Err(CliError::Failed(format!(
            "`cargo xtask test` is already running ({INSIDE_TEST_ENV} is set); not starting it again"
        )));
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
fn demo(args: Vec<OsString>) -> Result<i32, CliError> {
    let config = DemoConfig::parse(args).map_err(CliError::Usage)?;
    match xtask::run_demo(&config) {
        Ok(summary) => {
            println!("\n{summary}");
            log("demo: every echo came back exact; the guest shut down cleanly");
            Ok(0)
        }
        Err(error) => Err(CliError::Failed(error.to_string())),
    }
}

/// `cargo xtask client ...`: the host clients on the command line.
fn client(args: Vec<OsString>) -> Result<i32, CliError> {
    let mut args = Args::new(args);
    let kind = match args.next_flag() {
        Some(kind) => kind?,
        None => return Err(CliError::Usage("client: which client?".to_string())),
    };
    let mut addr = None;
    let mut count: u64 = 10;
    let mut size: usize = 64;
    let mut bytes: usize = 1 << 20;
    let mut connections: usize = 1;
    let mut timeout_ms: Option<u64> = None;
    let mut attempts: u32 = 1;
    let mut namespace = None;
    while let Some(flag) = args.next_flag() {
        let flag = flag?;
        match flag.as_str() {
            "--addr" => addr = Some(args.value(&flag)?),
            "--count" => count = parse_number(&flag, &args.value(&flag)?)?,
            "--size" => size = parse_number(&flag, &args.value(&flag)?)?,
            "--bytes" => bytes = parse_number(&flag, &args.value(&flag)?)?,
            "--connections" => connections = parse_number(&flag, &args.value(&flag)?)?,
            "--timeout" => timeout_ms = Some(parse_number(&flag, &args.value(&flag)?)?),
            "--attempts" => attempts = parse_number(&flag, &args.value(&flag)?)?,
            "--netns" => namespace = Some(args.value(&flag)?),
            other => return Err(CliError::Usage(format!("client: unknown option {other:?}"))),
        }
    }
    let addr = addr.ok_or_else(|| CliError::Usage("client: --addr is required".to_string()))?;
    let kind_for_work = kind.clone();
    let work = move || -> Result<(), ClientError> {
        match kind_for_work.as_str() {
            "udp-echo" => {
                let target = resolve(&addr)?;
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(2000));
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
            "tcp-echo" => {
                let target = resolve(&addr)?;
                let timeout = Duration::from_secs(timeout_ms.unwrap_or(60));
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
            "icmp-echo" => {
                let target: std::net::Ipv4Addr = addr.parse().map_err(|_| {
                    ClientError::Protocol(format!("{addr:?} is not an IPv4 address"))
                })?;
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(2000));
                println!("ICMP echo: {count} x {size} bytes to {target}, timeout {timeout:?}");
                let report = icmp_echo(
                    target,
                    IcmpEchoOptions {
                        count,
                        size,
                        timeout,
                        attempts,
                    },
                )?;
                print_echo_report(&report);
            }
            "stats" => {
                let target: SocketAddr = resolve(&addr)?;
                let stats =
                    query_stats(target, Duration::from_millis(timeout_ms.unwrap_or(2000)), 3)?;
                println!("{}", stats.line);
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unknown client {other:?} (udp-echo, tcp-echo, icmp-echo or stats)"
                )));
            }
        }
        Ok(())
    };
    let result = match &namespace {
        Some(name) => {
            log(&format!(
                "running the {kind} client inside network namespace {name}"
            ));
            run_in_netns(name, work)?
        }
        None => work(),
    };
    result
        .map(|()| 0)
        .map_err(|error| CliError::Failed(error.to_string()))
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
fn netns(args: Vec<OsString>) -> Result<i32, CliError> {
    let mut args = Args::new(args);
    let action = match args.next_flag() {
        Some(action) => action?,
        None => "check".to_string(),
    };
    match action.as_str() {
        "check" => {
            let report = xtask::netns_self_test()?;
            println!(
                "netns check passed ({} checks, namespace {} created and removed)",
                report.checks.len(),
                report.namespace
            );
            Ok(0)
        }
        "list" => {
            for name in xtask::list_namespaces() {
                let owner = xtask::namespace_owner(&name)
                    .map(|pid| {
                        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                        format!("pid {pid} ({})", if alive { "running" } else { "gone" })
                    })
                    .unwrap_or_else(|| "not named by this harness".to_string());
                println!("{name}\t{owner}");
            }
            Ok(0)
        }
        "sweep" => {
            let removed = xtask::sweep_stale_namespaces();
            println!("removed {} stale namespace(s): {removed:?}", removed.len());
            Ok(0)
        }
        other => Err(CliError::Usage(format!(
            "netns: unknown action {other:?} (check, list or sweep)"
        ))),
    }
}

/// `cargo xtask bench`: the latency benchmark ([`xtask::bench`]).
fn bench(args: Vec<OsString>) -> Result<i32, CliError> {
    let args: Vec<String> = args
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|bad| CliError::Usage(format!("argument {bad:?} is not UTF-8")))
        })
        .collect::<Result<_, _>>()?;
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        println!("Usage: cargo xtask\n{}", xtask::bench::USAGE);
        return Ok(0);
    }
    Ok(xtask::bench::main(&args))
}

/// `cargo xtask soak`: a long mixed-traffic run against the release kernel on a tap (root).
fn soak(args: Vec<OsString>) -> Result<i32, CliError> {
    let mut args = Args::new(args);
    let mut options = xtask::soak::SoakOptions::default();
    let mut minutes: f64 = 10.0;
    let mut out = None;
    while let Some(flag) = args.next_flag() {
        let flag = flag?;
        match flag.as_str() {
            "--minutes" => minutes = parse_number(&flag, &args.value(&flag)?)?,
            "--udp-rate" => options.udp_rate = parse_number(&flag, &args.value(&flag)?)?,
            "--icmp-rate" => options.icmp_rate = parse_number(&flag, &args.value(&flag)?)?,
            "--tcp-rate" => options.tcp_rate = parse_number(&flag, &args.value(&flag)?)?,
            "--tcp-bytes" => options.tcp_bytes = parse_number(&flag, &args.value(&flag)?)?,
            "--mode" => options.mode = args.value(&flag)?,
            "--interval" => {
                let secs: u64 = parse_number(&flag, &args.value(&flag)?)?;
                options.interval = Duration::from_secs(secs.max(1));
            }
            "--out" => out = Some(std::path::PathBuf::from(args.value(&flag)?)),
            other => return Err(CliError::Usage(format!("soak: unknown option {other:?}"))),
        }
    }
    if minutes.is_nan()
        || minutes <= 0.0
        || !matches!(options.mode.as_str(), "irq" | "poll" | "adaptive")
    {
        return Err(CliError::Usage(
            "soak: --minutes must be positive and --mode irq, poll or adaptive".to_string(),
        ));
    }
    options.duration = Duration::from_secs_f64(minutes * 60.0);
    xtask::root_networking_available().map_err(CliError::Failed)?;
    let _ = prepare_qemu()?;
    let kernel = build_kernel(true)?;
    log(&format!(
        "soak: {minutes} min of UDP {}/s, ICMP {}/s and TCP {} connections/s ({} bytes each) \
         against the release kernel (mode={}) on a tap in a private namespace",
        options.udp_rate, options.icmp_rate, options.tcp_rate, options.tcp_bytes, options.mode
    ));
    let report = xtask::soak::soak(&kernel, &options)?;
    let summary = report.markdown(&options);
    println!("\n{summary}");
    let out = out.unwrap_or_else(|| {
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
    std::fs::write(&out, text).map_err(|source| Error::Io {
        context: format!("writing {}", out.display()),
        source,
    })?;
    log(&format!("soak summary written to {}", out.display()));
    Ok(if report.clean() { 0 } else { 1 })
}
