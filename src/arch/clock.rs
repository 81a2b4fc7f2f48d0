//! The monotonic clock: nanoseconds since calibration from the TSC, calibrated against PIT
//! channel 2 (median of five windows).

use core::sync::atomic::{AtomicU64, Ordering};

use super::{inb, outb, rdtsc};

/// TSC value at calibration (time zero).
static TSC_AT_ZERO: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point multiplier.
static NS_PER_TICK_FIXED: AtomicU64 = AtomicU64::new(0);
/// TSC frequency in Hz.
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 5;

/// Calibration failures.
#[derive(Clone, Copy, Debug)]
pub enum ClockError {
    /// PIT channel 2 never reached its terminal count.
    PitSilent,
    /// The measured frequency is not plausible for an x86_64 TSC.
    Implausible {
        /// What was measured.
        hz: u64,
    },
}

impl core::fmt::Display for ClockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::PitSilent => f.write_str("PIT channel 2 did not count; cannot calibrate the TSC"),
            Self::Implausible { hz } => write!(f, "TSC frequency {hz} Hz is implausible"),
        }
    }
}

/// One PIT channel 2 one-shot of `CALIBRATION_MS` (gate through port 0x61, speaker off):
/// TSC ticks elapsed, and the TSC value at the start.
fn pit_window() -> Result<(u64, u64), ClockError> {
    let latch = PIT_HZ * CALIBRATION_MS / 1000;
    let port61 = inb(0x61);
    outb(0x61, (port61 & !0x02) | 0x01); // gate high, speaker off
    outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let start = rdtsc();
    let mut polls: u64 = 0;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 50_000_000 {
            outb(0x61, port61);
            return Err(ClockError::PitSilent);
        }
    }
    let end = rdtsc();
    outb(0x61, port61);
    Ok((end - start, start))
}

/// Calibrates the TSC against PIT channel 2 and starts the clock. Returns the TSC frequency.
///
/// Under an emulator on a busy host the vCPU can be descheduled inside a window, which
/// stretches (or, before the start is read, shrinks) that window's TSC count. So it measures
/// five 5 ms windows and takes the median.
pub fn init() -> Result<u64, ClockError> {
    let mut samples = [0u64; 5];
    let mut first_start = 0;
    for (index, sample) in samples.iter_mut().enumerate() {
        let (ticks, start) = pit_window()?;
        if index == 0 {
            first_start = start;
        }
        *sample = ticks * 1000 / CALIBRATION_MS;
    }
    samples.sort_unstable();
    let hz = samples[samples.len() / 2];
    if !(50_000_000..=20_000_000_000).contains(&hz) {
        return Err(ClockError::Implausible { hz });
    }
    let fixed = ((1_000_000_000u128 << 32) / u128::from(hz)) as u64;
    NS_PER_TICK_FIXED.store(fixed, Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_AT_ZERO.store(first_start, Ordering::Relaxed);
    Ok(hz)
}

/// Nanoseconds since calibration. Monotonic (the TSC never goes back on one CPU).
#[inline]
pub fn now_ns() -> u64 {
    let ticks = rdtsc().wrapping_sub(TSC_AT_ZERO.load(Ordering::Relaxed));
    ((u128::from(ticks) * u128::from(NS_PER_TICK_FIXED.load(Ordering::Relaxed))) >> 32) as u64
}

/// The calibrated TSC frequency in Hz (0 before `init`).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Busy-waits for `ns` nanoseconds.
pub fn spin_for_ns(ns: u64) {
    let deadline = now_ns().saturating_add(ns);
    while now_ns() < deadline {
        core::hint::spin_loop();
    }
}
