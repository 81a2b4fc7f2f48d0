//! Finding and bringing up virtio devices: every virtio function is identified and logged;
//! the first virtio-net device is initialised through the modern PCI transport (§3.1.1 and
//! §4.1) with the best interrupt path it accepts; everything else is reported and left alone.
//! Also the NIC's interrupt handlers and its adapter to the network loop ([`KernelNic`]).

use core::fmt::Write;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ::pci::{Function, PciAddress};
use virtio::net::{LinkChange, NetError, NetOptions, NetStats, NetVectors, RxFrame, VirtioNet};
use virtio::pci::{DeviceConfigRequirement, PciTransport, identify};
use virtio::spec::{FeatureNames, NetFeatures};
use virtio::transport::DeviceType;

use crate::acpi::AcpiInfo;
use crate::arch::{self, interrupts};
use crate::hal::KernelHal;
use crate::net;
use crate::pci::PlatformConfig;

/// Names of the set feature bits of a net device, from the flag definitions in
/// `virtio::spec` (unknown ones as `bitN`).
pub fn net_feature_names(bits: u64) -> FeatureNames<NetFeatures> {
    FeatureNames::new(bits)
}

/// The virtio-net driver on this machine.
pub type KernelNet = VirtioNet<KernelHal, PciTransport<KernelHal>>;

/// How the NIC interrupts the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptPath {
    /// MSI-X with separate config and receive vectors.
    MsixSeparate,
    /// MSI-X with one vector for everything.
    MsixShared,
    /// Legacy INTx through the I/O APIC; the GSIs routed, as a bit mask.
    Intx(u32),
    /// No interrupts: the loop must poll.
    Polling,
}

impl core::fmt::Display for InterruptPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::MsixSeparate => f.write_str("MSI-X (config, rx and tx vectors)"),
            Self::MsixShared => f.write_str("MSI-X (one shared vector)"),
            Self::Intx(gsis) => write!(f, "INTx through the I/O APIC (GSI mask {gsis:#x})"),
            Self::Polling => f.write_str("none (polling only)"),
        }
    }
}

/// The NIC, brought up.
pub struct NetDevice {
    /// Its PCI function.
    pub function: Function,
    /// The driver.
    pub net: KernelNet,
    /// The interrupt path taken.
    pub interrupts: InterruptPath,
}

/// Why the net device could not be brought up.
#[derive(Debug)]
pub enum BringUpError {
    /// No virtio-net function on any bus.
    NotFound {
        /// Functions scanned.
        scanned: usize,
    },
    /// Discovery (capabilities) failed.
    Discovery(PciAddress, virtio::error::DiscoveryError),
    /// The driver could not initialise the device.
    Driver(PciAddress, NetError),
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotFound { scanned } => {
                write!(
                    f,
                    "no virtio-net device found ({scanned} PCI functions scanned)"
                )
            }
            Self::Discovery(address, error) => write!(f, "virtio-net at {address}: {error}"),
            Self::Driver(address, error) => write!(f, "virtio-net at {address}: {error}"),
        }
    }
}

/// How long the loop waits for the device to take an VIRTIO_NET_CTRL_ANNOUNCE_ACK.
const ANNOUNCE_ACK_TIMEOUT_US: u32 = 100_000;

/// CPU vectors of the NIC.
const CONFIG_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST;
const RX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 1;
const SHARED_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 2;
const INTX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 3;
const TX_VECTOR: u8 = interrupts::DEVICE_VECTOR_FIRST + 4;
const _: () = assert!(INTX_VECTOR <= interrupts::DEVICE_VECTOR_LAST);

/// Set by the config-change interrupt (or INTx with ISR bit 1); taken by the loop.
pub static CONFIG_PENDING: AtomicBool = AtomicBool::new(false);
/// Identity-mapped address of the NIC's ISR byte, for the INTx handler.
static ISR_ADDRESS: AtomicU64 = AtomicU64::new(0);

fn config_interrupt(_vector: u8) {
    net::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    CONFIG_PENDING.store(true, Ordering::Release);
}

fn rx_interrupt(_vector: u8) {
    net::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

fn tx_interrupt(_vector: u8) {
    net::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

fn shared_interrupt(_vector: u8) {
    net::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    // One vector for queue and config events: the loop re-reads the link status too (cheap).
    CONFIG_PENDING.store(true, Ordering::Release);
}

fn intx_interrupt(_vector: u8) {
    let address = ISR_ADDRESS.load(Ordering::Relaxed);
    if address == 0 {
        return;
    }
    // SAFETY: ISR_ADDRESS is the uncached mapping of the ISR status byte located by the
    // transport's capability walk (set before the vector was routed). Reading it acknowledges
    // the interrupt and deasserts INTx (§4.1.4.5).
    let isr = unsafe { core::ptr::read_volatile(address as *const u8) };
    if isr != 0 {
        net::NIC_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    }
    if virtio::spec::IsrStatus::from_bits_retain(isr).config_changed() {
        CONFIG_PENDING.store(true, Ordering::Release);
    }
}

fn vector_plan(path: InterruptPath) -> NetVectors {
    match path {
        InterruptPath::MsixSeparate => NetVectors {
            config: Some(0),
            rx: Some(1),
            tx: Some(2),
        },
        InterruptPath::MsixShared => NetVectors {
            config: Some(0),
            rx: Some(0),
            tx: None,
        },
        InterruptPath::Intx(_) | InterruptPath::Polling => NetVectors::default(),
    }
}

/// Identifies every virtio function, then brings up the first virtio-net one: MSI-X when the
/// device takes the vectors (two, else one shared), else INTx through the I/O APIC, else
/// polling; each fallback is logged. Other devices are logged and left alone.
pub fn bring_up_net(
    config: &PlatformConfig,
    functions: &[Function],
    platform: Option<&AcpiInfo>,
    options: NetOptions,
) -> Result<NetDevice, BringUpError> {
    let mut chosen: Option<&Function> = None;
    for function in functions
        .iter()
        .filter(|function| function.vendor_id == virtio::spec::VIRTIO_PCI_VENDOR_ID)
    {
        match identify(config, function.address) {
            Ok(id) if id.device_type == DeviceType::NET && chosen.is_none() => {
                log::info!("virtio: {} {id}: driving it", function.address);
                chosen = Some(function);
            }
            Ok(id) if id.device_type == DeviceType::NET => {
                log::info!(
                    "virtio: {} {id}: another virtio-net device, left alone",
                    function.address
                );
            }
            Ok(id) => log::info!(
                "virtio: {} {id}: no driver for this type, left alone",
                function.address
            ),
            Err(error) => log::warn!("virtio: {}: {error}; left alone", function.address),
        }
    }
    let function = *chosen.ok_or(BringUpError::NotFound {
        scanned: functions.len(),
    })?;
    let address = function.address;

    // Decoding and bus mastering only on the device Vireo drives.
    ::pci::enable_memory_space(config, address);
    if function
        .bars
        .iter()
        .flatten()
        .any(|bar| matches!(bar, ::pci::Bar::Io { .. }))
    {
        ::pci::enable_io_space(config, address);
    }
    ::pci::enable_bus_mastering(config, address);

    let transport = || {
        PciTransport::new(
            KernelHal,
            config,
            address,
            &function.bars,
            DeviceConfigRequirement::Required,
        )
        .map_err(|error| BringUpError::Discovery(address, error))
    };
    let first = transport()?;
    for line in alloc::format!("{}", first.capabilities()).lines() {
        log::info!("virtio-net: {line}");
    }
    if let virtio::pci::Location::Memory { phys } = first.capabilities().isr.location {
        ISR_ADDRESS.store(phys, Ordering::Relaxed);
    }
    drop(first);

    // MSI-X first.
    let msix = match ::pci::MsixCapability::find(config, address, &function.bars) {
        Ok(Some(capability)) => {
            match crate::pci::MsixTable::enable(config, capability, &function.bars) {
                Ok(table) => Some(table),
                Err(error) => {
                    log::warn!("virtio-net: MSI-X unusable ({error})");
                    None
                }
            }
        }
        Ok(None) => {
            log::info!("virtio-net: no MSI-X capability");
            None
        }
        Err(error) => {
            log::warn!("virtio-net: MSI-X capability malformed ({error})");
            None
        }
    };
    let apic_id = arch::apic::id() as u8;
    let mut attempts: alloc::vec::Vec<InterruptPath> = alloc::vec::Vec::new();
    if let Some(table) = &msix {
        let registered = interrupts::register_irq(CONFIG_VECTOR, config_interrupt).is_ok()
            && interrupts::register_irq(RX_VECTOR, rx_interrupt).is_ok()
            && interrupts::register_irq(SHARED_VECTOR, shared_interrupt).is_ok()
            && interrupts::register_irq(TX_VECTOR, tx_interrupt).is_ok();
        if registered && table.size() >= 3 {
            attempts.push(InterruptPath::MsixSeparate);
        }
        if registered {
            attempts.push(InterruptPath::MsixShared);
        }
    }
    attempts.push(InterruptPath::Intx(0));
    attempts.push(InterruptPath::Polling);

    let mut last_error = None;
    for path in attempts {
        let mut path = path;
        match path {
            InterruptPath::MsixSeparate => {
                if let Some(table) = &msix {
                    let _ = table.route(0, apic_id, CONFIG_VECTOR);
                    let _ = table.route(1, apic_id, RX_VECTOR);
                    let _ = table.route(2, apic_id, TX_VECTOR);
                    table.unmask_function(config);
                }
            }
            InterruptPath::MsixShared => {
                if let Some(table) = &msix {
                    let _ = table.route(0, apic_id, SHARED_VECTOR);
                    table.unmask_function(config);
                }
            }
            InterruptPath::Intx(_) => {
                if let Some(table) = &msix {
                    table.disable(config);
                }
                let routed = match platform {
                    Some(info) if arch::ioapic::init(info).is_some() => {
                        arch::ioapic::route_pci_intx(
                            info,
                            function.interrupt_line,
                            INTX_VECTOR,
                            u32::from(apic_id),
                        )
                    }
                    _ => 0,
                };
                if routed == 0 || interrupts::register_irq(INTX_VECTOR, intx_interrupt).is_err() {
                    log::warn!(
                        "virtio-net: no I/O APIC route for INTx (line {})",
                        function.interrupt_line
                    );
                    continue;
                }
                ::pci::update_command(config, address, 0, ::pci::regs::COMMAND_INTX_DISABLE);
                path = InterruptPath::Intx(routed);
            }
            InterruptPath::Polling => {}
        }
        let options = NetOptions {
            vectors: vector_plan(path),
            ..options
        };
        match VirtioNet::new(KernelHal, transport()?, options) {
            Ok(net) => {
                log::info!("virtio-net: interrupts: {path}");
                return Ok(NetDevice {
                    function,
                    net,
                    interrupts: path,
                });
            }
            Err(NetError::Transport(virtio::error::TransportError::VectorRefused {
                queue,
                vector,
            })) => {
                log::warn!(
                    "virtio-net: the device refused MSI-X entry {vector} for {}; trying fewer vectors",
                    match queue {
                        Some(queue) => alloc::format!("queue {queue}"),
                        None => "config changes".into(),
                    }
                );
                last_error = Some(NetError::Transport(
                    virtio::error::TransportError::VectorRefused { queue, vector },
                ));
            }
            Err(error) => return Err(BringUpError::Driver(address, error)),
        }
    }
    Err(BringUpError::Driver(
        address,
        last_error.unwrap_or(NetError::NeedsReset),
    ))
}

/// Rebuilds the driver from scratch (reset, renegotiate, new queues and buffers).
pub type Reinit = alloc::boxed::Box<dyn FnMut() -> Result<KernelNet, BringUpError>>;

/// Brings the driver up again on a device that was already probed, with the same interrupt
/// path (the MSI-X table or I/O APIC routes stay programmed).
pub fn reinit_net(
    config: &PlatformConfig,
    function: &Function,
    path: InterruptPath,
    options: NetOptions,
) -> Result<KernelNet, BringUpError> {
    let address = function.address;
    let transport = PciTransport::new(
        KernelHal,
        config,
        address,
        &function.bars,
        DeviceConfigRequirement::Required,
    )
    .map_err(|error| BringUpError::Discovery(address, error))?;
    VirtioNet::new(
        KernelHal,
        transport,
        NetOptions {
            vectors: vector_plan(path),
            ..options
        },
    )
    .map_err(|error| BringUpError::Driver(address, error))
}

/// The kernel's NIC for the network loop: the driver, error latching, and recovery. When the
/// device breaks a queue's rules or asks for a reset, the next housekeeping pass retires the
/// driver (its Drop resets the device before its queues and buffers are freed), then
/// initialises the device again; the network stack above keeps its sockets. Counters are
/// totals across resets.
pub struct KernelNic {
    net: Option<KernelNet>,
    /// Whether configuration changes interrupt (MSI-X config vector, or INTx's ISR bit);
    /// without, housekeeping re-reads the device status itself.
    config_interrupts: bool,
    /// The link came up (at boot, after a link-down, after a reset) or the device asked
    /// (VIRTIO_NET_S_ANNOUNCE): the loop owes the network a gratuitous ARP.
    announce_pending: bool,
    failed: Option<NetError>,
    reinit: Reinit,
    resets: u64,
    retired_stats: NetStats,
    /// Fault injection: declare the device failed after this many received frames.
    inject_reset_every: Option<u32>,
    received_since_reset: u32,
}

impl KernelNic {
    /// Wraps the driver, with the recipe to rebuild it. `config_interrupts`: whether the
    /// interrupt path delivers configuration changes (all but [`InterruptPath::Polling`]).
    pub fn new(
        net: KernelNet,
        reinit: Reinit,
        inject_reset_every: Option<u32>,
        config_interrupts: bool,
    ) -> Self {
        Self {
            announce_pending: net.link_up(),
            config_interrupts,
            net: Some(net),
            failed: None,
            reinit,
            resets: 0,
            retired_stats: NetStats::default(),
            inject_reset_every,
            received_since_reset: 0,
        }
    }

    fn note(&mut self, error: NetError) {
        if self.failed.is_none() {
            log::error!("virtio-net: {error}");
            self.failed = Some(error);
        }
    }

    fn recover(&mut self) {
        let Some(error) = self.failed.take() else {
            return;
        };
        log::warn!("virtio-net: resetting the device after: {error}");
        // Retire the old driver first: dropping it resets the device. Building the new one
        // before that would leave the new driver on a device the old one's Drop just reset.
        if let Some(old) = self.net.take() {
            self.retired_stats += old.stats();
            drop(old);
        }
        match (self.reinit)() {
            Ok(net) => {
                // A reset device starts over: announce again once its link is up.
                self.announce_pending |= net.link_up();
                self.net = Some(net);
                self.resets += 1;
                log::info!("virtio-net: device re-initialised (reset {})", self.resets);
            }
            Err(error) => {
                log::error!("virtio-net: re-initialisation failed: {error}; will retry");
                self.failed = Some(NetError::NeedsReset);
            }
        }
    }

    fn stats(&self) -> NetStats {
        let mut stats = self.retired_stats;
        if let Some(net) = &self.net {
            stats += net.stats();
        }
        stats
    }
}

impl net::device::Nic for KernelNic {
    type Rx = RxFrame<KernelHal>;

    fn receive(&mut self) -> Option<Self::Rx> {
        if let Some(every) = self.inject_reset_every
            && self.failed.is_none()
            && self.received_since_reset >= every
        {
            self.received_since_reset = 0;
            self.note(NetError::Injected);
        }
        match self.net.as_mut()?.receive() {
            Ok(Some(frame)) => {
                self.received_since_reset = self.received_since_reset.saturating_add(1);
                Some(frame)
            }
            Ok(None) => None,
            Err(error) => {
                self.note(error);
                None
            }
        }
    }

    fn frame(rx: &Self::Rx) -> &[u8] {
        rx.bytes()
    }

    fn recycle(&mut self, rx: Self::Rx) {
        // A frame from a retired driver is simply dropped: its buffers belonged to the old
        // queues, which are gone; the new driver posted fresh ones.
        let Some(net) = self.net.as_mut() else { return };
        if let Err(error) = net.recycle(rx) {
            self.note(error);
        }
    }

    fn can_transmit(&mut self) -> bool {
        self.net.as_mut().is_some_and(|net| net.can_transmit())
    }

    fn transmit<R>(&mut self, length: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        match self.net.as_mut()?.transmit(length, fill) {
            Ok(result) => result,
            Err(error) => {
                self.note(error);
                None
            }
        }
    }

    fn max_frame(&self) -> usize {
        self.net
            .as_ref()
            .map_or(usize::from(virtio::net::DEFAULT_MTU) + 14, |net| {
                net.max_frame()
            })
    }

    fn tx_checksum_offload(&self) -> bool {
        self.net
            .as_ref()
            .is_some_and(|net| net.tx_checksum_offload())
    }
}

impl net::NicControl for KernelNic {
    fn arm_rx_interrupt(&mut self) -> bool {
        match self.net.as_mut() {
            // Receive always; transmit only when back-pressured (see the driver).
            Some(net) => net.arm_rx_interrupt() | net.arm_tx_interrupt_if_backlogged(),
            // No driver: do not sleep on a device that cannot interrupt.
            None => true,
        }
    }

    fn disarm_rx_interrupt(&mut self) {
        if let Some(net) = self.net.as_mut() {
            net.disarm_rx_interrupt();
            net.disarm_tx_interrupt();
        }
    }

    fn flush(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if let Err(error) = net.flush() {
            self.note(error);
        }
    }

    fn housekeeping(&mut self) {
        if self.failed.is_some() || self.net.is_none() {
            if self.failed.is_none() {
                self.failed = Some(NetError::NeedsReset);
            }
            self.recover();
            return;
        }
        let Some(net) = self.net.as_mut() else {
            return;
        };
        // With a configuration interrupt, only when it fired; without one, on every pass
        // (at least every 10 ms, the housekeeping period): link changes and
        // DEVICE_NEEDS_RESET are seen either way.
        let change = if CONFIG_PENDING.swap(false, Ordering::Acquire) {
            Some(net.handle_config_change())
        } else if !self.config_interrupts {
            Some(net.poll_status())
        } else {
            None
        };
        match change {
            Some(Ok(Some(LinkChange::Up))) => {
                log::info!("virtio-net: link up");
                self.announce_pending = true;
            }
            Some(Ok(Some(LinkChange::Down))) => log::info!("virtio-net: link down"),
            Some(Ok(None)) | None => {}
            Some(Err(error)) => self.note(error),
        }
        if let Some(net) = self.net.as_ref()
            && net.announce_requested()
            && !self.announce_pending
        {
            log::info!("virtio-net: the device asks for an announcement");
            self.announce_pending = true;
        }
    }

    fn announce_pending(&self) -> bool {
        self.announce_pending && self.link_up()
    }

    fn announced(&mut self) {
        self.announce_pending = false;
        let Some(net) = self.net.as_mut() else { return };
        if let Err(error) = net.ack_announce(ANNOUNCE_ACK_TIMEOUT_US) {
            log::warn!("virtio-net: announce not acknowledged: {error}");
            self.note(error);
        }
    }

    fn link_up(&self) -> bool {
        self.net.as_ref().is_some_and(|net| net.link_up())
    }

    fn needs_attention(&self) -> bool {
        self.failed.is_some() || self.net.is_none()
    }

    fn rx_pending(&self) -> bool {
        // A failed or missing driver counts as pending so the loop keeps running housekeeping.
        self.failed.is_some() || self.net.as_ref().is_none_or(|net| net.rx_pending())
    }

    fn write_stats(&self, out: &mut dyn Write) {
        let stats = self.stats();
        let _ = write!(
            out,
            " rx_packets={} rx_bytes={} rx_dropped={} rx_foreign={} rx_merged={} rx_descriptors={} rx_csum_completed={} tx_packets={} tx_bytes={} tx_full={} tx_oversize={} tx_csum_offloaded={} kicks={} kicks_suppressed={} config_changes={} status_polls={} announce_acks={} device_resets={} link={}",
            stats.rx_packets,
            stats.rx_bytes,
            stats.rx_malformed,
            stats.rx_foreign,
            stats.rx_merged,
            stats.rx_buffers_posted,
            stats.rx_checksums_completed,
            stats.tx_packets,
            stats.tx_bytes,
            stats.tx_full,
            stats.tx_oversize,
            stats.tx_checksum_offloaded,
            stats.kicks,
            stats.kicks_suppressed,
            stats.config_changes,
            stats.status_polls,
            stats.announce_acks,
            self.resets,
            if self.link_up() { "up" } else { "down" }
        );
    }
}
