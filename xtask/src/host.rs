//! The host side of a run: finding (and if allowed, installing) QEMU, reading its version,
//! choosing the accelerator, and the one apt-get installer every command shares
//! ([`ensure_packages`]). Every decision is logged on stderr with the reason for it.

use std::env;
use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::error::Error;

/// Environment variable that names the QEMU binary to use instead of searching `PATH`.
pub const QEMU_ENV: &str = "VIREO_QEMU";
/// Environment variable that forces the accelerator: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "VIREO_ACCEL";
/// The QEMU binary searched for on `PATH`.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";
/// The Debian package that provides [`QEMU_PROGRAM`].
pub const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The QEMU version the project is developed and tested against.
pub const TESTED_QEMU: (u32, u32) = (7, 2);

/// Prints one harness log line on stderr (the test runner captures it and shows it on failure).
pub fn log(message: &str) {
    eprintln!("[xtask] {message}");
}

/// A located, working QEMU binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qemu {
    /// The binary's path (absolute when found on `PATH`).
    pub path: PathBuf,
    /// The first line of `--version`, e.g. `QEMU emulator version 7.2.22 (Debian ...)`.
    pub version_line: String,
    /// The parsed `(major, minor, patch)` version.
    pub version: (u32, u32, u32),
}

impl Qemu {
    /// Finds QEMU (`VIREO_QEMU`, else `qemu-system-x86_64` on `PATH`) and checks its version.
    /// Never installs anything. The result is cached for the life of the process.
    pub fn locate() -> Result<Qemu, Error> {
        static FOUND: OnceLock<Qemu> = OnceLock::new();
        if let Some(qemu) = FOUND.get() {
            return Ok(qemu.clone());
        }
        let qemu = locate_uncached()?;
        log(&format!(
            "using {} ({})",
            qemu.path.display(),
            qemu.version_line
        ));
        if (qemu.version.0, qemu.version.1) < TESTED_QEMU {
            log(&format!(
                "warning: QEMU {}.{} is older than the tested {}.{}; PVH boot needs at least 4.0",
                qemu.version.0, qemu.version.1, TESTED_QEMU.0, TESTED_QEMU.1
            ));
        }
        Ok(FOUND.get_or_init(|| qemu).clone())
    }

    /// Like [`Qemu::locate`], but when QEMU is missing and this process runs as root on a
    /// machine with apt-get, installs `qemu-system-x86` through [`ensure_packages`], then
    /// locates it again. Not as root, the error carries the exact command to run. An explicit
    /// `VIREO_QEMU` is never "fixed" by installing.
    pub fn ensure() -> Result<Qemu, Error> {
        match Qemu::locate() {
            Ok(qemu) => return Ok(qemu),
            Err(Error::QemuNotFound { .. }) if env::var_os(QEMU_ENV).is_none() && is_root() => {}
            Err(other) => return Err(other),
        }
        match ensure_packages(&[(QEMU_PROGRAM, QEMU_PACKAGE)]) {
            Ok(()) => {}
            Err(InstallError::NoAptGet { .. }) => {
                return Err(Error::QemuNotFound {
                    searched: format!("{QEMU_PROGRAM} on PATH; no apt-get to install it with"),
                    install_hint: format!(
                        "install QEMU ({QEMU_PROGRAM}) with your package manager"
                    ),
                });
            }
            Err(other) => return Err(other.into()),
        }
        Qemu::locate()
    }
}

fn locate_uncached() -> Result<Qemu, Error> {
    let path = match env::var_os(QEMU_ENV) {
        Some(value) if !value.is_empty() => {
            let given = PathBuf::from(&value);
            let resolved = if given.components().count() > 1 {
                Some(given.clone()).filter(|p| p.is_file())
            } else {
                find_on_path(&given)
            };
            resolved.ok_or_else(|| Error::QemuNotFound {
                searched: format!("{QEMU_ENV}={}", given.display()),
                install_hint: install_hint(),
            })?
        }
        _ => find_on_path(Path::new(QEMU_PROGRAM)).ok_or_else(|| Error::QemuNotFound {
            searched: format!("{QEMU_PROGRAM} on PATH"),
            install_hint: install_hint(),
        })?,
    };
    let output = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::QemuUnusable {
            path: path.clone(),
            reason: format!("`--version` could not run: {source}"),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version_line = stdout.lines().next().unwrap_or("").trim().to_string();
    if !output.status.success() {
        return Err(Error::QemuUnusable {
            path,
            reason: format!(
                "`--version` exited with {} (stderr: {})",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    let version = parse_qemu_version(&version_line).ok_or_else(|| Error::QemuUnusable {
        path: path.clone(),
        reason: format!("unrecognised `--version` output {version_line:?}"),
    })?;
    Ok(Qemu {
        path,
        version_line,
        version,
    })
}

/// Parses `QEMU emulator version 7.2.22 (...)` into `(7, 2, 22)`.
pub fn parse_qemu_version(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let number = rest.split_whitespace().next()?;
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Searches `PATH` for an executable file called `name`.
pub fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path_var = env::var_os("PATH")?;
    env::split_paths(&path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The command a user should run to install QEMU on Debian.
pub fn install_hint() -> String {
    apt_command(&[QEMU_PACKAGE], !is_root())
}

/// `apt-get update && apt-get install -y PACKAGES`, each half with `sudo ` when `sudo`.
pub fn apt_command(packages: &[&str], sudo: bool) -> String {
    let sudo = if sudo { "sudo " } else { "" };
    format!(
        "{sudo}apt-get update && {sudo}apt-get install -y {}",
        packages.join(" ")
    )
}

/// Why [`ensure_packages`] or [`install_packages`] could not provide a Debian package.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Missing, and only root may install it; the error names the exact command.
    #[error(
        "{packages} is not installed and this process is not root; install it with:\n    \
         {command}"
    )]
    NotRoot {
        /// The missing packages, space separated.
        packages: String,
        /// The command that installs them.
        command: String,
    },
    /// Missing, and there is no apt-get on this machine.
    #[error("{packages} is not installed, and there is no apt-get to install it with")]
    NoAptGet {
        /// The missing packages, space separated.
        packages: String,
    },
    /// apt-get ran and failed (or could not start).
    #[error("installing {packages} failed ({status}): {command}")]
    Failed {
        /// The packages being installed.
        packages: String,
        /// The apt-get command that failed.
        command: String,
        /// Its exit status, or the error that stopped it from starting.
        status: String,
    },
}

/// Makes sure each `(program, package)` is there: a program missing from `PATH` gets its Debian
/// package installed through [`install_packages`] (as root: `apt-get update`, once per process,
/// then `apt-get install -y`). Not as root, the error names the exact command to run.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<(), InstallError> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, _)| find_on_path(Path::new(program)).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    install_packages(&missing)
}

/// Installs Debian `packages` with apt-get, announcing the command first: `apt-get update` at
/// most once per process, then `apt-get install -y PACKAGES`. Only as root, and only where
/// apt-get exists; otherwise the error says what to do.
pub fn install_packages(packages: &[&str]) -> Result<(), InstallError> {
    static UPDATED: Mutex<bool> = Mutex::new(false);
    let names = packages.join(" ");
    if !is_root() {
        return Err(InstallError::NotRoot {
            command: apt_command(packages, true),
            packages: names,
        });
    }
    if find_on_path(Path::new("apt-get")).is_none() {
        return Err(InstallError::NoAptGet { packages: names });
    }
    let mut updated = UPDATED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let install: Vec<&str> = ["install", "-y"].iter().chain(packages).copied().collect();
    let steps: Vec<&[&str]> = if *updated {
        vec![&install]
    } else {
        vec![&["update"], &install]
    };
    log(&format!(
        "{names} not found; running as root, so installing it now: {}",
        steps
            .iter()
            .map(|args| format!("apt-get {}", args.join(" ")))
            .collect::<Vec<_>>()
            .join(" && ")
    ));
    for args in steps {
        let command = format!("apt-get {}", args.join(" "));
        let failed = |status: String| InstallError::Failed {
            packages: names.clone(),
            command: command.clone(),
            status,
        };
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map_err(|source| failed(source.to_string()))?;
        if !status.success() {
            return Err(failed(status.to_string()));
        }
        if args == ["update"] {
            *updated = true;
        }
    }
    log(&format!("{names} installed"));
    Ok(())
}

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software CPU emulation.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` option takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator chosen for this host and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// A one-line human reason.
    pub reason: String,
}

/// Chooses the accelerator: `VIREO_ACCEL=kvm|tcg` when set, else KVM only when `/dev/kvm` opens
/// read-write *and* `/proc/cpuinfo` shows `vmx` or `svm` (some hosts serve `/dev/kvm` with a
/// software hypervisor that cannot run a bare-metal guest), else TCG. Logged once per process.
pub fn choose_accel() -> Result<AccelChoice, Error> {
    static CHOICE: OnceLock<AccelChoice> = OnceLock::new();
    if let Some(choice) = CHOICE.get() {
        return Ok(choice.clone());
    }
    let choice = match env::var(ACCEL_ENV) {
        Ok(value) if !value.trim().is_empty() => {
            let accel = match value.trim().to_ascii_lowercase().as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                _ => return Err(Error::InvalidAccel { value }),
            };
            AccelChoice {
                accel,
                reason: format!("forced by {ACCEL_ENV}={value}"),
            }
        }
        Err(env::VarError::NotUnicode(value)) => {
            return Err(Error::InvalidAccel {
                value: value.to_string_lossy().into_owned(),
            });
        }
        _ => detect_accel(),
    };
    log(&format!(
        "accelerator: {} ({})",
        choice.accel.as_str(),
        choice.reason
    ));
    Ok(CHOICE.get_or_init(|| choice).clone())
}

fn detect_accel() -> AccelChoice {
    let kvm_opens = OpenOptions::new().read(true).write(true).open("/dev/kvm");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = cpu_virt_flag(&cpuinfo);
    match (kvm_opens, flag) {
        (Ok(_), Some(flag)) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("/dev/kvm opens read-write and the CPU has {flag}"),
        },
        (Ok(_), None) => AccelChoice {
            accel: Accel::Tcg,
            reason: "/dev/kvm opens but /proc/cpuinfo shows neither vmx nor svm \
                     (not hardware virtualisation); set VIREO_ACCEL=kvm to force"
                .to_string(),
        },
        (Err(error), _) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm does not open read-write: {error}"),
        },
    }
}

/// Returns `vmx` or `svm` when a `flags` line of `/proc/cpuinfo` text lists it.
pub fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .filter_map(|line| line.split_once(':'))
        .flat_map(|(_, flags)| flags.split_whitespace())
        .find_map(|flag| match flag {
            "vmx" => Some("vmx"),
            "svm" => Some("svm"),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_version_line() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2, 22))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 8.1"),
            Some((8, 1, 0))
        );
        assert_eq!(parse_qemu_version("something else"), None);
    }

    #[test]
    fn apt_commands_name_every_package() {
        assert_eq!(
            apt_command(&["qemu-system-x86", "iproute2"], true),
            "sudo apt-get update && sudo apt-get install -y qemu-system-x86 iproute2"
        );
        assert_eq!(
            apt_command(&["busybox-static"], false),
            "apt-get update && apt-get install -y busybox-static"
        );
        // Programs that are there need nothing, root or not.
        assert!(ensure_packages(&[("sh", "dash"), ("ls", "coreutils")]).is_ok());
        let error = InstallError::NotRoot {
            packages: "iproute2".to_string(),
            command: apt_command(&["iproute2"], true),
        };
        assert!(
            error
                .to_string()
                .ends_with("sudo apt-get update && sudo apt-get install -y iproute2"),
            "{error}"
        );
    }

    #[test]
    fn finds_virtualisation_flags() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu sse2 hypervisor\nvmx flags\t: ept\n";
        assert_eq!(cpu_virt_flag(intel), Some("vmx"));
        assert_eq!(cpu_virt_flag(amd), Some("svm"));
        assert_eq!(cpu_virt_flag(none), None);
    }
}
