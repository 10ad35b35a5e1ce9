//! `drover factory` on the local single-node Slurm: how long from a burst of
//! tasks until the first worker is connected and until the cluster's full
//! capacity is at work, and how many jobs the factory submits against how
//! many it actually uses (over-submission).
//!
//! Peer: the same worker jobs submitted by hand with `sbatch` the moment the
//! burst arrives ("sbatch-static", the exact command `drover factory
//! --dry-run` prints, as many as --max-workers). That is the best a factory
//! could do on this cluster; the ratios say what the factory's polling and
//! decisions add on top. `factory-interval-1s-max-pending-1` shows what
//! `--max-pending 1` does to over-submission when --max-workers is more
//! than the cluster can start.
//!
//! Run (the local Slurm must be up):
//!   eval "$(bash .ci/local-slurm.sh start)"
//!   cargo bench --bench factory
//! Env: FACTORY_BENCH_REPS (default 5).
//!
//! Prints one JSON line per run, then one per (system, workload) with the
//! medians and the ratios against the peer.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, Outcome, Task};

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

struct Workload {
    name: &'static str,
    tasks: usize,
    command: &'static str,
    max_workers: usize,
}

const WORKLOADS: &[Workload] = &[
    // More tasks than the cluster has cores: the factory must fill the node
    // and hold it.
    Workload {
        name: "burst-20x1s-max2",
        tasks: 20,
        command: "sleep 1",
        max_workers: 2,
    },
    // A short burst with a larger --max-workers than the node can run:
    // jobs wait pending, and demand falls before they start.
    Workload {
        name: "short-6x2s-max4",
        tasks: 6,
        command: "sleep 2",
        max_workers: 4,
    },
];

#[derive(Default, Clone)]
struct Run {
    first_worker_s: f64,
    full_capacity_s: f64,
    wall_s: f64,
    submitted: u64,
    started: u64,
    used: u64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !Command::new("sinfo")
        .args(["-h", "-o", "%c"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
    {
        eprintln!(
            "SKIPPED: no Slurm answers; start it with: eval \"$(bash .ci/local-slurm.sh start)\""
        );
        return;
    }
    let node_cpus: usize = String::from_utf8_lossy(
        &Command::new("sinfo")
            .args(["-h", "-o", "%c"])
            .output()
            .expect("sinfo")
            .stdout,
    )
    .trim()
    .parse()
    .expect("sinfo prints the node's CPUs");
    let reps: usize = std::env::var("FACTORY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let systems = [
        "sbatch-static",
        "factory-interval-1s",
        "factory-interval-5s",
        "factory-interval-1s-max-pending-1",
    ];
    let mut all: BTreeMap<(&str, &str), Vec<Run>> = BTreeMap::new();
    for w in WORKLOADS {
        for _ in 0..reps {
            for system in systems {
                let r = run_once(system, w, node_cpus);
                println!(
                    "{}",
                    serde_json::json!({
                        "system": system,
                        "workload": w.name,
                        "n": w.tasks,
                        "wall_s": r.wall_s,
                        "tasks_per_s": w.tasks as f64 / r.wall_s,
                        "first_worker_s": r.first_worker_s,
                        "full_capacity_s": r.full_capacity_s,
                        "jobs_submitted": r.submitted,
                        "jobs_started": r.started,
                        "jobs_used": r.used,
                        "max_workers": w.max_workers,
                        "node_cpus": node_cpus,
                    })
                );
                all.entry((w.name, system)).or_default().push(r);
            }
        }
    }
    for w in WORKLOADS {
        let peer = medians(&all[&(w.name, "sbatch-static")]);
        for system in systems {
            let m = medians(&all[&(w.name, system)]);
            println!(
                "{}",
                serde_json::json!({
                    "system": system,
                    "workload": w.name,
                    "n": w.tasks,
                    "summary": "median",
                    "reps": reps,
                    "wall_s": m.wall_s,
                    "tasks_per_s": w.tasks as f64 / m.wall_s,
                    "first_worker_s": m.first_worker_s,
                    "full_capacity_s": m.full_capacity_s,
                    "jobs_submitted": m.submitted,
                    "jobs_used": m.used,
                    "over_submission": m.submitted as f64 / m.used.max(1) as f64,
                    "first_worker_vs_peer": m.first_worker_s / peer.first_worker_s,
                    "full_capacity_vs_peer": m.full_capacity_s / peer.full_capacity_s,
                    "wall_vs_peer": m.wall_s / peer.wall_s,
                })
            );
        }
    }
}

fn medians(runs: &[Run]) -> Run {
    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let f = |g: fn(&Run) -> f64| med(runs.iter().map(g).collect());
    Run {
        first_worker_s: f(|r| r.first_worker_s),
        full_capacity_s: f(|r| r.full_capacity_s),
        wall_s: f(|r| r.wall_s),
        submitted: f(|r| r.submitted as f64) as u64,
        started: f(|r| r.started as f64) as u64,
        used: f(|r| r.used as f64) as u64,
    }
}

fn worker_args(master: &str, name: &str, log_dir: &str) -> Vec<String> {
    [
        "factory",
        "--batch",
        "slurm",
        "--master",
        master,
        "--cores",
        "1",
        "--memory",
        "100",
        "--disk",
        "100",
        "--worker-timeout",
        "2",
        "--name",
        name,
        "--log-dir",
        log_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn squeue_count(name: &str) -> usize {
    Command::new("squeue")
        .args(["-h", "-o", "%i", &format!("--name={name}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

fn run_once(system: &str, w: &Workload, node_cpus: usize) -> Run {
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .build()
        .expect("manager");
    let master = format!("127.0.0.1:{}", m.port());
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().to_str().expect("utf-8 tempdir").to_string();
    let name = format!("drover-factory-bench-{}-{}", std::process::id(), rand_tag());
    let mut args = worker_args(&master, &name, &log);
    args.extend(["--max-workers".into(), w.max_workers.to_string()]);
    let mut factory: Option<Child> = None;
    if let Some(rest) = system.strip_prefix("factory-interval-") {
        let (interval, extra) = match rest.split_once("s-max-pending-") {
            Some((i, p)) => (i, vec!["--max-pending", p]),
            None => (rest.trim_end_matches('s'), vec![]),
        };
        let child = Command::new(DROVER)
            .args(&args)
            .args(["--interval", interval])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start factory");
        factory = Some(child);
    }
    // Every system starts from the same quiet state: the previous run's jobs
    // gone from Slurm for a while, and a factory idle and polling. The burst
    // then comes at a random point of the factory's polling cycle (0-5 s
    // later), as bursts do; otherwise the phase would decide the result.
    let phase_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 5000)
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2) + Duration::from_millis(phase_ms.into()));
    let t0 = Instant::now();
    for i in 0..w.tasks {
        m.submit(Task::new(format!("{}; echo {i}", w.command)).cores(1))
            .expect("submit");
    }
    let mut submitted_by_hand = 0;
    if system == "sbatch-static" {
        args.push("--dry-run".into());
        let out = Command::new(DROVER).args(&args).output().expect("dry run");
        let sbatch = String::from_utf8(out.stdout).expect("utf-8");
        for _ in 0..w.max_workers {
            let ok = Command::new("sh")
                .args(["-c", sbatch.trim()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sbatch failed: {sbatch}");
            submitted_by_hand += 1;
        }
    }
    let capacity = w.max_workers.min(node_cpus) as u64;
    let mut r = Run::default();
    let mut used = HashSet::new();
    let mut seen = HashSet::new();
    let mut done = 0;
    let deadline = t0 + Duration::from_secs(600);
    while done < w.tasks {
        assert!(Instant::now() < deadline, "{system} {}: hung", w.name);
        while let Some(res) = m.wait(Some(Duration::from_millis(20))) {
            assert_eq!(res.outcome, Outcome::Success, "{res:?}");
            done += 1;
        }
        let s = m.stats();
        let t = t0.elapsed().as_secs_f64();
        if r.first_worker_s == 0.0 && s.workers_connected >= 1 {
            r.first_worker_s = t;
        }
        if r.full_capacity_s == 0.0 && s.workers_busy >= capacity {
            r.full_capacity_s = t;
        }
        for wk in m.workers() {
            seen.insert(wk.addr.clone());
            if wk.running > 0 {
                used.insert(wk.addr);
            }
        }
    }
    r.wall_s = t0.elapsed().as_secs_f64();
    r.used = used.len() as u64;
    r.started = seen.len() as u64;
    match factory {
        Some(mut child) => {
            // Leave time for demand to fall and pending jobs to be cancelled.
            std::thread::sleep(Duration::from_secs(3));
            // SAFETY: signalling our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = child.wait();
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            let summary: serde_json::Value = out
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .expect("factory summary line");
            r.submitted = summary["submitted"].as_u64().unwrap_or(0);
        }
        None => {
            r.submitted = submitted_by_hand;
            let _ = Command::new("scancel")
                .arg(format!("--name={name}"))
                .status();
        }
    }
    let gone = Instant::now() + Duration::from_secs(60);
    while squeue_count(&name) > 0 && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(200));
    }
    r
}

fn rand_tag() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{n:08x}")
}
