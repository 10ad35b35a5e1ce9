//! Helpers for end-to-end tests: real `drover worker` processes against a real master.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, TaskResult};

pub fn drover_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drover"))
}

/// A worker process, killed when dropped.
pub struct Worker {
    pub child: Child,
    pub workdir: tempfile::TempDir,
}

impl Worker {
    pub fn start(port: u16, args: &[&str]) -> Worker {
        let workdir = tempfile::tempdir().expect("tempdir");
        Worker::start_in(port, args, workdir)
    }

    pub fn start_in(port: u16, args: &[&str], workdir: tempfile::TempDir) -> Worker {
        let child = Command::new(drover_bin())
            .arg("worker")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--workdir")
            .arg(workdir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start drover worker");
        Worker { child, workdir }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the worker to exit and returns (status code, stderr).
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn manager() -> Manager {
    Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .build()
        .expect("start manager")
}

/// Waits until `cond(stats)` holds, polling; panics after a generous timeout.
pub fn wait_until(manager: &Manager, what: &str, cond: impl Fn(&drover_master::Stats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = manager.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; stats: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects `n` results, panicking if they don't all arrive within a generous timeout.
pub fn collect(manager: &Manager, n: usize) -> Vec<TaskResult> {
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} results arrived",
            out.len()
        );
        if let Some(r) = manager.wait(Some(Duration::from_millis(200))) {
            out.push(r);
        }
    }
    out
}

pub fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write file");
    p
}
