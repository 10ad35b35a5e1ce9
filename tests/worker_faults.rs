//! The worker when things go wrong around it: transfers that fail half way,
//! what dead workers left in its workdir, a disk too small for an input or
//! a task's output, absurd values from a master, and masters that cannot
//! be reached or do not speak the protocol. Real `drover worker` processes
//! against a real master, or against a plain TCP listener in the test that
//! plays a (bad) master on purpose.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use drover_master::{Outcome, Task};

/// `json` as a frame: its length (u32, big-endian), then its bytes.
fn frame(json: &str) -> Vec<u8> {
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// The next frame's text, or None when the connection ended or stayed
/// silent for 30 s.
fn read_frame(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// Accepts the worker's next connection and plays the master's side of the
/// handshake (no password), welcoming it with `keepalive_interval_s`
/// (JSON text, so a test can send what no real master would).
fn accept_worker(listener: &TcpListener, keepalive: &str) -> TcpStream {
    let (mut s, _) = listener.accept().expect("the worker connects");
    let hello = read_frame(&mut s).expect("a hello");
    assert!(hello.contains("\"type\":\"hello\""), "{hello}");
    s.write_all(&frame(&format!(
        r#"{{"type":"welcome","proof":null,"keepalive_interval_s":{keepalive}}}"#
    )))
    .unwrap();
    let cached = read_frame(&mut s).expect("the cache list");
    assert!(cached.contains("\"type\":\"cached\""), "{cached}");
    s
}

/// Frames from the worker until one contains `want` (pongs and the like
/// are skipped); panics if the connection ends first.
fn read_until(s: &mut TcpStream, want: &str) -> String {
    loop {
        let f = read_frame(s).unwrap_or_else(|| panic!("connection ended before {want:?}"));
        if f.contains(want) {
            return f;
        }
    }
}

/// The names in `dir` that start with `prefix`.
fn names_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (generously) for `cond`, panicking with `what` after a minute.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ZERO_HASH: &str = "b3-0000000000000000000000000000000000000000000000000000000000000000";

/// A transfer cut off half way, and one whose content does not match its
/// name, leave no part file in the cache; one a dead worker left there is
/// removed when the next worker starts.
#[test]
fn failed_transfers_leave_no_part_files() {
    let workdir = tempfile::tempdir().unwrap();
    let cache = workdir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // Pid 2^30 is past the kernel's maximum: its worker is surely dead.
    let stale = cache.join(format!(".part-{}-{ZERO_HASH}", 1 << 30));
    std::fs::write(&stale, b"half a file").unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _w = Worker::start_in(port, &["--cores", "1"], workdir);
    let mut s = accept_worker(&listener, "5.0");
    assert!(
        !stale.exists(),
        "a dead worker's part file is removed at start"
    );

    // Content that does not match its name: refused, nothing kept.
    let body = vec![7u8; 100_000];
    s.write_all(&frame(&format!(
        r#"{{"type":"put_file","id":"{ZERO_HASH}","size":{},"cache":true}}"#,
        body.len()
    )))
    .unwrap();
    s.write_all(&body).unwrap();
    s.write_all(&frame(r#"{"type":"ping"}"#)).unwrap();
    // Either answer proves the file was dealt with: a pong, or the end of
    // the connection and a new one.
    if read_frame(&mut s).is_none() {
        s = accept_worker(&listener, "5.0");
    }
    assert_eq!(names_starting(&cache, ".part-"), Vec::<String>::new());
    assert!(!cache.join(ZERO_HASH).exists());

    // Cut off after 1 MB of 8: the worker reconnects, and nothing is left.
    s.write_all(&frame(&format!(
        r#"{{"type":"put_file","id":"{ZERO_HASH}","size":{},"cache":true}}"#,
        8 << 20
    )))
    .unwrap();
    s.write_all(&vec![1u8; 1 << 20]).unwrap();
    drop(s);
    let _again = accept_worker(&listener, "5.0");
    assert_eq!(names_starting(&cache, ".part-"), Vec::<String>::new());
}

/// Where the monitor of the worker with `pid` (started by this test
/// process, so in its cgroup) keeps its task groups, on a cgroup2 host.
fn monitor_cgroup(pid: i32) -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split(' ').nth(4))?
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = std::path::PathBuf::from(mount);
    dir.push(own.trim_start_matches('/'));
    Some(dir.join(format!("drover-monitor-{pid}")))
}

/// A worker SIGKILLed mid-task cannot clean up; the next worker on the
/// same workdir removes its directory (and leaves a live one's alone).
#[test]
fn a_killed_workers_directory_is_removed_by_the_next_worker() {
    let m = manager();
    let mut first = Worker::start(m.port(), &["--cores", "1"]);
    let live = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("sleep 300").cores(1)).unwrap();
    m.submit(Task::new("sleep 300").cores(1)).unwrap();
    wait_until(&m, "both tasks running", |s| s.tasks_running == 2);
    let workdir = std::mem::replace(&mut first.workdir, tempfile::tempdir().unwrap());
    let dead_dir = workdir.path().join(format!("w{}", first.pid()));
    assert!(dead_dir.join("tasks").exists());
    let dead_group = monitor_cgroup(first.pid()).filter(|g| g.exists());
    unsafe { libc::kill(first.pid(), libc::SIGKILL) };
    let _ = first.child.wait();
    assert!(dead_dir.exists(), "SIGKILL leaves it behind");

    // A live worker's directory in the same workdir (linked in) stays.
    let live_dir = live.workdir.path().join(format!("w{}", live.pid()));
    let live_link = workdir.path().join(format!("w{}", live.pid()));
    std::os::unix::fs::symlink(&live_dir, &live_link).unwrap();

    let next = Worker::start_in(m.port(), &["--cores", "1"], workdir);
    let own = next.workdir.path().join(format!("w{}", next.pid()));
    eventually("the new worker's own directory", || own.exists());
    eventually("the dead worker's directory to go", || !dead_dir.exists());
    assert!(
        live_dir.exists() && live_link.exists(),
        "a live worker's stays"
    );
    if let Some(group) = dead_group {
        eventually("the dead worker's cgroup to go", || !group.exists());
    }
}

/// What a bad master does to each connection.
type BadMaster = fn(TcpStream);

/// Plays a bad master on `listener` for every connection: `how` is done to
/// each accepted stream in turn. Returns how many connections it saw once
/// `stop` is set.
fn bad_master(
    listener: TcpListener,
    how: BadMaster,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&seen);
    let handle = std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || how(s));
        }
    });
    (seen, handle)
}

/// A master that closes at once, one that sends garbage, and one that
/// accepts and never speaks: the worker retries each with backoff, says
/// why at the default log level, and gives up at its idle timeout with a
/// non-zero exit and the reason.
#[test]
fn a_bad_master_is_retried_until_the_idle_timeout() {
    let cases: [(&str, BadMaster, &str); 3] = [
        ("closes", drop, "closed the connection during the handshake"),
        (
            "garbage",
            |mut s| {
                let _ = s.write_all(&frame("this is not json"));
                std::thread::sleep(Duration::from_secs(1));
            },
            "handshake with the master failed",
        ),
        (
            "silent",
            |s| {
                std::thread::sleep(Duration::from_secs(60));
                drop(s);
            },
            "did not finish the handshake within",
        ),
    ];
    for (name, how, why) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, _) = bad_master(listener, how);
        let w = Worker::start(port, &["--idle-timeout", "3"]);
        let (code, stderr) = w.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("no master reached within the idle timeout"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(why), "{name}: {stderr}");
        if name != "silent" {
            // (A silent master holds each attempt for the handshake
            // deadline, past the idle timeout: one attempt, no retry.)
            assert!(
                stderr.contains("WARN") && stderr.contains("retrying in"),
                "{name}: {stderr}"
            );
            // 3 s of backoff from 1 s: at least a second attempt.
            assert!(
                seen.load(std::sync::atomic::Ordering::SeqCst) >= 2,
                "{name}: {stderr}"
            );
        }
    }
}

/// A worker started before its master waits for it, and serves it once it
/// is up; a master's address without a port is refused at start.
#[test]
fn a_worker_started_first_serves_its_master_once_it_is_up() {
    // A free port, closed again for the master to take.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _w = Worker::start(port, &["--cores", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    let m = drover_master::Manager::builder()
        .port(port)
        .bind("127.0.0.1")
        .build()
        .expect("the master takes the port");
    m.submit(Task::new("echo late master")).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.stdout, "late master\n", "{r:?}");

    let out = std::process::Command::new(drover_bin())
        .args(["worker", "localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no port"));
}

/// An input larger than a worker's declared disk is refused by that worker
/// without writing a byte (no part file, nothing cached), the task goes to
/// a worker that can take it, and the refusing worker still runs what fits.
#[test]
fn an_input_too_big_for_a_worker_goes_elsewhere_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let big = write_file(dir.path(), "big.bin", &vec![3u8; 40 << 20]);
    let m = manager();
    let small = Worker::start(m.port(), &["--cores", "1", "--disk", "25"]);
    m.submit(Task::new("wc -c < big.bin").input_file(&big, "big.bin", true))
        .unwrap();
    wait_until(&m, "the small worker to refuse the input", |s| {
        s.workers_blocked >= 1
    });
    let cache = small.workdir.path().join("cache");
    let stored = || names_starting(&cache, "");
    assert_eq!(stored(), Vec::<String>::new(), "nothing written");

    let large = Worker::start(m.port(), &["--cores", "1"]);
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.stdout.trim(), (40u64 << 20).to_string());
    drop(large);

    // The refusal left no state behind: the small worker runs what fits.
    m.submit(Task::new("echo still here")).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.stdout, "still here\n");
    assert_eq!(stored(), Vec::<String>::new());
}

/// A task's stdout is on the worker's disk, so it counts against the
/// task's disk limit: endless output under a small limit ends as disk
/// exhaustion, not as a full disk.
#[test]
fn stdout_counts_against_a_tasks_disk() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(
        Task::new("while :; do head -c 1000000 /dev/zero; done")
            .cores(1)
            .disk_mb(20)
            .max_retries(0)
            // Only so that, were stdout not counted, the test ends.
            .wall_time(Duration::from_secs(120)),
    )
    .unwrap();
    let r = collect(&m, 1).remove(0);
    let disk = matches!(&r.outcome, Outcome::ResourceExhausted { resource } if resource == "disk");
    assert!(disk, "{r:?}");
}

/// A master's absurd numbers refuse the message they came in, with a
/// reason, and cost the worker nothing: a wall time of 1e300 s or -1 s is
/// a rejected task (no panic, no core held), and a keepalive interval of
/// 1e300 s an unusable welcome, after which the worker connects again.
#[test]
fn absurd_numbers_from_a_master_are_refused_not_obeyed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _w = Worker::start(port, &["--cores", "1"]);
    let first = accept_worker(&listener, "1e300");
    // The worker drops that master and tries again.
    let mut s = accept_worker(&listener, "5.0");
    drop(first);
    let run = |id: u32, wall: &str| {
        frame(&format!(
            r#"{{"type":"run","task_id":{id},"attempt":1,"command":"true","wall_time_s":{wall},"allocation":{{"cores":1,"memory_mb":0,"disk_mb":0,"gpus":0}}}}"#
        ))
    };
    for (id, wall) in [(1, "1e300"), (2, "-1")] {
        s.write_all(&run(id, wall)).unwrap();
        let reply = read_until(&mut s, "rejected");
        assert!(
            reply.contains(&format!("\"task_id\":{id}")) && reply.contains("wall time"),
            "{reply}"
        );
    }
    // The one core is free: a sane task runs.
    s.write_all(&run(3, "60")).unwrap();
    let done = read_until(&mut s, "task_done");
    assert!(done.contains("\"task_id\":3"), "{done}");
}

/// A worker tells its master what disk it really has free, at most what
/// it declared, with its keepalive answers.
#[test]
fn a_worker_reports_its_free_disk() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _w = Worker::start(port, &["--cores", "1", "--disk", "30"]);
    let mut s = accept_worker(&listener, "5.0");
    s.write_all(&frame(r#"{"type":"ping"}"#)).unwrap();
    let report = read_until(&mut s, "disk_free");
    assert!(report.contains("\"free_mb\":30"), "{report}");
}
