//! One bad worker must not stall the queue (issue 19). The bad worker is a
//! real `drover worker` whose disk broke under it: its task directory is
//! replaced by a regular file after it connected, so it cannot set up any
//! task (not even as root) and answers every `run` with a setup failure.
//! That counts against the worker as a refusal does: it is blocked
//! (doubling), the task is not sent back to it at once, and every task
//! finishes on the good worker, once. Alone in its file, so this process's
//! CPU time is the master's and the test's.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{collect, manager, wait_until, Worker};
use drover_master::{Manager, Outcome, Task, TaskResult};

const TASKS: usize = 20;

/// CPU time (user + system) this process used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn submit_all(manager: &Manager, marker: &std::path::Path) {
    for i in 0..TASKS {
        let cmd = format!("sh -c 'echo {i} >> {}; sleep 0.1'", marker.display());
        manager
            .submit(Task::new(cmd).cores(1).memory_mb(50).disk_mb(10))
            .expect("submit");
    }
}

/// Each task ran exactly once (its line in the marker) and succeeded.
fn assert_each_ran_once(results: &[TaskResult], marker: &std::path::Path) {
    for r in results {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    }
    let mut runs: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(marker).expect("marker").lines() {
        *runs.entry(line.to_string()).or_default() += 1;
    }
    assert_eq!(runs.len(), TASKS, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "a task ran twice: {runs:?}");
}

/// The same tasks on the good worker alone: the CPU baseline.
fn baseline_cpu(dir: &std::path::Path) -> Duration {
    let manager = manager();
    let marker = dir.join("baseline");
    let before = cpu_time();
    let _good = Worker::start(manager.port(), &["--cores", "2"]);
    submit_all(&manager, &marker);
    let results = collect(&manager, TASKS);
    let used = cpu_time() - before;
    assert_each_ran_once(&results, &marker);
    used
}

#[test]
fn a_worker_that_fails_every_task_is_blocked_and_the_good_worker_runs_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let baseline = baseline_cpu(dir.path());

    let manager = manager();
    let marker = dir.path().join("runs");
    let before = cpu_time();
    let bad = Worker::start(manager.port(), &["--cores", "2"]);
    wait_until(&manager, "the bad worker", |s| s.workers_connected == 1);
    bad.break_task_dir();

    submit_all(&manager, &marker);
    // With only the bad worker, the tasks go there, fail to set up, and
    // it is blocked; none of them is lost or ended for that.
    wait_until(&manager, "the bad worker blocked", |s| {
        s.workers_blocked == 1 && s.tasks_requeued >= 1
    });
    let s = manager.stats();
    assert_eq!(s.tasks_done + s.tasks_failed, 0, "{s:?}");

    let _good = Worker::start(manager.port(), &["--cores", "2"]);
    let results = collect(&manager, TASKS);
    let used = cpu_time() - before;
    assert_each_ran_once(&results, &marker);
    let refused: Vec<_> = results
        .iter()
        .flat_map(|r| &r.attempts)
        .filter(|a| a.ending.contains("setup failed"))
        .collect();
    assert!(
        !refused.is_empty(),
        "no attempt shows the bad worker's failure"
    );
    // Before the fix: 1.4 million `run` frames in 60 s and 21.5 s of
    // master CPU. A few refusals cost next to nothing over the baseline.
    assert!(
        used.saturating_sub(baseline) < Duration::from_secs(1),
        "master CPU with the bad worker {used:?}, without {baseline:?}"
    );
    // The bad worker is still there, and still blocked or waiting out its
    // pause: it was kept, not dropped.
    assert_eq!(manager.stats().workers_connected, 2);
    drop(bad);
}
