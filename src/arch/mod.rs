//! The CPU: port I/O, CPUID, the TSC, the spin hint, QEMU exit, and the submodules for
//! descriptor tables, interrupts, the local APIC and the clock. Everything in here is platform
//! code and may use `unsafe`; each block says why it is sound.
//!
//! Instructions come from the `x86_64` crate (port I/O, MSRs, control registers, descriptor
//! tables, `hlt`/`sti`/`cli`) or from `core::arch` (CPUID, RDTSC). The only assembly left is
//! what neither can express on stable Rust: the naked interrupt entry stubs and the page-fault
//! probe (`interrupts`), the C memory functions (`mem::rt`), the boot code (`boot/entry.S`) and
//! the self test's probes.

pub mod apic;
pub mod clock;
pub mod entropy;
pub mod gdt;
pub mod interrupts;
pub mod ioapic;

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::instructions::port::Port;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: port reads have no memory effects; every port Vireo reads (COM1, PIT, PIC, PCI
    // 0xCFC, ACPI PM timer) has no read side effects that could break memory safety.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: see `inb`; the ports Vireo writes control devices that do not DMA into memory we
    // have not handed them.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { Port::<u16>::new(port).write(value) }
}

/// Reads a 32-bit dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for `inb`.
    unsafe { Port::<u32>::new(port).read() }
}

/// Writes a 32-bit dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { Port::<u32>::new(port).write(value) }
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    // CPUID exists on every x86_64 CPU and has no side effects.
    let result = core::arch::x86_64::__cpuid_count(leaf, 0);
    (result.eax, result.ebx, result.ecx, result.edx)
}

/// The hypervisor the kernel runs under, from CPUID leaf 0x4000_0000's vendor signature
/// (present when CPUID.1:ECX bit 31, "hypervisor", is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// No hypervisor bit: bare metal (or a hypervisor that hides itself).
    None,
    /// QEMU's TCG emulator (`TCGTCGTCGTCG`).
    QemuTcg,
    /// KVM (`KVMKVMKVM`).
    Kvm,
    /// Another signature, as the 12 bytes CPUID returned.
    Other([u8; 12]),
}

impl Hypervisor {
    /// Reads CPUID.
    pub fn detect() -> Hypervisor {
        let (_, _, features_ecx, _) = cpuid(1);
        if features_ecx & (1 << 31) == 0 {
            return Hypervisor::None;
        }
        let (_, ebx, ecx, edx) = cpuid(0x4000_0000);
        let mut signature = [0u8; 12];
        signature[..4].copy_from_slice(&ebx.to_le_bytes());
        signature[4..8].copy_from_slice(&ecx.to_le_bytes());
        signature[8..].copy_from_slice(&edx.to_le_bytes());
        match &signature {
            b"TCGTCGTCGTCG" => Hypervisor::QemuTcg,
            b"KVMKVMKVM\0\0\0" => Hypervisor::Kvm,
            _ => Hypervisor::Other(signature),
        }
    }
}

impl core::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Hypervisor::None => f.write_str("none"),
            Hypervisor::QemuTcg => f.write_str("QEMU TCG"),
            Hypervisor::Kvm => f.write_str("KVM"),
            Hypervisor::Other(signature) => {
                f.write_str("'")?;
                for &byte in signature.iter().filter(|&&b| b != 0) {
                    let shown = if byte.is_ascii_graphic() {
                        byte as char
                    } else {
                        '?'
                    };
                    f.write_char(shown)?;
                }
                f.write_str("'")
            }
        }
    }
}

/// Whether [`spin_hint`] executes PAUSE. Cleared under QEMU's TCG by [`init_spin_hint`].
static PAUSE_IN_SPIN_LOOPS: AtomicBool = AtomicBool::new(true);

/// Chooses the busy-wait hint for `hypervisor`. On hardware and under KVM, PAUSE is right: it
/// saves power, yields the core to an SMT sibling, and lets KVM's pause-loop exiting notice a
/// spinning vCPU. Under QEMU's TCG it is harmful: TCG ends the translated block at PAUSE and
/// returns to the vCPU thread's outer loop, which takes QEMU's global lock every time, so a
/// poll loop contends for that lock with the I/O thread that is delivering its packets
/// (measured: 1.2 vCPU sleeps per echoed packet and p50 RTT 75 us with PAUSE, no sleeps and
/// 53 us without, over a tap; README, Benchmarks). Returns whether PAUSE is used.
pub fn init_spin_hint(hypervisor: Hypervisor) -> bool {
    let pause = hypervisor != Hypervisor::QemuTcg;
    PAUSE_IN_SPIN_LOOPS.store(pause, Ordering::Relaxed);
    pause
}

/// The hint inside a busy-wait loop: PAUSE, or nothing under TCG (see [`init_spin_hint`]).
#[inline(always)]
pub fn spin_hint() {
    if PAUSE_IN_SPIN_LOOPS.load(Ordering::Relaxed) {
        core::hint::spin_loop();
    }
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged-safe and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// QEMU's isa-debug-exit port (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// How the guest ends a QEMU run. QEMU exits with status `(value << 1) | 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Status 33: the run succeeded (self tests passed).
    Success = 0x10,
    /// Status 35: a fatal error, after a `PANIC:` line.
    Failure = 0x11,
}

/// Ends the QEMU run. Without the isa-debug-exit device the CPU halts with interrupts off.
pub fn exit_qemu(code: ExitCode) -> ! {
    outl(DEBUG_EXIT_PORT, code as u32);
    halt_forever()
}

/// Halts with interrupts disabled, forever.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// The idle path: enables interrupts and halts until the next one, atomically (`sti; hlt`), so
/// that an interrupt arriving between the check and the halt cannot be missed.
pub fn idle_until_interrupt() {
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}
