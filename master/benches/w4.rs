//! W4, memory packing (BRIEF section 6), on drover: one real `drover worker`
//! declaring 12 cores and 12,000 MB, the task list from
//! `benches/w4/gen_tasks.py`, and the modes given with `--modes`:
//!
//! * `oracle`: each task declares exactly its true memory (X plus 16 MB for
//!   the shell and the program itself) and 1 core;
//! * `fixed4000`: each task declares 4,000 MB and 1 core;
//! * `max`: a category in max-seen mode, tasks declare nothing;
//! * `bucketing`: the default category, tasks declare nothing (a task over
//!   its allocation grows in place where there is room, else is retried);
//! * `bucketing-cores`: the same, but each task declares its cores (1 unless
//!   the task list gives them) and nothing else, as Work Queue's W4 runs do;
//! * `bucketing-kill`: the same with growing in place off, so that every
//!   task over its allocation is killed and retried.
//!
//! Prints one JSON line per mode. Run through `benches/w4/run.sh` or
//! `benches/w4/honest.sh`, which build the task program and run Work Queue
//! (and, in honest.sh, an oracle outside drover) on the same tasks.
//!
//! Task lines are `X_MB T_S` (a sleeping one-core task) or `X_MB T_S C` (C
//! spinning threads), from `benches/w4/workloads.py`. `--cores`/`--memory-mb`
//! size the worker (12 / 12,000), `--workload` names the line's workload.
//! `--trace PREFIX` writes every `TaskResult` to `PREFIX.tasks.jsonl` and,
//! every `--sample-ms` (100), the memory booked on the master against the
//! memory resident under the worker to `PREFIX.samples.csv`, for
//! `benches/w4/timeline.py`.
//!
//! `cargo test` runs bench targets without arguments; this one then does
//! nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{CategoryConfig, Manager, Outcome, Task, TaskResult};

struct Args {
    tasks: String,
    touch: String,
    drover: String,
    modes: Vec<String>,
    workload: String,
    cores: u32,
    memory_mb: u64,
    trace: Option<String>,
    sample_ms: u64,
}

/// One task: memory (MB), seconds, and the threads it spins (0: it sleeps
/// on one core).
#[derive(Clone, Copy)]
struct Spec {
    x: u64,
    t: f64,
    threads: u32,
}

impl Spec {
    fn cores(&self) -> u32 {
        self.threads.max(1)
    }

    fn command(&self, touch: &str) -> String {
        match self.threads {
            0 => format!("{touch} {} {}", self.x, self.t),
            c => format!("{touch} {} {} {c}", self.x, self.t),
        }
    }
}

fn args() -> Result<Option<Args>, String> {
    let mut it = std::env::args().skip(1);
    let (mut tasks, mut touch, mut drover, mut modes) = (None, None, None, None);
    let (mut workload, mut cores, mut memory_mb, mut trace, mut sample_ms) =
        (None, 12, 12_000, None, 100);
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} wants a number"))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tasks" => tasks = it.next(),
            "--touch" => touch = it.next(),
            "--drover" => drover = it.next(),
            "--modes" => modes = it.next(),
            "--workload" => workload = it.next(),
            "--cores" => cores = num(&a, it.next())?,
            "--memory-mb" => memory_mb = num(&a, it.next())?,
            "--trace" => trace = it.next(),
            "--sample-ms" => sample_ms = num(&a, it.next())?,
            _ => {}
        }
    }
    let (Some(tasks), Some(touch), Some(drover)) = (tasks, touch, drover) else {
        return Ok(None);
    };
    Ok(Some(Args {
        tasks,
        touch,
        drover,
        modes: modes
            .unwrap_or_else(|| "oracle,fixed4000,max,bucketing".into())
            .split(',')
            .map(String::from)
            .collect(),
        workload: workload.unwrap_or_else(|| "W4".into()),
        cores,
        memory_mb,
        trace,
        sample_ms: sample_ms.max(10),
    }))
}

/// Resident MB of every descendant of `root`, from /proc: what the worker's
/// tasks (and their monitors) really hold.
fn tree_rss_mb(root: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces; the fields after its ')' do not.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as f64 / 1_048_576.0;
    let (mut total, mut stack) = (0.0, children.get(&root).cloned().unwrap_or_default());
    while let Some(pid) = stack.pop() {
        stack.extend(children.get(&pid).into_iter().flatten());
        let pages = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
        total += pages.unwrap_or(0) as f64 * page;
    }
    total
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(mode: &str, tasks: &[Spec], a: &Args, bound: f64) -> String {
    let mut builder = Manager::builder().port(0).bind("127.0.0.1");
    // For comparisons: DROVER_PREFETCH=0 turns sending tasks ahead off.
    if let Some(n) = std::env::var("DROVER_PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.prefetch(n);
    }
    let manager = builder.build().expect("start the manager");
    let workdir = std::env::temp_dir().join(format!("drover-w4-{}-{mode}", std::process::id()));
    let worker = KillOnDrop(
        Command::new(&a.drover)
            .arg("worker")
            .arg(format!("127.0.0.1:{}", manager.port()))
            .args(["--cores", &a.cores.to_string()])
            .args(["--memory", &a.memory_mb.to_string(), "--disk", "20000"])
            .arg("--workdir")
            .arg(&workdir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start drover worker"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while manager.stats().workers_connected < 1 {
        assert!(Instant::now() < deadline, "the worker did not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    let category = format!("w4-{mode}");
    let config = match mode {
        "max" => Some(CategoryConfig::max_seen()),
        "bucketing-kill" => Some(CategoryConfig::bucketing().grow_in_place(false)),
        _ => None,
    };
    if let Some(config) = config {
        manager.set_category(&category, config).expect("category");
    }
    let worker_pid = worker.0.id();
    let start = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (wall, lost, retries, peak_true, results, samples) = std::thread::scope(|scope| {
        let sampler = a
            .trace
            .is_some()
            .then(|| scope.spawn(|| sample(&manager, worker_pid, start, a.sample_ms, &done)));
        for spec in tasks {
            let task = Task::new(spec.command(&a.touch)).category(category.clone());
            let task = match mode {
                "oracle" => task.cores(spec.cores()).memory_mb(spec.x + 16),
                "fixed4000" => task.cores(spec.cores()).memory_mb(4000),
                "bucketing-cores" => task.cores(spec.cores()),
                _ => task,
            };
            manager.submit(task).expect("submit");
        }
        let out = collect(mode, tasks.len(), &manager);
        let wall = start.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = sampler.map(|s| s.join().expect("the sampler thread"));
        (wall, out.0, out.1, out.2, out.3, samples)
    });
    if let Some(prefix) = &a.trace {
        if let Err(e) = write_trace(prefix, &results, samples.as_deref().unwrap_or(&[])) {
            eprintln!("{mode}: writing the trace {prefix}.*: {e}");
        }
    }
    let stats = manager.category_stats(&category);
    let buckets: Vec<u64> = stats
        .as_ref()
        .map(|s| s.buckets.iter().map(|b| b.allocation.memory_mb).collect())
        .unwrap_or_default();
    let waste = stats.as_ref().map(|s| s.waste_memory_mb_s).unwrap_or(0.0);
    let grown = manager.stats().tasks_grown;
    let _ = std::fs::remove_dir_all(&workdir);
    format!(
        "{{\"system\":\"drover\",\"workload\":{:?},\"mode\":\"{mode}\",\"n\":{},\"wall_s\":{:.3},\"tasks_per_s\":{:.3},\"ratio_to_bound\":{:.3},\"retries\":{retries},\"grown\":{grown},\"lost\":{lost},\"largest_task_peak_mb\":{:.0},\"buckets_mb\":{:?},\"waste_memory_mb_s\":{:.0}}}",
        a.workload,
        tasks.len(),
        wall,
        tasks.len() as f64 / wall,
        wall / bound,
        peak_true,
        buckets,
        waste
    )
}

/// One sample of a run: seconds since the first submit, memory and cores
/// booked on the master, tasks it counts running, MB resident under the worker.
struct Sample {
    t: f64,
    booked_mb: u64,
    booked_cores: u32,
    running: u64,
    used_mb: f64,
}

fn sample(
    manager: &Manager,
    worker_pid: u32,
    start: Instant,
    every_ms: u64,
    done: &std::sync::atomic::AtomicBool,
) -> Vec<Sample> {
    let mut out = Vec::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let stats = manager.stats();
        out.push(Sample {
            t: start.elapsed().as_secs_f64(),
            booked_mb: stats.resources_in_use.memory_mb,
            booked_cores: stats.resources_in_use.cores,
            running: stats.tasks_running,
            used_mb: tree_rss_mb(worker_pid),
        });
        std::thread::sleep(Duration::from_millis(every_ms));
    }
    out
}

fn write_trace(prefix: &str, results: &[TaskResult], samples: &[Sample]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.tasks.jsonl"))?);
    for r in results {
        writeln!(
            f,
            "{}",
            serde_json::to_string(r).map_err(std::io::Error::other)?
        )?;
    }
    f.flush()?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.samples.csv"))?);
    writeln!(f, "t_s,host,booked_mb,booked_cores,running,used_mb")?;
    for s in samples {
        writeln!(
            f,
            "{:.3},all,{},{},{},{:.0}",
            s.t, s.booked_mb, s.booked_cores, s.running, s.used_mb
        )?;
    }
    f.flush()
}

/// Waits for `n` results: (lost, retries, largest peak, the results).
fn collect(mode: &str, n: usize, manager: &Manager) -> (usize, usize, f64, Vec<TaskResult>) {
    let (mut lost, mut retries, mut peak_true) = (0, 0, 0.0f64);
    let mut results = Vec::with_capacity(n);
    for _ in 0..n {
        let r = manager
            .wait(Some(Duration::from_secs(600)))
            .expect("a result within 10 minutes");
        retries += r.attempts.len().saturating_sub(1);
        if std::env::var_os("W4_VERBOSE").is_some() {
            let tries: Vec<String> = r
                .attempts
                .iter()
                .map(|a| {
                    format!(
                        "{}MB/{}c: {}",
                        a.allocation.memory_mb, a.allocation.cores, a.ending
                    )
                })
                .collect();
            // Seconds since the first submit: when the last attempt started
            // and when the task finished, for a timeline of the run.
            let since = |t: std::time::SystemTime| {
                t.duration_since(r.submitted)
                    .map_or(0.0, |d| d.as_secs_f64())
            };
            eprintln!(
                "{mode}: task {} {:?} peak {:.0} MB last start {:.1} s end {:.1} s: {tries:?}",
                r.id,
                r.outcome,
                r.measured.memory_mb,
                r.started.map_or(-1.0, since),
                since(r.finished)
            );
        }
        if r.outcome != Outcome::Success {
            lost += 1;
            eprintln!("{mode}: task {} {:?}: {:?}", r.id, r.outcome, r.error);
        }
        peak_true = peak_true.max(r.measured.memory_mb);
        results.push(r);
    }
    (lost, retries, peak_true, results)
}

fn main() {
    let a = match args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            eprintln!("usage: w4 --tasks FILE --touch BIN --drover BIN [--modes oracle,fixed4000,max,bucketing,bucketing-cores] [--workload NAME] [--cores 12] [--memory-mb 12000] [--trace PREFIX] [--sample-ms 100]; see benches/w4/honest.sh");
            return;
        }
        Err(e) => {
            eprintln!("w4: {e}");
            std::process::exit(2);
        }
    };
    let text = std::fs::read_to_string(&a.tasks).expect("read the task list");
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let p: Vec<&str> = line.split_whitespace().collect();
        if p.is_empty() {
            continue;
        }
        let spec = match p[..] {
            [x, t] => x.parse().ok().zip(t.parse().ok()).map(|(x, t)| (x, t, 0)),
            [x, t, c] => x
                .parse()
                .ok()
                .zip(t.parse().ok())
                .zip(c.parse().ok())
                .map(|((x, t), c)| (x, t, c)),
            _ => None,
        };
        let Some((x, t, threads)) = spec else {
            eprintln!("w4: {}:{}: want X_MB T_S [CORES]", a.tasks, i + 1);
            std::process::exit(2);
        };
        tasks.push(Spec { x, t, threads });
    }
    let bound = (tasks.iter().map(|s| s.x as f64 * s.t).sum::<f64>() / a.memory_mb as f64).max(
        tasks
            .iter()
            .map(|s| f64::from(s.cores()) * s.t)
            .sum::<f64>()
            / f64::from(a.cores),
    );
    for mode in &a.modes {
        println!("{}", run(mode, &tasks, &a, bound));
    }
}
