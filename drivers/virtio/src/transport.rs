//! The device-agnostic side of a virtio transport: the [`Transport`] trait that device drivers
//! (net now; blk, rng, console later) are written against, the §3.1.1 initialization sequence
//! as a small state machine ([`VirtioDevice`]), feature negotiation (§2.2, §6), queue size
//! selection (§2.6, §2.7) and generation-checked device configuration reads (§2.4.1).
//!
//! A transport (the PCI one in [`crate::pci`], later perhaps MMIO) implements only the raw
//! register operations; everything that follows a protocol lives here once.

use core::fmt;

use crate::error::TransportError;
use crate::spec::{self, Features};

/// A virtio device type (§5), e.g. [`DeviceType::NET`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceType(pub u16);

impl DeviceType {
    /// Network card (§5.1).
    pub const NET: Self = Self(spec::device_type::NET);
    /// Block device (§5.2).
    pub const BLOCK: Self = Self(spec::device_type::BLOCK);
    /// Console (§5.3).
    pub const CONSOLE: Self = Self(spec::device_type::CONSOLE);
    /// Entropy source (§5.4).
    pub const ENTROPY: Self = Self(spec::device_type::ENTROPY);

    /// A human name for the common types.
    pub const fn name(self) -> Option<&'static str> {
        match self.0 {
            spec::device_type::NET => Some("net"),
            spec::device_type::BLOCK => Some("block"),
            spec::device_type::CONSOLE => Some("console"),
            spec::device_type::ENTROPY => Some("entropy"),
            spec::device_type::BALLOON => Some("balloon"),
            spec::device_type::SCSI => Some("scsi"),
            spec::device_type::GPU => Some("gpu"),
            spec::device_type::INPUT => Some("input"),
            spec::device_type::VSOCK => Some("vsock"),
            _ => None,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "virtio-{name}"),
            None => write!(f, "virtio device type {}", self.0),
        }
    }
}

pub use crate::spec::{DeviceStatus, IsrStatus};

/// Width of one raw register access to device configuration (§4.1.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegisterWidth {
    /// 8 bits.
    U8,
    /// 16 bits, 2-byte aligned.
    U16,
    /// 32 bits, 4-byte aligned.
    U32,
}

impl RegisterWidth {
    /// Width in bytes.
    pub const fn bytes(self) -> u8 {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

/// Width of a generation-checked device configuration field (§2.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConfigWidth {
    /// 8 bits.
    U8,
    /// 16 bits.
    U16,
    /// 32 bits.
    U32,
    /// 64 bits, read as two 32-bit halves (low first) inside one generation window.
    U64,
}

impl ConfigWidth {
    /// Width in bytes.
    pub const fn bytes(self) -> u8 {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::U32 => 4,
            Self::U64 => 8,
        }
    }
}

/// The virtqueue layout a queue will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueFormat {
    /// Split virtqueue (§2.6): the size must be a power of two.
    Split,
    /// Packed virtqueue (§2.7, VIRTIO_F_RING_PACKED): any size up to the maximum.
    Packed,
}

/// Everything the transport programs into the device for one queue (§4.1.5.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Layout of the rings, which decides the valid sizes.
    pub format: QueueFormat,
    /// Queue size, usually from [`choose_queue_size`].
    pub size: u16,
    /// Physical address of the descriptor area (descriptor table or packed ring).
    pub desc: u64,
    /// Physical address of the driver area (available ring or driver event suppression).
    pub driver: u64,
    /// Physical address of the device area (used ring or device event suppression).
    pub device: u64,
    /// MSI-X table entry for this queue's notifications, or `None` for no vector (polling, or
    /// INTx).
    pub vector: Option<u16>,
}

/// Device-independent feature bits this transport cannot honour, which are therefore never
/// accepted: VIRTIO_F_NOTIFICATION_DATA and VIRTIO_F_NOTIF_CONFIG_DATA change what a doorbell
/// write must carry (§2.9, §4.1.5.2).
pub const TRANSPORT_UNSUPPORTED_FEATURES: u64 =
    Features::NOTIFICATION_DATA.bits() | Features::NOTIF_CONFIG_DATA.bits();

/// Feature negotiation (§2.2, §3.1.1 step 5): the subset of the device's features that the
/// driver supports, always including VIRTIO_F_VERSION_1, which a modern device must offer.
///
/// A device that offers VIRTIO_F_ACCESS_PLATFORM may refuse FEATURES_OK unless the driver
/// accepts it (§6.1; QEMU does). Nothing here adds it: a device driver accepts it by listing it
/// in `driver_supported`, as the net driver does, because every address it gives the device
/// comes from the HAL (see [`crate::hal`]: allocation addresses and per-transfer `share`).
pub fn negotiate_features(
    device_features: u64,
    driver_supported: u64,
) -> Result<u64, TransportError> {
    let version_1 = Features::VERSION_1.bits();
    if device_features & version_1 == 0 {
        return Err(TransportError::Version1NotOffered { device_features });
    }
    Ok(device_features & (driver_supported | version_1) & !TRANSPORT_UNSUPPORTED_FEATURES)
}

/// Chooses a queue size from the device maximum and the driver's wish: the request clamped to
/// the maximum (and to 32768), rounded down to a power of two for split queues (§2.6; a packed
/// queue may have any size, §2.7).
pub fn choose_queue_size(
    queue: u16,
    max: u16,
    requested: u16,
    format: QueueFormat,
) -> Result<u16, TransportError> {
    if max == 0 {
        return Err(TransportError::QueueUnavailable { queue });
    }
    if requested == 0 {
        return Err(TransportError::InvalidQueueSize {
            queue,
            size: requested,
            max,
        });
    }
    let limit = requested.min(max).min(spec::MAX_QUEUE_SIZE);
    Ok(match format {
        QueueFormat::Split => 1u16 << (15 - limit.leading_zeros()),
        QueueFormat::Packed => limit,
    })
}

/// Whether `size` is a valid size for `format` under a device maximum of `max`.
pub const fn queue_size_valid(size: u16, max: u16, format: QueueFormat) -> bool {
    let in_range = size != 0 && size <= max && size <= spec::MAX_QUEUE_SIZE;
    match format {
        QueueFormat::Split => in_range && size.is_power_of_two(),
        QueueFormat::Packed => in_range,
    }
}

/// How many times a device configuration read is attempted before a `config_generation` that
/// keeps changing is reported (§2.4.1).
pub const CONFIG_READ_ATTEMPTS: u32 = 32;

/// A virtio transport: the raw operations of one device, independent of the bus (§4).
///
/// Device drivers use it through [`VirtioDevice`], which enforces the initialization order.
/// Nothing here trusts the device: every value read back is bounds-checked before use.
pub trait Transport {
    /// The virtio device type (§5).
    fn device_type(&self) -> DeviceType;

    /// Reads all 64 device feature bits (`device_feature_select` 0 then 1, §4.1.4.3).
    fn read_device_features(&mut self) -> u64;

    /// Writes the 64 driver feature bits (`driver_feature_select` 0 then 1, §4.1.4.3).
    fn write_driver_features(&mut self, features: u64);

    /// Reads the device status byte (§2.1).
    fn read_status(&self) -> DeviceStatus;

    /// Writes the device status byte (§2.1). Writing 0 starts a reset; use [`Transport::reset`].
    fn write_status(&mut self, status: DeviceStatus);

    /// Resets the device: writes 0 to the status and waits, bounded, until it reads back 0
    /// (§4.1.4.3.2). Forgets every queue set up before.
    fn reset(&mut self) -> Result<(), TransportError>;

    /// The number of queues the device supports (`num_queues`, §4.1.4.3).
    fn num_queues(&self) -> u16;

    /// The maximum size of `queue`; 0 is reported as [`TransportError::QueueUnavailable`].
    fn max_queue_size(&mut self, queue: u16) -> Result<u16, TransportError>;

    /// Programs and enables `queue` (§4.1.5.1.3): size, ring addresses, MSI-X vector (read back;
    /// a refusal is an error and the queue stays disabled), then `queue_enable`. Caches the
    /// queue's doorbell for [`Transport::notify`].
    fn setup_queue(&mut self, queue: u16, config: &QueueConfig) -> Result<(), TransportError>;

    /// Sends an available buffer notification for `queue` (§4.1.5.2).
    fn notify(&self, queue: u16) -> Result<(), TransportError>;

    /// Reads, and thereby clears, the ISR status (§4.1.4.5).
    fn read_isr(&self) -> IsrStatus;

    /// Assigns the MSI-X vector for configuration changes, or none (§4.1.5.1.2); a refusal
    /// (NO_VECTOR read back) is [`TransportError::VectorRefused`].
    fn set_config_vector(&mut self, vector: Option<u16>) -> Result<(), TransportError>;

    /// The current `config_generation` (§2.4, §4.1.4.3).
    fn config_generation(&self) -> u8;

    /// Length of the device-specific configuration region; 0 means there is none, and config
    /// reads then fail with [`TransportError::NoDeviceConfig`].
    fn device_config_len(&self) -> u64;

    /// One raw, aligned access to device configuration, without generation checking.
    fn read_device_config_raw(
        &self,
        offset: u32,
        width: RegisterWidth,
    ) -> Result<u32, TransportError>;

    /// One raw, aligned write to device configuration.
    fn write_device_config_raw(
        &mut self,
        offset: u32,
        width: RegisterWidth,
        value: u32,
    ) -> Result<(), TransportError>;

    /// Reads one device configuration field of up to 64 bits consistently: retries until
    /// `config_generation` is the same before and after all its pieces were read (§2.4.1).
    fn read_config(&self, offset: u32, width: ConfigWidth) -> Result<u64, TransportError> {
        let bytes = width.bytes();
        let len = self.device_config_len();
        if len == 0 {
            return Err(TransportError::NoDeviceConfig);
        }
        let fits = u64::from(offset)
            .checked_add(u64::from(bytes))
            .is_some_and(|end| end <= len);
        if !fits {
            return Err(TransportError::ConfigOutOfRange {
                offset,
                width: bytes,
                len,
            });
        }
        read_consistent(self, offset, |transport| {
            let raw = |offset, width| transport.read_device_config_raw(offset, width);
            Ok(match width {
                ConfigWidth::U8 => u64::from(raw(offset, RegisterWidth::U8)?),
                ConfigWidth::U16 => u64::from(raw(offset, RegisterWidth::U16)?),
                ConfigWidth::U32 => u64::from(raw(offset, RegisterWidth::U32)?),
                ConfigWidth::U64 => {
                    // offset + 8 <= len was checked above, so offset + 4 cannot overflow.
                    let low = raw(offset, RegisterWidth::U32)?;
                    let high = raw(offset.saturating_add(4), RegisterWidth::U32)?;
                    u64::from(low) | (u64::from(high) << 32)
                }
            })
        })
    }

    /// Reads `buffer.len()` bytes of device configuration (a byte array such as a MAC address)
    /// byte by byte inside one generation window (§2.4.1).
    fn read_config_bytes(&self, offset: u32, buffer: &mut [u8]) -> Result<(), TransportError> {
        let len = self.device_config_len();
        if len == 0 {
            return Err(TransportError::NoDeviceConfig);
        }
        let fits = u64::from(offset)
            .checked_add(buffer.len() as u64)
            .is_some_and(|end| end <= len);
        if !fits {
            let width = u8::try_from(buffer.len()).unwrap_or(u8::MAX);
            return Err(TransportError::ConfigOutOfRange { offset, width, len });
        }
        read_consistent(self, offset, |transport| {
            for (byte_offset, byte) in (offset..).zip(buffer.iter_mut()) {
                *byte = transport.read_device_config_raw(byte_offset, RegisterWidth::U8)? as u8;
            }
            Ok(())
        })
    }

    /// Whether the device has set DEVICE_NEEDS_RESET (§2.1.2).
    fn needs_reset(&self) -> bool {
        self.read_status().needs_reset()
    }
}

/// Runs `read` until `config_generation` is equal before and after it (§2.4.1), at most
/// [`CONFIG_READ_ATTEMPTS`] times.
fn read_consistent<T, R>(
    transport: &T,
    offset: u32,
    mut read: impl FnMut(&T) -> Result<R, TransportError>,
) -> Result<R, TransportError>
where
    T: Transport + ?Sized,
{
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let before = transport.config_generation();
        let value = read(transport)?;
        let after = transport.config_generation();
        if before == after {
            return Ok(value);
        }
    }
    Err(TransportError::ConfigGenerationUnstable {
        offset,
        attempts: CONFIG_READ_ATTEMPTS,
    })
}

/// Where a device is in the initialization sequence of §3.1.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InitStage {
    /// Not yet reset by this driver.
    Unknown,
    /// Reset: status reads 0.
    Reset,
    /// ACKNOWLEDGE set.
    Acknowledged,
    /// ACKNOWLEDGE and DRIVER set.
    Driver,
    /// Features negotiated and FEATURES_OK accepted; queues may be set up.
    FeaturesOk,
    /// DRIVER_OK set: the device is live.
    DriverOk,
    /// FAILED set: the driver gave up; only a reset leaves this stage.
    Failed,
}

impl fmt::Display for InitStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "not yet reset",
            Self::Reset => "reset",
            Self::Acknowledged => "acknowledged",
            Self::Driver => "claimed by the driver",
            Self::FeaturesOk => "in queue setup (FEATURES_OK)",
            Self::DriverOk => "live (DRIVER_OK)",
            Self::Failed => "failed",
        })
    }
}

/// A step of the initialization sequence, named in [`TransportError::OutOfOrder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InitStep {
    /// Set ACKNOWLEDGE.
    Acknowledge,
    /// Set DRIVER.
    Driver,
    /// Negotiate features and set FEATURES_OK.
    NegotiateFeatures,
    /// Set up a virtqueue.
    SetUpQueue,
    /// Assign the configuration-change vector.
    SetConfigVector,
    /// Set DRIVER_OK.
    DriverOk,
}

impl fmt::Display for InitStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Acknowledge => "set ACKNOWLEDGE",
            Self::Driver => "set DRIVER",
            Self::NegotiateFeatures => "negotiate features",
            Self::SetUpQueue => "set up a queue",
            Self::SetConfigVector => "assign the config vector",
            Self::DriverOk => "set DRIVER_OK",
        })
    }
}

/// A device driven through a [`Transport`], with the initialization order of §3.1.1 enforced:
///
/// * step 1: [`reset`](Self::reset);
/// * step 2: [`acknowledge`](Self::acknowledge);
/// * step 3: [`driver`](Self::driver);
/// * steps 4–6: [`negotiate_features`](Self::negotiate_features) (FEATURES_OK, re-read);
/// * step 7: [`setup_queue`](Self::setup_queue), [`set_config_vector`](Self::set_config_vector);
/// * step 8: [`driver_ok`](Self::driver_ok).
///
/// [`begin`](Self::begin) does steps 1–6 at once.
///
/// A call out of order is refused with [`TransportError::OutOfOrder`] and changes nothing.
pub struct VirtioDevice<T: Transport> {
    transport: T,
    stage: InitStage,
    /// The status bits this driver has set, written whole on every transition.
    status: DeviceStatus,
    features: u64,
}

impl<T: Transport> VirtioDevice<T> {
    /// Wraps a transport; the device is in [`InitStage::Unknown`] until reset.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            stage: InitStage::Unknown,
            status: DeviceStatus::empty(),
            features: 0,
        }
    }

    /// The current stage.
    pub fn stage(&self) -> InitStage {
        self.stage
    }

    /// The negotiated features (0 before negotiation).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether every feature bit of `mask` (e.g. `Features::EVENT_IDX.bits()`) was
    /// negotiated.
    pub fn has_feature(&self, mask: u64) -> bool {
        self.features & mask == mask
    }

    /// The transport, for notifications, ISR reads and configuration reads.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably. Writing the status through it bypasses the state machine.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Gives the transport back.
    pub fn into_transport(self) -> T {
        self.transport
    }

    /// Whether the device has set DEVICE_NEEDS_RESET (§2.1.2).
    pub fn needs_reset(&self) -> bool {
        self.transport.needs_reset()
    }

    /// Steps 1–6 of §3.1.1: reset, ACKNOWLEDGE, DRIVER, feature negotiation and FEATURES_OK.
    /// Returns the negotiated features; the device is then ready for queue setup.
    pub fn begin(&mut self, driver_supported: u64) -> Result<u64, TransportError> {
        self.reset()?;
        self.acknowledge()?;
        self.driver()?;
        self.negotiate_features(driver_supported)
    }

    /// Step 1: resets the device (allowed from any stage).
    pub fn reset(&mut self) -> Result<(), TransportError> {
        self.status = DeviceStatus::empty();
        self.features = 0;
        match self.transport.reset() {
            Ok(()) => {
                self.stage = InitStage::Reset;
                Ok(())
            }
            Err(error) => {
                self.stage = InitStage::Unknown;
                Err(error)
            }
        }
    }

    /// Step 2: sets ACKNOWLEDGE.
    pub fn acknowledge(&mut self) -> Result<(), TransportError> {
        self.expect(InitStep::Acknowledge, InitStage::Reset)?;
        self.set_status_bit(DeviceStatus::ACKNOWLEDGE);
        self.stage = InitStage::Acknowledged;
        Ok(())
    }

    /// Step 3: sets DRIVER.
    pub fn driver(&mut self) -> Result<(), TransportError> {
        self.expect(InitStep::Driver, InitStage::Acknowledged)?;
        self.set_status_bit(DeviceStatus::DRIVER);
        self.stage = InitStage::Driver;
        Ok(())
    }

    /// Steps 4–6: reads the device features, writes the negotiated subset, sets FEATURES_OK
    /// and re-reads the status. If the device lacks VERSION_1 or clears FEATURES_OK, sets
    /// FAILED and returns the error.
    pub fn negotiate_features(&mut self, driver_supported: u64) -> Result<u64, TransportError> {
        self.expect(InitStep::NegotiateFeatures, InitStage::Driver)?;
        let device_features = self.transport.read_device_features();
        let features = match negotiate_features(device_features, driver_supported) {
            Ok(features) => features,
            Err(error) => {
                self.fail();
                return Err(error);
            }
        };
        self.transport.write_driver_features(features);
        self.set_status_bit(DeviceStatus::FEATURES_OK);
        if !self
            .transport
            .read_status()
            .contains(DeviceStatus::FEATURES_OK)
        {
            self.fail();
            return Err(TransportError::FeaturesRejected {
                driver_features: features,
            });
        }
        self.features = features;
        self.stage = InitStage::FeaturesOk;
        Ok(features)
    }

    /// Step 7: sets up and enables one queue (see [`Transport::setup_queue`]).
    pub fn setup_queue(&mut self, queue: u16, config: &QueueConfig) -> Result<(), TransportError> {
        self.expect(InitStep::SetUpQueue, InitStage::FeaturesOk)?;
        self.transport.setup_queue(queue, config)
    }

    /// Step 7: assigns the configuration-change MSI-X vector (see
    /// [`Transport::set_config_vector`]).
    pub fn set_config_vector(&mut self, vector: Option<u16>) -> Result<(), TransportError> {
        self.expect(InitStep::SetConfigVector, InitStage::FeaturesOk)?;
        self.transport.set_config_vector(vector)
    }

    /// Step 8: sets DRIVER_OK; the device is live.
    pub fn driver_ok(&mut self) -> Result<(), TransportError> {
        self.expect(InitStep::DriverOk, InitStage::FeaturesOk)?;
        self.set_status_bit(DeviceStatus::DRIVER_OK);
        self.stage = InitStage::DriverOk;
        Ok(())
    }

    /// Gives up on the device: sets FAILED (§3.1.1). Only [`reset`](Self::reset) leaves this.
    pub fn fail(&mut self) {
        self.set_status_bit(DeviceStatus::FAILED);
        self.stage = InitStage::Failed;
    }

    fn expect(&self, step: InitStep, stage: InitStage) -> Result<(), TransportError> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(TransportError::OutOfOrder {
                step,
                stage: self.stage,
            })
        }
    }

    fn set_status_bit(&mut self, bit: DeviceStatus) {
        self.status |= bit;
        self.transport.write_status(self.status);
    }
}
