//! The network services on the configured address, over smoltcp: UDP echo on port 7, TCP echo
//! on port 7 (a pool of listening sockets, so many concurrent connections), ICMP echo (answered
//! by smoltcp's interface itself), and the read-only stats service on UDP port 7007.
//!
//! The address is the command line's, or with `ip=dhcp` leased by smoltcp's DHCPv4 client
//! (RFC 2131), which retries discovery on its own timers, renews at T1 and rebinds at T2; each
//! lease and each loss is logged and counted, and the loop announces the new address.
//!
//! Nothing here allocates per packet: the socket buffers are allocated once at start-up, and
//! echo moves bytes between a socket's receive and send buffers through one scratch buffer.
//!
//! TCP sockets are a pool that grows on demand: a few listening sockets wait for connections
//! (`TCP_LISTENERS`); when one is taken, another is added, up to `TCP_CONNECTIONS` in all; closed
//! sockets beyond the listeners are removed, so their buffers go back to the heap. smoltcp walks
//! every socket on every poll, so an idle pool of 72 sockets would cost on every packet.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::config::Config;
use crate::net::isn::{IsnDevice, IsnTranslation, NetSecrets};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

/// The echo port (RFC 862).
pub const ECHO_PORT: u16 = 7;
/// The stats port.
pub const STATS_PORT: u16 = 7007;
/// TCP echo sockets at most: the number of connections served at once (plus listeners).
pub const TCP_CONNECTIONS: usize = 72;
/// Listening TCP sockets kept ready.
pub const TCP_LISTENERS: usize = 4;
/// An established connection that stays silent this long is reset (it also bounds how long a
/// half-open connection from a SYN flood holds a socket).
const TCP_IDLE_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// A connection still half open (SYN-RECEIVED) after this long is reset, freeing its socket:
/// the SYN-flood defence (a real handshake completes within a round trip).
const SYN_RECEIVED_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1000);
/// When the pool is full, half-open connections older than this are reset at once so that a
/// flood cannot lock legitimate clients out.
const SYN_RECEIVED_TIMEOUT_WHEN_FULL: smoltcp::time::Duration =
    smoltcp::time::Duration::from_millis(20);
/// The largest datagram echoed (a jumbo frame's payload).
const SCRATCH_BYTES: usize = 9216;
const TCP_BUFFER: usize = 16 * 1024;
const UDP_PACKETS: usize = 128;
const UDP_BUFFER: usize = 256 * 1024;

/// Counters kept by the services.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceCounters {
    /// UDP datagrams echoed.
    pub udp_echoed: u64,
    /// UDP datagrams that could not be echoed (send buffer full).
    pub udp_echo_dropped: u64,
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// TCP bytes echoed.
    pub tcp_bytes_echoed: u64,
    /// Stats requests answered.
    pub stats_requests: u64,
    /// TCP connections reset by the echo service.
    pub tcp_aborted: u64,
    /// Half-open connections (SYN-RECEIVED too long) reset: the SYN-flood defence.
    pub tcp_half_open_reset: u64,
    /// DHCP leases obtained or changed (`ip=dhcp`).
    pub dhcp_leases: u64,
    /// DHCP leases lost (expired without renewal, or the server refused it).
    pub dhcp_lost: u64,
}

/// How long the DHCP client waits for an offer before it asks again.
const DHCP_DISCOVER_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(2);

/// The interface, the sockets and their counters.
pub struct Services {
    iface: Interface,
    sockets: SocketSet<'static>,
    udp_echo: SocketHandle,
    stats: SocketHandle,
    /// The TCP socket pool.
    tcp: Vec<TcpSlot>,
    /// Counters.
    pub counters: ServiceCounters,
    stats_line: alloc::string::String,
    scratch: Vec<u8>,
    /// The DHCP client, with `ip=dhcp`.
    dhcp: Option<SocketHandle>,
    /// The interface address in use, once there is one.
    address: Option<smoltcp::wire::Ipv4Cidr>,
    /// Set when the address changed (leased, renewed with another address, or lost).
    address_changed: bool,
    /// The RFC 6528 sequence-number translation applied between the stack and the device.
    isn: IsnTranslation,
    /// Where received TCP segments are translated (sized to the device's largest frame).
    rx_scratch: Vec<u8>,
}

/// One socket of the TCP pool.
struct TcpSlot {
    handle: SocketHandle,
    /// Active (not listening, not closed) at the last poll.
    active: bool,
    /// When it was first seen half open (SYN-RECEIVED).
    syn_received_at: Option<Instant>,
}

impl TcpSlot {
    fn new(handle: SocketHandle) -> Self {
        Self {
            handle,
            active: false,
            syn_received_at: None,
        }
    }
}

fn tcp_listener() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    socket.set_timeout(Some(TCP_IDLE_TIMEOUT));
    // Listening on a fresh socket with a non-zero port cannot fail.
    let _ = socket.listen(ECHO_PORT);
    socket
}

fn udp_socket() -> udp::Socket<'static> {
    let rx = udp::PacketBuffer::new(
        vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
        vec![0; UDP_BUFFER],
    );
    let tx = udp::PacketBuffer::new(
        vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
        vec![0; UDP_BUFFER],
    );
    udp::Socket::new(rx, tx)
}

impl Services {
    /// Builds the interface for `mac` with the command line's address and gateway, and binds
    /// every service. `secrets` (drawn from the CSPRNG, [`NetSecrets::draw`]) seed smoltcp's
    /// generator and key the TCP sequence-number translation of [`crate::net::isn`].
    pub fn new<D: Device>(
        device: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        secrets: NetSecrets,
    ) -> Self {
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        iface_config.random_seed = secrets.stack_seed;
        let rx_scratch = vec![
            0;
            device
                .capabilities()
                .max_transmission_unit
                .max(SCRATCH_BYTES)
        ];
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

        // Sized once for the most sockets there can be, so that the pool growing and shrinking
        // never reallocates (and heap use returns exactly to its level after a churn).
        let mut sockets = SocketSet::new(Vec::with_capacity(3 + TCP_CONNECTIONS + TCP_LISTENERS));
        let mut echo = udp_socket();
        let mut stats = udp_socket();
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = echo.bind(ECHO_PORT);
        let _ = stats.bind(STATS_PORT);
        let udp_echo = sockets.add(echo);
        let stats = sockets.add(stats);
        let mut tcp = Vec::with_capacity(TCP_CONNECTIONS + TCP_LISTENERS);
        tcp.extend((0..TCP_LISTENERS).map(|_| TcpSlot::new(sockets.add(tcp_listener()))));
        let dhcp = config.dhcp.then(|| {
            let mut client = dhcpv4::Socket::new();
            let mut retry = client.get_retry_config();
            retry.discover_timeout = DHCP_DISCOVER_TIMEOUT;
            client.set_retry_config(retry);
            client.set_max_lease_duration(
                config
                    .dhcp_max_lease_s
                    .map(|seconds| smoltcp::time::Duration::from_secs(u64::from(seconds))),
            );
            sockets.add(client)
        });
        Self {
            iface,
            sockets,
            udp_echo,
            stats,
            tcp,
            counters: ServiceCounters::default(),
            stats_line: alloc::string::String::with_capacity(1024),
            scratch: vec![0; SCRATCH_BYTES],
            dhcp,
            address,
            address_changed: address.is_some(),
            isn: IsnTranslation::new(secrets.isn_key),
            rx_scratch,
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
                self.counters.dhcp_leases += 1;
                self.address = Some(address);
                self.address_changed = true;
                true
            }
            Some(dhcpv4::Event::Deconfigured) => {
                if let Some(address) = self.address.take() {
                    log::warn!("dhcp: lease on {address} lost; asking again");
                    self.counters.dhcp_lost += 1;
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
    pub fn poll<D: Device>(
        &mut self,
        device: &mut D,
        now: Instant,
        write_stats: &mut dyn FnMut(&mut dyn Write),
    ) -> bool {
        let largest = device.capabilities().max_transmission_unit;
        if self.rx_scratch.len() < largest {
            // Only when the device's MTU grew (a device reset); never per packet.
            self.rx_scratch.resize(largest, 0);
        }
        // Taken out for the poll (no allocation: a moved Vec), so the services below can
        // borrow `self` while the wrapped device holds the scratch.
        let mut scratch = core::mem::take(&mut self.rx_scratch);
        let mut device = IsnDevice::new(device, self.isn, &mut scratch);
        let device = &mut device;
        let mut activity =
            self.iface.poll(now, device, &mut self.sockets) != smoltcp::iface::PollResult::None;
        activity |= self.serve_dhcp();
        activity |= self.serve_udp_echo();
        activity |= self.serve_stats(write_stats);
        activity |= self.serve_tcp(now);
        if activity {
            // Send what the services queued without waiting for the next loop iteration.
            self.iface.poll(now, device, &mut self.sockets);
        }
        self.rx_scratch = scratch;
        activity
    }

    /// How many connection attempts (SYNs to the echo port) the next poll may take: the free
    /// listening sockets, or unlimited when the pool is full (smoltcp then refuses them with a
    /// reset, which is the right answer).
    pub fn syn_credits(&self) -> usize {
        if self.tcp.len() >= TCP_CONNECTIONS + TCP_LISTENERS {
            return usize::MAX;
        }
        self.tcp
            .iter()
            .filter(|slot| self.sockets.get::<tcp::Socket>(slot.handle).is_listening())
            .count()
    }

    /// How long the stack may sleep before it needs polling (TCP timers), if at all.
    pub fn poll_delay(&mut self, now: Instant) -> Option<smoltcp::time::Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    fn serve_udp_echo(&mut self) -> bool {
        let socket = self.sockets.get_mut::<udp::Socket>(self.udp_echo);
        let mut activity = false;
        while socket.can_recv() {
            let Ok((length, metadata)) = socket.recv_slice(&mut self.scratch) else {
                break;
            };
            activity = true;
            match socket.send_slice(&self.scratch[..length], metadata.endpoint) {
                Ok(()) => self.counters.udp_echoed += 1,
                Err(_) => self.counters.udp_echo_dropped += 1,
            }
        }
        activity
    }

    fn serve_stats(&mut self, write_stats: &mut dyn FnMut(&mut dyn Write)) -> bool {
        let socket = self.sockets.get_mut::<udp::Socket>(self.stats);
        let mut activity = false;
        while socket.can_recv() {
            let Ok((_, metadata)) = socket.recv() else {
                break;
            };
            activity = true;
            self.counters.stats_requests += 1;
            let line = &mut self.stats_line;
            line.clear();
            let counters = self.counters;
            let connected = self.tcp.iter().filter(|slot| slot.active).count();
            let _ = write!(
                line,
                "udp_echoed={} udp_echo_dropped={} tcp_accepted={} tcp_connected={} tcp_aborted={} tcp_half_open_reset={} tcp_bytes_echoed={} stats_requests={} dhcp_leases={} dhcp_lost={}",
                counters.udp_echoed,
                counters.udp_echo_dropped,
                counters.tcp_accepted,
                connected,
                counters.tcp_aborted,
                counters.tcp_half_open_reset,
                counters.tcp_bytes_echoed,
                counters.stats_requests,
                counters.dhcp_leases,
                counters.dhcp_lost
            );
            write_stats(line);
            line.push('\n');
            let _ = socket.send_slice(line.as_bytes(), metadata.endpoint);
        }
        activity
    }

    fn serve_tcp(&mut self, now: Instant) -> bool {
        let mut activity = false;
        let mut listeners = 0;
        let mut closed_spares = Vec::new();
        let pool_full = self.tcp.len() >= TCP_CONNECTIONS + TCP_LISTENERS;
        let half_open_limit = if pool_full {
            SYN_RECEIVED_TIMEOUT_WHEN_FULL
        } else {
            SYN_RECEIVED_TIMEOUT
        };
        for (index, slot) in self.tcp.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if socket.state() == tcp::State::SynReceived {
                let since = *slot.syn_received_at.get_or_insert(now);
                if now - since > half_open_limit {
                    socket.abort();
                    self.counters.tcp_half_open_reset += 1;
                    activity = true;
                }
            } else {
                slot.syn_received_at = None;
            }
            let active = socket.is_active();
            if active && !slot.active {
                self.counters.tcp_accepted += 1;
            }
            slot.active = active;
            while socket.can_recv() && socket.can_send() {
                let free = socket.send_capacity() - socket.send_queue();
                if free == 0 {
                    break;
                }
                let limit = free.min(self.scratch.len());
                let Ok(received) = socket.recv_slice(&mut self.scratch[..limit]) else {
                    break;
                };
                if received == 0 {
                    break;
                }
                let sent = socket.send_slice(&self.scratch[..received]).unwrap_or(0);
                self.counters.tcp_bytes_echoed += sent as u64;
                activity = true;
                if sent < received {
                    // Cannot happen (the free space was checked), but never lose bytes
                    // silently: reset the connection and count it.
                    socket.abort();
                    self.counters.tcp_aborted += 1;
                    break;
                }
            }
            // The peer finished sending and everything was echoed: finish our side.
            if !socket.may_recv()
                && socket.may_send()
                && socket.send_queue() == 0
                && !socket.can_recv()
            {
                socket.close();
                activity = true;
            }
            if !socket.is_open() {
                // Closed: listen again, or (when there are listeners enough) give it back.
                closed_spares.push(index);
            } else if socket.is_listening() {
                listeners += 1;
            }
        }
        // Closed sockets become listeners until there are enough; the rest are removed.
        for &index in closed_spares.iter().rev() {
            let handle = self.tcp[index].handle;
            if listeners < TCP_LISTENERS {
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                if socket.listen(ECHO_PORT).is_ok() {
                    listeners += 1;
                }
            } else {
                self.sockets.remove(handle);
                self.tcp.swap_remove(index);
            }
            activity = true;
        }
        // Keep listeners ready while there is room for more connections.
        while listeners < TCP_LISTENERS && self.tcp.len() < TCP_CONNECTIONS + TCP_LISTENERS {
            self.tcp
                .push(TcpSlot::new(self.sockets.add(tcp_listener())));
            listeners += 1;
            activity = true;
        }
        activity
    }
}
