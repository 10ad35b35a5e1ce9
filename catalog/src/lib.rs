//! The drover catalog: where masters announce themselves and where people,
//! workers and factories find them.
//!
//! - [`paths`]: default state locations (the XDG state directory).
//! - [`report`]: the status report a master sends (the JSON wire format).
//! - [`client`]: blocking functions to send a report and to query a catalog.
//! - [`server`]: `drover catalog`, the UDP + HTTP server with the status page.
//! - [`status`]: `drover status`, the command-line view of a catalog.
//! - [`secret`]: password and key files, and signed reports.
//! - [`store`]: the bounded, expiring table behind the server, and its state file.

pub mod client;
pub mod paths;
pub mod report;
pub mod secret;
pub mod server;
pub mod status;
pub mod store;

pub use report::{
    CategorySummary, EventSummary, History, MasterReport, RunningTask, ShapeCount, WorkerSummary,
};
