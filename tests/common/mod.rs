//! Helpers shared by the integration tests: boot the kernel under QEMU (one QEMU per test, with
//! a wall-clock limit) and read the serial contract's lines. Every failure is a [`RunError`],
//! whose output shows the exact QEMU command line and the whole serial log.
#![allow(dead_code)] // Each test file uses its own subset.

use std::time::Duration;

use xtask::{Guest, Machine, QemuCommand, RunError, RunOptions, SerialLine};

/// Wall-clock limit for one QEMU run; QEMU is killed when it passes.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);
/// How long to wait for any one serial line (bounded by [`RUN_LIMIT`] too).
pub const LINE_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for QEMU to exit once the verdict is on the console.
pub const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Upper bound asserted for spawn-to-selftest-verdict. The target is < 1 s under TCG; this is
/// generous so that a loaded CI machine does not make the test flaky.
pub const VERDICT_BOUND: Duration = Duration::from_secs(10);

/// The kernel image cargo built for these tests.
pub fn kernel() -> &'static str {
    env!("CARGO_BIN_EXE_vireo")
}

/// Starts QEMU on the kernel with the given machine, RAM (MiB), vCPUs and command line.
pub fn boot(machine: Machine, memory_mib: u64, cpus: u32, append: &str) -> Result<Guest, RunError> {
    let mut command = QemuCommand::for_kernel(kernel())
        .map_err(RunError::setup)?
        .machine(machine)
        .memory_mib(memory_mib)
        .smp(cpus);
    if !append.is_empty() {
        command = command.append(append);
    }
    boot_command(&command)
}

/// Starts QEMU for a fully built command.
pub fn boot_command(command: &QemuCommand) -> Result<Guest, RunError> {
    println!("running: {}", command.command_line());
    Guest::spawn(
        command,
        RunOptions {
            timeout: RUN_LIMIT,
            echo: false,
        },
    )
}

/// Waits for the boot banner (a line containing `Vireo`).
pub fn wait_for_banner(guest: &mut Guest) -> Result<SerialLine, RunError> {
    let banner = guest.wait_for_line("Vireo", LINE_WAIT)?;
    println!(
        "banner after {:.3} s: {}",
        banner.at.as_secs_f64(),
        banner.text
    );
    Ok(banner)
}

/// Waits for `selftest: all N checks passed`, checks that exactly N `selftest: <name> ... ok`
/// lines came before it and none says `FAILED`, and that the verdict arrived within
/// [`VERDICT_BOUND`] of spawning QEMU. Returns N.
pub fn wait_for_selftest_pass(guest: &mut Guest) -> Result<usize, RunError> {
    let verdict = guest
        .wait_for_line_matching(
            "the selftest verdict `selftest: all N checks passed`",
            LINE_WAIT,
            |line| line.contains("selftest: all ") && line.contains(" checks passed"),
        )
        .map_err(|failure| {
            let failed = failed_selftest_lines(&failure.serial);
            if failed.is_empty() {
                failure
            } else {
                guest.check_failed(format!(
                    "selftest checks failed: {failed:?} ({})",
                    failure.error
                ))
            }
        })?;
    println!(
        "selftest verdict after {:.3} s (asserted bound {} s, target < 1 s under TCG): {}",
        verdict.at.as_secs_f64(),
        VERDICT_BOUND.as_secs(),
        verdict.text
    );
    let claimed = verdict
        .text
        .split("selftest: all ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse::<usize>().ok())
        .ok_or_else(|| guest.check_failed(format!("no check count in {:?}", verdict.text)))?;
    let lines = guest.lines();
    let failed = failed_selftest_lines(&lines);
    if !failed.is_empty() {
        return Err(guest.check_failed(format!("selftest lines report failures: {failed:?}")));
    }
    let passed = lines
        .iter()
        .filter(|line| line.at <= verdict.at)
        .filter(|line| {
            line.text.contains("selftest: ") && line.text.trim_end().ends_with(" ... ok")
        })
        .count();
    if claimed == 0 || passed != claimed {
        return Err(guest.check_failed(format!(
            "the verdict claims {claimed} checks, but {passed} `selftest: <name> ... ok` lines \
             came before it"
        )));
    }
    if verdict.at >= VERDICT_BOUND {
        return Err(guest.check_failed(format!(
            "the selftest verdict took {:.3} s from spawning QEMU (bound {} s)",
            verdict.at.as_secs_f64(),
            VERDICT_BOUND.as_secs()
        )));
    }
    Ok(claimed)
}

/// The `selftest: ... FAILED...` lines of a log.
pub fn failed_selftest_lines(lines: &[SerialLine]) -> Vec<String> {
    lines
        .iter()
        .filter(|line| line.text.contains("selftest: ") && line.text.contains("FAILED"))
        .map(|line| line.text.clone())
        .collect()
}

/// Whether `line` contains `word` as a whole word (not inside a longer identifier).
pub fn names_word(line: &str, word: &str) -> bool {
    let is_word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(word).any(|(start, _)| {
        let before = line[..start].chars().next_back();
        let after = line[start + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}
