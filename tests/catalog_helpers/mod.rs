//! Helpers of the catalog's end-to-end tests: start a real `drover catalog`,
//! build reports.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use drover_catalog::client;
use drover_catalog::report::{CategorySummary, MasterReport, WorkerSummary};
use drover_catalog::server::CatalogStats;

/// The `drover` binary, whose `catalog` and `status` subcommands these drive.
pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A catalog process that is stopped when the test ends, pass or fail.
pub struct Catalog {
    pub child: Child,
    pub addr: String,
}

impl Catalog {
    pub fn start(extra: &[&str], state_file: &Path) -> Catalog {
        let state = state_file.to_str().expect("state file path is UTF-8");
        let mut args = vec!["--state-file", state];
        args.extend_from_slice(extra);
        let (child, addr, _) = crate::common::start_catalog(&args);
        Catalog { child, addr }
    }

    pub fn stats(&self) -> CatalogStats {
        serde_json::from_slice(&client::get(&self.addr, "/api/stats").unwrap()).unwrap()
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// SIGTERM, as a service manager would, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "catalog did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn master(project: &str, port: u16, done: u64) -> MasterReport {
    let mut r = MasterReport::new_master(project, "127.0.0.1", port);
    r.owner = "alice".into();
    r.start_time = 1_700_000_000;
    r.tasks_waiting = 100u64.saturating_sub(done);
    r.tasks_running = 4;
    r.tasks_done = done;
    r.workers_connected = 2;
    r.workers_busy = 1;
    r.cores_total = 8;
    r.categories = vec![CategorySummary {
        name: "default".into(),
        done: Some(done),
        allocation: Some("bucketing: 3 buckets".into()),
        ..Default::default()
    }];
    r.workers = vec![WorkerSummary {
        host: "w1".into(),
        cores: 4,
        memory_mb: 1024,
        running: 4,
        ..Default::default()
    }];
    r
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
