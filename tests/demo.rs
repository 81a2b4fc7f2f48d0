//! The main job, `cargo xtask demo`, in the test suite: the same library entry the command runs
//! ([`xtask::DemoConfig::parse`] then [`xtask::run_demo`]), on the debug kernel that cargo built
//! for the tests (`--kernel`, so no nested release build). It boots one QEMU on user networking,
//! echoes UDP and 1 MiB of TCP byte for byte, measures UDP round trips, reads the counters and
//! shuts the guest down through QMP `quit`. A failure prints the cause, the QEMU command line and
//! the whole serial log.

use std::ffi::OsString;
use std::path::Path;

use xtask::{DemoConfig, DemoError, GuestExit, run_demo};

/// Round trips the test measures (the command's default is 2000).
const ROUND_TRIPS: u64 = 1000;

fn demo_args(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

#[test]
fn demo_end_to_end_on_the_debug_kernel() -> Result<(), DemoError> {
    let kernel = env!("CARGO_BIN_EXE_vireo");
    let rtts = ROUND_TRIPS.to_string();
    let config = DemoConfig::parse(demo_args(&[
        "--kernel",
        kernel,
        "--rtts",
        &rtts,
        "--timeout",
        "150",
    ]))
    .unwrap_or_else(|usage| panic!("the demo rejected its arguments: {usage}"));
    let summary = run_demo(&config)?;
    let printed = summary.to_string();
    println!("\n{printed}");

    let m = &summary.measurements;
    let mut problems = Vec::new();
    if summary.mode != "adaptive" {
        problems.push(format!(
            "mode {:?}, expected the default adaptive",
            summary.mode
        ));
    }
    match &summary.features {
        Some((_, names)) if names.iter().any(|n| n == "VERSION_1") => {}
        other => problems.push(format!("negotiated features without VERSION_1: {other:?}")),
    }
    if m.udp.received != 8 || m.udp.received > m.udp.sent {
        problems.push(format!("{} of 8 UDP echoes exact", m.udp.received));
    }
    if m.tcp.bytes != 1 << 20 {
        problems.push(format!("TCP echoed {} bytes, expected 1 MiB", m.tcp.bytes));
    }
    match summary.rtt() {
        Some(rtt)
            if rtt.count as u64 == ROUND_TRIPS && rtt.min <= rtt.p50 && rtt.p99 <= rtt.max => {}
        other => problems.push(format!(
            "RTT summary {other:?} for {ROUND_TRIPS} round trips"
        )),
    }
    if m.counter_delta("udp_echoed") < Some(ROUND_TRIPS) {
        problems.push(format!(
            "udp_echoed grew by {:?} over {ROUND_TRIPS} round trips",
            m.counter_delta("udp_echoed")
        ));
    }
    for key in ["kicks", "interrupts"] {
        if m.per_echoed_packet(key).is_none() {
            problems.push(format!("no {key} per packet from the stats lines"));
        }
    }
    if summary.exit != GuestExit::QemuStatus(0) {
        problems.push(format!("QEMU ended with {} after quit", summary.exit));
    }
    for field in [
        "mode:",
        "features:",
        "p50",
        "p90",
        "p99",
        "kicks",
        "interrupts",
        "per packet",
    ] {
        if !printed.contains(field) {
            problems.push(format!("the printed summary lacks {field:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "the demo passed but its summary is wrong: {problems:#?}\n{printed}"
    );
    Ok(())
}

/// A missing kernel is reported as such (no QEMU is started).
#[test]
fn demo_names_a_missing_kernel() {
    let missing = Path::new(env!("CARGO_BIN_EXE_vireo")).with_file_name("no-such-vireo-kernel");
    let config = DemoConfig::parse(demo_args(&["--kernel", &missing.to_string_lossy()]))
        .unwrap_or_else(|usage| panic!("the demo rejected its arguments: {usage}"));
    match run_demo(&config) {
        Err(error @ DemoError::KernelMissing(_)) => {
            let text = error.to_string();
            println!("{text}");
            assert!(
                text.contains("no-such-vireo-kernel") && text.contains("does not exist"),
                "the error does not name the missing kernel: {text}"
            );
        }
        Err(DemoError::NoQemu(error)) => xtask::skip_or_fail_in_ci(&error.to_string()),
        Err(other) => panic!("expected a kernel error, got: {other}"),
        Ok(summary) => panic!("the demo ran on a missing kernel:\n{summary}"),
    }
}

/// A kernel QEMU cannot boot (this test's own executable, an ELF without a PVH note): the demo
/// says the guest never became ready and shows the QEMU command line, the (empty) serial log
/// and QEMU's own complaint.
#[test]
fn demo_names_a_guest_that_never_became_ready() {
    let not_a_kernel = std::env::current_exe().expect("the test's own path");
    let config = DemoConfig::parse(demo_args(&[
        "--kernel",
        &not_a_kernel.to_string_lossy(),
        "--timeout",
        "30",
    ]))
    .unwrap_or_else(|usage| panic!("the demo rejected its arguments: {usage}"));
    match run_demo(&config) {
        Err(error @ DemoError::NeverReady(_)) => {
            let text = error.to_string();
            println!("{text}");
            for part in [
                "never became ready",
                "command (copy-paste to reproduce)",
                "serial log",
                "PVH",
            ] {
                assert!(text.contains(part), "the error lacks {part:?}: {text}");
            }
        }
        Err(DemoError::NoQemu(error)) => xtask::skip_or_fail_in_ci(&error.to_string()),
        Err(other) => panic!("expected `never became ready`, got: {other}"),
        Ok(summary) => panic!("the demo ran on a non-kernel:\n{summary}"),
    }
}

/// `--blk IMAGE --rng`: the extra devices are attached, driven and shown in the summary (the
/// disk's line and its passed boot check, the entropy device and the entropy source), and the
/// features line is still the NIC's.
#[test]
fn demo_with_a_disk_and_an_entropy_device_shows_them() -> Result<(), DemoError> {
    let kernel = env!("CARGO_BIN_EXE_vireo");
    let image = xtask::unique_temp_path("vireo-demo-disk", "img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("writing the demo image");
    let config = DemoConfig::parse(demo_args(&[
        "--kernel",
        kernel,
        "--rtts",
        "100",
        "--timeout",
        "150",
        "--blk",
        image.to_str().expect("utf-8 path"),
        "--rng",
    ]))
    .unwrap_or_else(|usage| panic!("the demo rejected its arguments: {usage}"));
    let summary = run_demo(&config);
    let _ = std::fs::remove_file(&image);
    let summary = summary?;
    let printed = summary.to_string();
    println!("\n{printed}");
    let has = |needle: &str| summary.devices.iter().any(|line| line.contains(needle));
    let mut problems = Vec::new();
    for needle in [
        "virtio-blk: ",
        "2048 sectors (1 MiB)",
        "blk-check: ",
        "virtio-rng: ",
        "entropy: seeded from virtio-rng (32 bytes)",
    ] {
        if !has(needle) {
            problems.push(format!("no device line contains {needle:?}"));
        }
    }
    if !summary
        .devices
        .iter()
        .any(|line| line.contains("blk-check") && line.ends_with("ok"))
    {
        problems.push("the disk's boot check did not pass".to_string());
    }
    match &summary.features {
        Some((_, names)) if names.iter().any(|n| n == "MRG_RXBUF") => {}
        other => problems.push(format!("the features line is not the NIC's: {other:?}")),
    }
    assert!(problems.is_empty(), "{problems:?}\n{printed}");
    Ok(())
}

/// `--nbd` (the documented `cargo xtask demo --nbd`): a fresh 64 MiB disk exported with
/// `services=echo,stats,nbd`, nbdinfo, qemu-io and nbdcopy against it through the forwarded
/// port, every byte checked in the export and in the image; the summary says so. The clients
/// are installed when missing (as root; CI runs as root).
#[test]
fn demo_with_nbd_shows_real_clients_writing_and_reading_the_disk() -> Result<(), DemoError> {
    if let Err(error) = xtask::nbd::ensure_nbd_tools() {
        xtask::skip_or_fail_in_ci(&format!("the NBD clients are not available: {error}"));
        return Ok(());
    }
    let kernel = env!("CARGO_BIN_EXE_vireo");
    let config = DemoConfig::parse(demo_args(&[
        "--kernel",
        kernel,
        "--rtts",
        "100",
        "--timeout",
        "150",
        "--nbd",
    ]))
    .unwrap_or_else(|usage| panic!("the demo rejected its arguments: {usage}"));
    let summary = run_demo(&config)?;
    let printed = summary.to_string();
    println!("\n{printed}");
    let nbd = summary
        .nbd
        .as_ref()
        .unwrap_or_else(|| panic!("no NBD report in the summary:\n{printed}"));
    let mut problems = Vec::new();
    if nbd.size != 64 << 20 {
        problems.push(format!("export size {}, expected 64 MiB", nbd.size));
    }
    if nbd.flags != "read-write, flush, fua, trim, zero" {
        problems.push(format!("export flags {:?}", nbd.flags));
    }
    if !summary.ready_line.contains("nbd=10809") {
        problems.push(format!(
            "the ready line names no nbd=10809: {}",
            summary.ready_line
        ));
    }
    if !summary
        .devices
        .iter()
        .any(|line| line.contains("nbd: exporting virtio-blk"))
    {
        problems.push("no `nbd: exporting` line among the devices".to_string());
    }
    if !printed.contains("every byte matches") {
        problems.push("the summary does not say the bytes matched".to_string());
    }
    assert!(problems.is_empty(), "{problems:?}\n{printed}");
    Ok(())
}
