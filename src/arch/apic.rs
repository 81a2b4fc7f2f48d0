//! The local APIC (x2APIC through MSRs when CPUID offers it, else xAPIC through its uncached
//! MMIO page), the masked legacy PIC, and the local APIC timer.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use x86_64::registers::model_specific::Msr;

use super::{clock, cpuid, interrupts, outb};
use crate::mem;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;

/// Register offsets in the xAPIC page (Intel SDM vol. 3, table 11-1); x2APIC uses
/// MSR 0x800 + offset / 16.
mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TASK_PRIORITY: u32 = 0x80;
    pub const END_OF_INTERRUPT: u32 = 0xb0;
    pub const SPURIOUS_VECTOR: u32 = 0xf0;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL_COUNT: u32 = 0x380;
    pub const TIMER_CURRENT_COUNT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
}

const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const SVR_APIC_ENABLE: u32 = 1 << 8;

const MODE_NONE: u8 = 0;
const MODE_XAPIC: u8 = 1;
const MODE_X2APIC: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
/// Identity-mapped address of the xAPIC page (xAPIC mode only).
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
/// Timer ticks counted by the APIC timer interrupt.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// APIC timer input clock in Hz (after the divide-by-16).
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// What `init` found.
#[derive(Clone, Copy, Debug)]
pub struct ApicInfo {
    /// `true` for x2APIC, `false` for xAPIC.
    pub x2apic: bool,
    /// This CPU's APIC id.
    pub id: u32,
    /// Version register's low byte.
    pub version: u8,
}

/// Errors while bringing the APIC up.
#[derive(Clone, Copy, Debug)]
pub enum ApicError {
    /// CPUID says there is no local APIC.
    NotPresent,
    /// The xAPIC page could not be mapped.
    Map(mem::MapError),
    /// The timer did not count during calibration.
    TimerDead,
}

impl core::fmt::Display for ApicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotPresent => f.write_str("CPUID reports no local APIC"),
            Self::Map(error) => write!(f, "cannot map the xAPIC page: {error}"),
            Self::TimerDead => f.write_str("the local APIC timer does not count"),
        }
    }
}

fn read(register: u32) -> u32 {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => {
            // SAFETY: x2APIC mode is enabled, so MSRs 0x800.. exist; `register` is one of the
            // documented offsets above.
            unsafe { Msr::new(X2APIC_MSR_BASE + register / 16).read() as u32 }
        }
        _ => {
            let address = XAPIC_BASE.load(Ordering::Relaxed) + u64::from(register);
            // SAFETY: XAPIC_BASE is the uncached identity mapping of the APIC page made by
            // `init` before MODE became XAPIC, and `register` is an aligned offset inside it.
            unsafe { core::ptr::read_volatile(address as *const u32) }
        }
    }
}

fn write(register: u32, value: u32) {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => {
            // SAFETY: as in `read`; writes to APIC registers do not affect memory safety.
            unsafe { Msr::new(X2APIC_MSR_BASE + register / 16).write(u64::from(value)) }
        }
        _ => {
            let address = XAPIC_BASE.load(Ordering::Relaxed) + u64::from(register);
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(address as *mut u32, value) }
        }
    }
}

/// Remaps the legacy 8259 PICs to vectors 0x20..0x2f (away from the exceptions) and masks them.
fn mask_legacy_pic() {
    let base = interrupts::PIC_VECTOR_BASE;
    outb(0x20, 0x11); // ICW1: edge, cascade, ICW4 follows
    outb(0xa0, 0x11);
    outb(0x21, base); // ICW2: vector offsets
    outb(0xa1, base + 8);
    outb(0x21, 0x04); // ICW3: slave on IRQ2
    outb(0xa1, 0x02);
    outb(0x21, 0x01); // ICW4: 8086 mode
    outb(0xa1, 0x01);
    outb(0x21, 0xff); // mask everything
    outb(0xa1, 0xff);
}

/// Masks the PIC and enables the local APIC (x2APIC when available).
pub fn init() -> Result<ApicInfo, ApicError> {
    mask_legacy_pic();
    let (_, _, features_ecx, features_edx) = cpuid(1);
    if features_edx & (1 << 9) == 0 {
        return Err(ApicError::NotPresent);
    }
    let mut apic_base_msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (checked above).
    let apic_base = unsafe { apic_base_msr.read() };
    let x2apic = features_ecx & (1 << 21) != 0;
    if x2apic {
        // SAFETY: CPUID offers x2APIC; enabling it (global enable first, then EXTD) is the
        // documented sequence and changes no memory mappings.
        unsafe {
            apic_base_msr.write(apic_base | APIC_BASE_ENABLE);
            apic_base_msr.write(apic_base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
        MODE.store(MODE_X2APIC, Ordering::Relaxed);
    } else {
        let physical = apic_base & 0x000f_ffff_ffff_f000;
        let virtual_address = mem::map_mmio(physical, 4096).map_err(ApicError::Map)?;
        XAPIC_BASE.store(virtual_address, Ordering::Relaxed);
        // SAFETY: as above, for the xAPIC global enable bit.
        unsafe { apic_base_msr.write(apic_base | APIC_BASE_ENABLE) };
        MODE.store(MODE_XAPIC, Ordering::Relaxed);
    }
    write(reg::TASK_PRIORITY, 0);
    write(reg::LVT_LINT0, LVT_MASKED);
    write(reg::LVT_LINT1, LVT_MASKED);
    write(reg::LVT_ERROR, LVT_MASKED);
    write(reg::LVT_TIMER, LVT_MASKED);
    write(
        reg::SPURIOUS_VECTOR,
        SVR_APIC_ENABLE | u32::from(interrupts::SPURIOUS_VECTOR),
    );
    let id = if x2apic {
        read(reg::ID)
    } else {
        read(reg::ID) >> 24
    };
    Ok(ApicInfo {
        x2apic,
        id,
        version: read(reg::VERSION) as u8,
    })
}

/// Signals end of interrupt to the local APIC.
pub fn end_of_interrupt() {
    write(reg::END_OF_INTERRUPT, 0);
}

/// This CPU's APIC id (the MSI destination).
pub fn id() -> u32 {
    if MODE.load(Ordering::Relaxed) == MODE_X2APIC {
        read(reg::ID)
    } else {
        read(reg::ID) >> 24
    }
}

fn timer_interrupt(_vector: u8) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    crate::selftest::on_timer_tick();
}

/// Timer interrupts so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The address of the tick counter, for the self test's assembly probe.
pub fn ticks_address() -> *const u64 {
    TICKS.as_ptr()
}

/// Measures the APIC timer's input rate against the calibrated TSC clock, installs the timer
/// handler and leaves the timer stopped, in one-shot mode. Returns the input frequency in Hz.
///
/// Vireo is tickless: nothing runs the timer periodically. The network loop arms a one-shot
/// ([`arm_oneshot_ns`]) only before it halts, for the nearest deadline it has (the stack's next
/// timer, housekeeping). A periodic tick would be worse than useless in poll mode: the loop runs
/// with interrupts disabled, so a tick stays pending in the APIC, and under QEMU's TCG a pending
/// interrupt makes the vCPU thread take QEMU's global lock at every translated-block exit,
/// stalling against the I/O thread (measured: 1.2 vCPU sleeps per echoed packet, p50 RTT 95 us
/// instead of 53 us over a tap; see the README's benchmark section).
pub fn calibrate_timer() -> Result<u64, ApicError> {
    interrupts::register_irq(interrupts::TIMER_VECTOR, timer_interrupt)
        .map_err(|_| ApicError::TimerDead)?;
    write(reg::TIMER_DIVIDE, 0b0011); // divide by 16
    write(reg::LVT_TIMER, LVT_MASKED);
    write(reg::TIMER_INITIAL_COUNT, u32::MAX);
    clock::spin_for_ns(2_000_000);
    let elapsed = u32::MAX - read(reg::TIMER_CURRENT_COUNT);
    // Stopped (an initial count of 0 stops it) in one-shot mode, unmasked: arming is then one
    // register write, the count (under QEMU each APIC write is an exit under its global lock).
    write(reg::TIMER_INITIAL_COUNT, 0);
    write(reg::LVT_TIMER, u32::from(interrupts::TIMER_VECTOR));
    if elapsed == 0 {
        return Err(ApicError::TimerDead);
    }
    let timer_hz = u64::from(elapsed) * 500;
    TIMER_HZ.store(timer_hz, Ordering::Relaxed);
    Ok(timer_hz)
}

/// Starts the timer periodic at `hz` interrupts per second (the self test's tick; the network
/// loop never uses it). [`calibrate_timer`] must have succeeded.
pub fn start_periodic(hz: u64) {
    let period = (TIMER_HZ.load(Ordering::Relaxed) / hz.max(1)).clamp(1, u64::from(u32::MAX));
    write(
        reg::LVT_TIMER,
        LVT_TIMER_PERIODIC | u32::from(interrupts::TIMER_VECTOR),
    );
    write(reg::TIMER_INITIAL_COUNT, period as u32);
}

/// Arms a one-shot timer interrupt `ns` nanoseconds from now (at least one timer count, at most
/// the counter's range: 2^32 counts, over a minute at QEMU's rate). Re-arming replaces the
/// previous deadline. [`calibrate_timer`] must have succeeded, and [`start_periodic`] must not
/// have run since (the self test's tick, which exits the kernel when done).
pub fn arm_oneshot_ns(ns: u64) {
    let counts = (u128::from(ns) * u128::from(TIMER_HZ.load(Ordering::Relaxed)) / 1_000_000_000)
        .clamp(1, u128::from(u32::MAX));
    write(reg::TIMER_INITIAL_COUNT, counts as u32);
}
