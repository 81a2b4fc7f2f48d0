//! The §3.1.1 initialization sequence, feature negotiation and the status state machine.

use super::fake::{Layout, qemu_net_features};
use super::open;
use crate::error::TransportError;
use crate::pci::RESET_TIMEOUT_US;
use crate::spec::{DeviceStatus, Features, NetFeatures, common_cfg};
use crate::transport::{
    InitStage, InitStep, TRANSPORT_UNSUPPORTED_FEATURES, Transport, VirtioDevice,
    negotiate_features,
};

fn bits(masks: &[u64]) -> u64 {
    masks.iter().fold(0, |all, mask| all | mask)
}

#[test]
fn full_sequence_writes_the_status_bits_in_spec_order() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));
    assert_eq!(virtio.stage(), InitStage::Unknown);

    let supported = bits(&[
        NetFeatures::MAC.bits(),
        NetFeatures::STATUS.bits(),
        Features::EVENT_IDX.bits(),
        Features::RING_PACKED.bits(),
    ]);
    let negotiated = virtio.begin(supported).expect("negotiation succeeds");
    assert_eq!(
        negotiated,
        bits(&[
            Features::VERSION_1.bits(),
            NetFeatures::MAC.bits(),
            NetFeatures::STATUS.bits(),
            Features::EVENT_IDX.bits()
        ])
    );
    assert!(virtio.has_feature(NetFeatures::MAC.bits()));
    assert!(
        !virtio.has_feature(Features::RING_PACKED.bits()),
        "not offered by the device"
    );
    assert_eq!(virtio.stage(), InitStage::FeaturesOk);
    virtio.driver_ok().expect("DRIVER_OK");
    assert_eq!(virtio.stage(), InitStage::DriverOk);

    device.with(|state| {
        let a = DeviceStatus::ACKNOWLEDGE.bits();
        let d = a | DeviceStatus::DRIVER.bits();
        let f = d | DeviceStatus::FEATURES_OK.bits();
        assert_eq!(
            state.status_writes,
            [0, a, d, f, f | DeviceStatus::DRIVER_OK.bits()]
        );
        assert_eq!(state.status, f | DeviceStatus::DRIVER_OK.bits());
        let driver =
            u64::from(state.driver_features[0]) | (u64::from(state.driver_features[1]) << 32);
        assert_eq!(driver, negotiated);
        // Feature halves were written with the select register first, low half first.
        let feature_writes: Vec<_> = state
            .common_writes
            .iter()
            .filter(|(register, _)| {
                *register == common_cfg::DRIVER_FEATURE_SELECT
                    || *register == common_cfg::DRIVER_FEATURE
            })
            .copied()
            .collect();
        assert_eq!(
            feature_writes,
            [
                (common_cfg::DRIVER_FEATURE_SELECT, 0),
                (common_cfg::DRIVER_FEATURE, negotiated as u32),
                (common_cfg::DRIVER_FEATURE_SELECT, 1),
                (common_cfg::DRIVER_FEATURE, (negotiated >> 32) as u32),
            ]
        );
    });
    device.assert_clean();
}

#[test]
fn all_64_device_feature_bits_are_read_through_the_select_register() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let offered = qemu_net_features()
        | bits(&[
            Features::RING_PACKED.bits(),
            NetFeatures::SPEED_DUPLEX.bits(),
        ]);
    device.with(|state| state.device_features = offered);
    let mut transport = open(&config, &device, &layout).expect("opens");
    assert_eq!(transport.read_device_features(), offered);
}

#[test]
fn out_of_order_steps_are_refused_and_change_nothing() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));

    assert_eq!(
        virtio.acknowledge(),
        Err(TransportError::OutOfOrder {
            step: InitStep::Acknowledge,
            stage: InitStage::Unknown
        })
    );
    virtio.reset().expect("reset");
    assert_eq!(
        virtio.driver(),
        Err(TransportError::OutOfOrder {
            step: InitStep::Driver,
            stage: InitStage::Reset
        })
    );
    virtio.acknowledge().expect("ack");
    assert_eq!(
        virtio.negotiate_features(0),
        Err(TransportError::OutOfOrder {
            step: InitStep::NegotiateFeatures,
            stage: InitStage::Acknowledged
        })
    );
    assert_eq!(
        virtio.driver_ok(),
        Err(TransportError::OutOfOrder {
            step: InitStep::DriverOk,
            stage: InitStage::Acknowledged
        })
    );
    assert_eq!(virtio.stage(), InitStage::Acknowledged);
    device.with(|state| {
        assert_eq!(
            state.status,
            DeviceStatus::ACKNOWLEDGE.bits(),
            "refused steps wrote nothing"
        )
    });

    virtio.driver().expect("driver");
    virtio.negotiate_features(0).expect("negotiate");
    virtio.driver_ok().expect("driver ok");
    assert_eq!(
        virtio.set_config_vector(Some(0)),
        Err(TransportError::OutOfOrder {
            step: InitStep::SetConfigVector,
            stage: InitStage::DriverOk
        })
    );
    assert_eq!(
        virtio.driver_ok(),
        Err(TransportError::OutOfOrder {
            step: InitStep::DriverOk,
            stage: InitStage::DriverOk
        })
    );
    let message = format!(
        "{}",
        TransportError::OutOfOrder {
            step: InitStep::DriverOk,
            stage: InitStage::Reset
        }
    );
    assert_eq!(message, "cannot set DRIVER_OK while the device is reset");
}

#[test]
fn device_refusing_features_ok_gets_failed_and_a_typed_error() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    device.with(|state| state.refuse_features_ok = true);
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));
    let supported = bits(&[NetFeatures::MAC.bits()]);
    let error = virtio.begin(supported).expect_err("device refuses");
    assert_eq!(
        error,
        TransportError::FeaturesRejected {
            driver_features: bits(&[Features::VERSION_1.bits(), NetFeatures::MAC.bits()])
        }
    );
    assert_eq!(virtio.stage(), InitStage::Failed);
    device.with(|state| {
        assert_ne!(state.status & DeviceStatus::FAILED.bits(), 0, "FAILED set");
        assert_eq!(state.status & DeviceStatus::FEATURES_OK.bits(), 0);
    });
    assert!(matches!(
        virtio.driver_ok(),
        Err(TransportError::OutOfOrder {
            stage: InitStage::Failed,
            ..
        })
    ));

    // A reset leaves the failed stage; a cooperative device then accepts.
    device.with(|state| state.refuse_features_ok = false);
    virtio
        .begin(supported)
        .expect("after reset the sequence works");
    assert_eq!(virtio.stage(), InitStage::FeaturesOk);
}

#[test]
fn device_without_version_1_is_refused_and_failed() {
    let layout = Layout::transitional_net();
    let (config, device) = layout.build();
    let legacy_features = qemu_net_features() & !Features::VERSION_1.bits();
    device.with(|state| state.device_features = legacy_features);
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));
    assert_eq!(
        virtio.begin(u64::MAX),
        Err(TransportError::Version1NotOffered {
            device_features: legacy_features
        })
    );
    assert_eq!(virtio.stage(), InitStage::Failed);
    device.with(|state| {
        assert_ne!(state.status & DeviceStatus::FAILED.bits(), 0);
        assert_eq!(state.driver_features, [0, 0], "no features were written");
    });
}

#[test]
fn a_reset_that_never_completes_times_out_instead_of_hanging() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    device.with(|state| state.stuck_reset_status = Some(DeviceStatus::ACKNOWLEDGE.bits()));
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));
    assert_eq!(
        virtio.reset(),
        Err(TransportError::ResetTimeout {
            waited_us: RESET_TIMEOUT_US,
            status: DeviceStatus::ACKNOWLEDGE.bits()
        })
    );
    assert_eq!(virtio.stage(), InitStage::Unknown);
    device.with(|state| {
        assert_eq!(
            state.delayed_us,
            u64::from(RESET_TIMEOUT_US),
            "waited the whole bound, no more"
        );
    });
    assert!(matches!(
        virtio.acknowledge(),
        Err(TransportError::OutOfOrder { .. })
    ));
}

#[test]
fn device_needs_reset_is_detected() {
    let layout = Layout::modern_net();
    let (config, device) = layout.build();
    let mut virtio = VirtioDevice::new(open(&config, &device, &layout).expect("opens"));
    virtio.begin(0).expect("init");
    virtio.driver_ok().expect("live");
    assert!(!virtio.needs_reset());
    device.with(|state| state.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits());
    assert!(virtio.needs_reset());
    assert!(virtio.transport().read_status().needs_reset());
    virtio.reset().expect("reset clears it");
    assert!(!virtio.needs_reset());
}

#[test]
fn negotiation_is_the_intersection_plus_version_1_minus_what_the_transport_cannot_do() {
    let device = bits(&[
        Features::VERSION_1.bits(),
        Features::NOTIFICATION_DATA.bits(),
        Features::NOTIF_CONFIG_DATA.bits(),
        NetFeatures::MAC.bits(),
        NetFeatures::CSUM.bits(),
    ]);
    let driver = bits(&[
        Features::NOTIFICATION_DATA.bits(),
        NetFeatures::MAC.bits(),
        NetFeatures::MQ.bits(),
    ]);
    let negotiated = negotiate_features(device, driver).expect("VERSION_1 offered");
    assert_eq!(
        negotiated,
        bits(&[Features::VERSION_1.bits(), NetFeatures::MAC.bits()])
    );
    assert_eq!(negotiated & TRANSPORT_UNSUPPORTED_FEATURES, 0);
    assert_eq!(
        negotiated & !device,
        0,
        "never accepts a feature the device did not offer"
    );
    assert_eq!(
        negotiate_features(bits(&[NetFeatures::MAC.bits()]), u64::MAX),
        Err(TransportError::Version1NotOffered {
            device_features: bits(&[NetFeatures::MAC.bits()])
        })
    );
}

#[test]
fn status_displays_its_bits_by_name() {
    use crate::transport::DeviceStatus;
    assert_eq!(
        format!("{}", DeviceStatus::from_bits_retain(0x0f)),
        "0x0f (ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)"
    );
    assert_eq!(
        format!("{}", DeviceStatus::from_bits_retain(0x80)),
        "0x80 (FAILED)"
    );
    assert_eq!(format!("{}", DeviceStatus::from_bits_retain(0)), "0x00");
    assert_eq!(
        format!("{}", DeviceStatus::from_bits_retain(0x30)),
        "0x30",
        "unknown bits show only in the byte"
    );
}

#[test]
fn feature_names_come_from_the_flag_definitions_lowest_bit_first() {
    use crate::spec::{FeatureNames, Features, NetFeatures};
    let word = (NetFeatures::CSUM | NetFeatures::MAC | NetFeatures::SPEED_DUPLEX).bits()
        | (Features::VERSION_1 | Features::ACCESS_PLATFORM).bits()
        | 1 << 41
        | 1 << 4;
    assert_eq!(
        FeatureNames::<NetFeatures>::new(word).to_string(),
        "CSUM bit4 MAC VERSION_1 ACCESS_PLATFORM bit41 SPEED_DUPLEX"
    );
    assert_eq!(FeatureNames::<NetFeatures>::new(0).to_string(), "");
    // Bits in the range §6 reserves are never given a device type's name.
    assert_eq!(Features::RESERVED_RANGE.count_ones(), 18);
    assert_eq!(NetFeatures::all().bits() & Features::RESERVED_RANGE, 0);
    assert_eq!(Features::all().bits() & !Features::RESERVED_RANGE, 0);
}
