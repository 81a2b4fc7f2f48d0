//! Wire layouts of the two ring formats: the `#[repr(C)]` structs of §2.7 (split) and §2.8
//! (packed) with little-endian field types, their flag values, and the byte offsets the
//! queues use, derived with `offset_of!` and checked at compile time. These structs are never
//! overlaid on ring memory (that would create references to device-written memory); they are
//! the declarative source of the offsets that [`crate::dma::RingMemory`] accesses.

use core::mem::{offset_of, size_of};

use crate::dma::{Le16, Le32, Le64};

/// `struct virtq_desc` (§2.7.5): one split-ring descriptor, also the entry of a split indirect
/// table (§2.7.5.3).
#[repr(C)]
pub struct SplitDesc {
    /// le64, bus address of the buffer element (§2.7.5).
    pub addr: Le64,
    /// le32, length of the element in bytes (§2.7.5).
    pub len: Le32,
    /// le16, VIRTQ_DESC_F_* (§2.7.5).
    pub flags: Le16,
    /// le16, index of the next descriptor when flags has NEXT (§2.7.5).
    pub next: Le16,
}

/// `struct virtq_used_elem` (§2.7.8).
#[repr(C)]
pub struct UsedElem {
    /// le32, head index of the used descriptor chain (§2.7.8).
    pub id: Le32,
    /// le32, bytes written into the device-writable part of the chain (§2.7.8).
    pub len: Le32,
}

/// The header shared by `struct virtq_avail` (§2.7.6) and `struct virtq_used` (§2.7.8); the
/// ring array follows, then `used_event` / `avail_event` with VIRTIO_F_EVENT_IDX.
#[repr(C)]
pub struct RingHeader {
    /// le16, VIRTQ_AVAIL_F_NO_INTERRUPT or VIRTQ_USED_F_NO_NOTIFY (§2.7.7, §2.7.10).
    pub flags: Le16,
    /// le16, free-running index of the next entry the writer will fill (§2.7.6, §2.7.8).
    pub idx: Le16,
}

/// `struct pvirtq_desc` (§2.8.13): one packed-ring descriptor, also the entry of a packed
/// indirect table (§2.8.7).
#[repr(C)]
pub struct PackedDesc {
    /// le64, bus address (§2.8.4).
    pub addr: Le64,
    /// le32, length; for a used descriptor, the bytes written (§2.8.4).
    pub len: Le32,
    /// le16, buffer id (§2.8.13).
    pub id: Le16,
    /// le16, VIRTQ_DESC_F_* including AVAIL (bit 7) and USED (bit 15) (§2.8.1).
    pub flags: Le16,
}

/// `struct pvirtq_event_suppress` (§2.8.14): the driver and device event suppression areas.
#[repr(C)]
pub struct EventSuppress {
    /// le16, `desc_event_off` (bits 0..15) and `desc_event_wrap` (bit 15) (§2.8.14).
    pub off_wrap: Le16,
    /// le16, `desc_event_flags` in bits 0..2: RING_EVENT_FLAGS_* (§2.8.10).
    pub flags: Le16,
}

const _: () = assert!(size_of::<SplitDesc>() == 16);
const _: () = assert!(offset_of!(SplitDesc, len) == 8);
const _: () = assert!(offset_of!(SplitDesc, flags) == 12);
const _: () = assert!(offset_of!(SplitDesc, next) == 14);
const _: () = assert!(size_of::<UsedElem>() == 8);
const _: () = assert!(offset_of!(UsedElem, len) == 4);
const _: () = assert!(size_of::<RingHeader>() == 4);
const _: () = assert!(offset_of!(RingHeader, idx) == 2);
const _: () = assert!(size_of::<PackedDesc>() == 16);
const _: () = assert!(offset_of!(PackedDesc, len) == 8);
const _: () = assert!(offset_of!(PackedDesc, id) == 12);
const _: () = assert!(offset_of!(PackedDesc, flags) == 14);
const _: () = assert!(size_of::<EventSuppress>() == 4);
const _: () = assert!(offset_of!(EventSuppress, flags) == 2);

/// Size of one descriptor of either format (§2.7.5, §2.8.13).
pub const DESC_SIZE: usize = size_of::<SplitDesc>();
/// `virtq_desc.addr` offset.
pub const DESC_ADDR: usize = offset_of!(SplitDesc, addr);
/// `virtq_desc.len` offset.
pub const DESC_LEN: usize = offset_of!(SplitDesc, len);
/// `virtq_desc.flags` offset.
pub const DESC_FLAGS: usize = offset_of!(SplitDesc, flags);
/// `virtq_desc.next` offset.
pub const DESC_NEXT: usize = offset_of!(SplitDesc, next);
/// `pvirtq_desc.id` offset.
pub const PACKED_ID: usize = offset_of!(PackedDesc, id);
/// `pvirtq_desc.flags` offset.
pub const PACKED_FLAGS: usize = offset_of!(PackedDesc, flags);
/// `flags` offset in the available/used ring header.
pub const RING_FLAGS: usize = offset_of!(RingHeader, flags);
/// `idx` offset in the available/used ring header.
pub const RING_IDX: usize = offset_of!(RingHeader, idx);
/// Offset of `ring[0]` in the available and used rings.
pub const RING_ENTRIES: usize = size_of::<RingHeader>();
/// Size of one used element.
pub const USED_ELEM_SIZE: usize = size_of::<UsedElem>();
/// `virtq_used_elem.id` offset.
pub const USED_ELEM_ID: usize = offset_of!(UsedElem, id);
/// `virtq_used_elem.len` offset.
pub const USED_ELEM_LEN: usize = offset_of!(UsedElem, len);
/// `off_wrap` offset in an event suppression structure.
pub const EVENT_OFF_WRAP: usize = offset_of!(EventSuppress, off_wrap);
/// `flags` offset in an event suppression structure.
pub const EVENT_FLAGS: usize = offset_of!(EventSuppress, flags);
/// Size of an event suppression structure.
pub const EVENT_SIZE: usize = size_of::<EventSuppress>();

bitflags::bitflags! {
    /// A descriptor's `flags` (§2.7.5 split, §2.8.1 and §2.8.6 packed).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DescFlags: u16 {
        /// VIRTQ_DESC_F_NEXT: the chain continues (§2.7.5; §2.8.6).
        const NEXT = 1;
        /// VIRTQ_DESC_F_WRITE: device-writable element (§2.7.5; §2.8.3).
        const WRITE = 2;
        /// VIRTQ_DESC_F_INDIRECT: the element is an indirect table (§2.7.5.3; §2.8.7).
        const INDIRECT = 4;
        /// VIRTQ_DESC_F_AVAIL (packed): equals the driver's wrap counter when made available
        /// (§2.8.1).
        const AVAIL = 1 << 7;
        /// VIRTQ_DESC_F_USED (packed): equals the device's wrap counter when used (§2.8.1).
        const USED = 1 << 15;
    }
}

bitflags::bitflags! {
    /// The available ring's `flags` (split, §2.7.6).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct AvailFlags: u16 {
        /// VIRTQ_AVAIL_F_NO_INTERRUPT: the driver asks for no used-buffer notifications
        /// (§2.7.7).
        const NO_INTERRUPT = 1;
    }
}

bitflags::bitflags! {
    /// The used ring's `flags` (split, §2.7.8).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct UsedFlags: u16 {
        /// VIRTQ_USED_F_NO_NOTIFY: the device asks for no available-buffer notifications
        /// (§2.7.10).
        const NO_NOTIFY = 1;
    }
}

// The packed ring's event suppression `flags` (§2.8.10) hold a two-bit value, not flags:
/// RING_EVENT_FLAGS_ENABLE (§2.8.10).
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// RING_EVENT_FLAGS_DISABLE (§2.8.10).
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// RING_EVENT_FLAGS_DESC: notify at `off_wrap`; only with VIRTIO_F_EVENT_IDX (§2.8.10).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;
/// Mask of `desc_event_flags` (§2.8.14).
pub const RING_EVENT_FLAGS_MASK: u16 = 3;
/// Bit of `off_wrap` holding the wrap counter (§2.8.14).
pub const EVENT_WRAP_BIT: u16 = 1 << 15;

/// The used-ring offset is rounded up to this (the spec needs 4, §2.7): keeping the
/// device-written used ring off the driver-written available ring's cache lines avoids false
/// sharing between the two writers.
pub const CACHE_LINE: usize = 64;

/// Split-ring layout of one allocation (§2.7, alignments 16/2/4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLayout {
    /// Queue size.
    pub size: u16,
    /// Offset of the available ring (the driver area).
    pub avail: usize,
    /// Offset of the used ring (the device area).
    pub used: usize,
    /// Total bytes.
    pub total: usize,
}

impl SplitLayout {
    /// The layout for `size` entries: descriptor table at 0 (16 × size, align 16), available
    /// ring (6 + 2 × size, align 2) right after it, used ring (6 + 8 × size, align 4) on the
    /// next cache line.
    pub const fn new(size: u16) -> Self {
        let n = size as usize;
        let avail = DESC_SIZE * n;
        let avail_end = avail + RING_ENTRIES + 2 * n + 2;
        let used = avail_end.div_ceil(CACHE_LINE) * CACHE_LINE;
        let total = used + RING_ENTRIES + USED_ELEM_SIZE * n + 2;
        Self {
            size,
            avail,
            used,
            total,
        }
    }

    /// Offset of descriptor `index`.
    pub const fn desc(&self, index: u16) -> usize {
        DESC_SIZE * index as usize
    }
    /// Offset of `avail.ring[slot]`.
    pub const fn avail_entry(&self, slot: u16) -> usize {
        self.avail + RING_ENTRIES + 2 * slot as usize
    }
    /// Offset of `used_event` (after `avail.ring`, §2.7.6).
    pub const fn used_event(&self) -> usize {
        self.avail_entry(self.size)
    }
    /// Offset of `used.ring[slot]`.
    pub const fn used_entry(&self, slot: u16) -> usize {
        self.used + RING_ENTRIES + USED_ELEM_SIZE * slot as usize
    }
    /// Offset of `avail_event` (after `used.ring`, §2.7.8).
    pub const fn avail_event(&self) -> usize {
        self.used_entry(self.size)
    }
}

/// Packed-ring layout of one allocation (§2.8.10.1: descriptor ring align 16, both event
/// suppression structures align 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    /// Queue size.
    pub size: u16,
    /// Offset of the driver event suppression structure (the driver area).
    pub driver_event: usize,
    /// Offset of the device event suppression structure (the device area), on its own cache
    /// line because the device writes it.
    pub device_event: usize,
    /// Total bytes.
    pub total: usize,
}

impl PackedLayout {
    /// The layout for `size` descriptors.
    pub const fn new(size: u16) -> Self {
        let driver_event = DESC_SIZE * size as usize;
        let device_event = (driver_event + EVENT_SIZE).div_ceil(CACHE_LINE) * CACHE_LINE;
        Self {
            size,
            driver_event,
            device_event,
            total: device_event + EVENT_SIZE,
        }
    }

    /// Offset of descriptor slot `slot`.
    pub const fn desc(&self, slot: u16) -> usize {
        DESC_SIZE * slot as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_layout_meets_the_spec_alignments_and_sizes() {
        for size in [1u16, 2, 4, 256, 32768] {
            let layout = SplitLayout::new(size);
            let n = size as usize;
            assert_eq!(layout.avail % 2, 0);
            assert_eq!(layout.used % 4, 0);
            assert!(layout.avail >= 16 * n, "descriptor table is 16 × size");
            assert!(
                layout.used >= layout.avail + 6 + 2 * n,
                "available ring is 6 + 2 × size"
            );
            assert_eq!(
                layout.total,
                layout.used + 6 + 8 * n,
                "used ring is 6 + 8 × size"
            );
            assert_eq!(layout.used_event(), layout.avail + 4 + 2 * n);
            assert_eq!(layout.avail_event(), layout.used + 4 + 8 * n);
        }
    }

    #[test]
    fn packed_layout_meets_the_spec_alignments() {
        for size in [1u16, 3, 255, 32768] {
            let layout = PackedLayout::new(size);
            assert_eq!(layout.driver_event % 4, 0);
            assert_eq!(layout.device_event % 4, 0);
            assert!(layout.driver_event >= 16 * size as usize);
            assert!(layout.device_event >= layout.driver_event + 4);
            assert_eq!(layout.total, layout.device_event + 4);
        }
    }
}
