//! Hardware-independent PCI for Vireo.
//!
//! This crate owns everything about PCI that does not touch hardware: the [`ConfigSpace`] seam
//! through which the platform reads and writes configuration space (ECAM or ports 0xCF8/0xCFC
//! live in the kernel's `src/pci.rs`), the walk of the capability list with loop protection, and
//! decoding and sizing of Base Address Registers. Everything here runs in host tests against fake
//! configuration spaces. References are to the PCI Local Bus Specification 3.0 (PCI LB 3.0).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

use core::fmt;

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
        Self { segment: 0, bus, device, function }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{}", self.segment, self.bus, self.device, self.function)
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

    /// Command register: respond to I/O space accesses.
    pub const COMMAND_IO_SPACE: u16 = 1 << 0;
    /// Command register: respond to memory space accesses.
    pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
    /// Command register: may act as a bus master (DMA, MSI writes).
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    /// Command register: INTx assertion disabled.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Status register: the capability list is present.
    pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
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
                write!(f, "capability pointer {pointer:#04x} is outside 0x40..=0xfc")
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
        let status = (config.read32(address, regs::COMMAND_STATUS) >> 16) as u16;
        let next = if status & regs::STATUS_CAPABILITIES_LIST != 0 {
            config.read8(address, regs::CAPABILITIES_POINTER)
        } else {
            0
        };
        Self { config, address, next, visited: 0, failed: false }
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
            return Some(Err(CapabilityError::PointerOutOfRange { pointer: self.next }));
        }
        if self.visited >= MAX_CAPABILITIES {
            self.failed = true;
            return Some(Err(CapabilityError::Loop { at: u16::from(pointer) }));
        }
        self.visited += 1;
        let offset = u16::from(pointer);
        let header = self.config.read16(self.address, offset);
        self.next = (header >> 8) as u8;
        Some(Ok(Capability { id: header as u8, offset }))
    }
}

/// A decoded and sized Base Address Register (PCI LB 3.0 §6.2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// A memory BAR.
    Memory {
        /// Physical base address.
        address: u64,
        /// Size in bytes (a power of two).
        size: u64,
        /// Prefetchable memory.
        prefetchable: bool,
        /// A 64-bit BAR, which also occupies the next BAR slot.
        is_64bit: bool,
    },
    /// An I/O-space BAR.
    Io {
        /// Port base.
        port: u32,
        /// Size in ports.
        size: u32,
    },
}

/// The six BAR slots of a type-0 function; the upper half of a 64-bit BAR reads as `None`.
pub type Bars = [Option<Bar>; 6];
