//! The NBD export (`services=nbd`, README "The guest contract") under QEMU, with clients
//! nobody here wrote: `nbdinfo` and `nbdcopy` (Debian `libnbd-bin`), `qemu-io` and `qemu-img`
//! (`qemu-utils`), installed by the test when missing (as root; CI runs as root), plus a raw
//! client (`xtask::nbd::NbdClient`) for the traffic real clients never send.
//!
//! Every test but the first boots the kernel on a tap inside a network namespace it creates
//! (root; CI runs them and never skips them) with a raw image in a scratch directory that is
//! removed afterwards, and the clients run inside the namespace against 10.0.2.15:10809:
//!
//! - nbdinfo lists the export with the image's size, its flags and block sizes; a read-only
//!   drive is a read-only export whose writes get `NBD_EPERM` (image unchanged);
//! - nbdcopy copies 64 MiB of random data in and out byte for byte (and into the image);
//! - qemu-io runs aligned and unaligned reads and writes (and write zeroes), in each receive
//!   mode, then `qemu-img compare` checks the export against the host's model of the disk;
//! - durability: a pattern written with nbdcopy `--flush`, QEMU killed with SIGKILL, a second
//!   boot on the same image reads every byte back;
//! - hostile traffic: bad magic, unknown flags and options, lengths past the end, unaligned and
//!   huge requests, unknown commands, clients that vanish mid-request: each gets the error the
//!   NBD protocol document names or a disconnect, a well-behaved client keeps being served,
//!   and nothing outside the requests' ranges changes;
//! - the disk's own errors (QEMU's blkdebug injecting EIO) answered with `NBD_EIO`, the
//!   connection still served;
//! - requests in flight when the disk is reset (`inject-blk-reset=N`) answered with
//!   `NBD_EIO`, each exactly once, none lost;
//! - four qemu-io clients at once on disjoint regions;
//! - four connections' reads on a 16-entry queue without indirect descriptors (requests wait
//!   for room, and are all served),
//!   a packed ring, a disk on INTx and a polling-only disk (the loop must keep polling while a
//!   request is in flight on it, even in `mode=irq`).
//!
//! Without a disk (user networking, no root): `nbd: no virtio-blk device, not started`, and
//! the other services keep serving.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TapGuest, boot_tap_with, count_lines, on_guest, root_networking_or_skip};
use xtask::nbd::{
    CLIENT_FLAGS, CMD_READ, CMD_WRITE, EXPORT_NAME, FLAG_READ_ONLY, NBD_EINVAL, NBD_EIO,
    NBD_ENOSPC, NBD_EPERM, NBD_PORT, NbdClient, OPT_GO, REP_ACK, REP_ERR_UNSUP, REP_FLAG_ERROR,
    ensure_nbd_tools, go_option_data, nbd_uri, run_tool, run_tool_any,
};
use xtask::{
    DEFAULT_NIC, Machine, NetNs, RunError, TapConfig, UdpEchoClient, query_stats,
    skip_or_fail_in_ci, unique_temp_path,
};

/// The guest's address inside the test namespace.
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// How long one client program may run.
const TOOL_LIMIT: Duration = Duration::from_secs(120);
/// How long the raw client waits for any one reply.
const RAW_WAIT: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;

fn nbd_address() -> SocketAddr {
    SocketAddr::from((GUEST, NBD_PORT))
}

/// Root networking and the NBD clients (installed when missing, as root): true when the test
/// can run; otherwise skipped (or failed under CI=true) with the reason.
fn prerequisites() -> bool {
    if !root_networking_or_skip() {
        return false;
    }
    if let Err(error) = ensure_nbd_tools() {
        skip_or_fail_in_ci(&format!("the NBD clients are not available: {error}"));
        return false;
    }
    true
}

/// A scratch directory for the images and files of one test, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = unique_temp_path("vireo-nbd", "d");
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file of `bytes` from a seeded generator; returns its path and contents.
    fn random_file(&self, name: &str, bytes: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let data = random_bytes(bytes, seed);
        let path = self.path(name);
        std::fs::write(&path, &data).expect("writing a scratch file");
        (path, data)
    }

    /// A zeroed (sparse) image of `bytes`.
    fn zero_image(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.path(name);
        let file = std::fs::File::create(&path).expect("creating an image");
        file.set_len(bytes).expect("sizing an image");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `bytes` from a xorshift generator seeded with `seed`.
fn random_bytes(bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(bytes + 8);
    while data.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(bytes);
    data
}

/// Where two byte strings first differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// How the disk is attached.
struct Disk<'a> {
    image: &'a Path,
    /// Put before the image's path in `file=` (`blkdebug:RULES:` to inject errors).
    prefix: &'a str,
    /// Added to `-drive` (`,readonly=on`).
    drive: &'a str,
    /// Added to `-device virtio-blk-pci` (`,vectors=0`).
    device: &'a str,
}

impl<'a> Disk<'a> {
    fn plain(image: &'a Path) -> Disk<'a> {
        Disk {
            image,
            prefix: "",
            drive: "",
            device: "",
        }
    }
}

/// Boots the kernel with `services=stats,nbd` (and `append`) on a tap in a fresh namespace
/// with `disk`, and checks that the `ready` line names the export.
fn boot_nbd(
    prefix: &str,
    machine: Machine,
    append: &str,
    disk: &Disk,
) -> Result<TapGuest, RunError> {
    boot_nbd_with(prefix, machine, &[], append, disk)
}

/// [`boot_nbd`] with `extra` QEMU arguments (`-machine acpi=off`).
fn boot_nbd_with(
    prefix: &str,
    machine: Machine,
    extra: &[&str],
    append: &str,
    disk: &Disk,
) -> Result<TapGuest, RunError> {
    let booted = boot_tap_with(prefix, &[TapConfig::default()], |command| {
        command
            .machine(machine)
            .args(extra.iter().copied())
            .memory_mib(256)
            .netdev(NetNs::tap_netdev("n0", "tap0", None))
            .device(DEFAULT_NIC)
            .arg("-drive")
            .arg(format!(
                "file={}{},format=raw,if=none,id=d0{}",
                disk.prefix,
                disk.image.display(),
                disk.drive
            ))
            .device(format!("virtio-blk-pci,drive=d0{}", disk.device))
            .append(format!("services=stats,nbd {append}"))
    })?;
    let words = &booted.ready.extra;
    if !words
        .iter()
        .any(|(key, value)| key == "nbd" && value == "10809")
    {
        return Err(booted.guest.check_failed(format!(
            "the ready line names no nbd=10809: {}",
            booted.ready
        )));
    }
    if count_lines(&booted.guest, "nbd: exporting virtio-blk") != 1 {
        return Err(booted
            .guest
            .check_failed("no `nbd: exporting virtio-blk` line in the boot log"));
    }
    Ok(booted)
}

/// Runs a client program inside the namespace; it must succeed within [`TOOL_LIMIT`].
fn tool(booted: &TapGuest, program: &str, args: &[&str]) -> Result<xtask::nbd::ToolRun, RunError> {
    let mut command = booted.netns.command(program);
    command.args(args);
    let run = run_tool(&mut command, TOOL_LIMIT)
        .map_err(|error| booted.guest.check_failed(error.to_string()))?;
    println!(
        "{} ({:.2} s){}",
        run.command_line,
        run.elapsed.as_secs_f64(),
        if run.stdout.len() < 2000 {
            format!("\n{}", run.stdout.trim_end())
        } else {
            String::new()
        }
    );
    Ok(run)
}

/// Runs the raw client's `work` inside the namespace; an I/O error becomes a [`RunError`].
fn raw<T: Send>(
    booted: &TapGuest,
    work: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, RunError> {
    match booted.netns.run(work) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(message)) => Err(booted.guest.check_failed(message)),
        Err(error) => Err(booted.guest.failure(error)),
    }
}

/// The stats line's counter `key`, queried inside the namespace.
fn counter(booted: &TapGuest, key: &str) -> Result<u64, RunError> {
    let stats = booted
        .client(|| query_stats(SocketAddr::from((GUEST, 7007)), Duration::from_secs(3), 5))?;
    on_guest(&booted.guest, stats.counter(key))
}

/// No line of the serial log says `PANIC`.
fn no_panic(booted: &TapGuest) -> Result<(), RunError> {
    if count_lines(&booted.guest, "PANIC") > 0 {
        return Err(booted.guest.check_failed("the guest panicked"));
    }
    Ok(())
}

/// Kills QEMU (SIGKILL) and compares the image with `expected`.
fn kill_and_compare_image(
    mut booted: TapGuest,
    image: &Path,
    expected: &[u8],
) -> Result<(), RunError> {
    no_panic(&booted)?;
    booted.guest.kill();
    let contents = std::fs::read(image).map_err(|error| {
        booted
            .guest
            .check_failed(format!("reading {}: {error}", image.display()))
    })?;
    if let Some(at) = first_difference(&contents, expected) {
        return Err(booted.guest.check_failed(format!(
            "the image differs from what the clients wrote, first at byte {at} ({} bytes, expected {})",
            contents.len(),
            expected.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn services_nbd_without_a_disk_says_so_and_the_others_keep_serving() -> Result<(), RunError> {
    let booted = common::boot_user_net("services=echo,stats,nbd")?;
    let guest = &booted.guest;
    if count_lines(guest, "nbd: no virtio-blk device, not started") != 1 {
        return Err(guest.check_failed("no `nbd: no virtio-blk device, not started` line"));
    }
    if booted.ready.text.contains("nbd=") {
        return Err(guest.check_failed(format!("the ready line names nbd: {}", booted.ready)));
    }
    let mut client = on_guest(
        guest,
        UdpEchoClient::connect(booted.net.udp_echo(), Duration::from_secs(3)),
    )?;
    on_guest(
        guest,
        client.warm_up(Duration::from_secs(20), Duration::from_millis(250)),
    )?;
    let mut report = xtask::EchoReport::default();
    on_guest(guest, client.exchange(1400, 3, &mut report))?;
    if report.received != 1 {
        return Err(guest.check_failed("the UDP echo did not come back exact"));
    }
    Ok(())
}

#[test]
fn nbdinfo_lists_the_export_with_its_size_flags_and_block_sizes() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    // Not a power of two: the size must be the image's, exactly.
    let size = 24 * MIB as u64 + 4096 * 3;
    let image = scratch.zero_image("disk.img", size);
    let booted = boot_nbd("nbdinfo", Machine::Q35, "", &Disk::plain(&image))?;
    let uri = nbd_uri(nbd_address());
    let run = tool(&booted, "nbdinfo", &["--json", &uri])?;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).map_err(|error| {
        booted
            .guest
            .check_failed(format!("nbdinfo --json: {error}"))
    })?;
    let export = &json["exports"][0];
    let expected = [
        ("export-name", serde_json::json!("vireo")),
        ("export-size", serde_json::json!(size)),
        ("is_read_only", serde_json::json!(false)),
        ("can_flush", serde_json::json!(true)),
        ("can_fua", serde_json::json!(true)),
        ("can_trim", serde_json::json!(true)),
        ("can_zero", serde_json::json!(true)),
        ("block_size_minimum", serde_json::json!(512)),
        ("block_size_preferred", serde_json::json!(4096)),
        ("block_size_maximum", serde_json::json!(MIB)),
    ];
    for (key, value) in expected {
        if export[key] != value {
            return Err(booted.guest.check_failed(format!(
                "nbdinfo says {key} = {}, expected {value}",
                export[key]
            )));
        }
    }
    if json["protocol"] != "newstyle-fixed" {
        return Err(booted
            .guest
            .check_failed(format!("protocol {}", json["protocol"])));
    }
    let listed = tool(&booted, "nbdinfo", &["--list", &format!("nbd://{GUEST}")])?;
    if !listed.stdout.contains("export=\"vireo\"") {
        return Err(booted
            .guest
            .check_failed("nbdinfo --list does not list the export"));
    }
    let accepted = counter(&booted, "nbd_accepted")?;
    if accepted < 2 {
        return Err(booted
            .guest
            .check_failed(format!("nbd_accepted={accepted} after two nbdinfo runs")));
    }
    no_panic(&booted)
}

#[test]
fn a_read_only_disk_is_a_read_only_export_whose_writes_get_eperm() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, contents) = scratch.random_file("disk.img", 4 * MIB, 7);
    let disk = Disk {
        image: &image,
        prefix: "",
        drive: ",readonly=on",
        device: "",
    };
    let booted = boot_nbd("nbd-ro", Machine::Q35, "", &disk)?;
    let uri = nbd_uri(nbd_address());
    let run = tool(&booted, "nbdinfo", &["--json", &uri])?;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).map_err(|error| {
        booted
            .guest
            .check_failed(format!("nbdinfo --json: {error}"))
    })?;
    if json["exports"][0]["is_read_only"] != true {
        return Err(booted
            .guest
            .check_failed("nbdinfo does not show the export read-only"));
    }
    // qemu-io refuses to open a read-only export for writing.
    let mut command = booted.netns.command("qemu-io");
    command.args(["-f", "raw", "-c", "write -P 0x55 0 4096", &uri]);
    let write = run_tool_any(&mut command, TOOL_LIMIT)
        .map_err(|error| booted.guest.check_failed(error.to_string()))?;
    println!("{}: {}{}", write.command_line, write.stdout, write.stderr);
    if write.stdout.contains("wrote ") {
        return Err(booted
            .guest
            .check_failed("qemu-io wrote to a read-only export"));
    }
    // A client that writes anyway gets NBD_EPERM, and the data stays as it was.
    let expected_start = contents[..4096].to_vec();
    raw(&booted, move || {
        let mut client = NbdClient::go(nbd_address(), RAW_WAIT).map_err(|e| e.to_string())?;
        if client.flags & FLAG_READ_ONLY == 0 {
            return Err(format!(
                "transmission flags {:#x} lack READ_ONLY",
                client.flags
            ));
        }
        let answer = client
            .write(0, &[0x55; 4096], true)
            .map_err(|e| e.to_string())?;
        if answer != Err(NBD_EPERM) {
            return Err(format!(
                "a write on a read-only export got {answer:?}, not EPERM"
            ));
        }
        let read = client.read(0, 4096).map_err(|e| e.to_string())?;
        if read.as_deref() != Ok(&expected_start[..]) {
            return Err("after the refused write the first block reads differently".into());
        }
        Ok(())
    })?;
    kill_and_compare_image(booted, &image, &contents)
}

#[test]
fn nbdcopy_copies_64_mib_of_random_data_in_and_out_byte_for_byte() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let image = scratch.zero_image("disk.img", 64 * MIB as u64);
    let (source, data) = scratch.random_file("source.bin", 64 * MIB, 64);
    let copy = scratch.path("copy.bin");
    let booted = boot_nbd("nbdcopy", Machine::Q35, "", &Disk::plain(&image))?;
    let uri = nbd_uri(nbd_address());
    let began = Instant::now();
    let source_text = source.display().to_string();
    let copy_text = copy.display().to_string();
    let write = tool(&booted, "nbdcopy", &["--flush", &source_text, &uri])?;
    let read = tool(&booted, "nbdcopy", &[&uri, &copy_text])?;
    println!(
        "nbdcopy of 64 MiB: in {:.2} s ({:.1} MiB/s), out {:.2} s ({:.1} MiB/s), {:.2} s in all (TCG)",
        write.elapsed.as_secs_f64(),
        64.0 / write.elapsed.as_secs_f64(),
        read.elapsed.as_secs_f64(),
        64.0 / read.elapsed.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    let back = std::fs::read(&copy).map_err(|error| {
        booted
            .guest
            .check_failed(format!("reading the copy: {error}"))
    })?;
    if let Some(at) = first_difference(&back, &data) {
        return Err(booted.guest.check_failed(format!(
            "the 64 MiB read back differ from what was written, first at byte {at}"
        )));
    }
    if counter(&booted, "nbd_errors")? != 0 || counter(&booted, "blk_errors")? != 0 {
        return Err(booted
            .guest
            .check_failed("nbd_errors or blk_errors is not 0"));
    }
    kill_and_compare_image(booted, &image, &data)
}

/// qemu-io's writes: (pattern, offset, length), aligned and not, one across the 1 MiB maximum
/// payload, one ending at the disk's end; `None` as the pattern is a write of zeroes.
const QEMU_IO_WRITES: [(Option<u8>, u64, u64); 9] = [
    (Some(0x11), 0, 65536),
    (Some(0x22), 70_000, 3000),
    (Some(0x33), 131_071, 1),
    (Some(0x44), 200_703, 8193),
    (Some(0x55), 1_048_576 - 7, 1_300_000),
    (Some(0x66), 3_145_728 + 17, 131_072),
    (None, 2_621_440 + 100, 20_000),
    (Some(0x77), 4_000_000, 4096),
    (Some(0x88), 8 * 1_048_576 - 513, 513),
];

fn qemu_io_reads_and_writes(mode: &str) -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, mut model) = scratch.random_file("disk.img", 8 * MIB, 8);
    let booted = boot_nbd(
        &format!("nbd-io-{mode}"),
        Machine::Q35,
        &format!("mode={mode}"),
        &Disk::plain(&image),
    )?;
    let mut commands = Vec::new();
    for (pattern, offset, length) in QEMU_IO_WRITES {
        let range = offset as usize..(offset + length) as usize;
        match pattern {
            Some(byte) => {
                commands.push(format!("write -P {byte:#x} {offset} {length}"));
                model[range].fill(byte);
            }
            None => {
                commands.push(format!("write -z {offset} {length}"));
                model[range].fill(0);
            }
        }
    }
    for (pattern, offset, length) in QEMU_IO_WRITES {
        commands.push(format!(
            "read -P {:#x} {offset} {length}",
            pattern.unwrap_or(0)
        ));
    }
    // Unaligned reads across the patterns' edges, checked below by the compare.
    commands.push("read 69999 3002".to_string());
    commands.push("readv 1048570 100 4096 777".to_string());
    commands.push("flush".to_string());
    let uri = nbd_uri(nbd_address());
    let mut args = vec!["-f", "raw"];
    for command in &commands {
        args.extend(["-c", command.as_str()]);
    }
    args.push(&uri);
    let interrupts_before = counter(&booted, "blk_interrupts")?;
    let run = tool(&booted, "qemu-io", &args)?;
    if run.stdout.contains("Pattern verification failed") || run.stderr.contains("failed") {
        return Err(booted.guest.check_failed(format!(
            "qemu-io reported a failure:\n{}\n{}",
            run.stdout, run.stderr
        )));
    }
    let reads = run.stdout.matches("read ").count();
    if reads < QEMU_IO_WRITES.len() + 2 {
        return Err(booted.guest.check_failed(format!(
            "qemu-io reported {reads} reads, fewer than the {} asked for",
            QEMU_IO_WRITES.len() + 2
        )));
    }
    // The disk's interrupt is armed only before the loop halts: in `irq` mode it woke the loop
    // for the completions (a halt that missed one would still end at the next timer, slowly);
    // in `poll` mode the loop never halts and never arms it. QEMU notifies the first
    // completion after the device started whatever the driver asked (its `signalled_used`
    // is not valid yet), so poll mode may see that one.
    let blk_interrupts = counter(&booted, "blk_interrupts")? - interrupts_before;
    println!("mode={mode}: blk_interrupts +{blk_interrupts} over qemu-io's requests");
    match mode {
        "irq" if blk_interrupts == 0 => {
            return Err(booted
                .guest
                .check_failed("mode=irq served the disk without a single disk interrupt"));
        }
        "poll" if blk_interrupts > 1 => {
            return Err(booted.guest.check_failed(format!(
                "mode=poll took {blk_interrupts} disk interrupts; polling arms none"
            )));
        }
        _ => {}
    }
    // The whole export against the host's model of the disk.
    let expected = scratch.path("expected.img");
    std::fs::write(&expected, &model).map_err(|error| {
        booted
            .guest
            .check_failed(format!("writing the model: {error}"))
    })?;
    let expected_text = expected.display().to_string();
    tool(
        &booted,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &expected_text],
    )?;
    kill_and_compare_image(booted, &image, &model)
}

#[test]
fn qemu_io_aligned_and_unaligned_reads_and_writes_then_compare_in_adaptive_mode()
-> Result<(), RunError> {
    qemu_io_reads_and_writes("adaptive")
}

#[test]
fn qemu_io_aligned_and_unaligned_reads_and_writes_then_compare_in_irq_mode() -> Result<(), RunError>
{
    qemu_io_reads_and_writes("irq")
}

#[test]
fn qemu_io_aligned_and_unaligned_reads_and_writes_then_compare_in_poll_mode() -> Result<(), RunError>
{
    qemu_io_reads_and_writes("poll")
}

#[test]
fn flushed_writes_survive_sigkill_and_read_back_after_a_second_boot() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let image = scratch.zero_image("disk.img", 16 * MIB as u64);
    let (source, data) = scratch.random_file("pattern.bin", 16 * MIB, 1616);
    let uri = nbd_uri(nbd_address());
    let source_text = source.display().to_string();
    let mut first = boot_nbd("nbd-durable-1", Machine::Q35, "", &Disk::plain(&image))?;
    tool(&first, "nbdcopy", &["--flush", &source_text, &uri])?;
    if counter(&first, "blk_flushes")? == 0 {
        return Err(first
            .guest
            .check_failed("nbdcopy --flush reached no device flush"));
    }
    no_panic(&first)?;
    // SIGKILL: no shutdown, nothing written after the acknowledged flush.
    first.guest.kill();
    drop(first);
    let second = boot_nbd("nbd-durable-2", Machine::Q35, "", &Disk::plain(&image))?;
    let copy = scratch.path("back.bin");
    let copy_text = copy.display().to_string();
    tool(&second, "nbdcopy", &[&uri, &copy_text])?;
    let back = std::fs::read(&copy).map_err(|error| {
        second
            .guest
            .check_failed(format!("reading the copy: {error}"))
    })?;
    if let Some(at) = first_difference(&back, &data) {
        return Err(second.guest.check_failed(format!(
            "after SIGKILL and a second boot the export differs from the flushed pattern at byte {at}"
        )));
    }
    kill_and_compare_image(second, &image, &data)
}

/// Expects the server to have closed `client`'s connection.
fn expect_disconnect(mut client: NbdClient, what: &str) -> Result<(), String> {
    if client.closed_by_server(RAW_WAIT) {
        Ok(())
    } else {
        Err(format!("{what}: the server did not close the connection"))
    }
}

/// Expects `answer` to be the error `expected`.
fn expect_error<T: std::fmt::Debug>(
    answer: std::io::Result<Result<T, u32>>,
    expected: u32,
    what: &str,
) -> Result<(), String> {
    match answer {
        Ok(Err(error)) if error == expected => Ok(()),
        other => Err(format!(
            "{what}: expected NBD error {expected}, got {other:?}"
        )),
    }
}

#[test]
fn hostile_traffic_gets_the_protocol_errors_or_a_disconnect_and_a_good_client_keeps_being_served()
-> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let size = 4 * MIB;
    let (image, mut model) = scratch.random_file("disk.img", size, 4);
    let booted = boot_nbd("nbd-hostile", Machine::Q35, "", &Disk::plain(&image))?;
    let written = random_bytes(8192, 99);
    let written_at = 2 * MIB;
    model[written_at..written_at + written.len()].copy_from_slice(&written);
    let original = std::fs::read(&image).expect("reading the image");
    let address = nbd_address();
    raw(&booted, || {
        let io = |error: std::io::Error| error.to_string();
        let size = size as u64;
        let mut good = NbdClient::go(address, RAW_WAIT).map_err(io)?;
        if good.size != size {
            return Err(format!("export size {} for a {size}-byte image", good.size));
        }
        let check_good = |good: &mut NbdClient, after: &str| -> Result<(), String> {
            let block = good.read(4096, 4096).map_err(io)?;
            if block.as_deref() != Ok(&original[4096..8192]) {
                return Err(format!("after {after}, the good client read {block:?}"));
            }
            Ok(())
        };
        check_good(&mut good, "connecting")?;

        // Handshake phase: bad option magic, then unknown client flags: a disconnect.
        let mut client = NbdClient::connect(address, RAW_WAIT).map_err(io)?;
        client.send(&CLIENT_FLAGS.to_be_bytes()).map_err(io)?;
        client.send(&[0xde; 16]).map_err(io)?;
        expect_disconnect(client, "a bad option magic")?;
        check_good(&mut good, "a bad option magic")?;
        let mut client = NbdClient::connect(address, RAW_WAIT).map_err(io)?;
        client.send(&0x8000_0001u32.to_be_bytes()).map_err(io)?;
        expect_disconnect(client, "unknown client flags")?;
        check_good(&mut good, "unknown client flags")?;

        // An unknown option: NBD_REP_ERR_UNSUP, and the haggling goes on to NBD_OPT_GO.
        let mut client = NbdClient::connect(address, RAW_WAIT).map_err(io)?;
        client.send(&CLIENT_FLAGS.to_be_bytes()).map_err(io)?;
        client.send_option(0x77, b"whatever").map_err(io)?;
        let reply = client.read_option_reply().map_err(io)?;
        if reply.option != 0x77 || reply.kind != REP_ERR_UNSUP {
            return Err(format!(
                "an unknown option got {reply:?}, not NBD_REP_ERR_UNSUP"
            ));
        }
        client
            .send_option(OPT_GO, &go_option_data(EXPORT_NAME, &[]))
            .map_err(io)?;
        loop {
            let reply = client.read_option_reply().map_err(io)?;
            if reply.kind == REP_ACK {
                break;
            }
            if reply.kind >= REP_FLAG_ERROR {
                return Err(format!("NBD_OPT_GO after an unknown option got {reply:?}"));
            }
        }

        // Transmission: each bad request gets its error, and the connection goes on.
        let mut hostile = client;
        expect_error(
            hostile.read(size - 512, 1024),
            NBD_EINVAL,
            "a read past the end",
        )?;
        expect_error(
            hostile.read(u64::MAX - 511, 512),
            NBD_EINVAL,
            "a read whose end overflows",
        )?;
        expect_error(
            hostile.write(size - 512, &[0xee; 1024], false),
            NBD_ENOSPC,
            "a write past the end",
        )?;
        expect_error(hostile.read(1, 512), NBD_EINVAL, "an unaligned read")?;
        expect_error(
            hostile.write(3, &[0xee; 100], false),
            NBD_EINVAL,
            "an unaligned write",
        )?;
        expect_error(hostile.read(0, 0xffff_fff0), NBD_EINVAL, "a huge read")?;
        let unknown = hostile.exchange(0, 99, 0, 512, &[]).map_err(io)?;
        if unknown.error != NBD_EINVAL {
            return Err(format!("an unknown command got {unknown:?}"));
        }
        let flagged = hostile
            .exchange(0x8000, CMD_READ, 0, 512, &[])
            .map_err(io)?;
        if flagged.error != NBD_EINVAL {
            return Err(format!("a read with an unknown flag got {flagged:?}"));
        }
        // A write beyond the maximum payload (but within what must be tolerated): its data
        // is skipped and refused.
        let two_mib = vec![0xee; 2 * MIB];
        expect_error(
            hostile.write(0, &two_mib, false),
            NBD_EINVAL,
            "a 2 MiB write",
        )?;
        let still = hostile.read(8192, 512).map_err(io)?;
        if still.as_deref() != Ok(&original[8192..8704]) {
            return Err(format!(
                "after its refused requests the hostile client read {still:?}"
            ));
        }
        check_good(&mut good, "errors on another connection")?;
        // A bad request magic: a hard disconnect.
        hostile.send(&[0x12; 28]).map_err(io)?;
        expect_disconnect(hostile, "a bad request magic")?;
        check_good(&mut good, "a bad request magic")?;

        // A write announcing 2 GiB: a disconnect, and none of it lands.
        let mut huge = NbdClient::go(address, RAW_WAIT).map_err(io)?;
        let cookie = huge.cookie();
        huge.send_request(0, CMD_WRITE, cookie, 0, 0x7fff_f000, &[0xee; 65536])
            .map_err(io)?;
        expect_disconnect(huge, "a 2 GiB write")?;
        check_good(&mut good, "a 2 GiB write")?;

        // Clients that vanish mid-request: half a write's payload, then reads in flight.
        let mut half = NbdClient::go(address, RAW_WAIT).map_err(io)?;
        let cookie = half.cookie();
        half.send_request(0, CMD_WRITE, cookie, MIB as u64, 65536, &[0xee; 30000])
            .map_err(io)?;
        drop(half);
        let mut gone = NbdClient::go(address, RAW_WAIT).map_err(io)?;
        for index in 0..16u64 {
            let cookie = gone.cookie();
            gone.send_request(0, CMD_READ, cookie, index * 65536, 65536, &[])
                .map_err(io)?;
        }
        drop(gone);
        check_good(&mut good, "clients vanishing mid-request")?;

        // The good client writes, with FUA, and flushes; a second one reads it back.
        let answer = good.write(written_at as u64, &written, true).map_err(io)?;
        if answer.is_err() {
            return Err(format!("the good client's write got {answer:?}"));
        }
        if good.flush().map_err(io)?.is_err() {
            return Err("the good client's flush failed".into());
        }
        let mut second = NbdClient::go(address, RAW_WAIT).map_err(io)?;
        let back = second
            .read(written_at as u64, written.len() as u32)
            .map_err(io)?;
        if back.as_deref() != Ok(&written[..]) {
            return Err("a second client does not read what the first wrote".into());
        }
        good.disconnect().map_err(io)?;
        second.disconnect().map_err(io)?;
        Ok(())
    })?;
    let violations = counter(&booted, "nbd_violations")?;
    println!("nbd_violations={violations}");
    if violations < 4 {
        return Err(booted.guest.check_failed(format!(
            "nbd_violations={violations}: the disconnects were not counted as violations"
        )));
    }
    // Nothing outside the good client's write changed: not the end (ENOSPC), not the start
    // (refused writes), not the half-sent write's range.
    kill_and_compare_image(booted, &image, &model)
}

#[test]
fn four_qemu_io_clients_at_once_each_read_back_their_own_writes() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, mut model) = scratch.random_file("disk.img", 8 * MIB, 44);
    let booted = boot_nbd("nbd-clients", Machine::Q35, "", &Disk::plain(&image))?;
    let uri = nbd_uri(nbd_address());
    let mut children = Vec::new();
    let began = Instant::now();
    for client in 0..4u64 {
        let pattern = 0xa0 + client as u8;
        let base = client * 2 * MIB as u64;
        let mut command: Command = booted.netns.command("qemu-io");
        command.args(["-f", "raw"]);
        for step in 0..16u64 {
            let offset = base + step * 65536 + step;
            command.args(["-c", &format!("write -P {pattern:#x} {offset} 60000")]);
            model[offset as usize..offset as usize + 60000].fill(pattern);
        }
        for step in 0..16u64 {
            let offset = base + step * 65536 + step;
            command.args(["-c", &format!("read -P {pattern:#x} {offset} 60000")]);
        }
        command.args(["-c", "flush", &uri]);
        let describe = xtask::nbd::describe_command(&command);
        let child = std::thread::spawn(move || {
            run_tool(&mut command, TOOL_LIMIT).map_err(|error| error.to_string())
        });
        children.push((describe, child));
    }
    let mut spans = Vec::new();
    for (describe, child) in children {
        let run = child
            .join()
            .map_err(|_| {
                booted
                    .guest
                    .check_failed(format!("{describe}: the thread panicked"))
            })?
            .map_err(|error| booted.guest.check_failed(error))?;
        if run.stdout.contains("Pattern verification failed") {
            return Err(booted
                .guest
                .check_failed(format!("{describe}:\n{}", run.stdout)));
        }
        spans.push(run.elapsed);
    }
    println!(
        "four qemu-io clients: {:?} each, {:.2} s in all",
        spans,
        began.elapsed().as_secs_f64()
    );
    if counter(&booted, "nbd_accepted")? < 4 {
        return Err(booted
            .guest
            .check_failed("fewer than four sessions were counted"));
    }
    kill_and_compare_image(booted, &image, &model)
}

/// A 16 MiB nbdcopy in and out on a disk with the given interrupt path.
fn copy_on_disk_path(
    prefix: &str,
    machine: Machine,
    extra: &[&str],
    append: &str,
    device: &str,
    path: &str,
) -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let image = scratch.zero_image("disk.img", 16 * MIB as u64);
    let (source, data) = scratch.random_file("source.bin", 16 * MIB, 16);
    let disk = Disk {
        image: &image,
        prefix: "",
        drive: "",
        device,
    };
    let booted = boot_nbd_with(prefix, machine, extra, append, &disk)?;
    let line = booted
        .guest
        .lines()
        .into_iter()
        .find(|line| line.text.contains("virtio-blk: ") && line.text.contains("sectors"))
        .map(|line| line.text)
        .unwrap_or_default();
    if !line.contains(path) {
        return Err(booted.guest.check_failed(format!(
            "the disk is not on the interrupt path {path:?}: {line}"
        )));
    }
    let uri = nbd_uri(nbd_address());
    let source_text = source.display().to_string();
    let copy = scratch.path("copy.bin");
    let copy_text = copy.display().to_string();
    tool(&booted, "nbdcopy", &["--flush", &source_text, &uri])?;
    tool(&booted, "nbdcopy", &[&uri, &copy_text])?;
    let back = std::fs::read(&copy).map_err(|error| {
        booted
            .guest
            .check_failed(format!("reading the copy: {error}"))
    })?;
    if let Some(at) = first_difference(&back, &data) {
        return Err(booted
            .guest
            .check_failed(format!("the copy differs at byte {at}")));
    }
    kill_and_compare_image(booted, &image, &data)
}

#[test]
fn nbdcopy_over_a_disk_on_intx() -> Result<(), RunError> {
    copy_on_disk_path(
        "nbd-intx",
        Machine::Q35,
        &[],
        "mode=irq",
        ",vectors=0",
        "INTx",
    )
}

#[test]
fn nbdcopy_over_a_polling_only_disk_in_irq_mode() -> Result<(), RunError> {
    // `pc` without ACPI has no INTx route: with no MSI-X vector the disk can only be polled.
    copy_on_disk_path(
        "nbd-polled",
        Machine::Pc,
        &["-machine", "acpi=off"],
        "mode=irq",
        ",vectors=0",
        "polling only",
    )
}

#[test]
fn the_disks_own_errors_are_nbd_eio_and_the_export_keeps_serving() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, mut model) = scratch.random_file("disk.img", 4 * MIB, 5);
    // QEMU's blkdebug fails every read touching sector 2048 (1 MiB) and every write touching
    // sector 4096 (2 MiB) with EIO, which virtio-blk reports as VIRTIO_BLK_S_IOERR.
    let rules = scratch.path("rules.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"2048\"\nonce = \"off\"\n\n\
         [inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"4096\"\nonce = \"off\"\n",
    )
    .expect("writing the blkdebug rules");
    let prefix = format!("blkdebug:{}:", rules.display());
    let disk = Disk {
        image: &image,
        prefix: &prefix,
        drive: ",werror=report,rerror=report",
        device: "",
    };
    let booted = boot_nbd("nbd-eio", Machine::Q35, "", &disk)?;
    let good = random_bytes(4096, 55);
    model[3 * MIB..3 * MIB + 4096].copy_from_slice(&good);
    let expected_start = model[..4096].to_vec();
    raw(&booted, || {
        let io = |error: std::io::Error| error.to_string();
        let mut client = NbdClient::go(nbd_address(), RAW_WAIT).map_err(io)?;
        expect_error(
            client.read(MIB as u64, 4096),
            NBD_EIO,
            "a read the disk fails",
        )?;
        let start = client.read(0, 4096).map_err(io)?;
        if start.as_deref() != Ok(&expected_start[..]) {
            return Err(format!("after a failed read, a good one got {start:?}"));
        }
        expect_error(
            client.write(2 * MIB as u64, &[0xee; 4096], true),
            NBD_EIO,
            "a write the disk fails",
        )?;
        let written = client.write(3 * MIB as u64, &good, true).map_err(io)?;
        if written.is_err() {
            return Err(format!("a good write after a failed one got {written:?}"));
        }
        let back = client.read(3 * MIB as u64, 4096).map_err(io)?;
        if back.as_deref() != Ok(&good[..]) {
            return Err("the good write does not read back".into());
        }
        client.disconnect().map_err(io)?;
        Ok(())
    })?;
    let (nbd_errors, blk_errors) = (
        counter(&booted, "nbd_errors")?,
        counter(&booted, "blk_errors")?,
    );
    println!("nbd_errors={nbd_errors} blk_errors={blk_errors}");
    if nbd_errors != 2 || blk_errors < 2 {
        return Err(booted.guest.check_failed(format!(
            "nbd_errors={nbd_errors} blk_errors={blk_errors}: expected the two failed requests"
        )));
    }
    kill_and_compare_image(booted, &image, &model)
}

#[test]
fn requests_in_flight_when_the_disk_is_reset_are_answered_with_eio_not_lost() -> Result<(), RunError>
{
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, contents) = scratch.random_file("disk.img", 8 * MIB, 6);
    // The disk is declared failed after every 24 completions while others are in flight: it
    // is reset and brought up again, and what it held must be answered, with NBD_EIO.
    let booted = boot_nbd(
        "nbd-reset",
        Machine::Q35,
        "inject-blk-reset=24",
        &Disk::plain(&image),
    )?;
    const READS: u64 = 96;
    const LENGTH: u32 = 65536;
    let expected = contents.clone();
    let (ok, failed) = raw(&booted, move || {
        let io = |error: std::io::Error| error.to_string();
        let mut client = NbdClient::go(nbd_address(), RAW_WAIT).map_err(io)?;
        for cookie in 0..READS {
            let offset = cookie * u64::from(LENGTH);
            client
                .send_request(0, CMD_READ, cookie, offset, LENGTH, &[])
                .map_err(io)?;
        }
        let mut answered = vec![false; READS as usize];
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..READS {
            let reply = client.read_reply(LENGTH as usize).map_err(io)?;
            let Some(seen) = answered.get_mut(reply.cookie as usize) else {
                return Err(format!("a reply for cookie {} never sent", reply.cookie));
            };
            if std::mem::replace(seen, true) {
                return Err(format!("two replies for cookie {}", reply.cookie));
            }
            match reply.error {
                0 => {
                    let offset = (reply.cookie * u64::from(LENGTH)) as usize;
                    if reply.data[..] != expected[offset..offset + LENGTH as usize] {
                        return Err(format!("read {} returned other bytes", reply.cookie));
                    }
                    ok += 1;
                }
                NBD_EIO => failed += 1,
                error => return Err(format!("read {} got error {error}", reply.cookie)),
            }
        }
        // One at a time, nothing is in flight at a completion: no more injected resets.
        for cookie in 0..4u64 {
            let offset = cookie * u64::from(LENGTH);
            let back = client.read(offset, LENGTH).map_err(io)?;
            if back.as_deref() != Ok(&expected[offset as usize..][..LENGTH as usize]) {
                return Err(format!("after the resets, a read at {offset} got {back:?}"));
            }
        }
        client.disconnect().map_err(io)?;
        Ok((ok, failed))
    })?;
    println!("{READS} pipelined reads across injected disk resets: {ok} exact, {failed} NBD_EIO");
    let resets = count_lines(
        &booted.guest,
        "resetting the device after: an injected failure",
    );
    let answered = count_lines(
        &booted.guest,
        "requests of the block export fail with an I/O error",
    );
    if failed == 0 || ok == 0 || resets == 0 || answered == 0 {
        return Err(booted.guest.check_failed(format!(
            "{ok} exact, {failed} NBD_EIO, {resets} injected resets, {answered} reset lines \
             naming failed requests: expected some of each"
        )));
    }
    kill_and_compare_image(booted, &image, &contents)
}

#[test]
fn requests_beyond_a_small_queue_wait_for_room_and_are_all_served() -> Result<(), RunError> {
    if !prerequisites() {
        return Ok(());
    }
    let scratch = Scratch::new();
    let (image, contents) = scratch.random_file("disk.img", 8 * MIB, 17);
    // 16 descriptors, 3 per request without indirect tables: 5 requests fit, while four
    // connections may have 4 each in flight (the queue's 16 entries shared among them).
    let disk = Disk {
        image: &image,
        prefix: "",
        drive: "",
        device: ",queue-size=16,indirect_desc=off",
    };
    let booted = boot_nbd("nbd-small", Machine::Q35, "", &disk)?;
    const CLIENTS: usize = 4;
    const DEPTH: u64 = 4;
    const LENGTH: u32 = 16 * 1024;
    let expected = contents.clone();
    let address = nbd_address();
    let deferred_key = || counter(&booted, "nbd_deferred");
    let mut rounds = 0;
    // Bursts of 16 reads from four connections at once, until some had to wait (the first
    // burst nearly always does; the bound keeps a slow host from looping forever).
    while deferred_key()? == 0 && rounds < 20 {
        rounds += 1;
        let expected = &expected;
        raw(&booted, move || {
            let io = |error: std::io::Error| error.to_string();
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                clients.push(NbdClient::go(address, RAW_WAIT).map_err(io)?);
            }
            for (index, client) in clients.iter_mut().enumerate() {
                for slot in 0..DEPTH {
                    let cookie = index as u64 * DEPTH + slot;
                    let offset =
                        (cookie + rounds as u64 * 16) * u64::from(LENGTH) % (8 * MIB as u64);
                    client
                        .send_request(0, CMD_READ, cookie, offset, LENGTH, &[])
                        .map_err(io)?;
                }
            }
            for client in &mut clients {
                for _ in 0..DEPTH {
                    let reply = client.read_reply(LENGTH as usize).map_err(io)?;
                    let offset = ((reply.cookie + rounds as u64 * 16) * u64::from(LENGTH)
                        % (8 * MIB as u64)) as usize;
                    if reply.error != 0
                        || reply.data[..] != expected[offset..offset + LENGTH as usize]
                    {
                        return Err(format!(
                            "read {} came back wrong (error {})",
                            reply.cookie, reply.error
                        ));
                    }
                }
            }
            for client in clients {
                client.disconnect().map_err(io)?;
            }
            Ok(())
        })?;
    }
    let deferred = deferred_key()?;
    println!(
        "nbd_deferred={deferred} after {rounds} bursts of {} reads",
        CLIENTS as u64 * DEPTH
    );
    if deferred == 0 {
        return Err(booted.guest.check_failed(format!(
            "in {rounds} bursts no request waited for room in the queue: the test missed its path"
        )));
    }
    kill_and_compare_image(booted, &image, &contents)
}

#[test]
fn nbdcopy_over_a_packed_ring_disk() -> Result<(), RunError> {
    copy_on_disk_path(
        "nbd-packed",
        Machine::Q35,
        &[],
        "",
        ",packed=on",
        "(Packed)",
    )
}
