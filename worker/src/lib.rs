//! The drover worker: connects to a master, keeps a content-addressed file
//! cache, runs tasks in sandboxes within its declared resources, and reports
//! back. The wire protocol it speaks is its own crate, `drover-protocol`.
mod env;
mod exec;
pub mod locate;
mod slots;
mod worker;

/// The wire protocol, re-exported for the worker's users (the `drover` binary reads the password file with it).
pub use drover_protocol as protocol;
pub use drover_protocol::{hostname, Resources};
pub use locate::MasterSource;
pub use worker::{detect_resources, run_worker, StopReason, WorkerConfig};
