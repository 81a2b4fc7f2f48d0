//! The echo service (RFC 862) on port 7: UDP echo, and TCP echo over a pool of listening
//! sockets, with an idle timeout and the SYN-flood defence. Built on the service API
//! ([`crate::net::service::Service`]).
//!
//! TCP sockets are a pool that grows on demand: a few listening sockets wait for connections
//! (`TCP_LISTENERS`); when one is taken, another is added, up to `TCP_CONNECTIONS` in all; closed
//! sockets beyond the listeners are removed, so their buffers go back to the heap. smoltcp walks
//! every socket on every poll, so an idle pool of 72 sockets would cost on every packet. The
//! free listeners are the port's listen backlog ([`Service::syn_credits`]): the device adapter
//! holds a SYN that would find none until the pool has added one.
//!
//! Nothing here allocates per packet: echo moves bytes between a socket's receive and send
//! buffers through one scratch buffer, allocated with the service.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};

use super::udp_socket;
use crate::net::service::{Service, ServiceContext};

/// The echo port (RFC 862).
pub const ECHO_PORT: u16 = 7;
/// TCP echo sockets at most: the number of connections served at once (plus listeners).
pub const TCP_CONNECTIONS: usize = 72;
/// Listening TCP sockets kept ready.
pub const TCP_LISTENERS: usize = 4;
/// An established connection that stays silent this long is reset (it also bounds how long a
/// half-open connection from a SYN flood holds a socket).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection still half open (SYN-RECEIVED) after this long is reset, freeing its socket:
/// the SYN-flood defence (a real handshake completes within a round trip).
const SYN_RECEIVED_TIMEOUT: Duration = Duration::from_millis(1000);
/// When the pool is full, half-open connections older than this are reset at once so that a
/// flood cannot lock legitimate clients out.
const SYN_RECEIVED_TIMEOUT_WHEN_FULL: Duration = Duration::from_millis(20);
/// The largest datagram echoed (a jumbo frame's payload).
const SCRATCH_BYTES: usize = 9216;
const TCP_BUFFER: usize = 256 * 1024;
const UDP_PACKETS: usize = 128;
const UDP_BUFFER: usize = 256 * 1024;

/// The echo service's counters (on the stats line in this order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoCounters {
    /// UDP datagrams echoed.
    pub udp_echoed: u64,
    /// UDP datagrams that could not be echoed (send buffer full).
    pub udp_echo_dropped: u64,
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// TCP connections reset by the echo service.
    pub tcp_aborted: u64,
    /// Half-open connections (SYN-RECEIVED too long) reset: the SYN-flood defence.
    pub tcp_half_open_reset: u64,
    /// TCP bytes echoed.
    pub tcp_bytes_echoed: u64,
}

/// UDP and TCP echo on one port.
pub struct EchoService {
    port: u16,
    udp: SocketHandle,
    /// The TCP socket pool.
    tcp: Vec<TcpSlot>,
    counters: EchoCounters,
    scratch: Vec<u8>,
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

fn tcp_listener(port: u16) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    socket.set_timeout(Some(TCP_IDLE_TIMEOUT));
    // Listening on a fresh socket with a non-zero port cannot fail.
    let _ = socket.listen(port);
    socket
}

impl Default for EchoService {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoService {
    /// Echo on port 7 (bound later, by [`Service::bind`]).
    pub fn new() -> Self {
        Self {
            port: ECHO_PORT,
            udp: SocketHandle::default(),
            tcp: Vec::new(),
            counters: EchoCounters::default(),
            scratch: Vec::new(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> EchoCounters {
        self.counters
    }

    /// Connections active at the last poll (`tcp_connected`).
    pub fn connected(&self) -> usize {
        self.tcp.iter().filter(|slot| slot.active).count()
    }

    fn pool_full(&self) -> bool {
        self.tcp.len() >= TCP_CONNECTIONS + TCP_LISTENERS
    }

    fn half_open_limit(&self) -> Duration {
        if self.pool_full() {
            SYN_RECEIVED_TIMEOUT_WHEN_FULL
        } else {
            SYN_RECEIVED_TIMEOUT
        }
    }

    fn serve_udp(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let socket = sockets.get_mut::<udp::Socket>(self.udp);
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

    fn serve_tcp(&mut self, sockets: &mut SocketSet<'static>, now: Instant) -> bool {
        let mut activity = false;
        let mut listeners = 0;
        let mut closed_spares = Vec::new();
        let half_open_limit = self.half_open_limit();
        for (index, slot) in self.tcp.iter_mut().enumerate() {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            if socket.state() == tcp::State::SynReceived {
                let since = *slot.syn_received_at.get_or_insert(now);
                if now - since > half_open_limit {
                    socket.abort();
                    slot.syn_received_at = None;
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
                let socket = sockets.get_mut::<tcp::Socket>(handle);
                if socket.listen(self.port).is_ok() {
                    listeners += 1;
                }
            } else {
                sockets.remove(handle);
                self.tcp.swap_remove(index);
            }
            activity = true;
        }
        // Keep listeners ready while there is room for more connections.
        while listeners < TCP_LISTENERS && !self.pool_full() {
            self.tcp
                .push(TcpSlot::new(sockets.add(tcp_listener(self.port))));
            listeners += 1;
            activity = true;
        }
        activity
    }
}

impl Service for EchoService {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn max_sockets(&self) -> usize {
        1 + TCP_CONNECTIONS + TCP_LISTENERS
    }

    fn bind(&mut self, sockets: &mut SocketSet<'static>) {
        let mut udp = udp_socket(UDP_PACKETS, UDP_BUFFER);
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = udp.bind(self.port);
        self.udp = sockets.add(udp);
        self.scratch = vec![0; SCRATCH_BYTES];
        self.tcp = Vec::with_capacity(TCP_CONNECTIONS + TCP_LISTENERS);
        let port = self.port;
        self.tcp
            .extend((0..TCP_LISTENERS).map(|_| TcpSlot::new(sockets.add(tcp_listener(port)))));
    }

    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool {
        let mut activity = self.serve_udp(context.sockets);
        activity |= self.serve_tcp(context.sockets, context.now);
        activity
    }

    /// The SYN-flood defence's deadline: the first half-open connection to outstay its limit.
    fn poll_at(&self, _now: Instant) -> Option<Instant> {
        let limit = self.half_open_limit() + Duration::from_micros(1);
        self.tcp
            .iter()
            .filter_map(|slot| slot.syn_received_at)
            .min()
            .map(|since| since + limit)
    }

    fn write_stats(&self, out: &mut dyn Write) {
        let counters = self.counters;
        let _ = write!(
            out,
            " udp_echoed={} udp_echo_dropped={} tcp_accepted={} tcp_connected={} tcp_aborted={} tcp_half_open_reset={} tcp_bytes_echoed={}",
            counters.udp_echoed,
            counters.udp_echo_dropped,
            counters.tcp_accepted,
            self.connected(),
            counters.tcp_aborted,
            counters.tcp_half_open_reset,
            counters.tcp_bytes_echoed,
        );
    }

    fn describe(&self, out: &mut dyn Write) {
        let _ = write!(out, " udp-echo={} tcp-echo={}", self.port, self.port);
    }

    fn tcp_ports(&self) -> &[u16] {
        core::slice::from_ref(&self.port)
    }

    /// The free listening sockets, or unlimited when the pool is full (smoltcp then refuses
    /// further attempts with a reset, which is the right answer).
    fn syn_credits(&self, sockets: &SocketSet<'static>, port: u16) -> usize {
        if port != self.port || self.pool_full() {
            return usize::MAX;
        }
        self.tcp
            .iter()
            .filter(|slot| sockets.get::<tcp::Socket>(slot.handle).is_listening())
            .count()
    }
}
