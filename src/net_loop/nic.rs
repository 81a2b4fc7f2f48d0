//! The kernel's NIC as the network loop sees it: [`KernelNic`] wraps the virtio-net driver
//! (`crate::devices::KernelNet`) with error latching, device reset and re-initialisation, fault
//! injection and counters kept across resets, and implements the loop's two traits: packets
//! ([`vireo::net::device::Nic`]) and control ([`vireo::net::NicControl`]: interrupts, housekeeping,
//! announcements, the driver's stats keys). Discovery, bring-up and the interrupt handlers stay
//! in `src/devices.rs`.

use core::fmt::Write;

use virtio::net::{LinkChange, NetError, NetStats, RxFrame};

use crate::arch::clock;
use crate::devices::{IrqSlot, KernelNet, Reinit};
use crate::hal::KernelHal;
use vireo::net;

/// How long the loop waits for the device to take an VIRTIO_NET_CTRL_ANNOUNCE_ACK.
const ANNOUNCE_ACK_TIMEOUT_US: u32 = 100_000;

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
    /// What the NIC's interrupts leave (the configuration-change flag).
    irq: &'static IrqSlot,
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
    /// Nanoseconds in the driver's receive and recycle (`rx_ns`: empty polls included) and in
    /// its transmit (`tx_ns`: smoltcp filling the buffer included), by the guest's TSC.
    rx_ns: u64,
    tx_ns: u64,
    /// Nanoseconds in [`net::device::Nic::publish`] (flushes in the middle of a stack poll).
    publish_ns: u64,
}

impl KernelNic {
    /// Wraps the driver, with the recipe to rebuild it. `irq` is the NIC's interrupt record;
    /// `config_interrupts`: whether its path delivers configuration changes (all but
    /// [`crate::devices::InterruptPath::Polling`]).
    pub fn new(
        net: KernelNet,
        reinit: Reinit,
        inject_reset_every: Option<u32>,
        irq: &'static IrqSlot,
        config_interrupts: bool,
    ) -> Self {
        Self {
            irq,
            announce_pending: net.link_up(),
            config_interrupts,
            net: Some(net),
            failed: None,
            reinit,
            resets: 0,
            retired_stats: NetStats::default(),
            inject_reset_every,
            received_since_reset: 0,
            rx_ns: 0,
            tx_ns: 0,
            publish_ns: 0,
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
        let began = clock::now_ns();
        let received = self.receive_untimed();
        self.rx_ns += clock::now_ns() - began;
        received
    }

    fn frame(rx: &Self::Rx) -> &[u8] {
        rx.bytes()
    }

    fn frame_mut(rx: &mut Self::Rx) -> &mut [u8] {
        rx.bytes_mut()
    }

    fn rx_checksums_verified(&self) -> bool {
        self.net
            .as_ref()
            .is_some_and(|net| net.rx_checksums() == virtio::net::RxChecksums::VerifyUnvouched)
    }

    fn recycle(&mut self, rx: Self::Rx) {
        let began = clock::now_ns();
        // A frame from a retired driver is simply dropped: its buffers belonged to the old
        // queues, which are gone; the new driver posted fresh ones.
        if let Some(net) = self.net.as_mut()
            && let Err(error) = net.recycle(rx)
        {
            self.note(error);
        }
        self.rx_ns += clock::now_ns() - began;
    }

    fn can_transmit(&mut self) -> bool {
        self.net.as_mut().is_some_and(|net| net.can_transmit())
    }

    fn transmit<R>(&mut self, length: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let began = clock::now_ns();
        let sent = match self.net.as_mut()?.transmit(length, fill) {
            Ok(result) => result,
            Err(error) => {
                self.note(error);
                None
            }
        };
        self.tx_ns += clock::now_ns() - began;
        sent
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

    fn max_segmented_frame(&self) -> Option<usize> {
        self.net.as_ref()?.max_segmented_frame()
    }

    fn publish(&mut self) {
        let began = clock::now_ns();
        net::NicControl::flush(self);
        self.publish_ns += clock::now_ns() - began;
    }
}

impl KernelNic {
    /// The driver's receive with fault injection and error latching, untimed.
    fn receive_untimed(&mut self) -> Option<RxFrame<KernelHal>> {
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

    fn publish_ns(&self) -> u64 {
        self.publish_ns
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
        let change = if self.irq.take_config_pending() {
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
            " rx_packets={} rx_bytes={} rx_dropped={} rx_foreign={} rx_merged={} rx_descriptors={} rx_csum_completed={} rx_csum_vouched={} rx_csum_verified={} rx_csum_bad={} tx_packets={} tx_bytes={} tx_full={} tx_oversize={} tx_csum_offloaded={} tx_tso={} kicks={} kicks_suppressed={} rx_ns={} tx_ns={} config_changes={} status_polls={} announce_acks={} device_resets={} link={}",
            stats.rx_packets,
            stats.rx_bytes,
            stats.rx_malformed,
            stats.rx_foreign,
            stats.rx_merged,
            stats.rx_buffers_posted,
            stats.rx_checksums_completed,
            stats.rx_checksums_vouched,
            stats.rx_checksums_verified,
            stats.rx_checksum_bad,
            stats.tx_packets,
            stats.tx_bytes,
            stats.tx_full,
            stats.tx_oversize,
            stats.tx_checksum_offloaded,
            stats.tx_segmented,
            stats.kicks,
            stats.kicks_suppressed,
            self.rx_ns,
            self.tx_ns,
            stats.config_changes,
            stats.status_polls,
            stats.announce_acks,
            self.resets,
            if self.link_up() { "up" } else { "down" }
        );
    }
}
