//! The guest's network contract seen from the host: parsing the serial `ready` line, and QEMU
//! user networking (no root) with the guest's services forwarded to free ports on 127.0.0.1,
//! including booting a guest on it and waiting until it serves.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use crate::command::QemuCommand;
use crate::error::Error;
use crate::runner::{Guest, GuestExit, RunError, RunOptions, SerialLine};

/// The guest's UDP and TCP echo port.
pub const ECHO_PORT: u16 = 7;
/// The guest's stats port (UDP).
pub const STATS_PORT: u16 = 7007;
/// The default virtio-net device for network tests: `virtio-net-pci,netdev=n0`.
pub const DEFAULT_NIC: &str = "virtio-net-pci,netdev=n0";

/// The serial line the guest prints once its services accept traffic, e.g.
/// `vireo: ready ip=10.0.2.15/24 mac=52:54:00:12:34:56 mode=adaptive udp-echo=7 tcp-echo=7
/// stats=7007`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    /// The whole line.
    pub text: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The MAC, as printed.
    pub mac: String,
    /// The receive mode (`irq`, `poll` or `adaptive`).
    pub mode: String,
    /// Other `key=value` words on the line (`udp-echo`, `tcp-echo`, `stats`, ...).
    pub extra: Vec<(String, String)>,
}

impl ReadyLine {
    /// Parses a line that contains `ready` and the `ip=A.B.C.D/N`, `mac=` and `mode=` words.
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.iter().any(|w| *w == "ready" || *w == "ready:") {
            return None;
        }
        let value = |key: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let (ip, prefix) = value("ip")?.split_once('/')?;
        let mac = value("mac")?;
        let mac_ok = mac.split(':').count() == 6
            && mac
                .split(':')
                .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return None;
        }
        let extra = words
            .iter()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| !matches!(*k, "ip" | "mac" | "mode"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(ReadyLine {
            text: line.to_string(),
            ip: ip.parse().ok()?,
            prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
            mac: mac.to_string(),
            mode: value("mode")?.to_string(),
            extra,
        })
    }
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Waits for the guest's `ready` line (see [`ReadyLine`]) and parses it. When the guest ends
/// first, the error says how and the serial log shows why.
pub fn wait_for_ready(
    guest: &mut Guest,
    timeout: Duration,
) -> Result<(ReadyLine, SerialLine), RunError> {
    let line = guest.wait_for_line_matching(
        "the guest's `ready` line (ready ip=A.B.C.D/N mac=.. mode=..)",
        timeout,
        |text| ReadyLine::parse(text).is_some(),
    )?;
    match ReadyLine::parse(&line.text) {
        Some(ready) => Ok((ready, line)),
        None => Err(guest.check_failed(format!("unparsable ready line {:?}", line.text))),
    }
}

/// QEMU user networking with the guest's UDP echo, TCP echo and stats ports forwarded to free
/// ports on 127.0.0.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserNet {
    /// The guest address the forwards go to (10.0.2.15 by default).
    pub guest: Ipv4Addr,
    /// Host UDP port forwarded to the guest's UDP 7.
    pub udp_echo_port: u16,
    /// Host TCP port forwarded to the guest's TCP 7.
    pub tcp_echo_port: u16,
    /// Host UDP port forwarded to the guest's UDP 7007.
    pub stats_port: u16,
    /// Host TCP port forwarded to the guest's NBD export (TCP 10809), when asked for
    /// ([`UserNet::with_nbd`]).
    pub nbd_port: Option<u16>,
}

impl UserNet {
    /// Picks three free ports on 127.0.0.1 for a guest at the default 10.0.2.15. (A port can be
    /// taken by someone else before QEMU binds it; [`boot_on_user_net`] retries then.)
    pub fn allocate() -> Result<UserNet, Error> {
        UserNet::allocate_for(Ipv4Addr::new(10, 0, 2, 15))
    }

    /// Like [`UserNet::allocate`] for a guest at `guest` (inside QEMU's 10.0.2.0/24).
    pub fn allocate_for(guest: Ipv4Addr) -> Result<UserNet, Error> {
        // Hold all three sockets until every port is chosen, so that they differ.
        let udp = bind_free_udp()?;
        let stats = bind_free_udp()?;
        let tcp = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            context: "finding a free TCP port on 127.0.0.1".to_string(),
            source,
        })?;
        let port = |address: std::io::Result<SocketAddr>| {
            address.map(|a| a.port()).map_err(|source| Error::Io {
                context: "reading a bound port".to_string(),
                source,
            })
        };
        Ok(UserNet {
            guest,
            udp_echo_port: port(udp.local_addr())?,
            tcp_echo_port: port(tcp.local_addr())?,
            stats_port: port(stats.local_addr())?,
            nbd_port: None,
        })
    }

    /// The same forwards plus one free TCP port on 127.0.0.1 to the guest's NBD export.
    pub fn with_nbd(self) -> Result<UserNet, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            context: "finding a free TCP port on 127.0.0.1".to_string(),
            source,
        })?;
        let port = listener.local_addr().map_err(|source| Error::Io {
            context: "reading a bound port".to_string(),
            source,
        })?;
        Ok(UserNet {
            nbd_port: Some(port.port()),
            ..self
        })
    }

    /// The `-netdev` spec: `user,id=ID,hostfwd=udp:127.0.0.1:P-GUEST:7,hostfwd=tcp:...:7,
    /// hostfwd=udp:...:7007` (and `hostfwd=tcp:...:10809` with the NBD forward).
    pub fn netdev(&self, id: &str) -> String {
        let guest = self.guest;
        let mut spec = format!(
            "user,id={id},hostfwd=udp:127.0.0.1:{}-{guest}:{ECHO_PORT},\
             hostfwd=tcp:127.0.0.1:{}-{guest}:{ECHO_PORT},\
             hostfwd=udp:127.0.0.1:{}-{guest}:{STATS_PORT}",
            self.udp_echo_port, self.tcp_echo_port, self.stats_port
        );
        if let Some(port) = self.nbd_port {
            spec.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{port}-{guest}:{}",
                crate::nbd::NBD_PORT
            ));
        }
        spec
    }

    /// Where the guest's NBD export is reached, with the NBD forward.
    pub fn nbd(&self) -> Option<SocketAddr> {
        self.nbd_port
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// Where to send UDP echo requests.
    pub fn udp_echo(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.udp_echo_port))
    }

    /// Where to connect for TCP echo.
    pub fn tcp_echo(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.tcp_echo_port))
    }

    /// Where to send stats requests.
    pub fn stats(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.stats_port))
    }
}

fn bind_free_udp() -> Result<UdpSocket, Error> {
    UdpSocket::bind("127.0.0.1:0").map_err(|source| Error::Io {
        context: "finding a free UDP port on 127.0.0.1".to_string(),
        source,
    })
}

/// A guest booted on user networking and serving.
pub struct UserNetGuest {
    /// The running QEMU.
    pub guest: Guest,
    /// The forwarded ports.
    pub net: UserNet,
    /// The parsed `ready` line.
    pub ready: ReadyLine,
    /// When it arrived.
    pub ready_at: Duration,
}

/// Boots `base` (a command without a NIC) with `-netdev <user net> -device <nic>` (the NIC spec
/// must use `netdev=n0`), and waits up to `ready_wait` for the `ready` line. When QEMU cannot
/// bind a forwarded port (taken by another process in the meantime), it retries with new ports,
/// up to three times.
pub fn boot_on_user_net(
    base: &QemuCommand,
    nic: &str,
    options: RunOptions,
    ready_wait: Duration,
) -> Result<UserNetGuest, RunError> {
    boot_on_user_net_forwarding(base, nic, options, ready_wait, false)
}

/// [`boot_on_user_net`], with the guest's NBD export forwarded too when `nbd`.
pub fn boot_on_user_net_forwarding(
    base: &QemuCommand,
    nic: &str,
    options: RunOptions,
    ready_wait: Duration,
    nbd: bool,
) -> Result<UserNetGuest, RunError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut net = UserNet::allocate().map_err(RunError::setup)?;
        if nbd {
            net = net.with_nbd().map_err(RunError::setup)?;
        }
        let command = base.clone().netdev(net.netdev("n0")).device(nic);
        crate::log(&format!("running: {}", command.command_line()));
        let mut guest = Guest::spawn(&command, options)?;
        match wait_for_ready(&mut guest, ready_wait) {
            Ok((ready, line)) => {
                return Ok(UserNetGuest {
                    guest,
                    net,
                    ready,
                    ready_at: line.at,
                });
            }
            Err(failure)
                if attempt < 3
                    && failure.serial.is_empty()
                    && matches!(failure.exit, Some(GuestExit::QemuStatus(_)))
                    && failure.qemu_stderr.contains("forward") =>
            {
                crate::log(&format!(
                    "QEMU could not bind a forwarded port ({}); retrying with new ports",
                    failure.qemu_stderr.trim()
                ));
            }
            Err(failure) => return Err(failure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_ready_line() {
        let line = "vireo: ready ip=10.0.2.15/24 mac=52:54:00:12:34:56 mode=adaptive udp-echo=7 \
                    tcp-echo=7 stats=7007";
        let ready = ReadyLine::parse(line).expect("ready line");
        assert_eq!(ready.ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(ready.prefix, 24);
        assert_eq!(ready.mac, "52:54:00:12:34:56");
        assert_eq!(ready.mode, "adaptive");
        assert!(
            ready
                .extra
                .contains(&("stats".to_string(), "7007".to_string()))
        );
        assert!(ReadyLine::parse("virtio-net: rx ring ready").is_none());
        assert!(ReadyLine::parse("ready ip=10.0.2.15 mac=52:54:00:12:34:56 mode=irq").is_none());
        assert!(ReadyLine::parse("ready ip=10.0.2.15/24 mac=zz mode=irq").is_none());
    }

    #[test]
    fn user_netdev_forwards_three_ports() {
        let net = UserNet {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            udp_echo_port: 4000,
            tcp_echo_port: 4001,
            stats_port: 4002,
            nbd_port: None,
        };
        assert_eq!(
            net.netdev("n0"),
            "user,id=n0,hostfwd=udp:127.0.0.1:4000-10.0.2.15:7,\
             hostfwd=tcp:127.0.0.1:4001-10.0.2.15:7,hostfwd=udp:127.0.0.1:4002-10.0.2.15:7007"
        );
        let allocated = UserNet::allocate().expect("free ports");
        assert_ne!(allocated.udp_echo_port, allocated.stats_port);
        assert_eq!(allocated.nbd(), None);
        let with_nbd = UserNet {
            nbd_port: Some(4003),
            ..net
        };
        assert!(with_nbd.netdev("n0").ends_with(
            ",hostfwd=udp:127.0.0.1:4002-10.0.2.15:7007,hostfwd=tcp:127.0.0.1:4003-10.0.2.15:10809"
        ));
        assert_eq!(with_nbd.nbd().map(|a| a.port()), Some(4003));
    }
}
