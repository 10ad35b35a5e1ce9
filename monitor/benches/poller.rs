//! Poller overhead and accuracy, side by side with CCTools `resource_monitor`.
//! Prints one JSON object per line; `benches/monitor/run.sh` runs it and
//! `benches/monitor/README.md` records the numbers.
//!
//! Environment: `BENCH_SECONDS` (measurement window, default 20),
//! `BENCH_TASKS` (default 100), `BENCH_PROCS` (processes per task, default 10).

use drover_monitor::{Limits, Method, Monitor, MonitorOptions, Watched, DEFAULT_INTERVAL};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn helper(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/tree.c");
    let out = dir.join("tree");
    let ok = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cc is needed to build {}", src.display());
    out
}

/// On-CPU nanoseconds of the threads of `pid` (from schedstat, which,
/// unlike utime/stime, is not rounded to clock ticks).
fn cpu_ns(pid: u32, only_comm: Option<&str>) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for t in rd.flatten() {
        if let Some(c) = only_comm {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() != c {
                continue;
            }
        }
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn task_script(procs: u64) -> String {
    // One shell plus procs-1 sleeps.
    format!(
        "for i in $(seq {}); do sleep 600 & done; wait",
        procs.saturating_sub(1)
    )
}

fn sandbox(root: &Path, i: u64) -> PathBuf {
    let d = root.join(format!("sb{i}"));
    std::fs::create_dir_all(&d).ok();
    for f in 0..5 {
        std::fs::write(d.join(format!("f{f}")), vec![0u8; 4096]).ok();
    }
    d
}

fn ours_overhead(method: Method, tasks: u64, procs: u64, secs: u64, root: &Path) {
    let m = Monitor::with_options(MonitorOptions {
        interval: DEFAULT_INTERVAL,
        method,
    });
    let me = std::process::id();
    // Idle cost first: no tasks, the thread should be asleep.
    let i0 = cpu_ns(me, Some("drover-monitor"));
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_ns(me, Some("drover-monitor")) - i0;
    let watched: Vec<Watched> = (0..tasks)
        .map(|i| {
            let mut c = Command::new("sh");
            c.arg("-c").arg(task_script(procs)).stdin(Stdio::null());
            m.spawn(c, Some(&sandbox(root, i)), Limits::default())
                .expect("spawn")
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let t0 = cpu_ns(me, Some("drover-monitor"));
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let used = cpu_ns(me, Some("drover-monitor")) - t0;
    let wall = w0.elapsed().as_secs_f64();
    let method_name = watched.first().map(|w| w.method()).unwrap_or("none");
    let mut max_procs = 0;
    let mut reports = 0;
    for w in watched {
        w.kill();
        if let Ok(r) = w.wait() {
            max_procs = max_procs.max(r.summary.max_concurrent_processes);
            reports += 1;
        }
    }
    println!(
        "{}",
        json!({
            "bench": "overhead", "monitor": "drover", "method": method_name,
            "tasks": tasks, "procs_per_task": procs, "interval_s": DEFAULT_INTERVAL.as_secs_f64(),
            "cpu_pct_of_core": 100.0 * used as f64 / 1e9 / wall,
            "idle_cpu_pct_of_core": 100.0 * idle as f64 / 1e9 / 3.0,
            "max_concurrent_processes_seen": max_procs, "reports": reports,
        })
    );
}

/// Spawns in a new session, so the whole tree can be found and killed.
fn spawn_session(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

fn kill_sessions(sids: &[i32]) {
    for _ in 0..3 {
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let sid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(3))
                    .and_then(|s| s.parse::<i32>().ok());
                if sid.is_some_and(|s| sids.contains(&s)) {
                    // SAFETY: killing a process of a session this bench created.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rm_overhead(tasks: u64, procs: u64, secs: u64, root: &Path) {
    let mut children: Vec<Child> = (0..tasks)
        .filter_map(|i| {
            let sb = sandbox(root, 1000 + i);
            let mut c = Command::new("resource_monitor");
            c.args(["-i", "1", "--no-pprint", "-O"])
                .arg(root.join(format!("rm{i}")))
                .arg(format!("--measure-dir={}", sb.display()))
                .args(["--", "sh", "-c", &task_script(procs)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            spawn_session(&mut c).ok()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let total = |cs: &[Child]| cs.iter().map(|c| cpu_ns(c.id(), None)).sum::<u64>();
    let t0 = total(&children);
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let used = total(&children).saturating_sub(t0);
    let wall = w0.elapsed().as_secs_f64();
    let sids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    kill_sessions(&sids);
    for c in &mut children {
        let _ = c.wait();
    }
    println!(
        "{}",
        json!({
            "bench": "overhead", "monitor": "resource_monitor", "method": "one process per task",
            "tasks": tasks, "procs_per_task": procs, "interval_s": 1.0,
            "cpu_pct_of_core": 100.0 * used as f64 / 1e9 / wall,
        })
    );
}

struct Program {
    name: &'static str,
    args: Vec<String>,
    /// Memory the program touches, MB.
    truth_mb: f64,
}

fn programs(root: &Path) -> Vec<Program> {
    let p = |name, a: &[&str], truth_mb| Program {
        name,
        args: a.iter().map(|s| s.to_string()).collect(),
        truth_mb,
    };
    let pids = root.join("pids").display().to_string();
    vec![
        p(
            "tree 4x64MB, one double-forked, 2 s",
            &["4", "256", "-", "0", "2000", &pids],
            256.0,
        ),
        p(
            "single 512MB, 2 s",
            &["1", "512", "-", "0", "2000", &pids],
            512.0,
        ),
        p(
            "200MB shared copy-on-write by 4 procs, 2 s",
            &["cow", "200", "3", "2000"],
            200.0,
        ),
        p(
            "spike 300MB for 100 ms",
            &["1", "300", "-", "0", "100", &pids],
            300.0,
        ),
    ]
}

fn accuracy(helper: &Path, root: &Path) {
    for prog in programs(root) {
        for method in [Method::Auto, Method::Proc] {
            let m = Monitor::with_options(MonitorOptions {
                interval: DEFAULT_INTERVAL,
                method,
            });
            let mut c = Command::new(helper);
            c.args(&prog.args);
            let r = m.spawn(c, None, Limits::default()).and_then(|w| w.wait());
            if let Ok(r) = r {
                let s = r.summary;
                println!(
                    "{}",
                    json!({
                        "bench": "accuracy", "program": prog.name, "monitor": "drover",
                        "method": s.monitor_method, "truth_mb": prog.truth_mb, "memory_mb": s.memory,
                        "error_pct": 100.0 * (s.memory - prog.truth_mb) / prog.truth_mb,
                        "wall_time": s.wall_time, "cpu_time": s.cpu_time,
                        "max_concurrent_processes": s.max_concurrent_processes,
                        "total_processes": s.total_processes,
                    })
                );
            }
        }
        if which_rm() {
            let out = root.join("rm-acc");
            let st = Command::new("resource_monitor")
                .args(["-i", "1", "--no-pprint", "--without-disk-footprint", "-O"])
                .arg(&out)
                .arg("--")
                .arg(helper)
                .args(&prog.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let summary =
                std::fs::read_to_string(out.with_extension("summary")).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&summary).unwrap_or_default();
            let num = |k: &str| v[k][0].as_f64().unwrap_or(f64::NAN);
            if st.is_ok() {
                let mem = num("memory");
                println!(
                    "{}",
                    json!({
                        "bench": "accuracy", "program": prog.name, "monitor": "resource_monitor",
                        "method": "resource_monitor -i 1", "truth_mb": prog.truth_mb, "memory_mb": mem,
                        "error_pct": 100.0 * (mem - prog.truth_mb) / prog.truth_mb,
                        "wall_time": num("wall_time"), "cpu_time": num("cpu_time"),
                        "max_concurrent_processes": num("max_concurrent_processes"),
                        "total_processes": num("total_processes"),
                    })
                );
            }
        }
    }
}

fn which_rm() -> bool {
    Command::new("resource_monitor")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let secs = env_or("BENCH_SECONDS", 20);
    let tasks = env_or("BENCH_TASKS", 100);
    let procs = env_or("BENCH_PROCS", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let helper = helper(dir.path());
    ours_overhead(Method::Auto, tasks, procs, secs, dir.path());
    ours_overhead(Method::Proc, tasks, procs, secs, dir.path());
    if which_rm() {
        rm_overhead(tasks, procs, secs, dir.path());
    } else {
        println!(
            "{}",
            json!({"bench": "overhead", "monitor": "resource_monitor", "skipped": "not installed"})
        );
    }
    accuracy(&helper, dir.path());
}
