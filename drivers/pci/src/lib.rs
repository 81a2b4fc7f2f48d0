//! Hardware-independent PCI for Vireo.
//!
//! This crate owns everything about PCI that does not touch hardware: the [`ConfigSpace`] seam
//! through which the platform reads and writes configuration space (ECAM or ports 0xCF8/0xCFC
//! live in the kernel's `src/pci.rs`), the walk of the capability list with loop protection, and
//! decoding and sizing of Base Address Registers. Everything here runs in host tests against fake
//! configuration spaces. References are to the PCI Local Bus Specification 3.0 (PCI LB 3.0).
//!
//! - this file: the [`ConfigSpace`] seam, [`PciAddress`], register offsets and the capability
//!   list walk;
//! - [`bar`]: BAR decoding and sizing;
//! - [`command`]: the command and status registers;
//! - [`function`]: a function's decoded header and its lspci-like `Display`;
//! - [`enumerate`](mod@enumerate): the walk of the bus hierarchy;
//! - [`msix`]: the MSI-X capability, Message Control and the x86 message encoding.
//!
//! Configuration space is untrusted input: nothing here panics or loops on what it reads.
//!
//! # What comes from `pci_types`, and what does not
//!
//! The ecosystem's `pci_types` crate (0.10) is the home of PCI's vocabulary, and this crate uses
//! it wherever it is sound on a configuration space that a device controls:
//!
//! - header decoding: [`Function::probe`] reads the ids, class codes, header type, multi-function
//!   bit, subsystem ids and bridge bus numbers through `pci_types`' `PciHeader`,
//!   `EndpointHeader` and `PciPciBridgeHeader`, over a read-only adapter of [`ConfigSpace`]
//!   (`pci_types` code never writes configuration space here);
//! - [`HeaderType`] is `pci_types::HeaderType`; [`class_name`] and [`Function::device_type`]
//!   classify through `pci_types::device_type::DeviceType`;
//! - the command register is `pci_types::CommandRegister` ([`CommandRegister`]);
//! - `pci_types::PciAddress` is the address at the kernel's `ConfigRegionAccess` seam, converted
//!   from [`PciAddress`] with [`TryFrom`].
//!
//! It keeps its own code where `pci_types` is not sound for an untrusted device. Each claim is
//! shown by a host test in `pci_types_limits.rs`, against this crate's fake configuration space:
//!
//! - **BAR decoding and sizing** ([`probe_bars`]): `EndpointHeader::bar` panics on a memory BAR
//!   with a reserved type (bits 2:1 = 0b01 or 0b11), where [`probe_bars`] reports
//!   [`BarError::ReservedMemoryType`]; it sizes a BAR with memory and I/O decoding left on, so the
//!   device decodes the all-ones probe address for a moment; a memory BAR with read-only
//!   address bits overflows a shift (a panic with overflow checks); it does not size I/O BARs.
//! - **The capability walk** ([`Capabilities`]): `pci_types`' `CapabilityIterator` follows next
//!   pointers with no bound, no check against the header (below 0x40) and no masking of the
//!   reserved low bits, so a list that loops never ends; [`Capabilities`] reports
//!   [`CapabilityError::Loop`] after at most 48 entries.
//! - **Command-register writes** ([`update_command_flags`]): `PciHeader::update_command` writes
//!   the status half back as it read it, clearing every write-one-to-clear error bit; this crate
//!   writes zeros there.
//! - **MSI-X** ([`MsixCapability`]): `pci_types`' MSI-X capability is only reachable through the
//!   unbounded walk and does not check the table and PBA against the BARs (a reserved BIR is
//!   taken as is); this crate's does, and has a typed [`msix::MessageControl`].
//! - **The address type**: [`PciAddress`] stays, because `pci_types::PciAddress::new` panics on
//!   a device number of 32 or more or a function number of 8 or more, and is not a `const fn`
//!   (the virtio crate's tests name a fixed address in a constant). Conversion to it is a
//!   checked [`TryFrom`].
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

use core::fmt;

pub mod bar;
pub mod command;
pub mod enumerate;
#[cfg(test)]
mod fake;
pub mod function;
pub mod msix;
#[cfg(test)]
mod pci_types_limits;

pub use bar::{Bar, BarError, Bars, ProbedBars, probe_bars};
pub use command::{
    CommandRegister, Status, disable_intx, enable_bus_mastering, enable_io_space,
    enable_memory_space, read_command, read_status, update_command, update_command_flags,
    write_command,
};
pub use enumerate::{Enumeration, EnumerationError, enumerate, enumerate_with_errors, is_present};
pub use function::{BridgeBuses, Function, HeaderType, Subsystem, class_name};
pub use msix::{
    MessageControl, MsiMessage, MsixCapability, MsixError, MsixStructure, x86_msi_message,
};
pub use pci_types::device_type::DeviceType;

/// A PCI function's address: segment group, bus, device (0..32) and function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment group (0 on everything QEMU builds).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciAddress {
    /// A function on segment 0.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            segment: 0,
            bus,
            device,
            function,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl From<pci_types::PciAddress> for PciAddress {
    fn from(address: pci_types::PciAddress) -> Self {
        Self {
            segment: address.segment(),
            bus: address.bus(),
            device: address.device(),
            function: address.function(),
        }
    }
}

/// A [`PciAddress`] with a device number of 32 or more or a function number of 8 or more, which
/// no configuration mechanism can address (`pci_types::PciAddress::new` would panic on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressOutOfRange(pub PciAddress);

impl fmt::Display for AddressOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.0;
        write!(
            f,
            "PCI address {:04x}:{:02x}:{:02x}.{} is out of range (device < 32, function < 8)",
            address.segment, address.bus, address.device, address.function
        )
    }
}

impl TryFrom<PciAddress> for pci_types::PciAddress {
    type Error = AddressOutOfRange;

    fn try_from(address: PciAddress) -> Result<Self, Self::Error> {
        if address.device >= 32 || address.function >= 8 {
            return Err(AddressOutOfRange(address));
        }
        Ok(pci_types::PciAddress::new(
            address.segment,
            address.bus,
            address.device,
            address.function,
        ))
    }
}

/// Access to PCI configuration space: the hardware seam of this crate.
///
/// Offsets are byte offsets into the function's configuration space and must be 4-byte aligned;
/// accesses are 32 bits wide, which every configuration mechanism supports. Implementations for
/// absent functions return all ones on read and ignore writes, as real hardware does.
pub trait ConfigSpace {
    /// Reads the aligned dword at `offset` of `address`.
    fn read32(&self, address: PciAddress, offset: u16) -> u32;
    /// Writes the aligned dword at `offset` of `address`.
    fn write32(&self, address: PciAddress, offset: u16, value: u32);

    /// Reads one byte, through the aligned dword that holds it.
    fn read8(&self, address: PciAddress, offset: u16) -> u8 {
        let dword = self.read32(address, offset & !3);
        (dword >> ((offset & 3) * 8)) as u8
    }

    /// Reads one little-endian 16-bit half, through the aligned dword that holds it.
    /// `offset` must be 2-byte aligned.
    fn read16(&self, address: PciAddress, offset: u16) -> u16 {
        let dword = self.read32(address, offset & !3);
        (dword >> ((offset & 2) * 8)) as u16
    }
}

/// A [`ConfigSpace`] seen as `pci_types`' `ConfigRegionAccess`, read-only: reads go through,
/// writes are dropped. It lets this crate call `pci_types`' header decoders on any configuration
/// space (fakes included) with the guarantee that `pci_types` code never writes one.
pub(crate) struct ReadOnlyAccess<'a, C: ConfigSpace + ?Sized>(pub(crate) &'a C);

// `ConfigRegionAccess` declares its methods `unsafe fn` because its usual implementors touch
// hardware; these two perform no unsafe operation (they call the safe `ConfigSpace` methods or
// nothing), so there is no contract for a caller to uphold. The lint only objects to the
// `unsafe fn` signatures that the trait imposes.
#[allow(unsafe_code)]
impl<C: ConfigSpace + ?Sized> pci_types::ConfigRegionAccess for ReadOnlyAccess<'_, C> {
    unsafe fn read(&self, address: pci_types::PciAddress, offset: u16) -> u32 {
        self.0.read32(address.into(), offset)
    }

    unsafe fn write(&self, _address: pci_types::PciAddress, _offset: u16, _value: u32) {}
}

/// Configuration-space register offsets of the common header (PCI LB 3.0 §6.1).
pub mod regs {
    /// Vendor id (16 bits) and device id (16 bits).
    pub const VENDOR_DEVICE: u16 = 0x00;
    /// Command (16 bits) and status (16 bits).
    pub const COMMAND_STATUS: u16 = 0x04;
    /// Revision (8), programming interface (8), subclass (8), class (8).
    pub const CLASS_REVISION: u16 = 0x08;
    /// Cache line size, latency timer, header type (bit 7: multi-function), BIST.
    pub const HEADER_TYPE_DWORD: u16 = 0x0c;
    /// First of the six BARs of a type-0 header.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor id (16) and subsystem id (16), type-0 header.
    pub const SUBSYSTEM: u16 = 0x2c;
    /// Capabilities pointer (low byte), valid when status bit 4 is set.
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (8) and interrupt pin (8).
    pub const INTERRUPT: u16 = 0x3c;
    /// Primary, secondary and subordinate bus numbers of a type-1 (bridge) header.
    pub const BRIDGE_BUS_NUMBERS: u16 = 0x18;

    use crate::{CommandRegister, Status};

    /// Command register bit 0, I/O Space, as raw bits (PCI LB 3.0 §6.2.2).
    pub const COMMAND_IO_SPACE: u16 = CommandRegister::IO_ENABLE.bits();
    /// Command register bit 1, Memory Space, as raw bits (PCI LB 3.0 §6.2.2).
    pub const COMMAND_MEMORY_SPACE: u16 = CommandRegister::MEMORY_ENABLE.bits();
    /// Command register bit 2, Bus Master: DMA and MSI writes, as raw bits (PCI LB 3.0 §6.2.2).
    pub const COMMAND_BUS_MASTER: u16 = CommandRegister::BUS_MASTER_ENABLE.bits();
    /// Command register bit 10, Interrupt Disable: no INTx, as raw bits (PCI LB 3.0 §6.2.2).
    pub const COMMAND_INTX_DISABLE: u16 = CommandRegister::INTERRUPT_DISABLE.bits();
    /// Status register bit 4, Capabilities List, as raw bits (PCI LB 3.0 §6.2.3).
    pub const STATUS_CAPABILITIES_LIST: u16 = Status::CAPABILITIES_LIST.bits();
}

/// Capability ids used by Vireo (PCI LB 3.0 appendix H).
pub mod cap_id {
    /// Message Signalled Interrupts.
    pub const MSI: u8 = 0x05;
    /// Vendor specific; virtio uses it for its structure locations.
    pub const VENDOR_SPECIFIC: u8 = 0x09;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// A capability found in a function's capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id (first byte).
    pub id: u8,
    /// Offset of the capability's first byte in configuration space.
    pub offset: u16,
}

/// Errors found while walking a capability list; the list is device-controlled input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapabilityError {
    /// A next pointer pointed into the standard header (below 0x40) or past the 256-byte space.
    PointerOutOfRange {
        /// The offending pointer value.
        pointer: u8,
    },
    /// The list did not end within the number of capabilities that fit in config space:
    /// a loop.
    Loop {
        /// The capability offset at which the walk gave up.
        at: u16,
    },
}

impl fmt::Display for CapabilityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PointerOutOfRange { pointer } => {
                write!(
                    f,
                    "capability pointer {pointer:#04x} is outside 0x40..=0xfc"
                )
            }
            Self::Loop { at } => write!(f, "capability list loops (gave up at {at:#04x})"),
        }
    }
}

/// At most this many capabilities fit between 0x40 and 0x100 (each is at least 4 bytes).
const MAX_CAPABILITIES: usize = (0x100 - 0x40) / 4;

/// Iterator over a function's capability list (PCI LB 3.0 §6.7).
///
/// It yields `Err` once, and then ends, when the list is malformed: a pointer into the header or
/// out of range, or a list longer than the configuration space can hold (a loop).
pub struct Capabilities<'a, C: ConfigSpace + ?Sized> {
    config: &'a C,
    address: PciAddress,
    next: u8,
    visited: usize,
    failed: bool,
}

impl<'a, C: ConfigSpace + ?Sized> Capabilities<'a, C> {
    /// Starts a walk at the capabilities pointer, or yields nothing when the status register says
    /// there is no list.
    pub fn new(config: &'a C, address: PciAddress) -> Self {
        let status = command::read_status(config, address);
        let next = if status.contains(Status::CAPABILITIES_LIST) {
            config.read8(address, regs::CAPABILITIES_POINTER)
        } else {
            0
        };
        Self {
            config,
            address,
            next,
            visited: 0,
            failed: false,
        }
    }
}

impl<C: ConfigSpace + ?Sized> Iterator for Capabilities<'_, C> {
    type Item = Result<Capability, CapabilityError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next == 0 {
            return None;
        }
        // The bottom two bits of a pointer are reserved and must be masked (PCI LB 3.0 §6.7).
        let pointer = self.next & !3;
        if pointer < 0x40 {
            self.failed = true;
            return Some(Err(CapabilityError::PointerOutOfRange {
                pointer: self.next,
            }));
        }
        if self.visited >= MAX_CAPABILITIES {
            self.failed = true;
            return Some(Err(CapabilityError::Loop {
                at: u16::from(pointer),
            }));
        }
        self.visited += 1;
        let offset = u16::from(pointer);
        let header = self.config.read16(self.address, offset);
        self.next = (header >> 8) as u8;
        Some(Ok(Capability {
            id: header as u8,
            offset,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, FakeFunction};

    const ADDR: PciAddress = PciAddress::new(0, 1, 0);

    fn walk(function: FakeFunction) -> Vec<Result<Capability, CapabilityError>> {
        let config = FakeConfig::new();
        config.insert(ADDR, function);
        Capabilities::new(&config, ADDR).collect()
    }

    fn device() -> FakeFunction {
        FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
    }

    #[test]
    fn walks_a_well_formed_list() {
        let caps = walk(
            device()
                .capability(0x84, 0x70, cap_id::VENDOR_SPECIFIC)
                .capability(0x70, 0x98, cap_id::VENDOR_SPECIFIC)
                .capability(0x98, 0x00, cap_id::MSIX)
                .with_capabilities_pointer(0x84),
        );
        assert_eq!(
            caps,
            [
                Ok(Capability {
                    id: cap_id::VENDOR_SPECIFIC,
                    offset: 0x84
                }),
                Ok(Capability {
                    id: cap_id::VENDOR_SPECIFIC,
                    offset: 0x70
                }),
                Ok(Capability {
                    id: cap_id::MSIX,
                    offset: 0x98
                }),
            ]
        );
    }

    #[test]
    fn no_list_when_status_bit_is_clear() {
        // A pointer is present but the status register says there is no list.
        assert_eq!(
            walk(
                device()
                    .capability(0x40, 0, cap_id::MSIX)
                    .dword(0x34, 0x40, 0)
            ),
            []
        );
    }

    #[test]
    fn reserved_pointer_bits_are_masked() {
        let caps = walk(
            device()
                .capability(0x40, 0x00, cap_id::MSI)
                .with_capabilities_pointer(0x43),
        );
        assert_eq!(
            caps,
            [Ok(Capability {
                id: cap_id::MSI,
                offset: 0x40
            })]
        );
    }

    #[test]
    fn loop_is_reported_once_and_ends_the_walk() {
        let caps = walk(
            device()
                .capability(0x40, 0x50, cap_id::MSI)
                .capability(0x50, 0x40, cap_id::MSIX)
                .with_capabilities_pointer(0x40),
        );
        assert_eq!(
            caps.len(),
            MAX_CAPABILITIES + 1,
            "bounded by what fits in config space"
        );
        assert!(caps[..MAX_CAPABILITIES].iter().all(Result::is_ok));
        assert_eq!(caps.last(), Some(&Err(CapabilityError::Loop { at: 0x40 })));

        // A capability that points at itself.
        let caps = walk(
            device()
                .capability(0xfc, 0xfc, cap_id::MSI)
                .with_capabilities_pointer(0xfc),
        );
        assert_eq!(caps.last(), Some(&Err(CapabilityError::Loop { at: 0xfc })));
    }

    #[test]
    fn pointer_into_header_is_reported() {
        let caps = walk(
            device()
                .capability(0x40, 0x10, cap_id::MSI)
                .with_capabilities_pointer(0x40),
        );
        assert_eq!(
            caps,
            [
                Ok(Capability {
                    id: cap_id::MSI,
                    offset: 0x40
                }),
                Err(CapabilityError::PointerOutOfRange { pointer: 0x10 }),
            ]
        );
        let caps = walk(device().with_capabilities_pointer(0x3c));
        assert_eq!(
            caps,
            [Err(CapabilityError::PointerOutOfRange { pointer: 0x3c })]
        );
        assert_eq!(
            CapabilityError::PointerOutOfRange { pointer: 0x10 }.to_string(),
            "capability pointer 0x10 is outside 0x40..=0xfc"
        );
    }

    #[test]
    fn address_display() {
        assert_eq!(PciAddress::new(0, 0x1f, 3).to_string(), "0000:00:1f.3");
    }

    #[test]
    fn address_converts_to_and_from_pci_types() {
        let address = PciAddress {
            segment: 2,
            bus: 0x80,
            device: 31,
            function: 7,
        };
        let converted = pci_types::PciAddress::try_from(address).expect("in range");
        assert_eq!(converted.to_string(), address.to_string());
        assert_eq!(PciAddress::from(converted), address);
        for (device, function) in [(32, 0), (0, 8), (0xff, 0xff)] {
            let bad = PciAddress::new(0, device, function);
            assert_eq!(
                pci_types::PciAddress::try_from(bad),
                Err(AddressOutOfRange(bad))
            );
        }
        assert_eq!(
            AddressOutOfRange(PciAddress::new(0, 32, 0)).to_string(),
            "PCI address 0000:00:20.0 is out of range (device < 32, function < 8)"
        );
    }
}
