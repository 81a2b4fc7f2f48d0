//! Host tests of the virtio-blk driver against a fake block device with an in-memory disk
//! ([`device`]): negotiation and configuration, byte-exact reads and writes, multi-segment
//! and concurrent requests, flush, GET_ID, discard and write zeroes, the checks made before
//! submission, and a device that misbehaves.

mod datapath;
mod device;
mod hostile;
mod negotiation;

use std::cell::RefCell;

use device::{BlkModel, BlkTransport, DiskConfig, World};

use super::{BlkError, BlkOptions, BlkRequest, Completion, VirtioBlk};
use crate::dma::DmaBuf;
use crate::dma::host::HostDma;
use crate::queue::QueueFormat;
use crate::spec::{BlkFeatures, Features};

/// The driver under test.
type Blk<'m, 'w> = VirtioBlk<&'w HostDma, BlkTransport<'m, 'w>>;

/// Bounded waits in the tests (the fake answers on the doorbell or not at all).
const TIMEOUT_US: u32 = 1000;

/// Feature mask of the given masks.
fn bits(masks: &[u64]) -> u64 {
    masks.iter().fold(0, |all, mask| all | mask)
}

/// What QEMU's `virtio-blk-pci` offers by default (its `host_features` for a writable
/// disk): the ring features, SEG_MAX, GEOMETRY, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE,
/// DISCARD and WRITE_ZEROES.
fn qemu_features() -> u64 {
    bits(&[
        Features::VERSION_1.bits(),
        Features::INDIRECT_DESC.bits(),
        Features::EVENT_IDX.bits(),
        BlkFeatures::SEG_MAX.bits(),
        BlkFeatures::GEOMETRY.bits(),
        BlkFeatures::BLK_SIZE.bits(),
        BlkFeatures::FLUSH.bits(),
        BlkFeatures::TOPOLOGY.bits(),
        BlkFeatures::CONFIG_WCE.bits(),
        BlkFeatures::DISCARD.bits(),
        BlkFeatures::WRITE_ZEROES.bits(),
    ])
}

/// The feature bit that selects `format`'s rings.
fn format_bits(format: QueueFormat) -> u64 {
    match format {
        QueueFormat::Split => 0,
        QueueFormat::Packed => Features::RING_PACKED.bits(),
    }
}

/// A QEMU-like disk with `format`'s rings and the default configuration.
fn world(format: QueueFormat) -> World {
    World::new(
        qemu_features() | format_bits(format),
        DiskConfig::default(),
        256,
    )
}

/// Brings the driver up on `world`.
fn up<'m, 'w>(
    world: &'w World,
    model: &'m RefCell<BlkModel<'w>>,
    options: BlkOptions,
) -> Result<Blk<'m, 'w>, BlkError> {
    VirtioBlk::new(&world.dma, world.transport(model), options)
}

/// A small queue so the tests run quickly.
fn small() -> BlkOptions {
    BlkOptions {
        queue_size: 64,
        ..BlkOptions::default()
    }
}

/// Deterministic filler.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|index| (index.wrapping_mul(37) ^ seed.wrapping_mul(0x9e37_79b9) ^ (index >> 9)) as u8)
        .collect()
}

/// DMA buffers from `dma` of the given lengths holding `data` in order (zeroes past it).
fn buffers_in<'d>(dma: &'d HostDma, data: &[u8], lens: &[usize]) -> Vec<DmaBuf<&'d HostDma>> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            let mut buffer = DmaBuf::new(dma, len).expect("DMA buffer");
            let end = (at + len).min(data.len());
            if at < end {
                buffer.as_bytes_mut()[..end - at].copy_from_slice(&data[at..end]);
            }
            at += len;
            buffer
        })
        .collect()
}

/// The bytes of a completion's buffers, concatenated.
fn bytes_of(done: &Completion<&HostDma>) -> Vec<u8> {
    done.buffers
        .iter()
        .flat_map(|buffer| buffer.as_bytes().to_vec())
        .collect()
}

/// Writes `data` at `sector` in pieces of `lens` and checks the request succeeded.
fn write<'w>(blk: &mut Blk<'_, 'w>, dma: &'w HostDma, sector: u64, data: &[u8], lens: &[usize]) {
    let request = BlkRequest::Write {
        sector,
        buffers: buffers_in(dma, data, lens),
    };
    let done = blk.execute(request, TIMEOUT_US).expect("write submitted");
    assert_eq!(done.result, Ok(()), "write at sector {sector}");
}

/// Reads buffers of `lens` at `sector`, checks the request succeeded, returns the bytes.
fn read<'w>(blk: &mut Blk<'_, 'w>, dma: &'w HostDma, sector: u64, lens: &[usize]) -> Vec<u8> {
    let request = BlkRequest::Read {
        sector,
        buffers: buffers_in(dma, &[], lens),
    };
    let done = blk.execute(request, TIMEOUT_US).expect("read submitted");
    assert_eq!(done.result, Ok(()), "read at sector {sector}");
    bytes_of(&done)
}
