//! A small chaos run (issue 19): a few hundred short tasks through a good
//! worker, a worker that fails every task (its task directory is a file),
//! a worker with a tiny --disk, a worker SIGKILLed mid-run (while it runs
//! and sends outputs), and a master whose output directory cannot be
//! written for some tasks. Every task has exactly one result, with the
//! outcome its kind calls for.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{manager, wait_until, Worker};
use drover_master::{Outcome, Task, TaskId};

const TASKS: u64 = 200;

/// What task `i` does, and so how it must end.
#[derive(Debug, PartialEq)]
enum Kind {
    /// Its output's directory is a regular file: OutputWriteFailed.
    Unwritable,
    /// Writes 30 MB under a 5 MB disk limit: killed for disk.
    OverDisk,
    /// Sends back a 1 MB output: Success, and the file whole.
    Output,
    /// Just runs: Success.
    Plain,
}

fn kind(i: u64) -> Kind {
    match i % 10 {
        0 => Kind::Unwritable,
        1 => Kind::OverDisk,
        2 | 3 => Kind::Output,
        _ => Kind::Plain,
    }
}

fn task(i: u64, dir: &Path) -> Task {
    let t =
        match kind(i) {
            Kind::Unwritable => Task::new("echo x > o")
                .output_file("o", dir.join("plain-file").join(format!("o{i}"))),
            Kind::OverDisk => Task::new("head -c 30000000 /dev/zero > big; sleep 30"),
            Kind::Output => Task::new("head -c 1000000 /dev/zero > o")
                .output_file("o", dir.join(format!("o{i}"))),
            Kind::Plain => Task::new(format!("echo {i}")),
        };
    t.cores(1).memory_mb(50).disk_mb(5)
}

#[test]
fn every_task_of_a_chaotic_run_ends_once_with_the_right_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("plain-file"), "not a directory").expect("write");
    let manager = manager();
    let port = manager.port();

    let bad = Worker::start(port, &["--cores", "2"]);
    wait_until(&manager, "the bad worker", |s| s.workers_connected == 1);
    bad.break_task_dir();
    let _good = Worker::start(port, &["--cores", "2"]);
    let _tiny = Worker::start(port, &["--cores", "1", "--disk", "12"]);
    let doomed = Worker::start(port, &["--cores", "2"]);
    wait_until(&manager, "four workers", |s| s.workers_connected == 4);

    let mut kinds: HashMap<TaskId, Kind> = HashMap::new();
    for i in 0..TASKS {
        let id = manager.submit(task(i, dir.path())).expect("submit");
        kinds.insert(id, kind(i));
    }
    let mut results = HashMap::new();
    let mut doomed = Some(doomed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while results.len() < TASKS as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {TASKS} results; stats {:?}",
            results.len(),
            manager.stats()
        );
        let Some(r) = manager.wait(Some(std::time::Duration::from_millis(200))) else {
            continue;
        };
        // A third of the way in, one worker dies without a word, busy.
        if results.len() == TASKS as usize / 3 {
            if let Some(mut w) = doomed.take() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
        assert!(results.insert(r.id, r).is_none(), "a task ended twice");
    }
    assert!(manager
        .wait(Some(std::time::Duration::from_millis(500)))
        .is_none());
    for (id, r) in &results {
        match kinds[id] {
            Kind::Unwritable => assert!(
                matches!(r.outcome, Outcome::OutputWriteFailed { .. }),
                "{r:?}"
            ),
            Kind::OverDisk => assert!(
                matches!(&r.outcome, Outcome::ResourceExhausted { resource } if resource == "disk"),
                "{r:?}"
            ),
            Kind::Output | Kind::Plain => assert_eq!(r.outcome, Outcome::Success, "{r:?}"),
        }
    }
    for i in (0..TASKS).filter(|&i| kind(i) == Kind::Output) {
        let size = std::fs::metadata(dir.path().join(format!("o{i}")))
            .map(|m| m.len())
            .unwrap_or(0);
        assert_eq!(size, 1_000_000, "output of task {i}");
    }
    drop(bad);
}
