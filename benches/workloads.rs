//! W1, W2 and W3 of BRIEF §6 on drover: an embedded [`Manager`] and one real
//! `drover worker` process on loopback. Prints one JSON line per result.
//! `benches/core/run_all.sh` runs it next to `xargs -P 2` and Work Queue 9.9
//! in the same script; `benches/README.md` records the numbers.
//!
//! ```text
//! cargo bench --bench workloads -- [--workloads W1,W2,W3] [--w1-n 10000]
//!     [--w1-cores 2] [--w2-n 400] [--w2-cores 16] [--w2-sleep 0.05] [--w3-n 500] [--w3-input FILE]
//! ```
//! `DROVER_BIN` overrides the worker binary (default: the `drover` that cargo
//! built for this bench, with the bench profile = release). `BENCH_WORKDIR`
//! is where the worker's work directory goes (default: the system temp dir).
//!
//! Besides the common fields, each line has `master_cpu_ms_per_task` (this
//! process: the embedded manager) and `worker_cpu_ms_per_task` (the worker
//! process itself, not its tasks), from /proc.

/// The allocator of the `drover` binary and the Python module, so that the
/// master measured here is the one users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, Outcome, Task};
use serde_json::{json, Value};

const SYSTEM: &str = "drover";

struct Args {
    workloads: Vec<String>,
    w1_n: usize,
    w1_cores: u32,
    w2_n: usize,
    w2_cores: u32,
    w2_sleep: f64,
    w3_n: usize,
    w3_input: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        workloads: vec!["W1".into(), "W2".into(), "W3".into()],
        w1_n: 10_000,
        w1_cores: 2,
        w2_n: 400,
        w2_cores: 16,
        w2_sleep: 0.05,
        w3_n: 500,
        w3_input: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue;
        }
        let v = it.next().unwrap_or_else(|| {
            panic!("{k} needs a value (see the doc comment of benches/workloads.rs)")
        });
        let num = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| panic!("{k}: not a number: {v}"))
        };
        match k.as_str() {
            "--workloads" => a.workloads = v.split(',').map(str::to_string).collect(),
            "--w1-n" => a.w1_n = num(&v) as usize,
            "--w1-cores" => a.w1_cores = num(&v) as u32,
            "--w2-n" => a.w2_n = num(&v) as usize,
            "--w2-cores" => a.w2_cores = num(&v) as u32,
            "--w2-sleep" => a.w2_sleep = num(&v),
            "--w3-n" => a.w3_n = num(&v) as usize,
            "--w3-input" => a.w3_input = Some(PathBuf::from(v)),
            _ => panic!("unknown option {k}"),
        }
    }
    a
}

fn drover_bin() -> PathBuf {
    std::env::var_os("DROVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_drover")))
}

/// One `drover worker` process and its work directory; killed on drop.
struct Worker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manager on loopback with one connected worker of `cores` cores.
fn start(cores: u32) -> (Manager, Worker) {
    let mut builder = Manager::builder().port(0).bind("127.0.0.1");
    // For comparisons: DROVER_PREFETCH=0 turns sending tasks ahead off.
    if let Some(n) = std::env::var("DROVER_PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.prefetch(n);
    }
    let manager = builder.build().expect("manager");
    let dir = tempfile::Builder::new()
        .prefix("drover-bench-")
        .tempdir_in(
            std::env::var_os("BENCH_WORKDIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        )
        .expect("tempdir");
    let child = Command::new(drover_bin())
        .arg("worker")
        .arg(format!("127.0.0.1:{}", manager.port()))
        .args(["--exit-on-disconnect", "--idle-timeout", "600"])
        .args(["--cores", &cores.to_string()])
        .arg("--workdir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting drover worker");
    let worker = Worker { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while manager.stats().workers_connected < 1 {
        assert!(
            Instant::now() < deadline,
            "the worker did not connect in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (manager, worker)
}

/// User + system CPU seconds of process `pid` itself (threads included,
/// reaped children not).
fn cpu_s(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU used by the master (this process) and by the worker process while `f` runs.
struct Cpu {
    master: f64,
    worker: f64,
}

fn measure_cpu<T>(worker: &Worker, f: impl FnOnce() -> T) -> (T, Cpu) {
    let wpid = worker.child.id().to_string();
    let (m0, w0) = (cpu_s("self"), cpu_s(&wpid));
    let out = f();
    let cpu = Cpu {
        master: cpu_s("self") - m0,
        worker: cpu_s(&wpid) - w0,
    };
    (out, cpu)
}

/// Submits every task and waits for every result; wall time from the first
/// submit to the last result, and the results that were not a success.
fn run(manager: &Manager, tasks: Vec<Task>, check: impl Fn(&str) -> bool) -> (f64, usize) {
    let (wall, failed, _) = run_timed(manager, tasks, check);
    (wall, failed)
}

/// [`run`], plus the mean time a task spent on the worker (from the
/// master's dispatch to its result), in seconds.
fn run_timed(
    manager: &Manager,
    tasks: Vec<Task>,
    check: impl Fn(&str) -> bool,
) -> (f64, usize, f64) {
    let start = Instant::now();
    let n = tasks.len();
    for t in tasks {
        manager.submit(t).expect("submit");
    }
    let mut failed = 0;
    let mut on_worker = 0.0;
    while !manager.is_empty() {
        if let Some(r) = manager.wait(Some(Duration::from_secs(60))) {
            if let Some(started) = r.started {
                on_worker += r
                    .finished
                    .duration_since(started)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
            }
            if r.outcome != Outcome::Success || !check(&r.stdout) {
                if failed == 0 {
                    eprintln!(
                        "workloads: task {} {:?}: {} {}",
                        r.id, r.outcome, r.stdout, r.stderr
                    );
                }
                failed += 1;
            }
        }
    }
    (
        start.elapsed().as_secs_f64(),
        failed,
        on_worker / n.max(1) as f64,
    )
}

fn finish(mut manager: Manager, mut worker: Worker) {
    manager.shutdown_workers();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = worker.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn record(workload: &str, n: usize, wall: f64, failed: usize, cores: u32, cpu: &Cpu) -> Value {
    json!({
        "system": SYSTEM, "workload": workload, "n": n, "wall_s": round(wall, 4),
        "tasks_per_s": round(n as f64 / wall, 2), "failed": failed, "worker_cores": cores,
        "master_cpu_ms_per_task": round(1e3 * cpu.master / n as f64, 3),
        "worker_cpu_ms_per_task": round(1e3 * cpu.worker / n as f64, 3),
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn w1(n: usize, cores: u32) -> (Value, f64) {
    let (m, w) = start(cores);
    let tasks = (0..n).map(|_| Task::new("true").cores(1)).collect();
    let ((wall, failed), cpu) = measure_cpu(&w, || run(&m, tasks, |_| true));
    finish(m, w);
    (record("W1", n, wall, failed, cores, &cpu), wall / n as f64)
}

fn w2(n: usize, cores: u32, secs: f64) -> Value {
    let (m, w) = start(cores);
    let tasks = (0..n)
        .map(|_| Task::new(format!("sleep {secs}")).cores(1))
        .collect();
    let ((wall, failed, on_worker), cpu) = measure_cpu(&w, || run_timed(&m, tasks, |_| true));
    finish(m, w);
    let ideal = n as f64 * secs / cores as f64;
    let mut r = record("W2", n, wall, failed, cores, &cpu);
    // Where W2's time beyond the ideal goes: a task's own time on the
    // worker over its sleep (process start-up, exit, report) against the
    // time a slot waits between tasks (dispatch).
    r["mean_on_worker_ms"] = json!(round(on_worker * 1e3, 2));
    r["mean_slot_gap_ms"] = json!(round((wall * cores as f64 / n as f64 - on_worker) * 1e3, 2));
    r["ideal_s"] = json!(round(ideal, 4));
    r["ratio_to_ideal"] = json!(round(wall / ideal, 3));
    r
}

/// Bytes the master has sent on its connections from `port` (the kernel's
/// `tcpi_bytes_acked`, read with `ss`): an independent count of what crossed
/// to the worker, next to `stats().files_sent`. (Socket sends do not show in
/// /proc/self/io.)
fn tcp_bytes_sent(port: u16) -> u64 {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", "sport", "="])
        .arg(format!(":{port}"))
        .output()
        .expect("ss (iproute2) is needed for W3's byte count");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_acked:"))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

fn make_input(dir: &Path) -> PathBuf {
    let path = dir.join("input-50MB");
    // Content varies so that no layer can shortcut it; 50 MB = 50 x 2^20 bytes.
    let mut data = vec![0u8; 50 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, &data).expect("writing the W3 input");
    path
}

fn w3(n: usize, input: &Path, w1_per_task: Option<f64>) -> Value {
    let size = std::fs::metadata(input).expect("W3 input").len();
    // One local copy of the input, the unit of the W3 target.
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    std::fs::copy(input, copy_dir.path().join("copy")).expect("copy");
    let copy_s = t0.elapsed().as_secs_f64();
    drop(copy_dir);

    let (m, w) = start(2);
    let tasks = (0..n)
        .map(|_| {
            // The command Work Queue's side runs (wq_workloads.py).
            Task::new("wc -c input")
                .cores(1)
                .input_file(input, "input", true)
        })
        .collect();
    let expect = format!("{size} input");
    let ((wall, failed), cpu) = measure_cpu(&w, || run(&m, tasks, |out| out.trim() == expect));
    let sent = tcp_bytes_sent(m.port());
    let stats = m.stats();
    finish(m, w);
    let mut r = record("W3", n, wall, failed, 2, &cpu);
    r["input_bytes"] = json!(size);
    r["files_sent"] = json!(stats.files_sent);
    r["bytes_sent"] = json!(sent);
    r["input_transfers"] = json!(round(sent as f64 / size as f64, 3));
    r["copy_input_s"] = json!(round(copy_s, 4));
    if let Some(per_task) = w1_per_task {
        let target = 2.0 * (n as f64 * per_task + copy_s);
        r["target_s"] = json!(round(target, 4));
        r["ratio_to_target"] = json!(round(wall / target, 3));
    }
    r
}

fn main() {
    let args = parse_args();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut w1_per_task = None;
    for w in &args.workloads {
        let r = match w.as_str() {
            "W1" => {
                let (r, per_task) = w1(args.w1_n, args.w1_cores);
                w1_per_task = Some(per_task);
                r
            }
            "W2" => w2(args.w2_n, args.w2_cores, args.w2_sleep),
            "W3" => {
                let input = match &args.w3_input {
                    Some(p) => p.clone(),
                    None => make_input(scratch.path()),
                };
                w3(args.w3_n, &input, w1_per_task)
            }
            other => panic!("unknown workload {other}"),
        };
        println!("{r}");
    }
}
