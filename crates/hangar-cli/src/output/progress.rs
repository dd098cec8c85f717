//! A progress line on stderr for long operations (image builds): redrawn in place on a
//! terminal, one line per stage otherwise (logs, pipes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Shows an operation's progress from its start until [`Progress::finish`].
pub struct Progress {
    started: Instant,
    tty: bool,
    last_stage: String,
}

impl Progress {
    /// Starts timing now; draws in place when stderr is a terminal.
    pub fn start() -> Progress {
        Progress {
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_stage: String::new(),
        }
    }

    /// Time since [`Progress::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Shows `percent` and `stage`: redrawn on a terminal, else printed when the stage
    /// changes.
    pub fn update(&mut self, percent: u64, stage: &str) {
        let line = progress_line(percent, stage, self.elapsed());
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else if stage != self.last_stage {
            eprintln!("{line}");
        }
        stage.clone_into(&mut self.last_stage);
    }

    /// Ends the line drawn in place, so that what follows starts on a line of its own.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// `[#####     ]  42%  stage  (12.3 s)`
fn progress_line(percent: u64, stage: &str, elapsed: Duration) -> String {
    let filled = (percent.min(100) / 5) as usize;
    format!(
        "[{}{}] {percent:>3}%  {stage}  ({:.1} s)",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_a_twentieth_per_five_percent_and_stops_at_full() {
        assert_eq!(
            progress_line(42, "layers", Duration::from_millis(12_340)),
            "[########            ]  42%  layers  (12.3 s)"
        );
        assert_eq!(
            progress_line(250, "done", Duration::ZERO),
            "[####################] 250%  done  (0.0 s)"
        );
    }
}
