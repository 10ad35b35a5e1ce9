//! End-to-end tests of monitored tasks: a real master, real `drover worker`
//! processes, and real process trees measured and limited by the worker's
//! monitor. Whether the monitor uses a cgroup or /proc depends on the host;
//! every assertion here holds for both.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use drover_master::{Outcome, Task, TaskResult};

/// A string that appears only in the command lines of one test's processes.
fn marker() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    // Digits only, so it can be a `sleep` argument.
    format!(
        "7{:03}{}",
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    )
}

/// A shell command that leaves two sleepers behind, one of them
/// double-forked so that its parent is gone, then runs `main`.
fn with_sleepers(mark: &str, main: &str) -> String {
    format!("sleep {mark}1 & (sleep {mark}2 &) ; {main}")
}

fn summary_field(r: &TaskResult, field: &str) -> f64 {
    r.measured
        .summary
        .as_ref()
        .and_then(|s| s.get(field))
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("no numeric {field:?} in the summary: {r:?}"))
}

#[test]
fn a_task_over_its_memory_allocation_is_killed_with_its_whole_tree() {
    let mark = marker();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "2", "--memory", "2000"]);
    let python =
        format!("python3 -c 'import time; b = b\"x\" * (300 << 20); time.sleep(300)' {mark}3");
    m.submit(Task::new(with_sleepers(&mark, &python)).memory_mb(100))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(
        r.outcome,
        Outcome::ResourceExhausted {
            resource: "memory".into()
        },
        "{r:?}"
    );
    assert!(r.measured.memory_mb > 100.0, "{:?}", r.measured);
    let error = r.error.as_deref().unwrap_or_default();
    assert!(error.contains("memory"), "error: {error:?}");
    let hit = r.measured.summary.as_ref().unwrap()["limits_exceeded"].clone();
    assert_eq!(hit["resource"], "memory", "{hit}");
    assert_eq!(hit["limit"], 100.0, "{hit}");
    assert_none_left(&mark);
}

#[test]
fn measured_memory_is_what_the_task_touched() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "2", "--memory", "2000"]);
    // The same interpreter with and without 200 MB: the difference is what
    // the task itself touched, whatever the interpreter's own footprint.
    let hold = "import time; b = b\"x\" * (N << 20); time.sleep(3)";
    let base = m
        .submit(Task::new(format!("python3 -c '{}'", hold.replace('N', "0"))).memory_mb(500))
        .unwrap();
    let big = m
        .submit(Task::new(format!("python3 -c '{}'", hold.replace('N', "200"))).memory_mb(500))
        .unwrap();
    let results = collect(&m, 2);
    let get = |id| results.iter().find(|r| r.id == id).unwrap();
    let (base, big) = (get(base), get(big));
    for r in [base, big] {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        // The master keeps the measurement with the result, and it is the
        // monitor's own number.
        assert_eq!(r.measured.memory_mb, summary_field(r, "memory"));
        assert!(r.measured.wall_time_s >= 3.0, "{:?}", r.measured);
        assert!(r.measured.cores >= 0.0 && r.measured.cores <= 2.5);
    }
    let touched = big.measured.memory_mb - base.measured.memory_mb;
    assert!(
        (touched - 200.0).abs() <= 10.0,
        "measured {touched:.1} MB for 200 MB touched (with {:.1}, without {:.1})",
        big.measured.memory_mb,
        base.measured.memory_mb
    );
}

#[test]
fn a_task_over_its_disk_allocation_is_killed() {
    let mark = marker();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1", "--disk", "1000"]);
    let writer = format!("head -c 60000000 /dev/zero > big && sleep {mark}3 && echo never");
    m.submit(Task::new(with_sleepers(&mark, &writer)).disk_mb(20))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(
        r.outcome,
        Outcome::ResourceExhausted {
            resource: "disk".into()
        },
        "{r:?}"
    );
    assert!(r.measured.disk_mb > 20.0, "{:?}", r.measured);
    assert!(!r.stdout.contains("never"));
    assert_none_left(&mark);
}

#[test]
fn a_task_within_its_allocation_runs_to_the_end_and_reports_its_disk() {
    let m = manager();
    let _w = Worker::start(
        m.port(),
        &["--cores", "1", "--memory", "1000", "--disk", "1000"],
    );
    m.submit(
        Task::new("head -c 30000000 /dev/zero > f && sleep 2 && echo done")
            .memory_mb(200)
            .disk_mb(100),
    )
    .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.stdout, "done\n");
    // 30,000,000 bytes is 28.6 MB.
    assert!(
        (r.measured.disk_mb - 28.6).abs() < 1.0,
        "disk {:?}",
        r.measured
    );
}

#[test]
fn a_one_millisecond_task_still_gets_wall_cpu_and_memory() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("exec /bin/true")).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    let ms = &r.measured;
    assert!(ms.wall_time_s > 0.0, "{ms:?}");
    assert!(ms.memory_mb > 0.0, "peak RSS from rusage: {ms:?}");
    assert!(ms.cpu_time_s >= 0.0 && ms.cpu_time_s < ms.wall_time_s + 1.0);
    assert_eq!(ms.cpu_time_s, summary_field(&r, "cpu_time"));
    assert_eq!(ms.wall_time_s, summary_field(&r, "wall_time"));
}

#[test]
fn a_command_that_does_not_exist_exits_127_and_is_measured() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new("no-such-command-anywhere-on-path --flag"))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.exit_code, Some(127));
    assert!(r.stderr.contains("not found"), "stderr: {}", r.stderr);
    assert!(r.measured.wall_time_s > 0.0 && r.measured.memory_mb > 0.0);
    let summary = r.measured.summary.as_ref().expect("summary");
    assert_eq!(summary["exit_status"], 127);
    assert_eq!(summary["exit_type"], "normal");
}

#[test]
fn cancel_kills_the_whole_tree_including_double_forked_children() {
    let mark = marker();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let id = m
        .submit(Task::new(with_sleepers(&mark, &format!("sleep {mark}3"))))
        .unwrap();
    // Three sleepers and the shell.
    wait_for_processes(&mark, 4);
    assert!(m.cancel(id));
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert!(r.measured.wall_time_s > 0.0);
    assert_none_left(&mark);
}

#[test]
fn a_task_that_ends_takes_its_background_children_with_it() {
    let mark = marker();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    // Its shell exits at once, leaving two sleepers (one double-forked,
    // so no longer its child) that would sleep for days.
    m.submit(Task::new(with_sleepers(&mark, "true"))).unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_none_left(&mark);
}

/// The task's process group and terminal, as `cut` prints them from its
/// shell's /proc entry: `pid pgrp tty_nr`.
const GROUP_AND_TTY: &str = "cut -d' ' -f1,5,7 /proc/$$/stat";

/// A task leads its own process group (what a kill of the task reaches)
/// and has no controlling terminal, whether its worker has one or not.
fn assert_own_group_and_no_tty(r: &TaskResult) {
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    let fields: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{:?}", r.stdout);
    assert_eq!(fields[0], fields[1], "leads its process group: {fields:?}");
    assert_eq!(fields[2], "0", "no controlling terminal: {fields:?}");
}

#[test]
fn a_task_leads_its_own_process_group_without_a_terminal() {
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(Task::new(GROUP_AND_TTY)).unwrap();
    assert_own_group_and_no_tty(&collect(&m, 1).remove(0));
}

/// A worker started from a terminal (here a pseudo-terminal that is its
/// controlling terminal) still gives its tasks none: a task reading it from
/// a background process group would be stopped.
#[test]
fn a_task_of_a_worker_with_a_terminal_does_not_get_it() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::process::CommandExt;
    // SAFETY: plain calls on a descriptor we own; ptsname's buffer is
    // copied out before anything else calls it.
    let (master, terminal) = unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master))
            .to_string_lossy()
            .into_owned();
        (std::os::fd::OwnedFd::from_raw_fd(master), name)
    };
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&terminal)
        .expect("open the pseudo-terminal");
    let m = manager();
    let workdir = tempfile::tempdir().unwrap();
    let tty = terminal.as_raw_fd();
    let mut cmd = Command::new(drover_bin());
    cmd.arg("worker")
        .arg(format!("127.0.0.1:{}", m.port()))
        .arg("--workdir")
        .arg(workdir.path())
        .args(["--cores", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid and ioctl are async-signal-safe; `tty` stays open in
    // the child until its exec (close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(tty, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut worker = cmd.spawn().expect("start a worker on a terminal");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", worker.id())).unwrap();
    let worker_tty = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(4);
    assert_ne!(worker_tty, Some("0"), "the worker has a terminal: {stat}");
    m.submit(Task::new(GROUP_AND_TTY)).unwrap();
    let r = collect(&m, 1).remove(0);
    let _ = worker.kill();
    let _ = worker.wait();
    drop((master, terminal));
    assert_own_group_and_no_tty(&r);
}

#[test]
fn a_task_past_its_wall_time_is_killed_with_its_tree() {
    let mark = marker();
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    m.submit(
        Task::new(with_sleepers(&mark, &format!("sleep {mark}3")))
            .wall_time(Duration::from_millis(500)),
    )
    .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(r.outcome, Outcome::WallTimeExceeded, "{r:?}");
    assert_none_left(&mark);
}

#[test]
fn one_poller_watches_all_of_a_workers_tasks() {
    let mark = marker();
    let m = manager();
    let w = Worker::start(m.port(), &["--cores", "4"]);
    let ids: Vec<_> = (0..4)
        .map(|_| {
            // Every resource declared: a category's first task with
            // something left to learn runs alone on a whole worker.
            let task = Task::new(format!("sleep {mark}"))
                .cores(1)
                .memory_mb(50)
                .disk_mb(10);
            m.submit(task).unwrap()
        })
        .collect();
    // Each task is its sleep alone: a plain command is exec'd without a
    // shell (through `sh -c` there would be eight processes).
    wait_for_processes(&mark, 4);
    assert_eq!(
        live_processes_with(&mark).len(),
        4,
        "{:?}",
        live_processes_with(&mark)
    );
    let threads = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim() == "drover-monitor")
                .unwrap_or(false)
        })
        .count();
    assert_eq!(threads, 1, "sampler threads while 4 tasks run");
    for id in ids {
        assert!(m.cancel(id));
    }
    let results = collect(&m, 4);
    assert!(results.iter().all(|r| r.outcome == Outcome::Cancelled));
    assert_none_left(&mark);
}

/// A task OOM-killed under a memory cap that drover did not set (as a
/// batch system's job cgroup would) comes back as memory exhaustion, with
/// the monitor's evidence as its error, not as a plain failure. The task
/// caps itself, in its own cgroup v2 group when that has the memory
/// controller, else in a v1 memory group of its own; where neither can be
/// written the test says so and does not run.
#[test]
fn a_task_oom_killed_under_an_outside_cap_comes_back_as_memory_exhaustion() {
    let mark = marker();
    let v1_group = format!("drover-e2e-oom-{mark}");
    let script = format!(
        r#"mounts() {{ awk '{{for (i = 1; i <= NF; i++) if ($i == "-") print $(i+1), $5, $(i+3)}}' /proc/self/mountinfo; }}
own=$(sed -n 's/^0:://p' /proc/self/cgroup)
v2=$(mounts | awk '$1 == "cgroup2" {{print $2; exit}}')
if [ -n "$v2" ] && [ -w "$v2$own/memory.max" ]; then
  echo 100M > "$v2$own/memory.max" || exit 99
else
  v1=$(mounts | awk '$1 == "cgroup" && $3 ~ /(^|,)memory(,|$)/ {{print $2; exit}}')
  [ -n "$v1" ] || exit 99
  d="$v1/{v1_group}"
  mkdir -p "$d" && echo 100M > "$d/memory.limit_in_bytes" && echo $$ > "$d/cgroup.procs" || exit 99
  echo "$d" > v1_group
fi
exec python3 -c 'b = b"x" * (400 << 20)' {mark}"#
    );
    let m = manager();
    let _w = Worker::start(m.port(), &["--cores", "2", "--memory", "2000"]);
    m.submit(Task::new(script).cores(1)).unwrap();
    let r = collect(&m, 1).remove(0);
    let v1_dir = live_v1_group(&v1_group);
    if r.exit_code == Some(99) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: a_task_oom_killed_under_an_outside_cap_comes_back_as_memory_exhaustion: \
             no writable memory cgroup (v2 memory.max or v1 memory hierarchy) here"
        );
        return;
    }
    if let Some(d) = v1_dir {
        let _ = std::fs::remove_dir(d);
    }
    assert_eq!(
        r.outcome,
        Outcome::ResourceExhausted {
            resource: "memory".into()
        },
        "{r:?}"
    );
    let error = r.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("ran out of memory: "), "error: {error:?}");
    let oom = r.measured.summary.as_ref().unwrap()["memory_exhausted"].clone();
    assert!(
        oom["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("oom_kill")),
        "{oom}"
    );
    assert_eq!(
        r.measured.summary.as_ref().unwrap()["limits_exceeded"],
        serde_json::Value::Null
    );
    assert_none_left(&mark);
}

/// The v1 memory group named `name`, if one exists (made by a task).
fn live_v1_group(name: &str) -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next()? != "cgroup" || !r.nth(1)?.split(',').any(|o| o == "memory") {
            return None;
        }
        let dir = std::path::Path::new(left.split_whitespace().nth(4)?).join(name);
        dir.exists().then_some(dir)
    })
}

/// `drover monitor`, the command-line face of the worker's monitor.
fn monitor_cmd() -> Command {
    let mut cmd = Command::new(drover_bin());
    cmd.arg("monitor");
    cmd
}

#[test]
fn cli_exit_status_summary_and_series() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let series = dir.path().join("series.jsonl");
    let st = monitor_cmd()
        .args(["--interval", "50", "--summary"])
        .arg(&summary)
        .arg("--series")
        .arg(&series)
        .args(["--", "sh", "-c", "sleep 0.5; exit 7"])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["exit_status"], 7);
    assert_eq!(v["exit_type"], "normal");
    assert_eq!(v["units"]["memory"], "MB");
    let s: drover_monitor::Summary = serde_json::from_value(v).unwrap();
    assert!(s.wall_time >= 0.5);
    let lines = std::fs::read_to_string(&series).unwrap();
    let n = lines.lines().count();
    assert!(n >= 2, "series has {n} lines");
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["memory"].is_number() && v["wall_time"].is_number());
    }

    let out = monitor_cmd()
        .args([
            "--limit",
            "wall_time=0.5",
            "--interval",
            "50",
            "--",
            "sleep",
            "30",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(drover_monitor::LIMIT_EXIT_STATUS));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["limits_exceeded"]["resource"], "wall_time");

    let st = monitor_cmd()
        .args(["--", "/nonexistent/cmd"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(127));

    let st = monitor_cmd()
        .args(["--limit", "bogus=1", "--", "true"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "clap usage error");
}

/// `drover monitor` says on stderr what it killed a task for and what the
/// task used, and its summary has no float noise (three decimals at most).
#[test]
fn cli_says_why_it_killed_and_prints_rounded_numbers() {
    let out = monitor_cmd()
        .args(["--limit", "memory=100", "--interval", "50", "--"])
        .args([
            "python3",
            "-c",
            "import time; b = b'x' * (300 << 20); time.sleep(5)",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(drover_monitor::LIMIT_EXIT_STATUS));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("killed for going over its memory limit: ")
            && stderr.contains(" MB used, 100 MB allowed"),
        "{stderr}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (field, value) in v.as_object().unwrap() {
        if let Some(x) = value.as_f64() {
            let decimals = value
                .to_string()
                .split_once('.')
                .map_or(0, |(_, d)| d.len());
            assert!(decimals <= 3, "{field}: {x} in {text}");
        }
    }
}
