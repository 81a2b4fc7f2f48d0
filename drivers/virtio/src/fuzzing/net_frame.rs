//! [`super::net_frame_parsing`]: the net header and checksum helpers against independent
//! implementations, then the driver's receive and transmit paths on a minimal transport with
//! a device scripted by the input.
//!
//! Input layout: a little-endian u16 `n`, then `n` bytes for the helpers (`[csum_start u16]
//! [csum_offset u16] [mode u8] [frame...]`; the header parser sees the whole slice), then the
//! driver script: one byte of features, one of MTU (u16) and one of queue size, then
//! operations of one byte each followed by their arguments (see [`Harness::step`]).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::cell::Cell;

use super::device::{RingDevice, Taken};
use super::{Input, ones_complement_sum};
use crate::dma::host::HostDma;
use crate::error::TransportError;
use crate::net::{
    HDR_F_NEEDS_CSUM, NET_HEADER_LEN, NetError, NetOptions, RxFrame, VirtioNet, buffer_len_for_mtu,
    complete_checksum, parse_header, prepare_checksum_offload,
};
use crate::queue::QueueError;
use crate::queue::{QueueAddresses, QueueFormat};
use crate::spec::{Features, NetFeatures};
use crate::transport::{
    DeviceStatus, DeviceType, IsrStatus, QueueConfig, RegisterWidth, Transport,
};

/// Receive and transmit queue indices (§5.1.2).
const RX: u16 = 0;
const TX: u16 = 1;
/// Ethernet header, and the shortest buffer the driver accepts (header + Ethernet header).
const ETHERNET: usize = 14;
const SHORTEST: usize = NET_HEADER_LEN + ETHERNET;
/// Operations per input, at most.
const MAX_STEPS: usize = 2048;
/// Largest transmit chain the device reads (the driver's are at most one buffer).
const MAX_TX_READ: usize = 1 << 16;

/// What a run did, for the smoke test to see that the checks were reached.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(not(test), allow(dead_code, reason = "read by the smoke test only"))]
pub(super) struct Summary {
    /// Whether the driver came up.
    pub up: bool,
    /// Received frames compared byte for byte with what the device delivered.
    pub frames_checked: u64,
    /// Frames received (checked or not).
    pub frames_received: u64,
    /// Malformed deliveries whose drop was predicted and counted.
    pub drops_checked: u64,
    /// Transmitted frames compared with what the device read.
    pub tx_checked: u64,
    /// Checksums completed by `complete_checksum` and verified.
    pub checksums_checked: u64,
    /// Offloads prepared by `prepare_checksum_offload` and verified end to end.
    pub offloads_checked: u64,
    /// Whether the receive queue ended broken by the device.
    pub rx_broken: bool,
}

pub(super) fn run(data: &[u8]) {
    let _ = run_with_summary(data);
}

pub(super) fn run_with_summary(data: &[u8]) -> Summary {
    let mut input = Input::new(data);
    let helper_len = usize::from(input.u16());
    let helper_bytes = input.bytes(helper_len);
    let mut summary = Summary::default();
    helpers(helper_bytes, &mut summary);
    driver(&mut input, &mut summary);
    summary
}

// ---------------------------------------------------------------------------------------------
// The pure helpers

fn helpers(data: &[u8], summary: &mut Summary) {
    // parse_header: the 12-byte layout of §5.1.6, zeros past the end.
    let header = parse_header(data);
    let byte = |index: usize| data.get(index).copied().unwrap_or(0);
    let le16 = |index: usize| u16::from_le_bytes([byte(index), byte(index + 1)]);
    assert_eq!(header.flags, byte(0));
    assert_eq!(header.gso_type, byte(1));
    assert_eq!(header.csum_start, le16(6));
    assert_eq!(header.csum_offset, le16(8));
    assert_eq!(header.num_buffers, le16(10));

    let mut input = Input::new(data);
    let (raw_start, raw_offset, mode) = (input.u16(), input.u16(), input.u8());
    let frame = input.bytes(usize::MAX);
    // Offsets anywhere (mostly out of range), or inside the frame.
    let (start, offset) = if mode & 1 == 0 {
        (raw_start, raw_offset)
    } else {
        let bound = u16::try_from(frame.len() + 1).unwrap_or(u16::MAX);
        (raw_start % bound, raw_offset % bound)
    };
    let mut completed = frame.to_vec();
    let mut expected = frame.to_vec();
    let fits = expected_completion(&mut expected, start, offset);
    assert_eq!(complete_checksum(&mut completed, start, offset), fits);
    assert_eq!(completed, expected, "complete_checksum({start}, {offset})");
    if fits {
        summary.checksums_checked += 1;
    }

    check_offload(frame, summary);
}

/// NEEDS_CSUM completion as §5.1.6.4 states it: the ones' complement of the ones'-complement
/// sum from `start` to the end (the field's current contents included) is stored at
/// `start + offset`, a zero result as 0xffff. False, and nothing written, when it does not fit.
fn expected_completion(frame: &mut [u8], start: u16, offset: u16) -> bool {
    let start = usize::from(start);
    let field = start + usize::from(offset);
    if start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let checksum = match !ones_complement_sum(&[&frame[start..]]) {
        0 => 0xffff,
        other => other,
    };
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// The transport checksum layout of an IPv4 TCP/UDP frame, if it qualifies for offload:
/// (`csum_start`, `csum_offset`, total IPv4 length, pseudo-header sum).
fn offload_layout(frame: &[u8]) -> Option<(usize, usize, usize, u16)> {
    if frame.len() < ETHERNET + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETHERNET..];
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ip[0] >> 4 != 4 || header < 20 || total < header || total > ip.len() || fragmented {
        return None;
    }
    let offset = match ip[9] {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    let segment = total - header;
    if segment < offset + 2 {
        return None;
    }
    let length = u16::try_from(segment).ok()?.to_be_bytes();
    let pseudo = ones_complement_sum(&[&ip[12..20], &[0, ip[9]], &length]);
    Some((ETHERNET + header, offset, total, pseudo))
}

fn check_offload(frame: &[u8], summary: &mut Summary) {
    let mut prepared = frame.to_vec();
    let result = prepare_checksum_offload(&mut prepared);
    let Some((start, offset, total, pseudo)) = offload_layout(frame) else {
        assert_eq!(result, None, "offload of a frame that does not qualify");
        assert_eq!(prepared, frame, "a refused frame is left alone");
        return;
    };
    assert_eq!(result, Some((start as u16, offset as u16)));
    let field = start + offset;
    assert_eq!(&prepared[..field], &frame[..field]);
    assert_eq!(&prepared[field + 2..], &frame[field + 2..]);
    assert_eq!(
        u16::from_be_bytes([prepared[field], prepared[field + 1]]),
        pseudo,
        "the field holds the pseudo-header sum"
    );
    // End to end, as a device completes it: the segment then verifies against the
    // pseudo-header (for frames without trailing padding, which the device would include).
    if frame.len() == ETHERNET + total {
        assert!(complete_checksum(
            &mut prepared,
            start as u16,
            offset as u16
        ));
        let ip = &prepared[ETHERNET..];
        let length = u16::try_from(prepared.len() - start)
            .unwrap_or(0)
            .to_be_bytes();
        let sum = ones_complement_sum(&[&ip[12..20], &[0, ip[9]], &length, &prepared[start..]]);
        assert_eq!(sum, 0xffff, "the completed checksum verifies");
        summary.offloads_checked += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// The driver

/// A virtio-net device's registers, reduced to what the driver reads: features, status (with
/// a DEVICE_NEEDS_RESET switch), `mac`/`status`/`mtu` config, queues and doorbells.
struct FuzzTransport {
    device_features: u64,
    driver_features: u64,
    status: Cell<u8>,
    needs_reset: Cell<bool>,
    link_status: Cell<u16>,
    mtu: u16,
    max_queue_size: u16,
    queues: Vec<(u16, QueueConfig)>,
    doorbells: Cell<u64>,
}

impl FuzzTransport {
    /// `struct virtio_net_config` up to `mtu` (§5.1.4).
    fn config(&self) -> [u8; 12] {
        let mut bytes = [0u8; 12];
        bytes[..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        bytes[6..8].copy_from_slice(&self.link_status.get().to_le_bytes());
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        bytes
    }

    fn queue(&self, index: u16) -> Option<QueueConfig> {
        self.queues
            .iter()
            .find(|(queue, _)| *queue == index)
            .map(|&(_, config)| config)
    }
}

impl Transport for FuzzTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::NET
    }
    fn read_device_features(&mut self) -> u64 {
        self.device_features
    }
    fn write_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }
    fn read_status(&self) -> DeviceStatus {
        let reset = if self.needs_reset.get() {
            DeviceStatus::DEVICE_NEEDS_RESET.bits()
        } else {
            0
        };
        DeviceStatus::from_bits_retain(self.status.get() | reset)
    }
    fn write_status(&mut self, status: DeviceStatus) {
        self.status.set(status.bits());
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        self.status.set(0);
        self.needs_reset.set(false);
        self.driver_features = 0;
        self.queues.clear();
        Ok(())
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&mut self, queue: u16) -> Result<u16, TransportError> {
        if queue < 2 {
            Ok(self.max_queue_size)
        } else {
            Err(TransportError::QueueIndexOutOfRange {
                queue,
                num_queues: 2,
            })
        }
    }
    fn setup_queue(&mut self, queue: u16, config: &QueueConfig) -> Result<(), TransportError> {
        self.queues.push((queue, *config));
        Ok(())
    }
    fn notify(&self, _queue: u16) -> Result<(), TransportError> {
        self.doorbells.set(self.doorbells.get() + 1);
        Ok(())
    }
    fn read_isr(&self) -> IsrStatus {
        IsrStatus::empty()
    }
    fn set_config_vector(&mut self, _vector: Option<u16>) -> Result<(), TransportError> {
        Ok(())
    }
    fn config_generation(&self) -> u8 {
        0
    }
    fn device_config_len(&self) -> u64 {
        12
    }
    fn read_device_config_raw(
        &self,
        offset: u32,
        width: RegisterWidth,
    ) -> Result<u32, TransportError> {
        let bytes = self.config();
        let start = offset as usize;
        let field = bytes.get(start..start + usize::from(width.bytes())).ok_or(
            TransportError::ConfigOutOfRange {
                offset,
                width: width.bytes(),
                len: 12,
            },
        )?;
        Ok(field
            .iter()
            .rev()
            .fold(0, |value, &byte| (value << 8) | u32::from(byte)))
    }
    fn write_device_config_raw(
        &mut self,
        _offset: u32,
        _width: RegisterWidth,
        _value: u32,
    ) -> Result<(), TransportError> {
        Ok(())
    }
}

type Net<'a> = VirtioNet<&'a HostDma, FuzzTransport>;

/// What the driver must do with one delivery.
#[derive(Debug)]
enum Expect {
    /// Hand up exactly these bytes.
    Frame(Vec<u8>),
    /// Drop it as malformed.
    Dropped,
}

fn driver(input: &mut Input<'_>, summary: &mut Summary) {
    let config = input.u8();
    let optional = [
        (0, Features::RING_PACKED.bits()),
        (1, Features::EVENT_IDX.bits()),
        (2, Features::INDIRECT_DESC.bits()),
        (3, NetFeatures::MRG_RXBUF.bits()),
        (4, NetFeatures::CSUM.bits()),
        (5, NetFeatures::GUEST_CSUM.bits()),
        (6, NetFeatures::MTU.bits()),
        (7, NetFeatures::STATUS.bits()),
    ];
    let device_features = optional
        .iter()
        .filter(|&&(bit, _)| config & (1 << bit) != 0)
        .fold(
            Features::VERSION_1.bits() | NetFeatures::MAC.bits(),
            |all, &(_, mask)| all | mask,
        );
    // MTUs up to jumbo frames; below 68 the driver ignores it.
    let mtu = input.u16() % 9217;
    let max_queue_size = 1 + u16::from(input.u8() % 16);
    let hal = HostDma::new();
    {
        let transport = FuzzTransport {
            device_features,
            driver_features: 0,
            status: Cell::new(0),
            needs_reset: Cell::new(false),
            link_status: Cell::new(1),
            mtu,
            max_queue_size,
            queues: Vec::new(),
            doorbells: Cell::new(0),
        };
        let options = NetOptions {
            rx_queue_size: 16,
            tx_queue_size: 16,
            drop_foreign: false,
            ..NetOptions::default()
        };
        let Ok(net) = VirtioNet::new(&hal, transport, options) else {
            panic!("the fuzz transport is a valid virtio-net device");
        };
        summary.up = true;
        let Some(mut harness) = Harness::new(&hal, net, summary) else {
            return;
        };
        let mut steps = 0;
        while !input.is_empty() && steps < MAX_STEPS {
            harness.step(input);
            steps += 1;
        }
        harness.finish();
        // Frames still held, the driver (which resets the transport) and its queues go here.
    }
    assert_eq!(hal.live_allocations(), 0, "the driver freed all its memory");
}

struct Harness<'a, 's> {
    hal: &'a HostDma,
    net: Net<'a>,
    rx_device: RingDevice<'a>,
    tx_device: RingDevice<'a>,
    summary: &'s mut Summary,
    mergeable: bool,
    rx_size: usize,
    /// Received frames not yet recycled.
    held: Vec<RxFrame<&'a HostDma>>,
    /// Deliveries not yet received, while the receive oracle holds.
    rx_expect: VecDeque<Expect>,
    /// Whether every delivery so far was predictable (the device honest, buffer counts
    /// aligned), so that received frames and drops can be checked exactly.
    rx_oracle: bool,
    /// Frames handed up and drops counted by the oracle.
    rx_frames: u64,
    rx_drops: u64,
    /// The receive error, once the device broke the queue.
    rx_error: Option<NetError>,
    /// Frames queued for transmission, while the transmit side is honest.
    tx_expect: VecDeque<Vec<u8>>,
    tx_oracle: bool,
    tx_error: Option<NetError>,
    tx_queued: u64,
}

impl<'a, 's> Harness<'a, 's> {
    fn new(hal: &'a HostDma, net: Net<'a>, summary: &'s mut Summary) -> Option<Self> {
        let device = |index: u16| {
            let config = net.transport().queue(index)?;
            let addresses = QueueAddresses {
                desc: config.desc,
                driver: config.driver,
                device: config.device,
            };
            Some(RingDevice::new(hal, config.format, config.size, addresses))
        };
        let (rx_device, tx_device) = (device(RX)?, device(TX)?);
        let features = net.features();
        let mergeable = features & NetFeatures::MRG_RXBUF.bits() != 0;
        let packed = features & Features::RING_PACKED.bits() != 0;
        assert_eq!(
            net.transport().queue(RX).map(|config| config.format),
            Some(if packed {
                QueueFormat::Packed
            } else {
                QueueFormat::Split
            })
        );
        let rx_size = usize::from(net.queue_sizes().0);
        Some(Self {
            hal,
            net,
            rx_device,
            tx_device,
            summary,
            mergeable,
            rx_size,
            held: Vec::new(),
            rx_expect: VecDeque::new(),
            rx_oracle: true,
            rx_frames: 0,
            rx_drops: 0,
            rx_error: None,
            tx_expect: VecDeque::new(),
            tx_oracle: true,
            tx_error: None,
            tx_queued: 0,
        })
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 12 {
            0..=2 => self.deliver(input),
            3 | 4 => self.receive(usize::from(input.u8() % 8) + 1),
            5 => self.recycle(input),
            6 | 7 => self.transmit(input),
            8 => self.complete_tx(),
            9 => self.hostile(input),
            10 => self.config_change(input),
            _ => {
                let pending = self.net.arm_rx_interrupt();
                if self.rx_error.is_some() {
                    assert!(pending, "a broken receive queue must be polled");
                }
                if input.bool() {
                    self.net.disarm_rx_interrupt();
                }
                let _ = self.net.rx_pending();
            }
        }
    }

    /// The device fills up to four posted receive buffers with one data-shaped frame: a
    /// header from the input (NEEDS_CSUM and `num_buffers` as given, or made consistent),
    /// chunk lengths from the input (short ones included), payload from the input.
    fn deliver(&mut self, input: &mut Input<'_>) {
        let requested = 1 + usize::from(input.u8() % 4);
        let wanted = if self.mergeable { requested } else { 1 };
        let mut taken: Vec<Taken> = Vec::new();
        while taken.len() < wanted {
            match self.rx_device.take() {
                Some(buffer) => taken.push(buffer),
                None => break,
            }
        }
        if taken.is_empty() {
            return;
        }
        let count = taken.len();
        let mode = input.u8();
        let mut header = [0u8; NET_HEADER_LEN];
        let given = input.bytes(NET_HEADER_LEN);
        header[..given.len()].copy_from_slice(given);
        if mode & 1 != 0 {
            // A consistent num_buffers.
            header[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        }
        match (mode >> 1) & 3 {
            0 => header[0] &= !HDR_F_NEEDS_CSUM,
            1 => {
                // NEEDS_CSUM with plausible offsets (inside a typical frame).
                header[0] |= HDR_F_NEEDS_CSUM;
                let start = 14 + u16::from(header[6] % 64);
                let offset = u16::from(header[8] % 24);
                header[6..8].copy_from_slice(&start.to_le_bytes());
                header[8..10].copy_from_slice(&offset.to_le_bytes());
            }
            _ => {}
        }
        // Every requested chunk's length and payload is read, used or not, so that a script
        // means the same whatever the device holds; a chunk is cut to its buffer.
        let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(count);
        for index in 0..requested {
            let declared = if mode & 0x80 != 0 {
                // Exact lengths, short ones included.
                usize::from(input.u16() % 4096)
            } else {
                // A frame of a plausible size.
                SHORTEST + usize::from(input.u16() % 1600)
            };
            let header_part = if index == 0 {
                &header[..declared.min(NET_HEADER_LEN)]
            } else {
                &[]
            };
            let payload = input.bytes(declared - header_part.len());
            let Some(buffer) = taken.get(index) else {
                continue;
            };
            let length = declared.min(buffer.capacity() as usize);
            let mut chunk = Vec::with_capacity(declared);
            chunk.extend_from_slice(header_part);
            chunk.extend_from_slice(payload);
            let filler = (chunk.len()..declared).map(|at| (at as u8) ^ 0xa5);
            chunk.extend(filler);
            chunk.truncate(length);
            chunks.push(chunk);
        }
        for (buffer, chunk) in taken.iter().zip(&chunks) {
            if let Some(&(phys, _)) = buffer.writable.first()
                && self.hal.write(phys, chunk).is_err()
            {
                assert!(!self.rx_oracle, "a receive buffer outside DMA memory");
            }
            let length = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            self.rx_device.complete(buffer, length);
        }
        self.rx_device.publish();
        self.predict(&chunks);
    }

    /// What the driver will make of one delivery (§5.1.6.3, §5.1.6.4), while that can be told
    /// from the delivery alone.
    fn predict(&mut self, chunks: &[Vec<u8>]) {
        if !self.rx_oracle {
            return;
        }
        let first = &chunks[0];
        let (consumed, expect) = if first.len() < SHORTEST {
            (1, Expect::Dropped)
        } else {
            let num_buffers = usize::from(u16::from_le_bytes([first[10], first[11]]));
            let buffers = if self.mergeable { num_buffers } else { 1 };
            if buffers == 0 || buffers > self.rx_size {
                (1, Expect::Dropped)
            } else if buffers != 1 && buffers != chunks.len() {
                // It would take buffers of the next delivery, or leave some of this one.
                self.rx_oracle = false;
                return;
            } else {
                let mut frame = first[NET_HEADER_LEN..].to_vec();
                for chunk in &chunks[1..buffers] {
                    frame.extend_from_slice(chunk);
                }
                let start = u16::from_le_bytes([first[6], first[7]]);
                let offset = u16::from_le_bytes([first[8], first[9]]);
                let needs_csum = first[0] & HDR_F_NEEDS_CSUM != 0;
                if needs_csum && !expected_completion(&mut frame, start, offset) {
                    (buffers, Expect::Dropped)
                } else {
                    (buffers, Expect::Frame(frame))
                }
            }
        };
        if consumed != chunks.len() {
            self.rx_oracle = false;
            return;
        }
        self.rx_expect.push_back(expect);
    }

    fn receive(&mut self, limit: usize) {
        for _ in 0..limit {
            match self.net.receive() {
                Ok(Some(frame)) => {
                    assert!(self.rx_error.is_none(), "a frame from a broken queue");
                    self.summary.frames_received += 1;
                    let bytes = frame.bytes();
                    let largest = self.rx_size * buffer_len_for_mtu(self.net.mtu());
                    assert!(bytes.len() <= largest, "a frame larger than the ring");
                    if self.rx_oracle {
                        self.skip_drops();
                        match self.rx_expect.pop_front() {
                            Some(Expect::Frame(expected)) => {
                                assert_eq!(bytes, expected.as_slice(), "received frame");
                                self.rx_frames += 1;
                                self.summary.frames_checked += 1;
                            }
                            other => panic!("a frame was handed up where {other:?} was due"),
                        }
                    }
                    self.held.push(frame);
                    if self.held.len() > 2 {
                        let frame = self.held.remove(0);
                        self.give_back(frame);
                    }
                }
                Ok(None) => {
                    assert!(self.rx_error.is_none(), "a broken queue reports its error");
                    if self.rx_oracle {
                        // Everything published was consumed: the rest were drops.
                        self.skip_drops();
                        assert!(
                            self.rx_expect.is_empty(),
                            "delivered frames were not handed up: {:?}",
                            self.rx_expect
                        );
                        let stats = self.net.stats();
                        assert_eq!(stats.rx_packets, self.rx_frames);
                        assert_eq!(stats.rx_malformed, self.rx_drops);
                    }
                    return;
                }
                Err(error) => {
                    assert!(
                        matches!(error, NetError::Device { queue: RX, .. }),
                        "receive failed with {error}"
                    );
                    if let Some(first) = self.rx_error {
                        assert_eq!(error, first, "the receive queue stays broken");
                    }
                    assert!(!self.rx_oracle, "an honest device broke the receive queue");
                    self.rx_error = Some(error);
                    self.summary.rx_broken = true;
                    return;
                }
            }
        }
    }

    fn skip_drops(&mut self) {
        while let Some(Expect::Dropped) = self.rx_expect.front() {
            self.rx_expect.pop_front();
            self.rx_drops += 1;
            self.summary.drops_checked += 1;
        }
    }

    fn give_back(&mut self, frame: RxFrame<&'a HostDma>) {
        match self.net.recycle(frame) {
            Ok(()) => {}
            Err(error) => {
                assert!(
                    matches!(error, NetError::Queue(QueueError::Broken(_))),
                    "recycling failed with {error}"
                );
                assert!(!self.rx_oracle, "an honest device broke the receive queue");
            }
        }
        self.net
            .flush()
            .expect("the fuzz transport takes every doorbell");
    }

    fn recycle(&mut self, input: &mut Input<'_>) {
        let pick = usize::from(input.u8());
        if self.held.is_empty() {
            return;
        }
        let frame = self.held.swap_remove(pick % self.held.len());
        self.give_back(frame);
    }

    fn transmit(&mut self, input: &mut Input<'_>) {
        let max = self.net.max_frame();
        let length = usize::from(input.u16()) % (max + 32);
        let mut frame = input.bytes(length).to_vec();
        frame.resize(length, 0x3c);
        if input.bool() && length >= ETHERNET + 20 {
            // An IPv4 EtherType, so that checksum offload gets a look at it.
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        let full_before = self.net.stats().tx_full;
        match self
            .net
            .transmit(length, |buffer| buffer.copy_from_slice(&frame))
        {
            Ok(Some(())) => {
                assert!(
                    length > 0 && length <= max,
                    "a {length}-byte frame was sent"
                );
                self.tx_queued += 1;
                if self.tx_oracle {
                    self.tx_expect.push_back(frame);
                }
            }
            Ok(None) => {
                let full = self.net.stats().tx_full > full_before;
                assert!(
                    full || length == 0 || length > max,
                    "a {length}-byte frame was refused"
                );
            }
            Err(error) => {
                assert!(
                    matches!(error, NetError::Device { queue: TX, .. }),
                    "transmit failed with {error}"
                );
                assert!(!self.tx_oracle, "an honest device broke the transmit queue");
                if let Some(first) = self.tx_error {
                    assert_eq!(error, first, "the transmit queue stays broken");
                }
                self.tx_error = Some(error);
            }
        }
        self.net
            .flush()
            .expect("the fuzz transport takes every doorbell");
        assert_eq!(self.net.stats().tx_packets, self.tx_queued);
    }

    /// The device sends every queued frame (checking it against what was queued) and
    /// completes it.
    fn complete_tx(&mut self) {
        let offload = self.net.tx_checksum_offload();
        while let Some(buffer) = self.tx_device.take() {
            let mut bytes = Vec::new();
            for &(phys, len) in &buffer.readable {
                let start = bytes.len();
                let len = len as usize;
                if start + len > MAX_TX_READ {
                    assert!(!self.tx_oracle, "a transmit chain of {} bytes", start + len);
                    break;
                }
                bytes.resize(start + len, 0);
                if self.hal.read(phys, &mut bytes[start..]).is_err() {
                    assert!(!self.tx_oracle, "a transmit element outside DMA memory");
                }
            }
            if self.tx_oracle {
                let Some(expected) = self.tx_expect.pop_front() else {
                    panic!("the device found a frame that was never queued");
                };
                assert!(buffer.writable.is_empty(), "transmit buffers are read-only");
                check_sent(&bytes, &expected, offload);
                self.summary.tx_checked += 1;
            }
            self.tx_device.complete(&buffer, 0);
        }
        self.tx_device.publish();
    }

    fn hostile(&mut self, input: &mut Input<'_>) {
        let on_rx = input.bool();
        let device = if on_rx {
            self.rx_oracle = false;
            &mut self.rx_device
        } else {
            self.tx_oracle = false;
            &mut self.tx_device
        };
        match input.u8() % 3 {
            0 => {
                let (slot, relative) = (input.u16(), input.bool());
                let (id, len, flags) = (input.u32(), input.u32(), input.u16());
                device.raw_used(slot, relative, id, len, flags);
                // Publish it (split) or move past it (packed).
                device.raw_index(1, None);
            }
            1 => {
                let delta = u16::from(input.u8());
                device.raw_index(delta, None);
            }
            _ => device.scribble(input.u32(), input.u16()),
        }
    }

    fn config_change(&mut self, input: &mut Input<'_>) {
        let link = input.bool();
        let needs_reset = input.u8().is_multiple_of(4);
        let transport = self.net.transport();
        transport.link_status.set(u16::from(link));
        transport.needs_reset.set(needs_reset);
        let status = self.net.features() & NetFeatures::STATUS.bits() != 0;
        let before = self.net.link_up();
        match self.net.handle_config_change() {
            Err(NetError::NeedsReset) => assert!(needs_reset),
            Err(error) => panic!("config change failed with {error}"),
            Ok(change) => {
                assert!(!needs_reset, "DEVICE_NEEDS_RESET went unreported");
                let now = self.net.link_up();
                assert_eq!(now, if status { link } else { true });
                assert_eq!(change.is_some(), now != before);
            }
        }
        self.net.transport().needs_reset.set(false);
    }

    /// Drains what the device delivered and checks the counters once more.
    fn finish(&mut self) {
        self.receive(4 * self.rx_size + 4);
        let held = core::mem::take(&mut self.held);
        for frame in held {
            self.give_back(frame);
        }
        self.complete_tx();
        if self.tx_oracle {
            assert!(
                self.tx_expect.is_empty(),
                "queued frames never reached the device"
            );
        }
        let _ = self.net.can_transmit();
    }
}

/// Checks a transmitted chain (header + frame) against the frame queued: identical, except
/// that with checksum offload the header may carry NEEDS_CSUM for a TCP/UDP checksum field
/// that then holds the pseudo-header sum (§5.1.6.2).
fn check_sent(bytes: &[u8], expected: &[u8], offload: bool) {
    assert_eq!(bytes.len(), NET_HEADER_LEN + expected.len(), "sent length");
    let (header, frame) = bytes.split_at(NET_HEADER_LEN);
    if header[0] & HDR_F_NEEDS_CSUM == 0 {
        assert_eq!(header, &[0u8; NET_HEADER_LEN], "a plain header");
        assert_eq!(frame, expected, "sent frame");
        return;
    }
    assert!(offload, "NEEDS_CSUM without VIRTIO_NET_F_CSUM");
    let start = usize::from(u16::from_le_bytes([header[6], header[7]]));
    let offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
    let Some((layout_start, layout_offset, _, pseudo)) = offload_layout(expected) else {
        panic!("NEEDS_CSUM on a frame that does not qualify");
    };
    assert_eq!((start, offset), (layout_start, layout_offset));
    let field = start + offset;
    assert_eq!(&frame[..field], &expected[..field]);
    assert_eq!(&frame[field + 2..], &expected[field + 2..]);
    assert_eq!(u16::from_be_bytes([frame[field], frame[field + 1]]), pseudo);
}
