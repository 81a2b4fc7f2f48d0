//! The benchmark's files: writing `bench.md`, `bench.json`, `bench-cdf.svg` (latency section)
//! and `bench-tcp.svg` (TCP section), re-rendering them from a run's JSON, and checking that a
//! run's files are complete (the smoke test's oracle).

use std::path::{Path, PathBuf};

use super::BenchError;
use super::options::Section;
use super::report::{self, Report};

/// Where the outputs of a run went.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// The Markdown tables.
    pub markdown: PathBuf,
    /// The JSON.
    pub json: PathBuf,
    /// The SVG CDF (written when the echo section ran).
    pub svg: PathBuf,
    /// The NBD bar chart (written when the NBD section ran).
    pub nbd_svg: PathBuf,
    /// The SVG TCP throughput bars (written when the TCP section ran).
    pub tcp_svg: PathBuf,
}

/// Re-renders a run's `bench.md` and `bench-cdf.svg` (and the derived figures and target checks
/// in its JSON) from its `bench.json`, in the same directory: for a change to the tables or the
/// plot without measuring again.
pub fn render(json: &Path) -> Result<Outputs, BenchError> {
    let text = std::fs::read_to_string(json)
        .map_err(|e| BenchError::Failed(format!("reading {}: {e}", json.display())))?;
    let mut report: Report = serde_json::from_str(&text)
        .map_err(|e| BenchError::Failed(format!("{} is not a bench.json: {e}", json.display())))?;
    report::derive(&mut report);
    report.targets = report::check_targets(&report);
    let dir = json.parent().unwrap_or(Path::new("."));
    write_outputs(&report, dir)
}

/// Writes `bench.md`, `bench.json` and `bench-cdf.svg` into `dir`.
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Outputs, BenchError> {
    let outputs = Outputs {
        markdown: dir.join("bench.md"),
        json: dir.join("bench.json"),
        svg: dir.join("bench-cdf.svg"),
        nbd_svg: dir.join("bench-nbd.svg"),
        tcp_svg: dir.join("bench-tcp.svg"),
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| BenchError::Failed(format!("writing {}: {e}", path.display())))
    };
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| BenchError::Failed(format!("serialising the report: {e}")))?;
    write(&outputs.json, &json)?;
    write(
        &outputs.markdown,
        &format!("# Vireo benchmark\n\n{}", report::markdown(report)),
    )?;
    if report.systems.iter().any(|system| !system.udp.is_empty()) {
        let size = report.settings.sizes.first().copied().unwrap_or(64);
        report::plot_cdf(report, size, &outputs.svg).map_err(BenchError::Failed)?;
    }
    if report.settings.sections.contains(&Section::Tcp) {
        report::plot_tcp(report, &outputs.tcp_svg).map_err(BenchError::Failed)?;
    }
    if let Some(nbd) = &report.nbd {
        report::plot_nbd(nbd, &report.environment.accelerator, &outputs.nbd_svg)
            .map_err(BenchError::Failed)?;
    }
    Ok(outputs)
}

/// Whether a QEMU thread name is a vCPU's (`CPU 0/TCG`, `CPU 0/KVM`).
pub fn is_vcpu_thread(name: &str) -> bool {
    name.starts_with("CPU ")
}

/// Checks that a run's files exist and are complete for the sections the JSON says it ran.
/// Latency: the JSON holds, for each of `expected` (system ids), every UDP run with `samples`
/// samples and a full CDF (guests also with their QEMU command line, negotiated features, boot
/// time and counters); the Markdown has the tables and a row per system; the CDF SVG is a whole
/// document with a curve per plotted system. TCP ([`validate_tcp`]): a run per connection count
/// with every byte checked. Speeds are not checked.
pub fn validate_outputs(outputs: &Outputs, expected: &[&str], samples: u64) -> Result<(), String> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&outputs.json)
            .map_err(|e| format!("reading {}: {e}", outputs.json.display()))?,
    )
    .map_err(|e| format!("{} is not valid JSON: {e}", outputs.json.display()))?;
    let ran = |section: Section| {
        json["settings"]["sections"]
            .as_array()
            .is_some_and(|all| all.iter().any(|s| s == section.as_str()))
    };
    if !ran(Section::Echo) && !ran(Section::Tcp) {
        return Err("bench.json: settings.sections names no section".to_string());
    }
    if ran(Section::Echo) {
        validate_latency(outputs, expected, samples)?;
    }
    if ran(Section::Tcp) {
        let guests: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|id| !id.starts_with("floor-"))
            .collect();
        validate_tcp(outputs, &guests)?;
    }
    Ok(())
}

/// Checks the TCP section of a run's files: for each of `expected` (system ids) a run per
/// connection count in the settings, each with every byte checked (connections × bytes each),
/// a positive time and MB/s, and a transfer time per connection (guests also with their
/// counters); a TCP table row per system in the Markdown; a bar per system in the TCP SVG.
pub fn validate_tcp(outputs: &Outputs, expected: &[&str]) -> Result<(), String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let json: serde_json::Value = serde_json::from_str(&read(&outputs.json)?)
        .map_err(|e| format!("{} is not valid JSON: {e}", outputs.json.display()))?;
    let settings = &json["settings"];
    let bytes_each = settings["tcp_bytes_each"].as_u64().unwrap_or(0);
    let counts: Vec<u64> = settings["tcp_connections"]
        .as_array()
        .map(|all| all.iter().filter_map(|n| n.as_u64()).collect())
        .unwrap_or_default();
    if bytes_each == 0 || counts.is_empty() {
        return Err("bench.json: settings lack tcp_bytes_each or tcp_connections".to_string());
    }
    let markdown = read(&outputs.markdown)?;
    if !markdown.contains("| System | connections |") {
        return Err("bench.md lacks the TCP throughput table".to_string());
    }
    let svg = read(&outputs.tcp_svg)?;
    if !is_complete_svg(&svg) || !svg.contains("<rect") {
        return Err("bench-tcp.svg is not a complete SVG document with bars".to_string());
    }
    let systems = json["systems"]
        .as_array()
        .ok_or("bench.json: no systems array")?;
    for id in expected {
        let system = systems
            .iter()
            .find(|s| s["id"] == *id)
            .ok_or_else(|| format!("bench.json: system {id:?} is missing"))?;
        let label = system["label"].as_str().unwrap_or("");
        let runs = system["tcp"].as_array().cloned().unwrap_or_default();
        for &count in &counts {
            let run = runs
                .iter()
                .find(|r| r["result"]["connections"].as_u64() == Some(count))
                .ok_or_else(|| format!("bench.json: {id} has no TCP run of {count} connections"))?;
            let result = &run["result"];
            let checked = result["checked_bytes"].as_u64().unwrap_or(0);
            if checked != count * bytes_each {
                return Err(format!(
                    "bench.json: {id}, {count} connections: {checked} bytes checked, not {}",
                    count * bytes_each
                ));
            }
            for key in ["seconds", "mb_per_s"] {
                if result[key]
                    .as_f64()
                    .is_none_or(|v| v <= 0.0 || !v.is_finite())
                {
                    return Err(format!("bench.json: {id}, {count} connections: no {key}"));
                }
            }
            if result["per_connection_s"].as_array().map_or(0, Vec::len) as u64 != count {
                return Err(format!(
                    "bench.json: {id}, {count} connections: not one time per connection"
                ));
            }
            if system["kind"] != "floor" && !run["counters"]["deltas"].is_object() {
                return Err(format!(
                    "bench.json: {id}, {count} connections: no guest counters"
                ));
            }
            if !markdown.contains(&format!("| {label} | {count} |")) {
                return Err(format!(
                    "bench.md has no TCP row for {label:?} with {count} connections"
                ));
            }
        }
        if !svg.contains(label) {
            return Err(format!("bench-tcp.svg has no bars labelled {label:?}"));
        }
    }
    Ok(())
}

fn validate_latency(outputs: &Outputs, expected: &[&str], samples: u64) -> Result<(), String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let json: serde_json::Value = serde_json::from_str(&read(&outputs.json)?)
        .map_err(|e| format!("{} is not valid JSON: {e}", outputs.json.display()))?;
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("").trim().to_string();
    for key in [
        "cpu_model",
        "kernel_release",
        "qemu_version",
        "accelerator",
        "os",
    ] {
        if text(&json["environment"][key]).is_empty() {
            return Err(format!("bench.json: environment.{key} is empty"));
        }
    }
    if json["environment"]["cpus"].as_u64().unwrap_or(0) == 0 {
        return Err("bench.json: environment.cpus is missing".to_string());
    }
    let systems = json["systems"]
        .as_array()
        .ok_or("bench.json: no systems array")?;
    let markdown = read(&outputs.markdown)?;
    let svg = read(&outputs.svg)?;
    for table in [
        "| System | UDP",
        "| System | size |",
        "| Target |",
        "| System | run |",
    ] {
        if !markdown.contains(table) {
            return Err(format!("bench.md lacks the table starting {table:?}"));
        }
    }
    if !is_complete_svg(&svg) {
        return Err("bench-cdf.svg is not a complete SVG document".to_string());
    }
    for id in expected {
        let system = systems
            .iter()
            .find(|s| s["id"] == *id)
            .ok_or_else(|| format!("bench.json: system {id:?} is missing"))?;
        let label = text(&system["label"]);
        let udp = system["udp"]
            .as_array()
            .filter(|runs| !runs.is_empty())
            .ok_or_else(|| format!("bench.json: {id} has no UDP runs"))?;
        for run in udp {
            let count = run["stats"]["count"].as_u64().unwrap_or(0);
            if count != samples {
                return Err(format!(
                    "bench.json: {id} has a UDP run of {count} samples, not {samples}"
                ));
            }
            if run["cdf_us"].as_array().map_or(0, Vec::len) != 1001 {
                return Err(format!(
                    "bench.json: {id} has a UDP run without its 1001-point CDF"
                ));
            }
            for key in [
                "min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
            ] {
                if run["stats"][key].as_f64().is_none_or(|v| v <= 0.0) {
                    return Err(format!("bench.json: {id}: {key} is missing"));
                }
            }
        }
        if system["throughput"]["sent"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("bench.json: {id} has no throughput run"));
        }
        if system["kind"] != "floor" {
            if system["qemu_command_lines"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                return Err(format!("bench.json: {id} has no QEMU command line"));
            }
            if text(&system["negotiated_features"]).is_empty() {
                return Err(format!("bench.json: {id} has no negotiated features"));
            }
            if system["boot"]["first_echo_ms"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                return Err(format!("bench.json: {id} has no boot-to-first-echo"));
            }
            if system["icmp"]["stats"]["count"].as_u64().unwrap_or(0) == 0 {
                return Err(format!("bench.json: {id} has no ICMP run"));
            }
            if !system["udp"][0]["counters"]["per_packet"].is_object() {
                return Err(format!("bench.json: {id} has no guest counters"));
            }
            if system["kind"] == "vireo"
                && system["udp"][0]["counters"]["per_packet"]["spin_ns"].is_null()
            {
                return Err(format!(
                    "bench.json: {id} has no per-packet time breakdown (spin_ns)"
                ));
            }
            let threads = system["udp"][0]["threads"].as_array();
            let is_vcpu = |t: &serde_json::Value| t["thread"].as_str().is_some_and(is_vcpu_thread);
            if !threads.is_some_and(|t| t.iter().any(is_vcpu)) {
                return Err(format!(
                    "bench.json: {id} has no QEMU thread scheduling (no vCPU thread `CPU 0/...`)"
                ));
            }
        }
        if !markdown.contains(&format!("| {label} |")) {
            return Err(format!("bench.md has no row for {label:?}"));
        }
        if !svg.contains(&label) {
            return Err(format!("bench-cdf.svg has no curve labelled {label:?}"));
        }
    }
    if !(svg.contains("<polyline") || svg.contains("<path")) {
        return Err("bench-cdf.svg draws no curve".to_string());
    }
    Ok(())
}

/// Checks that a run's NBD section is complete: the JSON has the section with each of
/// `expected` (target ids), each with every figure (sequential and random, read and write, per
/// client count) with requests, positive throughput and latency percentiles, every read figure
/// with all its bytes checked (`verified_bytes == bytes`), and a command line; the Markdown has
/// the NBD table with a column per target and the goal's row; `bench-nbd.svg` is a whole SVG
/// document naming every target. Speeds are not checked.
pub fn validate_nbd_outputs(outputs: &Outputs, expected: &[&str]) -> Result<(), String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let json: serde_json::Value = serde_json::from_str(&read(&outputs.json)?)
        .map_err(|e| format!("{} is not valid JSON: {e}", outputs.json.display()))?;
    let section = &json["nbd"];
    let clients: Vec<u64> = section["settings"]["clients"]
        .as_array()
        .ok_or("bench.json: no nbd.settings.clients")?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    if clients.is_empty() {
        return Err("bench.json: nbd.settings.clients is empty".to_string());
    }
    let targets = section["targets"]
        .as_array()
        .ok_or("bench.json: no nbd.targets array")?;
    let markdown = read(&outputs.markdown)?;
    let svg = read(&outputs.nbd_svg)?;
    if !markdown.contains("### NBD") || !markdown.contains("| Figure |") {
        return Err("bench.md lacks the NBD table".to_string());
    }
    if !markdown.contains("| NBD: Vireo at least matches the Linux guest") {
        return Err("bench.md lacks the NBD goal's verdict".to_string());
    }
    if !is_complete_svg(&svg) || !svg.contains("<rect") {
        return Err("bench-nbd.svg is not a complete SVG document with bars".to_string());
    }
    for id in expected {
        let target = targets
            .iter()
            .find(|t| t["id"] == *id)
            .ok_or_else(|| format!("bench.json: NBD target {id:?} is missing"))?;
        let label = target["label"].as_str().unwrap_or("");
        if target["command_lines"].as_array().is_none_or(Vec::is_empty) {
            return Err(format!("bench.json: NBD target {id} has no command line"));
        }
        if target["export"]["size"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("bench.json: NBD target {id} has no export size"));
        }
        let figures = target["figures"]
            .as_array()
            .ok_or_else(|| format!("bench.json: NBD target {id} has no figures"))?;
        for &count in &clients {
            for pattern in ["sequential", "random"] {
                for operation in ["read", "write"] {
                    let figure = figures
                        .iter()
                        .find(|f| {
                            f["pattern"] == pattern
                                && f["operation"] == operation
                                && f["clients"].as_u64() == Some(count)
                        })
                        .ok_or_else(|| {
                            format!("bench.json: {id} lacks {pattern} {operation} x{count}")
                        })?;
                    let what = format!("{id} {pattern} {operation} x{count}");
                    let bytes = figure["bytes"].as_u64().unwrap_or(0);
                    if figure["ops"].as_u64().unwrap_or(0) == 0 || bytes == 0 {
                        return Err(format!("bench.json: {what} completed no request"));
                    }
                    if operation == "read" && figure["verified_bytes"].as_u64() != Some(bytes) {
                        return Err(format!(
                            "bench.json: {what}: {} of {bytes} bytes read were checked",
                            figure["verified_bytes"]
                        ));
                    }
                    for key in ["mib_per_s", "iops"] {
                        if figure[key].as_f64().is_none_or(|v| v <= 0.0) {
                            return Err(format!("bench.json: {what}: {key} is missing"));
                        }
                    }
                    for key in ["p50_us", "p99_us"] {
                        if figure["latency"][key].as_f64().is_none_or(|v| v <= 0.0) {
                            return Err(format!("bench.json: {what}: latency {key} is missing"));
                        }
                    }
                }
            }
        }
        if !markdown.contains(&format!(" {label} MiB/s (IOPS) |")) {
            return Err(format!("bench.md has no NBD column for {label:?}"));
        }
        if !svg.contains(label) {
            return Err(format!("bench-nbd.svg has no bars labelled {label:?}"));
        }
    }
    Ok(())
}

/// Whether `svg` is a whole SVG document: it opens with `<svg` (or an XML declaration) and
/// closes with `</svg>`.
fn is_complete_svg(svg: &str) -> bool {
    let trimmed = svg.trim();
    (trimmed.starts_with("<svg") || trimmed.starts_with("<?xml")) && trimmed.ends_with("</svg>")
}
