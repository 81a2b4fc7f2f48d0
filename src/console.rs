//! The serial console (COM1 through `uart_16550`), the `log` facade behind it, and the panic
//! handler.
//!
//! Log lines go through a spin lock taken with interrupts disabled, so an interrupt handler can
//! never deadlock on a lock its own CPU holds. Fatal paths (the panic handler, CPU exceptions)
//! use [`emergency_writer`], which bypasses the lock: they never return, so interleaving with
//! a half-written line is the worst that can happen.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;
use uart_16550::SerialPort;

use crate::arch::{self, ExitCode};

const COM1: u16 = 0x3f8;

static SERIAL: Mutex<Option<SerialPort>> = Mutex::new(None);
static LOGGER: Logger = Logger;
static PANICKING: AtomicBool = AtomicBool::new(false);

/// Initialises COM1 and installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    // SAFETY: COM1 at 0x3f8 is the standard PC serial port; QEMU provides it on q35 and pc, and
    // nothing else in Vireo drives these ports.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *SERIAL.lock() = Some(port);
    // set_logger only fails if a logger is already set, which would mean `init` ran twice; the
    // first logger stays, which is what we want.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Changes the log level (after the command line is parsed).
pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
}

/// Writes one line to the console, whatever the log level (banner, `ready`, self-test verdicts).
pub fn print_line(args: fmt::Arguments<'_>) {
    arch::interrupts::without_interrupts(|| {
        let mut serial = SERIAL.lock();
        if let Some(port) = serial.as_mut() {
            let _ = writeln!(port, "{args}");
        }
    });
}

/// Prints a line to the serial console regardless of the log level.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let nanos = arch::clock::now_ns();
        let (seconds, micros) = (nanos / 1_000_000_000, (nanos / 1000) % 1_000_000);
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        print_line(format_args!(
            "[{seconds:4}.{micros:06}] {level}{}",
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// A lock-free writer to COM1 for paths that never return.
pub fn emergency_writer() -> impl Write {
    // SAFETY: creating a second handle to COM1 is sound: port I/O has no memory effects, and
    // this is only used on paths that end the run.
    unsafe { SerialPort::new(COM1) }
}

/// Prints `PANIC: <reason>` and exits QEMU with status 35.
pub fn fatal(args: fmt::Arguments<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let mut out = emergency_writer();
    let _ = writeln!(out, "PANIC: {args}");
    arch::exit_qemu(ExitCode::Failure)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let mut out = emergency_writer();
    if PANICKING.swap(true, Ordering::Relaxed) {
        let _ = writeln!(out, "PANIC: panicked while panicking");
        arch::exit_qemu(ExitCode::Failure);
    }
    match info.location() {
        Some(location) => {
            let _ = writeln!(
                out,
                "PANIC: {} at {}:{}",
                info.message(),
                location.file(),
                location.line()
            );
        }
        None => {
            let _ = writeln!(out, "PANIC: {}", info.message());
        }
    }
    arch::exit_qemu(ExitCode::Failure)
}
