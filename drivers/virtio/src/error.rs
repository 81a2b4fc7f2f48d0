//! The crate's typed errors: one `Copy` enum per layer, each variant carrying the numbers that
//! explain it, each with a `Display` fit for the serial console.
//!
//! * [`DiscoveryError`]: identifying a virtio PCI function and validating its vendor
//!   capabilities (§4.1.2, §4.1.4); everything in it came from device-controlled config space.
//! * [`TransportError`]: operating the transport (§3.1 initialization, §4.1.5 queues,
//!   notifications and configuration reads).

use core::fmt;

use pci::CapabilityError;

use crate::hal::HalError;
use crate::transport::{InitStage, InitStep};

/// The four virtio structures a PCI transport locates through vendor capabilities (§4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StructureKind {
    /// Common configuration, `cfg_type` 1 (§4.1.4.3).
    Common,
    /// Notifications, `cfg_type` 2 (§4.1.4.4).
    Notify,
    /// ISR status, `cfg_type` 3 (§4.1.4.5).
    Isr,
    /// Device-specific configuration, `cfg_type` 4 (§4.1.4.6).
    Device,
}

impl StructureKind {
    /// The `cfg_type` value of this structure (§4.1.4).
    pub const fn cfg_type(self) -> u8 {
        match self {
            Self::Common => crate::spec::cfg_type::COMMON,
            Self::Notify => crate::spec::cfg_type::NOTIFY,
            Self::Isr => crate::spec::cfg_type::ISR,
            Self::Device => crate::spec::cfg_type::DEVICE,
        }
    }

    /// The structure a `cfg_type` value locates, if this driver uses it.
    pub const fn from_cfg_type(cfg_type: u8) -> Option<Self> {
        match cfg_type {
            crate::spec::cfg_type::COMMON => Some(Self::Common),
            crate::spec::cfg_type::NOTIFY => Some(Self::Notify),
            crate::spec::cfg_type::ISR => Some(Self::Isr),
            crate::spec::cfg_type::DEVICE => Some(Self::Device),
            _ => None,
        }
    }
}

impl fmt::Display for StructureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Common => "common config",
            Self::Notify => "notify",
            Self::Isr => "ISR",
            Self::Device => "device config",
        })
    }
}

/// Why a PCI function cannot be driven through the modern virtio PCI transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryError {
    /// The vendor id is not 0x1af4 (§4.1.2).
    NotVirtio {
        /// Vendor id read.
        vendor: u16,
        /// Device id read.
        device: u16,
    },
    /// Vendor 0x1af4 but a device id outside 0x1000..=0x103f and 0x1040..=0x107f (§4.1.2).
    UnknownDeviceId {
        /// Device id read.
        device: u16,
    },
    /// The function has no virtio structure capabilities: a legacy (virtio 0.9) device, which
    /// this driver does not support.
    LegacyOnly {
        /// Device id read.
        device: u16,
    },
    /// The capability list itself is malformed (loop, pointer into the header).
    CapabilityList(CapabilityError),
    /// A required structure has no capability at all (§4.1.4.2).
    MissingCapability(StructureKind),
    /// A capability's `cap_len` is too short for its structure (16, or 20 for notify).
    CapTooShort {
        /// Structure the capability describes.
        kind: StructureKind,
        /// Offset of the capability in config space.
        at: u16,
        /// `cap_len` read.
        cap_len: u8,
        /// Minimum length for this structure.
        required: u8,
    },
    /// A capability extends past the 256-byte configuration space.
    CapBeyondConfigSpace {
        /// Structure the capability describes.
        kind: StructureKind,
        /// Offset of the capability in config space.
        at: u16,
        /// Length it needs.
        len: u8,
    },
    /// The `bar` field is reserved (6..=255); §4.1.4.1 says to ignore such a capability.
    BadBarIndex {
        /// Structure the capability describes.
        kind: StructureKind,
        /// `bar` read.
        bar: u8,
    },
    /// The `bar` field names a BAR slot that is unimplemented (or the upper half of a 64-bit
    /// BAR).
    BarAbsent {
        /// Structure the capability describes.
        kind: StructureKind,
        /// BAR index.
        bar: u8,
    },
    /// The BAR is I/O space but the structure must be memory-mapped (only notify may use I/O).
    WrongBarKind {
        /// Structure the capability describes.
        kind: StructureKind,
        /// BAR index.
        bar: u8,
    },
    /// `offset + length` does not fit in the BAR.
    RegionOutsideBar {
        /// Structure the capability describes.
        kind: StructureKind,
        /// BAR index.
        bar: u8,
        /// `offset` read.
        offset: u32,
        /// `length` read.
        length: u32,
        /// Size of the BAR.
        bar_size: u64,
    },
    /// `offset` is not aligned as the structure requires (§4.1.4.3, §4.1.4.4, §4.1.4.6).
    Misaligned {
        /// Structure the capability describes.
        kind: StructureKind,
        /// `offset` read.
        offset: u32,
        /// Required alignment in bytes.
        alignment: u32,
    },
    /// `length` is smaller than the registers the driver must access.
    RegionTooSmall {
        /// Structure the capability describes.
        kind: StructureKind,
        /// `length` read.
        length: u32,
        /// Minimum length.
        required: u32,
    },
    /// `notify_off_multiplier` is odd, so doorbells would be misaligned (§4.1.4.4: 0 or an
    /// even power of two).
    BadNotifyMultiplier {
        /// Multiplier read.
        multiplier: u32,
    },
    /// An I/O-space notify region does not fit in the 16-bit x86 port space.
    PortOutOfRange {
        /// First port of the region.
        port: u32,
        /// Length of the region.
        length: u32,
    },
    /// The platform could not map a region.
    Map(HalError),
}

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotVirtio { vendor, device } => {
                write!(f, "{vendor:04x}:{device:04x} is not a virtio device")
            }
            Self::UnknownDeviceId { device } => {
                write!(
                    f,
                    "virtio device id {device:#06x} is neither modern nor transitional"
                )
            }
            Self::LegacyOnly { device } => write!(
                f,
                "device {device:#06x} has no virtio 1.x capabilities: legacy-only device, not supported"
            ),
            Self::CapabilityList(error) => write!(f, "malformed capability list: {error}"),
            Self::MissingCapability(kind) => write!(f, "no usable {kind} capability"),
            Self::CapTooShort {
                kind,
                at,
                cap_len,
                required,
            } => write!(
                f,
                "{kind} capability at {at:#04x}: cap_len {cap_len} is shorter than {required}"
            ),
            Self::CapBeyondConfigSpace { kind, at, len } => write!(
                f,
                "{kind} capability at {at:#04x} ({len} bytes) runs past the end of config space"
            ),
            Self::BadBarIndex { kind, bar } => {
                write!(f, "{kind} capability names reserved BAR index {bar}")
            }
            Self::BarAbsent { kind, bar } => {
                write!(
                    f,
                    "{kind} capability names BAR{bar}, which is not implemented"
                )
            }
            Self::WrongBarKind { kind, bar } => {
                write!(
                    f,
                    "{kind} capability names BAR{bar}, an I/O BAR; it must be memory"
                )
            }
            Self::RegionOutsideBar {
                kind,
                bar,
                offset,
                length,
                bar_size,
            } => write!(
                f,
                "{kind} region {offset:#x}+{length:#x} lies outside BAR{bar} (size {bar_size:#x})"
            ),
            Self::Misaligned {
                kind,
                offset,
                alignment,
            } => write!(
                f,
                "{kind} region offset {offset:#x} is not {alignment}-byte aligned"
            ),
            Self::RegionTooSmall {
                kind,
                length,
                required,
            } => write!(
                f,
                "{kind} region length {length:#x} is smaller than the required {required:#x}"
            ),
            Self::BadNotifyMultiplier { multiplier } => write!(
                f,
                "notify_off_multiplier {multiplier} is odd (must be 0 or an even power of 2)"
            ),
            Self::PortOutOfRange { port, length } => {
                write!(
                    f,
                    "notify I/O region {port:#x}+{length:#x} exceeds the port space"
                )
            }
            Self::Map(error) => write!(f, "mapping a virtio region failed: {error}"),
        }
    }
}

impl From<CapabilityError> for DiscoveryError {
    fn from(error: CapabilityError) -> Self {
        Self::CapabilityList(error)
    }
}

impl From<HalError> for DiscoveryError {
    fn from(error: HalError) -> Self {
        Self::Map(error)
    }
}

/// Why a transport operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// After writing 0 to `device_status`, it did not read back 0 in time (§4.1.4.3.2).
    ResetTimeout {
        /// How long the driver waited.
        waited_us: u32,
        /// The status it last read.
        status: u8,
    },
    /// An initialization step was called out of the order of §3.1.1.
    OutOfOrder {
        /// What was attempted.
        step: InitStep,
        /// The stage the device was in.
        stage: InitStage,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, which the modern interface requires
    /// (§6.1).
    Version1NotOffered {
        /// All 64 device feature bits.
        device_features: u64,
    },
    /// The device cleared FEATURES_OK: it does not accept this feature subset (§3.1.1 step 6).
    FeaturesRejected {
        /// The features the driver wrote.
        driver_features: u64,
    },
    /// The queue index is not below `num_queues`.
    QueueIndexOutOfRange {
        /// Queue index.
        queue: u16,
        /// `num_queues` read from the device.
        num_queues: u16,
    },
    /// The device reports a maximum size of 0 for this queue: it is unavailable (§4.1.4.3).
    QueueUnavailable {
        /// Queue index.
        queue: u16,
    },
    /// The requested queue size is 0, above the device maximum, or not a power of two for a
    /// split queue (§2.6).
    InvalidQueueSize {
        /// Queue index.
        queue: u16,
        /// Size asked for.
        size: u16,
        /// Device maximum.
        max: u16,
    },
    /// The queue is already enabled (§4.1.4.3.2: the driver must configure it before).
    QueueAlreadyEnabled {
        /// Queue index.
        queue: u16,
    },
    /// `queue_notify_off * notify_off_multiplier` falls outside the notify region (§4.1.4.4).
    NotifyOutOfRange {
        /// Queue index.
        queue: u16,
        /// `queue_notify_off` read.
        notify_off: u16,
        /// Resulting doorbell offset in the region (saturated on overflow).
        offset: u64,
        /// Length of the notify region.
        region_len: u64,
    },
    /// `notify` was called for a queue that has not been set up.
    QueueNotSetUp {
        /// Queue index.
        queue: u16,
    },
    /// The device read back NO_VECTOR after the driver wrote an MSI-X vector (§4.1.5.1.2).
    VectorRefused {
        /// The queue, or `None` for the configuration-change vector.
        queue: Option<u16>,
        /// The vector the driver asked for.
        vector: u16,
    },
    /// The device has no device-specific configuration region.
    NoDeviceConfig,
    /// A device-config access falls outside the region.
    ConfigOutOfRange {
        /// Byte offset.
        offset: u32,
        /// Access width in bytes.
        width: u8,
        /// Region length.
        len: u64,
    },
    /// A device-config access is not naturally aligned (§4.1.3.1).
    ConfigMisaligned {
        /// Byte offset.
        offset: u32,
        /// Access width in bytes.
        width: u8,
    },
    /// `config_generation` kept changing during a read (§2.4.1).
    ConfigGenerationUnstable {
        /// Byte offset of the read.
        offset: u32,
        /// Number of attempts made.
        attempts: u32,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ResetTimeout { waited_us, status } => write!(
                f,
                "device reset timed out after {waited_us} us (status still {status:#04x})"
            ),
            Self::OutOfOrder { step, stage } => {
                write!(f, "cannot {step} while the device is {stage}")
            }
            Self::Version1NotOffered { device_features } => write!(
                f,
                "device does not offer VIRTIO_F_VERSION_1 (features {device_features:#018x})"
            ),
            Self::FeaturesRejected { driver_features } => write!(
                f,
                "device refused FEATURES_OK for features {driver_features:#018x}"
            ),
            Self::QueueIndexOutOfRange { queue, num_queues } => {
                write!(f, "queue {queue} does not exist (device has {num_queues})")
            }
            Self::QueueUnavailable { queue } => {
                write!(f, "queue {queue} is unavailable (maximum size 0)")
            }
            Self::InvalidQueueSize { queue, size, max } => {
                write!(
                    f,
                    "queue {queue}: size {size} is invalid (device maximum {max})"
                )
            }
            Self::QueueAlreadyEnabled { queue } => write!(f, "queue {queue} is already enabled"),
            Self::NotifyOutOfRange {
                queue,
                notify_off,
                offset,
                region_len,
            } => write!(
                f,
                "queue {queue}: doorbell offset {offset:#x} (queue_notify_off {notify_off}) is outside the notify region ({region_len:#x} bytes)"
            ),
            Self::QueueNotSetUp { queue } => write!(f, "queue {queue} has not been set up"),
            Self::VectorRefused {
                queue: Some(queue),
                vector,
            } => {
                write!(f, "device refused MSI-X vector {vector} for queue {queue}")
            }
            Self::VectorRefused {
                queue: None,
                vector,
            } => {
                write!(
                    f,
                    "device refused MSI-X vector {vector} for configuration changes"
                )
            }
            Self::NoDeviceConfig => f.write_str("device has no device-specific configuration"),
            Self::ConfigOutOfRange { offset, width, len } => write!(
                f,
                "device config access of {width} bytes at {offset:#x} is outside its {len:#x} bytes"
            ),
            Self::ConfigMisaligned { offset, width } => {
                write!(
                    f,
                    "device config access of {width} bytes at {offset:#x} is misaligned"
                )
            }
            Self::ConfigGenerationUnstable { offset, attempts } => write!(
                f,
                "device config at {offset:#x}: config_generation changed on each of {attempts} attempts"
            ),
        }
    }
}
