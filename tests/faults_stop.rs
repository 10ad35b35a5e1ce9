//! A stopped master loses no finished work (issue 19): this process, the
//! master, is SIGSTOPped for longer than both its worker-loss timeout and
//! the worker's silence limit while a task finishes; after SIGCONT the
//! report that waited in the socket is read and accepted, and the task does
//! not run again. Alone in its file: the stop freezes every test thread.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{collect, Worker};
use drover_master::{Manager, Outcome, Task};

#[test]
fn a_report_that_waited_through_a_sigstop_is_accepted_and_the_task_runs_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("runs");
    let manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .keepalive(Duration::from_secs(1), Duration::from_secs(3))
        .build()
        .expect("start manager");
    let _worker = Worker::start(manager.port(), &["--cores", "1"]);
    let cmd = format!("sh -c 'echo run >> {}; sleep 2'", marker.display());
    manager
        .submit(Task::new(cmd).cores(1).memory_mb(50).disk_mb(10))
        .expect("submit");
    common::wait_until(&manager, "the task running", |_| marker.exists());

    // 9 s: past the master's 3 s timeout and the worker's 5 s silence
    // limit (its floor), with the task's report sent at about 2 s.
    let mut stopper = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "kill -STOP {pid}; sleep 9; kill -CONT {pid}",
            pid = std::process::id()
        ))
        .spawn()
        .expect("start the stopper");
    let status = stopper.wait().expect("wait for the stopper");
    assert!(status.success(), "the stopper failed: {status:?}");

    let r = collect(&manager, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.attempts.len(), 1, "{:?}", r.attempts);
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs.lines().count(), 1, "the task ran again: {runs:?}");
}
