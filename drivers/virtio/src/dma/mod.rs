//! DMA memory: the crate's one `unsafe` module.
//!
//! This module owns every raw pointer the crate dereferences. It turns a [`DmaBuffer`] from
//! [`Hal::dma_alloc`] into two safe handles:
//!
//! * `RingMemory` (crate-private): memory the device reads and writes *while the driver is
//!   using it* (descriptor tables, available/used rings, event suppression structures,
//!   indirect tables). It offers only bounds- and alignment-checked volatile loads and stores
//!   of little-endian [`Le16`]/[`Le32`]/[`Le64`] values, never a `&`/`&mut` to the memory
//!   (docs/design.md principle 5: the device may change it at any moment, so a reference would be
//!   undefined behaviour and a value read through it could change under the driver).
//! * [`DmaBuf`] (public): a packet buffer. It is exclusively owned: it reaches the device only
//!   by being *moved* into a virtqueue (inside a [`DeviceBuffer`]) and is moved back out by
//!   `pop_used`, so whenever code holds a `DmaBuf` the device has given it up, and exposing it
//!   as a byte slice is sound.
//!
//! Soundness rests on one platform promise, made explicit by the `unsafe trait` [`DmaHal`]:
//! `dma_alloc` returns exclusively owned, mapped, zeroed memory of the stated size that stays
//! valid until `dma_free`. A plain [`Hal`] cannot promise that (its `Window` is just numbers),
//! so the queues require `H: DmaHal`.
//!
//! Ring memory is DMA-coherent write-back memory on x86 (§2.7.13 barriers are therefore only
//! about compiler and CPU ordering; see [`crate::barrier`]).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use crate::hal::{DmaBuffer, DmaDirection, Hal, HalError, PAGE_SIZE};

/// A [`Hal`] whose DMA allocations can be dereferenced by this crate.
///
/// # Safety
/// Implementors promise, for every `Ok(buffer)` returned by [`Hal::dma_alloc`]`(pages)`:
/// * `buffer.window.base` is the virtual address of `buffer.window.len` bytes, with
///   `buffer.window.len >= pages * PAGE_SIZE`, page-aligned, readable and writable by the CPU
///   through ordinary loads and stores (write-back mapped; the device's view at `buffer.phys`
///   is coherent with it), and the pointer `window.base as *mut u8` has exposed provenance
///   for the whole range (as `ptr::with_exposed_provenance_mut` requires);
/// * the bytes are zeroed, and are not accessed by anyone but the holder of `buffer` and the
///   device it is handed to (no other allocation overlaps them) until the buffer is passed to
///   [`Hal::dma_free`];
/// * `buffer.phys..buffer.phys + window.len` is the bus address range of the same bytes.
///
/// The kernel's allocator (`src/mem`) satisfies this: identity-mapped heap pages.
pub unsafe trait DmaHal: Hal {}

// SAFETY: `&T` forwards `dma_alloc`/`dma_free` to `T` unchanged (hal.rs), so it inherits `T`'s
// guarantees.
unsafe impl<T: DmaHal + ?Sized> DmaHal for &T {}

/// Errors of the DMA layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// The platform allocator failed.
    Hal(HalError),
    /// A zero-byte allocation was requested, or one too large to express in pages.
    BadSize {
        /// Bytes requested.
        bytes: usize,
    },
    /// The allocator returned a window that breaks the [`DmaHal`] contract (null, unaligned or
    /// too short): it is freed again and refused.
    BadWindow {
        /// Virtual base returned.
        base: u64,
        /// Length returned.
        len: u64,
        /// Bytes needed.
        needed: usize,
    },
    /// A split point or a segment length lies outside the buffer.
    OutOfBounds {
        /// Offset or length requested.
        offset: usize,
        /// Length of the buffer.
        len: usize,
    },
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Hal(error) => write!(f, "DMA allocation failed: {error}"),
            Self::BadSize { bytes } => write!(f, "bad DMA allocation size of {bytes} bytes"),
            Self::BadWindow { base, len, needed } => write!(
                f,
                "allocator returned an unusable window {base:#x}+{len:#x} for {needed} bytes"
            ),
            Self::OutOfBounds { offset, len } => {
                write!(f, "offset {offset} is outside a {len}-byte DMA buffer")
            }
        }
    }
}

impl From<HalError> for DmaError {
    fn from(error: HalError) -> Self {
        Self::Hal(error)
    }
}

/// A little-endian 16-bit field of a ring, as stored in memory (§1.4: ring fields are `le16`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Le16(u16);
/// A little-endian 32-bit field of a ring (`le32`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Le32(u32);
/// A little-endian 64-bit field of a ring (`le64`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Le64(u64);

macro_rules! le_type {
    ($name:ident, $native:ty) => {
        impl $name {
            /// Encodes a native value.
            pub const fn new(value: $native) -> Self {
                Self(value.to_le())
            }
            /// Decodes to a native value.
            pub const fn get(self) -> $native {
                <$native>::from_le(self.0)
            }
        }
        impl From<$native> for $name {
            fn from(value: $native) -> Self {
                Self::new(value)
            }
        }
    };
}
le_type!(Le16, u16);
le_type!(Le32, u32);
le_type!(Le64, u64);

/// One allocation from a [`DmaHal`], freed on drop.
struct Allocation<H: DmaHal> {
    hal: H,
    buffer: DmaBuffer,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: an `Allocation` exclusively owns its bytes (DmaHal contract); moving it to another
// thread moves that ownership, and freeing from there is fine when `H` is `Send`.
unsafe impl<H: DmaHal + Send> Send for Allocation<H> {}
// SAFETY: a shared `&Allocation` only gives out disjoint ranges to `DmaBuf`s (each of which
// needs `&mut` to write) or is reached through `RingMemory`, whose stores need `&mut`; so
// shared access from several threads performs only reads.
unsafe impl<H: DmaHal + Sync> Sync for Allocation<H> {}

impl<H: DmaHal> Allocation<H> {
    fn new(hal: H, bytes: usize) -> Result<Self, DmaError> {
        if bytes == 0 {
            return Err(DmaError::BadSize { bytes });
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        let buffer = hal.dma_alloc(pages)?;
        let window = buffer.window;
        let usable = usize::try_from(window.len).ok().filter(|&len| len >= bytes);
        let end_ok = window.base.checked_add(window.len).is_some();
        let base = usize::try_from(window.base)
            .ok()
            .filter(|&base| base.is_multiple_of(PAGE_SIZE) && end_ok)
            .map(core::ptr::with_exposed_provenance_mut::<u8>)
            .and_then(NonNull::new);
        match (base, usable) {
            (Some(base), Some(_)) => Ok(Self {
                hal,
                buffer,
                base,
                len: bytes,
            }),
            _ => {
                hal.dma_free(buffer);
                Err(DmaError::BadWindow {
                    base: window.base,
                    len: window.len,
                    needed: bytes,
                })
            }
        }
    }

    fn phys(&self, offset: usize) -> u64 {
        self.buffer.phys + offset as u64
    }

    /// Checks an access of `width` bytes at `offset`: inside the allocation and, for ring
    /// fields, naturally aligned.
    ///
    /// # Panics
    /// On a violation. Ring offsets are computed by the queues from indices they validated
    /// first, so a failure here is a driver bug, never device input.
    fn check(&self, offset: usize, width: usize, align: usize) -> *mut u8 {
        let in_bounds = offset.checked_add(width).is_some_and(|end| end <= self.len);
        assert!(
            in_bounds,
            "DMA access {offset}+{width} outside {} bytes",
            self.len
        );
        assert!(
            offset.is_multiple_of(align),
            "misaligned DMA access of {width} bytes at {offset}"
        );
        // SAFETY: `offset + width <= self.len` (checked above), and `base..base + len` is one
        // allocation (DmaHal contract), so the offset pointer stays inside it.
        unsafe { self.base.as_ptr().add(offset) }
    }
}

impl<H: DmaHal> Drop for Allocation<H> {
    fn drop(&mut self) {
        self.hal.dma_free(self.buffer);
    }
}

/// Memory the device accesses concurrently with the driver: rings and indirect tables.
///
/// Only volatile, naturally aligned, bounds-checked accesses; no references ever. Stores take
/// `&mut self`, so one owner (the queue) orders them.
pub(crate) struct RingMemory<H: DmaHal> {
    allocation: Allocation<H>,
}

macro_rules! ring_access {
    ($load:ident, $store:ident, $le:ident, $native:ty) => {
        /// Volatile little-endian load at `offset`.
        ///
        /// # Panics
        /// If the access is out of bounds or misaligned (a driver bug; see `check`).
        #[allow(
            dead_code,
            reason = "the full set of widths; the rings read no 64-bit field"
        )]
        pub(crate) fn $load(&self, offset: usize) -> $le {
            let width = core::mem::size_of::<$native>();
            let pointer = self
                .allocation
                .check(offset, width, width)
                .cast::<$native>();
            // SAFETY: `check` proved the `width` bytes lie inside the live allocation and are
            // naturally aligned (the base is page-aligned); a volatile read of an integer has
            // no validity requirement beyond that, and creates no reference.
            $le(unsafe { pointer.read_volatile() })
        }

        /// Volatile little-endian store at `offset`.
        ///
        /// # Panics
        /// If the access is out of bounds or misaligned (a driver bug; see `check`).
        pub(crate) fn $store(&mut self, offset: usize, value: $le) {
            let width = core::mem::size_of::<$native>();
            let pointer = self
                .allocation
                .check(offset, width, width)
                .cast::<$native>();
            // SAFETY: as for the load; `&mut self` makes this the only CPU-side writer.
            unsafe { pointer.write_volatile(value.0) }
        }
    };
}

impl<H: DmaHal> RingMemory<H> {
    /// Allocates `bytes` of zeroed ring memory.
    pub(crate) fn new(hal: H, bytes: usize) -> Result<Self, DmaError> {
        let allocation = Allocation::new(hal, bytes)?;
        let mut ring = Self { allocation };
        ring.zero();
        Ok(ring)
    }

    /// Zeroes the whole region (the DmaHal contract already promises zeroed memory; rings
    /// must start zeroed, §2.7.10 and §2.8.13, so this does not rely on it).
    fn zero(&mut self) {
        let pointer = self.allocation.check(0, self.allocation.len, 1);
        // SAFETY: `check` proved the range is the whole live allocation; the device has not
        // been given its address yet, so nothing accesses it concurrently.
        unsafe { core::ptr::write_bytes(pointer, 0, self.allocation.len) };
    }

    /// Bus address of byte `offset`.
    pub(crate) fn phys(&self, offset: usize) -> u64 {
        self.allocation.phys(offset)
    }

    ring_access!(load16, store16, Le16, u16);
    ring_access!(load32, store32, Le32, u32);
    ring_access!(load64, store64, Le64, u64);
}

/// An exclusively owned, physically contiguous packet buffer in DMA memory.
///
/// Made by [`DmaBuf::new`] and carved up with [`DmaBuf::split_at`]; the pieces share one
/// allocation, which is freed when the last piece is dropped. A `DmaBuf` reaches the device
/// only by being moved into a queue, so holding one means the device does not own it.
pub struct DmaBuf<H: DmaHal> {
    allocation: Arc<Allocation<H>>,
    offset: usize,
    len: usize,
}

impl<H: DmaHal> DmaBuf<H> {
    /// Allocates a zeroed buffer of `len` bytes (rounded up to whole pages underneath).
    pub fn new(hal: H, len: usize) -> Result<Self, DmaError> {
        let allocation = Arc::new(Allocation::new(hal, len)?);
        Ok(Self {
            allocation,
            offset: 0,
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bus address of the first byte.
    pub fn phys(&self) -> u64 {
        self.allocation.phys(self.offset)
    }

    /// The bytes, for the driver (the device does not own this buffer while it is held).
    pub fn as_bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        let pointer = self.allocation.check(self.offset, self.len, 1);
        // SAFETY: the range is inside the live allocation (checked), which the `Arc` keeps
        // alive for the borrow; `DmaBuf` ranges of one allocation are disjoint (only
        // `split_at` and `join` make new ones, from owned buffers: `join` merges two adjacent
        // ranges it owns both of) and the device does not access a
        // buffer the driver holds, so no one writes these bytes during the shared borrow.
        // They were zeroed at allocation, so they are initialized `u8`s.
        unsafe { core::slice::from_raw_parts(pointer, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        let pointer = self.allocation.check(self.offset, self.len, 1);
        // SAFETY: as in `as_bytes`, and `&mut self` makes this the only access to the range.
        unsafe { core::slice::from_raw_parts_mut(pointer, self.len) }
    }

    /// Splits into `[0, mid)` and `[mid, len)`, which share the allocation.
    pub fn split_at(self, mid: usize) -> Result<(Self, Self), (Self, DmaError)> {
        if mid > self.len {
            let error = DmaError::OutOfBounds {
                offset: mid,
                len: self.len,
            };
            return Err((self, error));
        }
        let tail = Self {
            allocation: Arc::clone(&self.allocation),
            offset: self.offset + mid,
            len: self.len - mid,
        };
        let head = Self {
            allocation: self.allocation,
            offset: self.offset,
            len: mid,
        };
        Ok((head, tail))
    }

    /// Joins `tail` back onto `self` when it is the piece right after it in the same
    /// allocation (as [`DmaBuf::split_at`] made them), so a pool can lend the head of a buffer
    /// and take the whole back; otherwise both come back unchanged.
    pub fn join(self, tail: Self) -> Result<Self, (Self, Self)> {
        let adjacent = Arc::ptr_eq(&self.allocation, &tail.allocation)
            && self.offset.checked_add(self.len) == Some(tail.offset);
        if !adjacent {
            return Err((self, tail));
        }
        Ok(Self {
            allocation: self.allocation,
            offset: self.offset,
            len: self.len + tail.len,
        })
    }

    /// Splits into consecutive pieces of `chunk` bytes (the last may be shorter).
    pub fn chunks(self, chunk: usize) -> Result<Vec<Self>, (Self, DmaError)> {
        if chunk == 0 {
            return Err((self, DmaError::BadSize { bytes: 0 }));
        }
        let mut pieces = Vec::with_capacity(self.len.div_ceil(chunk));
        let mut rest = self;
        while rest.len > chunk {
            let (head, tail) = rest.split_at(chunk)?;
            pieces.push(head);
            rest = tail;
        }
        pieces.push(rest);
        Ok(pieces)
    }
}

impl<H: DmaHal> fmt::Debug for DmaBuf<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaBuf({:#x}+{:#x})", self.phys(), self.len)
    }
}

/// One physically contiguous element of a buffer, as the device sees it (§2.7.13.1,
/// §2.8.21.1): a device address, a length and a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The address the device uses for the first byte ([`Hal::share`]'s answer).
    pub phys: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE) rather than device-readable.
    pub device_writable: bool,
}

/// An owned buffer a virtqueue can hand to the device: an ordered list of [`Segment`]s,
/// device-readable ones first (§2.7.4.2 message framing; the queue checks the order).
///
/// # Safety
/// Implementors promise that, while `self` exists:
/// * every segment lies in DMA memory from a [`DmaHal`] allocation that stays allocated at
///   least as long as `self`;
/// * `self` owns those bytes exclusively: nothing else reads or writes them, and no `&`/`&mut`
///   to them exists, except through `self` (the queue moves `self` in before the device sees
///   the segments and moves it out only after the device gave them back, so the device's
///   writes never race a reference);
/// * `segment_count` and `segment` return the same answers every time for an unchanged `self`.
pub unsafe trait DeviceBuffer {
    /// Number of segments.
    fn segment_count(&self) -> usize;
    /// Segment `index` (`None` past the end).
    fn segment(&self, index: usize) -> Option<Segment>;
}

/// A [`DmaBuf`] shared with the device for one transfer, with a direction and the length the
/// device may use: one segment.
///
/// Making a `Part` calls [`Hal::share`] (the per-transfer DMA seam, see [`crate::hal`]) and the
/// segment carries the address it returned; [`Part::into_buf`], or dropping the part, calls
/// [`Hal::unshare`]. So the driver reads a device-written buffer only after `into_buf`.
pub struct Part<H: DmaHal> {
    buf: DmaBuf<H>,
    len: u32,
    device_writable: bool,
    /// What [`Hal::share`] returned for `buf`.
    device_address: u64,
}

impl<H: DmaHal> Part<H> {
    fn with(
        buf: DmaBuf<H>,
        len: usize,
        device_writable: bool,
    ) -> Result<Self, (DmaBuf<H>, DmaError)> {
        let len32 = match u32::try_from(len) {
            Ok(len32) if len <= buf.len() => len32,
            _ => {
                let error = DmaError::OutOfBounds {
                    offset: len,
                    len: buf.len(),
                };
                return Err((buf, error));
            }
        };
        let direction = Self::direction_of(device_writable);
        match buf.allocation.hal.share(buf.phys(), len, direction) {
            Ok(device_address) => Ok(Self {
                buf,
                len: len32,
                device_writable,
                device_address,
            }),
            Err(error) => Err((buf, DmaError::Hal(error))),
        }
    }

    const fn direction_of(device_writable: bool) -> DmaDirection {
        if device_writable {
            DmaDirection::FromDevice
        } else {
            DmaDirection::ToDevice
        }
    }

    /// The first `len` bytes of `buf`, for the device to read (a transmitted frame). Fill the
    /// buffer before: sharing may copy it (a bounce-buffer HAL).
    pub fn readable(buf: DmaBuf<H>, len: usize) -> Result<Self, (DmaBuf<H>, DmaError)> {
        Self::with(buf, len, false)
    }

    /// All of `buf`, for the device to write (a receive buffer).
    pub fn writable(buf: DmaBuf<H>) -> Result<Self, (DmaBuf<H>, DmaError)> {
        let len = buf.len();
        Self::with(buf, len, true)
    }

    /// The buffer, for its address and length. Its bytes are what the driver wrote: bytes the
    /// device wrote are only guaranteed visible after [`Part::into_buf`] (a bounce-buffer HAL
    /// copies them back in [`Hal::unshare`]), so read received data from the returned buffer.
    pub fn buf(&self) -> &DmaBuf<H> {
        &self.buf
    }

    /// The length offered to the device.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the device gets no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the device may write it.
    pub fn is_device_writable(&self) -> bool {
        self.device_writable
    }

    /// The address the device uses for the first byte (what [`Hal::share`] returned).
    pub fn device_address(&self) -> u64 {
        self.device_address
    }

    fn unshare(&self) {
        self.buf.allocation.hal.unshare(
            self.device_address,
            self.buf.phys(),
            self.len as usize,
            Self::direction_of(self.device_writable),
        );
    }

    /// Ends the transfer ([`Hal::unshare`]) and gives the buffer back, readable by the driver.
    pub fn into_buf(self) -> DmaBuf<H> {
        self.unshare();
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used again and, being `ManuallyDrop`, never dropped, so
        // moving `buf` out of it leaves exactly one owner of the buffer; the other fields are
        // `Copy`.
        unsafe { core::ptr::read(&this.buf) }
    }

    fn as_segment(&self) -> Segment {
        Segment {
            phys: self.device_address,
            len: self.len,
            device_writable: self.device_writable,
        }
    }
}

impl<H: DmaHal> Drop for Part<H> {
    /// A part dropped while shared (a queue torn down after a device reset) still ends its
    /// transfer, so a mapping HAL never leaks one.
    fn drop(&mut self) {
        self.unshare();
    }
}

impl<H: DmaHal> fmt::Debug for Part<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = if self.device_writable {
            "writable"
        } else {
            "readable"
        };
        write!(f, "Part({:?}, {} bytes {direction})", self.buf, self.len)
    }
}

// SAFETY: a `Part` owns its `DmaBuf` (exclusive, allocation kept alive by the `Arc`), and its
// one segment is a prefix of that buffer (`len <= buf.len()`, checked at construction); the
// answers depend only on immutable fields.
unsafe impl<H: DmaHal> DeviceBuffer for Part<H> {
    fn segment_count(&self) -> usize {
        1
    }
    fn segment(&self, index: usize) -> Option<Segment> {
        (index == 0).then(|| self.as_segment())
    }
}

// SAFETY: each element is an owned `Part` (see above); distinct `DmaBuf`s never overlap.
unsafe impl<H: DmaHal, const N: usize> DeviceBuffer for [Part<H>; N] {
    fn segment_count(&self) -> usize {
        N
    }
    fn segment(&self, index: usize) -> Option<Segment> {
        self.get(index).map(Part::as_segment)
    }
}

// SAFETY: as for arrays; the `Vec` is owned, and `&self` prevents pushing while borrowed.
unsafe impl<H: DmaHal> DeviceBuffer for Vec<Part<H>> {
    fn segment_count(&self) -> usize {
        self.len()
    }
    fn segment(&self, index: usize) -> Option<Segment> {
        self.get(index).map(Part::as_segment)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "the fuzz entry points use only part of the test DMA"
    )
)]
pub(crate) mod host;

#[cfg(test)]
mod tests {
    use super::host::HostDma;
    use super::*;

    #[test]
    fn dma_buf_split_pieces_are_disjoint_and_freed_with_the_last_piece() {
        let hal = HostDma::new();
        let buf = DmaBuf::new(&hal, 6000).expect("allocation");
        assert_eq!(hal.live_allocations(), 1);
        let base = buf.phys();
        let mut pieces = buf.chunks(2048).expect("chunks");
        assert_eq!(
            pieces.iter().map(DmaBuf::len).collect::<Vec<_>>(),
            [2048, 2048, 1904]
        );
        assert_eq!(pieces[1].phys(), base + 2048);
        pieces[0].as_bytes_mut().fill(0xaa);
        pieces[1].as_bytes_mut().fill(0xbb);
        assert!(pieces[0].as_bytes().iter().all(|&b| b == 0xaa));
        assert!(pieces[1].as_bytes().iter().all(|&b| b == 0xbb));
        assert!(pieces[2].as_bytes().iter().all(|&b| b == 0));
        let last = pieces.pop().expect("piece");
        drop(pieces);
        assert_eq!(
            hal.live_allocations(),
            1,
            "one piece still holds the allocation"
        );
        drop(last);
        assert_eq!(hal.live_allocations(), 0);
    }

    #[test]
    fn dma_buf_join_takes_back_only_the_adjacent_piece_of_the_same_allocation() {
        let hal = HostDma::new();
        let buf = DmaBuf::new(&hal, 8192).expect("allocation");
        let base = buf.phys();
        let (mut head, tail) = buf.split_at(512).expect("split");
        head.as_bytes_mut().fill(0x5a);
        let other = DmaBuf::new(&hal, 4096).expect("allocation");
        let (head, other) = head.join(other).expect_err("another allocation");
        let (tail, head) = tail.join(head).expect_err("not in that order");
        let whole = head.join(tail).expect("adjacent");
        assert_eq!((whole.phys(), whole.len()), (base, 8192));
        assert!(whole.as_bytes()[..512].iter().all(|&b| b == 0x5a));
        let (head, rest) = whole.split_at(4096).expect("split");
        let (middle, last) = rest.split_at(4096).expect("split at the end");
        assert_eq!(last.len(), 0);
        let (head, last) = head.join(last).expect_err("a gap between them");
        let whole = head
            .join(middle)
            .and_then(|b| b.join(last))
            .expect("in order");
        assert_eq!(whole.len(), 8192);
        drop(other);
        drop(whole);
        assert_eq!(hal.live_allocations(), 0);
    }

    #[test]
    fn dma_buf_split_past_the_end_is_an_error_and_returns_the_buffer() {
        let hal = HostDma::new();
        let buf = DmaBuf::new(&hal, 100).expect("allocation");
        let (buf, error) = buf.split_at(101).expect_err("out of bounds");
        assert_eq!(
            error,
            DmaError::OutOfBounds {
                offset: 101,
                len: 100
            }
        );
        assert_eq!(buf.len(), 100);
        let part = Part::readable(buf, 101).expect_err("too long");
        assert_eq!(
            part.1,
            DmaError::OutOfBounds {
                offset: 101,
                len: 100
            }
        );
    }

    #[test]
    fn ring_memory_round_trips_little_endian_values_the_device_sees() {
        let hal = HostDma::new();
        let mut ring = RingMemory::new(&hal, 64).expect("allocation");
        ring.store16(2, Le16::new(0x1234));
        ring.store32(4, Le32::new(0xdead_beef));
        ring.store64(8, Le64::new(0x0102_0304_0506_0708));
        assert_eq!(hal.read_u16(ring.phys(2)), Ok(0x1234));
        let mut bytes = [0; 4];
        hal.read(ring.phys(4), &mut bytes).expect("read");
        assert_eq!(bytes, [0xef, 0xbe, 0xad, 0xde], "stored little-endian");
        hal.write_u16(ring.phys(16), 0xbeef).expect("write");
        assert_eq!(ring.load16(16).get(), 0xbeef);
        assert_eq!(ring.load64(8).get(), 0x0102_0304_0506_0708);
    }

    #[test]
    #[should_panic(expected = "misaligned")]
    fn ring_memory_rejects_a_misaligned_access() {
        let hal = HostDma::new();
        let ring = RingMemory::new(&hal, 64).expect("allocation");
        let _ = ring.load32(2);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn ring_memory_rejects_an_out_of_bounds_access() {
        let hal = HostDma::new();
        let ring = RingMemory::new(&hal, 64).expect("allocation");
        let _ = ring.load16(64);
    }

    #[test]
    fn failed_allocation_is_reported() {
        let hal = HostDma::new();
        hal.fail_after(0);
        let error = DmaBuf::new(&hal, 10).expect_err("fails");
        assert_eq!(error, DmaError::Hal(HalError::OutOfDmaMemory { pages: 1 }));
        assert_eq!(
            DmaBuf::new(&hal, 0).expect_err("zero"),
            DmaError::BadSize { bytes: 0 }
        );
    }
}
