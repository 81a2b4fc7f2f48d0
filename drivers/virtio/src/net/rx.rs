//! The receive path (§5.1.6.3, §5.1.6.4): posting receive buffers, taking used ones back
//! (one buffer, or several with VIRTIO_NET_F_MRG_RXBUF), the receive checksum policy
//! ([`RxChecksums`]: complete partial checksums, or trust what the device vouches for and
//! verify the rest), dropping malformed frames and frames for other stations, and recycling buffers in place.
//! Every length and count the device wrote is bounded before use.

use alloc::vec::Vec;

use super::header::{
    ETHERNET_HEADER_LEN, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, NET_HEADER_LEN, NetHeader,
    complete_checksum, parse_header, partial_checksum_fits, verify_transport_checksum,
};
use super::{BROADCAST_MAC, LARGE_RX_BUFFER_LEN, NetError, RxChecksums, VirtioNet};
use crate::dma::{DmaBuf, DmaHal, Part};
use crate::queue::CallbackState;
use crate::transport::Transport;

/// A received frame, owned by the caller until [`VirtioNet::recycle`].
pub struct RxFrame<H: DmaHal + Clone> {
    /// The receive buffers it came in, no longer shared with the device.
    pub(super) parts: Vec<DmaBuf<H>>,
    /// Frame bytes, when in place: (offset, length) in the first part.
    pub(super) in_place: Option<(usize, usize)>,
    /// The frame copied together from several buffers (VIRTIO_NET_F_MRG_RXBUF).
    pub(super) merged: Vec<u8>,
}

impl<H: DmaHal + Clone> RxFrame<H> {
    /// The Ethernet frame.
    pub fn bytes(&self) -> &[u8] {
        match (self.in_place, self.parts.first()) {
            (Some((offset, length)), Some(part)) => {
                part.as_bytes().get(offset..offset + length).unwrap_or(&[])
            }
            _ => &self.merged,
        }
    }

    /// The Ethernet frame, writable: the buffers belong to the caller until recycled, so a
    /// stack may rewrite headers in place instead of copying the frame.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match (self.in_place, self.parts.first_mut()) {
            (Some((offset, length)), Some(part)) => part
                .as_bytes_mut()
                .get_mut(offset..offset + length)
                .unwrap_or(&mut []),
            _ => &mut self.merged,
        }
    }
}

/// What the checksum policy decided about one received frame.
enum ChecksumVerdict {
    /// Hand it to the caller.
    Pass,
    /// Its NEEDS_CSUM offsets do not fit: malformed.
    Malformed,
    /// Its TCP/UDP checksum is wrong and nothing vouches for it: drop.
    Bad,
}

impl<H: DmaHal + Clone, T: Transport> VirtioNet<H, T> {
    pub(super) fn post_rx(&mut self, buffer: DmaBuf<H>) -> Result<(), NetError> {
        let part = Part::writable(buffer).map_err(|(_, error)| NetError::Dma(error))?;
        match self.rx.add(part) {
            Ok(()) => {
                self.rx_added = true;
                self.stats.rx_buffers_posted += 1;
                Ok(())
            }
            Err(error) => Err(NetError::Queue(error.error)),
        }
    }

    /// Takes the next received frame. Malformed buffers are dropped (counted) and recycled,
    /// and so are frames for another station (counted in `rx_foreign`).
    pub fn receive(&mut self) -> Result<Option<RxFrame<H>>, NetError> {
        loop {
            let used = match self.rx.pop_used() {
                Ok(Some(used)) => used,
                Ok(None) => return Ok(None),
                Err(error) => {
                    return Err(NetError::Device {
                        queue: self.rx_index,
                        error,
                    });
                }
            };
            // `len` is at most the buffer's size (the queue checked it). End the transfer
            // before reading a byte: a bounce-buffer HAL copies the data back here.
            let length = used.len as usize;
            let buf = used.buffer.into_buf();
            if length < NET_HEADER_LEN + ETHERNET_HEADER_LEN {
                self.stats.rx_malformed += 1;
                self.post_rx(buf)?;
                continue;
            }
            let header = parse_header(buf.as_bytes());
            let buffers = if self.mergeable {
                header.num_buffers
            } else {
                1
            };
            if buffers == 0 || usize::from(buffers) > usize::from(self.rx.size()) {
                self.stats.rx_malformed += 1;
                self.post_rx(buf)?;
                continue;
            }
            let mut frame = RxFrame {
                parts: Vec::new(),
                in_place: None,
                merged: Vec::new(),
            };
            if buffers == 1 {
                frame.in_place = Some((NET_HEADER_LEN, length - NET_HEADER_LEN));
                frame.parts.push(buf);
            } else {
                // Mergeable: the frame continues in the next `buffers - 1` used buffers
                // (§5.1.6.4). Copy them together; they must already be in the used ring.
                // Reserve for the buffers announced, but never more than one largest frame: the
                // count is the device's word.
                frame.merged.reserve_exact(
                    (usize::from(buffers) * self.rx_buffer_len)
                        .min(LARGE_RX_BUFFER_LEN.max(self.rx_buffer_len)),
                );
                frame
                    .merged
                    .extend_from_slice(&buf.as_bytes()[NET_HEADER_LEN..length]);
                frame.parts.push(buf);
                let mut complete = true;
                for _ in 1..buffers {
                    match self.rx.pop_used() {
                        Ok(Some(next)) => {
                            let next_buf = next.buffer.into_buf();
                            let next_length = (next.len as usize).min(next_buf.len());
                            frame
                                .merged
                                .extend_from_slice(&next_buf.as_bytes()[..next_length]);
                            frame.parts.push(next_buf);
                        }
                        Ok(None) => {
                            complete = false;
                            break;
                        }
                        Err(error) => {
                            return Err(NetError::Device {
                                queue: self.rx_index,
                                error,
                            });
                        }
                    }
                }
                if !complete {
                    self.stats.rx_malformed += 1;
                    self.recycle(frame)?;
                    continue;
                }
                self.stats.rx_merged += 1;
            }
            match self.check_checksum(&header, frame.bytes_mut()) {
                ChecksumVerdict::Pass => {}
                ChecksumVerdict::Malformed => {
                    self.stats.rx_malformed += 1;
                    self.recycle(frame)?;
                    continue;
                }
                ChecksumVerdict::Bad => {
                    // Counted with the malformed frames too: `rx_malformed` stays "every
                    // frame the driver dropped as bad".
                    self.stats.rx_checksum_bad += 1;
                    self.stats.rx_malformed += 1;
                    self.recycle(frame)?;
                    continue;
                }
            }
            if self.drop_foreign && !self.is_for_us(frame.bytes()) {
                self.stats.rx_foreign += 1;
                self.recycle(frame)?;
                continue;
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += frame.bytes().len() as u64;
            return Ok(Some(frame));
        }
    }

    /// Applies the receive checksum policy ([`RxChecksums`], §5.1.6.4) to one frame.
    fn check_checksum(&mut self, header: &NetHeader, frame: &mut [u8]) -> ChecksumVerdict {
        let partial = header.flags & HDR_F_NEEDS_CSUM != 0;
        match self.rx_checksums {
            RxChecksums::Complete => {
                if !partial {
                    return ChecksumVerdict::Pass;
                }
                if !complete_checksum(frame, header.csum_start, header.csum_offset) {
                    return ChecksumVerdict::Malformed;
                }
                self.stats.rx_checksums_completed += 1;
                ChecksumVerdict::Pass
            }
            RxChecksums::VerifyUnvouched => {
                if partial {
                    // The data came from a trusted source with its checksum still to be
                    // computed: nothing to verify, but the offsets must make sense.
                    if !partial_checksum_fits(frame.len(), header.csum_start, header.csum_offset) {
                        return ChecksumVerdict::Malformed;
                    }
                    self.stats.rx_checksums_vouched += 1;
                    return ChecksumVerdict::Pass;
                }
                if header.flags & HDR_F_DATA_VALID != 0 {
                    self.stats.rx_checksums_vouched += 1;
                    return ChecksumVerdict::Pass;
                }
                match verify_transport_checksum(frame) {
                    Some(true) => {
                        self.stats.rx_checksums_verified += 1;
                        ChecksumVerdict::Pass
                    }
                    Some(false) => ChecksumVerdict::Bad,
                    None => ChecksumVerdict::Pass,
                }
            }
        }
    }

    /// Whether a frame's destination is this station's MAC or broadcast.
    fn is_for_us(&self, frame: &[u8]) -> bool {
        match frame.get(..6) {
            Some(destination) => destination == self.mac || destination == BROADCAST_MAC,
            None => false,
        }
    }

    /// Gives a received frame's buffers back to the device (published at the next
    /// [`flush`](Self::flush)).
    pub fn recycle(&mut self, mut frame: RxFrame<H>) -> Result<(), NetError> {
        core::mem::swap(&mut self.scratch_parts, &mut frame.parts);
        let mut result = Ok(());
        while let Some(buffer) = self.scratch_parts.pop() {
            if let Err(error) = self.post_rx(buffer) {
                result = Err(error);
            }
        }
        result
    }

    /// Arms receive interrupts; `true` when frames arrived that the interrupt may not report
    /// (poll before waiting).
    pub fn arm_rx_interrupt(&mut self) -> bool {
        self.rx.enable_cb() == CallbackState::UsedPending
    }

    /// Disarms receive interrupts.
    pub fn disarm_rx_interrupt(&mut self) {
        self.rx.disable_cb();
    }

    /// Whether the receive queue has used buffers waiting.
    pub fn rx_pending(&self) -> bool {
        self.rx.has_used()
    }
}
