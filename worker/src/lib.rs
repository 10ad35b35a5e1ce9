//! The drover worker: connects to a master, keeps a content-addressed file
//! cache, runs tasks in sandboxes within its declared resources, and reports
//! back. The wire protocol it speaks is its own crate, `drover-protocol`.
//!
//! Modules: `main_loop` (connect, reconnect with backoff), `retry` (the backoff, which failures are worth retrying), `session` (one
//! connection's handshake and message loop), `transfer` (files in and out of
//! a connection), `task` (one task: prepare, launch, supervise, report),
//! [`functions`] (the Python function server), `sandbox` (inputs placed, outputs checked), `host` (this machine's
//! resources), `disk` (free disk, room for a file), `checks` (numbers from the master checked), `leftovers` (what dead workers left in the workdir), `env` (packaged environments), `slots` (task directories
//! reused), `exec` (a task's process under the monitor), [`locate`] (a
//! master found through the catalog).
mod call;
mod checks;
mod disk;
mod env;
mod exec;
pub mod functions;
mod growth;
mod host;
mod leftovers;
pub mod locate;
mod main_loop;
mod retry;
mod sandbox;
mod session;
mod slots;
mod task;
mod transfer;

/// The wire protocol, re-exported for the worker's users (the `drover` binary reads the password file with it).
pub use drover_protocol as protocol;
pub use drover_protocol::{hostname, Resources};
pub use host::detect_resources;
pub use locate::MasterSource;
pub use main_loop::{run_worker, StopReason, WorkerConfig};
