//! Growth in place, the master's side, in one place: the class requests
//! charged their growth reserve, the room each worker holds for its tasks'
//! growth, a frozen task's grant (whole or partial), its refusal (it is
//! killed and retried with what it asked for), and the reserves given back
//! as tasks end or outlive their category's growing age. What a task grows
//! to is the category's to say (`category::growth`).

use super::*;

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

/// One worker's growth accounts, beside its free resources (which are the
/// scheduler's): the room held back from the scheduler for its tasks'
/// growth, and what its frozen tasks were given so far. What it has in use
/// is what neither the scheduler nor these hold (see [`Engine::in_use`]).
#[derive(Default)]
pub(super) struct WorkerGrowth {
    /// Tasks frozen over their memory, oldest first; only the first takes
    /// the room that frees up, so that the oldest is served first.
    pub(super) growing: VecDeque<GrowWait>,
    /// Memory taken from the scheduler and held free for the growth of the
    /// tasks here that may still grow: placements charge it with their
    /// allocation, tasks that ask to grow draw on it (whichever of them it
    /// came with), and it goes back as those that did not grow end. Never
    /// more than `reserved_mb`.
    pub(super) room_mb: u64,
    /// The sum of `reserve_mb` over the tasks running here.
    pub(super) reserved_mb: u64,
    /// Tasks placed here with a growth reserve, oldest first, with when
    /// they were placed: see [`Engine::let_go_of_aged_reserves`].
    pub(super) reserves: VecDeque<(Instant, TaskId, u32)>,
}

impl WorkerGrowth {
    /// `task`'s attempt was placed here with `reserve_mb` for growth: the
    /// room holds it. True if that is a reserve to let go of by age.
    pub(super) fn hold(
        &mut self,
        now: Instant,
        task: TaskId,
        attempt: u32,
        reserve_mb: u64,
    ) -> bool {
        if reserve_mb == 0 {
            return false;
        }
        self.room_mb += reserve_mb;
        self.reserved_mb += reserve_mb;
        self.reserves.push_back((now, task, attempt));
        true
    }

    /// A task's reserve of `own` MB is off the books: returns the room
    /// that now backs no task's reserve (at most `own`; less if others'
    /// growth used the room), which leaves the room.
    pub(super) fn release(&mut self, own: u64) -> u64 {
        self.reserved_mb = self.reserved_mb.saturating_sub(own);
        let spare = self.room_mb.saturating_sub(self.reserved_mb);
        self.room_mb -= spare;
        spare
    }

    /// Held back from the scheduler and not yet any task's: the room, and
    /// what frozen tasks were given towards their growth.
    pub(super) fn held(&self) -> Resources {
        self.growing.iter().fold(
            Resources {
                memory_mb: self.room_mb,
                ..Default::default()
            },
            |a, w| a.saturating_add(&w.have),
        )
    }
}

/// A placement from a category's class was charged its growth reserve on
/// top of the allocation (see [`Engine::apply_class_requests`]): takes that
/// part off `p`'s allocation and returns it, for the worker's growth room.
pub(super) fn charge_reserve(
    class_reserve_mb: &HashMap<ClassKey, u64>,
    p: &mut Placement,
    task: &mut TaskEntry,
) -> u64 {
    let reserve_mb = match (task.rung, task.sizing) {
        (None, Sizing::Learned { class, .. }) => class_reserve_mb
            .get(&class)
            .copied()
            .unwrap_or(0)
            .min(p.allocation.memory_mb),
        _ => 0,
    };
    p.allocation.memory_mb -= reserve_mb;
    task.reserve_mb = reserve_mb;
    task.first_growth_pending = reserve_mb > 0;
    reserve_mb
}

/// A task frozen over its memory allocation, waiting on its worker for the
/// room to grow to `target` (see [`Engine::grow_asked`]).
pub(super) struct GrowWait {
    pub(super) task: TaskId,
    pub(super) attempt: u32,
    pub(super) target: Resources,
    /// Taken from the worker's free resources so far (see
    /// [`Scheduler::take`]), towards `target - allocation`.
    pub(super) have: Resources,
    pub(super) asked: Instant,
    /// How long it may wait before it is killed and retried instead.
    pub(super) patience: Duration,
}

impl<O: Outbox> Engine<O> {
    /// What `key` has in use: its resources less what the scheduler has
    /// free and what is held for growth. Derived, not kept, so that a
    /// worker's memory is in two accounts only.
    pub(super) fn in_use(&self, key: WorkerKey) -> Resources {
        let Some(w) = self.workers.get(&key) else {
            return Resources::default();
        };
        let free = self.sched.free(key).unwrap_or_default();
        w.hello
            .resources
            .saturating_sub(&free)
            .saturating_sub(&w.growth.held())
    }

    /// Gives the scheduler each class's request, charged its growth
    /// reserve on top (the placement gives that part to the worker's
    /// growth room: see `dispatch`).
    pub(super) fn apply_class_requests(
        &mut self,
        requests: impl IntoIterator<Item = ClassRequest>,
    ) {
        for ClassRequest {
            class,
            request,
            reserve_mb,
        } in requests
        {
            let charged = match request {
                Request::Fixed(mut r) => {
                    r.memory_mb = r.memory_mb.saturating_add(reserve_mb);
                    Request::Fixed(r)
                }
                whole => whole,
            };
            self.class_reserve_mb.insert(class, reserve_mb);
            // A class that holds no growth room may be sent ahead (W1's
            // rate, for tasks that leave something for their category to
            // learn); one that does keeps the room that frees for growth.
            let may_go_ahead = reserve_mb == 0 && matches!(request, Request::Fixed(_));
            self.sched.set_class_may_go_ahead(class, may_go_ahead);
            self.sched.set_class_request(class, charged);
        }
    }

    /// A growable task is frozen over its memory allocation on `key`. It
    /// gets its category's growth target (see `CategoryState::grow_seen`)
    /// where it runs, as soon as the worker has the room (which is
    /// reserved for it as it frees up: see [`Engine::serve_growth`]); if it
    /// cannot get it in time, it is refused, killed, and retried with that
    /// target. Growing keeps what the task did so far; a retry throws it
    /// away.
    pub(super) fn grow_asked(&mut self, key: WorkerKey, id: TaskId, attempt: u32, used_mb: f64) {
        let target = self.grow_target(key, id, attempt, used_mb);
        let Some((target, started, allocation)) = target else {
            self.out.to_worker(
                key,
                Outgoing::Msg(MasterMsg::Grow {
                    task_id: id,
                    attempt,
                    allocation: None,
                }),
            );
            return;
        };
        let ran = self.now.saturating_duration_since(started);
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
        worker.growth.growing.push_back(GrowWait {
            task: id,
            attempt,
            target,
            have,
            asked: self.now,
            patience,
        });
        self.growing_workers.insert(key);
        self.serve_growth(key);
    }

    /// The allocation a task that asks to grow should get, when its
    /// attempt started, and what it holds now; `None` if it should be
    /// killed instead.
    pub(super) fn grow_target(
        &self,
        key: WorkerKey,
        id: TaskId,
        attempt: u32,
        used_mb: f64,
    ) -> Option<(Resources, Instant, Resources)> {
        let task = self.tasks.get(&id)?;
        let TaskState::Running {
            worker,
            attempt: running,
            allocation,
            started,
            on_worker_queue: false,
            exited: false,
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
    pub(super) fn serve_growth(&mut self, key: WorkerKey) {
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
                if started <= worker.growth.growing.len() {
                    if let Some(newest) = worker.growth.growing.pop_back() {
                        self.sched.give(key, newest.have);
                        refuse_growth(&mut self.tasks, &mut self.out, key, &newest);
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
            let Some(head) = worker.growth.growing.front_mut() else {
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
                    worker.growth.growing.pop_front();
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
                .min(worker.growth.room_mb);
            worker.growth.room_mb -= from_room;
            got.memory_mb += from_room;
            head.have = head.have.saturating_add(&got);
            let complete = need.saturating_sub(&got).is_zero();
            let partial = head.have.memory_mb >= GROW_PARTIAL_MIN_MB.max(allocation.memory_mb / 4);
            if complete || partial {
                let Some(wait) = worker.growth.growing.pop_front() else {
                    continue;
                };
                let grown = allocation.saturating_add(&wait.have);
                self.out.to_worker(
                    key,
                    Outgoing::Msg(MasterMsg::Grow {
                        task_id: wait.task,
                        attempt: wait.attempt,
                        allocation: Some(grown),
                    }),
                );
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
            if worker.running.len() > worker.growth.growing.len() {
                return;
            }
            if let Some(newest) = worker.growth.growing.pop_back() {
                self.sched.give(key, newest.have);
                refuse_growth(&mut self.tasks, &mut self.out, key, &newest);
            }
        }
    }

    /// Lets the tasks that ran past their category's reserve hold (see
    /// `CategoryState::reserve_hold_s`) without asking to grow give back
    /// their growth reserve, so that more tasks can start. Costs O(1) per
    /// worker plus the reserves let go.
    pub(super) fn let_go_of_aged_reserves(&mut self) {
        let now = self.now;
        let keys: Vec<WorkerKey> = self.reserving_workers.iter().copied().collect();
        for key in keys {
            loop {
                let Some(&(placed, id, attempt)) = self
                    .workers
                    .get(&key)
                    .and_then(|w| w.growth.reserves.front())
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
                    w.growth.reserves.pop_front();
                }
            }
        }
    }

    /// `id`'s attempt on `key` ended, or ran long enough not to need the
    /// room held for its growth: that room goes back to the scheduler, as
    /// far as the others' growth did not use it.
    pub(super) fn end_reserve(&mut self, key: WorkerKey, id: TaskId) {
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
    pub(super) fn release_reserve(&mut self, key: WorkerKey, id: TaskId) -> u64 {
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
        worker.growth.release(own)
    }

    /// Forgets `id`'s wait to grow on `key`, if any (it ended, or its
    /// worker took it back), and gives what it had been given back to the scheduler.
    pub(super) fn drop_grow_wait(&mut self, key: WorkerKey, id: TaskId) {
        if !self.growing_workers.contains(&key) {
            return;
        }
        let Some(worker) = self.workers.get_mut(&key) else {
            return;
        };
        if let Some(pos) = worker.growth.growing.iter().position(|w| w.task == id) {
            if let Some(wait) = worker.growth.growing.remove(pos) {
                self.sched.give(key, wait.have);
            }
        }
    }

    /// Refuses the frozen tasks that have waited longer than their
    /// patience: each is killed and retried on its next rung, as if it had
    /// had nowhere to grow.
    pub(super) fn grow_timeouts(&mut self) {
        let now = self.now;
        let keys: Vec<WorkerKey> = self.growing_workers.iter().copied().collect();
        for key in keys {
            let Some(worker) = self.workers.get_mut(&key) else {
                continue;
            };
            let mut i = 0;
            while i < worker.growth.growing.len() {
                let wait = &worker.growth.growing[i];
                if now.duration_since(wait.asked) < wait.patience {
                    i += 1;
                    continue;
                }
                if let Some(wait) = worker.growth.growing.remove(i) {
                    debug!(
                        task = wait.task,
                        "no room to grow after {:?}", wait.patience
                    );
                    self.sched.give(key, wait.have);
                    refuse_growth(&mut self.tasks, &mut self.out, key, &wait);
                }
            }
            self.serve_growth(key);
        }
    }
}

/// Refuses a frozen task the room to grow: its worker kills it, and it is
/// retried with the allocation it asked for (see `grow_refused`).
pub(super) fn refuse_growth(
    tasks: &mut super::state::TaskTable,
    out: &mut impl Outbox,
    key: WorkerKey,
    wait: &GrowWait,
) {
    if let Some(task) = tasks.get_mut(&wait.task) {
        task.grow_refused = Some(wait.target);
    }
    out.to_worker(
        key,
        Outgoing::Msg(MasterMsg::Grow {
            task_id: wait.task,
            attempt: wait.attempt,
            allocation: None,
        }),
    );
}
