//! The kernel's [`BlockDevice`] over the first virtio-blk disk: what the NBD export
//! (`services=nbd`, [`vireo::net::services::nbd`]) serves.
//!
//! [`KernelDisk`] is a handle on the disk the registry of `super` keeps (its housekeeping and
//! recovery stay there); the requests it carries live beside the driver in the disk's
//! [`DiskRequests`], so a recovery can answer them:
//!
//! * data moves through DMA buffers from the driver's HAL ([`DmaBuf`]), lent from a pool of
//!   power-of-two size classes (4 KiB up to the largest transfer) and given back when the
//!   request completes: the head of a pooled buffer, cut to the request's length, goes to the
//!   device, the rest waits in the request's record and is joined back
//!   ([`DmaBuf::join`]); nothing is allocated per request once the pool is warm. A write's
//!   bytes are copied in at submission, a read's copied out at completion;
//! * a request completes only when the device completed it (§5.2.6: its status byte), with the
//!   caller's id, so nothing is acknowledged early; FLUSH is VIRTIO_BLK_T_FLUSH and completes
//!   when the device's flush did (the NBD server sends a FUA write's flush only after the
//!   write completed);
//! * a device that broke its queue, asked for a reset (§2.1.2) or went [`STALL_NS`] without
//!   completing anything while requests were in flight is reset and brought up again, and
//!   every request it held completes with [`BlockError::Io`]: none is lost silently;
//! * [`BlockDevice::pending`] is true when completions are waiting, or when requests are in
//!   flight on a disk without interrupts (the loop then keeps polling instead of halting);
//!   with interrupts, the loop arms the disk's request-queue interrupt before it halts
//!   (`super::arm_blk_interrupts`, with the re-check after arming: §2.7.7 and the §2.7.14
//!   note, §2.8.10 for packed rings).

#![deny(unsafe_code)]

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use vireo::block::{BlockCompletion, BlockDevice, BlockDeviceInfo, BlockError, BlockRequest};
use virtio::blk::{BlkError, BlkRange, BlkRequest, RequestId};
use virtio::dma::DmaBuf;

use crate::hal::KernelHal;

/// Sector size of virtio-blk addresses (§5.2.6).
const SECTOR: u64 = 512;
/// The smallest pooled buffer.
const SMALLEST_CLASS: usize = 4096;
/// The longest read or write the export takes in one request (one DMA segment).
const MAX_TRANSFER: u32 = 1 << 20;
/// Bytes the pool keeps at most (beyond this, returned buffers are freed).
const POOL_BYTES_MAX: usize = 8 << 20;
/// A disk with requests in flight that completes nothing for this long is declared failed,
/// reset, and its requests answered with an I/O error (so a hung device cannot make the loop
/// poll forever).
pub const STALL_NS: u64 = 30_000_000_000;

/// How many requests of the export all disks hold together: the polling loop reads it on every
/// spin (one load) and looks at the disks' used rings only when it is not zero. A count, not a
/// flag: one disk draining its last request must not hide another disk's.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Whether any disk may hold requests of the export (cheap; see [`IN_FLIGHT`]).
pub fn any_in_flight() -> bool {
    IN_FLIGHT.load(Ordering::Relaxed) != 0
}

/// The rest of a pooled buffer whose head is lent out, and the pool class it goes back to.
type Tail = (DmaBuf<KernelHal>, usize);

/// A request the device holds for the service.
struct Record {
    /// The driver's id.
    driver_id: RequestId,
    /// The service's id.
    id: u64,
    /// The caller's buffer (read: filled at completion; write: handed back).
    caller: Option<Vec<u8>>,
    /// A read (its data is copied out at completion).
    read: bool,
    /// The rest of the pooled buffer whose head the device holds, and its class.
    tail: Option<Tail>,
}

/// The service's requests on one disk, and the DMA buffers they use.
#[derive(Default)]
pub struct DiskRequests {
    in_flight: Vec<Record>,
    /// Completions decided without the device (a failed submission, a reset).
    ready: VecDeque<BlockCompletion>,
    /// Free pooled buffers, by class (`SMALLEST_CLASS << index` bytes).
    pool: Vec<Vec<DmaBuf<KernelHal>>>,
    pool_bytes: usize,
    /// When a request last completed or the first of a busy spell was submitted.
    last_progress_ns: u64,
    /// Requests answered with an I/O error because the device was reset under them.
    pub failed_by_reset: u64,
    /// Fault injection (`inject-blk-reset=N`): the device is declared failed after every N
    /// completions, when requests are still in flight.
    pub inject_reset_every: Option<u32>,
    completions_since_injection: u32,
}

/// The class of a buffer for `len` bytes.
fn class_of(len: usize) -> usize {
    let size = len.max(SMALLEST_CLASS).next_power_of_two();
    (size.trailing_zeros() - SMALLEST_CLASS.trailing_zeros()) as usize
}

impl DiskRequests {
    /// Whether the device holds requests of the service.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether completions wait that need no device (a reset's errors).
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// `record` is now on the device's queue (the stall clock starts with the first one).
    fn track(&mut self, record: Record, now_ns: u64) {
        if self.in_flight.is_empty() {
            self.last_progress_ns = now_ns;
        }
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        self.in_flight.push(record);
    }

    /// Whether requests have been in flight for [`STALL_NS`] with no completion.
    pub fn stalled(&self, now_ns: u64) -> bool {
        !self.in_flight.is_empty() && now_ns.saturating_sub(self.last_progress_ns) > STALL_NS
    }

    /// The device was reset: every request it held completes with an I/O error, its caller's
    /// buffer handed back (the DMA buffers went with the old driver's queue).
    pub fn fail_all(&mut self) {
        IN_FLIGHT.fetch_sub(self.in_flight.len(), Ordering::Relaxed);
        for record in self.in_flight.drain(..) {
            self.failed_by_reset += 1;
            self.ready.push_back(BlockCompletion {
                id: record.id,
                result: Err(BlockError::Io),
                buffer: record.caller,
            });
        }
    }

    /// A pooled buffer of at least `len` bytes, cut to `len`: the head for the device, and
    /// the tail with the class to join it back.
    fn lend(&mut self, len: usize) -> Result<(DmaBuf<KernelHal>, Tail), BlockError> {
        let class = class_of(len);
        let whole = match self.pool.get_mut(class).and_then(Vec::pop) {
            Some(buffer) => {
                self.pool_bytes -= buffer.len();
                buffer
            }
            None => DmaBuf::new(KernelHal, SMALLEST_CLASS << class).map_err(|_| BlockError::Io)?,
        };
        let (head, tail) = whole.split_at(len).map_err(|_| BlockError::Invalid)?;
        Ok((head, (tail, class)))
    }

    /// Gives a lent buffer back to the pool.
    fn give_back(&mut self, head: DmaBuf<KernelHal>, tail: Option<Tail>) {
        let Some((tail, class)) = tail else {
            return;
        };
        let Ok(whole) = head.join(tail) else {
            return;
        };
        if self.pool_bytes + whole.len() > POOL_BYTES_MAX {
            return;
        }
        if self.pool.len() <= class {
            self.pool.resize_with(class + 1, Vec::new);
        }
        self.pool_bytes += whole.len();
        self.pool[class].push(whole);
    }
}

/// What the export sees of a virtio-blk disk.
pub fn export_info(info: &virtio::blk::BlkInfo) -> BlockDeviceInfo {
    let block = info.block_size;
    let mut max_transfer = MAX_TRANSFER;
    if let Some(size_max) = info.size_max {
        // One segment per request: no longer than the device takes in one.
        max_transfer = max_transfer.min(size_max);
    }
    max_transfer -= max_transfer % block;
    BlockDeviceInfo {
        size: info.capacity_bytes(),
        min_block: block,
        preferred_block: block.max(4096),
        max_transfer: max_transfer.max(block),
        read_only: info.read_only,
        flush: info.flush,
        trim: info.discard.is_some(),
        write_zeroes: info.write_zeroes.is_some(),
    }
}

/// The ranges of a discard or write zeroes of `length` bytes at `offset`, each within the
/// device's `max_sectors`; `None` when more than `max_ranges` would be needed.
fn ranges(
    offset: u64,
    length: u64,
    limits: virtio::blk::RangeLimits,
    block: u64,
) -> Option<Vec<BlkRange>> {
    // Whole blocks per range, so every range stays aligned.
    let block_sectors = (block / SECTOR).max(1);
    let per_range = (u64::from(limits.max_sectors) / block_sectors) * block_sectors;
    if per_range == 0 {
        return None;
    }
    let mut sector = offset / SECTOR;
    let mut left = length / SECTOR;
    let mut ranges = Vec::new();
    while left > 0 {
        let sectors = left.min(per_range);
        if ranges.len() >= limits.max_ranges as usize {
            return None;
        }
        ranges.push(BlkRange {
            sector,
            sectors: u32::try_from(sectors).ok()?,
        });
        sector += sectors;
        left -= sectors;
    }
    Some(ranges)
}

/// The service's view of a driver error refusing a request.
fn refusal(error: BlkError, write: bool) -> BlockError {
    match error {
        BlkError::ReadOnly => BlockError::ReadOnly,
        BlkError::OutOfRange { .. } if write => BlockError::NoSpace,
        BlkError::OutOfRange { .. } | BlkError::Misaligned { .. } | BlkError::BadLength { .. } => {
            BlockError::Invalid
        }
        BlkError::NotNegotiated { .. } | BlkError::Unsupported => BlockError::Unsupported,
        _ => BlockError::Io,
    }
}

/// The kernel's block device: the first virtio-blk disk of the registry (see the module
/// header).
pub struct KernelDisk {
    info: BlockDeviceInfo,
    /// Requests the disk's queue holds at once (its size).
    queue_depth: usize,
    /// Requests answered without a disk to hold them (the registry lost it: never expected,
    /// but a request is never dropped unanswered).
    orphans: VecDeque<BlockCompletion>,
}

impl KernelDisk {
    /// A handle on the first disk, if there is one; logs what it exports. `inject_reset_every`
    /// is the command line's `inject-blk-reset=N` (fault injection for tests).
    pub fn first(inject_reset_every: Option<u32>) -> Option<Self> {
        let info = super::with_first_blk(|device, _| {
            device.requests.inject_reset_every = inject_reset_every;
            let blk = device.blk.as_ref()?;
            let depth = usize::from(blk.queue_size());
            Some((device.function.address, export_info(&blk.info()), depth))
        })
        .flatten()?;
        let (address, info, queue_depth) = info;
        log::info!(
            "nbd: exporting virtio-blk {address}: {} bytes, block size {}, {}, flush {}, trim {}, write zeroes {}",
            info.size,
            info.min_block,
            if info.read_only {
                "read-only"
            } else {
                "read-write"
            },
            yes(info.flush),
            yes(info.trim),
            yes(info.write_zeroes),
        );
        Some(Self {
            info,
            queue_depth,
            orphans: VecDeque::new(),
        })
    }

    /// Requests the disk's queue holds at once.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }
}

fn yes(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

impl BlockDevice for KernelDisk {
    fn info(&self) -> BlockDeviceInfo {
        self.info
    }

    fn submit(&mut self, id: u64, request: BlockRequest) -> Result<(), BlockRequest> {
        let mut request = Some(request);
        let submitted = super::with_first_blk(|device, _| match request.take() {
            Some(request) => device.submit_for_service(id, request),
            None => Ok(()),
        });
        if let (None, Some(request)) = (submitted.as_ref(), request) {
            self.orphans
                .push_back(BlockCompletion::failed(id, request, BlockError::Io));
        }
        submitted.unwrap_or(Ok(()))
    }

    fn poll(&mut self) -> Option<BlockCompletion> {
        if let Some(done) = self.orphans.pop_front() {
            return Some(done);
        }
        super::with_first_blk(|device, config| device.poll_for_service(config)).flatten()
    }

    fn pending(&self) -> bool {
        !self.orphans.is_empty()
            || super::with_first_blk(|device, _| device.service_pending()).unwrap_or(false)
    }
}

impl super::BlkDevice {
    /// Starts the service's `request` under `id` (see the module header). A full queue gives
    /// it back (the caller retries after a completion); every other refusal completes it with
    /// an error.
    pub fn submit_for_service(
        &mut self,
        id: u64,
        request: BlockRequest,
    ) -> Result<(), BlockRequest> {
        let now_ns = crate::arch::clock::now_ns();
        let requests = &mut self.requests;
        let Some(blk) = self.blk.as_mut() else {
            // Between a failed re-initialisation and the next attempt.
            requests
                .ready
                .push_back(BlockCompletion::failed(id, request, BlockError::Io));
            return Ok(());
        };
        let original = Original::of(&request);
        let Planned {
            request: driver_request,
            caller,
            read,
            tail,
        } = match plan(requests, &blk.info(), request) {
            Ok(planned) => planned,
            Err((result, buffer)) => {
                requests
                    .ready
                    .push_back(BlockCompletion { id, result, buffer });
                return Ok(());
            }
        };
        let write = matches!(
            driver_request,
            BlkRequest::Write { .. } | BlkRequest::Discard { .. } | BlkRequest::WriteZeroes { .. }
        );
        match blk.submit(driver_request) {
            Ok(driver_id) => {
                let record = Record {
                    driver_id,
                    id,
                    caller,
                    read,
                    tail,
                };
                requests.track(record, now_ns);
                Ok(())
            }
            Err(rejected) => {
                if let Some(driver_id) = rejected.in_flight {
                    // On the queue, but the doorbell failed: the completion (or the device's
                    // failure and the reset that answers it) comes later.
                    log::warn!(
                        "virtio-blk: {}: request {driver_id} queued but not notified: {}",
                        self.function.address,
                        rejected.error
                    );
                    let record = Record {
                        driver_id,
                        id,
                        caller,
                        read,
                        tail,
                    };
                    requests.track(record, now_ns);
                    return Ok(());
                }
                let mut buffers = rejected.buffers;
                if let Some(head) = buffers.pop() {
                    requests.give_back(head, tail);
                }
                match rejected.error {
                    BlkError::Busy { .. } => {
                        // The caller keeps the request and retries after a completion.
                        Err(original.rebuild(caller))
                    }
                    error => {
                        requests.ready.push_back(BlockCompletion {
                            id,
                            result: Err(refusal(error, write)),
                            buffer: caller,
                        });
                        Ok(())
                    }
                }
            }
        }
    }

    /// The next completion of the service's requests, if any. A broken queue resets the
    /// device (its requests complete with an I/O error).
    pub fn poll_for_service(
        &mut self,
        config: &crate::pci::PlatformConfig,
    ) -> Option<BlockCompletion> {
        loop {
            if let Some(done) = self.requests.ready.pop_front() {
                return Some(done);
            }
            let blk = self.blk.as_mut()?;
            let completion = match blk.poll() {
                Ok(Some(completion)) => completion,
                Ok(None) => return None,
                Err(error) => {
                    self.recover(config, &error);
                    continue;
                }
            };
            let requests = &mut self.requests;
            requests.last_progress_ns = crate::arch::clock::now_ns();
            let Some(index) = requests
                .in_flight
                .iter()
                .position(|record| record.driver_id == completion.id)
            else {
                // Not the service's (no other user submits while it runs): dropped.
                continue;
            };
            let record = requests.in_flight.swap_remove(index);
            IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            let mut caller = record.caller;
            let mut buffers = completion.buffers;
            if let Some(head) = buffers.pop() {
                if record.read
                    && completion.result.is_ok()
                    && let Some(caller) = caller.as_mut()
                    && caller.len() == head.len()
                {
                    caller.copy_from_slice(head.as_bytes());
                }
                requests.give_back(head, record.tail);
            }
            let result = completion.result.map_err(|error| match error {
                BlkError::Unsupported => BlockError::Unsupported,
                _ => BlockError::Io,
            });
            if let Some(every) = requests.inject_reset_every {
                requests.completions_since_injection += 1;
                if requests.completions_since_injection >= every && requests.in_flight() > 0 {
                    requests.completions_since_injection = 0;
                    let reason = alloc::format!("an injected failure (inject-blk-reset={every})");
                    self.recover(config, &reason);
                }
            }
            return Some(BlockCompletion {
                id: record.id,
                result,
                buffer: caller,
            });
        }
    }

    /// Whether [`Self::poll_for_service`] has something now, or may soon with nothing to
    /// say so (requests in flight on a disk without interrupts).
    pub fn service_pending(&self) -> bool {
        if self.requests.has_ready() {
            return true;
        }
        let Some(blk) = self.blk.as_ref() else {
            return false;
        };
        blk.pending()
            || (self.requests.in_flight() > 0 && self.path == super::InterruptPath::Polling)
    }
}

/// A service request turned into the driver's, with what its completion needs.
struct Planned {
    request: BlkRequest<KernelHal>,
    /// The caller's buffer, handed back at completion.
    caller: Option<Vec<u8>>,
    /// A read: its data is copied out at completion.
    read: bool,
    /// The rest of the pooled buffer lent for the data.
    tail: Option<Tail>,
}

/// What to answer at once, without the device: the outcome and the caller's buffer.
type Answer = (Result<(), BlockError>, Option<Vec<u8>>);

/// Turns the service's `request` into the driver's (§5.2.6: 512-byte sectors; data in a
/// pooled DMA buffer, a write's bytes copied in), or the answer it gets at once: nothing to
/// move (done), a misaligned offset or range, a kind the disk does not offer, or no DMA
/// memory. The driver checks the rest (§5.2.6.1) at submission.
fn plan(
    requests: &mut DiskRequests,
    info: &virtio::blk::BlkInfo,
    request: BlockRequest,
) -> Result<Planned, Answer> {
    let block = u64::from(info.block_size);
    let aligned =
        |offset: u64, length: u64| offset.is_multiple_of(block) && length.is_multiple_of(block);
    match request {
        BlockRequest::Read { buffer, .. } | BlockRequest::Write { buffer, .. }
            if buffer.is_empty() =>
        {
            Err((Ok(()), Some(buffer)))
        }
        BlockRequest::Read { offset, buffer } | BlockRequest::Write { offset, buffer }
            if !aligned(offset, buffer.len() as u64) =>
        {
            Err((Err(BlockError::Invalid), Some(buffer)))
        }
        BlockRequest::Read { offset, buffer } => {
            let (head, tail) = match requests.lend(buffer.len()) {
                Ok(lent) => lent,
                Err(error) => return Err((Err(error), Some(buffer))),
            };
            Ok(Planned {
                request: BlkRequest::Read {
                    sector: offset / SECTOR,
                    buffers: vec![head],
                },
                caller: Some(buffer),
                read: true,
                tail: Some(tail),
            })
        }
        BlockRequest::Write { offset, buffer } => {
            let (mut head, tail) = match requests.lend(buffer.len()) {
                Ok(lent) => lent,
                Err(error) => return Err((Err(error), Some(buffer))),
            };
            head.as_bytes_mut().copy_from_slice(&buffer);
            Ok(Planned {
                request: BlkRequest::Write {
                    sector: offset / SECTOR,
                    buffers: vec![head],
                },
                caller: Some(buffer),
                read: false,
                tail: Some(tail),
            })
        }
        BlockRequest::Flush => Ok(Planned {
            request: BlkRequest::Flush,
            caller: None,
            read: false,
            tail: None,
        }),
        BlockRequest::Trim { length: 0, .. } | BlockRequest::WriteZeroes { length: 0, .. } => {
            Err((Ok(()), None))
        }
        BlockRequest::Trim { offset, length } | BlockRequest::WriteZeroes { offset, length } => {
            let zeroes = matches!(request, BlockRequest::WriteZeroes { .. });
            let limits = if zeroes {
                info.write_zeroes
            } else {
                info.discard
            };
            let Some(limits) = limits else {
                return Err((Err(BlockError::Unsupported), None));
            };
            if !aligned(offset, length) {
                return Err((Err(BlockError::Invalid), None));
            }
            let Some(ranges) = ranges(offset, length, limits, block) else {
                return Err((Err(BlockError::Invalid), None));
            };
            let request = if zeroes {
                BlkRequest::WriteZeroes {
                    ranges,
                    unmap: false,
                }
            } else {
                BlkRequest::Discard { ranges }
            };
            Ok(Planned {
                request,
                caller: None,
                read: false,
                tail: None,
            })
        }
    }
}

/// What the service asked for, to give it back exactly when the queue is full.
#[derive(Clone, Copy)]
enum Original {
    Read(u64),
    Write(u64),
    Flush,
    Trim(u64, u64),
    WriteZeroes(u64, u64),
}

impl Original {
    fn of(request: &BlockRequest) -> Self {
        match *request {
            BlockRequest::Read { offset, .. } => Self::Read(offset),
            BlockRequest::Write { offset, .. } => Self::Write(offset),
            BlockRequest::Flush => Self::Flush,
            BlockRequest::Trim { offset, length } => Self::Trim(offset, length),
            BlockRequest::WriteZeroes { offset, length } => Self::WriteZeroes(offset, length),
        }
    }

    /// The request again, with the caller's buffer.
    fn rebuild(self, buffer: Option<Vec<u8>>) -> BlockRequest {
        let buffer = buffer.unwrap_or_default();
        match self {
            Self::Read(offset) => BlockRequest::Read { offset, buffer },
            Self::Write(offset) => BlockRequest::Write { offset, buffer },
            Self::Flush => BlockRequest::Flush,
            Self::Trim(offset, length) => BlockRequest::Trim { offset, length },
            Self::WriteZeroes(offset, length) => BlockRequest::WriteZeroes { offset, length },
        }
    }
}
