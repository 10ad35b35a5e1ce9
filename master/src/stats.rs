//! Point-in-time views of the master, as the user and status reports see them.

use drover_protocol::Resources;

/// A point-in-time view of the master.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub tasks_waiting: u64,
    /// Tasks whose process runs on a worker now. A task sent ahead to a
    /// full worker counts here only once the worker says it started.
    pub tasks_running: u64,
    /// Tasks sent ahead that wait on their worker for room to start (see
    /// [`crate::ManagerBuilder::prefetch`]); they hold nothing until then.
    pub tasks_queued_on_workers: u64,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    pub tasks_cancelled: u64,
    pub workers_connected: u64,
    pub workers_busy: u64,
    /// Workers kept out of placement for a while after refusing tasks.
    pub workers_blocked: u64,
    pub resources_in_use: Resources,
    pub resources_total: Resources,
    /// Times a task went back to the queue after its worker was lost.
    pub tasks_requeued: u64,
    /// Input file bodies sent to workers (a cached file counts once per worker).
    pub files_sent: u64,
    /// Times a task went back to the queue with a bigger allocation after
    /// going over its allocation (see [`crate::CategoryConfig`]).
    pub tasks_resized: u64,
    /// Times a running task went over its memory allocation and was given
    /// more where it ran (see [`crate::CategoryConfig::grow_in_place`]).
    pub tasks_grown: u64,
    /// Times a task was sent ahead to wait on a full worker (see
    /// [`crate::ManagerBuilder::prefetch`]).
    pub tasks_sent_ahead: u64,
    /// Waiting tasks that declare more than any connected worker has (see
    /// [`crate::ManagerBuilder::fits_no_worker_wait`]).
    pub tasks_fit_no_worker: u64,
    /// Tasks sent ahead that their worker gave back, not started, for a
    /// worker with room (see [`crate::ManagerBuilder::prefetch`]).
    pub tasks_recalled: u64,
}

impl Stats {
    /// A running or sent-ahead task's attempt is over.
    pub(crate) fn leave_running(&mut self, was_queued_on_worker: bool) {
        if was_queued_on_worker {
            self.tasks_queued_on_workers -= 1;
        } else {
            self.tasks_running -= 1;
        }
    }
}

/// What the master knows of a connected worker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerInfo {
    pub host: String,
    pub addr: String,
    pub resources: Resources,
    pub running: usize,
}
