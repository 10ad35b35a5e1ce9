//! The engine's tables (tasks, workers, files, the scheduler) and its
//! answers to the user's commands and to a worker joining.

use super::*;

/// The master's tasks. Entries are boxed: a hash table keeps spare slots
/// (up to half of them empty right after it doubles), and a slot holds a
/// pointer instead of a whole entry of ~240 bytes. At 1M queued tasks this
/// took the master from ~1,040 to ~800 bytes per task (scale bench). The
/// table is indexed by id rather than hashed (see `crate::idtable`).
pub(super) type TaskTable = crate::idtable::IdTable<Box<TaskEntry>>;

pub(super) enum TaskState {
    Waiting,
    Running {
        worker: WorkerKey,
        attempt: u32,
        allocation: Resources,
        /// When it was placed (the engine's clock).
        started: Instant,
        /// Sent ahead and not started yet (it holds nothing there).
        on_worker_queue: bool,
        /// Its process has exited ([`WorkerMsg::Exited`]): what it held
        /// is back in the scheduler already, its report is on the way.
        exited: bool,
    },
}

pub(super) struct TaskEntry {
    pub(super) spec: Box<Prepared>,
    pub(super) seq: u64,
    pub(super) state: TaskState,
    pub(super) attempts: Vec<Attempt>,
    pub(super) cancelling: bool,
    /// Interned cached inputs, largest first would need sizes; submission order is kept.
    pub(super) cached_keys: Arc<[FileKey]>,
    /// How the allocation is decided (declared, or learned by the category).
    pub(super) sizing: Sizing,
    /// Set once the task was killed for exceeding its allocation: the rung
    /// of the retry ladder it waits on (it leaves its category's class).
    pub(super) rung: Option<Request>,
    /// Attempts lost to infrastructure (worker lost, cached input gone):
    /// the budget `max_retries` counts these only, not resource retries.
    pub(super) lost: u32,
    /// Times workers refused it (see `Engine::worker_refused`).
    pub(super) refusals: u32,
    pub(super) resource_retries: u32,
    /// Set when the task was refused the room to grow to this (see
    /// `refuse_growth`): it is retried with it, not the category's next
    /// rung, since it was seen to need more than its allocation.
    pub(super) grow_refused: Option<Resources>,
    /// Memory its running attempt added to its worker's growth room
    /// (see `Categories::reserve_mb`); zero once it asked to grow, or ran
    /// long enough without asking.
    pub(super) reserve_mb: u64,
    /// Its running attempt started in its class's bucket and has not asked
    /// to grow yet: when it does, its category learns how long it ran.
    pub(super) first_growth_pending: bool,
}

pub(super) struct WorkerEntry {
    pub(super) hello: Box<Hello>,
    pub(super) addr: SocketAddr,
    pub(super) files: HashSet<FileKey>,
    pub(super) running: HashSet<TaskId>,
    /// Its growth accounts. Its free resources are the scheduler's; what
    /// it has in use is neither (see [`Engine::in_use`]).
    pub(super) growth: WorkerGrowth,
    /// Tasks it refused since it last ran one to its end.
    pub(super) refusals_in_row: u32,
    /// Kept out of placement until then, after refusing a task.
    pub(super) blocked_until: Option<Instant>,
    /// When it joined (the engine's clock).
    pub(super) joined: Instant,
    /// Tasks whose attempt ended on it, any way.
    pub(super) tasks_ended: u64,
}

pub(super) struct Engine<O: Outbox> {
    pub(super) out: O,
    /// The engine's clock: set by the caller before each step, so that
    /// decisions never read the wall clock (the tests move it).
    pub(super) now: Instant,
    pub(super) sched: Scheduler,
    pub(super) tasks: TaskTable,
    pub(super) workers: HashMap<WorkerKey, WorkerEntry>,
    pub(super) file_keys: HashMap<String, FileKey>,
    pub(super) file_names: Vec<String>,
    /// The last submitted task's inputs, when they were all cached files,
    /// with their interned keys: the next task naming the same files shares
    /// both (see `Inputs::same_cached_files`).
    pub(super) last_inputs: Option<(Inputs, Arc<[FileKey]>)>,
    /// Shared by every task without cached inputs.
    pub(super) no_keys: Arc<[FileKey]>,
    pub(super) next_seq: u64,
    pub(super) stats: Stats,
    pub(super) placements: Vec<Placement>,
    pub(super) report_identity: Arc<drover_catalog::MasterReport>,
    pub(super) categories: Categories,
    /// Memory each class's placements are charged beyond their allocation
    /// for growth (see [`ClassRequest`]).
    pub(super) class_reserve_mb: HashMap<ClassKey, u64>,
    /// Workers with a non-empty `growing` queue.
    pub(super) growing_workers: HashSet<WorkerKey>,
    /// Workers with a non-empty `reserves` queue.
    pub(super) reserving_workers: HashSet<WorkerKey>,
    /// Workers kept out of placement for refusing tasks, until a time.
    pub(super) blocked_workers: HashSet<WorkerKey>,
    pub(super) prefetch: usize,
    /// Workers that freed or filled up since the last scheduling pass:
    /// where sending a task ahead may now be useful.
    pub(super) touched: Vec<WorkerKey>,
    /// Per-second counts, recent events, tasks per category.
    pub(super) history: crate::history::History,
    /// Attempts whose outputs could not be written here (the connection's
    /// reader says so before their report): the OS error, for the outcome.
    pub(super) failed_writes: HashMap<(TaskId, u32), String>,
    /// Component-wise largest connected worker.
    pub(super) largest: Resources,
    /// Waiting tasks that declare more than `largest` (see
    /// `ManagerBuilder::fits_no_worker_wait`).
    pub(super) unfit: HashSet<TaskId>,
    /// Component-wise most any task submitted so far declared: while the
    /// largest worker holds it, no task can be unfit (see `recheck_unfit`).
    pub(super) declared_max: Resources,
    pub(super) fits_no_worker_wait: Option<Duration>,
    /// When the last worker joined: the wait of unfit tasks counts from it.
    pub(super) last_joined: Instant,
}

impl<O: Outbox> Engine<O> {
    pub(super) fn new(
        out: O,
        report_identity: Arc<drover_catalog::MasterReport>,
        prefetch: usize,
    ) -> Self {
        let now = Instant::now();
        Engine {
            out,
            now,
            sched: Scheduler::new(),
            tasks: TaskTable::default(),
            workers: HashMap::default(),
            file_keys: HashMap::default(),
            file_names: Vec::new(),
            last_inputs: None,
            no_keys: Arc::from([]),
            next_seq: 0,
            stats: Stats::default(),
            placements: Vec::new(),
            report_identity,
            categories: Categories::default(),
            class_reserve_mb: HashMap::default(),
            growing_workers: HashSet::default(),
            reserving_workers: HashSet::default(),
            blocked_workers: HashSet::default(),
            prefetch,
            touched: Vec::new(),
            history: crate::history::History::new(now),
            failed_writes: HashMap::default(),
            largest: Resources::default(),
            unfit: HashSet::default(),
            declared_max: Resources::default(),
            fits_no_worker_wait: None,
            last_joined: Instant::now(),
        }
    }

    pub(super) fn intern(&mut self, name: &str) -> FileKey {
        if let Some(&k) = self.file_keys.get(name) {
            return k;
        }
        let k = self.file_names.len() as FileKey;
        self.file_names.push(name.to_string());
        self.file_keys.insert(name.to_string(), k);
        k
    }

    pub(super) fn on_command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
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
                for &key in self.workers.keys() {
                    self.out.to_worker(key, Outgoing::Msg(MasterMsg::Shutdown));
                }
                let _ = done.send(());
            }
            Command::SetCategory(name, config, done) => {
                let requests = self.categories.configure(&name, *config);
                self.apply_class_requests(requests);
                let _ = done.send(());
            }
            Command::CategoryStats(name, reply) => {
                let stats = match name {
                    Some(n) => self.categories.stats(&n).into_iter().collect(),
                    None => self.categories.all_stats(),
                };
                let _ = reply.send(stats);
            }
            Command::Report(reply) => {
                let _ = reply.send(self.status_report());
            }
            Command::EventsSince(seen, reply) => {
                let _ = reply.send(self.history.events_since(seen));
            }
            Command::Shutdown(done) => return Some(done),
        }
        None
    }

    /// Recomputes the component-wise largest worker for the categories.
    pub(super) fn refresh_largest(&mut self) {
        let largest = self.workers.values().fold(Resources::default(), |a, w| {
            let r = &w.hello.resources;
            Resources {
                cores: a.cores.max(r.cores),
                memory_mb: a.memory_mb.max(r.memory_mb),
                disk_mb: a.disk_mb.max(r.disk_mb),
                gpus: a.gpus.max(r.gpus),
            }
        });
        let requests = self.categories.set_largest(largest);
        self.apply_class_requests(requests);
        if largest != self.largest {
            self.largest = largest;
            self.recheck_unfit();
        }
    }

    pub(super) fn worker_infos(&self) -> Vec<WorkerInfo> {
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

    /// The whole status report, for the catalog and for status queries:
    /// counts, workers, waiting shapes, categories with their counts,
    /// history, recent events and the running tasks. Costs O(workers +
    /// running tasks + shapes + categories), once per report.
    pub(super) fn status_report(&mut self) -> drover_catalog::MasterReport {
        self.sample_history();
        let mut r =
            crate::report::build_report(&self.report_identity, &self.stats(), &self.worker_infos());
        r.waiting_shapes = crate::report::waiting_shapes(&self.sched.demand());
        r.workers = self.worker_summaries();
        let running = self.running_tasks();
        r.categories = crate::report::category_summaries(
            &self.categories.all_stats(),
            self.history.categories(),
            &running,
        );
        r.running = running
            .into_iter()
            .take(drover_catalog::report::MAX_RUNNING_LISTED)
            .collect();
        r.history = self.history.report();
        r.events = self.history.events();
        crate::report::fit(&mut r);
        r
    }

    /// Takes this second's sample of the counts, once a second at most.
    pub(super) fn sample_history(&mut self) {
        if !self.history.due(self.now) {
            return;
        }
        let s = self.stats();
        let sample = crate::history::Sample {
            done: s.tasks_done,
            failed: s.tasks_failed + s.tasks_cancelled,
            running: s.tasks_running,
            waiting: s.tasks_waiting + s.tasks_queued_on_workers,
            workers: s.workers_connected,
            cores_inuse: s.resources_in_use.cores.into(),
        };
        self.history.record(self.now, sample);
    }

    /// Connected workers for the report, busiest first, with their
    /// address (two workers on one host are told apart) and what they did.
    fn worker_summaries(&self) -> Vec<drover_catalog::WorkerSummary> {
        let mut ws: Vec<drover_catalog::WorkerSummary> = self
            .workers
            .iter()
            .map(|(&key, w)| {
                let r = &w.hello.resources;
                drover_catalog::WorkerSummary {
                    host: w.hello.hostname.clone(),
                    addr: w.addr.to_string(),
                    cores: r.cores.into(),
                    memory_mb: r.memory_mb,
                    disk_mb: r.disk_mb,
                    gpus: r.gpus.into(),
                    // Tasks sent ahead wait there; they are not running.
                    running: w
                        .running
                        .iter()
                        .filter(|id| {
                            self.tasks.get(id).is_some_and(|t| {
                                matches!(
                                    t.state,
                                    TaskState::Running {
                                        on_worker_queue: false,
                                        ..
                                    }
                                )
                            })
                        })
                        .count() as u64,
                    cores_inuse: self.in_use(key).cores.into(),
                    tasks_ended: w.tasks_ended,
                    connected_secs: self.now.saturating_duration_since(w.joined).as_secs(),
                }
            })
            .collect();
        ws.sort_by(|a, b| b.running.cmp(&a.running).then_with(|| a.addr.cmp(&b.addr)));
        ws.truncate(drover_catalog::report::MAX_WORKERS);
        ws
    }

    /// Tasks running now (not those sent ahead), longest running first.
    fn running_tasks(&self) -> Vec<drover_catalog::RunningTask> {
        let mut out = Vec::new();
        for w in self.workers.values() {
            for id in &w.running {
                let Some(t) = self.tasks.get(id) else {
                    continue;
                };
                let TaskState::Running {
                    allocation,
                    started,
                    on_worker_queue: false,
                    ..
                } = t.state
                else {
                    continue;
                };
                out.push(drover_catalog::RunningTask {
                    id: *id,
                    tag: t.spec.tag.clone(),
                    category: t.spec.category.clone(),
                    host: w.hello.hostname.clone(),
                    addr: w.addr.to_string(),
                    age_secs: self.now.saturating_duration_since(started).as_secs(),
                    cores: allocation.cores.into(),
                    memory_mb: allocation.memory_mb,
                });
            }
        }
        out.sort_by(|a, b| b.age_secs.cmp(&a.age_secs).then(a.id.cmp(&b.id)));
        out
    }

    pub(super) fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.workers_connected = self.workers.len() as u64;
        s.workers_busy = self
            .workers
            .values()
            .filter(|w| !w.running.is_empty())
            .count() as u64;
        s.workers_blocked = self.blocked_workers.len() as u64;
        s.resources_total = self.workers.values().fold(Resources::default(), |a, w| {
            a.saturating_add(&w.hello.resources)
        });
        s.resources_in_use = self.workers.keys().fold(Resources::default(), |a, &k| {
            a.saturating_add(&self.in_use(k))
        });
        s
    }

    /// A worker passed the handshake.
    pub(super) fn worker_joined(&mut self, key: WorkerKey, hello: Box<Hello>, addr: SocketAddr) {
        {
            {
                info!(worker = %addr, host = %hello.hostname, resources = ?hello.resources, "worker joined");
                self.history.event(drover_catalog::EventSummary {
                    kind: "worker joined".into(),
                    host: hello.hostname.clone(),
                    addr: addr.to_string(),
                    detail: hello.resources.to_string(),
                    ..Default::default()
                });
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
                        files,
                        running: HashSet::default(),
                        growth: WorkerGrowth::default(),
                        refusals_in_row: 0,
                        blocked_until: None,
                        joined: self.now,
                        tasks_ended: 0,
                    },
                );
                self.last_joined = self.now;
                self.refresh_largest();
                // It may take back a task sent ahead to a busy worker.
                self.touched.push(key);
            }
        }
    }

    pub(super) fn on_worker_msg(&mut self, key: WorkerKey, msg: WorkerMsg) {
        {
            match msg {
                WorkerMsg::TaskDone { report, .. } => self.task_done(key, *report),
                WorkerMsg::Rejected {
                    task_id,
                    attempt,
                    reason,
                } => {
                    self.worker_refused(key, task_id, attempt, &reason);
                }
                WorkerMsg::Grow {
                    task_id,
                    attempt,
                    used_mb,
                    ..
                } => self.grow_asked(key, task_id, attempt, used_mb),
                WorkerMsg::Started { task_id, attempt } => self.started(key, task_id, attempt),
                WorkerMsg::Exited { task_id, attempt } => self.exited(key, task_id, attempt),
                WorkerMsg::Goodbye { reason } => debug!("worker {key} says goodbye: {reason}"),
                WorkerMsg::DiskFree { free_mb } => self.sched.set_disk_free(key, free_mb),
                WorkerMsg::Recalled {
                    task_id,
                    attempt,
                    given_back,
                } => self.recalled(key, task_id, attempt, given_back),
                WorkerMsg::Pong
                | WorkerMsg::Hello(_)
                | WorkerMsg::AuthProof { .. }
                | WorkerMsg::Cached { .. }
                | WorkerMsg::StatusQuery { .. } => {}
            }
        }
    }
}
