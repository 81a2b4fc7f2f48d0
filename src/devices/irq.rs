//! Every device's interrupt record: which path it takes (MSI-X with a vector per event, one
//! shared MSI-X vector, INTx through the I/O APIC, or none), the CPU vectors it was given from
//! the one allocator, and what its interrupts leave for the loop (a pending configuration
//! change, a count). One handler serves every device vector: it finds the device slot (or, for
//! INTx, every device on the shared line) from a table indexed by CPU vector.
//!
//! A device's MSI-X table entries are numbered by the driver: entry 0 for configuration
//! changes and entries 1.. for its queues (§4.1.5.1.2 lets the driver choose; the drivers here
//! all use this plan), so the record only needs to know how many queue entries it wants.

#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ::pci::{Function, PciAddress};
use virtio::hal::{DeviceMemory, Hal, Window};
use virtio::spec::IsrStatus;

use crate::acpi::AcpiInfo;
use crate::arch::{self, interrupts};
use crate::hal::KernelHal;
use crate::pci::{MsixTable, PlatformConfig};

/// How a device interrupts the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptPath {
    /// MSI-X with a vector for configuration changes and one per queue entry.
    MsixSeparate,
    /// MSI-X with one vector for everything.
    MsixShared,
    /// Legacy INTx through the I/O APIC; the GSIs routed, as a bit mask.
    Intx(u32),
    /// No interrupts: the loop must poll.
    Polling,
}

impl core::fmt::Display for InterruptPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::MsixSeparate => f.write_str("MSI-X (a config vector and one per queue)"),
            Self::MsixShared => f.write_str("MSI-X (one shared vector)"),
            Self::Intx(gsis) => write!(f, "INTx through the I/O APIC (GSI mask {gsis:#x})"),
            Self::Polling => f.write_str("none (polling only)"),
        }
    }
}

impl InterruptPath {
    /// Whether configuration changes interrupt on this path (all but polling).
    pub fn config_interrupts(self) -> bool {
        self != Self::Polling
    }
}

/// What the device's interrupts leave for the loop, one slot per device.
pub struct IrqSlot {
    /// Interrupts taken for this device (MSI-X, or INTx with a non-zero ISR).
    interrupts: AtomicU64,
    /// A configuration change was signalled (config vector, shared vector, or ISR bit 1).
    config_pending: AtomicBool,
    /// The device's ISR status window (§4.1.4.5) for INTx: base (0: none) and length; the
    /// length is stored first and the base published last, so the handler never waits.
    isr_base: AtomicU64,
    isr_len: AtomicU64,
}

impl IrqSlot {
    const fn new() -> Self {
        Self {
            interrupts: AtomicU64::new(0),
            config_pending: AtomicBool::new(false),
            isr_base: AtomicU64::new(0),
            isr_len: AtomicU64::new(0),
        }
    }

    /// Interrupts taken so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }

    /// Takes the pending configuration-change flag.
    pub fn take_config_pending(&self) -> bool {
        self.config_pending.swap(false, Ordering::Acquire)
    }

    /// Reads (and thereby acknowledges) the device's ISR byte, when it has a window.
    fn read_isr(&self) -> u8 {
        let base = self.isr_base.load(Ordering::Acquire);
        if base == 0 {
            return 0;
        }
        let window = Window {
            base,
            len: self.isr_len.load(Ordering::Relaxed),
        };
        // The HAL finds the window in its lock-free MMIO table: no lock in a handler.
        KernelHal.read8(window, 0)
    }
}

/// Devices with an interrupt record at most.
pub const MAX_DEVICES: usize = 16;
static SLOTS: [IrqSlot; MAX_DEVICES] = [const { IrqSlot::new() }; MAX_DEVICES];
static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

/// What a device vector means, per CPU vector (index from `DEVICE_VECTOR_FIRST`): the kind in
/// the low byte and, for MSI-X, the slot in the next; INTx vectors list their slots as a mask
/// in the upper 32 bits.
const VECTORS: usize =
    (interrupts::DEVICE_VECTOR_LAST - interrupts::DEVICE_VECTOR_FIRST) as usize + 1;
static VECTOR_USE: [AtomicU64; VECTORS] = [const { AtomicU64::new(0) }; VECTORS];
const KIND_FREE: u64 = 0;
const KIND_CONFIG: u64 = 1;
const KIND_QUEUE: u64 = 2;
const KIND_SHARED: u64 = 3;
const KIND_INTX: u64 = 4;

/// The one INTx vector: QEMU's PCI interrupt lines (and q35's PIRQs) are routed to it, and
/// the handler asks every INTx device whether it interrupted (level-triggered sharing).
const INTX_VECTOR: u8 = interrupts::DEVICE_VECTOR_LAST;

fn device_interrupt(vector: u8) {
    let Some(index) = vector.checked_sub(interrupts::DEVICE_VECTOR_FIRST) else {
        return;
    };
    let Some(entry) = VECTOR_USE.get(usize::from(index)) else {
        return;
    };
    let usage = entry.load(Ordering::Acquire);
    let kind = usage & 0xff;
    if kind == KIND_INTX {
        let mask = usage >> 32;
        for (slot_index, slot) in SLOTS.iter().enumerate() {
            if mask & (1 << slot_index) == 0 {
                continue;
            }
            let isr = slot.read_isr();
            if isr != 0 {
                slot.interrupts.fetch_add(1, Ordering::Relaxed);
            }
            if IsrStatus::from_bits_retain(isr).config_changed() {
                slot.config_pending.store(true, Ordering::Release);
            }
        }
        return;
    }
    let Some(slot) = SLOTS.get(((usage >> 8) & 0xff) as usize) else {
        return;
    };
    slot.interrupts.fetch_add(1, Ordering::Relaxed);
    // A shared vector carries configuration changes too: the loop re-reads the status (cheap).
    if kind == KIND_CONFIG || kind == KIND_SHARED {
        slot.config_pending.store(true, Ordering::Release);
    }
}

/// Takes a free CPU vector for `kind` on `slot`.
fn allocate_vector(kind: u64, slot: usize) -> Option<u8> {
    for (index, entry) in VECTOR_USE.iter().enumerate() {
        let vector = interrupts::DEVICE_VECTOR_FIRST + index as u8;
        if vector == INTX_VECTOR {
            continue;
        }
        let usage = kind | ((slot as u64) << 8);
        if entry
            .compare_exchange(KIND_FREE, usage, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            if interrupts::register_irq(vector, device_interrupt).is_err() {
                entry.store(KIND_FREE, Ordering::Release);
                return None;
            }
            return Some(vector);
        }
    }
    None
}

fn release_vector(vector: u8) {
    if let Some(entry) = VECTOR_USE.get(usize::from(vector - interrupts::DEVICE_VECTOR_FIRST)) {
        entry.store(KIND_FREE, Ordering::Release);
    }
}

/// One device's interrupt record.
pub struct DeviceIrq {
    name: &'static str,
    address: PciAddress,
    interrupt_line: u8,
    slot_index: usize,
    msix: Option<MsixTable>,
    /// MSI-X queue entries the driver wants (entries 1..=queue_entries).
    queue_entries: u16,
    /// CPU vectors taken for the current MSI-X path.
    vectors: Vec<u8>,
    path: InterruptPath,
}

impl DeviceIrq {
    /// A record for the device `name` at `function`, whose driver wants `queue_entries` MSI-X
    /// queue entries besides the configuration entry; `isr` is its ISR region (for INTx).
    /// `None` when every slot is taken.
    pub fn new(
        config: &PlatformConfig,
        function: &Function,
        name: &'static str,
        queue_entries: u16,
        isr: Option<(u64, u64)>,
    ) -> Option<Self> {
        let slot_index = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) as usize;
        let slot = SLOTS.get(slot_index)?;
        if let Some((phys, len)) = isr {
            match KernelHal.map_mmio(phys, len) {
                Ok(window) => {
                    slot.isr_len.store(window.len, Ordering::Relaxed);
                    slot.isr_base.store(window.base, Ordering::Release);
                }
                Err(error) => log::warn!("{name}: ISR window for INTx: {error}"),
            }
        }
        let address = function.address;
        let msix = match ::pci::MsixCapability::find(config, address, &function.bars) {
            Ok(Some(capability)) => match MsixTable::enable(config, capability, &function.bars) {
                Ok(table) => Some(table),
                Err(error) => {
                    log::warn!("{name}: MSI-X unusable ({error})");
                    None
                }
            },
            Ok(None) => {
                log::info!("{name}: no MSI-X capability");
                None
            }
            Err(error) => {
                log::warn!("{name}: MSI-X capability malformed ({error})");
                None
            }
        };
        Some(Self {
            name,
            address,
            interrupt_line: function.interrupt_line,
            slot_index,
            msix,
            queue_entries,
            vectors: Vec::new(),
            path: InterruptPath::Polling,
        })
    }

    /// The paths to try, best first: MSI-X with separate vectors when the table has an entry
    /// for each, one shared MSI-X vector, INTx, polling.
    pub fn candidates(&self) -> Vec<InterruptPath> {
        let mut paths = Vec::new();
        if let Some(table) = &self.msix {
            if table.size() > self.queue_entries {
                paths.push(InterruptPath::MsixSeparate);
            }
            paths.push(InterruptPath::MsixShared);
        }
        paths.push(InterruptPath::Intx(0));
        paths.push(InterruptPath::Polling);
        paths
    }

    /// Programs `path` (MSI-X entries, or the I/O APIC route and the command register's
    /// INTx enable); returns the path as programmed (`Intx` with its GSIs), or `None` when it
    /// cannot be had here (no vectors left, no route), and the caller tries the next one.
    pub fn apply(
        &mut self,
        config: &PlatformConfig,
        platform: Option<&AcpiInfo>,
        path: InterruptPath,
    ) -> Option<InterruptPath> {
        self.release();
        let apic_id = arch::apic::id() as u8;
        let slot = self.slot_index;
        match path {
            InterruptPath::MsixSeparate | InterruptPath::MsixShared => {
                let table = self.msix.as_ref()?;
                let entries = if path == InterruptPath::MsixSeparate {
                    1 + self.queue_entries
                } else {
                    1
                };
                for entry in 0..entries {
                    let kind = match (path, entry) {
                        (InterruptPath::MsixShared, _) => KIND_SHARED,
                        (_, 0) => KIND_CONFIG,
                        _ => KIND_QUEUE,
                    };
                    let Some(vector) = allocate_vector(kind, slot) else {
                        log::warn!("{}: no CPU vector left for MSI-X entry {entry}", self.name);
                        self.release();
                        return None;
                    };
                    self.vectors.push(vector);
                    if table.route(entry, apic_id, vector).is_err() {
                        self.release();
                        return None;
                    }
                }
                table.unmask_function(config);
                self.path = path;
                Some(path)
            }
            InterruptPath::Intx(_) => {
                if let Some(table) = &self.msix {
                    table.disable(config);
                }
                let routed = match platform {
                    Some(info) if arch::ioapic::init(info).is_some() => {
                        arch::ioapic::route_pci_intx(
                            info,
                            self.interrupt_line,
                            INTX_VECTOR,
                            u32::from(apic_id),
                        )
                    }
                    _ => 0,
                };
                let index = usize::from(INTX_VECTOR - interrupts::DEVICE_VECTOR_FIRST);
                if routed == 0 || interrupts::register_irq(INTX_VECTOR, device_interrupt).is_err() {
                    log::warn!(
                        "{}: no I/O APIC route for INTx (line {})",
                        self.name,
                        self.interrupt_line
                    );
                    return None;
                }
                // Add this device to the INTx line's devices.
                let _ =
                    VECTOR_USE[index].fetch_update(Ordering::AcqRel, Ordering::Acquire, |usage| {
                        Some(KIND_INTX | (usage & !0xffff_ffff) | (1u64 << (32 + slot)))
                    });
                ::pci::update_command(config, self.address, 0, ::pci::regs::COMMAND_INTX_DISABLE);
                self.path = InterruptPath::Intx(routed);
                Some(self.path)
            }
            InterruptPath::Polling => {
                if let Some(table) = &self.msix {
                    table.disable(config);
                }
                self.path = InterruptPath::Polling;
                Some(InterruptPath::Polling)
            }
        }
    }

    /// Gives back the MSI-X vectors of the current path (before trying another).
    fn release(&mut self) {
        for vector in self.vectors.drain(..) {
            release_vector(vector);
        }
    }

    /// What the device's interrupts leave for the loop.
    pub fn slot(&self) -> &'static IrqSlot {
        // `slot_index` was checked against `SLOTS` in `new`.
        &SLOTS[self.slot_index]
    }
}
