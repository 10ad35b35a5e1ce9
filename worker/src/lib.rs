//! The drover worker and the master/worker wire protocol.
//!
//! The protocol lives here (not in the master) because both ends need it and
//! the worker is the smaller of the two: a node that only runs workers links
//! no scheduling code.
mod env;
mod exec;
pub mod locate;
pub mod protocol;
mod resources;
mod slots;
mod worker;

pub use locate::MasterSource;
pub use resources::Resources;
pub use worker::{detect_resources, hostname, run_worker, StopReason, WorkerConfig};
