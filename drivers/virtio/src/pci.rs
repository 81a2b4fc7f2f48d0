//! The virtio 1.x modern PCI transport (§4.1): identifying a virtio function (§4.1.2), walking
//! and validating its vendor capabilities (§4.1.4), and [`PciTransport`], which implements
//! [`Transport`] over the located common, notify, ISR and device-config regions.
//!
//! Everything read from configuration space or the BARs is device-controlled input: every
//! capability field is validated against the decoded BARs before use, every register access is
//! bounds-checked against its region, and nothing here panics.

use alloc::vec::Vec;
use core::fmt;

use pci::{Bar, Bars, Capabilities, ConfigSpace, PciAddress, cap_id, regs};

use crate::error::{DiscoveryError, StructureKind, TransportError};
use crate::hal::{Hal, Window};
use crate::spec::{self, cap_offset, common_cfg};
use crate::transport::{
    DeviceStatus, DeviceType, IsrStatus, QueueConfig, RegisterWidth, Transport, queue_size_valid,
};

/// How the function identifies itself (§4.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciFlavor {
    /// Device id 0x1040 + type: virtio 1.x only.
    Modern,
    /// Device id 0x1000..=0x103f with the type in the subsystem id: also has a legacy I/O
    /// interface, which this driver ignores (§4.1.2.3).
    Transitional,
}

/// The identity of a virtio PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VirtioPciId {
    /// PCI device id.
    pub device_id: u16,
    /// Modern or transitional.
    pub flavor: PciFlavor,
    /// The virtio device type.
    pub device_type: DeviceType,
}

impl fmt::Display for VirtioPciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flavor = match self.flavor {
            PciFlavor::Modern => "modern",
            PciFlavor::Transitional => "transitional",
        };
        write!(
            f,
            "{} ({:04x}:{:04x}, {flavor})",
            self.device_type,
            spec::VIRTIO_PCI_VENDOR_ID,
            self.device_id
        )
    }
}

/// Identifies a virtio function from its vendor, device and subsystem ids (§4.1.2).
pub fn identify<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
) -> Result<VirtioPciId, DiscoveryError> {
    let ids = config.read32(address, regs::VENDOR_DEVICE);
    let vendor = ids as u16;
    let device_id = (ids >> 16) as u16;
    if vendor != spec::VIRTIO_PCI_VENDOR_ID {
        return Err(DiscoveryError::NotVirtio {
            vendor,
            device: device_id,
        });
    }
    match device_id {
        spec::MODERN_DEVICE_ID_BASE..=spec::MODERN_DEVICE_ID_LAST => Ok(VirtioPciId {
            device_id,
            flavor: PciFlavor::Modern,
            device_type: DeviceType(device_id - spec::MODERN_DEVICE_ID_BASE),
        }),
        spec::TRANSITIONAL_DEVICE_ID_FIRST..=spec::TRANSITIONAL_DEVICE_ID_LAST => {
            let subsystem_id = (config.read32(address, regs::SUBSYSTEM) >> 16) as u16;
            Ok(VirtioPciId {
                device_id,
                flavor: PciFlavor::Transitional,
                device_type: DeviceType(subsystem_id),
            })
        }
        _ => Err(DiscoveryError::UnknownDeviceId { device: device_id }),
    }
}

/// Where a located structure lives in the CPU's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Memory space, at this physical address (BAR base + offset).
    Memory {
        /// Physical address of the first byte.
        phys: u64,
    },
    /// I/O space, at this port (BAR base + offset); only the notify structure may be here.
    Io {
        /// First port.
        port: u16,
    },
}

/// A virtio structure located by a validated vendor capability (§4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// Which structure.
    pub kind: StructureKind,
    /// Offset of the capability in configuration space.
    pub cap_offset: u16,
    /// BAR index, 0..=5.
    pub bar: u8,
    /// The capability's `id` field (distinguishes several of one type).
    pub id: u8,
    /// Offset of the structure within the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
    /// Resolved address.
    pub location: Location,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (cap {:#04x}, cfg_type {}): BAR{} +{:#x} len {:#x}",
            self.kind,
            self.cap_offset,
            self.kind.cfg_type(),
            self.bar,
            self.offset,
            self.length
        )?;
        match self.location {
            Location::Memory { phys } => write!(f, " at mem {phys:#x}"),
            Location::Io { port } => write!(f, " at port {port:#x}"),
        }
    }
}

/// The structures a modern virtio function exposes, after validation (§4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VirtioCapabilities {
    /// Common configuration (§4.1.4.3).
    pub common: Region,
    /// Notifications (§4.1.4.4), in memory or I/O space.
    pub notify: Region,
    /// `notify_off_multiplier` of the chosen notify capability (§4.1.4.4).
    pub notify_off_multiplier: u32,
    /// ISR status (§4.1.4.5).
    pub isr: Region,
    /// Device-specific configuration (§4.1.4.6), if the device has one.
    pub device: Option<Region>,
}

impl fmt::Display for VirtioCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.common)?;
        writeln!(
            f,
            "{}, notify_off_multiplier {}",
            self.notify, self.notify_off_multiplier
        )?;
        write!(f, "{}", self.isr)?;
        if let Some(device) = &self.device {
            write!(f, "\n{device}")?;
        }
        Ok(())
    }
}

/// Whether the device-specific configuration structure must be present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceConfigRequirement {
    /// The device type has configuration the driver needs (net, blk, console).
    Required,
    /// The device type may have none (rng).
    Optional,
}

const fn kind_index(kind: StructureKind) -> usize {
    match kind {
        StructureKind::Common => 0,
        StructureKind::Notify => 1,
        StructureKind::Isr => 2,
        StructureKind::Device => 3,
    }
}

/// Walks the capability list and locates the virtio structures (§4.1.4).
///
/// For each structure the first capability that validates is used (§4.1.4.1: "the driver
/// SHOULD use the first instance of each virtio structure type they can support"). Capabilities
/// of other types (PCI config access, shared memory, vendor data, unknown) are skipped. A
/// required structure with no valid capability is reported with the error of its first
/// invalid capability, or as missing if it had none. A malformed list is an error.
pub fn find_capabilities<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    bars: &Bars,
    device_config: DeviceConfigRequirement,
) -> Result<VirtioCapabilities, DiscoveryError> {
    let mut found: [Option<(Region, u32)>; 4] = [None; 4];
    let mut first_error: [Option<DiscoveryError>; 4] = [None; 4];
    let mut any_structure = false;

    for capability in Capabilities::new(config, address) {
        let capability = capability?;
        if capability.id != cap_id::VENDOR_SPECIFIC {
            continue;
        }
        let cfg_type = config.read8(address, capability.offset + cap_offset::CFG_TYPE);
        let Some(kind) = StructureKind::from_cfg_type(cfg_type) else {
            continue;
        };
        any_structure = true;
        let index = kind_index(kind);
        if found[index].is_some() {
            continue;
        }
        match parse_capability(config, address, capability.offset, kind, bars) {
            Ok(parsed) => found[index] = Some(parsed),
            Err(error) => {
                first_error[index].get_or_insert(error);
            }
        }
    }

    if !any_structure {
        let device = (config.read32(address, regs::VENDOR_DEVICE) >> 16) as u16;
        return Err(DiscoveryError::LegacyOnly { device });
    }
    let take = |kind: StructureKind| -> Result<(Region, u32), DiscoveryError> {
        let index = kind_index(kind);
        found[index]
            .ok_or_else(|| first_error[index].unwrap_or(DiscoveryError::MissingCapability(kind)))
    };
    let (common, _) = take(StructureKind::Common)?;
    let (notify, notify_off_multiplier) = take(StructureKind::Notify)?;
    let (isr, _) = take(StructureKind::Isr)?;
    let device = match device_config {
        DeviceConfigRequirement::Required => Some(take(StructureKind::Device)?.0),
        DeviceConfigRequirement::Optional => {
            found[kind_index(StructureKind::Device)].map(|(region, _)| region)
        }
    };
    Ok(VirtioCapabilities {
        common,
        notify,
        notify_off_multiplier,
        isr,
        device,
    })
}

/// Reads and validates one virtio structure capability at `at`.
fn parse_capability<C: ConfigSpace + ?Sized>(
    config: &C,
    address: PciAddress,
    at: u16,
    kind: StructureKind,
    bars: &Bars,
) -> Result<(Region, u32), DiscoveryError> {
    let required: u8 = if kind == StructureKind::Notify {
        20
    } else {
        16
    };
    let cap_len = config.read8(address, at + cap_offset::CAP_LEN);
    if cap_len < required {
        return Err(DiscoveryError::CapTooShort {
            kind,
            at,
            cap_len,
            required,
        });
    }
    if at + u16::from(required) > 0x100 {
        return Err(DiscoveryError::CapBeyondConfigSpace {
            kind,
            at,
            len: required,
        });
    }
    let bar = config.read8(address, at + cap_offset::BAR);
    let Some(slot) = bars.get(usize::from(bar)) else {
        return Err(DiscoveryError::BadBarIndex { kind, bar });
    };
    let Some(bar_info) = *slot else {
        return Err(DiscoveryError::BarAbsent { kind, bar });
    };
    let id = config.read8(address, at + cap_offset::ID);
    let offset = config.read32(address, at + cap_offset::OFFSET);
    let length = config.read32(address, at + cap_offset::LENGTH);

    let (bar_base, bar_size, is_io) = match bar_info {
        Bar::Memory { address, size, .. } => (address, size, false),
        Bar::Io { port, size } => (u64::from(port), u64::from(size), true),
    };
    if is_io && kind != StructureKind::Notify {
        return Err(DiscoveryError::WrongBarKind { kind, bar });
    }
    let outside = DiscoveryError::RegionOutsideBar {
        kind,
        bar,
        offset,
        length,
        bar_size,
    };
    // u32 + u32 cannot overflow u64.
    if u64::from(offset) + u64::from(length) > bar_size {
        return Err(outside);
    }
    let (alignment, min_length) = match kind {
        StructureKind::Common => (4, common_cfg::LEN_V1_0 as u32),
        StructureKind::Notify => (2, 2),
        StructureKind::Isr => (1, 1),
        StructureKind::Device => (4, 1),
    };
    if !offset.is_multiple_of(alignment) {
        return Err(DiscoveryError::Misaligned {
            kind,
            offset,
            alignment,
        });
    }
    if length < min_length {
        return Err(DiscoveryError::RegionTooSmall {
            kind,
            length,
            required: min_length,
        });
    }
    let multiplier = if kind == StructureKind::Notify {
        let multiplier = config.read32(address, at + cap_offset::NOTIFY_OFF_MULTIPLIER);
        if !multiplier.is_multiple_of(2) {
            return Err(DiscoveryError::BadNotifyMultiplier { multiplier });
        }
        multiplier
    } else {
        0
    };
    let start = bar_base.checked_add(u64::from(offset)).ok_or(outside)?;
    let location = if is_io {
        let port_out_of_range = DiscoveryError::PortOutOfRange {
            port: u32::try_from(start).unwrap_or(u32::MAX),
            length,
        };
        if start + u64::from(length) > 0x1_0000 {
            return Err(port_out_of_range);
        }
        Location::Io {
            port: u16::try_from(start).map_err(|_| port_out_of_range)?,
        }
    } else {
        Location::Memory { phys: start }
    };
    Ok((
        Region {
            kind,
            cap_offset: at,
            bar,
            id,
            offset,
            length,
            location,
        },
        multiplier,
    ))
}

/// Bound on the reset handshake: total time the driver waits for status to read 0.
pub const RESET_TIMEOUT_US: u32 = 1_000_000;
/// Interval between polls of the status during reset.
pub const RESET_POLL_INTERVAL_US: u32 = 10;

/// Where a queue's doorbell is (§4.1.4.4), resolved once at queue setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Doorbell {
    /// A 16-bit write at this offset of the mapped notify window.
    Mmio { window: Window, offset: u64 },
    /// A 16-bit write to this I/O port.
    Port(u16),
}

/// Where the notify region is, as mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotifyTarget {
    Mmio(Window),
    Port(u16),
}

/// The modern virtio PCI transport of one function (§4.1).
pub struct PciTransport<H: Hal> {
    hal: H,
    address: PciAddress,
    id: VirtioPciId,
    capabilities: VirtioCapabilities,
    common: Window,
    isr: Window,
    device: Option<Window>,
    notify: NotifyTarget,
    /// Doorbells of the queues set up since the last reset, indexed by queue.
    doorbells: Vec<Option<Doorbell>>,
}

impl<H: Hal> PciTransport<H> {
    /// Identifies the function at `address`, locates and validates its virtio structures in
    /// the already-decoded `bars`, and maps them through `hal`.
    ///
    /// The caller has enabled memory decoding (and I/O decoding if the notify region may be
    /// in an I/O BAR) and bus mastering in the command register.
    pub fn new<C: ConfigSpace + ?Sized>(
        hal: H,
        config: &C,
        address: PciAddress,
        bars: &Bars,
        device_config: DeviceConfigRequirement,
    ) -> Result<Self, DiscoveryError> {
        let id = identify(config, address)?;
        let capabilities = find_capabilities(config, address, bars, device_config)?;
        let map = |region: &Region| -> Result<Window, DiscoveryError> {
            match region.location {
                Location::Memory { phys } => Ok(hal.map_mmio(phys, u64::from(region.length))?),
                // `parse_capability` admits I/O space only for notify, which is not mapped.
                Location::Io { .. } => Err(DiscoveryError::WrongBarKind {
                    kind: region.kind,
                    bar: region.bar,
                }),
            }
        };
        let common = map(&capabilities.common)?;
        let isr = map(&capabilities.isr)?;
        let device = capabilities.device.as_ref().map(map).transpose()?;
        let notify = match capabilities.notify.location {
            Location::Io { port } => NotifyTarget::Port(port),
            Location::Memory { .. } => NotifyTarget::Mmio(map(&capabilities.notify)?),
        };
        Ok(Self {
            hal,
            address,
            id,
            capabilities,
            common,
            isr,
            device,
            notify,
            doorbells: Vec::new(),
        })
    }

    /// The function's PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The function's identity.
    pub fn id(&self) -> VirtioPciId {
        self.id
    }

    /// The located structures, for logging.
    pub fn capabilities(&self) -> &VirtioCapabilities {
        &self.capabilities
    }

    /// Whether notifications go to an I/O port rather than MMIO.
    pub fn notifies_by_port(&self) -> bool {
        matches!(self.notify, NotifyTarget::Port(_))
    }

    /// The HAL.
    pub fn hal(&self) -> &H {
        &self.hal
    }

    fn read_common16(&self, register: u64) -> u16 {
        self.hal.read16(self.common, register)
    }

    fn write_common16(&self, register: u64, value: u16) {
        self.hal.write16(self.common, register, value)
    }

    /// Writes a 64-bit common-config field as two 32-bit halves, low then high (§4.1.3.1).
    fn write_common64(&self, register: u64, value: u64) {
        self.hal.write32(self.common, register, value as u32);
        self.hal
            .write32(self.common, register + 4, (value >> 32) as u32);
    }

    fn check_queue(&self, queue: u16) -> Result<(), TransportError> {
        let num_queues = self.num_queues();
        if queue < num_queues {
            Ok(())
        } else {
            Err(TransportError::QueueIndexOutOfRange { queue, num_queues })
        }
    }

    /// Resolves the doorbell of `queue` from its `queue_notify_off` (§4.1.4.4):
    /// `cap.offset + queue_notify_off * notify_off_multiplier`, which must leave room for a
    /// 16-bit write inside the notify region. A zero multiplier puts every queue on one
    /// doorbell.
    fn doorbell(&self, queue: u16, notify_off: u16) -> Result<Doorbell, TransportError> {
        let region_len = u64::from(self.capabilities.notify.length);
        // u16 * u32 cannot overflow u64.
        let offset = u64::from(notify_off) * u64::from(self.capabilities.notify_off_multiplier);
        if offset + 2 > region_len {
            return Err(TransportError::NotifyOutOfRange {
                queue,
                notify_off,
                offset,
                region_len,
            });
        }
        Ok(match self.notify {
            NotifyTarget::Mmio(window) => Doorbell::Mmio { window, offset },
            NotifyTarget::Port(base) => {
                // base + region_len <= 0x10000 was checked at discovery, and offset < region_len.
                let port = u64::from(base) + offset;
                Doorbell::Port(u16::try_from(port).map_err(|_| {
                    TransportError::NotifyOutOfRange {
                        queue,
                        notify_off,
                        offset,
                        region_len,
                    }
                })?)
            }
        })
    }
}

impl<H: Hal> Transport for PciTransport<H> {
    fn device_type(&self) -> DeviceType {
        self.id.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        let hal = &self.hal;
        hal.write32(self.common, common_cfg::DEVICE_FEATURE_SELECT, 0);
        let low = hal.read32(self.common, common_cfg::DEVICE_FEATURE);
        hal.write32(self.common, common_cfg::DEVICE_FEATURE_SELECT, 1);
        let high = hal.read32(self.common, common_cfg::DEVICE_FEATURE);
        u64::from(low) | (u64::from(high) << 32)
    }

    fn write_driver_features(&mut self, features: u64) {
        let hal = &self.hal;
        hal.write32(self.common, common_cfg::DRIVER_FEATURE_SELECT, 0);
        hal.write32(self.common, common_cfg::DRIVER_FEATURE, features as u32);
        hal.write32(self.common, common_cfg::DRIVER_FEATURE_SELECT, 1);
        hal.write32(
            self.common,
            common_cfg::DRIVER_FEATURE,
            (features >> 32) as u32,
        );
    }

    fn read_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.hal.read8(self.common, common_cfg::DEVICE_STATUS))
    }

    fn write_status(&mut self, status: DeviceStatus) {
        self.hal
            .write8(self.common, common_cfg::DEVICE_STATUS, status.bits());
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.doorbells.clear();
        self.hal.write8(self.common, common_cfg::DEVICE_STATUS, 0);
        let mut waited_us = 0;
        loop {
            let status = self.hal.read8(self.common, common_cfg::DEVICE_STATUS);
            if status == 0 {
                return Ok(());
            }
            if waited_us >= RESET_TIMEOUT_US {
                return Err(TransportError::ResetTimeout { waited_us, status });
            }
            self.hal.spin_delay_us(RESET_POLL_INTERVAL_US);
            waited_us += RESET_POLL_INTERVAL_US;
        }
    }

    /// Read live, not cached: a device may change it when features are negotiated (QEMU's
    /// virtio-net adds the extra queue pairs and moves the control queue once MQ is accepted).
    fn num_queues(&self) -> u16 {
        self.read_common16(common_cfg::NUM_QUEUES)
    }

    fn max_queue_size(&mut self, queue: u16) -> Result<u16, TransportError> {
        self.check_queue(queue)?;
        self.write_common16(common_cfg::QUEUE_SELECT, queue);
        match self.read_common16(common_cfg::QUEUE_SIZE) {
            0 => Err(TransportError::QueueUnavailable { queue }),
            max => Ok(max),
        }
    }

    fn setup_queue(&mut self, queue: u16, config: &QueueConfig) -> Result<(), TransportError> {
        let max = self.max_queue_size(queue)?;
        if !queue_size_valid(config.size, max, config.format) {
            return Err(TransportError::InvalidQueueSize {
                queue,
                size: config.size,
                max,
            });
        }
        if self.read_common16(common_cfg::QUEUE_ENABLE) != 0 {
            return Err(TransportError::QueueAlreadyEnabled { queue });
        }
        // §4.1.4.4: the doorbell is resolved (and bounds-checked) once, here.
        let notify_off = self.read_common16(common_cfg::QUEUE_NOTIFY_OFF);
        let doorbell = self.doorbell(queue, notify_off)?;

        // §4.1.5.1.2: map the vector first and read it back, so that a refusal leaves the
        // queue's registers untouched for a retry with another vector or none.
        let vector = config.vector.unwrap_or(spec::NO_VECTOR);
        self.write_common16(common_cfg::QUEUE_MSIX_VECTOR, vector);
        if config.vector.is_some() && self.read_common16(common_cfg::QUEUE_MSIX_VECTOR) != vector {
            return Err(TransportError::VectorRefused {
                queue: Some(queue),
                vector,
            });
        }
        // §4.1.5.1.3: size, then the three areas, then enable.
        self.write_common16(common_cfg::QUEUE_SIZE, config.size);
        self.write_common64(common_cfg::QUEUE_DESC, config.desc);
        self.write_common64(common_cfg::QUEUE_DRIVER, config.driver);
        self.write_common64(common_cfg::QUEUE_DEVICE, config.device);
        self.write_common16(common_cfg::QUEUE_ENABLE, 1);

        let index = usize::from(queue);
        if self.doorbells.len() <= index {
            self.doorbells.resize(index + 1, None);
        }
        self.doorbells[index] = Some(doorbell);
        Ok(())
    }

    fn notify(&self, queue: u16) -> Result<(), TransportError> {
        match self.doorbells.get(usize::from(queue)).copied().flatten() {
            Some(Doorbell::Mmio { window, offset }) => self.hal.write16(window, offset, queue),
            Some(Doorbell::Port(port)) => self.hal.port_write16(port, queue),
            None => return Err(TransportError::QueueNotSetUp { queue }),
        }
        Ok(())
    }

    fn read_isr(&self) -> IsrStatus {
        IsrStatus::from_bits_retain(self.hal.read8(self.isr, 0))
    }

    fn set_config_vector(&mut self, vector: Option<u16>) -> Result<(), TransportError> {
        let value = vector.unwrap_or(spec::NO_VECTOR);
        self.write_common16(common_cfg::CONFIG_MSIX_VECTOR, value);
        if vector.is_some() && self.read_common16(common_cfg::CONFIG_MSIX_VECTOR) != value {
            return Err(TransportError::VectorRefused {
                queue: None,
                vector: value,
            });
        }
        Ok(())
    }

    fn config_generation(&self) -> u8 {
        self.hal.read8(self.common, common_cfg::CONFIG_GENERATION)
    }

    fn device_config_len(&self) -> u64 {
        self.device.map_or(0, |window| window.len)
    }

    fn read_device_config_raw(
        &self,
        offset: u32,
        width: RegisterWidth,
    ) -> Result<u32, TransportError> {
        let window = self.device_config_window(offset, width)?;
        let offset = u64::from(offset);
        Ok(match width {
            RegisterWidth::U8 => u32::from(self.hal.read8(window, offset)),
            RegisterWidth::U16 => u32::from(self.hal.read16(window, offset)),
            RegisterWidth::U32 => self.hal.read32(window, offset),
        })
    }

    fn write_device_config_raw(
        &mut self,
        offset: u32,
        width: RegisterWidth,
        value: u32,
    ) -> Result<(), TransportError> {
        let window = self.device_config_window(offset, width)?;
        let offset = u64::from(offset);
        match width {
            RegisterWidth::U8 => self.hal.write8(window, offset, value as u8),
            RegisterWidth::U16 => self.hal.write16(window, offset, value as u16),
            RegisterWidth::U32 => self.hal.write32(window, offset, value),
        }
        Ok(())
    }
}

impl<H: Hal> PciTransport<H> {
    /// The device-config window, after checking that an access of `width` at `offset` is
    /// aligned (§4.1.3.1) and inside the region.
    fn device_config_window(
        &self,
        offset: u32,
        width: RegisterWidth,
    ) -> Result<Window, TransportError> {
        let window = self.device.ok_or(TransportError::NoDeviceConfig)?;
        let bytes = width.bytes();
        if !offset.is_multiple_of(u32::from(bytes)) {
            return Err(TransportError::ConfigMisaligned {
                offset,
                width: bytes,
            });
        }
        if !window.contains(u64::from(offset), u64::from(bytes)) {
            return Err(TransportError::ConfigOutOfRange {
                offset,
                width: bytes,
                len: window.len,
            });
        }
        Ok(window)
    }
}
