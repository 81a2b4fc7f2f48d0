//! Block requests (§5.2.6): what the caller asks for ([`BlkRequest`]), the checks of §5.2.6.1
//! made before anything reaches the queue, the chain `[header, data…, status]` built from the
//! header/status pool and the caller's buffers, completions validated against the used length
//! and the status byte ([`Completion`]), and the bounded blocking helpers.

use alloc::vec::Vec;
use core::fmt;

use super::{BlkError, BlkInfo, InFlight, LengthProblem, REQUEST_QUEUE, RangeLimits, VirtioBlk};
use crate::dma::{DmaBuf, DmaError, DmaHal, Part};
use crate::spec::{BlkFeatures, blk_req};
use crate::transport::Transport;

/// How often the blocking helpers look at the used ring.
const POLL_STEP_US: u32 = 10;

/// Identifies a submitted request; unique for the driver instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The request types this driver sends (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

impl RequestKind {
    /// The header's `type` value.
    pub const fn type_code(self) -> u32 {
        match self {
            Self::Read => blk_req::T_IN,
            Self::Write => blk_req::T_OUT,
            Self::Flush => blk_req::T_FLUSH,
            Self::GetId => blk_req::T_GET_ID,
            Self::Discard => blk_req::T_DISCARD,
            Self::WriteZeroes => blk_req::T_WRITE_ZEROES,
        }
    }
}

/// One range of a discard or write-zeroes command, in 512-byte sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
}

/// A request for [`VirtioBlk::submit`]. Sectors are 512 bytes (§5.2.6) whatever the block
/// size; data must be whole blocks starting on a block boundary.
pub enum BlkRequest<H: DmaHal> {
    /// Read into `buffers` (each one segment, all of it written), starting at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Where the data goes, in order.
        buffers: Vec<DmaBuf<H>>,
    },
    /// Write the whole of `buffers`, in order, starting at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The data, in order.
        buffers: Vec<DmaBuf<H>>,
    },
    /// Flush the device's write cache (VIRTIO_BLK_F_FLUSH).
    Flush,
    /// The device id string into `buffer`, which must be exactly 20 bytes (§5.2.6).
    GetId {
        /// Receives the id (see [`id_string`]).
        buffer: DmaBuf<H>,
    },
    /// Discard the ranges (VIRTIO_BLK_F_DISCARD).
    Discard {
        /// The ranges.
        ranges: Vec<BlkRange>,
    },
    /// Write zeroes to the ranges (VIRTIO_BLK_F_WRITE_ZEROES), allowing the device to
    /// deallocate them when `unmap` is set.
    WriteZeroes {
        /// The ranges.
        ranges: Vec<BlkRange>,
        /// The `unmap` flag of every segment.
        unmap: bool,
    },
}

impl<H: DmaHal> BlkRequest<H> {
    /// The request's type.
    pub fn kind(&self) -> RequestKind {
        match self {
            Self::Read { .. } => RequestKind::Read,
            Self::Write { .. } => RequestKind::Write,
            Self::Flush => RequestKind::Flush,
            Self::GetId { .. } => RequestKind::GetId,
            Self::Discard { .. } => RequestKind::Discard,
            Self::WriteZeroes { .. } => RequestKind::WriteZeroes,
        }
    }

    /// The caller's buffers, handed back.
    fn into_buffers(self) -> Vec<DmaBuf<H>> {
        match self {
            Self::Read { buffers, .. } | Self::Write { buffers, .. } => buffers,
            Self::GetId { buffer } => alloc::vec![buffer],
            Self::Flush | Self::Discard { .. } | Self::WriteZeroes { .. } => Vec::new(),
        }
    }
}

impl<H: DmaHal> fmt::Debug for BlkRequest<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { sector, buffers } => write!(f, "Read({sector}, {buffers:?})"),
            Self::Write { sector, buffers } => write!(f, "Write({sector}, {buffers:?})"),
            Self::Flush => f.write_str("Flush"),
            Self::GetId { buffer } => write!(f, "GetId({buffer:?})"),
            Self::Discard { ranges } => write!(f, "Discard({ranges:?})"),
            Self::WriteZeroes { ranges, unmap } => write!(f, "WriteZeroes({ranges:?}, {unmap})"),
        }
    }
}

/// A finished request: its id, its outcome, and the caller's buffers back (read data is in
/// them; empty for flush, discard and write zeroes).
pub struct Completion<H: DmaHal> {
    /// The request.
    pub id: RequestId,
    /// Its type.
    pub kind: RequestKind,
    /// The outcome: the status byte (§5.2.6), or a device error about the completion itself.
    pub result: Result<(), BlkError>,
    /// The caller's buffers, no longer shared with the device.
    pub buffers: Vec<DmaBuf<H>>,
}

impl<H: DmaHal> fmt::Debug for Completion<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("result", &self.result)
            .field("buffers", &self.buffers)
            .finish()
    }
}

/// A request that was not (or not entirely) carried out: why, and the caller's buffers.
pub struct Rejected<H: DmaHal> {
    /// Why.
    pub error: BlkError,
    /// The caller's buffers, untouched by the device; empty when the request is still in
    /// flight (`in_flight`).
    pub buffers: Vec<DmaBuf<H>>,
    /// Set when the request did reach the queue (the doorbell failed, or a bounded wait ended
    /// first): its completion, with the buffers, comes from [`VirtioBlk::poll`].
    pub in_flight: Option<RequestId>,
}

impl<H: DmaHal> fmt::Debug for Rejected<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .field("buffers", &self.buffers)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<H: DmaHal> fmt::Display for Rejected<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)
    }
}

/// The id in a GET_ID answer: the bytes up to the first NUL, at most 20 (§5.2.6).
pub fn id_string(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.get(..blk_req::ID_BYTES).unwrap_or(bytes);
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// What a checked request needs: data bytes (for the counters) and device-writable bytes,
/// status included (what the used length must reach).
struct Plan {
    data_bytes: u64,
    writable: u32,
}

/// The §5.2.6.1 checks of a read or write's data: shape within the limits, whole blocks from
/// a block boundary, inside the capacity. Returns the data bytes.
fn check_data<H: DmaHal>(
    info: &BlkInfo,
    max_segments: usize,
    sector: u64,
    buffers: &[DmaBuf<H>],
) -> Result<u64, BlkError> {
    let bad = |len: u64, problem| BlkError::BadLength { len, problem };
    if buffers.is_empty() {
        return Err(bad(0, LengthProblem::Zero));
    }
    if buffers.len() > max_segments {
        let problem = LengthProblem::TooManySegments {
            segments: buffers.len(),
            max: max_segments,
        };
        return Err(bad(0, problem));
    }
    let mut total = 0u64;
    for buffer in buffers {
        let len = buffer.len() as u64;
        if len == 0 {
            return Err(bad(0, LengthProblem::Zero));
        }
        if let Some(size_max) = info.size_max
            && len > u64::from(size_max)
        {
            let problem = LengthProblem::SegmentTooLarge {
                segment: len,
                size_max,
            };
            return Err(bad(len, problem));
        }
        total = total.saturating_add(len);
    }
    let block_size = info.block_size;
    if !total.is_multiple_of(u64::from(block_size)) {
        return Err(bad(total, LengthProblem::NotBlockMultiple { block_size }));
    }
    // The whole chain (header, data, status) must fit a 32-bit length (§2.7.5.2).
    if total.saturating_add(blk_req::HEADER_LEN as u64 + 1) > u64::from(u32::MAX) {
        return Err(bad(total, LengthProblem::TooLong));
    }
    check_extent(info, sector, total / u64::from(blk_req::SECTOR_SIZE))?;
    Ok(total)
}

/// `sectors` from `sector`: on a block boundary and inside the capacity (§5.2.6.1: no request
/// past the end of the device).
fn check_extent(info: &BlkInfo, sector: u64, sectors: u64) -> Result<(), BlkError> {
    if !sector.is_multiple_of(info.sectors_per_block()) {
        return Err(BlkError::Misaligned {
            sector,
            block_size: info.block_size,
        });
    }
    match sector.checked_add(sectors) {
        Some(end) if end <= info.capacity => Ok(()),
        _ => Err(BlkError::OutOfRange {
            sector,
            sectors,
            capacity: info.capacity,
        }),
    }
}

/// The checks of a discard or write-zeroes command's ranges against the device's limits
/// (§5.2.4) and the capacity.
fn check_ranges(info: &BlkInfo, limits: RangeLimits, ranges: &[BlkRange]) -> Result<(), BlkError> {
    let bad = |len: u64, problem| BlkError::BadLength { len, problem };
    if ranges.is_empty() {
        return Err(bad(0, LengthProblem::Zero));
    }
    if ranges.len() > limits.max_ranges as usize {
        let problem = LengthProblem::TooManyRanges {
            ranges: ranges.len(),
            max: limits.max_ranges,
        };
        return Err(bad(ranges.len() as u64, problem));
    }
    for range in ranges {
        let sectors = u64::from(range.sectors);
        if range.sectors == 0 {
            return Err(bad(0, LengthProblem::Zero));
        }
        if range.sectors > limits.max_sectors {
            let problem = LengthProblem::RangeTooLong {
                sectors: range.sectors,
                max: limits.max_sectors,
            };
            return Err(bad(sectors, problem));
        }
        if !sectors.is_multiple_of(info.sectors_per_block()) {
            let problem = LengthProblem::NotBlockMultiple {
                block_size: info.block_size,
            };
            return Err(bad(sectors * u64::from(blk_req::SECTOR_SIZE), problem));
        }
        check_extent(info, range.sector, sectors)?;
    }
    Ok(())
}

/// The segments of a discard or write-zeroes command (§5.2.6), little-endian.
fn range_segments(ranges: &[BlkRange], unmap: bool, bytes: &mut [u8]) {
    let flags = if unmap { blk_req::SEGMENT_F_UNMAP } else { 0 };
    for (range, segment) in ranges
        .iter()
        .zip(bytes.chunks_exact_mut(blk_req::SEGMENT_LEN))
    {
        let at = |offset: usize, width: usize| offset..offset + width;
        segment[at(blk_req::SEGMENT_SECTOR, 8)].copy_from_slice(&range.sector.to_le_bytes());
        segment[at(blk_req::SEGMENT_NUM_SECTORS, 4)].copy_from_slice(&range.sectors.to_le_bytes());
        segment[at(blk_req::SEGMENT_FLAGS, 4)].copy_from_slice(&flags.to_le_bytes());
    }
}

/// A chain that could not be shared: every buffer, in order, and why.
type Unshared<H> = (Vec<DmaBuf<H>>, DmaError);

/// Shares every buffer with the device in chain order, each whole, device-writable or not;
/// on a failure, every buffer comes back in order with the error.
fn share_all<H: DmaHal>(buffers: Vec<(DmaBuf<H>, bool)>) -> Result<Vec<Part<H>>, Unshared<H>> {
    let mut parts = Vec::with_capacity(buffers.len());
    let mut rest = buffers.into_iter();
    for (buffer, writable) in rest.by_ref() {
        let shared = if writable {
            Part::writable(buffer)
        } else {
            let len = buffer.len();
            Part::readable(buffer, len)
        };
        match shared {
            Ok(part) => parts.push(part),
            Err((buffer, error)) => {
                let mut back: Vec<DmaBuf<H>> = parts.into_iter().map(Part::into_buf).collect();
                back.push(buffer);
                back.extend(rest.map(|(buffer, _)| buffer));
                return Err((back, error));
            }
        }
    }
    Ok(parts)
}

impl<H: DmaHal + Clone, T: Transport> VirtioBlk<H, T> {
    /// Largest number of data segments in one request: `seg_max` when the device limits it,
    /// and room for the header and status in the ring.
    pub fn max_data_segments(&self) -> usize {
        let ring = usize::from(self.queue.size()).saturating_sub(2).max(1);
        match self.info.seg_max {
            Some(seg_max) => ring.min(seg_max as usize),
            None => ring,
        }
    }

    fn check(&self, request: &BlkRequest<H>) -> Result<Plan, BlkError> {
        let info = &self.info;
        let mutates = matches!(
            request,
            BlkRequest::Write { .. } | BlkRequest::Discard { .. } | BlkRequest::WriteZeroes { .. }
        );
        // §5.2.6.1: no write to a read-only device (nor anything else that changes it).
        if mutates && info.read_only {
            return Err(BlkError::ReadOnly);
        }
        let status_only = Plan {
            data_bytes: 0,
            writable: 1,
        };
        match request {
            BlkRequest::Read { sector, buffers } => {
                let data_bytes = check_data(info, self.max_data_segments(), *sector, buffers)?;
                // check_data bounded the chain to 32 bits.
                let writable = u32::try_from(data_bytes + 1).unwrap_or(u32::MAX);
                Ok(Plan {
                    data_bytes,
                    writable,
                })
            }
            BlkRequest::Write { sector, buffers } => {
                let data_bytes = check_data(info, self.max_data_segments(), *sector, buffers)?;
                Ok(Plan {
                    data_bytes,
                    writable: 1,
                })
            }
            BlkRequest::Flush if info.flush => Ok(status_only),
            BlkRequest::Flush => Err(BlkError::NotNegotiated {
                feature: BlkFeatures::FLUSH,
            }),
            BlkRequest::GetId { buffer } => {
                if buffer.len() != blk_req::ID_BYTES {
                    return Err(BlkError::BadLength {
                        len: buffer.len() as u64,
                        problem: LengthProblem::IdBuffer,
                    });
                }
                Ok(Plan {
                    data_bytes: 0,
                    writable: blk_req::ID_BYTES as u32 + 1,
                })
            }
            BlkRequest::Discard { ranges } => {
                let limits = info.discard.ok_or(BlkError::NotNegotiated {
                    feature: BlkFeatures::DISCARD,
                })?;
                check_ranges(info, limits, ranges)?;
                Ok(status_only)
            }
            BlkRequest::WriteZeroes { ranges, .. } => {
                let limits = info.write_zeroes.ok_or(BlkError::NotNegotiated {
                    feature: BlkFeatures::WRITE_ZEROES,
                })?;
                check_ranges(info, limits, ranges)?;
                Ok(status_only)
            }
        }
    }

    fn reject(&mut self, error: BlkError, buffers: Vec<DmaBuf<H>>) -> Rejected<H> {
        self.stats.rejected += 1;
        Rejected {
            error,
            buffers,
            in_flight: None,
        }
    }

    /// Puts a chain's header and status (first and last) back in the pool; returns the rest,
    /// or nothing when the data was the driver's own (discard/write-zeroes segments).
    fn restore(&mut self, mut chain: Vec<DmaBuf<H>>, kind: RequestKind) -> Vec<DmaBuf<H>> {
        if chain.len() >= 2 {
            let status = chain.pop();
            let header = chain.remove(0);
            if let Some(status) = status {
                self.pool.push((header, status));
            }
        }
        match kind {
            RequestKind::Discard | RequestKind::WriteZeroes => Vec::new(),
            _ => chain,
        }
    }

    /// Submits a request: checks it (§5.2.6.1), builds the chain `[header, data…, status]`,
    /// makes it available and notifies the device if it asked to be. Several requests may be
    /// in flight, up to the queue's capacity ([`BlkError::Busy`] beyond). A refused request
    /// comes back with its buffers.
    pub fn submit(&mut self, request: BlkRequest<H>) -> Result<RequestId, Rejected<H>> {
        if let Some(error) = self.queue.broken() {
            return Err(self.reject(BlkError::Device(error), request.into_buffers()));
        }
        let plan = match self.check(&request) {
            Ok(plan) => plan,
            Err(error) => return Err(self.reject(error, request.into_buffers())),
        };
        let kind = request.kind();
        let sector = match &request {
            BlkRequest::Read { sector, .. } | BlkRequest::Write { sector, .. } => *sector,
            // §5.2.6.1: the sector of any other request is 0.
            _ => 0,
        };
        // The data segments in chain order, with their direction.
        let data: Vec<(DmaBuf<H>, bool)> = match request {
            BlkRequest::Read { buffers, .. } => buffers.into_iter().map(|b| (b, true)).collect(),
            BlkRequest::Write { buffers, .. } => buffers.into_iter().map(|b| (b, false)).collect(),
            BlkRequest::Flush => Vec::new(),
            BlkRequest::GetId { buffer } => alloc::vec![(buffer, true)],
            BlkRequest::Discard { ranges } => match self.segments(&ranges, false) {
                Ok(buffer) => alloc::vec![(buffer, false)],
                Err(error) => return Err(self.reject(error, Vec::new())),
            },
            BlkRequest::WriteZeroes { ranges, unmap } => match self.segments(&ranges, unmap) {
                Ok(buffer) => alloc::vec![(buffer, false)],
                Err(error) => return Err(self.reject(error, Vec::new())),
            },
        };
        if !self.queue.can_add(data.len() + 2) {
            let in_flight = self.queue.in_flight();
            return Err(self.reject(BlkError::Busy { in_flight }, self.caller_data(data, kind)));
        }
        let Some((mut header, mut status)) = self.pool.pop() else {
            let in_flight = self.queue.in_flight();
            return Err(self.reject(BlkError::Busy { in_flight }, self.caller_data(data, kind)));
        };
        {
            let bytes = header.as_bytes_mut();
            bytes.fill(0);
            bytes[blk_req::HEADER_TYPE..blk_req::HEADER_TYPE + 4]
                .copy_from_slice(&kind.type_code().to_le_bytes());
            bytes[blk_req::HEADER_SECTOR..blk_req::HEADER_SECTOR + 8]
                .copy_from_slice(&sector.to_le_bytes());
        }
        // Not a status value: a device that never writes the status is caught as BadStatus.
        status.as_bytes_mut().fill(0xff);
        let key = header.phys();
        let mut chain = Vec::with_capacity(data.len() + 2);
        chain.push((header, false));
        chain.extend(data);
        chain.push((status, true));
        let parts = match share_all(chain) {
            Ok(parts) => parts,
            Err((back, error)) => {
                let buffers = self.restore(back, kind);
                return Err(self.reject(BlkError::Dma(error), buffers));
            }
        };
        if let Err(error) = self.queue.add(parts) {
            let back = error.buffer.into_iter().map(Part::into_buf).collect();
            let buffers = self.restore(back, kind);
            return Err(self.reject(BlkError::Queue(error.error), buffers));
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.in_flight.insert(
            key,
            InFlight {
                id,
                kind,
                data_bytes: plan.data_bytes,
                writable: plan.writable,
            },
        );
        if self.queue.should_notify() {
            if let Err(error) = self.device.transport().notify(REQUEST_QUEUE) {
                return Err(Rejected {
                    error: BlkError::Transport(error),
                    buffers: Vec::new(),
                    in_flight: Some(id),
                });
            }
            self.stats.kicks += 1;
        }
        Ok(id)
    }

    /// The caller's part of not-yet-shared data (none for driver-built segments).
    fn caller_data(&self, data: Vec<(DmaBuf<H>, bool)>, kind: RequestKind) -> Vec<DmaBuf<H>> {
        match kind {
            RequestKind::Discard | RequestKind::WriteZeroes => Vec::new(),
            _ => data.into_iter().map(|(buffer, _)| buffer).collect(),
        }
    }

    /// A DMA buffer holding the discard/write-zeroes segments for `ranges`.
    fn segments(&self, ranges: &[BlkRange], unmap: bool) -> Result<DmaBuf<H>, BlkError> {
        let len = ranges.len().saturating_mul(blk_req::SEGMENT_LEN);
        let mut buffer = DmaBuf::new(self.hal.clone(), len)?;
        range_segments(ranges, unmap, buffer.as_bytes_mut());
        Ok(buffer)
    }

    /// The next finished request, if any (completions taken off the ring by a blocking helper
    /// first). `Err` only when the device broke the queue ([`BlkError::Device`], repeated on
    /// every call; the requests in flight are lost with the queue) or for a driver bug; a
    /// failed request is a [`Completion`] whose `result` is the error.
    pub fn poll(&mut self) -> Result<Option<Completion<H>>, BlkError> {
        if let Some(done) = self.completed.pop_front() {
            return Ok(Some(done));
        }
        self.take_used()
    }

    fn take_used(&mut self) -> Result<Option<Completion<H>>, BlkError> {
        let used = match self.queue.pop_used() {
            Ok(Some(used)) => used,
            Ok(None) => return Ok(None),
            Err(error) => return Err(BlkError::Device(error)),
        };
        // End every transfer before reading a byte: a bounce-buffer HAL copies device-written
        // data back in `unshare`.
        let chain: Vec<DmaBuf<H>> = used.buffer.into_iter().map(Part::into_buf).collect();
        let flight = chain
            .first()
            .and_then(|header| self.in_flight.remove(&header.phys()));
        let Some(flight) = flight else {
            // The queue only hands back chains this driver added, each recorded: unreachable
            // unless the driver is wrong. Recycle the header and status anyway.
            self.restore(chain, RequestKind::Flush);
            return Err(BlkError::UnknownRequest { id: None });
        };
        let status = chain
            .last()
            .and_then(|status| status.as_bytes().first().copied())
            .unwrap_or(0xff);
        // §2.7.8: only the first `len` device-writable bytes may be trusted, and the status is
        // the last of them.
        let result = if used.len < flight.writable {
            Err(BlkError::ShortCompletion {
                len: used.len,
                needed: flight.writable,
            })
        } else {
            match status {
                blk_req::S_OK => Ok(()),
                blk_req::S_IOERR => Err(BlkError::IoError),
                blk_req::S_UNSUPP => Err(BlkError::Unsupported),
                status => Err(BlkError::BadStatus { status }),
            }
        };
        let stats = &mut self.stats;
        match (result, flight.kind) {
            (Err(_), _) => stats.errors += 1,
            (Ok(()), RequestKind::Read) => {
                stats.reads += 1;
                stats.read_bytes += flight.data_bytes;
            }
            (Ok(()), RequestKind::Write) => {
                stats.writes += 1;
                stats.written_bytes += flight.data_bytes;
            }
            (Ok(()), RequestKind::Flush) => stats.flushes += 1,
            (Ok(()), RequestKind::Discard) => stats.discards += 1,
            (Ok(()), RequestKind::WriteZeroes) => stats.write_zeroes += 1,
            (Ok(()), RequestKind::GetId) => {}
        }
        let buffers = self.restore(chain, flight.kind);
        Ok(Some(Completion {
            id: flight.id,
            kind: flight.kind,
            result,
            buffers,
        }))
    }

    /// Waits, bounded, for request `id`: polls the ring every 10 µs ([`crate::hal::Hal::
    /// spin_delay_us`]) for at most `timeout_us`. Other requests' completions met on the way
    /// are kept for [`Self::poll`]. On [`BlkError::Timeout`] the request stays in flight.
    pub fn wait(&mut self, id: RequestId, timeout_us: u32) -> Result<Completion<H>, BlkError> {
        if let Some(position) = self.completed.iter().position(|done| done.id == id)
            && let Some(done) = self.completed.remove(position)
        {
            return Ok(done);
        }
        if !self.in_flight.values().any(|flight| flight.id == id) {
            return Err(BlkError::UnknownRequest { id: Some(id) });
        }
        let mut waited = 0u32;
        loop {
            match self.take_used()? {
                Some(done) if done.id == id => return Ok(done),
                Some(done) => {
                    self.completed.push_back(done);
                    continue;
                }
                None => {}
            }
            if waited >= timeout_us {
                return Err(BlkError::Timeout { id });
            }
            self.hal.spin_delay_us(POLL_STEP_US);
            waited = waited.saturating_add(POLL_STEP_US);
        }
    }

    /// Submits `request` and waits for it, bounded ([`Self::wait`]). The completion carries
    /// the request's own outcome in `result`; a [`Rejected`] with `in_flight` set means the
    /// request reached the device and its completion will come from [`Self::poll`].
    pub fn execute(
        &mut self,
        request: BlkRequest<H>,
        timeout_us: u32,
    ) -> Result<Completion<H>, Rejected<H>> {
        let id = self.submit(request)?;
        self.wait(id, timeout_us).map_err(|error| Rejected {
            error,
            buffers: Vec::new(),
            in_flight: Some(id),
        })
    }
}
