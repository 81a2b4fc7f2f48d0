//! What the split (§2.7) and packed (§2.8) rings do the same way, in one [`QueueCore`] that
//! both [`super::SplitQueue`] and [`super::PackedQueue`] embed:
//!
//! * the common state: queue index and size, VIRTIO_F_EVENT_IDX, the ring memory, the
//!   indirect-table pool (§2.7.5.3, §2.8.7), the buffers in flight ([`Chain`], keyed by split
//!   head index or packed buffer id, both below the queue size), the in-flight and unkicked
//!   counts, the used-buffer notification mode, the broken state and the counters;
//! * the format-independent parts of `add`: refusing work on a broken queue, validating the
//!   buffer's shape ([`Shape::of`]), choosing an indirect table or a direct chain, filling the
//!   indirect table, and recording the chain;
//! * the format-independent parts of `pop_used`: validating a used element the device wrote
//!   (its id names a chain in flight, its length fits the chain's device-writable part,
//!   §2.7.8, §2.8.22) and handing the buffer back, and latching a device error so that the
//!   queue stays broken (docs/design.md principle 5).
//!
//! The ring layouts, the available/used indices (split) and wrap counters (packed), event
//! suppression and every barrier stay in `split.rs` and `packed.rs`: this module touches no
//! device-visible ring memory except the indirect tables, which the device only reads.

use alloc::vec::Vec;

use super::indirect::{IndirectPool, MAX_INDIRECT_SEGMENTS};
use super::layout::DESC_SIZE;
use super::{Callbacks, DeviceError, QueueError, QueueFeatures, QueueStats, Shape, Used};
use crate::dma::{DeviceBuffer, DmaHal, RingMemory};
use crate::transport::QueueFormat;

/// A buffer in flight, by split head index or packed buffer id.
pub(super) struct Chain<T> {
    pub(super) buffer: T,
    /// Split: descriptor-table entries the chain occupies; packed: ring slots (the device
    /// skips that many when it writes one used descriptor for the buffer, §2.8.6). 1 for an
    /// indirect buffer.
    pub(super) descriptors: u16,
    /// Device-writable bytes: the largest valid used `len`.
    pub(super) capacity: u32,
    /// The indirect table carrying the buffer, if any.
    pub(super) indirect_table: Option<u16>,
}

/// What `add` decided before touching the ring.
pub(super) struct AddPlan {
    /// The validated buffer shape.
    pub(super) shape: Shape,
    /// The indirect table taken for the buffer, or `None` for a direct chain.
    pub(super) table: Option<u16>,
    /// Descriptors (split) or slots (packed) the buffer takes: 1 if indirect, else one per
    /// segment.
    pub(super) needed: usize,
}

/// The state and logic the two ring formats share.
pub(super) struct QueueCore<H: DmaHal, T> {
    pub(super) index: u16,
    pub(super) size: u16,
    pub(super) event_idx: bool,
    pub(super) ring: RingMemory<H>,
    pub(super) indirect: Option<IndirectPool<H>>,
    /// Per split head index or packed buffer id: the buffer in flight there.
    pub(super) chains: Vec<Option<Chain<T>>>,
    /// Buffers in flight.
    pub(super) in_flight: u16,
    /// Split: heads, packed: ring slots made available since the last `should_notify`.
    pub(super) unkicked: u32,
    pub(super) callbacks: Callbacks,
    pub(super) broken: Option<DeviceError>,
    pub(super) stats: QueueStats,
}

impl<H: DmaHal + Clone, T: DeviceBuffer> QueueCore<H, T> {
    /// Checks `size` for `format`, then allocates, with `features.indirect`, the
    /// indirect-table pool and then the zeroed ring memory: `ring_bytes(size)` bytes, the
    /// format's layout size for a valid `size`.
    pub(super) fn new(
        hal: H,
        index: u16,
        size: u16,
        features: QueueFeatures,
        format: QueueFormat,
        ring_bytes: impl FnOnce(u16) -> usize,
    ) -> Result<Self, QueueError> {
        super::check_size(index, size, format)?;
        let bytes = ring_bytes(size);
        let indirect = if features.indirect {
            Some(IndirectPool::new(hal.clone(), size)?)
        } else {
            None
        };
        let ring = RingMemory::new(hal, bytes)?;
        Ok(Self {
            index,
            size,
            event_idx: features.event_idx,
            ring,
            indirect,
            chains: (0..size).map(|_| None).collect(),
            in_flight: 0,
            unkicked: 0,
            callbacks: Callbacks::Enabled,
            broken: None,
            stats: QueueStats::default(),
        })
    }
}

impl<H: DmaHal, T: DeviceBuffer> QueueCore<H, T> {
    /// Whether an indirect table would carry a buffer of `segments` now.
    pub(super) fn indirect_fits(&self, segments: usize) -> bool {
        segments > 1
            && segments <= MAX_INDIRECT_SEGMENTS
            && self.indirect.as_ref().is_some_and(IndirectPool::has_free)
    }

    /// Whether a buffer of `segments` segments fits now in `free` descriptors (split) or ring
    /// slots (packed).
    pub(super) fn can_add(&self, segments: usize, free: usize) -> bool {
        if self.broken.is_some() || segments == 0 || segments > usize::from(self.size) {
            return false;
        }
        let needed = if self.indirect_fits(segments) {
            1
        } else {
            segments
        };
        needed <= free
    }

    /// The start of `add`, before any descriptor is written: refuses work on a broken queue,
    /// validates the buffer's shape, takes an indirect table when one fits, and checks that
    /// what the buffer needs fits in `free` descriptors (split) or ring slots (packed). On
    /// error nothing has changed (a table taken is returned).
    pub(super) fn plan_add(&mut self, buffer: &T, free: usize) -> Result<AddPlan, QueueError> {
        if let Some(error) = self.broken {
            return Err(QueueError::Broken(error));
        }
        let shape = Shape::of(buffer, self.size)?;
        let table = if self.indirect_fits(shape.segments) {
            self.indirect.as_mut().and_then(IndirectPool::take)
        } else {
            None
        };
        let needed = if table.is_some() { 1 } else { shape.segments };
        if needed > free {
            self.return_table(table);
            return Err(QueueError::Full { needed, free });
        }
        Ok(AddPlan {
            shape,
            table,
            needed,
        })
    }

    /// Writes every segment of `buffer` into indirect table `table` in `format`'s descriptor
    /// layout (§2.7.5.3, §2.8.7) and counts it. Returns the bus address and byte length of
    /// the table, for the one ring descriptor that points at it. On error the table is
    /// returned to the pool.
    pub(super) fn fill_indirect(
        &mut self,
        table: u16,
        buffer: &T,
        segments: usize,
        format: QueueFormat,
    ) -> Result<(u64, u32), QueueError> {
        let Some(pool) = self.indirect.as_mut() else {
            return Err(QueueError::EmptyBuffer);
        };
        for position in 0..segments {
            let Some(segment) = buffer.segment(position) else {
                pool.give(table);
                return Err(QueueError::MissingSegment { index: position });
            };
            match format {
                QueueFormat::Split => {
                    pool.store_split(table, position, segment, position + 1 == segments);
                }
                QueueFormat::Packed => pool.store_packed(table, position, segment),
            }
        }
        self.stats.indirect_buffers += 1;
        self.stats.indirect_descriptors += segments as u64;
        // At most 16 × 16 bytes.
        let table_len = u32::try_from(segments * DESC_SIZE).unwrap_or(u32::MAX);
        Ok((pool.phys(table), table_len))
    }

    /// The end of `add`, once the format has made the buffer available: records it in flight
    /// at `key` (split head index, packed buffer id) and counts it. `unkicked` is what it adds
    /// to the notification window (split: one head; packed: its slots).
    pub(super) fn commit_add(&mut self, key: u16, buffer: T, plan: &AddPlan, unkicked: u32) {
        // `needed <= free <= size <= 32768`.
        let descriptors = u16::try_from(plan.needed).unwrap_or(u16::MAX);
        self.chains[usize::from(key)] = Some(Chain {
            buffer,
            descriptors,
            capacity: plan.shape.writable_bytes,
            indirect_table: plan.table,
        });
        self.unkicked = self.unkicked.saturating_add(unkicked);
        self.in_flight += 1;
        self.stats.buffers_added += 1;
        self.stats.ring_descriptors += plan.needed as u64;
    }

    /// Returns an indirect table to the pool.
    pub(super) fn return_table(&mut self, table: Option<u16>) {
        if let (Some(table), Some(pool)) = (table, self.indirect.as_mut()) {
            pool.give(table);
        }
    }

    /// Ends a `should_notify` decision: the window of unkicked additions closes and the
    /// decision is counted.
    pub(super) fn count_kick(&mut self, needed: bool) -> bool {
        self.unkicked = 0;
        if needed {
            self.stats.kicks_needed += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        needed
    }

    /// Latches a device error: the queue is broken from now on and reports `error` to every
    /// later call.
    pub(super) fn fail<R>(&mut self, error: DeviceError) -> Result<R, DeviceError> {
        self.broken = Some(error);
        Err(error)
    }

    /// Validates a used element the device wrote (§2.7.8, §2.8.22): `id` (split: head index;
    /// packed: buffer id) is below the queue size and names a buffer in flight, and `len`
    /// fits that buffer's device-writable capacity. Returns the id. Does not latch the error.
    pub(super) fn check_used(&self, id: u32, len: u32) -> Result<u16, DeviceError> {
        let queue = self.index;
        let Some(id) = u16::try_from(id).ok().filter(|&id| id < self.size) else {
            return Err(DeviceError::IdOutOfRange {
                queue,
                id,
                size: self.size,
            });
        };
        let Some(chain) = &self.chains[usize::from(id)] else {
            return Err(DeviceError::IdNotInFlight { queue, id });
        };
        if len > chain.capacity {
            return Err(DeviceError::LengthTooLarge {
                queue,
                id,
                len,
                capacity: chain.capacity,
            });
        }
        Ok(id)
    }

    /// Takes the validated used buffer `id` out of flight, returns its indirect table and
    /// counts it. Returns the descriptors (split) or slots (packed) the format has to free,
    /// and the buffer with the length the device wrote.
    pub(super) fn take_used(&mut self, id: u16, len: u32) -> Result<(u16, Used<T>), DeviceError> {
        let Some(chain) = self.chains[usize::from(id)].take() else {
            let queue = self.index;
            return self.fail(DeviceError::IdNotInFlight { queue, id });
        };
        self.return_table(chain.indirect_table);
        self.in_flight -= 1;
        self.stats.buffers_used += 1;
        let used = Used {
            buffer: chain.buffer,
            len,
        };
        Ok((chain.descriptors, used))
    }
}

/// The public methods both formats implement the same way, inside `impl SplitQueue` and
/// `impl PackedQueue`: over the `core` field and the format's own `free_descriptors`, `arm`
/// and `delayed_distance`.
macro_rules! shared_queue_methods {
    () => {
        /// Queue index.
        pub fn index(&self) -> u16 {
            self.core.index
        }

        /// Queue size.
        pub fn size(&self) -> u16 {
            self.core.size
        }

        /// Buffers in flight.
        pub fn in_flight(&self) -> u16 {
            self.core.in_flight
        }

        /// Counters.
        pub fn stats(&self) -> $crate::queue::QueueStats {
            self.core.stats
        }

        /// The device error that broke this queue, if any.
        pub fn broken(&self) -> Option<$crate::queue::DeviceError> {
            self.core.broken
        }

        /// Whether a buffer of `segments` segments can be added now.
        pub fn can_add(&self, segments: usize) -> bool {
            self.core
                .can_add(segments, usize::from(self.free_descriptors()))
        }

        /// Arms the notification for the next used buffer; [`CallbackState::UsedPending`]
        /// when the ring already has used buffers.
        pub fn enable_cb(&mut self) -> $crate::queue::CallbackState {
            self.core.callbacks = $crate::queue::Callbacks::Enabled;
            self.arm(0)
        }

        /// Arms the notification for when 3/4 of what is in flight (split: buffers; packed:
        /// ring slots) is used (EVENT_IDX; otherwise as [`Self::enable_cb`]). Pending only if
        /// that point has already passed.
        pub fn enable_cb_delayed(&mut self) -> $crate::queue::CallbackState {
            if !self.core.event_idx {
                return self.enable_cb();
            }
            self.core.callbacks = $crate::queue::Callbacks::Delayed;
            let delay = self.delayed_distance();
            self.arm(delay)
        }
    };
}

pub(super) use shared_queue_methods;
