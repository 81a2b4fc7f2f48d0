//! The transmit path (§5.1.6.2): frames written in place into transmit buffers from a pool,
//! checksum offload when negotiated, TCP segmentation offload (HOST_TSO4: frames beyond the
//! MTU in large buffers, cut by the device), completions reclaimed on the send path (no transmit
//! interrupts unless the pool runs dry), and batched doorbells ([`VirtioNet::flush`]).

use super::header::{
    NET_HEADER_LEN, prepare_checksum_offload, segmentation_layout, write_checksum_offload_header,
    write_segmentation_header,
};
use super::{NetError, VirtioNet};
use crate::dma::{DmaHal, Part};
use crate::queue::CallbackState;
use crate::transport::Transport;

impl<H: DmaHal + Clone, T: Transport> VirtioNet<H, T> {
    /// Takes back transmit buffers the device has finished with.
    pub(super) fn reclaim_tx(&mut self) -> Result<(), NetError> {
        loop {
            match self.tx.pop_used() {
                Ok(Some(used)) => {
                    let buffer = used.buffer.into_buf();
                    self.give_back(buffer);
                }
                Ok(None) => return Ok(()),
                Err(error) => {
                    return Err(NetError::Device {
                        queue: self.tx_index,
                        error,
                    });
                }
            }
        }
    }

    /// Whether a frame of any length up to [`Self::max_segmented_frame`] (else the MTU) can be
    /// queued now (reclaims completions first): with HOST_TSO4 a large buffer must be free too,
    /// because the caller learns the length only after this answer.
    pub fn can_transmit(&mut self) -> bool {
        // A broken queue reports its error on the next transmit; here it only means "no".
        let _ = self.reclaim_tx();
        !self.tx_pool.is_empty() && self.tx.can_add(1) && (!self.tso || !self.tso_pool.is_empty())
    }

    /// Queues one frame of `length` bytes, which `fill` writes in place. Returns `Ok(None)`
    /// without calling `fill` when the ring is full (back-pressure) or the frame is too long;
    /// `Ok(Some(_))` exactly when `fill` ran and the frame was queued. With HOST_TSO4 a frame
    /// longer than the MTU (up to [`Self::max_segmented_frame`]) goes in a large buffer for
    /// the device to segment (§5.1.6.2); if it turns out not to be an IPv4 TCP segment, it is
    /// dropped after `fill` ran (`Ok(None)`, counted in `tx_oversize`).
    pub fn transmit<R>(
        &mut self,
        length: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<Option<R>, NetError> {
        self.reclaim_tx()?;
        let segmented = length > self.max_frame();
        // §5.1.4.2: no frame larger than the MTU plus the Ethernet header unless the device
        // segments it (the buffers are larger, so their size alone is not the limit).
        let limit = if segmented {
            self.max_segmented_frame().unwrap_or(0)
        } else {
            self.max_frame()
        };
        if length == 0 || length > limit {
            self.stats.tx_oversize += 1;
            return Ok(None);
        }
        if !self.tx.can_add(1) {
            self.stats.tx_full += 1;
            return Ok(None);
        }
        let pool = if segmented {
            &mut self.tso_pool
        } else {
            &mut self.tx_pool
        };
        let Some(mut buffer) = pool.pop() else {
            self.stats.tx_full += 1;
            return Ok(None);
        };
        if NET_HEADER_LEN + length > buffer.len() {
            self.stats.tx_oversize += 1;
            self.give_back(buffer);
            return Ok(None);
        }
        let bytes = buffer.as_bytes_mut();
        let (header, frame) = bytes.split_at_mut(NET_HEADER_LEN);
        let frame = &mut frame[..length];
        let result = fill(frame);
        header.fill(0);
        if segmented {
            let layout = segmentation_layout(frame, self.mtu);
            let Some(((hdr_len, gso_size), (start, offset))) =
                layout.zip(prepare_checksum_offload(frame))
            else {
                self.stats.tx_oversize += 1;
                self.give_back(buffer);
                return Ok(None);
            };
            write_segmentation_header(header, start, offset, hdr_len, gso_size);
            self.stats.tx_segmented += 1;
            self.stats.tx_checksum_offloaded += 1;
        } else if self.tx_checksum_offload
            && let Some((start, offset)) = prepare_checksum_offload(frame)
        {
            write_checksum_offload_header(header, start, offset);
            self.stats.tx_checksum_offloaded += 1;
        }
        let part = match Part::readable(buffer, NET_HEADER_LEN + length) {
            Ok(part) => part,
            Err((buffer, error)) => {
                self.give_back(buffer);
                return Err(NetError::Dma(error));
            }
        };
        match self.tx.add(part) {
            Ok(()) => {
                self.tx_added = true;
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += length as u64;
                Ok(Some(result))
            }
            Err(error) => {
                self.give_back(error.buffer.into_buf());
                Err(NetError::Queue(error.error))
            }
        }
    }

    /// Returns an unused transmit buffer to its pool (large ones to the segmentation pool).
    fn give_back(&mut self, buffer: crate::dma::DmaBuf<H>) {
        if buffer.len() > self.buffer_len {
            self.tso_pool.push(buffer);
        } else {
            self.tx_pool.push(buffer);
        }
    }

    /// Notifies the device of new receive buffers and queued frames, once per queue and only
    /// if it asked to be notified.
    pub fn flush(&mut self) -> Result<(), NetError> {
        if core::mem::take(&mut self.rx_added) && self.rx.should_notify() {
            self.device.transport().notify(self.rx_index)?;
            self.stats.kicks += 1;
        }
        if core::mem::take(&mut self.tx_added) && self.tx.should_notify() {
            self.device.transport().notify(self.tx_index)?;
            self.stats.kicks += 1;
        }
        Ok(())
    }

    /// Before the caller sleeps: if every transmit buffer is in flight (back-pressure), arms a
    /// delayed transmit interrupt for when most of them are done (§2.7.7, `used_event` 3/4 of
    /// the way), so the sleeper wakes to send again. `true` when completions are already
    /// waiting (do not sleep). Without back-pressure transmit interrupts stay off.
    pub fn arm_tx_interrupt_if_backlogged(&mut self) -> bool {
        if !self.tx_pool.is_empty() {
            return false;
        }
        self.tx.enable_cb_delayed() == CallbackState::UsedPending
    }

    /// Disarms transmit interrupts again (completions are reclaimed on the send path).
    pub fn disarm_tx_interrupt(&mut self) {
        self.tx.disable_cb();
    }
}
