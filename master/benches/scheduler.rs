//! Scheduler throughput and memory.
//!
//! Steady state with 1,000 workers, 20 request shapes and 100,000 queued
//! tasks: each step finishes the oldest running task, submits a new one and
//! schedules, so every step places about one task into the hole that just
//! opened. Prints one JSON line with placements per second, and one with
//! the scheduler's heap bytes per queued task (from a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use criterion::{Criterion, Throughput};
use drover_master::scheduler::{FileKey, Placement, Request, Scheduler};
use drover_protocol::Resources;

/// Counts live heap bytes so the memory per queued task can be measured
/// without outside tools.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WORKERS: u32 = 1000;
const QUEUED: usize = 100_000;
const FILES: u32 = 50;

/// Deterministic workload generator (a 64-bit LCG), so runs are comparable.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// 4 core counts x 5 memory sizes = 20 shapes.
fn shapes() -> Vec<Request> {
    let mut v = Vec::new();
    for cores in [1u32, 2, 4, 8] {
        for gb in [1u64, 2, 4, 8, 16] {
            v.push(Request::Fixed(Resources {
                cores,
                memory_mb: gb * 1024 * cores.min(2) as u64,
                disk_mb: 1000,
                gpus: 0,
            }));
        }
    }
    v
}

struct Bench {
    sched: Scheduler,
    shapes: Vec<Request>,
    gen: Gen,
    running: VecDeque<Placement>,
    next_task: u64,
    out: Vec<Placement>,
}

impl Bench {
    fn new() -> Self {
        let mut b = Bench {
            sched: Scheduler::new(),
            shapes: shapes(),
            gen: Gen(42),
            running: VecDeque::new(),
            next_task: 0,
            out: Vec::new(),
        };
        for w in 0..WORKERS {
            let cores = [8u32, 16, 32][w as usize % 3];
            b.sched.add_worker(
                w,
                Resources {
                    cores,
                    memory_mb: cores as u64 * 4096,
                    disk_mb: 200_000,
                    gpus: u32::from(w < WORKERS / 10),
                },
            );
            b.sched.note_cached(w, w % FILES);
            b.sched.note_cached(w, (w * 7 + 3) % FILES);
        }
        for _ in 0..QUEUED {
            b.submit();
        }
        b.out.clear();
        b.sched.schedule(&mut b.out);
        b.running.extend(b.out.drain(..));
        while b.sched.waiting() < QUEUED {
            b.submit();
        }
        b
    }

    fn submit(&mut self) {
        let r = self.gen.next();
        let shape = self.shapes[(r % self.shapes.len() as u64) as usize];
        // One task in eight is urgent, one in four has a cached input.
        let priority = i32::from((r >> 8) & 7 == 0);
        let file: Option<FileKey> =
            ((r >> 12) & 3 == 0).then_some(((r >> 16) % FILES as u64) as u32);
        let inputs: &[FileKey] = match &file {
            Some(f) => std::slice::from_ref(f),
            None => &[],
        };
        self.sched
            .enqueue(self.next_task, shape, priority, self.next_task, inputs);
        self.next_task += 1;
    }

    /// One task finishes, one is submitted, the scheduler fills the gap.
    /// Returns how many tasks were placed.
    fn step(&mut self) -> usize {
        if let Some(done) = self.running.pop_front() {
            self.sched.release(done.worker, done.allocation);
        }
        self.submit();
        self.out.clear();
        self.sched.schedule(&mut self.out);
        let n = self.out.len();
        self.running.extend(self.out.drain(..));
        n
    }
}

fn throughput_line(steps: usize) {
    let mut b = Bench::new();
    // Warm up into the steady state before timing.
    for _ in 0..steps / 10 {
        b.step();
    }
    let start = Instant::now();
    let mut placed = 0usize;
    for _ in 0..steps {
        placed += b.step();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"system\":\"drover\",\"workload\":\"scheduler\",\"n\":{},\"workers\":{},\"shapes\":{},\"queued\":{},\"placements_per_s\":{:.0}}}",
        placed,
        WORKERS,
        b.shapes.len(),
        b.sched.waiting(),
        placed as f64 / secs
    );
}

/// Heap growth of the scheduler while `QUEUED` tasks are added, per task.
/// Submission order is sequential (the common case) and, separately, with
/// every task at a random priority (B-tree inserts land mid-node).
fn memory_line() {
    for (label, random_priority) in [("sequential", false), ("random_priority", true)] {
        let mut sched = Scheduler::new();
        for w in 0..WORKERS {
            sched.add_worker(
                w,
                Resources {
                    cores: 16,
                    memory_mb: 65536,
                    ..Default::default()
                },
            );
        }
        let shapes = shapes();
        let mut gen = Gen(7);
        let before = LIVE.load(Ordering::Relaxed);
        for t in 0..QUEUED as u64 {
            let r = gen.next();
            let priority = if random_priority {
                (r >> 20) as i32 % 1000
            } else {
                0
            };
            let inputs = [(r % FILES as u64) as u32];
            sched.enqueue(t, shapes[(r % 20) as usize], priority, t, &inputs);
        }
        let after = LIVE.load(Ordering::Relaxed);
        println!(
            "{{\"system\":\"drover\",\"workload\":\"scheduler_memory\",\"order\":\"{}\",\"queued\":{},\"bytes_per_queued_task\":{:.1}}}",
            label,
            QUEUED,
            (after - before) as f64 / QUEUED as f64
        );
        black_box(&sched);
    }
}

fn bench(c: &mut Criterion) {
    let mut b = Bench::new();
    let mut group = c.benchmark_group("scheduler");
    group.throughput(Throughput::Elements(1));
    group.bench_function("steady_state_1000w_20shapes_100k_queued", |bencher| {
        bencher.iter(|| black_box(b.step()))
    });
    group.finish();
}

fn main() {
    // `cargo test` runs this binary without `--bench`; keep that quick.
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    throughput_line(if full { 500_000 } else { 1000 });
    memory_line();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
