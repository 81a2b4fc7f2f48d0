//! The IDT, the naked interrupt entry stubs, and the dispatcher: exceptions (report and exit, or
//! resume for #BP and for the page-fault probe), device interrupts (registered handlers, EOI).
//!
//! Entry: each vector has a naked stub that pushes a dummy error code where the CPU pushes none,
//! then the vector, and jumps to `interrupt_common`. That saves the general registers and the
//! SSE state (FXSAVE, since handlers are ordinary Rust that may use XMM registers), calls
//! [`dispatch`] with a pointer to the saved [`InterruptFrame`], restores, and `iretq`s. Every
//! gate runs on an IST stack (see `gdt`), never on the interrupted stack and its red zone.
//!
//! The table is the `x86_64` crate's [`InterruptDescriptorTable`]. Its typed handlers need
//! `extern "x86-interrupt"` (its nightly `abi_x86_interrupt` feature, not enabled), so each gate
//! is set with `set_handler_addr` to a stub's address and `set_stack_index` to its IST slot.

use core::arch::{global_asm, naked_asm};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use spin::Once;
use x86_64::VirtAddr;
use x86_64::structures::idt::InterruptDescriptorTable;

use super::gdt::IstSlot;
use crate::console;

/// Registers saved on entry, in memory order (lowest address first), then the CPU's frame.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    /// General registers, as pushed by `interrupt_common`.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// The vector, pushed by the stub.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    /// Interrupted instruction pointer.
    pub rip: u64,
    /// Interrupted code segment.
    pub cs: u64,
    /// Interrupted flags.
    pub rflags: u64,
    /// Interrupted stack pointer.
    pub rsp: u64,
    /// Interrupted stack segment.
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<InterruptFrame>() == 22 * 8);

/// The common entry path (naked assembly: stable Rust has no `extern "x86-interrupt"`, and the
/// interrupted registers must be saved before any Rust code runs). On arrival the stack holds
/// vector, error code and the CPU's frame; the IST stack top is 16-byte aligned and the CPU's
/// frame plus the two pushes plus 15 registers is 176 bytes, so the FXSAVE area below is
/// aligned once `rsp` is rounded down.
#[unsafe(naked)]
unsafe extern "C" fn interrupt_common() {
    naked_asm!(
        "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
        "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
        "mov rbx, rsp",
        "sub rsp, 512",
        "and rsp, -16",
        "fxsave64 [rsp]",
        "mov rdi, rbx",
        "cld",
        "call {dispatch}",
        "fxrstor64 [rsp]",
        "mov rsp, rbx",
        "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
        "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
        "add rsp, 16",
        "iretq",
        dispatch = sym dispatch,
    );
}

macro_rules! entry_stubs {
    ($( $vector:literal => $name:ident $(, $error_code:ident)? ;)*) => {
        $( entry_stubs!(@stub $vector, $name $(, $error_code)?); )*
        /// Every installed stub with its vector.
        static ENTRY_STUBS: &[(u8, unsafe extern "C" fn())] = &[$(($vector, $name)),*];
    };
    // Naked stubs: the CPU jumps here with no ABI at all (see `interrupt_common`).
    (@stub $vector:literal, $name:ident, error_code) => {
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!(concat!("push ", stringify!($vector)), "jmp {common}", common = sym interrupt_common);
        }
    };
    (@stub $vector:literal, $name:ident) => {
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!("push 0", concat!("push ", stringify!($vector)), "jmp {common}", common = sym interrupt_common);
        }
    };
}

// Intel's reserved exception vectors (15, 22..=27, 31) get no stub: the CPU never raises them
// and the `x86_64` IDT keeps their gates private (not present).
entry_stubs! {
    0 => vector_0; 1 => vector_1; 2 => vector_2; 3 => vector_3; 4 => vector_4; 5 => vector_5;
    6 => vector_6; 7 => vector_7; 8 => vector_8, error_code; 9 => vector_9;
    10 => vector_10, error_code; 11 => vector_11, error_code; 12 => vector_12, error_code;
    13 => vector_13, error_code; 14 => vector_14, error_code; 16 => vector_16;
    17 => vector_17, error_code; 18 => vector_18; 19 => vector_19; 20 => vector_20;
    21 => vector_21, error_code; 28 => vector_28;
    29 => vector_29, error_code; 30 => vector_30, error_code;
    32 => vector_32; 33 => vector_33; 34 => vector_34; 35 => vector_35; 36 => vector_36;
    37 => vector_37; 38 => vector_38; 39 => vector_39; 40 => vector_40; 41 => vector_41;
    42 => vector_42; 43 => vector_43; 44 => vector_44; 45 => vector_45; 46 => vector_46;
    47 => vector_47; 48 => vector_48; 49 => vector_49; 50 => vector_50; 51 => vector_51;
    52 => vector_52; 53 => vector_53; 54 => vector_54; 55 => vector_55; 56 => vector_56;
    57 => vector_57; 58 => vector_58; 59 => vector_59; 60 => vector_60; 61 => vector_61;
    62 => vector_62; 63 => vector_63; 239 => vector_239; 255 => vector_255;
}

/// First vector of the (masked) legacy PIC after remapping; its spurious IRQ7/15 land at +7/+15.
pub const PIC_VECTOR_BASE: u8 = 0x20;
/// First vector handed out to devices (MSI-X, IOAPIC).
pub const DEVICE_VECTOR_FIRST: u8 = 0x30;
/// Last vector handed out to devices.
pub const DEVICE_VECTOR_LAST: u8 = 0x3f;
/// The local APIC timer.
pub const TIMER_VECTOR: u8 = 0xef;
/// The local APIC's spurious vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// The IST slot each vector's gate switches to (see `gdt`).
fn ist_slot(vector: u8) -> IstSlot {
    match vector {
        8 => IstSlot::DoubleFault,
        2 | 18 => IstSlot::NonMaskable,
        14 => IstSlot::PageFault,
        0..=31 => IstSlot::Exception,
        _ => IstSlot::Interrupt,
    }
}

/// Points the gate of `vector` at `stub` on its IST stack: a present, DPL 0, 64-bit interrupt
/// gate (IF cleared on entry) with the current code selector (Intel SDM vol. 3, §6.14.1).
/// The vectors Intel reserves (15, 22..=27, 31) are left alone: the `x86_64` crate keeps their
/// gates private (not present), the CPU never raises them, and nothing here does.
fn install_gate(idt: &mut InterruptDescriptorTable, vector: u8, stub: unsafe extern "C" fn()) {
    let handler = VirtAddr::new(stub as usize as u64);
    // The IDT encodes IST slots from 1; `set_stack_index` takes them from 0.
    let stack_index = ist_slot(vector) as u16 - 1;
    macro_rules! set {
        ($entry:expr) => {{
            // SAFETY: `handler` is a naked entry stub of this module, which follows the
            // interrupt ABI described at the top (dummy error code where the CPU pushes none,
            // `iretq` at the end) for whatever entry type the gate has; `stack_index` names one
            // of the five IST stacks `gdt::init` put in the TSS, and the stacks of classes that
            // may nest differ (see `IstSlot`).
            unsafe {
                $entry
                    .set_handler_addr(handler)
                    .set_stack_index(stack_index)
            };
        }};
    }
    match vector {
        8 => set!(idt.double_fault),
        10 => set!(idt.invalid_tss),
        11 => set!(idt.segment_not_present),
        12 => set!(idt.stack_segment_fault),
        13 => set!(idt.general_protection_fault),
        14 => set!(idt.page_fault),
        17 => set!(idt.alignment_check),
        18 => set!(idt.machine_check),
        21 => set!(idt.cp_protection_exception),
        29 => set!(idt.vmm_communication_exception),
        30 => set!(idt.security_exception),
        0..=7 | 9 | 16 | 19 | 20 | 28 | 32..=255 => set!(idt[vector]),
        15 | 22..=27 | 31 => {}
    }
}

/// The IDT: the `x86_64` crate's table, filled once in [`init`] and then only read by the CPU.
static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Fills and loads the IDT: every exception and every stubbed interrupt vector gets a gate on
/// an IST stack.
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        for &(vector, stub) in ENTRY_STUBS {
            install_gate(&mut idt, vector, stub);
        }
        idt
    });
    idt.load();
}

/// A device interrupt handler: runs with interrupts disabled on the interrupt IST stack; keep it
/// short (set flags, count), never block, never log at length.
pub type IrqHandler = fn(vector: u8);

/// Handlers for vectors 32..=255, as `fn` pointers stored as `usize` (0 = none).
static IRQ_HANDLERS: [AtomicUsize; 224] = [const { AtomicUsize::new(0) }; 224];
/// Interrupts that arrived on a vector with no handler.
static UNEXPECTED_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// Breakpoints taken (and resumed).
static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

/// Installs `handler` for `vector` (32..=255, and one the IDT has a stub for).
pub fn register_irq(vector: u8, handler: IrqHandler) -> Result<(), UnknownVector> {
    if vector < 32 || !ENTRY_STUBS.iter().any(|&(stubbed, _)| stubbed == vector) {
        return Err(UnknownVector(vector));
    }
    IRQ_HANDLERS[usize::from(vector) - 32].store(handler as usize, Ordering::Release);
    Ok(())
}

/// A vector with no IDT stub (or an exception vector) was given to [`register_irq`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownVector(pub u8);

impl core::fmt::Display for UnknownVector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "vector {:#04x} has no interrupt stub", self.0)
    }
}

/// Number of `int3` breakpoints taken and resumed.
pub fn breakpoint_count() -> u64 {
    BREAKPOINTS.load(Ordering::Relaxed)
}

/// Number of interrupts on vectors without a handler.
pub fn unexpected_interrupt_count() -> u64 {
    UNEXPECTED_INTERRUPTS.load(Ordering::Relaxed)
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved (31)",
];

/// The Rust side of every interrupt, called by `interrupt_common` with interrupts disabled.
extern "C" fn dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    match vector {
        3 => {
            // #BP is a trap: RIP already points after the `int3`, so returning resumes.
            BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
        }
        14 => {
            let fault_address = x86_64::registers::control::Cr2::read_raw();
            if !resume_probe(frame, fault_address) {
                fatal_exception(frame);
            }
        }
        0..=31 => fatal_exception(frame),
        SPURIOUS_VECTOR => {
            // The local APIC's spurious interrupt needs no EOI (Intel SDM 11.9).
        }
        _ if (PIC_VECTOR_BASE..PIC_VECTOR_BASE + 16).contains(&vector) => {
            // A spurious IRQ from the masked legacy PIC: no EOI to the local APIC.
            UNEXPECTED_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            let handler = IRQ_HANDLERS[usize::from(vector) - 32].load(Ordering::Acquire);
            if handler == 0 {
                UNEXPECTED_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            } else {
                // SAFETY: only `register_irq` stores non-zero values, and it stores `IrqHandler`
                // function pointers, so this transmutes one back to its own type.
                let handler: IrqHandler =
                    unsafe { core::mem::transmute::<usize, IrqHandler>(handler) };
                handler(vector);
            }
            super::apic::end_of_interrupt();
        }
    }
}

/// Prints the exception, registers and a backtrace, then exits QEMU with status 35.
fn fatal_exception(frame: &InterruptFrame) -> ! {
    let vector = frame.vector as usize;
    let name = EXCEPTION_NAMES.get(vector).copied().unwrap_or("interrupt");
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let mut out = console::emergency_writer();
    use core::fmt::Write;
    let _ = writeln!(
        out,
        "PANIC: CPU exception {vector} ({name}) error_code={:#x} rip={:#018x} cr2={:#018x} rsp={:#018x}",
        frame.error_code, frame.rip, cr2, frame.rsp
    );
    let _ = writeln!(
        out,
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    let _ = write!(out, "  backtrace: {:#x}", frame.rip);
    for return_address in crate::mem::backtrace(frame.rbp).iter().flatten() {
        let _ = write!(out, " {return_address:#x}");
    }
    let _ = writeln!(out);
    super::exit_qemu(super::ExitCode::Failure)
}

// The page-fault probe (assembly: the #PF handler must recognise the one faulting instruction
// by its address, which only a label gives): `probe_read_u64(address)` loads a qword; if the load faults, the #PF
// handler moves RIP to the fixup, which returns (fault address, 1) instead of (value, 0).
global_asm!(
    ".pushsection .text.probe, \"ax\"",
    ".global vireo_probe_read_u64",
    "vireo_probe_read_u64:",
    "    xor edx, edx",
    ".global vireo_probe_read_insn",
    "vireo_probe_read_insn:",
    "    mov rax, [rdi]",
    "    ret",
    ".global vireo_probe_read_fixup",
    "vireo_probe_read_fixup:",
    "    ret",
    ".popsection",
);

unsafe extern "C" {
    fn vireo_probe_read_u64(address: u64) -> ProbeResult;
    static vireo_probe_read_insn: u8;
    static vireo_probe_read_fixup: u8;
}

#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

/// If the fault is the probe's load, resume at its fixup with the fault address in RAX.
fn resume_probe(frame: &mut InterruptFrame, fault_address: u64) -> bool {
    let probe_instruction = core::ptr::addr_of!(vireo_probe_read_insn) as u64;
    if frame.rip != probe_instruction {
        return false;
    }
    frame.rip = core::ptr::addr_of!(vireo_probe_read_fixup) as u64;
    frame.rax = fault_address;
    frame.rdx = 1;
    true
}

/// Reads the qword at `address`, reporting a page fault as `Err(fault address)` instead of
/// dying. Used by the self test (and usable to probe memory that may be unmapped).
pub fn probe_read_u64(address: u64) -> Result<u64, u64> {
    // SAFETY: the probe performs one load; a load from an unmapped address raises #PF, which
    // `dispatch` resumes at the fixup instead of treating as fatal. A load from a mapped
    // address has no side effects on memory Rust knows about (reading MMIO here is the
    // caller's business, and the self test only probes RAM and unmapped pages).
    let result = unsafe { vireo_probe_read_u64(address) };
    if result.faulted != 0 {
        Err(result.value)
    } else {
        Ok(result.value)
    }
}

/// Runs `f` with interrupts enabled, then disables them again (the kernel's loops otherwise run
/// with interrupts disabled and take them only when they halt). A busy-polling wait uses it:
/// nothing may stay pending while the loop spins, because under QEMU's TCG a pending but masked
/// interrupt makes the vCPU thread take QEMU's global lock at every translated-block exit,
/// stalling it against the I/O thread that delivers the packets. `f` must not touch what the
/// interrupt handlers touch except through atomics (the handlers only count and set flags).
pub fn enabled_during<R>(f: impl FnOnce() -> R) -> R {
    x86_64::instructions::interrupts::enable();
    let result = f();
    x86_64::instructions::interrupts::disable();
    result
}

/// Enables interrupts.
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Runs `f` with interrupts disabled, restoring the previous state.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(f)
}
