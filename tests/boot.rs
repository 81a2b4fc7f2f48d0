//! Boot tests: the kernel under QEMU on both machine types, small and large RAM, one and four
//! vCPUs, plus the no-NIC fatal path and command-line error reporting. They check the serial
//! contract (README, "The guest contract") and the isa-debug-exit status.

mod common;

use common::{EXIT_WAIT, LINE_WAIT, boot, names_word, wait_for_banner, wait_for_selftest_pass};
use xtask::{GuestExit, Machine, RunError};

/// Boots with `selftest` and expects every in-kernel check to pass and status 33.
fn selftest_passes(machine: Machine, memory_mib: u64, cpus: u32) -> Result<(), RunError> {
    let mut guest = boot(machine, memory_mib, cpus, "selftest")?;
    wait_for_banner(&mut guest)?;
    let checks = wait_for_selftest_pass(&mut guest)?;
    guest.expect_exit(GuestExit::Success, EXIT_WAIT)?;
    println!("{machine}, {memory_mib} MiB, {cpus} vCPU(s): {checks} checks passed");
    Ok(())
}

/// One named test per machine type × RAM size × vCPU count.
macro_rules! selftest_matrix {
    ($($name:ident: $machine:ident, $memory_mib:expr, $cpus:expr;)*) => {$(
        #[test]
        fn $name() -> Result<(), RunError> {
            selftest_passes(Machine::$machine, $memory_mib, $cpus)
        }
    )*};
}

selftest_matrix! {
    selftest_q35_64mib_1cpu: Q35, 64, 1;
    selftest_q35_64mib_4cpus: Q35, 64, 4;
    selftest_q35_4gib_1cpu: Q35, 4096, 1;
    selftest_q35_4gib_4cpus: Q35, 4096, 4;
    selftest_pc_64mib_1cpu: Pc, 64, 1;
    selftest_pc_64mib_4cpus: Pc, 64, 4;
    selftest_pc_4gib_1cpu: Pc, 4096, 1;
    selftest_pc_4gib_4cpus: Pc, 4096, 4;
}

/// `-nodefaults` leaves the machine without a NIC: the kernel must say so and exit 35.
#[test]
fn no_nic_reports_missing_virtio_net_and_exits_35() -> Result<(), RunError> {
    let mut guest = boot(Machine::Q35, 128, 1, "")?;
    wait_for_banner(&mut guest)?;
    let reason = guest.wait_for_line("no virtio-net device found", LINE_WAIT)?;
    println!(
        "reason after {:.3} s: {}",
        reason.at.as_secs_f64(),
        reason.text
    );
    guest.wait_for_line("PANIC:", LINE_WAIT)?;
    guest.expect_exit(GuestExit::Failure, EXIT_WAIT)
}

/// A command line with an unknown key and three malformed values: one `cmdline:` line names each
/// offending key, the defaults are used, and the boot (here the selftest) carries on to 33.
#[test]
fn bad_cmdline_names_each_bad_key_and_selftest_still_passes() -> Result<(), RunError> {
    let mut guest = boot(
        Machine::Q35,
        128,
        1,
        "bogus=1 ip=300.1.1.1/24 mode=turbo log=loud selftest",
    )?;
    wait_for_banner(&mut guest)?;
    wait_for_selftest_pass(&mut guest)?;
    guest.expect_exit(GuestExit::Success, EXIT_WAIT)?;
    let cmdline_lines: Vec<String> = guest
        .lines()
        .into_iter()
        .map(|line| line.text)
        .filter(|text| text.trim_start().starts_with("cmdline:") || text.contains(" cmdline:"))
        .collect();
    let unnamed: Vec<&str> = ["bogus", "ip", "mode", "log"]
        .into_iter()
        .filter(|key| !cmdline_lines.iter().any(|line| names_word(line, key)))
        .collect();
    if unnamed.is_empty() {
        println!("cmdline lines: {cmdline_lines:#?}");
        Ok(())
    } else {
        Err(guest.check_failed(format!(
            "no `cmdline:` line names {unnamed:?}; the cmdline lines were {cmdline_lines:#?}"
        )))
    }
}

#[test]
fn names_word_matches_whole_words_only() {
    assert!(names_word(
        "cmdline: invalid ip= value '300.1.1.1/24'",
        "ip"
    ));
    assert!(names_word("cmdline: unknown key 'bogus'", "bogus"));
    assert!(!names_word("cmdline: skipping", "ip"));
    assert!(!names_word("cmdline: logging", "log"));
}
