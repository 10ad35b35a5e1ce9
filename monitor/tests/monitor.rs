//! Real-process tests of the monitor, on both measurement paths (`Method::Auto`
//! is cgroup2 when the host allows, /proc otherwise; `Method::Proc` forces
//! /proc). Assertions allow for a loaded 2-core machine: no tight timing.

use drover_monitor::{Exit, Limits, Method, Monitor, MonitorOptions, Report};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const METHODS: [Method; 2] = [Method::Auto, Method::Proc];

/// The C workload (tests/helpers/tree.c), compiled once per test run.
fn helper() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/tree.c");
        let out =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tree-{}", std::process::id()));
        let st = Command::new("cc")
            .args(["-O2", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("cc must be installed to build the test helper");
        assert!(st.success(), "compiling {}", src.display());
        out
    })
}

fn monitor(method: Method) -> Monitor {
    Monitor::with_options(MonitorOptions {
        interval: Duration::from_millis(100),
        method,
    })
}

fn tree_cmd(
    nprocs: u32,
    mem_mb: u64,
    disk: Option<&Path>,
    disk_mb: i64,
    hold_ms: i64,
    pidfile: &Path,
) -> Command {
    let mut c = Command::new(helper());
    c.arg(nprocs.to_string())
        .arg(mem_mb.to_string())
        .arg(disk.map_or_else(|| "-".into(), |d| d.display().to_string()))
        .arg(disk_mb.to_string())
        .arg(hold_ms.to_string())
        .arg(pidfile);
    c
}

fn pids(pidfile: &Path) -> Vec<i32> {
    std::fs::read_to_string(pidfile)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether `pid` is still a live (non-zombie) instance of the helper.
fn helper_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let helper = helper().as_os_str().as_encoded_bytes();
    cmdline.windows(helper.len()).any(|w| w == helper)
}

fn assert_all_dead(pidfile: &Path, expected: usize, what: &str) {
    let p = pids(pidfile);
    assert!(
        p.len() >= expected,
        "{what}: only {} of {expected} pids recorded",
        p.len()
    );
    let alive: Vec<i32> = p.iter().copied().filter(|&p| helper_alive(p)).collect();
    assert!(alive.is_empty(), "{what}: survivors {alive:?}");
}

/// Waits until `pidfile` lists `n` pids, so a test does not kill the tree
/// before it has been built.
fn wait_for_pids(pidfile: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids(pidfile).len() < n {
        assert!(Instant::now() < deadline, "helper never started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn peak_memory_of_forked_and_double_forked_tree_within_5_percent() {
    const N: f64 = 256.0;
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let m = monitor(method);
        let w = m
            .spawn(
                tree_cmd(4, N as u64, None, 0, 2000, &pidfile),
                None,
                Limits::default(),
            )
            .unwrap();
        let r = w.wait().unwrap();
        let s = &r.summary;
        eprintln!("{method:?}: {s:?}");
        assert_eq!(r.exit, Exit::Code(0));
        assert!(
            (s.memory - N).abs() / N < 0.05,
            "{method:?}: memory {} vs {N}",
            s.memory
        );
        assert!(s.virtual_memory >= s.memory);
        // The root, four workers (one orphaned by its double-forking parent).
        assert!(s.max_concurrent_processes >= 5, "{s:?}");
        assert!(s.total_processes >= 5, "{s:?}");
        assert!(s.wall_time >= 2.0 && s.cpu_time > 0.0, "{s:?}");
        assert!(s.samples >= 2);
        if method == Method::Proc {
            assert_eq!(s.monitor_method, "proc");
        } else {
            assert!(s.monitor_method.starts_with("cgroup2") || s.monitor_method == "proc");
        }
        assert_all_dead(&pidfile, 5, "finished tree");
    }
}

#[test]
fn two_busy_threads_use_two_cores() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let m = monitor(method);
        let mut cmd = Command::new(helper());
        cmd.args(["busy", "2", "3"]).stdout(Stdio::null());
        let t0 = Instant::now();
        let r = m
            .spawn(cmd, Some(dir.path()), Limits::default())
            .unwrap()
            .wait()
            .unwrap();
        let wall = t0.elapsed().as_secs_f64();
        let s = &r.summary;
        eprintln!("{method:?}: {s:?}");
        assert_eq!(r.exit, Exit::Code(0));
        // What the machine actually gave the threads, as the test saw it.
        let got = s.cpu_time / wall;
        // Each thread spins until it has had 3 s of CPU, however loaded
        // the machine is: all 6 s are the task's.
        assert!(s.cpu_time > 5.7, "{s:?}");
        assert!(
            (s.cores_avg - got).abs() < 0.25,
            "{method:?}: cores_avg {} vs {got}",
            s.cores_avg
        );
        assert!(
            s.cores >= s.cores_avg && s.cores <= 2.3,
            "{method:?}: cores {}",
            s.cores
        );
        if got > 1.8 {
            assert!(
                s.cores > 1.7,
                "{method:?}: an idle machine gives 2 cores, measured {}",
                s.cores
            );
        }
    }
}

#[test]
fn disk_writer_reports_disk_files_and_bytes_written() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let pidfile = dir.path().join("pids");
        let m = monitor(method);
        // Two workers write 10 MB each.
        let cmd = tree_cmd(2, 0, Some(&sandbox), 10, 300, &pidfile);
        let r = m
            .spawn(cmd, Some(&sandbox), Limits::default())
            .unwrap()
            .wait()
            .unwrap();
        let s = &r.summary;
        eprintln!("{method:?}: {s:?}");
        assert_eq!(r.exit, Exit::Code(0));
        assert!((s.disk - 20.0).abs() < 0.01, "{method:?}: disk {}", s.disk);
        assert_eq!(s.total_files, 2);
        assert!(
            s.bytes_written >= 20.0 && s.bytes_written < 21.0,
            "{method:?}: written {}",
            s.bytes_written
        );
    }
}

fn check_limit_kill(
    r: &Report,
    resource: &str,
    limit: f64,
    pidfile: &Path,
    expected_pids: usize,
    method: Method,
) {
    let s = &r.summary;
    eprintln!("{method:?}: {s:?}");
    assert_eq!(r.exit, Exit::Signal(libc::SIGKILL), "{method:?}");
    assert_eq!(s.exit_type, "limits");
    let ex = s.limits_exceeded.as_ref().expect("limits_exceeded");
    assert_eq!(ex.resource, resource);
    assert_eq!(ex.limit, limit);
    assert!(ex.value > limit, "{ex:?}");
    assert_all_dead(pidfile, expected_pids, resource);
}

#[test]
fn memory_limit_kills_whole_tree() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let m = monitor(method);
        // 4 × 100 MB held forever against a 200 MB limit.
        let limits = Limits {
            memory_mb: Some(200),
            ..Limits::default()
        };
        let r = m
            .spawn(tree_cmd(4, 400, None, 0, -1, &pidfile), None, limits)
            .unwrap()
            .wait()
            .unwrap();
        check_limit_kill(&r, "memory", 200.0, &pidfile, 5, method);
        assert!(r.summary.memory > 200.0);
    }
}

#[test]
fn disk_limit_kills_whole_tree() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let m = monitor(method);
        let limits = Limits {
            disk_mb: Some(10),
            ..Limits::default()
        };
        // Three workers writing without end.
        let cmd = tree_cmd(3, 0, Some(dir.path()), -1, -1, &pidfile);
        let r = m
            .spawn(cmd, Some(dir.path()), limits)
            .unwrap()
            .wait()
            .unwrap();
        check_limit_kill(&r, "disk", 10.0, &pidfile, 4, method);
    }
}

#[test]
fn wall_time_limit_kills_whole_tree() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let m = monitor(method);
        let limits = Limits {
            wall_time: Some(Duration::from_millis(1500)),
            ..Limits::default()
        };
        let r = m
            .spawn(tree_cmd(3, 8, None, 0, -1, &pidfile), None, limits)
            .unwrap()
            .wait()
            .unwrap();
        check_limit_kill(&r, "wall_time", 1.5, &pidfile, 4, method);
        assert!(r.summary.wall_time >= 1.5);
    }
}

#[test]
fn kill_cancels_tree_and_drop_cleans_up() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let m = monitor(method);
        let pidfile = dir.path().join("pids");
        let w = m
            .spawn(
                tree_cmd(3, 4, None, 0, -1, &pidfile),
                None,
                Limits::default(),
            )
            .unwrap();
        wait_for_pids(&pidfile, 4);
        w.kill();
        w.kill();
        let r = w.wait().unwrap();
        assert_eq!(r.exit, Exit::Signal(libc::SIGKILL));
        assert_eq!(r.summary.exit_type, "signal");
        assert!(r.summary.limits_exceeded.is_none());
        assert_all_dead(&pidfile, 4, "cancelled");

        let pidfile = dir.path().join("pids2");
        let w = m
            .spawn(
                tree_cmd(3, 4, None, 0, -1, &pidfile),
                None,
                Limits::default(),
            )
            .unwrap();
        wait_for_pids(&pidfile, 4);
        drop(w);
        assert_all_dead(&pidfile, 4, "dropped");
    }
}

/// A task's root that exits leaves nothing running: what it started in
/// the background (a child, and a grandchild whose parent is gone) is
/// killed before the report, on the worker's own path (`spawn_exec`).
#[test]
fn background_children_die_when_the_task_ends() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let m = monitor(method);
        let pidfile = dir.path().join("pids");
        let script = format!(
            "{h} 1 1 - 0 -1 {p}.a & ({h} 1 1 - 0 -1 {p}.b &); \
             while [ ! -s {p}.a ] || [ ! -s {p}.b ]; do sleep 0.01; done; \
             cat {p}.a {p}.b > {p}",
            h = helper().display(),
            p = pidfile.display()
        );
        let r = m
            .spawn_exec(
                drover_monitor::Exec::shell(&script),
                None,
                Limits::default(),
            )
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(r.exit, Exit::Code(0), "{method:?}");
        assert_all_dead(&pidfile, 2, "left behind by a finished task");
    }
}

/// Files given as `disk_files` count against the disk as if in the
/// sandbox, and the report says whether the sandbox was left empty, when
/// the monitor can know it (a task group with no process left; not /proc).
#[test]
fn disk_files_count_and_an_empty_sandbox_is_reported() {
    for method in METHODS {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let outside = dir.path().join("out.log");
        std::fs::write(&outside, vec![b'x'; 3000]).unwrap();
        let m = monitor(method);
        let run = |command: &str| {
            let mut exec = drover_monitor::Exec::shell(command);
            exec.current_dir(&sandbox);
            let opts = drover_monitor::SpawnOptions {
                disk_files: vec![std::fs::File::open(&outside).unwrap()],
                ..Default::default()
            };
            m.spawn_exec_with(exec, Some(&sandbox), Limits::default(), opts)
                .unwrap()
                .wait()
                .unwrap()
        };
        let known = |r: &Report, empty: bool| {
            if r.summary.monitor_method == "proc" {
                assert_eq!(r.sandbox_empty, None, "{method:?}");
            } else {
                assert_eq!(r.sandbox_empty, Some(empty), "{method:?}");
            }
        };

        let r = run("true");
        assert_eq!(r.summary.total_files, 1, "{method:?}: {:?}", r.summary);
        assert!(
            (r.summary.disk - 3000.0 / MB).abs() < 0.002,
            "{:?}",
            r.summary
        );
        known(&r, true);

        let r = run("head -c 2000 /dev/zero > f");
        assert_eq!(r.summary.total_files, 2, "{method:?}: {:?}", r.summary);
        assert!(
            (r.summary.disk - 5000.0 / MB).abs() < 0.002,
            "{:?}",
            r.summary
        );
        known(&r, false);
    }
}

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn missing_command_is_an_error() {
    for method in METHODS {
        let m = monitor(method);
        let e = m
            .spawn(
                Command::new("/nonexistent/drover-test-cmd"),
                None,
                Limits::default(),
            )
            .err()
            .expect("spawn must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}

#[test]
fn millisecond_task_gets_wall_cpu_and_rss() {
    for method in METHODS {
        // A long interval: the task is over long before the first periodic
        // sample, so everything comes from the final sample and rusage.
        let m = Monitor::with_options(MonitorOptions {
            interval: Duration::from_secs(30),
            method,
        });
        let mut w = m
            .spawn(Command::new("true"), None, Limits::default())
            .unwrap();
        let t0 = Instant::now();
        let r = loop {
            if let Some(r) = w.try_finish().unwrap() {
                break r;
            }
            let mut p = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&w.pidfd()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 10_000) };
        };
        let s = &r.summary;
        eprintln!("{method:?}: {s:?}");
        assert_eq!(r.exit, Exit::Code(0));
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "exit must be event-driven"
        );
        assert!(s.wall_time > 0.0 && s.wall_time < 5.0);
        assert!(s.cpu_time >= 0.0);
        assert!(s.memory > 0.1, "rss from rusage: {}", s.memory);
        assert!(w.try_finish().is_err(), "second finish is an error");
    }
}

#[test]
fn many_short_tasks_are_reaped_without_waiting_for_samples() {
    let m = Monitor::new(Duration::from_secs(5));
    let t0 = Instant::now();
    let watched: Vec<_> = (0..50)
        .map(|i| {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("exit {}", i % 7));
            m.spawn(c, None, Limits::default()).unwrap()
        })
        .collect();
    for (i, w) in watched.into_iter().enumerate() {
        let r = w.wait().unwrap();
        assert_eq!(r.exit, Exit::Code((i % 7) as i32));
    }
    // 50 tasks bound to a 5 s interval would take minutes.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

/// `Exec` starts the child without fork: its arguments, environment,
/// working directory, descriptors, session and signal dispositions must be
/// what a `Command` would have given it.
#[test]
fn exec_starts_what_a_command_would() {
    for method in METHODS {
        let m = monitor(method);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut e = drover_monitor::Exec::new("sh");
        e.arg("-c")
            .arg(
                "echo \"$1 $DROVER_X $(pwd)\"; cut -d' ' -f5,7 /proc/$$/stat; \
                 yes | head -n 1 >/dev/null; echo pipe=$?; echo err >&2; \
                 cat; exit 3",
            )
            .arg("argv0")
            .arg("first");
        e.env("DROVER_X", "x-value").current_dir(dir.path());
        e.stdin(std::fs::File::open("/dev/null").unwrap());
        e.stdout(std::fs::File::create(&out).unwrap());
        e.stderr(std::fs::File::create(dir.path().join("err")).unwrap());
        let w = m
            .spawn_exec(e, Some(dir.path()), Limits::default())
            .unwrap();
        let pid = w.pid();
        let r = w.wait().unwrap();
        assert_eq!(r.exit, Exit::Code(3), "{method:?}");
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(
            lines.next().unwrap(),
            format!("first x-value {}", real.display()),
            "{method:?}"
        );
        // Its own process group (a session too, when it needs one: no
        // cgroup, or a controlling terminal here), and no controlling
        // terminal either way.
        assert_eq!(
            lines.next().unwrap().trim(),
            format!("{pid} 0"),
            "{method:?}"
        );
        // SIGPIPE back to default: `yes` dies quietly and the pipeline succeeds.
        assert_eq!(lines.next().unwrap(), "pipe=0", "{method:?}");
        let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
        assert_eq!(err, "err\n");
    }
}

#[test]
fn exec_errors_are_clear_and_leave_nothing() {
    let m = monitor(Method::Auto);
    let e = drover_monitor::Exec::new("/nonexistent/program");
    let err = m.spawn_exec(e, None, Limits::default()).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    let e = drover_monitor::Exec::new("surely-not-a-command-drover");
    let err = m.spawn_exec(e, None, Limits::default()).err().unwrap();
    assert!(err.to_string().contains("not found in PATH"), "{err}");
    let mut e = drover_monitor::Exec::new("/bin/true");
    e.arg("a\0b");
    let err = m.spawn_exec(e, None, Limits::default()).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let mut e = drover_monitor::Exec::new("/bin/true");
    e.current_dir("/nonexistent/dir");
    let err = m.spawn_exec(e, None, Limits::default()).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    // Each failed start reaped its child: none is left as a zombie of ours.
    // A child that never exec'd is named after this test's thread, which
    // keeps other tests' short-lived zombies out of the count.
    let me = std::process::id().to_string();
    let zombies = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            let (head, rest) = s.rsplit_once(')').unwrap_or(("", ""));
            let f: Vec<&str> = rest.split_whitespace().collect();
            head.contains("(exec_errors")
                && f.first() == Some(&"Z")
                && f.get(1) == Some(&me.as_str())
        })
        .count();
    assert_eq!(zombies, 0);
}

/// Task groups are reused: a task's CPU time and limits must not carry
/// over from the tasks that had its group before.
#[test]
fn a_reused_group_starts_from_zero() {
    let m = monitor(Method::Auto);
    let burn = || {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done");
        c
    };
    let first = m
        .spawn(burn(), None, Limits::default())
        .unwrap()
        .wait()
        .unwrap();
    assert!(first.summary.cpu_time > 0.05, "{:?}", first.summary);
    // A group that was killed (cancel, limit) must not make later tasks die
    // at birth.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("30");
    let cancelled = m.spawn(sleeper, None, Limits::default()).unwrap();
    cancelled.kill();
    assert_eq!(cancelled.wait().unwrap().exit, Exit::Signal(libc::SIGKILL));
    for i in 0..6 {
        let r = if i % 2 == 0 {
            m.spawn(Command::new("true"), None, Limits::default())
        } else {
            m.spawn_exec(drover_monitor::Exec::new("true"), None, Limits::default())
        }
        .unwrap()
        .wait()
        .unwrap();
        assert_eq!(r.exit, Exit::Code(0), "{:?}", r.summary);
        assert!(
            r.summary.cpu_time < first.summary.cpu_time / 2.0,
            "a short task after a busy one: {} s of CPU against {} s ({})",
            r.summary.cpu_time,
            first.summary.cpu_time,
            r.summary.monitor_method
        );
    }
}

/// A task that grows past half its memory limit is sampled more often, so
/// it is stopped near the limit instead of up to an interval's growth past
/// it. The program grows by 100 MB/s towards a 400 MB limit; at the 1 s
/// default interval alone it would be seen anywhere up to 500 MB. The
/// bound leaves 0.6 s for a sampler slowed by a loaded machine.
#[test]
fn a_growing_task_is_stopped_close_to_its_limit() {
    let m = Monitor::new(drover_monitor::DEFAULT_INTERVAL);
    let mut c = Command::new("python3");
    c.arg("-c").arg(
        "import time\n\
         a = []\n\
         for _ in range(300):\n    a.append(b'\\x01' * (10 << 20)); time.sleep(0.1)\n",
    );
    let limits = Limits {
        memory_mb: Some(400),
        ..Limits::default()
    };
    let r = m.spawn(c, None, limits).unwrap().wait().unwrap();
    let hit = r
        .summary
        .limits_exceeded
        .clone()
        .expect("killed for memory");
    assert_eq!(hit.resource, "memory");
    assert!(
        hit.value < 460.0,
        "stopped at {:.0} MB for a 400 MB limit ({:?})",
        hit.value,
        r.summary
    );
}

/// A python program that touches `mb` MB in 10 MB steps 20 ms apart,
/// holds them a second (so that even a slow sampler sees the peak), then
/// exits 0.
fn grower(mb: u64) -> Command {
    let mut c = Command::new("python3");
    c.arg("-c").arg(format!(
        "import time\na = []\nfor _ in range({}):\n    a.append(b'\\x01' * (10 << 20)); time.sleep(0.02)\ntime.sleep(1)\n",
        mb / 10
    ));
    c
}

/// Spawns `grower(200)` with a 60 MB limit and a growth hook (see
/// [`spawn_growable`]).
fn spawn_grower(
    m: &Monitor,
) -> Option<(
    drover_monitor::Watched,
    std::sync::mpsc::Receiver<drover_monitor::LimitExceeded>,
)> {
    spawn_growable(m, grower(200), 60)
}

/// Spawns `cmd` with a `limit_mb` memory limit and a growth hook; returns
/// the watched task and the hook's channel, or `None` when this host gives
/// the monitor no cgroup (only cgroup tasks can be frozen).
fn spawn_growable(
    m: &Monitor,
    cmd: Command,
    limit_mb: u64,
) -> Option<(
    drover_monitor::Watched,
    std::sync::mpsc::Receiver<drover_monitor::LimitExceeded>,
)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let opts = drover_monitor::SpawnOptions {
        on_memory_limit: Some(Box::new(move |hit| {
            let _ = tx.lock().map(|t| t.send(hit.clone()));
        })),
        ..Default::default()
    };
    let limits = Limits {
        memory_mb: Some(limit_mb),
        ..Limits::default()
    };
    let w = m.spawn_with(cmd, None, limits, opts).unwrap();
    if !w.method().starts_with("cgroup2") {
        eprintln!("no cgroup here: growth in place cannot be tested");
        return None;
    }
    Some((w, rx))
}

/// Over its limit with a growth hook, the task is frozen rather than
/// killed, and once its limit is raised it finishes its work: nothing it
/// did is lost.
#[test]
fn a_task_over_its_memory_limit_is_frozen_and_can_grow() {
    let m = monitor(Method::Auto);
    let Some((w, rx)) = spawn_grower(&m) else {
        return;
    };
    let hit = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the hook is told of the breach");
    assert_eq!(hit.resource, "memory");
    assert_eq!(hit.limit, 60.0);
    assert!(hit.value > 60.0, "{hit:?}");
    // Frozen: its CPU time stands still while it waits.
    let cpu = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu(w.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cpu(w.pid()), before, "a frozen task does not run");
    w.grow_memory(1000);
    let r = w.wait().unwrap();
    assert_eq!(r.exit, Exit::Code(0), "{:?}", r.summary);
    assert_eq!(r.summary.limits_exceeded, None);
    assert!(r.summary.memory >= 190.0, "{:?}", r.summary);
    assert!(rx.try_recv().is_err(), "one breach, one call");
}

/// Refusing growth ends the task as over its limit, as without a hook.
#[test]
fn a_refused_growth_ends_the_task_as_over_its_limit() {
    let m = monitor(Method::Auto);
    let Some((w, rx)) = spawn_grower(&m) else {
        return;
    };
    let hit = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    w.refuse_growth();
    let r = w.wait().unwrap();
    let over = r.summary.limits_exceeded.clone().expect("over its limit");
    assert_eq!(over.resource, "memory");
    assert_eq!(over.value, hit.value);
    assert_eq!(r.exit, Exit::Signal(libc::SIGKILL), "{:?}", r.summary);
    // Frozen from the breach on: it grew by at most a step or two (while
    // the freeze took effect) before it was killed, and never finished.
    assert!(
        r.summary.memory <= hit.value + 30.0 && r.summary.memory < 190.0,
        "{} MB at the breach, {:?}",
        hit.value,
        r.summary
    );
}

/// Without a cgroup nothing can be frozen: the hook is not called and the
/// task is killed as usual.
#[test]
fn without_a_cgroup_a_task_over_its_memory_is_killed_not_frozen() {
    let m = monitor(Method::Proc);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    let opts = drover_monitor::SpawnOptions {
        on_memory_limit: Some(Box::new(move |_| {
            let _ = tx.lock().map(|t| t.send(()));
        })),
        ..Default::default()
    };
    let limits = Limits {
        memory_mb: Some(60),
        ..Limits::default()
    };
    let r = m
        .spawn_with(grower(200), None, limits, opts)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        r.summary.limits_exceeded.map(|l| l.resource).as_deref(),
        Some("memory")
    );
    assert!(rx.try_recv().is_err());
}

/// Runs `Exec::shell(command)` in `dir`; returns exit, stdout, stderr.
fn run_shell(command: &str, dir: &Path) -> (Exit, String, String) {
    let m = monitor(Method::Auto);
    let mut e = drover_monitor::Exec::shell(command);
    e.current_dir(dir);
    e.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    e.stdout(std::fs::File::create(dir.join("stdout")).unwrap());
    e.stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    let r = m
        .spawn_exec(e, None, Limits::default())
        .unwrap()
        .wait()
        .unwrap();
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    (r.exit, read("stdout"), read("stderr"))
}

/// `Exec::shell` behaves as `sh -c` whether or not it skips the shell: a
/// plain command runs with its arguments and the shell's `PWD`; a missing
/// program, an unexecutable file and a script without `#!` get exactly
/// what the shell does with them; anything else goes through the shell.
#[test]
fn shell_commands_run_as_sh_would_run_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cwd = d.display().to_string();
    let plain = "/usr/bin/printf %s: a b";
    assert!(drover_monitor::Exec::shell(plain).skips_shell());
    assert_eq!(
        run_shell(plain, d),
        (Exit::Code(0), "a:b:".into(), "".into())
    );
    assert!(drover_monitor::Exec::shell("printenv PWD").skips_shell());
    assert_eq!(
        run_shell("printenv PWD", d),
        (Exit::Code(0), format!("{cwd}\n"), "".into())
    );
    assert_eq!(run_shell("false", d).0, Exit::Code(1));

    let (exit, out, err) = run_shell("surely-not-a-command-drover x", d);
    assert_eq!((exit, out.as_str()), (Exit::Code(127), ""));
    assert!(
        err.contains("surely-not-a-command-drover: not found"),
        "{err}"
    );

    std::fs::write(d.join("data"), "not a program").unwrap();
    let (exit, _, err) = run_shell("./data", d);
    assert_eq!(exit, Exit::Code(126));
    assert!(err.contains("Permission denied"), "{err}");

    let script = d.join("script");
    std::fs::write(&script, "echo from-script \"$1\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert_eq!(
        run_shell("./script arg", d),
        (Exit::Code(0), "from-script arg\n".into(), "".into())
    );

    let shelled = "echo \"$PWD\" $((1+2)) > o; cat o";
    assert!(!drover_monitor::Exec::shell(shelled).skips_shell());
    assert_eq!(
        run_shell(shelled, d),
        (Exit::Code(0), format!("{cwd} 3\n"), "".into())
    );
}

/// A monitor whose full passes are 10 s apart, already busy with a task (so
/// that the next start does not find it idle and sampling at once).
fn slow_busy_monitor() -> (Monitor, drover_monitor::Watched) {
    let m = Monitor::with_options(MonitorOptions {
        interval: Duration::from_secs(10),
        method: Method::Auto,
    });
    let mut idle = Command::new("sleep");
    idle.arg("60");
    let w = m.spawn(idle, None, Limits::default()).unwrap();
    // Its first full pass is done once the monitor has seen its process.
    std::thread::sleep(Duration::from_millis(300));
    (m, w)
}

/// Touches 100 MB at once, then sleeps 5 s and exits 0.
fn quick_hundred_mb() -> Command {
    let mut c = Command::new("python3");
    c.arg("-c")
        .arg("import time\na = b'\\x01' * (100 << 20)\ntime.sleep(5)\n");
    c
}

/// A task with a memory limit is watched closely from its start, not only
/// from the next full pass: here the passes are 10 s apart, and the task is
/// over its limit for its 5 s of life only.
#[test]
fn a_task_over_its_limit_right_from_its_start_is_caught_between_full_passes() {
    let (m, _busy) = slow_busy_monitor();
    let limits = Limits {
        memory_mb: Some(50),
        ..Limits::default()
    };
    let r = m
        .spawn(quick_hundred_mb(), None, limits)
        .unwrap()
        .wait()
        .unwrap();
    let hit = r.summary.limits_exceeded.expect("caught over its limit");
    assert_eq!(hit.resource, "memory");
}

/// A task let go on after a freeze is watched closely again at once: its
/// new limit may already be behind it.
#[test]
fn a_grown_task_over_its_new_limit_is_caught_between_full_passes() {
    let (m, _busy) = slow_busy_monitor();
    let Some((w, rx)) = spawn_growable(&m, quick_hundred_mb(), 50) else {
        return;
    };
    let first = rx
        .recv_timeout(Duration::from_secs(3))
        .expect("the first breach, caught between full passes");
    assert_eq!(first.limit, 50.0);
    // Long enough for a sample of the frozen task: what the monitor knew
    // of its course before the freeze no longer holds once it goes on.
    std::thread::sleep(Duration::from_millis(1500));
    // Still below what it uses: breached again as soon as it goes on.
    w.grow_memory(80);
    let second = rx
        .recv_timeout(Duration::from_secs(3))
        .expect("the second breach, caught between full passes");
    assert_eq!(second.limit, 80.0);
    w.refuse_growth();
    let r = w.wait().unwrap();
    assert_eq!(
        r.summary.limits_exceeded.map(|h| h.resource).as_deref(),
        Some("memory")
    );
}

/// A task's processes are counted at the full passes and at its end, the
/// same whether or not it has a memory limit: the closer looks a limit
/// brings between passes (here every 2 s, while the passes are 20 s apart)
/// do not count the short-lived children they happen to see. Before, each
/// look added the `sleep` it caught, as a pyenv shim's helpers made one
/// Python program count as 2 to 7 processes from run to run.
#[test]
fn closer_looks_for_a_memory_limit_do_not_count_short_lived_children() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let m = Monitor::with_options(MonitorOptions {
        interval: Duration::from_secs(20),
        method: Method::Auto,
    });
    // 60 MB held for 8 s keeps the task past half its 100 MB limit (so it
    // is looked at every 2 s) while a loop runs 150 sleeps of 50 ms.
    let script = format!(
        "{} 1 60 - 0 8000 {} & i=0; while [ $i -lt 150 ]; do sleep 0.05; i=$((i+1)); done; wait",
        helper().display(),
        pidfile.display()
    );
    let limits = Limits {
        memory_mb: Some(100),
        ..Limits::default()
    };
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let r = m.spawn(cmd, None, limits).unwrap().wait().unwrap();
    let s = &r.summary;
    eprintln!("{s:?}");
    assert_eq!(r.exit, Exit::Code(0), "{s:?}");
    assert!(s.samples >= 3, "closer looks were taken: {s:?}");
    // At the first pass at most: sh, the helper's root, its forking
    // intermediate and worker, and one sleep; at the end only sh.
    assert!(s.total_processes <= 5, "{s:?}");
    assert!(s.max_concurrent_processes <= 5, "{s:?}");
}

/// Where this process may put a task in a memory cgroup of its own making
/// with a cap it sets itself, as a batch system would: cgroup v2 (the
/// task's own group, when it has the memory controller) or the v1 memory
/// hierarchy of a hybrid host. `Err` says why not.
struct OutsideCap {
    /// A v1 group made for the task, removed at the end.
    made: Option<PathBuf>,
}

impl OutsideCap {
    fn put(pid: i32, mb: u64) -> Result<OutsideCap, String> {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| format!("cannot read the task's cgroup: {e}"))?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mount_of = |fstype: &str, option: Option<&str>| {
            mounts.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split_whitespace();
                if r.next()? != fstype {
                    return None;
                }
                let opts = r.nth(1).unwrap_or("");
                if option.is_some_and(|o| !opts.split(',').any(|x| x == o)) {
                    return None;
                }
                left.split_whitespace().nth(4).map(PathBuf::from)
            })
        };
        let bytes = (mb << 20).to_string();
        if let (Some(rel), Some(mount)) = (
            cgroup.lines().find_map(|l| l.strip_prefix("0::")),
            mount_of("cgroup2", None),
        ) {
            let max = mount.join(rel.trim_start_matches('/')).join("memory.max");
            if max.exists() {
                std::fs::write(&max, &bytes).map_err(|e| format!("{}: {e}", max.display()))?;
                return Ok(OutsideCap { made: None });
            }
        }
        let v1 = mount_of("cgroup", Some("memory")).ok_or(
            "no memory controller in the task's cgroup v2 group, and no v1 memory hierarchy",
        )?;
        let dir = v1.join(format!("drover-oom-test-{pid}"));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cap = OutsideCap {
            made: Some(dir.clone()),
        };
        for (file, value) in [
            ("memory.limit_in_bytes", bytes),
            ("cgroup.procs", pid.to_string()),
        ] {
            std::fs::write(dir.join(file), value)
                .map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
        }
        Ok(cap)
    }
}

impl Drop for OutsideCap {
    fn drop(&mut self) {
        if let Some(dir) = &self.made {
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Says on the terminal, past the test harness's capture, that a test
/// could not run here and why.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// A task the kernel OOM-kills under a cap set outside the monitor (no
/// limit of drover's) is reported as out of memory, with the evidence.
#[test]
fn a_task_oom_killed_under_an_outside_cap_is_reported_as_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let m = monitor(Method::Auto);
    // The task waits until it sits under the cap, then touches 400 MB.
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.01; done; exec {} cow 400 0 0",
        helper().display(),
        go = go.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let w = m.spawn(cmd, None, Limits::default()).unwrap();
    let cap = match OutsideCap::put(w.pid(), 100) {
        Ok(cap) => cap,
        Err(why) => {
            skipped(&format!(
                "a_task_oom_killed_under_an_outside_cap_is_reported_as_out_of_memory: {why}"
            ));
            return;
        }
    };
    std::fs::write(&go, "").unwrap();
    let r = w.wait().unwrap();
    drop(cap);
    let s = &r.summary;
    eprintln!("{s:?}");
    assert_eq!(r.exit, Exit::Signal(libc::SIGKILL), "{s:?}");
    assert_eq!(s.limits_exceeded, None);
    let oom = s.memory_exhausted.as_ref().expect("memory_exhausted");
    if s.monitor_method == "cgroup2" {
        assert_eq!(oom.source, drover_monitor::OomSource::CgroupEvents);
        assert!(
            oom.evidence.contains("oom_kill in memory.events"),
            "{oom:?}"
        );
    } else {
        assert_eq!(oom.source, drover_monitor::OomSource::KernelOomKiller);
        assert!(
            oom.evidence.starts_with("killed by SIGKILL at peak"),
            "{oom:?}"
        );
    }
    assert!(r.ran_out_of_memory());
    assert!(s
        .ending_message()
        .unwrap()
        .starts_with("ran out of memory: "));
}

/// Linux raises a process's `ru_maxrss` at exec to the peak of the memory
/// it had before: for a task, that of the process that spawned it. A task
/// sampled alive is measured by its samples, not by that: a small task
/// started by a large spawner (here this test process, made 100 MB larger
/// first) is not measured at the spawner's size.
#[test]
fn a_small_task_is_not_measured_at_its_spawners_size() {
    let mut ballast = vec![0u8; 100 << 20];
    for i in (0..ballast.len()).step_by(4096) {
        ballast[i] = 1;
    }
    std::hint::black_box(&ballast);
    for method in METHODS {
        let m = monitor(method);
        let mut sleep = Command::new("sleep");
        sleep.arg("0.5");
        let r = m
            .spawn(sleep, None, Limits::default())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(r.exit, Exit::Code(0));
        assert!(r.summary.samples >= 2, "{method:?}: {:?}", r.summary);
        assert!(
            r.summary.memory < 50.0,
            "{method:?}: sleep measured {} MB",
            r.summary.memory
        );
    }
    drop(ballast);
}
