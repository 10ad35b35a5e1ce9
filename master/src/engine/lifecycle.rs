//! A task's life on the master: submitted, placed, sent ahead, started,
//! done (or killed, lost, rejected) and retried or finished.

use super::*;

impl<O: Outbox> Engine<O> {
    pub(super) fn submit(&mut self, mut spec: Box<Prepared>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let cached_keys = self.cached_keys(&mut spec);
        let id = spec.id;
        let sizing = self.categories.sizing(&spec.category, &spec.resources);
        self.history
            .submitted(&spec.category, matches!(sizing, Sizing::Learned { .. }));
        if let Sizing::Learned { cat, class } = sizing {
            let request = self.categories.prime(cat, class);
            self.apply_class_requests(request);
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
                refusals: 0,
                resource_retries: 0,
            }),
        );
        self.enqueue_task(id);
        self.stats.tasks_waiting += 1;
        if let Some(task) = self.tasks.get(&id) {
            let (m, r) = (&mut self.declared_max, &task.spec.resources);
            m.cores = m.cores.max(r.cores);
            m.memory_mb = m.memory_mb.max(r.memory_mb);
            m.disk_mb = m.disk_mb.max(r.disk_mb);
            m.gpus = m.gpus.max(r.gpus);
        }
        self.check_fit(id);
    }

    /// Puts a task in the scheduler with its current request: its ladder
    /// rung, else its category's class, else its declaration.
    pub(super) fn enqueue_task(&mut self, id: TaskId) {
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

    pub(super) fn cancel(&mut self, id: TaskId) -> bool {
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
                self.out.to_worker(
                    worker,
                    Outgoing::Msg(MasterMsg::Kill {
                        task_id: id,
                        attempt,
                    }),
                );
                true
            }
        }
    }

    pub(super) fn worker_gone(&mut self, key: WorkerKey, reason: &str) {
        let Some(worker) = self.workers.remove(&key) else {
            return;
        };
        info!(worker = %worker.addr, "worker left: {reason}");
        self.history.event(drover_catalog::EventSummary {
            kind: "worker lost".into(),
            host: worker.hello.hostname.clone(),
            addr: worker.addr.to_string(),
            detail: format!("{reason}; {} task(s) were on it", worker.running.len()),
            ..Default::default()
        });
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
            let queued = matches!(
                task.state,
                TaskState::Running {
                    on_worker_queue: true,
                    ..
                }
            );
            task.attempts.push(Attempt {
                host: worker.hello.hostname.clone(),
                allocation,
                ending: format!("worker lost ({reason})"),
            });
            self.stats.leave_running(queued);
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
    pub(super) fn retarget(&mut self, cat: CatId) {
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

    pub(super) fn enqueue_again(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.state = TaskState::Waiting;
        self.enqueue_task(id);
        self.stats.tasks_waiting += 1;
    }

    /// Takes a running attempt back from `worker` and queues it again.
    pub(super) fn requeue(
        &mut self,
        worker: WorkerKey,
        id: TaskId,
        attempt: u32,
        why: String,
        count_attempt: bool,
    ) {
        if self.take_back(worker, id, attempt, count_attempt.then_some(why)) {
            self.stats.tasks_requeued += 1;
        }
    }

    /// Takes `id`'s attempt back from `worker`, recording it as an attempt
    /// that ended with `ending` if given, and queues the task again (true)
    /// or finishes it as cancelled.
    fn take_back(
        &mut self,
        worker: WorkerKey,
        id: TaskId,
        attempt: u32,
        ending: Option<String>,
    ) -> bool {
        let Some(allocation) = self.running_attempt(worker, id, attempt) else {
            return false;
        };
        let has_outputs = self
            .tasks
            .get(&id)
            .is_some_and(|t| !t.spec.outputs.is_empty());
        if has_outputs {
            self.out
                .to_worker(worker, Outgoing::ForgetOutputs { task: id, attempt });
        }
        let host = self.release_attempt(worker, id, allocation);
        let Some(task) = self.tasks.get_mut(&id) else {
            return false;
        };
        if let Some(ending) = ending {
            task.attempts.push(Attempt {
                host,
                allocation,
                ending,
            });
        }
        if task.cancelling {
            self.finish(id, Outcome::Cancelled, None, None);
            false
        } else {
            self.enqueue_again(id);
            true
        }
    }

    /// The allocation of `id`'s attempt `attempt` if it is the one running
    /// on `worker` (a report of any other is stale).
    fn running_attempt(&self, worker: WorkerKey, id: TaskId, attempt: u32) -> Option<Resources> {
        match self.tasks.get(&id)?.state {
            TaskState::Running {
                worker: w,
                attempt: a,
                allocation,
                ..
            } if w == worker && a == attempt => Some(allocation),
            _ => None,
        }
    }

    /// `id`'s attempt on `worker` is over: what it held goes back to the
    /// scheduler, its growth reserve and any wait to grow end, and the
    /// worker's frozen tasks may take the room. Returns the worker's host.
    fn release_attempt(&mut self, worker: WorkerKey, id: TaskId, allocation: Resources) -> String {
        let (queued, exited) = match self.tasks.get(&id).map(|t| &t.state) {
            Some(&TaskState::Running {
                on_worker_queue,
                exited,
                ..
            }) => (on_worker_queue, exited),
            _ => (false, false),
        };
        self.drop_grow_wait(worker, id);
        let host = match self.workers.get_mut(&worker) {
            Some(w) => {
                w.running.remove(&id);
                w.hello.hostname.clone()
            }
            None => String::new(),
        };
        if !exited {
            self.sched.release_task(worker, id, allocation);
        }
        self.end_reserve(worker, id);
        self.serve_growth(worker);
        self.stats.leave_running(queued);
        host
    }

    /// A worker reported an attempt's end. In steps: free what it held;
    /// let its category learn from it; retry it bigger if it went over its
    /// allocation, or again if an input went missing; else finish it.
    pub(super) fn task_done(&mut self, key: WorkerKey, report: TaskReport) {
        let id = report.task_id;
        let write_error = self.failed_writes.remove(&(id, report.attempt));
        let Some(allocation) = self.running_attempt(key, id, report.attempt) else {
            debug!(task = id, "ignoring a stale report");
            return;
        };
        if let Some(reason) = worker_fault(&report) {
            let cancelling = self.tasks.get(&id).is_some_and(|t| t.cancelling);
            if !cancelling {
                // The worker could not even set the task up: that is the
                // worker's failing (a broken node, a full disk), like a
                // refusal, and the task goes elsewhere.
                self.worker_refused(key, id, report.attempt, &reason);
                return;
            }
        }
        if report.ending == Ending::InputMissing {
            // Its cache lost an input: the task is retried (below), and the
            // worker that lost it counts it against itself.
            let reason = report.error.as_deref().unwrap_or("input missing");
            self.block_worker(key, id, reason);
        }
        let host = self.release_attempt(key, id, allocation);
        self.touched.push(key);
        if let Some(w) = self.workers.get_mut(&key) {
            w.tasks_ended += 1;
            // A task that got as far as running clears the worker's record.
            if report.ending != Ending::SetupFailed {
                w.refusals_in_row = 0;
            }
        }
        let exhausted = exhausted_dim(&report);
        let learned = self.learn_from_attempt(id, &allocation, &report, exhausted.is_some());
        let ended = Ended {
            key,
            id,
            host,
            allocation,
            report: &report,
        };
        let resized = exhausted.is_some_and(|dim| self.retry_bigger(&ended, dim));
        if let Some((cat, requests)) = learned {
            self.apply_class_requests(requests);
            self.retarget(cat);
        }
        if resized || self.retry_input_missing(&ended) {
            return;
        }
        let host = ended.host;
        self.finish_reported(id, host, allocation, report, write_error);
    }

    /// A learned task's category records the attempt; `Some` with its new
    /// class requests when what it answers may have changed.
    fn learn_from_attempt(
        &mut self,
        id: TaskId,
        allocation: &Resources,
        report: &TaskReport,
        killed: bool,
    ) -> Option<(CatId, Vec<ClassRequest>)> {
        let Sizing::Learned { cat, .. } = self.tasks.get(&id)?.sizing else {
            return None;
        };
        let success = report.ending == Ending::Exited && report.exit_code == Some(0);
        self.categories.forget_retrying(cat, id);
        let requests =
            self.categories
                .attempt_ended(cat, allocation, &report.measured, killed, success)?;
        Some((cat, requests))
    }

    /// A learned task went over its allocation in `dim`: it is queued again
    /// on its next rung (or with what it asked to grow to, if it was refused
    /// that), unless its ladder is done. True if it was.
    fn retry_bigger(&mut self, ended: &Ended, dim: Dim) -> bool {
        let (id, allocation, report) = (ended.id, ended.allocation, ended.report);
        let whole = self.workers.get(&ended.key).map(|w| w.hello.resources);
        let Some(task) = self.tasks.get_mut(&id) else {
            return false;
        };
        let Sizing::Learned { cat, class } = task.sizing else {
            return false;
        };
        if task.cancelling {
            return false;
        }
        let was_whole = task.rung == Some(Request::WholeWorker) || whole == Some(allocation);
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
        let Some(next) = next else {
            self.categories.note_exhausted(cat);
            return false;
        };
        let what = report
            .limit_exceeded
            .as_ref()
            .map(|h| {
                format!(
                    "{} {:.0} over its limit of {:.0}",
                    h.resource, h.value, h.limit
                )
            })
            .unwrap_or_else(|| "over its allocation".into());
        task.attempts.push(Attempt {
            host: ended.host.clone(),
            allocation,
            ending: format!(
                "resource exhausted: {what}; retrying with {}",
                match next {
                    Request::Fixed(r) => r.to_string(),
                    Request::WholeWorker => "a whole worker".to_string(),
                }
            ),
        });
        task.rung = Some(next);
        task.resource_retries += 1;
        self.categories.note_retry(cat, RetryCause::Exhausted(dim));
        // A task refused growth is sized by what it was seen to need, not
        // by a rung to move as the category learns (see `retarget`).
        if refused_to.is_none() {
            let kill = Kill {
                class,
                failed: allocation,
                was_whole,
                dim,
                seen,
            };
            self.categories.note_retrying(cat, id, kill);
        }
        self.stats.tasks_resized += 1;
        self.enqueue_again(id);
        true
    }

    /// The worker's cache lost an input we thought it had (it forgets
    /// that), or its function server died holding the call: the task is
    /// queued again, within its retry budget (which bounds a call that
    /// kills the server itself). True if it was.
    fn retry_input_missing(&mut self, ended: &Ended) -> bool {
        let (id, allocation, report) = (ended.id, ended.allocation, ended.report);
        let Some(task) = self.tasks.get_mut(&id) else {
            return false;
        };
        let server_lost = function_server_lost(report);
        if !(report.ending == Ending::InputMissing || server_lost)
            || task.cancelling
            || task.lost >= task.spec.max_retries
        {
            return false;
        }
        task.lost += 1;
        if let Sizing::Learned { cat, .. } = task.sizing {
            self.categories.note_retry(cat, RetryCause::Other);
        }
        if let Some(w) = self.workers.get_mut(&ended.key).filter(|_| !server_lost) {
            for k in task.cached_keys.iter() {
                w.files.remove(k);
            }
        }
        task.attempts.push(Attempt {
            host: ended.host.clone(),
            allocation,
            ending: report
                .error
                .clone()
                .unwrap_or_else(|| "input missing".into()),
        });
        self.enqueue_again(id);
        self.stats.tasks_requeued += 1;
        true
    }

    /// The attempt's report is the task's result.
    fn finish_reported(
        &mut self,
        id: TaskId,
        host: String,
        allocation: Resources,
        report: TaskReport,
        write_error: Option<String>,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let mut outcome = outcome_of(&report, task.cancelling);
        let mut error = report.error.clone();
        if let (Outcome::Success, Some(e)) = (&outcome, write_error) {
            warn!(task = id, "{e}");
            outcome = Outcome::OutputWriteFailed { error: e.clone() };
            error = Some(e);
        }
        if outcome == Outcome::OutputMissing && error.is_none() {
            error = Some(format!(
                "missing outputs: {}",
                report.missing_outputs.join(", ")
            ));
        }
        task.attempts.push(Attempt {
            host: host.clone(),
            allocation,
            ending: outcome.words(report.exit_code, report.signal),
        });
        self.finish(id, outcome, Some((report, host)), error);
    }

    pub(super) fn finish(
        &mut self,
        id: TaskId,
        outcome: Outcome,
        report: Option<(TaskReport, String)>,
        error: Option<String>,
    ) {
        let Some(task) = self.tasks.remove(&id) else {
            return;
        };
        if self.unfit.remove(&id) {
            self.stats.tasks_fit_no_worker -= 1;
        }
        match outcome {
            Outcome::Success => self.stats.tasks_done += 1,
            Outcome::Cancelled => self.stats.tasks_cancelled += 1,
            _ => self.stats.tasks_failed += 1,
        }
        self.history
            .ended(&task.spec.category, outcome == Outcome::Success);
        if !matches!(outcome, Outcome::Success | Outcome::Cancelled) {
            self.history.event(crate::report::failure_event(
                id,
                &task.spec.tag,
                &task.attempts,
                error.as_deref(),
                report.as_ref().map(|(r, _)| r),
            ));
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
            call_result: None,
        };
        if let Some((report, host)) = report {
            result.exit_code = report.exit_code;
            result.signal = report.signal;
            result.stdout = report.stdout;
            result.stderr = report.stderr;
            result.measured = report.measured;
            result.call_result = report.call_result;
            result.started =
                Some(SystemTime::UNIX_EPOCH + Duration::from_millis(report.started_ms));
            result.host = Some(host);
        }
        self.out.to_user(result);
    }

    pub(super) fn schedule(&mut self) {
        if self.sched.waiting() > 0 && !self.workers.is_empty() {
            let mut placements = std::mem::take(&mut self.placements);
            placements.clear();
            self.sched.schedule(&mut placements);
            for p in placements.drain(..) {
                self.touched.push(p.worker);
                self.dispatch(p, false);
            }
            self.placements = placements;
        }
        self.recall_ahead();
        self.send_ahead();
    }

    /// Asks for tasks sent ahead back, for the workers that joined or freed
    /// in this pass and still have room after it (no waiting task fits
    /// them): one task per such worker and pass, from a holder that has not
    /// started it. The answer comes as `WorkerMsg::Recalled`.
    fn recall_ahead(&mut self) {
        if !self.sched.any_sent_ahead() {
            return;
        }
        for i in 0..self.touched.len() {
            let key = self.touched[i];
            if self.gone_or_growing(key) {
                continue;
            }
            let Some((holder, id)) = self.sched.recall_for(key) else {
                continue;
            };
            let attempt = match self.tasks.get(&id).map(|t| &t.state) {
                Some(&TaskState::Running {
                    worker,
                    attempt,
                    on_worker_queue: true,
                    ..
                }) if worker == holder => attempt,
                // The tables disagree: leave it where it is.
                _ => {
                    self.sched.recall_refused(holder, id);
                    continue;
                }
            };
            debug!("recalling task {id} from worker {holder} for worker {key}");
            self.out.to_worker(
                holder,
                Outgoing::Msg(MasterMsg::Recall {
                    task_id: id,
                    attempt,
                }),
            );
        }
    }

    /// Whether worker `key` is gone or has a task waiting to grow (the
    /// room it frees is that task's; nothing is sent or recalled for it).
    fn gone_or_growing(&self, key: WorkerKey) -> bool {
        self.workers
            .get(&key)
            .is_none_or(|w| !w.growth.growing.is_empty())
    }

    /// `key`'s answer to a recall: a task given back waits again and is
    /// placed as any other; one that started meanwhile goes on there (its
    /// `Started` came first).
    pub(super) fn recalled(&mut self, key: WorkerKey, id: TaskId, attempt: u32, given_back: bool) {
        let queued_here = self.tasks.get(&id).is_some_and(|t| {
            matches!(t.state, TaskState::Running { worker, attempt: a, on_worker_queue: true, .. }
                if worker == key && a == attempt)
        });
        if !queued_here {
            return;
        }
        if !given_back {
            self.sched.recall_refused(key, id);
            return;
        }
        self.stats.tasks_recalled += 1;
        // Not an attempt: it never started, and the next one reuses its number.
        self.take_back(key, id, attempt, None);
    }

    /// Sends tasks ahead to the workers that freed or filled up in this
    /// pass (see `ManagerBuilder::prefetch`), while more tasks wait than
    /// there are workers, and not to a worker with a task waiting to grow.
    pub(super) fn send_ahead(&mut self) {
        if self.prefetch == 0 || self.touched.is_empty() {
            self.touched.clear();
            return;
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &key in &touched {
            while self.sched.waiting() > self.workers.len() {
                if self.gone_or_growing(key) {
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

    /// The process of `id`'s attempt on `key` exited, and the worker is
    /// about to start a task sent ahead in the room it held: that room is
    /// the scheduler's again now, before the report (which the worker
    /// sends after its accounting of the task) arrives. The worker holds a
    /// task sent ahead, so no other task is placed in the room meanwhile
    /// (see `Scheduler::prefetch`); its `Started` follows.
    pub(super) fn exited(&mut self, key: WorkerKey, id: TaskId, attempt: u32) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt: a,
            allocation,
            on_worker_queue: false,
            ref mut exited,
            ..
        } = task.state
        else {
            return;
        };
        if worker != key || a != attempt || *exited {
            return;
        }
        *exited = true;
        // It cannot grow any more; room it was gathering goes back first.
        self.drop_grow_wait(key, id);
        self.sched.release(key, allocation);
        self.touched.push(key);
    }

    /// The interned keys of `spec`'s cached inputs and environment, in that
    /// order. A task naming the same cached files as the task submitted
    /// before it shares that task's input list and keys.
    fn cached_keys(&mut self, spec: &mut Prepared) -> Arc<[FileKey]> {
        if spec.environment.is_none() {
            if let Some((inputs, keys)) = &self.last_inputs {
                if spec.inputs.same_cached_files(inputs) {
                    spec.inputs = inputs.clone();
                    return Arc::clone(keys);
                }
            }
        }
        let mut keys = Vec::new();
        for input in spec.inputs.iter().chain(spec.environment.iter()) {
            if let Some(id) = &input.cache_id {
                keys.push(self.intern(id));
            }
        }
        if keys.is_empty() {
            return Arc::clone(&self.no_keys);
        }
        let keys: Arc<[FileKey]> = Arc::from(keys);
        if spec.environment.is_none() && spec.inputs.all_cached() {
            self.last_inputs = Some((spec.inputs.clone(), Arc::clone(&keys)));
        }
        keys
    }

    /// A task sent ahead to `key` started there.
    pub(super) fn started(&mut self, key: WorkerKey, id: TaskId, attempt: u32) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt: a,
            ref mut on_worker_queue,
            ref mut started,
            ..
        } = task.state
        else {
            return;
        };
        if worker != key || a != attempt || !*on_worker_queue || !self.sched.started(key, id) {
            return;
        }
        *on_worker_queue = false;
        // Its time on the worker starts now, not when it was sent.
        *started = self.now;
        self.stats.tasks_queued_on_workers -= 1;
        self.stats.tasks_running += 1;
        self.touched.push(key);
        self.serve_growth(key);
    }
}

/// An attempt that just ended, as the steps of `task_done` see it.
struct Ended<'a> {
    key: WorkerKey,
    id: TaskId,
    host: String,
    allocation: Resources,
    report: &'a TaskReport,
}

/// The resource an attempt went over, if it was killed for that (a wall
/// time limit is not a resource to retry bigger in).
fn exhausted_dim(report: &TaskReport) -> Option<Dim> {
    match (&report.ending, &report.limit_exceeded) {
        (Ending::LimitExceeded, Some(hit)) if hit.resource == "wall_time" => None,
        (Ending::LimitExceeded, hit) => Some(Dim::parse(
            hit.as_ref()
                .map(|h| h.resource.as_str())
                .unwrap_or("memory"),
        )),
        _ => None,
    }
}

/// What a report makes of a task that is not retried.
fn outcome_of(report: &TaskReport, cancelling: bool) -> Outcome {
    match report.ending {
        Ending::Exited if report.call_raised => Outcome::FunctionFailed,
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
        Ending::Killed if cancelling => Outcome::Cancelled,
        Ending::Killed => Outcome::Failed,
        Ending::InputMissing => Outcome::InputMissing,
        Ending::SetupFailed => Outcome::Failed,
    }
}

/// Why a report is the worker's failing rather than the task's: it could
/// not set the task up (its sandbox, an input, room for the environment). A
/// command that cannot be started (a program that does not exist) or a
/// corrupt environment archive is the task's.
fn worker_fault(report: &TaskReport) -> Option<String> {
    if report.ending != Ending::SetupFailed {
        return None;
    }
    let error = report.error.as_deref().unwrap_or("task setup failed");
    if drover_protocol::messages::setup_failure_is_the_tasks(error) || function_server_lost(report)
    {
        return None;
    }
    Some(format!("setup failed: {error}"))
}

/// Whether an attempt ended because the worker's function server died
/// holding the call: neither the worker's failing (it starts a new server)
/// nor known to be the call's, so it is run again within its retry budget.
fn function_server_lost(report: &TaskReport) -> bool {
    report.ending == Ending::SetupFailed
        && report
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with(drover_protocol::messages::FUNCTION_SERVER_LOST))
}

/// A worker that refuses a task is kept out of placement this long, doubled
/// for each further refusal in a row, up to [`REFUSAL_PAUSE_MAX`].
const REFUSAL_PAUSE_FIRST: Duration = Duration::from_secs(1);
const REFUSAL_PAUSE_MAX: Duration = Duration::from_secs(300);
/// Refusals a task may meet (from any workers) before it ends: it is then
/// something no worker will take, not a bad worker.
const REFUSALS_MAX: u32 = 10;

impl<O: Outbox> Engine<O> {
    /// A worker refused a task (a broken node, a full disk, a buggy build).
    /// The task goes back to the queue, and the worker is kept out of
    /// placement for a while, doubling with each refusal in a row, so it
    /// cannot take the same task back at once, for ever (1.4 million `run`
    /// frames in 60 s, before). A task refused too often ends as failed,
    /// saying so, instead of looping.
    pub(super) fn worker_refused(
        &mut self,
        key: WorkerKey,
        id: TaskId,
        attempt: u32,
        reason: &str,
    ) {
        if self.running_attempt(key, id, attempt).is_none() {
            return;
        }
        self.block_worker(key, id, reason);
        let refusals = self.tasks.get_mut(&id).map_or(0, |t| {
            t.refusals += 1;
            t.refusals
        });
        // A worker refuses a cached input it has no room for without keeping
        // it: forget that it has the task's cached inputs, or they would never
        // be sent again and it would refuse every task needing them.
        if let (Some(task), Some(w)) = (self.tasks.get(&id), self.workers.get_mut(&key)) {
            for k in task.cached_keys.iter() {
                w.files.remove(k);
            }
        }
        self.requeue(key, id, attempt, format!("refused: {reason}"), true);
        if refusals >= REFUSALS_MAX {
            let waiting = self
                .tasks
                .get(&id)
                .is_some_and(|t| matches!(t.state, TaskState::Waiting));
            if waiting {
                self.sched.remove_waiting(id);
                self.stats.tasks_waiting -= 1;
                let error = format!("refused by workers {refusals} times, last: {reason}");
                self.finish(id, Outcome::Failed, None, Some(error));
            }
        }
    }

    /// Counts a failing against worker `key` (it refused task `id`, could
    /// not set it up, or lost its input): it is kept out of placement for
    /// a while, doubling with each failing in a row.
    fn block_worker(&mut self, key: WorkerKey, id: TaskId, reason: &str) {
        if let Some(w) = self.workers.get_mut(&key) {
            w.refusals_in_row += 1;
            let doublings = (w.refusals_in_row - 1).min(16);
            let pause = REFUSAL_PAUSE_FIRST
                .saturating_mul(1 << doublings)
                .min(REFUSAL_PAUSE_MAX);
            w.blocked_until = Some(self.now + pause);
            warn!(
                worker = %w.addr,
                host = %w.hello.hostname,
                "worker refused task {id}: {reason}; no new task goes there for {pause:?} \
                 ({} refusals in a row)",
                w.refusals_in_row
            );
            self.sched.set_blocked(key, true);
            self.blocked_workers.insert(key);
        }
    }

    /// Lets blocked workers whose pause is over take tasks again.
    pub(super) fn unblock_workers(&mut self) {
        let now = self.now;
        let due: Vec<WorkerKey> = self
            .blocked_workers
            .iter()
            .copied()
            .filter(|k| {
                self.workers
                    .get(k)
                    .is_none_or(|w| w.blocked_until.is_none_or(|t| t <= now))
            })
            .collect();
        for key in due {
            self.blocked_workers.remove(&key);
            if let Some(w) = self.workers.get_mut(&key) {
                w.blocked_until = None;
                self.sched.set_blocked(key, false);
                self.touched.push(key);
            }
        }
    }
}

impl<O: Outbox> Engine<O> {
    /// Counts waiting task `id` as fitting no worker if it declares more
    /// than the largest connected one has (nothing is said with no worker).
    pub(super) fn check_fit(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let unfit = !self.workers.is_empty()
            && matches!(task.state, TaskState::Waiting)
            && shortfall(&task.spec.resources, &self.largest).is_some();
        if unfit {
            if self.unfit.insert(id) {
                self.stats.tasks_fit_no_worker += 1;
            }
        } else if self.unfit.remove(&id) {
            self.stats.tasks_fit_no_worker -= 1;
        }
    }

    /// The largest worker changed: every waiting task is looked at again.
    /// A pass over the tasks, only when a worker of a new largest size
    /// joins or the last of one leaves, not per task or per worker.
    pub(super) fn recheck_unfit(&mut self) {
        // Nothing marked and nothing that could be: skip the pass (at a
        // million queued tasks, a cache miss each, it was 1.5% of a run).
        if self.unfit.is_empty()
            && !self.workers.is_empty()
            && shortfall(&self.declared_max, &self.largest).is_none()
        {
            return;
        }
        let ids: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.state, TaskState::Waiting))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.check_fit(id);
        }
    }

    /// Ends the tasks that fit no worker once they have waited long enough
    /// since the last worker joined.
    pub(super) fn end_unfit_tasks(&mut self) {
        let Some(wait) = self.fits_no_worker_wait else {
            return;
        };
        if self.unfit.is_empty() || self.now < self.last_joined + wait {
            return;
        }
        let largest = self.largest;
        let ids: Vec<TaskId> = self.unfit.iter().copied().collect();
        for id in ids {
            let Some(need) = self
                .tasks
                .get(&id)
                .and_then(|t| shortfall(&t.spec.resources, &largest))
            else {
                continue;
            };
            warn!(task = id, "fits no worker: {need}");
            self.sched.remove_waiting(id);
            self.stats.tasks_waiting -= 1;
            let error = format!("fits no worker: {need}");
            self.finish(id, Outcome::FitsNoWorker { need }, None, Some(error));
        }
    }
}

/// What `need` declares beyond `have`, in words ("needs 64 cores, largest
/// worker has 2"), or `None` if it fits.
fn shortfall(need: &Resources, have: &Resources) -> Option<String> {
    let over = |what: &str, n: u64, h: u64, unit: &str| {
        (n > h).then(|| format!("needs {n}{unit} {what}, largest worker has {h}{unit}"))
    };
    over("cores", need.cores.into(), have.cores.into(), "")
        .or_else(|| over("memory", need.memory_mb, have.memory_mb, " MB"))
        .or_else(|| over("disk", need.disk_mb, have.disk_mb, " MB"))
        .or_else(|| over("gpus", need.gpus.into(), have.gpus.into(), ""))
}
