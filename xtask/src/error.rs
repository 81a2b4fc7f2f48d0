//! The harness's typed errors: what went wrong with the host environment (QEMU missing, a bad
//! override, a kernel that is not there) or with one guest run (timeout, unexpected exit).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::ClientError;
use crate::runner::GuestExit;

/// Everything the harness can fail with. Values the environment controls (files, processes,
/// environment variables) always come back as one of these, never as a panic.
#[derive(Debug)]
pub enum Error {
    /// No QEMU binary was found (and none could be installed automatically).
    QemuNotFound {
        /// Where we looked (the `VIREO_QEMU` value or `PATH`).
        searched: String,
        /// The exact command a user should run to get QEMU.
        install_hint: String,
    },
    /// A QEMU binary exists but `--version` did not work or printed nothing recognisable.
    QemuUnusable {
        /// The binary we tried.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Installing QEMU with apt-get failed.
    QemuInstallFailed {
        /// The command that was run.
        command: String,
        /// Its exit status, or the error that stopped it from starting.
        status: String,
    },
    /// `VIREO_ACCEL` holds something other than `kvm` or `tcg`.
    InvalidAccel {
        /// The rejected value.
        value: String,
    },
    /// An invalid value for a harness setting (machine type, memory size, ...).
    InvalidSetting {
        /// The setting's name.
        name: &'static str,
        /// The rejected value.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The kernel image to boot does not exist.
    KernelMissing {
        /// The path that was checked.
        path: PathBuf,
    },
    /// A host program could not be started.
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// Any other host I/O failure, with what we were doing.
    Io {
        /// What the harness was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// A wait ran out of time (QEMU was killed).
    Timeout {
        /// What the harness was waiting for.
        waiting_for: String,
        /// How long it waited.
        after: Duration,
    },
    /// QEMU exited (or closed its serial output) before the awaited line appeared.
    ExitedBeforeLine {
        /// The awaited line, described.
        waiting_for: String,
        /// How QEMU ended, if it has been reaped.
        exit: Option<GuestExit>,
    },
    /// The guest ended in a different way than the caller expected.
    UnexpectedExit {
        /// What the caller expected.
        expected: GuestExit,
        /// What happened.
        got: GuestExit,
    },
    /// A check made by the caller (a test) on the serial log failed.
    Check(String),
    /// A QMP exchange failed.
    Qmp(String),
    /// A host client of the guest's services (UDP/TCP/ICMP echo, stats) failed.
    Client(ClientError),
}

impl From<ClientError> for Error {
    fn from(error: ClientError) -> Error {
        Error::Client(error)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::QemuNotFound {
                searched,
                install_hint,
            } => write!(
                f,
                "qemu-system-x86_64 not found ({searched}); install it with:\n    {install_hint}\n\
                 or point VIREO_QEMU at a qemu-system-x86_64 binary"
            ),
            Error::QemuUnusable { path, reason } => {
                write!(f, "QEMU at {} is not usable: {reason}", path.display())
            }
            Error::QemuInstallFailed { command, status } => {
                write!(f, "installing QEMU failed ({status}): {command}")
            }
            Error::InvalidAccel { value } => write!(
                f,
                "invalid VIREO_ACCEL value {value:?}: expected `kvm` or `tcg` (or unset for auto)"
            ),
            Error::InvalidSetting {
                name,
                value,
                expected,
            } => write!(f, "invalid {name} {value:?}: expected {expected}"),
            Error::KernelMissing { path } => write!(
                f,
                "kernel image {} does not exist (build it with `cargo build -p vireo`)",
                path.display()
            ),
            Error::Spawn { program, source } => write!(f, "could not start {program}: {source}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Timeout { waiting_for, after } => write!(
                f,
                "timed out after {:.1} s waiting for {waiting_for}; QEMU was killed",
                after.as_secs_f64()
            ),
            Error::ExitedBeforeLine { waiting_for, exit } => match exit {
                Some(exit) => write!(f, "QEMU ended ({exit}) before {waiting_for}"),
                None => write!(f, "QEMU closed its serial output before {waiting_for}"),
            },
            Error::UnexpectedExit { expected, got } => {
                write!(
                    f,
                    "expected the guest to end with {expected}, but got {got}"
                )
            }
            Error::Check(message) => write!(f, "check failed: {message}"),
            Error::Qmp(message) => write!(f, "QMP: {message}"),
            Error::Client(error) => write!(f, "client: {error}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Io { source, .. } => Some(source),
            Error::Client(error) => Some(error),
            _ => None,
        }
    }
}
