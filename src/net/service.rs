//! The service API: what a network service implements so that [`crate::net::services::Services`]
//! (the host that owns the smoltcp interface, its socket set, the DHCP client and the RFC 6528
//! sequence-number translation) can run it beside the others.
//!
//! A service is a value behind `Box<dyn Service>`. Its life:
//!
//! 1. [`Service::max_sockets`] says how many sockets it may hold at most, so the host sizes
//!    the socket set once and it never reallocates;
//! 2. [`Service::bind`] adds its sockets to the set (listening TCP sockets, bound UDP sockets),
//!    once, before the first poll;
//! 3. on every pass of the kernel's loop, after the interface moved packets, the host calls
//!    [`Service::poll`] with a [`ServiceContext`] (the socket set, the time, and a way to read
//!    every service's counters); the service serves its sockets and says whether anything
//!    happened (the host then flushes what it queued at once, and the loop keeps polling);
//! 4. before the loop sleeps, [`Service::poll_at`] tells it when the service next needs time
//!    on its own (a timeout of its own, beyond the TCP timers smoltcp already reports), so the
//!    tickless loop arms its one-shot timer for the nearest deadline;
//! 5. [`Service::write_stats`] appends its counters to the stats line, and
//!    [`Service::describe`] its words of the `ready` line.
//!
//! A TCP service also declares its listen backlog: [`Service::tcp_ports`] and
//! [`Service::syn_credits`]. The device adapter ([`crate::net::device::NicDevice`]) lets a SYN
//! to such a port through only while the service has a free listening socket for it, and holds
//! it otherwise until the service added one (smoltcp has no backlog of its own).
//!
//! Nothing here allocates per packet; a service allocates its buffers when it binds. The README
//! section "Writing a service" walks through a complete one
//! (`src/net/services/discard.rs`).

use core::fmt::Write;

use smoltcp::iface::SocketSet;
use smoltcp::time::Instant;

/// A network service run by [`crate::net::services::Services`].
pub trait Service {
    /// The service's name, as written in `services=` on the command line (`echo`, `stats`).
    fn name(&self) -> &'static str;

    /// The most sockets it ever holds at once (the host reserves room for them).
    fn max_sockets(&self) -> usize;

    /// Adds its sockets to the interface's set. Called once, before the first poll.
    fn bind(&mut self, sockets: &mut SocketSet<'static>);

    /// Serves its sockets once. Returns whether anything happened (a datagram or bytes
    /// handled, a socket state changed), so the host sends what was queued at once.
    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool;

    /// When it next needs polling for a reason of its own (beyond smoltcp's socket timers,
    /// which the host already takes into account), if ever. A time in the past means "now".
    fn poll_at(&self, now: Instant) -> Option<Instant> {
        let _ = now;
        None
    }

    /// Appends its counters to the stats line: ` key=value` pairs, each with a leading space.
    fn write_stats(&self, out: &mut dyn Write) {
        let _ = out;
    }

    /// Appends its words of the `ready` line, each with a leading space (` udp-echo=7`).
    fn describe(&self, out: &mut dyn Write);

    /// The TCP ports it listens on, whose SYNs the device adapter gates by
    /// [`Service::syn_credits`].
    fn tcp_ports(&self) -> &[u16] {
        &[]
    }

    /// How many connection attempts (SYNs) to `port`, one of [`Service::tcp_ports`], the next
    /// poll may take: its free listening sockets, or `usize::MAX` when it wants smoltcp to
    /// answer further attempts itself (with a reset, when no listener is left).
    fn syn_credits(&self, sockets: &SocketSet<'static>, port: u16) -> usize {
        let _ = (sockets, port);
        usize::MAX
    }
}

/// Counters the host keeps itself (the DHCP client), written after the services' own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// DHCP leases obtained or changed (`ip=dhcp`).
    pub dhcp_leases: u64,
    /// DHCP leases lost (expired without renewal, or the server refused it).
    pub dhcp_lost: u64,
}

impl HostCounters {
    /// Appends ` dhcp_leases=N dhcp_lost=N`.
    pub fn write_stats(&self, out: &mut dyn Write) {
        let _ = write!(
            out,
            " dhcp_leases={} dhcp_lost={}",
            self.dhcp_leases, self.dhcp_lost
        );
    }
}

/// What a service gets on every poll: the interface's sockets, the time, and the counters of
/// everything else that reports on the stats line.
pub struct ServiceContext<'a> {
    /// The interface's socket set; the service reaches its own sockets by their handles.
    pub sockets: &'a mut SocketSet<'static>,
    /// The time of this pass of the loop.
    pub now: Instant,
    /// The services polled before this one, in order.
    pub(crate) before: &'a [alloc::boxed::Box<dyn Service>],
    /// The services polled after this one, in order.
    pub(crate) after: &'a [alloc::boxed::Box<dyn Service>],
    /// The host's own counters.
    pub(crate) host: HostCounters,
    /// Appends the driver's and the platform's counters.
    pub(crate) platform: &'a mut dyn FnMut(&mut dyn Write),
}

impl ServiceContext<'_> {
    /// Appends the whole stats line's counters, without the newline: every service's, in the
    /// order they run (`me`, the service being polled, in its own place), then the host's
    /// (`dhcp_leases dhcp_lost`), then the driver's and the platform's. The leading space of
    /// the first pair is left out, so the line starts with a key.
    pub fn write_all_stats(&mut self, me: &dyn Service, out: &mut dyn Write) {
        let mut out = SkipFirstSpace {
            inner: out,
            started: false,
        };
        for service in self.before {
            service.write_stats(&mut out);
        }
        me.write_stats(&mut out);
        for service in self.after {
            service.write_stats(&mut out);
        }
        self.host.write_stats(&mut out);
        (self.platform)(&mut out);
    }
}

/// Drops the first character written when it is a space (every ` key=value` pair leads with
/// one; the stats line does not).
struct SkipFirstSpace<'a> {
    inner: &'a mut dyn Write,
    started: bool,
}

impl Write for SkipFirstSpace<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        if self.started || text.is_empty() {
            return self.inner.write_str(text);
        }
        self.started = true;
        self.inner.write_str(text.strip_prefix(' ').unwrap_or(text))
    }
}
