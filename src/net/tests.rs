//! Host tests of the services and the device adapter, over an in-memory wire.
//!
//! The guest side is the kernel's own code: [`Services`] polled through a [`NicDevice`] over
//! [`MemoryNic`], an implementation of [`Nic`] whose frames are two queues. The other end of
//! the queues is a second smoltcp [`Interface`], the "host", with its own sockets, reached
//! through [`HostPort`] (a `phy::Device` over the same queues). Time is simulated: every step
//! advances both clocks by a millisecond.

use std::boxed::Box;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::string::String;
use std::vec;
use std::vec::Vec;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, Ipv4Address};

use super::device::{Nic, NicDevice, RX_BUDGET, SynCredits, is_tcp_syn_to};
use super::isn::{IsnTranslation, NetSecrets};
use super::service::{Service, ServiceContext};
use super::services::discard::DISCARD_PORT;
use super::services::echo::EchoService;
use super::services::stats::StatsService;
use super::services::{ECHO_PORT, STATS_PORT, Services, TCP_LISTENERS};
use crate::config::Config;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// The default `ip=` (10.0.2.15/24) and `gw=` (10.0.2.2): the host plays the gateway.
const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const HOST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
const MAX_FRAME: usize = 1514;

/// The two directions of the wire.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: VecDeque<Vec<u8>>,
}

/// The guest's NIC: receives from `to_guest`, transmits into `from_guest`.
struct MemoryNic {
    wire: Rc<RefCell<Wire>>,
    /// Segmentation offload: frames up to this long are taken and cut to the MTU, as a
    /// virtio-net device with HOST_TSO4 does ([`segment`]); `None`: no offload.
    segmented: Option<usize>,
    /// The longest frame the stack handed to `transmit`.
    longest: usize,
    /// At each `publish`: how many frames the guest had put on the wire so far.
    published_at: Vec<usize>,
}

/// A software stand-in for a device's TCP segmentation (virtio 1.2 §5.1.6.2, GSO_TCPV4): cuts
/// an IPv4 TCP frame longer than `max_frame` into frames of at most `max_frame`, each with
/// the headers repeated, the IPv4 total length and checksum and the TCP sequence number and
/// checksum recomputed, and PSH/FIN only on the last. Written here, sharing no code with the
/// kernel.
fn segment(frame: &[u8], max_frame: usize) -> Vec<Vec<u8>> {
    let ip_header = usize::from(frame[14] & 0x0f) * 4;
    let tcp = 14 + ip_header;
    let headers = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
    let mss = max_frame - headers;
    let payload = &frame[headers..];
    let sequence = u32::from_be_bytes([
        frame[tcp + 4],
        frame[tcp + 5],
        frame[tcp + 6],
        frame[tcp + 7],
    ]);
    let sum = |bytes: &[u8], start: u32| {
        let mut sum = start;
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    };
    let chunks: Vec<&[u8]> = payload.chunks(mss).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(index, chunk)| {
            let mut piece = frame[..headers].to_vec();
            piece.extend_from_slice(chunk);
            let total = (piece.len() - 14) as u16;
            piece[16..18].copy_from_slice(&total.to_be_bytes());
            piece[24..26].fill(0);
            let ip_checksum = sum(&piece[14..tcp], 0);
            piece[24..26].copy_from_slice(&ip_checksum.to_be_bytes());
            let offset = (index * mss) as u32;
            piece[tcp + 4..tcp + 8].copy_from_slice(&sequence.wrapping_add(offset).to_be_bytes());
            if index != last {
                piece[tcp + 13] &= !0x09; // FIN, PSH
            }
            piece[tcp + 16..tcp + 18].fill(0);
            let segment_len = (piece.len() - tcp) as u32;
            let pseudo = [&piece[26..34], &[0, 6]].concat();
            let start = pseudo
                .chunks(2)
                .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
                .sum::<u32>()
                + segment_len;
            let tcp_checksum = sum(&piece[tcp..], start);
            piece[tcp + 16..tcp + 18].copy_from_slice(&tcp_checksum.to_be_bytes());
            piece
        })
        .collect()
}

impl Nic for MemoryNic {
    type Rx = Vec<u8>;

    fn receive(&mut self) -> Option<Vec<u8>> {
        self.wire.borrow_mut().to_guest.pop_front()
    }

    fn frame(rx: &Vec<u8>) -> &[u8] {
        rx
    }

    fn frame_mut(rx: &mut Vec<u8>) -> &mut [u8] {
        rx
    }

    fn rx_checksums_verified(&self) -> bool {
        false
    }

    fn recycle(&mut self, _rx: Vec<u8>) {}

    fn can_transmit(&mut self) -> bool {
        true
    }

    fn transmit<R>(&mut self, length: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        if length > self.segmented.unwrap_or(MAX_FRAME) {
            return None;
        }
        let mut frame = vec![0; length];
        let result = fill(&mut frame);
        self.longest = self.longest.max(length);
        let mut wire = self.wire.borrow_mut();
        if length > MAX_FRAME {
            wire.from_guest.extend(segment(&frame, MAX_FRAME));
        } else {
            wire.from_guest.push_back(frame);
        }
        Some(result)
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn tx_checksum_offload(&self) -> bool {
        false
    }

    fn max_segmented_frame(&self) -> Option<usize> {
        self.segmented
    }

    fn publish(&mut self) {
        // Frames reach the wire as they are transmitted: nothing is held back. Recorded, for
        // when a poll hands its first frames over.
        let sent = self.wire.borrow().from_guest.len();
        self.published_at.push(sent);
    }
}

/// The host's end of the wire, as a smoltcp device.
struct HostPort {
    wire: Rc<RefCell<Wire>>,
    /// The host's largest frame (its MSS follows: this minus 54).
    max_frame: usize,
}

struct HostRx(Vec<u8>);

struct HostTx(Rc<RefCell<Wire>>);

impl phy::RxToken for HostRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for HostTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, length: usize, f: F) -> R {
        let mut frame = vec![0; length];
        let result = f(&mut frame);
        self.0.borrow_mut().to_guest.push_back(frame);
        result
    }
}

impl phy::Device for HostPort {
    type RxToken<'a> = HostRx;
    type TxToken<'a> = HostTx;

    fn receive(&mut self, _timestamp: Instant) -> Option<(HostRx, HostTx)> {
        let frame = self.wire.borrow_mut().from_guest.pop_front()?;
        Some((HostRx(frame), HostTx(self.wire.clone())))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<HostTx> {
        Some(HostTx(self.wire.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = self.max_frame;
        capabilities
    }
}

/// What the platform appends to a stats line in these tests.
const PLATFORM_STATS: &str = " link=up uptime_ms=0";

/// The guest's services and the host's interface on one wire.
struct Net {
    wire: Rc<RefCell<Wire>>,
    nic: RefCell<MemoryNic>,
    held: RefCell<Option<Vec<u8>>>,
    services: Services,
    host: Interface,
    host_port: HostPort,
    host_sockets: SocketSet<'static>,
    now: Instant,
}

/// The secrets of most tests: smoltcp seed 1 and a fixed ISN key.
const SECRETS: NetSecrets = NetSecrets {
    stack_seed: 1,
    isn_key: *b"isn key of tests",
};

impl Net {
    fn new() -> Self {
        Self::with_secrets(SECRETS)
    }

    fn with_secrets(secrets: NetSecrets) -> Self {
        Self::build(secrets, None)
    }

    /// The guest runs `services` (in this order) instead of those of the default config.
    fn with_services(services: Vec<Box<dyn Service>>) -> Self {
        Self::build(SECRETS, Some(services))
    }

    fn build(secrets: NetSecrets, services: Option<Vec<Box<dyn Service>>>) -> Self {
        Self::build_with(secrets, services, None, MAX_FRAME)
    }

    /// With segmentation offload up to `segmented` bytes on the guest's NIC, and a host whose
    /// largest frame is `host_max_frame`.
    fn with_segmentation(segmented: Option<usize>, host_max_frame: usize) -> Self {
        Self::build_with(SECRETS, None, segmented, host_max_frame)
    }

    fn build_with(
        secrets: NetSecrets,
        services: Option<Vec<Box<dyn Service>>>,
        segmented: Option<usize>,
        host_max_frame: usize,
    ) -> Self {
        let wire = Rc::new(RefCell::new(Wire::default()));
        let nic = RefCell::new(MemoryNic {
            wire: wire.clone(),
            segmented,
            longest: 0,
            published_at: Vec::new(),
        });
        let held = RefCell::new(None);
        let now = Instant::from_millis(1);
        let services = {
            let mut device = NicDevice::new(&nic, &held, SynCredits::new());
            let config = Config::default();
            match services {
                None => Services::new(&mut device, GUEST_MAC, &config, now, secrets),
                Some(services) => {
                    Services::with_services(&mut device, GUEST_MAC, &config, now, secrets, services)
                }
            }
        };
        let mut host_port = HostPort {
            wire: wire.clone(),
            max_frame: host_max_frame,
        };
        let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(HOST_MAC)));
        config.random_seed = 2;
        let mut host = Interface::new(config, &mut host_port, now);
        host.update_ip_addrs(|addresses| {
            addresses
                .push(IpCidr::new(HOST_IP.into(), 24))
                .expect("one address fits");
        });
        Self {
            wire,
            nic,
            held,
            services,
            host,
            host_port,
            host_sockets: SocketSet::new(Vec::new()),
            now,
        }
    }

    /// One guest poll (as the kernel's loop does it), with the listen credits the services
    /// grant. Returns the services' activity.
    fn poll_guest(&mut self) -> bool {
        let credits = self.services.syn_credits();
        self.poll_guest_with_credits(credits)
    }

    fn poll_guest_with_credits(&mut self, credits: SynCredits) -> bool {
        let mut device = NicDevice::new(&self.nic, &self.held, credits);
        self.services.poll(&mut device, self.now, &mut |out| {
            let _ = out.write_str(PLATFORM_STATS);
        })
    }

    fn poll_host(&mut self) {
        self.host
            .poll(self.now, &mut self.host_port, &mut self.host_sockets);
    }

    /// Host, then guest, then a millisecond passes.
    fn step(&mut self) {
        self.poll_host();
        self.poll_guest();
        self.now += Duration::from_millis(1);
    }

    /// Steps until `done` holds, at most `limit` times; panics otherwise.
    fn run_until(&mut self, limit: usize, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            self.step();
        }
        assert!(done(self), "{what}: not after {limit} steps");
    }

    fn host_udp(&mut self, port: u16) -> SocketHandle {
        let buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 16 * 1024]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        socket.bind(port).expect("bind");
        self.host_sockets.add(socket)
    }

    fn host_tcp(&mut self) -> SocketHandle {
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        self.host_sockets.add(socket)
    }

    /// Sends `payload` from the host's UDP socket to the guest's `port` and returns the
    /// answer's payload and source.
    fn udp_exchange(&mut self, socket: SocketHandle, port: u16, payload: &[u8]) -> Vec<u8> {
        self.host_sockets
            .get_mut::<udp::Socket>(socket)
            .send_slice(payload, IpEndpoint::new(GUEST_IP.into(), port))
            .expect("host send");
        let mut answer = None;
        self.run_until(200, "UDP answer", |net| {
            let socket = net.host_sockets.get_mut::<udp::Socket>(socket);
            if let Ok((bytes, metadata)) = socket.recv() {
                assert_eq!(metadata.endpoint, IpEndpoint::new(GUEST_IP.into(), port));
                answer = Some(bytes.to_vec());
            }
            answer.is_some()
        });
        answer.expect("answered")
    }

    /// A counter of the services, read locally (no stats request).
    fn counter(&self, key: &str) -> u64 {
        let mut line = String::new();
        self.services.write_stats(&mut line);
        stat(&line, key)
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no counter {key} in {line:?}"))
    }

    /// The stats line, fetched from the host.
    fn stats(&mut self) -> String {
        let socket = self.host_udp(40_007);
        let line = self.udp_exchange(socket, STATS_PORT, b"?");
        self.host_sockets.remove(socket);
        String::from_utf8(line).expect("the stats line is text")
    }
}

fn stat(line: &str, key: &str) -> Option<String> {
    line.trim_end()
        .split(' ')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .map(String::from)
}

/// Bytes that differ from their neighbours, so a reordering or a dropped byte shows.
fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed) ^ (index >> 8) as u8)
        .collect()
}

#[test]
fn udp_echo_returns_the_exact_datagram() {
    let mut net = Net::new();
    let socket = net.host_udp(40_000);
    for (length, seed) in [(1, 3), (18, 4), (1000, 5), (1472, 6)] {
        let payload = pattern(length, seed);
        let answer = net.udp_exchange(socket, ECHO_PORT, &payload);
        assert_eq!(answer, payload, "{length} bytes");
    }
    assert_eq!(net.counter("udp_echoed"), 4);
    assert_eq!(net.counter("udp_echo_dropped"), 0);
}

#[test]
fn stats_answers_one_line_of_key_value_pairs_counting_udp_echoes() {
    let mut net = Net::new();
    let line = net.stats();
    assert!(line.ends_with('\n'), "{line:?}");
    let line = line.strip_suffix('\n').expect("newline");
    assert!(!line.contains('\n') && !line.contains("  "), "{line:?}");
    for pair in line.split(' ') {
        let (key, value) = pair.split_once('=').expect("key=value");
        assert!(!key.is_empty() && !value.is_empty(), "{pair:?} in {line:?}");
    }
    // The services' keys come first, then what the platform appends.
    assert!(line.starts_with("udp_echoed=0 udp_echo_dropped=0 tcp_accepted=0 tcp_connected=0 tcp_aborted=0 tcp_half_open_reset=0 tcp_bytes_echoed=0 stats_requests=1 dhcp_leases=0 dhcp_lost=0"), "{line}");
    assert!(line.ends_with(PLATFORM_STATS), "{line}");

    let socket = net.host_udp(40_000);
    net.udp_exchange(socket, ECHO_PORT, b"one");
    net.udp_exchange(socket, ECHO_PORT, b"two");
    let line = net.stats();
    assert_eq!(stat(&line, "udp_echoed").as_deref(), Some("2"), "{line}");
    assert_eq!(
        stat(&line, "stats_requests").as_deref(),
        Some("2"),
        "{line}"
    );
}

#[test]
fn tcp_echo_on_port_7_returns_every_byte_in_order() {
    let mut net = Net::new();
    let socket = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .connect(net.host.context(), (GUEST_IP, ECHO_PORT), 49_152)
        .expect("connect");
    // More than one socket buffer (16 KiB in the guest), so the echo flows in windows.
    let sent = pattern(100_000, 7);
    let mut offset = 0;
    let mut received = Vec::new();
    net.run_until(5_000, "TCP echo", |net| {
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_send() && offset < sent.len() {
            offset += socket.send_slice(&sent[offset..]).expect("send");
        }
        if socket.can_recv() {
            socket
                .recv(|bytes| (bytes.len(), received.extend_from_slice(bytes)))
                .expect("recv");
        }
        received.len() == sent.len()
    });
    assert!(received == sent, "the echo differs from what was sent");
    assert_eq!(net.counter("tcp_accepted"), 1);
    assert_eq!(net.counter("tcp_bytes_echoed"), sent.len() as u64);
    let line = net.stats();
    assert_eq!(stat(&line, "tcp_connected").as_deref(), Some("1"), "{line}");

    // The host closes; the guest finishes its side and the connection goes away.
    net.host_sockets.get_mut::<tcp::Socket>(socket).close();
    net.run_until(1_000, "close", |net| {
        !net.host_sockets.get::<tcp::Socket>(socket).is_open()
    });
    let line = net.stats();
    assert_eq!(stat(&line, "tcp_connected").as_deref(), Some("0"), "{line}");
    assert_eq!(net.counter("tcp_aborted"), 0);
}

/// Connects `count` host sockets to the guest's echo port in one host poll (after ARP is
/// resolved), so that `count` SYNs wait in the guest's receive queue together.
fn syn_burst(net: &mut Net, count: usize) -> Vec<SocketHandle> {
    syn_burst_to(net, ECHO_PORT, count)
}

/// [`syn_burst`] to another port of the guest.
fn syn_burst_to(net: &mut Net, port: u16, count: usize) -> Vec<SocketHandle> {
    let warm_up = net.host_udp(40_000);
    net.udp_exchange(warm_up, ECHO_PORT, b"arp");
    let sockets: Vec<_> = (0..count)
        .map(|index| {
            let handle = net.host_tcp();
            net.host_sockets
                .get_mut::<tcp::Socket>(handle)
                .connect(net.host.context(), (GUEST_IP, port), 50_000 + index as u16)
                .expect("connect");
            handle
        })
        .collect();
    net.poll_host();
    let wire = net.wire.borrow();
    let syns = wire
        .to_guest
        .iter()
        .filter(|frame| is_tcp_syn_to(frame, port))
        .count();
    assert_eq!(syns, count, "one SYN per connection, all queued");
    drop(wire);
    sockets
}

#[test]
fn syn_gate_holds_a_syn_without_listener_credit_and_delivers_it_later() {
    let mut net = Net::new();
    let burst = TCP_LISTENERS + 2;
    let sockets = syn_burst(&mut net, burst);
    assert_eq!(
        net.services.syn_credits().get(ECHO_PORT),
        Some(TCP_LISTENERS)
    );

    // One poll: the first TCP_LISTENERS SYNs take the listeners; the next one is held, and
    // the one behind it stays in the ring (order is kept).
    net.poll_guest();
    let held = net.held.borrow();
    let held_frame = held.as_ref().expect("a SYN is held for want of a listener");
    assert!(is_tcp_syn_to(held_frame, ECHO_PORT));
    drop(held);
    assert_eq!(net.wire.borrow().to_guest.len(), burst - TCP_LISTENERS - 1);
    // Meanwhile the services added listeners, so the next poll has credit again.
    assert!(net.services.syn_credits().get(ECHO_PORT) > Some(0));

    net.run_until(500, "every connection established", |net| {
        sockets.iter().all(|&handle| {
            net.host_sockets.get::<tcp::Socket>(handle).state() == tcp::State::Established
        })
    });
    assert!(net.held.borrow().is_none());
    assert_eq!(net.counter("tcp_accepted"), burst as u64);
    // Each connection echoes.
    for (index, &handle) in sockets.iter().enumerate() {
        let message = [b'a' + index as u8; 5];
        net.host_sockets
            .get_mut::<tcp::Socket>(handle)
            .send_slice(&message)
            .expect("send");
        let mut echoed = Vec::new();
        net.run_until(200, "echo", |net| {
            let socket = net.host_sockets.get_mut::<tcp::Socket>(handle);
            if socket.can_recv() {
                socket
                    .recv(|bytes| (bytes.len(), echoed.extend_from_slice(bytes)))
                    .expect("recv");
            }
            echoed.len() == message.len()
        });
        assert_eq!(echoed, message);
    }
}

#[test]
fn without_the_syn_gate_a_burst_beyond_the_listeners_is_reset() {
    // The contrast that shows what the gate is for: the same burst with unlimited credit
    // finds no listener for the SYNs beyond TCP_LISTENERS, and smoltcp answers them with RST.
    let mut net = Net::new();
    let burst = TCP_LISTENERS + 2;
    let sockets = syn_burst(&mut net, burst);
    net.poll_guest_with_credits(SynCredits::one(ECHO_PORT, usize::MAX));
    assert!(net.held.borrow().is_none());
    net.poll_host();
    let refused = sockets
        .iter()
        .filter(|&&handle| {
            net.host_sockets.get::<tcp::Socket>(handle).state() == tcp::State::Closed
        })
        .count();
    assert_eq!(refused, burst - TCP_LISTENERS);
}

#[test]
fn one_poll_takes_at_most_the_receive_budget() {
    let mut net = Net::new();
    // Frames the stack reads and drops (an unknown ethertype).
    for _ in 0..RX_BUDGET + 10 {
        let mut frame = vec![0u8; 60];
        frame[..6].copy_from_slice(&GUEST_MAC);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        net.wire.borrow_mut().to_guest.push_back(frame);
    }
    net.poll_guest();
    assert_eq!(net.wire.borrow().to_guest.len(), 10);
    net.poll_guest();
    assert!(net.wire.borrow().to_guest.is_empty());
}

/// An Ethernet + IPv4 + TCP frame to `port` with `flags` (byte 13 of the TCP header) and an
/// IPv4 header of `ihl` words.
fn tcp_frame(port: u16, flags: u8, ihl: u8) -> Vec<u8> {
    let ip_header = usize::from(ihl) * 4;
    let mut frame = vec![0u8; 14 + ip_header + 20];
    frame[..6].copy_from_slice(&GUEST_MAC);
    frame[6..12].copy_from_slice(&HOST_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..];
    ip[0] = 0x40 | ihl;
    ip[9] = 6;
    let tcp = &mut ip[ip_header..];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    frame
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[test]
fn is_tcp_syn_to_recognises_only_a_syn_to_the_port() {
    assert!(is_tcp_syn_to(&tcp_frame(7, SYN, 5), 7));
    // IPv4 options move the TCP header.
    assert!(is_tcp_syn_to(&tcp_frame(7, SYN, 6), 7));
    // SYN-ACK, a bare ACK, no flags: not a connection attempt.
    assert!(!is_tcp_syn_to(&tcp_frame(7, SYN | ACK, 5), 7));
    assert!(!is_tcp_syn_to(&tcp_frame(7, ACK, 5), 7));
    assert!(!is_tcp_syn_to(&tcp_frame(7, 0, 5), 7));
    // Another port.
    assert!(!is_tcp_syn_to(&tcp_frame(8, SYN, 5), 7));
    assert!(!is_tcp_syn_to(&tcp_frame(7, SYN, 5), 8));
    // Not TCP, not IPv4, a bad IHL.
    let mut udp = tcp_frame(7, SYN, 5);
    udp[14 + 9] = 17;
    assert!(!is_tcp_syn_to(&udp, 7));
    let mut ipv6 = tcp_frame(7, SYN, 5);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert!(!is_tcp_syn_to(&ipv6, 7));
    let mut version = tcp_frame(7, SYN, 5);
    version[14] = 0x65;
    assert!(!is_tcp_syn_to(&version, 7));
    let mut short_ihl = tcp_frame(7, SYN, 5);
    short_ihl[14] = 0x44;
    assert!(!is_tcp_syn_to(&short_ihl, 7));
}

#[test]
fn is_tcp_syn_to_rejects_truncated_frames_without_panicking() {
    let frame = tcp_frame(7, SYN, 5);
    // The flags byte is the 14th byte of the TCP header: anything shorter is not a SYN.
    let flags_end = 14 + 20 + 14;
    assert!(is_tcp_syn_to(&frame[..flags_end], 7));
    for length in 0..flags_end {
        assert!(!is_tcp_syn_to(&frame[..length], 7), "{length} bytes");
    }
    // A header length that points past the end.
    let options = tcp_frame(7, SYN, 15);
    assert!(!is_tcp_syn_to(&options[..14 + 60 + 13], 7));
    assert!(is_tcp_syn_to(&options, 7));
}

/// Connects the host from `host_port` to the guest's echo port and returns the sequence
/// number of the guest's SYN-ACK as it appears on the wire (the guest's ISN for that
/// 4-tuple). The first call also resolves ARP with a UDP exchange.
fn wire_isn_of_guest(net: &mut Net, host_port: u16) -> u32 {
    if net.host_sockets.iter().count() == 0 {
        let warm_up = net.host_udp(40_000);
        net.udp_exchange(warm_up, ECHO_PORT, b"arp");
    }
    let handle = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(net.host.context(), (GUEST_IP, ECHO_PORT), host_port)
        .expect("connect");
    net.poll_host();
    net.poll_guest();
    let wire = net.wire.borrow();
    let syn_ack = wire
        .from_guest
        .iter()
        .find(|frame| {
            frame.len() >= 54
                && frame[12..14] == [0x08, 0x00]
                && frame[14 + 9] == 6
                && u16::from_be_bytes([frame[36], frame[37]]) == host_port
                && frame[47] & 0x12 == 0x12
        })
        .expect("the guest answered with a SYN-ACK");
    let isn = u32::from_be_bytes([syn_ack[38], syn_ack[39], syn_ack[40], syn_ack[41]]);
    drop(wire);
    net.run_until(200, "established", |net| {
        net.host_sockets.get::<tcp::Socket>(handle).state() == tcp::State::Established
    });
    isn
}

#[test]
fn wire_isns_carry_a_keyed_offset_per_four_tuple_over_smoltcps_own() {
    let ports = [50_001u16, 50_002];
    let mut net = Net::new();
    let wire: Vec<u32> = ports
        .iter()
        .map(|&port| wire_isn_of_guest(&mut net, port))
        .collect();
    let translation = IsnTranslation::new(SECRETS.isn_key);
    let offsets: Vec<u32> = ports
        .iter()
        .map(|&port| translation.offset(GUEST_IP.octets(), ECHO_PORT, HOST_IP.octets(), port))
        .collect();
    assert_ne!(offsets[0], offsets[1], "the offset differs per 4-tuple");
    let stack: Vec<u32> = wire
        .iter()
        .zip(&offsets)
        .map(|(wire, offset)| wire.wrapping_sub(*offset))
        .collect();
    // The difference the wire shows is not the one smoltcp's generator made.
    assert_ne!(
        wire[1].wrapping_sub(wire[0]),
        stack[1].wrapping_sub(stack[0])
    );

    // Another boot: the same smoltcp seed (so the same stack ISNs), another key. The stack's
    // numbers repeat; the wire's do not, for the very same 4-tuples.
    let mut other = Net::with_secrets(NetSecrets {
        stack_seed: SECRETS.stack_seed,
        isn_key: *b"another isn key!",
    });
    let other_wire: Vec<u32> = ports
        .iter()
        .map(|&port| wire_isn_of_guest(&mut other, port))
        .collect();
    let other_translation = IsnTranslation::new(*b"another isn key!");
    let other_stack: Vec<u32> = ports
        .iter()
        .zip(&other_wire)
        .map(|(&port, wire)| {
            wire.wrapping_sub(other_translation.offset(
                GUEST_IP.octets(),
                ECHO_PORT,
                HOST_IP.octets(),
                port,
            ))
        })
        .collect();
    assert_eq!(other_stack, stack, "smoltcp's own ISNs follow its seed");
    assert_ne!(other_wire[0], wire[0]);
    assert_ne!(other_wire[1], wire[1]);
}

#[test]
fn tcp_echo_through_the_translation_with_another_key_is_exact() {
    let mut net = Net::with_secrets(NetSecrets {
        stack_seed: 99,
        isn_key: [0xff; 16],
    });
    let socket = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .connect(net.host.context(), (GUEST_IP, ECHO_PORT), 49_200)
        .expect("connect");
    let sent = pattern(100_000, 9);
    let mut offset = 0;
    let mut received = Vec::new();
    net.run_until(5_000, "TCP echo", |net| {
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_send() && offset < sent.len() {
            offset += socket.send_slice(&sent[offset..]).expect("send");
        }
        if socket.can_recv() {
            socket
                .recv(|bytes| (bytes.len(), received.extend_from_slice(bytes)))
                .expect("recv");
        }
        received.len() == sent.len()
    });
    assert!(received == sent, "the echo differs from what was sent");
    assert_eq!(net.counter("tcp_aborted"), 0);
}

/// The services of `services=echo,stats,discard`, built as the kernel builds them.
fn echo_stats_discard() -> Vec<Box<dyn Service>> {
    let mut config = Config::default();
    config.services.insert(crate::config::ServiceKind::Discard);
    super::services::build_all(config.services, |_| None)
}

#[test]
fn default_services_describe_the_ready_line_as_before() {
    let net = Net::new();
    let mut words = String::new();
    net.services.describe(&mut words);
    assert_eq!(words, " udp-echo=7 tcp-echo=7 stats=7007");
    let names: Vec<_> = net.services.services().iter().map(|s| s.name()).collect();
    assert_eq!(names, ["echo", "stats"]);

    let net = Net::with_services(echo_stats_discard());
    let mut words = String::new();
    net.services.describe(&mut words);
    assert_eq!(words, " udp-echo=7 tcp-echo=7 stats=7007 discard=9");
}

#[test]
fn services_nbd_comes_from_the_platform_which_may_decline_it() {
    let mut config = Config::default();
    config.services.insert(crate::config::ServiceKind::Nbd);
    let mut asked = Vec::new();
    let without_disk = super::services::build_all(config.services, |kind| {
        asked.push(kind);
        None
    });
    assert_eq!(asked, [crate::config::ServiceKind::Nbd]);
    let names: Vec<_> = without_disk.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["echo", "stats"], "the others still run");
    let with_disk = super::services::build_all(config.services, |kind| {
        assert_eq!(kind, crate::config::ServiceKind::Nbd);
        let disk = crate::block::MemoryDisk::new(1 << 20, false);
        let service = super::services::nbd::NbdService::new(disk, Default::default());
        Some(Box::new(service) as Box<dyn Service>)
    });
    let net = Net::with_services(with_disk);
    let mut words = String::new();
    net.services.describe(&mut words);
    assert_eq!(words, " udp-echo=7 tcp-echo=7 stats=7007 nbd=10809");
}

#[test]
fn discard_reads_and_counts_every_datagram_and_answers_none() {
    let mut net = Net::with_services(echo_stats_discard());
    let socket = net.host_udp(40_009);
    for length in [1, 100, 1472] {
        net.host_sockets
            .get_mut::<udp::Socket>(socket)
            .send_slice(
                &pattern(length, 1),
                IpEndpoint::new(GUEST_IP.into(), DISCARD_PORT),
            )
            .expect("host send");
    }
    net.run_until(200, "three datagrams discarded", |net| {
        net.counter("discard_datagrams") == 3
    });
    assert_eq!(net.counter("discard_bytes"), 1 + 100 + 1472);
    for _ in 0..20 {
        net.step();
    }
    assert!(
        !net.host_sockets.get_mut::<udp::Socket>(socket).can_recv(),
        "discard never answers"
    );
    // The other services still run beside it.
    let answer = net.udp_exchange(socket, ECHO_PORT, b"still here");
    assert_eq!(answer, b"still here");
}

#[test]
fn a_services_counters_take_its_place_on_the_stats_line() {
    let mut net = Net::with_services(echo_stats_discard());
    let socket = net.host_udp(40_009);
    net.host_sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(b"gone", IpEndpoint::new(GUEST_IP.into(), DISCARD_PORT))
        .expect("host send");
    net.run_until(200, "discarded", |net| {
        net.counter("discard_datagrams") == 1
    });
    let line = net.stats();
    let line = line.strip_suffix('\n').expect("newline");
    // Echo's keys, then stats', then discard's, then the host's, then the platform's.
    assert!(
        line.starts_with(
            "udp_echoed=0 udp_echo_dropped=0 tcp_accepted=0 tcp_connected=0 tcp_aborted=0 \
             tcp_half_open_reset=0 tcp_bytes_echoed=0 stats_requests=1 discard_datagrams=1 \
             discard_bytes=4 dhcp_leases=0 dhcp_lost=0"
        ),
        "{line}"
    );
    assert!(line.ends_with(PLATFORM_STATS), "{line}");
}

#[test]
fn the_stats_line_follows_the_services_that_run() {
    // Stats alone: no echo keys; its own, the host's and the platform's remain.
    let mut net = Net::with_services(vec![Box::new(StatsService::new())]);
    let line = net.stats();
    assert_eq!(
        line,
        std::format!("stats_requests=1 dhcp_leases=0 dhcp_lost=0{PLATFORM_STATS}\n")
    );
}

/// A service that only asks for time: `poll_at` returns `at`.
struct Alarm {
    at: Instant,
    polls: Rc<RefCell<usize>>,
}

impl Service for Alarm {
    fn name(&self) -> &'static str {
        "alarm"
    }
    fn max_sockets(&self) -> usize {
        0
    }
    fn bind(&mut self, _sockets: &mut SocketSet<'static>) {}
    fn poll(&mut self, _context: &mut ServiceContext<'_>) -> bool {
        *self.polls.borrow_mut() += 1;
        false
    }
    fn poll_at(&self, _now: Instant) -> Option<Instant> {
        Some(self.at)
    }
    fn describe(&self, _out: &mut dyn core::fmt::Write) {}
}

#[test]
fn a_services_poll_at_reaches_the_loops_delay() {
    let polls = Rc::new(RefCell::new(0));
    let at = Instant::from_millis(251);
    let mut net = Net::with_services(vec![
        Box::new(EchoService::new()),
        Box::new(Alarm {
            at,
            polls: polls.clone(),
        }),
    ]);
    // The echo service's listeners have no timer: the alarm sets the delay.
    let now = net.now;
    assert_eq!(net.services.poll_delay(now), Some(at - now));
    net.poll_guest();
    assert_eq!(*polls.borrow(), 1, "every service is polled on every pass");
    // Past it: poll at once.
    assert_eq!(
        net.services.poll_delay(Instant::from_millis(300)),
        Some(Duration::ZERO)
    );
    // Without the alarm, nothing to wait for.
    let mut idle = Net::with_services(vec![Box::new(EchoService::new())]);
    let now = idle.now;
    assert_eq!(idle.services.poll_delay(now), None);
    idle.poll_guest();
}

/// A TCP service on another port that accepts and closes: one listener kept ready, up to
/// `MAX` sockets, so its listen backlog is one SYN per poll.
struct Acceptor {
    port: u16,
    sockets: Vec<SocketHandle>,
    accepted: usize,
}

impl Acceptor {
    const MAX: usize = 8;

    fn listener(port: u16) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1024]),
            tcp::SocketBuffer::new(vec![0; 1024]),
        );
        socket.listen(port).expect("listen");
        socket
    }
}

impl Service for Acceptor {
    fn name(&self) -> &'static str {
        "acceptor"
    }
    fn max_sockets(&self) -> usize {
        Self::MAX
    }
    fn bind(&mut self, sockets: &mut SocketSet<'static>) {
        self.sockets.push(sockets.add(Self::listener(self.port)));
    }
    fn poll(&mut self, context: &mut ServiceContext<'_>) -> bool {
        let mut listening = 0;
        let mut activity = false;
        for &handle in &self.sockets {
            let socket = context.sockets.get_mut::<tcp::Socket>(handle);
            if socket.is_listening() {
                listening += 1;
            } else if socket.state() == tcp::State::Established {
                self.accepted += 1;
                socket.close();
                activity = true;
            }
        }
        if listening == 0 && self.sockets.len() < Self::MAX {
            self.sockets
                .push(context.sockets.add(Self::listener(self.port)));
            activity = true;
        }
        activity
    }
    fn describe(&self, out: &mut dyn core::fmt::Write) {
        let _ = write!(out, " acceptor={}", self.port);
    }
    fn tcp_ports(&self) -> &[u16] {
        core::slice::from_ref(&self.port)
    }
    fn syn_credits(&self, sockets: &SocketSet<'static>, port: u16) -> usize {
        assert_eq!(port, self.port);
        self.sockets
            .iter()
            .filter(|&&handle| sockets.get::<tcp::Socket>(handle).is_listening())
            .count()
    }
}

#[test]
fn syn_gate_is_per_port_for_a_second_tcp_service() {
    const PORT: u16 = 5_000;
    let mut net = Net::with_services(vec![
        Box::new(EchoService::new()),
        Box::new(Acceptor {
            port: PORT,
            sockets: Vec::new(),
            accepted: 0,
        }),
    ]);
    let credits = net.services.syn_credits();
    assert_eq!(credits.get(ECHO_PORT), Some(TCP_LISTENERS));
    assert_eq!(credits.get(PORT), Some(1));
    assert_eq!(
        credits.get(9),
        None,
        "a port no service declared is not gated"
    );

    let sockets = syn_burst_to(&mut net, PORT, 3);
    // One listener on the second port: the first SYN takes it, the second is held, the third
    // waits behind it in the ring; port 7's credit is untouched.
    net.poll_guest();
    let held = net.held.borrow();
    let held_frame = held.as_ref().expect("a SYN to the second port is held");
    assert!(is_tcp_syn_to(held_frame, PORT));
    drop(held);
    assert_eq!(net.wire.borrow().to_guest.len(), 1);
    let credits = net.services.syn_credits();
    assert_eq!(credits.get(ECHO_PORT), Some(TCP_LISTENERS));
    assert_eq!(credits.get(PORT), Some(1), "the service added a listener");

    // Every attempt is served in turn, none refused.
    net.run_until(500, "every connection accepted", |net| {
        sockets.iter().all(|&handle| {
            let state = net.host_sockets.get::<tcp::Socket>(handle).state();
            state != tcp::State::SynSent && state != tcp::State::Closed
        })
    });
    assert!(net.held.borrow().is_none());
    // Echo on port 7 still works beside it.
    let socket = net.host_udp(40_001);
    assert_eq!(net.udp_exchange(socket, ECHO_PORT, b"seven"), b"seven");
}

mod nbd;

/// Host polls per simulated millisecond in the segmentation tests.
const HOST_POLLS_PER_STEP: usize = 48;

/// The MSS option of a SYN frame (Ethernet, 20-byte IPv4, TCP), if any.
fn syn_mss(frame: &[u8]) -> Option<u16> {
    let tcp = 34;
    let end = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
    let mut at = tcp + 20;
    while at + 1 < end {
        match frame[at] {
            0 => return None,
            1 => at += 1,
            2 => return Some(u16::from_be_bytes([frame[at + 2], frame[at + 3]])),
            _ => at += usize::from(frame[at + 1]).max(2),
        }
    }
    None
}

/// Echoes `length` bytes over one host connection, watching every frame the guest puts on
/// the wire: returns the MSS of the guest's SYN-ACK and the longest frame on the wire.
fn tcp_echo_watching_the_wire(net: &mut Net, length: usize) -> (Option<u16>, usize) {
    let socket = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .connect(net.host.context(), (GUEST_IP, ECHO_PORT), 49_300)
        .expect("connect");
    let sent = pattern(length, 11);
    let (mut offset, mut received) = (0, Vec::new());
    let (mut syn_ack_mss, mut longest) = (None, 0);
    net.run_until(20_000, "TCP echo", |net| {
        for frame in &net.wire.borrow().from_guest {
            longest = longest.max(frame.len());
            if frame.len() > 47 && frame[23] == 6 && frame[47] & 0x12 == 0x12 {
                syn_ack_mss = syn_mss(frame);
            }
        }
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_send() && offset < sent.len() {
            offset += socket.send_slice(&sent[offset..]).expect("send");
        }
        if socket.can_recv() {
            socket
                .recv(|bytes| (bytes.len(), received.extend_from_slice(bytes)))
                .expect("recv");
        }
        let done = received.len() == sent.len();
        // smoltcp sends at most one segment per socket per poll: let the host send a burst
        // per step, as a real host does, so the guest has more than one segment to echo.
        for _ in 0..HOST_POLLS_PER_STEP {
            net.poll_host();
        }
        done
    });
    assert!(received == sent, "the echo differs from what was sent");
    assert_eq!(net.counter("tcp_aborted"), 0);
    (syn_ack_mss, longest)
}

#[test]
fn with_segmentation_offload_the_stack_sends_large_segments_and_the_wire_sees_the_link_mss() {
    let mut net = Net::with_segmentation(Some(14 + 65535), MAX_FRAME);
    let (syn_ack_mss, longest) = tcp_echo_watching_the_wire(&mut net, 600_000);
    assert_eq!(
        syn_ack_mss,
        Some(1460),
        "the guest announces the link's MSS"
    );
    assert!(
        longest <= MAX_FRAME,
        "the wire carries only MTU-sized frames"
    );
    let handed = net.nic.borrow().longest;
    assert!(
        handed > 8 * MAX_FRAME,
        "the stack built large segments for the device to cut (longest {handed} bytes)"
    );
}

#[test]
fn with_segmentation_offload_a_peer_with_a_smaller_mss_gets_mtu_sized_segments() {
    // The host announces MSS 960: below the link's, so it is not raised.
    let mut net = Net::with_segmentation(Some(14 + 65535), 1014);
    let (syn_ack_mss, longest) = tcp_echo_watching_the_wire(&mut net, 200_000);
    assert_eq!(syn_ack_mss, Some(1460));
    assert!(
        longest <= 1014,
        "segments of at most the peer's MSS ({longest})"
    );
    assert!(
        net.nic.borrow().longest <= 1014,
        "nothing for the device to cut"
    );
}

#[test]
fn without_segmentation_offload_nothing_exceeds_the_mtu() {
    let mut net = Net::with_segmentation(None, MAX_FRAME);
    let (syn_ack_mss, longest) = tcp_echo_watching_the_wire(&mut net, 200_000);
    assert_eq!(syn_ack_mss, Some(1460));
    assert!(longest <= MAX_FRAME && net.nic.borrow().longest <= MAX_FRAME);
}

#[test]
fn a_burst_echoed_in_one_poll_leaves_in_that_poll() {
    let mut net = Net::new();
    let socket = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .connect(net.host.context(), (GUEST_IP, ECHO_PORT), 49_400)
        .expect("connect");
    net.run_until(1_000, "connected", |net| {
        net.host_sockets.get::<tcp::Socket>(socket).may_send()
    });
    // 20 full segments from the host, queued for the guest before it polls once.
    let burst = pattern(20 * 1460, 13);
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .send_slice(&burst)
        .expect("send");
    for _ in 0..HOST_POLLS_PER_STEP {
        net.poll_host();
    }
    let queued = net.wire.borrow().to_guest.len();
    assert!(queued >= 20, "the host sent its burst ({queued} frames)");
    net.wire.borrow_mut().from_guest.clear();
    net.nic.borrow_mut().published_at.clear();
    net.poll_guest();
    // The first egress pass's frames are handed to the device before the other 19 passes
    // build theirs (the device starts sending while the stack works), once per poll.
    let published_at = net.nic.borrow().published_at.clone();
    assert_eq!(published_at.len(), 1, "{published_at:?}");
    assert!(
        (1..20).contains(&published_at[0]),
        "published after the first pass, before the last: {published_at:?}"
    );
    let data_frames = net
        .wire
        .borrow()
        .from_guest
        .iter()
        .filter(|frame| frame.len() > 54)
        .count();
    assert_eq!(
        data_frames, 20,
        "one poll echoes the whole burst as 20 segments (smoltcp sends one per socket per \
         egress pass)"
    );
}
