//! The gratuitous ARP a station sends when its link comes up or its address changes
//! (RFC 5227 §3 "ARP Announcement", RFC 826 packet format), built with smoltcp's wire types.
//!
//! An announcement is an ARP request whose sender and target protocol addresses are both the
//! station's own, with a zero target hardware address, broadcast. Neighbours that already have
//! an entry for the address (even an incomplete one, waiting for a reply) update it at once, so
//! a host that sent its first packet while the guest was still booting does not wait for its
//! ARP retry timer (one second on Linux).

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};

/// Ethernet's minimum frame length without the FCS (IEEE 802.3): shorter frames are padded.
pub const MIN_FRAME_LEN: usize = 60;

/// The gratuitous ARP announcing `ip` at `mac`, padded to the Ethernet minimum.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> [u8; MIN_FRAME_LEN] {
    let address = Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: address,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: address,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut bytes = [0u8; MIN_FRAME_LEN];
    let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
    ethernet.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn the_announcement_has_rfc_5227_fields_at_rfc_826_offsets() {
        let frame = gratuitous_arp(MAC, [10, 0, 2, 15]);
        assert_eq!(frame[..6], [0xff; 6], "broadcast");
        assert_eq!(frame[6..12], MAC, "from the station");
        assert_eq!(frame[12..14], [0x08, 0x06], "EtherType ARP");
        let arp = &frame[14..42];
        assert_eq!(
            arp[..8],
            [0, 1, 0x08, 0x00, 6, 4, 0, 1],
            "Ethernet/IPv4 request"
        );
        assert_eq!(arp[8..14], MAC, "sender hardware address");
        assert_eq!(arp[14..18], [10, 0, 2, 15], "sender protocol address");
        assert_eq!(arp[18..24], [0; 6], "target hardware address zero");
        assert_eq!(
            arp[24..28],
            [10, 0, 2, 15],
            "target protocol address: our own"
        );
        assert!(frame[42..].iter().all(|&byte| byte == 0), "zero padding");
    }

    #[test]
    fn smoltcp_parses_it_back_as_the_same_announcement() {
        let frame = gratuitous_arp(MAC, [192, 168, 7, 9]);
        let ethernet = EthernetFrame::new_checked(&frame[..]).expect("ethernet");
        let packet = ArpPacket::new_checked(ethernet.payload()).expect("arp");
        match ArpRepr::parse(&packet).expect("arp repr") {
            ArpRepr::EthernetIpv4 {
                operation,
                source_protocol_addr,
                target_protocol_addr,
                ..
            } => {
                assert_eq!(operation, ArpOperation::Request);
                assert_eq!(source_protocol_addr, target_protocol_addr);
                assert_eq!(source_protocol_addr, Ipv4Address::new(192, 168, 7, 9));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
