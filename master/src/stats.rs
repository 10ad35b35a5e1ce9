//! Point-in-time views of the master, as the user and status reports see them.

use drover_protocol::Resources;

/// A point-in-time view of the master.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub tasks_waiting: u64,
    pub tasks_running: u64,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    pub tasks_cancelled: u64,
    pub workers_connected: u64,
    pub workers_busy: u64,
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
    /// Tasks sent ahead to wait on a full worker (see
    /// [`crate::ManagerBuilder::prefetch`]).
    pub tasks_sent_ahead: u64,
}

/// What the master knows of a connected worker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerInfo {
    pub host: String,
    pub addr: String,
    pub resources: Resources,
    pub running: usize,
}
