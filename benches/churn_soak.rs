//! The churn soak (issue 19): many short tasks through real `drover worker`
//! processes while one of them is SIGKILLed every few seconds and replaced,
//! against the same run without kills. The master is this process (a
//! `Manager`), so its RSS and CPU are this process's.
//!
//! Every result is checked off by task id: a task with no result is lost, a
//! second result for one id is a duplicate. One JSON line per sample (every
//! `SOAK_SAMPLE_S` seconds) and a summary line go to stdout and, if set, to
//! the file `SOAK_OUT`.
//!
//! ```sh
//! SOAK_TASKS=1000000 SOAK_KILL_EVERY_S=3 cargo bench -p drover --bench churn_soak
//! SOAK_TASKS=1000000 SOAK_KILL_EVERY_S=0 cargo bench -p drover --bench churn_soak
//! ```
//!
//! Settings (environment): `SOAK_TASKS` (default 1,000,000), `SOAK_WORKERS`
//! (4), `SOAK_CORES` (cores each worker offers, 2), `SOAK_KILL_EVERY_S` (3;
//! 0 for no churn), `SOAK_WINDOW` (tasks submitted and not yet finished, at
//! most; 20,000), `SOAK_SAMPLE_S` (5), `SOAK_DEADLINE_S` (stop there and
//! report what finished; 1,500), `SOAK_LABEL`.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, Outcome, Task, TaskId};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `drover worker` process and its own work directory (removed with it).
struct Worker {
    child: Child,
    dir: tempfile::TempDir,
}

impl Worker {
    fn start(port: u16, cores: u64) -> anyhow::Result<Worker> {
        let dir = tempfile::tempdir()?;
        let child = Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("worker")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--workdir")
            .arg(dir.path())
            .arg("--cores")
            .arg(cores.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Worker { child, dir })
    }

    fn kill(mut self) {
        // SIGKILL: the worker gets no chance to say goodbye or report.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This process's resident set (kB) and CPU time (s), from /proc.
fn rss_kb_and_cpu_s() -> (u64, f64) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may hold spaces: utime and
            // stime are the 14th and 15th fields of the line.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    (rss, cpu / ticks)
}

fn main() -> anyhow::Result<()> {
    let total = setting("SOAK_TASKS", 1_000_000);
    let n_workers = setting("SOAK_WORKERS", 4) as usize;
    let cores = setting("SOAK_CORES", 2);
    let kill_every = setting("SOAK_KILL_EVERY_S", 3);
    let window = setting("SOAK_WINDOW", 20_000);
    let sample_every = Duration::from_secs(setting("SOAK_SAMPLE_S", 5).max(1));
    let deadline = Duration::from_secs(setting("SOAK_DEADLINE_S", 1_500));
    let label = std::env::var("SOAK_LABEL").unwrap_or_else(|_| {
        if kill_every == 0 {
            "no churn".into()
        } else {
            format!("kill every {kill_every} s")
        }
    });
    let mut out_file = match std::env::var("SOAK_OUT") {
        Ok(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        Err(_) => None,
    };
    let mut emit = |line: serde_json::Value| {
        println!("{line}");
        if let Some(f) = out_file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    };

    let manager = Manager::builder().port(0).bind("127.0.0.1").build()?;
    let port = manager.port();
    let mut workers = (0..n_workers)
        .map(|_| Worker::start(port, cores))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let start = Instant::now();
    let (rss0, cpu0) = rss_kb_and_cpu_s();
    // Results per task id: more than one is a duplicate.
    let mut seen: HashMap<TaskId, u32> = HashMap::with_capacity(total as usize);
    let (mut submitted, mut finished, mut failed, mut kills) = (0u64, 0u64, 0u64, 0u64);
    let mut failures: HashMap<String, u64> = HashMap::new();
    let mut next_kill = start + Duration::from_secs(kill_every.max(1));
    let mut next_sample = start + sample_every;
    let (mut last_finished, mut last_sample) = (0u64, start);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut timed_out = false;
    while finished < total {
        if start.elapsed() > deadline {
            timed_out = true;
            break;
        }
        while submitted < total && submitted - finished < window {
            manager.submit(
                Task::new("true")
                    .cores(1)
                    .memory_mb(10)
                    .disk_mb(1)
                    .max_retries(20),
            )?;
            submitted += 1;
        }
        while let Some(r) = manager.wait(Some(Duration::from_millis(50))) {
            let count = seen.entry(r.id).or_insert(0);
            *count += 1;
            if *count == 1 {
                finished += 1;
                if r.outcome != Outcome::Success {
                    failed += 1;
                    *failures
                        .entry(r.outcome.words(r.exit_code, r.signal))
                        .or_insert(0) += 1;
                }
            }
            // Back to submitting, killing and sampling on time.
            let due = if kill_every > 0 {
                next_kill.min(next_sample)
            } else {
                next_sample
            };
            if finished >= submitted || submitted - finished < window / 2 || Instant::now() >= due {
                break;
            }
        }
        let now = Instant::now();
        if kill_every > 0 && now >= next_kill && !workers.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let victim = workers.swap_remove((rng % workers.len() as u64) as usize);
            victim.kill();
            kills += 1;
            workers.push(Worker::start(port, cores)?);
            next_kill = now + Duration::from_secs(kill_every);
        }
        if now >= next_sample {
            let (rss, cpu) = rss_kb_and_cpu_s();
            let dt = now.duration_since(last_sample).as_secs_f64();
            emit(serde_json::json!({
                "label": label,
                "t_s": (start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "finished": finished,
                "tasks_per_s": ((finished - last_finished) as f64 / dt).round(),
                "master_rss_mb": (rss as f64 / 1024.0 * 10.0).round() / 10.0,
                "master_cpu_s": ((cpu - cpu0) * 100.0).round() / 100.0,
                "workers_killed": kills,
            }));
            last_finished = finished;
            last_sample = now;
            next_sample = now + sample_every;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let (rss, cpu) = rss_kb_and_cpu_s();
    let duplicated: u64 = seen.values().map(|&c| u64::from(c.saturating_sub(1))).sum();
    let stats = manager.stats();
    emit(serde_json::json!({
        "label": label,
        "summary": true,
        "tasks": total,
        "submitted": submitted,
        "finished": finished,
        "timed_out": timed_out,
        // Lost: submitted, and never a result, although the run waited for it.
        "lost": if timed_out { None } else { Some(submitted - finished) },
        "duplicated": duplicated,
        "failed": failed,
        "failures": failures,
        "workers_killed": kills,
        "tasks_requeued": stats.tasks_requeued,
        "wall_s": (wall * 10.0).round() / 10.0,
        "tasks_per_s": (finished as f64 / wall).round(),
        "master_rss_mb_start": (rss0 as f64 / 1024.0 * 10.0).round() / 10.0,
        "master_rss_mb_end": (rss as f64 / 1024.0 * 10.0).round() / 10.0,
        "master_cpu_s": ((cpu - cpu0) * 100.0).round() / 100.0,
        "master_cpu_us_per_task": ((cpu - cpu0) * 1e6 / finished.max(1) as f64).round(),
    }));
    for w in workers {
        w.kill();
    }
    Ok(())
}
