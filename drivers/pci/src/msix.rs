//! MSI-X (PCI LB 3.0 §6.8.2): parsing and validating the capability, the Message Control bits
//! (MSI-X Enable, Function Mask), the table entry layout, and the x86 message encoding.
//!
//! The table and the Pending Bit Array live in memory BARs, which the kernel maps and writes
//! itself; this module only says where they are, after checking that they fit in their BARs.

use core::fmt;

use crate::{Bar, Bars, Capabilities, CapabilityError, ConfigSpace, PciAddress, cap_id};

bitflags::bitflags! {
    /// Message Control, the upper 16 bits of the capability's first dword (PCI LB 3.0 §6.8.2.3,
    /// "Message Control for MSI-X"; PCIe Base 4.0 §7.7.2.2). Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MessageControl: u16 {
        /// Bits 10:0, Table Size: the number of table entries minus one, read-only
        /// (PCI LB 3.0 §6.8.2.3).
        const TABLE_SIZE = 0x07ff;
        /// Bit 14, Function Mask: masks every vector of the function, whatever its entry's
        /// mask bit (PCI LB 3.0 §6.8.2.3).
        const FUNCTION_MASK = 1 << 14;
        /// Bit 15, MSI-X Enable: the function signals with MSI-X, not INTx or MSI
        /// (PCI LB 3.0 §6.8.2.3).
        const ENABLE = 1 << 15;
        const _ = !0;
    }
}

impl MessageControl {
    /// The number of table entries, 1..=2048 (Table Size + 1).
    pub const fn table_entries(self) -> u16 {
        (self.bits() & Self::TABLE_SIZE.bits()) + 1
    }
}

/// Offset of the Table Offset/Table BIR dword in the capability.
const TABLE_DWORD: u16 = 4;
/// Offset of the PBA Offset/PBA BIR dword in the capability.
const PBA_DWORD: u16 = 8;
/// Length of the capability structure in bytes.
const CAPABILITY_LEN: u16 = 12;
/// Bits 2:0 of the table and PBA dwords: the BAR Indicator Register.
const BIR_MASK: u32 = 0x7;
/// BIR values 0..=5 name BARs at 0x10..=0x24; 6 and 7 are reserved.
const MAX_BIR: u8 = 5;

/// Layout of one 16-byte MSI-X table entry (PCI LB 3.0 §6.8.2.6-9). The kernel writes entries
/// itself, through its MMIO mapping of the table's BAR.
pub mod entry {
    /// Size of one table entry in bytes.
    pub const SIZE: u64 = 16;
    /// Message Address, low 32 bits (bits 1:0 are zero).
    pub const ADDRESS_LOW: u64 = 0;
    /// Message Upper Address, high 32 bits.
    pub const ADDRESS_HIGH: u64 = 4;
    /// Message Data.
    pub const DATA: u64 = 8;
    /// Vector Control.
    pub const VECTOR_CONTROL: u64 = 12;
    /// Vector Control bit 0: the vector is masked.
    pub const VECTOR_CONTROL_MASKED: u32 = 1 << 0;
}

/// Which MSI-X structure an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixStructure {
    /// The MSI-X table.
    Table,
    /// The Pending Bit Array.
    PendingBitArray,
}

impl fmt::Display for MsixStructure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Table => "MSI-X table",
            Self::PendingBitArray => "MSI-X PBA",
        })
    }
}

/// A malformed or unusable MSI-X capability; all of it is device-controlled input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// The capability list could not be walked.
    CapabilityList(CapabilityError),
    /// The capability at `offset` is not MSI-X.
    NotMsix {
        /// Capability offset.
        offset: u16,
        /// The id found there.
        id: u8,
    },
    /// The 12-byte capability does not fit in the 256-byte configuration space.
    Truncated {
        /// Capability offset.
        offset: u16,
    },
    /// A BIR of 6 or 7, which are reserved.
    ReservedBir {
        /// Table or PBA.
        structure: MsixStructure,
        /// The BIR value.
        bir: u8,
    },
    /// The BIR names a BAR slot that is unimplemented, malformed, or the upper half of a
    /// 64-bit BAR.
    BarNotPresent {
        /// Table or PBA.
        structure: MsixStructure,
        /// The BIR value.
        bir: u8,
    },
    /// The BIR names an I/O BAR; MSI-X structures must be in memory space.
    BarNotMemory {
        /// Table or PBA.
        structure: MsixStructure,
        /// The BIR value.
        bir: u8,
    },
    /// The structure extends past the end of its BAR.
    OutsideBar {
        /// Table or PBA.
        structure: MsixStructure,
        /// The BIR value.
        bir: u8,
        /// Offset of the structure in the BAR.
        offset: u32,
        /// Length of the structure in bytes.
        len: u64,
        /// Size of the BAR in bytes.
        bar_size: u64,
    },
    /// A table entry index at or past the table size.
    EntryOutOfRange {
        /// The requested index.
        index: u16,
        /// Number of entries in the table.
        table_size: u16,
    },
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::CapabilityList(error) => write!(f, "MSI-X: {error}"),
            Self::NotMsix { offset, id } => {
                write!(f, "capability at {offset:#04x} has id {id:#04x}, not MSI-X")
            }
            Self::Truncated { offset } => {
                write!(
                    f,
                    "MSI-X capability at {offset:#04x} runs past configuration space"
                )
            }
            Self::ReservedBir { structure, bir } => {
                write!(f, "{structure} uses reserved BIR {bir}")
            }
            Self::BarNotPresent { structure, bir } => {
                write!(f, "{structure} is in BAR{bir}, which is not implemented")
            }
            Self::BarNotMemory { structure, bir } => {
                write!(f, "{structure} is in BAR{bir}, which is an I/O BAR")
            }
            Self::OutsideBar {
                structure,
                bir,
                offset,
                len,
                bar_size,
            } => write!(
                f,
                "{structure} at BAR{bir}+{offset:#x} ({len:#x} bytes) runs past the BAR's \
                 {bar_size:#x} bytes"
            ),
            Self::EntryOutOfRange { index, table_size } => {
                write!(
                    f,
                    "MSI-X entry {index} is out of range (table has {table_size})"
                )
            }
        }
    }
}

impl From<CapabilityError> for MsixError {
    fn from(error: CapabilityError) -> Self {
        Self::CapabilityList(error)
    }
}

/// A validated MSI-X capability: where the table and PBA are, and the state of its control bits
/// when it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// The function.
    pub address: PciAddress,
    /// Offset of the capability in configuration space.
    pub offset: u16,
    /// Number of table entries, 1..=2048 (Message Control encodes N - 1).
    pub table_size: u16,
    /// BAR slot holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR slot holding the Pending Bit Array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
    /// MSI-X Enable was set when the capability was read.
    pub enabled: bool,
    /// Function Mask was set when the capability was read.
    pub function_masked: bool,
}

impl MsixCapability {
    /// Finds the function's MSI-X capability and validates it against `bars`, or returns
    /// `Ok(None)` when the function has none.
    pub fn find<C: ConfigSpace + ?Sized>(
        config: &C,
        address: PciAddress,
        bars: &Bars,
    ) -> Result<Option<Self>, MsixError> {
        for capability in Capabilities::new(config, address) {
            let capability = capability?;
            if capability.id == cap_id::MSIX {
                return Self::parse(config, address, capability.offset, bars).map(Some);
            }
        }
        Ok(None)
    }

    /// Parses the MSI-X capability at `offset` and checks that the table and PBA name
    /// implemented memory BARs of `bars` and fit inside them.
    pub fn parse<C: ConfigSpace + ?Sized>(
        config: &C,
        address: PciAddress,
        offset: u16,
        bars: &Bars,
    ) -> Result<Self, MsixError> {
        if offset & 3 != 0 || offset > 0x100 - CAPABILITY_LEN {
            return Err(MsixError::Truncated { offset });
        }
        let header = config.read32(address, offset);
        let id = header as u8;
        if id != cap_id::MSIX {
            return Err(MsixError::NotMsix { offset, id });
        }
        let message_control = MessageControl::from_bits_retain((header >> 16) as u16);
        let table_size = message_control.table_entries();
        let table = config.read32(address, offset + TABLE_DWORD);
        let pba = config.read32(address, offset + PBA_DWORD);

        let capability = Self {
            address,
            offset,
            table_size,
            table_bar: (table & BIR_MASK) as u8,
            table_offset: table & !BIR_MASK,
            pba_bar: (pba & BIR_MASK) as u8,
            pba_offset: pba & !BIR_MASK,
            enabled: message_control.contains(MessageControl::ENABLE),
            function_masked: message_control.contains(MessageControl::FUNCTION_MASK),
        };
        check_fits(
            MsixStructure::Table,
            capability.table_bar,
            capability.table_offset,
            capability.table_len(),
            bars,
        )?;
        check_fits(
            MsixStructure::PendingBitArray,
            capability.pba_bar,
            capability.pba_offset,
            capability.pba_len(),
            bars,
        )?;
        Ok(capability)
    }

    /// Length of the table in bytes: 16 per entry.
    pub const fn table_len(&self) -> u64 {
        self.table_size as u64 * entry::SIZE
    }

    /// Length of the PBA in bytes: one bit per entry, in whole quadwords.
    pub const fn pba_len(&self) -> u64 {
        (self.table_size as u64).div_ceil(64) * 8
    }

    /// Offset of table entry `index` from the start of the table's BAR.
    pub const fn entry_offset(&self, index: u16) -> Result<u64, MsixError> {
        if index >= self.table_size {
            return Err(MsixError::EntryOutOfRange {
                index,
                table_size: self.table_size,
            });
        }
        Ok(self.table_offset as u64 + index as u64 * entry::SIZE)
    }

    /// Sets or clears MSI-X Enable.
    pub fn set_enabled<C: ConfigSpace + ?Sized>(&self, config: &C, enabled: bool) {
        self.update_message_control(config, MessageControl::ENABLE, enabled);
    }

    /// Sets or clears Function Mask.
    pub fn set_function_mask<C: ConfigSpace + ?Sized>(&self, config: &C, masked: bool) {
        self.update_message_control(config, MessageControl::FUNCTION_MASK, masked);
    }

    /// Reads the current Message Control register.
    pub fn message_control<C: ConfigSpace + ?Sized>(&self, config: &C) -> MessageControl {
        MessageControl::from_bits_retain((config.read32(self.address, self.offset) >> 16) as u16)
    }

    /// Read-modify-writes the capability's first dword, changing only `flag` of Message Control.
    fn update_message_control<C: ConfigSpace + ?Sized>(
        &self,
        config: &C,
        flag: MessageControl,
        set: bool,
    ) {
        let dword = config.read32(self.address, self.offset);
        let mut control = MessageControl::from_bits_retain((dword >> 16) as u16);
        control.set(flag, set);
        config.write32(
            self.address,
            self.offset,
            (dword & 0xffff) | u32::from(control.bits()) << 16,
        );
    }
}

/// Checks that `len` bytes at `offset` of BAR `bir` lie in an implemented memory BAR.
fn check_fits(
    structure: MsixStructure,
    bir: u8,
    offset: u32,
    len: u64,
    bars: &Bars,
) -> Result<(), MsixError> {
    if bir > MAX_BIR {
        return Err(MsixError::ReservedBir { structure, bir });
    }
    match bars.get(usize::from(bir)).copied().flatten() {
        None => Err(MsixError::BarNotPresent { structure, bir }),
        Some(Bar::Io { .. }) => Err(MsixError::BarNotMemory { structure, bir }),
        Some(Bar::Memory { size: bar_size, .. }) => {
            // Cannot overflow: offset < 2^32 and len <= 2048 * 16.
            if u64::from(offset) + len > bar_size {
                Err(MsixError::OutsideBar {
                    structure,
                    bir,
                    offset,
                    len,
                    bar_size,
                })
            } else {
                Ok(())
            }
        }
    }
}

/// An MSI message: what the device writes, and where, to raise an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// Low 32 bits of the address, for [`entry::ADDRESS_LOW`].
    pub const fn address_low(&self) -> u32 {
        self.address as u32
    }

    /// High 32 bits of the address, for [`entry::ADDRESS_HIGH`].
    pub const fn address_high(&self) -> u32 {
        (self.address >> 32) as u32
    }
}

/// Base of the x86 MSI address window (Intel SDM vol. 3 §11.11.1).
pub const X86_MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// Encodes an x86 MSI message for `vector` to the local APIC `dest_apic_id`: physical
/// destination mode, no redirection hint, fixed delivery, edge triggered (Intel SDM vol. 3
/// §11.11.1 and §11.11.2).
pub const fn x86_msi_message(dest_apic_id: u8, vector: u8) -> MsiMessage {
    MsiMessage {
        address: X86_MSI_ADDRESS_BASE | (dest_apic_id as u64) << 12,
        data: vector as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, FakeFunction};
    use crate::regs;

    const ADDR: PciAddress = PciAddress::new(0, 1, 0);

    /// BAR0 I/O, BAR1 4 KiB memory, BAR2/3 a 64-bit 16 KiB memory BAR, BAR4/5 unimplemented.
    fn bars() -> Bars {
        [
            Some(Bar::Io {
                port: 0xc000,
                size: 0x40,
            }),
            Some(Bar::Memory {
                address: 0xfebd_1000,
                size: 0x1000,
                prefetchable: false,
                is_64bit: false,
            }),
            Some(Bar::Memory {
                address: 0x8_0000_0000,
                size: 0x4000,
                prefetchable: true,
                is_64bit: true,
            }),
            None,
            None,
            None,
        ]
    }

    /// A function whose only capability is MSI-X at 0x40 with the given fields.
    fn config_with_msix(table_size: u16, table: u32, pba: u32) -> FakeConfig {
        let config = FakeConfig::new();
        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
                .msix(0x40, 0, table_size, table, pba),
        );
        config
    }

    fn parse(config: &FakeConfig) -> Result<MsixCapability, MsixError> {
        MsixCapability::parse(config, ADDR, 0x40, &bars())
    }

    #[test]
    fn parses_valid_capability() {
        let config = config_with_msix(3, 1, 0x800 | 1);
        let msix = MsixCapability::find(&config, ADDR, &bars())
            .expect("valid")
            .expect("present");
        assert_eq!(
            msix,
            MsixCapability {
                address: ADDR,
                offset: 0x40,
                table_size: 3,
                table_bar: 1,
                table_offset: 0,
                pba_bar: 1,
                pba_offset: 0x800,
                enabled: false,
                function_masked: false,
            }
        );
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
    }

    #[test]
    fn table_size_uses_n_minus_1_encoding_up_to_2048() {
        // 2048 entries * 16 bytes = 32 KiB, in a 64-bit BAR of 16 KiB: too big...
        let config = config_with_msix(2048, 2, 0x3000 | 2);
        assert!(matches!(
            parse(&config),
            Err(MsixError::OutsideBar { len: 0x8000, .. })
        ));
        // ...and 768 entries fill the first 12 KiB, with the PBA after them.
        let config = config_with_msix(1024 - 256, 2, 0x3800 | 2);
        let msix = parse(&config).expect("fits");
        assert_eq!(msix.table_size, 768);
        assert_eq!(msix.table_len(), 0x3000);
        assert_eq!(msix.pba_len(), 96);
    }

    #[test]
    fn reserved_birs_are_rejected() {
        for bir in [6, 7] {
            let config = config_with_msix(4, bir, 0x800 | 1);
            assert_eq!(
                parse(&config),
                Err(MsixError::ReservedBir {
                    structure: MsixStructure::Table,
                    bir: bir as u8
                })
            );
            let config = config_with_msix(4, 1, 0x800 | bir);
            assert_eq!(
                parse(&config),
                Err(MsixError::ReservedBir {
                    structure: MsixStructure::PendingBitArray,
                    bir: bir as u8
                })
            );
        }
    }

    #[test]
    fn table_past_bar_end_is_rejected() {
        // 16 entries (256 bytes) at 0xf80 of a 4 KiB BAR end at 0x1080.
        let config = config_with_msix(16, 0xf80 | 1, 0x800 | 1);
        assert_eq!(
            parse(&config),
            Err(MsixError::OutsideBar {
                structure: MsixStructure::Table,
                bir: 1,
                offset: 0xf80,
                len: 256,
                bar_size: 0x1000
            })
        );
        // 16 entries right at the end fit.
        let config = config_with_msix(16, 0xf00 | 1, 0x800 | 1);
        assert!(parse(&config).is_ok());
    }

    #[test]
    fn pba_past_bar_end_is_rejected() {
        // 65 entries need two PBA quadwords; the last one fits at 0xff8, two do not.
        let config = config_with_msix(64, 1, 0xff8 | 1);
        assert!(parse(&config).is_ok());
        let config = config_with_msix(65, 1, 0xff8 | 1);
        assert!(matches!(
            parse(&config),
            Err(MsixError::OutsideBar {
                structure: MsixStructure::PendingBitArray,
                offset: 0xff8,
                ..
            })
        ));
    }

    #[test]
    fn bir_must_name_an_implemented_memory_bar() {
        let config = config_with_msix(4, 0, 0x800 | 1);
        assert_eq!(
            parse(&config),
            Err(MsixError::BarNotMemory {
                structure: MsixStructure::Table,
                bir: 0
            })
        );
        // Slot 3 is the upper half of the 64-bit BAR2.
        let config = config_with_msix(4, 3, 0x800 | 1);
        assert_eq!(
            parse(&config),
            Err(MsixError::BarNotPresent {
                structure: MsixStructure::Table,
                bir: 3
            })
        );
        let config = config_with_msix(4, 1, 0x800 | 5);
        assert_eq!(
            parse(&config),
            Err(MsixError::BarNotPresent {
                structure: MsixStructure::PendingBitArray,
                bir: 5
            })
        );
    }

    #[test]
    fn wrong_id_and_truncated_capability_are_rejected() {
        let config = FakeConfig::new();
        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1).dword(0x40, 0x0000_0009, 0),
        );
        assert_eq!(
            MsixCapability::parse(&config, ADDR, 0x40, &bars()),
            Err(MsixError::NotMsix {
                offset: 0x40,
                id: 0x09
            })
        );
        assert_eq!(
            MsixCapability::parse(&config, ADDR, 0xf8, &bars()),
            Err(MsixError::Truncated { offset: 0xf8 })
        );
    }

    #[test]
    fn find_without_msix_is_none_and_propagates_list_errors() {
        let config = FakeConfig::new();
        config.insert(ADDR, FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1));
        assert_eq!(MsixCapability::find(&config, ADDR, &bars()), Ok(None));

        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
                .capability(0x40, 0x10, 0x09)
                .with_capabilities_pointer(0x40),
        );
        assert_eq!(
            MsixCapability::find(&config, ADDR, &bars()),
            Err(MsixError::CapabilityList(
                CapabilityError::PointerOutOfRange { pointer: 0x10 }
            ))
        );
    }

    #[test]
    fn message_control_rmw_keeps_other_bits() {
        let config = config_with_msix(3, 1, 0x800 | 1);
        // Make the whole dword writable so that a careless write would show.
        config.set_writable(ADDR, 0x40, u32::MAX);
        let msix = parse(&config).expect("valid");
        let original = config.read32(ADDR, 0x40);
        assert_eq!(
            original, 0x0002_0011,
            "table size 3 (encoded 2), id 0x11, next 0"
        );

        msix.set_function_mask(&config, true);
        assert_eq!(config.read32(ADDR, 0x40), original | 1 << 30);
        msix.set_enabled(&config, true);
        assert_eq!(config.read32(ADDR, 0x40), original | 1 << 30 | 1 << 31);
        assert_eq!(
            msix.message_control(&config),
            MessageControl::ENABLE
                | MessageControl::FUNCTION_MASK
                | MessageControl::from_bits_retain(2)
        );
        assert_eq!(msix.message_control(&config).table_entries(), 3);
        msix.set_function_mask(&config, false);
        assert_eq!(config.read32(ADDR, 0x40), original | 1 << 31);
        msix.set_enabled(&config, false);
        assert_eq!(config.read32(ADDR, 0x40), original);
        assert_eq!(config.read32(ADDR, 0x44), 1, "table dword untouched");
        assert_eq!(
            config.read16(ADDR, regs::COMMAND_STATUS),
            0,
            "command untouched"
        );
    }

    #[test]
    fn entry_offsets_are_bounded() {
        let config = config_with_msix(3, 0x100 | 1, 0x800 | 1);
        let msix = parse(&config).expect("valid");
        assert_eq!(msix.entry_offset(0), Ok(0x100));
        assert_eq!(msix.entry_offset(2), Ok(0x120));
        assert_eq!(
            msix.entry_offset(3),
            Err(MsixError::EntryOutOfRange {
                index: 3,
                table_size: 3
            })
        );
    }

    #[test]
    fn x86_message_encoding() {
        let message = x86_msi_message(3, 0x40);
        assert_eq!(
            message,
            MsiMessage {
                address: 0xfee0_3000,
                data: 0x40
            }
        );
        assert_eq!(
            (message.address_low(), message.address_high()),
            (0xfee0_3000, 0)
        );
        assert_eq!(x86_msi_message(0xff, 0xfe).address, 0xfeef_f000);
        assert_eq!(
            (
                entry::ADDRESS_LOW,
                entry::ADDRESS_HIGH,
                entry::DATA,
                entry::VECTOR_CONTROL
            ),
            (0, 4, 8, 12)
        );
        assert_eq!(entry::VECTOR_CONTROL_MASKED, 1);
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            MsixError::ReservedBir {
                structure: MsixStructure::Table,
                bir: 7
            }
            .to_string(),
            "MSI-X table uses reserved BIR 7"
        );
        assert_eq!(
            MsixError::OutsideBar {
                structure: MsixStructure::Table,
                bir: 1,
                offset: 0xf80,
                len: 256,
                bar_size: 0x1000
            }
            .to_string(),
            "MSI-X table at BAR1+0xf80 (0x100 bytes) runs past the BAR's 0x1000 bytes"
        );
    }
}
