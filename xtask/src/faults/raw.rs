//! The host side of the tap: a raw `AF_PACKET` socket that writes whole frames onto it, the
//! tap's MAC, and the host's counters for it (`/proc/thread-self/net/dev` and
//! `/proc/thread-self/net/snmp`), all in the calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::ifaddrs::getifaddrs;
use nix::libc;
use nix::net::if_::if_nametoindex;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike, bind, send, socket,
};

/// A raw `AF_PACKET` socket bound to one interface, for writing whole Ethernet frames onto it.
/// It receives nothing (protocol 0). Needs root; binds in the calling thread's namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
}

impl PacketSocket {
    /// Opens a packet socket on `interface` (e.g. `tap0`) in the calling thread's namespace.
    pub fn open(interface: &str) -> io::Result<PacketSocket> {
        Ok(PacketSocket {
            fd: bound_packet_socket(interface, None)?,
            interface: interface.to_string(),
        })
    }

    /// The interface it writes to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Writes one frame (Ethernet header included) onto the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        send(self.fd.as_raw_fd(), frame, MsgFlags::empty())?;
        Ok(())
    }
}

/// A raw `AF_PACKET` socket bound to `interface`: with `protocol` `None` it receives nothing
/// (for writing frames), with `ETH_P_ALL` every frame crossing the interface.
fn bound_packet_socket(
    interface: &str,
    protocol: Option<nix::sys::socket::SockProtocol>,
) -> io::Result<OwnedFd> {
    let index = if_nametoindex(interface)?;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    let sll_protocol = match protocol {
        // ETH_P_ALL in network byte order, as the address's protocol too.
        Some(_) => (libc::ETH_P_ALL as u16).to_be(),
        None => 0,
    };
    let link = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol,
        sll_ifindex: i32::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index"))?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `link` is a fully initialised `sockaddr_ll`, valid for the length passed, for the
    // call; nix copies it into its own `LinkAddr`. (nix has no safe constructor for an
    // `AF_PACKET` address.)
    let address = unsafe {
        LinkAddr::from_raw(
            (&raw const link).cast(),
            Some(size_of::<libc::sockaddr_ll>() as libc::socklen_t),
        )
    }
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sockaddr_ll"))?;
    bind(fd.as_raw_fd(), &address)?;
    Ok(fd)
}

/// A raw `AF_PACKET` socket that receives every frame crossing one interface (`ETH_P_ALL`),
/// in both directions, for tests that must see what the guest put on the wire (a TCP
/// SYN-ACK's sequence number). Needs root; binds in the calling thread's namespace.
pub struct PacketCapture {
    fd: OwnedFd,
}

impl PacketCapture {
    /// Starts capturing on `interface` (e.g. `tap0`).
    pub fn open(interface: &str) -> io::Result<PacketCapture> {
        let fd = bound_packet_socket(interface, Some(nix::sys::socket::SockProtocol::EthAll))?;
        let timeout = nix::sys::time::TimeVal::new(0, 50_000);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        Ok(PacketCapture { fd })
    }

    /// The next frame, or `None` when none came within 50 ms.
    pub fn next_frame(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buffer = vec![0u8; 65536];
        match nix::sys::socket::recv(self.fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
            Ok(length) => {
                buffer.truncate(length);
                Ok(Some(buffer))
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }
}

/// An interface's counters from `/proc/thread-self/net/dev` (the calling thread's namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Frames the interface received (for a tap: written by QEMU, i.e. sent by the guest).
    pub rx_packets: u64,
    /// Frames the interface sent (for a tap: handed to QEMU, i.e. towards the guest).
    pub tx_packets: u64,
    /// Frames it dropped on the way to QEMU (the tap's queue was full).
    pub tx_dropped: u64,
}

/// Reads `interface`'s counters in the calling thread's network namespace.
pub fn interface_counters(interface: &str) -> io::Result<InterfaceCounters> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    parse_net_dev(&text, interface).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {interface} in /proc/thread-self/net/dev"),
        )
    })
}

/// Parses one interface's line of `/proc/net/dev`.
pub fn parse_net_dev(text: &str, interface: &str) -> Option<InterfaceCounters> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != interface {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        if fields.len() < 16 {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast;
        // tx: bytes packets errs drop fifo colls carrier compressed.
        return Some(InterfaceCounters {
            rx_packets: fields[1],
            tx_packets: fields[9],
            tx_dropped: fields[11],
        });
    }
    None
}

/// The host stack's `Tcp: OutRsts` (resets sent) in the calling thread's namespace, from
/// `/proc/thread-self/net/snmp`.
pub fn tcp_resets_sent() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    parse_snmp_tcp(&text, "OutRsts").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no Tcp OutRsts in /proc/thread-self/net/snmp",
        )
    })
}

/// One field of the `Tcp:` lines of `/proc/net/snmp` (a header line, then a value line).
pub fn parse_snmp_tcp(text: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|line| line.starts_with("Tcp:"));
    let header = lines.next()?;
    let values = lines.next()?;
    let index = header.split_whitespace().position(|name| name == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// The MAC of `interface` in the calling thread's namespace (its `AF_PACKET` entry in
/// `getifaddrs(3)`, which asks the kernel over a netlink socket opened by this thread).
pub fn interface_mac(interface: &str) -> io::Result<[u8; 6]> {
    if interface.is_empty() || interface.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    getifaddrs()?
        .filter(|entry| entry.interface_name == interface)
        .find_map(|entry| entry.address?.as_link_addr()?.addr())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no link-layer address for {interface}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  \
             tap0:    1234      10    0    0    0     0          0         0     5678      20    0    3    0     0       0          0\n";
        let counters = parse_net_dev(text, "tap0").expect("tap0");
        assert_eq!(
            counters,
            InterfaceCounters {
                rx_packets: 10,
                tx_packets: 20,
                tx_dropped: 3
            }
        );
        assert!(parse_net_dev(text, "tap1").is_none());
    }

    #[test]
    fn parses_snmp_tcp() {
        let text = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm RtoMin OutRsts InCsumErrors\n\
                    Tcp: 1 200 20 0\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(parse_snmp_tcp(text, "OutRsts"), Some(20));
        assert_eq!(parse_snmp_tcp(text, "Nope"), None);
    }
}
