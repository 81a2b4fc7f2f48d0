//! Where `pci_types` 0.10 is not sound for an untrusted device, shown against this crate's fake
//! configuration space (compiled only under `cfg(test)`). Each test calls `pci_types` on a
//! malformed or live function and shows it panicking, looping, decoding while the probe is
//! live, or clearing status bits, next to this crate's code returning a typed error or leaving
//! the registers alone. The crate documentation (`lib.rs`) lists what is kept for these reasons.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pci_types::capability::PciCapability;
use pci_types::{ConfigRegionAccess, EndpointHeader, PciHeader};

use crate::bar::{BarError, ENDPOINT_BAR_SLOTS, probe_bars};
use crate::fake::{FakeConfig, FakeFunction, q35_virtio_net};
use crate::msix::{MsixCapability, MsixError, MsixStructure};
use crate::{
    AddressOutOfRange, Bar, Capabilities, CapabilityError, CommandRegister, ConfigSpace,
    PciAddress, Status, cap_id, read_status, update_command_flags,
};

const ADDR: PciAddress = PciAddress::new(0, 3, 0);

/// A [`ConfigSpace`] as `pci_types` expects it, writes included (the crate's own adapter drops
/// writes; these tests need `pci_types`' writes to reach the fake to show what they do).
struct Forwarding<'a>(&'a FakeConfig);

// The methods are `unsafe fn` only because the trait declares them so; they call the fake's
// safe methods.
#[allow(unsafe_code)]
impl ConfigRegionAccess for Forwarding<'_> {
    unsafe fn read(&self, address: pci_types::PciAddress, offset: u16) -> u32 {
        self.0.read32(address.into(), offset)
    }

    unsafe fn write(&self, address: pci_types::PciAddress, offset: u16, value: u32) {
        self.0.write32(address.into(), offset, value);
    }
}

fn types_address() -> pci_types::PciAddress {
    pci_types::PciAddress::try_from(ADDR).expect("in range")
}

fn endpoint(config: &FakeConfig) -> EndpointHeader {
    EndpointHeader::from_header(PciHeader::new(types_address()), Forwarding(config))
        .expect("a type-0 header")
}

fn config_with(function: FakeFunction) -> FakeConfig {
    let config = FakeConfig::new();
    config.insert(ADDR, function);
    config
}

#[test]
fn reserved_memory_bar_type_panics_in_pci_types_and_is_an_error_here() {
    // BAR0: a memory BAR (bit 0 clear) of reserved type 0b01 in bits 2:1.
    let function =
        FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0).dword(0x10, 0xfebd_0002, 0xffff_f000);
    let config = config_with(function.clone());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        endpoint(&config).bar(0, Forwarding(&config))
    }));
    assert!(
        outcome.is_err(),
        "pci_types panics on a reserved memory type"
    );

    let config = config_with(function);
    let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
    assert_eq!(
        probed.errors[0],
        Some(BarError::ReservedMemoryType {
            slot: 0,
            raw: 0xfebd_0002
        })
    );
}

#[test]
fn pci_types_sizes_bars_with_decoding_on() {
    // q35's virtio-net has memory and I/O decoding on, as firmware leaves it.
    let config = config_with(q35_virtio_net());
    let bar = endpoint(&config).bar(1, Forwarding(&config));
    assert!(matches!(
        bar,
        Some(pci_types::Bar::Memory32 { size: 0x1000, .. })
    ));
    assert!(
        config.bar_writes_while_decoding() > 0,
        "pci_types wrote the all-ones probe while the device decoded memory"
    );

    let config = config_with(q35_virtio_net());
    let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
    assert_eq!(probed.bars[1].map(|bar| bar.size()), Some(0x1000));
    assert_eq!(config.bar_writes_while_decoding(), 0);
}

/// With overflow checks (the test profile), a BAR whose address bits are all read-only but
/// whose flag bits are not zero makes `pci_types` shift a `u32` by 32; without them it reports
/// a 1-byte BAR. This crate calls such a BAR unimplemented.
#[cfg(debug_assertions)]
#[test]
fn read_only_memory_bar_overflows_in_pci_types_and_is_unimplemented_here() {
    // BAR0 reads 0x8 (prefetchable 32-bit memory) and no address bit is writable.
    let function = FakeFunction::endpoint(0x1234, 0x5678, 0x020000, 0).dword(0x10, 0x8, 0);
    let config = config_with(function.clone());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        endpoint(&config).bar(0, Forwarding(&config))
    }));
    assert!(outcome.is_err(), "pci_types overflows a shift");

    let config = config_with(function);
    let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
    assert_eq!(probed.bars[0], None);
    assert_eq!(probed.errors[0], None);
}

#[test]
fn pci_types_does_not_size_io_bars() {
    let config =
        config_with(FakeFunction::endpoint(0x1234, 0x5678, 0x010601, 0).io_bar(0, 0xc040, 0x20));
    let bar = endpoint(&config).bar(0, Forwarding(&config));
    assert!(matches!(bar, Some(pci_types::Bar::Io { port: 0xc040 })));
    let probed = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS);
    assert_eq!(
        probed.bars[0],
        Some(Bar::Io {
            port: 0xc040,
            size: 0x20
        })
    );
}

#[test]
fn capability_loop_never_ends_in_pci_types_and_is_an_error_here() {
    let config = config_with(
        FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
            .capability(0x40, 0x50, cap_id::MSI)
            .capability(0x50, 0x40, cap_id::VENDOR_SPECIFIC)
            .with_capabilities_pointer(0x40),
    );
    let walked = endpoint(&config)
        .capabilities(Forwarding(&config))
        .take(1000)
        .count();
    assert_eq!(walked, 1000, "pci_types would walk the loop forever");

    let ours: Vec<_> = Capabilities::new(&config, ADDR).collect();
    assert!(ours.len() < 1000);
    assert_eq!(ours.last(), Some(&Err(CapabilityError::Loop { at: 0x40 })));
}

#[test]
fn capability_pointer_into_the_header_is_followed_by_pci_types_and_is_an_error_here() {
    // The capability at 0x40 points at 0x08, inside the standard header (class code).
    let config = config_with(
        FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
            .capability(0x40, 0x08, cap_id::MSI)
            .with_capabilities_pointer(0x40),
    );
    let offsets: Vec<u16> = endpoint(&config)
        .capabilities(Forwarding(&config))
        .take(4)
        .map(|capability| capability.address().offset)
        .collect();
    assert_eq!(
        offsets[..2],
        [0x40, 0x08],
        "pci_types reads the header as a capability"
    );

    let ours: Vec<_> = Capabilities::new(&config, ADDR).collect();
    assert_eq!(
        ours.last(),
        Some(&Err(CapabilityError::PointerOutOfRange { pointer: 0x08 }))
    );
}

#[test]
fn pci_types_update_command_clears_write_one_to_clear_status_bits() {
    let status = Status::CAPABILITIES_LIST | Status::RECEIVED_MASTER_ABORT;
    let function = FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
        .command(CommandRegister::MEMORY_ENABLE.bits())
        .status(status.bits());

    let config = config_with(function.clone());
    PciHeader::new(types_address()).update_command(Forwarding(&config), |command| {
        command | CommandRegister::BUS_MASTER_ENABLE
    });
    assert_eq!(
        read_status(&config, ADDR),
        Status::CAPABILITIES_LIST,
        "pci_types cleared Received Master Abort"
    );

    let config = config_with(function);
    update_command_flags(
        &config,
        ADDR,
        CommandRegister::BUS_MASTER_ENABLE,
        CommandRegister::empty(),
    );
    assert_eq!(read_status(&config, ADDR), status, "status unchanged");
}

#[test]
fn pci_types_msix_takes_a_reserved_bir_as_is_and_it_is_an_error_here() {
    // An MSI-X capability whose table is in "BAR7" (BIR 7 is reserved) and PBA in BAR1.
    let config = config_with(
        FakeFunction::endpoint(0x1af4, 0x1041, 0x020000, 1)
            .bar32(1, 0xfebd_1000, 0x1000, false)
            .msix(0x40, 0, 4, 7, 0x800 | 1),
    );
    let theirs = endpoint(&config)
        .capabilities(Forwarding(&config))
        .find_map(|capability| match capability {
            PciCapability::MsiX(msix) => Some(msix),
            _ => None,
        })
        .expect("pci_types finds the MSI-X capability");
    assert_eq!(theirs.table_bar(), 7, "accepted without complaint");

    let bars = probe_bars(&config, ADDR, ENDPOINT_BAR_SLOTS).bars;
    assert_eq!(
        MsixCapability::find(&config, ADDR, &bars),
        Err(MsixError::ReservedBir {
            structure: MsixStructure::Table,
            bir: 7
        })
    );
}

#[test]
fn pci_types_address_panics_out_of_range_and_the_conversion_is_checked_here() {
    let outcome = catch_unwind(|| pci_types::PciAddress::new(0, 0, 32, 0));
    assert!(
        outcome.is_err(),
        "device 32 does not fit pci_types' 5-bit field"
    );
    let outcome = catch_unwind(|| pci_types::PciAddress::new(0, 0, 0, 8));
    assert!(
        outcome.is_err(),
        "function 8 does not fit pci_types' 3-bit field"
    );

    let bad = PciAddress::new(0, 32, 0);
    assert_eq!(
        pci_types::PciAddress::try_from(bad),
        Err(AddressOutOfRange(bad))
    );
}
