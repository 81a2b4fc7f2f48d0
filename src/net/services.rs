//! The network services on the configured address, over smoltcp: UDP echo on port 7, TCP echo
//! on port 7 (a pool of listening sockets, so many concurrent connections), ICMP echo (answered
//! by smoltcp's interface itself), and the read-only stats service on UDP port 7007.
//!
//! Nothing here allocates per packet: the socket buffers are allocated once at start-up, and
//! echo moves bytes between a socket's receive and send buffers through a stack chunk.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use vireo::config::Config;

/// The echo port (RFC 862).
pub const ECHO_PORT: u16 = 7;
/// The stats port.
pub const STATS_PORT: u16 = 7007;
/// TCP echo sockets: the number of connections served at once.
pub const TCP_CONNECTIONS: usize = 72;
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
}

/// The interface, the sockets and their counters.
pub struct Services {
    iface: Interface,
    sockets: SocketSet<'static>,
    udp_echo: SocketHandle,
    stats: SocketHandle,
    tcp: Vec<SocketHandle>,
    was_active: Vec<bool>,
    /// Counters.
    pub counters: ServiceCounters,
    stats_line: alloc::string::String,
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
    /// every service.
    pub fn new<D: Device>(
        device: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        seed: u64,
    ) -> Self {
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, device, now);
        let [a, b, c, d] = config.ip.address.0;
        iface.update_ip_addrs(|addresses| {
            // One address: the capacity (IFACE_MAX_ADDR_COUNT >= 1) cannot be exceeded.
            let _ = addresses.push(IpCidr::new(IpAddress::v4(a, b, c, d), config.ip.prefix_len));
        });
        if let Some(gateway) = config.gateway {
            let [a, b, c, d] = gateway.0;
            // Fails only if the gateway is not on-link, which the config parser ruled out.
            if iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(a, b, c, d))
                .is_err()
            {
                log::warn!("net: default route via {gateway} rejected");
            }
        }

        let mut sockets = SocketSet::new(Vec::new());
        let mut echo = udp_socket();
        let mut stats = udp_socket();
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = echo.bind(ECHO_PORT);
        let _ = stats.bind(STATS_PORT);
        let udp_echo = sockets.add(echo);
        let stats = sockets.add(stats);
        let mut tcp = Vec::with_capacity(TCP_CONNECTIONS);
        for _ in 0..TCP_CONNECTIONS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            );
            socket.set_nagle_enabled(false);
            let _ = socket.listen(ECHO_PORT);
            tcp.push(sockets.add(socket));
        }
        Self {
            iface,
            sockets,
            udp_echo,
            stats,
            was_active: vec![false; tcp.len()],
            tcp,
            counters: ServiceCounters::default(),
            stats_line: alloc::string::String::with_capacity(1024),
        }
    }

    /// Runs the stack once: ingress and egress through `device`, then every service.
    /// `write_stats` appends the platform's and driver's counters to a stats reply.
    /// Returns whether anything happened (packets in or out, socket state changed).
    pub fn poll<D: Device>(
        &mut self,
        device: &mut D,
        now: Instant,
        write_stats: &mut dyn FnMut(&mut dyn Write),
    ) -> bool {
        let mut activity =
            self.iface.poll(now, device, &mut self.sockets) != smoltcp::iface::PollResult::None;
        activity |= self.serve_udp_echo();
        activity |= self.serve_stats(write_stats);
        activity |= self.serve_tcp();
        if activity {
            // Send what the services queued without waiting for the next loop iteration.
            self.iface.poll(now, device, &mut self.sockets);
        }
        activity
    }

    /// How long the stack may sleep before it needs polling (TCP timers), if at all.
    pub fn poll_delay(&mut self, now: Instant) -> Option<smoltcp::time::Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    fn serve_udp_echo(&mut self) -> bool {
        let socket = self.sockets.get_mut::<udp::Socket>(self.udp_echo);
        let mut activity = false;
        while socket.can_recv() {
            let mut chunk = [0u8; 9216];
            let Ok((length, metadata)) = socket.recv_slice(&mut chunk) else {
                break;
            };
            activity = true;
            match socket.send_slice(&chunk[..length], metadata.endpoint) {
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
            let connected = self.was_active.iter().filter(|&&active| active).count();
            let _ = write!(
                line,
                "udp_echoed={} udp_echo_dropped={} tcp_accepted={} tcp_connected={} tcp_aborted={} tcp_bytes_echoed={} stats_requests={}",
                counters.udp_echoed,
                counters.udp_echo_dropped,
                counters.tcp_accepted,
                connected,
                counters.tcp_aborted,
                counters.tcp_bytes_echoed,
                counters.stats_requests
            );
            write_stats(line);
            line.push('\n');
            let _ = socket.send_slice(line.as_bytes(), metadata.endpoint);
        }
        activity
    }

    fn serve_tcp(&mut self) -> bool {
        let mut activity = false;
        for (index, &handle) in self.tcp.iter().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let active = socket.is_active();
            if active && !self.was_active[index] {
                self.counters.tcp_accepted += 1;
            }
            self.was_active[index] = active;
            while socket.can_recv() && socket.can_send() {
                let free = socket.send_capacity() - socket.send_queue();
                if free == 0 {
                    break;
                }
                let mut chunk = [0u8; 4096];
                let limit = free.min(chunk.len());
                let Ok(received) = socket.recv_slice(&mut chunk[..limit]) else {
                    break;
                };
                if received == 0 {
                    break;
                }
                let sent = socket.send_slice(&chunk[..received]).unwrap_or(0);
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
                // Closed (or never opened): listen again for the next connection.
                if socket.listen(ECHO_PORT).is_ok() {
                    activity = true;
                }
            }
        }
        activity
    }
}
