//! Virtqueues: one interface, two ring formats.
//!
//! * [`SplitQueue`]: the split virtqueue of §2.7 (descriptor table, available ring, used ring).
//! * [`PackedQueue`]: the packed virtqueue of §2.8 (one descriptor ring with wrap counters and
//!   two event suppression structures).
//! * [`VirtQueue`]: either, chosen from the negotiated features ([`QueueFeatures`]).
//!
//! What the two formats do the same way (buffers in flight, shape checks, indirect tables,
//! used id and length validation, counters, the broken state) lives once in `core.rs`, which
//! both embed; `split.rs` and `packed.rs` keep what differs.
//!
//! Both share the same contract:
//!
//! * **Ownership by API.** [`VirtQueue::add`] *moves* an owned [`DeviceBuffer`] into the
//!   queue and [`VirtQueue::pop_used`] moves it back out with the length the device wrote, so
//!   the driver cannot touch a buffer the device owns. A failed add hands the buffer back.
//! * **The device is untrusted** (docs/design.md principle 5). Descriptors are written from a
//!   driver-side shadow and chains are freed by walking that shadow, never the device-visible
//!   copy. Every index, id and length read back is validated; a violation is a
//!   [`DeviceError`], after which the queue is *broken*: every later call reports the same
//!   error until the driver resets the device and rebuilds the queue. Nothing the device
//!   writes can cause a panic or an out-of-bounds access.
//! * **Notifications.** The queue never writes a doorbell. After one or more adds,
//!   [`VirtQueue::should_notify`] says whether the device asked to be notified (flags, or
//!   `avail_event` / the device event suppression with VIRTIO_F_EVENT_IDX; §2.7.10, §2.8.10),
//!   and the caller then calls the transport's `notify`. Used-buffer notifications
//!   (interrupts) are armed and disarmed with [`VirtQueue::enable_cb`],
//!   [`VirtQueue::enable_cb_delayed`] and [`VirtQueue::disable_cb`] (§2.7.7, §2.8.10).
//! * **Barriers** come from [`crate::barrier`], with a comment at every use.
//!
//! Indirect descriptors (VIRTIO_F_INDIRECT_DESC, §2.7.5.3, §2.8.7) are used for every
//! multi-segment buffer of at most [`MAX_INDIRECT_SEGMENTS`] segments while a table is free,
//! so such a buffer takes one ring slot instead of one per segment.

mod core;
mod indirect;
mod layout;
mod packed;
mod split;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use ::core::fmt;

pub use crate::dma::{DeviceBuffer, Segment};
pub use crate::transport::QueueFormat;
pub use indirect::MAX_INDIRECT_SEGMENTS;
pub use packed::PackedQueue;
pub use split::SplitQueue;

use crate::dma::{DmaError, DmaHal};
use crate::spec::{Features, MAX_QUEUE_SIZE};
use crate::transport::QueueConfig;

/// Which optional ring features a queue uses (all from the negotiated feature bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFeatures {
    /// Split or packed layout (VIRTIO_F_RING_PACKED).
    pub format: QueueFormat,
    /// VIRTIO_F_EVENT_IDX: `used_event`/`avail_event` (split) or RING_EVENT_FLAGS_DESC
    /// (packed).
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC: indirect descriptor tables.
    pub indirect: bool,
}

impl QueueFeatures {
    /// The ring features implied by the negotiated feature bits.
    pub const fn from_negotiated(features: u64) -> Self {
        let packed = features & Features::RING_PACKED.bits() != 0;
        Self {
            format: if packed {
                QueueFormat::Packed
            } else {
                QueueFormat::Split
            },
            event_idx: features & Features::EVENT_IDX.bits() != 0,
            indirect: features & Features::INDIRECT_DESC.bits() != 0,
        }
    }

    /// The device-independent feature bits this queue implementation supports, to offer in
    /// negotiation.
    pub const fn supported_bits() -> u64 {
        Features::RING_PACKED.bits() | Features::EVENT_IDX.bits() | Features::INDIRECT_DESC.bits()
    }
}

/// The three bus addresses the transport programs for a queue (§2.6: descriptor area, driver
/// area, device area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueAddresses {
    /// Descriptor table (split) or descriptor ring (packed).
    pub desc: u64,
    /// Available ring (split) or driver event suppression (packed).
    pub driver: u64,
    /// Used ring (split) or device event suppression (packed).
    pub device: u64,
}

/// A buffer the device has finished with, handed back to the driver.
#[derive(Debug)]
pub struct Used<T> {
    /// The buffer, owned by the driver again.
    pub buffer: T,
    /// Bytes the device wrote into the device-writable segments, from the start of the first
    /// writable one; validated to be at most their total length (§2.7.8).
    pub len: u32,
}

/// The outcome of arming used-buffer notifications.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackState {
    /// Armed, and the used ring had nothing new after the full fence: a notification will
    /// come when the device uses a buffer. Safe to wait.
    Armed,
    /// Used buffers (or a device error) arrived that the armed notification may never report:
    /// poll ([`VirtQueue::pop_used`]) before waiting.
    UsedPending,
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Buffers added.
    pub buffers_added: u64,
    /// Buffers returned by `pop_used`.
    pub buffers_used: u64,
    /// Descriptors written to the ring (one per indirect buffer).
    pub ring_descriptors: u64,
    /// Descriptors written to indirect tables.
    pub indirect_descriptors: u64,
    /// Buffers that went through an indirect table.
    pub indirect_buffers: u64,
    /// `should_notify` calls that found the device wanted a notification.
    pub kicks_needed: u64,
    /// `should_notify` calls (after adds) where the device had suppressed the notification.
    pub kicks_suppressed: u64,
}

/// Driver-side errors of queue construction and `add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The size is invalid for the format (0, above 32768, or not a power of two for split).
    InvalidSize {
        /// Queue index.
        queue: u16,
        /// Size requested.
        size: u16,
        /// Ring format.
        format: QueueFormat,
    },
    /// Ring or indirect-table memory could not be allocated.
    Dma(DmaError),
    /// The buffer has no segments.
    EmptyBuffer,
    /// The buffer reported fewer segments than its count.
    MissingSegment {
        /// Index of the missing segment.
        index: usize,
    },
    /// A device-readable segment follows a device-writable one (§2.7.4.2).
    ReadableAfterWritable {
        /// Index of the offending segment.
        index: usize,
    },
    /// The chain is longer than 2^32 − 1 bytes in total (§2.7.5.2).
    ChainTooLong {
        /// Total bytes.
        bytes: u64,
    },
    /// More segments than a chain may have (the queue size, §2.7.5.3.1, §2.8.17).
    TooManySegments {
        /// Segments in the buffer.
        segments: usize,
        /// Largest chain allowed.
        max: usize,
    },
    /// Not enough free descriptors now; retry after `pop_used`.
    Full {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The queue saw a device error and refuses work until rebuilt.
    Broken(DeviceError),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::InvalidSize {
                queue,
                size,
                format,
            } => {
                write!(
                    f,
                    "queue {queue}: size {size} is invalid for a {format:?} ring"
                )
            }
            Self::Dma(error) => write!(f, "ring memory: {error}"),
            Self::EmptyBuffer => f.write_str("buffer has no segments"),
            Self::MissingSegment { index } => write!(f, "buffer segment {index} is missing"),
            Self::ReadableAfterWritable { index } => {
                write!(
                    f,
                    "device-readable segment {index} follows a device-writable one"
                )
            }
            Self::ChainTooLong { bytes } => write!(f, "chain of {bytes} bytes exceeds 4 GiB"),
            Self::TooManySegments { segments, max } => {
                write!(f, "{segments} segments exceed the chain limit of {max}")
            }
            Self::Full { needed, free } => {
                write!(f, "queue full: {needed} descriptors needed, {free} free")
            }
            Self::Broken(error) => write!(f, "queue broken by device error: {error}"),
        }
    }
}

impl From<DmaError> for QueueError {
    fn from(error: DmaError) -> Self {
        Self::Dma(error)
    }
}

/// A failed `add`: the error and the buffer, handed back untouched.
#[derive(Debug)]
pub struct AddError<T> {
    /// Why.
    pub error: QueueError,
    /// The buffer.
    pub buffer: T,
}

/// A device that broke the ring protocol (§2.7.8, §2.8.1, §2.8.13). Each is a reason to reset
/// the device; the queue is unusable afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// Split: used `idx` moved further than the number of buffers in flight (at most the queue
    /// size) since the driver last looked.
    UsedIndexJumped {
        /// Queue index.
        queue: u16,
        /// The used index the driver had consumed up to.
        last_seen: u16,
        /// The used index the device published.
        published: u16,
        /// Buffers that were in flight.
        in_flight: u16,
    },
    /// A used id (split: descriptor head; packed: buffer id) is not below the queue size.
    IdOutOfRange {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used id in range that is not the head/id of a buffer in flight (never posted, a
    /// non-head descriptor, or a duplicate completion).
    IdNotInFlight {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u16,
    },
    /// The used length exceeds the buffer's device-writable capacity.
    LengthTooLarge {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u16,
        /// The length reported.
        len: u32,
        /// Device-writable bytes in the buffer.
        capacity: u32,
    },
    /// Packed: a descriptor the driver made available in the current lap reads back as used
    /// with the other wrap counter (AVAIL = USED = !wrap).
    BadWrapCounter {
        /// Queue index.
        queue: u16,
        /// Ring slot.
        slot: u16,
        /// Flags read.
        flags: u16,
        /// The wrap counter a used descriptor must carry.
        expected_wrap: bool,
    },
    /// Packed: a descriptor in flight reads back with AVAIL != USED in a combination neither
    /// side writes.
    IncoherentFlags {
        /// Queue index.
        queue: u16,
        /// Ring slot.
        slot: u16,
        /// Flags read.
        flags: u16,
    },
    /// Packed: a used descriptor appeared while nothing was in flight.
    UsedWhileIdle {
        /// Queue index.
        queue: u16,
        /// Ring slot.
        slot: u16,
        /// Flags read.
        flags: u16,
    },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UsedIndexJumped {
                queue,
                last_seen,
                published,
                in_flight,
            } => write!(
                f,
                "queue {queue}: used idx jumped from {last_seen} to {published} with {in_flight} in flight"
            ),
            Self::IdOutOfRange { queue, id, size } => {
                write!(
                    f,
                    "queue {queue}: used id {id} is outside a queue of {size}"
                )
            }
            Self::IdNotInFlight { queue, id } => {
                write!(f, "queue {queue}: used id {id} is not a buffer in flight")
            }
            Self::LengthTooLarge {
                queue,
                id,
                len,
                capacity,
            } => write!(
                f,
                "queue {queue}: used len {len} for id {id} exceeds its {capacity} writable bytes"
            ),
            Self::BadWrapCounter {
                queue,
                slot,
                flags,
                expected_wrap,
            } => write!(
                f,
                "queue {queue}: slot {slot} flags {flags:#06x} carry the wrong wrap counter (expected {})",
                u8::from(expected_wrap)
            ),
            Self::IncoherentFlags { queue, slot, flags } => {
                write!(
                    f,
                    "queue {queue}: slot {slot} has incoherent flags {flags:#06x}"
                )
            }
            Self::UsedWhileIdle { queue, slot, flags } => write!(
                f,
                "queue {queue}: slot {slot} marked used (flags {flags:#06x}) with nothing in flight"
            ),
        }
    }
}

/// Interrupt (used-buffer notification) mode, as last set by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Callbacks {
    /// Suppressed (`disable_cb`).
    Disabled,
    /// On for the next used buffer; `pop_used` keeps the event index at the ring head.
    Enabled,
    /// On once the armed fraction of outstanding buffers is used.
    Delayed,
}

/// Shape of a buffer, checked before any descriptor is touched.
#[derive(Clone, Copy, Debug)]
struct Shape {
    segments: usize,
    writable_bytes: u32,
}

impl Shape {
    /// Validates the buffer's segments (count, direction order, total length) for a queue of
    /// `size`.
    fn of<B: DeviceBuffer + ?Sized>(buffer: &B, size: u16) -> Result<Self, QueueError> {
        let segments = buffer.segment_count();
        if segments == 0 {
            return Err(QueueError::EmptyBuffer);
        }
        if segments > usize::from(size) {
            return Err(QueueError::TooManySegments {
                segments,
                max: usize::from(size),
            });
        }
        let mut total = 0u64;
        let mut writable = 0u64;
        let mut seen_writable = false;
        for index in 0..segments {
            let segment = buffer
                .segment(index)
                .ok_or(QueueError::MissingSegment { index })?;
            if segment.device_writable {
                seen_writable = true;
                writable += u64::from(segment.len);
            } else if seen_writable {
                return Err(QueueError::ReadableAfterWritable { index });
            }
            total += u64::from(segment.len);
        }
        if total > u64::from(u32::MAX) {
            return Err(QueueError::ChainTooLong { bytes: total });
        }
        // `writable <= total <= u32::MAX`.
        let writable_bytes = u32::try_from(writable).unwrap_or(u32::MAX);
        Ok(Self {
            segments,
            writable_bytes,
        })
    }
}

/// Validates a queue size for a format (§2.7: power of two ≤ 32768; §2.8: 1..=32768).
fn check_size(queue: u16, size: u16, format: QueueFormat) -> Result<(), QueueError> {
    let valid = size != 0
        && size <= MAX_QUEUE_SIZE
        && (format == QueueFormat::Packed || size.is_power_of_two());
    if valid {
        Ok(())
    } else {
        Err(QueueError::InvalidSize {
            queue,
            size,
            format,
        })
    }
}

/// The "need event" test of §2.7.7/§2.7.10 on free-running 16-bit indices: whether the index
/// `event` lies in `[old, new)` modulo 2^16, i.e. whether moving an index from `old` to `new`
/// passed over `event`. Exact while `new - old < 2^16`.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A virtqueue of either format, over DMA from `H`, carrying owned buffers of type `T`.
///
/// Dropping a queue frees its rings, indirect tables and the buffers still in flight, so the
/// device must be reset first (or the queue never enabled): the device may otherwise keep
/// accessing that memory (§2.4, `Hal::dma_free`).
pub enum VirtQueue<H: DmaHal + Clone, T: DeviceBuffer> {
    /// A split ring (§2.7).
    Split(SplitQueue<H, T>),
    /// A packed ring (§2.8).
    Packed(PackedQueue<H, T>),
}

macro_rules! delegate {
    ($self:ident, $queue:ident => $body:expr) => {
        match $self {
            Self::Split($queue) => $body,
            Self::Packed($queue) => $body,
        }
    };
}

impl<H: DmaHal + Clone, T: DeviceBuffer> VirtQueue<H, T> {
    /// Allocates and initializes queue `index` with `size` entries in the format and with the
    /// options of `features`.
    pub fn new(hal: H, index: u16, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        Ok(match features.format {
            QueueFormat::Split => Self::Split(SplitQueue::new(hal, index, size, features)?),
            QueueFormat::Packed => Self::Packed(PackedQueue::new(hal, index, size, features)?),
        })
    }

    /// The ring format.
    pub fn format(&self) -> QueueFormat {
        match self {
            Self::Split(_) => QueueFormat::Split,
            Self::Packed(_) => QueueFormat::Packed,
        }
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        delegate!(self, queue => queue.index())
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        delegate!(self, queue => queue.size())
    }

    /// The bus addresses of the three areas, for the transport's queue setup (§4.1.5.1.3).
    pub fn addresses(&self) -> QueueAddresses {
        delegate!(self, queue => queue.addresses())
    }

    /// The transport's queue configuration for this queue, with MSI-X vector `vector`.
    pub fn transport_config(&self, vector: Option<u16>) -> QueueConfig {
        let addresses = self.addresses();
        QueueConfig {
            format: self.format(),
            size: self.size(),
            desc: addresses.desc,
            driver: addresses.driver,
            device: addresses.device,
            vector,
        }
    }

    /// Makes `buffer` available to the device (§2.7.13, §2.8.21). On error the buffer comes
    /// back in the [`AddError`]. Call [`Self::should_notify`] after a batch of adds.
    pub fn add(&mut self, buffer: T) -> Result<(), AddError<T>> {
        delegate!(self, queue => queue.add(buffer))
    }

    /// Whether a buffer of `segments` segments can be added now.
    pub fn can_add(&self, segments: usize) -> bool {
        delegate!(self, queue => queue.can_add(segments))
    }

    /// Free descriptors (split: table entries; packed: ring slots).
    pub fn free_descriptors(&self) -> u16 {
        delegate!(self, queue => queue.free_descriptors())
    }

    /// Buffers in flight (added and not yet returned by `pop_used`).
    pub fn in_flight(&self) -> u16 {
        delegate!(self, queue => queue.in_flight())
    }

    /// After adds: whether the device asked for an available-buffer notification (§2.7.10,
    /// §2.8.10). Counts the decision in [`QueueStats`]; `false` without counting when nothing
    /// was added since the last call. The caller writes the doorbell when this is `true`.
    pub fn should_notify(&mut self) -> bool {
        delegate!(self, queue => queue.should_notify())
    }

    /// Whether the device has returned a buffer (or written something `pop_used` will reject).
    pub fn has_used(&self) -> bool {
        delegate!(self, queue => queue.has_used())
    }

    /// The next buffer the device has finished with, validated (§2.7.14, §2.8.22).
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DeviceError> {
        delegate!(self, queue => queue.pop_used())
    }

    /// Suppresses used-buffer notifications (best effort, §2.7.7, §2.8.10).
    pub fn disable_cb(&mut self) {
        delegate!(self, queue => queue.disable_cb())
    }

    /// Arms a used-buffer notification for the next used buffer, then (after a full fence)
    /// re-checks the used ring; see [`CallbackState`].
    pub fn enable_cb(&mut self) -> CallbackState {
        delegate!(self, queue => queue.enable_cb())
    }

    /// Arms a notification for when about 3/4 of the buffers now in flight have been used
    /// (for reclaiming transmit buffers); without EVENT_IDX the same as [`Self::enable_cb`].
    pub fn enable_cb_delayed(&mut self) -> CallbackState {
        delegate!(self, queue => queue.enable_cb_delayed())
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        delegate!(self, queue => queue.stats())
    }

    /// The device error that broke this queue, if any.
    pub fn broken(&self) -> Option<DeviceError> {
        delegate!(self, queue => queue.broken())
    }
}
