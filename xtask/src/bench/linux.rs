//! The Linux guest peer: Debian's kernel (`linux-image-amd64`) booted with a busybox initramfs
//! that this module builds. Its `/init` loads the virtio-net modules (with their dependencies
//! from `modules.dep`, decompressed here because busybox `insmod` may not read `.ko.xz`),
//! configures 10.0.2.15/24 on eth0, prints the negotiated features and runs a small static echo
//! server (`linux_echo.rs`, compiled here with `-C target-feature=+crt-static`): UDP and TCP echo
//! on port 7 and a stats line on UDP 7007.
//!
//! For the NBD section the same initramfs carries `virtio_blk` and Debian's `nbd-server` (the
//! binary and every shared library `ldd` names, at the same paths): booted with
//! [`NBD_CMDLINE_FLAG`] on its command line, `/init` waits for `/dev/vda` and starts
//! `nbd-server` exporting it as [`NBD_EXPORT`] on TCP 10809 before the echo server.
//!
//! Missing Debian packages are installed through [`crate::host::install_packages`] when running
//! as root (announced first).
//! Anything that cannot be done comes back as an error string that the benchmark reports in its
//! output and JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::host::install_packages;
use crate::{QemuCommand, log};

/// The serial line the guest's echo server prints once it serves.
pub const READY_MARKER: &str = "linux-echo: ready";
/// The serial line that carries eth0's negotiated virtio feature bits.
pub const FEATURES_MARKER: &str = "linux-echo: features";
/// The Debian packages the Linux guest needs.
pub const PACKAGES: [&str; 3] = ["linux-image-amd64", "busybox-static", "nbd-server"];
/// The modules `/init` loads (with their dependencies).
const WANTED_MODULES: [&str; 3] = ["virtio_pci", "virtio_net", "virtio_blk"];
/// The kernel command-line word that makes `/init` export `/dev/vda` with `nbd-server`.
pub const NBD_CMDLINE_FLAG: &str = "vireo_bench_nbd=1";
/// The export name `nbd-server` serves `/dev/vda` under (its configuration's section name).
pub const NBD_EXPORT: &str = "bench";
/// The serial line `/init` prints once `nbd-server` started.
pub const NBD_READY_MARKER: &str = "linux-echo: nbd-server started";
/// Where Debian installs `nbd-server`.
const NBD_SERVER_PATHS: [&str; 2] = ["/usr/bin/nbd-server", "/usr/sbin/nbd-server"];
/// The Linux guest's kernel command line.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet mitigations=off";

/// A bootable Linux guest.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    /// The kernel release (e.g. `6.1.0-56-amd64`).
    pub version: String,
    /// `/boot/vmlinuz-<version>`.
    pub vmlinuz: PathBuf,
    /// The initramfs built for the benchmark.
    pub initramfs: PathBuf,
    /// The modules `/init` loads, in order.
    pub modules: Vec<String>,
}

impl LinuxImage {
    /// The guest's QEMU command: `base` (built for this image's `vmlinuz` by the same code path
    /// as Vireo's, so that machine, memory, NIC and netdev are identical) with the initramfs and
    /// [`CMDLINE`].
    pub fn command(&self, base: QemuCommand) -> QemuCommand {
        base.append(CMDLINE).arg("-initrd").arg(&self.initramfs)
    }

    /// The guest's QEMU command for the NBD section: as [`LinuxImage::command`], with
    /// [`NBD_CMDLINE_FLAG`] (the disk is part of `base`).
    pub fn nbd_command(&self, base: QemuCommand) -> QemuCommand {
        base.append(format!("{CMDLINE} {NBD_CMDLINE_FLAG}"))
            .arg("-initrd")
            .arg(&self.initramfs)
    }
}

/// Turns the bit string of `/sys/class/net/eth0/device/features` (bit 0 first) into the
/// feature word in hex, comparable with Vireo's `negotiated features 0x...` line.
pub fn features_hex(bits: &str) -> Option<String> {
    let bits = bits.trim();
    if bits.is_empty() || bits.len() > 64 || !bits.bytes().all(|b| b == b'0' || b == b'1') {
        return None;
    }
    let word = bits
        .bytes()
        .enumerate()
        .filter(|(_, b)| *b == b'1')
        .fold(0u64, |word, (bit, _)| word | 1 << bit);
    Some(format!("0x{word:016x}"))
}

/// Finds (installing when needed and allowed) the kernel and busybox, and builds the initramfs
/// under `out_dir/linux-guest/`.
pub fn prepare(out_dir: &Path) -> Result<LinuxImage, String> {
    let mut found = find_parts();
    if found.is_ok() && find_nbd_server().is_none() {
        found = Err("no nbd-server (Debian package nbd-server)".to_string());
    }
    if let Err(missing) = &found {
        log(&format!(
            "bench: {missing}; the Linux guest needs {}",
            PACKAGES.join(" ")
        ));
        install_packages(&PACKAGES).map_err(|error| format!("{missing}; {error}"))?;
        found = find_parts();
    }
    let (version, vmlinuz, busybox) = found?;
    let nbd_server = find_nbd_server()
        .ok_or_else(|| "nbd-server is still missing after installing nbd-server".to_string())?;
    let modules_dir = PathBuf::from("/lib/modules").join(&version);
    let order = module_load_order(&modules_dir, &WANTED_MODULES)?;
    let stage = out_dir.join("linux-guest");
    std::fs::create_dir_all(&stage).map_err(|e| format!("creating {}: {e}", stage.display()))?;
    let echo_server = build_echo_server(&stage)?;
    let mut archive = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "etc",
        "etc/nbd-server",
        "var",
        "var/run",
    ] {
        archive.directory(dir);
    }
    add_program_with_libraries(&mut archive, &nbd_server, "bin/nbd-server")?;
    archive.file(
        "etc/nbd-server/config",
        0o644,
        nbd_server_config().as_bytes(),
    );
    archive.char_device("dev/console", 5, 1);
    archive.file(
        "bin/busybox",
        0o755,
        &std::fs::read(&busybox).map_err(|e| format!("reading {}: {e}", busybox.display()))?,
    );
    archive.file(
        "bin/echo-server",
        0o755,
        &std::fs::read(&echo_server)
            .map_err(|e| format!("reading {}: {e}", echo_server.display()))?,
    );
    let mut names = Vec::new();
    for (name, path) in &order {
        let bytes = decompress(path)?;
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes);
        names.push(name.clone());
    }
    archive.file("init", 0o755, init_script(&names).as_bytes());
    let initramfs = stage.join("initramfs.cpio");
    std::fs::write(&initramfs, archive.finish())
        .map_err(|e| format!("writing {}: {e}", initramfs.display()))?;
    log(&format!(
        "bench: Linux guest: kernel {}, busybox {}, modules {names:?}, initramfs {}",
        vmlinuz.display(),
        busybox.display(),
        initramfs.display()
    ));
    Ok(LinuxImage {
        version,
        vmlinuz,
        initramfs,
        modules: names,
    })
}

fn find_nbd_server() -> Option<PathBuf> {
    NBD_SERVER_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

/// `nbd-server`'s configuration in the guest: one export, [`NBD_EXPORT`], of `/dev/vda` on
/// port 10809, with flush and FUA offered (the server then calls `fdatasync` for them); no
/// `user`, so it stays root and needs no passwd database.
pub fn nbd_server_config() -> String {
    format!(
        "[generic]\n    port = 10809\n    listenaddr = 0.0.0.0\n[{NBD_EXPORT}]\n    exportname = \
         /dev/vda\n    flush = true\n    fua = true\n"
    )
}

/// The shared libraries `ldd` names for `program`, the dynamic loader included.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let output = Command::new("ldd")
        .arg(program)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ldd {}: {e}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses `ldd` output: `name => /path (address)` and `/path (address)` lines give a path;
/// the vDSO (no path) is skipped.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Adds `program` as `name` and every shared library it needs at its own path (parent
/// directories first; symbolic links are read through).
fn add_program_with_libraries(
    archive: &mut Cpio,
    program: &Path,
    name: &str,
) -> Result<(), String> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
    archive.file(name, 0o755, &read(program)?);
    let mut directories = BTreeSet::new();
    for library in shared_libraries(program)? {
        let relative = library.strip_prefix("/").unwrap_or(&library).to_path_buf();
        for ancestor in relative
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let text = ancestor.to_string_lossy().to_string();
            if !text.is_empty()
                && !["lib", "bin"].contains(&text.as_str())
                && directories.insert(text.clone())
            {
                archive.directory(&text);
            }
        }
        archive.file(&relative.to_string_lossy(), 0o755, &read(&library)?);
    }
    Ok(())
}

/// The newest kernel with both `/boot/vmlinuz-V` and `/lib/modules/V`, and a static busybox.
fn find_parts() -> Result<(String, PathBuf, PathBuf), String> {
    let mut versions: Vec<String> = std::fs::read_dir("/lib/modules")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).is_file())
                .filter(|v| Path::new(&format!("/lib/modules/{v}/modules.dep")).is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let kernel = versions.pop();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file() && is_static_elf(p));
    match (kernel, busybox) {
        (Some(version), Some(busybox)) => {
            let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{version}"));
            Ok((version, vmlinuz, busybox))
        }
        (kernel, busybox) => {
            let mut missing = Vec::new();
            if kernel.is_none() {
                missing.push("no Linux kernel with modules (/boot/vmlinuz-V and /lib/modules/V)");
            }
            if busybox.is_none() {
                missing.push("no statically linked busybox (/bin/busybox)");
            }
            Err(missing.join(" and "))
        }
    }
}

/// Whether the ELF file at `path` has no program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let mut phoff_bytes = [0u8; 8];
    phoff_bytes.copy_from_slice(&bytes[32..40]);
    let phoff = u64::from_le_bytes(phoff_bytes) as usize;
    let (entry_size, count) = (u16_at(54), u16_at(56));
    (0..count).all(|i| {
        let at = phoff + i * entry_size;
        at + 4 <= bytes.len()
            && u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) != 3
    })
}

/// A module's name from its path: `kernel/drivers/net/virtio_net.ko.xz` -> `virtio_net`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The modules to load for `wanted`, dependencies first, from `modules.dep` (built-in ones, in
/// `modules.builtin`, are skipped). Returns (name, path).
pub fn module_load_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, String> {
    let dep_file = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_file)
        .map_err(|e| format!("reading {}: {e}", dep_file.display()))?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let graph = parse_modules_dep(&text);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        graph: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, String)>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some((path, deps)) = graph.get(name) {
            for dep in deps {
                visit(dep, graph, seen, order);
            }
            order.push((name.to_string(), path.clone()));
        }
    }
    for name in wanted {
        if graph.contains_key(*name) {
            visit(name, &graph, &mut seen, &mut order);
        } else if !builtin.contains(*name) {
            return Err(format!(
                "module {name} is neither in {} nor built in",
                dep_file.display()
            ));
        }
    }
    Ok(order
        .into_iter()
        .map(|(name, path)| (name, modules_dir.join(path)))
        .collect())
}

/// Parses `modules.dep`: `path: dep-path dep-path ...` into name -> (path, dependency names).
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(module_name).collect();
            Some((module_name(path), (path.trim().to_string(), deps)))
        })
        .collect()
}

fn decompress(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool: Option<(&str, &[&str])> = if name.ends_with(".xz") {
        Some(("xz", &["-dc"]))
    } else if name.ends_with(".zst") {
        Some(("zstd", &["-dcq"]))
    } else if name.ends_with(".gz") {
        Some(("gzip", &["-dc"]))
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display())),
        Some((program, args)) => {
            let output = Command::new(program)
                .args(args)
                .arg(path)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("decompressing {} with {program}: {e}", path.display()))?;
            if output.status.success() {
                Ok(output.stdout)
            } else {
                Err(format!(
                    "`{program} {} {}` failed: {}",
                    args.join(" "),
                    path.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        }
    }
}

/// Compiles `linux_echo.rs` into a static x86_64 Linux binary in `stage`.
fn build_echo_server(stage: &Path) -> Result<PathBuf, String> {
    let source = stage.join("linux_echo.rs");
    std::fs::write(&source, include_str!("linux_echo.rs"))
        .map_err(|e| format!("writing {}: {e}", source.display()))?;
    let binary = stage.join("echo-server");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .current_dir(crate::workspace_root())
        .args([
            "--edition",
            "2021",
            "--crate-name",
            "linux_echo",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&binary)
        .arg(&source)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running rustc to build the Linux guest's echo server: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the Linux guest's static echo server failed (rustc with \
             -C target-feature=+crt-static needs glibc's static libraries, Debian package \
             libc6-dev): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if !is_static_elf(&binary) {
        return Err(format!(
            "{} is not statically linked; it would not run in the busybox initramfs",
            binary.display()
        ));
    }
    Ok(binary)
}

/// The initramfs's `/init`.
pub fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "linux-echo: init on Linux $(uname -r)"
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "linux-echo: insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 400 ]; do usleep 25000; i=$((i+1)); done
if [ ! -e /sys/class/net/eth0 ]; then echo "linux-echo: FAILED: no eth0"; exit 1; fi
ip link set lo up
# Announce the address with a gratuitous ARP when eth0 comes up, as Vireo does: the peer gets
# the same chance to be found by a host with no neighbour entry for it.
echo 1 > /proc/sys/net/ipv4/conf/all/arp_notify
echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_notify
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
echo "linux-echo: features $(cat /sys/class/net/eth0/device/features) driver $(basename $(readlink /sys/class/net/eth0/device/driver))"
if grep -q {nbd_flag} /proc/cmdline; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 25000; i=$((i+1)); done
    if [ -b /dev/vda ] && LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/lib64 /bin/nbd-server -C /etc/nbd-server/config; then
        echo "{nbd_ready} (/dev/vda, $(cat /sys/block/vda/size) sectors, export {nbd_export}, port 10809)"
    else
        echo "linux-echo: FAILED: nbd-server did not start (is /dev/vda there? $(ls /dev/vd* 2>&1))"
    fi
fi
exec /bin/echo-server
"#,
        modules = modules.join(" "),
        nbd_flag = NBD_CMDLINE_FLAG,
        nbd_ready = NBD_READY_MARKER,
        nbd_export = NBD_EXPORT,
    )
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs), built in memory.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Adds a directory.
    pub fn directory(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, (0, 0), data);
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks.
        while !self.bytes.len().is_multiple_of(512) {
            self.bytes.push(0);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_module_dependencies_first() {
        let dep = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
                   kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
                   kernel/net/core/failover.ko.xz:\n\
                   kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz\n\
                   kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:\n\
                   kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n\
                   kernel/drivers/virtio/virtio.ko.xz:\n";
        let dir = std::env::temp_dir().join(format!("vireo-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("modules.dep"), dep).expect("write");
        let order: Vec<String> = module_load_order(&dir, &["virtio_pci", "virtio_net"])
            .expect("order")
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        let position = |name: &str| order.iter().position(|n| n == name).expect(name);
        assert!(position("virtio") < position("virtio_ring"));
        assert!(position("virtio_ring") < position("virtio_pci"));
        assert!(position("virtio_pci_modern_dev") < position("virtio_pci"));
        assert!(position("failover") < position("net_failover"));
        assert!(position("net_failover") < position("virtio_net"));
        assert_eq!(order.len(), 7);
    }

    #[test]
    fn ldd_lines_become_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n\tlibgone.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libglib-2.0.so.0"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn init_exports_vda_only_when_asked() {
        let script = init_script(&["virtio_blk".to_string()]);
        assert!(script.contains(&format!("grep -q {NBD_CMDLINE_FLAG} /proc/cmdline")));
        assert!(script.contains("/bin/nbd-server -C /etc/nbd-server/config"));
        assert!(nbd_server_config().contains("exportname = /dev/vda"));
        assert!(nbd_server_config().contains(&format!("[{NBD_EXPORT}]")));
    }

    #[test]
    fn feature_bits_become_a_word() {
        assert_eq!(features_hex("1").as_deref(), Some("0x0000000000000001"));
        assert_eq!(features_hex("0100").as_deref(), Some("0x0000000000000002"));
        assert_eq!(features_hex("x1"), None);
    }

    #[test]
    fn cpio_is_newc_and_block_aligned() {
        let mut archive = Cpio::default();
        archive.directory("bin");
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh"));
    }
}
