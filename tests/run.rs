//! `drover run` as a user meets it: the summary of failed tasks, the lines
//! to run again, tasks no worker can fit, packed environments, and Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::drover_bin;

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(drover_bin())
        .arg("run")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("start drover run")
}

/// `drover run ARGS` in `dir`, its stderr piped for the test to read.
fn spawn_run(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(drover_bin())
        .arg("run")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drover run")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn failures_read_as_words_and_their_lines_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let failing = r#"{"command": "sh -c 'echo oops >&2; exit 3'", "tag": "t2", "max_retries": 0}"#;
    std::fs::write(
        dir.path().join("tasks.txt"),
        format!("# a comment\necho fine\n{failing}\n"),
    )
    .unwrap();
    let out = run_in(dir.path(), &["tasks.txt", "--cores", "1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 done, 1 failed, 2 tasks"), "{err}");
    assert!(err.contains("tasks.txt:3 [t2]: exit 3 ("), "{err}");
    assert!(err.contains("1 attempt)"), "{err}");
    assert!(!err.contains("Some("), "debug formatting in {err}");

    let failed_dir = dir.path().join("drover-failed");
    let listed = std::fs::read_to_string(failed_dir.join("failed.txt")).unwrap();
    assert_eq!(listed, format!("{failing}\n"));
    let log = std::fs::read_to_string(failed_dir.join("line-3.log")).unwrap();
    for want in [
        "task:      tasks.txt:3",
        "tag:       t2",
        "outcome:   exit 3",
        "oops",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    assert!(!log.contains("Some(") && !log.contains(" { "), "{log}");

    // The list runs as a task file of its own, and is rewritten by that run.
    let again = run_in(dir.path(), &["drover-failed/failed.txt", "--cores", "1"]);
    let err = stderr(&again);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(
        err.contains("drover-failed/failed.txt:1 [t2]: exit 3"),
        "{err}"
    );
    let listed = std::fs::read_to_string(failed_dir.join("failed.txt")).unwrap();
    assert_eq!(listed, format!("{failing}\n"));
    assert!(!failed_dir.join("line-3.log").exists(), "stale log kept");
}

#[test]
fn a_task_the_local_worker_cannot_fit_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("big.txt"),
        "echo small\n{\"command\": \"true\", \"cores\": 64}\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["big.txt", "--cores", "2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("big.txt:2:") && err.contains("64 cores"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("mem.txt"),
        "{\"command\": \"true\", \"memory\": 100}\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["mem.txt", "--memory", "64", "--disk", "100"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("mem.txt:1:") && err.contains("100 MB memory"),
        "{err}"
    );
}

#[test]
fn a_task_line_runs_in_a_packed_environment() {
    let dir = tempfile::tempdir().unwrap();
    common::write_stdlib_spec(dir.path());
    let packed = Command::new(drover_bin())
        .args(["pack", "create", "spec.json", "-o", "env.tar.gz"])
        .env("DROVER_CACHE_DIR", dir.path().join("cache"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(packed.status.success(), "{}", stderr(&packed));
    std::fs::write(
        dir.path().join("tasks.txt"),
        "{\"command\": \"python3 -c 'import sys; print(sys.prefix)'\", \"environment\": \"env.tar.gz\"}\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["tasks.txt", "--cores", "1", "--show-output"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !prefix.is_empty() && !prefix.starts_with("/usr"),
        "ran outside the environment: {prefix:?}"
    );
}

#[test]
fn ctrl_c_cancels_the_rest_and_still_summarizes() {
    let dir = tempfile::tempdir().unwrap();
    let mark = format!("7{}{}", std::process::id(), 31);
    let tasks: String = (0..4).map(|_| format!("sleep {mark}\n")).collect();
    std::fs::write(dir.path().join("sleepers.txt"), tasks).unwrap();
    let mut child = spawn_run(dir.path(), &["sleepers.txt", "--cores", "2"]);
    // Tasks that declare nothing start one at a time while their category
    // learns; one running is enough to cancel mid-run.
    common::wait_for_processes(&format!("sleep {mark}"), 1);
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drover run ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("0 done, 0 failed, 4 cancelled, 4 tasks"),
        "{err}"
    );
    // Not a terminal: no colour codes, and the summary starts its own line.
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(
        err.lines().any(|l| l.starts_with("drover: interrupted")),
        "{err}"
    );
    common::assert_none_left(&format!("sleep {mark}"));
}

#[test]
fn a_lost_worker_is_reported_and_its_task_runs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mark = format!("3{}{}", std::process::id(), 17);
    // Fractional seconds, so the marker is a literal argument of `sleep`.
    let tasks: String = (0..2)
        .map(|_| format!("{{\"command\": \"sleep 2.{mark}\", \"cores\": 1}}\n"))
        .collect();
    std::fs::write(dir.path().join("t.txt"), tasks).unwrap();
    let mut run = spawn_run(dir.path(), &["t.txt", "--workers", "0", "--port", &port]);
    let port: u16 = port.parse().unwrap();
    let doomed = common::Worker::start(port, &["--cores", "1"]);
    let _kept = common::Worker::start(port, &["--cores", "1"]);
    // Read the run's progress until it has seen both workers, so that the
    // loss cannot fall between two of its polls.
    let mut lines = BufReader::new(run.stderr.take().unwrap()).lines();
    let mut err = String::new();
    while !err.contains("(2 connected)") && !err.contains("2 workers connected") {
        let line = lines.next().expect("the run ended early").unwrap();
        err.push_str(&line);
        err.push('\n');
    }
    common::wait_for_processes(&format!("sleep 2.{mark}"), 2);
    drop(doomed);
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("1 worker lost (1 connected)"), "{err}");
    // The line names the worker: its host, its address and why.
    assert!(
        err.contains("1 worker lost (1 connected): ") && err.contains(" 127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("2 done, 0 failed; 1 worker lost"), "{err}");
}
