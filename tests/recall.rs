//! A task sent ahead to a busy worker is recalled to a worker with room
//! (the closing note's "noticed and not fixed"): two real `drover worker`
//! processes. Worker 1 (one core) runs a gate task that waits for a file
//! and holds a second task sent ahead behind it; worker 2 (two cores)
//! joins, and the second task runs there while the gate is still shut.
//! Without the recall it would wait behind the gate until the test gives
//! up; nothing here depends on how long anything takes.

mod common;

use common::{collect, manager, wait_until, Worker};
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
