//! The device side of one queue for the fuzz entry points: it takes buffers off the available
//! side (split §2.7.13 / packed §2.8.21, following chains and indirect tables as the driver
//! wrote them), completes them with any length, and misbehaves on request (arbitrary used
//! entries, indices and flags, scribbles over the areas a device writes). It reads and writes
//! by bus address through [`HostDma`], so it sees the bytes, never the driver's shadow.
//!
//! Unlike the test fakes it never reports protocol errors: anything it cannot read is "nothing
//! available", and its positions may disagree with the driver's after a hostile step (that is
//! the point).

use alloc::vec::Vec;

use crate::dma::host::HostDma;
use crate::queue::{QueueAddresses, QueueFormat};

/// VIRTQ_DESC_F_NEXT (§2.7.5, §2.8.6).
const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE (§2.7.5, §2.8.3).
const F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT (§2.7.5.3, §2.8.7).
const F_INDIRECT: u16 = 4;
/// VIRTQ_DESC_F_AVAIL, packed (§2.8.1).
const F_AVAIL: u16 = 1 << 7;
/// VIRTQ_DESC_F_USED, packed (§2.8.1).
const F_USED: u16 = 1 << 15;
/// Descriptor size of both formats (§2.7.5, §2.8.13).
const DESC: u64 = 16;
/// Largest indirect table walked (the driver writes at most 16 entries).
const MAX_INDIRECT: u32 = 64;

/// One buffer the device took.
#[derive(Clone, Debug)]
pub(super) struct Taken {
    /// Split: head index; packed: buffer id.
    pub id: u16,
    /// Ring descriptors the chain occupies (packed: slots the device skips when using it).
    pub slots: u16,
    /// Device-readable elements (bus address, length).
    pub readable: Vec<(u64, u32)>,
    /// Device-writable elements.
    pub writable: Vec<(u64, u32)>,
}

impl Taken {
    /// Total device-writable bytes.
    pub fn capacity(&self) -> u32 {
        self.writable
            .iter()
            .fold(0u32, |sum, &(_, len)| sum.saturating_add(len))
    }
}

/// The device's view of one queue.
pub(super) struct RingDevice<'a> {
    dma: &'a HostDma,
    format: QueueFormat,
    size: u16,
    addrs: QueueAddresses,
    /// Split: next available-ring entry to consume, next used-ring entry to write.
    next_avail: u16,
    used_idx: u16,
    /// Packed: next slot to look at for an available descriptor, next slot to write a used
    /// descriptor to, and their wrap counters (both start at 1, §2.8.1).
    avail_slot: u16,
    avail_wrap: bool,
    used_slot: u16,
    used_wrap: bool,
}

impl<'a> RingDevice<'a> {
    pub fn new(dma: &'a HostDma, format: QueueFormat, size: u16, addrs: QueueAddresses) -> Self {
        Self {
            dma,
            format,
            size: size.max(1),
            addrs,
            next_avail: 0,
            used_idx: 0,
            avail_slot: 0,
            avail_wrap: true,
            used_slot: 0,
            used_wrap: true,
        }
    }

    fn split(&self) -> bool {
        self.format == QueueFormat::Split
    }

    fn read_desc(&self, at: u64) -> Option<(u64, u32, u16, u16)> {
        Some((
            self.dma.read_u64(at).ok()?,
            self.dma.read_u32(at + 8).ok()?,
            self.dma.read_u16(at + 12).ok()?,
            self.dma.read_u16(at + 14).ok()?,
        ))
    }

    fn push(taken: &mut Taken, addr: u64, len: u32, flags: u16) {
        if flags & F_WRITE != 0 {
            taken.writable.push((addr, len));
        } else {
            taken.readable.push((addr, len));
        }
    }

    /// The elements of an indirect table (split entries chain by `next`; packed entries are
    /// consecutive).
    fn read_indirect(&self, taken: &mut Taken, table: u64, len: u32) -> Option<()> {
        let count = (len / 16).min(MAX_INDIRECT);
        let mut index = 0u32;
        for _ in 0..count {
            let (addr, elen, flags, next) = self.read_desc(table + DESC * u64::from(index))?;
            let (flags, next) = if self.split() {
                (flags, next)
            } else {
                // Packed: the id field sits where split has `flags`; flags are the last field.
                (next, 0)
            };
            Self::push(taken, addr, elen, flags);
            if self.split() {
                if flags & F_NEXT == 0 {
                    break;
                }
                index = u32::from(next);
                if index >= count {
                    break;
                }
            } else {
                index += 1;
            }
        }
        Some(())
    }

    /// Takes the next available buffer, if any.
    pub fn take(&mut self) -> Option<Taken> {
        if self.split() {
            self.take_split()
        } else {
            self.take_packed()
        }
    }

    fn take_split(&mut self) -> Option<Taken> {
        let avail_idx = self.dma.read_u16(self.addrs.driver + 2).ok()?;
        if avail_idx == self.next_avail {
            return None;
        }
        let entry = self.addrs.driver + 4 + 2 * u64::from(self.next_avail % self.size);
        let head = self.dma.read_u16(entry).ok()?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut taken = Taken {
            id: head,
            slots: 0,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut index = head;
        while taken.slots < self.size && index < self.size {
            taken.slots += 1;
            let (addr, len, flags, next) =
                self.read_desc(self.addrs.desc + DESC * u64::from(index))?;
            if flags & F_INDIRECT != 0 {
                self.read_indirect(&mut taken, addr, len)?;
                break;
            }
            Self::push(&mut taken, addr, len, flags);
            if flags & F_NEXT == 0 {
                break;
            }
            index = next;
        }
        Some(taken)
    }

    fn packed_available(flags: u16, wrap: bool) -> bool {
        (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
    }

    fn step(&self, slot: u16, wrap: bool) -> (u16, bool) {
        if slot + 1 >= self.size {
            (0, !wrap)
        } else {
            (slot + 1, wrap)
        }
    }

    fn take_packed(&mut self) -> Option<Taken> {
        let (mut slot, mut wrap) = (self.avail_slot, self.avail_wrap);
        let mut taken = Taken {
            id: 0,
            slots: 0,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        while taken.slots < self.size {
            let (addr, len, id, flags) =
                self.read_desc(self.addrs.desc + DESC * u64::from(slot))?;
            if !Self::packed_available(flags, wrap) {
                if taken.slots == 0 {
                    return None;
                }
                break;
            }
            if taken.slots == 0 {
                taken.id = id;
            }
            taken.slots += 1;
            (slot, wrap) = self.step(slot, wrap);
            if flags & F_INDIRECT != 0 {
                self.read_indirect(&mut taken, addr, len)?;
                break;
            }
            Self::push(&mut taken, addr, len, flags);
            if flags & F_NEXT == 0 {
                break;
            }
        }
        (self.avail_slot, self.avail_wrap) = (slot, wrap);
        Some(taken)
    }

    /// Writes the used entry for `taken` with `len` (split: published by [`Self::publish`];
    /// packed: visible at once through its flags).
    pub fn complete(&mut self, taken: &Taken, len: u32) {
        if self.split() {
            let at = self.addrs.device + 4 + 8 * u64::from(self.used_idx % self.size);
            let _ = self.dma.write_u32(at, u32::from(taken.id));
            let _ = self.dma.write_u32(at + 4, len);
            self.used_idx = self.used_idx.wrapping_add(1);
        } else {
            let at = self.addrs.desc + DESC * u64::from(self.used_slot);
            let _ = self.dma.write_u32(at + 8, len);
            let _ = self.dma.write_u16(at + 12, taken.id);
            let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
            let _ = self.dma.write_u16(at + 14, flags);
            for _ in 0..taken.slots.max(1) {
                (self.used_slot, self.used_wrap) = self.step(self.used_slot, self.used_wrap);
            }
        }
    }

    /// Split: publishes the used entries written so far (`used.idx`).
    pub fn publish(&mut self) {
        if self.split() {
            let _ = self.dma.write_u16(self.addrs.device + 2, self.used_idx);
        }
    }

    /// Hostile: a used entry with any id, length and (packed) flags at `slot`, relative to the
    /// device's used position when `relative`.
    pub fn raw_used(&mut self, slot: u16, relative: bool, id: u32, len: u32, flags: u16) {
        if self.split() {
            let base = if relative { self.used_idx } else { 0 };
            let slot = base.wrapping_add(slot) % self.size;
            let at = self.addrs.device + 4 + 8 * u64::from(slot);
            let _ = self.dma.write_u32(at, id);
            let _ = self.dma.write_u32(at + 4, len);
        } else {
            let base = if relative { self.used_slot } else { 0 };
            let slot = ((u32::from(base) + u32::from(slot)) % u32::from(self.size)) as u16;
            let at = self.addrs.desc + DESC * u64::from(slot);
            let _ = self.dma.write_u32(at + 8, len);
            let _ = self.dma.write_u16(at + 12, id as u16);
            let _ = self.dma.write_u16(at + 14, flags);
        }
    }

    /// Hostile: split publishes `used.idx` = the device's index plus `delta`, or `absolute`;
    /// packed moves its used position by `delta` slots without writing anything.
    pub fn raw_index(&mut self, delta: u16, absolute: Option<u16>) {
        if self.split() {
            let idx = absolute.unwrap_or(self.used_idx.wrapping_add(delta));
            self.used_idx = idx;
            let _ = self.dma.write_u16(self.addrs.device + 2, idx);
        } else {
            for _ in 0..delta % (2 * self.size + 1) {
                (self.used_slot, self.used_wrap) = self.step(self.used_slot, self.used_wrap);
            }
        }
    }

    /// Hostile: writes `value` at an even `offset` into an area the device writes (split: the
    /// used ring with its flags, index and `avail_event`; packed: the descriptor ring and both
    /// event suppression structures).
    pub fn scribble(&mut self, offset: u32, value: u16) {
        let size = u64::from(self.size);
        let (base, len) = if self.split() {
            (self.addrs.device, 4 + 8 * size + 2)
        } else {
            match offset % 3 {
                0 => (self.addrs.desc, DESC * size),
                1 => (self.addrs.driver, 4),
                _ => (self.addrs.device, 4),
            }
        };
        let at = base + (u64::from(offset) % len) / 2 * 2;
        let _ = self.dma.write_u16(at, value);
    }
}
