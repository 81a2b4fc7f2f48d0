//! RFC 6528 initial sequence numbers for smoltcp's TCP, by sequence-number translation
//! between the stack and the wire.
//!
//! # Why a translation
//!
//! smoltcp 0.12 draws every ISN (and ephemeral port) from one internal PCG32 generator
//! (`smoltcp/src/rand.rs`, `random_seq_no` in `socket/tcp.rs`), seeded once from
//! `Config::random_seed`. It has no hook to supply ISNs, and a PCG32's outputs reveal its
//! state: an attacker who sees a few of the guest's ISNs can predict the next ones, for any
//! peer. Seeding it from the CSPRNG ([`crate::entropy`]) makes the *first* outputs
//! unpredictable but not the later ones.
//!
//! Rather than fork smoltcp, the NIC adapter rewrites TCP segments the way a firewall's
//! "modulate state" does: every segment the stack sends gets
//! `F(local address, local port, remote address, remote port, key)` added to its sequence
//! number, and every segment that arrives gets the same `F` subtracted from its
//! acknowledgment number and from the edges of its SACK blocks (RFC 2018), which are all
//! numbers in the guest's sequence space. The stack never sees the offset; the wire never
//! sees the stack's numbers. `F` is SipHash-2-4 (the `siphasher` crate), keyed with 128 bits
//! from the CSPRNG, of the 4-tuple: RFC 6528 §3's `ISN = M + F(localip, localport, remoteip,
//! remoteport, secretkey)` with smoltcp's own random number in the role of `M`.
//!
//! # What it gives
//!
//! RFC 6528 §3's property: seeing the ISNs of connections on one 4-tuple tells nothing about
//! those on another, because `F` differs per 4-tuple and depends on a key the attacker does
//! not know; and smoltcp's own `R` still varies between connections on the same 4-tuple. The
//! key is drawn per boot from the CSPRNG, so two boots from identical QEMU command lines give
//! different ISNs whenever a real entropy source exists (virtio-rng, RDSEED or RDRAND). The
//! translation is stateless (a function of the segment and the key), so it needs no
//! connection table and cannot fall out of step with the stack.
//!
//! # Checksums
//!
//! Changing a 32-bit field changes the TCP checksum; it is fixed incrementally (RFC 1624,
//! equation 3) when it is a full checksum: always on receive (the driver completes partial
//! checksums before the stack sees a frame), and on transmit when the stack computed it.
//! With transmit checksum offload the stack leaves the TCP checksum to the device and the
//! driver's `prepare_checksum_offload` overwrites the field with the pseudo-header sum after
//! the stack (and this rewrite, which runs inside the stack's fill closure) wrote the frame,
//! so the field is left alone (the pseudo-header sum does not cover the sequence number).
//!
//! Only IPv4 TCP in untagged Ethernet II frames, unfragmented, with well-formed lengths, is
//! touched; anything else passes as it is (smoltcp drops what it cannot parse anyway).
//!
//! # Segmentation offload and the MSS
//!
//! With TCP segmentation offload (virtio-net HOST_TSO4) the stack's MTU is the largest frame
//! the device segments, so smoltcp would announce an MSS of about 64 KiB and would send no
//! more than the peer's MSS per segment. The same adapter therefore rewrites the MSS option
//! (RFC 9293 §3.7.1) of SYNs ([`MssRewrite`]): a peer's MSS that is at least the link's
//! (MTU - 40) is raised to the stack's, so smoltcp builds large segments that the device cuts
//! into link-MSS pieces; a smaller one is left alone (that connection then simply sends
//! MTU-sized segments); the stack's own MSS is lowered to the link's, so peers see what the
//! wire carries.

use core::hash::Hasher as _;

use siphasher::sip::SipHasher24;
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::entropy::Csprng;
use crate::net::device::{Nic, NicDevice, RxTokenMut};

/// Ethernet II header length.
const ETHERNET_HEADER: usize = 14;
/// TCP flag ACK (RFC 9293 §3.1).
const TCP_ACK: u8 = 0x10;
/// TCP option kinds (RFC 9293 §3.1, RFC 2018).
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_SACK: u8 = 5;
const OPTION_MSS: u8 = 2;
/// TCP flag SYN (RFC 9293 §3.1).
const TCP_SYN: u8 = 0x02;

/// What the network services need from the CSPRNG: smoltcp's seed and the ISN key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NetSecrets {
    /// `smoltcp::iface::Config::random_seed` (its PCG32: ISNs before translation, ephemeral
    /// ports, DHCP transaction ids).
    pub stack_seed: u64,
    /// The SipHash key of [`IsnTranslation`].
    pub isn_key: [u8; 16],
}

impl NetSecrets {
    /// Draws both from `rng`.
    pub fn draw(rng: &mut Csprng) -> Self {
        let stack_seed = rng.next_u64();
        let mut isn_key = [0u8; 16];
        rng.fill_bytes(&mut isn_key);
        Self {
            stack_seed,
            isn_key,
        }
    }
}

impl core::fmt::Debug for NetSecrets {
    /// Never prints the secrets.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("NetSecrets { .. }")
    }
}

/// Where the TCP header of an IPv4 TCP segment lies in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpAt {
    /// Offset of the IPv4 header (the addresses are at +12 and +16).
    ip: usize,
    /// Offset of the TCP header.
    tcp: usize,
    /// TCP header length (data offset * 4), within the segment.
    tcp_header: usize,
}

/// Finds the TCP header of an unfragmented IPv4 TCP segment in an Ethernet II frame, with
/// every length checked against the frame.
fn tcp_segment(frame: &[u8]) -> Option<TcpAt> {
    if frame.len() < ETHERNET_HEADER + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = ETHERNET_HEADER;
    let header = &frame[ip..];
    let ip_header = usize::from(header[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff;
    if header[0] >> 4 != 4
        || ip_header < 20
        || total > header.len()
        || total < ip_header + 20
        || fragment != 0
        || header[9] != 6
    {
        return None;
    }
    let tcp = ip + ip_header;
    let tcp_header = usize::from(frame[tcp + 12] >> 4) * 4;
    if tcp_header < 20 || ip_header + tcp_header > total {
        return None;
    }
    Some(TcpAt {
        ip,
        tcp,
        tcp_header,
    })
}

/// The TCP option at `option` (before `end`, where the header ends) as its kind and length,
/// a NOP as length 1 (RFC 9293 §3.1: kind, length, data); `None` at END_OF_OPTION_LIST, at
/// the header's end and where the list is malformed, each of which ends a walk.
fn option_at(frame: &[u8], option: usize, end: usize) -> Option<(u8, usize)> {
    if option >= end {
        return None;
    }
    match frame[option] {
        OPTION_END => None,
        OPTION_NOP => Some((OPTION_NOP, 1)),
        kind => {
            if option + 1 >= end {
                return None;
            }
            let length = usize::from(frame[option + 1]);
            (length >= 2 && option + length <= end).then_some((kind, length))
        }
    }
}

fn read_u32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

fn write_u32(frame: &mut [u8], at: usize, value: u32) {
    frame[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// RFC 1624 equation 3: the checksum after a 32-bit field changed from `old` to `new`,
/// `HC' = ~(~HC + ~m + m')` in one's complement arithmetic, per 16-bit word.
pub fn adjust_checksum(checksum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!checksum);
    for shift in [16, 0] {
        let old_word = (old >> shift) as u16;
        let new_word = (new >> shift) as u16;
        sum += u32::from(!old_word) + u32::from(new_word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrites the 32-bit field at `at` to `new` and adjusts the TCP checksum (at `tcp + 16`)
/// when `checksum` says it is a full one.
fn rewrite(frame: &mut [u8], at: usize, new: u32, tcp: usize, checksum: bool) {
    let old = read_u32(frame, at);
    write_u32(frame, at, new);
    if checksum {
        let field = tcp + 16;
        let current = u16::from_be_bytes([frame[field], frame[field + 1]]);
        let adjusted = adjust_checksum(current, old, new);
        frame[field..field + 2].copy_from_slice(&adjusted.to_be_bytes());
    }
}

/// The RFC 6528 offset function and the segment rewrites (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IsnTranslation {
    key: [u8; 16],
}

impl core::fmt::Debug for IsnTranslation {
    /// Never prints the key.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("IsnTranslation { .. }")
    }
}

impl IsnTranslation {
    /// The translation keyed with `key` (128 bits from the CSPRNG).
    pub fn new(key: [u8; 16]) -> Self {
        Self { key }
    }

    /// `F(local address, local port, remote address, remote port, key)`: the offset between
    /// the stack's and the wire's sequence numbers on this 4-tuple.
    pub fn offset(
        &self,
        local: [u8; 4],
        local_port: u16,
        remote: [u8; 4],
        remote_port: u16,
    ) -> u32 {
        let mut hasher = SipHasher24::new_with_key(&self.key);
        hasher.write(&local);
        hasher.write(&local_port.to_be_bytes());
        hasher.write(&remote);
        hasher.write(&remote_port.to_be_bytes());
        let hash = hasher.finish();
        (hash ^ (hash >> 32)) as u32
    }

    /// The offset for a segment at `at`; `outgoing` says which end is local.
    fn segment_offset(&self, frame: &[u8], at: TcpAt, outgoing: bool) -> u32 {
        let address = |offset: usize| -> [u8; 4] {
            let start = at.ip + offset;
            [
                frame[start],
                frame[start + 1],
                frame[start + 2],
                frame[start + 3],
            ]
        };
        let port = |offset: usize| {
            u16::from_be_bytes([frame[at.tcp + offset], frame[at.tcp + offset + 1]])
        };
        let (source, destination) = ((address(12), port(0)), (address(16), port(2)));
        let ((local, local_port), (remote, remote_port)) = if outgoing {
            (source, destination)
        } else {
            (destination, source)
        };
        self.offset(local, local_port, remote, remote_port)
    }

    /// A segment from the stack to the wire: adds the offset to its sequence number. The TCP
    /// checksum is adjusted when `stack_checksum` (the stack computed it; false under
    /// transmit checksum offload). Returns whether the frame was a TCP segment.
    pub fn outgoing(&self, frame: &mut [u8], stack_checksum: bool) -> bool {
        self.outgoing_segment(frame, stack_checksum).is_some()
    }

    /// [`outgoing`](Self::outgoing), returning where the TCP header lies (for the MSS rewrite
    /// after it, which then need not parse the frame again).
    fn outgoing_segment(&self, frame: &mut [u8], stack_checksum: bool) -> Option<TcpAt> {
        let at = tcp_segment(frame)?;
        let offset = self.segment_offset(frame, at, true);
        let sequence = read_u32(frame, at.tcp + 4);
        rewrite(
            frame,
            at.tcp + 4,
            sequence.wrapping_add(offset),
            at.tcp,
            stack_checksum,
        );
        Some(at)
    }

    /// A segment from the wire to the stack: subtracts the offset from its acknowledgment
    /// number (when ACK is set) and from the edges of its SACK blocks, adjusting the TCP
    /// checksum. Returns whether the frame was a TCP segment.
    pub fn incoming(&self, frame: &mut [u8]) -> bool {
        self.incoming_segment(frame).is_some()
    }

    /// [`incoming`](Self::incoming), returning where the TCP header lies.
    fn incoming_segment(&self, frame: &mut [u8]) -> Option<TcpAt> {
        let at = tcp_segment(frame)?;
        let offset = self.segment_offset(frame, at, false);
        if frame[at.tcp + 13] & TCP_ACK != 0 {
            let ack = read_u32(frame, at.tcp + 8);
            rewrite(frame, at.tcp + 8, ack.wrapping_sub(offset), at.tcp, true);
        }
        // SACK blocks are pairs of 32-bit edges (RFC 2018 §3).
        let end = at.tcp + at.tcp_header;
        let mut option = at.tcp + 20;
        while let Some((kind, length)) = option_at(frame, option, end) {
            if kind == OPTION_SACK && (length - 2) % 8 == 0 {
                let mut edge = option + 2;
                while edge < option + length {
                    let value = read_u32(frame, edge);
                    rewrite(frame, edge, value.wrapping_sub(offset), at.tcp, true);
                    edge += 4;
                }
            }
            option += length;
        }
        Some(at)
    }

    /// Whether `frame` is a segment this translation rewrites.
    pub fn applies_to(frame: &[u8]) -> bool {
        tcp_segment(frame).is_some()
    }
}

/// The SYN MSS rewrites of segmentation offload (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MssRewrite {
    /// The MSS of the link (MTU - 40): what the wire carries and the device cuts to.
    pub link_mss: u16,
    /// The MSS of the stack (largest segmented frame - 54).
    pub stack_mss: u16,
}

impl MssRewrite {
    /// A SYN from the wire: its MSS, when at least the link's, becomes the stack's. The TCP
    /// checksum is adjusted (RFC 1624). Returns whether the MSS was changed.
    pub fn incoming(&self, frame: &mut [u8]) -> bool {
        tcp_segment(frame).is_some_and(|at| self.incoming_at(frame, at))
    }

    /// A SYN from the stack: its MSS, when above the link's, becomes the link's; the checksum
    /// is adjusted when `stack_checksum`. Returns whether the MSS was changed.
    pub fn outgoing(&self, frame: &mut [u8], stack_checksum: bool) -> bool {
        tcp_segment(frame).is_some_and(|at| self.outgoing_at(frame, at, stack_checksum))
    }

    /// [`incoming`](Self::incoming) for a segment already parsed.
    fn incoming_at(&self, frame: &mut [u8], at: TcpAt) -> bool {
        Self::rewrite_at(frame, at, true, |mss| {
            (mss >= self.link_mss && mss < self.stack_mss).then_some(self.stack_mss)
        })
    }

    /// [`outgoing`](Self::outgoing) for a segment already parsed.
    fn outgoing_at(&self, frame: &mut [u8], at: TcpAt, stack_checksum: bool) -> bool {
        Self::rewrite_at(frame, at, stack_checksum, |mss| {
            (mss > self.link_mss).then_some(self.link_mss)
        })
    }

    fn rewrite_at(
        frame: &mut [u8],
        at: TcpAt,
        checksum: bool,
        new: impl Fn(u16) -> Option<u16>,
    ) -> bool {
        if frame[at.tcp + 13] & TCP_SYN == 0 {
            return false;
        }
        let end = at.tcp + at.tcp_header;
        let mut option = at.tcp + 20;
        while let Some((kind, length)) = option_at(frame, option, end) {
            // The whole option as one 32-bit field on a 16-bit boundary (always so for the
            // MSS option, which comes first), so the checksum adjusts word by word.
            if kind == OPTION_MSS && length == 4 && (option - at.tcp).is_multiple_of(2) {
                let mss = u16::from_be_bytes([frame[option + 2], frame[option + 3]]);
                let Some(mss) = new(mss) else {
                    return false;
                };
                let field = (u32::from(OPTION_MSS) << 24) | (4 << 16) | u32::from(mss);
                rewrite(frame, option, field, at.tcp, checksum);
                return true;
            }
            option += length;
        }
        false
    }
}

/// A smoltcp `Device` that applies an [`IsnTranslation`] to every TCP segment passing
/// through the NIC: sent segments inside the stack's fill closure (so before the driver
/// finalizes the frame for checksum offload), received ones in place in the driver's buffer
/// ([`RxTokenMut`]), whatever their length: no copy.
pub struct IsnDevice<'a, 'n, N: Nic> {
    inner: &'a mut NicDevice<'n, N>,
    translation: IsnTranslation,
    stack_checksum: bool,
    mss: Option<MssRewrite>,
}

impl<'a, 'n, N: Nic> IsnDevice<'a, 'n, N> {
    /// Hands the frames queued so far to the device ([`NicDevice::publish`]).
    pub fn publish(&self) {
        self.inner.publish();
    }

    /// Wraps `inner` for one stack poll.
    pub fn new(inner: &'a mut NicDevice<'n, N>, translation: IsnTranslation) -> Self {
        let stack_checksum = inner.capabilities().checksum.tcp.tx();
        let mss = inner.segmentation();
        Self {
            inner,
            translation,
            stack_checksum,
            mss,
        }
    }
}

/// Receive token of [`IsnDevice`].
pub struct IsnRxToken<R: RxTokenMut> {
    inner: R,
    translation: IsnTranslation,
    mss: Option<MssRewrite>,
}

/// Transmit token of [`IsnDevice`].
pub struct IsnTxToken<T: phy::TxToken> {
    inner: T,
    translation: IsnTranslation,
    stack_checksum: bool,
    mss: Option<MssRewrite>,
}

impl<R: RxTokenMut> phy::RxToken for IsnRxToken<R> {
    fn consume<U, F: FnOnce(&[u8]) -> U>(self, f: F) -> U {
        let Self {
            inner,
            translation,
            mss,
        } = self;
        inner.consume_mut(|frame| {
            if let Some(at) = translation.incoming_segment(frame)
                && let Some(mss) = mss
            {
                mss.incoming_at(frame, at);
            }
            f(frame)
        })
    }
}

impl<T: phy::TxToken> phy::TxToken for IsnTxToken<T> {
    fn consume<U, F: FnOnce(&mut [u8]) -> U>(self, length: usize, f: F) -> U {
        let Self {
            inner,
            translation,
            stack_checksum,
            mss,
        } = self;
        inner.consume(length, |buffer| {
            let result = f(buffer);
            if let Some(at) = translation.outgoing_segment(buffer, stack_checksum)
                && let Some(mss) = mss
            {
                mss.outgoing_at(buffer, at, stack_checksum);
            }
            result
        })
    }
}

impl<'n, N: Nic> Device for IsnDevice<'_, 'n, N> {
    type RxToken<'b>
        = IsnRxToken<<NicDevice<'n, N> as Device>::RxToken<'b>>
    where
        Self: 'b;
    type TxToken<'b>
        = IsnTxToken<<NicDevice<'n, N> as Device>::TxToken<'b>>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.inner.receive(timestamp)?;
        Some((
            IsnRxToken {
                inner: rx,
                translation: self.translation,
                mss: self.mss,
            },
            IsnTxToken {
                inner: tx,
                translation: self.translation,
                stack_checksum: self.stack_checksum,
                mss: self.mss,
            },
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let tx = self.inner.transmit(timestamp)?;
        Some(IsnTxToken {
            inner: tx,
            translation: self.translation,
            stack_checksum: self.stack_checksum,
            mss: self.mss,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

#[cfg(test)]
mod tests;
