//! Device recovery under QEMU: with `inject-reset=N` the kernel declares the NIC failed every N
//! received frames, so the whole recovery path runs for real: the old driver is retired (its
//! Drop resets the device), the device is initialised again from scratch, and echo resumes by
//! itself with the sockets above intact. Detection of a misbehaving device is covered by the
//! host tests of the virtio crate (`net::tests::recovery`, `net::tests::misbehaving`).

mod common;

use std::time::Duration;

use common::{boot_user_net, count_lines, on_guest};
use xtask::RunError;
use xtask::client::{EchoReport, UdpEchoClient, query_stats, tcp_echo};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn injected_device_failures_are_recovered_and_echo_resumes() -> Result<(), RunError> {
    let booted = boot_user_net("inject-reset=25")?;
    let guest = &booted.guest;
    let net = booted.net;
    // A short wait per attempt: a datagram lost in a reset is simply sent again.
    let mut client = on_guest(
        guest,
        UdpEchoClient::connect(net.udp_echo(), Duration::from_millis(250)),
    )?;
    let mut report = EchoReport::default();
    // Frames that arrive while the device is being reset are lost; the client retries them,
    // and every echo that comes back must be exact.
    for _ in 0..150 {
        on_guest(guest, client.exchange(200, 20, &mut report))?;
    }
    let stats = on_guest(guest, query_stats(net.stats(), WAIT, 10))?;
    println!("after 150 echoes: {}", stats.line);
    let resets = on_guest(guest, stats.counter("device_resets"))?;
    if resets < 3 {
        return Err(guest.check_failed(format!("expected at least 3 device resets, saw {resets}")));
    }
    let reinitialised = count_lines(guest, "virtio-net: device re-initialised");
    if reinitialised as u64 != resets {
        return Err(guest.check_failed(format!(
            "{resets} resets counted but {reinitialised} `device re-initialised` lines logged"
        )));
    }
    // The link comes up again after each reset: the guest announces itself each time (one
    // gratuitous ARP at boot, one per reset; a stats query races at most the last one).
    let announces = on_guest(guest, stats.counter("announces"))?;
    if announces < resets {
        return Err(guest.check_failed(format!(
            "{resets} resets but only {announces} gratuitous ARPs (expected one per reset plus the boot's)"
        )));
    }
    // TCP across further resets: smoltcp retransmits what a reset lost; the bytes are exact.
    let tcp = on_guest(
        guest,
        tcp_echo(net.tcp_echo(), 256 * 1024, Duration::from_secs(60)),
    )?;
    println!("TCP after recovery: {tcp:?}");
    let panics = count_lines(guest, "PANIC");
    if panics != 0 {
        return Err(guest.check_failed("the kernel panicked during recovery".to_string()));
    }
    Ok(())
}
