//! The QEMU command line: a builder that owns every argument the harness passes, and shell
//! quoting so that a failure can print a command a person can paste into a terminal.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::Error;
use crate::host::{Accel, Qemu, choose_accel};

/// The x86 machine model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Machine {
    /// The Q35 chipset with PCI Express (ECAM) — QEMU's `-M q35`.
    #[default]
    Q35,
    /// The i440FX PC — QEMU's `-M pc`.
    Pc,
}

impl Machine {
    /// The name `-M` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Machine {
    type Err = Error;
    fn from_str(value: &str) -> Result<Machine, Error> {
        match value {
            "q35" => Ok(Machine::Q35),
            "pc" => Ok(Machine::Pc),
            _ => Err(Error::InvalidSetting {
                name: "machine",
                value: value.to_string(),
                expected: "`q35` or `pc`",
            }),
        }
    }
}

/// The guest's receive mode (its `mode=` command-line key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestMode {
    /// Interrupt-driven (NAPI style).
    Irq,
    /// Busy-polling, receive interrupts disarmed.
    Poll,
    /// Polls while traffic flows, halts when idle (the kernel's default).
    Adaptive,
}

impl GuestMode {
    /// The value `mode=` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestMode::Irq => "irq",
            GuestMode::Poll => "poll",
            GuestMode::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for GuestMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a memory size in MiB: `64`, `64M`, `512MiB`, `4G`, `4GiB`.
pub fn parse_memory_mib(value: &str) -> Result<u64, Error> {
    let invalid = || Error::InvalidSetting {
        name: "memory size",
        value: value.to_string(),
        expected: "a size in MiB such as `64`, `64M` or `4G`",
    };
    let trimmed = value.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    let factor = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(factor)
        .filter(|&mib| mib > 0)
        .ok_or_else(invalid)
}

/// Everything needed to start QEMU on a kernel. The fixed parts (`-nodefaults`, `-no-reboot`,
/// `-display none`, the isa-debug-exit device and COM1 on stdio) are always present; the rest
/// has defaults (`q35`, 128 MiB, 1 vCPU, the host's accelerator, QEMU's default CPU model).
#[derive(Clone, Debug)]
pub struct QemuCommand {
    qemu: PathBuf,
    accel: Accel,
    kernel: PathBuf,
    machine: Machine,
    memory_mib: u64,
    smp: u32,
    cpu: Option<String>,
    append: Option<String>,
    qmp_socket: Option<PathBuf>,
    netns: Option<String>,
    extra: Vec<OsString>,
}

/// The debug-exit device the guest uses to end the run: writing `v` to port 0xf4 makes QEMU exit
/// with status `(v << 1) | 1`.
pub const DEBUG_EXIT_DEVICE: &str = "isa-debug-exit,iobase=0xf4,iosize=0x04";

impl QemuCommand {
    /// A command for `kernel` with the given QEMU and accelerator and the defaults.
    pub fn new(qemu: &Qemu, accel: Accel, kernel: impl Into<PathBuf>) -> QemuCommand {
        QemuCommand {
            qemu: qemu.path.clone(),
            accel,
            kernel: kernel.into(),
            machine: Machine::default(),
            memory_mib: 128,
            smp: 1,
            cpu: None,
            append: None,
            qmp_socket: None,
            netns: None,
            extra: Vec::new(),
        }
    }

    /// Locates QEMU (never installs it; see [`Qemu::ensure`]) and chooses the accelerator
    /// (`VIREO_ACCEL` or auto-detection), then builds a command for `kernel`.
    pub fn for_kernel(kernel: impl Into<PathBuf>) -> Result<QemuCommand, Error> {
        let qemu = Qemu::locate()?;
        let accel = choose_accel()?.accel;
        Ok(QemuCommand::new(&qemu, accel, kernel))
    }

    /// Sets the machine model.
    pub fn machine(mut self, machine: Machine) -> Self {
        self.machine = machine;
        self
    }

    /// Sets the guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the number of vCPUs.
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Sets the `-cpu` model (QEMU's default when never called).
    pub fn cpu(mut self, model: impl Into<String>) -> Self {
        self.cpu = Some(model.into());
        self
    }

    /// Sets the accelerator.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Sets the kernel command line (`-append`).
    pub fn append(mut self, cmdline: impl Into<String>) -> Self {
        self.append = Some(cmdline.into());
        self
    }

    /// Adds a QMP server on a Unix socket at `path` (`server=on,wait=off`).
    pub fn qmp_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp_socket = Some(path.into());
        self
    }

    /// Runs QEMU inside the network namespace `name` (`ip netns exec NAME qemu-system-x86_64
    /// ...`), e.g. one made by [`crate::NetNs`], so that `-netdev tap,ifname=...` finds its tap.
    pub fn in_netns(mut self, name: impl Into<String>) -> Self {
        self.netns = Some(name.into());
        self
    }

    /// The network namespace QEMU runs in, when one was set.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Adds `-device SPEC`.
    pub fn device(self, spec: impl Into<OsString>) -> Self {
        self.arg("-device").arg(spec)
    }

    /// Adds `-netdev SPEC`.
    pub fn netdev(self, spec: impl Into<OsString>) -> Self {
        self.arg("-netdev").arg(spec)
    }

    /// Adds one raw argument, after all the others.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Adds raw arguments, after all the others.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// The QEMU binary.
    pub fn program(&self) -> &Path {
        &self.qemu
    }

    /// The kernel image.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The QMP socket path, when one was requested.
    pub fn qmp_path(&self) -> Option<&Path> {
        self.qmp_socket.as_deref()
    }

    /// The machine model.
    pub fn machine_type(&self) -> Machine {
        self.machine
    }

    /// Every argument after the program name, in order.
    pub fn arguments(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &dyn AsRef<OsStr>| args.push(a.as_ref().to_os_string());
        push(&"-nodefaults");
        push(&"-no-reboot");
        push(&"-display");
        push(&"none");
        push(&"-M");
        push(&self.machine.as_str());
        push(&"-accel");
        push(&self.accel.as_str());
        if let Some(cpu) = &self.cpu {
            push(&"-cpu");
            push(cpu);
        }
        push(&"-m");
        push(&format!("{}M", self.memory_mib));
        push(&"-smp");
        push(&self.smp.to_string());
        push(&"-device");
        push(&DEBUG_EXIT_DEVICE);
        push(&"-serial");
        push(&"stdio");
        if let Some(socket) = &self.qmp_socket {
            let mut spec = OsString::from("unix:");
            spec.push(socket);
            spec.push(",server=on,wait=off");
            push(&"-qmp");
            push(&spec);
        }
        push(&"-kernel");
        push(&self.kernel);
        if let Some(append) = &self.append {
            push(&"-append");
            push(append);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The program actually started: `ip` when QEMU runs in a namespace, else QEMU.
    pub fn launch_program(&self) -> &Path {
        if self.netns.is_some() {
            Path::new("ip")
        } else {
            &self.qemu
        }
    }

    /// The arguments after [`QemuCommand::launch_program`]: `netns exec NAME QEMU` before
    /// [`QemuCommand::arguments`] when QEMU runs in a namespace. `ip netns exec` execs QEMU in
    /// place, so the spawned process is QEMU itself.
    pub fn launch_arguments(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(netns) = &self.netns {
            args.extend(["netns", "exec"].map(OsString::from));
            args.push(OsString::from(netns));
            args.push(self.qemu.clone().into_os_string());
        }
        args.extend(self.arguments());
        args
    }

    /// The whole command line, shell-quoted so that it can be pasted into a terminal.
    pub fn command_line(&self) -> String {
        let mut line = shell_quote(self.launch_program().as_os_str());
        for arg in self.launch_arguments() {
            line.push(' ');
            line.push_str(&shell_quote(&arg));
        }
        line
    }
}

impl fmt::Display for QemuCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command_line())
    }
}

/// Quotes one word for a POSIX shell: unchanged when it only holds safe characters, else in
/// single quotes with each `'` written as `'\''`.
pub fn shell_quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_qemu() -> Qemu {
        Qemu {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            version_line: "QEMU emulator version 7.2.22".to_string(),
            version: (7, 2, 22),
        }
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote(OsStr::new("-M")), "-M");
        assert_eq!(shell_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
    }

    #[test]
    fn builds_fixed_and_chosen_arguments() {
        let cmd = QemuCommand::new(&fake_qemu(), Accel::Tcg, "/k/vireo")
            .machine(Machine::Pc)
            .memory_mib(4096)
            .smp(4)
            .append("ip=10.0.2.15/24 selftest")
            .qmp_socket("/tmp/q.sock")
            .netdev("user,id=n0")
            .device("virtio-net-pci,netdev=n0");
        assert_eq!(
            cmd.command_line(),
            "/usr/bin/qemu-system-x86_64 -nodefaults -no-reboot -display none -M pc -accel tcg \
             -m 4096M -smp 4 -device isa-debug-exit,iobase=0xf4,iosize=0x04 -serial stdio \
             -qmp unix:/tmp/q.sock,server=on,wait=off -kernel /k/vireo \
             -append 'ip=10.0.2.15/24 selftest' -netdev user,id=n0 \
             -device virtio-net-pci,netdev=n0"
        );
    }

    #[test]
    fn runs_inside_a_namespace() {
        let cmd = QemuCommand::new(&fake_qemu(), Accel::Tcg, "/k/vireo")
            .in_netns("vireo-t-1-0")
            .netdev("tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off");
        assert_eq!(cmd.launch_program(), Path::new("ip"));
        assert!(cmd.command_line().starts_with(
            "ip netns exec vireo-t-1-0 /usr/bin/qemu-system-x86_64 -nodefaults -no-reboot "
        ));
        assert!(
            cmd.command_line()
                .ends_with(" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off")
        );
    }

    #[test]
    fn parses_memory_sizes() {
        assert_eq!(parse_memory_mib("64").ok(), Some(64));
        assert_eq!(parse_memory_mib("64M").ok(), Some(64));
        assert_eq!(parse_memory_mib("4G").ok(), Some(4096));
        assert_eq!(parse_memory_mib("2GiB").ok(), Some(2048));
        assert!(parse_memory_mib("0").is_err());
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("4T").is_err());
    }

    #[test]
    fn parses_machines() {
        assert_eq!("q35".parse::<Machine>().ok(), Some(Machine::Q35));
        assert_eq!("pc".parse::<Machine>().ok(), Some(Machine::Pc));
        assert!("virt".parse::<Machine>().is_err());
    }
}
