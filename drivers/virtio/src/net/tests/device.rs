//! A fake virtio-net device for the driver's host tests.
//!
//! It is assembled from the crate's two existing fakes rather than a third one:
//! * the register side is the QEMU-like virtio-pci fake of [`crate::tests::fake`], reached
//!   through the real [`PciTransport`] (so feature negotiation, FEATURES_OK, vector refusal,
//!   DEVICE_NEEDS_RESET, the ISR and generation-checked device-config reads all go through the
//!   production code);
//! * the ring side is one [`QueueDevice`] (the split/packed consumer of
//!   [`crate::queue::fake`]) per enabled queue, over real host DMA memory ([`HostDma`]).
//!
//! [`NetTransport`] wraps the PCI transport and tells the [`NetModel`] what the device sees:
//! the negotiated features, each enabled queue (its addresses read back from the fake's
//! registers), resets, and doorbells. On a doorbell the model acts as QEMU's virtio-net does:
//! it consumes transmit chains (parsing the 12-byte header) and answers control commands.
//! Receive frames are injected by the tests with [`NetModel::deliver`].

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::dma::host::HostDma;
use crate::pci::{DeviceConfigRequirement, PciTransport};
use crate::queue::fake::{Completion, FakeDevice as QueueDevice};
use crate::queue::{QueueAddresses, QueueFeatures};
use crate::spec::NetFeatures;
use crate::tests::fake::{ADDRESS, FakeConfig, FakeDevice as PciDevice, Layout};
use crate::tests::fake::{ObservedTransport, TransportObserver};
use crate::transport::DeviceStatus;

/// Receive queue index (§5.1.2).
pub(super) const RX: u16 = 0;
/// Transmit queue index (§5.1.2).
pub(super) const TX: u16 = 1;
/// `struct virtio_net_hdr` length with VERSION_1 (§5.1.6).
pub(super) const HEADER: usize = 12;

/// The header fields as the device reads or writes them (§5.1.6), parsed here independently
/// of the driver's `parse_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct WireHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl WireHeader {
    pub fn read(bytes: &[u8]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        }
    }

    pub fn bytes(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        out
    }
}

/// One frame the device took off the transmit queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TxFrame {
    /// The header as sent.
    pub header: WireHeader,
    /// The Ethernet frame after the header.
    pub frame: Vec<u8>,
    /// Descriptor elements the chain had.
    pub elements: usize,
}

/// One control command the device received (§5.1.6.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CtrlCommand {
    /// Queue it came on.
    pub queue: u16,
    pub class: u8,
    pub command: u8,
    pub data: Vec<u8>,
    /// Device-writable bytes offered for the ack.
    pub ack_capacity: u32,
    /// Whether it came through an indirect table.
    pub indirect: bool,
    /// Ring slots the chain used.
    pub slots: u16,
    /// Whether DRIVER_OK was set when it arrived.
    pub after_driver_ok: bool,
}

/// How the device answers control commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CtrlReply {
    /// Write this ack byte (VIRTIO_NET_OK = 0, VIRTIO_NET_ERR = 1) and complete.
    Ack(u8),
    /// Never answer.
    Silent,
}

/// The device's state and records.
pub(super) struct NetModel<'w> {
    dma: &'w HostDma,
    pci: &'w PciDevice,
    features: u64,
    queues: BTreeMap<u16, QueueDevice<'w>>,
    /// The control queue, once enabled (any queue index past the first pair).
    pub ctrl_queue: Option<u16>,
    /// Consume and complete transmit chains on every transmit doorbell (QEMU's behaviour);
    /// when false the transmit side stalls until [`NetModel::process_tx`].
    pub tx_auto: bool,
    /// Frames taken off the transmit queue.
    pub tx_frames: Vec<TxFrame>,
    /// Control answer.
    pub ctrl_reply: CtrlReply,
    /// Control commands received.
    pub ctrl_commands: Vec<CtrlCommand>,
    /// (class, command) pairs answered with VIRTIO_NET_ERR (1) whatever `ctrl_reply` says.
    pub ctrl_refused: Vec<(u8, u8)>,
    /// Doorbells per queue.
    pub doorbells: BTreeMap<u16, u64>,
    /// Resets seen.
    pub resets: u32,
}

fn device_fault<T>(result: Result<T, String>) -> T {
    match result {
        Ok(value) => value,
        Err(fault) => panic!("the driver broke the ring protocol: {fault}"),
    }
}

impl<'w> NetModel<'w> {
    fn new(dma: &'w HostDma, pci: &'w PciDevice) -> Self {
        Self {
            dma,
            pci,
            features: 0,
            queues: BTreeMap::new(),
            ctrl_queue: None,
            tx_auto: true,
            tx_frames: Vec::new(),
            ctrl_reply: CtrlReply::Ack(0),
            ctrl_commands: Vec::new(),
            ctrl_refused: Vec::new(),
            doorbells: BTreeMap::new(),
            resets: 0,
        }
    }

    /// The features the driver wrote.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The ring side of an enabled queue.
    pub fn queue(&mut self, index: u16) -> &mut QueueDevice<'w> {
        self.queues
            .get_mut(&index)
            .unwrap_or_else(|| panic!("queue {index} is not enabled"))
    }

    /// Whether queue `index` is enabled.
    pub fn has_queue(&self, index: u16) -> bool {
        self.queues.contains_key(&index)
    }

    /// Takes every receive buffer the driver has made available; returns how many the device
    /// now holds.
    pub fn take_rx_buffers(&mut self) -> usize {
        let queue = self.queue(RX);
        device_fault(queue.pop_available(usize::MAX));
        queue.popped.len()
    }

    /// Writable capacity of each held receive buffer, in the order they will be used.
    pub fn rx_capacities(&mut self) -> Vec<u32> {
        self.take_rx_buffers();
        self.queue(RX).popped.iter().map(|c| c.capacity()).collect()
    }

    /// Completes the next `chunks.len()` receive buffers with exactly these bytes each (the
    /// first normally starts with the 12-byte header), published together.
    pub fn deliver_chunks(&mut self, chunks: &[Vec<u8>]) -> Vec<Completion> {
        let held = self.take_rx_buffers();
        assert!(
            held >= chunks.len(),
            "the driver posted {held} receive buffers, {} needed",
            chunks.len()
        );
        let picks: Vec<(usize, &[u8])> = chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| (index, chunk.as_slice()))
            .collect();
        let done = device_fault(self.queue(RX).complete_with(&picks));
        for (completion, chunk) in done.iter().zip(chunks) {
            assert_eq!(
                completion.len as usize,
                chunk.len(),
                "chunk larger than its buffer"
            );
        }
        done
    }

    /// Delivers `frame` with `header` the way QEMU does: filling each receive buffer before
    /// using the next, with `num_buffers` set to the buffers used (when mergeable buffers
    /// were negotiated; otherwise the frame must fit one buffer and `num_buffers` is left as
    /// given). Returns the number of buffers used.
    pub fn deliver(&mut self, header: WireHeader, frame: &[u8]) -> usize {
        let capacities = self.rx_capacities();
        let mut stream = header.bytes().to_vec();
        stream.extend_from_slice(frame);
        let mut chunks = Vec::new();
        let mut rest = stream.as_slice();
        for &capacity in &capacities {
            if rest.is_empty() {
                break;
            }
            let take = rest.len().min(capacity as usize);
            chunks.push(rest[..take].to_vec());
            rest = &rest[take..];
        }
        assert!(rest.is_empty(), "no room for a {}-byte frame", frame.len());
        if self.features & NetFeatures::MRG_RXBUF.bits() != 0 {
            let count = u16::try_from(chunks.len()).expect("count");
            chunks[0][10..12].copy_from_slice(&count.to_le_bytes());
        } else {
            assert_eq!(
                chunks.len(),
                1,
                "a frame must fit one buffer without MRG_RXBUF"
            );
        }
        self.deliver_chunks(&chunks);
        chunks.len()
    }

    /// Delivers `frame` spread over buffers holding these byte counts of the header+frame
    /// stream, with `num_buffers` as given (which may lie).
    pub fn deliver_split(
        &mut self,
        header: WireHeader,
        frame: &[u8],
        sizes: &[usize],
        num_buffers: u16,
    ) {
        let mut stream = header.bytes().to_vec();
        stream[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        stream.extend_from_slice(frame);
        let mut chunks = Vec::new();
        let mut at = 0;
        for &size in sizes {
            chunks.push(stream[at..at + size].to_vec());
            at += size;
        }
        assert_eq!(at, stream.len(), "sizes must cover the header and frame");
        self.deliver_chunks(&chunks);
    }

    /// Consumes every transmit chain made available and completes it; returns how many.
    pub fn process_tx(&mut self) -> usize {
        let dma = self.dma;
        let queue = self.queue(TX);
        device_fault(queue.pop_available(usize::MAX));
        let chains = queue.popped.clone();
        let count = chains.len();
        let mut frames = Vec::with_capacity(count);
        for chain in &chains {
            assert!(
                chain.writable.is_empty(),
                "a transmit chain offers writable bytes"
            );
            let mut bytes = Vec::new();
            for &(phys, len) in &chain.readable {
                let start = bytes.len();
                bytes.resize(start + len as usize, 0);
                dma.read(phys, &mut bytes[start..])
                    .expect("tx element in DMA memory");
            }
            assert!(
                bytes.len() >= HEADER,
                "transmit chain shorter than the header"
            );
            frames.push(TxFrame {
                header: WireHeader::read(&bytes),
                frame: bytes[HEADER..].to_vec(),
                elements: chain.readable.len(),
            });
        }
        let picks: Vec<(usize, u32)> = (0..count).map(|index| (index, 0)).collect();
        device_fault(self.queue(TX).complete(&picks));
        self.tx_frames.extend(frames);
        count
    }

    /// Records every control command made available on `index` and answers it as
    /// [`NetModel::ctrl_reply`] says (§5.1.6.5).
    fn process_ctrl(&mut self, index: u16) {
        let dma = self.dma;
        let after_driver_ok = self
            .pci
            .with(|state| state.status & DeviceStatus::DRIVER_OK.bits() != 0);
        let reply = self.ctrl_reply;
        let queue = self.queue(index);
        let before = queue.popped.len();
        device_fault(queue.pop_available(usize::MAX));
        let mut commands = Vec::new();
        for chain in &queue.popped[before..] {
            let mut bytes = Vec::new();
            for &(phys, len) in &chain.readable {
                let start = bytes.len();
                bytes.resize(start + len as usize, 0);
                dma.read(phys, &mut bytes[start..])
                    .expect("ctrl element in DMA memory");
            }
            assert!(
                bytes.len() >= 2,
                "control command without class and command"
            );
            commands.push(CtrlCommand {
                queue: index,
                class: bytes[0],
                command: bytes[1],
                data: bytes[2..].to_vec(),
                ack_capacity: chain.capacity(),
                indirect: chain.indirect,
                slots: chain.slots,
                after_driver_ok,
            });
        }
        if let CtrlReply::Ack(ack) = reply {
            let mut acks = vec![[ack]; queue.popped.len()];
            for (position, command) in commands.iter().enumerate() {
                if self
                    .ctrl_refused
                    .contains(&(command.class, command.command))
                {
                    acks[before + position] = [1];
                } else if (command.class, command.command) == (3, 0) && ack == 0 {
                    // VIRTIO_NET_CTRL_ANNOUNCE_ACK: the device clears VIRTIO_NET_S_ANNOUNCE
                    // (§5.1.6.5.4), as QEMU does.
                    self.pci.with(|state| state.device_config[6] &= !2);
                }
            }
            let queue = self.queue(index);
            let picks: Vec<(usize, &[u8])> = acks
                .iter()
                .enumerate()
                .map(|(position, ack)| (position, ack.as_slice()))
                .collect();
            device_fault(queue.complete_with(&picks));
        }
        self.ctrl_commands.extend(commands);
    }

    fn doorbell(&mut self, index: u16) {
        *self.doorbells.entry(index).or_default() += 1;
        if index == TX && self.tx_auto {
            self.process_tx();
        } else if Some(index) == self.ctrl_queue {
            self.process_ctrl(index);
        }
    }

    fn enabled(&mut self, index: u16) {
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
        self.queues
            .insert(index, QueueDevice::new(self.dma, features, size, addresses));
        if index > TX {
            self.ctrl_queue = Some(index);
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.queues.clear();
        self.ctrl_queue = None;
        self.features = 0;
    }
}

/// The PCI transport, reporting to the model.
pub(super) type NetTransport<'m, 'w> = ObservedTransport<'m, 'w, NetModel<'w>>;

impl TransportObserver for NetModel<'_> {
    fn driver_features(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        NetModel::reset(self);
    }
    fn queue_enabled(&mut self, queue: u16) {
        self.enabled(queue);
    }
    fn doorbell(&mut self, queue: u16) {
        NetModel::doorbell(self, queue);
    }
}

/// Everything the device side owns: DMA memory, the PCI function and its registers.
pub(super) struct World {
    pub dma: HostDma,
    pub config: FakeConfig,
    pub pci: PciDevice,
    layout: Layout,
}

impl World {
    /// A `virtio-net-pci` offering exactly `features`, with the fake's default config
    /// (MAC 52:54:00:12:34:56, link up, 1 pair, MTU 1500) and queue maxima 256/256/64.
    pub fn new(features: u64) -> Self {
        let layout = Layout::modern_net();
        let (config, pci) = layout.build();
        pci.with(|state| state.device_features = features);
        Self {
            dma: HostDma::new(),
            config,
            pci,
            layout,
        }
    }

    /// Changes the device's registers or config.
    pub fn device<R>(&self, f: impl FnOnce(&mut crate::tests::fake::DeviceState) -> R) -> R {
        self.pci.with(f)
    }

    /// The device model (create once per driver instance under test).
    pub fn model(&self) -> RefCell<NetModel<'_>> {
        RefCell::new(NetModel::new(&self.dma, &self.pci))
    }

    /// The transport for the driver.
    pub fn transport<'m, 'w>(&'w self, model: &'m RefCell<NetModel<'w>>) -> NetTransport<'m, 'w> {
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

    /// Doorbell writes the PCI function saw.
    pub fn doorbells(&self) -> usize {
        self.pci.with(|state| state.doorbells.len())
    }
}
