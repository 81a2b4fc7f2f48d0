//! Host tests of the NBD server (`src/net/services/nbd.rs`) through the in-memory NIC: the
//! host's smoltcp TCP sockets speak NBD by hand-built bytes (the NBD protocol document's
//! "Fixed newstyle negotiation", "Option types", "Request message", "Simple reply message")
//! to the guest's service over a [`MemoryDisk`].

use std::boxed::Box;
use std::string::String;
use std::vec;
use std::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use super::{GUEST_IP, Net, pattern};
use crate::block::{BlockError, MemoryDisk, RequestKind};
use crate::net::services::nbd::{
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM, NBD_PORT, NbdConfig, NbdService,
};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const DISK: u64 = 1 << 20;
const EXPORT: &str = "vireo";

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FUA: u16 = 1;

fn net_with(disk: &MemoryDisk, read_only: bool) -> Net {
    let config = NbdConfig {
        export_name: EXPORT.into(),
        read_only,
        ..NbdConfig::default()
    };
    Net::with_services(vec![Box::new(NbdService::new(disk.clone(), config))])
}

fn connect(net: &mut Net, local_port: u16) -> SocketHandle {
    let socket = net.host_tcp();
    net.host_sockets
        .get_mut::<tcp::Socket>(socket)
        .connect(net.host.context(), (GUEST_IP, NBD_PORT), local_port)
        .expect("connect");
    socket
}

fn send(net: &mut Net, socket: SocketHandle, bytes: &[u8]) {
    let mut offset = 0;
    net.run_until(5_000, "send", |net| {
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_send() && offset < bytes.len() {
            offset += socket.send_slice(&bytes[offset..]).expect("send");
        }
        offset == bytes.len()
    });
}

fn recv_exact(net: &mut Net, socket: SocketHandle, length: usize) -> Vec<u8> {
    let mut received = Vec::new();
    net.run_until(5_000, "receive", |net| {
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_recv() {
            let want = length - received.len();
            socket
                .recv(|bytes| {
                    let take = bytes.len().min(want);
                    received.extend_from_slice(&bytes[..take]);
                    (take, ())
                })
                .expect("recv");
        }
        received.len() == length
    });
    received
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the greeting and answers with `client_flags`; returns the handshake flags.
fn greet(net: &mut Net, socket: SocketHandle, client_flags: u32) -> u16 {
    let greeting = recv_exact(net, socket, 18);
    assert_eq!(u64_at(&greeting, 0), NBDMAGIC);
    assert_eq!(u64_at(&greeting, 8), IHAVEOPT);
    send(net, socket, &client_flags.to_be_bytes());
    u16_at(&greeting, 16)
}

fn option(net: &mut Net, socket: SocketHandle, option: u32, data: &[u8]) {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    send(net, socket, &bytes);
}

/// One option reply: (option, type, data).
fn option_reply(net: &mut Net, socket: SocketHandle) -> (u32, u32, Vec<u8>) {
    let header = recv_exact(net, socket, 20);
    assert_eq!(u64_at(&header, 0), OPTION_REPLY_MAGIC);
    let length = u32_at(&header, 16) as usize;
    let data = recv_exact(net, socket, length);
    (u32_at(&header, 8), u32_at(&header, 12), data)
}

fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// Connects, negotiates with NBD_OPT_GO (asking for NBD_INFO_BLOCK_SIZE); returns the socket,
/// the export size and the transmission flags.
fn client(net: &mut Net, local_port: u16) -> (SocketHandle, u64, u16) {
    let socket = connect(net, local_port);
    let flags = greet(net, socket, 0b11);
    assert_eq!(flags, 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
    option(net, socket, 7, &go_data(EXPORT, &[3]));
    let mut size = None;
    let mut block_size = None;
    loop {
        let (opt, kind, data) = option_reply(net, socket);
        assert_eq!(opt, 7);
        match kind {
            3 => match u16_at(&data, 0) {
                0 => {
                    assert_eq!(data.len(), 12);
                    size = Some((u64_at(&data, 2), u16_at(&data, 10)));
                }
                3 => {
                    assert_eq!(data.len(), 14);
                    block_size = Some((u32_at(&data, 2), u32_at(&data, 6), u32_at(&data, 10)));
                }
                other => panic!("unexpected info {other}"),
            },
            1 => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    assert_eq!(block_size, Some((512, 4096, 1 << 20)));
    let (size, flags) = size.expect("NBD_INFO_EXPORT before NBD_REP_ACK");
    (socket, size, flags)
}

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(28);
    bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&kind.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes
}

/// A simple reply's (error, cookie).
fn reply(net: &mut Net, socket: SocketHandle) -> (u32, u64) {
    let header = recv_exact(net, socket, 16);
    assert_eq!(u32_at(&header, 0), SIMPLE_REPLY_MAGIC);
    (u32_at(&header, 4), u64_at(&header, 8))
}

fn write(net: &mut Net, socket: SocketHandle, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
    let mut bytes = request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
    bytes.extend_from_slice(data);
    send(net, socket, &bytes);
}

fn read(net: &mut Net, socket: SocketHandle, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    send(net, socket, &request(0, CMD_READ, cookie, offset, length));
    assert_eq!(reply(net, socket), (0, cookie));
    recv_exact(net, socket, length as usize)
}

fn closed_by_guest(net: &mut Net, socket: SocketHandle) {
    net.run_until(2_000, "the guest closes", |net| {
        !net.host_sockets.get::<tcp::Socket>(socket).may_recv()
    });
}

#[test]
fn go_then_write_read_round_trip_flush_and_disconnect() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let (socket, size, flags) = client(&mut net, 49_152);
    assert_eq!(size, DISK);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES.
    assert_eq!(flags, 1 | 4 | 8 | 32 | 64);

    let data = pattern(64 * 1024, 9);
    write(&mut net, socket, 0, 1, 4096, &data);
    assert_eq!(reply(&mut net, socket), (0, 1));
    assert!(disk.state().data[4096..4096 + data.len()] == data[..]);
    assert_eq!(read(&mut net, socket, 2, 4096, data.len() as u32), data);
    // Unaligned inside: a read of 512 bytes at 4096 + 512.
    assert_eq!(read(&mut net, socket, 3, 4608, 512), data[512..1024]);

    send(&mut net, socket, &request(0, CMD_FLUSH, 4, 0, 0));
    assert_eq!(reply(&mut net, socket), (0, 4));
    assert!(disk.state().durable[4096..4096 + data.len()] == data[..]);

    send(&mut net, socket, &request(0, CMD_TRIM, 5, 4096, 512));
    assert_eq!(reply(&mut net, socket), (0, 5));
    send(
        &mut net,
        socket,
        &request(0, CMD_WRITE_ZEROES, 6, 8192, 1024),
    );
    assert_eq!(reply(&mut net, socket), (0, 6));
    assert!(disk.state().data[8192..9216].iter().all(|&byte| byte == 0));

    send(&mut net, socket, &request(0, CMD_DISC, 7, 0, 0));
    closed_by_guest(&mut net, socket);
}

#[test]
fn a_fua_write_is_answered_only_after_the_device_flushed() {
    let disk = MemoryDisk::new(DISK, false);
    disk.state().latency = 5;
    let mut net = net_with(&disk, false);
    let (socket, _, _) = client(&mut net, 49_153);

    // Without FUA: acknowledged once written, not flushed.
    write(&mut net, socket, 0, 1, 0, &[0xaa; 512]);
    assert_eq!(reply(&mut net, socket), (0, 1));
    assert_eq!(disk.state().data[0], 0xaa);
    assert_eq!(disk.state().durable[0], 0);
    assert_eq!(disk.state().flushes, 0);

    // With FUA: by the time the reply arrives, the data is durable.
    write(&mut net, socket, FUA, 2, 512, &[0xbb; 512]);
    assert_eq!(reply(&mut net, socket), (0, 2));
    assert_eq!(disk.state().flushes, 1);
    assert!(
        disk.state().durable[..1024]
            .iter()
            .take(512)
            .all(|&b| b == 0xaa)
    );
    assert!(disk.state().durable[512..1024].iter().all(|&b| b == 0xbb));
    let log: Vec<_> = disk.state().log.iter().map(|entry| entry.1).collect();
    assert_eq!(
        log,
        [RequestKind::Write, RequestKind::Write, RequestKind::Flush]
    );
}

#[test]
fn errors_eperm_einval_enospc_and_the_devices_eio() {
    let read_only = MemoryDisk::new(DISK, true);
    let mut net = net_with(&read_only, false);
    let (socket, _, flags) = client(&mut net, 49_154);
    assert_eq!(flags & 2, 2, "READ_ONLY");
    write(&mut net, socket, 0, 1, 0, &[1; 512]);
    assert_eq!(reply(&mut net, socket), (NBD_EPERM, 1));
    send(&mut net, socket, &request(0, CMD_TRIM, 2, 0, 512));
    assert_eq!(reply(&mut net, socket), (NBD_EPERM, 2));
    assert!(read_only.state().data[..512].iter().all(|&b| b == 0));
    // Reads still work.
    assert_eq!(read(&mut net, socket, 3, 0, 512), [0; 512]);

    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let (socket, _, _) = client(&mut net, 49_155);
    let cases: [(Vec<u8>, u32); 7] = [
        // A read past the end.
        (request(0, CMD_READ, 10, DISK - 512, 1024), NBD_EINVAL),
        // An offset overflowing with its length.
        (request(0, CMD_READ, 11, u64::MAX - 511, 512), NBD_EINVAL),
        // Misaligned.
        (request(0, CMD_READ, 12, 100, 512), NBD_EINVAL),
        // Beyond the maximum payload.
        (request(0, CMD_READ, 13, 0, (1 << 20) + 512), NBD_EINVAL),
        // An unknown command and an unknown flag.
        (request(0, 42, 14, 0, 0), NBD_EINVAL),
        (request(1 << 7, CMD_READ, 15, 0, 512), NBD_EINVAL),
        // A flush with a length.
        (request(0, CMD_FLUSH, 16, 0, 512), NBD_EINVAL),
    ];
    for (bytes, error) in cases {
        let cookie = u64_at(&bytes, 8);
        send(&mut net, socket, &bytes);
        assert_eq!(reply(&mut net, socket), (error, cookie), "cookie {cookie}");
    }
    // A write past the end: ENOSPC, its payload consumed.
    write(&mut net, socket, 0, 20, DISK - 512, &[1; 1024]);
    assert_eq!(reply(&mut net, socket), (NBD_ENOSPC, 20));
    // A write beyond the maximum payload: its payload skipped, never stored, EINVAL.
    write(&mut net, socket, 0, 21, 0, &vec![2; (1 << 20) + 512]);
    assert_eq!(reply(&mut net, socket), (NBD_EINVAL, 21));
    // The device fails a write.
    disk.state().fail_next = Some((RequestKind::Write, BlockError::Io));
    write(&mut net, socket, 0, 22, 0, &[3; 512]);
    assert_eq!(reply(&mut net, socket), (NBD_EIO, 22));
    // And the connection still serves.
    assert_eq!(read(&mut net, socket, 23, 0, 512), [0; 512]);
}

#[test]
fn a_bad_request_magic_disconnects_that_client_only() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let (good, _, _) = client(&mut net, 49_156);
    let (bad, _, _) = client(&mut net, 49_157);
    let mut bytes = request(0, CMD_READ, 1, 0, 512);
    bytes[0] ^= 0xff;
    send(&mut net, bad, &bytes);
    closed_by_guest(&mut net, bad);
    write(&mut net, good, 0, 2, 0, &[7; 512]);
    assert_eq!(reply(&mut net, good), (0, 2));
    assert_eq!(read(&mut net, good, 3, 0, 512), [7; 512]);
    // The slot is free again: a third client is served.
    net.host_sockets.get_mut::<tcp::Socket>(bad).abort();
    let (third, _, _) = client(&mut net, 49_158);
    assert_eq!(read(&mut net, third, 4, 0, 512), [7; 512]);
}

#[test]
fn list_info_unknown_options_and_export_name() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let socket = connect(&mut net, 49_159);
    greet(&mut net, socket, 0b11);

    option(&mut net, socket, 3, &[]);
    let (opt, kind, data) = option_reply(&mut net, socket);
    assert_eq!((opt, kind), (3, 2), "NBD_REP_SERVER");
    assert_eq!(u32_at(&data, 0) as usize, EXPORT.len());
    assert_eq!(&data[4..], EXPORT.as_bytes());
    assert_eq!(option_reply(&mut net, socket), (3, 1, Vec::new()));

    // NBD_OPT_LIST with data: invalid.
    option(&mut net, socket, 3, b"x");
    assert_eq!(
        option_reply(&mut net, socket),
        (3, (1 << 31) + 3, Vec::new())
    );
    // NBD_OPT_STRUCTURED_REPLY and an unknown option: unsupported.
    option(&mut net, socket, 8, &[]);
    assert_eq!(
        option_reply(&mut net, socket),
        (8, (1 << 31) + 1, Vec::new())
    );
    option(&mut net, socket, 0x1234, b"data");
    assert_eq!(
        option_reply(&mut net, socket),
        (0x1234, (1 << 31) + 1, Vec::new())
    );
    // Too much option data: skipped, too big.
    option(&mut net, socket, 0x1235, &vec![0; 20_000]);
    assert_eq!(
        option_reply(&mut net, socket),
        (0x1235, (1 << 31) + 9, Vec::new())
    );
    // NBD_OPT_INFO of an unknown export, then of the default one (the empty name).
    option(&mut net, socket, 6, &go_data("nope", &[]));
    assert_eq!(
        option_reply(&mut net, socket),
        (6, (1 << 31) + 6, Vec::new())
    );
    option(&mut net, socket, 6, &go_data("", &[]));
    let mut kinds = Vec::new();
    loop {
        let (opt, kind, _) = option_reply(&mut net, socket);
        assert_eq!(opt, 6);
        kinds.push(kind);
        if kind == 1 {
            break;
        }
    }
    assert_eq!(kinds, [3, 3, 1]);
    // A malformed NBD_OPT_GO (name length beyond the data).
    option(&mut net, socket, 7, &[0, 0, 0, 9, 0, 0]);
    assert_eq!(
        option_reply(&mut net, socket),
        (7, (1 << 31) + 3, Vec::new())
    );

    // NBD_OPT_EXPORT_NAME: size, flags, no zeroes (NO_ZEROES negotiated).
    option(&mut net, socket, 1, EXPORT.as_bytes());
    let export = recv_exact(&mut net, socket, 10);
    assert_eq!(u64_at(&export, 0), DISK);
    assert_eq!(u16_at(&export, 8), 1 | 4 | 8 | 32 | 64);
    assert_eq!(read(&mut net, socket, 1, 0, 512), [0; 512]);

    // Without NO_ZEROES, the 124 zeroes follow.
    let socket = connect(&mut net, 49_160);
    greet(&mut net, socket, 0b01);
    option(&mut net, socket, 1, b"");
    let export = recv_exact(&mut net, socket, 10 + 124);
    assert!(export[10..].iter().all(|&b| b == 0));
    assert_eq!(read(&mut net, socket, 1, 0, 512), [0; 512]);

    // An unknown export name ends the session; so do unknown client flags and NBD_OPT_ABORT
    // (after its acknowledgement).
    let socket = connect(&mut net, 49_161);
    greet(&mut net, socket, 0b11);
    option(&mut net, socket, 1, b"nope");
    closed_by_guest(&mut net, socket);
    net.host_sockets.get_mut::<tcp::Socket>(socket).close();
    let socket = connect(&mut net, 49_162);
    greet(&mut net, socket, 0b100);
    closed_by_guest(&mut net, socket);
    net.host_sockets.get_mut::<tcp::Socket>(socket).close();
    let socket = connect(&mut net, 49_163);
    greet(&mut net, socket, 0b11);
    option(&mut net, socket, 2, &[]);
    assert_eq!(option_reply(&mut net, socket), (2, 1, Vec::new()));
    closed_by_guest(&mut net, socket);
}

#[test]
fn two_clients_interleaved_with_out_of_order_device_completions() {
    let disk = MemoryDisk::new(DISK, false);
    {
        let mut state = disk.state();
        state.latency = 3;
        state.reverse = true;
        state.queue_depth = 3;
    }
    let mut net = net_with(&disk, false);
    let (first, _, _) = client(&mut net, 49_164);
    let (second, _, _) = client(&mut net, 49_165);
    let a = pattern(8192, 1);
    let b = pattern(8192, 2);
    // Both clients pipeline four writes each before reading any reply.
    let mut bytes_a = Vec::new();
    let mut bytes_b = Vec::new();
    for index in 0..4u64 {
        bytes_a.extend(request(0, CMD_WRITE, 100 + index, index * 2048, 2048));
        bytes_a.extend_from_slice(&a[index as usize * 2048..][..2048]);
        bytes_b.extend(request(
            0,
            CMD_WRITE,
            200 + index,
            65536 + index * 2048,
            2048,
        ));
        bytes_b.extend_from_slice(&b[index as usize * 2048..][..2048]);
    }
    send(&mut net, first, &bytes_a);
    send(&mut net, second, &bytes_b);
    let mut cookies_a: Vec<_> = (0..4).map(|_| reply(&mut net, first)).collect();
    let mut cookies_b: Vec<_> = (0..4).map(|_| reply(&mut net, second)).collect();
    cookies_a.sort_unstable();
    cookies_b.sort_unstable();
    assert_eq!(cookies_a, [(0, 100), (0, 101), (0, 102), (0, 103)]);
    assert_eq!(cookies_b, [(0, 200), (0, 201), (0, 202), (0, 203)]);
    assert_eq!(read(&mut net, second, 1, 65536, 8192), b);
    assert_eq!(read(&mut net, first, 2, 0, 8192), a);
    // Eight writes on a queue of three: some waited for room, and the stats line says so.
    let mut line = String::new();
    net.services.write_stats(&mut line);
    let deferred: u64 = line
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix("nbd_deferred="))
        .and_then(|value| value.parse().ok())
        .expect("nbd_deferred on the stats line");
    assert!(
        deferred >= 5,
        "nbd_deferred={deferred} for 8 writes on a queue of 3"
    );
}

#[test]
fn a_client_that_never_closes_after_the_server_did_loses_its_slot() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    // Every slot (four) taken by a client the server disconnects, which never closes.
    for index in 0..4 {
        let socket = connect(&mut net, 49_170 + index);
        greet(&mut net, socket, 0b100);
        closed_by_guest(&mut net, socket);
    }
    // After the close timeout, the slots listen again and a new client is served.
    let (socket, _, _) = client(&mut net, 49_180);
    assert_eq!(read(&mut net, socket, 1, 0, 512), [0; 512]);
    assert_eq!(net.counter("nbd_violations"), 4);
}

#[test]
fn a_write_longer_than_any_tolerated_payload_is_a_disconnect_not_an_allocation() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let (socket, _, _) = client(&mut net, 49_190);
    // 2^32 - 1 bytes announced; only the header is sent.
    send(&mut net, socket, &request(0, CMD_WRITE, 1, 0, u32::MAX));
    closed_by_guest(&mut net, socket);
    assert_eq!(net.counter("nbd_violations"), 1);
    assert_eq!(disk.state().log.len(), 0);
}

#[test]
fn a_client_that_never_reads_its_option_replies_stops_being_read() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let socket = connect(&mut net, 49_191);
    greet(&mut net, socket, 0b11);
    // Up to 20000 NBD_OPT_LIST (16 bytes each, 48 bytes of replies each), none of the replies
    // read: once the replies back up (through both TCP buffers and the guest's output), the guest
    // stops reading, so the host's send buffer fills.
    let mut list = Vec::new();
    list.extend_from_slice(&IHAVEOPT.to_be_bytes());
    list.extend_from_slice(&3u32.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    let mut sent = 0;
    for _ in 0..3_000 {
        let host = net.host_sockets.get_mut::<tcp::Socket>(socket);
        while sent < 20_000 && host.send_capacity() - host.send_queue() >= list.len() {
            host.send_slice(&list).expect("send");
            sent += 1;
        }
        net.step();
    }
    assert!(
        sent < 20_000,
        "the guest kept reading ({sent} options sent)"
    );
    // Reading the replies lets it go on: every option sent is answered.
    for _ in 0..sent {
        let (_, kind, _) = option_reply(&mut net, socket);
        assert_eq!(kind, 2);
        assert_eq!(option_reply(&mut net, socket).1, 1);
    }
}

#[test]
fn a_client_that_never_finishes_the_handshake_is_reset() {
    let disk = MemoryDisk::new(DISK, false);
    let mut net = net_with(&disk, false);
    let socket = connect(&mut net, 49_192);
    recv_exact(&mut net, socket, 18);
    // No client flags: after the handshake timeout (10 s), the guest resets the connection.
    net.run_until(12_000, "the handshake times out", |net| {
        !net.host_sockets.get::<tcp::Socket>(socket).is_open()
    });
    assert_eq!(net.counter("nbd_timeouts"), 1);
    assert!(net.now.total_millis() > 10_000);
}

#[test]
fn poll_at_is_now_while_the_device_has_requests_in_flight() {
    use crate::block::{BlockDevice, BlockRequest};
    use crate::net::service::Service;
    use smoltcp::time::Instant;

    let disk = MemoryDisk::new(DISK, false);
    disk.state().latency = 3;
    let service = NbdService::new(disk.clone(), NbdConfig::default());
    let now = Instant::from_millis(5);
    assert_eq!(service.poll_at(now), None);
    assert!(disk.clone().submit(1, BlockRequest::Flush).is_ok());
    assert_eq!(service.poll_at(now), Some(now));
}

#[test]
fn pipelined_requests_beyond_the_data_budget_are_all_served_in_turn() {
    let disk = MemoryDisk::new(DISK, false);
    disk.state().latency = 4;
    disk.state().data[..4096 * 6].copy_from_slice(&pattern(4096 * 6, 3));
    let config = NbdConfig {
        export_name: EXPORT.into(),
        max_payload: 4096,
        ..NbdConfig::default()
    };
    let mut net = Net::with_services(vec![Box::new(NbdService::new(disk.clone(), config))]);
    let socket = connect(&mut net, 49_193);
    greet(&mut net, socket, 0b11);
    option(&mut net, socket, 1, b"");
    recv_exact(&mut net, socket, 10);
    // Six reads of one maximum payload each, sent at once: the server takes them one budget
    // at a time, and answers each.
    let mut bytes = Vec::new();
    for index in 0..6u64 {
        bytes.extend(request(0, CMD_READ, index, index * 4096, 4096));
    }
    send(&mut net, socket, &bytes);
    let expected = pattern(4096 * 6, 3);
    for index in 0..6u64 {
        assert_eq!(reply(&mut net, socket), (0, index));
        let data = recv_exact(&mut net, socket, 4096);
        assert!(data[..] == expected[index as usize * 4096..][..4096]);
    }
    let reads = disk.state().log.len();
    assert_eq!(reads, 6);
}

#[test]
fn replies_sent_while_more_are_queued_never_grow_the_output_beyond_its_budget() {
    // Many reads pipelined by a client that takes its replies slowly: the output always has
    // unsent bytes when new replies are queued, and what was sent must still be given back.
    let disk = MemoryDisk::new(DISK, false);
    disk.state()
        .data
        .copy_from_slice(&pattern(DISK as usize, 5));
    let config = NbdConfig {
        export_name: EXPORT.into(),
        max_in_flight: 64,
        ..NbdConfig::default()
    };
    let mut net = Net::with_services(vec![Box::new(NbdService::new(disk.clone(), config))]);
    let socket = connect(&mut net, 49_194);
    greet(&mut net, socket, 0b11);
    option(&mut net, socket, 1, b"");
    recv_exact(&mut net, socket, 10);
    const READS: u64 = 96;
    const LENGTH: u32 = 32 * 1024;
    let mut bytes = Vec::new();
    for index in 0..READS {
        let offset = (index * u64::from(LENGTH)) % DISK;
        bytes.extend(request(0, CMD_READ, index, offset, LENGTH));
    }
    send(&mut net, socket, &bytes);
    let expected = pattern(DISK as usize, 5);
    let total = READS as usize * (16 + LENGTH as usize);
    let mut received = Vec::with_capacity(total);
    net.run_until(200_000, "every reply, taken slowly", |net| {
        let socket = net.host_sockets.get_mut::<tcp::Socket>(socket);
        if socket.can_recv() {
            socket
                .recv(|bytes| {
                    let take = bytes.len().min(1500).min(total - received.len());
                    received.extend_from_slice(&bytes[..take]);
                    (take, ())
                })
                .expect("recv");
        }
        received.len() == total
    });
    for (index, reply) in received.chunks(16 + LENGTH as usize).enumerate() {
        assert_eq!(u32_at(reply, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!((u32_at(reply, 4), u64_at(reply, 8)), (0, index as u64));
        let offset = (index * LENGTH as usize) % DISK as usize;
        assert!(reply[16..] == expected[offset..offset + LENGTH as usize]);
    }
    let mut line = String::new();
    net.services.write_stats(&mut line);
    let peak: usize = line
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix("nbd_output_peak="))
        .expect("nbd_output_peak on the stats line")
        .parse()
        .expect("a number");
    // The budget: about one maximum payload of data in flight and unsent, plus one reply.
    println!("nbd_output_peak={peak}");
    assert!(
        peak > 0 && peak <= 3 << 20,
        "the output grew to {peak} bytes"
    );
}
