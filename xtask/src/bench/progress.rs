//! Progress bars on stderr. On a terminal one line is redrawn in place (at most 10 times a
//! second); otherwise (a log file, the test runner) a line is printed at each 25% step, so that
//! a captured log stays short.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One progress bar from 0 to `total` units.
pub struct Progress {
    label: String,
    unit: &'static str,
    total: u64,
    current: u64,
    started: Instant,
    last_draw: Option<Instant>,
    last_quarter: u64,
    terminal: bool,
    finished: bool,
}

impl Progress {
    /// Starts a bar labelled `label` counting `unit`s up to `total`.
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Progress {
        let progress = Progress {
            label: label.into(),
            unit,
            total: total.max(1),
            current: 0,
            started: Instant::now(),
            last_draw: None,
            last_quarter: 0,
            terminal: std::io::stderr().is_terminal(),
            finished: false,
        };
        if !progress.terminal {
            eprintln!("[bench] {} ...", progress.label);
        }
        progress
    }

    /// A bar that prints nothing (for helpers used outside a run).
    pub fn hidden() -> Progress {
        Progress {
            label: String::new(),
            unit: "",
            total: 1,
            current: 0,
            started: Instant::now(),
            last_draw: None,
            last_quarter: 4,
            terminal: false,
            finished: true,
        }
    }

    /// Sets the count done so far and redraws when due.
    pub fn set(&mut self, current: u64) {
        self.current = current.min(self.total);
        if self.finished {
            return;
        }
        if self.terminal {
            let due = self
                .last_draw
                .is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
            if due {
                self.draw();
            }
        } else {
            let quarter = self.current * 4 / self.total;
            if quarter > self.last_quarter && quarter < 4 {
                self.last_quarter = quarter;
                eprintln!(
                    "[bench] {}: {}% ({}/{} {})",
                    self.label,
                    quarter * 25,
                    self.current,
                    self.total,
                    self.unit
                );
            }
        }
    }

    fn draw(&mut self) {
        const WIDTH: u64 = 30;
        let filled = (self.current * WIDTH / self.total) as usize;
        let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH as usize - filled);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[bench] {:<44} [{bar}] {:>3}% {}/{} {} {:.1}s",
            self.label,
            self.current * 100 / self.total,
            self.current,
            self.total,
            self.unit,
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
    }

    /// Completes the bar with a closing note (e.g. a summary of the result).
    pub fn finish(&mut self, note: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.current = self.total;
        if self.terminal {
            self.draw();
            eprintln!();
        }
        eprintln!(
            "[bench] {} done in {:.1} s: {note}",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.terminal && !self.finished && self.last_draw.is_some() {
            eprintln!();
        }
    }
}
