//! How a long job reports: an [`Observer`] receives result lines, notices, warnings and
//! the progress of tasks (epochs, feature caching, downloads). The library prints nothing
//! itself; the `retrain` binary draws progress bars from these reports.

/// Receives a job's progress. Every method does nothing by default, so an implementation
/// picks what it shows.
pub trait Observer: Sync {
    /// A result line: an epoch's metrics, a run's summary.
    fn line(&self, _text: &str) {}
    /// A notice about what the job is doing (a load report, resuming, skipping a regime).
    fn notice(&self, _text: &str) {}
    /// Something the user should know about their data or settings.
    fn warning(&self, _text: &str) {}
    /// A task of `total` units begins: `label` names it (`epoch 3/10`, `caching features`).
    fn task_started(&self, _label: &str, _total: u64) {}
    /// `done` more units of the current task, with a short status (`loss 0.41 acc 0.88`).
    fn task_advanced(&self, _done: u64, _status: &str) {}
    /// The current task ended.
    fn task_finished(&self) {}
}

/// An observer that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}
