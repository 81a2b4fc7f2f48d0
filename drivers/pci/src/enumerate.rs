//! Enumeration: the walk of the PCI hierarchy from bus 0, through every PCI-to-PCI bridge.
//!
//! Configuration space is untrusted input here. Each bus is scanned at most once, so a bridge
//! whose secondary bus points back up the tree (or at itself) cannot make the walk loop, and
//! the walk is bounded by 256 buses x 32 devices x 8 functions. The walk only reads, except for
//! BAR sizing in [`Function::probe`].

use alloc::vec::Vec;
use core::fmt;

use crate::bar::BarError;
use crate::function::{Function, HeaderType};
use crate::{ConfigSpace, PciAddress, regs};

/// Devices per bus.
const DEVICES_PER_BUS: u8 = 32;
/// Functions per device.
const FUNCTIONS_PER_DEVICE: u8 = 8;

/// Something odd found during enumeration; the walk carries on past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnumerationError {
    /// A bridge's secondary bus was already scanned (or queued), so it was not scanned again.
    BusAlreadyScanned {
        /// The bridge.
        bridge: PciAddress,
        /// Its secondary bus number.
        secondary_bus: u8,
    },
    /// A function has a header layout the specification does not define; its BARs were not
    /// touched.
    UnknownHeaderType {
        /// The function.
        address: PciAddress,
        /// Header type bits 6:0.
        header_type: u8,
    },
    /// A function has a BAR that could not be decoded.
    Bar {
        /// The function.
        address: PciAddress,
        /// What was wrong.
        error: BarError,
    },
}

impl fmt::Display for EnumerationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BusAlreadyScanned {
                bridge,
                secondary_bus,
            } => write!(
                f,
                "{bridge}: bridge secondary bus {secondary_bus:02x} was already scanned; skipped"
            ),
            Self::UnknownHeaderType {
                address,
                header_type,
            } => {
                write!(f, "{address}: unknown header type {header_type:#04x}")
            }
            Self::Bar { address, error } => write!(f, "{address}: {error}"),
        }
    }
}

/// The result of a walk: every function found, in address order, and every problem met.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enumeration {
    /// Present functions, sorted by address.
    pub functions: Vec<Function>,
    /// Problems, in the order they were met.
    pub errors: Vec<EnumerationError>,
}

/// A set of bus numbers.
struct BusSet([u64; 4]);

impl BusSet {
    /// Inserts `bus`; returns false if it was already present.
    fn insert(&mut self, bus: u8) -> bool {
        let (word, bit) = (usize::from(bus / 64), bus % 64);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// Enumerates segment 0 from bus 0 and returns the present functions in address order.
/// See [`enumerate_with_errors`] for the problems met on the way.
pub fn enumerate<C: ConfigSpace + ?Sized>(config: &C) -> Vec<Function> {
    enumerate_with_errors(config).functions
}

/// Enumerates segment 0 from bus 0: every device of every reachable bus, every function of
/// multi-function devices (header type bit 7 of function 0), and the secondary bus of every
/// PCI-to-PCI bridge, each bus at most once.
pub fn enumerate_with_errors<C: ConfigSpace + ?Sized>(config: &C) -> Enumeration {
    let mut result = Enumeration::default();
    let mut scheduled = BusSet([0; 4]);
    let mut pending: Vec<u8> = Vec::new();
    scheduled.insert(0);
    pending.push(0);

    while let Some(bus) = pending.pop() {
        // Buses found on this bus, pushed in reverse so that the lowest is scanned next.
        let mut children: Vec<u8> = Vec::new();
        for device in 0..DEVICES_PER_BUS {
            for function in 0..FUNCTIONS_PER_DEVICE {
                let address = PciAddress::new(bus, device, function);
                let Some(found) = Function::probe(config, address) else {
                    if function == 0 {
                        // No function 0 means no device (PCI LB 3.0 §6.2.1).
                        break;
                    }
                    continue;
                };
                record(&mut result, &found, &mut scheduled, &mut children);
                if function == 0 && !found.multifunction {
                    break;
                }
            }
        }
        pending.extend(children.iter().rev());
    }

    result.functions.sort_by_key(|function| function.address);
    result
}

/// Records `found` and its problems, and queues its secondary bus if it is a bridge.
fn record(
    result: &mut Enumeration,
    found: &Function,
    scheduled: &mut BusSet,
    children: &mut Vec<u8>,
) {
    let address = found.address;
    if let HeaderType::Unknown(header_type) = found.header_type {
        result.errors.push(EnumerationError::UnknownHeaderType {
            address,
            header_type,
        });
    }
    for error in found.bar_errors.iter().flatten() {
        result.errors.push(EnumerationError::Bar {
            address,
            error: *error,
        });
    }
    if let Some(buses) = found.bridge_buses {
        if scheduled.insert(buses.secondary) {
            children.push(buses.secondary);
        } else {
            result.errors.push(EnumerationError::BusAlreadyScanned {
                bridge: address,
                secondary_bus: buses.secondary,
            });
        }
    }
    result.functions.push(*found);
}

/// Reads the vendor id of `address` without touching anything else: a cheap presence test.
pub fn is_present<C: ConfigSpace + ?Sized>(config: &C, address: PciAddress) -> bool {
    Function::vendor_is_present(config.read16(address, regs::VENDOR_DEVICE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bar;
    use crate::fake::{Access, FakeConfig, FakeFunction, q35};

    fn addresses(functions: &[Function]) -> Vec<PciAddress> {
        functions.iter().map(|function| function.address).collect()
    }

    /// Number of times offset 0 of `address` was read.
    fn id_reads(config: &FakeConfig, address: PciAddress) -> usize {
        config
            .log()
            .iter()
            .filter(|access| **access == Access::Read { address, offset: 0 })
            .count()
    }

    #[test]
    fn q35_layout() {
        let config = q35();
        let result = enumerate_with_errors(&config);
        assert_eq!(result.errors, []);
        let functions = result.functions;
        assert_eq!(
            addresses(&functions),
            [
                PciAddress::new(0, 0, 0),
                PciAddress::new(0, 1, 0),
                PciAddress::new(0, 0x1f, 0),
                PciAddress::new(0, 0x1f, 2),
                PciAddress::new(0, 0x1f, 3),
            ]
        );
        let ids: Vec<(u16, u16, &str)> = functions
            .iter()
            .map(|f| (f.vendor_id, f.device_id, f.class_name()))
            .collect();
        assert_eq!(
            ids,
            [
                (0x8086, 0x29c0, "host bridge"),
                (0x1af4, 0x1041, "ethernet"),
                (0x8086, 0x2918, "ISA bridge"),
                (0x8086, 0x2922, "SATA"),
                (0x8086, 0x2930, "SMBus"),
            ]
        );
        assert!(functions[2].multifunction);
        assert_eq!(
            functions[1].bars[1],
            Some(Bar::Memory {
                address: 0xfebd_1000,
                size: 0x1000,
                prefetchable: false,
                is_64bit: false
            })
        );
        assert_eq!(
            functions[1].bars[4],
            Some(Bar::Memory {
                address: 0x8_0000_0000,
                size: 0x4000,
                prefetchable: true,
                is_64bit: true
            })
        );
        assert_eq!(
            functions[3].bars[4],
            Some(Bar::Io {
                port: 0xc060,
                size: 0x20
            })
        );
        assert_eq!(enumerate(&config), functions, "enumerate is the same walk");
    }

    #[test]
    fn single_function_device_is_not_scanned_past_function_0() {
        let config = q35();
        // A phantom function 1 of the (single-function) virtio device must not be reported.
        config.insert(
            PciAddress::new(0, 1, 1),
            FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1),
        );
        let functions = enumerate(&config);
        assert!(!addresses(&functions).contains(&PciAddress::new(0, 1, 1)));
        assert_eq!(id_reads(&config, PciAddress::new(0, 1, 1)), 0);
    }

    #[test]
    fn device_without_function_0_is_skipped() {
        let config = FakeConfig::new();
        config.insert(
            PciAddress::new(0, 3, 1),
            FakeFunction::endpoint(0x1234, 0x0001, 0x020000, 0),
        );
        assert_eq!(enumerate(&config), []);
    }

    #[test]
    fn bridges_are_followed_recursively() {
        let config = q35();
        config.insert(
            PciAddress::new(0, 2, 0),
            FakeFunction::bridge(0x1b36, 0x000c, 0, 1, 2),
        );
        config.insert(
            PciAddress::new(1, 0, 0),
            FakeFunction::bridge(0x1b36, 0x000e, 1, 2, 2),
        );
        config.insert(
            PciAddress::new(1, 4, 0),
            FakeFunction::endpoint(0x1af4, 0x1042, 0x010000, 1),
        );
        config.insert(
            PciAddress::new(2, 3, 0),
            FakeFunction::endpoint(0x8086, 0x10d3, 0x020000, 0).bar32(
                0,
                0xfe80_0000,
                0x2_0000,
                false,
            ),
        );
        // Behind no bridge: unreachable.
        config.insert(
            PciAddress::new(5, 0, 0),
            FakeFunction::endpoint(0x1234, 0x0001, 0x020000, 0),
        );

        let result = enumerate_with_errors(&config);
        assert_eq!(result.errors, []);
        let found = addresses(&result.functions);
        for expected in [
            PciAddress::new(0, 2, 0),
            PciAddress::new(1, 0, 0),
            PciAddress::new(1, 4, 0),
            PciAddress::new(2, 3, 0),
        ] {
            assert!(found.contains(&expected), "{expected} found");
        }
        assert!(
            !found.contains(&PciAddress::new(5, 0, 0)),
            "bus 5 is behind no bridge"
        );
        assert_eq!(found.len(), 5 + 4);
        assert!(
            found.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted and unique"
        );
        let nic = result
            .functions
            .iter()
            .find(|f| f.address == PciAddress::new(2, 3, 0));
        assert_eq!(
            nic.and_then(|f| f.bars[0]).map(|bar| bar.size()),
            Some(0x2_0000)
        );
    }

    #[test]
    fn bridge_pointing_back_to_bus_0_does_not_loop() {
        let config = q35();
        config.insert(
            PciAddress::new(0, 2, 0),
            FakeFunction::bridge(0x1b36, 0x0001, 0, 0, 0),
        );
        let result = enumerate_with_errors(&config);
        assert_eq!(
            result.functions.len(),
            6,
            "five q35 functions plus the bridge, once each"
        );
        assert_eq!(
            result.errors,
            [EnumerationError::BusAlreadyScanned {
                bridge: PciAddress::new(0, 2, 0),
                secondary_bus: 0
            }]
        );
        // An empty slot is read exactly once per scan of its bus: bus 0 was scanned once.
        assert_eq!(id_reads(&config, PciAddress::new(0, 5, 0)), 1);
    }

    #[test]
    fn bridges_pointing_at_each_other_and_themselves_do_not_loop() {
        let config = FakeConfig::new();
        config.insert(
            PciAddress::new(0, 0, 0),
            FakeFunction::bridge(0x1b36, 0x0001, 0, 1, 1),
        );
        config.insert(
            PciAddress::new(1, 0, 0),
            FakeFunction::bridge(0x1b36, 0x0001, 1, 1, 1),
        );
        config.insert(
            PciAddress::new(1, 1, 0),
            FakeFunction::bridge(0x1b36, 0x0001, 1, 0, 0),
        );
        let result = enumerate_with_errors(&config);
        assert_eq!(result.functions.len(), 3);
        assert_eq!(result.errors.len(), 2, "{:?}", result.errors);
        assert_eq!(
            id_reads(&config, PciAddress::new(1, 5, 0)),
            1,
            "bus 1 scanned once"
        );
    }

    /// A configuration space where every function of every bus is a multi-function bridge,
    /// each pointing somewhere: the worst a hostile platform can do.
    struct EverythingIsABridge;

    impl ConfigSpace for EverythingIsABridge {
        fn read32(&self, address: PciAddress, offset: u16) -> u32 {
            match offset {
                regs::VENDOR_DEVICE => 0x0001_1b36,
                regs::CLASS_REVISION => 0x0604_0000,
                regs::HEADER_TYPE_DWORD => 0x0081_0000,
                regs::BRIDGE_BUS_NUMBERS => {
                    let secondary = address.bus.wrapping_add(address.device).wrapping_add(1);
                    u32::from(address.bus) | u32::from(secondary) << 8 | 0xff << 16
                }
                _ => 0,
            }
        }

        fn write32(&self, _address: PciAddress, _offset: u16, _value: u32) {}
    }

    #[test]
    fn hostile_space_is_walked_once_per_bus() {
        let result = enumerate_with_errors(&EverythingIsABridge);
        assert_eq!(
            result.functions.len(),
            256 * 32 * 8,
            "every bus once, every function once"
        );
        assert!(
            addresses(&result.functions)
                .windows(2)
                .all(|pair| pair[0] < pair[1])
        );
        let rescans = result
            .errors
            .iter()
            .filter(|error| matches!(error, EnumerationError::BusAlreadyScanned { .. }))
            .count();
        assert_eq!(
            rescans,
            result.functions.len() - 255,
            "all but 255 bridges were refused"
        );
    }

    #[test]
    fn unknown_header_type_and_bar_errors_are_reported() {
        let config = FakeConfig::new();
        config.insert(
            PciAddress::new(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, 0x060000, 2).header(0x05),
        );
        config.insert(
            PciAddress::new(0, 1, 0),
            FakeFunction::endpoint(0x1234, 0x0001, 0x020000, 0).dword(0x24, 0x4, 0xffff_f000),
        );
        let result = enumerate_with_errors(&config);
        assert_eq!(
            result.errors,
            [
                EnumerationError::UnknownHeaderType {
                    address: PciAddress::new(0, 0, 0),
                    header_type: 5
                },
                EnumerationError::Bar {
                    address: PciAddress::new(0, 1, 0),
                    error: BarError::SixtyFourBitInLastSlot { slot: 5 }
                },
            ]
        );
        assert!(
            !config
                .log()
                .iter()
                .any(|a| a.address() == PciAddress::new(0, 0, 0) && a.is_write()),
            "a function with an unknown header is only read"
        );
        assert_eq!(
            result.errors[0].to_string(),
            "0000:00:00.0: unknown header type 0x05"
        );
    }

    #[test]
    fn enumeration_writes_only_bars_and_command_and_restores_them() {
        let config = q35();
        let before = config.snapshot();
        let _ = enumerate(&config);
        assert_eq!(
            config.snapshot(),
            before,
            "configuration space is as it was"
        );
        assert!(
            config
                .log()
                .iter()
                .filter(|a| a.is_write())
                .all(|a| a.offset() == regs::COMMAND_STATUS || (0x10..0x28).contains(&a.offset())),
            "only the command register and BARs are written"
        );
        assert_eq!(config.bar_writes_while_decoding(), 0);
    }

    #[test]
    fn is_present_reads_vendor_only() {
        let config = q35();
        assert!(is_present(&config, PciAddress::new(0, 1, 0)));
        assert!(!is_present(&config, PciAddress::new(0, 9, 0)));
        assert!(
            config
                .log()
                .iter()
                .all(|a| !a.is_write() && a.offset() == 0)
        );
    }
}
