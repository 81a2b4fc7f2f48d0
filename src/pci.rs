//! PCI configuration access on this machine: ECAM from the ACPI MCFG (q35) or ports
//! 0xCF8/0xCFC (pc/i440fx, or whenever there is no MCFG), both through `pci_types`'
//! `ConfigRegionAccess`, and the safe `pci::ConfigSpace` seam that the hardware-independent
//! `pci` and `virtio` crates use.

use pci_types::ConfigRegionAccess;
use spin::Mutex;

use crate::acpi::EcamWindow;
use crate::mem;

/// Memory-mapped configuration (PCIe ECAM): 4 KiB per function, 1 MiB per bus.
pub struct EcamAccess {
    window: EcamWindow,
}

impl ConfigRegionAccess for EcamAccess {
    unsafe fn read(&self, address: pci_types::PciAddress, offset: u16) -> u32 {
        match self.dword_address(address, offset) {
            // SAFETY: the caller passes a function address; `dword_address` bounds it to the
            // mapped ECAM window and aligns the offset, so this is an aligned uncached load.
            Some(pointer) => unsafe { core::ptr::read_volatile(pointer as *const u32) },
            None => u32::MAX,
        }
    }

    unsafe fn write(&self, address: pci_types::PciAddress, offset: u16, value: u32) {
        if let Some(pointer) = self.dword_address(address, offset) {
            // SAFETY: as for `read`; the caller is responsible for what the write does to the
            // device (the safe wrapper only lets the pci/virtio crates write registers).
            unsafe { core::ptr::write_volatile(pointer as *mut u32, value) }
        }
    }
}

impl EcamAccess {
    /// Maps the whole ECAM window uncached.
    pub fn new(window: EcamWindow) -> Result<Self, mem::MapError> {
        let buses = u64::from(window.bus_end.saturating_sub(window.bus_start)) + 1;
        mem::map_mmio(
            window.base + (u64::from(window.bus_start) << 20),
            buses << 20,
        )?;
        Ok(Self { window })
    }

    fn dword_address(&self, address: pci_types::PciAddress, offset: u16) -> Option<u64> {
        // `pci_types::PciAddress` holds only device < 32 and function < 8.
        let bus = address.bus();
        if address.segment() != self.window.segment
            || bus < self.window.bus_start
            || bus > self.window.bus_end
            || offset >= 4096
        {
            return None;
        }
        Some(
            self.window.base
                + (u64::from(bus) << 20)
                + (u64::from(address.device()) << 15)
                + (u64::from(address.function()) << 12)
                + u64::from(offset & !3),
        )
    }
}

/// Configuration mechanism #1: address to 0xCF8, data through 0xCFC (256 bytes per function).
pub struct PortAccess {
    lock: Mutex<()>,
}

impl PortAccess {
    /// The port mechanism.
    pub const fn new() -> Self {
        Self {
            lock: Mutex::new(()),
        }
    }

    fn config_address(address: pci_types::PciAddress, offset: u16) -> Option<u32> {
        // `pci_types::PciAddress` holds only device < 32 and function < 8.
        if address.segment() != 0 || offset >= 256 {
            return None;
        }
        Some(
            0x8000_0000
                | (u32::from(address.bus()) << 16)
                | (u32::from(address.device()) << 11)
                | (u32::from(address.function()) << 8)
                | u32::from(offset & 0xfc),
        )
    }
}

impl ConfigRegionAccess for PortAccess {
    unsafe fn read(&self, address: pci_types::PciAddress, offset: u16) -> u32 {
        let Some(config_address) = Self::config_address(address, offset) else {
            return u32::MAX;
        };
        // The address/data pair must not interleave with another access: hold the lock with
        // interrupts off.
        crate::arch::interrupts::without_interrupts(|| {
            let _guard = self.lock.lock();
            crate::arch::outl(0xcf8, config_address);
            crate::arch::inl(0xcfc)
        })
    }

    unsafe fn write(&self, address: pci_types::PciAddress, offset: u16, value: u32) {
        let Some(config_address) = Self::config_address(address, offset) else {
            return;
        };
        crate::arch::interrupts::without_interrupts(|| {
            let _guard = self.lock.lock();
            crate::arch::outl(0xcf8, config_address);
            crate::arch::outl(0xcfc, value);
        });
    }
}

/// The configuration mechanism this machine uses.
pub enum PlatformConfig {
    /// ECAM (from the MCFG).
    Ecam(EcamAccess),
    /// Ports 0xCF8/0xCFC.
    Ports(PortAccess),
}

impl PlatformConfig {
    /// ECAM when the MCFG gave a window and it maps, else the port mechanism.
    pub fn new(ecam: Option<EcamWindow>) -> Self {
        if let Some(window) = ecam {
            match EcamAccess::new(window) {
                Ok(access) => return Self::Ecam(access),
                Err(error) => log::warn!(
                    "pci: cannot map ECAM at {:#x} ({error}); using ports 0xCF8/0xCFC",
                    window.base
                ),
            }
        }
        Self::Ports(PortAccess::new())
    }

    /// A short description for the boot log.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Ecam(_) => "ECAM",
            Self::Ports(_) => "ports 0xCF8/0xCFC",
        }
    }

    fn access(&self) -> &dyn ConfigRegionAccess {
        match self {
            Self::Ecam(access) => access,
            Self::Ports(access) => access,
        }
    }
}

impl pci::ConfigSpace for PlatformConfig {
    fn read32(&self, address: pci::PciAddress, offset: u16) -> u32 {
        // An address no mechanism can reach reads as an absent function's all ones.
        let Ok(address) = pci_types::PciAddress::try_from(address) else {
            return u32::MAX;
        };
        // SAFETY: configuration reads have no memory effects; out-of-range addresses read as
        // all ones in both mechanisms.
        unsafe { self.access().read(address, offset) }
    }

    fn write32(&self, address: pci::PciAddress, offset: u16, value: u32) {
        let Ok(address) = pci_types::PciAddress::try_from(address) else {
            return;
        };
        // SAFETY: configuration writes reprogram devices. The callers are the pci crate (BAR
        // sizing with restore, command bits on devices Vireo drives, MSI-X control) and the
        // virtio transport; none of them points a device's DMA at memory it does not own.
        unsafe { self.access().write(address, offset, value) }
    }
}

/// Failures while setting up a function's MSI-X table.
#[derive(Clone, Copy, Debug)]
pub enum MsixSetupError {
    /// The table's BAR is not a memory BAR.
    TableBarMissing {
        /// BAR index.
        bar: u8,
    },
    /// The table could not be mapped.
    Map(mem::MapError),
    /// More vectors were asked for than the table has.
    EntryOutOfRange {
        /// Entry index.
        index: u16,
        /// Table size.
        table_size: u16,
    },
}

impl core::fmt::Display for MsixSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TableBarMissing { bar } => write!(f, "MSI-X table BAR{bar} is not a memory BAR"),
            Self::Map(error) => write!(f, "cannot map the MSI-X table: {error}"),
            Self::EntryOutOfRange { index, table_size } => {
                write!(
                    f,
                    "MSI-X entry {index} is outside the {table_size}-entry table"
                )
            }
        }
    }
}

/// A function's MSI-X table, mapped uncached, with MSI-X enabled.
pub struct MsixTable {
    capability: ::pci::MsixCapability,
    base: u64,
}

impl MsixTable {
    /// Maps the table, masks every entry, and enables MSI-X with the function mask set (so
    /// nothing fires while entries are programmed); call [`MsixTable::unmask_function`] after
    /// programming.
    pub fn enable(
        config: &PlatformConfig,
        capability: ::pci::MsixCapability,
        bars: &::pci::Bars,
    ) -> Result<Self, MsixSetupError> {
        let Some(Some(::pci::Bar::Memory { address, .. })) =
            bars.get(usize::from(capability.table_bar))
        else {
            return Err(MsixSetupError::TableBarMissing {
                bar: capability.table_bar,
            });
        };
        let physical = address + u64::from(capability.table_offset);
        let base = mem::map_mmio(physical, capability.table_len()).map_err(MsixSetupError::Map)?;
        let table = Self { capability, base };
        capability.set_function_mask(config, true);
        capability.set_enabled(config, true);
        for index in 0..capability.table_size {
            table.write(
                index,
                ::pci::msix::entry::VECTOR_CONTROL,
                ::pci::msix::entry::VECTOR_CONTROL_MASKED,
            );
        }
        Ok(table)
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.capability.table_size
    }

    fn write(&self, index: u16, field: u64, value: u32) {
        if index >= self.capability.table_size {
            return;
        }
        let address = self.base + u64::from(index) * ::pci::msix::entry::SIZE + field;
        // SAFETY: `index` is inside the table, which `enable` mapped uncached for
        // `table_len()` bytes; fields are 4-byte aligned dwords of the 16-byte entry.
        unsafe { core::ptr::write_volatile(address as *mut u32, value) };
    }

    /// Points entry `index` at `vector` on the local APIC `apic_id` and unmasks it.
    pub fn route(&self, index: u16, apic_id: u8, vector: u8) -> Result<(), MsixSetupError> {
        if index >= self.capability.table_size {
            return Err(MsixSetupError::EntryOutOfRange {
                index,
                table_size: self.capability.table_size,
            });
        }
        let message = ::pci::x86_msi_message(apic_id, vector);
        use ::pci::msix::entry;
        // Mask, write address and data, then unmask (PCI LB 3.0 §6.8.3.5: software must not
        // change an unmasked entry).
        self.write(index, entry::VECTOR_CONTROL, entry::VECTOR_CONTROL_MASKED);
        self.write(index, entry::ADDRESS_LOW, message.address_low());
        self.write(index, entry::ADDRESS_HIGH, message.address_high());
        self.write(index, entry::DATA, message.data);
        self.write(index, entry::VECTOR_CONTROL, 0);
        Ok(())
    }

    /// Clears the function mask: programmed entries may now fire.
    pub fn unmask_function(&self, config: &PlatformConfig) {
        self.capability.set_function_mask(config, false);
    }

    /// Disables MSI-X (back to INTx).
    pub fn disable(&self, config: &PlatformConfig) {
        self.capability.set_enabled(config, false);
    }
}
