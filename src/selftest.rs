//! The `selftest` command-line flag: in-kernel checks of the platform layer, with a verdict line
//! and exit status 33 (all passed) or 35 (any failed).
//!
//! Checks: a breakpoint is caught and resumed; page faults on unmapped memory (page 0, the stack
//! guard) are caught and survived; the TSC clock and the APIC timer advance and the idle path
//! wakes; the heap and the DMA allocator round-trip; and interrupts arriving while a function's
//! red zone and XMM registers are live, at the bottom of a deep call chain, leave them intact
//! (the proof that every gate runs on an IST stack and saves the SSE state).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{self, apic, clock, interrupts};
use crate::{mem, println};

/// While set, the timer interrupt deliberately clobbers every XMM register and its own stack,
/// so that a missing save/restore or a shared stack shows up as corruption.
static CLOBBER_IN_TIMER: AtomicBool = AtomicBool::new(false);

/// Called from the timer interrupt.
pub fn on_timer_tick() {
    if CLOBBER_IN_TIMER.load(Ordering::Relaxed) {
        let mut scratch = [0xdead_beef_u64; 32];
        core::hint::black_box(&mut scratch);
        // SAFETY: only clobbers XMM registers, which the entry stub saved with FXSAVE and
        // restores with FXRSTOR.
        unsafe {
            core::arch::asm!(
                "pcmpeqd xmm0, xmm0", "pcmpeqd xmm1, xmm1", "pcmpeqd xmm2, xmm2", "pcmpeqd xmm3, xmm3",
                "pcmpeqd xmm4, xmm4", "pcmpeqd xmm5, xmm5", "pcmpeqd xmm6, xmm6", "pcmpeqd xmm7, xmm7",
                "pcmpeqd xmm8, xmm8", "pcmpeqd xmm9, xmm9", "pcmpeqd xmm10, xmm10", "pcmpeqd xmm11, xmm11",
                "pcmpeqd xmm12, xmm12", "pcmpeqd xmm13, xmm13", "pcmpeqd xmm14, xmm14", "pcmpeqd xmm15, xmm15",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
                out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _,
                out("xmm11") _, out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nomem, nostack)
            )
        };
    }
}

// `vireo_redzone_probe(ticks, wait_ticks, tsc_budget)`: fills the 128-byte red zone below RSP
// and XMM7/XMM15 with a pattern, spins (interrupts on) until `*ticks` has advanced by
// `wait_ticks` or `tsc_budget` TSC cycles pass, then counts corrupted qwords (+100 per XMM
// register). Returns u64::MAX on timeout. It uses only caller-saved registers and no stack
// below the red zone, so anything pushed on this stack by an interrupt would show.
global_asm!(
    ".pushsection .text.selftest, \"ax\"",
    ".global vireo_redzone_probe",
    "vireo_redzone_probe:",
    "    mov r8, [rdi]",
    "    add r8, rsi",
    "    mov r10, rdx",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    add r10, rax",
    "    movabs r11, 0x5a5a5a5a00000000",
    "    mov rcx, 16",
    "2:  lea rax, [r11 + rcx]",
    "    mov [rsp + rcx*8 - 136], rax",
    "    dec rcx",
    "    jnz 2b",
    "    movq xmm7, r11",
    "    movq xmm15, r11",
    "3:  pause",
    "    mov rax, [rdi]",
    "    cmp rax, r8",
    "    jae 4f",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    cmp rax, r10",
    "    jb 3b",
    "    mov rax, -1",
    "    ret",
    "4:  xor r9d, r9d",
    "    mov rcx, 16",
    "5:  lea rax, [r11 + rcx]",
    "    cmp [rsp + rcx*8 - 136], rax",
    "    je 6f",
    "    inc r9",
    "6:  dec rcx",
    "    jnz 5b",
    "    movq rax, xmm7",
    "    cmp rax, r11",
    "    je 7f",
    "    add r9, 100",
    "7:  movq rax, xmm15",
    "    cmp rax, r11",
    "    je 8f",
    "    add r9, 100",
    "8:  mov rax, r9",
    "    ret",
    ".popsection",
);

unsafe extern "C" {
    fn vireo_redzone_probe(ticks: *const u64, wait_ticks: u64, tsc_budget: u64) -> u64;
}

type CheckResult = Result<(), alloc::string::String>;

/// A named self-check.
type Check = (&'static str, fn() -> CheckResult);

macro_rules! ensure {
    ($condition:expr, $($message:tt)*) => {
        if !$condition {
            return Err(alloc::format!($($message)*));
        }
    };
}

fn check_breakpoint() -> CheckResult {
    let before = interrupts::breakpoint_count();
    // SAFETY: int3 traps to the #BP handler, which counts it and resumes after the instruction.
    unsafe { core::arch::asm!("int3", options(nomem, nostack)) };
    let after = interrupts::breakpoint_count();
    ensure!(
        after == before + 1,
        "breakpoint count went from {before} to {after}"
    );
    Ok(())
}

fn check_page_fault() -> CheckResult {
    let (_, _, guard) = mem::kernel_stack();
    for address in [0u64, 0x8, guard, guard + 0xff8] {
        match interrupts::probe_read_u64(address) {
            Err(fault_address) => {
                ensure!(
                    fault_address == address,
                    "fault at {address:#x} reported CR2 {fault_address:#x}"
                )
            }
            Ok(value) => {
                return Err(alloc::format!(
                    "read of unmapped {address:#x} gave {value:#x}"
                ));
            }
        }
    }
    let mapped = Box::new(0x1234_5678_9abc_def0u64);
    let address = &*mapped as *const u64 as u64;
    ensure!(
        interrupts::probe_read_u64(address) == Ok(0x1234_5678_9abc_def0),
        "probe of mapped memory at {address:#x} did not read its value"
    );
    Ok(())
}

/// Waits (halting) for `count` timer ticks, at most `timeout_ns`.
fn halt_for_ticks(count: u64, timeout_ns: u64) -> bool {
    let target = apic::ticks() + count;
    let deadline = clock::now_ns() + timeout_ns;
    while apic::ticks() < target {
        if clock::now_ns() > deadline {
            return false;
        }
        arch::idle_until_interrupt();
    }
    true
}

fn check_timer() -> CheckResult {
    let start_ns = clock::now_ns();
    let start_ticks = apic::ticks();
    ensure!(
        halt_for_ticks(5, 500_000_000),
        "the APIC timer did not wake the idle path 5 times in 500 ms"
    );
    let elapsed_ns = clock::now_ns() - start_ns;
    let ticks = apic::ticks() - start_ticks;
    ensure!(elapsed_ns > 0, "the TSC clock did not advance");
    // 5 ticks at 1 kHz take 4 to 5 ms. The APIC timer and the TSC are separate clocks; under
    // an emulator on a busy host either may lag and catch up, so only gross disagreement (a
    // wrong calibration by a factor of two or more) fails.
    ensure!(
        (2_000_000..2_000_000_000).contains(&elapsed_ns),
        "{ticks} ticks took {elapsed_ns} ns by the TSC clock, expected about 5 ms"
    );
    let first = clock::now_ns();
    let second = clock::now_ns();
    ensure!(
        second >= first,
        "the clock went backwards: {first} then {second}"
    );
    Ok(())
}

/// `memcpy`, `memmove` (both directions) and `memset` against a byte-at-a-time reference, for
/// every length 0..=136 and every source and destination alignment 0..8: the quadword bulk and
/// the byte tail of `mem::rt` meet at every possible split.
fn check_mem_functions() -> CheckResult {
    const SPAN: usize = 136;
    let pattern = |index: usize| (index as u8).wrapping_mul(37).wrapping_add(11);
    let mut source = [0u8; SPAN + 16];
    let mut target = [0u8; SPAN + 16];
    for (index, byte) in source.iter_mut().enumerate() {
        *byte = pattern(index);
    }
    // The first byte of `buffer` that differs from `expected(index)`. Volatile reads: the
    // reference must not itself become a call to the functions under test.
    let first_wrong = |buffer: &[u8], expected: &dyn Fn(usize) -> u8| {
        (0..buffer.len()).find(|&index| {
            // SAFETY: `index` is below the buffer's length.
            unsafe { core::ptr::read_volatile(buffer.as_ptr().add(index)) != expected(index) }
        })
    };
    for length in 0..=SPAN {
        for from in 0..8 {
            for to in 0..8 {
                target.fill(0xee);
                // SAFETY: both ranges lie inside their arrays (8 + SPAN <= SPAN + 16) and the
                // arrays are distinct.
                unsafe {
                    crate::mem::rt::memcpy(
                        target.as_mut_ptr().add(to),
                        source.as_ptr().add(from),
                        length,
                    )
                };
                let copied = to..to + length;
                let wrong = first_wrong(&target, &|index| {
                    if copied.contains(&index) {
                        pattern(from + index - to)
                    } else {
                        0xee
                    }
                });
                ensure!(
                    wrong.is_none(),
                    "memcpy of {length} bytes from offset {from} to {to}: byte {} wrong",
                    wrong.unwrap_or_default()
                );
                // memmove within one buffer, destination above and below the source.
                for (first, second) in [(from, to + 8), (to + 8, from)] {
                    let mut buffer = source;
                    // SAFETY: both ranges lie inside `buffer` (16 + SPAN <= SPAN + 16); memmove
                    // allows the overlap.
                    unsafe {
                        crate::mem::rt::memmove(
                            buffer.as_mut_ptr().add(second),
                            buffer.as_ptr().add(first),
                            length,
                        )
                    };
                    let moved = second..second + length;
                    let wrong = first_wrong(&buffer, &|index| {
                        if moved.contains(&index) {
                            pattern(first + index - second)
                        } else {
                            pattern(index)
                        }
                    });
                    ensure!(
                        wrong.is_none(),
                        "memmove of {length} bytes from {first} to {second}: byte {} wrong",
                        wrong.unwrap_or_default()
                    );
                }
            }
            target.fill(0xee);
            // SAFETY: the range lies inside `target`.
            unsafe { crate::mem::rt::memset(target.as_mut_ptr().add(from), 0x5a, length) };
            let filled = from..from + length;
            let wrong = first_wrong(&target, &|index| {
                if filled.contains(&index) { 0x5a } else { 0xee }
            });
            ensure!(
                wrong.is_none(),
                "memset of {length} bytes at offset {from}: byte {} wrong",
                wrong.unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn check_allocator() -> CheckResult {
    let (used_before, _) = mem::heap_usage();
    {
        let mut boxes: Vec<Box<[u8]>> = Vec::new();
        for index in 0..512usize {
            let size = 1 + (index * 37) % 3000;
            let mut block = alloc::vec![0u8; size].into_boxed_slice();
            block
                .iter_mut()
                .enumerate()
                .for_each(|(at, byte)| *byte = (at ^ index) as u8);
            boxes.push(block);
        }
        for (index, block) in boxes.iter().enumerate() {
            ensure!(
                block
                    .iter()
                    .enumerate()
                    .all(|(at, byte)| *byte == (at ^ index) as u8),
                "heap block {index} was corrupted"
            );
        }
        let big = alloc::vec![0xa5u8; 8 * 1024 * 1024];
        ensure!(
            big.iter().all(|&byte| byte == 0xa5),
            "8 MiB allocation corrupted"
        );
    }
    let region =
        mem::dma_alloc(4).map_err(|error| alloc::format!("DMA allocation failed: {error}"))?;
    ensure!(
        region.physical % 4096 == 0,
        "DMA region at {:#x} is not page aligned",
        region.physical
    );
    ensure!(
        region.physical == region.virtual_address.as_ptr() as u64,
        "DMA region is not identity mapped"
    );
    // SAFETY: the region is 4 pages we own exclusively; no device knows it.
    let bytes =
        unsafe { core::slice::from_raw_parts(region.virtual_address.as_ptr(), region.length) };
    ensure!(
        bytes.iter().all(|&byte| byte == 0),
        "DMA region is not zeroed"
    );
    // SAFETY: no device was ever given this region; it came from dma_alloc and is freed once.
    unsafe { mem::dma_free(region) };
    let (used_after, _) = mem::heap_usage();
    ensure!(
        used_after == used_before,
        "heap use went from {used_before} to {used_after} bytes"
    );
    Ok(())
}

#[inline(never)]
fn deep_call_chain(depth: u64, corrupted: &mut u64) {
    let locals: [u64; 12] =
        core::array::from_fn(|index| depth.wrapping_mul(0x9e37_79b9) ^ index as u64);
    let locals = core::hint::black_box(locals);
    if depth == 0 {
        // SAFETY: the probe reads the tick counter (a valid u64 updated by the timer interrupt)
        // and touches only its own red zone and caller-saved registers.
        let result = unsafe { vireo_redzone_probe(apic::ticks_address(), 3, clock::tsc_hz()) };
        *corrupted += result;
    } else {
        deep_call_chain(depth - 1, corrupted);
    }
    let intact = locals
        .iter()
        .enumerate()
        .all(|(index, value)| *value == depth.wrapping_mul(0x9e37_79b9) ^ index as u64);
    if !intact {
        *corrupted += 1;
    }
}

fn check_interrupt_stacks() -> CheckResult {
    CLOBBER_IN_TIMER.store(true, Ordering::Relaxed);
    interrupts::enable();
    let mut corrupted = 0;
    // SAFETY: see `deep_call_chain`.
    let flat = unsafe { vireo_redzone_probe(apic::ticks_address(), 3, clock::tsc_hz()) };
    deep_call_chain(100, &mut corrupted);
    x86_64::instructions::interrupts::disable();
    CLOBBER_IN_TIMER.store(false, Ordering::Relaxed);
    ensure!(
        flat != u64::MAX,
        "no timer interrupt arrived within a second"
    );
    ensure!(
        flat == 0,
        "an interrupt corrupted the red zone or XMM registers (score {flat})"
    );
    ensure!(
        corrupted == 0,
        "an interrupt during a 100-deep call chain corrupted state (score {corrupted})"
    );
    Ok(())
}

/// Runs every check, prints one line each and the verdict, and exits QEMU.
pub fn run() -> ! {
    // The checks below need a steady tick; the network loop is tickless and never starts one.
    apic::start_periodic(1000);
    let checks: [Check; 6] = [
        ("breakpoint", check_breakpoint),
        ("page-fault", check_page_fault),
        ("timer", check_timer),
        ("allocator", check_allocator),
        ("mem-functions", check_mem_functions),
        ("interrupt-stacks", check_interrupt_stacks),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        match check() {
            Ok(()) => println!("selftest: {name} ... ok"),
            Err(reason) => {
                failed += 1;
                println!("selftest: {name} ... FAILED: {reason}");
            }
        }
    }
    if failed == 0 {
        println!(
            "selftest: all {} checks passed in {} us since boot",
            checks.len(),
            clock::now_ns() / 1000
        );
        arch::exit_qemu(arch::ExitCode::Success)
    } else {
        println!("selftest: FAILED ({failed} of {} checks)", checks.len());
        arch::exit_qemu(arch::ExitCode::Failure)
    }
}
