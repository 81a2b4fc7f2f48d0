//! The pool of indirect descriptor tables (VIRTIO_F_INDIRECT_DESC; §2.7.5.3 split, §2.8.7
//! packed): one DMA allocation cut into fixed tables of [`MAX_INDIRECT_SEGMENTS`] descriptors,
//! handed out per buffer and returned when the buffer comes back. The device only reads these
//! tables, but it may do so while the buffer is in flight, so they are ring memory: volatile
//! stores only, never references.

use alloc::vec::Vec;

use super::layout::{DESC_ADDR, DESC_FLAGS, DESC_LEN, DESC_NEXT, DESC_SIZE, PACKED_ID};
use crate::dma::{DmaError, DmaHal, Le16, Le32, Le64, RingMemory, Segment};

/// Largest number of segments a buffer may have to go through an indirect table; longer
/// buffers are chained directly in the ring.
pub const MAX_INDIRECT_SEGMENTS: usize = 16;

/// Largest number of tables per queue (64 KiB of tables); when all are in use, multi-segment
/// buffers fall back to direct chains.
const MAX_TABLES: u16 = 256;

/// Bytes per table.
const TABLE_BYTES: usize = MAX_INDIRECT_SEGMENTS * DESC_SIZE;

pub(super) struct IndirectPool<H: DmaHal> {
    memory: RingMemory<H>,
    free: Vec<u16>,
}

impl<H: DmaHal> IndirectPool<H> {
    /// A pool sized for a queue of `queue_size` (at most one table per entry).
    pub(super) fn new(hal: H, queue_size: u16) -> Result<Self, DmaError> {
        let tables = queue_size.min(MAX_TABLES);
        let memory = RingMemory::new(hal, usize::from(tables) * TABLE_BYTES)?;
        Ok(Self {
            memory,
            free: (0..tables).rev().collect(),
        })
    }

    /// A free table, if any.
    pub(super) fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Whether a table is free.
    pub(super) fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Returns a table.
    pub(super) fn give(&mut self, table: u16) {
        self.free.push(table);
    }

    /// Bus address of a table.
    pub(super) fn phys(&self, table: u16) -> u64 {
        self.memory.phys(usize::from(table) * TABLE_BYTES)
    }

    fn entry(table: u16, index: usize) -> usize {
        usize::from(table) * TABLE_BYTES + index * DESC_SIZE
    }

    /// Writes entry `index` of a split indirect table (§2.7.5.3): chained by `next` to
    /// `index + 1` unless `last`.
    pub(super) fn store_split(&mut self, table: u16, index: usize, segment: Segment, last: bool) {
        let at = Self::entry(table, index);
        let mut flags = if segment.device_writable {
            super::layout::DescFlags::WRITE.bits()
        } else {
            0
        };
        let mut next = 0;
        if !last {
            flags |= super::layout::DescFlags::NEXT.bits();
            // index + 1 < MAX_INDIRECT_SEGMENTS, so it fits.
            next = u16::try_from(index + 1).unwrap_or(0);
        }
        self.memory.store64(at + DESC_ADDR, Le64::new(segment.phys));
        self.memory.store32(at + DESC_LEN, Le32::new(segment.len));
        self.memory.store16(at + DESC_FLAGS, Le16::new(flags));
        self.memory.store16(at + DESC_NEXT, Le16::new(next));
    }

    /// Writes entry `index` of a packed indirect table (§2.8.7): WRITE is the only valid flag
    /// and the buffer id is reserved (0); entries are consecutive, not chained.
    pub(super) fn store_packed(&mut self, table: u16, index: usize, segment: Segment) {
        let at = Self::entry(table, index);
        let flags = if segment.device_writable {
            super::layout::DescFlags::WRITE.bits()
        } else {
            0
        };
        self.memory.store64(at + DESC_ADDR, Le64::new(segment.phys));
        self.memory.store32(at + DESC_LEN, Le32::new(segment.len));
        self.memory.store16(at + PACKED_ID, Le16::new(0));
        self.memory
            .store16(at + super::layout::PACKED_FLAGS, Le16::new(flags));
    }
}
