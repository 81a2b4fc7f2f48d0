//! The packed virtqueue (§2.8): one descriptor ring shared by both sides, with the driver and
//! device wrap counters of §2.8.1 telling available, used and stale descriptors apart, and the
//! driver/device event suppression structures of §2.8.10 ([`PackedLayout`]).
//!
//! Driver-side state, never read back from the device:
//! * `buffers`: per buffer id, the owned buffer in flight, the number of ring slots its chain
//!   occupies (the device writes one used descriptor per buffer and skips that many slots,
//!   §2.8.6), its device-writable capacity and its indirect table;
//! * `ids`: the free buffer ids; `free_slots`: free ring slots;
//! * the driver's position and wrap counter (`next_avail`, `avail_wrap`) and the position and
//!   wrap counter of the next used descriptor (`last_used`, `used_wrap`).
//!
//! Any queue size from 1 to 32768 works (§2.8.10.1: no power-of-two requirement).

use alloc::vec::Vec;

use super::indirect::{IndirectPool, MAX_INDIRECT_SEGMENTS};
use super::layout::{
    DESC_ADDR, DESC_LEN, DESC_SIZE, DescFlags, EVENT_FLAGS, EVENT_OFF_WRAP, EVENT_WRAP_BIT,
    PACKED_FLAGS, PACKED_ID, PackedLayout, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_MASK,
};
use super::{
    AddError, CallbackState, Callbacks, DeviceError, QueueAddresses, QueueError, QueueFeatures,
    QueueStats, Shape, Used, check_size,
};
use crate::barrier;
use crate::dma::{DeviceBuffer, DmaHal, Le16, Le32, Le64, RingMemory};
use crate::transport::QueueFormat;

/// A buffer in flight, by buffer id.
struct Chain<T> {
    buffer: T,
    /// Ring slots the chain occupies (1 for an indirect buffer).
    slots: u16,
    /// Device-writable bytes: the largest valid used `len`.
    capacity: u32,
    indirect_table: Option<u16>,
}

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
    index: u16,
    size: u16,
    event_idx: bool,
    layout: PackedLayout,
    ring: RingMemory<H>,
    buffers: Vec<Option<Chain<T>>>,
    ids: Vec<u16>,
    free_slots: u16,
    in_flight: u16,
    indirect: Option<IndirectPool<H>>,
    next_avail: u16,
    avail_wrap: bool,
    last_used: u16,
    used_wrap: bool,
    /// Ring slots made available since the last `should_notify`.
    unkicked: u32,
    /// Our copy of the driver event suppression `flags`.
    driver_event_flags: u16,
    callbacks: Callbacks,
    broken: Option<DeviceError>,
    stats: QueueStats,
}

impl<H: DmaHal + Clone, T: DeviceBuffer> PackedQueue<H, T> {
    /// Allocates a zeroed packed ring of `size` (1..=32768) and, with `features.indirect`, its
    /// indirect-table pool. Both wrap counters start at 1 (§2.8.1).
    pub fn new(hal: H, index: u16, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        check_size(index, size, QueueFormat::Packed)?;
        let layout = PackedLayout::new(size);
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
            buffers: (0..size).map(|_| None).collect(),
            ids: (0..size).rev().collect(),
            free_slots: size,
            in_flight: 0,
            indirect,
            next_avail: 0,
            avail_wrap: true,
            last_used: 0,
            used_wrap: true,
            unkicked: 0,
            driver_event_flags: RING_EVENT_FLAGS_ENABLE,
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

    /// Bus addresses of the descriptor ring and the driver and device event suppression
    /// structures.
    pub fn addresses(&self) -> QueueAddresses {
        QueueAddresses {
            desc: self.ring.phys(0),
            driver: self.ring.phys(self.layout.driver_event),
            device: self.ring.phys(self.layout.device_event),
        }
    }

    /// Free ring slots.
    pub fn free_descriptors(&self) -> u16 {
        self.free_slots
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

    fn indirect_fits(&self, segments: usize) -> bool {
        segments > 1
            && segments <= MAX_INDIRECT_SEGMENTS
            && self.indirect.as_ref().is_some_and(IndirectPool::has_free)
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
        needed <= usize::from(self.free_slots)
    }

    /// Advances a ring position by `count` slots, flipping the wrap counter when it passes
    /// the end (§2.8.1).
    fn advance(&self, slot: u16, wrap: bool, count: u16) -> (u16, bool) {
        let next = u32::from(slot) + u32::from(count);
        let size = u32::from(self.size);
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
        self.ring.store64(at + DESC_ADDR, Le64::new(addr));
        self.ring.store32(at + DESC_LEN, Le32::new(len));
        self.ring.store16(at + PACKED_ID, Le16::new(id));
    }

    fn write_flags(&mut self, slot: u16, flags: u16) {
        self.ring
            .store16(self.layout.desc(slot) + PACKED_FLAGS, Le16::new(flags));
    }

    /// Makes `buffer` available (§2.8.21.1): every descriptor but the first is written in
    /// full, then after a store-release the first one's flags, which exposes the whole chain
    /// (§2.8.17: the first descriptor is made available last).
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
        let free = usize::from(self.free_slots);
        let id = match self.ids.pop() {
            Some(id) if needed <= free => id,
            popped => {
                if let Some(id) = popped {
                    self.ids.push(id);
                }
                self.return_table(table);
                return Err(AddError {
                    error: QueueError::Full { needed, free },
                    buffer,
                });
            }
        };
        let head = self.next_avail;
        let head_wrap = self.avail_wrap;
        let head_flags;
        let (mut slot, mut wrap) = (head, head_wrap);
        if let Some(table) = table {
            let Some(pool) = self.indirect.as_mut() else {
                self.ids.push(id);
                return Err(AddError {
                    error: QueueError::EmptyBuffer,
                    buffer,
                });
            };
            for position in 0..shape.segments {
                let Some(segment) = buffer.segment(position) else {
                    pool.give(table);
                    self.ids.push(id);
                    let error = QueueError::MissingSegment { index: position };
                    return Err(AddError { error, buffer });
                };
                pool.store_packed(table, position, segment);
            }
            let table_phys = pool.phys(table);
            // At most 16 × 16 bytes.
            let table_len = u32::try_from(shape.segments * DESC_SIZE).unwrap_or(u32::MAX);
            self.write_body(head, table_phys, table_len, id);
            head_flags = DescFlags::INDIRECT.bits() | avail_bits(head_wrap);
            (slot, wrap) = self.advance(slot, wrap, 1);
            self.stats.indirect_buffers += 1;
            self.stats.indirect_descriptors += shape.segments as u64;
        } else {
            let mut first_flags = 0;
            for position in 0..shape.segments {
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
                if position + 1 < shape.segments {
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
        let slots = u16::try_from(needed).unwrap_or(u16::MAX);
        self.free_slots -= slots;
        self.buffers[usize::from(id)] = Some(Chain {
            buffer,
            slots,
            capacity: shape.writable_bytes,
            indirect_table: table,
        });
        self.unkicked = self.unkicked.saturating_add(u32::from(slots));
        self.in_flight += 1;
        self.stats.buffers_added += 1;
        self.stats.ring_descriptors += needed as u64;
        Ok(())
    }

    fn return_table(&mut self, table: Option<u16>) {
        if let (Some(table), Some(pool)) = (table, self.indirect.as_mut()) {
            pool.give(table);
        }
    }

    /// Whether the device asked to be notified of the descriptors made available since the
    /// last call, from the device event suppression structure (§2.8.10, §2.8.21.2).
    pub fn should_notify(&mut self) -> bool {
        if self.unkicked == 0 {
            return false;
        }
        // Store-load: the head flags we published must be visible before we read the
        // device's event suppression, or the device may go idle on the old ring state while we
        // read a stale DISABLE (§2.8.21.2).
        barrier::store_load();
        let event = self.layout.device_event;
        let flags = self.ring.load16(event + EVENT_FLAGS).get() & RING_EVENT_FLAGS_MASK;
        let needed = match flags {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                let off_wrap = self.ring.load16(event + EVENT_OFF_WRAP).get();
                self.kick_event_passed(off_wrap)
            }
            // ENABLE, DESC without EVENT_IDX, and the reserved value: notify.
            _ => true,
        };
        self.unkicked = 0;
        if needed {
            self.stats.kicks_needed += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        needed
    }

    /// Whether the slots made available since the last check, `[next_avail - unkicked,
    /// next_avail)`, include the device's event position. Positions are measured from the
    /// start of the driver's current lap; an event with the other wrap counter is taken to be
    /// in the previous lap (the device sets events at or behind what it has seen).
    fn kick_event_passed(&self, off_wrap: u16) -> bool {
        let size = i64::from(self.size);
        let offset = i64::from(off_wrap & !EVENT_WRAP_BIT);
        let wrap = off_wrap & EVENT_WRAP_BIT != 0;
        let event = if wrap == self.avail_wrap {
            offset
        } else {
            offset - size
        };
        let new = i64::from(self.next_avail);
        let old = new - i64::from(self.unkicked);
        old <= event && event < new
    }

    /// Classifies `slot` for a consumer whose used wrap counter is `wrap`, with
    /// `in_flight_slots` slots outstanding from there (§2.8.1, §2.8.22).
    fn classify(&self, slot: u16, wrap: bool, in_flight_slots: u16) -> SlotState {
        let flags = self
            .ring
            .load16(self.layout.desc(slot) + PACKED_FLAGS)
            .get();
        let avail = flags & DescFlags::AVAIL.bits() != 0;
        let used = flags & DescFlags::USED.bits() != 0;
        let queue = self.index;
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
        self.size - self.free_slots
    }

    /// Whether a used descriptor (or something `pop_used` will reject) is waiting.
    pub fn has_used(&self) -> bool {
        self.broken.is_some()
            || !matches!(
                self.classify(self.last_used, self.used_wrap, self.in_flight_slots()),
                SlotState::Pending
            )
    }

    fn fail(&mut self, error: DeviceError) -> Result<Option<Used<T>>, DeviceError> {
        self.broken = Some(error);
        Err(error)
    }

    /// Reads and validates the used descriptor at `slot`: the buffer id in range and in
    /// flight, the length within its writable capacity. Returns the id.
    fn read_used(&self, slot: u16) -> Result<(u16, u32), DeviceError> {
        // Acquire: id and len are read only after the flags that marked them used.
        barrier::observe();
        let at = self.layout.desc(slot);
        let id = self.ring.load16(at + PACKED_ID).get();
        let len = self.ring.load32(at + DESC_LEN).get();
        let queue = self.index;
        if id >= self.size {
            return Err(DeviceError::IdOutOfRange {
                queue,
                id: u32::from(id),
                size: self.size,
            });
        }
        let Some(chain) = &self.buffers[usize::from(id)] else {
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
        Ok((id, len))
    }

    /// The next used buffer (§2.8.22), validated.
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DeviceError> {
        if let Some(error) = self.broken {
            return Err(error);
        }
        let slot = self.last_used;
        match self.classify(slot, self.used_wrap, self.in_flight_slots()) {
            SlotState::Pending => return Ok(None),
            SlotState::Fault(error) => return self.fail(error),
            SlotState::Used => {}
        }
        let (id, len) = match self.read_used(slot) {
            Ok(found) => found,
            Err(error) => return self.fail(error),
        };
        let Some(chain) = self.buffers[usize::from(id)].take() else {
            return self.fail(DeviceError::IdNotInFlight {
                queue: self.index,
                id,
            });
        };
        self.ids.push(id);
        self.free_slots += chain.slots;
        (self.last_used, self.used_wrap) = self.advance(slot, self.used_wrap, chain.slots);
        self.return_table(chain.indirect_table);
        self.in_flight -= 1;
        self.stats.buffers_used += 1;
        if self.callbacks == Callbacks::Enabled && self.event_idx {
            // Keep the notification armed at the next used position (§2.8.10). Only an
            // optimisation: waiting safely always goes through `enable_cb`.
            let off_wrap = self.off_wrap(self.last_used, self.used_wrap);
            self.ring.store16(
                self.layout.driver_event + EVENT_OFF_WRAP,
                Le16::new(off_wrap),
            );
        }
        Ok(Some(Used {
            buffer: chain.buffer,
            len,
        }))
    }

    fn off_wrap(&self, slot: u16, wrap: bool) -> u16 {
        slot | if wrap { EVENT_WRAP_BIT } else { 0 }
    }

    fn set_driver_event_flags(&mut self, flags: u16) {
        if self.driver_event_flags != flags {
            self.driver_event_flags = flags;
            self.ring
                .store16(self.layout.driver_event + EVENT_FLAGS, Le16::new(flags));
        }
    }

    /// Suppresses used-buffer notifications: RING_EVENT_FLAGS_DISABLE (§2.8.10).
    pub fn disable_cb(&mut self) {
        self.callbacks = Callbacks::Disabled;
        self.set_driver_event_flags(RING_EVENT_FLAGS_DISABLE);
    }

    /// Arms the notification `delay` slots after `last_used` (RING_EVENT_FLAGS_DESC with
    /// EVENT_IDX, else ENABLE), then re-checks after a full fence.
    fn arm(&mut self, delay: u16) -> CallbackState {
        if self.event_idx {
            let (slot, wrap) = self.advance(self.last_used, self.used_wrap, delay);
            let off_wrap = self.off_wrap(slot, wrap);
            self.ring.store16(
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
        let delay = if self.event_idx { delay } else { 0 };
        if self.broken.is_some() || self.used_reaches_beyond(delay) {
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
            let Some(chain) = &self.buffers[usize::from(id)] else {
                return true;
            };
            if chain.slots > remaining {
                return true;
            }
            remaining -= chain.slots;
            walked += u32::from(chain.slots);
            (slot, wrap) = self.advance(slot, wrap, chain.slots);
        }
        true
    }

    /// Arms the notification for the next used descriptor.
    pub fn enable_cb(&mut self) -> CallbackState {
        self.callbacks = Callbacks::Enabled;
        self.arm(0)
    }

    /// Arms the notification for when 3/4 of the ring slots in flight are used (EVENT_IDX;
    /// otherwise as [`Self::enable_cb`]). Pending only if that point has already passed.
    pub fn enable_cb_delayed(&mut self) -> CallbackState {
        if !self.event_idx {
            return self.enable_cb();
        }
        self.callbacks = Callbacks::Delayed;
        let delay = self.delayed_distance();
        self.arm(delay)
    }

    /// Slots after `last_used` at which `enable_cb_delayed` arms: 3/4 of those in flight.
    pub(crate) fn delayed_distance(&self) -> u16 {
        u16::try_from(u32::from(self.in_flight_slots()) * 3 / 4).unwrap_or(0)
    }
}
