//! The GDT and the TSS with its interrupt stack table (IST).
//!
//! The prebuilt `core` uses the red zone, and the CPU does not skip it when it pushes an
//! interrupt frame on the current stack (docs/design.md, Platform facts). So every gate in the
//! IDT switches to an IST stack; none runs on the interrupted stack. Separate stacks keep a
//! nested exception from overwriting the frame of the handler it interrupted:
//! double fault, NMI/machine check, page fault, other exceptions, and device interrupts (which
//! never nest: interrupt gates clear IF).

use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (1-based, as the IDT encodes it) for each class of entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum IstSlot {
    /// #DF.
    DoubleFault = 1,
    /// NMI and #MC.
    NonMaskable = 2,
    /// #PF, which self tests provoke while another exception may be live.
    PageFault = 3,
    /// Every other exception.
    Exception = 4,
    /// Device and timer interrupts.
    Interrupt = 5,
}

const IST_STACK_SIZE: usize = 32 * 1024;
const IST_STACKS: usize = 5;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

/// The IST stacks. Only the CPU writes them (by switching stacks on interrupt entry), so Rust
/// never forms a reference to their contents; only their addresses are taken.
static mut IST_STACK_MEMORY: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = Once::new();

/// The address range of every IST stack, for the backtrace walker's bounds checks.
pub fn ist_stack_range() -> (u64, u64) {
    let base = core::ptr::addr_of!(IST_STACK_MEMORY) as u64;
    (base, base + (IST_STACK_SIZE * IST_STACKS) as u64)
}

/// Builds and loads the GDT and TSS and reloads the segment registers.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let base = core::ptr::addr_of!(IST_STACK_MEMORY) as u64;
        for slot in 0..IST_STACKS {
            // Stacks grow down: the top of stack `slot` is the start of the next one.
            let top = base + ((slot + 1) * IST_STACK_SIZE) as u64;
            tss.interrupt_stack_table[slot] = VirtAddr::new(top);
        }
        tss
    });
    let (gdt, code, data, tss_selector) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_selector = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_selector)
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives in a static
    // for the rest of the run; the code segment is 64-bit and the data segment flat.
    unsafe {
        CS::set_reg(*code);
        SS::set_reg(*data);
        DS::set_reg(*data);
        ES::set_reg(*data);
        load_tss(*tss_selector);
    }
}
