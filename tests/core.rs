//! End-to-end tests of the core: a real master (the library, embedded as a
//! user embeds it) and real `drover worker` processes over TCP.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use drover_master::{Outcome, SubmitError, Task};

#[test]
fn tasks_run_with_inputs_buffers_outputs_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_file(dir.path(), "in.txt", b"hello drover\n");
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "2"]);
    let out = dir.path().join("result.txt");
    let id = m
        .submit(
            Task::new("cat data/in.txt extra.txt > out.txt; echo \"$GREETING\"; echo oops >&2")
                .input_file(&input, "data/in.txt", true)
                .input_buffer(b"from a buffer\n".to_vec(), "extra.txt")
                .output_file("out.txt", &out)
                .env("GREETING", "hi there")
                .tag("first"),
        )
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.id, id);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, "hi there\n");
    assert_eq!(r.stderr, "oops\n");
    assert_eq!(r.tag.as_deref(), Some("first"));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello drover\nfrom a buffer\n"
    );
    assert_eq!(r.attempts.len(), 1);
    assert!(r.host.is_some() && r.started.is_some());
    assert!(r.measured.wall_time_s > 0.0);
    assert!(m.is_empty());
}

#[test]
fn command_not_found_fails_with_127_and_its_stderr() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("this-command-does-not-exist-anywhere"))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.exit_code, Some(127));
    assert!(r.stderr.contains("not found"), "stderr: {}", r.stderr);
}

#[test]
fn bad_inputs_and_names_are_refused_at_submit() {
    let m = manager();
    let missing = m.submit(Task::new("true").input_file("/no/such/file/anywhere", "x", true));
    assert!(
        matches!(missing, Err(SubmitError::InputMissing(ref msg)) if msg.contains("/no/such/file")),
        "{missing:?}"
    );
    let uncached = m.submit(Task::new("true").input_file("/no/such/file", "x", false));
    assert!(matches!(uncached, Err(SubmitError::InputMissing(_))));
    for bad in ["../../x", "/etc/x", "a/../../x", ""] {
        let out = m.submit(Task::new("true").output_file(bad, "/tmp/whatever"));
        assert!(
            matches!(out, Err(SubmitError::InvalidName(_))),
            "output {bad:?}: {out:?}"
        );
        let inp = m.submit(Task::new("true").input_buffer(b"x".to_vec(), bad));
        assert!(
            matches!(inp, Err(SubmitError::InvalidName(_))),
            "input {bad:?}: {inp:?}"
        );
    }
    assert!(m.is_empty(), "refused tasks must not count as submitted");
}

#[test]
fn an_output_that_links_out_of_the_sandbox_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(dir.path(), "secret", b"do not leak");
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let local = dir.path().join("got");
    m.submit(Task::new(format!("ln -s {} out", secret.display())).output_file("out", &local))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::OutputMissing);
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("escapes the task sandbox"),
        "{:?}",
        r.error
    );
    assert!(
        !local.exists(),
        "nothing may be written for a refused output"
    );
}

#[test]
fn a_cached_input_crosses_once_per_worker() {
    let dir = tempfile::tempdir().unwrap();
    let big = write_file(dir.path(), "big", &vec![7u8; 3 * 1024 * 1024]);
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "2"]);
    for _ in 0..20 {
        m.submit(Task::new("wc -c < big").input_file(&big, "big", true))
            .unwrap();
    }
    let results = collect(&m, 20);
    for r in &results {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(r.stdout.trim(), (3 * 1024 * 1024).to_string());
    }
    assert_eq!(m.stats().files_sent, 1);
}

#[test]
fn the_cache_survives_a_worker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_file(dir.path(), "data", b"cached across runs");
    let workdir = tempfile::tempdir().unwrap();
    let start_worker = |port: u16| {
        let child = std::process::Command::new(drover_bin())
            .args([
                "worker",
                &format!("127.0.0.1:{port}"),
                "--cores",
                "1",
                "--workdir",
            ])
            .arg(workdir.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Worker {
            child,
            workdir: tempfile::tempdir().unwrap(),
        }
    };
    {
        let m = manager();
        let _w = start_worker(m.port());
        m.submit(Task::new("cat data").input_file(&data, "data", true))
            .unwrap();
        assert_eq!(collect(&m, 1)[0].outcome, Outcome::Success);
        assert_eq!(m.stats().files_sent, 1);
    }
    let m = manager();
    let _w = start_worker(m.port());
    m.submit(Task::new("cat data").input_file(&data, "data", true))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.stdout, "cached across runs");
    assert_eq!(
        m.stats().files_sent,
        0,
        "the worker already had the file from the earlier run"
    );
}

#[test]
fn wall_time_limit_kills_the_task() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("sleep 60").wall_time(Duration::from_millis(500)))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::WallTimeExceeded);
    assert!(r.measured.wall_time_s < 30.0);
}

#[test]
fn cancel_by_id_and_by_tag() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let running = m.submit(Task::new("sleep 60")).unwrap();
    wait_until(&m, "the sleeper to start", |s| s.tasks_running == 1);
    let a = m.submit(Task::new("sleep 60").tag("batch")).unwrap();
    let b = m.submit(Task::new("sleep 60").tag("batch")).unwrap();
    assert!(m.cancel(running));
    assert_eq!(m.cancel_by_tag("batch"), 2);
    let results = collect(&m, 3);
    let ids: HashSet<_> = results.iter().map(|r| r.id).collect();
    assert_eq!(ids, HashSet::from([running, a, b]));
    assert!(
        results.iter().all(|r| r.outcome == Outcome::Cancelled),
        "{results:?}"
    );
    assert!(
        !m.cancel(running),
        "a finished task cannot be cancelled again"
    );
    assert_eq!(m.stats().tasks_cancelled, 3);
}

/// A task sent ahead waits on its full worker and starts there only when
/// a task ends; cancelled while it waits, it ends at once without having
/// run, and nothing else is disturbed.
#[test]
fn a_task_sent_ahead_waits_on_its_worker_and_can_be_cancelled_there() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let mark = format!("{}.{}", std::process::id(), 4321);
    let log = dir.path().join("started");
    // Every resource declared (nothing left for a category to learn), so
    // they may be sent ahead.
    let declared = |cmd: String| Task::new(cmd).cores(1).memory_mb(50).disk_mb(10);
    let first = m.submit(declared("sleep 0.5".into())).unwrap();
    wait_until(&m, "the first task to start", |s| s.tasks_running == 1);
    // Each writes its id before sleeping, so a start leaves a trace.
    let sleepers: Vec<_> = (0..3)
        .map(|i| {
            let cmd = format!("echo {i} >> {}; sleep 60 {mark}", log.display());
            m.submit(declared(cmd)).unwrap()
        })
        .collect();
    assert_eq!(collect(&m, 1)[0].id, first);
    // Sleeper 0 now runs; sleeper 1 is sent ahead (two wait, one worker).
    wait_until(&m, "a task sent ahead", |s| s.tasks_sent_ahead >= 1);
    wait_for_processes(&mark, 1);
    assert!(m.cancel(sleepers[1]));
    let r = collect(&m, 1).remove(0);
    assert_eq!((r.id, r.outcome), (sleepers[1], Outcome::Cancelled));
    let started = std::fs::read_to_string(&log).unwrap();
    assert_eq!(started, "0\n", "only the running sleeper started");
    // Sleeper 0's shell and its sleep.
    assert_eq!(live_processes_with(&mark).len(), 2);
    assert!(m.cancel(sleepers[0]));
    // The last one runs once the worker is free, then is cancelled too.
    wait_until(&m, "the last sleeper to start", |s| s.tasks_running == 1);
    let results = collect(&m, 1);
    assert_eq!(results[0].id, sleepers[0]);
    wait_for_processes(&mark, 1);
    assert!(m.cancel(sleepers[2]));
    assert_eq!(collect(&m, 1)[0].outcome, Outcome::Cancelled);
    assert_none_left(&mark);
    let started = std::fs::read_to_string(&log).unwrap();
    assert_eq!(started, "0\n2\n");
}

#[test]
fn a_worker_killed_mid_task_loses_nothing_and_duplicates_nothing() {
    let m = manager();
    let w1 = Worker::start(m.port(), &["--cores", "2"]);
    let n = 6;
    let mut ids = HashSet::new();
    for i in 0..n {
        ids.insert(
            m.submit(Task::new(format!("sleep 1; echo {i}")).cores(1))
                .unwrap(),
        );
    }
    wait_until(&m, "two tasks running on the first worker", |s| {
        s.tasks_running == 2
    });
    // SIGKILL: no goodbye, the master learns from the closed connection.
    unsafe { libc::kill(w1.pid(), libc::SIGKILL) };
    let _w2 = Worker::start(m.port(), &["--cores", "2"]);
    let results = collect(&m, n);
    let got: Vec<_> = results.iter().map(|r| r.id).collect();
    let unique: HashSet<_> = got.iter().copied().collect();
    assert_eq!(unique.len(), n, "a task was reported twice: {got:?}");
    assert_eq!(unique, ids);
    assert!(
        results.iter().all(|r| r.outcome == Outcome::Success),
        "{results:?}"
    );
    let retried = results.iter().filter(|r| r.attempts.len() == 2).count();
    assert!(
        retried >= 2,
        "the two running tasks should have been retried"
    );
    assert!(results
        .iter()
        .any(|r| r.attempts[0].ending.contains("worker lost")));
    assert!(
        m.wait(Some(Duration::from_millis(500))).is_none(),
        "no extra results"
    );
    drop(w1);
}

#[test]
fn workers_never_run_more_than_their_cores() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "3"]);
    let log = dir.path().join("log");
    // Each task records how many tasks are inside the critical section at once.
    for _ in 0..9 {
        m.submit(
            Task::new(format!(
                "echo start >> {log}; sleep 0.3; echo end >> {log}",
                log = log.display()
            ))
            .cores(2),
        )
        .unwrap();
    }
    let results = collect(&m, 9);
    assert!(results.iter().all(|r| r.outcome == Outcome::Success));
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut depth, mut max) = (0i32, 0i32);
    for line in text.lines() {
        depth += if line == "start" { 1 } else { -1 };
        max = max.max(depth);
    }
    assert_eq!(max, 1, "two 2-core tasks ran at once on a 3-core worker");
}

fn password_file(dir: &std::path::Path, name: &str, password: &str) -> std::path::PathBuf {
    write_file(dir, name, format!("{password}\n").as_bytes())
}

#[test]
fn wrong_password_is_refused_on_both_sides_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let good = password_file(dir.path(), "good", "correct horse");
    let bad = password_file(dir.path(), "bad", "battery staple");
    let m = drover_master::Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .password_file(&good)
        .build()
        .unwrap();

    let intruder = Worker::start(
        m.port(),
        &[
            "--password-file",
            bad.to_str().unwrap(),
            "--exit-on-disconnect",
        ],
    );
    let (code, stderr) = intruder.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("wrong password"), "worker stderr: {stderr}");

    let no_password = Worker::start(m.port(), &["--exit-on-disconnect"]);
    let (code, stderr) = no_password.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("requires a password"),
        "worker stderr: {stderr}"
    );

    let _friend = Worker::start(
        m.port(),
        &["--password-file", good.to_str().unwrap(), "--cores", "1"],
    );
    m.submit(Task::new("echo ok")).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(m.stats().workers_connected, 1);
}

#[test]
fn a_worker_with_a_password_refuses_a_master_that_cannot_prove_it() {
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), "pw", "secret");
    let m = manager();
    let w = Worker::start(
        m.port(),
        &[
            "--password-file",
            pw.to_str().unwrap(),
            "--exit-on-disconnect",
        ],
    );
    let (code, stderr) = w.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("no password"), "worker stderr: {stderr}");
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

fn read_reply(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

#[test]
fn other_versions_garbage_and_oversized_frames_are_dropped_and_the_master_serves_on() {
    let m = manager();
    let addr = format!("127.0.0.1:{}", m.port());

    let mut old = TcpStream::connect(&addr).unwrap();
    old.write_all(&frame(
        r#"{"type":"hello","protocol":999,"drover_version":"9.9","hostname":"x","os":"linux","arch":"x86_64","resources":{"cores":1,"memory_mb":1,"disk_mb":1,"gpus":0},"password":false,"cached":[]}"#,
    ))
    .unwrap();
    let reply = read_reply(&mut old).expect("a refusal");
    assert!(
        reply.contains("refused") && reply.contains("protocol version mismatch"),
        "{reply}"
    );

    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&frame("this is not json")).unwrap();
    assert!(
        read_reply(&mut garbage).is_none(),
        "garbage must close the connection"
    );

    let mut huge = TcpStream::connect(&addr).unwrap();
    huge.write_all(&u32::MAX.to_be_bytes()).unwrap();
    huge.write_all(&[b'x'; 1024]).unwrap();
    assert!(
        read_reply(&mut huge).is_none(),
        "an oversized frame must close the connection"
    );

    assert_eq!(m.stats().workers_connected, 0);
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("echo still serving")).unwrap();
    assert_eq!(collect(&m, 1)[0].stdout, "still serving\n");
}

#[test]
fn a_stranger_declaring_a_large_first_frame_is_cut_off_at_once() {
    let m = manager();
    let addr = format!("127.0.0.1:{}", m.port());
    let mut stranger = TcpStream::connect(&addr).unwrap();
    // 100 KiB is within the limit for a worker that passed the handshake,
    // but over the one for a peer that has not: the master closes the
    // connection from the length alone, without waiting for (or making
    // room for) a body that never comes.
    stranger.write_all(&(100u32 * 1024).to_be_bytes()).unwrap();
    // Well short of the 30 s handshake deadline, which would also close it.
    stranger
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stranger.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the master kept a pre-handshake connection open: {other:?}"),
    }
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("echo served")).unwrap();
    assert_eq!(collect(&m, 1)[0].stdout, "served\n");
}

#[test]
fn a_worker_refuses_to_overcommit_even_if_asked() {
    // A hand-written master (a plain TCP listener in this test) asks for too
    // much on purpose; the real master's scheduler never would.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _w = Worker::start(port, &["--cores", "1", "--memory", "1000"]);
    let (mut s, _) = listener.accept().unwrap();
    let hello = read_reply(&mut s).unwrap();
    assert!(hello.contains("\"type\":\"hello\""));
    s.write_all(&frame(
        r#"{"type":"welcome","proof":null,"keepalive_interval_s":10.0}"#,
    ))
    .unwrap();
    let cached = read_reply(&mut s).unwrap();
    assert!(cached.contains("\"type\":\"cached\""), "{cached}");
    let run = |id: u32, cores: u32| {
        frame(&format!(
            r#"{{"type":"run","task_id":{id},"attempt":1,"command":"sleep 2","allocation":{{"cores":{cores},"memory_mb":0,"disk_mb":0,"gpus":0}}}}"#
        ))
    };
    s.write_all(&run(1, 1)).unwrap();
    s.write_all(&run(2, 1)).unwrap();
    s.write_all(&run(3, 5)).unwrap();
    let mut rejected = Vec::new();
    for _ in 0..2 {
        let reply = read_reply(&mut s).unwrap();
        assert!(reply.contains("\"type\":\"rejected\""), "{reply}");
        assert!(reply.contains("refusing to overcommit"));
        rejected.push(reply);
    }
    assert!(rejected.iter().any(|r| r.contains("\"task_id\":2")));
    assert!(rejected.iter().any(|r| r.contains("\"task_id\":3")));
    let done = read_reply(&mut s).unwrap();
    assert!(
        done.contains("task_done") && done.contains("\"task_id\":1"),
        "{done}"
    );
}

#[test]
fn a_worker_exits_after_its_idle_timeout() {
    let m = manager();
    let w = Worker::start(m.port(), &["--idle-timeout", "1"]);
    let (code, _) = w.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

#[test]
fn drover_run_reports_failures_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_file(
        dir.path(),
        "tasks.txt",
        b"# comment\necho one\nexit 3\n{\"command\":\"echo two\",\"cores\":1}\n",
    );
    let out = std::process::Command::new(drover_bin())
        .current_dir(dir.path())
        .arg("run")
        .arg(&tasks)
        .args(["--cores", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 done, 1 failed, 3 tasks"), "{stderr}");
    // The failed task is named by its line in the file, not a submission index.
    assert!(stderr.contains("tasks.txt:3: exit 3"), "{stderr}");
    assert!(stderr.contains("drover-failed/line-3.log"), "{stderr}");
    let failed = dir.path().join("drover-failed");
    let log = std::fs::read_to_string(failed.join("line-3.log")).unwrap();
    assert!(log.contains("exit 3"), "{log}");
    let again = std::fs::read_to_string(failed.join("failed.txt")).unwrap();
    assert_eq!(again, "exit 3\n", "the failed line, ready to run again");

    let ok = write_file(dir.path(), "ok.txt", b"true\ntrue\n");
    let status = std::process::Command::new(drover_bin())
        .current_dir(dir.path())
        .args(["run"])
        .arg(&ok)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0));
    let bad = write_file(dir.path(), "bad.txt", b"{\"command\": 5}\n");
    let status = std::process::Command::new(drover_bin())
        .current_dir(dir.path())
        .args(["run"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&status.stderr).contains("bad.txt:1"));
}

#[test]
fn a_hung_worker_is_found_by_keepalive_and_its_tasks_move() {
    let m = drover_master::Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .keepalive(Duration::from_millis(200), Duration::from_millis(1500))
        .build()
        .unwrap();
    let hung = Worker::start(m.port(), &["--cores", "1"]);
    let id = m.submit(Task::new("sleep 1; echo finished")).unwrap();
    wait_until(&m, "the task to start", |s| s.tasks_running == 1);
    // SIGSTOP keeps the socket open: only the keepalive can tell the worker is gone.
    unsafe { libc::kill(hung.pid(), libc::SIGSTOP) };
    wait_until(&m, "the hung worker to be dropped", |s| {
        s.workers_connected == 0
    });
    let _healthy = Worker::start(m.port(), &["--cores", "1"]);
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.id, id);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(r.stdout, "finished\n");
    assert!(
        r.attempts[0].ending.contains("no byte for"),
        "{:?}",
        r.attempts
    );
    unsafe { libc::kill(hung.pid(), libc::SIGCONT) };
}

#[test]
fn a_worker_finds_its_master_again_after_a_restart() {
    let first = manager();
    let port = first.port();
    let w = Worker::start(port, &["--cores", "1"]);
    first.submit(Task::new("echo one")).unwrap();
    assert_eq!(collect(&first, 1)[0].stdout, "one\n");
    drop(first);
    let second = drover_master::Manager::builder()
        .port(port)
        .bind("127.0.0.1")
        .build()
        .unwrap();
    second.submit(Task::new("echo two")).unwrap();
    assert_eq!(collect(&second, 1)[0].stdout, "two\n");
    drop(w);
}

#[test]
fn shutdown_workers_makes_them_exit() {
    let mut m = manager();
    let w = Worker::start(m.port(), &["--cores", "1"]);
    wait_until(&m, "the worker", |s| s.workers_connected == 1);
    m.shutdown_workers();
    let (code, _) = w.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

/// Task directories are reused: nothing a task left in its sandbox or
/// printed may reach the next task that gets the same directory.
#[test]
fn a_reused_task_directory_carries_nothing_over() {
    let m = manager();
    // One core: every task runs in the directory the previous one left.
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let mut ids = Vec::new();
    for i in 0..9 {
        // Files and a read-only directory left behind; nothing left (the
        // slot is then cleaned without reading its sandbox); a file written
        // by a background child, which may still be running as the shell
        // exits.
        let leave = match i % 3 {
            0 => format!(
                "mkdir -p sub/deep && echo x > sub/deep/f && echo y > left{i} && chmod 500 sub"
            ),
            1 => "true".to_string(),
            _ => format!("(echo late > late{i}) &"),
        };
        ids.push(
            m.submit(Task::new(format!(
                "ls -A; echo task{i}; echo err{i} >&2; {leave}"
            )))
            .unwrap(),
        );
    }
    let mut results = collect(&m, 9);
    results.sort_by_key(|r| r.id);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(
            r.stdout,
            format!("task{i}\n"),
            "an empty sandbox and fresh stdout"
        );
        assert_eq!(r.stderr, format!("err{i}\n"));
    }
}

/// A worker killed with SIGKILL must not leave its tasks running: the
/// master runs them again elsewhere, and two copies at once would be a
/// duplicate run. (Needs the cgroup path: the worker's guard kills its
/// group; without cgroups there is nothing to assert, and the test says so.)
#[test]
fn a_killed_workers_tasks_do_not_outlive_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let w = Worker::start(m.port(), &["--cores", "2"]);
    let pids_dir = dir.path().display().to_string();
    for _ in 0..2 {
        // A child of the shell, so the tree (not just the root) is checked.
        m.submit(
            Task::new(format!(
                "sleep 300 & echo $! > {pids_dir}/$DROVER_TASK_ID.pid; wait"
            ))
            .cores(1),
        )
        .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pids = loop {
        let pids: Vec<i32> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if pids.len() == 2 {
            break pids;
        }
        assert!(std::time::Instant::now() < deadline, "tasks did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let in_cgroup = pids.iter().all(|p| {
        std::fs::read_to_string(format!("/proc/{p}/cgroup"))
            .is_ok_and(|c| c.contains("drover-monitor-"))
    });
    if !in_cgroup {
        common::skip("no cgroup delegation on this host: the guard is not in use");
        return;
    }
    unsafe { libc::kill(w.pid(), libc::SIGKILL) };
    let alive = |p: &i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pids.iter().any(alive) {
        assert!(
            std::time::Instant::now() < deadline,
            "a task of the killed worker is still running: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(w);
}

/// Issue 19: absurd requests are refused at submit with their name, not
/// left waiting for ever (or panicking a worker); a normal task still runs.
#[test]
fn absurd_requests_are_refused_at_submit_and_the_rest_runs() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let refused = |task: Task, what: &str| {
        let err = m.submit(task).expect_err("an absurd request is refused");
        assert!(err.to_string().contains(what), "{what}: {err}");
    };
    refused(Task::new("echo hi").cores(1_000_000_000), "cores");
    refused(Task::new("echo hi").memory_mb(u64::MAX), "memory");
    refused(Task::new("echo hi").disk_mb(u64::MAX), "disk");
    refused(Task::new("echo hi").gpus(u32::MAX), "gpus");
    refused(Task::new("echo hi").wall_time(Duration::MAX), "wall time");
    refused(Task::new("echo hi").wall_time(Duration::ZERO), "wall time");
    m.submit(Task::new("echo fine").cores(1)).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert!(m.is_empty(), "nothing refused was queued");
}

/// Issue 21: a task sent ahead to a full worker is not running until its
/// process starts there: the stats say one runs on a one-core worker, and
/// the result's `started` is when the process started, after the task
/// before it ended, not when it was sent.
#[test]
fn a_task_sent_ahead_is_not_running_and_started_is_its_process_start() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let declared = |cmd: &str| Task::new(cmd).cores(1).memory_mb(50).disk_mb(10);
    // Holds the worker until the test says go, then 1 s more.
    let hold = |name: &str| {
        let go = dir.path().join(name);
        let cmd = format!(
            "while [ ! -e {} ]; do sleep 0.05; done; sleep 1",
            go.display()
        );
        (go, cmd)
    };
    let (go1, first) = hold("go1");
    let (go2, second) = hold("go2");
    m.submit(declared(&first)).unwrap();
    wait_until(&m, "the first task to start", |s| s.tasks_running == 1);
    let second = m.submit(declared(&second)).unwrap();
    let rest = [
        m.submit(declared("true")).unwrap(),
        m.submit(declared("true")).unwrap(),
    ];
    // Tasks are sent ahead to a worker that frees: when the first ends the
    // second starts and one more is sent ahead to wait behind it.
    std::fs::write(&go1, b"").unwrap();
    wait_until(&m, "a task sent ahead", |s| s.tasks_sent_ahead >= 1);
    let s = m.stats();
    assert_eq!(
        (s.tasks_running, s.tasks_queued_on_workers),
        (1, 1),
        "one core, one running, one sent ahead: {s:?}"
    );
    std::fs::write(&go2, b"").unwrap();
    let results = collect(&m, 4);
    let started = |id| {
        results
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| r.started)
            .expect("every task started")
    };
    for id in rest {
        let gap = started(id)
            .duration_since(started(second))
            .expect("the rest started after the second");
        assert!(
            gap >= Duration::from_millis(950),
            "a process started only once the second (1 s after its go) ended, {gap:?} after it"
        );
    }
}
