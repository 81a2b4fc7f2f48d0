//! The NBD section of `cargo xtask bench` (issue 14, item 5): the three targets over the same
//! namespace and tap, each on a fresh raw image of generation 0 ([`DiskModel`]):
//! - the host floor: `qemu-nbd` on the host (no VM), listening on the host side of the tap
//!   (10.0.2.2:10809 inside the namespace), with the guests' cache mode;
//! - Vireo: the kernel with `services=echo,stats,nbd` and the image as its virtio-blk disk;
//! - the Linux guest: the benchmark's initramfs with `nbd-server` exporting `/dev/vda`.
//!
//! Each target gets the same figures from the same client ([`super::nbd`]): sequential and
//! random 4 KiB reads and writes, with 1 client and with several.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::linux::{self, LinuxImage};
use super::nbd::{self, BLOCK_SIZE, DiskModel, Operation, Pattern};
use super::options::BenchOptions;
use super::report::nbd::{
    NBD_HOST_FLOOR, NBD_LINUX, NBD_VIREO, NbdFigure, NbdSection, NbdSettings, NbdTarget,
};
use super::report::{Counters, NotMeasured, SystemKind};
use super::systems::stats;
use super::{BenchError, check_cancelled, first_lines, note_contention};
use crate::host::ensure_packages;
use crate::nbd::{EXPORT_NAME as VIREO_EXPORT, NBD_PORT};
use crate::progress::Progress;
use crate::{DEFAULT_GUEST_IP, Guest, NetNs, QemuCommand, RunOptions, log};

/// The host side of the tap, where the host floor's qemu-nbd listens.
const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The QEMU cache mode of both guests' disk and of the host's qemu-nbd.
pub const CACHE_MODE: &str = "writeback";
/// The host floor's export name.
const FLOOR_EXPORT: &str = "bench";

/// The figures of one client count, in the order they run.
const PHASES: [(Pattern, Operation); 4] = [
    (Pattern::Sequential, Operation::Read),
    (Pattern::Sequential, Operation::Write),
    (Pattern::Random, Operation::Read),
    (Pattern::Random, Operation::Write),
];

/// The `-drive` spec of the benchmark's disk at `image`.
pub fn drive_spec(image: &Path) -> String {
    format!(
        "file={},format=raw,if=none,id=nbd0,cache={CACHE_MODE},aio=threads",
        image.display()
    )
}

/// The `-device` spec of the benchmark's disk.
pub const DISK_DEVICE: &str = "virtio-blk-pci,drive=nbd0";

/// Everything the section needs from the run.
pub(super) struct SectionInputs<'a> {
    pub netns: &'a NetNs,
    pub options: &'a BenchOptions,
    /// The guest command of every guest, for a kernel (same machine, memory, NIC as the echo
    /// section).
    pub base_for: &'a dyn Fn(&Path) -> QemuCommand,
    pub kernel: &'a Path,
    pub linux_image: Option<&'a LinuxImage>,
}

/// Runs the NBD section. Targets that fail are reported in `not_measured` and `failures`.
pub(super) fn run(
    inputs: &SectionInputs<'_>,
    not_measured: &mut Vec<NotMeasured>,
    failures: &mut Vec<String>,
) -> Result<NbdSection, BenchError> {
    let options = inputs.options;
    let image = options.out_dir.join("nbd-disk.img");
    let settings = NbdSettings {
        image_mib: options.nbd_image_mib,
        block_size: BLOCK_SIZE,
        seconds_per_figure: options.nbd_time.as_secs_f64(),
        warmup_seconds: options.nbd_warmup.as_secs_f64(),
        clients: options.nbd_clients.clone(),
        drive: drive_spec(Path::new("IMAGE")),
        disk_device: DISK_DEVICE.to_string(),
        cache_mode: format!(
            "cache={CACHE_MODE} (QEMU's default: the host page cache holds the image; the \
             guest sees a volatile write cache, so a flush becomes fdatasync on the image) for \
             both guests, and --cache={CACHE_MODE} for the host's qemu-nbd"
        ),
        write_semantics: vec![
            "Vireo acknowledges a write once its virtio-blk request completed (QEMU wrote it \
             to the image through the host page cache); FLUSH and FUA wait for the device's \
             flush."
                .to_string(),
            "The Linux guest's nbd-server writes /dev/vda through the guest's own page cache: \
             a write is acknowledged once it is in guest memory, and reads of cached blocks \
             never reach the device; FLUSH is fdatasync (flush = true in its configuration)."
                .to_string(),
            "The host's qemu-nbd writes the image through the host page cache; FLUSH is \
             fdatasync."
                .to_string(),
        ],
        verification: "every 4 KiB block carries a pattern of its index and generation; \
                       the image starts at generation 0, each write makes the next one, and \
                       every read is compared byte for byte with the block's current \
                       generation: a mismatch fails the target"
            .to_string(),
    };
    let mut section = NbdSection {
        settings,
        targets: Vec::new(),
    };
    let mut record = |result: Result<NbdTarget, BenchError>,
                      label: &str,
                      section: &mut NbdSection|
     -> Result<(), BenchError> {
        match result {
            Ok(target) => section.targets.push(target),
            Err(error) => {
                check_cancelled()?;
                log(&format!("bench: NBD {label} FAILED: {error}"));
                failures.push(format!(
                    "NBD {label}: {}",
                    first_lines(&error.to_string(), 3)
                ));
                not_measured.push(NotMeasured {
                    what: format!("NBD {label}"),
                    reason: format!("measurement failed: {error}"),
                });
            }
        }
        Ok(())
    };
    if options.floors {
        let result = measure_host_floor(inputs, &image);
        record(result, "host qemu-nbd", &mut section)?;
    }
    let result = measure_vireo(inputs, &image);
    record(result, "Vireo", &mut section)?;
    if let Some(linux_image) = inputs.linux_image {
        let result = measure_linux(inputs, linux_image, &image);
        record(result, "Linux guest", &mut section)?;
    }
    let _ = std::fs::remove_file(&image);
    section.derive();
    Ok(section)
}

fn fresh_image(options: &BenchOptions, image: &Path) -> Result<DiskModel, BenchError> {
    let blocks = options.nbd_image_mib * 1024 * 1024 / u64::from(BLOCK_SIZE);
    // A new seed per target: bytes left over from an earlier target never match.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let model = DiskModel::new(seed, blocks);
    model
        .write_image(image)
        .map_err(|e| BenchError::Failed(format!("writing {}: {e}", image.display())))?;
    Ok(model)
}

/// Every figure against the server at `address`: for each client count, the four phases.
fn measure_figures(
    inputs: &SectionInputs<'_>,
    label: &str,
    address: SocketAddr,
    export: &str,
    model: &mut DiskModel,
    first_connect_limit: Duration,
    target: &mut NbdTarget,
) -> Result<(), BenchError> {
    let options = inputs.options;
    let guest = target.kind != SystemKind::Floor;
    let mut connect_limit = first_connect_limit;
    for &clients in &options.nbd_clients {
        check_cancelled()?;
        let mut workers = inputs
            .netns
            .run(|| nbd::open_workers(address, export, clients, model, connect_limit))??;
        connect_limit = Duration::from_secs(15);
        if target.export.is_none() {
            target.export = workers.first().map(|w| w.info());
            // A warm-up before the first figure, recorded nowhere but checked like any read:
            // the first requests after a boot or a connect (code paths run for the first time,
            // buffer pools filling) are not what "sequential read" should measure.
            if !options.nbd_warmup.is_zero() {
                let seed = model.seed;
                let warmup = inputs.netns.run(|| {
                    nbd::run_phase(
                        &mut workers,
                        seed,
                        Pattern::Random,
                        Operation::Read,
                        options.nbd_warmup,
                        &super::cancelled,
                    )
                })?;
                if let Err(error) = warmup {
                    nbd::close_workers(workers, model);
                    return Err(BenchError::Failed(format!("{label}: warm-up: {error}")));
                }
            }
        }
        for (pattern, operation) in PHASES {
            check_cancelled()?;
            let name = format!(
                "{label}: NBD {} {} 4 KiB, {clients} client(s)",
                pattern.as_str(),
                operation.as_str()
            );
            let mut bar = Progress::new("[bench]", name, 1, "figures");
            let seed = model.seed;
            let before = if guest {
                stats(inputs.netns).ok()
            } else {
                None
            };
            let tcp_before = inputs.netns.run(host_tcp_counters).unwrap_or_default();
            let outcome = inputs.netns.run(|| {
                nbd::run_phase(
                    &mut workers,
                    seed,
                    pattern,
                    operation,
                    options.nbd_time,
                    &super::cancelled,
                )
            })?;
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => {
                    nbd::close_workers(workers, model);
                    return Err(BenchError::Failed(format!("{label}: {error}")));
                }
            };
            let mut figure = NbdFigure::from_outcome(pattern, operation, clients, &outcome)
                .ok_or_else(|| {
                    BenchError::Failed(format!(
                        "{label}: no NBD request completed in {} {}",
                        pattern.as_str(),
                        operation.as_str()
                    ))
                })?;
            bar.finish(&format!(
                "{:.2} MiB/s, {:.0} IOPS, p50 {:.0} us, p99 {:.0} us{}",
                figure.mib_per_s,
                figure.iops,
                figure.latency.p50_us,
                figure.latency.p99_us,
                if operation == Operation::Read {
                    format!(", {} bytes checked", figure.verified_bytes)
                } else {
                    String::new()
                }
            ));
            if let (Some(before), Ok(after)) = (&before, stats(inputs.netns)) {
                figure.counters = Some(per_request(before, &after, figure.ops));
            }
            let tcp_after = inputs.netns.run(host_tcp_counters).unwrap_or_default();
            figure.host_tcp = tcp_after
                .iter()
                .filter_map(|(key, after)| Some((key.clone(), after - tcp_before.get(key)?)))
                .collect();
            target.figures.push(figure);
            note_contention();
        }
        nbd::close_workers(workers, model);
    }
    Ok(())
}

/// The host's TCP counters that show lost segments, in the calling thread's namespace: `Tcp:`
/// `RetransSegs` from `/proc/thread-self/net/snmp` and `TcpExt:` `TCPTimeouts`,
/// `TCPLossProbes`, `TCPFastRetrans` and `TCPSpuriousRTOs` from `.../netstat` (each file is a
/// header line of names and a line of values per protocol).
fn host_tcp_counters() -> std::collections::BTreeMap<String, i64> {
    let wanted = [
        ("Tcp:", "RetransSegs"),
        ("TcpExt:", "TCPTimeouts"),
        ("TcpExt:", "TCPLossProbes"),
        ("TcpExt:", "TCPFastRetrans"),
        ("TcpExt:", "TCPSpuriousRTOs"),
    ];
    let mut counters = std::collections::BTreeMap::new();
    for file in ["snmp", "netstat"] {
        let text =
            std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut names = names.split_whitespace();
            let mut values = values.split_whitespace();
            let (Some(protocol), Some(_)) = (names.next(), values.next()) else {
                continue;
            };
            for (name, value) in names.zip(values) {
                if wanted.contains(&(protocol, name))
                    && let Ok(value) = value.parse()
                {
                    counters.insert(name.to_string(), value);
                }
            }
        }
    }
    counters
}

/// The counters' changes between two stats lines, per NBD request (`echoed` holds the
/// request count; there were no echoes).
fn per_request(
    before: &crate::client::Stats,
    after: &crate::client::Stats,
    requests: u64,
) -> Counters {
    Counters::between_per(before, after, requests)
}

fn new_target(id: &str, label: &str, kind: SystemKind, server: String) -> NbdTarget {
    NbdTarget {
        id: id.to_string(),
        label: label.to_string(),
        kind,
        server,
        command_lines: Vec::new(),
        export: None,
        figures: Vec::new(),
        counters: None,
        notes: Vec::new(),
    }
}

/// A child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure_host_floor(inputs: &SectionInputs<'_>, image: &Path) -> Result<NbdTarget, BenchError> {
    ensure_packages(&[("qemu-nbd", "qemu-utils")])
        .map_err(|e| BenchError::Failed(format!("the host floor needs qemu-nbd: {e}")))?;
    let mut model = fresh_image(inputs.options, image)?;
    let address = SocketAddr::from((HOST_SIDE, NBD_PORT));
    let arguments: Vec<String> = [
        "-f",
        "raw",
        &format!("--cache={CACHE_MODE}"),
        "--aio=threads",
        "-x",
        FLOOR_EXPORT,
        "-b",
        &HOST_SIDE.to_string(),
        "-p",
        &NBD_PORT.to_string(),
        "-e",
        "8",
        "-t",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(image.display().to_string()))
    .collect();
    let mut command = inputs.netns.command("qemu-nbd");
    command
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = format!(
        "ip netns exec {} qemu-nbd {}",
        inputs.netns.name(),
        arguments.join(" ")
    );
    log(&format!("bench: NBD host floor: {line}"));
    let child = KillOnDrop(
        command
            .spawn()
            .map_err(|e| BenchError::Failed(format!("starting qemu-nbd: {e}")))?,
    );
    let mut target = new_target(
        NBD_HOST_FLOOR,
        "Host qemu-nbd (no VM)",
        SystemKind::Floor,
        format!("{address} export {FLOOR_EXPORT:?}"),
    );
    target.command_lines.push(line);
    target.notes.push(
        "qemu-nbd on the host inside the namespace, on the host side of the tap: the host's \
         TCP and file path alone, no guest"
            .to_string(),
    );
    let result = measure_figures(
        inputs,
        "host qemu-nbd",
        address,
        FLOOR_EXPORT,
        &mut model,
        Duration::from_secs(10),
        &mut target,
    );
    drop(child);
    result.map(|()| target)
}

/// Boots `command`, measures it, keeps its serial log.
fn measure_guest_target(
    inputs: &SectionInputs<'_>,
    command: QemuCommand,
    mut target: NbdTarget,
    export: &str,
    image: &Path,
    log_name: &str,
    boot_limit: Duration,
) -> Result<NbdTarget, BenchError> {
    let mut model = fresh_image(inputs.options, image)?;
    log(&format!(
        "bench: NBD {}: {}",
        target.label,
        command.command_line()
    ));
    target.command_lines.push(command.command_line());
    let mut guest = Guest::spawn(
        &command,
        RunOptions {
            timeout: Duration::from_secs(7 * 24 * 3600),
            echo: false,
        },
    )?;
    let address = SocketAddr::from((DEFAULT_GUEST_IP, NBD_PORT));
    let label = target.label.clone();
    let before = {
        // The first handshake waits for the guest to boot; stats come after it.
        let probe = inputs
            .netns
            .run(|| nbd::connect_retrying(address, export, boot_limit))?;
        match probe {
            Ok(client) => {
                let _ = client.disconnect();
            }
            Err(error) => {
                guest.kill();
                let _ = std::fs::write(inputs.options.out_dir.join(log_name), guest.serial_log());
                return Err(BenchError::Failed(format!(
                    "{label}: no NBD server at {address} within {:.0} s: {error}\n{}",
                    boot_limit.as_secs_f64(),
                    guest.failure(crate::Error::Check("no NBD handshake".to_string()))
                )));
            }
        }
        stats(inputs.netns).ok()
    };
    let result = measure_figures(
        inputs,
        &label,
        address,
        export,
        &mut model,
        Duration::from_secs(15),
        &mut target,
    );
    if let (Some(before), Ok(after)) = (&before, stats(inputs.netns)) {
        let requests: u64 = target.figures.iter().map(|f| f.ops).sum();
        target.counters = Some(per_request(before, &after, requests));
    }
    guest.kill();
    let _ = std::fs::write(inputs.options.out_dir.join(log_name), guest.serial_log());
    match result {
        Ok(()) => Ok(target),
        Err(error) => Err(BenchError::Failed(format!(
            "{error}\n{}",
            guest.failure(crate::Error::Check("NBD measurement failed".to_string()))
        ))),
    }
}

fn measure_vireo(inputs: &SectionInputs<'_>, image: &Path) -> Result<NbdTarget, BenchError> {
    let command = (inputs.base_for)(inputs.kernel)
        .append(format!(
            "ip={DEFAULT_GUEST_IP}/24 mode={} services=echo,stats,nbd",
            inputs.options.nbd_mode
        ))
        .arg("-drive")
        .arg(drive_spec(image))
        .device(DISK_DEVICE);
    let mut target = new_target(
        NBD_VIREO,
        &format!("Vireo ({})", inputs.options.nbd_mode),
        SystemKind::Vireo,
        format!("{DEFAULT_GUEST_IP}:{NBD_PORT} export {VIREO_EXPORT:?}"),
    );
    target.notes.push(format!(
        "mode={} (--nbd-mode; adaptive is the kernel's default), services=echo,stats,nbd",
        inputs.options.nbd_mode
    ));
    measure_guest_target(
        inputs,
        command,
        target,
        VIREO_EXPORT,
        image,
        "serial-nbd-vireo.log",
        Duration::from_secs(30),
    )
}

fn measure_linux(
    inputs: &SectionInputs<'_>,
    linux_image: &LinuxImage,
    image: &Path,
) -> Result<NbdTarget, BenchError> {
    let command = linux_image.nbd_command(
        (inputs.base_for)(&linux_image.vmlinuz)
            .arg("-drive")
            .arg(drive_spec(image))
            .device(DISK_DEVICE),
    );
    let mut target = new_target(
        NBD_LINUX,
        &format!("Linux {} guest", linux_image.version),
        SystemKind::Linux,
        format!(
            "{DEFAULT_GUEST_IP}:{NBD_PORT} export {:?}",
            linux::NBD_EXPORT
        ),
    );
    target.notes.push(format!(
        "Debian's nbd-server in the benchmark's initramfs, exporting /dev/vda; its configuration: {}",
        linux::nbd_server_config().replace('\n', " ")
    ));
    measure_guest_target(
        inputs,
        command,
        target,
        linux::NBD_EXPORT,
        image,
        "serial-nbd-linux.log",
        Duration::from_secs(180),
    )
}
