//! The virtio-blk driver (§5.2): feature negotiation, a generation-consistent read of the
//! device configuration (§2.4.1, §5.2.4), one request queue (queue 0, §5.2.2), and a request
//! API ([`VirtioBlk::submit`], [`VirtioBlk::poll`], [`VirtioBlk::execute`]) over buffers the
//! caller owns.
//!
//! Every request is one chain of the shape §5.2.6 fixes: a device-readable 16-byte header
//! (`type`, `reserved`, `sector`), the data (device-readable for writes and for the
//! discard/write-zeroes segments, device-writable for reads and GET_ID), and a device-writable
//! status byte. Header and status buffers come from a pool carved out of two DMA allocations
//! at start-up, one pair per queue entry; data buffers are the caller's [`DmaBuf`]s, moved into
//! the queue and handed back in the [`Completion`] (docs/design.md principle 5: the driver
//! never holds a buffer the device owns). A chain of at most
//! [`crate::queue::MAX_INDIRECT_SEGMENTS`] segments goes through an indirect table when
//! VIRTIO_F_INDIRECT_DESC is negotiated.
//!
//! The driver requirements of §5.2.6.1 are checked before anything reaches the queue: no write,
//! discard or write zeroes to a read-only device (VIRTIO_BLK_F_RO), no request past
//! `capacity`, data a whole number of blocks (`blk_size`, 512 when not offered or not a power
//! of two from 512 to 64 KiB) starting on a block boundary, segments within `size_max` and
//! `seg_max`, FLUSH only with VIRTIO_BLK_F_FLUSH and with sector 0, GET_ID with a 20-byte
//! buffer, discard and write zeroes only when negotiated and within their limits. A refused
//! request comes back with its buffers in a [`Rejected`].
//!
//! What the device writes is untrusted: a completion whose used length does not reach the
//! status byte (§2.7.8: nothing past `len` may be trusted), or a status outside 0..=2, fails
//! that request with a typed error and leaves the driver usable; a queue the device broke
//! (§2.7.8, §2.8.22) is [`BlkError::Device`] on every call until the caller drops the driver
//! (which resets the device) and brings it up again.
//!
//! VIRTIO_F_ACCESS_PLATFORM (§6.1) is accepted for the reason the net driver gives: every
//! address the device sees comes from the HAL ([`crate::hal`]).

mod request;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;

pub use request::{BlkRange, BlkRequest, Completion, Rejected, RequestId, RequestKind, id_string};

use crate::device::{QueueSetupError, ResetOnError, build_queue};
use crate::dma::{DmaBuf, DmaError, DmaHal, Part};
use crate::error::TransportError;
use crate::queue::{DeviceError, QueueError, QueueFeatures, VirtQueue};
use crate::spec::{BlkFeatures, Features, blk_config, blk_req};
use crate::transport::{
    CONFIG_READ_ATTEMPTS, DeviceType, QueueFormat, RegisterWidth, Transport, VirtioDevice,
};

/// The request queue (§5.2.2: `requestq1`; the only one without VIRTIO_BLK_F_MQ).
pub const REQUEST_QUEUE: u16 = 0;

/// The device-independent and block features this driver can honour.
pub const DRIVER_FEATURES: u64 = Features::VERSION_1.bits()
    | QueueFeatures::supported_bits()
    | Features::ACCESS_PLATFORM.bits()
    | BlkFeatures::SIZE_MAX.bits()
    | BlkFeatures::SEG_MAX.bits()
    | BlkFeatures::BLK_SIZE.bits()
    | BlkFeatures::RO.bits()
    | BlkFeatures::FLUSH.bits()
    | BlkFeatures::DISCARD.bits()
    | BlkFeatures::WRITE_ZEROES.bits();

/// Smallest and largest `blk_size` taken from the device; anything else (or not a power of
/// two) is ignored and 512 used.
const BLOCK_SIZE_RANGE: core::ops::RangeInclusive<u32> = 512..=65536;

/// MSI-X table entries for the device's notifications; `None` means no vector (polling or
/// INTx).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkVectors {
    /// Configuration changes (a resized disk).
    pub config: Option<u16>,
    /// The request queue.
    pub queue: Option<u16>,
}

/// How to bring the device up.
#[derive(Clone, Copy, Debug)]
pub struct BlkOptions {
    /// Feature bits the caller allows (intersected with [`DRIVER_FEATURES`]).
    pub allowed_features: u64,
    /// Requested queue size (clamped to the device's maximum; QEMU's default is 256).
    pub queue_size: u16,
    /// Interrupt vectors.
    pub vectors: BlkVectors,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            allowed_features: DRIVER_FEATURES,
            queue_size: 256,
            vectors: BlkVectors::default(),
        }
    }
}

/// What is wrong with a request's length or shape (see [`BlkError::BadLength`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthProblem {
    /// No data, a zero-length segment, or an empty range list or range.
    Zero,
    /// Not a whole number of blocks.
    NotBlockMultiple {
        /// The block size in bytes.
        block_size: u32,
    },
    /// One segment is longer than `size_max` (VIRTIO_BLK_F_SIZE_MAX).
    SegmentTooLarge {
        /// The segment's length.
        segment: u64,
        /// The device's limit.
        size_max: u32,
    },
    /// More data segments than `seg_max` (VIRTIO_BLK_F_SEG_MAX) or the queue allows.
    TooManySegments {
        /// Data segments in the request.
        segments: usize,
        /// The limit.
        max: usize,
    },
    /// The chain would exceed 2^32 − 1 bytes (§2.7.5.2).
    TooLong,
    /// A GET_ID buffer that is not exactly 20 bytes (§5.2.6).
    IdBuffer,
    /// More discard/write-zeroes ranges than the device takes in one command.
    TooManyRanges {
        /// Ranges in the request.
        ranges: usize,
        /// `max_discard_seg` or `max_write_zeroes_seg`.
        max: u32,
    },
    /// A discard/write-zeroes range longer than the device takes.
    RangeTooLong {
        /// Sectors in the range.
        sectors: u32,
        /// `max_discard_sectors` or `max_write_zeroes_sectors`.
        max: u32,
    },
}

impl fmt::Display for LengthProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Zero => f.write_str("it is empty"),
            Self::NotBlockMultiple { block_size } => {
                write!(f, "it is not a multiple of the {block_size}-byte block")
            }
            Self::SegmentTooLarge { segment, size_max } => write!(
                f,
                "a {segment}-byte segment exceeds the device's size_max of {size_max}"
            ),
            Self::TooManySegments { segments, max } => {
                write!(f, "{segments} data segments exceed the limit of {max}")
            }
            Self::TooLong => f.write_str("the chain would exceed 4 GiB"),
            Self::IdBuffer => f.write_str("a GET_ID buffer must be exactly 20 bytes"),
            Self::TooManyRanges { ranges, max } => {
                write!(f, "{ranges} ranges exceed the device's limit of {max}")
            }
            Self::RangeTooLong { sectors, max } => {
                write!(
                    f,
                    "a range of {sectors} sectors exceeds the device's limit of {max}"
                )
            }
        }
    }
}

/// Errors of the block driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The transport is not a block device.
    NotBlockDevice {
        /// The device type it reports.
        device_type: u16,
    },
    /// The transport refused a step (features, queue setup, vector, config read, doorbell).
    Transport(TransportError),
    /// The queue could not be built or fed.
    Queue(QueueError),
    /// DMA memory could not be had or shared.
    Dma(DmaError),
    /// The device has no request queue.
    MissingQueue {
        /// The queue index that does not exist.
        queue: u16,
    },
    /// The device broke the request queue's rules (§2.7.8, §2.8.22): every later call reports
    /// this; drop the driver (which resets the device) and bring it up again.
    Device(DeviceError),
    /// The device reported DEVICE_NEEDS_RESET (§2.1.2).
    NeedsReset,
    /// VIRTIO_BLK_S_IOERR: the device failed the request (§5.2.6).
    IoError,
    /// VIRTIO_BLK_S_UNSUPP: the device does not support the request (§5.2.6).
    Unsupported,
    /// The device wrote a status byte outside VIRTIO_BLK_S_OK..=VIRTIO_BLK_S_UNSUPP.
    BadStatus {
        /// The byte.
        status: u8,
    },
    /// The device completed a request with a used length that does not reach the status byte
    /// (§2.7.8: bytes past `len` must not be trusted), so the outcome is unknown.
    ShortCompletion {
        /// The used length.
        len: u32,
        /// The device-writable bytes of the request, status included.
        needed: u32,
    },
    /// A write, discard or write zeroes to a read-only device (VIRTIO_BLK_F_RO, §5.2.6.1),
    /// refused before submission.
    ReadOnly,
    /// The request reaches past the end of the disk, or its end overflows.
    OutOfRange {
        /// First sector (512 bytes) of the request.
        sector: u64,
        /// Sectors in the request.
        sectors: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// The request does not start on a block boundary.
    Misaligned {
        /// First sector (512 bytes) of the request.
        sector: u64,
        /// The block size in bytes.
        block_size: u32,
    },
    /// The request's length or shape breaks a rule (see [`LengthProblem`]).
    BadLength {
        /// Bytes (or sectors, for ranges) involved.
        len: u64,
        /// What is wrong.
        problem: LengthProblem,
    },
    /// The request needs a feature that was not negotiated.
    NotNegotiated {
        /// The feature.
        feature: BlkFeatures,
    },
    /// Every header/status pair or the ring is in use; poll completions and retry.
    Busy {
        /// Requests in flight.
        in_flight: u16,
    },
    /// A bounded wait ended before the request completed; it stays in flight and its
    /// completion comes from [`VirtioBlk::poll`].
    Timeout {
        /// The request.
        id: RequestId,
    },
    /// [`VirtioBlk::wait`] for a request that is not in flight (`Some`), or a used buffer that
    /// matches no request in flight (`None`, a driver bug).
    UnknownRequest {
        /// The request waited for.
        id: Option<RequestId>,
    },
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotBlockDevice { device_type } => {
                write!(f, "{} is not a block device", DeviceType(device_type))
            }
            Self::Transport(error) => write!(f, "{error}"),
            Self::Queue(error) => write!(f, "{error}"),
            Self::Dma(error) => write!(f, "{error}"),
            Self::MissingQueue { queue } => write!(f, "the device has no queue {queue}"),
            Self::Device(error) => write!(f, "device broke the request queue: {error}"),
            Self::NeedsReset => f.write_str("the device set DEVICE_NEEDS_RESET"),
            Self::IoError => f.write_str("the device reported an I/O error (VIRTIO_BLK_S_IOERR)"),
            Self::Unsupported => {
                f.write_str("the device does not support the request (VIRTIO_BLK_S_UNSUPP)")
            }
            Self::BadStatus { status } => {
                write!(f, "the device wrote an invalid status byte {status:#04x}")
            }
            Self::ShortCompletion { len, needed } => write!(
                f,
                "the device completed a request with used length {len}, short of the {needed} bytes that reach its status"
            ),
            Self::ReadOnly => f.write_str("the device is read-only (VIRTIO_BLK_F_RO)"),
            Self::OutOfRange {
                sector,
                sectors,
                capacity,
            } => write!(
                f,
                "{sectors} sectors from sector {sector} reach past the capacity of {capacity} sectors"
            ),
            Self::Misaligned { sector, block_size } => write!(
                f,
                "sector {sector} is not on a {block_size}-byte block boundary"
            ),
            Self::BadLength { len, problem } => {
                write!(f, "bad request length {len}: {problem}")
            }
            Self::NotNegotiated { feature } => {
                write!(f, "the request needs VIRTIO_BLK_F_")?;
                let mut separator = "";
                for (name, _) in feature.iter_names() {
                    write!(f, "{separator}{name}")?;
                    separator = "|";
                }
                f.write_str(", which was not negotiated")
            }
            Self::Busy { in_flight } => {
                write!(
                    f,
                    "the request queue is full ({in_flight} requests in flight)"
                )
            }
            Self::Timeout { id } => write!(f, "request {id} did not complete in time"),
            Self::UnknownRequest { id: Some(id) } => write!(f, "request {id} is not in flight"),
            Self::UnknownRequest { id: None } => {
                f.write_str("a used buffer matches no request in flight")
            }
        }
    }
}

impl From<TransportError> for BlkError {
    fn from(error: TransportError) -> Self {
        Self::Transport(error)
    }
}

impl From<QueueSetupError> for BlkError {
    fn from(error: QueueSetupError) -> Self {
        match error {
            QueueSetupError::MissingQueue { queue } => Self::MissingQueue { queue },
            QueueSetupError::Transport(error) => Self::Transport(error),
            QueueSetupError::Queue(error) => Self::Queue(error),
        }
    }
}

impl From<QueueError> for BlkError {
    fn from(error: QueueError) -> Self {
        Self::Queue(error)
    }
}

impl From<DmaError> for BlkError {
    fn from(error: DmaError) -> Self {
        Self::Dma(error)
    }
}

/// Counters, exact (no sampling). Requests count when they complete; a refused request
/// counts only in `rejected`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Reads completed with VIRTIO_BLK_S_OK.
    pub reads: u64,
    /// Writes completed with VIRTIO_BLK_S_OK.
    pub writes: u64,
    /// Bytes of those reads.
    pub read_bytes: u64,
    /// Bytes of those writes.
    pub written_bytes: u64,
    /// Flushes completed with VIRTIO_BLK_S_OK.
    pub flushes: u64,
    /// Discards completed with VIRTIO_BLK_S_OK.
    pub discards: u64,
    /// Write-zeroes commands completed with VIRTIO_BLK_S_OK.
    pub write_zeroes: u64,
    /// Requests that completed with an error (IOERR, UNSUPP, a bad status byte, a short used
    /// length).
    pub errors: u64,
    /// Requests refused before submission (their buffers handed back).
    pub rejected: u64,
    /// Doorbell writes.
    pub kicks: u64,
}

/// Limits of discard or write zeroes (§5.2.4), after the defaults for zero fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeLimits {
    /// Largest sectors per range (`max_*_sectors`; 0 from the device means no limit).
    pub max_sectors: u32,
    /// Largest ranges per command (`max_*_seg`; 0 from the device means 1).
    pub max_ranges: u32,
    /// Discard: `discard_sector_alignment` (a hint, in sectors); write zeroes:
    /// `write_zeroes_may_unmap` (0 or 1).
    pub hint: u32,
}

/// What the driver knows about the disk, from the negotiated features and the configuration
/// (§5.2.4), read in one generation window (§2.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Block size in bytes: `blk_size` when offered and sane, else 512.
    pub block_size: u32,
    /// A `blk_size` the device offered and the driver ignored as nonsense.
    pub ignored_block_size: Option<u32>,
    /// Largest segment (`size_max`), if the device limits it.
    pub size_max: Option<u32>,
    /// Largest number of data segments (`seg_max`), if the device limits it.
    pub seg_max: Option<u32>,
    /// VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// VIRTIO_BLK_F_FLUSH.
    pub flush: bool,
    /// Discard limits with VIRTIO_BLK_F_DISCARD.
    pub discard: Option<RangeLimits>,
    /// Write-zeroes limits with VIRTIO_BLK_F_WRITE_ZEROES.
    pub write_zeroes: Option<RangeLimits>,
}

impl BlkInfo {
    /// Capacity in bytes (saturating).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
            .saturating_mul(u64::from(blk_req::SECTOR_SIZE))
    }

    /// 512-byte sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size / blk_req::SECTOR_SIZE)
    }
}

/// Whether every bit of `mask` is set in `features`.
fn has(features: u64, mask: u64) -> bool {
    features & mask == mask
}

/// Reads the configuration fields the negotiated `features` make valid, all inside one
/// `config_generation` window (§2.4.1), with the access widths §4.1.3.1 requires (32-bit
/// halves for `capacity`).
fn read_info<T: Transport + ?Sized>(transport: &T, features: u64) -> Result<BlkInfo, BlkError> {
    let u32_at = |offset| transport.read_device_config_raw(offset, RegisterWidth::U32);
    let read = || -> Result<BlkInfo, BlkError> {
        let low = u32_at(blk_config::CAPACITY)?;
        let high = u32_at(blk_config::CAPACITY + 4)?;
        let capacity = u64::from(low) | (u64::from(high) << 32);
        let optional = |feature: BlkFeatures, offset| -> Result<Option<u32>, BlkError> {
            if has(features, feature.bits()) {
                Ok(Some(u32_at(offset)?))
            } else {
                Ok(None)
            }
        };
        let offered_block = optional(BlkFeatures::BLK_SIZE, blk_config::BLK_SIZE)?;
        let sane = |size: u32| size.is_power_of_two() && BLOCK_SIZE_RANGE.contains(&size);
        let block_size = offered_block.filter(|&size| sane(size)).unwrap_or(512);
        let ignored_block_size = offered_block.filter(|&size| !sane(size));
        let size_max = optional(BlkFeatures::SIZE_MAX, blk_config::SIZE_MAX)?.filter(|&v| v != 0);
        let seg_max = optional(BlkFeatures::SEG_MAX, blk_config::SEG_MAX)?.filter(|&v| v != 0);
        let limits = |sectors: u32, ranges: u32, hint: u32| RangeLimits {
            max_sectors: if sectors == 0 { u32::MAX } else { sectors },
            max_ranges: ranges.max(1),
            hint,
        };
        let discard = if has(features, BlkFeatures::DISCARD.bits()) {
            Some(limits(
                u32_at(blk_config::MAX_DISCARD_SECTORS)?,
                u32_at(blk_config::MAX_DISCARD_SEG)?,
                u32_at(blk_config::DISCARD_SECTOR_ALIGNMENT)?,
            ))
        } else {
            None
        };
        let write_zeroes = if has(features, BlkFeatures::WRITE_ZEROES.bits()) {
            let unmap = transport
                .read_device_config_raw(blk_config::WRITE_ZEROES_MAY_UNMAP, RegisterWidth::U8)?;
            Some(limits(
                u32_at(blk_config::MAX_WRITE_ZEROES_SECTORS)?,
                u32_at(blk_config::MAX_WRITE_ZEROES_SEG)?,
                u32::from(unmap != 0),
            ))
        } else {
            None
        };
        Ok(BlkInfo {
            capacity,
            block_size,
            ignored_block_size,
            size_max,
            seg_max,
            read_only: has(features, BlkFeatures::RO.bits()),
            flush: has(features, BlkFeatures::FLUSH.bits()),
            discard,
            write_zeroes,
        })
    };
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let before = transport.config_generation();
        let info = read()?;
        if transport.config_generation() == before {
            return Ok(info);
        }
    }
    Err(BlkError::Transport(
        TransportError::ConfigGenerationUnstable {
            offset: blk_config::CAPACITY,
            attempts: CONFIG_READ_ATTEMPTS,
        },
    ))
}

/// A request the device holds.
struct InFlight {
    id: RequestId,
    kind: RequestKind,
    /// Data bytes (reads and writes), for the counters.
    data_bytes: u64,
    /// Device-writable bytes, status included: what the used length must reach.
    writable: u32,
}

/// The virtio-blk driver over transport `T` and DMA from `H`.
pub struct VirtioBlk<H: DmaHal + Clone, T: Transport> {
    hal: H,
    device: VirtioDevice<T>,
    offered: u64,
    info: BlkInfo,
    queue: VirtQueue<H, Vec<Part<H>>>,
    /// Free (header, status) buffer pairs, one per request that can be in flight.
    pool: Vec<(DmaBuf<H>, DmaBuf<H>)>,
    /// Requests in flight, by the bus address of their header buffer.
    in_flight: BTreeMap<u64, InFlight>,
    /// Completions taken off the ring while waiting for another request.
    completed: VecDeque<Completion<H>>,
    next_id: u64,
    vectors: BlkVectors,
    stats: BlkStats,
}

impl<H: DmaHal + Clone, T: Transport> VirtioBlk<H, T> {
    /// Runs the initialization sequence (§3.1.1, §5.2.5): reset, features, configuration,
    /// the request queue and its vector, the config vector, DRIVER_OK. On failure the device
    /// is left FAILED and reset.
    pub fn new(hal: H, transport: T, options: BlkOptions) -> Result<Self, BlkError> {
        let device_type = transport.device_type();
        if device_type != DeviceType::BLOCK {
            return Err(BlkError::NotBlockDevice {
                device_type: device_type.0,
            });
        }
        let mut device = VirtioDevice::new(transport);
        device.reset()?;
        let offered = device.transport_mut().read_device_features();
        let features = device.begin(DRIVER_FEATURES & options.allowed_features)?;

        // The queue lives in a slot declared before the guard: on an early return the guard
        // drops first and resets the device before the queue memory is freed (device.rs).
        let mut queue_slot: Option<VirtQueue<H, Vec<Part<H>>>>;
        let mut guard = ResetOnError::new(device);
        let Some(device) = guard.device() else {
            return Err(BlkError::NeedsReset);
        };
        let info = read_info(device.transport(), features)?;
        queue_slot = Some(build_queue(
            &hal,
            device,
            REQUEST_QUEUE,
            options.queue_size,
            QueueFeatures::from_negotiated(features),
            options.vectors.queue,
        )?);
        device.set_config_vector(options.vectors.config)?;
        let size = queue_slot
            .as_ref()
            .map_or(0, |queue| usize::from(queue.size()));
        let headers = DmaBuf::new(hal.clone(), size * blk_req::HEADER_LEN)?
            .chunks(blk_req::HEADER_LEN)
            .map_err(|(_, error)| BlkError::Dma(error))?;
        let statuses = DmaBuf::new(hal.clone(), size)?
            .chunks(1)
            .map_err(|(_, error)| BlkError::Dma(error))?;
        // DRIVER_OK last (§3.1.1 step 8), still under the guard.
        device.driver_ok()?;
        let Some(queue) = queue_slot.take() else {
            return Err(BlkError::NeedsReset);
        };
        let Some(device) = guard.take() else {
            return Err(BlkError::NeedsReset);
        };
        let mut blk = Self {
            hal,
            device,
            offered,
            info,
            queue,
            pool: headers.into_iter().zip(statuses).collect(),
            in_flight: BTreeMap::new(),
            completed: VecDeque::new(),
            next_id: 0,
            vectors: options.vectors,
            stats: BlkStats::default(),
        };
        // Completions are polled; the caller arms interrupts when it wants to sleep.
        blk.queue.disable_cb();
        Ok(blk)
    }

    /// What the driver knows about the disk.
    pub fn info(&self) -> BlkInfo {
        self.info
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.info.block_size
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.info.read_only
    }

    /// Features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.device.features()
    }

    /// The vectors in use.
    pub fn vectors(&self) -> BlkVectors {
        self.vectors
    }

    /// The request queue's size.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// The request queue's ring format.
    pub fn queue_format(&self) -> QueueFormat {
        self.queue.format()
    }

    /// Requests in flight (submitted, not yet returned by [`Self::poll`]; completions taken
    /// off the ring while waiting count until polled).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.completed.len()
    }

    /// The counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The request queue's counters (descriptors, indirect tables, kicks).
    pub fn queue_stats(&self) -> crate::queue::QueueStats {
        self.queue.stats()
    }

    /// The device error that broke the request queue, if any: the driver must then be
    /// dropped (resetting the device) and brought up again.
    pub fn broken(&self) -> Option<DeviceError> {
        self.queue.broken()
    }

    /// The transport (ISR reads, diagnostics).
    pub fn transport(&self) -> &T {
        self.device.transport()
    }

    /// Whether completions are waiting to be polled.
    pub fn pending(&self) -> bool {
        !self.completed.is_empty() || self.queue.has_used()
    }

    /// Arms the request queue's interrupt; `true` when completions arrived that it may not
    /// report (poll before waiting).
    pub fn arm_interrupt(&mut self) -> bool {
        !self.completed.is_empty()
            || self.queue.enable_cb() == crate::queue::CallbackState::UsedPending
    }

    /// Disarms the request queue's interrupt.
    pub fn disarm_interrupt(&mut self) {
        self.queue.disable_cb();
    }

    /// After a configuration-change notification (or on a timer): reports a device that asked
    /// to be reset, and re-reads the configuration (a resized disk, §5.2.4). Returns whether
    /// the capacity changed.
    pub fn handle_config_change(&mut self) -> Result<bool, BlkError> {
        if self.device.needs_reset() {
            return Err(BlkError::NeedsReset);
        }
        let info = read_info(self.device.transport(), self.device.features())?;
        let changed = info.capacity != self.info.capacity;
        self.info = info;
        Ok(changed)
    }
}

impl<H: DmaHal + Clone, T: Transport> Drop for VirtioBlk<H, T> {
    /// Resets the device before the queue and buffers are freed (the fields drop after this),
    /// so the device never touches memory that went back to the allocator.
    fn drop(&mut self) {
        let _ = self.device.reset();
    }
}

impl<H: DmaHal + Clone, T: Transport> fmt::Debug for VirtioBlk<H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.info.capacity)
            .field("block_size", &self.info.block_size)
            .field("read_only", &self.info.read_only)
            .field("queue_size", &self.queue.size())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests;
