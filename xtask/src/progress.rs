//! Progress bars on stderr for long steps (the demo's round trips, every benchmark
//! measurement). On a terminal an `indicatif` bar is redrawn in place; otherwise (a log file,
//! CI, the test runner) plain lines are printed: one when the step starts, one at each 25%
//! step, so that a captured log stays short and readable.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One progress bar from 0 to `total` units.
pub struct Progress {
    tag: &'static str,
    label: String,
    unit: &'static str,
    total: u64,
    current: u64,
    started: Instant,
    last_quarter: u64,
    message: String,
    /// The terminal bar; `None` when stderr is not a terminal (plain lines) or when hidden.
    bar: Option<ProgressBar>,
    quiet: bool,
    finished: bool,
}

impl Progress {
    /// Starts a bar tagged `tag` (e.g. `[bench]`) and labelled `label`, counting `unit`s up to
    /// `total`. It draws on stderr when that is a terminal and prints plain lines otherwise.
    pub fn new(
        tag: &'static str,
        label: impl Into<String>,
        total: u64,
        unit: &'static str,
    ) -> Progress {
        Progress::with_terminal(tag, label, total, unit, std::io::stderr().is_terminal())
    }

    /// Like [`Progress::new`], with the choice between a bar and plain lines made by the caller.
    pub fn with_terminal(
        tag: &'static str,
        label: impl Into<String>,
        total: u64,
        unit: &'static str,
        terminal: bool,
    ) -> Progress {
        let label = label.into();
        let total = total.max(1);
        let bar = terminal.then(|| {
            // `{{`/`}}` are literal braces in a template; the unit is fixed per bar.
            let template = format!(
                "{{prefix:<52}} [{{bar:30}}] {{percent:>3}}% {{pos}}/{{len}} {unit} \
                 {{elapsed_precise}} {{msg}}"
            );
            let style = ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-");
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(format!("{tag} {label}"));
            bar.tick();
            bar
        });
        if !terminal {
            eprintln!("{tag} {label} ...");
        }
        Progress {
            tag,
            label,
            unit,
            total,
            current: 0,
            started: Instant::now(),
            last_quarter: 0,
            message: String::new(),
            bar,
            quiet: false,
            finished: false,
        }
    }

    /// A bar that prints nothing (for helpers used outside a run).
    pub fn hidden() -> Progress {
        Progress {
            tag: "",
            label: String::new(),
            unit: "",
            total: 1,
            current: 0,
            started: Instant::now(),
            last_quarter: 4,
            message: String::new(),
            bar: None,
            quiet: true,
            finished: true,
        }
    }

    /// Sets a short note shown after the count (e.g. the last round-trip time).
    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        if let Some(bar) = &self.bar {
            bar.set_message(self.message.clone());
        }
    }

    /// Sets the count done so far and redraws when due (the terminal bar at most 20 times a
    /// second; a plain line at each new quarter).
    pub fn set(&mut self, current: u64) {
        self.current = current.min(self.total);
        if self.finished {
            return;
        }
        match &self.bar {
            Some(bar) => bar.set_position(self.current),
            None => {
                if let Some(line) = self.quarter_line() {
                    eprintln!("{line}");
                }
            }
        }
    }

    /// The plain line due at the current count, if a new quarter (25%, 50%, 75%) was reached.
    fn quarter_line(&mut self) -> Option<String> {
        let quarter = self.current * 4 / self.total;
        if quarter <= self.last_quarter || quarter >= 4 {
            return None;
        }
        self.last_quarter = quarter;
        let mut line = format!(
            "{} {}: {}% ({}/{} {})",
            self.tag,
            self.label,
            quarter * 25,
            self.current,
            self.total,
            self.unit
        );
        if !self.message.is_empty() {
            line.push_str(&format!(", {}", self.message));
        }
        Some(line)
    }

    /// Completes the bar with a closing note (e.g. a summary of the result).
    pub fn finish(&mut self, note: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.current = self.total;
        if let Some(bar) = &self.bar {
            bar.set_position(self.total);
            bar.finish();
        }
        eprintln!("{}", self.finish_line(note));
    }

    fn finish_line(&self, note: &str) -> String {
        format!(
            "{} {} done in {:.1} s: {note}",
            self.tag,
            self.label,
            self.started.elapsed().as_secs_f64()
        )
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && !self.finished
            && !self.quiet
        {
            // Leave what was drawn (an error follows on the next line).
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_come_at_each_quarter_only() {
        let mut progress = Progress::with_terminal("[test]", "UDP 64 B", 200, "round trips", false);
        let mut lines = Vec::new();
        for done in 1..=200 {
            progress.current = done;
            lines.extend(progress.quarter_line());
        }
        assert_eq!(
            lines,
            [
                "[test] UDP 64 B: 25% (50/200 round trips)",
                "[test] UDP 64 B: 50% (100/200 round trips)",
                "[test] UDP 64 B: 75% (150/200 round trips)",
            ]
        );
        progress.set_message("last RTT 12.5 us");
        progress.last_quarter = 0;
        progress.current = 60;
        assert_eq!(
            progress.quarter_line().as_deref(),
            Some("[test] UDP 64 B: 25% (60/200 round trips), last RTT 12.5 us")
        );
        assert!(
            progress
                .finish_line("p50 10 us")
                .starts_with("[test] UDP 64 B done in ")
        );
        progress.finish("p50 10 us");
        assert!(progress.bar.is_none() && progress.finished);
    }

    #[test]
    fn a_hidden_bar_stays_silent() {
        let mut progress = Progress::hidden();
        progress.set(1);
        assert!(progress.quarter_line().is_none());
        assert!(progress.finished);
    }
}
