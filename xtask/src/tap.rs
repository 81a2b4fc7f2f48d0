//! Userspace access to a tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`), and a tiny frame
//! reflector that plays a guest on it: it answers ARP for one address, ICMP echo and UDP echo on
//! port 7. The reflector checks the namespace, tap and clients without a kernel, and serves as
//! the "no VM" latency floor.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::client::internet_checksum;

/// `_IOW('T', 202, int)`: attach this file to a tun/tap interface.
const TUNSETIFF: u64 = 0x4004_54ca;

nix::ioctl_readwrite_bad!(
    /// `ioctl(fd, TUNSETIFF, &ifreq)`.
    tunsetiff,
    TUNSETIFF,
    IfReq
);
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    padding: [u8; 22],
}

const _: () = assert!(size_of::<IfReq>() == 40);

/// An open queue of a tap device: each read returns one Ethernet frame, each write sends one.
pub struct TapDevice {
    file: File,
    name: String,
}

impl TapDevice {
    /// Attaches to the existing tap `name` in the calling thread's network namespace (as QEMU
    /// does), with `multi_queue` matching how the tap was created.
    pub fn attach(name: &str, multi_queue: bool) -> io::Result<TapDevice> {
        if name.is_empty() || name.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad tap name {name:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut request = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
            padding: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) a 40-byte `struct ifreq`, which `request` is
        // for the duration of the call; the descriptor is open.
        unsafe { tunsetiff(file.as_raw_fd(), &raw mut request) }?;
        Ok(TapDevice {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout` for a frame; `Ok(None)` on timeout.
    pub fn read_frame(
        &mut self,
        buffer: &mut [u8],
        timeout: Duration,
    ) -> io::Result<Option<usize>> {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout)? == 0 {
            return Ok(None);
        }
        self.file.read(buffer).map(Some)
    }

    /// Sends one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)
    }
}

/// Counters of a [`TapReflector`].
#[derive(Debug, Default)]
pub struct ReflectorCounters {
    /// Frames read from the tap.
    pub frames_in: AtomicU64,
    /// ARP requests answered.
    pub arp_replies: AtomicU64,
    /// ICMP echo requests answered.
    pub icmp_replies: AtomicU64,
    /// UDP datagrams echoed.
    pub udp_echoes: AtomicU64,
}

/// A thread answering as a minimal guest at `ip`/`mac` on a tap: ARP, ICMP echo and UDP echo on
/// port 7. Stops (and joins) on drop.
pub struct TapReflector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// What it answered so far.
    pub counters: Arc<ReflectorCounters>,
}

impl TapReflector {
    /// Starts reflecting on `tap`.
    pub fn start(mut tap: TapDevice, ip: Ipv4Addr, mac: [u8; 6]) -> TapReflector {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ReflectorCounters::default());
        let thread = {
            let stop = Arc::clone(&stop);
            let counters = Arc::clone(&counters);
            thread::spawn(move || -> io::Result<()> {
                let mut buffer = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Some(length) = tap.read_frame(&mut buffer, Duration::from_millis(50))?
                    else {
                        continue;
                    };
                    counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = reflect(&buffer[..length], ip, mac, &counters) {
                        tap.write_frame(&reply)?;
                    }
                }
                Ok(())
            })
        };
        TapReflector {
            stop,
            thread: Some(thread),
            counters,
        }
    }

    /// Stops the thread and returns its result.
    pub fn stop(mut self) -> io::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the reflector thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for TapReflector {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The reply to one frame, when the reflector answers it.
pub fn reflect(
    frame: &[u8],
    ip: Ipv4Addr,
    mac: [u8; 6],
    counters: &ReflectorCounters,
) -> Option<Vec<u8>> {
    if frame.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut reply = frame.to_vec();
    reply[0..6].copy_from_slice(&frame[6..12]);
    reply[6..12].copy_from_slice(&mac);
    match ethertype {
        0x0806 => {
            let arp = &frame[14..];
            let is_request = arp.len() >= 28
                && arp[0..2] == [0, 1]
                && arp[2..4] == [8, 0]
                && arp[4] == 6
                && arp[5] == 4
                && arp[6..8] == [0, 1];
            if !is_request || arp[24..28] != ip.octets() {
                return None;
            }
            let out = &mut reply[14..];
            out[7] = 2; // reply
            out[18..24].copy_from_slice(&arp[8..14]); // target hw = requester
            out[24..28].copy_from_slice(&arp[14..18]); // target ip = requester
            out[8..14].copy_from_slice(&mac);
            out[14..18].copy_from_slice(&ip.octets());
            counters.arp_replies.fetch_add(1, Ordering::Relaxed);
            Some(reply)
        }
        0x0800 => {
            let packet = &frame[14..];
            let header = usize::from(*packet.first()? & 0x0F) * 4;
            if packet[0] >> 4 != 4 || header < 20 || packet.len() < header + 8 {
                return None;
            }
            if packet[16..20] != ip.octets() {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if total < header + 8 || total > packet.len() {
                return None;
            }
            reply.truncate(14 + total);
            let out = &mut reply[14..];
            out[12..16].copy_from_slice(&packet[16..20]);
            out[16..20].copy_from_slice(&packet[12..16]);
            out[8] = 64; // TTL
            match packet[9] {
                1 if packet[header] == 8 => {
                    let icmp = &mut out[header..total];
                    icmp[0] = 0; // echo reply
                    icmp[2..4].copy_from_slice(&[0, 0]);
                    let checksum = internet_checksum(icmp);
                    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
                    counters.icmp_replies.fetch_add(1, Ordering::Relaxed);
                }
                17 if u16::from_be_bytes([packet[header + 2], packet[header + 3]]) == 7 => {
                    let udp = &mut out[header..total];
                    let source_port = [packet[header], packet[header + 1]];
                    udp[0..2].copy_from_slice(&[0, 7]);
                    udp[2..4].copy_from_slice(&source_port);
                    udp[6..8].copy_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
                    counters.udp_echoes.fetch_add(1, Ordering::Relaxed);
                }
                _ => return None,
            }
            out[10..12].copy_from_slice(&[0, 0]);
            let checksum = internet_checksum(&out[..header]);
            out[10..12].copy_from_slice(&checksum.to_be_bytes());
            Some(reply)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn answers_arp_for_its_address_only() {
        let counters = ReflectorCounters::default();
        let mut frame = vec![0xFF; 6];
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&[10, 0, 2, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[10, 0, 2, 15]);
        let reply = reflect(&frame, Ipv4Addr::new(10, 0, 2, 15), MAC, &counters).expect("reply");
        assert_eq!(&reply[0..6], &HOST_MAC);
        assert_eq!(reply[21], 2);
        assert_eq!(&reply[22..28], &MAC);
        assert_eq!(&reply[28..32], &[10, 0, 2, 15]);
        assert_eq!(&reply[38..42], &[10, 0, 2, 2]);
        assert!(reflect(&frame, Ipv4Addr::new(10, 0, 2, 16), MAC, &counters).is_none());
    }

    #[test]
    fn echoes_udp_port_7_with_swapped_addresses() {
        let counters = ReflectorCounters::default();
        let mut frame = MAC.to_vec();
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&[8, 0]);
        let mut ip = vec![
            0x45, 0, 0, 31, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 2, 10, 0, 2, 15,
        ];
        let checksum = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&[0x9c, 0x40, 0, 7, 0, 11, 0, 0, b'a', b'b', b'c']);
        frame.resize(60, 0); // Ethernet padding
        let reply = reflect(&frame, Ipv4Addr::new(10, 0, 2, 15), MAC, &counters).expect("reply");
        assert_eq!(reply.len(), 14 + 31);
        assert_eq!(&reply[26..30], &[10, 0, 2, 15]);
        assert_eq!(&reply[30..34], &[10, 0, 2, 2]);
        assert_eq!(&reply[34..38], &[0, 7, 0x9c, 0x40]);
        assert_eq!(&reply[42..45], b"abc");
        assert_eq!(internet_checksum(&reply[14..34]), 0);
    }
}
