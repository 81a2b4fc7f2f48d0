//! ACPI through the `acpi` crate: the RSDP from the PVH start info, then the MADT (local APIC
//! and IOAPIC ids, interrupt source overrides) and the MCFG (ECAM base and buses).

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::mem;

/// Maps ACPI tables with write-back identity mappings.
#[derive(Clone, Copy)]
struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // Mapping firmware tables can only fail on an absurd address; the acpi crate has no way
        // to take an error here, so an unmappable table is fatal with a clear message.
        let virtual_address = match mem::map_firmware(physical_address as u64, size as u64) {
            Ok(address) => address,
            Err(error) => crate::console::fatal(format_args!(
                "cannot map ACPI table at {physical_address:#x}: {error}"
            )),
        };
        let Some(pointer) = NonNull::new(virtual_address as *mut T) else {
            crate::console::fatal(format_args!("ACPI table at physical address 0"))
        };
        // SAFETY: the region is identity mapped (virtual = physical) for `size` bytes and stays
        // mapped for the rest of the run (unmapping is a no-op).
        unsafe { PhysicalMapping::new(physical_address, pointer, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// An I/O APIC from the MADT.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoApic {
    /// Its id.
    pub id: u8,
    /// MMIO base.
    pub address: u32,
    /// First global system interrupt it serves.
    pub gsi_base: u32,
}

/// An ISA IRQ remapped to another GSI.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceOverride {
    /// ISA IRQ.
    pub irq: u8,
    /// The GSI it arrives on.
    pub gsi: u32,
    /// MPS INTI flags (polarity, trigger).
    pub flags: u16,
}

/// The ECAM window for one segment from the MCFG.
#[derive(Clone, Copy, Debug)]
pub struct EcamWindow {
    /// Physical base of bus 0 of the segment.
    pub base: u64,
    /// Segment group.
    pub segment: u16,
    /// First bus decoded.
    pub bus_start: u8,
    /// Last bus decoded.
    pub bus_end: u8,
}

const MAX_CPUS: usize = 64;
const MAX_IOAPICS: usize = 4;
const MAX_OVERRIDES: usize = 16;

/// What the ACPI tables say about the platform.
#[derive(Clone, Copy, Debug)]
pub struct AcpiInfo {
    /// Local APIC ids of enabled (or online-capable) CPUs.
    pub cpu_apic_ids: [u32; MAX_CPUS],
    /// How many of `cpu_apic_ids` are valid.
    pub cpu_count: usize,
    /// I/O APICs.
    pub ioapics: [IoApic; MAX_IOAPICS],
    /// How many of `ioapics` are valid.
    pub ioapic_count: usize,
    /// Interrupt source overrides.
    pub overrides: [SourceOverride; MAX_OVERRIDES],
    /// How many of `overrides` are valid.
    pub override_count: usize,
    /// The ECAM window for segment 0, if the MCFG has one.
    pub ecam: Option<EcamWindow>,
    /// The ACPI PM timer's I/O port (3.579545 MHz, at least 24 bits), from the FADT.
    pub pm_timer_port: Option<u16>,
}

/// ACPI failures (none is fatal: PCI falls back to port I/O and interrupts to MSI-X only).
#[derive(Debug)]
pub enum AcpiError {
    /// The boot loader gave no RSDP.
    NoRsdp,
    /// The acpi crate rejected the tables.
    Tables(acpi::AcpiError),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => f.write_str("no RSDP in the PVH start info"),
            Self::Tables(error) => write!(f, "ACPI tables rejected: {error:?}"),
        }
    }
}

/// Parses the MADT and MCFG. A missing MADT or MCFG leaves its part empty.
pub fn init(rsdp_address: u64) -> Result<AcpiInfo, AcpiError> {
    if rsdp_address == 0 {
        return Err(AcpiError::NoRsdp);
    }
    // SAFETY: the address is the RSDP that QEMU's PVH loader put in the start info; the
    // handler maps whatever the tables span.
    let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp_address as usize) }
        .map_err(AcpiError::Tables)?;
    let mut info = AcpiInfo {
        cpu_apic_ids: [0; MAX_CPUS],
        cpu_count: 0,
        ioapics: [IoApic::default(); MAX_IOAPICS],
        ioapic_count: 0,
        overrides: [SourceOverride::default(); MAX_OVERRIDES],
        override_count: 0,
        ecam: None,
        pm_timer_port: None,
    };
    if let Ok(fadt) = tables.find_table::<acpi::fadt::Fadt>()
        && let Ok(Some(block)) = fadt.get().pm_timer_block()
        && block.address_space == acpi::address::AddressSpace::SystemIo
    {
        info.pm_timer_port = u16::try_from(block.address).ok();
    }
    if let Ok(madt) = tables.find_table::<Madt>() {
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(cpu) => {
                    let (flags, id) = (cpu.flags, cpu.apic_id);
                    if flags & 0b11 != 0 && info.cpu_count < MAX_CPUS {
                        info.cpu_apic_ids[info.cpu_count] = u32::from(id);
                        info.cpu_count += 1;
                    }
                }
                MadtEntry::LocalX2Apic(cpu) => {
                    let (flags, id) = (cpu.flags, cpu.x2apic_id);
                    if flags & 0b11 != 0 && info.cpu_count < MAX_CPUS {
                        info.cpu_apic_ids[info.cpu_count] = id;
                        info.cpu_count += 1;
                    }
                }
                MadtEntry::IoApic(ioapic) if info.ioapic_count < MAX_IOAPICS => {
                    info.ioapics[info.ioapic_count] = IoApic {
                        id: ioapic.io_apic_id,
                        address: ioapic.io_apic_address,
                        gsi_base: ioapic.global_system_interrupt_base,
                    };
                    info.ioapic_count += 1;
                }
                MadtEntry::InterruptSourceOverride(source)
                    if info.override_count < MAX_OVERRIDES =>
                {
                    info.overrides[info.override_count] = SourceOverride {
                        irq: source.irq,
                        gsi: source.global_system_interrupt,
                        flags: source.flags,
                    };
                    info.override_count += 1;
                }
                _ => {}
            }
        }
    }
    if let Ok(mcfg) = tables.find_table::<Mcfg>() {
        info.ecam = mcfg
            .get()
            .entries()
            .iter()
            .find(|entry| entry.pci_segment_group == 0)
            .map(|entry| EcamWindow {
                base: entry.base_address,
                segment: entry.pci_segment_group,
                bus_start: entry.bus_number_start,
                bus_end: entry.bus_number_end,
            });
    }
    Ok(info)
}
