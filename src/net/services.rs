//! The service host: the smoltcp interface on the configured address, its socket set, the
//! DHCPv4 client, the RFC 6528 sequence-number translation, and the services it runs, each a
//! [`Service`] (`src/net/service.rs`): echo on port 7 ([`echo`]), the stats line on UDP port
//! 7007 ([`stats`]), discard on UDP port 9 ([`discard`]), chosen by `services=` on the command
//! line (default `echo,stats`). ICMP echo is answered by smoltcp's interface itself. The NBD
//! server over any block device ([`nbd`], TCP port 10809) is `services=nbd`: the kernel builds
//! it over its first virtio-blk disk ([`build_all`]).
//!
//! The address is the command line's, or with `ip=dhcp` leased by smoltcp's DHCPv4 client
//! (RFC 2131), which retries discovery on its own timers, renews at T1 and rebinds at T2; each
//! lease and each loss is logged and counted, and the loop announces the new address.
//!
//! Nothing here allocates per packet: the socket set is sized once for every socket the
//! services may hold, and the services allocate their buffers when they bind.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::config::{Config, ServiceKind, ServiceSet};
use crate::net::device::{Nic, NicDevice, SynCredits};
use crate::net::isn::{IsnDevice, IsnTranslation, NetSecrets};
use crate::net::service::{HostCounters, Service, ServiceContext};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

pub mod discard;
pub mod echo;
pub mod nbd;
pub mod stats;

pub use echo::{ECHO_PORT, TCP_CONNECTIONS, TCP_LISTENERS};
pub use stats::STATS_PORT;

/// Egress passes at most after the services ran (each sends up to one segment per socket).
const EGRESS_PASSES: usize = 64;

/// How long the DHCP client waits for an offer before it asks again.
const DHCP_DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// A UDP socket with room for `packets` datagrams of `bytes` bytes in all, each way.
pub fn udp_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]);
    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]);
    udp::Socket::new(rx, tx)
}

/// The service of that name, not yet bound; `None` for a service that needs something only
/// the kernel has ([`ServiceKind::Nbd`] needs the disk: see [`build_all`]).
pub fn build(kind: ServiceKind) -> Option<Box<dyn Service>> {
    match kind {
        ServiceKind::Echo => Some(Box::new(echo::EchoService::new())),
        ServiceKind::Stats => Some(Box::new(stats::StatsService::new())),
        ServiceKind::Discard => Some(Box::new(discard::DiscardService::default())),
        ServiceKind::Nbd => None,
    }
}

/// The services of `services`, in the order they run: those [`build`] makes, and the others
/// from `platform` (the kernel builds the NBD export over its disk there), which may decline
/// one (`None`: it is not started, and `platform` says why).
pub fn build_all(
    services: ServiceSet,
    mut platform: impl FnMut(ServiceKind) -> Option<Box<dyn Service>>,
) -> Vec<Box<dyn Service>> {
    services
        .iter()
        .filter_map(|kind| build(kind).or_else(|| platform(kind)))
        .collect()
}

/// The interface, the sockets, the DHCP client and the services.
pub struct Services {
    iface: Interface,
    sockets: SocketSet<'static>,
    /// The services, in the order they run and report.
    services: Vec<Box<dyn Service>>,
    /// The host's own counters (DHCP).
    host_counters: HostCounters,
    /// The DHCP client, with `ip=dhcp`.
    dhcp: Option<smoltcp::iface::SocketHandle>,
    /// The interface address in use, once there is one.
    address: Option<smoltcp::wire::Ipv4Cidr>,
    /// Set when the address changed (leased, renewed with another address, or lost).
    address_changed: bool,
    /// The RFC 6528 sequence-number translation applied between the stack and the device.
    isn: IsnTranslation,
}

impl Services {
    /// Builds the interface for `mac` with the command line's address and gateway, and binds
    /// the services `services=` chose that the library builds on its own ([`build`]; the
    /// kernel uses [`Services::with_services`] with [`build_all`] for the others). `secrets` (drawn from the CSPRNG, [`NetSecrets::draw`])
    /// seed smoltcp's generator and key the TCP sequence-number translation of
    /// [`crate::net::isn`].
    pub fn new<D: Device>(
        device: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        secrets: NetSecrets,
    ) -> Self {
        let services = build_all(config.services, |_| None);
        Self::with_services(device, mac, config, now, secrets, services)
    }

    /// Like [`Services::new`], with the given services (run and reported in this order)
    /// instead of those of `config.services`.
    pub fn with_services<D: Device>(
        device: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        secrets: NetSecrets,
        mut services: Vec<Box<dyn Service>>,
    ) -> Self {
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        iface_config.random_seed = secrets.stack_seed;
        let mut iface = Interface::new(iface_config, device, now);
        let address = (!config.dhcp).then_some(config.ip);
        if let Some(address) = address {
            iface.update_ip_addrs(|addresses| {
                // One address: the capacity (IFACE_MAX_ADDR_COUNT >= 1) cannot be exceeded.
                let _ = addresses.push(IpCidr::Ipv4(address));
            });
        }
        if let Some(gateway) = config.gateway {
            // Fails only if the gateway is not on-link, which the config parser ruled out.
            if iface.routes_mut().add_default_ipv4_route(gateway).is_err() {
                log::warn!("net: default route via {gateway} rejected");
            }
        }

        // Sized once for the most sockets there can be, so that the services' pools growing
        // and shrinking never reallocate (and heap use returns exactly to its level after a
        // churn).
        let capacity = 1 + services
            .iter()
            .map(|service| service.max_sockets())
            .sum::<usize>();
        let mut sockets = SocketSet::new(Vec::with_capacity(capacity));
        for service in &mut services {
            service.bind(&mut sockets);
        }
        let dhcp = config.dhcp.then(|| {
            let mut client = dhcpv4::Socket::new();
            let mut retry = client.get_retry_config();
            retry.discover_timeout = DHCP_DISCOVER_TIMEOUT;
            client.set_retry_config(retry);
            client.set_max_lease_duration(
                config
                    .dhcp_max_lease_s
                    .map(|seconds| Duration::from_secs(u64::from(seconds))),
            );
            sockets.add(client)
        });
        Self {
            iface,
            sockets,
            services,
            host_counters: HostCounters::default(),
            dhcp,
            address,
            address_changed: address.is_some(),
            isn: IsnTranslation::new(secrets.isn_key),
        }
    }

    /// The interface address, once there is one (always with a static `ip=`).
    pub fn address(&self) -> Option<smoltcp::wire::Ipv4Cidr> {
        self.address
    }

    /// Whether the address changed since the last call (the loop then announces it).
    pub fn take_address_change(&mut self) -> bool {
        core::mem::take(&mut self.address_changed)
    }

    /// The services, in the order they run.
    pub fn services(&self) -> &[Box<dyn Service>] {
        &self.services
    }

    /// Appends the running services' words of the `ready` line (` udp-echo=7 tcp-echo=7
    /// stats=7007` by default).
    pub fn describe(&self, out: &mut dyn Write) {
        for service in &self.services {
            service.describe(out);
        }
    }

    /// Appends every service's counters, then the host's (` dhcp_leases=N dhcp_lost=N`): the
    /// stats line without the driver's and the platform's part, each pair with a leading
    /// space.
    pub fn write_stats(&self, out: &mut dyn Write) {
        for service in &self.services {
            service.write_stats(out);
        }
        self.host_counters.write_stats(out);
    }

    /// Applies the DHCP client's news: a lease (address, prefix, router) or its loss.
    fn serve_dhcp(&mut self) -> bool {
        let Some(handle) = self.dhcp else {
            return false;
        };
        match self.sockets.get_mut::<dhcpv4::Socket>(handle).poll() {
            None => false,
            Some(dhcpv4::Event::Configured(lease)) => {
                let address = lease.address;
                let router = lease.router;
                let server = lease.server.address;
                self.iface.update_ip_addrs(|addresses| {
                    addresses.clear();
                    let _ = addresses.push(IpCidr::Ipv4(address));
                });
                match router {
                    Some(router) => {
                        if self
                            .iface
                            .routes_mut()
                            .add_default_ipv4_route(router)
                            .is_err()
                        {
                            log::warn!("dhcp: default route via {router} rejected");
                        }
                    }
                    None => {
                        self.iface.routes_mut().remove_default_ipv4_route();
                    }
                }
                log::info!(
                    "dhcp: leased {address} from server {server}, router {}",
                    router.map_or(
                        alloc::string::String::from("none"),
                        |router| alloc::format!("{router}")
                    )
                );
                self.host_counters.dhcp_leases += 1;
                self.address = Some(address);
                self.address_changed = true;
                true
            }
            Some(dhcpv4::Event::Deconfigured) => {
                if let Some(address) = self.address.take() {
                    log::warn!("dhcp: lease on {address} lost; asking again");
                    self.host_counters.dhcp_lost += 1;
                    self.address_changed = true;
                }
                self.iface.update_ip_addrs(|addresses| addresses.clear());
                self.iface.routes_mut().remove_default_ipv4_route();
                true
            }
        }
    }

    /// Runs the stack once: ingress and egress through `device`, then every service.
    /// `write_stats` appends the platform's and driver's counters to a stats reply.
    /// Returns whether anything happened (packets in or out, socket state changed).
    ///
    /// Every TCP segment between the stack and `device` goes through the RFC 6528
    /// sequence-number translation ([`crate::net::isn`]).
    pub fn poll<N: Nic>(
        &mut self,
        device: &mut NicDevice<'_, N>,
        now: Instant,
        write_stats: &mut dyn FnMut(&mut dyn Write),
    ) -> bool {
        let mut device = IsnDevice::new(device, self.isn);
        let device = &mut device;
        let mut activity =
            self.iface.poll(now, device, &mut self.sockets) != smoltcp::iface::PollResult::None;
        activity |= self.serve_dhcp();
        for index in 0..self.services.len() {
            let (before, rest) = self.services.split_at_mut(index);
            let Some((service, after)) = rest.split_first_mut() else {
                break;
            };
            let mut context = ServiceContext {
                sockets: &mut self.sockets,
                now,
                before,
                after,
                host: self.host_counters,
                platform: write_stats,
            };
            activity |= service.poll(&mut context);
        }
        if activity {
            // Send what the services queued without waiting for the next loop iteration.
            // smoltcp sends at most one segment per socket per egress pass, so pass again
            // while something goes out (bounded, like the receive budget): a burst echoed in
            // this poll leaves in this poll instead of one segment per loop iteration.
            // The first pass's frames are handed to the device at once: it starts sending
            // while the later passes build the rest of the burst. Without that, the whole
            // burst waited for the loop's flush and the echo rate with 64 datagrams in flight
            // fell to 0.81 to 0.88 of the kernel before the repeated passes; publishing after
            // the first pass measured 1.27 times that (poll and adaptive, one run each), and
            // after every pass cost TCP echo up to a quarter (one doorbell per segment).
            for pass in 0..EGRESS_PASSES {
                if self.iface.poll_egress(now, device, &mut self.sockets)
                    == smoltcp::iface::PollResult::None
                {
                    break;
                }
                if pass == 0 {
                    device.publish();
                }
            }
        }
        activity
    }

    /// How many connection attempts (SYNs) to each gated TCP port the next poll may take:
    /// every service's [`Service::syn_credits`] for each of its [`Service::tcp_ports`], for
    /// [`crate::net::device::NicDevice`].
    pub fn syn_credits(&self) -> SynCredits {
        let mut credits = SynCredits::new();
        for service in &self.services {
            for &port in service.tcp_ports() {
                credits.set(port, service.syn_credits(&self.sockets, port));
            }
        }
        credits
    }

    /// How long the stack may sleep before it needs polling, if at all: the nearest of the
    /// TCP stack's timers and the services' own deadlines ([`Service::poll_at`]).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let stack = self.iface.poll_delay(now, &self.sockets);
        self.services
            .iter()
            .filter_map(|service| service.poll_at(now))
            .map(|at| if at > now { at - now } else { Duration::ZERO })
            .chain(stack)
            .min()
    }
}
