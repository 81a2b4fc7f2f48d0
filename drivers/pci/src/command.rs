//! The command and status registers (PCI LB 3.0 §6.2.2 and §6.2.3): read-modify-write helpers
//! that enable memory and I/O decoding and bus mastering and disable INTx, and the status
//! register's bits.
//!
//! The command register's type is `pci_types`' [`CommandRegister`] (a `bitflags` type that keeps
//! unknown bits, so a read-modify-write never drops one). Its flags, bit by bit (PCI LB 3.0
//! §6.2.2, "Command Register"; PCIe Base 4.0 §7.5.1.1.3 for what PCI Express keeps of them):
//!
//! | bit | `CommandRegister::` | meaning |
//! | --- | --- | --- |
//! | 0 | `IO_ENABLE` | I/O Space: respond to I/O accesses (the I/O BARs) |
//! | 1 | `MEMORY_ENABLE` | Memory Space: respond to memory accesses (the memory BARs) |
//! | 2 | `BUS_MASTER_ENABLE` | Bus Master: may issue memory requests (DMA, MSI/MSI-X writes) |
//! | 3 | `SPECIAL_CYCLE_ENABLE` | Special Cycles |
//! | 4 | `MEMORY_WRITE_AND_INVALIDATE` | Memory Write and Invalidate Enable |
//! | 5 | `VGA_PALETTE_SNOOP` | VGA Palette Snoop |
//! | 6 | `PARITY_ERROR_RESPONSE` | Parity Error Response |
//! | 7 | `IDSEL_STEP_WAIT_CYCLE_CONTROL` | Stepping control (hardwired to 0 since PCI 2.3) |
//! | 8 | `SERR_ENABLE` | SERR# Enable |
//! | 9 | `FAST_BACK_TO_BACK_ENABLE` | Fast Back-to-Back Enable |
//! | 10 | `INTERRUPT_DISABLE` | Interrupt Disable: the function may not assert INTx |
//!
//! The command register shares its dword with the status register, whose error bits are
//! write-one-to-clear ([`Status::WRITE_ONE_TO_CLEAR`]). Every write here therefore puts zeros in
//! the status half, which leaves the status register unchanged. (`pci_types`'
//! `PciHeader::update_command` writes the status half back as it read it, which clears every
//! error bit that was set; see `pci_types_limits.rs`.) The kernel enables these bits only on
//! devices it drives.

pub use pci_types::CommandRegister;

use crate::{ConfigSpace, PciAddress, regs};

bitflags::bitflags! {
    /// The status register (PCI LB 3.0 §6.2.3, "Status Register"; PCIe Base 4.0 §7.5.1.1.4).
    /// Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Status: u16 {
        /// Bit 3, Interrupt Status: the function's INTx is asserted (PCI LB 3.0 §6.2.3).
        const INTERRUPT_STATUS = 1 << 3;
        /// Bit 4, Capabilities List: the capabilities pointer at 0x34 is valid (PCI LB 3.0
        /// §6.2.3, §6.7).
        const CAPABILITIES_LIST = 1 << 4;
        /// Bit 5, 66 MHz Capable (PCI LB 3.0 §6.2.3).
        const CAPABLE_66MHZ = 1 << 5;
        /// Bit 7, Fast Back-to-Back Capable (PCI LB 3.0 §6.2.3).
        const FAST_BACK_TO_BACK_CAPABLE = 1 << 7;
        /// Bit 8, Master Data Parity Error, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const MASTER_DATA_PARITY_ERROR = 1 << 8;
        /// Bits 10:9, DEVSEL timing, a read-only two-bit field (PCI LB 3.0 §6.2.3).
        const DEVSEL_TIMING = 0b11 << 9;
        /// Bit 11, Signaled Target Abort, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const SIGNALED_TARGET_ABORT = 1 << 11;
        /// Bit 12, Received Target Abort, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const RECEIVED_TARGET_ABORT = 1 << 12;
        /// Bit 13, Received Master Abort, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const RECEIVED_MASTER_ABORT = 1 << 13;
        /// Bit 14, Signaled System Error, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const SIGNALED_SYSTEM_ERROR = 1 << 14;
        /// Bit 15, Detected Parity Error, write-one-to-clear (PCI LB 3.0 §6.2.3).
        const DETECTED_PARITY_ERROR = 1 << 15;
        /// Every write-one-to-clear bit: writing the status half as read would clear these.
        const WRITE_ONE_TO_CLEAR = Self::MASTER_DATA_PARITY_ERROR.bits()
            | Self::SIGNALED_TARGET_ABORT.bits()
            | Self::RECEIVED_TARGET_ABORT.bits()
            | Self::RECEIVED_MASTER_ABORT.bits()
            | Self::SIGNALED_SYSTEM_ERROR.bits()
            | Self::DETECTED_PARITY_ERROR.bits();
        const _ = !0;
    }
}

/// Reads the status register.
pub fn read_status<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) -> Status {
    Status::from_bits_retain(config.read16(address, regs::COMMAND_STATUS + 2))
}

/// Reads the command register.
pub fn read_command<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) -> CommandRegister {
    CommandRegister::from_bits_retain(config.read16(address, regs::COMMAND_STATUS))
}

/// Writes the command register, with zeros in the status half so that no write-one-to-clear
/// status bit is cleared.
pub fn write_command<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    command: CommandRegister,
) {
    config.write32(address, regs::COMMAND_STATUS, u32::from(command.bits()));
}

/// Sets the flags of `set`, then clears the flags of `clear`, in the command register, and
/// returns the value written. Skips the write when nothing changes.
pub fn update_command_flags<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    set: CommandRegister,
    clear: CommandRegister,
) -> CommandRegister {
    let old = read_command(config, address);
    let new = old.union(set).difference(clear);
    if new != old {
        write_command(config, address, new);
    }
    new
}

/// [`update_command_flags`] with raw bits (the `regs::COMMAND_*` values): sets the bits of `set`,
/// then clears the bits of `clear`, and returns the value written.
pub fn update_command<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    set: u16,
    clear: u16,
) -> u16 {
    update_command_flags(
        config,
        address,
        CommandRegister::from_bits_retain(set),
        CommandRegister::from_bits_retain(clear),
    )
    .bits()
}

/// Lets the function respond to memory-space accesses (its memory BARs).
pub fn enable_memory_space<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command_flags(
        config,
        address,
        CommandRegister::MEMORY_ENABLE,
        CommandRegister::empty(),
    );
}

/// Lets the function respond to I/O-space accesses (its I/O BARs).
pub fn enable_io_space<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command_flags(
        config,
        address,
        CommandRegister::IO_ENABLE,
        CommandRegister::empty(),
    );
}

/// Lets the function master the bus: DMA and MSI/MSI-X message writes.
pub fn enable_bus_mastering<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command_flags(
        config,
        address,
        CommandRegister::BUS_MASTER_ENABLE,
        CommandRegister::empty(),
    );
}

/// Stops the function from asserting its INTx pin (used with MSI-X or polling).
pub fn disable_intx<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command_flags(
        config,
        address,
        CommandRegister::INTERRUPT_DISABLE,
        CommandRegister::empty(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Access, FakeConfig, FakeFunction};

    const ADDR: PciAddress = PciAddress::new(0, 1, 0);

    fn config_with_command(command: CommandRegister) -> FakeConfig {
        let config = FakeConfig::new();
        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
                .command(command.bits())
                .status((Status::CAPABILITIES_LIST | Status::RECEIVED_MASTER_ABORT).bits()),
        );
        config
    }

    #[test]
    fn each_helper_sets_its_bit_and_keeps_the_others_and_status() {
        type Helper = fn(&FakeConfig, PciAddress);
        let cases: [(Helper, CommandRegister); 4] = [
            (enable_memory_space, CommandRegister::MEMORY_ENABLE),
            (enable_io_space, CommandRegister::IO_ENABLE),
            (enable_bus_mastering, CommandRegister::BUS_MASTER_ENABLE),
            (disable_intx, CommandRegister::INTERRUPT_DISABLE),
        ];
        // SERR# enable (bit 8) is an unrelated bit that must survive.
        let other = CommandRegister::SERR_ENABLE;
        for (helper, bit) in cases {
            let config = config_with_command(other);
            helper(&config, ADDR);
            assert_eq!(read_command(&config, ADDR), other | bit, "{bit:?}");
            assert_eq!(
                read_status(&config, ADDR),
                Status::CAPABILITIES_LIST | Status::RECEIVED_MASTER_ABORT,
                "status (including write-one-to-clear bits) unchanged for {bit:?}"
            );
        }
    }

    #[test]
    fn update_command_clears_and_skips_needless_writes() {
        let config = config_with_command(
            CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE,
        );
        let new = update_command(&config, ADDR, 0, regs::COMMAND_BUS_MASTER);
        assert_eq!(new, regs::COMMAND_MEMORY_SPACE);
        assert_eq!(read_command(&config, ADDR), CommandRegister::MEMORY_ENABLE);

        config.clear_log();
        enable_memory_space(&config, ADDR);
        assert!(
            !config
                .log()
                .iter()
                .any(|a| matches!(a, Access::Write { .. }))
        );
    }

    #[test]
    fn raw_constants_match_the_flags() {
        assert_eq!(regs::COMMAND_IO_SPACE, CommandRegister::IO_ENABLE.bits());
        assert_eq!(regs::COMMAND_MEMORY_SPACE, 1 << 1);
        assert_eq!(regs::COMMAND_BUS_MASTER, 1 << 2);
        assert_eq!(regs::COMMAND_INTX_DISABLE, 1 << 10);
        assert_eq!(regs::STATUS_CAPABILITIES_LIST, 1 << 4);
        assert_eq!(Status::WRITE_ONE_TO_CLEAR.bits(), 0xf900);
        assert_eq!(Status::DEVSEL_TIMING.bits(), 0x0600);
    }
}
