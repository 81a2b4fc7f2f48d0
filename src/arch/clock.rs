//! The monotonic clock: nanoseconds since calibration from the TSC, calibrated against the
//! ACPI PM timer (or PIT channel 2 when there is none).

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
            Self::PitSilent => {
                f.write_str("the reference timer did not count; cannot calibrate the TSC")
            }
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

/// What the TSC was calibrated against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// The ACPI PM timer (3.579545 MHz), read back around TSC samples.
    PmTimer,
    /// PIT channel 2 one-shots (median of five).
    Pit,
}

impl core::fmt::Display for Reference {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::PmTimer => "the ACPI PM timer",
            Self::Pit => "PIT channel 2, median of 5 windows",
        })
    }
}

const PM_TIMER_HZ: u64 = 3_579_545;
const PM_TIMER_MASK: u32 = 0x00ff_ffff;

/// One paired reading: (TSC before, PM timer, TSC after).
fn pm_sample(port: u16) -> (u64, u32, u64) {
    let before = rdtsc();
    let timer = super::inl(port) & PM_TIMER_MASK;
    let after = rdtsc();
    (before, timer, after)
}

/// The tightest of a few paired readings: its TSC midpoint and the PM timer value.
fn pm_best_sample(port: u16) -> (u64, u32) {
    let mut best = pm_sample(port);
    for _ in 0..4 {
        let sample = pm_sample(port);
        if sample.2 - sample.0 < best.2 - best.0 {
            best = sample;
        }
    }
    (best.0 + (best.2 - best.0) / 2, best.1)
}

/// Calibrates against the PM timer: two tight (TSC, timer) pairs 10 ms apart. Both clocks keep
/// running if the vCPU is descheduled between the pairs, so a busy host does not skew the
/// result (only a deschedule inside one pair would, and the tightest of five pairs is used).
fn calibrate_pm_timer(port: u16) -> Result<(u64, u64), ClockError> {
    let (start_tsc, start_timer) = pm_best_sample(port);
    let window = (PM_TIMER_HZ / 100) as u32;
    let mut polls: u64 = 0;
    loop {
        let now = super::inl(port) & PM_TIMER_MASK;
        if now.wrapping_sub(start_timer) & PM_TIMER_MASK >= window {
            break;
        }
        polls += 1;
        if polls > 50_000_000 {
            return Err(ClockError::PitSilent);
        }
    }
    let (end_tsc, end_timer) = pm_best_sample(port);
    let elapsed_timer = u64::from(end_timer.wrapping_sub(start_timer) & PM_TIMER_MASK);
    if elapsed_timer == 0 {
        return Err(ClockError::PitSilent);
    }
    Ok((
        (end_tsc - start_tsc) * PM_TIMER_HZ / elapsed_timer,
        start_tsc,
    ))
}

/// Calibrates the TSC (against the ACPI PM timer when the FADT names one, else PIT channel 2)
/// and starts the clock. Returns the TSC frequency and the reference used.
///
/// Under an emulator on a busy host the vCPU can be descheduled at any moment. The PM timer
/// method reads both clocks back and is immune to that; the PIT fallback waits for a one-shot
/// to expire, which a deschedule stretches, so it takes the median of five windows.
pub fn init(pm_timer_port: Option<u16>) -> Result<(u64, Reference), ClockError> {
    let (hz, start, reference) = match pm_timer_port {
        Some(port) => {
            let (hz, start) = calibrate_pm_timer(port)?;
            (hz, start, Reference::PmTimer)
        }
        None => {
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
            (samples[samples.len() / 2], first_start, Reference::Pit)
        }
    };
    if !(50_000_000..=20_000_000_000).contains(&hz) {
        return Err(ClockError::Implausible { hz });
    }
    let fixed = ((1_000_000_000u128 << 32) / u128::from(hz)) as u64;
    NS_PER_TICK_FIXED.store(fixed, Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_AT_ZERO.store(start, Ordering::Relaxed);
    Ok((hz, reference))
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
