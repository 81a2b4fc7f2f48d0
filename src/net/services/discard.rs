//! The discard service (RFC 863) on UDP port 9: every datagram is read and thrown away, and
//! counted. Not run by default (`services=echo,stats,discard` turns it on).
//!
//! It is the worked example of the README's "Writing a service": the smallest complete
//! service on the API of [`crate::net::service`], one socket and two counters.

use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::udp;

use super::udp_socket;
use crate::net::service::{Service, ServiceContext};

/// The discard port (RFC 863).
pub const DISCARD_PORT: u16 = 9;

/// Reads and drops every datagram sent to UDP port 9.
#[derive(Default)]
pub struct DiscardService {
    socket: SocketHandle,
    /// Datagrams discarded (`discard_datagrams`).
    datagrams: u64,
    /// Their payload bytes (`discard_bytes`).
    bytes: u64,
}

impl Service for DiscardService {
    fn name(&self) -> &'static str {
        "discard"
    }

    fn max_sockets(&self) -> usize {
        1
    }

    fn bind(&mut self, sockets: &mut SocketSet<'static>) {
        // Room for 16 datagrams of up to 16 KiB in all: they are dropped at once anyway.
        let mut socket = udp_socket(16, 16 * 1024);
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = socket.bind(DISCARD_PORT);
        self.socket = sockets.add(socket);
    }

    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool {
        let socket = context.sockets.get_mut::<udp::Socket>(self.socket);
        let mut activity = false;
        while let Ok((payload, _)) = socket.recv() {
            self.datagrams += 1;
            self.bytes += payload.len() as u64;
            activity = true;
        }
        activity
    }

    fn write_stats(&self, out: &mut dyn Write) {
        let _ = write!(
            out,
            " discard_datagrams={} discard_bytes={}",
            self.datagrams, self.bytes
        );
    }

    fn describe(&self, out: &mut dyn Write) {
        let _ = write!(out, " discard={DISCARD_PORT}");
    }
}
