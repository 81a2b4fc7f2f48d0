//! Block devices as the network services see them: the [`BlockDevice`] trait (a size, block
//! size constraints, what the device supports, and an asynchronous request interface that
//! never blocks the kernel's loop), and [`MemoryDisk`], an in-memory implementation for tests
//! with a volatile cache, latency, out-of-order completion and injectable errors.
//!
//! A request is submitted with an id chosen by the caller and completes later, through
//! [`BlockDevice::poll`], with the same id. Buffers move: a write hands its data to the device
//! and gets the buffer back in the completion, a read hands a buffer of the right length and
//! gets it back filled, so a caller can recycle its buffers and nothing is allocated per
//! request by the device. A flush makes every write completed before it was submitted durable
//! (the model of the NBD protocol document's "Ordering of messages and writes").

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

/// What a block device is and supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    /// The size in bytes.
    pub size: u64,
    /// The smallest addressable length and alignment, in bytes (a power of two, at most 64 KiB).
    pub min_block: u32,
    /// The length and alignment at which I/O is efficient (a power of two, at least
    /// `min_block` and 512).
    pub preferred_block: u32,
    /// The longest read or write the device takes in one request.
    pub max_transfer: u32,
    /// Writes, trims and write-zeroes fail with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// [`BlockRequest::Flush`] is meaningful (there is a volatile cache).
    pub flush: bool,
    /// [`BlockRequest::Trim`] is supported.
    pub trim: bool,
    /// [`BlockRequest::WriteZeroes`] is supported.
    pub write_zeroes: bool,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The device failed the I/O.
    Io,
    /// Out of space (a write beyond the end, or a thin device full).
    NoSpace,
    /// The device is read-only.
    ReadOnly,
    /// The request is malformed (range, alignment, length).
    Invalid,
    /// The device does not support that kind of request.
    Unsupported,
}

/// A request. Offsets and lengths are in bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockRequest {
    /// Reads `buffer.len()` bytes at `offset` into `buffer`.
    Read {
        /// Where.
        offset: u64,
        /// Filled by the device; its length is the request's.
        buffer: Vec<u8>,
    },
    /// Writes `buffer` at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// The data.
        buffer: Vec<u8>,
    },
    /// Makes every write completed before this was submitted durable.
    Flush,
    /// Discards `length` bytes at `offset` (their contents become unspecified).
    Trim {
        /// Where.
        offset: u64,
        /// How much.
        length: u64,
    },
    /// Writes `length` zero bytes at `offset`.
    WriteZeroes {
        /// Where.
        offset: u64,
        /// How much.
        length: u64,
    },
}

impl BlockRequest {
    /// Its kind.
    pub fn kind(&self) -> RequestKind {
        match self {
            Self::Read { .. } => RequestKind::Read,
            Self::Write { .. } => RequestKind::Write,
            Self::Flush => RequestKind::Flush,
            Self::Trim { .. } => RequestKind::Trim,
            Self::WriteZeroes { .. } => RequestKind::WriteZeroes,
        }
    }

    /// The buffer it carries, if any (given back with the completion).
    fn take_buffer(&mut self) -> Option<Vec<u8>> {
        match self {
            Self::Read { buffer, .. } | Self::Write { buffer, .. } => Some(core::mem::take(buffer)),
            _ => None,
        }
    }
}

impl BlockCompletion {
    /// `request`, failed with `error` without reaching a device: its buffer handed back.
    pub fn failed(id: u64, mut request: BlockRequest, error: BlockError) -> Self {
        Self {
            id,
            result: Err(error),
            buffer: request.take_buffer(),
        }
    }
}

/// The kinds of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// [`BlockRequest::Read`].
    Read,
    /// [`BlockRequest::Write`].
    Write,
    /// [`BlockRequest::Flush`].
    Flush,
    /// [`BlockRequest::Trim`].
    Trim,
    /// [`BlockRequest::WriteZeroes`].
    WriteZeroes,
}

/// A finished request.
#[derive(Debug, PartialEq, Eq)]
pub struct BlockCompletion {
    /// The id it was submitted with.
    pub id: u64,
    /// Its outcome.
    pub result: Result<(), BlockError>,
    /// The request's buffer, back (filled, for a successful read).
    pub buffer: Option<Vec<u8>>,
}

/// A block device with an asynchronous request interface.
pub trait BlockDevice {
    /// What it is and supports.
    fn info(&self) -> BlockDeviceInfo;

    /// Starts `request` under `id`. When the device cannot take it now (its queue is full),
    /// the request comes back and the caller retries after a completion.
    fn submit(&mut self, id: u64, request: BlockRequest) -> Result<(), BlockRequest>;

    /// The next finished request, if any. Never blocks.
    fn poll(&mut self) -> Option<BlockCompletion>;

    /// Whether [`BlockDevice::poll`] may have something now or soon without an interrupt
    /// to say so (a polled device with requests in flight): the caller then polls again
    /// without sleeping. Cheap.
    fn pending(&self) -> bool;
}

/// The state of a [`MemoryDisk`], shared between its clones.
#[derive(Debug)]
pub struct MemoryDiskState {
    info: BlockDeviceInfo,
    /// What reads see (the volatile cache over the durable contents).
    pub data: Vec<u8>,
    /// What survives a power cut: `data` as of the last flush.
    pub durable: Vec<u8>,
    /// Polls a request takes to complete (0: completes on the next poll).
    pub latency: u32,
    /// Completes the requests ready at one poll newest first.
    pub reverse: bool,
    /// Requests in flight at most (further submissions are refused until one completes).
    pub queue_depth: usize,
    /// The next request of that kind fails with that error (and has no effect).
    pub fail_next: Option<(RequestKind, BlockError)>,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests completed, in completion order, with their ids.
    pub log: Vec<(u64, RequestKind)>,
    queue: Vec<(u64, BlockRequest, u64, Result<(), BlockError>)>,
    done: VecDeque<BlockCompletion>,
    tick: u64,
}

/// An in-memory block device for tests: a clone is a handle on the same disk, so a test keeps
/// one to look inside (and to inject latency and errors) while a service owns the other.
#[derive(Clone, Debug)]
pub struct MemoryDisk {
    state: Rc<RefCell<MemoryDiskState>>,
}

impl MemoryDisk {
    /// A zeroed disk of `size` bytes with 512-byte blocks, supporting flush, trim and
    /// write-zeroes, completing everything on the next poll.
    pub fn new(size: u64, read_only: bool) -> Self {
        let info = BlockDeviceInfo {
            size,
            min_block: 512,
            preferred_block: 4096,
            max_transfer: 1 << 20,
            read_only,
            flush: true,
            trim: true,
            write_zeroes: true,
        };
        Self::with_info(info)
    }

    /// A zeroed disk described by `info`.
    pub fn with_info(info: BlockDeviceInfo) -> Self {
        let length = usize::try_from(info.size).unwrap_or(usize::MAX);
        Self {
            state: Rc::new(RefCell::new(MemoryDiskState {
                info,
                data: vec![0; length],
                durable: vec![0; length],
                latency: 0,
                reverse: false,
                queue_depth: 64,
                fail_next: None,
                flushes: 0,
                log: Vec::new(),
                queue: Vec::new(),
                done: VecDeque::new(),
                tick: 0,
            })),
        }
    }

    /// The shared state, to inspect or adjust.
    pub fn state(&self) -> core::cell::RefMut<'_, MemoryDiskState> {
        self.state.borrow_mut()
    }
}

impl MemoryDiskState {
    /// The range, if it lies within the disk.
    fn range(&self, offset: u64, length: u64) -> Option<core::ops::Range<usize>> {
        let end = offset.checked_add(length)?;
        if end > self.info.size {
            return None;
        }
        Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    }

    /// Carries out `request` on the contents.
    fn apply(&mut self, request: &mut BlockRequest) -> Result<(), BlockError> {
        let writes = !matches!(request, BlockRequest::Read { .. } | BlockRequest::Flush);
        if writes && self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        match request {
            BlockRequest::Read { offset, buffer } => {
                let range = self
                    .range(*offset, buffer.len() as u64)
                    .ok_or(BlockError::Invalid)?;
                buffer.copy_from_slice(&self.data[range]);
            }
            BlockRequest::Write { offset, buffer } => {
                let range = self
                    .range(*offset, buffer.len() as u64)
                    .ok_or(BlockError::NoSpace)?;
                self.data[range].copy_from_slice(buffer);
            }
            BlockRequest::Flush => {
                self.durable.copy_from_slice(&self.data);
                self.flushes += 1;
            }
            BlockRequest::Trim { offset, length }
            | BlockRequest::WriteZeroes { offset, length } => {
                let range = self.range(*offset, *length).ok_or(BlockError::NoSpace)?;
                self.data[range].fill(0);
            }
        }
        Ok(())
    }
}

impl BlockDevice for MemoryDisk {
    fn info(&self) -> BlockDeviceInfo {
        self.state.borrow().info
    }

    fn submit(&mut self, id: u64, request: BlockRequest) -> Result<(), BlockRequest> {
        let mut state = self.state.borrow_mut();
        if state.queue.len() >= state.queue_depth {
            return Err(request);
        }
        let ready = state.tick + u64::from(state.latency);
        let failure = match state.fail_next {
            Some((kind, error)) if kind == request.kind() => {
                state.fail_next = None;
                Err(error)
            }
            _ => Ok(()),
        };
        state.queue.push((id, request, ready, failure));
        Ok(())
    }

    fn poll(&mut self) -> Option<BlockCompletion> {
        let mut state = self.state.borrow_mut();
        if state.done.is_empty() {
            let tick = state.tick;
            state.tick += 1;
            let mut ready = Vec::new();
            let mut index = 0;
            while index < state.queue.len() {
                if state.queue[index].2 <= tick {
                    ready.push(state.queue.remove(index));
                } else {
                    index += 1;
                }
            }
            if state.reverse {
                ready.reverse();
            }
            for (id, mut request, _, failure) in ready {
                let result = failure.and_then(|()| state.apply(&mut request));
                state.log.push((id, request.kind()));
                let buffer = request.take_buffer();
                state.done.push_back(BlockCompletion { id, result, buffer });
            }
        }
        state.done.pop_front()
    }

    fn pending(&self) -> bool {
        let state = self.state.borrow();
        !state.queue.is_empty() || !state.done.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_failed_before_the_device_hands_its_buffer_back() {
        let read = BlockRequest::Read {
            offset: 512,
            buffer: vec![7; 512],
        };
        let failed = BlockCompletion::failed(3, read, BlockError::Io);
        assert_eq!(
            failed,
            BlockCompletion {
                id: 3,
                result: Err(BlockError::Io),
                buffer: Some(vec![7; 512]),
            }
        );
        let flush = BlockCompletion::failed(4, BlockRequest::Flush, BlockError::ReadOnly);
        assert_eq!(
            (flush.result, flush.buffer),
            (Err(BlockError::ReadOnly), None)
        );
    }

    fn complete(disk: &mut MemoryDisk) -> Vec<BlockCompletion> {
        let mut done = Vec::new();
        for _ in 0..10 {
            while let Some(completion) = disk.poll() {
                done.push(completion);
            }
        }
        done
    }

    #[test]
    fn writes_reach_durable_storage_only_at_a_flush() {
        let mut disk = MemoryDisk::new(4096, false);
        let write = BlockRequest::Write {
            offset: 512,
            buffer: vec![7; 512],
        };
        assert!(disk.submit(1, write).is_ok());
        let done = complete(&mut disk);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, Ok(()));
        assert_eq!(disk.state().data[512], 7);
        assert_eq!(disk.state().durable[512], 0);
        assert!(disk.submit(2, BlockRequest::Flush).is_ok());
        complete(&mut disk);
        assert_eq!(disk.state().durable[512], 7);
        assert_eq!(disk.state().flushes, 1);
        let read = BlockRequest::Read {
            offset: 512,
            buffer: vec![0; 4],
        };
        assert!(disk.submit(3, read).is_ok());
        let done = complete(&mut disk);
        assert_eq!(done[0].buffer.as_deref(), Some(&[7, 7, 7, 7][..]));
    }

    #[test]
    fn latency_reverse_order_queue_depth_and_injected_errors() {
        let mut disk = MemoryDisk::new(4096, false);
        {
            let mut state = disk.state();
            state.latency = 2;
            state.reverse = true;
            state.queue_depth = 2;
            state.fail_next = Some((RequestKind::Trim, BlockError::Io));
        }
        assert!(disk.submit(1, BlockRequest::Flush).is_ok());
        let trim = BlockRequest::Trim {
            offset: 0,
            length: 512,
        };
        assert!(disk.submit(2, trim).is_ok());
        assert_eq!(
            disk.submit(3, BlockRequest::Flush),
            Err(BlockRequest::Flush)
        );
        assert!(disk.poll().is_none());
        assert!(disk.poll().is_none());
        let first = disk.poll().expect("ready after the latency");
        assert_eq!((first.id, first.result), (2, Err(BlockError::Io)));
        let second = disk.poll().expect("the other one");
        assert_eq!((second.id, second.result), (1, Ok(())));
        let beyond = BlockRequest::Write {
            offset: 4096,
            buffer: vec![1; 512],
        };
        assert!(disk.submit(4, beyond).is_ok());
        let done = complete(&mut disk);
        assert_eq!(done[0].result, Err(BlockError::NoSpace));
    }
}
