//! One PCI function's configuration header, decoded (PCI LB 3.0 §6.1 and §6.2): identity,
//! class, header type, subsystem, interrupt routing, bridge bus numbers and sized BARs, plus
//! an lspci-like one-line `Display` and short class names.

use core::fmt;

use crate::bar::{BRIDGE_BAR_SLOTS, BarError, Bars, ENDPOINT_BAR_SLOTS, probe_bars};
use crate::msix::{MsixCapability, MsixError};
use crate::{Capabilities, ConfigSpace, PciAddress, ReadOnlyAccess, regs};
use pci_types::device_type::DeviceType;
use pci_types::{EndpointHeader, PciHeader, PciPciBridgeHeader};

/// The layout of a function's header (header type bits 6:0, PCI LB 3.0 §6.2.1): `pci_types`'
/// type, decoded by `pci_types`' `PciHeader::header_type`.
pub use pci_types::HeaderType;

/// How many BAR slots Vireo decodes for a header layout: six for an endpoint (type 0), two for a
/// PCI-to-PCI bridge (type 1), none for a CardBus bridge or an undefined layout.
pub const fn bar_slots(header_type: HeaderType) -> usize {
    match header_type {
        HeaderType::Endpoint => ENDPOINT_BAR_SLOTS,
        HeaderType::PciPciBridge => BRIDGE_BAR_SLOTS,
        _ => 0,
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
        // An address no configuration mechanism can reach holds no function.
        let types_address = pci_types::PciAddress::try_from(address).ok()?;
        let access = ReadOnlyAccess(config);
        let header = PciHeader::new(types_address);
        let (vendor_id, device_id) = header.id(&access);
        if !Self::vendor_is_present(vendor_id) {
            return None;
        }
        let (revision, class, subclass, prog_if) = header.revision_and_class(&access);
        let header_type = header.header_type(&access);
        let multifunction = header.has_multiple_functions(&access);

        let subsystem =
            EndpointHeader::from_header(PciHeader::new(types_address), &access).map(|endpoint| {
                let (id, vendor_id) = endpoint.subsystem(&access);
                Subsystem { vendor_id, id }
            });
        let bridge_buses = PciPciBridgeHeader::from_header(PciHeader::new(types_address), &access)
            .map(|bridge| BridgeBuses {
                primary: bridge.primary_bus_number(&access),
                secondary: bridge.secondary_bus_number(&access),
                subordinate: bridge.subordinate_bus_number(&access),
            });
        // Both header types keep the interrupt line and pin at 0x3c (`pci_types` reads it for
        // endpoints only).
        let interrupt = config.read32(address, regs::INTERRUPT);
        let probed = probe_bars(config, address, bar_slots(header_type));

        Some(Self {
            address,
            vendor_id,
            device_id,
            class,
            subclass,
            prog_if,
            revision,
            header_type,
            multifunction,
            subsystem,
            bridge_buses,
            interrupt_line: interrupt as u8,
            interrupt_pin: (interrupt >> 8) as u8,
            bars: probed.bars,
            bar_errors: probed.errors,
        })
    }

    /// A short name for the function's class, e.g. `ethernet` or `host bridge`.
    pub fn class_name(&self) -> &'static str {
        class_name(self.class, self.subclass)
    }

    /// The function's class and subclass, classified by `pci_types`.
    pub fn device_type(&self) -> DeviceType {
        DeviceType::from((self.class, self.subclass))
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

/// A short name for a class/subclass pair, from `pci_types`' classification
/// ([`DeviceType`]); the base class's name for the subclasses Vireo does not name, and `other`
/// for the rest.
pub fn class_name(class: u8, subclass: u8) -> &'static str {
    match DeviceType::from((class, subclass)) {
        DeviceType::IdeController => "IDE",
        DeviceType::SataController => "SATA",
        DeviceType::NvmeController => "NVMe",
        DeviceType::EthernetController => "ethernet",
        DeviceType::VgaCompatibleController => "VGA",
        DeviceType::HostBridge => "host bridge",
        DeviceType::IsaBridge => "ISA bridge",
        DeviceType::PciPciBridge => "PCI bridge",
        DeviceType::UsbController => "USB",
        DeviceType::SmBusController => "SMBus",
        _ => match class {
            0x01 => "storage",
            0x02 => "network",
            0x03 => "display",
            0x06 => "bridge",
            _ => "other",
        },
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
            HeaderType::CardBusBridge => f.write_str(" cardbus")?,
            HeaderType::Unknown(raw) => write!(f, " header-type {raw:#04x}")?,
            _ => {}
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
        assert_eq!(function.header_type, HeaderType::PciPciBridge);
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
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 6, 0);
        for (raw, expected, slots, multifunction) in [
            (0x00, HeaderType::Endpoint, 6, false),
            (0x80, HeaderType::Endpoint, 6, true),
            (0x81, HeaderType::PciPciBridge, 2, true),
            (0x02, HeaderType::CardBusBridge, 0, false),
            (0x7f, HeaderType::Unknown(0x7f), 0, false),
        ] {
            config.insert(
                address,
                FakeFunction::endpoint(0x1234, 0x0001, 0xff0000, 0).header(raw),
            );
            let function = Function::probe(&config, address).expect("present");
            assert_eq!(function.header_type, expected, "header type {raw:#04x}");
            assert_eq!(bar_slots(function.header_type), slots);
            assert_eq!(function.multifunction, multifunction);
        }
    }

    #[test]
    fn out_of_range_address_holds_no_function() {
        let config = FakeConfig::new();
        assert_eq!(Function::probe(&config, PciAddress::new(0, 32, 0)), None);
        assert_eq!(config.log(), [], "nothing was read");
    }

    #[test]
    fn device_type_from_pci_types() {
        let config = FakeConfig::new();
        let address = PciAddress::new(0, 1, 0);
        config.insert(address, crate::fake::q35_virtio_net());
        let function = Function::probe(&config, address).expect("present");
        assert_eq!(function.device_type(), DeviceType::EthernetController);
        assert_eq!(class_name(0x01, 0x00), "storage");
        assert_eq!(class_name(0x02, 0x80), "network");
        assert_eq!(class_name(0x03, 0x02), "display");
        assert_eq!(class_name(0x03, 0x00), "VGA");
        assert_eq!(class_name(0x06, 0x80), "bridge");
        assert_eq!(class_name(0x0c, 0x03), "USB");
        assert_eq!(class_name(0x01, 0x01), "IDE");
        assert_eq!(class_name(0x01, 0x08), "NVMe");
    }
}
