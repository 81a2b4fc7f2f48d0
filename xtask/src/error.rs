//! The harness's typed errors: what went wrong with the host environment (QEMU missing, a bad
//! override, a kernel that is not there) or with one guest run (timeout, unexpected exit).
//! `Display` gives the message a person reads; `source()` chains to the OS error underneath.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::ClientError;
use crate::host::InstallError;
use crate::qmp::QmpError;
use crate::runner::GuestExit;

/// Everything the harness can fail with. Values the environment controls (files, processes,
/// environment variables) always come back as one of these, never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No QEMU binary was found (and none could be installed automatically).
    #[error(
        "qemu-system-x86_64 not found ({searched}); install it with:\n    {install_hint}\n\
         or point VIREO_QEMU at a qemu-system-x86_64 binary"
    )]
    QemuNotFound {
        /// Where we looked (the `VIREO_QEMU` value or `PATH`).
        searched: String,
        /// The exact command a user should run to get QEMU.
        install_hint: String,
    },
    /// A QEMU binary exists but `--version` did not work or printed nothing recognisable.
    #[error("QEMU at {} is not usable: {reason}", path.display())]
    QemuUnusable {
        /// The binary we tried.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Installing a Debian package with apt-get failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// `VIREO_ACCEL` holds something other than `kvm` or `tcg`.
    #[error("invalid VIREO_ACCEL value {value:?}: expected `kvm` or `tcg` (or unset for auto)")]
    InvalidAccel {
        /// The rejected value.
        value: String,
    },
    /// An invalid value for a harness setting (machine type, memory size, ...).
    #[error("invalid {name} {value:?}: expected {expected}")]
    InvalidSetting {
        /// The setting's name.
        name: &'static str,
        /// The rejected value.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The kernel image to boot does not exist.
    #[error(
        "kernel image {} does not exist (build it with `cargo build -p vireo`)",
        path.display()
    )]
    KernelMissing {
        /// The path that was checked.
        path: PathBuf,
    },
    /// A host program could not be started.
    #[error("could not start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// Any other host I/O failure, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// A wait ran out of time (QEMU was killed).
    #[error(
        "timed out after {:.1} s waiting for {waiting_for}; QEMU was killed",
        after.as_secs_f64()
    )]
    Timeout {
        /// What the harness was waiting for.
        waiting_for: String,
        /// How long it waited.
        after: Duration,
    },
    /// QEMU exited (or closed its serial output) before the awaited line appeared.
    #[error("{}", exited_before_line(waiting_for, exit))]
    ExitedBeforeLine {
        /// The awaited line, described.
        waiting_for: String,
        /// How QEMU ended, if it has been reaped.
        exit: Option<GuestExit>,
    },
    /// The guest ended in a different way than the caller expected.
    #[error("expected the guest to end with {expected}, but got {got}")]
    UnexpectedExit {
        /// What the caller expected.
        expected: GuestExit,
        /// What happened.
        got: GuestExit,
    },
    /// A check made by the caller (a test) on the serial log failed.
    #[error("check failed: {0}")]
    Check(String),
    /// A QMP exchange failed.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// A host client of the guest's services (UDP/TCP/ICMP echo, stats) failed.
    #[error("client: {0}")]
    Client(#[from] ClientError),
}

fn exited_before_line(waiting_for: &str, exit: &Option<GuestExit>) -> String {
    match exit {
        Some(exit) => format!("QEMU ended ({exit}) before {waiting_for}"),
        None => format!("QEMU closed its serial output before {waiting_for}"),
    }
}
