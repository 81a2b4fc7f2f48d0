//! Identification (§4.1.2) and the capability walk (§4.1.4) on QEMU's layouts and malformed
//! ones.

use pci::{Bar, CapabilityError};

use super::fake::{
    ADDRESS, BAR4_BASE, FakeConfig, Layout, PIO_NOTIFY_BASE, notify_cap, virtio_cap,
};
use super::open;
use crate::error::{DiscoveryError, StructureKind};
use crate::hal::HalError;
use crate::pci::{DeviceConfigRequirement, Location, PciFlavor, find_capabilities, identify};
use crate::spec::cfg_type;
use crate::transport::{DeviceType, Transport};

fn body_mut(layout: &mut Layout, cfg: u8) -> &mut Vec<u8> {
    let cap = layout
        .caps
        .iter_mut()
        .find(|cap| cap.id == pci::cap_id::VENDOR_SPECIFIC && cap.body[1] == cfg)
        .expect("layout has this cap");
    &mut cap.body
}

fn discover(layout: &Layout) -> Result<crate::pci::VirtioCapabilities, DiscoveryError> {
    let config = FakeConfig::from_layout(layout);
    find_capabilities(
        &config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Required,
    )
}

#[test]
fn qemu_modern_layout_is_located_from_the_capabilities() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    assert_eq!(
        config.cap_offsets(),
        [0x98, 0x84, 0x70, 0x60, 0x50, 0x40],
        "QEMU's lspci order"
    );
    let transport = open(&config, &device, &layout).expect("modern device opens");

    let id = transport.id();
    assert_eq!(id.flavor, PciFlavor::Modern);
    assert_eq!(id.device_type, DeviceType::NET);
    assert_eq!(transport.device_type(), DeviceType::NET);
    let caps = transport.capabilities();
    assert_eq!(
        (caps.common.bar, caps.common.offset, caps.common.length),
        (4, 0x0, 0x1000)
    );
    assert_eq!(
        (caps.isr.bar, caps.isr.offset, caps.isr.length),
        (4, 0x1000, 0x1000)
    );
    let device_region = caps.device.expect("device config");
    assert_eq!((device_region.bar, device_region.offset), (4, 0x2000));
    assert_eq!(
        (caps.notify.bar, caps.notify.offset, caps.notify.length),
        (4, 0x3000, 0x1000)
    );
    assert_eq!(caps.notify_off_multiplier, 4);
    assert_eq!(caps.common.cap_offset, 0x40);
    assert_eq!(
        caps.notify.location,
        Location::Memory {
            phys: BAR4_BASE + 0x3000
        }
    );
    assert!(!transport.notifies_by_port());
    assert_eq!(transport.num_queues(), 3);
    // Each memory region was mapped exactly as advertised.
    device.with(|state| {
        assert!(state.mappings.contains(&crate::hal::Window {
            base: BAR4_BASE + 0x3000,
            len: 0x1000
        }));
        assert_eq!(state.mappings.len(), 4);
    });

    let text = format!("{caps}");
    assert!(
        text.contains("notify (cap 0x70, cfg_type 2): BAR4 +0x3000 len 0x1000"),
        "{text}"
    );
    assert!(text.contains("notify_off_multiplier 4"), "{text}");
    assert!(format!("{id}").contains("virtio-net (1af4:1041, modern)"));
    device.assert_clean();
}

#[test]
fn transitional_device_takes_its_type_from_the_subsystem_id_and_ignores_legacy_bar0() {
    let layout = Layout::transitional_net();
    let (config, device) = layout.build();
    let transport = open(&config, &device, &layout).expect("transitional device opens");
    assert_eq!(transport.id().flavor, PciFlavor::Transitional);
    assert_eq!(transport.id().device_id, 0x1000);
    assert_eq!(transport.device_type(), DeviceType::NET);
    assert_eq!(
        transport.capabilities().common.bar,
        4,
        "modern BAR, not legacy BAR0"
    );
}

#[test]
fn page_per_vq_layout_has_multiplier_4096_and_a_4_mib_notify_region() {
    let layout = Layout::page_per_vq();
    assert_eq!(
        layout.bars[4],
        Some(Bar::Memory {
            address: BAR4_BASE,
            size: 0x80_0000,
            prefetchable: true,
            is_64bit: true
        })
    );
    let caps = discover(&layout).expect("page-per-vq layout is valid");
    assert_eq!(caps.notify_off_multiplier, 4096);
    assert_eq!(caps.notify.length, 4096 * 1024);
}

#[test]
fn pio_notify_capability_in_io_bar2_is_used_because_the_walk_meets_it_first() {
    let layout = Layout::pio_notify();
    let caps = discover(&layout).expect("pio layout is valid");
    assert_eq!(caps.notify.bar, 2);
    assert_eq!(
        caps.notify.location,
        Location::Io {
            port: PIO_NOTIFY_BASE as u16
        }
    );
    assert_eq!((caps.notify.offset, caps.notify.length), (0, 4));
    assert_eq!(caps.notify_off_multiplier, 0);
    assert!(format!("{}", caps.notify).contains("at port 0xc040"));
}

#[test]
fn function_without_virtio_capabilities_is_legacy_only() {
    let mut layout = Layout::transitional_net();
    layout
        .caps
        .retain(|cap| cap.id != pci::cap_id::VENDOR_SPECIFIC);
    let (config, device) = layout.build();
    let error = open(&config, &device, &layout)
        .err()
        .expect("legacy-only refused");
    assert_eq!(error, DiscoveryError::LegacyOnly { device: 0x1000 });
    assert!(format!("{error}").contains("legacy-only device, not supported"));

    // No capability list at all.
    layout.caps.clear();
    let (config, device) = layout.build();
    assert!(matches!(
        open(&config, &device, &layout),
        Err(DiscoveryError::LegacyOnly { .. })
    ));
}

#[test]
fn identification_rejects_other_vendors_and_unknown_device_ids() {
    let layout = Layout::modern_net();
    let config = FakeConfig::from_layout(&layout);
    config.poke(0, 0x86);
    config.poke(1, 0x80);
    assert_eq!(
        identify(&config, ADDRESS),
        Err(DiscoveryError::NotVirtio {
            vendor: 0x8086,
            device: 0x1041
        })
    );
    let mut layout = Layout::modern_net();
    layout.device_id = 0x10f0;
    let config = FakeConfig::from_layout(&layout);
    assert_eq!(
        identify(&config, ADDRESS),
        Err(DiscoveryError::UnknownDeviceId { device: 0x10f0 })
    );
    layout.device_id = 0x1042;
    let config = FakeConfig::from_layout(&layout);
    assert_eq!(
        identify(&config, ADDRESS).map(|id| id.device_type),
        Ok(DeviceType::BLOCK)
    );
}

#[test]
fn next_pointer_loop_is_reported_not_followed_forever() {
    let layout = Layout::modern_net();
    let config = FakeConfig::from_layout(&layout);
    // The last capability (common at 0x40) points back at the head.
    config.poke(0x41, 0x98);
    let error = find_capabilities(
        &config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Required,
    );
    assert!(
        matches!(
            error,
            Err(DiscoveryError::CapabilityList(CapabilityError::Loop { .. }))
        ),
        "{error:?}"
    );
}

#[test]
fn next_pointer_into_the_header_is_reported() {
    let layout = Layout::modern_net();
    let config = FakeConfig::from_layout(&layout);
    config.poke(0x41, 0x20);
    let error = find_capabilities(
        &config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Required,
    );
    assert_eq!(
        error,
        Err(DiscoveryError::CapabilityList(
            CapabilityError::PointerOutOfRange { pointer: 0x20 }
        ))
    );
}

#[test]
fn cap_len_too_short_is_reported_with_the_numbers() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::COMMON)[0] = 8;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::CapTooShort {
            kind: StructureKind::Common,
            at: 0x40,
            cap_len: 8,
            required: 16
        })
    );

    // A notify capability needs 20 bytes for its multiplier.
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::NOTIFY)[0] = 16;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::CapTooShort {
            kind: StructureKind::Notify,
            at: 0x70,
            cap_len: 16,
            required: 20
        })
    );
}

#[test]
fn reserved_bar_index_is_reported() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::ISR)[2] = 7;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::BadBarIndex {
            kind: StructureKind::Isr,
            bar: 7
        })
    );
}

#[test]
fn unimplemented_bar_and_upper_half_of_64bit_bar_are_reported() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::COMMON)[2] = 5;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::BarAbsent {
            kind: StructureKind::Common,
            bar: 5
        })
    );
}

#[test]
fn region_past_the_bar_end_is_reported_with_the_numbers() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::NOTIFY)[10..14].copy_from_slice(&0x2000u32.to_le_bytes());
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::RegionOutsideBar {
            kind: StructureKind::Notify,
            bar: 4,
            offset: 0x3000,
            length: 0x2000,
            bar_size: 0x4000
        })
    );
}

#[test]
fn offset_plus_length_overflowing_32_bits_is_outside_the_bar_not_a_panic() {
    let mut layout = Layout::modern_net();
    let body = body_mut(&mut layout, cfg_type::DEVICE);
    body[6..10].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
    body[10..14].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
    assert!(matches!(
        discover(&layout),
        Err(DiscoveryError::RegionOutsideBar {
            kind: StructureKind::Device,
            offset: 0xffff_fffc,
            ..
        })
    ));
}

#[test]
fn memory_structures_in_an_io_bar_are_the_wrong_bar_kind() {
    let mut layout = Layout::transitional_net();
    body_mut(&mut layout, cfg_type::COMMON)[2] = 0;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::WrongBarKind {
            kind: StructureKind::Common,
            bar: 0
        })
    );
}

#[test]
fn misaligned_and_too_small_regions_are_reported() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::COMMON)[6] = 2;
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::Misaligned {
            kind: StructureKind::Common,
            offset: 2,
            alignment: 4
        })
    );
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::COMMON)[10..14].copy_from_slice(&0x20u32.to_le_bytes());
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::RegionTooSmall {
            kind: StructureKind::Common,
            length: 0x20,
            required: 0x38
        })
    );
}

#[test]
fn odd_notify_multiplier_is_rejected() {
    let mut layout = Layout::modern_net();
    body_mut(&mut layout, cfg_type::NOTIFY)[14..18].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::BadNotifyMultiplier { multiplier: 3 })
    );
}

#[test]
fn missing_structures_are_named_and_device_config_can_be_optional() {
    let mut layout = Layout::modern_net();
    layout.caps.retain(|cap| cap.body[1] != cfg_type::ISR);
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::MissingCapability(StructureKind::Isr))
    );

    let mut layout = Layout::modern_net();
    layout.caps.retain(|cap| cap.body[1] != cfg_type::DEVICE);
    assert_eq!(
        discover(&layout).err(),
        Some(DiscoveryError::MissingCapability(StructureKind::Device))
    );
    let config = FakeConfig::from_layout(&layout);
    let caps = find_capabilities(
        &config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Optional,
    )
    .expect("device config optional");
    assert_eq!(caps.device, None);
}

#[test]
fn first_usable_capability_of_each_type_wins_and_unusable_ones_are_skipped() {
    // QEMU prepends, so the cap added last is walked first: add a valid duplicate common cap
    // (id 1) that the walk meets before the original (id 0)...
    let mut layout = Layout::modern_net();
    let mut duplicate = virtio_cap(cfg_type::COMMON, 4, 0x0, 0x1000);
    duplicate.body[3] = 1;
    layout.caps.push(duplicate);
    assert_eq!(discover(&layout).map(|caps| caps.common.id), Ok(1));

    // ...and an unusable one (reserved BAR) walked first is skipped in favour of the valid one.
    let mut layout = Layout::modern_net();
    layout
        .caps
        .push(virtio_cap(cfg_type::COMMON, 9, 0x0, 0x1000));
    layout.caps.push(notify_cap(4, 0x3000, 0x1_0000, 4));
    let caps = discover(&layout).expect("valid caps after invalid ones are used");
    assert_eq!((caps.common.bar, caps.common.cap_offset), (4, 0x40));
    assert_eq!(caps.notify.length, 0x1000);
}

#[test]
fn unknown_and_unused_cfg_types_are_ignored_even_with_garbage_fields() {
    let mut layout = Layout::modern_net();
    for kind in [
        cfg_type::PCI,
        cfg_type::SHARED_MEMORY,
        cfg_type::VENDOR,
        0x42,
    ] {
        let mut cap = virtio_cap(kind, 0xee, 0xffff_ffff, 0xffff_ffff);
        cap.body[0] = 2;
        layout.caps.push(cap);
    }
    let caps = discover(&layout).expect("unknown types ignored");
    assert_eq!(caps.common.cap_offset, 0x40);
}

#[test]
fn a_mapping_failure_is_reported() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    device.with(|state| state.fail_map = true);
    assert_eq!(
        open(&config, &device, &layout).err(),
        Some(DiscoveryError::Map(HalError::MapFailed {
            phys: BAR4_BASE,
            len: 0x1000
        }))
    );
}

#[test]
fn every_discovery_error_displays_its_numbers() {
    let error = DiscoveryError::RegionOutsideBar {
        kind: StructureKind::Notify,
        bar: 4,
        offset: 0x3000,
        length: 0x2000,
        bar_size: 0x4000,
    };
    assert_eq!(
        format!("{error}"),
        "notify region 0x3000+0x2000 lies outside BAR4 (size 0x4000)"
    );
}

#[test]
fn capability_running_past_config_space_is_reported_without_reading_beyond_it() {
    let mut layout = Layout::modern_net();
    layout.caps.retain(|cap| cap.body[1] != cfg_type::ISR);
    let config = FakeConfig::from_layout(&layout);
    // Chain an ISR capability at 0xf8 behind the last one; its 16 bytes would end at 0x108.
    // (The fake config space panics on any read past 0xff.)
    let last = *config.cap_offsets().last().expect("caps");
    config.poke(last + 1, 0xf8);
    for (i, byte) in [pci::cap_id::VENDOR_SPECIFIC, 0, 16, cfg_type::ISR]
        .into_iter()
        .enumerate()
    {
        config.poke(0xf8 + i as u8, byte);
    }
    assert_eq!(
        find_capabilities(
            &config,
            ADDRESS,
            &layout.bars,
            DeviceConfigRequirement::Required
        )
        .err(),
        Some(DiscoveryError::CapBeyondConfigSpace {
            kind: StructureKind::Isr,
            at: 0xf8,
            len: 16
        })
    );
}
