//! The split virtqueue (§2.7): a descriptor table, an available ring the driver writes and a
//! used ring the device writes, in one DMA allocation ([`SplitLayout`]).
//!
//! This module owns what is split-specific: the layout, the descriptor chains linked by
//! `next`, the free-running available and used indices, and event suppression through
//! `avail.flags`/`used.flags` or `used_event`/`avail_event`. What both formats do the same way
//! (the buffers in flight keyed by head index, shape checks, indirect tables, validation of
//! the used id and length, counters, the broken state) is [`QueueCore`].
//!
//! Driver-side state, never visible to the device and never read back from it:
//! * `shadow`: a copy of every descriptor written to the table; chains are freed by walking
//!   the shadow's `next` links, so a device that rewrites the table cannot redirect the walk;
//! * `free`: the free-descriptor stack;
//! * the core's chains: per head index, the owned buffer in flight, its descriptor count, its
//!   device-writable capacity (the bound on the used `len`) and its indirect table.

use alloc::vec::Vec;

use super::core::{QueueCore, shared_queue_methods};
use super::layout::{
    AvailFlags, DESC_ADDR, DESC_FLAGS, DESC_LEN, DESC_NEXT, DescFlags, RING_FLAGS, RING_IDX,
    SplitLayout, USED_ELEM_ID, USED_ELEM_LEN, UsedFlags,
};
use super::{
    AddError, CallbackState, Callbacks, DeviceError, QueueAddresses, QueueError, QueueFeatures,
    Used, need_event,
};
use crate::barrier;
use crate::dma::{DeviceBuffer, DmaHal, Le16, Le32, Le64};
use crate::transport::QueueFormat;

/// The driver's copy of one descriptor it wrote (§2.7.5).
#[derive(Clone, Copy, Debug, Default)]
struct ShadowDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue (§2.7) carrying owned buffers `T`.
///
/// Reset the device before dropping it (see [`super::VirtQueue`]).
pub struct SplitQueue<H: DmaHal + Clone, T: DeviceBuffer> {
    /// What both formats share; its chains are keyed by head index.
    core: QueueCore<H, T>,
    layout: SplitLayout,
    shadow: Vec<ShadowDesc>,
    free: Vec<u16>,
    /// Free-running index of the next available-ring entry (what `avail.idx` holds).
    avail_idx: u16,
    /// Free-running index of the next used-ring entry to consume.
    last_used: u16,
    /// Our copy of `avail.flags` (§2.7.7).
    avail_flags: u16,
    /// With EVENT_IDX while notifications are disabled: the `used_event` value last parked
    /// ahead of the consumer (see [`Self::disable_cb`]).
    parked_used_event: u16,
}

impl<H: DmaHal + Clone, T: DeviceBuffer> SplitQueue<H, T> {
    /// Allocates a zeroed split ring of `size` (a power of two ≤ 32768) and, with
    /// `features.indirect`, its indirect-table pool.
    pub fn new(hal: H, index: u16, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        let core = QueueCore::new(hal, index, size, features, QueueFormat::Split, |size| {
            SplitLayout::new(size).total
        })?;
        Ok(Self {
            core,
            layout: SplitLayout::new(size),
            shadow: alloc::vec![ShadowDesc::default(); usize::from(size)],
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            avail_flags: 0,
            parked_used_event: 0,
        })
    }

    shared_queue_methods!();

    /// Bus addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> QueueAddresses {
        QueueAddresses {
            desc: self.core.ring.phys(0),
            driver: self.core.ring.phys(self.layout.avail),
            device: self.core.ring.phys(self.layout.used),
        }
    }

    /// Free descriptor-table entries.
    pub fn free_descriptors(&self) -> u16 {
        // At most `size` entries, so it fits.
        u16::try_from(self.free.len()).unwrap_or(u16::MAX)
    }

    /// Writes descriptor `index` to the table and to the shadow (§2.7.13.1).
    fn write_desc(&mut self, index: u16, desc: ShadowDesc) {
        let at = self.layout.desc(index);
        let ring = &mut self.core.ring;
        ring.store64(at + DESC_ADDR, Le64::new(desc.addr));
        ring.store32(at + DESC_LEN, Le32::new(desc.len));
        ring.store16(at + DESC_FLAGS, Le16::new(desc.flags));
        ring.store16(at + DESC_NEXT, Le16::new(desc.next));
        self.shadow[usize::from(index)] = desc;
    }

    /// Makes `buffer` available (§2.7.13): descriptors (direct chain or one indirect
    /// descriptor), the available-ring entry, a store-release, then `avail.idx`.
    pub fn add(&mut self, buffer: T) -> Result<(), AddError<T>> {
        let plan = match self.core.plan_add(&buffer, self.free.len()) {
            Ok(plan) => plan,
            Err(error) => return Err(AddError { error, buffer }),
        };
        let segments = plan.shape.segments;
        // The chain uses the top `needed` entries of the free stack, in pop order; nothing is
        // taken off the stack until every segment has been written, so a failure leaves the
        // queue unchanged (unpublished descriptors are harmless).
        let top = self.free.len();
        let descriptor_at = |free: &[u16], position: usize| free[top - 1 - position];
        let head = descriptor_at(&self.free, 0);
        if let Some(table) = plan.table {
            let filled = self
                .core
                .fill_indirect(table, &buffer, segments, QueueFormat::Split);
            let (addr, len) = match filled {
                Ok(table) => table,
                Err(error) => return Err(AddError { error, buffer }),
            };
            let flags = DescFlags::INDIRECT.bits();
            let desc = ShadowDesc {
                addr,
                len,
                flags,
                next: 0,
            };
            self.write_desc(head, desc);
        } else {
            for position in 0..segments {
                let Some(segment) = buffer.segment(position) else {
                    let error = QueueError::MissingSegment { index: position };
                    return Err(AddError { error, buffer });
                };
                let last = position + 1 == segments;
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
        self.free.truncate(top - plan.needed);

        // §2.7.13.2: the head goes into the next available-ring entry.
        let slot = self.avail_idx & (self.core.size - 1);
        self.core
            .ring
            .store16(self.layout.avail_entry(slot), Le16::new(head));
        // Descriptors and the ring entry must be visible before the new `avail.idx`
        // (§2.7.13.3.1 "suitable memory barrier before the idx update").
        barrier::publish();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.core
            .ring
            .store16(self.layout.avail + RING_IDX, Le16::new(self.avail_idx));

        self.core.commit_add(head, buffer, &plan, 1);
        Ok(())
    }

    /// Whether the device asked to be notified of the buffers added since the last call
    /// (§2.7.10, §2.7.13.4).
    pub fn should_notify(&mut self) -> bool {
        if self.core.unkicked == 0 {
            return false;
        }
        // Store-load: our `avail.idx` store must be visible before we read the device's
        // `avail_event` / `used.flags`, or the device may decide to sleep on the old idx while
        // we read a stale "don't notify" (§2.7.13.4.1).
        barrier::store_load();
        let needed = if self.core.event_idx {
            // With 2^16 or more adds since the last check the window is ambiguous: notify.
            match u16::try_from(self.core.unkicked) {
                Ok(added) if added < u16::MAX => {
                    let event = self.core.ring.load16(self.layout.avail_event()).get();
                    need_event(event, self.avail_idx, self.avail_idx.wrapping_sub(added))
                }
                _ => true,
            }
        } else {
            let flags = self.core.ring.load16(self.layout.used + RING_FLAGS).get();
            flags & UsedFlags::NO_NOTIFY.bits() == 0
        };
        self.core.count_kick(needed)
    }

    fn used_idx(&self) -> u16 {
        self.core.ring.load16(self.layout.used + RING_IDX).get()
    }

    /// Whether the used ring has entries the driver has not consumed.
    pub fn has_used(&self) -> bool {
        self.core.broken.is_some() || self.used_idx() != self.last_used
    }

    /// The next used buffer (§2.7.14), validated: the used index moved by at most the number
    /// of buffers in flight, the id is a head in flight, the length fits its writable part.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DeviceError> {
        if let Some(error) = self.core.broken {
            return Err(error);
        }
        let published = self.used_idx();
        let pending = published.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.core.in_flight {
            return self.core.fail(DeviceError::UsedIndexJumped {
                queue: self.core.index,
                last_seen: self.last_used,
                published,
                in_flight: self.core.in_flight,
            });
        }
        // Acquire: the used element is read only after the `used.idx` that published it.
        barrier::observe();
        let entry = self
            .layout
            .used_entry(self.last_used & (self.core.size - 1));
        let id = self.core.ring.load32(entry + USED_ELEM_ID).get();
        let len = self.core.ring.load32(entry + USED_ELEM_LEN).get();
        let head = match self.core.check_used(id, len) {
            Ok(head) => head,
            Err(error) => return self.core.fail(error),
        };
        let (descriptors, used) = self.core.take_used(head, len)?;
        // Free the chain by walking the shadow (never the device-visible table).
        let mut index = head;
        for position in 0..descriptors {
            self.free.push(index);
            if position + 1 < descriptors {
                index = self.shadow[usize::from(index)].next;
            }
        }
        self.last_used = self.last_used.wrapping_add(1);
        if self.core.callbacks == Callbacks::Enabled && self.core.event_idx {
            // Keep the notification armed for the next entry (§2.7.7). Without a fence this
            // is only an optimisation: waiting safely always goes through `enable_cb`.
            self.core
                .ring
                .store16(self.layout.used_event(), Le16::new(self.last_used));
        } else if self.core.callbacks == Callbacks::Disabled
            && self.core.event_idx
            && self.parked_used_event.wrapping_sub(self.last_used) <= self.core.size
        {
            self.park_used_event();
        }
        Ok(Some(used))
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
        self.core.callbacks = Callbacks::Disabled;
        if self.core.event_idx {
            self.park_used_event();
        } else if self.avail_flags & AvailFlags::NO_INTERRUPT.bits() == 0 {
            self.avail_flags |= AvailFlags::NO_INTERRUPT.bits();
            self.store_avail_flags();
        }
    }

    /// Stores our copy of `avail.flags` (§2.7.7).
    fn store_avail_flags(&mut self) {
        self.core
            .ring
            .store16(self.layout.avail + RING_FLAGS, Le16::new(self.avail_flags));
    }

    /// Stores `used_event = last_used + 2^15` (see [`Self::disable_cb`]).
    fn park_used_event(&mut self) {
        self.parked_used_event = self.last_used.wrapping_add(0x8000);
        self.core
            .ring
            .store16(self.layout.used_event(), Le16::new(self.parked_used_event));
    }

    /// Arms the used-buffer notification at `last_used + delay` and re-checks (§2.7.14 note).
    fn arm(&mut self, delay: u16) -> CallbackState {
        if self.core.event_idx {
            let event = self.last_used.wrapping_add(delay);
            self.core
                .ring
                .store16(self.layout.used_event(), Le16::new(event));
        } else if self.avail_flags & AvailFlags::NO_INTERRUPT.bits() != 0 {
            self.avail_flags &= !AvailFlags::NO_INTERRUPT.bits();
            self.store_avail_flags();
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
        let passed = if self.core.event_idx {
            used > delay
        } else {
            used > 0
        };
        if self.core.broken.is_some() || passed || used > self.core.in_flight {
            CallbackState::UsedPending
        } else {
            CallbackState::Armed
        }
    }

    /// Entries after `last_used` at which `enable_cb_delayed` arms: 3/4 of those in flight.
    pub(crate) fn delayed_distance(&self) -> u16 {
        // in_flight <= 32768, so 3/4 of it fits in u16 after the u32 product.
        u16::try_from(u32::from(self.core.in_flight) * 3 / 4).unwrap_or(0)
    }
}
