//! A fake virtio-blk device with an in-memory disk, for the driver's host tests.
//!
//! Assembled like the net driver's fake (`net/tests/device.rs`) from the crate's two fakes:
//! * the register side is the QEMU-like virtio-pci fake of [`crate::tests::fake`] with a block
//!   device id (0x1042, §4.1.2) and a `struct virtio_blk_config` (§5.2.4) in its device
//!   configuration, reached through the real [`PciTransport`];
//! * the ring side is one [`QueueDevice`] (the split/packed consumer of
//!   [`crate::queue::fake`]) for the request queue, over real host DMA memory ([`HostDma`]).
//!
//! [`BlkModel`] parses each chain the way QEMU's virtio-blk does (header from the readable
//! bytes, status as the last writable byte, §5.2.6), executes it against the disk, and
//! completes it: on every doorbell in order when [`BlkModel::auto`] is set, otherwise when a
//! test calls [`BlkModel::complete`] with an order of its choosing. It can also misbehave: a
//! forced status byte, a used length that stops short, or a used entry injected by the test.

use std::cell::RefCell;

use crate::dma::host::HostDma;
use crate::pci::{DeviceConfigRequirement, PciTransport};
use crate::queue::fake::{Chain, FakeDevice as QueueDevice};
use crate::queue::{QueueAddresses, QueueFeatures};
use crate::spec::{BlkFeatures, blk_config, blk_req};
use crate::tests::fake::{ADDRESS, FakeConfig, FakeDevice as PciDevice, Layout};
use crate::tests::fake::{ObservedTransport, TransportObserver};

/// The request queue.
pub(super) const QUEUE: u16 = 0;
/// The id the device answers GET_ID with (shorter than 20 bytes, so NUL-terminated).
pub(super) const DISK_ID: &[u8] = b"vireo-disk-0042";

/// One request as the device saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Seen {
    /// The header's `type`.
    pub request_type: u32,
    /// The header's `reserved`.
    pub reserved: u32,
    /// The header's `sector`.
    pub sector: u64,
    /// Device-readable bytes after the header (write data or discard segments).
    pub data_out: Vec<u8>,
    /// Device-writable bytes before the status byte.
    pub data_in: usize,
    /// Device-readable descriptor elements (header included).
    pub readable_elements: usize,
    /// Device-writable descriptor elements (status included).
    pub writable_elements: usize,
    /// Whether the chain came through an indirect table.
    pub indirect: bool,
    /// Ring slots it took.
    pub slots: u16,
}

/// The device's state and records.
pub(super) struct BlkModel<'w> {
    dma: &'w HostDma,
    pci: &'w PciDevice,
    features: u64,
    queue: Option<QueueDevice<'w>>,
    /// The disk.
    pub disk: Vec<u8>,
    /// Execute and complete every request on each doorbell, in order (QEMU's behaviour).
    pub auto: bool,
    /// Every request executed, in execution order.
    pub seen: Vec<Seen>,
    /// Flushes executed.
    pub flushes: u32,
    /// Discarded (sector, sectors) ranges.
    pub discarded: Vec<(u64, u32)>,
    /// Write-zeroes (sector, sectors, unmap) ranges.
    pub zeroed: Vec<(u64, u32, bool)>,
    /// Write this status instead of the real one.
    pub status_override: Option<u8>,
    /// Stop the used length (and the bytes written) at this many bytes.
    pub short_len: Option<u32>,
    /// Doorbells.
    pub doorbells: u32,
    /// Resets seen.
    pub resets: u32,
}

fn device_fault<T>(result: Result<T, String>) -> T {
    match result {
        Ok(value) => value,
        Err(fault) => panic!("the driver broke the ring protocol: {fault}"),
    }
}

impl<'w> BlkModel<'w> {
    fn new(dma: &'w HostDma, pci: &'w PciDevice, sectors: u64) -> Self {
        Self {
            dma,
            pci,
            features: 0,
            queue: None,
            disk: vec![0; (sectors * 512) as usize],
            auto: true,
            seen: Vec::new(),
            flushes: 0,
            discarded: Vec::new(),
            zeroed: Vec::new(),
            status_override: None,
            short_len: None,
            doorbells: 0,
            resets: 0,
        }
    }

    /// The features the driver wrote.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The ring side of the request queue.
    pub fn queue(&mut self) -> &mut QueueDevice<'w> {
        self.queue.as_mut().expect("the request queue is enabled")
    }

    /// Takes every request made available; returns how many the device now holds.
    pub fn take(&mut self) -> usize {
        let queue = self.queue();
        device_fault(queue.pop_available(usize::MAX));
        queue.popped.len()
    }

    fn read_elements(&self, elements: &[(u64, u32)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &(phys, len) in elements {
            let start = bytes.len();
            bytes.resize(start + len as usize, 0);
            self.dma
                .read(phys, &mut bytes[start..])
                .expect("element in DMA memory");
        }
        bytes
    }

    /// Executes one chain against the disk: the bytes to write into its writable elements
    /// (data in, then the status byte), and the record.
    fn execute(&mut self, chain: &Chain) -> (Vec<u8>, Seen) {
        let readable = self.read_elements(&chain.readable);
        assert!(readable.len() >= 16, "a request without its 16-byte header");
        let le32 = |at: usize| u32::from_le_bytes(readable[at..at + 4].try_into().expect("4"));
        let request_type = le32(0);
        let reserved = le32(4);
        let sector = u64::from_le_bytes(readable[8..16].try_into().expect("8"));
        let data_out = readable[16..].to_vec();
        let capacity = chain.capacity() as usize;
        assert!(capacity >= 1, "a request without a writable status byte");
        let data_in = capacity - 1;
        let mut reply = vec![0u8; data_in];
        let start = (sector as usize).saturating_mul(512);
        let read_only = self.features & BlkFeatures::RO.bits() != 0;
        let status = match request_type {
            blk_req::T_IN => match self.disk.get(start..start + data_in) {
                Some(bytes) if data_in.is_multiple_of(512) => {
                    reply.copy_from_slice(bytes);
                    blk_req::S_OK
                }
                _ => blk_req::S_IOERR,
            },
            blk_req::T_OUT if read_only => blk_req::S_IOERR,
            blk_req::T_OUT => {
                let len = data_out.len();
                match self.disk.get_mut(start..start + len) {
                    Some(bytes) if len.is_multiple_of(512) => {
                        bytes.copy_from_slice(&data_out);
                        blk_req::S_OK
                    }
                    _ => blk_req::S_IOERR,
                }
            }
            blk_req::T_FLUSH if self.features & BlkFeatures::FLUSH.bits() != 0 => {
                self.flushes += 1;
                blk_req::S_OK
            }
            blk_req::T_GET_ID => {
                let len = DISK_ID.len().min(data_in);
                reply[..len].copy_from_slice(&DISK_ID[..len]);
                blk_req::S_OK
            }
            blk_req::T_DISCARD | blk_req::T_WRITE_ZEROES => {
                let mut status = blk_req::S_OK;
                for segment in data_out.chunks(16) {
                    let sector = u64::from_le_bytes(segment[0..8].try_into().expect("8"));
                    let sectors = u32::from_le_bytes(segment[8..12].try_into().expect("4"));
                    let flags = u32::from_le_bytes(segment[12..16].try_into().expect("4"));
                    let at = (sector * 512) as usize;
                    let Some(bytes) = self.disk.get_mut(at..at + sectors as usize * 512) else {
                        status = blk_req::S_IOERR;
                        continue;
                    };
                    if request_type == blk_req::T_DISCARD {
                        assert_eq!(flags, 0, "§5.2.6: unmap is not set for discard");
                        self.discarded.push((sector, sectors));
                    } else {
                        bytes.fill(0);
                        self.zeroed.push((sector, sectors, flags & 1 != 0));
                    }
                }
                status
            }
            _ => blk_req::S_UNSUPP,
        };
        reply.push(self.status_override.unwrap_or(status));
        let seen = Seen {
            request_type,
            reserved,
            sector,
            data_out,
            data_in,
            readable_elements: chain.readable.len(),
            writable_elements: chain.writable.len(),
            indirect: chain.indirect,
            slots: chain.slots,
        };
        (reply, seen)
    }

    /// Executes and completes the held requests at `order` (indices into the held list, in
    /// completion order), published together.
    pub fn complete(&mut self, order: &[usize]) {
        let chains: Vec<Chain> = self.queue().popped.clone();
        let mut replies = Vec::new();
        for &index in order {
            let (mut reply, seen) = self.execute(&chains[index]);
            if let Some(len) = self.short_len {
                reply.truncate(len as usize);
            }
            replies.push(reply);
            self.seen.push(seen);
        }
        let picks: Vec<(usize, &[u8])> = order
            .iter()
            .zip(&replies)
            .map(|(&index, reply)| (index, reply.as_slice()))
            .collect();
        device_fault(self.queue().complete_with(&picks));
    }

    /// Executes and completes everything available, in order; returns how many.
    pub fn process(&mut self) -> usize {
        let held = self.take();
        let order: Vec<usize> = (0..held).collect();
        self.complete(&order);
        held
    }

    fn doorbell(&mut self, index: u16) {
        assert_eq!(
            index, QUEUE,
            "a doorbell for a queue virtio-blk does not have"
        );
        self.doorbells += 1;
        if self.auto {
            self.process();
        }
    }

    fn enabled(&mut self, index: u16) {
        assert_eq!(index, QUEUE, "only the request queue is set up");
        let (size, addresses) = self.pci.with(|state| {
            let queue = state.queues.get(&index).expect("queue state");
            assert!(queue.enabled, "queue {index} set up but not enabled");
            let join = |halves: [u32; 2]| u64::from(halves[0]) | (u64::from(halves[1]) << 32);
            let addresses = QueueAddresses {
                desc: join(queue.desc),
                driver: join(queue.driver),
                device: join(queue.device),
            };
            (queue.size, addresses)
        });
        let features = QueueFeatures::from_negotiated(self.features);
        self.queue = Some(QueueDevice::new(self.dma, features, size, addresses));
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.queue = None;
        self.features = 0;
    }
}

/// The PCI transport, reporting to the model.
pub(super) type BlkTransport<'m, 'w> = ObservedTransport<'m, 'w, BlkModel<'w>>;

impl TransportObserver for BlkModel<'_> {
    fn driver_features(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        BlkModel::reset(self);
    }
    fn queue_enabled(&mut self, queue: u16) {
        self.enabled(queue);
    }
    fn doorbell(&mut self, queue: u16) {
        BlkModel::doorbell(self, queue);
    }
}

/// The device configuration fields a test sets (§5.2.4).
#[derive(Clone, Copy, Debug)]
pub(super) struct DiskConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl Default for DiskConfig {
    /// A 1 MiB disk with QEMU's defaults (seg_max = queue size − 2, 512-byte blocks,
    /// discard and write zeroes up to 32768 sectors in one segment).
    fn default() -> Self {
        Self {
            capacity: 2048,
            size_max: 0,
            seg_max: 254,
            blk_size: 512,
            max_discard_sectors: 32768,
            max_discard_seg: 1,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: 32768,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: 1,
        }
    }
}

impl DiskConfig {
    /// The bytes of `struct virtio_blk_config`, as the device exposes them.
    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        let mut put = |offset: u32, value: &[u8]| {
            let at = offset as usize;
            bytes[at..at + value.len()].copy_from_slice(value);
        };
        put(blk_config::CAPACITY, &self.capacity.to_le_bytes());
        put(blk_config::SIZE_MAX, &self.size_max.to_le_bytes());
        put(blk_config::SEG_MAX, &self.seg_max.to_le_bytes());
        put(blk_config::BLK_SIZE, &self.blk_size.to_le_bytes());
        put(
            blk_config::MAX_DISCARD_SECTORS,
            &self.max_discard_sectors.to_le_bytes(),
        );
        put(
            blk_config::MAX_DISCARD_SEG,
            &self.max_discard_seg.to_le_bytes(),
        );
        put(
            blk_config::DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            blk_config::MAX_WRITE_ZEROES_SECTORS,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            blk_config::MAX_WRITE_ZEROES_SEG,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(
            blk_config::WRITE_ZEROES_MAY_UNMAP,
            &[self.write_zeroes_may_unmap],
        );
        bytes
    }
}

/// Everything the device side owns: DMA memory, the PCI function and its registers.
pub(super) struct World {
    pub dma: HostDma,
    pub config: FakeConfig,
    pub pci: PciDevice,
    layout: Layout,
    sectors: u64,
}

impl World {
    /// A modern `virtio-blk-pci` offering exactly `features`, with `disk`'s configuration and
    /// one request queue of at most `queue_max` entries.
    pub fn new(features: u64, disk: DiskConfig, queue_max: u16) -> Self {
        let mut layout = Layout::modern_net();
        layout.device_id = 0x1042;
        let (config, pci) = layout.build();
        pci.with(|state| {
            state.device_features = features;
            state.device_config = disk.bytes();
            state.queue_max_sizes = vec![queue_max];
        });
        Self {
            dma: HostDma::new(),
            config,
            pci,
            layout,
            sectors: disk.capacity,
        }
    }

    /// A `virtio-net-pci` instead (for the device-type check).
    pub fn net() -> Self {
        let layout = Layout::modern_net();
        let (config, pci) = layout.build();
        Self {
            dma: HostDma::new(),
            config,
            pci,
            layout,
            sectors: 0,
        }
    }

    /// Changes the device's registers or config.
    pub fn device<R>(&self, f: impl FnOnce(&mut crate::tests::fake::DeviceState) -> R) -> R {
        self.pci.with(f)
    }

    /// The device model with a zeroed disk of the configured capacity (once per driver).
    pub fn model(&self) -> RefCell<BlkModel<'_>> {
        RefCell::new(BlkModel::new(&self.dma, &self.pci, self.sectors))
    }

    /// The transport for the driver.
    pub fn transport<'m, 'w>(&'w self, model: &'m RefCell<BlkModel<'w>>) -> BlkTransport<'m, 'w> {
        let pci = PciTransport::new(
            &self.pci,
            &self.config,
            ADDRESS,
            &self.layout.bars,
            DeviceConfigRequirement::Required,
        )
        .expect("the fake is discoverable");
        ObservedTransport { pci, model }
    }
}
