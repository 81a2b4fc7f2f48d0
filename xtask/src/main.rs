//! `cargo xtask`: Vireo's host command line (`run`, `test`, `demo`). Arguments are parsed by
//! hand to keep the tool free of dependencies; every command prints what it runs.

use std::ffi::OsString;
use std::net::UdpSocket;
use std::process::{Command, ExitCode};
use std::time::Duration;

use xtask::{
    Error, Guest, GuestExit, Machine, Qemu, QemuCommand, RunError, RunOptions, build_kernel, cargo,
    choose_accel, is_ci, log, parse_memory_mib, shell_quote, workspace_root,
};

const USAGE: &str = "\
Usage: cargo xtask <command> [options]

Commands:
  run   [--release] [--machine q35|pc] [--memory SIZE] [--smp N] [--cpu MODEL]
        [--append \"CMDLINE\"] [--timeout SECS] [-- EXTRA QEMU ARGS...]
        Build the kernel and boot it with the serial console on this terminal until it
        exits; exits with QEMU's status (33 = guest success, 35 = guest failure).
  test  [ARGS...]
        Make sure QEMU is there (installs it when root), then run the whole workspace's
        tests: cargo nextest run --workspace (or cargo test --workspace without
        cargo-nextest). ARGS go to that runner.
  demo  [--debug] [--port PORT] [--timeout SECS]
        Boot the release kernel with a virtio-net NIC on QEMU user networking, UDP
        127.0.0.1:PORT forwarded to the guest's port 7, and show the serial log.

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
    while let Some(flag) = args.next_flag() {
        let flag = flag?;
        match flag.as_str() {
            "--release" => release = true,
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

/// `cargo xtask demo`.
///
/// Today it only boots the kernel with a virtio-net NIC on QEMU user networking and shows the
/// serial log until the guest prints its `ready` line (or exits). It will grow, with the
/// network issue, into the echo demo: once the guest is ready it sends UDP datagrams to
/// 127.0.0.1:PORT (forwarded to the guest's UDP port 7), checks the echoes, prints the
/// round-trip times, and queries the guest's stats service on port 7007.
fn demo(args: Vec<OsString>) -> Result<i32, CliError> {
    let mut args = Args::new(args);
    let mut release = true;
    let mut port = None;
    let mut timeout = 60;
    while let Some(flag) = args.next_flag() {
        let flag = flag?;
        match flag.as_str() {
            "--debug" => release = false,
            "--port" => port = Some(parse_number::<u16>(&flag, &args.value(&flag)?)?),
            "--timeout" => timeout = parse_number(&flag, &args.value(&flag)?)?,
            other => return Err(CliError::Usage(format!("demo: unknown option {other:?}"))),
        }
    }
    let (qemu, accel) = prepare_qemu()?;
    let kernel = build_kernel(release)?;
    let port = match port {
        Some(port) => port,
        None => free_udp_port()?,
    };
    let command = QemuCommand::new(&qemu, accel, kernel)
        .netdev(format!("user,id=n0,hostfwd=udp:127.0.0.1:{port}-:7"))
        .device("virtio-net-pci,netdev=n0");
    log(&format!(
        "demo: booting the kernel with virtio-net on QEMU user networking; \
         host UDP 127.0.0.1:{port} is forwarded to the guest's UDP port 7"
    ));
    log(&format!("running: {}", command.command_line()));
    let limit = Duration::from_secs(timeout);
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: limit,
            echo: true,
        },
    )
    .map_err(|failure| CliError::Failed(brief(&failure)))?;
    match guest.wait_for_line("ready", limit) {
        Ok(line) => {
            log(&format!(
                "guest ready after {:.3} s: {}",
                line.at.as_secs_f64(),
                line.text
            ));
            log(
                "the echo exchange is not implemented yet (it comes with the network issue); stopping QEMU",
            );
            guest.kill();
            Ok(0)
        }
        Err(failure) => {
            let exit = failure.exit;
            let mut message = brief(&failure);
            if exit == Some(GuestExit::Failure) {
                message.push_str("\nthe guest reported a fatal error (see the PANIC: line above)");
            }
            Err(CliError::Failed(message))
        }
    }
}

fn free_udp_port() -> Result<u16, Error> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|source| Error::Io {
        context: "finding a free UDP port on 127.0.0.1".to_string(),
        source,
    })?;
    socket
        .local_addr()
        .map(|address| address.port())
        .map_err(|source| Error::Io {
            context: "reading the bound UDP port".to_string(),
            source,
        })
}
