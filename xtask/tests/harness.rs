//! Self-tests of the QEMU harness that do not need the Vireo kernel: each boots a tiny PVH ELF
//! generated here (32-bit code that prints a line on COM1 and writes to isa-debug-exit), or
//! provokes an environment failure, and checks what the harness reports.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use xtask::{
    Accel, Error, Guest, GuestExit, Qemu, QemuCommand, RunError, RunOptions, choose_accel,
    unique_temp_path,
};

/// Builds an ELF64 executable with a Xen PVH entry note (type 18) whose 32-bit entry prints
/// `message` plus a newline on COM1, then writes `exit_value` to port 0xf4 (QEMU exits with
/// `(exit_value << 1) | 1`), or with `None` halts forever.
fn pvh_elf(message: &str, exit_value: Option<u32>) -> Vec<u8> {
    const LOAD_ADDRESS: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    const MESSAGE_AT: usize = 32;
    let message_address = u32::try_from(LOAD_ADDRESS).unwrap_or(0) + MESSAGE_AT as u32;
    let mut code = vec![0xFC]; // cld
    code.push(0xBE); // mov esi, message
    code.extend_from_slice(&message_address.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8]); // print loop
    code.extend_from_slice(&[0x66, 0xBA, 0xF4, 0x00]); // mov dx, 0xf4
    code.push(0xB8); // mov eax, exit_value
    code.extend_from_slice(&exit_value.unwrap_or(0).to_le_bytes());
    code.push(if exit_value.is_some() { 0xEF } else { 0x90 }); // out dx, eax (or nop)
    code.extend_from_slice(&[0xF4, 0xEB, 0xFD]); // hlt; jmp hlt
    assert!(code.len() <= MESSAGE_AT);
    code.resize(MESSAGE_AT, 0x90);
    code.extend_from_slice(message.as_bytes());
    code.extend_from_slice(b"\r\n\0");

    let mut elf = Vec::new();
    let u16le = |elf: &mut Vec<u8>, v: u16| elf.extend_from_slice(&v.to_le_bytes());
    let u32le = |elf: &mut Vec<u8>, v: u32| elf.extend_from_slice(&v.to_le_bytes());
    let u64le = |elf: &mut Vec<u8>, v: u64| elf.extend_from_slice(&v.to_le_bytes());
    // ELF header.
    elf.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    u16le(&mut elf, 2); // ET_EXEC
    u16le(&mut elf, 62); // EM_X86_64
    u32le(&mut elf, 1);
    u64le(&mut elf, LOAD_ADDRESS); // e_entry
    u64le(&mut elf, 64); // e_phoff
    u64le(&mut elf, 0); // e_shoff
    u32le(&mut elf, 0); // e_flags
    u16le(&mut elf, 64); // e_ehsize
    u16le(&mut elf, 56); // e_phentsize
    u16le(&mut elf, 2); // e_phnum
    u16le(&mut elf, 64); // e_shentsize
    u16le(&mut elf, 0); // e_shnum
    u16le(&mut elf, 0); // e_shstrndx
    let note_offset = 64 + 2 * 56;
    let note_size = 12 + 4 + 8;
    // PT_LOAD: the code, RWX.
    u32le(&mut elf, 1);
    u32le(&mut elf, 7);
    u64le(&mut elf, CODE_OFFSET);
    u64le(&mut elf, LOAD_ADDRESS);
    u64le(&mut elf, LOAD_ADDRESS);
    u64le(&mut elf, code.len() as u64);
    u64le(&mut elf, code.len() as u64);
    u64le(&mut elf, 0x1000);
    // PT_NOTE: the PVH entry.
    u32le(&mut elf, 4);
    u32le(&mut elf, 4);
    u64le(&mut elf, note_offset);
    u64le(&mut elf, 0);
    u64le(&mut elf, 0);
    u64le(&mut elf, note_size);
    u64le(&mut elf, note_size);
    u64le(&mut elf, 4);
    // The note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), 8-byte entry address.
    u32le(&mut elf, 4);
    u32le(&mut elf, 8);
    u32le(&mut elf, 18);
    elf.extend_from_slice(b"Xen\0");
    u64le(&mut elf, LOAD_ADDRESS);
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(&code);
    elf
}

/// A generated kernel file, removed on drop.
struct TempKernel(PathBuf);

impl TempKernel {
    fn new(contents: &[u8]) -> TempKernel {
        let path = unique_temp_path("vireo-fake-kernel", "elf");
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
        TempKernel(path)
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn command(kernel: &TempKernel) -> Result<QemuCommand, RunError> {
    Ok(QemuCommand::for_kernel(&kernel.0)
        .map_err(RunError::setup)?
        .memory_mib(64))
}

const WAIT: Duration = Duration::from_secs(20);

fn options() -> RunOptions {
    RunOptions {
        timeout: Duration::from_secs(30),
        echo: false,
    }
}

#[test]
fn success_exit_is_status_33_and_lines_are_timed() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("Vireo fake kernel", Some(0x10)));
    let mut guest = Guest::spawn(&command(&kernel)?, options())?;
    let line = guest.wait_for_line("fake kernel", WAIT)?;
    assert_eq!(line.text, "Vireo fake kernel");
    assert!(line.at > Duration::ZERO && line.at < WAIT);
    guest.expect_exit(GuestExit::Success, WAIT)?;
    assert_eq!(guest.serial_log(), "Vireo fake kernel\n");
    Ok(())
}

#[test]
fn failure_exit_is_status_35_on_both_machines() -> Result<(), RunError> {
    for machine in [xtask::Machine::Q35, xtask::Machine::Pc] {
        let kernel = TempKernel::new(&pvh_elf("PANIC: on purpose", Some(0x11)));
        let mut guest = Guest::spawn(&command(&kernel)?.machine(machine), options())?;
        guest.wait_for_line("PANIC:", WAIT)?;
        assert_eq!(guest.wait_exit(WAIT)?, GuestExit::Failure);
    }
    Ok(())
}

#[test]
fn other_exit_values_are_not_guest_verdicts() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("odd exit", Some(0x02)));
    let mut guest = Guest::spawn(&command(&kernel)?, options())?;
    assert_eq!(guest.wait_exit(WAIT)?, GuestExit::QemuStatus(5));
    Ok(())
}

#[test]
fn hanging_guest_is_killed_at_the_timeout_and_reported() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("hanging here", None));
    let mut guest = Guest::spawn(&command(&kernel)?, options())?;
    guest.wait_for_line("hanging", WAIT)?;
    let failure = match guest.wait_exit(Duration::from_millis(300)) {
        Ok(exit) => return Err(guest.check_failed(format!("expected a timeout, got {exit}"))),
        Err(failure) => failure,
    };
    assert!(matches!(failure.error, Error::Timeout { .. }), "{failure}");
    assert_eq!(failure.exit, Some(GuestExit::KilledByHarness));
    let text = failure.to_string();
    assert!(text.contains("timed out"), "{text}");
    assert!(text.contains(&guest.command_line().to_string()), "{text}");
    assert!(text.contains("-nodefaults"), "{text}");
    assert!(text.contains("] hanging here"), "{text}");
    Ok(())
}

#[test]
fn wall_clock_limit_bounds_every_wait() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("hanging here", None));
    let limit = RunOptions {
        timeout: Duration::from_millis(500),
        echo: false,
    };
    let mut guest = Guest::spawn(&command(&kernel)?, limit)?;
    let started = std::time::Instant::now();
    let result = guest.wait_for_line("never printed", Duration::from_secs(60));
    assert!(matches!(
        result.as_ref().map_err(|failure| &failure.error),
        Err(Error::Timeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[test]
fn exit_before_the_awaited_line_is_reported_with_the_exit() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("short life", Some(0x11)));
    let mut guest = Guest::spawn(&command(&kernel)?, options())?;
    match guest.wait_for_line("never printed", WAIT) {
        Ok(line) => Err(guest.check_failed(format!("unexpected match {line:?}"))),
        Err(failure) => {
            assert!(
                matches!(
                    failure.error,
                    Error::ExitedBeforeLine {
                        exit: Some(GuestExit::Failure),
                        ..
                    }
                ),
                "{failure}"
            );
            assert!(failure.to_string().contains("short life"));
            Ok(())
        }
    }
}

#[test]
fn missing_kernel_is_reported_before_spawning() -> Result<(), RunError> {
    let command = QemuCommand::for_kernel("/nonexistent/vireo").map_err(RunError::setup)?;
    match Guest::spawn(&command, options()) {
        Ok(_) => panic!("spawned QEMU on a missing kernel"),
        Err(failure) => {
            assert!(matches!(failure.error, Error::KernelMissing { .. }));
            let text = failure.to_string();
            assert!(text.contains("/nonexistent/vireo"), "{text}");
            assert!(text.contains("-kernel /nonexistent/vireo"), "{text}");
        }
    }
    Ok(())
}

#[test]
fn bogus_qemu_binary_is_a_spawn_error() {
    let qemu = Qemu {
        path: PathBuf::from("/nonexistent/qemu-system-x86_64"),
        version_line: String::new(),
        version: (7, 2, 0),
    };
    let kernel = TempKernel::new(&pvh_elf("unused", Some(0x10)));
    let command = QemuCommand::new(&qemu, Accel::Tcg, &kernel.0);
    match Guest::spawn(&command, options()) {
        Ok(_) => panic!("spawned a nonexistent QEMU"),
        Err(failure) => {
            assert!(matches!(failure.error, Error::Spawn { .. }), "{failure}");
            assert!(
                failure
                    .to_string()
                    .contains("/nonexistent/qemu-system-x86_64")
            );
        }
    }
}

#[test]
fn qemu_rejecting_the_kernel_is_a_qemu_status_with_stderr() -> Result<(), RunError> {
    let kernel = TempKernel::new(b"this is not an ELF kernel\n");
    let mut guest = Guest::spawn(&command(&kernel)?, options())?;
    let exit = guest.wait_exit(WAIT)?;
    assert!(
        matches!(exit, GuestExit::QemuStatus(code) if code != 0),
        "{exit}"
    );
    let failure = guest.check_failed("(inspecting the report)");
    assert!(!failure.qemu_stderr.trim().is_empty(), "{failure}");
    assert!(failure.to_string().contains("QEMU stderr"), "{failure}");
    Ok(())
}

#[test]
fn qmp_socket_answers_and_flaps_a_link() -> Result<(), RunError> {
    let kernel = TempKernel::new(&pvh_elf("waiting for QMP", None));
    let socket = unique_temp_path("vireo-qmp", "sock");
    let command = command(&kernel)?
        .qmp_socket(&socket)
        .netdev("user,id=n0")
        .device("virtio-net-pci,netdev=n0");
    let mut guest = Guest::spawn(&command, options())?;
    guest.wait_for_line("waiting", WAIT)?;
    let mut qmp = guest.qmp(WAIT)?;
    let status = qmp
        .execute("query-status", None)
        .map_err(|e| guest.failure(e))?;
    assert_eq!(status["status"], "running", "{status}");
    qmp.set_link("n0", false).map_err(|e| guest.failure(e))?;
    qmp.set_link("n0", true).map_err(|e| guest.failure(e))?;
    assert!(qmp.set_link("no-such-nic", false).is_err());
    drop(qmp);
    drop(guest);
    assert!(!socket.exists(), "the QMP socket is removed with the guest");
    Ok(())
}

#[test]
fn accelerator_choice_is_kvm_only_with_hardware_support() -> Result<(), RunError> {
    let choice = choose_accel().map_err(RunError::setup)?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if std::env::var_os("VIREO_ACCEL").is_none() && xtask::cpu_virt_flag(&cpuinfo).is_none() {
        assert_eq!(choice.accel, Accel::Tcg, "{}", choice.reason);
    }
    assert!(!choice.reason.is_empty());
    Ok(())
}

fn xtask_binary(env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.arg("test");
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running the xtask binary: {e}"))
}

#[test]
fn missing_qemu_override_names_the_exact_install_command() {
    // VIREO_QEMU set explicitly is never "fixed" by installing, so this is safe as root.
    let output = xtask_binary(&[("VIREO_QEMU", "/nonexistent/qemu")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("VIREO_QEMU=/nonexistent/qemu"), "{stderr}");
    assert!(
        stderr.contains("apt-get update && ")
            && stderr.contains("apt-get install -y qemu-system-x86"),
        "{stderr}"
    );
}

#[test]
fn unusable_qemu_binary_is_rejected_by_its_version_check() {
    let output = xtask_binary(&[("VIREO_QEMU", "/bin/false")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("/bin/false is not usable"), "{stderr}");
}

#[test]
fn invalid_accelerator_override_is_a_clear_error() {
    let output = xtask_binary(&[("VIREO_ACCEL", "turbo")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid VIREO_ACCEL value \"turbo\""),
        "{stderr}"
    );
}
