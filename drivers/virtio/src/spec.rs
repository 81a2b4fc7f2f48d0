//! Constants and wire layouts from the virtio 1.2 specification, and nothing else.
//!
//! This module owns the numbers, as constants and as `bitflags` sets: device status bits (§2.1), feature bits (§6 and §5.1.3), the
//! PCI identifiers (§4.1.2), the vendor capability layout and `cfg_type` values (§4.1.4), the
//! common configuration register block (§4.1.4.3) and the ISR bits (§4.1.4.5). Behaviour lives
//! in `transport` and `pci`. The `#[repr(C)]` structs are never overlaid on device memory (the
//! crate has no `unsafe`): they are the declarative source of the register offsets, which are
//! derived with `offset_of!` and checked at compile time against the spec's tables.

use core::fmt;
use core::mem::{offset_of, size_of};

/// PCI vendor id of every virtio device (§4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern (virtio 1.x only) PCI device ids are this plus the virtio device type (§4.1.2).
pub const MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Last modern PCI device id (§4.1.2: 0x1040 through 0x107f).
pub const MODERN_DEVICE_ID_LAST: u16 = 0x107f;
/// First transitional PCI device id; the device type is in the subsystem id (§4.1.2.3).
pub const TRANSITIONAL_DEVICE_ID_FIRST: u16 = 0x1000;
/// Last transitional PCI device id (§4.1.2.3).
pub const TRANSITIONAL_DEVICE_ID_LAST: u16 = 0x103f;

/// "No MSI-X vector": written to unmap an event, read back when the device refused a vector
/// (§4.1.4.3, §4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Largest queue size any virtqueue format allows (§2.6 split, §2.7 packed: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

bitflags::bitflags! {
    /// The device status byte (§2.1), its bits declared in the order of the §3.1.1
    /// initialization sequence (which is also the order [`fmt::Display`] names them in).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DeviceStatus: u8 {
        /// The guest OS has found the device and recognised it as a valid virtio device.
        const ACKNOWLEDGE = 1;
        /// The guest OS knows how to drive the device.
        const DRIVER = 2;
        /// The driver has acknowledged all the features it understands; negotiation is
        /// complete.
        const FEATURES_OK = 8;
        /// The driver is set up and ready to drive the device.
        const DRIVER_OK = 4;
        /// The device has experienced an error from which it cannot recover.
        const DEVICE_NEEDS_RESET = 64;
        /// Something went wrong in the guest and it has given up on the device.
        const FAILED = 128;
    }
}

impl DeviceStatus {
    /// DEVICE_NEEDS_RESET (§2.1.2): the device hit an error and must be reset.
    pub const fn needs_reset(self) -> bool {
        self.contains(Self::DEVICE_NEEDS_RESET)
    }
}

impl fmt::Display for DeviceStatus {
    /// `0x0f (ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)`: the byte, then the names of its set
    /// bits from the flag definitions (unknown bits show only in the byte).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}", self.bits())?;
        let mut separator = " (";
        for (name, _) in self.iter_names() {
            write!(f, "{separator}{name}")?;
            separator = "|";
        }
        if separator == "|" {
            f.write_str(")")?;
        }
        Ok(())
    }
}

bitflags::bitflags! {
    /// Device-independent feature bits (§6 "Reserved Feature Bits": bits 24 to 41 are for the
    /// queue and negotiation mechanisms, the rest belong to the device type).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// The driver can use descriptors with VIRTQ_DESC_F_INDIRECT (§2.6.5.3, §2.7.7).
        const INDIRECT_DESC = 1 << 28;
        /// Enables the used_event and avail_event fields (§2.6.7, §2.6.8).
        const EVENT_IDX = 1 << 29;
        /// Compliance with virtio 1.x; a modern transport requires it (§6.1).
        const VERSION_1 = 1 << 32;
        /// The device is behind an IOMMU or otherwise needs platform DMA translation (§6).
        const ACCESS_PLATFORM = 1 << 33;
        /// Support for the packed virtqueue layout (§2.7).
        const RING_PACKED = 1 << 34;
        /// The device uses buffers in the order in which they are made available (§6).
        const IN_ORDER = 1 << 35;
        /// Memory accesses by driver and device are ordered by the platform (§6).
        const ORDER_PLATFORM = 1 << 36;
        /// The device supports single root I/O virtualization (§6).
        const SR_IOV = 1 << 37;
        /// The driver passes extra data in its device notifications (§2.9).
        const NOTIFICATION_DATA = 1 << 38;
        /// The driver writes queue_notify_data instead of the queue index (§4.1.4.3).
        const NOTIF_CONFIG_DATA = 1 << 39;
        /// The driver can reset a queue individually (§2.6.1).
        const RING_RESET = 1 << 40;
    }
}

bitflags::bitflags! {
    /// virtio-net feature bits (§5.1.3); a net device's full feature word is these plus
    /// [`Features`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct NetFeatures: u64 {
        /// Device handles packets with partial checksum (checksum offload).
        const CSUM = 1 << 0;
        /// Driver handles packets with partial checksum.
        const GUEST_CSUM = 1 << 1;
        /// Control channel offloads reconfiguration support.
        const CTRL_GUEST_OFFLOADS = 1 << 2;
        /// Device maximum MTU reporting (`mtu` config field).
        const MTU = 1 << 3;
        /// Device has given a MAC address (`mac` config field).
        const MAC = 1 << 5;
        /// Driver can receive TSOv4.
        const GUEST_TSO4 = 1 << 7;
        /// Driver can receive TSOv6.
        const GUEST_TSO6 = 1 << 8;
        /// Driver can receive TSO with ECN.
        const GUEST_ECN = 1 << 9;
        /// Driver can receive UFO.
        const GUEST_UFO = 1 << 10;
        /// Device can receive TSOv4.
        const HOST_TSO4 = 1 << 11;
        /// Device can receive TSOv6.
        const HOST_TSO6 = 1 << 12;
        /// Device can receive TSO with ECN.
        const HOST_ECN = 1 << 13;
        /// Device can receive UFO.
        const HOST_UFO = 1 << 14;
        /// Driver can merge receive buffers (`num_buffers` header field).
        const MRG_RXBUF = 1 << 15;
        /// Configuration status field (link up, announce) is available.
        const STATUS = 1 << 16;
        /// Control channel is available.
        const CTRL_VQ = 1 << 17;
        /// Control channel RX mode support.
        const CTRL_RX = 1 << 18;
        /// Control channel VLAN filtering.
        const CTRL_VLAN = 1 << 19;
        /// Control channel RX extra mode support.
        const CTRL_RX_EXTRA = 1 << 20;
        /// Driver can send gratuitous packets.
        const GUEST_ANNOUNCE = 1 << 21;
        /// Device supports multiqueue with automatic receive steering.
        const MQ = 1 << 22;
        /// Set MAC address through the control channel.
        const CTRL_MAC_ADDR = 1 << 23;
        /// Device supports notification coalescing.
        const NOTF_COAL = 1 << 53;
        /// Driver can receive USOv4 packets.
        const GUEST_USO4 = 1 << 54;
        /// Driver can receive USOv6 packets.
        const GUEST_USO6 = 1 << 55;
        /// Device can receive USO packets.
        const HOST_USO = 1 << 56;
        /// Device can report per-packet hash value and type.
        const HASH_REPORT = 1 << 57;
        /// Driver can provide the exact `hdr_len` value.
        const GUEST_HDRLEN = 1 << 59;
        /// Device supports RSS (receive-side scaling).
        const RSS = 1 << 60;
        /// Device can process duplicated ACKs and report coalesced segments.
        const RSC_EXT = 1 << 61;
        /// Device may act as a standby for a primary device with the same MAC.
        const STANDBY = 1 << 62;
        /// Device reports speed and duplex.
        const SPEED_DUPLEX = 1 << 63;
    }
}

impl Features {
    /// The bits §6 reserves for the queue and feature negotiation mechanisms (24 to 41): a
    /// device type's own bits are the others.
    pub const RESERVED_RANGE: u64 = ((1u64 << 42) - 1) & !((1u64 << 24) - 1);
}

/// The names of the set bits of a device's 64-bit feature word, lowest bit first: the
/// device-independent ones from [`Features`], the device type's from `D` (e.g.
/// [`NetFeatures`]), any other as `bitN`. The names come from the flag definitions.
pub struct FeatureNames<D> {
    bits: u64,
    device: core::marker::PhantomData<D>,
}

impl<D> FeatureNames<D> {
    /// Names for `bits`.
    pub const fn new(bits: u64) -> Self {
        Self {
            bits,
            device: core::marker::PhantomData,
        }
    }
}

impl<D: bitflags::Flags<Bits = u64>> fmt::Display for FeatureNames<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generic = Features::from_bits_truncate(self.bits & Features::RESERVED_RANGE);
        let device = D::from_bits_truncate(self.bits & !Features::RESERVED_RANGE);
        let mut separator = "";
        for bit in 0..64 {
            let mask = 1u64 << bit;
            if self.bits & mask == 0 {
                continue;
            }
            let name = generic
                .iter_names()
                .map(|(name, flag)| (name, flag.bits()))
                .chain(device.iter_names().map(|(name, flag)| (name, flag.bits())))
                .find(|&(_, flag)| flag == mask)
                .map(|(name, _)| name);
            match name {
                Some(name) => write!(f, "{separator}{name}")?,
                None => write!(f, "{separator}bit{bit}")?,
            }
            separator = " ";
        }
        Ok(())
    }
}

/// Virtio device types (§5), as carried in the PCI device or subsystem id.
pub mod device_type {
    /// Network card (§5.1).
    pub const NET: u16 = 1;
    /// Block device (§5.2).
    pub const BLOCK: u16 = 2;
    /// Console (§5.3).
    pub const CONSOLE: u16 = 3;
    /// Entropy source (§5.4).
    pub const ENTROPY: u16 = 4;
    /// Traditional memory balloon (§5.5).
    pub const BALLOON: u16 = 5;
    /// SCSI host (§5.6).
    pub const SCSI: u16 = 8;
    /// GPU (§5.7).
    pub const GPU: u16 = 16;
    /// Input device (§5.8).
    pub const INPUT: u16 = 18;
    /// Socket device (§5.10).
    pub const VSOCK: u16 = 19;
}

/// `cfg_type` values of the virtio vendor capability (§4.1.4).
pub mod cfg_type {
    /// Common configuration (§4.1.4.3).
    pub const COMMON: u8 = 1;
    /// Notifications (§4.1.4.4).
    pub const NOTIFY: u8 = 2;
    /// ISR status (§4.1.4.5).
    pub const ISR: u8 = 3;
    /// Device-specific configuration (§4.1.4.6).
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window; this driver does not use it (§4.1.4).
    pub const PCI: u8 = 5;
    /// Shared memory region; this driver does not use it (§4.1.4).
    pub const SHARED_MEMORY: u8 = 8;
    /// Vendor-specific data; this driver does not use it (§4.1.4).
    pub const VENDOR: u8 = 9;
}

bitflags::bitflags! {
    /// The ISR status byte (§4.1.4.5), as returned by the read that cleared it.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct IsrStatus: u8 {
        /// A used buffer notification (queue interrupt) was pending.
        const QUEUE = 1;
        /// A configuration change notification was pending.
        const DEVICE_CONFIG = 2;
    }
}

impl IsrStatus {
    /// A used buffer notification (queue interrupt) was pending.
    pub const fn queue_interrupt(self) -> bool {
        self.contains(Self::QUEUE)
    }

    /// A configuration change notification was pending.
    pub const fn config_changed(self) -> bool {
        self.contains(Self::DEVICE_CONFIG)
    }
}

/// The virtio vendor capability in PCI configuration space, `struct virtio_pci_cap` (§4.1.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciCap {
    /// Generic PCI field: PCI_CAP_ID_VNDR, 0x09 (§4.1.4).
    pub cap_vndr: u8,
    /// Generic PCI field: next capability pointer (§4.1.4).
    pub cap_next: u8,
    /// Length of this capability structure, including this header (§4.1.4).
    pub cap_len: u8,
    /// Which structure this capability locates, a `cfg_type` value (§4.1.4).
    pub cfg_type: u8,
    /// Which BAR holds the structure, 0..=5; other values are reserved (§4.1.4).
    pub bar: u8,
    /// Identifies multiple capabilities of the same type (§4.1.4).
    pub id: u8,
    /// Pads to a full dword (§4.1.4).
    pub padding: [u8; 2],
    /// Offset of the structure within the BAR, little-endian (§4.1.4).
    pub offset: u32,
    /// Length of the structure in bytes, little-endian (§4.1.4).
    pub length: u32,
}

/// The notification capability, `struct virtio_pci_notify_cap` (§4.1.4.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciNotifyCap {
    /// The generic virtio capability header (§4.1.4).
    pub cap: VirtioPciCap,
    /// Multiplier for queue_notify_off, 0 (one shared doorbell) or an even power of 2
    /// (§4.1.4.4).
    pub notify_off_multiplier: u32,
}

/// Byte offsets of the fields of [`VirtioPciCap`] and [`VirtioPciNotifyCap`] in config space,
/// relative to the capability's first byte.
pub mod cap_offset {
    use super::{VirtioPciCap, VirtioPciNotifyCap};
    use core::mem::offset_of;

    /// `cap_len` (u8).
    pub const CAP_LEN: u16 = offset_of!(VirtioPciCap, cap_len) as u16;
    /// `cfg_type` (u8).
    pub const CFG_TYPE: u16 = offset_of!(VirtioPciCap, cfg_type) as u16;
    /// `bar` (u8).
    pub const BAR: u16 = offset_of!(VirtioPciCap, bar) as u16;
    /// `id` (u8).
    pub const ID: u16 = offset_of!(VirtioPciCap, id) as u16;
    /// `offset` (le32).
    pub const OFFSET: u16 = offset_of!(VirtioPciCap, offset) as u16;
    /// `length` (le32).
    pub const LENGTH: u16 = offset_of!(VirtioPciCap, length) as u16;
    /// `notify_off_multiplier` (le32), notification capability only.
    pub const NOTIFY_OFF_MULTIPLIER: u16 =
        offset_of!(VirtioPciNotifyCap, notify_off_multiplier) as u16;
}

const _: () = assert!(size_of::<VirtioPciCap>() == 16);
const _: () = assert!(offset_of!(VirtioPciCap, cap_len) == 2);
const _: () = assert!(offset_of!(VirtioPciCap, cfg_type) == 3);
const _: () = assert!(offset_of!(VirtioPciCap, bar) == 4);
const _: () = assert!(offset_of!(VirtioPciCap, id) == 5);
const _: () = assert!(offset_of!(VirtioPciCap, offset) == 8);
const _: () = assert!(offset_of!(VirtioPciCap, length) == 12);
const _: () = assert!(size_of::<VirtioPciNotifyCap>() == 20);
const _: () = assert!(offset_of!(VirtioPciNotifyCap, notify_off_multiplier) == 16);

/// The common configuration structure, `struct virtio_pci_common_cfg` (§4.1.4.3).
///
/// The 64-bit queue addresses are declared as two little-endian 32-bit halves, low first,
/// because that is how the driver accesses them (§4.1.3.1 allows it; QEMU decodes only 32-bit
/// accesses). The `queue_*` fields refer to the queue chosen by `queue_select`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommonCfg {
    /// le32, driver-written: selects which 32-bit half of `device_feature` reads (§4.1.4.3).
    pub device_feature_select: u32,
    /// le32, device-written: the device's feature bits selected above (§4.1.4.3).
    pub device_feature: u32,
    /// le32, driver-written: selects which 32-bit half of `driver_feature` writes (§4.1.4.3).
    pub driver_feature_select: u32,
    /// le32, driver-written: the accepted feature bits selected above (§4.1.4.3).
    pub driver_feature: u32,
    /// le16, MSI-X vector for configuration change notifications; NO_VECTOR if none (§4.1.4.3).
    pub config_msix_vector: u16,
    /// le16, device-written: the maximum number of virtqueues supported (§4.1.4.3).
    pub num_queues: u16,
    /// u8, the device status field (§2.1); writing 0 resets the device (§4.1.4.3).
    pub device_status: u8,
    /// u8, device-written: changes whenever the device configuration changes (§4.1.4.3).
    pub config_generation: u8,
    /// le16, driver-written: the queue the `queue_*` fields below refer to (§4.1.4.3).
    pub queue_select: u16,
    /// le16, reads the maximum queue size (0: unavailable); the driver may write a smaller one
    /// (§4.1.4.3).
    pub queue_size: u16,
    /// le16, MSI-X vector for this queue's notifications; NO_VECTOR if none (§4.1.4.3).
    pub queue_msix_vector: u16,
    /// le16, writing 1 enables the queue; reads whether it is enabled (§4.1.4.3).
    pub queue_enable: u16,
    /// le16, device-written: this queue's offset in the notification structure (§4.1.4.3).
    pub queue_notify_off: u16,
    /// le64, physical address of the descriptor area, as [low, high] halves (§4.1.4.3).
    pub queue_desc: [u32; 2],
    /// le64, physical address of the driver area (available ring), as [low, high] (§4.1.4.3).
    pub queue_driver: [u32; 2],
    /// le64, physical address of the device area (used ring), as [low, high] (§4.1.4.3).
    pub queue_device: [u32; 2],
    /// le16, device-written: data for notifications with VIRTIO_F_NOTIF_CONFIG_DATA
    /// (§4.1.4.3).
    pub queue_notify_data: u16,
    /// le16, writing 1 resets the queue with VIRTIO_F_RING_RESET (§4.1.4.3).
    pub queue_reset: u16,
}

/// Byte offsets of the [`CommonCfg`] registers within the common configuration region.
pub mod common_cfg {
    use super::CommonCfg;
    use core::mem::offset_of;

    /// `device_feature_select` (32 bits).
    pub const DEVICE_FEATURE_SELECT: u64 = offset_of!(CommonCfg, device_feature_select) as u64;
    /// `device_feature` (32 bits).
    pub const DEVICE_FEATURE: u64 = offset_of!(CommonCfg, device_feature) as u64;
    /// `driver_feature_select` (32 bits).
    pub const DRIVER_FEATURE_SELECT: u64 = offset_of!(CommonCfg, driver_feature_select) as u64;
    /// `driver_feature` (32 bits).
    pub const DRIVER_FEATURE: u64 = offset_of!(CommonCfg, driver_feature) as u64;
    /// `config_msix_vector` (16 bits).
    pub const CONFIG_MSIX_VECTOR: u64 = offset_of!(CommonCfg, config_msix_vector) as u64;
    /// `num_queues` (16 bits).
    pub const NUM_QUEUES: u64 = offset_of!(CommonCfg, num_queues) as u64;
    /// `device_status` (8 bits).
    pub const DEVICE_STATUS: u64 = offset_of!(CommonCfg, device_status) as u64;
    /// `config_generation` (8 bits).
    pub const CONFIG_GENERATION: u64 = offset_of!(CommonCfg, config_generation) as u64;
    /// `queue_select` (16 bits).
    pub const QUEUE_SELECT: u64 = offset_of!(CommonCfg, queue_select) as u64;
    /// `queue_size` (16 bits).
    pub const QUEUE_SIZE: u64 = offset_of!(CommonCfg, queue_size) as u64;
    /// `queue_msix_vector` (16 bits).
    pub const QUEUE_MSIX_VECTOR: u64 = offset_of!(CommonCfg, queue_msix_vector) as u64;
    /// `queue_enable` (16 bits).
    pub const QUEUE_ENABLE: u64 = offset_of!(CommonCfg, queue_enable) as u64;
    /// `queue_notify_off` (16 bits).
    pub const QUEUE_NOTIFY_OFF: u64 = offset_of!(CommonCfg, queue_notify_off) as u64;
    /// `queue_desc`, low half (32 bits); the high half follows at +4.
    pub const QUEUE_DESC: u64 = offset_of!(CommonCfg, queue_desc) as u64;
    /// `queue_driver`, low half (32 bits); the high half follows at +4.
    pub const QUEUE_DRIVER: u64 = offset_of!(CommonCfg, queue_driver) as u64;
    /// `queue_device`, low half (32 bits); the high half follows at +4.
    pub const QUEUE_DEVICE: u64 = offset_of!(CommonCfg, queue_device) as u64;
    /// `queue_notify_data` (16 bits).
    pub const QUEUE_NOTIFY_DATA: u64 = offset_of!(CommonCfg, queue_notify_data) as u64;
    /// `queue_reset` (16 bits).
    pub const QUEUE_RESET: u64 = offset_of!(CommonCfg, queue_reset) as u64;

    /// Length of the virtio 1.0 layout (through `queue_device`), which is all this driver
    /// touches; a common region shorter than this is unusable.
    pub const LEN_V1_0: u64 = QUEUE_NOTIFY_DATA;
}

const _: () = assert!(offset_of!(CommonCfg, device_feature_select) == 0x00);
const _: () = assert!(offset_of!(CommonCfg, device_feature) == 0x04);
const _: () = assert!(offset_of!(CommonCfg, driver_feature_select) == 0x08);
const _: () = assert!(offset_of!(CommonCfg, driver_feature) == 0x0c);
const _: () = assert!(offset_of!(CommonCfg, config_msix_vector) == 0x10);
const _: () = assert!(offset_of!(CommonCfg, num_queues) == 0x12);
const _: () = assert!(offset_of!(CommonCfg, device_status) == 0x14);
const _: () = assert!(offset_of!(CommonCfg, config_generation) == 0x15);
const _: () = assert!(offset_of!(CommonCfg, queue_select) == 0x16);
const _: () = assert!(offset_of!(CommonCfg, queue_size) == 0x18);
const _: () = assert!(offset_of!(CommonCfg, queue_msix_vector) == 0x1a);
const _: () = assert!(offset_of!(CommonCfg, queue_enable) == 0x1c);
const _: () = assert!(offset_of!(CommonCfg, queue_notify_off) == 0x1e);
const _: () = assert!(offset_of!(CommonCfg, queue_desc) == 0x20);
const _: () = assert!(offset_of!(CommonCfg, queue_driver) == 0x28);
const _: () = assert!(offset_of!(CommonCfg, queue_device) == 0x30);
const _: () = assert!(common_cfg::QUEUE_NOTIFY_DATA == 0x38);
const _: () = assert!(common_cfg::QUEUE_RESET == 0x3a);
const _: () = assert!(size_of::<CommonCfg>() == 0x3c);

/// The virtio-net device configuration layout, `struct virtio_net_config` (§5.1.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address, valid with VIRTIO_NET_F_MAC (§5.1.4).
    pub mac: [u8; 6],
    /// le16, VIRTIO_NET_S_LINK_UP (1) and VIRTIO_NET_S_ANNOUNCE (2), with VIRTIO_NET_F_STATUS
    /// (§5.1.4).
    pub status: u16,
    /// le16, maximum number of receive/transmit queue pairs, with VIRTIO_NET_F_MQ (§5.1.4).
    pub max_virtqueue_pairs: u16,
    /// le16, maximum MTU the driver should use, with VIRTIO_NET_F_MTU (§5.1.4).
    pub mtu: u16,
    /// le32, link speed in Mbit/s, with VIRTIO_NET_F_SPEED_DUPLEX (§5.1.4).
    pub speed: u32,
    /// u8, 0x00 half duplex, 0x01 full duplex, with VIRTIO_NET_F_SPEED_DUPLEX (§5.1.4).
    pub duplex: u8,
}

/// Byte offsets of the [`NetConfig`] fields within the device configuration region.
pub mod net_config {
    use super::NetConfig;
    use core::mem::offset_of;

    /// `mac` (6 bytes).
    pub const MAC: u32 = offset_of!(NetConfig, mac) as u32;
    /// `status` (16 bits).
    pub const STATUS: u32 = offset_of!(NetConfig, status) as u32;
    /// `max_virtqueue_pairs` (16 bits).
    pub const MAX_VIRTQUEUE_PAIRS: u32 = offset_of!(NetConfig, max_virtqueue_pairs) as u32;
    /// `mtu` (16 bits).
    pub const MTU: u32 = offset_of!(NetConfig, mtu) as u32;
    /// `speed` (32 bits).
    pub const SPEED: u32 = offset_of!(NetConfig, speed) as u32;
    /// `duplex` (8 bits).
    pub const DUPLEX: u32 = offset_of!(NetConfig, duplex) as u32;
    /// Link status bit of `status` (§5.1.4).
    pub const STATUS_LINK_UP: u16 = 1;
    /// Announce-request bit of `status` (§5.1.4).
    pub const STATUS_ANNOUNCE: u16 = 2;
}

/// The header in front of every virtio-net packet, `struct virtio_net_hdr` with VERSION_1
/// (§5.1.6: `num_buffers` is always present, so it is 12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM (1), VIRTIO_NET_HDR_F_DATA_VALID (2) (§5.1.6).
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_NONE (0) and the segmentation types (§5.1.6).
    pub gso_type: u8,
    /// le16, length of the headers to copy for segmentation (§5.1.6.2).
    pub hdr_len: u16,
    /// le16, segment size for segmentation (§5.1.6.2).
    pub gso_size: u16,
    /// le16, where the checksum starts, from the start of the frame (§5.1.6.2).
    pub csum_start: u16,
    /// le16, where the checksum goes, from `csum_start` (§5.1.6.2).
    pub csum_offset: u16,
    /// le16, receive buffers the packet spans, with VIRTIO_NET_F_MRG_RXBUF (§5.1.6.4).
    pub num_buffers: u16,
}

/// Byte offsets of the [`VirtioNetHdr`] fields, and its length.
pub mod net_hdr {
    use super::VirtioNetHdr;
    use core::mem::{offset_of, size_of};

    /// `flags`.
    pub const FLAGS: usize = offset_of!(VirtioNetHdr, flags);
    /// `gso_type`.
    pub const GSO_TYPE: usize = offset_of!(VirtioNetHdr, gso_type);
    /// `hdr_len`.
    pub const HDR_LEN: usize = offset_of!(VirtioNetHdr, hdr_len);
    /// `gso_size`.
    pub const GSO_SIZE: usize = offset_of!(VirtioNetHdr, gso_size);
    /// `csum_start`.
    pub const CSUM_START: usize = offset_of!(VirtioNetHdr, csum_start);
    /// `csum_offset`.
    pub const CSUM_OFFSET: usize = offset_of!(VirtioNetHdr, csum_offset);
    /// `num_buffers`.
    pub const NUM_BUFFERS: usize = offset_of!(VirtioNetHdr, num_buffers);
    /// The whole header.
    pub const LEN: usize = size_of::<VirtioNetHdr>();
    /// `flags`: the checksum from `csum_start` to the end must be completed (§5.1.6.2).
    pub const F_NEEDS_CSUM: u8 = 1;
    /// `flags`: the device validated the packet's checksum (§5.1.6.4).
    pub const F_DATA_VALID: u8 = 2;
    /// `gso_type`: no segmentation.
    pub const GSO_NONE: u8 = 0;
}

// §5.1.6's layout, checked against the declaration.
const _: () = assert!(net_hdr::FLAGS == 0);
const _: () = assert!(net_hdr::GSO_TYPE == 1);
const _: () = assert!(net_hdr::HDR_LEN == 2);
const _: () = assert!(net_hdr::GSO_SIZE == 4);
const _: () = assert!(net_hdr::CSUM_START == 6);
const _: () = assert!(net_hdr::CSUM_OFFSET == 8);
const _: () = assert!(net_hdr::NUM_BUFFERS == 10);
const _: () = assert!(net_hdr::LEN == 12);

const _: () = assert!(net_config::MAC == 0);
const _: () = assert!(net_config::STATUS == 6);
const _: () = assert!(net_config::MAX_VIRTQUEUE_PAIRS == 8);
const _: () = assert!(net_config::MTU == 10);
const _: () = assert!(net_config::SPEED == 12);
const _: () = assert!(net_config::DUPLEX == 16);

// ---------------------------------------------------------------------------------------------
// Block device (§5.2)

bitflags::bitflags! {
    /// virtio-blk feature bits (§5.2.3); a block device's full feature word is these plus
    /// [`Features`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct BlkFeatures: u64 {
        /// Maximum size of any single segment is in `size_max`.
        const SIZE_MAX = 1 << 1;
        /// Maximum number of segments in a request is in `seg_max`.
        const SEG_MAX = 1 << 2;
        /// Disk-style geometry is in `geometry`.
        const GEOMETRY = 1 << 4;
        /// The device is read-only.
        const RO = 1 << 5;
        /// Block size of the disk is in `blk_size`.
        const BLK_SIZE = 1 << 6;
        /// Cache flush command support.
        const FLUSH = 1 << 9;
        /// Device exports information on optimal I/O alignment (`topology`).
        const TOPOLOGY = 1 << 10;
        /// The device can toggle its cache between writeback and writethrough modes.
        const CONFIG_WCE = 1 << 11;
        /// The device supports multiqueue (`num_queues`).
        const MQ = 1 << 12;
        /// The device can support the discard command.
        const DISCARD = 1 << 13;
        /// The device can support the write zeroes command.
        const WRITE_ZEROES = 1 << 14;
        /// The device supports providing storage lifetime information.
        const LIFETIME = 1 << 15;
        /// The device supports the secure erase command.
        const SECURE_ERASE = 1 << 16;
        /// The device is a zoned block device.
        const ZONED = 1 << 17;
    }
}

/// The virtio-blk device configuration layout, `struct virtio_blk_config` (§5.2.4), through
/// `unused1`: the fields this driver reads. `geometry` and `topology` are flattened into their
/// members. Never overlaid on device memory; the offsets in [`blk_config`] come from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// le64, capacity in 512-byte sectors, whatever `blk_size` is (§5.2.4).
    pub capacity: u64,
    /// le32, largest size of any single segment, with VIRTIO_BLK_F_SIZE_MAX (§5.2.4).
    pub size_max: u32,
    /// le32, largest number of segments in a request, with VIRTIO_BLK_F_SEG_MAX (§5.2.4).
    pub seg_max: u32,
    /// le16, `geometry.cylinders`, with VIRTIO_BLK_F_GEOMETRY (§5.2.4).
    pub cylinders: u16,
    /// u8, `geometry.heads` (§5.2.4).
    pub heads: u8,
    /// u8, `geometry.sectors` (§5.2.4).
    pub sectors: u8,
    /// le32, the block size in bytes, with VIRTIO_BLK_F_BLK_SIZE (§5.2.4).
    pub blk_size: u32,
    /// u8, `topology.physical_block_exp`: logical blocks per physical block, log2 (§5.2.4).
    pub physical_block_exp: u8,
    /// u8, `topology.alignment_offset`: offset of the first aligned logical block (§5.2.4).
    pub alignment_offset: u8,
    /// le16, `topology.min_io_size`: suggested minimum I/O size in blocks (§5.2.4).
    pub min_io_size: u16,
    /// le32, `topology.opt_io_size`: optimal (suggested maximum) I/O size in blocks (§5.2.4).
    pub opt_io_size: u32,
    /// u8, the cache mode with VIRTIO_BLK_F_CONFIG_WCE: 0 writethrough, 1 writeback (§5.2.4).
    pub writeback: u8,
    /// u8, reserved (§5.2.4).
    pub unused0: u8,
    /// le16, number of request queues, with VIRTIO_BLK_F_MQ (§5.2.4).
    pub num_queues: u16,
    /// le32, largest discard sectors per segment, with VIRTIO_BLK_F_DISCARD (§5.2.4).
    pub max_discard_sectors: u32,
    /// le32, largest number of discard segments in one command (§5.2.4).
    pub max_discard_seg: u32,
    /// le32, discard alignment hint, in sectors (§5.2.4).
    pub discard_sector_alignment: u32,
    /// le32, largest write-zeroes sectors per segment, with VIRTIO_BLK_F_WRITE_ZEROES (§5.2.4).
    pub max_write_zeroes_sectors: u32,
    /// le32, largest number of write-zeroes segments in one command (§5.2.4).
    pub max_write_zeroes_seg: u32,
    /// u8, whether write zeroes with the unmap flag may deallocate (§5.2.4).
    pub write_zeroes_may_unmap: u8,
    /// u8 × 3, reserved (§5.2.4).
    pub unused1: [u8; 3],
}

/// Byte offsets of the [`BlkConfig`] fields within the device configuration region.
pub mod blk_config {
    use super::BlkConfig;
    use core::mem::offset_of;

    /// `capacity` (64 bits).
    pub const CAPACITY: u32 = offset_of!(BlkConfig, capacity) as u32;
    /// `size_max` (32 bits).
    pub const SIZE_MAX: u32 = offset_of!(BlkConfig, size_max) as u32;
    /// `seg_max` (32 bits).
    pub const SEG_MAX: u32 = offset_of!(BlkConfig, seg_max) as u32;
    /// `geometry.cylinders` (16 bits).
    pub const CYLINDERS: u32 = offset_of!(BlkConfig, cylinders) as u32;
    /// `geometry.heads` (8 bits).
    pub const HEADS: u32 = offset_of!(BlkConfig, heads) as u32;
    /// `geometry.sectors` (8 bits).
    pub const SECTORS: u32 = offset_of!(BlkConfig, sectors) as u32;
    /// `blk_size` (32 bits).
    pub const BLK_SIZE: u32 = offset_of!(BlkConfig, blk_size) as u32;
    /// `topology.physical_block_exp` (8 bits).
    pub const PHYSICAL_BLOCK_EXP: u32 = offset_of!(BlkConfig, physical_block_exp) as u32;
    /// `topology.alignment_offset` (8 bits).
    pub const ALIGNMENT_OFFSET: u32 = offset_of!(BlkConfig, alignment_offset) as u32;
    /// `topology.min_io_size` (16 bits).
    pub const MIN_IO_SIZE: u32 = offset_of!(BlkConfig, min_io_size) as u32;
    /// `topology.opt_io_size` (32 bits).
    pub const OPT_IO_SIZE: u32 = offset_of!(BlkConfig, opt_io_size) as u32;
    /// `writeback` (8 bits).
    pub const WRITEBACK: u32 = offset_of!(BlkConfig, writeback) as u32;
    /// `num_queues` (16 bits).
    pub const NUM_QUEUES: u32 = offset_of!(BlkConfig, num_queues) as u32;
    /// `max_discard_sectors` (32 bits).
    pub const MAX_DISCARD_SECTORS: u32 = offset_of!(BlkConfig, max_discard_sectors) as u32;
    /// `max_discard_seg` (32 bits).
    pub const MAX_DISCARD_SEG: u32 = offset_of!(BlkConfig, max_discard_seg) as u32;
    /// `discard_sector_alignment` (32 bits).
    pub const DISCARD_SECTOR_ALIGNMENT: u32 =
        offset_of!(BlkConfig, discard_sector_alignment) as u32;
    /// `max_write_zeroes_sectors` (32 bits).
    pub const MAX_WRITE_ZEROES_SECTORS: u32 =
        offset_of!(BlkConfig, max_write_zeroes_sectors) as u32;
    /// `max_write_zeroes_seg` (32 bits).
    pub const MAX_WRITE_ZEROES_SEG: u32 = offset_of!(BlkConfig, max_write_zeroes_seg) as u32;
    /// `write_zeroes_may_unmap` (8 bits).
    pub const WRITE_ZEROES_MAY_UNMAP: u32 = offset_of!(BlkConfig, write_zeroes_may_unmap) as u32;
    /// Length of the layout through `unused1`.
    pub const LEN: u32 = offset_of!(BlkConfig, unused1) as u32 + 3;
}

const _: () = assert!(blk_config::CAPACITY == 0);
const _: () = assert!(blk_config::SIZE_MAX == 8);
const _: () = assert!(blk_config::SEG_MAX == 12);
const _: () = assert!(blk_config::CYLINDERS == 16);
const _: () = assert!(blk_config::HEADS == 18);
const _: () = assert!(blk_config::SECTORS == 19);
const _: () = assert!(blk_config::BLK_SIZE == 20);
const _: () = assert!(blk_config::PHYSICAL_BLOCK_EXP == 24);
const _: () = assert!(blk_config::ALIGNMENT_OFFSET == 25);
const _: () = assert!(blk_config::MIN_IO_SIZE == 26);
const _: () = assert!(blk_config::OPT_IO_SIZE == 28);
const _: () = assert!(blk_config::WRITEBACK == 32);
const _: () = assert!(blk_config::NUM_QUEUES == 34);
const _: () = assert!(blk_config::MAX_DISCARD_SECTORS == 36);
const _: () = assert!(blk_config::MAX_DISCARD_SEG == 40);
const _: () = assert!(blk_config::DISCARD_SECTOR_ALIGNMENT == 44);
const _: () = assert!(blk_config::MAX_WRITE_ZEROES_SECTORS == 48);
const _: () = assert!(blk_config::MAX_WRITE_ZEROES_SEG == 52);
const _: () = assert!(blk_config::WRITE_ZEROES_MAY_UNMAP == 56);
const _: () = assert!(blk_config::LEN == 60);

/// The device-readable header of every block request, `struct virtio_blk_req` up to `data`
/// (§5.2.6): `type`, `reserved`, `sector`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkReqHeader {
    /// le32, the request type, a [`blk_req`] `T_*` value (§5.2.6).
    pub request_type: u32,
    /// le32, reserved, 0 (§5.2.6).
    pub reserved: u32,
    /// le64, the first 512-byte sector of a read or write; 0 for the others (§5.2.6.1).
    pub sector: u64,
}

/// One segment of a discard or write-zeroes command,
/// `struct virtio_blk_discard_write_zeroes` (§5.2.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkDiscardWriteZeroes {
    /// le64, first sector (512 bytes) of the range (§5.2.6).
    pub sector: u64,
    /// le32, number of sectors in the range (§5.2.6).
    pub num_sectors: u32,
    /// le32, bit 0 `unmap` (write zeroes only); the other bits reserved (§5.2.6).
    pub flags: u32,
}

/// Request types, status values and the request layouts' offsets (§5.2.6).
pub mod blk_req {
    use super::{BlkDiscardWriteZeroes, BlkReqHeader};
    use core::mem::{offset_of, size_of};

    /// VIRTIO_BLK_T_IN: read.
    pub const T_IN: u32 = 0;
    /// VIRTIO_BLK_T_OUT: write.
    pub const T_OUT: u32 = 1;
    /// VIRTIO_BLK_T_FLUSH: flush the write cache (VIRTIO_BLK_F_FLUSH).
    pub const T_FLUSH: u32 = 4;
    /// VIRTIO_BLK_T_GET_ID: the device id string, [`ID_BYTES`] bytes.
    pub const T_GET_ID: u32 = 8;
    /// VIRTIO_BLK_T_DISCARD (VIRTIO_BLK_F_DISCARD).
    pub const T_DISCARD: u32 = 11;
    /// VIRTIO_BLK_T_WRITE_ZEROES (VIRTIO_BLK_F_WRITE_ZEROES).
    pub const T_WRITE_ZEROES: u32 = 13;

    /// VIRTIO_BLK_S_OK.
    pub const S_OK: u8 = 0;
    /// VIRTIO_BLK_S_IOERR.
    pub const S_IOERR: u8 = 1;
    /// VIRTIO_BLK_S_UNSUPP.
    pub const S_UNSUPP: u8 = 2;

    /// The unit of `sector` and `capacity`, whatever `blk_size` is (§5.2.4, §5.2.6).
    pub const SECTOR_SIZE: u32 = 512;
    /// Length of the GET_ID answer; a shorter id is NUL-terminated (§5.2.6).
    pub const ID_BYTES: usize = 20;

    /// `type` in the header.
    pub const HEADER_TYPE: usize = offset_of!(BlkReqHeader, request_type);
    /// `reserved` in the header.
    pub const HEADER_RESERVED: usize = offset_of!(BlkReqHeader, reserved);
    /// `sector` in the header.
    pub const HEADER_SECTOR: usize = offset_of!(BlkReqHeader, sector);
    /// The header's length.
    pub const HEADER_LEN: usize = size_of::<BlkReqHeader>();

    /// `sector` in a discard/write-zeroes segment.
    pub const SEGMENT_SECTOR: usize = offset_of!(BlkDiscardWriteZeroes, sector);
    /// `num_sectors` in a discard/write-zeroes segment.
    pub const SEGMENT_NUM_SECTORS: usize = offset_of!(BlkDiscardWriteZeroes, num_sectors);
    /// `flags` in a discard/write-zeroes segment.
    pub const SEGMENT_FLAGS: usize = offset_of!(BlkDiscardWriteZeroes, flags);
    /// A discard/write-zeroes segment's length.
    pub const SEGMENT_LEN: usize = size_of::<BlkDiscardWriteZeroes>();
    /// `flags` bit 0: unmap (write zeroes only).
    pub const SEGMENT_F_UNMAP: u32 = 1;
}

const _: () = assert!(blk_req::HEADER_TYPE == 0);
const _: () = assert!(blk_req::HEADER_RESERVED == 4);
const _: () = assert!(blk_req::HEADER_SECTOR == 8);
const _: () = assert!(blk_req::HEADER_LEN == 16);
const _: () = assert!(blk_req::SEGMENT_SECTOR == 0);
const _: () = assert!(blk_req::SEGMENT_NUM_SECTORS == 8);
const _: () = assert!(blk_req::SEGMENT_FLAGS == 12);
const _: () = assert!(blk_req::SEGMENT_LEN == 16);

// ---------------------------------------------------------------------------------------------
// The entropy device (§5.4)

/// The virtio entropy device (§5.4): one request queue, no feature bits of its own (§5.4.3)
/// and no device configuration (§5.4.4).
pub mod rng {
    /// `requestq`, the only queue (§5.4.2): the driver posts device-writable buffers and the
    /// device fills some bytes of each with entropy (§5.4.6).
    pub const REQUEST_QUEUE: u16 = 0;
    /// Queues the device has (§5.4.2).
    pub const QUEUE_COUNT: u16 = 1;
    /// The modern PCI device id: [`super::MODERN_DEVICE_ID_BASE`] plus device type 4
    /// (§4.1.2).
    pub const PCI_DEVICE_ID: u16 = super::MODERN_DEVICE_ID_BASE + super::device_type::ENTROPY;
}

const _: () = assert!(rng::PCI_DEVICE_ID == 0x1044);
