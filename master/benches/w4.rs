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
//! * `bucketing-kill`: the same with growing in place off, so that every
//!   task over its allocation is killed and retried.
//!
//! Prints one JSON line per mode. Run through `benches/w4/run.sh`, which
//! builds the task program and runs Work Queue on the same tasks.
//!
//! `cargo test` runs bench targets without arguments; this one then does
//! nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{CategoryConfig, Manager, Outcome, Task};

struct Args {
    tasks: String,
    touch: String,
    drover: String,
    modes: Vec<String>,
}

fn args() -> Option<Args> {
    let mut it = std::env::args().skip(1);
    let (mut tasks, mut touch, mut drover, mut modes) = (None, None, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tasks" => tasks = it.next(),
            "--touch" => touch = it.next(),
            "--drover" => drover = it.next(),
            "--modes" => modes = it.next(),
            _ => {}
        }
    }
    Some(Args {
        tasks: tasks?,
        touch: touch?,
        drover: drover?,
        modes: modes
            .unwrap_or_else(|| "oracle,fixed4000,max,bucketing".into())
            .split(',')
            .map(String::from)
            .collect(),
    })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(mode: &str, tasks: &[(u64, f64)], a: &Args, bound: f64) -> String {
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
    let _worker = KillOnDrop(
        Command::new(&a.drover)
            .arg("worker")
            .arg(format!("127.0.0.1:{}", manager.port()))
            .args(["--cores", "12", "--memory", "12000", "--disk", "20000"])
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
    let start = Instant::now();
    for (x, t) in tasks {
        let task = Task::new(format!("{} {x} {t}", a.touch)).category(category.clone());
        let task = match mode {
            "oracle" => task.cores(1).memory_mb(x + 16),
            "fixed4000" => task.cores(1).memory_mb(4000),
            _ => task,
        };
        manager.submit(task).expect("submit");
    }
    let (mut lost, mut retries, mut peak_true) = (0, 0, 0.0f64);
    for _ in 0..tasks.len() {
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
    }
    let wall = start.elapsed().as_secs_f64();
    let stats = manager.category_stats(&category);
    let buckets: Vec<u64> = stats
        .as_ref()
        .map(|s| s.buckets.iter().map(|b| b.allocation.memory_mb).collect())
        .unwrap_or_default();
    let waste = stats.as_ref().map(|s| s.waste_memory_mb_s).unwrap_or(0.0);
    let grown = manager.stats().tasks_grown;
    let _ = std::fs::remove_dir_all(&workdir);
    format!(
        "{{\"system\":\"drover\",\"workload\":\"W4\",\"mode\":\"{mode}\",\"n\":{},\"wall_s\":{:.3},\"tasks_per_s\":{:.3},\"ratio_to_bound\":{:.3},\"retries\":{retries},\"grown\":{grown},\"lost\":{lost},\"largest_task_peak_mb\":{:.0},\"buckets_mb\":{:?},\"waste_memory_mb_s\":{:.0}}}",
        tasks.len(),
        wall,
        tasks.len() as f64 / wall,
        wall / bound,
        peak_true,
        buckets,
        waste
    )
}

fn main() {
    let Some(a) = args() else {
        eprintln!("usage: w4 --tasks FILE --touch BIN --drover BIN [--modes oracle,fixed4000,max,bucketing]; see benches/w4/run.sh");
        return;
    };
    let text = std::fs::read_to_string(&a.tasks).expect("read the task list");
    let tasks: Vec<(u64, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?))
        })
        .collect();
    let bound = (tasks.iter().map(|(x, t)| *x as f64 * t).sum::<f64>() / 12_000.0)
        .max(tasks.iter().map(|(_, t)| t).sum::<f64>() / 12.0);
    for mode in &a.modes {
        println!("{}", run(mode, &tasks, &a, bound));
    }
}
