//! The terminal side of [`retrain::job::Observer`]: result lines on stdout, notices and
//! warnings on stderr, tasks as indicatif progress bars.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use retrain::job::Observer;

/// Draws one progress bar at a time.
#[derive(Default)]
pub struct Terminal {
    bar: Mutex<Option<ProgressBar>>,
}

impl Terminal {
    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").as_ref() {
            f(bar);
        }
    }

    /// Print above the bar, so it is not torn.
    fn print(&self, text: &str, stderr: bool) {
        let guard = self.bar.lock().expect("not poisoned");
        let print = || {
            if stderr {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        };
        match guard.as_ref() {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl Observer for Terminal {
    fn line(&self, text: &str) {
        self.print(text, false);
    }

    fn notice(&self, text: &str) {
        self.print(text, true);
    }

    fn warning(&self, text: &str) {
        self.print(&format!("warning: {text}"), true);
    }

    fn task_started(&self, label: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        if let Some(old) = self.bar.lock().expect("not poisoned").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn task_advanced(&self, done: u64, status: &str) {
        self.with_bar(|bar| {
            bar.inc(done);
            if !status.is_empty() {
                bar.set_message(status.to_string());
            }
        });
    }

    fn task_finished(&self) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").take() {
            bar.finish_and_clear();
        }
    }
}
