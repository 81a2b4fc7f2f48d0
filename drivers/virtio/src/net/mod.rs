//! The virtio-net driver (§5.1): feature negotiation, one receive/transmit queue pair (and
//! the control queue when negotiated), receive buffers kept posted and recycled in place,
//! mergeable receive buffers, checksum offload in both directions (and the receive checksum
//! policy, [`RxChecksums`]), TCP segmentation offload both ways (GUEST_TSO4, HOST_TSO4), link
//! status, the MAC
//! address and receive filter (§5.1.6.5.1, §5.1.6.5.2), announce requests (§5.1.6.5.4), and
//! counters.
//!
//! MAC address: the caller's choice ([`NetOptions::mac`]) wins, then the device's `mac` field
//! (VIRTIO_NET_F_MAC) unless it is all-zero or multicast, then [`NetOptions::fallback_mac`]
//! (the kernel draws a random locally administered one). When the chosen address is not the
//! one the device already filters on, the device is told with VIRTIO_NET_CTRL_MAC_ADDR_SET, or
//! failing that put in its unicast filter table. With VIRTIO_NET_F_CTRL_RX promiscuous mode
//! is turned off so the device drops frames for other stations; whatever still arrives for
//! another unicast or a multicast address is dropped here and counted (`rx_foreign`).
//!
//! VIRTIO_F_ACCESS_PLATFORM (§6.1) is accepted: every address the device sees comes from the
//! HAL ([`crate::hal`]: allocation addresses and per-transfer `share`), so a platform with DMA
//! translation plugs in there; the kernel's HAL is the identity (no IOMMU is programmed).
//!
//! Data path, without allocation: every receive buffer and every transmit buffer is carved out
//! of one DMA allocation per queue at start-up (with GUEST_TSO4 the receive buffers hold a
//! whole 64 KiB segment, [`LARGE_RX_BUFFER_LEN`]; a frame spread over several buffers is
//! copied together, which then happens only in a guest without the memory for them or with a
//! device that splits frames it need not). A received frame is handed to the caller in place ([`RxFrame`]) and goes back to the ring when the caller recycles it; a transmitted
//! frame is written straight into a transmit buffer by a closure. Completed transmissions are
//! reclaimed on the send path, so transmit never needs interrupts. Doorbells are batched:
//! adds only mark the queue, and [`VirtioNet::flush`] notifies once per queue if the device
//! asked for it (flags or EVENT_IDX).
//!
//! Everything the device writes is untrusted: lengths, header fields and `num_buffers` are
//! bounded; a malformed packet is dropped and counted, and a queue the device broke is a
//! [`NetError`] that the caller turns into a device reset.

mod header;
mod rx;
mod tx;

use alloc::vec::Vec;
use core::fmt;

use header::ETHERNET_HEADER_LEN;
pub use header::{
    HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, HDR_GSO_NONE, HDR_GSO_TCPV4, NET_HEADER_LEN, NetHeader,
    complete_checksum, parse_header, partial_checksum_fits, prepare_checksum_offload,
    segmentation_layout, verify_transport_checksum,
};
pub use rx::RxFrame;

use crate::device::{QueueSetupError, ResetOnError, build_queue, wait_for_used};
use crate::dma::{DmaBuf, DmaError, DmaHal, Part};
use crate::error::TransportError;
use crate::queue::{DeviceError, QueueError, QueueFeatures, VirtQueue};
use crate::spec::{Features, NetFeatures, net_config};
use crate::transport::{ConfigWidth, QueueFormat, Transport, VirtioDevice};

/// Room for one VLAN tag.
const VLAN_TAG_LEN: usize = 4;
/// Default MTU without VIRTIO_NET_F_MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Buffers are at least this large, and multiples of 64 bytes.
const MIN_BUFFER: usize = 2048;

/// Control queue classes and commands (§5.1.6.5).
pub mod ctrl {
    /// VIRTIO_NET_CTRL_RX: receive modes, one byte of data, 0 off / 1 on (§5.1.6.5.1).
    pub const CLASS_RX: u8 = 0;
    /// VIRTIO_NET_CTRL_RX_PROMISC.
    pub const RX_PROMISC: u8 = 0;
    /// VIRTIO_NET_CTRL_RX_ALLMULTI.
    pub const RX_ALLMULTI: u8 = 1;
    /// VIRTIO_NET_CTRL_RX_ALLUNI (VIRTIO_NET_F_CTRL_RX_EXTRA).
    pub const RX_ALLUNI: u8 = 2;
    /// VIRTIO_NET_CTRL_RX_NOMULTI (VIRTIO_NET_F_CTRL_RX_EXTRA).
    pub const RX_NOMULTI: u8 = 3;
    /// VIRTIO_NET_CTRL_RX_NOUNI (VIRTIO_NET_F_CTRL_RX_EXTRA).
    pub const RX_NOUNI: u8 = 4;
    /// VIRTIO_NET_CTRL_RX_NOBCAST (VIRTIO_NET_F_CTRL_RX_EXTRA).
    pub const RX_NOBCAST: u8 = 5;
    /// VIRTIO_NET_CTRL_MAC (§5.1.6.5.2).
    pub const CLASS_MAC: u8 = 1;
    /// VIRTIO_NET_CTRL_MAC_TABLE_SET: two `virtio_net_ctrl_mac` tables, unicast then
    /// multicast, each a le32 count and that many 6-byte addresses.
    pub const MAC_TABLE_SET: u8 = 0;
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET: the 6-byte default MAC (VIRTIO_NET_F_CTRL_MAC_ADDR).
    pub const MAC_ADDR_SET: u8 = 1;
    /// VIRTIO_NET_CTRL_ANNOUNCE (§5.1.6.5.4).
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK.
    pub const ANNOUNCE_ACK: u8 = 0;
    /// VIRTIO_NET_CTRL_MQ.
    pub const CLASS_MQ: u8 = 4;
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// VIRTIO_NET_OK.
    pub const OK: u8 = 0;
}

/// The Ethernet broadcast address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Whether `mac` can be a station's own address: not all-zero and not multicast (the I/G bit,
/// bit 0 of the first octet, clear; IEEE 802 §8.2). Broadcast is multicast.
pub const fn is_valid_station_mac(mac: [u8; 6]) -> bool {
    let zero = mac[0] == 0 && mac[1] == 0 && mac[2] == 0 && mac[3] == 0 && mac[4] == 0;
    (mac[0] & 1 == 0) && !(zero && mac[5] == 0)
}

/// Makes a locally administered unicast MAC from 6 random bytes (U/L bit set, I/G bit clear,
/// never all-zero since the U/L bit is set).
pub const fn locally_administered_mac(random: [u8; 6]) -> [u8; 6] {
    let mut mac = random;
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// The device-independent and net features this driver can honour.
pub const DRIVER_FEATURES: u64 = Features::VERSION_1.bits()
    | QueueFeatures::supported_bits()
    | Features::ACCESS_PLATFORM.bits()
    | NetFeatures::MAC.bits()
    | NetFeatures::STATUS.bits()
    | NetFeatures::MTU.bits()
    | NetFeatures::MRG_RXBUF.bits()
    | NetFeatures::CSUM.bits()
    | NetFeatures::GUEST_CSUM.bits()
    | NetFeatures::GUEST_TSO4.bits()
    | NetFeatures::HOST_TSO4.bits()
    | NetFeatures::CTRL_VQ.bits()
    | NetFeatures::CTRL_RX.bits()
    | NetFeatures::CTRL_RX_EXTRA.bits()
    | NetFeatures::GUEST_ANNOUNCE.bits()
    | NetFeatures::CTRL_MAC_ADDR.bits()
    | NetFeatures::MQ.bits();

/// The features that only work through the control queue (§5.1.3.1): dropped from the request
/// when VIRTIO_NET_F_CTRL_VQ will not be negotiated.
const NEEDS_CTRL_VQ: u64 = NetFeatures::CTRL_RX.bits()
    | NetFeatures::CTRL_RX_EXTRA.bits()
    | NetFeatures::GUEST_ANNOUNCE.bits()
    | NetFeatures::CTRL_MAC_ADDR.bits()
    | NetFeatures::MQ.bits();

/// MSI-X table entries for the device's notifications; `None` means no vector (polling or
/// INTx).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetVectors {
    /// Configuration changes (link status).
    pub config: Option<u16>,
    /// Receive queue.
    pub rx: Option<u16>,
    /// Transmit queue (completions are reclaimed on the send path; a vector is optional).
    pub tx: Option<u16>,
}

/// How to bring the device up.
#[derive(Clone, Copy, Debug)]
pub struct NetOptions {
    /// Feature bits the caller allows (intersected with [`DRIVER_FEATURES`]).
    pub allowed_features: u64,
    /// Requested receive queue size (clamped to the device's maximum).
    pub rx_queue_size: u16,
    /// Requested transmit queue size.
    pub tx_queue_size: u16,
    /// Interrupt vectors.
    pub vectors: NetVectors,
    /// Microseconds to wait for a control-queue command before giving up.
    pub ctrl_timeout_us: u32,
    /// The MAC to use instead of the device's (the kernel's `mac=`); it must pass
    /// [`is_valid_station_mac`], else it is ignored and [`VirtioNet::mac_origin`] says so.
    pub mac: Option<[u8; 6]>,
    /// The MAC to use when neither `mac` nor the device gives a valid one; must be a valid
    /// station address (the kernel passes a random locally administered one).
    pub fallback_mac: [u8; 6],
    /// Drop received frames whose destination is neither the station's MAC nor broadcast
    /// (counted in `rx_foreign`). On by default; tests of other parts turn it off to feed
    /// arbitrary frames.
    pub drop_foreign: bool,
    /// What the driver does about received checksums (with VIRTIO_NET_F_GUEST_CSUM).
    pub rx_checksums: RxChecksums,
}

/// The receive checksum policy (§5.1.6.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RxChecksums {
    /// Complete every partial checksum (NEEDS_CSUM) so that the frame carries a valid one,
    /// and leave all verification to the caller's stack.
    #[default]
    Complete,
    /// Trust what the device vouches for: a frame with NEEDS_CSUM (its data came from a
    /// trusted source, the checksum is merely not computed yet) or DATA_VALID (the device
    /// checked it) is passed as it is, unverified and uncompleted; every other IPv4 TCP/UDP
    /// frame has its checksum verified here and is dropped when it is wrong
    /// (`rx_checksum_bad`). The caller's stack must then not verify TCP/UDP checksums itself.
    VerifyUnvouched,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            allowed_features: DRIVER_FEATURES,
            // Clamped to the device's maximum (QEMU: 256 unless rx_queue_size/tx_queue_size).
            rx_queue_size: 1024,
            tx_queue_size: 1024,
            vectors: NetVectors::default(),
            ctrl_timeout_us: 1_000_000,
            mac: None,
            fallback_mac: locally_administered_mac([0x02, 0x00, 0x5e, 0x00, 0x00, 0x01]),
            drop_foreign: true,
            rx_checksums: RxChecksums::Complete,
        }
    }
}

/// Errors of the net driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// The transport refused a step (features, queue setup, vector).
    Transport(TransportError),
    /// A queue could not be built or fed.
    Queue(QueueError),
    /// DMA memory for the buffers could not be had.
    Dma(DmaError),
    /// The device broke a queue's rules: reset it.
    Device {
        /// Which queue.
        queue: u16,
        /// What it did.
        error: DeviceError,
    },
    /// The device has fewer queues than virtio-net needs.
    MissingQueue {
        /// The queue index that does not exist.
        queue: u16,
    },
    /// A control command was refused or timed out.
    Control {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// The ack the device wrote, or `None` on timeout.
        ack: Option<u8>,
    },
    /// The device reported DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The owner declared the device failed on purpose (fault injection in tests).
    Injected,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(error) => write!(f, "{error}"),
            Self::Queue(error) => write!(f, "{error}"),
            Self::Dma(error) => write!(f, "{error}"),
            Self::Device { queue, error } => write!(f, "queue {queue}: {error}"),
            Self::MissingQueue { queue } => write!(f, "the device has no queue {queue}"),
            Self::Control {
                class,
                command,
                ack: Some(ack),
            } => {
                write!(f, "control command {class}.{command} refused (ack {ack})")
            }
            Self::Control {
                class,
                command,
                ack: None,
            } => {
                write!(f, "control command {class}.{command} timed out")
            }
            Self::NeedsReset => f.write_str("the device set DEVICE_NEEDS_RESET"),
            Self::Injected => f.write_str("injected fault (inject-reset=)"),
        }
    }
}

impl From<TransportError> for NetError {
    fn from(error: TransportError) -> Self {
        Self::Transport(error)
    }
}

impl From<QueueSetupError> for NetError {
    fn from(error: QueueSetupError) -> Self {
        match error {
            QueueSetupError::MissingQueue { queue } => Self::MissingQueue { queue },
            QueueSetupError::Transport(error) => Self::Transport(error),
            QueueSetupError::Queue(error) => Self::Queue(error),
        }
    }
}

impl From<QueueError> for NetError {
    fn from(error: QueueError) -> Self {
        Self::Queue(error)
    }
}

impl From<DmaError> for NetError {
    fn from(error: DmaError) -> Self {
        Self::Dma(error)
    }
}

/// Counters, exact (no sampling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames received and handed to the caller.
    pub rx_packets: u64,
    /// Their bytes (Ethernet frames, without the virtio header).
    pub rx_bytes: u64,
    /// Received buffers dropped as malformed (short, bad header, bad `num_buffers`, and a
    /// wrong checksum that the driver verified, see `rx_checksum_bad`).
    pub rx_malformed: u64,
    /// Frames that spanned several mergeable buffers (copied to reassemble).
    pub rx_merged: u64,
    /// Receive buffers posted to the device (descriptors).
    pub rx_buffers_posted: u64,
    /// Received frames whose checksum the driver completed (NEEDS_CSUM, with
    /// [`RxChecksums::Complete`]).
    pub rx_checksums_completed: u64,
    /// Received frames passed unverified because the device vouched for them (NEEDS_CSUM or
    /// DATA_VALID, with [`RxChecksums::VerifyUnvouched`]).
    pub rx_checksums_vouched: u64,
    /// Received TCP/UDP frames whose checksum the driver verified (nothing vouched for them,
    /// with [`RxChecksums::VerifyUnvouched`]).
    pub rx_checksums_verified: u64,
    /// Received frames dropped for a wrong TCP/UDP checksum (with
    /// [`RxChecksums::VerifyUnvouched`]); also counted in `rx_malformed`.
    pub rx_checksum_bad: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames not sent because the ring or the buffer pool was full (back-pressure).
    pub tx_full: u64,
    /// Frames not sent because they were empty or longer than the MTU allows.
    pub tx_oversize: u64,
    /// Frames sent with checksum offload (NEEDS_CSUM).
    pub tx_checksum_offloaded: u64,
    /// TCP frames longer than the MTU sent for the device to segment (HOST_TSO4,
    /// `VIRTIO_NET_HDR_GSO_TCPV4`, §5.1.6.2).
    pub tx_segmented: u64,
    /// Doorbell writes (notifications actually written).
    pub kicks: u64,
    /// Notifications the device suppressed.
    pub kicks_suppressed: u64,
    /// Configuration-change events handled.
    pub config_changes: u64,
    /// Device status re-reads on the timer (no configuration interrupt to wait for).
    pub status_polls: u64,
    /// Received frames for another station (unicast to another MAC, or multicast) that the
    /// device still delivered; dropped here.
    pub rx_foreign: u64,
    /// Announce requests from the device (VIRTIO_NET_S_ANNOUNCE) acknowledged.
    pub announce_acks: u64,
}

impl core::ops::AddAssign for NetStats {
    /// Adds another driver instance's counters (the totals across device resets).
    fn add_assign(&mut self, other: Self) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.rx_malformed += other.rx_malformed;
        self.rx_merged += other.rx_merged;
        self.rx_buffers_posted += other.rx_buffers_posted;
        self.rx_checksums_completed += other.rx_checksums_completed;
        self.rx_checksums_vouched += other.rx_checksums_vouched;
        self.rx_checksums_verified += other.rx_checksums_verified;
        self.rx_checksum_bad += other.rx_checksum_bad;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.tx_full += other.tx_full;
        self.tx_oversize += other.tx_oversize;
        self.tx_checksum_offloaded += other.tx_checksum_offloaded;
        self.tx_segmented += other.tx_segmented;
        self.kicks += other.kicks;
        self.kicks_suppressed += other.kicks_suppressed;
        self.config_changes += other.config_changes;
        self.status_polls += other.status_polls;
        self.rx_foreign += other.rx_foreign;
        self.announce_acks += other.announce_acks;
    }
}

/// Where the MAC in use came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacOrigin {
    /// The device's `mac` field (VIRTIO_NET_F_MAC).
    Device,
    /// The caller's [`NetOptions::mac`].
    Requested,
    /// [`NetOptions::fallback_mac`]: the device gave none, or an invalid one.
    Generated,
}

/// How the device learned the MAC in use, which decides what it filters (§5.1.6.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacProgramming {
    /// It is the device's own `mac`: nothing to tell.
    DeviceDefault,
    /// Set with VIRTIO_NET_CTRL_MAC_ADDR_SET.
    AddressSet,
    /// Put in the unicast filter table with VIRTIO_NET_CTRL_MAC_TABLE_SET.
    FilterTable,
    /// The device could not be told (no CTRL_MAC_ADDR, no CTRL_RX, or it refused): it keeps
    /// filtering on its own address unless it is promiscuous.
    NotTold,
}

/// The receive filter the device applies (§5.1.6.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxFilter {
    /// Promiscuous off: the device delivers the station's unicast and broadcast only
    /// (multicast off too with VIRTIO_NET_F_CTRL_RX_EXTRA).
    UnicastAndBroadcast,
    /// No VIRTIO_NET_F_CTRL_RX: the device's default, which for QEMU is promiscuous; foreign
    /// frames are dropped by the driver.
    DeviceDefault,
    /// The device could not be told the MAC in use, so promiscuous mode stays on (turning it
    /// off would drop the station's own frames); foreign frames are dropped by the driver.
    MacNotTold,
    /// A filter command was refused or timed out; the device keeps its default.
    Failed(NetError),
}

impl fmt::Display for RxFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnicastAndBroadcast => {
                f.write_str("promiscuous off: the device delivers our unicast and broadcast")
            }
            Self::DeviceDefault => f.write_str(
                "no CTRL_RX: the device's default filter (promiscuous on QEMU); foreign frames dropped in software",
            ),
            Self::MacNotTold => f.write_str(
                "the device cannot be told our MAC, so it stays promiscuous; foreign frames dropped in software",
            ),
            Self::Failed(error) => write!(
                f,
                "filter command failed ({error}); the device keeps its default, foreign frames dropped in software"
            ),
        }
    }
}

/// The data of VIRTIO_NET_CTRL_MAC_TABLE_SET with one unicast address and no multicast ones
/// (§5.1.6.5.2: two `virtio_net_ctrl_mac`, each a le32 count then the addresses).
fn mac_table_one_unicast(mac: [u8; 6]) -> [u8; 14] {
    let mut data = [0u8; 14];
    data[0..4].copy_from_slice(&1u32.to_le_bytes());
    data[4..10].copy_from_slice(&mac);
    // data[10..14]: le32 0, the empty multicast table.
    data
}

/// Link state changes reported by [`VirtioNet::handle_config_change`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// The link went up.
    Up,
    /// The link went down.
    Down,
}

/// The driver.
pub struct VirtioNet<H: DmaHal + Clone, T: Transport> {
    hal: H,
    device: VirtioDevice<T>,
    offered: u64,
    rx: VirtQueue<H, Part<H>>,
    tx: VirtQueue<H, Part<H>>,
    ctrl: Option<VirtQueue<H, Vec<Part<H>>>>,
    rx_index: u16,
    tx_index: u16,
    tx_pool: Vec<DmaBuf<H>>,
    buffer_len: usize,
    /// Size of each receive buffer: `buffer_len`, or [`LARGE_RX_BUFFER_LEN`] with GUEST_TSO4.
    rx_buffer_len: usize,
    /// How many receive buffers the driver owns (posted or lent out as frames).
    rx_buffer_count: usize,
    /// Large transmit buffers for segmentation offload (HOST_TSO4 only; else empty).
    tso_pool: Vec<DmaBuf<H>>,
    /// HOST_TSO4 negotiated: TCP frames up to [`MAX_SEGMENTED_FRAME`] may be sent.
    tso: bool,
    mac: [u8; 6],
    mac_origin: MacOrigin,
    rejected_device_mac: Option<[u8; 6]>,
    mac_programming: MacProgramming,
    rx_filter: RxFilter,
    announce_requested: bool,
    drop_foreign: bool,
    rx_checksums: RxChecksums,
    mtu: u16,
    link_up: bool,
    mergeable: bool,
    tx_checksum_offload: bool,
    rx_checksum_offload: bool,
    rx_added: bool,
    tx_added: bool,
    vectors: NetVectors,
    stats: NetStats,
    scratch_parts: Vec<DmaBuf<H>>,
}

/// Whether every bit of `mask` is set in `features`.
fn has(features: u64, mask: u64) -> bool {
    features & mask == mask
}

/// The longest frame sent for the device to segment (HOST_TSO4): an IPv4 packet of at most
/// 65535 bytes in an Ethernet frame.
pub const MAX_SEGMENTED_FRAME: usize = ETHERNET_HEADER_LEN + 65535;

/// Large transmit buffers kept for segmentation offload: 16 frames of 64 KiB in flight
/// (1 MiB) is more than the TCP windows of the connections sending them.
const TSO_BUFFERS: usize = 16;

/// One large transmit buffer: the header and the longest segmented frame, in 64-byte units.
const TSO_BUFFER_LEN: usize = (NET_HEADER_LEN + MAX_SEGMENTED_FRAME).div_ceil(64) * 64;

/// One receive buffer when the device may send segments of up to 64 KiB (GUEST_TSO4): the
/// header, a VLAN tag and the longest segmented frame, in 64-byte units. A segment then
/// arrives whole in one buffer and is handed up in place; with MTU-sized buffers it would
/// span 32 mergeable buffers and have to be copied together (and that copy, with its 64 KiB
/// allocation, was a fifth of the guest's work per echoed TCP byte).
pub const LARGE_RX_BUFFER_LEN: usize =
    (NET_HEADER_LEN + VLAN_TAG_LEN + MAX_SEGMENTED_FRAME).div_ceil(64) * 64;

/// Large receive buffers posted at most (16.4 MiB): QEMU's default ring of 256, not a
/// 1024-entry ring's 64 MiB.
pub const LARGE_RX_BUFFERS: usize = 256;

/// Receive/transmit buffer size: the virtio header plus the largest frame, at least
/// 2048 bytes, rounded up to 64 bytes.
pub fn buffer_len_for_mtu(mtu: u16) -> usize {
    let needed = NET_HEADER_LEN + ETHERNET_HEADER_LEN + VLAN_TAG_LEN + usize::from(mtu);
    needed.max(MIN_BUFFER).div_ceil(64) * 64
}

impl<H: DmaHal + Clone, T: Transport> VirtioNet<H, T> {
    /// Runs the initialization sequence (§3.1.1, §5.1.5): reset, features, queues, the
    /// control queue's MQ command when negotiated, DRIVER_OK, and fills the receive ring.
    pub fn new(hal: H, transport: T, options: NetOptions) -> Result<Self, NetError> {
        let mut device = VirtioDevice::new(transport);
        device.reset()?;
        let offered = device.transport_mut().read_device_features();
        let mut wanted = DRIVER_FEATURES & options.allowed_features;
        // MQ, CTRL_RX, GUEST_ANNOUNCE and CTRL_MAC_ADDR need the control queue (§5.1.3.1):
        // drop them when CTRL_VQ will not be negotiated, whether the device or the caller
        // ruled it out; CTRL_RX_EXTRA needs CTRL_RX.
        if !has(offered & wanted, NetFeatures::CTRL_VQ.bits()) {
            wanted &= !(NEEDS_CTRL_VQ | NetFeatures::CTRL_VQ.bits());
        }
        if !has(offered & wanted, NetFeatures::CTRL_RX.bits()) {
            wanted &= !NetFeatures::CTRL_RX_EXTRA.bits();
        }
        // GUEST_TSO4 needs GUEST_CSUM (§5.1.3.1). It is also taken only with MRG_RXBUF: the
        // receive buffers then hold a whole segment ([`LARGE_RX_BUFFER_LEN`]), and a guest
        // without the memory for them falls back to MTU-sized buffers, which only mergeable
        // chains make legal for 64 KiB segments (§5.1.6.3.1).
        if !has(
            offered & wanted,
            NetFeatures::GUEST_CSUM.bits() | NetFeatures::MRG_RXBUF.bits(),
        ) {
            wanted &= !NetFeatures::GUEST_TSO4.bits();
        }
        // HOST_TSO4 needs CSUM (§5.1.3.1): a segmented frame's checksum is the device's.
        if !has(offered & wanted, NetFeatures::CSUM.bits()) {
            wanted &= !NetFeatures::HOST_TSO4.bits();
        }
        // GUEST_ANNOUNCE is signalled through the status field (§5.1.4).
        if !has(offered & wanted, NetFeatures::STATUS.bits()) {
            wanted &= !NetFeatures::GUEST_ANNOUNCE.bits();
        }
        let features = device.begin(wanted)?;

        let mtu = if has(features, NetFeatures::MTU.bits()) {
            // A device MTU below 68 is nonsense (RFC 791's minimum); treat it as absent.
            let mtu = device
                .transport()
                .read_config(net_config::MTU, ConfigWidth::U16)? as u16;
            if mtu >= 68 { mtu } else { DEFAULT_MTU }
        } else {
            DEFAULT_MTU
        };
        let device_mac = if has(features, NetFeatures::MAC.bits()) {
            let mut mac = [0u8; 6];
            device
                .transport()
                .read_config_bytes(net_config::MAC, &mut mac)?;
            Some(mac)
        } else {
            None
        };
        let rejected_device_mac = device_mac.filter(|&mac| !is_valid_station_mac(mac));
        let valid_device_mac = device_mac.filter(|&mac| is_valid_station_mac(mac));
        let (mac, mac_origin) = match (
            options.mac.filter(|&mac| is_valid_station_mac(mac)),
            valid_device_mac,
        ) {
            (Some(requested), _) => (requested, MacOrigin::Requested),
            (None, Some(device_mac)) => (device_mac, MacOrigin::Device),
            (None, None) => (options.fallback_mac, MacOrigin::Generated),
        };
        let max_pairs = if has(features, NetFeatures::MQ.bits()) {
            let pairs = device
                .transport()
                .read_config(net_config::MAX_VIRTQUEUE_PAIRS, ConfigWidth::U16)?;
            // §5.1.4: 1..=0x8000; anything else is treated as 1.
            if (1..=0x8000).contains(&pairs) {
                pairs as u16
            } else {
                1
            }
        } else {
            1
        };
        let queue_features = QueueFeatures::from_negotiated(features);
        let (rx_index, tx_index) = (0u16, 1u16);
        let ctrl_index = if has(features, NetFeatures::CTRL_VQ.bits()) {
            Some(max_pairs.saturating_mul(2))
        } else {
            None
        };

        // The queues live in slots declared before the guard: on an early return the guard is
        // dropped first and resets the device (setting FAILED) before any queue memory is
        // freed, which the queue module requires even though a device must not touch queues
        // before DRIVER_OK (§2.1.2).
        let mut rx_slot: Option<VirtQueue<H, Part<H>>>;
        let mut tx_slot: Option<VirtQueue<H, Part<H>>>;
        let mut ctrl_slot: Option<VirtQueue<H, Vec<Part<H>>>> = None;
        let mut guard = ResetOnError::new(device);
        let Some(device) = guard.device() else {
            return Err(NetError::NeedsReset);
        };
        rx_slot = Some(build_queue(
            &hal,
            device,
            rx_index,
            options.rx_queue_size,
            queue_features,
            options.vectors.rx,
        )?);
        tx_slot = Some(build_queue(
            &hal,
            device,
            tx_index,
            options.tx_queue_size,
            queue_features,
            options.vectors.tx,
        )?);
        if let Some(index) = ctrl_index {
            ctrl_slot = Some(build_queue(&hal, device, index, 16, queue_features, None)?);
        }
        device.set_config_vector(options.vectors.config)?;

        let buffer_len = buffer_len_for_mtu(mtu);
        let ring_rx_count = rx_slot
            .as_ref()
            .map_or(0, |queue| usize::from(queue.size()));
        // With GUEST_TSO4 (which came with MRG_RXBUF, see above), buffers that hold a whole
        // 64 KiB segment, fewer of them on a large ring; else one MTU-sized buffer per entry.
        let (rx_buffer_len, rx_count) = if has(features, NetFeatures::GUEST_TSO4.bits()) {
            (
                LARGE_RX_BUFFER_LEN.max(buffer_len),
                ring_rx_count.min(LARGE_RX_BUFFERS),
            )
        } else {
            (buffer_len, ring_rx_count)
        };
        let tx_count = tx_slot
            .as_ref()
            .map_or(0, |queue| usize::from(queue.size()));
        // A guest too small for the large pool still works with MTU-sized buffers: segments
        // then arrive as mergeable chains and are copied together (slower, never lost); the
        // sizes in use are visible through `rx_buffers`.
        let (rx_buffer_len, rx_count, rx_pool) =
            match DmaBuf::new(hal.clone(), rx_count * rx_buffer_len) {
                Ok(pool) => (rx_buffer_len, rx_count, pool),
                Err(_) if rx_buffer_len != buffer_len => (
                    buffer_len,
                    ring_rx_count,
                    DmaBuf::new(hal.clone(), ring_rx_count * buffer_len)?,
                ),
                Err(error) => return Err(error.into()),
            };
        let rx_buffers = rx_pool
            .chunks(rx_buffer_len)
            .map_err(|(_, error)| NetError::Dma(error))?;
        let tx_pool = DmaBuf::new(hal.clone(), tx_count * buffer_len)?
            .chunks(buffer_len)
            .map_err(|(_, error)| NetError::Dma(error))?;
        let tso = has(features, NetFeatures::HOST_TSO4.bits());
        let tso_pool = if tso {
            DmaBuf::new(hal.clone(), TSO_BUFFERS * TSO_BUFFER_LEN)?
                .chunks(TSO_BUFFER_LEN)
                .map_err(|(_, error)| NetError::Dma(error))?
        } else {
            Vec::new()
        };
        let (Some(rx), Some(tx)) = (rx_slot.take(), tx_slot.take()) else {
            return Err(NetError::NeedsReset);
        };
        let ctrl = ctrl_slot.take();
        let Some(device) = guard.take() else {
            return Err(NetError::NeedsReset);
        };

        let mut net = Self {
            hal,
            device,
            offered,
            rx,
            tx,
            ctrl,
            rx_index,
            tx_index,
            tx_pool,
            buffer_len,
            rx_buffer_len,
            rx_buffer_count: rx_count,
            tso_pool,
            tso,
            mac,
            mac_origin,
            rejected_device_mac,
            mac_programming: MacProgramming::NotTold,
            rx_filter: RxFilter::DeviceDefault,
            announce_requested: false,
            drop_foreign: options.drop_foreign,
            rx_checksums: options.rx_checksums,
            mtu,
            link_up: true,
            mergeable: has(features, NetFeatures::MRG_RXBUF.bits()),
            tx_checksum_offload: has(features, NetFeatures::CSUM.bits()),
            rx_checksum_offload: has(features, NetFeatures::GUEST_CSUM.bits()),
            rx_added: false,
            tx_added: false,
            vectors: options.vectors,
            stats: NetStats::default(),
            scratch_parts: Vec::new(),
        };
        net.device.driver_ok()?;
        for buffer in rx_buffers {
            net.post_rx(buffer)?;
        }
        // Transmit completions are reclaimed on the send path: no interrupts for them.
        net.tx.disable_cb();
        if net.ctrl.is_some() && has(features, NetFeatures::MQ.bits()) {
            // One CPU, one pair; set it explicitly as §5.1.6.5.6 requires once MQ is on.
            net.control(
                ctrl::CLASS_MQ,
                ctrl::MQ_VQ_PAIRS_SET,
                &1u16.to_le_bytes(),
                options.ctrl_timeout_us,
            )?;
        }
        net.program_mac_and_filter(valid_device_mac, options.ctrl_timeout_us);
        net.refresh_status();
        net.flush()?;
        Ok(net)
    }

    /// Tells the device the MAC in use when it is not the device's own (§5.1.6.5.2), then
    /// turns promiscuous mode off (§5.1.6.5.1). A refused or unanswered command is recorded
    /// ([`Self::rx_filter`], [`Self::mac_programming`]), not fatal: the device then keeps its
    /// default filter and the driver's own check drops foreign frames.
    fn program_mac_and_filter(&mut self, device_mac: Option<[u8; 6]>, timeout_us: u32) {
        let features = self.device.features();
        let mac = self.mac;
        self.mac_programming = if device_mac == Some(mac) {
            MacProgramming::DeviceDefault
        } else if has(features, NetFeatures::CTRL_MAC_ADDR.bits())
            && self
                .control(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &mac, timeout_us)
                .is_ok()
        {
            MacProgramming::AddressSet
        } else if has(features, NetFeatures::CTRL_RX.bits())
            && self
                .control(
                    ctrl::CLASS_MAC,
                    ctrl::MAC_TABLE_SET,
                    &mac_table_one_unicast(mac),
                    timeout_us,
                )
                .is_ok()
        {
            MacProgramming::FilterTable
        } else {
            MacProgramming::NotTold
        };
        if !has(features, NetFeatures::CTRL_RX.bits()) {
            self.rx_filter = RxFilter::DeviceDefault;
            return;
        }
        if self.mac_programming == MacProgramming::NotTold {
            // The device does not know our address: filtering would drop our own frames.
            self.rx_filter = RxFilter::MacNotTold;
            return;
        }
        let mut commands: Vec<(u8, u8)> =
            alloc::vec![(ctrl::RX_PROMISC, 0), (ctrl::RX_ALLMULTI, 0)];
        if has(features, NetFeatures::CTRL_RX_EXTRA.bits()) {
            commands.extend([
                (ctrl::RX_ALLUNI, 0),
                (ctrl::RX_NOMULTI, 1),
                (ctrl::RX_NOUNI, 0),
                (ctrl::RX_NOBCAST, 0),
            ]);
        }
        for (command, on) in commands {
            if let Err(error) = self.control(ctrl::CLASS_RX, command, &[on], timeout_us) {
                self.rx_filter = RxFilter::Failed(error);
                return;
            }
        }
        self.rx_filter = RxFilter::UnicastAndBroadcast;
    }

    /// Sends one control command and waits (bounded) for the device's ack (§5.1.6.5).
    fn control(
        &mut self,
        class: u8,
        command: u8,
        data: &[u8],
        timeout_us: u32,
    ) -> Result<(), NetError> {
        let hal_buffer_len = 2 + data.len();
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Err(NetError::Control {
                class,
                command,
                ack: None,
            });
        };
        let ctrl_index = ctrl.index();
        let mut request = DmaBuf::new(self.rx_hal(), hal_buffer_len)?;
        {
            let bytes = request.as_bytes_mut();
            bytes[0] = class;
            bytes[1] = command;
            bytes[2..].copy_from_slice(data);
        }
        let ack = DmaBuf::new(self.rx_hal(), 1)?;
        let request =
            Part::readable(request, hal_buffer_len).map_err(|(_, error)| NetError::Dma(error))?;
        let ack = Part::writable(ack).map_err(|(_, error)| NetError::Dma(error))?;
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Err(NetError::Control {
                class,
                command,
                ack: None,
            });
        };
        ctrl.add(alloc::vec![request, ack])
            .map_err(|error| NetError::Queue(error.error))?;
        if ctrl.should_notify() {
            self.device.transport().notify(ctrl_index)?;
            self.stats.kicks += 1;
        }
        let used = match wait_for_used(ctrl, &self.hal, timeout_us) {
            Ok(Some(used)) => used,
            Ok(None) => {
                return Err(NetError::Control {
                    class,
                    command,
                    ack: None,
                });
            }
            Err(error) => {
                return Err(NetError::Device {
                    queue: ctrl_index,
                    error,
                });
            }
        };
        // End the transfers before reading the ack (a bounce HAL copies it back).
        let mut parts = used.buffer.into_iter().map(Part::into_buf);
        let ack = parts.nth(1).and_then(|ack| ack.as_bytes().first().copied());
        match ack {
            Some(ctrl::OK) if used.len >= 1 => Ok(()),
            other => Err(NetError::Control {
                class,
                command,
                ack: other,
            }),
        }
    }

    fn rx_hal(&self) -> H {
        self.hal.clone()
    }

    /// The MAC address in use (see the module docs for how it is chosen).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Where the MAC in use came from.
    pub fn mac_origin(&self) -> MacOrigin {
        self.mac_origin
    }

    /// The device's `mac` field when it was all-zero or multicast and therefore not used.
    pub fn rejected_device_mac(&self) -> Option<[u8; 6]> {
        self.rejected_device_mac
    }

    /// How the device learned the MAC in use.
    pub fn mac_programming(&self) -> MacProgramming {
        self.mac_programming
    }

    /// The receive filter the device applies.
    pub fn rx_filter(&self) -> RxFilter {
        self.rx_filter
    }

    /// The MTU in use.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.device.features()
    }

    /// Whether the link is up (always with no VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// The vectors in use.
    pub fn vectors(&self) -> NetVectors {
        self.vectors
    }

    /// Queue sizes (rx, tx).
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.rx.size(), self.tx.size())
    }

    /// The receive buffers posted: how many, and the size of each (with GUEST_TSO4,
    /// [`LARGE_RX_BUFFER_LEN`] unless the guest lacked the memory for them).
    pub fn rx_buffers(&self) -> (usize, usize) {
        (self.rx_buffer_count, self.rx_buffer_len)
    }

    /// Whether TCP/UDP checksums of sent frames are left to the device.
    pub fn tx_checksum_offload(&self) -> bool {
        self.tx_checksum_offload
    }

    /// The receive checksum policy in force.
    pub fn rx_checksums(&self) -> RxChecksums {
        self.rx_checksums
    }

    /// Whether received frames may carry partial checksums that the driver completes.
    pub fn rx_checksum_offload(&self) -> bool {
        self.rx_checksum_offload
    }

    /// The largest Ethernet frame (without FCS) that can be sent or received.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETHERNET_HEADER_LEN
    }

    /// With HOST_TSO4: the longest IPv4 TCP frame [`Self::transmit`] takes for the device to
    /// cut into segments of at most the MTU ([`MAX_SEGMENTED_FRAME`]); `None` without.
    pub fn max_segmented_frame(&self) -> Option<usize> {
        self.tso.then_some(MAX_SEGMENTED_FRAME)
    }

    /// The counters, with the queues' kick counters folded in.
    pub fn stats(&self) -> NetStats {
        let mut stats = self.stats;
        stats.kicks_suppressed =
            self.rx.stats().kicks_suppressed + self.tx.stats().kicks_suppressed;
        stats
    }

    /// The transport (ISR reads, diagnostics).
    pub fn transport(&self) -> &T {
        self.device.transport()
    }

    /// Re-reads the `status` field (§5.1.4): the link bit (always up without
    /// VIRTIO_NET_F_STATUS) and, with VIRTIO_NET_F_GUEST_ANNOUNCE, the announce request. A
    /// failed read keeps the last state.
    fn refresh_status(&mut self) -> Option<LinkChange> {
        let features = self.device.features();
        let up = if has(features, NetFeatures::STATUS.bits()) {
            match self
                .device
                .transport()
                .read_config(net_config::STATUS, ConfigWidth::U16)
            {
                Ok(status) => {
                    let status = status as u16;
                    if has(features, NetFeatures::GUEST_ANNOUNCE.bits())
                        && status & net_config::STATUS_ANNOUNCE != 0
                    {
                        self.announce_requested = true;
                    }
                    status & net_config::STATUS_LINK_UP != 0
                }
                Err(_) => self.link_up,
            }
        } else {
            true
        };
        if up == self.link_up {
            return None;
        }
        self.link_up = up;
        Some(if up { LinkChange::Up } else { LinkChange::Down })
    }

    /// Re-reads the link status after a configuration-change notification; reports a change.
    /// Also reports a device that asked to be reset.
    pub fn handle_config_change(&mut self) -> Result<Option<LinkChange>, NetError> {
        self.stats.config_changes += 1;
        if self.device.needs_reset() {
            return Err(NetError::NeedsReset);
        }
        Ok(self.refresh_status())
    }

    /// The same checks as [`Self::handle_config_change`] for a driver that gets no
    /// configuration-change notification (polling only, no MSI-X config vector and no INTx):
    /// the caller runs it on a timer. Counted in `status_polls`, not `config_changes`.
    pub fn poll_status(&mut self) -> Result<Option<LinkChange>, NetError> {
        self.stats.status_polls += 1;
        if self.device.needs_reset() {
            return Err(NetError::NeedsReset);
        }
        Ok(self.refresh_status())
    }

    /// Whether the device asked the driver to announce itself (VIRTIO_NET_S_ANNOUNCE, seen by
    /// the last status read). The caller sends its gratuitous packets, then calls
    /// [`Self::ack_announce`] (§5.1.6.5.4).
    pub fn announce_requested(&self) -> bool {
        self.announce_requested
    }

    /// Acknowledges an announce request with VIRTIO_NET_CTRL_ANNOUNCE_ACK, after which the
    /// device clears VIRTIO_NET_S_ANNOUNCE (§5.1.6.5.4). Does nothing when none is pending.
    pub fn ack_announce(&mut self, timeout_us: u32) -> Result<(), NetError> {
        if !self.announce_requested {
            return Ok(());
        }
        self.announce_requested = false;
        self.control(ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK, &[], timeout_us)?;
        self.stats.announce_acks += 1;
        Ok(())
    }
}

impl<H: DmaHal + Clone, T: Transport> Drop for VirtioNet<H, T> {
    /// Resets the device before the queues and buffers are freed (the fields drop after this),
    /// so the device never touches memory that went back to the allocator.
    fn drop(&mut self) {
        let _ = self.device.reset();
    }
}

impl<H: DmaHal + Clone, T: Transport> fmt::Debug for VirtioNet<H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioNet")
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("queues", &self.queue_sizes())
            .field(
                "format",
                &match self.rx.format() {
                    QueueFormat::Split => "split",
                    QueueFormat::Packed => "packed",
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests;
