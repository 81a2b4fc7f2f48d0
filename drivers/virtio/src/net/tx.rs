//! The transmit path (§5.1.6.2): frames written in place into transmit buffers from a pool,
//! checksum offload when negotiated, completions reclaimed on the send path (no transmit
//! interrupts unless the pool runs dry), and batched doorbells ([`VirtioNet::flush`]).

use super::header::{NET_HEADER_LEN, prepare_checksum_offload, write_checksum_offload_header};
use super::{NetError, VirtioNet};
use crate::dma::{DmaHal, Part};
use crate::queue::CallbackState;
use crate::transport::Transport;

impl<H: DmaHal + Clone, T: Transport> VirtioNet<H, T> {
    /// Takes back transmit buffers the device has finished with.
    pub(super) fn reclaim_tx(&mut self) -> Result<(), NetError> {
        loop {
            match self.tx.pop_used() {
                Ok(Some(used)) => self.tx_pool.push(used.buffer.into_buf()),
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

    /// Whether a frame can be queued now (reclaims completions first).
    pub fn can_transmit(&mut self) -> bool {
        // A broken queue reports its error on the next transmit; here it only means "no".
        let _ = self.reclaim_tx();
        !self.tx_pool.is_empty() && self.tx.can_add(1)
    }

    /// Queues one frame of `length` bytes, which `fill` writes in place. Returns `Ok(None)`
    /// without calling `fill` when the ring is full (back-pressure) or the frame is too long;
    /// `Ok(Some(_))` exactly when `fill` ran and the frame was queued.
    pub fn transmit<R>(
        &mut self,
        length: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<Option<R>, NetError> {
        self.reclaim_tx()?;
        // §5.1.4.2: no frame larger than the MTU plus the Ethernet header (the buffers are
        // larger, so their size alone is not the limit).
        if length == 0 || length > self.max_frame() || NET_HEADER_LEN + length > self.buffer_len {
            self.stats.tx_oversize += 1;
            return Ok(None);
        }
        if !self.tx.can_add(1) {
            self.stats.tx_full += 1;
            return Ok(None);
        }
        let Some(mut buffer) = self.tx_pool.pop() else {
            self.stats.tx_full += 1;
            return Ok(None);
        };
        let bytes = buffer.as_bytes_mut();
        let (header, frame) = bytes.split_at_mut(NET_HEADER_LEN);
        let frame = &mut frame[..length];
        let result = fill(frame);
        header.fill(0);
        if self.tx_checksum_offload
            && let Some((start, offset)) = prepare_checksum_offload(frame)
        {
            write_checksum_offload_header(header, start, offset);
            self.stats.tx_checksum_offloaded += 1;
        }
        let part = match Part::readable(buffer, NET_HEADER_LEN + length) {
            Ok(part) => part,
            Err((buffer, error)) => {
                self.tx_pool.push(buffer);
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
                self.tx_pool.push(error.buffer.into_buf());
                Err(NetError::Queue(error.error))
            }
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
