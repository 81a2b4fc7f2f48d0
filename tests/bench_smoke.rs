//! Smoke tests of the benchmark harness over a tap in a private namespace, on the kernel that
//! cargo built for the tests: `cargo xtask bench --quick --sections echo` (Vireo in poll mode
//! and the floors, 64-byte payloads, 2000 samples), and `--quick --nbd-only` (Vireo's NBD export
//! and the host's qemu-nbd, every figure for half a second). It checks that the Markdown table, the JSON and the SVG exist and
//! are complete, never that a speed was reached: the benchmark reports numbers, it does not
//! assert them. Needs root (a network namespace with a tap); without it, it skips, or fails
//! under CI=true.

use std::sync::Mutex;
use std::time::Instant;

use xtask::bench::{self, BenchOptions};
use xtask::{skip_or_fail_in_ci, unique_temp_path};

/// One benchmark at a time: both share the cores, and each checks that no namespace of this
/// process is left behind.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One smoke run: `cargo xtask bench` with `args`, this test's kernel and a fresh output
/// directory, after the previous run ended; `None` when it cannot run here (skipped; under
/// CI=true that fails). Panics when the run fails or a measurement failed, and checks that no
/// namespace of this process was left behind. The caller removes the directory (`.3`).
fn smoke_run(
    tag: &str,
    args: &[&str],
) -> Option<(
    BenchOptions,
    bench::report::Report,
    bench::Outputs,
    std::path::PathBuf,
)> {
    if let Err(reason) = bench::available() {
        skip_or_fail_in_ci(&reason);
        return None;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = unique_temp_path(tag, "d");
    let out_arg = out.to_string_lossy().into_owned();
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for extra in ["--kernel", env!("CARGO_BIN_EXE_vireo"), "--out", &out_arg] {
        all.push(extra.to_string());
    }
    let options = BenchOptions::parse(&all).expect("the smoke run's arguments parse");
    let began = Instant::now();
    let (report, outputs, failures) = bench::run(&options).unwrap_or_else(|error| {
        panic!("cargo xtask bench {} failed: {error}", args.join(" "));
    });
    println!(
        "bench {} took {:.1} s\n{}",
        args.join(" "),
        began.elapsed().as_secs_f64(),
        bench::report::markdown(&report)
    );
    assert!(failures.is_empty(), "measurements failed: {failures:?}");
    assert!(
        !xtask::list_namespaces()
            .iter()
            .any(|name| name.starts_with(&format!("vireo-bench-{}-", std::process::id()))),
        "the benchmark's namespace was left behind"
    );
    Some((options, report, outputs, out))
}

#[test]
fn bench_quick_writes_complete_table_json_and_svg() {
    let Some((options, report, outputs, out)) =
        smoke_run("vireo-bench-smoke", &["--quick", "--sections", "echo"])
    else {
        return;
    };
    assert!(options.quick && !options.linux && options.modes == ["poll"]);
    for path in [&outputs.markdown, &outputs.json, &outputs.svg] {
        let size = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
            .len();
        assert!(size > 0, "{} is empty", path.display());
    }
    bench::validate_outputs(
        &outputs,
        &["vireo-poll", "floor-loopback", "floor-tap-reflector"],
        options.samples,
    )
    .unwrap_or_else(|problem| panic!("incomplete results: {problem}"));
    // The Linux guest is not part of the quick run, and the report says so rather than
    // leaving it out silently.
    assert!(
        report
            .not_measured
            .iter()
            .any(|m| m.what == "Linux guest" && m.reason.contains("--quick")),
        "the quick run must say that it skipped the Linux guest: {:?}",
        report.not_measured
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bench_nbd_quick_checks_every_read_and_writes_the_nbd_table() {
    let Some((options, report, outputs, out)) = smoke_run(
        "vireo-bench-nbd-smoke",
        &["--quick", "--nbd-only", "--nbd-secs", "0.3"],
    ) else {
        return;
    };
    assert_eq!(options.sections, [bench::Section::Nbd]);
    assert!(report.systems.is_empty(), "the echo section ran too");
    bench::validate_nbd_outputs(&outputs, &["nbd-vireo", "nbd-host-qemu-nbd"])
        .unwrap_or_else(|problem| panic!("incomplete NBD results: {problem}"));
    // Bytes were checked: every read figure of every target compared all it read, and the
    // section read something.
    let section = report.nbd.as_ref().expect("the NBD section");
    let checked: u64 = section
        .targets
        .iter()
        .flat_map(|t| &t.figures)
        .filter(|f| f.operation == bench::nbd::Operation::Read)
        .map(|f| {
            assert_eq!(f.verified_bytes, f.bytes, "{}: unchecked bytes", f.name());
            f.verified_bytes
        })
        .sum();
    assert!(checked > 0, "no byte was read back and checked");
    // Vireo's export is the image's size, writable, with flush.
    let vireo = section
        .targets
        .iter()
        .find(|t| t.id == "nbd-vireo")
        .expect("Vireo");
    let export = vireo.export.expect("Vireo's NBD_OPT_GO information");
    assert_eq!(export.size, options.nbd_image_mib << 20);
    assert!(export.can_flush() && !export.read_only());
    // Without the Linux guest the goal has no verdict, and the report says why.
    assert!(
        report
            .targets
            .iter()
            .any(|t| t.target.starts_with("NBD:") && t.verdict == "not measured"),
        "{:?}",
        report.targets
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `cargo xtask bench --quick --sections tcp --tcp-mib 2`: the TCP throughput section alone
/// (Vireo poll mode and the loopback TCP floor, 1 and 8 connections of 2 MiB each way). Checks
/// the structure and that every byte was echoed and checked, never a speed.
#[test]
fn bench_tcp_section_alone_checks_every_byte_and_writes_its_table_and_plot() {
    let Some((options, report, outputs, out)) = smoke_run(
        "vireo-bench-tcp-smoke",
        &["--quick", "--sections", "tcp", "--tcp-mib", "2"],
    ) else {
        return;
    };
    assert_eq!(options.tcp_bytes, 2 << 20);
    assert_eq!(options.tcp_connections, [1, 8]);
    for id in ["vireo-poll", "floor-loopback-tcp"] {
        let system = report
            .systems
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("{id} is missing"));
        assert!(system.udp.is_empty(), "{id}: the echo section did not run");
        for connections in [1, 8] {
            let run = system
                .tcp_run(connections)
                .unwrap_or_else(|| panic!("{id}: no run of {connections} connections"));
            assert_eq!(run.result.checked_bytes, (connections as u64) << 21);
            assert_eq!(run.result.per_connection_s.len(), connections);
            assert!(run.result.mb_per_s > 0.0 && run.result.seconds > 0.0);
        }
    }
    // The guest's own count agrees with the client's: every byte went through its echo.
    let poll = report
        .systems
        .iter()
        .find(|s| s.id == "vireo-poll")
        .expect("poll");
    for run in &poll.tcp {
        let counters = run.counters.as_ref().expect("guest counters");
        assert_eq!(
            counters.deltas.get("tcp_bytes_echoed").copied(),
            Some(run.result.checked_bytes as i64),
            "{} connections",
            run.result.connections
        );
    }
    bench::validate_outputs(&outputs, &["vireo-poll"], options.samples)
        .unwrap_or_else(|problem| panic!("incomplete results: {problem}"));
    bench::output::validate_tcp(&outputs, &["vireo-poll", "floor-loopback-tcp"])
        .unwrap_or_else(|problem| panic!("incomplete TCP results: {problem}"));
    let markdown = std::fs::read_to_string(&outputs.markdown).expect("bench.md");
    assert!(
        !markdown.contains("| System | UDP"),
        "no echo table without its section"
    );
    assert!(!outputs.svg.exists(), "no CDF without the echo section");
    let _ = std::fs::remove_dir_all(&out);
}
