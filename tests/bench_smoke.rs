//! Smoke test of the benchmark harness: `cargo xtask bench --quick` (Vireo in poll mode and the
//! floors, 64-byte payloads, 2000 samples) over a tap in a private namespace, on the kernel that
//! cargo built for the tests. It checks that the Markdown table, the JSON and the SVG exist and
//! are complete, never that a speed was reached: the benchmark reports numbers, it does not
//! assert them. Needs root (a network namespace with a tap); without it, it skips, or fails
//! under CI=true.

use std::time::Instant;

use xtask::bench::{self, BenchOptions};
use xtask::{skip_or_fail_in_ci, unique_temp_path};

#[test]
fn bench_quick_writes_complete_table_json_and_svg() {
    if let Err(reason) = bench::available() {
        skip_or_fail_in_ci(&reason);
        return;
    }
    let out = unique_temp_path("vireo-bench-smoke", "d");
    let args: Vec<String> = [
        "--quick",
        "--kernel",
        env!("CARGO_BIN_EXE_vireo"),
        "--out",
        &out.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let options = BenchOptions::parse(&args).expect("the --quick arguments parse");
    assert!(options.quick && !options.linux && options.modes == ["poll"]);
    let began = Instant::now();
    let (report, outputs, failures) = bench::run(&options).unwrap_or_else(|error| {
        panic!("cargo xtask bench --quick failed: {error}");
    });
    println!(
        "bench --quick took {:.1} s\n{}",
        began.elapsed().as_secs_f64(),
        bench::report::markdown(&report)
    );
    assert!(failures.is_empty(), "measurements failed: {failures:?}");
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
    // The namespace is gone.
    assert!(
        !xtask::list_namespaces()
            .iter()
            .any(|name| name.starts_with(&format!("vireo-bench-{}-", std::process::id()))),
        "the benchmark's namespace was left behind"
    );
    let _ = std::fs::remove_dir_all(&out);
}
