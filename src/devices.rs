//! Finding and bringing up virtio devices: every virtio function is identified and logged;
//! the first virtio-net device is initialised through the modern PCI transport (§3.1.1 and
//! §4.1); everything else is reported and left alone.

use alloc::string::String;
use core::fmt::Write;

use ::pci::{Function, PciAddress};
use virtio::pci::{DeviceConfigRequirement, PciTransport, identify};
use virtio::spec::{feature, net_feature};
use virtio::transport::{DeviceType, Transport, VirtioDevice};

use crate::hal::KernelHal;
use crate::pci::PlatformConfig;

/// Features this build of the net driver can use (5.1.3): the ones it reads and honours.
pub fn net_driver_features() -> u64 {
    [
        feature::VERSION_1,
        net_feature::MAC,
        net_feature::STATUS,
        net_feature::MTU,
    ]
    .into_iter()
    .fold(0, |bits, number| bits | feature::bit(number))
}

const FEATURE_NAMES: &[(u32, &str)] = &[
    (net_feature::CSUM, "CSUM"),
    (net_feature::GUEST_CSUM, "GUEST_CSUM"),
    (net_feature::CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
    (net_feature::MTU, "MTU"),
    (net_feature::MAC, "MAC"),
    (net_feature::GUEST_TSO4, "GUEST_TSO4"),
    (net_feature::GUEST_TSO6, "GUEST_TSO6"),
    (net_feature::GUEST_ECN, "GUEST_ECN"),
    (net_feature::GUEST_UFO, "GUEST_UFO"),
    (net_feature::HOST_TSO4, "HOST_TSO4"),
    (net_feature::HOST_TSO6, "HOST_TSO6"),
    (net_feature::HOST_ECN, "HOST_ECN"),
    (net_feature::HOST_UFO, "HOST_UFO"),
    (net_feature::MRG_RXBUF, "MRG_RXBUF"),
    (net_feature::STATUS, "STATUS"),
    (net_feature::CTRL_VQ, "CTRL_VQ"),
    (net_feature::CTRL_RX, "CTRL_RX"),
    (net_feature::CTRL_VLAN, "CTRL_VLAN"),
    (net_feature::CTRL_RX_EXTRA, "CTRL_RX_EXTRA"),
    (net_feature::GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
    (net_feature::MQ, "MQ"),
    (net_feature::CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
    (feature::INDIRECT_DESC, "INDIRECT_DESC"),
    (feature::EVENT_IDX, "EVENT_IDX"),
    (feature::VERSION_1, "VERSION_1"),
    (feature::ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (feature::RING_PACKED, "RING_PACKED"),
    (feature::IN_ORDER, "IN_ORDER"),
    (feature::ORDER_PLATFORM, "ORDER_PLATFORM"),
    (feature::NOTIFICATION_DATA, "NOTIFICATION_DATA"),
    (feature::RING_RESET, "RING_RESET"),
    (net_feature::NOTF_COAL, "NOTF_COAL"),
    (net_feature::HASH_REPORT, "HASH_REPORT"),
    (net_feature::RSS, "RSS"),
    (net_feature::SPEED_DUPLEX, "SPEED_DUPLEX"),
];

/// Names of the set feature bits of a net device, unknown ones as `bit N`.
pub fn net_feature_names(bits: u64) -> String {
    let mut names = String::new();
    for number in 0..64 {
        if bits & (1 << number) == 0 {
            continue;
        }
        if !names.is_empty() {
            names.push(' ');
        }
        match FEATURE_NAMES.iter().find(|(known, _)| *known == number) {
            Some((_, name)) => names.push_str(name),
            None => {
                let _ = write!(names, "bit{number}");
            }
        }
    }
    names
}

/// A virtio-net device after feature negotiation.
pub struct NetDevice {
    /// Its PCI function.
    pub function: Function,
    /// The device, at FEATURES_OK.
    pub device: VirtioDevice<PciTransport<KernelHal>>,
    /// Features the device offered.
    pub offered: u64,
    /// The MAC address from device config (or all zeros without VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
}

/// Why the net device could not be brought up.
#[derive(Debug)]
pub enum BringUpError {
    /// No virtio-net function on any bus.
    NotFound {
        /// Functions scanned.
        scanned: usize,
    },
    /// Discovery (capabilities) failed.
    Discovery(PciAddress, virtio::error::DiscoveryError),
    /// The initialization sequence failed.
    Transport(PciAddress, virtio::error::TransportError),
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotFound { scanned } => {
                write!(
                    f,
                    "no virtio-net device found ({scanned} PCI functions scanned)"
                )
            }
            Self::Discovery(address, error) => write!(f, "virtio-net at {address}: {error}"),
            Self::Transport(address, error) => write!(f, "virtio-net at {address}: {error}"),
        }
    }
}

/// Identifies every virtio function, then initialises the first virtio-net one up to
/// FEATURES_OK and reads its MAC. Other virtio-net devices and other device types are logged
/// and left alone.
pub fn bring_up_net(
    config: &PlatformConfig,
    functions: &[Function],
) -> Result<NetDevice, BringUpError> {
    let mut chosen: Option<&Function> = None;
    for function in functions
        .iter()
        .filter(|function| function.vendor_id == virtio::spec::VIRTIO_PCI_VENDOR_ID)
    {
        match identify(config, function.address) {
            Ok(id) if id.device_type == DeviceType::NET && chosen.is_none() => {
                log::info!("virtio: {} {id}: driving it", function.address);
                chosen = Some(function);
            }
            Ok(id) if id.device_type == DeviceType::NET => {
                log::info!(
                    "virtio: {} {id}: another virtio-net device, left alone",
                    function.address
                );
            }
            Ok(id) => log::info!(
                "virtio: {} {id}: no driver for this type, left alone",
                function.address
            ),
            Err(error) => log::warn!("virtio: {}: {error}; left alone", function.address),
        }
    }
    let function = *chosen.ok_or(BringUpError::NotFound {
        scanned: functions.len(),
    })?;
    let address = function.address;

    // Decoding and bus mastering only on the device Vireo drives.
    ::pci::enable_memory_space(config, address);
    if function
        .bars
        .iter()
        .flatten()
        .any(|bar| matches!(bar, ::pci::Bar::Io { .. }))
    {
        ::pci::enable_io_space(config, address);
    }
    ::pci::enable_bus_mastering(config, address);

    let transport = PciTransport::new(
        KernelHal,
        config,
        address,
        &function.bars,
        DeviceConfigRequirement::Required,
    )
    .map_err(|error| BringUpError::Discovery(address, error))?;
    for line in alloc::format!("{}", transport.capabilities()).lines() {
        log::info!("virtio-net: {line}");
    }
    let mut device = VirtioDevice::new(transport);
    let offered = device.transport_mut().read_device_features();
    let negotiated = device
        .begin(net_driver_features())
        .map_err(|error| BringUpError::Transport(address, error))?;
    log::info!(
        "virtio-net: offered features {offered:#018x}: {}",
        net_feature_names(offered)
    );
    log::info!(
        "virtio-net: negotiated features {negotiated:#018x}: {}",
        net_feature_names(negotiated)
    );

    let mut mac = [0u8; 6];
    if device.has_feature(net_feature::MAC) {
        device
            .transport()
            .read_config_bytes(0, &mut mac)
            .map_err(|error| BringUpError::Transport(address, error))?;
    }
    Ok(NetDevice {
        function,
        device,
        offered,
        mac,
    })
}
