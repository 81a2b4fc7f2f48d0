//! Device-specific configuration reads with the config-generation protocol (§2.4.1), bounds
//! and alignment (§4.1.3.1).

use super::fake::{ConfigChange, Layout};
use super::open;
use crate::error::TransportError;
use crate::pci::{DeviceConfigRequirement, PciTransport};
use crate::spec::net_config;
use crate::tests::fake::ADDRESS;
use crate::transport::{CONFIG_READ_ATTEMPTS, ConfigWidth, RegisterWidth, Transport};

#[test]
fn net_config_fields_read_back() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let transport = open(&config, &device, &layout).expect("opens");
    let mut mac = [0u8; 6];
    transport
        .read_config_bytes(net_config::MAC, &mut mac)
        .expect("mac");
    assert_eq!(mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    assert_eq!(
        transport.read_config(net_config::STATUS, ConfigWidth::U16),
        Ok(u64::from(net_config::STATUS_LINK_UP))
    );
    assert_eq!(
        transport.read_config(net_config::MTU, ConfigWidth::U16),
        Ok(1500)
    );
    assert_eq!(
        transport.read_config(net_config::MAX_VIRTQUEUE_PAIRS, ConfigWidth::U16),
        Ok(1)
    );
    assert_eq!(transport.device_config_len(), 0x1000);
    device.assert_clean();
}

#[test]
fn a_generation_change_mid_read_is_retried_and_the_stable_value_returned() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let old = 0x1111_1111_2222_2222u64;
    let new = 0x3333_3333_4444_4444u64;
    device.with(|state| {
        state.device_config[16..24].copy_from_slice(&old.to_le_bytes());
        // The device updates the field right after the driver read the low half.
        state.config_changes.push(ConfigChange {
            after_reads: 1,
            offset: 16,
            bytes: new.to_le_bytes().to_vec(),
        });
    });
    let transport = open(&config, &device, &layout).expect("opens");
    assert_eq!(
        transport.read_config(16, ConfigWidth::U64),
        Ok(new),
        "not the torn 0x33333333_22222222"
    );
    device.with(|state| assert_eq!(state.config_reads, 4, "two attempts of two 32-bit pieces"));

    // The same for a byte array: a MAC that changes between its bytes.
    device.with(|state| {
        state.config_reads = 0;
        state.config_changes = vec![ConfigChange {
            after_reads: 3,
            offset: 0,
            bytes: vec![2, 0, 0, 0, 0, 9],
        }];
    });
    let mut mac = [0u8; 6];
    transport
        .read_config_bytes(0, &mut mac)
        .expect("stable on retry");
    assert_eq!(mac, [2, 0, 0, 0, 0, 9]);
}

#[test]
fn a_generation_that_never_stabilizes_is_an_error_after_bounded_retries() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    device.with(|state| state.generation_churn = true);
    let transport = open(&config, &device, &layout).expect("opens");
    assert_eq!(
        transport.read_config(net_config::MTU, ConfigWidth::U16),
        Err(TransportError::ConfigGenerationUnstable {
            offset: net_config::MTU,
            attempts: CONFIG_READ_ATTEMPTS
        })
    );
    device.with(|state| assert_eq!(state.config_reads, CONFIG_READ_ATTEMPTS));
    let mut mac = [0u8; 6];
    assert!(matches!(
        transport.read_config_bytes(0, &mut mac),
        Err(TransportError::ConfigGenerationUnstable { offset: 0, .. })
    ));
}

#[test]
fn config_reads_are_bounded_by_the_region_and_aligned() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let transport = open(&config, &device, &layout).expect("opens");
    assert_eq!(
        transport.read_config(0x1000, ConfigWidth::U8),
        Err(TransportError::ConfigOutOfRange {
            offset: 0x1000,
            width: 1,
            len: 0x1000
        })
    );
    assert_eq!(
        transport.read_config(0xffc, ConfigWidth::U64),
        Err(TransportError::ConfigOutOfRange {
            offset: 0xffc,
            width: 8,
            len: 0x1000
        })
    );
    assert!(matches!(
        transport.read_config(u32::MAX - 3, ConfigWidth::U64),
        Err(TransportError::ConfigOutOfRange { .. })
    ));
    assert_eq!(
        transport.read_config(6, ConfigWidth::U32),
        Err(TransportError::ConfigMisaligned {
            offset: 6,
            width: 4
        })
    );
    let mut big = [0u8; 8];
    assert!(matches!(
        transport.read_config_bytes(0xffc, &mut big),
        Err(TransportError::ConfigOutOfRange { .. })
    ));
    assert!(matches!(
        transport.read_device_config_raw(1, RegisterWidth::U16),
        Err(TransportError::ConfigMisaligned {
            offset: 1,
            width: 2
        })
    ));
    device.with(|state| {
        assert_eq!(
            state.config_reads, 0,
            "nothing out of range reached the device"
        )
    });
    device.assert_clean();
}

#[test]
fn a_device_without_device_config_says_so() {
    let mut layout = Layout::modern_net();
    layout
        .caps
        .retain(|cap| cap.body[1] != crate::spec::cfg_type::DEVICE);
    let (config, device) = layout.build();
    let mut transport = PciTransport::new(
        &device,
        &config,
        ADDRESS,
        &layout.bars,
        DeviceConfigRequirement::Optional,
    )
    .expect("optional device config");
    assert_eq!(transport.device_config_len(), 0);
    assert_eq!(
        transport.read_config(0, ConfigWidth::U8),
        Err(TransportError::NoDeviceConfig)
    );
    assert_eq!(
        transport.write_device_config_raw(0, RegisterWidth::U8, 1),
        Err(TransportError::NoDeviceConfig)
    );
}

#[test]
fn device_config_writes_use_the_register_width() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut transport = open(&config, &device, &layout).expect("opens");
    transport
        .write_device_config_raw(0, RegisterWidth::U16, 0xbeef)
        .expect("write");
    assert_eq!(transport.read_config(0, ConfigWidth::U16), Ok(0xbeef));
    device.assert_clean();
}
