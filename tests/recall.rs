//! A task sent ahead to a busy worker is recalled to a worker with room
//! (the closing note's "noticed and not fixed"): two real `drover worker`
//! processes. Worker 1 (one core) runs a gate task that waits for a file
//! and holds a second task sent ahead behind it; worker 2 (two cores)
//! joins, and the second task runs there while the gate is still shut.
//! Without the recall it would wait behind the gate until the test gives
//! up; nothing here depends on how long anything takes.

mod common;

use common::{collect, drover_bin, manager, wait_until, Worker};
use drover_master::{Outcome, Task};

#[test]
fn a_task_sent_ahead_behind_a_long_one_runs_on_a_worker_that_joins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("go");
    let manager = manager();
    let task = |cmd: String| Task::new(cmd).cores(1).memory_mb(50).disk_mb(10);
    let gated = format!(
        "sh -c 'while [ ! -e {} ]; do sleep 0.05; done'",
        gate.display()
    );
    let gate_id = manager.submit(task(gated)).expect("submit the gate task");
    // Each prints its sandbox, which is under its worker's work directory.
    let others: Vec<_> = (0..2)
        .map(|_| manager.submit(task("pwd".into())).expect("submit"))
        .collect();
    // All three wait when it joins: it takes the gate task (the first
    // submitted) and one more is sent ahead to wait behind it.
    let first = Worker::start(manager.port(), &["--cores", "1"]);
    wait_until(&manager, "a task sent ahead to worker 1", |s| {
        s.tasks_running == 1 && s.tasks_queued_on_workers == 1
    });

    let second = Worker::start(manager.port(), &["--cores", "2"]);
    // Both quick tasks end while the gate task still holds worker 1.
    let quick = collect(&manager, 2);
    let second_dir = second.workdir.path().canonicalize().expect("workdir");
    for r in &quick {
        assert!(others.contains(&r.id), "the gate task ended early: {r:?}");
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(r.attempts.len(), 1, "{r:?}");
        let ran_in = std::path::Path::new(r.stdout.trim());
        assert!(
            ran_in.starts_with(&second_dir),
            "task {} ran in {ran_in:?}, not on worker 2 ({second_dir:?})",
            r.id
        );
    }
    let stats = manager.stats();
    assert_eq!((stats.tasks_sent_ahead, stats.tasks_recalled), (1, 1));
    assert_eq!(stats.tasks_requeued, 0);

    std::fs::write(&gate, b"").expect("open the gate");
    let last = collect(&manager, 1);
    assert_eq!(last[0].id, gate_id);
    assert_eq!(last[0].outcome, Outcome::Success, "{:?}", last[0]);
    drop((first, second));
}

/// Issue 22: on a one-core worker, a task sent ahead starts in the room of
/// the one before it as soon as that one's process exits, before the
/// worker has measured and reported it. The worker says so in its log; the
/// tasks never overlap (each holds a lock directory while it runs, and one
/// that finds it taken fails); and each succeeds once, nothing refused.
#[test]
fn a_task_sent_ahead_starts_when_the_one_before_exits_and_never_overlaps_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lock = dir.path().join("lock");
    let log_path = dir.path().join("worker.log");
    let manager = manager();
    let command = format!(
        "sh -c 'mkdir {0} || exit 3; sleep 0.02; rmdir {0}'",
        lock.display()
    );
    let n = 30;
    for _ in 0..n {
        let task = Task::new(command.clone())
            .cores(1)
            .memory_mb(50)
            .disk_mb(10);
        manager.submit(task).expect("submit");
    }
    let log = std::fs::File::create(&log_path).expect("log file");
    let workdir = tempfile::tempdir().expect("workdir");
    let child = std::process::Command::new(drover_bin())
        .args(["worker", &format!("127.0.0.1:{}", manager.port())])
        .arg("--workdir")
        .arg(workdir.path())
        .args(["--cores", "1"])
        .env("RUST_LOG", "drover_worker=debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start drover worker");
    let worker = Worker { child, workdir };
    let results = collect(&manager, n);
    for r in &results {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(r.attempts.len(), 1, "{r:?}");
    }
    let stats = manager.stats();
    assert!(stats.tasks_sent_ahead > 0, "{stats:?}");
    assert_eq!(stats.tasks_requeued, 0, "{stats:?}");
    drop(worker);
    let log = std::fs::read_to_string(&log_path).expect("read the worker's log");
    assert!(
        log.contains("its room goes to a task sent ahead"),
        "no task started in the room of one that exited:\n{log}"
    );
    assert!(!log.contains("refusing to overcommit"), "{log}");
}
