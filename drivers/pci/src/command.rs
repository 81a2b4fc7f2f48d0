//! The command register (PCI LB 3.0 §6.2.2): read-modify-write helpers that enable memory and
//! I/O decoding and bus mastering, and disable INTx.
//!
//! The command register shares its dword with the status register, whose error bits are
//! write-one-to-clear. Every write here therefore puts zeros in the status half, which leaves
//! the status register unchanged. The kernel enables these bits only on devices it drives.

use crate::{ConfigSpace, PciAddress, regs};

/// Reads the command register.
pub fn read_command<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) -> u16 {
    config.read16(address, regs::COMMAND_STATUS)
}

/// Writes the command register, with zeros in the status half so that no write-one-to-clear
/// status bit is cleared.
pub fn write_command<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress, command: u16) {
    config.write32(address, regs::COMMAND_STATUS, u32::from(command));
}

/// Sets the bits of `set`, then clears the bits of `clear`, in the command register, and returns
/// the value written. Skips the write when nothing changes.
pub fn update_command<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    set: u16,
    clear: u16,
) -> u16 {
    let old = read_command(config, address);
    let new = (old | set) & !clear;
    if new != old {
        write_command(config, address, new);
    }
    new
}

/// Lets the function respond to memory-space accesses (its memory BARs).
pub fn enable_memory_space<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command(config, address, regs::COMMAND_MEMORY_SPACE, 0);
}

/// Lets the function respond to I/O-space accesses (its I/O BARs).
pub fn enable_io_space<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command(config, address, regs::COMMAND_IO_SPACE, 0);
}

/// Lets the function master the bus: DMA and MSI/MSI-X message writes.
pub fn enable_bus_mastering<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command(config, address, regs::COMMAND_BUS_MASTER, 0);
}

/// Stops the function from asserting its INTx pin (used with MSI-X or polling).
pub fn disable_intx<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) {
    update_command(config, address, regs::COMMAND_INTX_DISABLE, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Access, FakeConfig, FakeFunction};

    const ADDR: PciAddress = PciAddress::new(0, 1, 0);
    /// Received Master Abort, a write-one-to-clear status bit (status bit 13).
    const STATUS_MASTER_ABORT: u16 = 1 << 13;

    fn config_with_command(command: u16) -> FakeConfig {
        let config = FakeConfig::new();
        config.insert(
            ADDR,
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
                .command(command)
                .status(regs::STATUS_CAPABILITIES_LIST | STATUS_MASTER_ABORT),
        );
        config
    }

    fn status(config: &FakeConfig) -> u16 {
        config.read16(ADDR, regs::COMMAND_STATUS + 2)
    }

    #[test]
    fn each_helper_sets_its_bit_and_keeps_the_others_and_status() {
        type Helper = fn(&FakeConfig, PciAddress);
        let cases: [(Helper, u16); 4] = [
            (enable_memory_space, regs::COMMAND_MEMORY_SPACE),
            (enable_io_space, regs::COMMAND_IO_SPACE),
            (enable_bus_mastering, regs::COMMAND_BUS_MASTER),
            (disable_intx, regs::COMMAND_INTX_DISABLE),
        ];
        // SERR# enable (bit 8) is an unrelated bit that must survive.
        let other = 1 << 8;
        for (helper, bit) in cases {
            let config = config_with_command(other);
            helper(&config, ADDR);
            assert_eq!(read_command(&config, ADDR), other | bit, "bit {bit:#x}");
            assert_eq!(
                status(&config),
                regs::STATUS_CAPABILITIES_LIST | STATUS_MASTER_ABORT,
                "status (including write-one-to-clear bits) unchanged for bit {bit:#x}"
            );
        }
    }

    #[test]
    fn update_command_clears_and_skips_needless_writes() {
        let config = config_with_command(regs::COMMAND_MEMORY_SPACE | regs::COMMAND_BUS_MASTER);
        let new = update_command(&config, ADDR, 0, regs::COMMAND_BUS_MASTER);
        assert_eq!(new, regs::COMMAND_MEMORY_SPACE);
        assert_eq!(read_command(&config, ADDR), regs::COMMAND_MEMORY_SPACE);

        config.clear_log();
        enable_memory_space(&config, ADDR);
        assert!(
            !config
                .log()
                .iter()
                .any(|a| matches!(a, Access::Write { .. }))
        );
    }
}
