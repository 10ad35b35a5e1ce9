//! The master's networking and bookkeeping around the pure scheduler.
//!
//! One engine task owns every table (tasks, workers, files, scheduler), so
//! nothing in the master needs a lock on its hot path. Each worker connection
//! has a reader task (frames in, output files streamed to disk) and a writer
//! task (frames and input files out); both talk to the engine through
//! unbounded channels, so a slow worker never blocks the engine and the user
//! not calling `wait` for a while never stalls the runtime.

use std::collections::VecDeque;

// See scheduler.rs: the keys are ids the master assigns.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use drover_worker::protocol::{
    self, read_frame, Ending, FrameError, Hello, MasterMsg, OutputHeader, RunTask, TaskReport,
    WorkerMsg, PROTOCOL_VERSION, ROLE_MASTER, ROLE_WORKER,
};
use drover_worker::Resources;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::alloc::{CategoryConfig, CategoryStats, Dim, RetryCause};
use crate::category::{CatId, Categories, Kill, Sizing, MAX_RESOURCE_RETRIES};
use crate::scheduler::{FileKey, Placement, Request, Scheduler, WorkerKey};
use crate::task::{Attempt, Outcome, TaskId, TaskResult};

/// Default number of times a task is retried after losing its worker.
pub const DEFAULT_MAX_RETRIES: u32 = 5;

/// A task after submit-time validation: file names resolved, paths checked.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub id: TaskId,
    pub command: String,
    pub inputs: Vec<PreparedInput>,
    pub outputs: Vec<(String, PathBuf)>,
    pub env: Vec<(String, String)>,
    pub resources: Resources,
    pub wall_time_s: Option<f64>,
    pub category: String,
    pub tag: Option<String>,
    pub priority: i32,
    pub max_retries: u32,
    pub environment: Option<PreparedInput>,
    pub submitted: SystemTime,
}

#[derive(Debug, Clone)]
pub(crate) struct PreparedInput {
    /// Cache name for cached files; None for per-task files and buffers.
    /// Shared by every task naming the same file (one allocation, not one
    /// per task: ~80 bytes per queued task with a cached input).
    pub cache_id: Option<Arc<str>>,
    pub source: FileSource,
    pub remote: String,
}

#[derive(Debug, Clone)]
pub(crate) enum FileSource {
    Path(PathBuf),
    Bytes(Arc<[u8]>),
}

/// A point-in-time view of the master.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub tasks_waiting: u64,
    pub tasks_running: u64,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    pub tasks_cancelled: u64,
    pub workers_connected: u64,
    pub workers_busy: u64,
    pub resources_in_use: Resources,
    pub resources_total: Resources,
    /// Times a task went back to the queue after its worker was lost.
    pub tasks_requeued: u64,
    /// Input file bodies sent to workers (a cached file counts once per worker).
    pub files_sent: u64,
    /// Times a task went back to the queue with a bigger allocation after
    /// going over its allocation (see [`crate::CategoryConfig`]).
    pub tasks_resized: u64,
    /// Times a running task went over its memory allocation and was given
    /// more where it ran (see [`crate::CategoryConfig::grow_in_place`]).
    pub tasks_grown: u64,
    /// Tasks sent ahead to wait on a full worker (see
    /// [`crate::ManagerBuilder::prefetch`]).
    pub tasks_sent_ahead: u64,
}

/// A frozen task waits at least this long for its worker to free the room
/// it needs to grow, and longer if it had run longer when it asked (its
/// run so far is what a kill would throw away).
const GROW_WAIT_MIN: Duration = Duration::from_secs(10);

/// A frozen task that has used less than this share of what it asks to
/// grow to waits for the room no longer than it had run (see
/// [`Engine::grow_asked`]).
const YOUNG_GROWTH_SHARE: f64 = 0.5;

/// A frozen task that cannot have all the room it asked for yet goes on
/// with what has freed for it so far, once that is at least this many MB
/// (and a quarter of its allocation): it works instead of holding a core
/// idle while the rest frees, and freezes again if it needs more.
const GROW_PARTIAL_MIN_MB: u64 = 256;

/// A task frozen over its memory allocation, waiting on its worker for the
/// room to grow to `target` (see [`Engine::grow_asked`]).
struct GrowWait {
    task: TaskId,
    attempt: u32,
    target: Resources,
    /// Taken from the worker's free resources so far (see
    /// [`Scheduler::take`]), towards `target - allocation`.
    have: Resources,
    asked: Instant,
    /// How long it may wait before it is killed and retried instead.
    patience: Duration,
}

pub(crate) enum Command {
    Submit(Box<Prepared>),
    Cancel(TaskId, oneshot::Sender<bool>),
    CancelTag(String, oneshot::Sender<usize>),
    Stats(oneshot::Sender<Stats>),
    Workers(oneshot::Sender<Vec<WorkerInfo>>),
    Shutdown(oneshot::Sender<()>),
    DismissWorkers(oneshot::Sender<()>),
    /// Sets a category's config (already validated).
    SetCategory(String, Box<CategoryConfig>, oneshot::Sender<()>),
    /// Statistics of one category (`Some(name)`) or of all.
    CategoryStats(Option<String>, oneshot::Sender<Vec<CategoryStats>>),
    /// Waiting tasks by request, for the factory's share of a status report.
    Demand(oneshot::Sender<Vec<(Request, usize)>>),
}

/// What the master knows of a connected worker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerInfo {
    pub host: String,
    pub addr: String,
    pub resources: Resources,
    pub running: usize,
}

enum Event {
    Joined {
        key: WorkerKey,
        hello: Box<Hello>,
        addr: SocketAddr,
        tx: mpsc::UnboundedSender<Outgoing>,
        conn: Arc<ConnShared>,
    },
    Msg {
        key: WorkerKey,
        msg: WorkerMsg,
    },
    Gone {
        key: WorkerKey,
        reason: String,
    },
    /// A status client (`drover factory`) passed the handshake and wants the report.
    Status(oneshot::Sender<drover_catalog::MasterReport>),
}

/// Shared between the engine and one connection's reader: where each running
/// attempt's outputs go. Keyed by (task, attempt) so a stale report never
/// writes over a newer attempt's files.
#[derive(Default)]
struct ConnShared {
    outputs: Mutex<HashMap<(TaskId, u32), OutputPlan>>,
}

/// (name in the sandbox, local destination) for each declared output.
type OutputPlan = Vec<(String, PathBuf)>;

enum Outgoing {
    Msg(MasterMsg),
    File {
        id: String,
        cache: bool,
        source: FileSource,
    },
}

pub(crate) struct EngineConfig {
    pub password: Option<Vec<u8>>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Everything in a status report but the counts, for status queries.
    pub report_identity: Arc<drover_catalog::MasterReport>,
    /// Tasks a full worker may hold waiting (see `ManagerBuilder::prefetch`).
    pub prefetch: usize,
}

enum TaskState {
    Waiting,
    Running {
        worker: WorkerKey,
        attempt: u32,
        allocation: Resources,
        started: SystemTime,
        /// Sent ahead and not started yet (it holds nothing there).
        on_worker_queue: bool,
    },
}

/// The master's tasks. Entries are boxed: a hash table keeps spare slots
/// (up to half of them empty right after it doubles), and a slot holds a
/// pointer instead of a whole entry of ~240 bytes. At 1M queued tasks this
/// took the master from ~1,040 to ~800 bytes per task (scale bench).
type TaskTable = HashMap<TaskId, Box<TaskEntry>>;

struct TaskEntry {
    spec: Box<Prepared>,
    seq: u64,
    state: TaskState,
    attempts: Vec<Attempt>,
    cancelling: bool,
    /// Interned cached inputs, largest first would need sizes; submission order is kept.
    cached_keys: Vec<FileKey>,
    /// How the allocation is decided (declared, or learned by the category).
    sizing: Sizing,
    /// Set once the task was killed for exceeding its allocation: the rung
    /// of the retry ladder it waits on (it leaves its category's class).
    rung: Option<Request>,
    /// Attempts lost to infrastructure (worker lost, cached input gone):
    /// the budget `max_retries` counts these only, not resource retries.
    lost: u32,
    resource_retries: u32,
    /// Set when the task was refused the room to grow to this (see
    /// `refuse_growth`): it is retried with it, not the category's next
    /// rung, since it was seen to need more than its allocation.
    grow_refused: Option<Resources>,
    /// Memory its running attempt added to its worker's `growth_room_mb`
    /// (see `Categories::reserve_mb`); zero once it asked to grow, or ran
    /// long enough without asking.
    reserve_mb: u64,
    /// Its running attempt started in its class's bucket and has not asked
    /// to grow yet: when it does, its category learns how long it ran.
    first_growth_pending: bool,
}

struct WorkerEntry {
    hello: Box<Hello>,
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<Outgoing>,
    conn: Arc<ConnShared>,
    files: HashSet<FileKey>,
    running: HashSet<TaskId>,
    in_use: Resources,
    /// Tasks frozen over their memory, oldest first; only the first takes
    /// the room that frees up, so that the oldest is served first.
    growing: VecDeque<GrowWait>,
    /// Memory taken from the scheduler and held free for the growth of the
    /// tasks here that may still grow: placements charge it with their
    /// allocation, tasks that ask to grow draw on it (whichever of them it
    /// came with), and it goes back as those that did not grow end. Never
    /// more than `reserved_mb`.
    growth_room_mb: u64,
    /// The sum of `reserve_mb` over the tasks running here.
    reserved_mb: u64,
    /// Tasks placed here with a growth reserve, oldest first, with when
    /// they were placed: see [`Engine::let_go_of_aged_reserves`].
    reserves: VecDeque<(Instant, TaskId, u32)>,
}

struct Engine {
    sched: Scheduler,
    tasks: TaskTable,
    workers: HashMap<WorkerKey, WorkerEntry>,
    file_keys: HashMap<String, FileKey>,
    file_names: Vec<String>,
    results: std::sync::mpsc::Sender<TaskResult>,
    next_seq: u64,
    stats: Stats,
    placements: Vec<Placement>,
    report_identity: Arc<drover_catalog::MasterReport>,
    categories: Categories,
    /// Workers with a non-empty `growing` queue.
    growing_workers: HashSet<WorkerKey>,
    /// Workers with a non-empty `reserves` queue.
    reserving_workers: HashSet<WorkerKey>,
    prefetch: usize,
    /// Workers that freed or filled up since the last scheduling pass:
    /// where sending a task ahead may now be useful.
    touched: Vec<WorkerKey>,
}

/// Starts the engine on `listener`; returns when told to shut down.
pub(crate) async fn run(
    listener: TcpListener,
    config: EngineConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    results: std::sync::mpsc::Sender<TaskResult>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let password = config.password.clone().map(Arc::<[u8]>::from);
    let keepalive = (config.keepalive_interval, config.keepalive_timeout);
    let accept = tokio::spawn(accept_loop(listener, events_tx, password, keepalive));
    let mut engine = Engine {
        sched: Scheduler::new(),
        tasks: HashMap::default(),
        workers: HashMap::default(),
        file_keys: HashMap::default(),
        file_names: Vec::new(),
        results,
        next_seq: 0,
        stats: Stats::default(),
        placements: Vec::new(),
        report_identity: config.report_identity.clone(),
        categories: Categories::default(),
        growing_workers: HashSet::default(),
        reserving_workers: HashSet::default(),
        prefetch: config.prefetch,
        touched: Vec::new(),
    };
    let mut grow_tick = tokio::time::interval(Duration::from_millis(200));
    grow_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reserve_tick = tokio::time::interval(Duration::from_millis(100));
    reserve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                engine.on_event(ev);
                // Take what else is ready before scheduling, so a burst costs one scheduling pass.
                for _ in 0..4096 {
                    match events.try_recv() { Ok(ev) => engine.on_event(ev), Err(_) => break }
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                if let Some(done) = engine.on_command(cmd) {
                    engine.shutdown();
                    accept.abort();
                    let _ = done.send(());
                    return;
                }
                for _ in 0..4096 {
                    match commands.try_recv() {
                        Ok(cmd) => if let Some(done) = engine.on_command(cmd) {
                            engine.shutdown();
                            accept.abort();
                            let _ = done.send(());
                            return;
                        },
                        Err(_) => break,
                    }
                }
            }
            _ = grow_tick.tick(), if !engine.growing_workers.is_empty() => engine.grow_timeouts(),
            _ = reserve_tick.tick(), if !engine.reserving_workers.is_empty() => engine.let_go_of_aged_reserves(),
        }
        engine.schedule();
    }
    engine.shutdown();
    accept.abort();
}

impl Engine {
    fn intern(&mut self, name: &str) -> FileKey {
        if let Some(&k) = self.file_keys.get(name) {
            return k;
        }
        let k = self.file_names.len() as FileKey;
        self.file_names.push(name.to_string());
        self.file_keys.insert(name.to_string(), k);
        k
    }

    fn on_command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Submit(spec) => self.submit(spec),
            Command::Cancel(id, reply) => {
                let _ = reply.send(self.cancel(id));
            }
            Command::CancelTag(tag, reply) => {
                let ids: Vec<TaskId> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.spec.tag.as_deref() == Some(&tag))
                    .map(|(id, _)| *id)
                    .collect();
                let n = ids.into_iter().filter(|id| self.cancel(*id)).count();
                let _ = reply.send(n);
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Workers(reply) => {
                let _ = reply.send(self.worker_infos());
            }
            Command::DismissWorkers(done) => {
                for w in self.workers.values() {
                    let _ = w.tx.send(Outgoing::Msg(MasterMsg::Shutdown));
                }
                let _ = done.send(());
            }
            Command::SetCategory(name, config, done) => {
                self.categories.configure(&name, *config, &mut self.sched);
                let _ = done.send(());
            }
            Command::CategoryStats(name, reply) => {
                let stats = match name {
                    Some(n) => self.categories.stats(&n).into_iter().collect(),
                    None => self.categories.all_stats(),
                };
                let _ = reply.send(stats);
            }
            Command::Demand(reply) => {
                let _ = reply.send(self.sched.demand());
            }
            Command::Shutdown(done) => return Some(done),
        }
        None
    }

    fn submit(&mut self, spec: Box<Prepared>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut cached_keys = Vec::new();
        for input in spec.inputs.iter().chain(spec.environment.iter()) {
            if let Some(id) = &input.cache_id {
                cached_keys.push(self.intern(id));
            }
        }
        let id = spec.id;
        let sizing = self.categories.sizing(&spec.category, &spec.resources);
        if let Sizing::Learned { cat, class } = sizing {
            self.categories.prime(cat, class, &mut self.sched);
        }
        self.tasks.insert(
            id,
            Box::new(TaskEntry {
                spec,
                seq,
                state: TaskState::Waiting,
                attempts: Vec::new(),
                cancelling: false,
                cached_keys,
                sizing,
                rung: None,
                grow_refused: None,
                reserve_mb: 0,
                first_growth_pending: false,
                lost: 0,
                resource_retries: 0,
            }),
        );
        self.enqueue_task(id);
        self.stats.tasks_waiting += 1;
    }

    /// Puts a task in the scheduler with its current request: its ladder
    /// rung, else its category's class, else its declaration.
    fn enqueue_task(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let (priority, seq) = (task.spec.priority, task.seq);
        match (task.rung, task.sizing) {
            (Some(r), Sizing::Learned { .. }) => {
                self.sched
                    .enqueue_provisional(id, r, priority, seq, &task.cached_keys)
            }
            (Some(r), _) | (None, Sizing::Plain(r)) => {
                self.sched.enqueue(id, r, priority, seq, &task.cached_keys)
            }
            (None, Sizing::Learned { class, .. }) => {
                self.sched
                    .enqueue_class(id, class, priority, seq, &task.cached_keys)
            }
        }
    }

    /// Recomputes the component-wise largest worker for the categories.
    fn refresh_largest(&mut self) {
        let largest = self.workers.values().fold(Resources::default(), |a, w| {
            let r = &w.hello.resources;
            Resources {
                cores: a.cores.max(r.cores),
                memory_mb: a.memory_mb.max(r.memory_mb),
                disk_mb: a.disk_mb.max(r.disk_mb),
                gpus: a.gpus.max(r.gpus),
            }
        });
        self.categories.set_largest(largest, &mut self.sched);
    }

    fn cancel(&mut self, id: TaskId) -> bool {
        let Some(task) = self.tasks.get_mut(&id) else {
            return false;
        };
        match task.state {
            TaskState::Waiting => {
                self.sched.remove_waiting(id);
                self.stats.tasks_waiting -= 1;
                self.finish(id, Outcome::Cancelled, None, None);
                true
            }
            TaskState::Running {
                worker, attempt, ..
            } => {
                if task.cancelling {
                    return false;
                }
                task.cancelling = true;
                if let Some(w) = self.workers.get(&worker) {
                    let _ = w.tx.send(Outgoing::Msg(MasterMsg::Kill {
                        task_id: id,
                        attempt,
                    }));
                }
                true
            }
        }
    }

    fn worker_infos(&self) -> Vec<WorkerInfo> {
        self.workers
            .values()
            .map(|w| WorkerInfo {
                host: w.hello.hostname.clone(),
                addr: w.addr.to_string(),
                resources: w.hello.resources,
                running: w.running.len(),
            })
            .collect()
    }

    /// The report a status query gets: the catalog's report plus the waiting
    /// tasks by shape, built here in one step since the asker waits on the
    /// network anyway. Costs O(workers + shapes), once per query.
    fn status_report(&self) -> drover_catalog::MasterReport {
        let mut r =
            crate::report::build_report(&self.report_identity, &self.stats(), &self.worker_infos());
        r.waiting_shapes = crate::report::waiting_shapes(&self.sched.demand());
        r
    }

    fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.workers_connected = self.workers.len() as u64;
        s.workers_busy = self
            .workers
            .values()
            .filter(|w| !w.running.is_empty())
            .count() as u64;
        s.resources_total = self.workers.values().fold(Resources::default(), |a, w| {
            a.saturating_add(&w.hello.resources)
        });
        s.resources_in_use = self
            .workers
            .values()
            .fold(Resources::default(), |a, w| a.saturating_add(&w.in_use));
        s
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Joined {
                key,
                hello,
                addr,
                tx,
                conn,
            } => {
                info!(worker = %addr, host = %hello.hostname, resources = ?hello.resources, "worker joined");
                self.sched.add_worker(key, hello.resources);
                let mut files = HashSet::default();
                for id in &hello.cached {
                    if let Some(&k) = self.file_keys.get(id) {
                        files.insert(k);
                        self.sched.note_cached(key, k);
                    } else {
                        let k = self.intern(id);
                        files.insert(k);
                        self.sched.note_cached(key, k);
                    }
                }
                self.workers.insert(
                    key,
                    WorkerEntry {
                        hello,
                        addr,
                        tx,
                        conn,
                        files,
                        running: HashSet::default(),
                        in_use: Resources::default(),
                        growing: VecDeque::new(),
                        growth_room_mb: 0,
                        reserved_mb: 0,
                        reserves: VecDeque::new(),
                    },
                );
                self.refresh_largest();
            }
            Event::Msg { key, msg } => match msg {
                WorkerMsg::TaskDone { report, .. } => self.task_done(key, *report),
                WorkerMsg::Rejected {
                    task_id,
                    attempt,
                    reason,
                } => {
                    warn!(task_id, "worker rejected the task: {reason}");
                    self.requeue(key, task_id, attempt, format!("rejected: {reason}"), false);
                }
                WorkerMsg::Grow {
                    task_id,
                    attempt,
                    used_mb,
                    ..
                } => self.grow_asked(key, task_id, attempt, used_mb),
                WorkerMsg::Started { task_id, attempt } => self.started(key, task_id, attempt),
                WorkerMsg::Goodbye { reason } => debug!("worker {key} says goodbye: {reason}"),
                WorkerMsg::Pong
                | WorkerMsg::Hello(_)
                | WorkerMsg::AuthProof { .. }
                | WorkerMsg::StatusQuery { .. } => {}
            },
            Event::Gone { key, reason } => self.worker_gone(key, &reason),
            Event::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
        }
    }

    fn worker_gone(&mut self, key: WorkerKey, reason: &str) {
        let Some(worker) = self.workers.remove(&key) else {
            return;
        };
        info!(worker = %worker.addr, "worker left: {reason}");
        self.growing_workers.remove(&key);
        self.sched.remove_worker(key);
        self.refresh_largest();
        let mut lost: Vec<TaskId> = worker.running.into_iter().collect();
        lost.sort_unstable();
        for id in lost {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let TaskState::Running {
                attempt,
                allocation,
                ..
            } = task.state
            else {
                continue;
            };
            task.attempts.push(Attempt {
                host: worker.hello.hostname.clone(),
                allocation,
                ending: format!("worker lost ({reason})"),
            });
            self.stats.tasks_running -= 1;
            task.lost += 1;
            if let Sizing::Learned { cat, .. } = task.sizing {
                self.categories.note_retry(cat, RetryCause::WorkerLost);
            }
            if task.cancelling {
                self.finish(id, Outcome::Cancelled, None, None);
            } else if task.lost > task.spec.max_retries {
                let why = format!("worker lost {} times; last: {reason}", task.attempts.len());
                self.finish(id, Outcome::WorkerLost, None, Some(why));
            } else {
                let _ = attempt;
                self.enqueue_again(id);
                self.stats.tasks_requeued += 1;
            }
        }
    }

    /// `cat` learned something: each of its tasks waiting to be retried
    /// after a kill takes the rung the category would choose now (see
    /// [`crate::category`]). Only tasks retried in `cat` are visited.
    fn retarget(&mut self, cat: CatId) {
        for (id, next) in self.categories.retargets(cat) {
            let waiting = self
                .tasks
                .get(&id)
                .is_some_and(|t| matches!(t.state, TaskState::Waiting));
            if !waiting {
                self.categories.forget_retrying(cat, id);
                continue;
            }
            let Some(next) = next else {
                continue;
            };
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if task.rung == Some(next) || !self.sched.remove_waiting(id) {
                continue;
            }
            task.rung = Some(next);
            self.enqueue_task(id);
        }
    }

    fn enqueue_again(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.state = TaskState::Waiting;
        self.enqueue_task(id);
        self.stats.tasks_waiting += 1;
    }

    /// Takes a running attempt back from `worker` and queues it again.
    fn requeue(
        &mut self,
        worker: WorkerKey,
        id: TaskId,
        attempt: u32,
        why: String,
        count_attempt: bool,
    ) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let TaskState::Running {
            worker: w,
            attempt: a,
            allocation,
            on_worker_queue,
            ..
        } = task.state
        else {
            return;
        };
        if w != worker || a != attempt {
            return;
        }
        self.drop_grow_wait(worker, id);
        if let Some(wk) = self.workers.get_mut(&worker) {
            wk.running.remove(&id);
            if !on_worker_queue {
                wk.in_use = wk.in_use.saturating_sub(&allocation);
            }
            wk.conn
                .outputs
                .lock()
                .map(|mut m| m.remove(&(id, attempt)))
                .ok();
        }
        self.sched.release_task(worker, id, allocation);
        self.end_reserve(worker, id);
        self.serve_growth(worker);
        self.stats.tasks_running -= 1;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        if count_attempt {
            let host = self
                .workers
                .get(&worker)
                .map(|w| w.hello.hostname.clone())
                .unwrap_or_default();
            task.attempts.push(Attempt {
                host,
                allocation,
                ending: why,
            });
        }
        if task.cancelling {
            self.finish(id, Outcome::Cancelled, None, None);
        } else {
            self.enqueue_again(id);
            self.stats.tasks_requeued += 1;
        }
    }

    fn task_done(&mut self, key: WorkerKey, report: TaskReport) {
        let id = report.task_id;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt,
            allocation,
            started,
            on_worker_queue,
        } = task.state
        else {
            return;
        };
        if worker != key || attempt != report.attempt {
            debug!(task = id, "ignoring a stale report");
            return;
        }
        self.drop_grow_wait(key, id);
        let host = match self.workers.get_mut(&key) {
            Some(w) => {
                w.running.remove(&id);
                if !on_worker_queue {
                    w.in_use = w.in_use.saturating_sub(&allocation);
                }
                w.hello.hostname.clone()
            }
            None => String::new(),
        };
        self.sched.release_task(key, id, allocation);
        self.end_reserve(key, id);
        self.touched.push(key);
        self.serve_growth(key);
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        self.stats.tasks_running -= 1;
        let exhausted = match (&report.ending, &report.limit_exceeded) {
            (Ending::LimitExceeded, Some(hit)) if hit.resource == "wall_time" => None,
            (Ending::LimitExceeded, hit) => Some(Dim::parse(
                hit.as_ref()
                    .map(|h| h.resource.as_str())
                    .unwrap_or("memory"),
            )),
            _ => None,
        };
        let mut learned = None;
        if let Sizing::Learned { cat, class } = task.sizing {
            let success = report.ending == Ending::Exited && report.exit_code == Some(0);
            self.categories.forget_retrying(cat, id);
            let changed = self.categories.attempt_ended(
                cat,
                &allocation,
                &report.measured,
                exhausted.is_some(),
                success,
                &mut self.sched,
            );
            if changed {
                learned = Some(cat);
            }
            if let (Some(dim), false) = (exhausted, task.cancelling) {
                let was_whole = task.rung == Some(Request::WholeWorker)
                    || self
                        .workers
                        .get(&key)
                        .is_some_and(|w| w.hello.resources == allocation);
                let seen = report.limit_exceeded.as_ref().map_or(0.0, |h| h.value);
                let refused_to = task.grow_refused.take().filter(|_| dim == Dim::Memory);
                let next = if task.resource_retries >= MAX_RESOURCE_RETRIES {
                    None
                } else if let Some(target) = refused_to {
                    Some(Request::Fixed(target))
                } else {
                    self.categories
                        .retry(cat, class, &allocation, was_whole, dim, seen)
                };
                if let Some(next) = next {
                    let what = report
                        .limit_exceeded
                        .as_ref()
                        .map(|h| format!("{} over {} ({})", h.resource, h.limit, h.value))
                        .unwrap_or_else(|| "over its allocation".into());
                    task.attempts.push(Attempt {
                        host,
                        allocation,
                        ending: format!("resource exhausted: {what}; retrying with {next:?}"),
                    });
                    task.rung = Some(next);
                    task.resource_retries += 1;
                    self.categories.note_retry(cat, RetryCause::Exhausted(dim));
                    // A task refused growth is sized by what it was seen to
                    // need, not by a rung to move as the category learns
                    // (see `retarget`).
                    if refused_to.is_none() {
                        self.categories.note_retrying(
                            cat,
                            id,
                            Kill {
                                class,
                                failed: allocation,
                                was_whole,
                                dim,
                                seen,
                            },
                        );
                    }
                    self.stats.tasks_resized += 1;
                    self.enqueue_again(id);
                    if let Some(cat) = learned {
                        self.retarget(cat);
                    }
                    return;
                }
                self.categories.note_exhausted(cat);
            }
        }
        if let Some(cat) = learned {
            self.retarget(cat);
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        if report.ending == Ending::InputMissing
            && !task.cancelling
            && task.lost < task.spec.max_retries
        {
            task.lost += 1;
            if let Sizing::Learned { cat, .. } = task.sizing {
                self.categories.note_retry(cat, RetryCause::Other);
            }
            // The worker's cache lost a file we thought it had: forget that, and send it again elsewhere or here.
            if let Some(w) = self.workers.get_mut(&key) {
                for k in &task.cached_keys {
                    w.files.remove(k);
                }
            }
            task.attempts.push(Attempt {
                host,
                allocation,
                ending: report
                    .error
                    .clone()
                    .unwrap_or_else(|| "input missing".into()),
            });
            self.enqueue_again(id);
            self.stats.tasks_requeued += 1;
            return;
        }
        let outcome = match report.ending {
            Ending::Exited if report.exit_code == Some(0) && report.missing_outputs.is_empty() => {
                Outcome::Success
            }
            Ending::Exited if report.exit_code == Some(0) => Outcome::OutputMissing,
            Ending::Exited => Outcome::Failed,
            Ending::LimitExceeded => Outcome::ResourceExhausted {
                resource: report
                    .limit_exceeded
                    .as_ref()
                    .map(|l| l.resource.clone())
                    .unwrap_or_else(|| "memory".into()),
            },
            Ending::WallTime => Outcome::WallTimeExceeded,
            Ending::Killed if task.cancelling => Outcome::Cancelled,
            Ending::Killed => Outcome::Failed,
            Ending::InputMissing => Outcome::InputMissing,
            Ending::SetupFailed => Outcome::Failed,
        };
        let mut error = report.error.clone();
        if outcome == Outcome::OutputMissing && error.is_none() {
            error = Some(format!(
                "missing outputs: {}",
                report.missing_outputs.join(", ")
            ));
        }
        task.attempts.push(Attempt {
            host: host.clone(),
            allocation,
            ending: format!("{outcome:?}"),
        });
        let _ = started;
        self.finish(id, outcome, Some((report, host)), error);
    }

    /// Removes the task and hands its result to the user.
    fn finish(
        &mut self,
        id: TaskId,
        outcome: Outcome,
        report: Option<(TaskReport, String)>,
        error: Option<String>,
    ) {
        let Some(task) = self.tasks.remove(&id) else {
            return;
        };
        match outcome {
            Outcome::Success => self.stats.tasks_done += 1,
            Outcome::Cancelled => self.stats.tasks_cancelled += 1,
            _ => self.stats.tasks_failed += 1,
        }
        let spec = task.spec;
        let allocated = task
            .attempts
            .last()
            .map(|a| a.allocation)
            .unwrap_or(spec.resources);
        let mut result = TaskResult {
            id,
            tag: spec.tag,
            category: spec.category,
            command: spec.command,
            outcome,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            error,
            allocated,
            measured: Default::default(),
            submitted: spec.submitted,
            started: None,
            finished: SystemTime::now(),
            host: None,
            attempts: task.attempts,
        };
        if let Some((report, host)) = report {
            result.exit_code = report.exit_code;
            result.signal = report.signal;
            result.stdout = report.stdout;
            result.stderr = report.stderr;
            result.measured = report.measured;
            result.started =
                Some(SystemTime::UNIX_EPOCH + Duration::from_millis(report.started_ms));
            result.host = Some(host);
        }
        let _ = self.results.send(result);
    }

    fn schedule(&mut self) {
        if self.sched.waiting() == 0 || self.workers.is_empty() {
            // Nothing to send ahead either; what was touched is moot.
            self.touched.clear();
            return;
        }
        let mut placements = std::mem::take(&mut self.placements);
        placements.clear();
        self.sched.schedule(&mut placements);
        for p in placements.drain(..) {
            self.touched.push(p.worker);
            self.dispatch(p, false);
        }
        self.placements = placements;
        self.send_ahead();
    }

    /// Sends tasks ahead to the workers that freed or filled up in this
    /// pass (see `ManagerBuilder::prefetch`), while more tasks wait than
    /// there are workers, and not to a worker with a task waiting to grow.
    fn send_ahead(&mut self) {
        if self.prefetch == 0 || self.touched.is_empty() {
            self.touched.clear();
            return;
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &key in &touched {
            while self.sched.waiting() > self.workers.len() {
                let growing = self.workers.get(&key).is_none_or(|w| !w.growing.is_empty());
                if growing {
                    break;
                }
                match self.sched.prefetch(key, self.prefetch) {
                    Some(p) => {
                        self.stats.tasks_sent_ahead += 1;
                        self.dispatch(p, true);
                    }
                    None => break,
                }
            }
        }
        touched.clear();
        self.touched = touched;
    }

    /// A task sent ahead to `key` started there.
    fn started(&mut self, key: WorkerKey, id: TaskId, attempt: u32) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt: a,
            allocation,
            ref mut on_worker_queue,
            ..
        } = task.state
        else {
            return;
        };
        if worker != key || a != attempt || !*on_worker_queue || !self.sched.started(key, id) {
            return;
        }
        *on_worker_queue = false;
        if let Some(w) = self.workers.get_mut(&key) {
            w.in_use = w.in_use.saturating_add(&allocation);
        }
        self.touched.push(key);
        self.serve_growth(key);
    }

    fn dispatch(&mut self, p: Placement, queued: bool) {
        if !self.tasks.contains_key(&p.task) {
            self.sched.release_task(p.worker, p.task, p.allocation);
            return;
        }
        if !self.workers.contains_key(&p.worker) {
            self.enqueue_task(p.task);
            return;
        }
        let (Some(task), Some(worker)) =
            (self.tasks.get_mut(&p.task), self.workers.get_mut(&p.worker))
        else {
            return;
        };
        // A placement from a category's class was charged its growth
        // reserve on top of the allocation: that part is the worker's.
        let reserve_mb = match (task.rung, task.sizing) {
            (None, Sizing::Learned { cat, class }) => self
                .categories
                .reserve_mb(cat, class)
                .min(p.allocation.memory_mb),
            _ => 0,
        };
        let mut p = p;
        p.allocation.memory_mb -= reserve_mb;
        task.reserve_mb = reserve_mb;
        task.first_growth_pending = reserve_mb > 0;
        worker.growth_room_mb += reserve_mb;
        worker.reserved_mb += reserve_mb;
        let (learned, growable) = match task.sizing {
            Sizing::Learned { cat, .. } => {
                self.categories.note_allocation(cat);
                let growable = self.categories.grows(cat)
                    && task.resource_retries < MAX_RESOURCE_RETRIES
                    && p.allocation.memory_mb > 0;
                (true, growable)
            }
            Sizing::Plain(_) => (false, false),
        };
        let attempt = task.attempts.len() as u32 + 1;
        if reserve_mb > 0 {
            worker.reserves.push_back((Instant::now(), p.task, attempt));
            self.reserving_workers.insert(p.worker);
        }
        let spec = &task.spec;
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        let mut send = |input: &PreparedInput, n: usize| -> String {
            match &input.cache_id {
                Some(id) => {
                    let k = self.file_keys.get(&**id).copied();
                    let fresh = k.map(|k| worker.files.insert(k)).unwrap_or(true);
                    if fresh {
                        if let Some(k) = k {
                            self.sched.note_cached(p.worker, k);
                        }
                        self.stats.files_sent += 1;
                        let _ = worker.tx.send(Outgoing::File {
                            id: id.to_string(),
                            cache: true,
                            source: input.source.clone(),
                        });
                    }
                    id.to_string()
                }
                None => {
                    let id = format!("u-{}-{}-{}", p.task, attempt, n);
                    self.stats.files_sent += 1;
                    let _ = worker.tx.send(Outgoing::File {
                        id: id.clone(),
                        cache: false,
                        source: input.source.clone(),
                    });
                    id
                }
            }
        };
        for (n, input) in spec.inputs.iter().enumerate() {
            let file_id = send(input, n);
            inputs.push(protocol::InputRef {
                file_id,
                name: input.remote.clone(),
                cached: input.cache_id.is_some(),
            });
        }
        let environment = spec.environment.as_ref().map(|e| send(e, usize::MAX));
        let run = RunTask {
            task_id: p.task,
            attempt,
            command: spec.command.clone(),
            env: spec.env.clone(),
            inputs,
            outputs: spec
                .outputs
                .iter()
                .map(|(remote, _)| remote.clone())
                .collect(),
            allocation: p.allocation,
            // A learned allocation is a limit too: going over it is how the
            // category finds out the task needs a bigger bucket.
            enforce_limits: learned || !spec.resources.is_zero(),
            wall_time_s: spec.wall_time_s,
            environment,
            growable,
            queued,
        };
        if !spec.outputs.is_empty() {
            if let Ok(mut m) = worker.conn.outputs.lock() {
                m.insert((p.task, attempt), spec.outputs.clone());
            }
        }
        let _ = worker.tx.send(Outgoing::Msg(MasterMsg::Run(Box::new(run))));
        worker.running.insert(p.task);
        if !queued {
            worker.in_use = worker.in_use.saturating_add(&p.allocation);
        }
        task.state = TaskState::Running {
            worker: p.worker,
            attempt,
            allocation: p.allocation,
            started: SystemTime::now(),
            on_worker_queue: queued,
        };
        self.stats.tasks_waiting -= 1;
        self.stats.tasks_running += 1;
    }

    /// A growable task is frozen over its memory allocation on `key`. It
    /// gets its category's growth target (see `CategoryState::grow_seen`)
    /// where it runs, as soon as the worker has the room (which is
    /// reserved for it as it frees up: see [`Engine::serve_growth`]); if it
    /// cannot get it in time, it is refused, killed, and retried with that
    /// target. Growing keeps what the task did so far; a retry throws it
    /// away.
    fn grow_asked(&mut self, key: WorkerKey, id: TaskId, attempt: u32, used_mb: f64) {
        let target = self.grow_target(key, id, attempt, used_mb);
        let Some((target, started, allocation)) = target else {
            if let Some(worker) = self.workers.get(&key) {
                let _ = worker.tx.send(Outgoing::Msg(MasterMsg::Grow {
                    task_id: id,
                    attempt,
                    allocation: None,
                }));
            }
            return;
        };
        let ran = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default();
        if let Some(cat) = self.tasks.get_mut(&id).and_then(|t| {
            let first = std::mem::take(&mut t.first_growth_pending);
            match t.sizing {
                Sizing::Learned { cat, .. } if first => Some(cat),
                _ => None,
            }
        }) {
            self.categories.note_growth_age(cat, ran);
        }
        // It has shown itself to be one of the tasks the worker's growth
        // room is for: what the room holds beyond the others' reserves is
        // its own, and it starts with that.
        let spare = self.release_reserve(key, id);
        let extra = target.memory_mb.saturating_sub(allocation.memory_mb);
        let have = Resources {
            memory_mb: spare.min(extra),
            ..Default::default()
        };
        if spare > have.memory_mb {
            self.sched.give(
                key,
                Resources {
                    memory_mb: spare - have.memory_mb,
                    ..Default::default()
                },
            );
        }
        let Some(worker) = self.workers.get_mut(&key) else {
            return;
        };
        // A task that has done little of what it will need waits only as
        // long as it has run: past that, rerunning it later with the room
        // it asked for costs less than keeping it frozen, holding a core
        // and memory, while the worker idles (W4's big tasks, caught at a
        // small bucket's limit). A task far into its run waits longer.
        let young = used_mb < target.memory_mb as f64 * YOUNG_GROWTH_SHARE;
        let patience = if young { ran } else { ran.max(GROW_WAIT_MIN) };
        worker.growing.push_back(GrowWait {
            task: id,
            attempt,
            target,
            have,
            asked: Instant::now(),
            patience,
        });
        self.growing_workers.insert(key);
        self.serve_growth(key);
    }

    /// The allocation a task that asks to grow should get, when its
    /// attempt started, and what it holds now; `None` if it should be
    /// killed instead.
    fn grow_target(
        &self,
        key: WorkerKey,
        id: TaskId,
        attempt: u32,
        used_mb: f64,
    ) -> Option<(Resources, SystemTime, Resources)> {
        let task = self.tasks.get(&id)?;
        let TaskState::Running {
            worker,
            attempt: running,
            allocation,
            started,
            on_worker_queue: false,
        } = task.state
        else {
            return None;
        };
        let Sizing::Learned { cat, class } = task.sizing else {
            return None;
        };
        if worker != key
            || running != attempt
            || task.cancelling
            || task.resource_retries >= MAX_RESOURCE_RETRIES
            || !self.categories.grows(cat)
        {
            return None;
        }
        let total = self.workers.get(&key)?.hello.resources;
        if task.rung == Some(Request::WholeWorker) || allocation == total {
            return None;
        }
        let target = match self.categories.grow(cat, class, &allocation, used_mb)? {
            Request::Fixed(r) => r.max_each(&allocation),
            Request::WholeWorker => total,
        };
        let grows = target.memory_mb > allocation.memory_mb
            && target.gpus == allocation.gpus
            && target.fits_in(&total);
        grows.then_some((target, started, allocation))
    }

    /// Hands what `key` has free to its frozen tasks, oldest first, and
    /// lets each one that has all it needs go on. If every task on the
    /// worker is frozen, none of them will free anything: the newest is
    /// refused (killed and retried), so that the others can go on.
    fn serve_growth(&mut self, key: WorkerKey) {
        if !self.growing_workers.contains(&key) {
            return;
        }
        // Room on a worker with tasks sent ahead is theirs the moment it
        // frees, and only the worker knows that moment: wait until they
        // started (see `started`). If every task running there is frozen,
        // no room will free: refuse the newest, as below.
        let queued = self.sched.queued_len(key);
        if queued > 0 {
            if let Some(worker) = self.workers.get_mut(&key) {
                let started = worker.running.len().saturating_sub(queued);
                if started <= worker.growing.len() {
                    if let Some(newest) = worker.growing.pop_back() {
                        self.sched.give(key, newest.have);
                        refuse_growth(&mut self.tasks, &worker.tx, &newest);
                    }
                }
            }
            return;
        }
        loop {
            let Some(worker) = self.workers.get_mut(&key) else {
                self.growing_workers.remove(&key);
                return;
            };
            let Some(head) = worker.growing.front_mut() else {
                self.growing_workers.remove(&key);
                return;
            };
            let allocation = match self.tasks.get(&head.task).map(|t| &t.state) {
                Some(&TaskState::Running {
                    worker: w,
                    attempt,
                    allocation,
                    ..
                }) if w == key && attempt == head.attempt => allocation,
                _ => {
                    let have = head.have;
                    worker.growing.pop_front();
                    self.sched.give(key, have);
                    continue;
                }
            };
            let extra = head.target.saturating_sub(&allocation);
            let need = extra.saturating_sub(&head.have);
            let mut got = self.sched.take(key, need);
            // What is not free yet may be in the room held for growth.
            let from_room = need
                .memory_mb
                .saturating_sub(got.memory_mb)
                .min(worker.growth_room_mb);
            worker.growth_room_mb -= from_room;
            got.memory_mb += from_room;
            head.have = head.have.saturating_add(&got);
            let complete = need.saturating_sub(&got).is_zero();
            let partial = head.have.memory_mb >= GROW_PARTIAL_MIN_MB.max(allocation.memory_mb / 4);
            if complete || partial {
                let Some(wait) = worker.growing.pop_front() else {
                    continue;
                };
                let grown = allocation.saturating_add(&wait.have);
                worker.in_use = worker.in_use.saturating_add(&wait.have);
                let _ = worker.tx.send(Outgoing::Msg(MasterMsg::Grow {
                    task_id: wait.task,
                    attempt: wait.attempt,
                    allocation: Some(grown),
                }));
                if let Some(task) = self.tasks.get_mut(&wait.task) {
                    if let TaskState::Running { allocation, .. } = &mut task.state {
                        *allocation = grown;
                    }
                    task.resource_retries += 1;
                    if let Sizing::Learned { cat, .. } = task.sizing {
                        self.categories.note_grown(cat);
                    }
                }
                self.stats.tasks_grown += 1;
                continue;
            }
            if worker.running.len() > worker.growing.len() {
                return;
            }
            if let Some(newest) = worker.growing.pop_back() {
                self.sched.give(key, newest.have);
                refuse_growth(&mut self.tasks, &worker.tx, &newest);
            }
        }
    }

    /// Lets the tasks that ran past their category's reserve hold (see
    /// `CategoryState::reserve_hold_s`) without asking to grow give back
    /// their growth reserve, so that more tasks can start. Costs O(1) per
    /// worker plus the reserves let go.
    fn let_go_of_aged_reserves(&mut self) {
        let now = Instant::now();
        let keys: Vec<WorkerKey> = self.reserving_workers.iter().copied().collect();
        for key in keys {
            loop {
                let Some(&(placed, id, attempt)) =
                    self.workers.get(&key).and_then(|w| w.reserves.front())
                else {
                    self.reserving_workers.remove(&key);
                    break;
                };
                let holding = self.tasks.get(&id).and_then(|t| match t.state {
                    TaskState::Running {
                        worker, attempt: a, ..
                    } if worker == key && a == attempt && t.reserve_mb > 0 => match t.sizing {
                        Sizing::Learned { cat, .. } => Some(cat),
                        Sizing::Plain(_) => None,
                    },
                    _ => None,
                });
                if let Some(cat) = holding {
                    // Queued in placement order: if the oldest is not due,
                    // none is (within one category).
                    let due = self
                        .categories
                        .reserve_hold(cat)
                        .is_some_and(|hold| now.duration_since(placed) >= hold);
                    if !due {
                        break;
                    }
                    self.end_reserve(key, id);
                }
                if let Some(w) = self.workers.get_mut(&key) {
                    w.reserves.pop_front();
                }
            }
        }
    }

    /// `id`'s attempt on `key` ended, or ran long enough not to need the
    /// room held for its growth: that room goes back to the scheduler, as
    /// far as the others' growth did not use it.
    fn end_reserve(&mut self, key: WorkerKey, id: TaskId) {
        let spare = self.release_reserve(key, id);
        if spare > 0 {
            self.sched.give(
                key,
                Resources {
                    memory_mb: spare,
                    ..Default::default()
                },
            );
        }
    }

    /// Takes `id`'s growth reserve off `key`'s books and returns the room
    /// that, without it, backs no task's reserve any more (at most the
    /// reserve; less if others' growth used the room). The caller owns
    /// what is returned: it is out of the room and not yet back in the
    /// scheduler.
    fn release_reserve(&mut self, key: WorkerKey, id: TaskId) -> u64 {
        let own = self
            .tasks
            .get_mut(&id)
            .map_or(0, |t| std::mem::take(&mut t.reserve_mb));
        if own == 0 {
            return 0;
        }
        let Some(worker) = self.workers.get_mut(&key) else {
            return 0;
        };
        worker.reserved_mb = worker.reserved_mb.saturating_sub(own);
        let spare = worker.growth_room_mb.saturating_sub(worker.reserved_mb);
        worker.growth_room_mb -= spare;
        spare
    }

    /// Forgets `id`'s wait to grow on `key`, if any (it ended, or its
    /// worker took it back), and returns what it had been given.
    fn drop_grow_wait(&mut self, key: WorkerKey, id: TaskId) {
        if !self.growing_workers.contains(&key) {
            return;
        }
        let Some(worker) = self.workers.get_mut(&key) else {
            return;
        };
        if let Some(pos) = worker.growing.iter().position(|w| w.task == id) {
            if let Some(wait) = worker.growing.remove(pos) {
                self.sched.give(key, wait.have);
            }
        }
    }

    /// Refuses the frozen tasks that have waited longer than their
    /// patience: each is killed and retried on its next rung, as if it had
    /// had nowhere to grow.
    fn grow_timeouts(&mut self) {
        let now = Instant::now();
        let keys: Vec<WorkerKey> = self.growing_workers.iter().copied().collect();
        for key in keys {
            let Some(worker) = self.workers.get_mut(&key) else {
                continue;
            };
            let mut i = 0;
            while i < worker.growing.len() {
                let wait = &worker.growing[i];
                if now.duration_since(wait.asked) < wait.patience {
                    i += 1;
                    continue;
                }
                if let Some(wait) = worker.growing.remove(i) {
                    debug!(
                        task = wait.task,
                        "no room to grow after {:?}", wait.patience
                    );
                    self.sched.give(key, wait.have);
                    refuse_growth(&mut self.tasks, &worker.tx, &wait);
                }
            }
            self.serve_growth(key);
        }
    }

    fn shutdown(&mut self) {
        // Dropping the senders ends each writer, which closes its connection.
        self.workers.clear();
    }
}

static NEXT_WORKER: AtomicU32 = AtomicU32::new(1);

async fn accept_loop(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    password: Option<Arc<[u8]>>,
    keepalive: (Duration, Duration),
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        let password = password.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, addr, events, password, keepalive).await {
                warn!(peer = %addr, "{e}");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::UnboundedSender<Event>,
    password: Option<Arc<[u8]>>,
    (interval, timeout): (Duration, Duration),
) -> anyhow::Result<()> {
    let (r, w) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut writer = BufWriter::with_capacity(64 * 1024, w);
    let hello = match tokio::time::timeout(
        Duration::from_secs(30),
        handshake(&mut reader, &mut writer, password.as_deref(), interval),
    )
    .await
    {
        Ok(Ok(Greeting::Worker(hello))) => hello,
        Ok(Ok(Greeting::Status { proof })) => {
            return answer_status(&mut writer, &events, proof).await;
        }
        Ok(Err(e)) => anyhow::bail!("refused connection from {addr}: {e}"),
        Err(_) => anyhow::bail!("connection from {addr} did not complete the handshake in 30 s"),
    };
    let key = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(ConnShared::default());
    if events
        .send(Event::Joined {
            key,
            hello,
            addr,
            tx,
            conn: conn.clone(),
        })
        .is_err()
    {
        return Ok(());
    }
    let writer_task = tokio::spawn(write_loop(writer, rx, interval));
    let reason = read_loop(&mut reader, key, &events, &conn, timeout).await;
    writer_task.abort();
    let _ = events.send(Event::Gone { key, reason });
    Ok(())
}

/// Who passed the handshake: a worker, or a status client (which got no
/// welcome; `proof` is the master's, owed in the status answer).
enum Greeting {
    Worker(Box<Hello>),
    Status { proof: Option<String> },
}

/// Sends a status client the master's report and ends the connection.
async fn answer_status(
    writer: &mut BufWriter<OwnedWriteHalf>,
    events: &mpsc::UnboundedSender<Event>,
    proof: Option<String>,
) -> anyhow::Result<()> {
    let (tx, rx) = oneshot::channel();
    if events.send(Event::Status(tx)).is_err() {
        return Ok(());
    }
    let Ok(report) = rx.await else {
        return Ok(());
    };
    protocol::write_frame(
        writer,
        &MasterMsg::Status {
            proof,
            report: Box::new(report),
        },
    )
    .await?;
    writer.flush().await?;
    Ok(())
}

async fn handshake(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut BufWriter<OwnedWriteHalf>,
    password: Option<&[u8]>,
    keepalive: Duration,
) -> anyhow::Result<Greeting> {
    let mut buf = Vec::new();
    let refuse = |reason: String| async move { reason };
    let msg: WorkerMsg = read_frame(reader, &mut buf)
        .await
        .map_err(|e| anyhow::anyhow!("bad hello: {e}"))?;
    // A status client goes through the same checks as a worker; only the
    // last step differs.
    let (hello, protocol_version, has_password, who) = match msg {
        WorkerMsg::Hello(hello) => {
            let (v, p) = (hello.protocol, hello.password);
            let who = format!(
                "worker {} (drover {})",
                hello.hostname, hello.drover_version
            );
            (Some(hello), v, p, who)
        }
        WorkerMsg::StatusQuery { protocol, password } => {
            (None, protocol, password, "status client".to_string())
        }
        other => anyhow::bail!("expected a hello, got {other:?}"),
    };
    let mut refusal = None;
    if protocol_version != PROTOCOL_VERSION {
        refusal = Some(format!(
            "protocol version mismatch: this master speaks version {PROTOCOL_VERSION} (drover {}), the {who} version {protocol_version}",
            env!("CARGO_PKG_VERSION"),
        ));
    } else if password.is_some() && !has_password {
        refusal =
            Some("this master requires a password; start the worker with --password-file".into());
    } else if password.is_none() && has_password {
        refusal = Some("this master has no password but the worker was given one; refusing so that neither side is fooled".into());
    }
    if let Some(reason) = refusal {
        let reason = refuse(reason).await;
        protocol::write_frame(
            writer,
            &MasterMsg::Refused {
                reason: reason.clone(),
            },
        )
        .await?;
        writer.flush().await?;
        anyhow::bail!("{reason}");
    }
    let mut proof = None;
    if let Some(password) = password {
        let mine = protocol::new_nonce();
        protocol::write_frame(
            writer,
            &MasterMsg::Challenge {
                nonce: mine.clone(),
            },
        )
        .await?;
        writer.flush().await?;
        let msg: WorkerMsg = read_frame(reader, &mut buf)
            .await
            .map_err(|e| anyhow::anyhow!("bad auth reply: {e}"))?;
        let WorkerMsg::AuthProof {
            nonce,
            proof: theirs,
        } = msg
        else {
            anyhow::bail!("expected a password proof, got {msg:?}");
        };
        if !protocol::verify_proof(password, ROLE_WORKER, &mine, &nonce, &theirs) {
            protocol::write_frame(
                writer,
                &MasterMsg::Refused {
                    reason: "wrong password".into(),
                },
            )
            .await?;
            writer.flush().await?;
            anyhow::bail!("{who} gave a wrong password");
        }
        proof = Some(protocol::auth_proof(password, ROLE_MASTER, &nonce, &mine));
    }
    let Some(hello) = hello else {
        return Ok(Greeting::Status { proof });
    };
    protocol::write_frame(
        writer,
        &MasterMsg::Welcome {
            proof,
            keepalive_interval_s: keepalive.as_secs_f64(),
        },
    )
    .await?;
    writer.flush().await?;
    Ok(Greeting::Worker(hello))
}

async fn read_loop(
    reader: &mut BufReader<OwnedReadHalf>,
    key: WorkerKey,
    events: &mpsc::UnboundedSender<Event>,
    conn: &ConnShared,
    timeout: Duration,
) -> String {
    let mut buf = Vec::new();
    loop {
        let msg =
            match tokio::time::timeout(timeout, crate::wire::read_worker_msg(reader, &mut buf))
                .await
            {
                Err(_) => return format!("no message for {timeout:?}"),
                Ok(Err(FrameError::Closed)) => return "connection closed".into(),
                Ok(Err(e)) => return format!("protocol error: {e}"),
                Ok(Ok(m)) => m,
            };
        if let WorkerMsg::TaskDone { report, outputs } = &msg {
            let dests = conn
                .outputs
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&(report.task_id, report.attempt)));
            if let Err(e) = receive_outputs(reader, outputs, dests.as_deref()).await {
                return format!("receiving outputs of task {}: {e}", report.task_id);
            }
        }
        if events.send(Event::Msg { key, msg }).is_err() {
            return "master shutting down".into();
        }
    }
}

/// Streams each output body to its local path through a temporary name. Bodies
/// nobody expects (a stale attempt, a name the task did not declare) are read and dropped.
async fn receive_outputs(
    reader: &mut BufReader<OwnedReadHalf>,
    outputs: &[OutputHeader],
    dests: Option<&[(String, PathBuf)]>,
) -> anyhow::Result<()> {
    for header in outputs {
        let dest = dests
            .and_then(|d| d.iter().find(|(name, _)| *name == header.name))
            .map(|(_, p)| p);
        let mut body = (&mut *reader).take(header.size);
        match dest {
            Some(dest) => {
                let tmp = dest.with_file_name(format!(
                    ".{}.drover-part",
                    dest.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                let written = async {
                    let mut file = tokio::fs::File::create(&tmp).await?;
                    let n = protocol::copy_body(&mut body, &mut file, header.size, |_| {}).await?;
                    file.flush().await?;
                    Ok::<u64, std::io::Error>(n)
                }
                .await;
                match written {
                    Ok(n) if n == header.size => tokio::fs::rename(&tmp, dest).await?,
                    Ok(_) => {
                        anyhow::bail!("connection closed in the middle of output {}", header.name)
                    }
                    Err(e) => {
                        warn!(
                            "cannot write output {} to {}: {e}",
                            header.name,
                            dest.display()
                        );
                        let _ = tokio::fs::remove_file(&tmp).await;
                        tokio::io::copy(&mut body, &mut tokio::io::sink()).await?;
                    }
                }
            }
            None => {
                tokio::io::copy(&mut body, &mut tokio::io::sink()).await?;
            }
        }
    }
    Ok(())
}

async fn write_loop(
    mut writer: BufWriter<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(4096);
    let mut last_write = Instant::now();
    loop {
        let item = match tokio::time::timeout(
            interval
                .saturating_sub(last_write.elapsed())
                .max(Duration::from_millis(10)),
            rx.recv(),
        )
        .await
        {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => {
                frame.clear();
                protocol::encode_frame(&MasterMsg::Ping, &mut frame)?;
                writer.write_all(&frame).await?;
                writer.flush().await?;
                last_write = Instant::now();
                continue;
            }
        };
        let mut next = Some(item);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Msg(msg) => {
                    frame.clear();
                    protocol::encode_frame(&msg, &mut frame)?;
                    writer.write_all(&frame).await?;
                }
                Outgoing::File { id, cache, source } => {
                    send_file(&mut writer, &mut frame, id, cache, &source).await?
                }
            }
            next = rx.try_recv().ok();
        }
        writer.flush().await?;
        last_write = Instant::now();
    }
    Ok(())
}

async fn send_file(
    writer: &mut BufWriter<OwnedWriteHalf>,
    frame: &mut Vec<u8>,
    id: String,
    cache: bool,
    source: &FileSource,
) -> anyhow::Result<()> {
    match source {
        FileSource::Bytes(bytes) => {
            frame.clear();
            protocol::encode_frame(
                &MasterMsg::PutFile {
                    id,
                    size: bytes.len() as u64,
                    cache,
                },
                frame,
            )?;
            writer.write_all(frame).await?;
            writer.write_all(bytes).await?;
        }
        FileSource::Path(path) => {
            let file = tokio::fs::File::open(path).await;
            let (file, size) = match file {
                Ok(f) => {
                    let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                    (Some(f), size)
                }
                Err(e) => {
                    // Send an empty body: the worker's content check (or the task) then reports the file as missing.
                    warn!(
                        "input {} vanished before it could be sent: {e}",
                        path.display()
                    );
                    (None, 0)
                }
            };
            frame.clear();
            protocol::encode_frame(&MasterMsg::PutFile { id, size, cache }, frame)?;
            writer.write_all(frame).await?;
            if let Some(mut f) = file {
                let sent = protocol::copy_body(&mut f, writer, size, |_| {}).await?;
                if sent < size {
                    // The file shrank while being sent; pad so the stream stays framed (the hash check catches it).
                    let zeros = vec![0u8; (size - sent).min(1 << 20) as usize];
                    let mut left = size - sent;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        writer.write_all(&zeros[..n]).await?;
                        left -= n as u64;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Refuses a frozen task the room to grow: its worker kills it, and it is
/// retried with the allocation it asked for (see `grow_refused`).
fn refuse_growth(tasks: &mut TaskTable, tx: &mpsc::UnboundedSender<Outgoing>, wait: &GrowWait) {
    if let Some(task) = tasks.get_mut(&wait.task) {
        task.grow_refused = Some(wait.target);
    }
    let _ = tx.send(Outgoing::Msg(MasterMsg::Grow {
        task_id: wait.task,
        attempt: wait.attempt,
        allocation: None,
    }));
}
