//! A fake configuration space for host tests (compiled only under `cfg(test)`).
//!
//! Each present function is 64 dwords with a per-dword writable mask and a per-dword
//! write-one-to-clear mask, so that a BAR answers the all-ones probe with its size mask and the
//! status register behaves like hardware. Absent functions read all ones and ignore writes.
//! Every access is logged, and BAR writes made while the command register still decodes are
//! counted.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::vec::Vec;

use crate::{ConfigSpace, PciAddress, Status, regs};

/// One logged configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A dword read.
    Read { address: PciAddress, offset: u16 },
    /// A dword write.
    Write {
        address: PciAddress,
        offset: u16,
        value: u32,
    },
}

impl Access {
    pub fn address(&self) -> PciAddress {
        match *self {
            Self::Read { address, .. } | Self::Write { address, .. } => address,
        }
    }

    pub fn offset(&self) -> u16 {
        match *self {
            Self::Read { offset, .. } | Self::Write { offset, .. } => offset,
        }
    }

    pub fn is_write(&self) -> bool {
        matches!(self, Self::Write { .. })
    }
}

/// The registers of one present function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFunction {
    /// Register contents.
    pub dwords: [u32; 64],
    /// Bits software can write.
    pub writable: [u32; 64],
    /// Bits cleared by writing one.
    pub write_one_to_clear: [u32; 64],
}

/// Command register bits a write can change.
const COMMAND_WRITABLE: u32 = 0x0000_07ff;
/// Status bits that are write-one-to-clear (parity, signalled/received aborts, SERR#).
const STATUS_WRITE_ONE_TO_CLEAR: u32 = (Status::WRITE_ONE_TO_CLEAR.bits() as u32) << 16;

impl FakeFunction {
    fn new(vendor: u16, device: u16, class_code: u32, revision: u8, header: u8) -> Self {
        let mut dwords = [0; 64];
        let mut writable = [0; 64];
        let mut write_one_to_clear = [0; 64];
        dwords[0] = u32::from(vendor) | u32::from(device) << 16;
        dwords[2] = class_code << 8 | u32::from(revision);
        dwords[3] = u32::from(header) << 16;
        writable[1] = COMMAND_WRITABLE;
        write_one_to_clear[1] = STATUS_WRITE_ONE_TO_CLEAR;
        writable[15] = 0xff; // interrupt line
        Self {
            dwords,
            writable,
            write_one_to_clear,
        }
    }

    /// A type-0 function; `class_code` is 0xCCSSPP (class, subclass, prog-if).
    pub fn endpoint(vendor: u16, device: u16, class_code: u32, revision: u8) -> Self {
        Self::new(vendor, device, class_code, revision, 0)
    }

    /// A type-1 PCI-to-PCI bridge with the given bus numbers.
    pub fn bridge(vendor: u16, device: u16, primary: u8, secondary: u8, subordinate: u8) -> Self {
        let buses = u32::from(primary) | u32::from(secondary) << 8 | u32::from(subordinate) << 16;
        Self::new(vendor, device, 0x060400, 0, 1).dword(0x18, buses, 0x00ff_ffff)
    }

    /// Sets header type bit 7.
    pub fn multifunction(mut self) -> Self {
        self.dwords[3] |= 0x80 << 16;
        self
    }

    /// Replaces the header type byte.
    pub fn header(mut self, raw: u8) -> Self {
        self.dwords[3] = (self.dwords[3] & !0x00ff_0000) | u32::from(raw) << 16;
        self
    }

    /// Sets a dword and its writable mask.
    pub fn dword(mut self, offset: u16, value: u32, writable: u32) -> Self {
        let index = usize::from(offset / 4);
        self.dwords[index] = value;
        self.writable[index] = writable;
        self
    }

    /// Sets the command register.
    pub fn command(mut self, command: u16) -> Self {
        self.dwords[1] = (self.dwords[1] & 0xffff_0000) | u32::from(command);
        self
    }

    /// Sets the status register.
    pub fn status(mut self, status: u16) -> Self {
        self.dwords[1] = (self.dwords[1] & 0xffff) | u32::from(status) << 16;
        self
    }

    /// A 32-bit memory BAR of `size` bytes (a power of two) at `address`.
    pub fn bar32(self, slot: u16, address: u32, size: u32, prefetchable: bool) -> Self {
        let value = address | if prefetchable { 0x8 } else { 0 };
        self.dword(0x10 + 4 * slot, value, !(size - 1) & 0xffff_fff0)
    }

    /// A 64-bit memory BAR of `size` bytes in slots `slot` and `slot + 1`.
    pub fn bar64(self, slot: u16, address: u64, size: u64, prefetchable: bool) -> Self {
        let mask = !(size - 1);
        let low = (address as u32 & 0xffff_fff0) | 0x4 | if prefetchable { 0x8 } else { 0 };
        self.dword(0x10 + 4 * slot, low, mask as u32 & 0xffff_fff0)
            .dword(0x14 + 4 * slot, (address >> 32) as u32, (mask >> 32) as u32)
    }

    /// An I/O BAR of `size` ports at `port`.
    pub fn io_bar(self, slot: u16, port: u32, size: u32) -> Self {
        self.dword(0x10 + 4 * slot, port | 1, !(size - 1) & 0xffff_fffc)
    }

    /// Points the capabilities pointer at `pointer` and sets the status bit that says so.
    pub fn with_capabilities_pointer(mut self, pointer: u8) -> Self {
        self.dwords[1] |= u32::from(regs::STATUS_CAPABILITIES_LIST) << 16;
        self.dwords[13] = u32::from(pointer);
        self
    }

    /// A two-byte capability header (id, next) at `offset`; the rest of its dword is zero.
    pub fn capability(self, offset: u16, next: u8, id: u8) -> Self {
        self.dword(offset, u32::from(id) | u32::from(next) << 8, 0)
    }

    /// An MSI-X capability of `table_size` entries at `offset` and the capabilities pointer at
    /// it when `offset` is the first; `table` and `pba` are the raw offset/BIR dwords.
    pub fn msix(self, offset: u16, next: u8, table_size: u16, table: u32, pba: u32) -> Self {
        let header = 0x11 | u32::from(next) << 8 | u32::from(table_size - 1) << 16;
        self.with_capabilities_pointer(offset as u8)
            .dword(offset, header, 0xc000_0000)
            .dword(offset + 4, table, 0)
            .dword(offset + 8, pba, 0)
    }
}

/// A fake configuration space: present functions by address, and an access log.
#[derive(Default)]
pub struct FakeConfig {
    functions: RefCell<BTreeMap<PciAddress, FakeFunction>>,
    log: RefCell<Vec<Access>>,
    bar_writes_while_decoding: Cell<usize>,
}

impl FakeConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a function.
    pub fn insert(&self, address: PciAddress, function: FakeFunction) {
        self.functions.borrow_mut().insert(address, function);
    }

    /// A copy of a function's registers.
    pub fn get(&self, address: PciAddress) -> Option<FakeFunction> {
        self.functions.borrow().get(&address).cloned()
    }

    /// Every function's register contents.
    pub fn snapshot(&self) -> BTreeMap<PciAddress, [u32; 64]> {
        self.functions
            .borrow()
            .iter()
            .map(|(address, f)| (*address, f.dwords))
            .collect()
    }

    /// Replaces the writable mask of one dword.
    pub fn set_writable(&self, address: PciAddress, offset: u16, writable: u32) {
        if let Some(function) = self.functions.borrow_mut().get_mut(&address) {
            function.writable[usize::from(offset / 4)] = writable;
        }
    }

    /// The accesses so far.
    pub fn log(&self) -> Vec<Access> {
        self.log.borrow().clone()
    }

    pub fn clear_log(&self) {
        self.log.borrow_mut().clear();
    }

    /// BAR writes made while the command register enabled memory or I/O decoding.
    pub fn bar_writes_while_decoding(&self) -> usize {
        self.bar_writes_while_decoding.get()
    }
}

impl ConfigSpace for FakeConfig {
    fn read32(&self, address: PciAddress, offset: u16) -> u32 {
        self.log.borrow_mut().push(Access::Read { address, offset });
        assert!(
            offset.is_multiple_of(4) && offset < 0x100,
            "bad config read at {offset:#x}"
        );
        match self.functions.borrow().get(&address) {
            Some(function) => function.dwords[usize::from(offset / 4)],
            None => u32::MAX,
        }
    }

    fn write32(&self, address: PciAddress, offset: u16, value: u32) {
        self.log.borrow_mut().push(Access::Write {
            address,
            offset,
            value,
        });
        assert!(
            offset.is_multiple_of(4) && offset < 0x100,
            "bad config write at {offset:#x}"
        );
        let mut functions = self.functions.borrow_mut();
        let Some(function) = functions.get_mut(&address) else {
            return;
        };
        if (0x10..0x28).contains(&offset)
            && function.dwords[1] & u32::from(regs::COMMAND_MEMORY_SPACE | regs::COMMAND_IO_SPACE)
                != 0
        {
            self.bar_writes_while_decoding
                .set(self.bar_writes_while_decoding.get() + 1);
        }
        let index = usize::from(offset / 4);
        let writable = function.writable[index];
        let mut new = (function.dwords[index] & !writable) | (value & writable);
        new &= !(value & function.write_one_to_clear[index]);
        function.dwords[index] = new;
    }
}

/// virtio-net as QEMU puts it on q35 with `disable-legacy=on`: BAR1 4 KiB (MSI-X), BAR4 64-bit
/// prefetchable 16 KiB above 4 GiB, a vendor capability at 0x84 and MSI-X at 0x98.
pub fn q35_virtio_net() -> FakeFunction {
    FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
        .bar32(1, 0xfebd_1000, 0x1000, false)
        .bar64(4, 0x8_0000_0000, 0x4000, true)
        .dword(0x2c, 0x1100_1af4, 0)
        .dword(0x3c, 0x0000_010b, 0xff)
        .command(regs::COMMAND_MEMORY_SPACE | regs::COMMAND_IO_SPACE | regs::COMMAND_BUS_MASTER)
        .msix(0x98, 0, 3, 1, 0x800 | 1)
        .capability(0x84, 0x98, 0x09)
        .with_capabilities_pointer(0x84)
}

/// A q35-like bus 0: host bridge 00:00.0, virtio-net 00:01.0, and the multi-function ICH9 at
/// 00:1f (LPC/ISA bridge .0, AHCI .2, SMBus .3).
pub fn q35() -> FakeConfig {
    let config = FakeConfig::new();
    config.insert(
        PciAddress::new(0, 0, 0),
        FakeFunction::endpoint(0x8086, 0x29c0, 0x060000, 2),
    );
    config.insert(PciAddress::new(0, 1, 0), q35_virtio_net());
    config.insert(
        PciAddress::new(0, 0x1f, 0),
        FakeFunction::endpoint(0x8086, 0x2918, 0x060100, 2).multifunction(),
    );
    config.insert(
        PciAddress::new(0, 0x1f, 2),
        FakeFunction::endpoint(0x8086, 0x2922, 0x010601, 2)
            .io_bar(4, 0xc060, 0x20)
            .bar32(5, 0xfebd_2000, 0x1000, false)
            .command(regs::COMMAND_MEMORY_SPACE | regs::COMMAND_IO_SPACE),
    );
    config.insert(
        PciAddress::new(0, 0x1f, 3),
        FakeFunction::endpoint(0x8086, 0x2930, 0x0c0500, 2).io_bar(4, 0x0700, 0x40),
    );
    config
}
