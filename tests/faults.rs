//! Faults on the master's side of outputs (issue 19): a local write that
//! fails is the task's outcome, with the OS error; no failed, killed or
//! partial attempt's output replaces a user's file; a `.drover-part` left
//! by an interrupted transfer goes when the task is submitted again.
//! Real `drover worker` processes against a `Manager` in this process.

mod common;

use std::path::Path;

use common::{collect, manager, Worker};
use drover_master::{Outcome, Task, TaskResult};

/// Runs `task` on one fresh worker and returns its result.
fn run_one(task: Task) -> TaskResult {
    let manager = manager();
    let _worker = Worker::start(manager.port(), &["--cores", "1"]);
    manager.submit(task).expect("submit");
    collect(&manager, 1).remove(0)
}

fn output_write_error(r: &TaskResult) -> &str {
    match &r.outcome {
        Outcome::OutputWriteFailed { error } => error,
        other => panic!("expected OutputWriteFailed, got {other:?}: {r:?}"),
    }
}

fn no_part_files_in(dir: &Path) {
    let parts: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".drover-part"))
        .map(|e| e.path())
        .collect();
    assert!(parts.is_empty(), "temporary files left: {parts:?}");
}

/// `file` still holds `content`, and no temporary file is left in `dir`.
fn assert_left_alone(dir: &Path, file: &Path, content: &str) {
    assert_eq!(std::fs::read_to_string(file).expect("read"), content);
    no_part_files_in(dir);
}

/// An output whose local directory is a regular file cannot be written,
/// even by root: the task fails with the OS's word for it, not Success.
#[test]
fn an_output_that_cannot_be_written_fails_the_task_with_the_os_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, "I am a file").expect("write");
    let r =
        run_one(Task::new("echo hi > out.txt").output_file("out.txt", not_a_dir.join("out.txt")));
    let error = output_write_error(&r);
    assert!(error.contains("Not a directory"), "{error}");
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("out.txt")),
        "{r:?}"
    );
    assert!(!r.succeeded());
    assert_eq!(
        r.outcome.words(r.exit_code, r.signal),
        format!("output write failed: {error}")
    );
    assert_eq!(
        std::fs::read_to_string(&not_a_dir).expect("read"),
        "I am a file"
    );
}

/// A directory where the output should go stops the rename: the task
/// fails, the directory stays, and no temporary file is left beside it.
#[test]
fn a_directory_in_the_way_of_an_output_fails_the_task_and_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let in_the_way = dir.path().join("out.txt");
    std::fs::create_dir(&in_the_way).expect("mkdir");
    std::fs::write(in_the_way.join("keep"), "kept").expect("write");
    let r = run_one(Task::new("echo hi > out.txt").output_file("out.txt", &in_the_way));
    let error = output_write_error(&r);
    assert!(error.contains("directory"), "{error}");
    assert_left_alone(dir.path(), &in_the_way.join("keep"), "kept");
}

/// A task killed at its disk limit wrote part of its output: that part
/// never replaces the user's file.
#[test]
fn a_killed_tasks_partial_output_leaves_the_users_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("big.bin");
    std::fs::write(&users, "the user's precious file").expect("write");
    let task = Task::new("head -c 40000000 /dev/zero > big.bin; sleep 30")
        .cores(1)
        .memory_mb(100)
        .disk_mb(8)
        .output_file("big.bin", &users);
    let r = run_one(task);
    assert!(
        matches!(&r.outcome, Outcome::ResourceExhausted { resource } if resource == "disk"),
        "{r:?}"
    );
    assert_left_alone(dir.path(), &users, "the user's precious file");
}

/// A task that fails after writing its output leaves the user's file as it was.
#[test]
fn a_failed_tasks_output_leaves_the_users_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("out.txt");
    std::fs::write(&users, "before").expect("write");
    let r =
        run_one(Task::new("sh -c 'echo after > out.txt; exit 3'").output_file("out.txt", &users));
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_left_alone(dir.path(), &users, "before");
}

/// What an interrupted transfer of an earlier run left beside the output
/// is gone once the task is submitted again, and the output arrives whole.
#[test]
fn a_stale_part_file_goes_when_the_task_is_submitted_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("out.txt");
    let stale = dir.path().join(".out.txt.drover-part");
    std::fs::write(&stale, "half of an old transf").expect("write");
    let manager = manager();
    manager
        .submit(Task::new("echo whole > out.txt").output_file("out.txt", &dest))
        .expect("submit");
    assert!(
        !stale.exists(),
        "the stale part file is still there after submit"
    );
    let _worker = Worker::start(manager.port(), &["--cores", "1"]);
    let r = collect(&manager, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(std::fs::read_to_string(&dest).expect("read"), "whole\n");
    no_part_files_in(dir.path());
}

/// A task that declares more than any connected worker has is counted as
/// fitting no worker, and ends with an outcome that says why once it has
/// waited `fits_no_worker_wait` since the last worker joined; the task
/// beside it runs.
#[test]
fn a_task_that_fits_no_worker_is_counted_and_ends_after_the_wait() {
    let manager = drover_master::Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .fits_no_worker_wait(Some(std::time::Duration::from_secs(2)))
        .build()
        .expect("start manager");
    let _worker = Worker::start(manager.port(), &["--cores", "2"]);
    common::wait_until(&manager, "the worker", |s| s.workers_connected == 1);
    let huge = manager
        .submit(Task::new("echo never").cores(64))
        .expect("submit");
    manager
        .submit(Task::new("echo hi").cores(1))
        .expect("submit");
    common::wait_until(&manager, "the task counted", |s| s.tasks_fit_no_worker == 1);
    let results = collect(&manager, 2);
    let r = results.iter().find(|r| r.id == huge).expect("its result");
    assert_eq!(
        r.outcome,
        Outcome::FitsNoWorker {
            need: "needs 64 cores, largest worker has 2".into()
        },
        "{r:?}"
    );
    assert_eq!(
        r.outcome.words(None, None),
        "fits no worker: needs 64 cores, largest worker has 2"
    );
    assert!(results.iter().any(|r| r.id != huge && r.succeeded()));
    assert_eq!(manager.stats().tasks_fit_no_worker, 0);
}

/// With no wait set (a factory may start bigger workers), the task stays
/// counted and waiting; a bigger worker joining runs it.
#[test]
fn a_task_that_fits_no_worker_runs_when_a_big_enough_worker_joins() {
    let manager = drover_master::Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .fits_no_worker_wait(None)
        .build()
        .expect("start manager");
    let _small = Worker::start(manager.port(), &["--cores", "1"]);
    common::wait_until(&manager, "the worker", |s| s.workers_connected == 1);
    manager
        .submit(Task::new("echo big").cores(2))
        .expect("submit");
    common::wait_until(&manager, "the task counted", |s| s.tasks_fit_no_worker == 1);
    let _big = Worker::start(manager.port(), &["--cores", "2"]);
    let r = collect(&manager, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(manager.stats().tasks_fit_no_worker, 0);
}

/// `drover run` with an output it cannot write exits non-zero and says
/// why in its summary, instead of exit 0 and a WARN line.
#[test]
fn drover_run_exits_non_zero_when_an_output_cannot_be_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("plain-file"), "not a directory").expect("write");
    let line = serde_json::json!({
        "command": "echo x > o",
        "outputs": [{"remote": "o", "local": dir.path().join("plain-file/o")}],
    });
    let tasks = common::write_file(dir.path(), "tasks.txt", format!("{line}\n").as_bytes());
    let out = std::process::Command::new(common::drover_bin())
        .arg("run")
        .arg(&tasks)
        .arg("--failed-dir")
        .arg(dir.path().join("failed"))
        .output()
        .expect("run drover run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("output write failed"), "{text}");
}
