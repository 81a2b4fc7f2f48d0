//! One PCI function's configuration header, decoded (PCI LB 3.0 §6.1 and §6.2): identity,
//! class, header type, subsystem, interrupt routing, bridge bus numbers and sized BARs, plus
//! an lspci-like one-line `Display` and short class names.

use core::fmt;

use crate::bar::{BRIDGE_BAR_SLOTS, BarError, Bars, ENDPOINT_BAR_SLOTS, probe_bars};
use crate::msix::{MsixCapability, MsixError};
use crate::{Capabilities, ConfigSpace, PciAddress, regs};

/// Header type bit 7: the device implements more than one function.
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Header type bits 6:0: the layout of bytes 0x10..0x40.
const HEADER_TYPE_LAYOUT_MASK: u8 = 0x7f;

/// The layout of a function's header (header type bits 6:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: an endpoint, with six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge, with two BARs and bus numbers.
    PciToPciBridge,
    /// Type 2: a CardBus bridge; Vireo decodes no BARs on it.
    CardBusBridge,
    /// Any other value, which the specification does not define.
    Unknown(u8),
}

impl HeaderType {
    /// Decodes header type bits 6:0 (bit 7, multi-function, is ignored).
    pub const fn from_raw(raw: u8) -> Self {
        match raw & HEADER_TYPE_LAYOUT_MASK {
            0 => Self::Endpoint,
            1 => Self::PciToPciBridge,
            2 => Self::CardBusBridge,
            other => Self::Unknown(other),
        }
    }

    /// The raw layout value (0, 1, 2, ...).
    pub const fn raw(self) -> u8 {
        match self {
            Self::Endpoint => 0,
            Self::PciToPciBridge => 1,
            Self::CardBusBridge => 2,
            Self::Unknown(raw) => raw,
        }
    }

    /// How many BAR slots Vireo decodes for this layout.
    pub const fn bar_slots(self) -> usize {
        match self {
            Self::Endpoint => ENDPOINT_BAR_SLOTS,
            Self::PciToPciBridge => BRIDGE_BAR_SLOTS,
            Self::CardBusBridge | Self::Unknown(_) => 0,
        }
    }
}

/// Subsystem vendor and id of a type-0 header (offset 0x2c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subsystem {
    /// Subsystem vendor id.
    pub vendor_id: u16,
    /// Subsystem id.
    pub id: u16,
}

/// Bus numbers of a type-1 (PCI-to-PCI bridge) header (offset 0x18, PCI-to-PCI Bridge 1.2 §3.2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeBuses {
    /// The bus the bridge sits on.
    pub primary: u8,
    /// The bus directly behind the bridge.
    pub secondary: u8,
    /// The highest bus number behind the bridge.
    pub subordinate: u8,
}

/// A present PCI function with its header decoded and its BARs sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where the function lives.
    pub address: PciAddress,
    /// Vendor id (never 0xffff or 0x0000: those mean absent).
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision id.
    pub revision: u8,
    /// Header layout.
    pub header_type: HeaderType,
    /// Header type bit 7 as this function reports it (meaningful on function 0).
    pub multifunction: bool,
    /// Subsystem ids, type-0 headers only.
    pub subsystem: Option<Subsystem>,
    /// Bus numbers, type-1 headers only.
    pub bridge_buses: Option<BridgeBuses>,
    /// Interrupt line (the routing firmware wrote; 0xff means unknown).
    pub interrupt_line: u8,
    /// Interrupt pin: 0 none, 1..=4 INTA#..INTD#.
    pub interrupt_pin: u8,
    /// Decoded and sized BARs (slots 0..6 for type 0, 0..2 for type 1).
    pub bars: Bars,
    /// BAR slots that could not be decoded.
    pub bar_errors: [Option<BarError>; 6],
}

impl Function {
    /// Returns whether a vendor id read from configuration space names a present function.
    /// All ones is what an absent function reads; zero is never a valid vendor.
    pub const fn vendor_is_present(vendor_id: u16) -> bool {
        vendor_id != 0xffff && vendor_id != 0x0000
    }

    /// Reads the header of the function at `address` and sizes its BARs, or returns `None` when
    /// no function is there.
    ///
    /// Sizing BARs writes to configuration space (see [`probe_bars`]); every other access is a
    /// read, and every register is left as it was found.
    pub fn probe<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) -> Option<Self> {
        let id = config.read32(address, regs::VENDOR_DEVICE);
        let vendor_id = id as u16;
        if !Self::vendor_is_present(vendor_id) {
            return None;
        }
        let class_revision = config.read32(address, regs::CLASS_REVISION);
        let header_raw = config.read8(address, regs::HEADER_TYPE_DWORD + 2);
        let header_type = HeaderType::from_raw(header_raw);
        let interrupt = config.read32(address, regs::INTERRUPT);

        let subsystem = (header_type == HeaderType::Endpoint).then(|| {
            let subsystem = config.read32(address, regs::SUBSYSTEM);
            Subsystem {
                vendor_id: subsystem as u16,
                id: (subsystem >> 16) as u16,
            }
        });
        let bridge_buses = (header_type == HeaderType::PciToPciBridge).then(|| {
            let buses = config.read32(address, regs::BRIDGE_BUS_NUMBERS);
            BridgeBuses {
                primary: buses as u8,
                secondary: (buses >> 8) as u8,
                subordinate: (buses >> 16) as u8,
            }
        });
        let probed = probe_bars(config, address, header_type.bar_slots());

        Some(Self {
            address,
            vendor_id,
            device_id: (id >> 16) as u16,
            class: (class_revision >> 24) as u8,
            subclass: (class_revision >> 16) as u8,
            prog_if: (class_revision >> 8) as u8,
            revision: class_revision as u8,
            header_type,
            multifunction: header_raw & HEADER_TYPE_MULTIFUNCTION != 0,
            subsystem,
            bridge_buses,
            interrupt_line: interrupt as u8,
            interrupt_pin: (interrupt >> 8) as u8,
            bars: probed.bars,
            bar_errors: probed.errors,
        })
    }

    /// A short name for the function's class, e.g. `ethernet` or `host bridge`.
    pub const fn class_name(&self) -> &'static str {
        class_name(self.class, self.subclass)
    }

    /// Walks the function's capability list.
    pub fn capabilities<'a, C: ConfigSpace + ?Sized>(&self, config: &'a C) -> Capabilities<'a, C> {
        Capabilities::new(config, self.address)
    }

    /// Finds and validates the function's MSI-X capability against its BARs.
    pub fn msix<C: ConfigSpace + ?Sized>(
        &self,
        config: &C,
    ) -> Result<Option<MsixCapability>, MsixError> {
        MsixCapability::find(config, self.address, &self.bars)
    }
}

/// A short name for a class/subclass pair; `other` for the ones Vireo does not name.
pub const fn class_name(class: u8, subclass: u8) -> &'static str {
    match (class, subclass) {
        (0x01, 0x01) => "IDE",
        (0x01, 0x06) => "SATA",
        (0x01, 0x08) => "NVMe",
        (0x01, _) => "storage",
        (0x02, 0x00) => "ethernet",
        (0x02, _) => "network",
        (0x03, 0x00) => "VGA",
        (0x03, _) => "display",
        (0x06, 0x00) => "host bridge",
        (0x06, 0x01) => "ISA bridge",
        (0x06, 0x04) => "PCI bridge",
        (0x06, _) => "bridge",
        (0x0c, 0x03) => "USB",
        (0x0c, 0x05) => "SMBus",
        _ => "other",
    }
}

impl fmt::Display for Function {
    /// One line, lspci-like:
    /// `0000:00:01.0 1af4:1041 class 02.00.00 rev 01 (ethernet) BAR1 mem32 ... BAR4 mem64 ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} rev {:02x} ({})",
            self.address,
            self.vendor_id,
            self.device_id,
            self.class,
            self.subclass,
            self.prog_if,
            self.revision,
            self.class_name(),
        )?;
        if self.multifunction {
            f.write_str(" multifunction")?;
        }
        match self.header_type {
            HeaderType::Endpoint => {}
            HeaderType::PciToPciBridge => {}
            HeaderType::CardBusBridge => f.write_str(" cardbus")?,
            HeaderType::Unknown(raw) => write!(f, " header-type {raw:#04x}")?,
        }
        if let Some(buses) = self.bridge_buses {
            write!(
                f,
                " bus {:02x}->{:02x}..{:02x}",
                buses.primary, buses.secondary, buses.subordinate
            )?;
        }
        for (slot, bar) in self.bars.iter().enumerate() {
            if let Some(bar) = bar {
                write!(f, " BAR{slot} {bar}")?;
            }
        }
        for error in self.bar_errors.iter().flatten() {
            write!(f, " [{error}]")?;
        }
        if (1..=4).contains(&self.interrupt_pin) {
            let pin = char::from(b'A' + self.interrupt_pin - 1);
            write!(f, " INT{pin} line {}", self.interrupt_line)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bar;
    use crate::fake::{FakeConfig, FakeFunction};

    #[test]
    fn absent_function_is_none() {
        let config = FakeConfig::new();
        assert_eq!(Function::probe(&config, PciAddress::new(0, 4, 0)), None);
        config.insert(
            PciAddress::new(0, 4, 0),
            FakeFunction::endpoint(0x0000, 0x0000, 0, 0),
        );
        assert_eq!(
            Function::probe(&config, PciAddress::new(0, 4, 0)),
            None,
            "vendor 0 is absent"
        );
    }

    #[test]
    fn decodes_type0_header() {
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 1, 0);
        config.insert(address, crate::fake::q35_virtio_net());
        let function = Function::probe(&config, address).expect("present");
        assert_eq!(function.vendor_id, 0x1af4);
        assert_eq!(function.device_id, 0x1041);
        assert_eq!(
            (function.class, function.subclass, function.prog_if),
            (0x02, 0x00, 0x00)
        );
        assert_eq!(function.revision, 0x01);
        assert_eq!(function.header_type, HeaderType::Endpoint);
        assert!(!function.multifunction);
        assert_eq!(
            function.subsystem,
            Some(Subsystem {
                vendor_id: 0x1af4,
                id: 0x1100
            })
        );
        assert_eq!(function.bridge_buses, None);
        assert_eq!((function.interrupt_line, function.interrupt_pin), (11, 1));
        assert_eq!(
            function.bars[1],
            Some(Bar::Memory {
                address: 0xfebd_1000,
                size: 0x1000,
                prefetchable: false,
                is_64bit: false
            })
        );
        assert_eq!(
            function.bars[4],
            Some(Bar::Memory {
                address: 0x8_0000_0000,
                size: 0x4000,
                prefetchable: true,
                is_64bit: true
            })
        );
    }

    #[test]
    fn decodes_type1_header() {
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 2, 0);
        config.insert(
            address,
            FakeFunction::bridge(0x1b36, 0x0001, 0, 3, 5).bar32(0, 0xfe00_0000, 0x100, false),
        );
        let function = Function::probe(&config, address).expect("present");
        assert_eq!(function.header_type, HeaderType::PciToPciBridge);
        assert_eq!(
            function.bridge_buses,
            Some(BridgeBuses {
                primary: 0,
                secondary: 3,
                subordinate: 5
            })
        );
        assert_eq!(
            function.subsystem, None,
            "type-1 headers have no subsystem ids at 0x2c"
        );
        assert_eq!(function.bars[0].map(|bar| bar.size()), Some(0x100));
        assert_eq!(function.class_name(), "PCI bridge");
    }

    #[test]
    fn display_is_one_lspci_like_line() {
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 1, 0);
        config.insert(address, crate::fake::q35_virtio_net());
        let function = Function::probe(&config, address).expect("present");
        assert_eq!(
            function.to_string(),
            "0000:00:01.0 1af4:1041 class 02.00.00 rev 01 (ethernet) \
             BAR1 mem32 0x00000000febd1000+0x1000 BAR4 mem64 0x0000000800000000+0x4000 pref \
             INTA line 11"
        );

        let bridge = PciAddress::new(0, 2, 0);
        config.insert(
            bridge,
            FakeFunction::bridge(0x1b36, 0x0001, 0, 1, 2).multifunction(),
        );
        let function = Function::probe(&config, bridge).expect("present");
        assert_eq!(
            function.to_string(),
            "0000:00:02.0 1b36:0001 class 06.04.00 rev 00 (PCI bridge) multifunction bus 00->01..02"
        );
    }

    #[test]
    fn display_reports_bar_errors() {
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 5, 0);
        config.insert(
            address,
            FakeFunction::endpoint(0x1234, 0x0001, 0xff0000, 0).dword(0x24, 0x4, 0xffff_f000),
        );
        let function = Function::probe(&config, address).expect("present");
        assert_eq!(
            function.to_string(),
            "0000:00:05.0 1234:0001 class ff.00.00 rev 00 (other) \
             [BAR5 is 64-bit but is the last BAR slot (no upper half)]"
        );
    }

    #[test]
    fn class_names_of_common_classes() {
        assert_eq!(class_name(0x06, 0x00), "host bridge");
        assert_eq!(class_name(0x06, 0x01), "ISA bridge");
        assert_eq!(class_name(0x06, 0x04), "PCI bridge");
        assert_eq!(class_name(0x02, 0x00), "ethernet");
        assert_eq!(class_name(0x01, 0x06), "SATA");
        assert_eq!(class_name(0x0c, 0x05), "SMBus");
        assert_eq!(class_name(0x11, 0x00), "other");
        assert_eq!(class_name(0xff, 0xff), "other");
    }

    #[test]
    fn header_type_layouts() {
        assert_eq!(HeaderType::from_raw(0x80), HeaderType::Endpoint);
        assert_eq!(HeaderType::from_raw(0x81), HeaderType::PciToPciBridge);
        assert_eq!(HeaderType::from_raw(0x02).bar_slots(), 0);
        assert_eq!(HeaderType::from_raw(0x7f), HeaderType::Unknown(0x7f));
        assert_eq!(HeaderType::Unknown(0x7f).raw(), 0x7f);
    }
}
