//! The read-only stats service on UDP port 7007: any datagram gets one line of space-separated
//! `key=value` counters, every service's (in the order they run), the host's (DHCP), then the
//! driver's and the platform's (README, "The guest contract"). Built on the service API
//! ([`crate::net::service::Service`]); the line comes from
//! [`ServiceContext::write_all_stats`].

use alloc::string::String;
use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::udp;

use super::udp_socket;
use crate::net::service::{Service, ServiceContext};

/// The stats port.
pub const STATS_PORT: u16 = 7007;
const UDP_PACKETS: usize = 128;
const UDP_BUFFER: usize = 256 * 1024;
/// The line's buffer, allocated once at bind (it would grow only if a line were longer). A line
/// is about 1.2 KiB with the NIC alone and under 2 KiB with a disk and the NBD export; were the
/// buffer to grow while a line is written, the growth would land after the loop sampled
/// `heap_used` for that line, and the next line would show it as a leak.
const LINE_BYTES: usize = 4096;

/// Answers every datagram to its port with the stats line.
pub struct StatsService {
    port: u16,
    socket: SocketHandle,
    /// Requests answered (`stats_requests`).
    requests: u64,
    line: String,
}

impl Default for StatsService {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsService {
    /// The stats service on port 7007 (bound later, by [`Service::bind`]).
    pub fn new() -> Self {
        Self {
            port: STATS_PORT,
            socket: SocketHandle::default(),
            requests: 0,
            line: String::new(),
        }
    }
}

impl Service for StatsService {
    fn name(&self) -> &'static str {
        "stats"
    }

    fn max_sockets(&self) -> usize {
        1
    }

    fn bind(&mut self, sockets: &mut SocketSet<'static>) {
        let mut socket = udp_socket(UDP_PACKETS, UDP_BUFFER);
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = socket.bind(self.port);
        self.socket = sockets.add(socket);
        self.line = String::with_capacity(LINE_BYTES);
    }

    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool {
        let mut activity = false;
        loop {
            let socket = context.sockets.get_mut::<udp::Socket>(self.socket);
            if !socket.can_recv() {
                break;
            }
            let Ok((_, metadata)) = socket.recv() else {
                break;
            };
            let endpoint = metadata.endpoint;
            activity = true;
            self.requests += 1;
            // Taken out (a moved String, no allocation) so that `self` can report its own
            // counter in its place on the line.
            let mut line = core::mem::take(&mut self.line);
            line.clear();
            context.write_all_stats(&*self, &mut line);
            line.push('\n');
            let socket = context.sockets.get_mut::<udp::Socket>(self.socket);
            let _ = socket.send_slice(line.as_bytes(), endpoint);
            self.line = line;
        }
        activity
    }

    fn write_stats(&self, out: &mut dyn Write) {
        let _ = write!(out, " stats_requests={}", self.requests);
    }

    fn describe(&self, out: &mut dyn Write) {
        let _ = write!(out, " stats={}", self.port);
    }
}
