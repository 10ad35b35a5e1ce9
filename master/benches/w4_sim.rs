//! W4 in simulation: the real allocator (`drover_master::category`) on a
//! model of the W4 worker, to compare allocation policies in seconds and
//! without the noise of a shared machine. Not a benchmark of drover itself:
//! `benches/w4/run.sh` measures the real thing.
//!
//! The model, calibrated on the 2-core VM where W4 runs: one worker declaring
//! 12 cores and 12,000 MB on a machine with `--cpus` real cores (2) that
//! touch `--rate` MB/s each (1,600); a task touches its X MB (CPU-bound,
//! the touching tasks share the real cores equally) and then sleeps T s. The
//! monitor samples every task's memory every `--interval` s (1.0) from the
//! attempt's start and kills it when the sample is over its allocation (the
//! value seen is the sample). Placement is first-come first-served with
//! backfill (a waiting task that does not fit does not hold back later
//! ones), like the master's scheduler; a task killed for its memory waits
//! for its rung, re-decided whenever the category learns, as in the engine.
//! Modes: `oracle` (each task declares X + 16 MB) and `bucketing` (the
//! default category). `--warm` records every task's true peak into the
//! category first: the best learning can do (one kill per big task);
//! `W4SIM_VERBOSE=1` prints each task's attempts.
//!
//! `cargo bench -p drover-master --bench w4_sim -- --tasks FILE` (task list
//! from `benches/w4/gen_tasks.py`); prints one JSON line per mode.

use drover_master::category::{CategoryConfig, CategoryState, Dim, Sample};
use drover_master::scheduler::Request;
use drover_master::Resources;

struct Running {
    task: usize,
    alloc: Resources,
    whole: bool,
    touched: f64,
    sleep_left: f64,
    started: f64,
    next_sample: f64,
}

/// A waiting task: its index, its rung (`None` for a first attempt, which
/// asks the category), and the kill (allocation, whole worker, seen MB) its
/// rung comes from.
type Waiting = (usize, Option<Request>, Option<(Resources, bool, f64)>);

struct Params {
    warm: bool,
    cpus: f64,
    rate: f64,
    interval: f64,
}

struct Outcome {
    makespan: f64,
    kills: usize,
    wasted_mb: f64,
    useful_mb: f64,
}

fn simulate(tasks: &[(u64, f64)], oracle: bool, p: &Params) -> Outcome {
    let worker = Resources {
        cores: 12,
        memory_mb: 12_000,
        disk_mb: 0,
        gpus: 0,
    };
    let mut cat = CategoryState::new("w4", CategoryConfig::bucketing());
    if p.warm {
        // Learned beforehand from the same tasks: the best case of learning.
        for &(x, t) in tasks {
            let s = Sample {
                cores: 0.5,
                memory_mb: x as f64 + 16.0,
                disk_mb: 0.0,
                wall_s: t + x as f64 / 1600.0,
            };
            cat.record(s, &worker);
        }
    }
    // In submission order, which is the scheduler's order.
    let mut waiting: Vec<Waiting> = (0..tasks.len()).map(|i| (i, None, None)).collect();
    let mut running: Vec<Running> = Vec::new();
    let (mut free_cores, mut free_mem) = (12u64, 12_000u64);
    let (mut t, dt) = (0.0f64, 0.005f64);
    let (mut done, mut kills, mut wasted, mut useful) = (0usize, 0usize, 0.0f64, 0.0f64);
    let none = Resources::default();
    let verbose = std::env::var_os("W4SIM_VERBOSE").is_some() && !oracle;
    let mut ladder: Vec<Vec<String>> = vec![Vec::new(); tasks.len()];
    while done < tasks.len() {
        // Place in seq order with backfill.
        let mut i = 0;
        while i < waiting.len() {
            let (task, rung, _) = waiting[i];
            let request = match (oracle, rung) {
                (true, _) => Request::Fixed(Resources {
                    cores: 1,
                    memory_mb: tasks[task].0 + 16,
                    ..Default::default()
                }),
                (false, Some(r)) => r,
                (false, None) => cat.first(&none, &worker),
            };
            let (alloc, whole, fits) = match request {
                Request::Fixed(r) => (
                    r,
                    false,
                    u64::from(r.cores) <= free_cores && r.memory_mb <= free_mem,
                ),
                Request::WholeWorker => (worker, true, running.is_empty()),
            };
            if !fits {
                i += 1;
                continue;
            }
            waiting.remove(i);
            cat.note_allocation();
            free_cores -= u64::from(alloc.cores);
            free_mem -= alloc.memory_mb;
            running.push(Running {
                task,
                alloc,
                whole,
                touched: 0.0,
                sleep_left: tasks[task].1,
                started: t,
                next_sample: t + p.interval,
            });
        }
        // Advance.
        t += dt;
        let touching = running
            .iter()
            .filter(|r| r.touched < tasks[r.task].0 as f64)
            .count();
        let share = if touching == 0 {
            0.0
        } else {
            (p.cpus / touching as f64).min(1.0)
        };
        let mut k = 0;
        while k < running.len() {
            let r = &mut running[k];
            let x = tasks[r.task].0 as f64;
            if r.touched < x {
                r.touched = (r.touched + p.rate * share * dt).min(x);
            } else {
                r.sleep_left -= dt;
            }
            let mut ended = None;
            if r.touched >= x && r.sleep_left <= 0.0 {
                ended = Some(false);
            } else if t >= r.next_sample {
                r.next_sample += p.interval;
                // The shell and the program add a little.
                if r.touched + 16.0 > r.alloc.memory_mb as f64 {
                    ended = Some(true);
                }
            }
            let Some(killed) = ended else {
                k += 1;
                continue;
            };
            let r = running.swap_remove(k);
            free_cores += u64::from(r.alloc.cores);
            free_mem += r.alloc.memory_mb;
            let seen = r.touched + 16.0;
            let used = Sample {
                cores: 0.5,
                memory_mb: seen,
                disk_mb: 0.0,
                wall_s: t - r.started,
            };
            if !oracle {
                cat.record_attempt(&r.alloc, &used, killed);
            }
            if verbose {
                ladder[r.task].push(format!(
                    "{}{}@{:.1}",
                    r.alloc.memory_mb,
                    if killed { "x" } else { "ok" },
                    r.started
                ));
                if !killed {
                    eprintln!(
                        "task {} X {} end {:.1}: {}",
                        r.task,
                        tasks[r.task].0,
                        t,
                        ladder[r.task].join(" ")
                    );
                }
            }
            if killed {
                kills += 1;
                wasted += r.touched;
                let next = cat.retry_seen(&r.alloc, r.whole, Dim::Memory, seen, &none, &worker);
                match next {
                    Some(n) => {
                        let pos = waiting.partition_point(|(s, _, _)| *s < r.task);
                        waiting.insert(pos, (r.task, Some(n), Some((r.alloc, r.whole, seen))));
                    }
                    None => panic!("task {} exhausted the ladder", r.task),
                }
            } else {
                useful += r.touched;
                done += 1;
                if !oracle {
                    // As the engine does: when the category learned
                    // something, tasks waiting for a rung after a kill
                    // take the rung it would choose now.
                    if cat.record(used, &worker) {
                        for w in waiting.iter_mut() {
                            if let (Some(_), Some((failed, whole, seen))) = (w.1, w.2) {
                                if let Some(n) = cat.retry_seen(
                                    &failed,
                                    whole,
                                    Dim::Memory,
                                    seen,
                                    &none,
                                    &worker,
                                ) {
                                    w.1 = Some(n);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Outcome {
        makespan: t,
        kills,
        wasted_mb: wasted,
        useful_mb: useful,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut file, mut p) = (
        None,
        Params {
            warm: false,
            cpus: 2.0,
            rate: 1600.0,
            interval: 1.0,
        },
    );
    while let Some(a) = args.next() {
        let mut num = |d: f64| args.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match a.as_str() {
            "--tasks" => file = args.next(),
            "--cpus" => p.cpus = num(2.0),
            "--rate" => p.rate = num(1600.0),
            "--interval" => p.interval = num(1.0),
            "--warm" => p.warm = true,
            _ => {}
        }
    }
    let Some(file) = file else {
        eprintln!("usage: w4_sim --tasks FILE [--cpus 2] [--rate 1600] [--interval 1.0] [--warm]");
        return;
    };
    let text = std::fs::read_to_string(&file).expect("read the task list");
    let tasks: Vec<(u64, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    let oracle = simulate(&tasks, true, &p);
    for (mode, o) in [
        ("oracle", &oracle),
        ("bucketing", &simulate(&tasks, false, &p)),
    ] {
        println!(
            "{{\"system\":\"drover-sim\",\"workload\":\"W4\",\"mode\":\"{mode}\",\"n\":{},\"wall_s\":{:.2},\"x_oracle\":{:.3},\"kills\":{},\"wasted_gb\":{:.1},\"useful_gb\":{:.1}}}",
            tasks.len(),
            o.makespan,
            o.makespan / oracle.makespan,
            o.kills,
            o.wasted_mb / 1000.0,
            o.useful_mb / 1000.0
        );
    }
}
