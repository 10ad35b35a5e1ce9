//! Property tests for the scheduler against a plain model of the master's
//! bookkeeping: whatever sequence of events arrives, no worker is ever
//! overcommitted, every placement fits where it lands, a task is placed at
//! most once per time it is queued, nothing that fits is left waiting after
//! a schedule, and draining releases everything that fits some worker.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use drover_master::scheduler::{FileKey, Placement, Request, Scheduler, TaskId, WorkerKey};
use drover_protocol::Resources;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    AddWorker(WorkerKey, Resources),
    RemoveWorker(WorkerKey),
    Enqueue {
        request: Request,
        priority: i32,
        file: Option<FileKey>,
    },
    Cancel(usize),
    Schedule(Option<usize>),
    Release(usize),
    NoteCached(WorkerKey, FileKey),
}

fn worker_size() -> impl Strategy<Value = Resources> {
    (
        1u32..=8,
        prop::sample::select(vec![1000u64, 4000, 8000]),
        prop::sample::select(vec![0u64, 1000]),
        0u32..=2,
    )
        .prop_map(|(cores, memory_mb, disk_mb, gpus)| Resources {
            cores,
            memory_mb,
            disk_mb,
            gpus,
        })
}

fn request() -> impl Strategy<Value = Request> {
    let fixed = (
        0u32..=5,
        prop::sample::select(vec![0u64, 500, 1000, 3000, 9000]),
        prop::sample::select(vec![0u64, 0, 100]),
        prop::sample::select(vec![0u32, 0, 0, 1, 3]),
    )
        .prop_map(|(cores, memory_mb, disk_mb, gpus)| {
            Request::Fixed(Resources {
                cores,
                memory_mb,
                disk_mb,
                gpus,
            })
        });
    prop_oneof![9 => fixed, 1 => Just(Request::WholeWorker)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u32..6, worker_size()).prop_map(|(w, r)| Op::AddWorker(w, r)),
        1 => (0u32..6).prop_map(Op::RemoveWorker),
        8 => (request(), -2i32..=2, prop::option::of(0u32..4))
            .prop_map(|(request, priority, file)| Op::Enqueue { request, priority, file }),
        1 => any::<usize>().prop_map(Op::Cancel),
        3 => prop::option::of(0usize..4).prop_map(Op::Schedule),
        4 => any::<usize>().prop_map(Op::Release),
        2 => (0u32..6, 0u32..4).prop_map(|(w, f)| Op::NoteCached(w, f)),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    request: Request,
    priority: i32,
    seq: u64,
}

#[derive(Default)]
struct Model {
    /// total, and what is reserved on it.
    workers: BTreeMap<WorkerKey, (Resources, Resources)>,
    waiting: BTreeMap<TaskId, Queued>,
    /// worker, allocation, and how to requeue it.
    running: BTreeMap<TaskId, (WorkerKey, Resources, Queued)>,
    next_task: TaskId,
}

impl Model {
    fn free(&self, worker: WorkerKey) -> Resources {
        let (total, used) = self.workers[&worker];
        total.saturating_sub(&used)
    }

    fn busy(&self, worker: WorkerKey) -> bool {
        self.running.values().any(|(w, _, _)| *w == worker)
    }

    fn fits_now(&self, request: &Request) -> bool {
        self.workers.keys().any(|&w| match request {
            Request::Fixed(r) => r.fits_in(&self.free(w)),
            Request::WholeWorker => !self.busy(w),
        })
    }

    fn fits_ever(&self, request: &Request) -> bool {
        self.workers.values().any(|(total, _)| match request {
            Request::Fixed(r) => r.fits_in(total),
            Request::WholeWorker => true,
        })
    }

    fn accept(&mut self, placements: &[Placement]) -> Result<(), TestCaseError> {
        let mut seen = BTreeSet::new();
        for p in placements {
            prop_assert!(
                seen.insert(p.task),
                "task {} placed twice in one call",
                p.task
            );
            let Some(queued) = self.waiting.remove(&p.task) else {
                return Err(TestCaseError::fail(format!(
                    "task {} placed but not waiting",
                    p.task
                )));
            };
            prop_assert!(self.workers.contains_key(&p.worker), "unknown worker");
            let free = self.free(p.worker);
            prop_assert!(
                p.allocation.fits_in(&free),
                "{p:?} does not fit in {free:?}"
            );
            match queued.request {
                Request::Fixed(r) => prop_assert_eq!(p.allocation, r),
                Request::WholeWorker => {
                    prop_assert!(!self.busy(p.worker), "whole-worker task on a busy worker");
                    prop_assert_eq!(p.allocation, self.workers[&p.worker].0);
                }
            }
            if let Some((total, used)) = self.workers.get_mut(&p.worker) {
                *used = used.saturating_add(&p.allocation);
                prop_assert!(used.fits_in(total), "overcommitted");
            }
            self.running
                .insert(p.task, (p.worker, p.allocation, queued));
        }
        Ok(())
    }

    fn check(&self, s: &Scheduler) -> Result<(), TestCaseError> {
        prop_assert_eq!(s.waiting(), self.waiting.len());
        for &w in self.workers.keys() {
            prop_assert_eq!(s.free(w), Some(self.free(w)));
        }
        let queued: usize = s.demand().iter().map(|(_, n)| n).sum();
        prop_assert_eq!(queued, self.waiting.len());
        Ok(())
    }

    /// After an unbounded schedule nothing waiting may fit anywhere.
    fn check_work_conserving(&self) -> Result<(), TestCaseError> {
        for (task, q) in &self.waiting {
            prop_assert!(
                !self.fits_now(&q.request),
                "task {task} ({:?}) left waiting although it fits",
                q.request
            );
        }
        Ok(())
    }
}

fn release(s: &mut Scheduler, m: &mut Model, task: TaskId) {
    if let Some((worker, allocation, _)) = m.running.remove(&task) {
        s.release(worker, allocation);
        if let Some((_, used)) = m.workers.get_mut(&worker) {
            *used = used.saturating_sub(&allocation);
        }
    }
}

fn apply(s: &mut Scheduler, m: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::AddWorker(w, total) => {
            if let Entry::Vacant(slot) = m.workers.entry(w) {
                s.add_worker(w, total);
                slot.insert((total, Resources::default()));
            }
        }
        Op::RemoveWorker(w) => {
            s.remove_worker(w);
            m.workers.remove(&w);
            let lost: Vec<_> = m
                .running
                .iter()
                .filter(|(_, (on, _, _))| *on == w)
                .map(|(t, (_, _, q))| (*t, *q))
                .collect();
            for (task, q) in lost {
                m.running.remove(&task);
                s.enqueue(task, q.request, q.priority, q.seq, &[]);
                m.waiting.insert(task, q);
            }
        }
        Op::Enqueue {
            request,
            priority,
            file,
        } => {
            let task = m.next_task;
            m.next_task += 1;
            let inputs: Vec<FileKey> = file.into_iter().collect();
            s.enqueue(task, request, priority, task, &inputs);
            m.waiting.insert(
                task,
                Queued {
                    request,
                    priority,
                    seq: task,
                },
            );
        }
        Op::Cancel(i) => {
            if m.next_task > 0 {
                let task = (i as u64) % m.next_task;
                let was = m.waiting.remove(&task).is_some();
                prop_assert_eq!(s.remove_waiting(task), was);
            }
        }
        Op::Schedule(max) => {
            let mut out = Vec::new();
            match max {
                Some(max) => {
                    s.schedule_up_to(&mut out, max);
                    prop_assert!(out.len() <= max);
                }
                None => s.schedule(&mut out),
            }
            m.accept(&out)?;
            if max.is_none() {
                m.check_work_conserving()?;
            }
        }
        Op::Release(i) => {
            if !m.running.is_empty() {
                let task = *m.running.keys().nth(i % m.running.len()).unwrap_or(&0);
                release(s, m, task);
            }
        }
        Op::NoteCached(w, f) => {
            if m.workers.contains_key(&w) {
                s.note_cached(w, f);
            }
        }
    }
    m.check(s)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn scheduler_never_overcommits_and_drains(ops in prop::collection::vec(op(), 1..120)) {
        let mut s = Scheduler::new();
        let mut m = Model::default();
        for op in ops {
            apply(&mut s, &mut m, op)?;
        }
        // Drain: finish everything, schedule, repeat. Each round places at
        // least one task while some waiting task fits an empty worker.
        loop {
            let running: Vec<TaskId> = m.running.keys().copied().collect();
            for task in running {
                release(&mut s, &mut m, task);
            }
            m.check(&s)?;
            let mut out = Vec::new();
            s.schedule(&mut out);
            m.accept(&out)?;
            m.check_work_conserving()?;
            if out.is_empty() {
                break;
            }
        }
        for (task, q) in &m.waiting {
            prop_assert!(
                !m.fits_ever(&q.request),
                "task {task} ({:?}) fits some worker but was never placed",
                q.request
            );
        }
    }

    #[test]
    fn placements_follow_priority_then_seq_within_a_shape(
        prios in prop::collection::vec(-3i32..=3, 1..60),
        cores in 1u32..=4,
    ) {
        let mut s = Scheduler::new();
        let r = Request::Fixed(Resources { cores: 1, ..Default::default() });
        for (i, p) in prios.iter().enumerate() {
            s.enqueue(i as u64, r, *p, i as u64, &[]);
        }
        s.add_worker(0, Resources { cores, ..Default::default() });
        let mut order = Vec::new();
        let mut out = Vec::new();
        loop {
            out.clear();
            s.schedule(&mut out);
            if out.is_empty() {
                break;
            }
            for p in &out {
                order.push(p.task);
                s.release(p.worker, p.allocation);
            }
        }
        let mut expected: Vec<u64> = (0..prios.len() as u64).collect();
        expected.sort_by_key(|&t| (std::cmp::Reverse(prios[t as usize]), t));
        prop_assert_eq!(order, expected);
    }
}
