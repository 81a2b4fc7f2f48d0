//! The kernel's network loop: smoltcp over the NIC, in one of three receive modes. This is
//! the hardware-touching half of networking (clock, APIC timer, halting, interrupt counts,
//! heap figures); the services and the smoltcp device adapter it runs are the library's
//! [`vireo::net`], and the NIC it drives is [`nic::KernelNic`].
//!
//! * `irq` (NAPI style): after an interrupt the loop polls with receive interrupts disarmed
//!   until there is no work, re-arms them (the driver re-checks the ring after a full fence, so
//!   a packet that raced the re-arm is never stranded), then halts.
//! * `poll`: receive interrupts stay disarmed and the loop spins on the used ring.
//! * `adaptive`: polls while traffic arrived within the current polling window, then arms and
//!   halts like `irq`; each switch is counted. The window starts at `poll-window=` (200 µs by
//!   default) and adapts to how halts turn out ([`vireo::adaptive::PollWindow`]). When the
//!   host takes the core from the spinning loop (an oversubscribed host: a busy-polling
//!   client, other guests) or stretches the waits for packets while it spins, it halts as
//!   soon as it has no work, as `irq` does, for a hold-off that ends in a probe
//!   ([`vireo::adaptive::ContentionGuard`]; `yields`, `probes_clean`, `stalls`,
//!   `typical_gap_ns`, `spin_regime=`).
//!
//! With the NBD export (`services=nbd`) the disk is served in every mode too: while the
//! export has requests on it, the polling spin also watches the disk's used ring, and before
//! halting the loop arms the disk's request-queue interrupt with the same re-check (or does
//! not halt at all when the disk cannot interrupt, or completions are already there); the
//! service's `poll_at` keeps the loop polling while completions wait.
//!
//! The kernel is tickless: no periodic timer runs. Before it halts, the loop arms a one-shot
//! APIC timer for its nearest deadline (smoltcp's next timer, housekeeping), and re-arms only
//! when that deadline moves earlier or the timer has fired. Polling arms nothing. While it spins
//! it has interrupts enabled, so nothing stays pending (see
//! [`crate::arch::interrupts::enabled_during`]), and its busy-wait hint is
//! [`crate::arch::spin_hint`] (no PAUSE under QEMU's TCG). It also
//! counts the time the host took from it: gaps between two clock reads longer than 20 µs
//! (`stolen_ns`, `steals`).

#![deny(unsafe_code)]

pub mod nic;

use core::cell::RefCell;
use core::fmt::Write;

use smoltcp::time::Instant;
use vireo::adaptive::{ContentionGuard, HaltOutcome, PollWindow, Regime, Verdict};
use vireo::config::{Config, Mode, ServiceKind};

use vireo::net::NicControl;
use vireo::net::device::{Nic, NicDevice, SynCredits};
use vireo::net::isn::NetSecrets;
use vireo::net::service::Service;
use vireo::net::services::Services;
use vireo::net::services::nbd::{NbdConfig, NbdService};

use crate::arch::{self, clock};

/// Longest stretch the poll fast path watches the ring without running the stack.
const POLL_SLICE_NS: u64 = 1_000_000;

/// A gap between two clock reads in the spin loop longer than this is time the host took.
const STEAL_GAP_NS: u64 = 20_000;

/// Housekeeping (link status, device errors) runs at least this often.
const HOUSEKEEPING_PERIOD_NS: u64 = 10_000_000;

/// Loop counters.
#[derive(Default)]
struct LoopCounters {
    mode_switches: u64,
    halts: u64,
    timer_arms: u64,
    window_grows: u64,
    window_shrinks: u64,
    /// Time the host took from the spinning loop (gaps over `STEAL_GAP_NS`), and how often.
    stolen_ns: u64,
    steals: u64,
    /// Nanoseconds spent running the stack and flushing the rings on passes that moved
    /// packets: the guest's own work per packet, apart from waiting (`stack_busy_ns`).
    busy_ns: u64,
    /// Gratuitous ARPs sent (`announces`).
    announces: u64,
    /// The contention guard started yielding (`yields`) and cleared after a probe (`probes_clean`).
    yields: u64,
    probes_clean: u64,
    /// Waits for a packet while spinning that the guard judged stalls (`stalls`).
    stalls: u64,
    /// Where the loop's time went, by the guest's TSC: the stack on passes that moved nothing
    /// (`idle_pass_ns`), waiting in the spin loop (`spin_ns`, stolen time included), halted
    /// (`halted_ns`), and the ring flushes that may notify the device (`kick_ns`).
    idle_pass_ns: u64,
    spin_ns: u64,
    halted_ns: u64,
    kick_ns: u64,
}

/// What the network is told, and when: the gratuitous ARP owed at link-up, after a device
/// reset, on a device request and for every new address (RFC 5227 §2.3), the `ready` line
/// once the link is up with an address, and, with `ip=dhcp`, a note while no lease came.
struct LinkState {
    mac: [u8; 6],
    mode: vireo::config::Mode,
    dhcp: bool,
    ready: bool,
    /// The current address has not been announced yet.
    address_unannounced: bool,
    /// When the loop began waiting for a DHCP lease, and the next note to log.
    dhcp_waiting_since_ns: Option<u64>,
    next_dhcp_note_s: u64,
}

impl LinkState {
    fn new(mac: [u8; 6], config: &Config) -> Self {
        Self {
            mac,
            mode: config.mode,
            dhcp: config.dhcp,
            ready: false,
            address_unannounced: true,
            dhcp_waiting_since_ns: None,
            next_dhcp_note_s: 5,
        }
    }

    fn update<N: Nic + NicControl>(
        &mut self,
        nic: &RefCell<N>,
        services: &Services,
        address_changed: bool,
        now_ns: u64,
        counters: &mut LoopCounters,
    ) {
        self.address_unannounced |= address_changed;
        let Some(address) = services.address() else {
            if self.dhcp {
                let since = *self.dhcp_waiting_since_ns.get_or_insert(now_ns);
                let waited_s = (now_ns - since) / 1_000_000_000;
                if waited_s >= self.next_dhcp_note_s {
                    log::warn!("dhcp: no lease after {waited_s} s; still asking");
                    self.next_dhcp_note_s = waited_s + 10;
                }
            }
            return;
        };
        self.dhcp_waiting_since_ns = None;
        self.next_dhcp_note_s = 5;
        if !nic.borrow().link_up() {
            return;
        }
        if self.address_unannounced || nic.borrow().announce_pending() {
            let frame = vireo::announce::gratuitous_arp(self.mac, address.address().octets());
            let sent = nic
                .borrow_mut()
                .transmit(frame.len(), |buffer| buffer.copy_from_slice(&frame));
            if sent.is_some() {
                nic.borrow_mut().flush();
                counters.announces += 1;
                self.address_unannounced = false;
                nic.borrow_mut().announced();
            }
        }
        if !self.ready {
            self.ready = true;
            // The running services' words: ` udp-echo=7 tcp-echo=7 stats=7007` by default.
            let mut words = alloc::string::String::new();
            services.describe(&mut words);
            crate::println!(
                "vireo: ready ip={address} mac={} mode={}{words}{}",
                vireo::config::MacDisplay(self.mac),
                self.mode,
                if self.dhcp { " addressing=dhcp" } else { "" }
            );
        }
    }
}

/// The one-shot wake-up timer as the loop last armed it.
#[derive(Default)]
struct WakeTimer {
    /// The deadline it was armed for, while it has not fired.
    armed_for_ns: Option<u64>,
    /// The APIC tick count when it was armed: a change means it fired.
    ticks_at_arm: u64,
}

impl WakeTimer {
    /// Makes sure an interrupt arrives by `deadline_ns`: keeps the armed timer when it is still
    /// pending and due no later than that (one APIC register write saved per halt, which under
    /// QEMU is an exit that takes its global lock), else arms a new one. Returns whether it
    /// armed.
    fn ensure_by(&mut self, now_ns: u64, deadline_ns: u64) -> bool {
        let fired = arch::apic::ticks() != self.ticks_at_arm;
        if let Some(armed) = self.armed_for_ns
            && !fired
            && armed > now_ns
            && armed <= deadline_ns
        {
            return false;
        }
        self.ticks_at_arm = arch::apic::ticks();
        arch::apic::arm_oneshot_ns(deadline_ns.saturating_sub(now_ns));
        self.armed_for_ns = Some(deadline_ns);
        true
    }
}

fn now() -> Instant {
    Instant::from_micros((clock::now_ns() / 1000) as i64)
}

/// Nanoseconds until the stack's next timer (TCP retransmission, delayed ACK, idle timeout),
/// or `None` when it has none.
fn stack_timer_ns(services: &mut Services) -> Option<u64> {
    services
        .poll_delay(now())
        .map(|delay| delay.total_micros().saturating_mul(1000))
}

/// The services the library cannot build on its own: `nbd`, the export of the first
/// virtio-blk disk. Without a disk it is not started, and the console says so.
fn platform_service(kind: ServiceKind, config: &Config) -> Option<alloc::boxed::Box<dyn Service>> {
    match kind {
        ServiceKind::Nbd => {
            match crate::devices::disk::KernelDisk::first(config.inject_blk_reset_every) {
                Some(disk) => {
                    // The disk's queue shared among the connections: requests are pipelined up
                    // to its depth.
                    let mut nbd = NbdConfig::default();
                    nbd.max_in_flight = (disk.queue_depth() / nbd.connections.max(1)).max(1);
                    Some(alloc::boxed::Box::new(NbdService::new(disk, nbd)))
                }
                None => {
                    crate::println!("nbd: no virtio-blk device, not started");
                    None
                }
            }
        }
        _ => None,
    }
}

/// Serves forever; `nic_irq` counts the NIC's interrupts for the stats line; `secrets` (smoltcp's
/// seed and the TCP ISN key) come from the kernel CSPRNG.
pub fn run<N: Nic + NicControl>(
    nic: N,
    mac: [u8; 6],
    config: &Config,
    nic_irq: &'static crate::devices::IrqSlot,
    secrets: NetSecrets,
) -> ! {
    let nic = RefCell::new(nic);
    let held = RefCell::new(None);
    let mut services = {
        let mut device = NicDevice::new(&nic, &held, SynCredits::new());
        let chosen =
            vireo::net::services::build_all(config.services, |kind| platform_service(kind, config));
        Services::with_services(&mut device, mac, config, now(), secrets, chosen)
    };
    let mut link = LinkState::new(mac, config);
    if !nic.borrow().link_up() {
        log::info!("net: link down; `ready` follows when it comes up");
    }
    if config.dhcp {
        log::info!("dhcp: asking for an address (DHCPDISCOVER every 2 s until a server answers)");
    }

    let mut counters = LoopCounters::default();
    let mut wake_timer = WakeTimer::default();
    let mut window = PollWindow::new(u64::from(config.poll_window_us) * 1000);
    let mut guard = ContentionGuard::new();
    let mut last_activity_ns = clock::now_ns();
    let mut polling = config.mode != Mode::Irq;
    let mut last_housekeeping_ns = 0;
    nic.borrow_mut().disarm_rx_interrupt();
    loop {
        let now_ns = clock::now_ns();
        let regime_now = guard.regime(now_ns);
        let activity = {
            let mut device = NicDevice::new(&nic, &held, services.syn_credits());
            let mut write_stats = |out: &mut dyn Write| {
                nic.borrow().write_stats(out);
                crate::devices::write_stats(out);
                let (heap_used, _) = crate::mem::heap_usage();
                let _ = write!(
                    out,
                    " announces={} interrupts={} spurious_interrupts={} mode={} mode_switches={} poll_window_us={} window_grows={} window_shrinks={} spin_regime={} yields={} probes_clean={} stalls={} typical_gap_ns={} stolen_ns={} steals={} halts={} timer_arms={} timer_interrupts={} stack_busy_ns={} idle_pass_ns={} kick_ns={} spin_ns={} halted_ns={} heap_used={} heap_peak={} uptime_ms={}",
                    counters.announces,
                    nic_irq.interrupts(),
                    arch::interrupts::unexpected_interrupt_count(),
                    config.mode,
                    counters.mode_switches,
                    window.current_ns() / 1000,
                    counters.window_grows,
                    counters.window_shrinks,
                    match regime_now {
                        Regime::Spinning => "spinning",
                        Regime::Yielding { .. } => "halting",
                    },
                    counters.yields,
                    counters.probes_clean,
                    counters.stalls,
                    guard.typical_gap_ns(),
                    counters.stolen_ns,
                    counters.steals,
                    counters.halts,
                    counters.timer_arms,
                    arch::apic::ticks(),
                    counters.busy_ns,
                    counters.idle_pass_ns,
                    counters.kick_ns + nic.borrow().publish_ns(),
                    counters.spin_ns,
                    counters.halted_ns,
                    heap_used,
                    crate::mem::heap_peak(),
                    now_ns / 1_000_000
                );
            };
            services.poll(&mut device, now(), &mut write_stats)
        };
        let flush_at = clock::now_ns();
        nic.borrow_mut().flush();
        let flushed_at = clock::now_ns();
        counters.kick_ns += flushed_at - flush_at;
        if activity {
            counters.busy_ns += flushed_at.saturating_sub(now_ns);
        } else {
            counters.idle_pass_ns += flushed_at.saturating_sub(now_ns);
        }
        let address_changed = services.take_address_change();
        if now_ns - last_housekeeping_ns > HOUSEKEEPING_PERIOD_NS || nic.borrow().needs_attention()
        {
            nic.borrow_mut().housekeeping();
            crate::devices::housekeeping();
            last_housekeeping_ns = now_ns;
            link.update(&nic, &services, address_changed, now_ns, &mut counters);
        } else if address_changed {
            link.update(&nic, &services, true, now_ns, &mut counters);
        }
        if activity {
            last_activity_ns = now_ns;
            continue;
        }
        // Adaptive's polling window at this pass: the window itself, or nothing while the
        // guard yields (the regime was settled for `now_ns` at the top of the pass).
        let adaptive_window_ns = guard.window_ns(now_ns, window.current_ns());
        let keep_polling = match config.mode {
            Mode::Poll => true,
            Mode::Irq => false,
            Mode::Adaptive => now_ns - last_activity_ns < adaptive_window_ns,
        };
        if keep_polling {
            if !polling {
                polling = true;
                counters.mode_switches += 1;
            }
            // The fast path: watch only the used ring (one volatile load) until a frame
            // arrives or smoltcp's next timer is due, instead of running the whole stack
            // per spin. Bounded by a millisecond so housekeeping still runs.
            let timer_ns = stack_timer_ns(&mut services).unwrap_or(POLL_SLICE_NS);
            let mut deadline = now_ns + timer_ns.min(POLL_SLICE_NS);
            if config.mode == Mode::Adaptive {
                // Adaptive stops spinning when its window closes (at once while the guard yields).
                deadline = deadline.min(last_activity_ns + adaptive_window_ns);
            }
            let spin_from = clock::now_ns();
            let (stolen_ns, steals) = arch::interrupts::enabled_during(|| {
                let mut stolen = (0u64, 0u64);
                let mut last = spin_from;
                while !nic.borrow().rx_pending() && !crate::devices::blk_completions_waiting() {
                    let at = clock::now_ns();
                    if at >= deadline {
                        break;
                    }
                    // A gap this long between two reads of the clock in a loop of a few
                    // hundred instructions means the host ran something else on our CPU.
                    if at - last > STEAL_GAP_NS {
                        stolen.0 += at - last;
                        stolen.1 += 1;
                    }
                    last = at;
                    arch::spin_hint();
                }
                stolen
            });
            let spun_until = clock::now_ns();
            counters.spin_ns += spun_until - spin_from;
            counters.stolen_ns += stolen_ns;
            counters.steals += steals;
            if config.mode == Mode::Adaptive {
                // A packet ended the spell: how long it made the loop wait since its last work.
                if nic.borrow().rx_pending()
                    && guard.observe_gap(spun_until - last_activity_ns, true)
                {
                    counters.stalls += 1;
                }
                match guard.after_spin(spun_until, spun_until - spin_from, stolen_ns) {
                    Verdict::StartedYielding => counters.yields += 1,
                    Verdict::Cleared => counters.probes_clean += 1,
                    Verdict::Unchanged => {}
                }
            }
            continue;
        }
        if polling {
            polling = false;
            counters.mode_switches += 1;
        }
        // Arm, and halt only if nothing raced in. The one-shot timer bounds the sleep by the
        // nearest deadline: smoltcp's next timer or the next housekeeping.
        let housekeeping_ns =
            (last_housekeeping_ns + HOUSEKEEPING_PERIOD_NS).saturating_sub(clock::now_ns());
        let sleep_ns =
            stack_timer_ns(&mut services).map_or(housekeeping_ns, |ns| ns.min(housekeeping_ns));
        if sleep_ns == 0 {
            continue;
        }
        // The disks first: a disk the block export waits on must be able to wake the halt
        // (its interrupt armed, with the re-check), or the loop must not halt at all.
        if crate::devices::arm_blk_interrupts() {
            crate::devices::disarm_blk_interrupts();
            continue;
        }
        if nic.borrow_mut().arm_rx_interrupt() {
            nic.borrow_mut().disarm_rx_interrupt();
            crate::devices::disarm_blk_interrupts();
            continue;
        }
        let halt_at_ns = clock::now_ns();
        if wake_timer.ensure_by(halt_at_ns, halt_at_ns + sleep_ns) {
            counters.timer_arms += 1;
        }
        counters.halts += 1;
        let spinning_allowed = guard.regime(halt_at_ns) == Regime::Spinning;
        arch::idle_until_interrupt();
        nic.borrow_mut().disarm_rx_interrupt();
        crate::devices::disarm_blk_interrupts();
        let woke_ns = clock::now_ns();
        let halted_ns = woke_ns.saturating_sub(halt_at_ns);
        counters.halted_ns += halted_ns;
        let packet_waiting = nic.borrow().rx_pending();
        // A packet that woke the loop tells the pace of traffic too, unless the traffic had
        // stopped (a wait longer than the largest window).
        let gap_ns = woke_ns - last_activity_ns;
        if config.mode == Mode::Adaptive && packet_waiting && gap_ns <= window.max_ns() {
            guard.observe_gap(gap_ns, false);
        }
        // While the guard yields, an early packet says nothing about the window: halting was
        // chosen because spinning loses on this host.
        if config.mode == Mode::Adaptive && spinning_allowed {
            match window.after_halt(halted_ns, packet_waiting) {
                HaltOutcome::Grew => counters.window_grows += 1,
                HaltOutcome::Shrank => counters.window_shrinks += 1,
                HaltOutcome::Kept => {}
            }
        }
    }
}
