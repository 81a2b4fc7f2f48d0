//! Host-side library shared by `cargo xtask` and the integration tests in `tests/`: finding (and
//! if allowed, installing) QEMU, choosing the accelerator, building the QEMU command line, and
//! running the kernel with a wall-clock timeout while capturing its serial console.
//!
//! A typical test:
//! ```no_run
//! use std::time::Duration;
//! use xtask::{Guest, GuestExit, Machine, QemuCommand, RunError, RunOptions};
//!
//! fn selftest() -> Result<(), RunError> {
//!     let kernel = "target/debug/vireo"; // in tests: env!("CARGO_BIN_EXE_vireo")
//!     let command = QemuCommand::for_kernel(kernel)
//!         .map_err(RunError::setup)?
//!         .machine(Machine::Pc)
//!         .append("selftest");
//!     let mut guest = Guest::spawn(&command, RunOptions::default())?;
//!     let verdict = guest.wait_for_line("selftest: all", Duration::from_secs(10))?;
//!     println!("verdict after {:?}", verdict.at);
//!     guest.expect_exit(GuestExit::Success, Duration::from_secs(10))
//! }
//! ```

pub mod bench;
pub mod client;
mod command;
mod demo;
mod error;
pub mod faults;
pub mod host;
pub mod nbd;
mod netns;
pub mod progress;
mod qmp;
mod runner;
pub mod soak;
mod tap;
mod usernet;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use client::{
    ClientError, EchoReport, IcmpEchoOptions, RttSummary, Stats, TcpEchoReport, UdpEchoClient,
    UdpEchoOptions, icmp_echo, query_stats, tcp_echo, tcp_echo_concurrent, udp_echo,
};
pub use command::{
    DEBUG_EXIT_DEVICE, GuestMode, Machine, QemuCommand, parse_memory_mib, shell_quote,
};
pub use demo::{
    DemoArgs, DemoConfig, DemoError, DemoMeasurements, DemoOptions, DemoSummary,
    NBD_DEMO_IMAGE_BYTES, NBD_DEMO_OFFSET, NbdDemoReport, demo_exchanges, nbd_demo,
    negotiated_features, run_demo,
};
pub use error::Error;
pub use host::{
    ACCEL_ENV, Accel, AccelChoice, InstallError, QEMU_ENV, QEMU_PACKAGE, QEMU_PROGRAM, Qemu,
    apt_command, choose_accel, cpu_virt_flag, ensure_packages, find_on_path, install_hint,
    install_packages, is_root, log, parse_qemu_version,
};
pub use netns::{
    DEFAULT_GUEST_IP, DEFAULT_HOST_CIDR, NETNS_PREFIX, NetNs, NetnsSelfTest, TapConfig,
    enter_netns, list_namespaces, namespace_owner, netns_handle, netns_self_test,
    root_networking_available, run_in_netns, sweep_stale_namespaces,
};
pub use qmp::{Message as QmpMessage, Qmp, QmpError};
pub use runner::{Guest, GuestExit, RunError, RunOptions, RunReport, SerialLine, unique_temp_path};
pub use tap::{ReflectorCounters, TapDevice, TapReflector};
pub use usernet::{
    DEFAULT_NIC, ECHO_PORT, ReadyLine, STATS_PORT, UserNet, UserNetGuest, boot_on_user_net,
    boot_on_user_net_forwarding, wait_for_ready,
};

impl RunError {
    /// Wraps an error that happened before QEMU could be started (no command line yet), such
    /// as QEMU missing or an invalid `VIREO_ACCEL`.
    pub fn setup(error: Error) -> RunError {
        RunError::from(RunReport {
            error,
            command_line: "(not built: the failure happened before QEMU could be started)"
                .to_string(),
            serial: Vec::new(),
            qemu_stderr: String::new(),
            exit: None,
            elapsed: std::time::Duration::ZERO,
        })
    }
}

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root when relative),
/// else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Where `cargo build -p vireo [--release]` puts the kernel.
pub fn kernel_path(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("vireo")
}

/// The cargo binary: `$CARGO` (set when running under cargo), else `cargo` on `PATH`.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// Builds the kernel with `cargo build -p vireo [--release]` and returns its path.
pub fn build_kernel(release: bool) -> Result<PathBuf, Error> {
    let mut command = Command::new(cargo());
    command
        .current_dir(workspace_root())
        .args(["build", "-p", "vireo"]);
    if release {
        command.arg("--release");
    }
    log(&format!(
        "building the kernel: cargo build -p vireo{}",
        if release { " --release" } else { "" }
    ));
    let status = command.status().map_err(|source| Error::Spawn {
        program: "cargo".to_string(),
        source,
    })?;
    if !status.success() {
        return Err(Error::Check(format!(
            "`cargo build -p vireo` failed ({status})"
        )));
    }
    let kernel = kernel_path(release);
    if kernel.is_file() {
        Ok(kernel)
    } else {
        Err(Error::KernelMissing { path: kernel })
    }
}

/// Whether this runs in CI (`CI` set to anything but empty, `0` or `false`). In CI nothing may be
/// skipped silently.
pub fn is_ci() -> bool {
    std::env::var("CI")
        .map(|value| {
            !matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "" | "0" | "false"
            )
        })
        .unwrap_or(false)
}

/// For a test that cannot run here (e.g. it needs root networking): in CI this panics with
/// `reason`, because CI must run everything; elsewhere it prints `SKIPPED: reason` so that the
/// caller can return early.
pub fn skip_or_fail_in_ci(reason: &str) {
    if is_ci() {
        panic!("cannot run this test, and CI=true forbids skipping it: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}
