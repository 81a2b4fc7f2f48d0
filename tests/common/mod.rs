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

// ---- Network tests (tests/echo.rs): user networking and tap in a private namespace. ----

use xtask::client::ClientError;
use xtask::{
    DEFAULT_NIC, Error, NetNs, ReadyLine, UserNetGuest, boot_on_user_net,
    root_networking_available, skip_or_fail_in_ci, wait_for_ready,
};

/// Wall-clock limit for one networked QEMU run (boot, ready, and the exchanges).
pub const NET_RUN_LIMIT: Duration = Duration::from_secs(180);
/// How long to wait for the guest's `ready` line.
pub const READY_WAIT: Duration = Duration::from_secs(60);

/// Boots the kernel (q35, 128 MiB, 1 vCPU, `append`) with `nic` (which must say `netdev=n0`,
/// e.g. [`DEFAULT_NIC`]) on QEMU user networking with the guest's echo and stats ports forwarded
/// to 127.0.0.1, and waits for the `ready` line.
pub fn boot_user_net_with(append: &str, nic: &str) -> Result<UserNetGuest, RunError> {
    boot_user_net_on::<&str>(Machine::Q35, append, &[], nic)
}

/// [`boot_user_net_with`] on `machine`, with `extra` QEMU arguments (drives, devices, `-cpu`,
/// ...) before the NIC.
pub fn boot_user_net_on<S: AsRef<str>>(
    machine: Machine,
    append: &str,
    extra: &[S],
    nic: &str,
) -> Result<UserNetGuest, RunError> {
    let mut command = QemuCommand::for_kernel(kernel())
        .map_err(RunError::setup)?
        .machine(machine)
        .args(extra.iter().map(AsRef::as_ref));
    if !append.is_empty() {
        command = command.append(append);
    }
    let booted = boot_on_user_net(
        &command,
        nic,
        RunOptions {
            timeout: NET_RUN_LIMIT,
            echo: false,
        },
        READY_WAIT,
    )?;
    println!("running: {}", booted.guest.command_line());
    println!(
        "ready after {:.3} s: {}; forwards: UDP echo {}, TCP echo {}, stats {}",
        booted.ready_at.as_secs_f64(),
        booted.ready.text,
        booted.net.udp_echo(),
        booted.net.tcp_echo(),
        booted.net.stats()
    );
    Ok(booted)
}

/// [`boot_user_net_with`] with the default virtio-net NIC.
pub fn boot_user_net(append: &str) -> Result<UserNetGuest, RunError> {
    boot_user_net_with(append, DEFAULT_NIC)
}

/// Turns a client's failure into a [`RunError`] carrying the QEMU command and serial log.
pub fn on_guest<T>(guest: &Guest, result: Result<T, ClientError>) -> Result<T, RunError> {
    result.map_err(|error| guest.failure(Error::Client(error)))
}

/// A guest on a tap in its own namespace. The guest is declared first, so it is dropped (QEMU
/// killed) before the namespace is removed; the namespace's drop would end QEMU anyway.
pub struct TapGuest {
    /// The running QEMU.
    pub guest: Guest,
    /// The parsed `ready` line.
    pub ready: ReadyLine,
    /// The namespace holding the tap (host side 10.0.2.2/24) and QEMU.
    pub netns: NetNs,
}

impl TapGuest {
    /// Runs a client inside the namespace; its failure becomes a [`RunError`] with the log.
    pub fn client<T: Send>(
        &self,
        work: impl FnOnce() -> Result<T, ClientError> + Send,
    ) -> Result<T, RunError> {
        match self.netns.run(work) {
            Ok(result) => on_guest(&self.guest, result),
            Err(error) => Err(self.guest.failure(error)),
        }
    }
}

/// Whether root networking is available; when not, skips (or fails under CI=true) with the
/// reason and returns false.
pub fn root_networking_or_skip() -> bool {
    match root_networking_available() {
        Ok(()) => true,
        Err(reason) => {
            skip_or_fail_in_ci(&reason);
            false
        }
    }
}

/// Creates a namespace (`vireo-<prefix>-...`) with tap0 (host side 10.0.2.2/24), boots the
/// kernel inside it with `-netdev tap,...,vhost=off` and the default NIC, and waits for
/// `ready`. Callers check [`root_networking_or_skip`] first.
pub fn boot_tap(prefix: &str, append: &str) -> Result<TapGuest, RunError> {
    boot_tap_with(prefix, &[xtask::TapConfig::default()], |command| {
        let command = command
            .netdev(NetNs::tap_netdev("n0", "tap0", None))
            .device(DEFAULT_NIC);
        if append.is_empty() {
            command
        } else {
            command.append(append)
        }
    })
}

// ---- Guest-side counters over an echo burst (tests/matrix.rs, tests/echo.rs). ----

use xtask::{Stats, UdpEchoClient, query_stats};

/// How the guest's counters moved over a burst of UDP echoes: two stats queries around
/// `datagrams` exact ping-pongs (one in flight).
pub struct BurstCounters {
    /// Datagrams the client had echoed exactly.
    pub datagrams: u64,
    /// The guest's `udp_echoed` growth (the denominator of the per-packet figures).
    pub echoed: u64,
    /// Growth of `kicks` (device notifications actually written).
    pub kicks: u64,
    /// Growth of `interrupts` (NIC interrupts, MSI-X or INTx).
    pub interrupts: u64,
    /// The stats line before the burst.
    pub before: Stats,
    /// The stats line after it.
    pub after: Stats,
}

impl BurstCounters {
    /// Kicks per echoed datagram.
    pub fn kicks_per_packet(&self) -> f64 {
        self.kicks as f64 / self.echoed.max(1) as f64
    }

    /// Interrupts per echoed datagram.
    pub fn interrupts_per_packet(&self) -> f64 {
        self.interrupts as f64 / self.echoed.max(1) as f64
    }

    /// `kicks/pkt X interrupts/pkt Y (+K kicks, +I interrupts over E echoes)`.
    pub fn describe(&self) -> String {
        format!(
            "kicks/pkt {:.3} interrupts/pkt {:.3} (+{} kicks, +{} interrupts over {} echoed)",
            self.kicks_per_packet(),
            self.interrupts_per_packet(),
            self.kicks,
            self.interrupts,
            self.echoed
        )
    }
}

/// Queries the stats service, echoes `datagrams` UDP datagrams of `size` bytes through `client`
/// (each exact; a lost one may be sent again up to 3 times), queries the stats again and returns
/// how `udp_echoed`, `kicks` and `interrupts` moved. The guest must echo at least `datagrams`.
pub fn udp_burst_counters(
    booted: &UserNetGuest,
    client: &mut UdpEchoClient,
    size: usize,
    datagrams: u64,
) -> Result<BurstCounters, RunError> {
    let guest = &booted.guest;
    let stats_wait = Duration::from_secs(3);
    let before = on_guest(guest, query_stats(booted.net.stats(), stats_wait, 3))?;
    let mut report = xtask::EchoReport::default();
    for _ in 0..datagrams {
        on_guest(guest, client.exchange(size, 3, &mut report))?;
    }
    let after = on_guest(guest, query_stats(booted.net.stats(), stats_wait, 3))?;
    let grew = |key: &str| -> Result<u64, RunError> {
        let (a, b) = (
            on_guest(guest, after.counter(key))?,
            on_guest(guest, before.counter(key))?,
        );
        a.checked_sub(b).ok_or_else(|| {
            guest.check_failed(format!(
                "counter {key} went backwards: {:?} then {:?}",
                before.line, after.line
            ))
        })
    };
    let counters = BurstCounters {
        datagrams: report.received,
        echoed: grew("udp_echoed")?,
        kicks: grew("kicks")?,
        interrupts: grew("interrupts")?,
        before,
        after,
    };
    if counters.echoed < datagrams {
        return Err(guest.check_failed(format!(
            "udp_echoed grew by {} over a burst of {datagrams} exact echoes ({:?} then {:?})",
            counters.echoed, counters.before.line, counters.after.line
        )));
    }
    Ok(counters)
}

/// The names after `virtio-net: negotiated features 0x...:` in the serial log.
pub fn negotiated_features(guest: &Guest) -> Result<Vec<String>, RunError> {
    xtask::negotiated_features(&guest.lines())
        .map(|(_, names)| names)
        .ok_or_else(|| {
            guest.check_failed("no `virtio-net: negotiated features` line in the serial log")
        })
}

// ---- Reliability tests (tests/compat.rs, tests/faults.rs): guests on taps of any shape. ----

use xtask::TapConfig;

/// Creates a namespace (`vireo-<prefix>-...`) holding `taps`, boots the kernel inside it with
/// whatever `configure` adds to the base command (netdevs, NICs, machine, RAM, vCPUs, command
/// line, QMP socket), and waits for `ready`. Callers check [`root_networking_or_skip`] first.
pub fn boot_tap_with(
    prefix: &str,
    taps: &[TapConfig],
    configure: impl FnOnce(QemuCommand) -> QemuCommand,
) -> Result<TapGuest, RunError> {
    let netns = NetNs::create_with(prefix, taps).map_err(RunError::setup)?;
    let base = QemuCommand::for_kernel(kernel())
        .map_err(RunError::setup)?
        .in_netns(netns.name());
    let command = configure(base);
    println!("running: {}", command.command_line());
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: NET_RUN_LIMIT,
            echo: false,
        },
    )?;
    let (ready, line) = wait_for_ready(&mut guest, READY_WAIT)?;
    println!("ready after {:.3} s: {}", line.at.as_secs_f64(), ready.text);
    Ok(TapGuest {
        guest,
        ready,
        netns,
    })
}

/// How many serial lines so far contain `needle`.
pub fn count_lines(guest: &Guest, needle: &str) -> usize {
    guest
        .lines()
        .iter()
        .filter(|line| line.text.contains(needle))
        .count()
}

/// Waits until at least `count` serial lines contain `needle`; returns how long it took. The
/// error names the line, the count reached and carries the serial log.
pub fn wait_for_count(
    guest: &Guest,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> Result<Duration, RunError> {
    let began = std::time::Instant::now();
    loop {
        let seen = count_lines(guest, needle);
        if seen >= count {
            return Ok(began.elapsed());
        }
        if began.elapsed() >= timeout {
            return Err(guest.check_failed(format!(
                "waited {:.1} s for {count} serial lines containing {needle:?}, saw {seen}",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
