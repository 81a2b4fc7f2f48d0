//! The packed virtqueue (§2.8): one descriptor ring shared by both sides, with the driver and
//! device wrap counters of §2.8.1 telling available, used and stale descriptors apart, and the
//! driver/device event suppression structures of §2.8.10 ([`PackedLayout`]).
//!
//! This module owns what is packed-specific: the layout, the wrap counters, the slot states a
//! used descriptor can read back as, and event suppression through the driver and device
//! event suppression structures. What both formats do the same way (the buffers in flight
//! keyed by buffer id, shape checks, indirect tables, validation of the used id and length,
//! counters, the broken state) is [`QueueCore`].
//!
//! Driver-side state, never read back from the device:
//! * the core's chains: per buffer id, the owned buffer in flight, the number of ring slots
//!   its chain occupies (the device writes one used descriptor per buffer and skips that many
//!   slots, §2.8.6), its device-writable capacity and its indirect table;
//! * `ids`: the free buffer ids; `free_slots`: free ring slots;
//! * the driver's position and wrap counter (`next_avail`, `avail_wrap`) and the position and
//!   wrap counter of the next used descriptor (`last_used`, `used_wrap`).
//!
//! Any queue size from 1 to 32768 works (§2.8.10.1: no power-of-two requirement).

use alloc::vec::Vec;

use super::core::{QueueCore, shared_queue_methods};
use super::layout::{
    DESC_ADDR, DESC_LEN, DescFlags, EVENT_FLAGS, EVENT_OFF_WRAP, EVENT_WRAP_BIT, PACKED_FLAGS,
    PACKED_ID, PackedLayout, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_MASK,
};
use super::{
    AddError, CallbackState, Callbacks, DeviceError, QueueAddresses, QueueError, QueueFeatures,
    Used,
};
use crate::barrier;
use crate::dma::{DeviceBuffer, DmaHal, Le16, Le32, Le64};
use crate::transport::QueueFormat;

/// What the driver finds at a ring slot it expects the next used descriptor in.
enum SlotState {
    /// Not used yet (or, with nothing in flight, stale from an earlier lap).
    Pending,
    /// A used descriptor of the current lap.
    Used,
    /// Flags no honest device produces there.
    Fault(DeviceError),
}

/// The AVAIL/USED bits with which the driver makes a descriptor available in a lap whose
/// driver wrap counter is `wrap`: AVAIL = wrap, USED = !wrap (§2.8.1, §2.8.21.1).
const fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        DescFlags::AVAIL.bits()
    } else {
        DescFlags::USED.bits()
    }
}

/// A packed virtqueue (§2.8) carrying owned buffers `T`.
///
/// Reset the device before dropping it (see [`super::VirtQueue`]).
pub struct PackedQueue<H: DmaHal + Clone, T: DeviceBuffer> {
    /// What both formats share; its chains are keyed by buffer id.
    core: QueueCore<H, T>,
    layout: PackedLayout,
    ids: Vec<u16>,
    free_slots: u16,
    next_avail: u16,
    avail_wrap: bool,
    last_used: u16,
    used_wrap: bool,
    /// Our copy of the driver event suppression `flags`.
    driver_event_flags: u16,
}

impl<H: DmaHal + Clone, T: DeviceBuffer> PackedQueue<H, T> {
    /// Allocates a zeroed packed ring of `size` (1..=32768) and, with `features.indirect`, its
    /// indirect-table pool. Both wrap counters start at 1 (§2.8.1).
    pub fn new(hal: H, index: u16, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        let core = QueueCore::new(hal, index, size, features, QueueFormat::Packed, |size| {
            PackedLayout::new(size).total
        })?;
        Ok(Self {
            core,
            layout: PackedLayout::new(size),
            ids: (0..size).rev().collect(),
            free_slots: size,
            next_avail: 0,
            avail_wrap: true,
            last_used: 0,
            used_wrap: true,
            driver_event_flags: RING_EVENT_FLAGS_ENABLE,
        })
    }

    shared_queue_methods!();

    /// Bus addresses of the descriptor ring and the driver and device event suppression
    /// structures.
    pub fn addresses(&self) -> QueueAddresses {
        QueueAddresses {
            desc: self.core.ring.phys(0),
            driver: self.core.ring.phys(self.layout.driver_event),
            device: self.core.ring.phys(self.layout.device_event),
        }
    }

    /// Free ring slots.
    pub fn free_descriptors(&self) -> u16 {
        self.free_slots
    }

    /// Advances a ring position by `count` slots, flipping the wrap counter when it passes
    /// the end (§2.8.1).
    fn advance(&self, slot: u16, wrap: bool, count: u16) -> (u16, bool) {
        let next = u32::from(slot) + u32::from(count);
        let size = u32::from(self.core.size);
        // `slot < size` and `count <= size`, so one subtraction suffices and the result fits.
        if next >= size {
            (u16::try_from(next - size).unwrap_or(0), !wrap)
        } else {
            (u16::try_from(next).unwrap_or(0), wrap)
        }
    }

    /// Writes a descriptor's address, length and id (not its flags).
    fn write_body(&mut self, slot: u16, addr: u64, len: u32, id: u16) {
        let at = self.layout.desc(slot);
        let ring = &mut self.core.ring;
        ring.store64(at + DESC_ADDR, Le64::new(addr));
        ring.store32(at + DESC_LEN, Le32::new(len));
        ring.store16(at + PACKED_ID, Le16::new(id));
    }

    fn write_flags(&mut self, slot: u16, flags: u16) {
        self.core
            .ring
            .store16(self.layout.desc(slot) + PACKED_FLAGS, Le16::new(flags));
    }

    /// Makes `buffer` available (§2.8.21.1): every descriptor but the first is written in
    /// full, then after a store-release the first one's flags, which exposes the whole chain
    /// (§2.8.17: the first descriptor is made available last).
    pub fn add(&mut self, buffer: T) -> Result<(), AddError<T>> {
        let free = usize::from(self.free_slots);
        let plan = match self.core.plan_add(&buffer, free) {
            Ok(plan) => plan,
            Err(error) => return Err(AddError { error, buffer }),
        };
        let Some(id) = self.ids.pop() else {
            // Unreachable while `free_slots` counts right (a free slot means a free id), but
            // refused like a full ring rather than trusted.
            self.core.return_table(plan.table);
            let error = QueueError::Full {
                needed: plan.needed,
                free,
            };
            return Err(AddError { error, buffer });
        };
        let segments = plan.shape.segments;
        let head = self.next_avail;
        let head_wrap = self.avail_wrap;
        let head_flags;
        let (mut slot, mut wrap) = (head, head_wrap);
        if let Some(table) = plan.table {
            let filled = self
                .core
                .fill_indirect(table, &buffer, segments, QueueFormat::Packed);
            let (table_phys, table_len) = match filled {
                Ok(table) => table,
                Err(error) => {
                    self.ids.push(id);
                    return Err(AddError { error, buffer });
                }
            };
            self.write_body(head, table_phys, table_len, id);
            head_flags = DescFlags::INDIRECT.bits() | avail_bits(head_wrap);
            (slot, wrap) = self.advance(slot, wrap, 1);
        } else {
            let mut first_flags = 0;
            for position in 0..segments {
                let Some(segment) = buffer.segment(position) else {
                    // Nothing is exposed: the head's flags were never written.
                    self.ids.push(id);
                    let error = QueueError::MissingSegment { index: position };
                    return Err(AddError { error, buffer });
                };
                let mut flags = avail_bits(wrap);
                if segment.device_writable {
                    flags |= DescFlags::WRITE.bits();
                }
                if position + 1 < segments {
                    flags |= DescFlags::NEXT.bits();
                }
                self.write_body(slot, segment.phys, segment.len, id);
                if position == 0 {
                    first_flags = flags;
                } else {
                    self.write_flags(slot, flags);
                }
                (slot, wrap) = self.advance(slot, wrap, 1);
            }
            head_flags = first_flags;
        }
        // Store-release: the rest of the chain (and the head's body) must be visible before
        // the head's flags make it available (§2.8.21.1.1).
        barrier::publish();
        self.write_flags(head, head_flags);
        self.next_avail = slot;
        self.avail_wrap = wrap;

        // `needed <= free_slots <= 32768`.
        let slots = u16::try_from(plan.needed).unwrap_or(u16::MAX);
        self.free_slots -= slots;
        self.core.commit_add(id, buffer, &plan, u32::from(slots));
        Ok(())
    }

    /// Whether the device asked to be notified of the descriptors made available since the
    /// last call, from the device event suppression structure (§2.8.10, §2.8.21.2).
    pub fn should_notify(&mut self) -> bool {
        if self.core.unkicked == 0 {
            return false;
        }
        // Store-load: the head flags we published must be visible before we read the
        // device's event suppression, or the device may go idle on the old ring state while we
        // read a stale DISABLE (§2.8.21.2).
        barrier::store_load();
        let event = self.layout.device_event;
        let flags = self.core.ring.load16(event + EVENT_FLAGS).get() & RING_EVENT_FLAGS_MASK;
        let needed = match flags {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.core.event_idx => {
                let off_wrap = self.core.ring.load16(event + EVENT_OFF_WRAP).get();
                self.kick_event_passed(off_wrap)
            }
            // ENABLE, DESC without EVENT_IDX, and the reserved value: notify.
            _ => true,
        };
        self.core.count_kick(needed)
    }

    /// Whether the slots made available since the last check, `[next_avail - unkicked,
    /// next_avail)`, include the device's event position. Positions are measured from the
    /// start of the driver's current lap; an event with the other wrap counter is taken to be
    /// in the previous lap (the device sets events at or behind what it has seen).
    fn kick_event_passed(&self, off_wrap: u16) -> bool {
        let size = i64::from(self.core.size);
        let offset = i64::from(off_wrap & !EVENT_WRAP_BIT);
        let wrap = off_wrap & EVENT_WRAP_BIT != 0;
        let event = if wrap == self.avail_wrap {
            offset
        } else {
            offset - size
        };
        let new = i64::from(self.next_avail);
        let old = new - i64::from(self.core.unkicked);
        old <= event && event < new
    }

    /// Classifies `slot` for a consumer whose used wrap counter is `wrap`, with
    /// `in_flight_slots` slots outstanding from there (§2.8.1, §2.8.22).
    fn classify(&self, slot: u16, wrap: bool, in_flight_slots: u16) -> SlotState {
        let flags = self
            .core
            .ring
            .load16(self.layout.desc(slot) + PACKED_FLAGS)
            .get();
        let avail = flags & DescFlags::AVAIL.bits() != 0;
        let used = flags & DescFlags::USED.bits() != 0;
        let queue = self.core.index;
        if avail == used {
            match (used == wrap, in_flight_slots > 0) {
                (true, true) => SlotState::Used,
                (true, false) => {
                    SlotState::Fault(DeviceError::UsedWhileIdle { queue, slot, flags })
                }
                // This slot was made available in the current lap (it is in flight), so a
                // used descriptor here must carry `wrap`.
                (false, true) => SlotState::Fault(DeviceError::BadWrapCounter {
                    queue,
                    slot,
                    flags,
                    expected_wrap: wrap,
                }),
                (false, false) => SlotState::Pending,
            }
        } else if in_flight_slots > 0 && avail != wrap {
            // In flight, the driver wrote AVAIL = wrap, USED = !wrap; the inverse is written by
            // nobody.
            SlotState::Fault(DeviceError::IncoherentFlags { queue, slot, flags })
        } else {
            SlotState::Pending
        }
    }

    fn in_flight_slots(&self) -> u16 {
        self.core.size - self.free_slots
    }

    /// Whether a used descriptor (or something `pop_used` will reject) is waiting.
    pub fn has_used(&self) -> bool {
        self.core.broken.is_some()
            || !matches!(
                self.classify(self.last_used, self.used_wrap, self.in_flight_slots()),
                SlotState::Pending
            )
    }

    /// Reads and validates the used descriptor at `slot`: the buffer id in range and in
    /// flight, the length within its writable capacity. Returns the id and the length.
    fn read_used(&self, slot: u16) -> Result<(u16, u32), DeviceError> {
        // Acquire: id and len are read only after the flags that marked them used.
        barrier::observe();
        let at = self.layout.desc(slot);
        let id = self.core.ring.load16(at + PACKED_ID).get();
        let len = self.core.ring.load32(at + DESC_LEN).get();
        let id = self.core.check_used(u32::from(id), len)?;
        Ok((id, len))
    }

    /// The next used buffer (§2.8.22), validated.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DeviceError> {
        if let Some(error) = self.core.broken {
            return Err(error);
        }
        let slot = self.last_used;
        match self.classify(slot, self.used_wrap, self.in_flight_slots()) {
            SlotState::Pending => return Ok(None),
            SlotState::Fault(error) => return self.core.fail(error),
            SlotState::Used => {}
        }
        let (id, len) = match self.read_used(slot) {
            Ok(found) => found,
            Err(error) => return self.core.fail(error),
        };
        let (slots, used) = self.core.take_used(id, len)?;
        self.ids.push(id);
        self.free_slots += slots;
        (self.last_used, self.used_wrap) = self.advance(slot, self.used_wrap, slots);
        if self.core.callbacks == Callbacks::Enabled && self.core.event_idx {
            // Keep the notification armed at the next used position (§2.8.10). Only an
            // optimisation: waiting safely always goes through `enable_cb`.
            let off_wrap = self.off_wrap(self.last_used, self.used_wrap);
            self.core.ring.store16(
                self.layout.driver_event + EVENT_OFF_WRAP,
                Le16::new(off_wrap),
            );
        }
        Ok(Some(used))
    }

    fn off_wrap(&self, slot: u16, wrap: bool) -> u16 {
        slot | if wrap { EVENT_WRAP_BIT } else { 0 }
    }

    fn set_driver_event_flags(&mut self, flags: u16) {
        if self.driver_event_flags != flags {
            self.driver_event_flags = flags;
            self.core
                .ring
                .store16(self.layout.driver_event + EVENT_FLAGS, Le16::new(flags));
        }
    }

    /// Suppresses used-buffer notifications: RING_EVENT_FLAGS_DISABLE (§2.8.10).
    pub fn disable_cb(&mut self) {
        self.core.callbacks = Callbacks::Disabled;
        self.set_driver_event_flags(RING_EVENT_FLAGS_DISABLE);
    }

    /// Arms the notification `delay` slots after `last_used` (RING_EVENT_FLAGS_DESC with
    /// EVENT_IDX, else ENABLE), then re-checks after a full fence.
    fn arm(&mut self, delay: u16) -> CallbackState {
        if self.core.event_idx {
            let (slot, wrap) = self.advance(self.last_used, self.used_wrap, delay);
            let off_wrap = self.off_wrap(slot, wrap);
            self.core.ring.store16(
                self.layout.driver_event + EVENT_OFF_WRAP,
                Le16::new(off_wrap),
            );
            // Release: the device must not see DESC with a stale offset.
            barrier::publish();
            self.set_driver_event_flags(RING_EVENT_FLAGS_DESC);
        } else {
            self.set_driver_event_flags(RING_EVENT_FLAGS_ENABLE);
        }
        // Store-load: the arming stores must be visible before we re-read the ring; a used
        // descriptor written before the device saw them shows up below, one written after
        // makes the device notify (the lost-interrupt race of enable_cb).
        barrier::store_load();
        let delay = if self.core.event_idx { delay } else { 0 };
        if self.core.broken.is_some() || self.used_reaches_beyond(delay) {
            CallbackState::UsedPending
        } else {
            CallbackState::Armed
        }
    }

    /// Whether the device's used descriptors already extend more than `distance` slots past
    /// `last_used` (so it has written past an event placed `distance` slots ahead), walking
    /// the used descriptors by their chains' slot counts. Anything invalid counts as "yes", so
    /// that the caller polls and `pop_used` reports it.
    fn used_reaches_beyond(&self, distance: u16) -> bool {
        let (mut slot, mut wrap) = (self.last_used, self.used_wrap);
        let mut remaining = self.in_flight_slots();
        let mut walked: u32 = 0;
        while walked <= u32::from(distance) {
            match self.classify(slot, wrap, remaining) {
                SlotState::Pending => return false,
                SlotState::Fault(_) => return true,
                SlotState::Used => {}
            }
            let Ok((id, _)) = self.read_used(slot) else {
                return true;
            };
            let Some(chain) = &self.core.chains[usize::from(id)] else {
                return true;
            };
            let slots = chain.descriptors;
            if slots > remaining {
                return true;
            }
            remaining -= slots;
            walked += u32::from(slots);
            (slot, wrap) = self.advance(slot, wrap, slots);
        }
        true
    }

    /// Slots after `last_used` at which `enable_cb_delayed` arms: 3/4 of those in flight.
    pub(crate) fn delayed_distance(&self) -> u16 {
        u16::try_from(u32::from(self.in_flight_slots()) * 3 / 4).unwrap_or(0)
    }
}
