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

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

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
