//! What the `Manager` asks of the engine.

use tokio::sync::oneshot;

use crate::category::{CategoryConfig, CategoryStats};
use crate::stats::{Stats, WorkerInfo};
use crate::task::{Prepared, TaskId};

pub(crate) enum Command {
    Submit(Box<Prepared>),
    Cancel(TaskId, oneshot::Sender<bool>),
    CancelTag(String, oneshot::Sender<usize>),
    Stats(oneshot::Sender<Stats>),
    Workers(oneshot::Sender<Vec<WorkerInfo>>),
    Shutdown(oneshot::Sender<()>),
    DismissWorkers(oneshot::Sender<()>),
    /// Sets a category's config (already validated).
    SetCategory(String, Box<CategoryConfig>, oneshot::Sender<()>),
    /// Statistics of one category (`Some(name)`) or of all.
    CategoryStats(Option<String>, oneshot::Sender<Vec<CategoryStats>>),
    /// The whole status report (counts, workers, history, events), as a
    /// status query gets it.
    Report(oneshot::Sender<drover_catalog::MasterReport>),
    /// Events from the given number on (see `Manager::events_since`).
    EventsSince(
        u64,
        oneshot::Sender<(u64, Vec<drover_catalog::EventSummary>)>,
    ),
}
