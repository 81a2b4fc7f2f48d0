//! Base Address Registers: decoding and sizing (PCI LB 3.0 §6.2.5.1).
//!
//! This module owns the only configuration-space writes that enumeration makes: the
//! write-all-ones probe that reveals a BAR's size. While it probes, memory and I/O decoding are
//! off in the command register, and afterwards every BAR and the command register hold their
//! original values again.

use core::fmt;

use crate::command::{CommandRegister, read_command, write_command};
use crate::{ConfigSpace, PciAddress, regs};

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

impl Bar {
    /// The base address, in memory or I/O space.
    pub const fn base(&self) -> u64 {
        match *self {
            Self::Memory { address, .. } => address,
            Self::Io { port, .. } => port as u64,
        }
    }

    /// The size in bytes (memory) or ports (I/O).
    pub const fn size(&self) -> u64 {
        match *self {
            Self::Memory { size, .. } => size,
            Self::Io { size, .. } => size as u64,
        }
    }

    /// Whether this is a memory BAR.
    pub const fn is_memory(&self) -> bool {
        matches!(self, Self::Memory { .. })
    }
}

impl fmt::Display for Bar {
    /// `mem64 0x0000000800000000+0x4000 pref`, `mem32 0x00000000febd1000+0x1000` or
    /// `io 0xc000+0x20`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Memory {
                address,
                size,
                prefetchable,
                is_64bit,
            } => {
                let width = if is_64bit { "mem64" } else { "mem32" };
                write!(f, "{width} {address:#018x}+{size:#x}")?;
                if prefetchable {
                    f.write_str(" pref")?;
                }
                Ok(())
            }
            Self::Io { port, size } => write!(f, "io {port:#06x}+{size:#x}"),
        }
    }
}

/// The six BAR slots of a function, by slot index. A type-0 header uses all six, a type-1
/// (bridge) header only slots 0 and 1. The upper half of a 64-bit BAR, an unimplemented BAR and
/// a malformed one all read as `None`.
pub type Bars = [Option<Bar>; 6];

/// Number of BAR slots in a type-0 (endpoint) header.
pub const ENDPOINT_BAR_SLOTS: usize = 6;
/// Number of BAR slots in a type-1 (PCI-to-PCI bridge) header.
pub const BRIDGE_BAR_SLOTS: usize = 2;

/// A BAR that cannot be decoded; the BAR registers are device-controlled input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// A 64-bit memory BAR in the last slot, which has no upper half to pair with.
    SixtyFourBitInLastSlot {
        /// The slot holding the lower half.
        slot: u8,
    },
    /// A memory BAR with a reserved type in bits 2:1 (0b01 or 0b11).
    ReservedMemoryType {
        /// The slot.
        slot: u8,
        /// The BAR's original value.
        raw: u32,
    },
}

impl fmt::Display for BarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::SixtyFourBitInLastSlot { slot } => {
                write!(
                    f,
                    "BAR{slot} is 64-bit but is the last BAR slot (no upper half)"
                )
            }
            Self::ReservedMemoryType { slot, raw } => {
                write!(f, "BAR{slot} has a reserved memory type (raw {raw:#010x})")
            }
        }
    }
}

/// The outcome of probing a function's BARs: a decoded BAR or an error per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbedBars {
    /// The decoded BARs by slot.
    pub bars: Bars,
    /// The slots that could not be decoded, by slot.
    pub errors: [Option<BarError>; 6],
}

/// BAR bit 0: I/O space indicator.
const BAR_IO_SPACE: u32 = 1 << 0;
/// Memory BAR bits 2:1: type (0b00 32-bit, 0b10 64-bit, others reserved).
const BAR_MEMORY_TYPE_MASK: u32 = 0b110;
/// Memory BAR type 0b10: 64-bit, occupies two slots.
const BAR_MEMORY_TYPE_64: u32 = 0b100;
/// Memory BAR type 0b00: 32-bit.
const BAR_MEMORY_TYPE_32: u32 = 0b000;
/// Memory BAR bit 3: prefetchable.
const BAR_MEMORY_PREFETCHABLE: u32 = 1 << 3;
/// Address bits of a memory BAR's low dword.
const BAR_MEMORY_ADDRESS_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
const BAR_IO_ADDRESS_MASK: u32 = !0x3;

/// Offset of BAR slot `slot`.
const fn bar_offset(slot: usize) -> u16 {
    regs::BAR0 + 4 * slot as u16
}

/// The size a probe reveals: the lowest writable address bit, or `None` when no address bit is
/// writable (an unimplemented BAR). Using the lowest set bit, rather than inverting the mask,
/// also sizes I/O BARs whose upper 16 bits read as zero.
const fn size_from_mask(mask: u64) -> Option<u64> {
    if mask == 0 {
        None
    } else {
        Some(mask & mask.wrapping_neg())
    }
}

/// Writes all ones to the BAR at `offset`, reads back the result, and restores `original`.
fn probe_dword<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    offset: u16,
    original: u32,
) -> u32 {
    config.write32(address, offset, u32::MAX);
    let mask = config.read32(address, offset);
    config.write32(address, offset, original);
    mask
}

/// Decodes and sizes the first `slot_count` BARs (at most six) of the function at `address`.
///
/// This writes to configuration space: memory and I/O decoding are turned off in the command
/// register, each BAR is probed with all ones and restored, and the command register is
/// restored. It never touches a register past the last slot, even for a 64-bit BAR there.
/// Call it only while nothing else uses the device, as at enumeration.
pub fn probe_bars<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    slot_count: usize,
) -> ProbedBars {
    let slot_count = slot_count.min(ENDPOINT_BAR_SLOTS);
    let mut probed = ProbedBars::default();
    if slot_count == 0 {
        return probed;
    }

    // Decoding off while a BAR holds all ones, so the device never claims a bogus range.
    let command = read_command(config, address);
    let decode = CommandRegister::MEMORY_ENABLE | CommandRegister::IO_ENABLE;
    if command.intersects(decode) {
        write_command(config, address, command.difference(decode));
    }

    let mut slot = 0;
    while slot < slot_count {
        let offset = bar_offset(slot);
        let low = config.read32(address, offset);
        // Slots are < 6, so the casts to u8 below are lossless.
        let slot_u8 = slot as u8;
        if low & BAR_IO_SPACE != 0 {
            let mask = probe_dword(config, address, offset, low) & BAR_IO_ADDRESS_MASK;
            probed.bars[slot] = size_from_mask(u64::from(mask)).map(|size| Bar::Io {
                port: low & BAR_IO_ADDRESS_MASK,
                size: size as u32,
            });
            slot += 1;
            continue;
        }
        let prefetchable = low & BAR_MEMORY_PREFETCHABLE != 0;
        match low & BAR_MEMORY_TYPE_MASK {
            BAR_MEMORY_TYPE_32 => {
                let mask = probe_dword(config, address, offset, low) & BAR_MEMORY_ADDRESS_MASK;
                probed.bars[slot] = size_from_mask(u64::from(mask)).map(|size| Bar::Memory {
                    address: u64::from(low & BAR_MEMORY_ADDRESS_MASK),
                    size,
                    prefetchable,
                    is_64bit: false,
                });
                slot += 1;
            }
            BAR_MEMORY_TYPE_64 => {
                if slot + 1 >= slot_count {
                    probed.errors[slot] = Some(BarError::SixtyFourBitInLastSlot { slot: slot_u8 });
                    slot += 1;
                    continue;
                }
                let high_offset = bar_offset(slot + 1);
                let high = config.read32(address, high_offset);
                let low_mask = probe_dword(config, address, offset, low) & BAR_MEMORY_ADDRESS_MASK;
                let high_mask = probe_dword(config, address, high_offset, high);
                let mask = (u64::from(high_mask) << 32) | u64::from(low_mask);
                probed.bars[slot] = size_from_mask(mask).map(|size| Bar::Memory {
                    address: (u64::from(high) << 32) | u64::from(low & BAR_MEMORY_ADDRESS_MASK),
                    size,
                    prefetchable,
                    is_64bit: true,
                });
                slot += 2;
            }
            _ => {
                probed.errors[slot] = Some(BarError::ReservedMemoryType {
                    slot: slot_u8,
                    raw: low,
                });
                slot += 1;
            }
        }
    }

    if command.intersects(decode) {
        write_command(config, address, command);
    }
    probed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Access, FakeConfig, FakeFunction};

    const ADDR: PciAddress = PciAddress::new(0, 3, 0);

    fn probe_one(function: FakeFunction) -> (FakeConfig, ProbedBars) {
        let config = FakeConfig::new();
        config.insert(ADDR, function);
        let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
        (config, probed)
    }

    #[test]
    fn sizes_32bit_memory_bar() {
        let (_, probed) = probe_one(FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0).bar32(
            1,
            0xfebd_1000,
            0x1000,
            false,
        ));
        assert_eq!(
            probed.bars[1],
            Some(Bar::Memory {
                address: 0xfebd_1000,
                size: 0x1000,
                prefetchable: false,
                is_64bit: false
            })
        );
        assert_eq!(probed.errors, [None; 6]);
    }

    #[test]
    fn sizes_64bit_bar_above_4gib_and_leaves_upper_slot_empty() {
        let (_, probed) = probe_one(FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0).bar64(
            2,
            0x40_0000_0000,
            0x1_0000_0000,
            true,
        ));
        assert_eq!(
            probed.bars[2],
            Some(Bar::Memory {
                address: 0x40_0000_0000,
                size: 0x1_0000_0000,
                prefetchable: true,
                is_64bit: true
            })
        );
        assert_eq!(
            probed.bars[3], None,
            "the upper half of a 64-bit BAR is not a BAR"
        );
        assert_eq!(probed.errors, [None; 6]);
    }

    #[test]
    fn sizes_io_bar_including_16bit_decode() {
        let (config, probed) =
            probe_one(FakeFunction::endpoint(0x1234, 0x5678, 0x010601, 0).io_bar(0, 0xc040, 0x20));
        assert_eq!(
            probed.bars[0],
            Some(Bar::Io {
                port: 0xc040,
                size: 0x20
            })
        );

        // A device that decodes only 16 I/O address bits reads zeros in the upper half.
        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1234, 0x5678, 0x010601, 0).io_bar(0, 0x0700, 0x40),
        );
        config.set_writable(ADDR, regs::BAR0, 0x0000_ffc0);
        let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
        assert_eq!(
            probed.bars[0],
            Some(Bar::Io {
                port: 0x0700,
                size: 0x40
            })
        );
    }

    #[test]
    fn unimplemented_bar_is_none_without_error() {
        let (_, probed) = probe_one(FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0));
        assert_eq!(probed.bars, [None; 6]);
        assert_eq!(probed.errors, [None; 6]);
    }

    #[test]
    fn restores_bars_and_command_and_sizes_with_decoding_off() {
        let function = FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0)
            .bar32(0, 0xfebd_0000, 0x1000, false)
            .bar64(2, 0x8_0000_0000, 0x4000, true)
            .io_bar(4, 0xc000, 0x20)
            .command(regs::COMMAND_MEMORY_SPACE | regs::COMMAND_IO_SPACE | regs::COMMAND_BUS_MASTER)
            // Received Master Abort (status bit 13) is write-one-to-clear: it must survive.
            .status(regs::STATUS_CAPABILITIES_LIST | 1 << 13);
        let before = function.clone();
        let (config, probed) = probe_one(function);
        assert!(probed.bars[0].is_some() && probed.bars[2].is_some() && probed.bars[4].is_some());

        let after = config.get(ADDR).expect("function still present");
        assert_eq!(
            after.dwords, before.dwords,
            "every register holds its original value"
        );
        let bar_writes = config
            .log()
            .iter()
            .filter(|access| {
                matches!(
                    access,
                    Access::Write {
                        offset: 0x10..=0x27,
                        ..
                    }
                )
            })
            .count();
        // Probe and restore for each of the six dwords, the unimplemented BAR1 and BAR5 included.
        assert_eq!(bar_writes, 12, "two writes (probe, restore) per BAR dword");
        assert_eq!(
            config.bar_writes_while_decoding(),
            0,
            "decoding was off during every probe"
        );
    }

    #[test]
    fn leaves_command_untouched_when_decoding_already_off() {
        let (config, _) = probe_one(
            FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0)
                .bar32(0, 0xfebd_0000, 0x1000, false)
                .command(regs::COMMAND_BUS_MASTER),
        );
        assert!(
            !config
                .log()
                .iter()
                .any(|a| matches!(a, Access::Write { offset: 0x04, .. }))
        );
    }

    #[test]
    fn sixty_four_bit_bar_in_last_slot_is_reported_and_nothing_past_it_is_touched() {
        let function = FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0)
            .dword(0x24, 0x0000_000c, 0xffff_c000)
            .dword(0x28, 0xdead_beef, 0xffff_ffff);
        let (config, probed) = probe_one(function);
        assert_eq!(probed.bars[5], None);
        assert_eq!(
            probed.errors[5],
            Some(BarError::SixtyFourBitInLastSlot { slot: 5 })
        );
        assert!(
            !config.log().iter().any(|a| a.offset() == 0x28),
            "the dword after BAR5 (CardBus CIS pointer) is never read or written"
        );
        assert!(
            !config
                .log()
                .iter()
                .any(|a| matches!(a, Access::Write { offset: 0x24, .. })),
            "a malformed BAR is not probed"
        );
    }

    #[test]
    fn bridge_probes_only_two_slots() {
        let config = FakeConfig::new();
        config.insert(
            ADDR,
            FakeFunction::bridge(0x1b36, 0x000c, 0, 1, 1)
                .bar64(1, 0x8_0000_0000, 0x1000, false)
                .command(regs::COMMAND_MEMORY_SPACE),
        );
        let probed = probe_bars(&config, ADDR, BRIDGE_BAR_SLOTS);
        assert_eq!(
            probed.errors[1],
            Some(BarError::SixtyFourBitInLastSlot { slot: 1 })
        );
        assert!(
            !config
                .log()
                .iter()
                .any(|a| a.offset() >= 0x18 && a.offset() < 0x40),
            "bus numbers and windows of a bridge are not touched"
        );
    }

    #[test]
    fn reserved_memory_type_is_reported() {
        let (_, probed) = probe_one(FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0).dword(
            0x10,
            0x000f_0002,
            0xffff_f000,
        ));
        assert_eq!(probed.bars[0], None);
        assert_eq!(
            probed.errors[0],
            Some(BarError::ReservedMemoryType {
                slot: 0,
                raw: 0x000f_0002
            })
        );
    }

    #[test]
    fn bar_display_formats() {
        let mem = Bar::Memory {
            address: 0x8_0000_0000,
            size: 0x4000,
            prefetchable: true,
            is_64bit: true,
        };
        assert_eq!(mem.to_string(), "mem64 0x0000000800000000+0x4000 pref");
        let io = Bar::Io {
            port: 0xc000,
            size: 0x20,
        };
        assert_eq!(io.to_string(), "io 0xc000+0x20");
        assert_eq!(
            BarError::SixtyFourBitInLastSlot { slot: 5 }.to_string(),
            "BAR5 is 64-bit but is the last BAR slot (no upper half)"
        );
    }
}
