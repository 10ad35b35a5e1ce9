//! The task lifecycle driven in-process: the engine's inputs are called
//! directly, its clock is moved by hand, and a recording outbox shows what
//! it sent to which worker and what the user received.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use drover_protocol::Resources;
use drover_protocol::{
    Ending, Hello, LimitHit, MasterMsg, Measured, RunTask, TaskReport, WorkerMsg,
};
use tokio::sync::oneshot;

use super::{Command, Engine, Outbox, Outgoing, Prepared};
use crate::category::CategoryConfig;
use crate::scheduler::WorkerKey;
use crate::task::{Outcome, TaskId, TaskResult};

/// Records what the engine sends, in order.
#[derive(Default)]
struct Recorder {
    sent: Vec<(WorkerKey, Outgoing)>,
    results: Vec<TaskResult>,
}

impl Outbox for Recorder {
    fn to_worker(&mut self, worker: WorkerKey, item: Outgoing) {
        self.sent.push((worker, item));
    }

    fn to_user(&mut self, result: TaskResult) {
        self.results.push(result);
    }
}

fn mb(cores: u32, memory_mb: u64) -> Resources {
    Resources {
        cores,
        memory_mb,
        ..Default::default()
    }
}

/// A worker of one core, 1,000 MB and 1,000 MB of disk.
fn one_core_worker() -> Resources {
    Resources {
        disk_mb: 1000,
        ..mb(1, 1000)
    }
}

/// Joins worker 1, submits three tasks and places them: task 1 runs, task 2
/// is sent ahead, task 3 waits.
fn three_on_one_worker(h: &mut Harness, worker: Resources, task: Resources) {
    h.join(1, worker);
    for id in 1..=3 {
        h.submit(id, "", task);
    }
    h.e.schedule();
    let runs = run_ids(h);
    assert_eq!(runs, vec![(1, false), (2, true)]);
}

/// The tasks sent to run since the last call: (id, sent ahead).
fn run_ids(h: &mut Harness) -> Vec<(TaskId, bool)> {
    h.runs()
        .into_iter()
        .map(|(_, r)| (r.task_id, r.queued))
        .collect()
}

/// A task that declares every resource, so no category learns for it (and
/// it may be sent ahead).
fn declared_task() -> Resources {
    Resources {
        disk_mb: 1,
        ..mb(1, 10)
    }
}

struct Harness {
    e: Engine<Recorder>,
    start: Instant,
}

impl Harness {
    fn new(prefetch: usize) -> Harness {
        let e = Engine::new(Recorder::default(), Default::default(), prefetch);
        let start = e.now;
        Harness { e, start }
    }

    /// Moves the engine's clock to `s` seconds after the start.
    fn at(&mut self, s: f64) {
        self.e.now = self.start + Duration::from_secs_f64(s);
    }

    /// A category whose tasks start at `first_mb` and may grow in place.
    fn category(&mut self, name: &str, first_mb: u64) {
        let config = CategoryConfig::bucketing().first(mb(1, first_mb));
        let (tx, _rx) = oneshot::channel();
        self.e
            .on_command(Command::SetCategory(name.into(), Box::new(config), tx));
    }

    fn join(&mut self, key: WorkerKey, resources: Resources) {
        let hello = Hello {
            protocol: 0,
            drover_version: String::new(),
            hostname: format!("w{key}"),
            os: String::new(),
            arch: String::new(),
            resources,
            password: false,
            cached: Vec::new(),
        };
        let addr: SocketAddr = ([127, 0, 0, 1], 9000 + key as u16).into();
        self.e.worker_joined(key, Box::new(hello), addr);
    }

    fn submit(&mut self, id: TaskId, category: &str, resources: Resources) {
        self.e.on_command(Command::Submit(Box::new(Prepared {
            id,
            command: format!("task {id}"),
            inputs: Default::default(),
            outputs: Vec::new(),
            env: Vec::new(),
            resources,
            wall_time_s: None,
            category: category.into(),
            tag: None,
            priority: 0,
            max_retries: 5,
            environment: None,
            submitted: SystemTime::UNIX_EPOCH,
            call: None,
        })));
    }

    /// What was sent since the last call, as (worker, message).
    fn sent(&mut self) -> Vec<(WorkerKey, MasterMsg)> {
        std::mem::take(&mut self.e.out.sent)
            .into_iter()
            .filter_map(|(w, item)| match item {
                Outgoing::Msg(m) => Some((w, m)),
                _ => None,
            })
            .collect()
    }

    /// The tasks sent since the last call, as (worker, task).
    fn runs(&mut self) -> Vec<(WorkerKey, RunTask)> {
        self.sent()
            .into_iter()
            .map(|(w, m)| match m {
                MasterMsg::Run(run) => (w, *run),
                other => panic!("expected only runs, got {other:?}"),
            })
            .collect()
    }

    /// The tasks sent since the last call, as (worker, task, attempt, sent ahead).
    fn run_summaries(&mut self) -> Vec<(WorkerKey, TaskId, u32, bool)> {
        self.runs()
            .into_iter()
            .map(|(w, r)| (w, r.task_id, r.attempt, r.queued))
            .collect()
    }

    fn grow(&mut self, key: WorkerKey, task_id: TaskId, attempt: u32, used_mb: f64) {
        self.e.on_worker_msg(
            key,
            WorkerMsg::Grow {
                task_id,
                attempt,
                limit_mb: 0.0,
                used_mb,
            },
        );
    }

    fn done(&mut self, key: WorkerKey, report: TaskReport) {
        self.e.on_worker_msg(
            key,
            WorkerMsg::TaskDone {
                report: Box::new(report),
                outputs: Vec::new(),
            },
        );
    }

    /// Worker 1's answer to the recall of task `task_id`'s first attempt.
    fn recalled(&mut self, task_id: TaskId, given_back: bool) {
        self.e.on_worker_msg(
            1,
            WorkerMsg::Recalled {
                task_id,
                attempt: 1,
                given_back,
            },
        );
    }

    fn results(&mut self) -> Vec<TaskResult> {
        std::mem::take(&mut self.e.out.results)
    }
}

fn ended(task_id: TaskId, attempt: u32, ending: Ending, memory_mb: f64) -> TaskReport {
    let mut r = TaskReport::never_started(task_id, attempt, ending, 0);
    r.measured = Measured {
        wall_time_s: 1.0,
        memory_mb,
        cores: 1.0,
        ..Default::default()
    };
    r
}

fn succeeded(task_id: TaskId, attempt: u32, memory_mb: f64) -> TaskReport {
    let mut r = ended(task_id, attempt, Ending::Exited, memory_mb);
    r.exit_code = Some(0);
    r
}

fn over_memory(task_id: TaskId, attempt: u32, limit: f64, value: f64) -> TaskReport {
    let mut r = ended(task_id, attempt, Ending::LimitExceeded, value);
    r.limit_exceeded = Some(LimitHit {
        resource: "memory".into(),
        limit,
        value,
    });
    r
}

fn grow_msg(task_id: TaskId, attempt: u32, memory_mb: Option<u64>) -> MasterMsg {
    MasterMsg::Grow {
        task_id,
        attempt,
        allocation: memory_mb.map(|m| mb(1, m)),
    }
}

/// Two tasks of 1,000 MB fill a worker of `memory_mb`; both run.
fn two_running(h: &mut Harness, memory_mb: u64) {
    h.category("c", 1000);
    h.join(1, mb(2, memory_mb));
    h.submit(1, "c", Resources::default());
    h.submit(2, "c", Resources::default());
    h.e.schedule();
    let runs = h.runs();
    assert_eq!(runs.len(), 2);
    assert!(runs
        .iter()
        .all(|(w, r)| *w == 1 && r.allocation.memory_mb == 1000 && r.growable));
}

#[test]
fn grow_granted_where_it_runs() {
    let mut h = Harness::new(0);
    h.category("c", 1000);
    h.join(1, mb(4, 4000));
    h.submit(1, "c", Resources::default());
    h.e.schedule();
    let runs = h.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1.allocation, mb(1, 1000));
    assert!(runs[0].1.growable);
    h.at(5.0);
    // Nothing bigger is known: it grows by half, and the worker has room.
    h.grow(1, 1, 1, 1000.0);
    assert_eq!(h.sent(), vec![(1, grow_msg(1, 1, Some(1500)))]);
    assert!(h.e.growing_workers.is_empty());
    assert_eq!(h.e.stats().resources_in_use, mb(1, 1500));
    h.done(1, succeeded(1, 1, 1200.0));
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Success);
    assert_eq!(results[0].allocated.memory_mb, 1500);
    assert_eq!(h.e.stats().tasks_grown, 1);
    assert!(h.sent().is_empty());
}

#[test]
fn a_partial_grant_lets_the_task_go_on_with_what_is_free() {
    let mut h = Harness::new(0);
    two_running(&mut h, 2500);
    // It asks for all the worker has (2,500 MB); only 500 MB are free,
    // which is enough to go on with.
    h.grow(1, 1, 1, 2000.0);
    assert_eq!(h.sent(), vec![(1, grow_msg(1, 1, Some(1500)))]);
    assert_eq!(h.e.stats().tasks_grown, 1);
    assert_eq!(h.e.stats().resources_in_use, mb(2, 2500));
    assert!(h.results().is_empty());
}

#[test]
fn refused_growth_is_retried_with_what_it_asked_for() {
    let mut h = Harness::new(0);
    two_running(&mut h, 2000);
    // No room: the first waits for the other to free some.
    h.grow(1, 1, 1, 1000.0);
    assert!(h.sent().is_empty());
    // Both frozen: nothing will free, so the newest is refused.
    h.grow(1, 2, 1, 1000.0);
    assert_eq!(h.sent(), vec![(1, grow_msg(2, 1, None))]);
    // Its worker kills it: its room goes to the first, which goes on.
    h.done(1, over_memory(2, 1, 1000.0, 1000.0));
    assert_eq!(h.sent(), vec![(1, grow_msg(1, 1, Some(1500)))]);
    assert!(h.results().is_empty());
    // It is retried with the 1,500 MB it asked for, once they are free.
    h.e.schedule();
    assert!(h.runs().is_empty());
    h.done(1, succeeded(1, 1, 1400.0));
    h.e.schedule();
    let runs = h.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].1.task_id, runs[0].1.attempt), (2, 2));
    assert_eq!(runs[0].1.allocation.memory_mb, 1500);
    h.done(1, succeeded(2, 2, 1400.0));
    let results = h.results();
    assert_eq!(results.len(), 2);
    let second = &results[1];
    assert_eq!((second.id, &second.outcome), (2, &Outcome::Success));
    assert_eq!(second.attempts.len(), 2);
    assert!(second.attempts[0].ending.starts_with("resource exhausted"));
    assert_eq!(h.e.stats().tasks_resized, 1);
}

#[test]
fn a_growth_reserve_is_released_once_it_outlives_the_growing_age() {
    let mut h = Harness::new(0);
    h.join(1, mb(8, 16_000));
    let config = CategoryConfig::bucketing().min_samples(4);
    let (tx, _rx) = oneshot::channel();
    h.e.on_command(Command::SetCategory("c".into(), Box::new(config), tx));
    // Teach the category a small bucket with rare big tasks, which tasks
    // first asked to grow 2 s into their run.
    let crate::category::registry::Sizing::Learned { cat, .. } =
        h.e.categories.sizing("c", &Resources::default())
    else {
        panic!("a task declaring nothing learns");
    };
    for peak in [400.0, 450.0, 500.0, 3000.0] {
        let m = Measured {
            wall_time_s: 1.0,
            memory_mb: peak,
            cores: 1.0,
            ..Default::default()
        };
        if let Some(requests) =
            h.e.categories
                .attempt_ended(cat, &mb(8, 16_000), &m, false, true)
        {
            h.e.apply_class_requests(requests);
        }
    }
    for _ in 0..crate::category::GROWTH_AGES_MIN {
        h.e.categories.note_growth_age(cat, Duration::from_secs(2));
    }
    h.submit(1, "c", Resources::default());
    h.e.schedule();
    let runs = h.runs();
    assert_eq!(runs.len(), 1);
    let allocation = runs[0].1.allocation;
    let reserve = h.e.workers[&1].growth.room_mb;
    assert!(reserve > 0, "a small bucket's task holds room to grow");
    let free = |h: &Harness| h.e.sched.free(1).map_or(0, |r| r.memory_mb);
    assert_eq!(free(&h), 16_000 - allocation.memory_mb - reserve);
    // Held while the task is young enough to still grow (2 s x 1.5)...
    h.at(2.9);
    h.e.let_go_of_aged_reserves();
    assert_eq!(h.e.workers[&1].growth.room_mb, reserve);
    // ...and given back to the scheduler past that, with no word to the worker.
    h.at(3.1);
    h.e.let_go_of_aged_reserves();
    assert_eq!(h.e.workers[&1].growth.room_mb, 0);
    assert!(h.e.reserving_workers.is_empty());
    assert_eq!(free(&h), 16_000 - allocation.memory_mb);
    assert_eq!(h.e.stats().resources_in_use, allocation);
    assert!(h.sent().is_empty());
    assert!(h.results().is_empty());
}

#[test]
fn a_frozen_task_whose_worker_is_lost_runs_again_elsewhere() {
    let mut h = Harness::new(0);
    two_running(&mut h, 2000);
    h.grow(1, 1, 1, 1000.0);
    assert!(h.sent().is_empty());
    h.e.worker_gone(1, "test");
    assert!(h.e.growing_workers.is_empty());
    assert!(h.results().is_empty());
    assert_eq!(h.e.stats().tasks_requeued, 2);
    h.join(2, mb(2, 4000));
    h.e.schedule();
    let mut runs: Vec<(WorkerKey, TaskId, u32)> = h
        .runs()
        .into_iter()
        .map(|(w, r)| (w, r.task_id, r.attempt))
        .collect();
    runs.sort_unstable();
    assert_eq!(runs, vec![(2, 1, 2), (2, 2, 2)]);
    h.done(2, succeeded(1, 2, 900.0));
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Success);
    assert!(results[0].attempts[0].ending.starts_with("worker lost"));
}

#[test]
fn cancelling_a_frozen_task_kills_it_and_frees_its_room() {
    let mut h = Harness::new(0);
    two_running(&mut h, 2000);
    h.submit(3, "c", Resources::default());
    h.e.schedule();
    assert!(h.runs().is_empty(), "the worker is full");
    h.grow(1, 1, 1, 1000.0);
    assert!(h.sent().is_empty());
    let (tx, mut rx) = oneshot::channel();
    h.e.on_command(Command::Cancel(1, tx));
    assert_eq!(rx.try_recv(), Ok(true));
    assert_eq!(
        h.sent(),
        vec![(
            1,
            MasterMsg::Kill {
                task_id: 1,
                attempt: 1
            }
        )]
    );
    h.done(1, ended(1, 1, Ending::Killed, 1000.0));
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (results[0].id, &results[0].outcome),
        (1, &Outcome::Cancelled)
    );
    assert!(h.e.growing_workers.is_empty());
    // Its place goes to the waiting task.
    h.e.schedule();
    let runs = h.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].0, runs[0].1.task_id), (1, 3));
}

#[test]
fn tasks_sent_ahead_to_a_lost_worker_are_queued_again() {
    let mut h = Harness::new(1);
    // Tasks that declare every resource: a learned task is never sent ahead.
    let worker = one_core_worker();
    let task = declared_task();
    three_on_one_worker(&mut h, worker, task);
    assert_eq!(h.e.stats().tasks_sent_ahead, 1);
    // One runs; the one sent ahead waits on the worker and is not counted
    // as running until the worker says it started.
    let stats = h.e.stats();
    assert_eq!((stats.tasks_running, stats.tasks_queued_on_workers), (1, 1));
    // A task sent ahead holds nothing until it starts.
    assert_eq!(h.e.stats().resources_in_use, task);
    h.e.worker_gone(1, "test");
    assert!(h.results().is_empty());
    let stats = h.e.stats();
    assert_eq!((stats.tasks_requeued, stats.tasks_waiting), (2, 3));
    h.join(2, worker);
    h.e.schedule();
    let runs = h.run_summaries();
    assert_eq!(runs[0], (2, 1, 2, false));
    h.done(2, succeeded(1, 2, 10.0));
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].attempts.len(), 2);
}

#[test]
fn a_frozen_task_is_refused_once_it_has_waited_its_patience() {
    let mut h = Harness::new(0);
    two_running(&mut h, 2000);
    h.at(5.0);
    // Far into its need (1,000 of 1,500 MB): it waits 10 s at least.
    h.grow(1, 1, 1, 1000.0);
    h.at(14.9);
    h.e.grow_timeouts();
    assert!(h.sent().is_empty());
    h.at(15.1);
    h.e.grow_timeouts();
    assert_eq!(h.sent(), vec![(1, grow_msg(1, 1, None))]);
    assert!(h.e.growing_workers.is_empty());
    assert!(h.results().is_empty());
}

#[test]
fn a_rejected_task_drops_its_output_plan_and_is_sent_again() {
    let mut h = Harness::new(0);
    h.join(1, mb(1, 1000));
    h.submit(1, "", mb(1, 0));
    if let Some(t) = h.e.tasks.get_mut(&1) {
        t.spec.outputs = vec![("out.txt".into(), "/tmp/out.txt".into())];
    }
    h.e.schedule();
    let seen = plans_and_runs(&mut h);
    // The reader learns where the outputs go before the task can report.
    assert_eq!(seen, vec![(1, "expect", 1, 1), (1, "run", 1, 1)]);
    h.e.on_worker_msg(
        1,
        WorkerMsg::Rejected {
            task_id: 1,
            attempt: 1,
            reason: "test".into(),
        },
    );
    h.e.schedule();
    // The refusal counts as an attempt, and the worker that refused is kept
    // out for a second before the task is sent to it again.
    assert_eq!(plans_and_runs(&mut h), vec![(1, "forget", 1, 1)]);
    h.at(1.5);
    h.e.unblock_workers();
    h.e.schedule();
    assert_eq!(
        plans_and_runs(&mut h),
        vec![(1, "expect", 1, 2), (1, "run", 1, 2)]
    );
}

/// The output plans and runs sent since the last call, in order.
fn plans_and_runs(h: &mut Harness) -> Vec<(WorkerKey, &'static str, TaskId, u32)> {
    std::mem::take(&mut h.e.out.sent)
        .into_iter()
        .filter_map(|(w, item)| match item {
            Outgoing::ExpectOutputs { task, attempt, .. } => Some((w, "expect", task, attempt)),
            Outgoing::ForgetOutputs { task, attempt } => Some((w, "forget", task, attempt)),
            Outgoing::Msg(MasterMsg::Run(r)) => Some((w, "run", r.task_id, r.attempt)),
            _ => None,
        })
        .collect()
}

/// Issue 21: `tasks_running` counts tasks whose process runs, not tasks
/// sent ahead; one sent ahead moves over when its worker says it started.
#[test]
fn a_task_sent_ahead_counts_as_running_only_once_it_starts() {
    let mut h = Harness::new(1);
    let worker = one_core_worker();
    let task = declared_task();
    three_on_one_worker(&mut h, worker, task);
    let counts = |h: &Harness| {
        let s = h.e.stats();
        (s.tasks_running, s.tasks_queued_on_workers)
    };
    assert_eq!(counts(&h), (1, 1));
    h.done(1, succeeded(1, 1, 10.0));
    assert_eq!(counts(&h), (0, 1), "the one sent ahead has not started yet");
    h.e.on_worker_msg(
        1,
        WorkerMsg::Started {
            task_id: 2,
            attempt: 1,
        },
    );
    assert_eq!(counts(&h).0, 1);
    h.done(1, succeeded(2, 1, 10.0));
    assert_eq!(counts(&h).0, 0);
    assert_eq!(h.results().len(), 2);
}

fn exited(h: &mut Harness, task_id: TaskId) {
    h.e.on_worker_msg(
        1,
        WorkerMsg::Exited {
            task_id,
            attempt: 1,
        },
    );
}

/// Worker 1 says `exited`'s process exited and `started`, sent ahead,
/// started in its room.
fn hand_over(h: &mut Harness, exited_id: TaskId, started: TaskId) {
    exited(h, exited_id);
    h.e.on_worker_msg(
        1,
        WorkerMsg::Started {
            task_id: started,
            attempt: 1,
        },
    );
}

/// Issue 22: a worker that starts a task sent ahead in the room of one
/// whose process exited says `Exited` before `Started`. The room is freed
/// once: the report that follows frees nothing more, so the master never
/// sends a task to run in the room the started one holds.
#[test]
fn a_room_freed_at_exit_is_not_freed_again_by_the_report() {
    let mut h = Harness::new(1);
    three_on_one_worker(&mut h, one_core_worker(), declared_task());
    hand_over(&mut h, 1, 2);
    h.e.schedule();
    h.done(1, succeeded(1, 1, 10.0));
    h.e.schedule();
    assert_eq!(h.e.sched.free(1).map(|f| f.cores), Some(0));
    assert!(
        h.runs().is_empty(),
        "nothing may run in the room task 2 holds"
    );
    // A second word of the same exit, and one of a task that waits, change nothing.
    exited(&mut h, 1);
    exited(&mut h, 3);
    h.e.schedule();
    assert_eq!(h.e.sched.free(1).map(|f| f.cores), Some(0));
    assert!(h.runs().is_empty());
    h.done(1, succeeded(2, 1, 10.0));
    h.e.schedule();
    let runs = run_ids(&mut h);
    assert_eq!(runs, vec![(3, false)]);
    h.done(1, succeeded(3, 1, 10.0));
    assert_eq!(h.e.sched.free(1).map(|f| f.cores), Some(1));
    let stats = h.e.stats();
    assert_eq!((stats.tasks_running, stats.tasks_queued_on_workers), (0, 0));
    assert_eq!(h.results().len(), 3);
}

/// A worker lost after a task's `Exited` and before its report: the task
/// runs again elsewhere, once, and the lost worker's room is not counted.
#[test]
fn a_task_whose_worker_is_lost_after_its_exit_runs_again() {
    let mut h = Harness::new(1);
    three_on_one_worker(&mut h, one_core_worker(), declared_task());
    hand_over(&mut h, 1, 2);
    h.e.worker_gone(1, "test");
    h.join(2, one_core_worker());
    h.e.schedule();
    let runs: Vec<(WorkerKey, TaskId, bool)> = h
        .runs()
        .into_iter()
        .map(|(w, r)| (w, r.task_id, r.queued))
        .collect();
    assert_eq!(runs[0], (2, 1, false), "{runs:?}");
    assert!(runs.iter().all(|&(w, ..)| w == 2));
    assert_eq!(h.e.sched.free(2).map(|f| f.cores), Some(0));
}

fn refuse(h: &mut Harness, key: WorkerKey, task_id: TaskId, attempt: u32) {
    h.e.on_worker_msg(
        key,
        WorkerMsg::Rejected {
            task_id,
            attempt,
            reason: "disk full".into(),
        },
    );
}

/// Issue 19: a worker that refuses a task is kept out of placement for a
/// while (doubling), the task goes to another worker, and the worker comes
/// back once its pause is over.
#[test]
fn a_worker_that_refuses_is_kept_out_and_the_task_goes_elsewhere() {
    let mut h = Harness::new(0);
    let worker = one_core_worker();
    let task = declared_task();
    h.join(1, worker);
    h.submit(1, "", task);
    h.e.schedule();
    let runs = h.runs();
    assert_eq!((runs[0].0, runs[0].1.task_id), (1, 1));
    refuse(&mut h, 1, 1, runs[0].1.attempt);
    h.e.schedule();
    assert!(
        h.runs().is_empty(),
        "not sent back to the worker that refused it"
    );
    assert_eq!(h.e.stats().workers_blocked, 1);
    h.join(2, worker);
    h.e.schedule();
    let runs = h.runs();
    assert_eq!((runs[0].0, runs[0].1.task_id), (2, 1));
    h.done(2, succeeded(1, runs[0].1.attempt, 5.0));
    let results = h.results();
    assert_eq!(results[0].outcome, Outcome::Success);
    assert!(results[0].attempts[0].ending.contains("refused: disk full"));
    // The first pause is a second; then worker 1 takes tasks again.
    h.at(0.5);
    h.e.unblock_workers();
    assert_eq!(h.e.stats().workers_blocked, 1);
    h.at(1.5);
    h.e.unblock_workers();
    assert_eq!(h.e.stats().workers_blocked, 0);
}

fn submit_cached(h: &mut Harness, id: TaskId, file: &std::sync::Arc<str>, name: &str) {
    h.e.on_command(Command::Submit(Box::new(Prepared {
        id,
        command: format!("task {id}"),
        inputs: crate::task::Inputs::new(vec![crate::task::PreparedInput {
            cache_id: Some(std::sync::Arc::clone(file)),
            source: crate::task::FileSource::Bytes(std::sync::Arc::from(&b"data"[..])),
            remote: name.into(),
        }]),
        outputs: Vec::new(),
        env: Vec::new(),
        resources: declared_task(),
        wall_time_s: None,
        category: String::new(),
        tag: None,
        priority: 0,
        max_retries: 5,
        environment: None,
        submitted: SystemTime::UNIX_EPOCH,
        call: None,
    })));
}

/// Issue 19: a worker that refuses a task (say its cached input did not
/// fit, so it kept nothing) is sent that cached input again when it next
/// gets the task, instead of being thought to have it for ever.
#[test]
fn a_refused_tasks_cached_input_is_sent_again() {
    let mut h = Harness::new(0);
    h.join(1, one_core_worker());
    submit_cached(&mut h, 1, &std::sync::Arc::from("c-big"), "in");
    let files_sent = |h: &mut Harness| {
        let sent = std::mem::take(&mut h.e.out.sent);
        let files = sent
            .iter()
            .filter(|(_, item)| matches!(item, Outgoing::File { id, .. } if id == "c-big"))
            .count();
        let attempt = sent.iter().find_map(|(_, item)| match item {
            Outgoing::Msg(MasterMsg::Run(run)) => Some(run.attempt),
            _ => None,
        });
        (files, attempt)
    };
    h.e.schedule();
    let (files, attempt) = files_sent(&mut h);
    assert_eq!(files, 1);
    refuse(&mut h, 1, 1, attempt.expect("the task was sent"));
    h.at(1.5);
    h.e.unblock_workers();
    h.e.schedule();
    let (files, attempt) = files_sent(&mut h);
    assert!(attempt.is_some(), "the task went back to the worker");
    assert_eq!(files, 1, "the cached input was not sent again");
}

/// Issue 22: tasks naming the same cached files under the same names share
/// one input list (a million queued tasks hold one copy); a task naming the
/// same file under another name keeps its own. Each runs with its own
/// names, and the file goes to the worker once.
#[test]
fn tasks_naming_the_same_cached_files_share_one_input_list() {
    let mut h = Harness::new(0);
    h.join(
        1,
        Resources {
            disk_mb: 1000,
            ..mb(4, 1000)
        },
    );
    let file: std::sync::Arc<str> = std::sync::Arc::from("b3-shared");
    for (id, name) in [(1, "in"), (2, "in"), (3, "other"), (4, "in")] {
        submit_cached(&mut h, id, &file, name);
    }
    let inputs = |h: &Harness, id: TaskId| {
        h.e.tasks
            .get(&id)
            .map(|t| t.spec.inputs.clone())
            .expect("queued")
    };
    assert!(inputs(&h, 1).is_shared_with(&inputs(&h, 2)));
    assert!(!inputs(&h, 2).is_shared_with(&inputs(&h, 3)));
    h.e.schedule();
    let sent = std::mem::take(&mut h.e.out.sent);
    let files = sent
        .iter()
        .filter(|(_, item)| matches!(item, Outgoing::File { id, .. } if id == "b3-shared"))
        .count();
    assert_eq!(files, 1);
    let mut names: Vec<(TaskId, String, String)> = sent
        .iter()
        .filter_map(|(_, item)| match item {
            Outgoing::Msg(MasterMsg::Run(run)) => Some((
                run.task_id,
                run.inputs[0].file_id.clone(),
                run.inputs[0].name.clone(),
            )),
            _ => None,
        })
        .collect();
    names.sort();
    let want = |id: TaskId, name: &str| (id, "b3-shared".to_string(), name.to_string());
    assert_eq!(
        names,
        vec![
            want(1, "in"),
            want(2, "in"),
            want(3, "other"),
            want(4, "in")
        ]
    );
}

/// Issue 19: a task that every worker refuses ends, saying so, instead of
/// going round for ever; each refusal in a row doubles the worker's pause.
#[test]
fn a_task_refused_again_and_again_ends_as_failed() {
    let mut h = Harness::new(0);
    let worker = one_core_worker();
    h.join(1, worker);
    h.submit(1, "", declared_task());
    let mut clock = 0.0;
    let mut pauses = Vec::new();
    loop {
        h.e.schedule();
        let runs = h.runs();
        let Some((_, run)) = runs.first() else {
            break;
        };
        refuse(&mut h, 1, 1, run.attempt);
        let until = h.e.workers[&1].blocked_until.expect("blocked");
        pauses.push((until - h.e.now).as_secs_f64());
        clock += 1000.0;
        h.at(clock);
        h.e.unblock_workers();
    }
    assert_eq!(pauses.len(), 10, "{pauses:?}");
    assert_eq!(&pauses[..4], &[1.0, 2.0, 4.0, 8.0]);
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Failed);
    let error = results[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("refused by workers 10 times"), "{error}");
    assert_eq!(h.e.stats().tasks_waiting, 0);
}

#[test]
fn the_report_carries_history_events_categories_and_running_tasks() {
    let mut h = Harness::new(0);
    h.e.sample_history();
    h.join(1, one_core_worker());
    h.join(2, one_core_worker());
    for id in 1..=3 {
        h.submit(id, "sim", declared_task());
    }
    h.e.schedule();
    assert_eq!(h.runs().len(), 2);
    h.at(1.0);
    h.e.sample_history();
    let mut failed = ended(1, 1, Ending::Exited, 5.0);
    failed.exit_code = Some(3);
    failed.stderr = "reading input\nerror: no such file\n".into();
    h.done(1, failed);
    h.e.schedule();
    h.at(2.5);
    let r = h.e.status_report();
    // Task 2 ran 2.5 s on w2, task 3 runs on w1 since its first failure.
    let running: Vec<(u64, &str, u64)> = r
        .running
        .iter()
        .map(|t| (t.id, t.host.as_str(), t.age_secs))
        .collect();
    assert_eq!(running, vec![(2, "w2", 2), (3, "w1", 1)]);
    h.e.worker_gone(2, "connection reset");
    h.at(4.0);
    let r = h.e.status_report();
    let kinds: Vec<&str> = r.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "worker joined",
            "worker joined",
            "task failed",
            "worker lost"
        ]
    );
    let fail = &r.events[2];
    assert_eq!((fail.task, fail.host.as_str()), (Some(1), "w1"));
    assert!(fail.detail.starts_with("exit 3"), "{}", fail.detail);
    assert!(
        fail.detail.ends_with("error: no such file"),
        "{}",
        fail.detail
    );
    let lost = &r.events[3];
    assert_eq!(
        (lost.host.as_str(), lost.addr.as_str()),
        ("w2", "127.0.0.1:9002")
    );
    assert!(lost.detail.contains("connection reset"), "{}", lost.detail);
    // One sample a second from 0 to 4, the idle third second included.
    let hist = r.history.expect("history");
    assert_eq!(hist.len(), 5);
    assert_eq!(hist.failed.iter().sum::<u64>(), 1);
    assert_eq!(hist.workers, vec![0, 2, 2, 2, 1]);
    let sim = &r.categories[0];
    assert_eq!(sim.name, "sim");
    // Task 2 waits again (its worker was lost), task 3 runs, task 1 failed.
    assert_eq!(
        (sim.waiting, sim.running, sim.done, sim.failed),
        (Some(1), Some(1), Some(0), Some(1))
    );
    assert_eq!(r.workers.len(), 1);
    assert_eq!(
        (r.workers[0].addr.as_str(), r.workers[0].tasks_ended),
        ("127.0.0.1:9001", 1)
    );
}

/// Worker 1 runs task 1 and holds task 2 sent ahead; worker 2 (two cores)
/// joins and takes task 3, with a core to spare: the master asks worker 1
/// for task 2 back.
fn recall_for_a_joining_worker(h: &mut Harness) {
    let task = declared_task();
    three_on_one_worker(h, one_core_worker(), task);
    h.join(
        2,
        Resources {
            disk_mb: 1000,
            ..mb(2, 2000)
        },
    );
    h.e.schedule();
    let sent: Vec<(WorkerKey, &str, TaskId)> = h
        .sent()
        .into_iter()
        .map(|(w, m)| match m {
            MasterMsg::Run(r) => (w, "run", r.task_id),
            MasterMsg::Recall { task_id, attempt } => {
                assert_eq!(attempt, 1);
                (w, "recall", task_id)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(sent, vec![(2, "run", 3), (1, "recall", 2)]);
}

/// The closing note's "noticed and not fixed": a task sent ahead behind a
/// long one goes to a worker that has room when its holder gives it back;
/// it is not counted as an attempt, and no task runs twice.
#[test]
fn a_task_sent_ahead_is_recalled_to_a_worker_with_room() {
    let mut h = Harness::new(1);
    recall_for_a_joining_worker(&mut h);
    // Asked once only, while the answer is due.
    h.e.schedule();
    assert!(h.sent().is_empty());
    h.recalled(2, true);
    h.e.schedule();
    let runs = h.run_summaries();
    assert_eq!(runs, vec![(2, 2, 1, false)]);
    let s = h.e.stats();
    assert_eq!(
        (
            s.tasks_recalled,
            s.tasks_requeued,
            s.tasks_running,
            s.tasks_queued_on_workers
        ),
        (1, 0, 3, 0)
    );
    // A late or repeated answer changes nothing.
    h.recalled(2, true);
    h.e.schedule();
    assert!(h.sent().is_empty());
    h.done(1, succeeded(1, 1, 10.0));
    h.done(2, succeeded(2, 1, 10.0));
    h.done(2, succeeded(3, 1, 10.0));
    let results = h.results();
    assert_eq!(results.len(), 3);
    assert!(results
        .iter()
        .all(|r| r.outcome == Outcome::Success && r.attempts.len() == 1));
}

/// The recall crossed the task's start on its holder: it runs there, and
/// is not sent anywhere else.
#[test]
fn a_recalled_task_that_started_meanwhile_stays_where_it_runs() {
    let mut h = Harness::new(1);
    recall_for_a_joining_worker(&mut h);
    h.done(1, succeeded(1, 1, 10.0));
    h.e.on_worker_msg(
        1,
        WorkerMsg::Started {
            task_id: 2,
            attempt: 1,
        },
    );
    h.recalled(2, false);
    h.e.schedule();
    assert!(h.sent().is_empty(), "nothing moves");
    let s = h.e.stats();
    assert_eq!(
        (s.tasks_recalled, s.tasks_running, s.tasks_queued_on_workers),
        (0, 2, 0)
    );
    h.done(1, succeeded(2, 1, 10.0));
    h.done(2, succeeded(3, 1, 10.0));
    assert_eq!(h.results().len(), 3);
}

/// A task cancelled while its recall was on the way ends as cancelled when
/// its holder gives it back; it is not placed again.
#[test]
fn a_task_cancelled_during_its_recall_is_not_placed_again() {
    let mut h = Harness::new(1);
    recall_for_a_joining_worker(&mut h);
    assert!(h.e.cancel(2));
    assert!(matches!(
        h.sent()[..],
        [(1, MasterMsg::Kill { task_id: 2, .. })]
    ));
    h.recalled(2, true);
    h.e.schedule();
    assert!(h.sent().is_empty());
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Cancelled);
}

/// Issue 17: a call whose worker's function server died holding it runs
/// again on the same worker, which is not blocked for it; a call that
/// kills the server every time ends after its retry budget, saying why.
#[test]
fn a_call_lost_with_its_function_server_runs_again_within_its_retries() {
    let mut h = Harness::new(0);
    h.join(1, one_core_worker());
    h.submit(1, "", declared_task());
    let lost = |attempt| {
        let mut r = ended(1, attempt, Ending::SetupFailed, 0.0);
        r.error = Some(format!(
            "{} while the call ran",
            drover_protocol::messages::FUNCTION_SERVER_LOST
        ));
        r
    };
    let mut attempts = Vec::new();
    loop {
        h.e.schedule();
        let runs = h.runs();
        let Some((worker, run)) = runs.first() else {
            break;
        };
        assert_eq!(*worker, 1);
        assert_eq!(h.e.stats().workers_blocked, 0, "the worker was blamed");
        attempts.push(run.attempt);
        h.done(1, lost(run.attempt));
    }
    // The first run and five retries (the default budget), no more.
    assert_eq!(attempts, [1, 2, 3, 4, 5, 6]);
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Failed);
    let error = results[0].error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("the function server went away"),
        "{error}"
    );

    // One lost attempt, then success: the task's result is the success.
    h.submit(2, "", declared_task());
    h.e.schedule();
    let (_, run) = h.runs().remove(0);
    let mut r = lost(run.attempt);
    r.task_id = 2;
    h.done(1, r);
    h.e.schedule();
    let (_, run) = h.runs().remove(0);
    h.done(1, succeeded(2, run.attempt, 5.0));
    let results = h.results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].outcome, Outcome::Success);
    assert_eq!(results[0].attempts.len(), 2);
}
