//! The device layer under QEMU (issue 13): devices other than the NIC bound through the driver
//! table, each on its own interrupt record, beside the NIC, in any bus order. virtio-blk on a
//! raw image that each test makes: the `blk-check` boot check's read fingerprint must match
//! the host's, its write must be in the image after QEMU is killed with SIGKILL (it was
//! flushed), a read-only drive refuses the write, packed rings and 4 KiB blocks work, and two
//! disks with the NIC between them on q35 and pc, modern-only or transitional, with MSI-X or
//! INTx, all come up while the NIC serves exact echo.
//!
//! One QEMU per boot, each with a wall-clock limit; a failure prints the QEMU command line and
//! the whole serial log.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{count_lines, on_guest, wait_for_count};
use xtask::client::{EchoReport, UdpEchoClient, query_stats, tcp_echo};
use xtask::{Guest, Machine, RunError, UserNetGuest, unique_temp_path};

/// The pattern `blk-check` writes into a disk's last block (`src/devices/blk.rs`).
const CHECK_PATTERN: &[u8] = b"vireo blk-check ";
/// Bytes `blk-check` fingerprints from the start of the disk (8 blocks).
fn fingerprinted_bytes(block: usize) -> usize {
    8 * block
}

/// FNV-1a, 64-bit, as the kernel computes it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A raw image of `bytes` filled from a seeded generator, removed on drop.
struct Image {
    path: PathBuf,
}

impl Image {
    fn new(bytes: usize, seed: u64) -> Image {
        let path = unique_temp_path("vireo-disk", "img");
        let mut state = seed | 1;
        let data: Vec<u8> = (0..bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        std::fs::write(&path, data).expect("writing the test image");
        Image { path }
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("reading the test image")
    }

    fn drive(&self, id: &str, extra: &str) -> String {
        format!(
            "file={},format=raw,if=none,id={id}{extra}",
            self.path.display()
        )
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Boots on user networking (`nic` on netdev `n0`) with `extra` QEMU arguments placed before
/// the NIC, and waits for `ready`.
fn boot(
    machine: Machine,
    append: &str,
    extra: &[String],
    nic: &str,
) -> Result<UserNetGuest, RunError> {
    common::boot_user_net_on(machine, append, extra, nic)
}

/// UDP (64 and 1400 bytes) and a 64 KiB TCP echo, exact.
fn echo_exact(booted: &UserNetGuest) -> Result<(), RunError> {
    let guest = &booted.guest;
    let mut client = on_guest(
        guest,
        UdpEchoClient::connect(booted.net.udp_echo(), Duration::from_secs(3)),
    )?;
    on_guest(
        guest,
        client.warm_up(Duration::from_secs(20), Duration::from_millis(250)),
    )?;
    let mut report = EchoReport::default();
    for size in [64, 1400] {
        on_guest(guest, client.exchange(size, 3, &mut report))?;
    }
    on_guest(
        guest,
        tcp_echo(booted.net.tcp_echo(), 64 * 1024, Duration::from_secs(60)),
    )?;
    Ok(())
}

/// The `blk-check` line for `address` (e.g. `00:01.0`), once it is logged.
fn check_line(guest: &Guest, address: &str) -> Result<String, RunError> {
    wait_for_count(guest, "blk-check: ", 1, Duration::from_secs(10))?;
    guest
        .lines()
        .into_iter()
        .map(|line| line.text)
        .find(|text| text.contains("blk-check: ") && text.contains(address))
        .ok_or_else(|| guest.check_failed(format!("no blk-check line for {address}")))
}

/// The fingerprint a `blk-check` line reports.
fn reported_fnv(guest: &Guest, line: &str) -> Result<u64, RunError> {
    line.split("fnv1a ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| guest.check_failed(format!("no fingerprint in {line:?}")))
}

fn pattern_block(block: usize) -> Vec<u8> {
    (0..block)
        .map(|index| CHECK_PATTERN[index % CHECK_PATTERN.len()])
        .collect()
}

fn expect(guest: &Guest, needle: &str) -> Result<(), RunError> {
    if count_lines(guest, needle) == 0 {
        return Err(guest.check_failed(format!("no serial line contains {needle:?}")));
    }
    Ok(())
}

/// Reads, writes and a flush reach a raw image: the fingerprint of the first 8 blocks matches
/// the host's, GET_ID returns the drive's serial, the recovery drill (reset, re-initialise,
/// read again) passes, the stats count the requests, and after SIGKILL the image's last block
/// holds the written pattern.
#[test]
fn blk_check_reads_writes_and_flushes_a_raw_image_that_survives_sigkill() -> Result<(), RunError> {
    let image = Image::new(8 << 20, 0x5eed_0b1c);
    let before = image.bytes();
    let extra = vec![
        "-drive".to_string(),
        image.drive("d0", ""),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0,serial=vireo-disk-1".to_string(),
    ];
    let mut booted = boot(Machine::Q35, "blk-check", &extra, xtask::DEFAULT_NIC)?;
    let line = check_line(&booted.guest, "0000:")?;
    for part in [
        "id 'vireo-disk-1'",
        "reset, re-initialised, read again exact",
    ] {
        if !line.contains(part) {
            return Err(booted
                .guest
                .check_failed(format!("{part:?} missing from {line:?}")));
        }
    }
    expect(
        &booted.guest,
        "resetting the device after: the blk-check recovery drill",
    )?;
    expect(&booted.guest, "device re-initialised (reset 1)")?;
    let line = if line.contains(" ok") {
        line
    } else {
        return Err(booted
            .guest
            .check_failed(format!("blk-check did not pass: {line}")));
    };
    let fnv = reported_fnv(&booted.guest, &line)?;
    let expected = fnv1a(&before[..fingerprinted_bytes(512)]);
    if fnv != expected {
        return Err(booted.guest.check_failed(format!(
            "guest read fingerprint {fnv:016x}, host {expected:016x}"
        )));
    }
    expect(
        &booted.guest,
        "16384 sectors (8 MiB), block size 512, read-write, flush yes",
    )?;
    let stats = on_guest(
        &booted.guest,
        query_stats(booted.net.stats(), Duration::from_secs(3), 3),
    )?;
    println!("stats: {}", stats.line);
    for (key, least) in [
        ("blk_devices", 1),
        ("blk_reads", 2),
        ("blk_writes", 1),
        ("blk_flushes", 1),
        ("blk_read_bytes", 4096 + 512),
        ("blk_written_bytes", 512),
    ] {
        let value = on_guest(&booted.guest, stats.counter(key))?;
        if value < least {
            return Err(booted
                .guest
                .check_failed(format!("{key}={value}, expected at least {least}")));
        }
    }
    if on_guest(&booted.guest, stats.counter("blk_errors"))? != 0 {
        return Err(booted.guest.check_failed("blk_errors is not 0"));
    }
    echo_exact(&booted)?;
    // SIGKILL: nothing QEMU still buffered survives; the flushed write must be in the file.
    booted.guest.kill();
    let after = image.bytes();
    let last = &after[after.len() - 512..];
    if last != pattern_block(512).as_slice() {
        return Err(booted
            .guest
            .check_failed("the last block of the image does not hold the pattern after SIGKILL"));
    }
    if after[..after.len() - 512] != before[..before.len() - 512] {
        return Err(booted
            .guest
            .check_failed("blk-check changed bytes outside the last block"));
    }
    Ok(())
}

/// A read-only drive: the driver refuses the write before it reaches the device, and the image
/// is unchanged.
#[test]
fn read_only_drive_refuses_the_write_and_the_image_is_unchanged() -> Result<(), RunError> {
    let image = Image::new(1 << 20, 7);
    let before = image.bytes();
    let extra = vec![
        "-drive".to_string(),
        image.drive("d0", ",readonly=on"),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0".to_string(),
    ];
    let mut booted = boot(Machine::Q35, "blk-check", &extra, xtask::DEFAULT_NIC)?;
    let line = check_line(&booted.guest, "0000:")?;
    if !line.contains("write refused: read-only") || !line.contains(" ok") {
        return Err(booted
            .guest
            .check_failed(format!("unexpected blk-check line: {line}")));
    }
    expect(&booted.guest, "read-only")?;
    booted.guest.kill();
    if image.bytes() != before {
        return Err(booted.guest.check_failed("a read-only image changed"));
    }
    Ok(())
}

/// Packed rings and 4 KiB logical blocks: the check passes and reads the first 8 blocks of
/// 4 KiB.
#[test]
fn packed_ring_and_4k_blocks_pass_the_check() -> Result<(), RunError> {
    let image = Image::new(4 << 20, 99);
    let before = image.bytes();
    let extra = vec![
        "-drive".to_string(),
        image.drive("d0", ""),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0,packed=on,logical_block_size=4096,physical_block_size=4096"
            .to_string(),
    ];
    let mut booted = boot(Machine::Q35, "blk-check", &extra, xtask::DEFAULT_NIC)?;
    let line = check_line(&booted.guest, "0000:")?;
    expect(&booted.guest, "block size 4096")?;
    expect(&booted.guest, "(Packed)")?;
    let fnv = reported_fnv(&booted.guest, &line)?;
    if !line.contains(" ok") || fnv != fnv1a(&before[..fingerprinted_bytes(4096)]) {
        return Err(booted
            .guest
            .check_failed(format!("unexpected blk-check line: {line}")));
    }
    booted.guest.kill();
    let after = image.bytes();
    if after[after.len() - 4096..] != pattern_block(4096)[..] {
        return Err(booted
            .guest
            .check_failed("the last 4 KiB block does not hold the pattern"));
    }
    Ok(())
}

/// Two disks with the NIC between them (so the devices come in both orders around it), on q35
/// and pc, modern-only and transitional, with MSI-X and with `vectors=0` (INTx): every disk is
/// driven and checked, the NIC serves exact echo.
#[test]
fn two_disks_around_the_nic_on_every_machine_and_interrupt_path() -> Result<(), RunError> {
    let cases: [(Machine, &str); 4] = [
        (Machine::Q35, ""),
        (Machine::Q35, ",disable-legacy=on,vectors=0"),
        (Machine::Pc, ""),
        (Machine::Pc, ",vectors=0"),
    ];
    for (machine, options) in cases {
        let first = Image::new(1 << 20, 1);
        let second = Image::new(2 << 20, 2);
        let extra = vec![
            "-drive".to_string(),
            first.drive("d0", ""),
            "-drive".to_string(),
            second.drive("d1", ""),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=d0,addr=0x6{options}"),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=d1,addr=0x8{options}"),
        ];
        let nic = format!("virtio-net-pci,netdev=n0,addr=0x7{options}");
        let mut booted = boot(machine, "blk-check", &extra, &nic)?;
        wait_for_count(&booted.guest, "blk-check: ", 2, Duration::from_secs(10))?;
        for (address, sectors) in [("00:06.0", 2048), ("00:08.0", 4096)] {
            let line = check_line(&booted.guest, address)?;
            if !line.contains(" ok") {
                return Err(booted.guest.check_failed(format!("{address}: {line}")));
            }
            expect(
                &booted.guest,
                &format!("virtio-blk: 0000:{address}: {sectors} sectors"),
            )?;
        }
        if options.contains("vectors=0") {
            expect(&booted.guest, "virtio-net: interrupts: INTx")?;
        }
        echo_exact(&booted)?;
        let stats = on_guest(
            &booted.guest,
            query_stats(booted.net.stats(), Duration::from_secs(3), 3),
        )?;
        if on_guest(&booted.guest, stats.counter("blk_devices"))? != 2 {
            return Err(booted
                .guest
                .check_failed(format!("expected 2 disks: {}", stats.line)));
        }
        booted.guest.kill();
        for image in [&first, &second] {
            let bytes = image.bytes();
            if bytes[bytes.len() - 512..] != pattern_block(512)[..] {
                return Err(booted.guest.check_failed(format!(
                    "{}: the last block does not hold the pattern",
                    Path::new(&image.path).display()
                )));
            }
        }
    }
    Ok(())
}

/// The entropy source is named on the console: virtio-rng when the device is there (its bytes
/// are counted in `rng_bytes`, and it reseeds the CSPRNG about a second after boot:
/// `entropy_reseeds`), RDRAND with `-cpu max` and no device, and a loud `entropy: weak` with
/// neither (QEMU's default `qemu64` CPU has no RDRAND).
#[test]
fn entropy_source_is_virtio_rng_then_rdrand_then_weak() -> Result<(), RunError> {
    let cases: [(&[&str], &str); 3] = [
        (
            &["-device", "virtio-rng-pci"],
            "entropy: seeded from virtio-rng (32 bytes)",
        ),
        (&["-cpu", "max"], "entropy: seeded from RDRAND"),
        (&[], "entropy: weak (TSC jitter only)"),
    ];
    for (extra, expected) in cases {
        let extra: Vec<String> = extra.iter().map(|word| word.to_string()).collect();
        let mut booted = boot(Machine::Q35, "", &extra, xtask::DEFAULT_NIC)?;
        expect(&booted.guest, expected)?;
        let stats = on_guest(
            &booted.guest,
            query_stats(booted.net.stats(), Duration::from_secs(3), 3),
        )?;
        let rng_bytes = on_guest(&booted.guest, stats.counter("rng_bytes"))?;
        let devices = on_guest(&booted.guest, stats.counter("rng_devices"))?;
        let with_device = expected.contains("virtio-rng");
        if with_device {
            // The entropy device reseeds the CSPRNG about a second after boot.
            std::thread::sleep(Duration::from_millis(2500));
        }
        let stats = on_guest(
            &booted.guest,
            query_stats(booted.net.stats(), Duration::from_secs(3), 3),
        )?;
        let reseeds = on_guest(&booted.guest, stats.counter("entropy_reseeds"))?;
        if with_device != (reseeds >= 1) {
            return Err(booted
                .guest
                .check_failed(format!("{expected}: entropy_reseeds={reseeds}")));
        }
        if with_device != (devices == 1) || with_device != (rng_bytes >= 32) {
            return Err(booted.guest.check_failed(format!(
                "{expected}: rng_devices={devices} rng_bytes={rng_bytes}"
            )));
        }
        echo_exact(&booted)?;
        booted.guest.kill();
    }
    Ok(())
}

/// net + rng + blk together, in both bus orders, on q35 and pc, transitional and modern-only,
/// packed rings on and off, MSI-X and `vectors=0`: every device is driven, the entropy comes
/// from the device, the disk passes its check and echo is exact.
#[test]
fn net_rng_and_blk_together_in_both_orders_on_every_shape() -> Result<(), RunError> {
    let cases: [(Machine, &str, bool); 4] = [
        (Machine::Q35, "", false),
        (Machine::Q35, ",disable-legacy=on,packed=on", true),
        (Machine::Pc, ",vectors=0", false),
        (Machine::Pc, ",disable-legacy=on,packed=on,vectors=0", true),
    ];
    for (machine, options, reversed) in cases {
        let image = Image::new(1 << 20, 3);
        let (rng_addr, blk_addr, nic_addr) = if reversed {
            ("0x9", "0x8", "0x4")
        } else {
            ("0x4", "0x5", "0x9")
        };
        let extra = vec![
            "-drive".to_string(),
            image.drive("d0", ""),
            "-device".to_string(),
            format!("virtio-rng-pci,addr={rng_addr}{options}"),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=d0,addr={blk_addr}{options}"),
        ];
        let nic = format!("virtio-net-pci,netdev=n0,addr={nic_addr}{options}");
        let mut booted = boot(machine, "blk-check", &extra, &nic)?;
        expect(&booted.guest, "entropy: seeded from virtio-rng (32 bytes)")?;
        let line = check_line(&booted.guest, "0000:")?;
        if !line.contains(" ok") {
            return Err(booted.guest.check_failed(format!("blk-check: {line}")));
        }
        if options.contains("packed=on") {
            expect(&booted.guest, "request queue (Packed)")?;
        }
        echo_exact(&booted)?;
        booted.guest.kill();
    }
    Ok(())
}

/// A disk resized under the guest (QMP `block_resize`): the device signals a configuration
/// change (§5.2.4) on its own interrupt record, and the guest re-reads the capacity and logs it,
/// on MSI-X and on the polling-only path (`-M pc,acpi=off`, `vectors=0`: no config interrupt,
/// so the status timer sees it).
#[test]
fn a_resized_disk_is_seen_on_its_config_change_with_and_without_interrupts() -> Result<(), RunError>
{
    let cases: [(Machine, &[&str], &str); 2] = [
        (Machine::Q35, &[], ""),
        (Machine::Pc, &["-machine", "acpi=off"], ",vectors=0"),
    ];
    for (machine, machine_args, options) in cases {
        let image = Image::new(1 << 20, 11);
        let socket = unique_temp_path("vireo-resize", "qmp");
        let mut extra: Vec<String> = machine_args.iter().map(|word| word.to_string()).collect();
        extra.extend([
            "-drive".to_string(),
            image.drive("d0", ""),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=d0{options}"),
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ]);
        let mut booted = boot(
            machine,
            "",
            &extra,
            &format!("virtio-net-pci,netdev=n0{options}"),
        )?;
        expect(&booted.guest, "2048 sectors (1 MiB)")?;
        let mut qmp = on_qmp(
            &booted,
            xtask::Qmp::connect(&socket, Duration::from_secs(10)),
        )?;
        on_qmp(
            &booted,
            qmp.execute("block_resize", Some(r#"{"device":"d0","size":2097152}"#)),
        )?;
        wait_for_count(
            &booted.guest,
            "capacity changed to 4096 sectors (2 MiB)",
            1,
            Duration::from_secs(5),
        )?;
        echo_exact(&booted)?;
        drop(qmp);
        booted.guest.kill();
        let _ = std::fs::remove_file(&socket);
    }
    Ok(())
}

fn on_qmp<T, E: Into<xtask::Error>>(
    booted: &UserNetGuest,
    result: Result<T, E>,
) -> Result<T, RunError> {
    result.map_err(|error| booted.guest.failure(error.into()))
}
