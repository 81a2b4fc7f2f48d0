//! The split virtqueue (§2.7): a descriptor table, an available ring the driver writes and a
//! used ring the device writes, in one DMA allocation ([`SplitLayout`]).
//!
//! Driver-side state, never visible to the device and never read back from it:
//! * `shadow`: a copy of every descriptor written to the table; chains are freed by walking
//!   the shadow's `next` links, so a device that rewrites the table cannot redirect the walk;
//! * `free`: the free-descriptor stack;
//! * `chains`: per head index, the owned buffer in flight, its descriptor count, its
//!   device-writable capacity (the bound on the used `len`) and its indirect table.

use alloc::vec::Vec;

use super::indirect::{IndirectPool, MAX_INDIRECT_SEGMENTS};
use super::layout::{
    AvailFlags, DESC_ADDR, DESC_FLAGS, DESC_LEN, DESC_NEXT, DESC_SIZE, DescFlags, RING_FLAGS,
    RING_IDX, SplitLayout, USED_ELEM_ID, USED_ELEM_LEN, UsedFlags,
};
use super::{
    AddError, CallbackState, Callbacks, DeviceError, QueueAddresses, QueueError, QueueFeatures,
    QueueStats, Shape, Used, check_size, need_event,
};
use crate::barrier;
use crate::dma::{DeviceBuffer, DmaHal, Le16, Le32, Le64, RingMemory};
use crate::transport::QueueFormat;

/// The driver's copy of one descriptor it wrote (§2.7.5).
#[derive(Clone, Copy, Debug, Default)]
struct ShadowDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A buffer in flight, by head index.
struct Chain<T> {
    buffer: T,
    /// Descriptors of the table it occupies (1 for an indirect buffer).
    descriptors: u16,
    /// Device-writable bytes: the largest valid used `len`.
    capacity: u32,
    indirect_table: Option<u16>,
}

/// A split virtqueue (§2.7) carrying owned buffers `T`.
///
/// Reset the device before dropping it (see [`super::VirtQueue`]).
pub struct SplitQueue<H: DmaHal + Clone, T: DeviceBuffer> {
    index: u16,
    size: u16,
    event_idx: bool,
    layout: SplitLayout,
    ring: RingMemory<H>,
    shadow: Vec<ShadowDesc>,
    free: Vec<u16>,
    chains: Vec<Option<Chain<T>>>,
    in_flight: u16,
    indirect: Option<IndirectPool<H>>,
    /// Free-running index of the next available-ring entry (what `avail.idx` holds).
    avail_idx: u16,
    /// Heads made available since the last `should_notify`.
    unkicked: u32,
    /// Free-running index of the next used-ring entry to consume.
    last_used: u16,
    /// Our copy of `avail.flags` (§2.7.7).
    avail_flags: u16,
    /// With EVENT_IDX while notifications are disabled: the `used_event` value last parked
    /// ahead of the consumer (see [`Self::disable_cb`]).
    parked_used_event: u16,
    callbacks: Callbacks,
    broken: Option<DeviceError>,
    stats: QueueStats,
}

impl<H: DmaHal + Clone, T: DeviceBuffer> SplitQueue<H, T> {
    /// Allocates a zeroed split ring of `size` (a power of two ≤ 32768) and, with
    /// `features.indirect`, its indirect-table pool.
    pub fn new(hal: H, index: u16, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        check_size(index, size, QueueFormat::Split)?;
        let layout = SplitLayout::new(size);
        let indirect = if features.indirect {
            Some(IndirectPool::new(hal.clone(), size)?)
        } else {
            None
        };
        let ring = RingMemory::new(hal, layout.total)?;
        Ok(Self {
            index,
            size,
            event_idx: features.event_idx,
            layout,
            ring,
            shadow: alloc::vec![ShadowDesc::default(); usize::from(size)],
            free: (0..size).rev().collect(),
            chains: (0..size).map(|_| None).collect(),
            in_flight: 0,
            indirect,
            avail_idx: 0,
            unkicked: 0,
            last_used: 0,
            avail_flags: 0,
            parked_used_event: 0,
            callbacks: Callbacks::Enabled,
            broken: None,
            stats: QueueStats::default(),
        })
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Bus addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> QueueAddresses {
        QueueAddresses {
            desc: self.ring.phys(0),
            driver: self.ring.phys(self.layout.avail),
            device: self.ring.phys(self.layout.used),
        }
    }

    /// Free descriptor-table entries.
    pub fn free_descriptors(&self) -> u16 {
        // At most `size` entries, so it fits.
        u16::try_from(self.free.len()).unwrap_or(u16::MAX)
    }

    /// Buffers in flight.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The device error that broke this queue, if any.
    pub fn broken(&self) -> Option<DeviceError> {
        self.broken
    }

    /// Whether an indirect table would carry a buffer of `segments` now.
    fn indirect_fits(&self, segments: usize) -> bool {
        segments > 1
            && segments <= MAX_INDIRECT_SEGMENTS
            && self.indirect.as_ref().is_some_and(|pool| pool.has_free())
    }

    /// Whether a buffer of `segments` segments can be added now.
    pub fn can_add(&self, segments: usize) -> bool {
        if self.broken.is_some() || segments == 0 || segments > usize::from(self.size) {
            return false;
        }
        let needed = if self.indirect_fits(segments) {
            1
        } else {
            segments
        };
        needed <= self.free.len()
    }

    /// Writes descriptor `index` to the table and to the shadow (§2.7.13.1).
    fn write_desc(&mut self, index: u16, desc: ShadowDesc) {
        let at = self.layout.desc(index);
        self.ring.store64(at + DESC_ADDR, Le64::new(desc.addr));
        self.ring.store32(at + DESC_LEN, Le32::new(desc.len));
        self.ring.store16(at + DESC_FLAGS, Le16::new(desc.flags));
        self.ring.store16(at + DESC_NEXT, Le16::new(desc.next));
        self.shadow[usize::from(index)] = desc;
    }

    /// Makes `buffer` available (§2.7.13): descriptors (direct chain or one indirect
    /// descriptor), the available-ring entry, a store-release, then `avail.idx`.
    pub fn add(&mut self, buffer: T) -> Result<(), AddError<T>> {
        if let Some(error) = self.broken {
            return Err(AddError {
                error: QueueError::Broken(error),
                buffer,
            });
        }
        let shape = match Shape::of(&buffer, self.size) {
            Ok(shape) => shape,
            Err(error) => return Err(AddError { error, buffer }),
        };
        let table = if self.indirect_fits(shape.segments) {
            self.indirect.as_mut().and_then(IndirectPool::take)
        } else {
            None
        };
        let needed = if table.is_some() { 1 } else { shape.segments };
        if needed > self.free.len() {
            self.return_table(table);
            let error = QueueError::Full {
                needed,
                free: self.free.len(),
            };
            return Err(AddError { error, buffer });
        }
        // The chain uses the top `needed` entries of the free stack, in pop order; nothing is
        // taken off the stack until every segment has been written, so a failure leaves the
        // queue unchanged (unpublished descriptors are harmless).
        let top = self.free.len();
        let descriptor_at = |free: &[u16], position: usize| free[top - 1 - position];
        let head = descriptor_at(&self.free, 0);
        if let Some(table) = table {
            let Some(pool) = self.indirect.as_mut() else {
                return Err(AddError {
                    error: QueueError::EmptyBuffer,
                    buffer,
                });
            };
            for position in 0..shape.segments {
                let Some(segment) = buffer.segment(position) else {
                    pool.give(table);
                    let error = QueueError::MissingSegment { index: position };
                    return Err(AddError { error, buffer });
                };
                pool.store_split(table, position, segment, position + 1 == shape.segments);
            }
            let table_len = shape.segments * DESC_SIZE;
            let desc = ShadowDesc {
                addr: pool.phys(table),
                // At most 16 × 16 bytes.
                len: u32::try_from(table_len).unwrap_or(u32::MAX),
                flags: DescFlags::INDIRECT.bits(),
                next: 0,
            };
            self.write_desc(head, desc);
            self.stats.indirect_buffers += 1;
            self.stats.indirect_descriptors += shape.segments as u64;
        } else {
            for position in 0..shape.segments {
                let Some(segment) = buffer.segment(position) else {
                    let error = QueueError::MissingSegment { index: position };
                    return Err(AddError { error, buffer });
                };
                let last = position + 1 == shape.segments;
                let mut flags = if segment.device_writable {
                    DescFlags::WRITE.bits()
                } else {
                    0
                };
                let mut next = 0;
                if !last {
                    flags |= DescFlags::NEXT.bits();
                    next = descriptor_at(&self.free, position + 1);
                }
                let index = descriptor_at(&self.free, position);
                let desc = ShadowDesc {
                    addr: segment.phys,
                    len: segment.len,
                    flags,
                    next,
                };
                self.write_desc(index, desc);
            }
        }
        self.free.truncate(top - needed);
        self.stats.ring_descriptors += needed as u64;
        // `needed <= free.len() <= size <= 32768`.
        let descriptors = u16::try_from(needed).unwrap_or(u16::MAX);
        self.chains[usize::from(head)] = Some(Chain {
            buffer,
            descriptors,
            capacity: shape.writable_bytes,
            indirect_table: table,
        });

        // §2.7.13.2: the head goes into the next available-ring entry.
        let slot = self.avail_idx & (self.size - 1);
        self.ring
            .store16(self.layout.avail_entry(slot), Le16::new(head));
        // Descriptors and the ring entry must be visible before the new `avail.idx`
        // (§2.7.13.3.1 "suitable memory barrier before the idx update").
        barrier::publish();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ring
            .store16(self.layout.avail + RING_IDX, Le16::new(self.avail_idx));

        self.unkicked = self.unkicked.saturating_add(1);
        self.in_flight += 1;
        self.stats.buffers_added += 1;
        Ok(())
    }

    fn return_table(&mut self, table: Option<u16>) {
        if let (Some(table), Some(pool)) = (table, self.indirect.as_mut()) {
            pool.give(table);
        }
    }

    /// Whether the device asked to be notified of the buffers added since the last call
    /// (§2.7.10, §2.7.13.4).
    pub fn should_notify(&mut self) -> bool {
        if self.unkicked == 0 {
            return false;
        }
        // Store-load: our `avail.idx` store must be visible before we read the device's
        // `avail_event` / `used.flags`, or the device may decide to sleep on the old idx while
        // we read a stale "don't notify" (§2.7.13.4.1).
        barrier::store_load();
        let needed = if self.event_idx {
            // With 2^16 or more adds since the last check the window is ambiguous: notify.
            match u16::try_from(self.unkicked) {
                Ok(added) if added < u16::MAX => {
                    let event = self.ring.load16(self.layout.avail_event()).get();
                    need_event(event, self.avail_idx, self.avail_idx.wrapping_sub(added))
                }
                _ => true,
            }
        } else {
            let flags = self.ring.load16(self.layout.used + RING_FLAGS).get();
            flags & UsedFlags::NO_NOTIFY.bits() == 0
        };
        self.unkicked = 0;
        if needed {
            self.stats.kicks_needed += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        needed
    }

    fn used_idx(&self) -> u16 {
        self.ring.load16(self.layout.used + RING_IDX).get()
    }

    /// Whether the used ring has entries the driver has not consumed.
    pub fn has_used(&self) -> bool {
        self.broken.is_some() || self.used_idx() != self.last_used
    }

    fn fail(&mut self, error: DeviceError) -> Result<Option<Used<T>>, DeviceError> {
        self.broken = Some(error);
        Err(error)
    }

    /// The next used buffer (§2.7.14), validated: the used index moved by at most the number
    /// of buffers in flight, the id is a head in flight, the length fits its writable part.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DeviceError> {
        if let Some(error) = self.broken {
            return Err(error);
        }
        let published = self.used_idx();
        let pending = published.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.in_flight {
            return self.fail(DeviceError::UsedIndexJumped {
                queue: self.index,
                last_seen: self.last_used,
                published,
                in_flight: self.in_flight,
            });
        }
        // Acquire: the used element is read only after the `used.idx` that published it.
        barrier::observe();
        let entry = self.layout.used_entry(self.last_used & (self.size - 1));
        let id = self.ring.load32(entry + USED_ELEM_ID).get();
        let len = self.ring.load32(entry + USED_ELEM_LEN).get();
        let Some(head) = u16::try_from(id).ok().filter(|&head| head < self.size) else {
            return self.fail(DeviceError::IdOutOfRange {
                queue: self.index,
                id,
                size: self.size,
            });
        };
        let capacity = match &self.chains[usize::from(head)] {
            Some(chain) => chain.capacity,
            None => {
                return self.fail(DeviceError::IdNotInFlight {
                    queue: self.index,
                    id: head,
                });
            }
        };
        if len > capacity {
            let error = DeviceError::LengthTooLarge {
                queue: self.index,
                id: head,
                len,
                capacity,
            };
            return self.fail(error);
        }
        let Some(chain) = self.chains[usize::from(head)].take() else {
            return self.fail(DeviceError::IdNotInFlight {
                queue: self.index,
                id: head,
            });
        };
        // Free the chain by walking the shadow (never the device-visible table).
        let mut index = head;
        for position in 0..chain.descriptors {
            self.free.push(index);
            if position + 1 < chain.descriptors {
                index = self.shadow[usize::from(index)].next;
            }
        }
        self.return_table(chain.indirect_table);
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        self.stats.buffers_used += 1;
        if self.callbacks == Callbacks::Enabled && self.event_idx {
            // Keep the notification armed for the next entry (§2.7.7). Without a fence this
            // is only an optimisation: waiting safely always goes through `enable_cb`.
            self.ring
                .store16(self.layout.used_event(), Le16::new(self.last_used));
        } else if self.callbacks == Callbacks::Disabled
            && self.event_idx
            && self.parked_used_event.wrapping_sub(self.last_used) <= self.size
        {
            self.park_used_event();
        }
        Ok(Some(Used {
            buffer: chain.buffer,
            len,
        }))
    }

    /// Suppresses used-buffer notifications (§2.7.7): `VIRTQ_AVAIL_F_NO_INTERRUPT`, or with
    /// EVENT_IDX (where the flag is not honoured) `used_event` parked far ahead of the consumer.
    ///
    /// The device notifies when the used index steps over `used_event` (§2.7.7.2,
    /// `vring_need_event`). Parking it at `last_used + 2^15` and moving it on again whenever
    /// the consumer comes within `size` of it keeps it out of every window the device can
    /// publish: the device is never more than `size` entries ahead of `last_used`, so it never
    /// reaches `used_event`, and a whole wrap of the 16-bit index is never behind it. A
    /// disabled queue therefore never interrupts, not even once per 65,536 completions (which
    /// is what `used_event = last_used - 1`, or Linux's `used_event = 0`, gives a busy-polling
    /// driver). The bound needs `size < 2^15`; a 32768-entry ring can still see one such
    /// notification, which the driver tolerates like any spurious one (§2.7.7.1). One store
    /// every `2^15 - size` completions.
    pub fn disable_cb(&mut self) {
        self.callbacks = Callbacks::Disabled;
        if self.event_idx {
            self.park_used_event();
        } else if self.avail_flags & AvailFlags::NO_INTERRUPT.bits() == 0 {
            self.avail_flags |= AvailFlags::NO_INTERRUPT.bits();
            self.ring
                .store16(self.layout.avail + RING_FLAGS, Le16::new(self.avail_flags));
        }
    }

    /// Stores `used_event = last_used + 2^15` (see [`Self::disable_cb`]).
    fn park_used_event(&mut self) {
        self.parked_used_event = self.last_used.wrapping_add(0x8000);
        self.ring
            .store16(self.layout.used_event(), Le16::new(self.parked_used_event));
    }

    /// Arms the used-buffer notification at `last_used + delay` and re-checks (§2.7.14 note).
    fn arm(&mut self, delay: u16) -> CallbackState {
        if self.event_idx {
            let event = self.last_used.wrapping_add(delay);
            self.ring
                .store16(self.layout.used_event(), Le16::new(event));
        } else if self.avail_flags & AvailFlags::NO_INTERRUPT.bits() != 0 {
            self.avail_flags &= !AvailFlags::NO_INTERRUPT.bits();
            self.ring
                .store16(self.layout.avail + RING_FLAGS, Le16::new(self.avail_flags));
        }
        // Store-load: the arming store must be visible before we re-read `used.idx`. If the
        // device wrote an entry before seeing it, we see that entry here; if after, the device
        // sees the arming and notifies. Without this fence both could miss (the lost-interrupt
        // race of enable_cb).
        barrier::store_load();
        let used = self.used_idx().wrapping_sub(self.last_used);
        // Without EVENT_IDX any used entry is pending; with it, only if the device already
        // wrote the entry at the event index (it may have checked `used_event` before our
        // store), or wrote nonsense that `pop_used` will report.
        let passed = if self.event_idx {
            used > delay
        } else {
            used > 0
        };
        if self.broken.is_some() || passed || used > self.in_flight {
            CallbackState::UsedPending
        } else {
            CallbackState::Armed
        }
    }

    /// Arms the notification for the next used buffer; [`CallbackState::UsedPending`] when
    /// the used ring already has entries.
    pub fn enable_cb(&mut self) -> CallbackState {
        self.callbacks = Callbacks::Enabled;
        self.arm(0)
    }

    /// Arms the notification for when 3/4 of the buffers in flight are used (EVENT_IDX;
    /// otherwise as [`Self::enable_cb`]). Pending only if that point has already passed.
    pub fn enable_cb_delayed(&mut self) -> CallbackState {
        if !self.event_idx {
            return self.enable_cb();
        }
        self.callbacks = Callbacks::Delayed;
        let delay = self.delayed_distance();
        self.arm(delay)
    }

    /// Entries after `last_used` at which `enable_cb_delayed` arms: 3/4 of those in flight.
    pub(crate) fn delayed_distance(&self) -> u16 {
        // in_flight <= 32768, so 3/4 of it fits in u16 after the u32 product.
        u16::try_from(u32::from(self.in_flight) * 3 / 4).unwrap_or(0)
    }
}
