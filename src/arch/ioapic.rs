//! The I/O APIC, for legacy INTx when a device has no MSI-X (`vectors=0`): map it from the
//! MADT, mask every pin, and route chosen GSIs to a vector on this CPU.
//!
//! Without an AML interpreter Vireo cannot evaluate `_PRT`, so it does not know which I/O APIC
//! pin a PCI INTx line reaches. `route_pci_intx` therefore routes every pin a PCI interrupt can
//! use on QEMU's machines (the function's interrupt line, and on q35 the PIRQ pins 16–23) to the
//! device's vector, level triggered; the handler reads the device's ISR, which deasserts it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::AcpiInfo;
use crate::mem;

const REGISTER_SELECT: u64 = 0x00;
const REGISTER_WINDOW: u64 = 0x10;
const REGISTER_VERSION: u32 = 0x01;
const REDIRECTION_BASE: u32 = 0x10;
const MASKED: u32 = 1 << 16;
const LEVEL_TRIGGERED: u32 = 1 << 15;
const ACTIVE_LOW: u32 = 1 << 13;

static BASE: AtomicU64 = AtomicU64::new(0);
static GSI_BASE: AtomicU64 = AtomicU64::new(0);
static PINS: AtomicU64 = AtomicU64::new(0);

fn read(register: u32) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: BASE is the uncached mapping of the I/O APIC's two registers made by `init`
    // (non-zero only after it); select-then-window is the documented access sequence, and
    // callers run with interrupts disabled or before they are enabled.
    unsafe {
        core::ptr::write_volatile((base + REGISTER_SELECT) as *mut u32, register);
        core::ptr::read_volatile((base + REGISTER_WINDOW) as *const u32)
    }
}

fn write(register: u32, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: as for `read`.
    unsafe {
        core::ptr::write_volatile((base + REGISTER_SELECT) as *mut u32, register);
        core::ptr::write_volatile((base + REGISTER_WINDOW) as *mut u32, value);
    }
}

/// Maps the first I/O APIC and masks all of its pins. Returns the pin count.
pub fn init(info: &AcpiInfo) -> Option<u32> {
    let ioapic = info.ioapics[..info.ioapic_count].first()?;
    let base = mem::map_mmio(u64::from(ioapic.address), 0x20).ok()?;
    BASE.store(base, Ordering::Relaxed);
    GSI_BASE.store(u64::from(ioapic.gsi_base), Ordering::Relaxed);
    let pins = ((read(REGISTER_VERSION) >> 16) & 0xff) + 1;
    PINS.store(u64::from(pins), Ordering::Relaxed);
    for pin in 0..pins {
        write(REDIRECTION_BASE + 2 * pin, MASKED);
        write(REDIRECTION_BASE + 2 * pin + 1, 0);
    }
    Some(pins)
}

/// Routes `gsi` to `vector` on `apic_id`, level triggered (PCI INTx), with the polarity given.
/// Returns false if the GSI is not on this I/O APIC or it was not initialised.
pub fn route_level(gsi: u32, vector: u8, apic_id: u32, active_low: bool) -> bool {
    if BASE.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let Some(pin) = u64::from(gsi).checked_sub(GSI_BASE.load(Ordering::Relaxed)) else {
        return false;
    };
    if pin >= PINS.load(Ordering::Relaxed) {
        return false;
    }
    let pin = pin as u32;
    let low = u32::from(vector) | LEVEL_TRIGGERED | if active_low { ACTIVE_LOW } else { 0 };
    write(REDIRECTION_BASE + 2 * pin + 1, (apic_id & 0xff) << 24);
    write(REDIRECTION_BASE + 2 * pin, low);
    true
}

/// Routes a PCI function's INTx to `vector`: its interrupt line's GSI (after any MADT source
/// override) and, when the I/O APIC has 24 pins (q35's PIRQ A–H on 16–23), those too.
/// Returns the GSIs routed, as a bit mask.
pub fn route_pci_intx(info: &AcpiInfo, interrupt_line: u8, vector: u8, apic_id: u32) -> u32 {
    let mut routed = 0u32;
    let mut gsi = u32::from(interrupt_line);
    let mut active_low = false;
    for source in &info.overrides[..info.override_count] {
        if source.irq == interrupt_line {
            gsi = source.gsi;
            // MPS INTI polarity: 0b11 = active low.
            active_low = source.flags & 0b11 == 0b11;
        }
    }
    if interrupt_line != 0
        && interrupt_line != 0xff
        && gsi < 32
        && route_level(gsi, vector, apic_id, active_low)
    {
        routed |= 1 << gsi;
    }
    if PINS.load(Ordering::Relaxed) >= 24 {
        for pirq_gsi in 16..24 {
            if route_level(pirq_gsi, vector, apic_id, false) {
                routed |= 1 << pirq_gsi;
            }
        }
    }
    routed
}
