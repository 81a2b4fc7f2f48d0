//! The adaptive mode's polling window: how long the network loop keeps busy-polling after the
//! last packet before it arms interrupts and halts.
//!
//! A fixed window is wrong at both ends. Under load, the host sometimes leaves the guest without
//! a packet for longer than any short window (QEMU's I/O thread preempted, the client
//! descheduled): a halt then costs a wake-up of the vCPU thread, and on a two-core host it also
//! lets the scheduler move QEMU's I/O thread onto the vCPU's core, where the two then share it.
//! Measured with a fixed 200 µs window and 64 datagrams in flight: 84 halts in 3 s and 36% fewer
//! echoes per second than poll mode; with a 5 ms window, the same as poll mode. When traffic
//! really stops, a long window only burns the core.
//!
//! So the window adapts the way KVM's halt-polling does (`halt_poll_ns` grow and shrink): it
//! starts at the configured base (`poll-window=`), doubles (up to [`MAX_GROWTH`] times the base)
//! whenever a halt turns out to have been premature, that is a packet arrived before a window of
//! the current length would have run out anyway, and halves back toward the base whenever a halt
//! lasts longer than the largest window (the traffic stopped). Halts ended by the loop's own
//! timer (housekeeping, protocol timers) with no packet waiting count as neither.
//!
//! A window only helps while spinning is cheap, and on a busy host it is not: the
//! [`ContentionGuard`] watches the time the host takes from the spinning vCPU and the waits
//! for packets that the host stretches while the vCPU holds a core, and when the host is
//! oversubscribed makes the loop halt as soon as it has no work for a hold-off, probing with the
//! whole window after each. While it yields, halts do not grow the window.

/// The window grows to at most this many times its base.
pub const MAX_GROWTH: u64 = 32;

/// The live polling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    base_ns: u64,
    current_ns: u64,
}

/// What a halt turned out to be, for [`PollWindow::after_halt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaltOutcome {
    /// The window grew (a premature halt).
    Grew,
    /// The window shrank (the traffic had stopped).
    Shrank,
    /// No change.
    Kept,
}

impl PollWindow {
    /// A window of `base_ns` (the configured `poll-window=`).
    pub const fn new(base_ns: u64) -> Self {
        Self {
            base_ns,
            current_ns: base_ns,
        }
    }

    /// The current window length.
    pub const fn current_ns(&self) -> u64 {
        self.current_ns
    }

    /// The largest the window may grow to.
    pub const fn max_ns(&self) -> u64 {
        self.base_ns.saturating_mul(MAX_GROWTH)
    }

    /// Updates the window after a halt that lasted `halted_ns`; `packet_waiting` says whether
    /// the loop woke to received traffic.
    pub fn after_halt(&mut self, halted_ns: u64, packet_waiting: bool) -> HaltOutcome {
        if halted_ns > self.max_ns() {
            let shrunk = (self.current_ns / 2).max(self.base_ns);
            if shrunk != self.current_ns {
                self.current_ns = shrunk;
                return HaltOutcome::Shrank;
            }
            return HaltOutcome::Kept;
        }
        if packet_waiting && halted_ns < self.current_ns {
            let grown = self.current_ns.saturating_mul(2).min(self.max_ns());
            if grown != self.current_ns {
                self.current_ns = grown;
                return HaltOutcome::Grew;
            }
        }
        HaltOutcome::Kept
    }
}

/// The contention guard's evaluation period: this much time spent spinning (stolen time
/// included) makes one verdict.
pub const SPIN_EPOCH_NS: u64 = 2_000_000;

/// An epoch is contended when the host took at least `1 / STOLEN_SHARE_DIVISOR` of it...
pub const STOLEN_SHARE_DIVISOR: u64 = 8;

/// ... or saw a stall, while the loop spent at least `1 / SPIN_SHARE_DIVISOR` of the epoch's
/// wall time spinning: a loop that is mostly busy with a flood is a CPU hog whether it spins in
/// its short gaps or not, and halting in them only adds wake-ups.
pub const SPIN_SHARE_DIVISOR: u64 = 2;

/// A wait for a packet while spinning is a stall when it lasted at least this many times the
/// typical gap between packets ...
pub const STALL_FACTOR: u64 = 8;

/// ... and at least this long: the host left the packet waiting (its I/O thread had no core)
/// while the vCPU held one.
pub const STALL_MIN_NS: u64 = 250_000;

/// Contended epochs in a row that start a hold-off from the spinning regime (a probe needs
/// one): a single stall in a quiet stretch is the host's hiccup (a blocking client woken late),
/// which halting would only make worse; a busy-polling client stalls the loop in every epoch.
pub const CONTENDED_EPOCHS: u32 = 2;

/// The first hold-off after a contended epoch.
pub const HOLDOFF_BASE_NS: u64 = 50_000_000;

/// Hold-offs double on every contended probe, up to this.
pub const HOLDOFF_MAX_NS: u64 = 1_600_000_000;

/// Whether spinning through the whole polling window currently pays on this host, as
/// [`ContentionGuard`] judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// Spin through the polling window before halting: the host leaves the vCPU a core and
    /// delivers packets promptly.
    Spinning,
    /// Halt as soon as there is no work, as `irq` mode does, until `until_ns`: the host is
    /// oversubscribed (a busy-polling client, other guests, builds).
    Yielding {
        /// When the next probe (a return to the whole window) may start.
        until_ns: u64,
    },
}

/// What a verdict changed, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The epoch is not over yet, or it was clean and nothing changed.
    Unchanged,
    /// A contended epoch: the loop starts yielding.
    StartedYielding,
    /// A clean epoch after a probe: the hold-off is back at its base.
    Cleared,
}

/// Decides how long the adaptive mode's loop may spin, from what the host does while it spins.
///
/// Spinning wins only while the vCPU has a core to itself and the host has another for its own
/// work. On a host whose cores are all taken, a spinning vCPU loses in two ways, and the guard
/// watches for both:
/// - **stolen time**: the vCPU shares a core with another busy thread and is descheduled for
///   whole time slices (milliseconds) while packets wait (gaps between two clock reads in the
///   spin loop, the loop's `stolen_ns`);
/// - **stalls**: the vCPU keeps its core, but QEMU's I/O thread, woken onto the core of a
///   client that busy-polls, waits out that client's time slice before it delivers the next
///   packet. The guest sees a wait for a packet [`STALL_FACTOR`] times longer than the typical
///   gap between packets (an exponentially weighted mean of the waits that ended in a packet).
///
/// Every [`SPIN_EPOCH_NS`] of spinning is one epoch; it is contended when at least
/// `1/`[`STOLEN_SHARE_DIVISOR`] of it was stolen, or it saw a stall, while the loop was mostly
/// waiting (at least `1/`[`SPIN_SHARE_DIVISOR`] of the epoch's wall time spent spinning).
/// For a hold-off, the loop then halts as soon as it has no work, as `irq` mode does: the
/// vCPU's spinning itself competes for the cores, and a halted vCPU frees its core for the
/// thread that has to deliver the next packet. (Measured in one run against a version that
/// only shortened the window to four typical gaps: with a busy-polling client the vCPU ran 34
/// µs per echo instead of 759 and the p99 fell to 0.38 of it.) When the hold-off ends, the
/// whole window is tried again (a probe): a contended probe doubles the hold-off (up to
/// [`HOLDOFF_MAX_NS`]), a clean one resets it to [`HOLDOFF_BASE_NS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentionGuard {
    regime: Regime,
    holdoff_ns: u64,
    epoch_spun_ns: u64,
    epoch_stolen_ns: u64,
    epoch_stalls: u64,
    /// When the epoch in progress began (its first spin), for the spinning share.
    epoch_began_ns: Option<u64>,
    /// The epoch in progress started after a hold-off (a probe).
    probing: bool,
    /// The typical wait for a packet (weight 1/8 per observation), 0 before the first.
    typical_gap_ns: u64,
    /// Contended epochs in a row so far (see [`CONTENDED_EPOCHS`]).
    contended_in_a_row: u32,
}

impl Default for ContentionGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentionGuard {
    /// A guard that starts out spinning.
    pub const fn new() -> Self {
        Self {
            regime: Regime::Spinning,
            holdoff_ns: HOLDOFF_BASE_NS,
            epoch_spun_ns: 0,
            epoch_stolen_ns: 0,
            epoch_stalls: 0,
            epoch_began_ns: None,
            probing: false,
            typical_gap_ns: 0,
            contended_in_a_row: 0,
        }
    }

    /// The regime at `now_ns`: a hold-off that has run out turns into a probe (spinning).
    pub fn regime(&mut self, now_ns: u64) -> Regime {
        if let Regime::Yielding { until_ns } = self.regime
            && now_ns >= until_ns
        {
            self.regime = Regime::Spinning;
            self.probing = true;
            self.reset_epoch();
        }
        self.regime
    }

    fn reset_epoch(&mut self) {
        self.epoch_spun_ns = 0;
        self.epoch_stolen_ns = 0;
        self.epoch_stalls = 0;
        self.epoch_began_ns = None;
    }

    /// How long the loop may spin after its last packet at `now_ns`, given the polling
    /// window's current length: the window itself, or nothing while yielding.
    pub fn window_ns(&mut self, now_ns: u64, window_ns: u64) -> u64 {
        match self.regime(now_ns) {
            Regime::Spinning => window_ns,
            Regime::Yielding { .. } => 0,
        }
    }

    /// The typical wait for a packet so far (0 before the first).
    pub const fn typical_gap_ns(&self) -> u64 {
        self.typical_gap_ns
    }

    /// The current hold-off length.
    pub const fn holdoff_ns(&self) -> u64 {
        self.holdoff_ns
    }

    /// Records that a packet arrived `gap_ns` after the loop's last activity. `while_spinning`:
    /// the loop was spinning all along (only then can a long wait be blamed on the host rather
    /// than on the loop's own wake-up). Returns whether it was a stall.
    pub fn observe_gap(&mut self, gap_ns: u64, while_spinning: bool) -> bool {
        let typical = self.typical_gap_ns;
        if while_spinning
            && typical > 0
            && gap_ns >= typical.saturating_mul(STALL_FACTOR).max(STALL_MIN_NS)
        {
            // A stall says nothing about the usual pace: it stays out of the mean.
            self.epoch_stalls += 1;
            return true;
        }
        self.typical_gap_ns = if typical == 0 {
            gap_ns.max(1)
        } else if gap_ns >= typical {
            typical + (gap_ns - typical) / 8
        } else {
            typical - (typical - gap_ns) / 8
        };
        false
    }

    /// Records one stretch of spinning that ended at `now_ns`: `spun_ns` long in all, of which
    /// the host took `stolen_ns`. Ends the epoch when it is long enough.
    pub fn after_spin(&mut self, now_ns: u64, spun_ns: u64, stolen_ns: u64) -> Verdict {
        if self.regime != Regime::Spinning {
            return Verdict::Unchanged;
        }
        let began = *self
            .epoch_began_ns
            .get_or_insert(now_ns.saturating_sub(spun_ns));
        self.epoch_spun_ns = self.epoch_spun_ns.saturating_add(spun_ns);
        self.epoch_stolen_ns = self.epoch_stolen_ns.saturating_add(stolen_ns.min(spun_ns));
        if self.epoch_spun_ns < SPIN_EPOCH_NS {
            return Verdict::Unchanged;
        }
        let wall_ns = now_ns.saturating_sub(began).max(self.epoch_spun_ns);
        let waiting = self.epoch_spun_ns.saturating_mul(SPIN_SHARE_DIVISOR) >= wall_ns;
        let stolen =
            self.epoch_stolen_ns.saturating_mul(STOLEN_SHARE_DIVISOR) >= self.epoch_spun_ns;
        let contended = waiting && (stolen || self.epoch_stalls > 0);
        let was_probe = self.probing;
        self.reset_epoch();
        self.probing = false;
        if !contended {
            self.contended_in_a_row = 0;
        }
        if contended {
            self.contended_in_a_row += 1;
            if !was_probe && self.contended_in_a_row < CONTENDED_EPOCHS {
                return Verdict::Unchanged;
            }
            self.contended_in_a_row = 0;
            if was_probe {
                self.holdoff_ns = self.holdoff_ns.saturating_mul(2).min(HOLDOFF_MAX_NS);
            }
            self.regime = Regime::Yielding {
                until_ns: now_ns.saturating_add(self.holdoff_ns),
            };
            Verdict::StartedYielding
        } else if self.holdoff_ns != HOLDOFF_BASE_NS {
            self.holdoff_ns = HOLDOFF_BASE_NS;
            Verdict::Cleared
        } else {
            Verdict::Unchanged
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_quiet_host_keeps_spinning() {
        let mut guard = ContentionGuard::new();
        // A steal of 1/10 of the spinning time: below the 1/8 share.
        for step in 0..100 {
            assert!(!guard.observe_gap(30 * US, true));
            assert_eq!(
                guard.after_spin(step * 100 * US, 100 * US, 10 * US),
                Verdict::Unchanged
            );
            assert_eq!(guard.window_ns(step * 100 * US, 200 * US), 200 * US);
        }
    }

    #[test]
    fn a_contended_epoch_caps_the_window_for_the_holdoff_then_probes() {
        let mut guard = ContentionGuard::new();
        for _ in 0..50 {
            guard.observe_gap(20 * US, true);
        }
        assert_eq!(guard.typical_gap_ns(), 20 * US);
        // 1.9 ms of spinning with 0.5 ms stolen: the epoch is not over yet.
        assert_eq!(
            guard.after_spin(10 * MS, 1900 * US, 500 * US),
            Verdict::Unchanged
        );
        assert_eq!(guard.window_ns(10 * MS, 200 * US), 200 * US);
        // One contended epoch is one strike: still spinning.
        assert_eq!(guard.after_spin(11 * MS, 100 * US, 0), Verdict::Unchanged);
        assert_eq!(guard.window_ns(11 * MS, 200 * US), 200 * US);
        // The second in a row starts the hold-off.
        assert_eq!(
            guard.after_spin(13 * MS, 2 * MS, 500 * US),
            Verdict::StartedYielding
        );
        // Stolen time: no spinning at all until the hold-off ends.
        assert_eq!(guard.window_ns(13 * MS, 200 * US), 0);
        assert_eq!(guard.window_ns(13 * MS + HOLDOFF_BASE_NS - 1, 200 * US), 0);
        // Spinning reported while yielding (a spell that began before) changes nothing.
        assert_eq!(
            guard.after_spin(14 * MS, 5 * MS, 5 * MS),
            Verdict::Unchanged
        );
        assert_eq!(
            guard.window_ns(13 * MS + HOLDOFF_BASE_NS, 200 * US),
            200 * US
        );
    }

    #[test]
    fn a_stall_while_spinning_is_contention_and_stays_out_of_the_mean() {
        let mut guard = ContentionGuard::new();
        for _ in 0..20 {
            assert!(!guard.observe_gap(25 * US, true));
        }
        // Eight typical gaps but under the 250 us minimum: not a stall.
        assert!(!guard.observe_gap(240 * US, true));
        let typical = guard.typical_gap_ns();
        assert!(typical > 25 * US && typical < 60 * US, "{typical}");
        // A 3 ms wait after a halt is the loop's own doing: folded in, not a stall.
        assert!(!guard.observe_gap(3 * MS, false));
        let after_halt = guard.typical_gap_ns();
        assert!(after_halt > typical);
        // A wait of over eight typical gaps while spinning is a stall; the mean does not move.
        assert!(guard.observe_gap(after_halt * STALL_FACTOR, true));
        assert_eq!(guard.typical_gap_ns(), after_halt);
        // No steal at all, yet the epoch is contended: one strike.
        assert_eq!(guard.after_spin(5 * MS, 3 * MS, 0), Verdict::Unchanged);
        // A stall in the next epoch too: no spinning for the hold-off.
        assert!(guard.observe_gap(after_halt * STALL_FACTOR, true));
        assert_eq!(
            guard.after_spin(8 * MS, 3 * MS, 0),
            Verdict::StartedYielding
        );
        assert_eq!(guard.window_ns(8 * MS, 100 * MS), 0);
    }

    #[test]
    fn a_lone_stall_in_a_quiet_stretch_never_yields() {
        let mut guard = ContentionGuard::new();
        for _ in 0..50 {
            guard.observe_gap(30 * US, true);
        }
        // A blocking client woken late now and then: one stall, then clean epochs; again.
        let mut now = 0;
        for _ in 0..10 {
            assert!(guard.observe_gap(MS, true));
            now += 3 * MS;
            assert_eq!(guard.after_spin(now, 3 * MS, 0), Verdict::Unchanged);
            now += 3 * MS;
            assert_eq!(guard.after_spin(now, 3 * MS, 0), Verdict::Unchanged);
            assert_eq!(guard.regime(now), Regime::Spinning);
        }
        // Stalls in two epochs in a row: the host is contended.
        assert!(guard.observe_gap(MS, true));
        assert_eq!(
            guard.after_spin(now + 3 * MS, 3 * MS, 0),
            Verdict::Unchanged
        );
        assert!(guard.observe_gap(MS, true));
        assert_eq!(
            guard.after_spin(now + 6 * MS, 3 * MS, 0),
            Verdict::StartedYielding
        );
    }

    #[test]
    fn the_first_gap_sets_the_mean_and_then_it_moves_by_an_eighth() {
        let mut guard = ContentionGuard::new();
        guard.observe_gap(80 * US, false);
        assert_eq!(guard.typical_gap_ns(), 80 * US);
        guard.observe_gap(0, false);
        assert_eq!(guard.typical_gap_ns(), 70 * US);
        guard.observe_gap(150 * US, false);
        assert_eq!(guard.typical_gap_ns(), 80 * US);
    }

    #[test]
    fn contended_probes_double_the_holdoff_and_a_clean_one_resets_it() {
        let mut guard = ContentionGuard::new();
        let mut now = 0;
        let mut holdoffs = Vec::new();
        // The first strike; every later contended epoch is a probe's, which yields at once.
        assert_eq!(guard.after_spin(0, 3100 * US, 3 * MS), Verdict::Unchanged);
        for _ in 0..8 {
            assert_eq!(guard.regime(now), Regime::Spinning);
            // One whole-slice steal: 3 ms of the 3.1 ms spun.
            assert_eq!(
                guard.after_spin(now, 3100 * US, 3 * MS),
                Verdict::StartedYielding
            );
            holdoffs.push(guard.holdoff_ns() / MS);
            now += guard.holdoff_ns();
        }
        assert_eq!(holdoffs, [50, 100, 200, 400, 800, 1600, 1600, 1600]);
        assert_eq!(guard.regime(now), Regime::Spinning);
        assert_eq!(guard.after_spin(now, SPIN_EPOCH_NS, 0), Verdict::Cleared);
        assert_eq!(guard.holdoff_ns(), HOLDOFF_BASE_NS);
        assert_eq!(guard.regime(now + 1), Regime::Spinning);
    }

    #[test]
    fn the_first_contended_epoch_after_a_clean_one_uses_the_base_holdoff() {
        let mut guard = ContentionGuard::new();
        guard.after_spin(0, 3 * MS, 3 * MS);
        assert_eq!(
            guard.after_spin(3 * MS, 3 * MS, 3 * MS),
            Verdict::StartedYielding
        );
        guard.regime(3 * MS + HOLDOFF_BASE_NS);
        guard.after_spin(3 * MS + HOLDOFF_BASE_NS, 3 * MS, 3 * MS);
        assert_eq!(guard.holdoff_ns(), 2 * HOLDOFF_BASE_NS);
        // The next probe is clean; much later the host is contended again (not a probe).
        let probe_at = 4 * HOLDOFF_BASE_NS;
        assert_eq!(guard.regime(probe_at), Regime::Spinning);
        assert_eq!(guard.after_spin(probe_at, 3 * MS, 0), Verdict::Cleared);
        assert_eq!(
            guard.after_spin(probe_at + MS, 3 * MS, 2 * MS),
            Verdict::Unchanged
        );
        assert_eq!(
            guard.after_spin(probe_at + 4 * MS, 3 * MS, 2 * MS),
            Verdict::StartedYielding
        );
        assert_eq!(
            guard.regime(probe_at + 4 * MS),
            Regime::Yielding {
                until_ns: probe_at + 4 * MS + HOLDOFF_BASE_NS
            }
        );
    }

    #[test]
    fn a_loop_busy_with_a_flood_never_yields_for_stalls() {
        let mut guard = ContentionGuard::new();
        for _ in 0..50 {
            guard.observe_gap(5 * US, true);
        }
        // A 1 ms host hiccup in every 5 ms of a flood that keeps the loop busy 70% of the time.
        let mut now = 0;
        for _ in 0..20 {
            assert!(guard.observe_gap(MS, true));
            now += 5 * MS;
            assert_eq!(guard.after_spin(now, 1500 * US, 0), Verdict::Unchanged);
            assert_eq!(guard.window_ns(now, 200 * US), 200 * US);
        }
    }

    #[test]
    fn a_loop_busy_with_a_flood_never_yields_for_stolen_time() {
        let mut guard = ContentionGuard::new();
        // 100 us of spinning (half of it stolen) in every 300 us: mostly busy with packets.
        let mut now = 0;
        for _ in 0..100 {
            now += 300 * US;
            assert_eq!(guard.after_spin(now, 100 * US, 50 * US), Verdict::Unchanged);
            assert_eq!(guard.regime(now), Regime::Spinning);
        }
        // The same steal share while mostly waiting (100 us of spinning in every 150 us).
        for _ in 0..100 {
            now += 150 * US;
            if guard.after_spin(now, 100 * US, 50 * US) == Verdict::StartedYielding {
                return;
            }
        }
        panic!("a waiting loop with half its spinning stolen never yielded");
    }

    #[test]
    fn stolen_time_beyond_the_spun_time_and_huge_values_do_not_overflow() {
        let mut guard = ContentionGuard::new();
        guard.observe_gap(u64::MAX, true);
        assert!(guard.observe_gap(u64::MAX, true));
        assert_eq!(guard.typical_gap_ns(), u64::MAX);
        assert_eq!(
            guard.after_spin(u64::MAX, u64::MAX, u64::MAX),
            Verdict::Unchanged
        );
        assert_eq!(
            guard.after_spin(u64::MAX, u64::MAX, u64::MAX),
            Verdict::StartedYielding
        );
        assert_eq!(guard.regime(0), Regime::Yielding { until_ns: u64::MAX });
        assert_eq!(guard.regime(u64::MAX), Regime::Spinning);
    }

    #[test]
    fn starts_at_the_base() {
        let window = PollWindow::new(200 * US);
        assert_eq!(window.current_ns(), 200 * US);
        assert_eq!(window.max_ns(), 6400 * US);
    }

    #[test]
    fn premature_halts_double_it_up_to_the_maximum() {
        let mut window = PollWindow::new(200 * US);
        let mut seen = Vec::new();
        for _ in 0..8 {
            window.after_halt(50 * US, true);
            seen.push(window.current_ns() / US);
        }
        assert_eq!(seen, [400, 800, 1600, 3200, 6400, 6400, 6400, 6400]);
    }

    #[test]
    fn a_halt_longer_than_the_window_or_without_a_packet_changes_nothing() {
        let mut window = PollWindow::new(200 * US);
        assert_eq!(window.after_halt(300 * US, true), HaltOutcome::Kept);
        assert_eq!(window.after_halt(10 * US, false), HaltOutcome::Kept);
        assert_eq!(window.current_ns(), 200 * US);
    }

    #[test]
    fn long_halts_halve_it_back_to_the_base_and_no_further() {
        let mut window = PollWindow::new(200 * US);
        for _ in 0..5 {
            window.after_halt(US, true);
        }
        assert_eq!(window.current_ns(), 6400 * US);
        let mut seen = Vec::new();
        for _ in 0..7 {
            window.after_halt(10_000 * US, false);
            seen.push(window.current_ns() / US);
        }
        assert_eq!(seen, [3200, 1600, 800, 400, 200, 200, 200]);
    }

    #[test]
    fn a_zero_base_never_polls_and_never_grows() {
        let mut window = PollWindow::new(0);
        assert_eq!(window.after_halt(0, true), HaltOutcome::Kept);
        assert_eq!(window.current_ns(), 0);
    }

    #[test]
    fn huge_bases_saturate_instead_of_overflowing() {
        let mut window = PollWindow::new(u64::MAX / 4);
        assert_eq!(window.max_ns(), u64::MAX);
        assert_eq!(window.after_halt(1, true), HaltOutcome::Grew);
        assert_eq!(window.current_ns(), (u64::MAX / 4) * 2);
    }
}
