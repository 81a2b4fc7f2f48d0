//! Fuzz entry points: functions of `&[u8]` that drive the driver's untrusted-input paths and
//! must never panic (docs/design.md principle 10: fuzz targets for used-ring consumption and
//! frame/header parsing).
//!
//! * [`used_ring_consumption`]: a split or packed queue of a data-chosen size and features over
//!   real host DMA memory; the bytes script the driver (adds, drains, notification arming) and
//!   a *hostile device* (honest completions in any order, arbitrary used entries, indices,
//!   descriptor flags and scribbles over the device-written areas). Every `pop_used` result is
//!   checked against a model of what is in flight: no buffer returned twice or never posted,
//!   lengths within the buffer's writable capacity, counters consistent, and a queue broken by
//!   a [`crate::queue::DeviceError`] reports that same error from then on.
//! * [`net_frame_parsing`]: the pure helpers [`crate::net::parse_header`],
//!   [`crate::net::complete_checksum`] (data-chosen offsets) and
//!   [`crate::net::prepare_checksum_offload`], each checked against an independent RFC 1071
//!   implementation; then a whole [`crate::net::VirtioNet`] on a small in-memory transport,
//!   receiving data-shaped buffers (mergeable headers with any `num_buffers`, NEEDS_CSUM with
//!   any offsets, short buffers), transmitting data-shaped frames, link changes and hostile
//!   used entries. While the device stays honest every received frame is compared byte for
//!   byte with the one delivered, and drops are counted exactly.
//!
//! They are built under `cfg(test)` (the smoke test in `fuzzing::tests`) and with the `fuzzing`
//! feature (the cargo-fuzz crate in `fuzz/`). The device side is written here rather than
//! borrowed from the test fakes: it reads and writes the rings by bus address through the
//! test DMA (`crate::dma::host::HostDma`) and must keep going, not stop, when the driver's
//! state and its own disagree. The virtio-net fake of the net tests needs the whole PCI fake
//! (test-only), so the net entry point uses a minimal transport of its own instead.

mod device;
mod net_frame;
mod used_ring;

#[cfg(test)]
mod tests;

/// Drives a split or packed virtqueue with `data` as the script of both driver and a hostile
/// device, checking the queue's invariants. Panics only if an invariant breaks (a driver bug).
pub fn used_ring_consumption(data: &[u8]) {
    used_ring::run(data);
}

/// Runs the net header and checksum helpers and the driver's receive and transmit paths on
/// `data`-shaped input, checking them against independent implementations. Panics only if an
/// invariant breaks (a driver bug).
pub fn net_frame_parsing(data: &[u8]) {
    net_frame::run(data);
}

/// The fuzz input, read front to back; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&byte, rest)) => {
                self.data = rest;
                byte
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// Up to `count` bytes (fewer at the end of the input).
    fn bytes(&mut self, count: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(count.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// The folded 16-bit ones'-complement sum of `bytes` as big-endian words (RFC 1071), written
/// independently of the driver's.
fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let mut total: u64 = 0;
    for part in parts {
        let mut words = part.chunks(2);
        for word in &mut words {
            let high = u64::from(word[0]);
            let low = word.get(1).copied().map_or(0, u64::from);
            total += (high << 8) | low;
        }
    }
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}
