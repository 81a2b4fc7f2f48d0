//! One QEMU run: spawning it, capturing COM1 (QEMU's stdout) and QEMU's own stderr line by line
//! with arrival times, waiting for a line or for the exit under a wall-clock limit, and decoding
//! the isa-debug-exit status. QEMU is killed when a wait times out and when the [`Guest`] is
//! dropped, so a failing test never leaves a VM behind.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::QemuCommand;
use crate::error::Error;
use crate::qmp::{Qmp, QmpError};

/// How a QEMU run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// Status 33: the guest wrote 0x10 to isa-debug-exit (success).
    Success,
    /// Status 35: the guest wrote 0x11 to isa-debug-exit (`PANIC:` or a failed check).
    Failure,
    /// Any other exit status: QEMU itself failed (bad option, missing kernel, crash) or the
    /// guest wrote an unexpected value. `0` usually means a triple fault under `-no-reboot`
    /// or a shutdown.
    QemuStatus(i32),
    /// QEMU died from a signal the harness did not send.
    Signal(i32),
    /// The harness killed QEMU (a timeout, or the run was abandoned).
    KilledByHarness,
}

impl GuestExit {
    /// Decodes a process status. `killed` says whether the harness sent the kill.
    pub fn from_status(status: ExitStatus, killed: bool) -> GuestExit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(33), _) => GuestExit::Success,
            (Some(35), _) => GuestExit::Failure,
            (Some(code), _) => GuestExit::QemuStatus(code),
            (None, _) if killed => GuestExit::KilledByHarness,
            (None, Some(signal)) => GuestExit::Signal(signal),
            (None, None) => GuestExit::QemuStatus(-1),
        }
    }

    /// The process exit code to pass on to a shell (`128 + signal` for signals).
    pub fn exit_code(self) -> i32 {
        match self {
            GuestExit::Success => 33,
            GuestExit::Failure => 35,
            GuestExit::QemuStatus(code) => code,
            GuestExit::Signal(signal) => 128 + signal,
            GuestExit::KilledByHarness => 128 + 9,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Success => f.write_str("status 33: guest success"),
            GuestExit::Failure => f.write_str("status 35: guest failure (PANIC or failed check)"),
            GuestExit::QemuStatus(code) => write!(
                f,
                "status {code}: not a guest exit code (QEMU error, crash, or triple fault)"
            ),
            GuestExit::Signal(signal) => write!(f, "QEMU killed by signal {signal}"),
            GuestExit::KilledByHarness => f.write_str("QEMU killed by the harness"),
        }
    }
}

/// One line of serial output and when it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialLine {
    /// The line without its line ending (invalid UTF-8 replaced).
    pub text: String,
    /// Time from spawning QEMU to the arrival of the line's end.
    pub at: Duration,
}

/// How to run QEMU.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Wall-clock limit for the whole run; no wait goes past it.
    pub timeout: Duration,
    /// Copy the serial output to this process's stdout (and QEMU's stderr to stderr) live.
    pub echo: bool,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            timeout: Duration::from_secs(60),
            echo: false,
        }
    }
}

/// A failed run, with everything needed to understand and reproduce it. `Display` (and `Debug`,
/// so that `Result`-returning tests print it readably) shows the error, the exact QEMU command
/// line (shell-quoted), how QEMU ended, the whole serial log and QEMU's stderr. The details are
/// boxed (see [`RunReport`], reachable through `Deref`) to keep `Result`s small.
pub struct RunError {
    report: Box<RunReport>,
}

/// The details of a [`RunError`].
pub struct RunReport {
    /// What went wrong.
    pub error: Error,
    /// The QEMU command line, shell-quoted.
    pub command_line: String,
    /// Every serial line received, with arrival times.
    pub serial: Vec<SerialLine>,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    /// How QEMU ended, when it had ended.
    pub exit: Option<GuestExit>,
    /// Time from spawn to the failure.
    pub elapsed: Duration,
}

impl From<RunReport> for RunError {
    fn from(report: RunReport) -> RunError {
        RunError {
            report: Box::new(report),
        }
    }
}

impl std::ops::Deref for RunError {
    type Target = RunReport;
    fn deref(&self) -> &RunReport {
        &self.report
    }
}

impl RunError {
    /// The details, by value.
    pub fn into_report(self) -> RunReport {
        *self.report
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "QEMU run failed: {}", self.error)?;
        writeln!(f, "command (copy-paste to reproduce):")?;
        writeln!(f, "    {}", self.command_line)?;
        match self.exit {
            Some(exit) => writeln!(f, "QEMU ended: {exit}")?,
            None => writeln!(f, "QEMU ended: not started or not reaped")?,
        }
        writeln!(f, "elapsed: {:.3} s", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "----- serial log (COM1, {} lines) -----",
            self.serial.len()
        )?;
        for line in &self.serial {
            writeln!(f, "[{:>8.3}] {}", line.at.as_secs_f64(), line.text)?;
        }
        writeln!(f, "----- end of serial log -----")?;
        if !self.qemu_stderr.trim().is_empty() {
            writeln!(f, "----- QEMU stderr -----")?;
            writeln!(f, "{}", self.qemu_stderr.trim_end())?;
            writeln!(f, "----- end of QEMU stderr -----")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[derive(Default)]
struct Captured {
    lines: Vec<SerialLine>,
    partial: Vec<u8>,
    stdout_closed: bool,
    stderr: String,
    stderr_closed: bool,
}

struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A reader thread cannot panic while holding the lock, but never propagate poison.
        self.captured
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running QEMU with its serial console captured.
pub struct Guest {
    child: Child,
    shared: Arc<Shared>,
    command_line: String,
    started: Instant,
    deadline: Instant,
    exit: Option<GuestExit>,
    qmp_socket: Option<PathBuf>,
}

impl Guest {
    /// Starts QEMU for `command`. Fails (with the command line in the error) when the kernel
    /// image is missing or QEMU cannot be started.
    pub fn spawn(command: &QemuCommand, options: RunOptions) -> Result<Guest, RunError> {
        let command_line = command.command_line();
        let started = Instant::now();
        let early_failure = |error: Error| {
            RunError::from(RunReport {
                error,
                command_line: command_line.clone(),
                serial: Vec::new(),
                qemu_stderr: String::new(),
                exit: None,
                elapsed: started.elapsed(),
            })
        };
        if !command.kernel().is_file() {
            return Err(early_failure(Error::KernelMissing {
                path: command.kernel().to_path_buf(),
            }));
        }
        if let Some(socket) = command.qmp_path() {
            // A stale socket from an earlier run would make QEMU fail to bind.
            let _ = std::fs::remove_file(socket);
        }
        let mut child = Command::new(command.launch_program())
            .args(command.launch_arguments())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| {
                early_failure(Error::Spawn {
                    program: command.launch_program().display().to_string(),
                    source,
                })
            })?;
        let shared = Arc::new(Shared {
            captured: Mutex::new(Captured::default()),
            changed: Condvar::new(),
        });
        if let Some(stdout) = child.stdout.take() {
            let shared = Arc::clone(&shared);
            thread::spawn(move || read_serial(stdout, &shared, started, options.echo));
        }
        if let Some(stderr) = child.stderr.take() {
            let shared = Arc::clone(&shared);
            thread::spawn(move || read_stderr(stderr, &shared, options.echo));
        }
        Ok(Guest {
            child,
            shared,
            command_line,
            started,
            deadline: started + options.timeout,
            exit: None,
            qmp_socket: command.qmp_path().map(PathBuf::from),
        })
    }

    /// QEMU's process id (`ip netns exec` execs QEMU in place, so it is QEMU's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The shell-quoted QEMU command line.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Time since QEMU was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// How QEMU ended, once it has been reaped.
    pub fn exit(&self) -> Option<GuestExit> {
        self.exit
    }

    /// The serial lines received so far.
    pub fn lines(&self) -> Vec<SerialLine> {
        self.shared.lock().lines.clone()
    }

    /// The serial log received so far, one `\n`-terminated line per line.
    pub fn serial_log(&self) -> String {
        self.shared
            .lock()
            .lines
            .iter()
            .map(|line| format!("{}\n", line.text))
            .collect()
    }

    /// Waits until a serial line contains `pattern` and returns it (the first such line, which
    /// may have arrived before this call). Fails when QEMU ends first or `timeout` (or the run's
    /// wall-clock limit) passes; QEMU is then killed.
    pub fn wait_for_line(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<SerialLine, RunError> {
        self.wait_for_line_matching(
            &format!("a serial line containing {pattern:?}"),
            timeout,
            |line| line.contains(pattern),
        )
    }

    /// Like [`Guest::wait_for_line`] with any predicate; `description` names what is awaited in
    /// the error.
    pub fn wait_for_line_matching(
        &mut self,
        description: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<SerialLine, RunError> {
        let began = Instant::now();
        let deadline = (began + timeout).min(self.deadline);
        let mut captured = self.shared.lock();
        loop {
            if let Some(line) = captured.lines.iter().find(|line| matches(&line.text)) {
                return Ok(line.clone());
            }
            if captured.stdout_closed {
                drop(captured);
                // The serial pipe closes when QEMU exits; reap it to report how, and let the
                // stderr reader finish so that the report carries QEMU's own complaint.
                let _ = self.reap_within(Duration::from_secs(2));
                self.wait_for_readers(Duration::from_secs(2));
                let exit = self.exit;
                return Err(self.failure(Error::ExitedBeforeLine {
                    waiting_for: description.to_string(),
                    exit,
                }));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(captured);
                self.kill();
                return Err(self.failure(Error::Timeout {
                    waiting_for: description.to_string(),
                    after: began.elapsed(),
                }));
            }
            captured = self
                .shared
                .changed
                .wait_timeout(captured, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// Waits for QEMU to exit and decodes the status. On timeout (or the run's wall-clock
    /// limit) QEMU is killed and the error says so.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestExit, RunError> {
        let began = Instant::now();
        let limit = ((began + timeout).min(self.deadline)).saturating_duration_since(began);
        match self.reap_within(limit) {
            Ok(Some(exit)) => {
                self.wait_for_readers(Duration::from_secs(2));
                Ok(exit)
            }
            Ok(None) => {
                self.kill();
                Err(self.failure(Error::Timeout {
                    waiting_for: "QEMU to exit".to_string(),
                    after: began.elapsed(),
                }))
            }
            Err(source) => Err(self.failure(Error::Io {
                context: "waiting for QEMU".to_string(),
                source,
            })),
        }
    }

    /// Waits for the exit and fails unless it is `expected`.
    pub fn expect_exit(&mut self, expected: GuestExit, timeout: Duration) -> Result<(), RunError> {
        let got = self.wait_exit(timeout)?;
        if got == expected {
            Ok(())
        } else {
            Err(self.failure(Error::UnexpectedExit { expected, got }))
        }
    }

    /// Kills QEMU (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(GuestExit::from_status(status, true));
        }
        self.wait_for_readers(Duration::from_secs(2));
    }

    /// Connects to the run's QMP socket (see [`QemuCommand::qmp_socket`]), retrying while QEMU
    /// creates it.
    pub fn qmp(&mut self, timeout: Duration) -> Result<Qmp, RunError> {
        let Some(socket) = self.qmp_socket.clone() else {
            return Err(self.failure(Error::Qmp(QmpError::NoSocket)));
        };
        Qmp::connect(&socket, timeout).map_err(|error| self.failure(error))
    }

    /// A [`RunError`] for `error` with the command line, the log so far and the exit status.
    /// Tests use it (with [`Error::Check`]) to report a failed assertion on the serial log.
    pub fn failure(&self, error: impl Into<Error>) -> RunError {
        let captured = self.shared.lock();
        RunError::from(RunReport {
            error: error.into(),
            command_line: self.command_line.clone(),
            serial: captured.lines.clone(),
            qemu_stderr: captured.stderr.clone(),
            exit: self.exit,
            elapsed: self.started.elapsed(),
        })
    }

    /// Shorthand for `failure(Error::Check(message))`.
    pub fn check_failed(&self, message: impl Into<String>) -> RunError {
        self.failure(Error::Check(message.into()))
    }

    fn reap_within(&mut self, limit: Duration) -> io::Result<Option<GuestExit>> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let exit = GuestExit::from_status(status, false);
                self.exit = Some(exit);
                return Ok(Some(exit));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep((deadline - now).min(Duration::from_millis(5)));
        }
    }

    fn wait_for_readers(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut captured = self.shared.lock();
        while !(captured.stdout_closed && captured.stderr_closed) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            captured = self
                .shared
                .changed
                .wait_timeout(captured, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if let Some(socket) = &self.qmp_socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn read_serial(mut stdout: ChildStdout, shared: &Shared, started: Instant, echo: bool) {
    let mut buffer = [0u8; 4096];
    loop {
        let count = match stdout.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        let chunk = &buffer[..count];
        if echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(chunk);
            let _ = out.flush();
        }
        let at = started.elapsed();
        let mut captured = shared.lock();
        for &byte in chunk {
            if byte == b'\n' {
                let text = line_text(&captured.partial);
                captured.partial.clear();
                captured.lines.push(SerialLine { text, at });
            } else {
                captured.partial.push(byte);
            }
        }
        drop(captured);
        shared.changed.notify_all();
    }
    let mut captured = shared.lock();
    if !captured.partial.is_empty() {
        let text = line_text(&captured.partial);
        captured.partial.clear();
        captured.lines.push(SerialLine {
            text,
            at: started.elapsed(),
        });
    }
    captured.stdout_closed = true;
    drop(captured);
    shared.changed.notify_all();
}

fn line_text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_stderr(mut stderr: ChildStderr, shared: &Shared, echo: bool) {
    let mut buffer = [0u8; 4096];
    loop {
        let count = match stderr.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        if echo {
            let _ = io::stderr().write_all(&buffer[..count]);
        }
        shared
            .lock()
            .stderr
            .push_str(&String::from_utf8_lossy(&buffer[..count]));
    }
    shared.lock().stderr_closed = true;
    shared.changed.notify_all();
}

/// A fresh path in the temporary directory, unique within this host (process id, a counter and
/// the time), for sockets and scratch files. Kept short: Unix socket paths max out at 107 bytes.
pub fn unique_temp_path(stem: &str, extension: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "{stem}-{}-{count}-{nanos:x}.{extension}",
        std::process::id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn decodes_exit_statuses() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert_eq!(GuestExit::from_status(code(33), false), GuestExit::Success);
        assert_eq!(GuestExit::from_status(code(35), false), GuestExit::Failure);
        assert_eq!(
            GuestExit::from_status(code(1), false),
            GuestExit::QemuStatus(1)
        );
        assert_eq!(
            GuestExit::from_status(ExitStatus::from_raw(9), true),
            GuestExit::KilledByHarness
        );
        assert_eq!(
            GuestExit::from_status(ExitStatus::from_raw(11), false),
            GuestExit::Signal(11)
        );
    }
}
