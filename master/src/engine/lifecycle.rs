//! A task's life on the master: submitted, placed, sent ahead, started,
//! done (or killed, lost, rejected) and retried or finished.

use super::*;

impl<O: Outbox> Engine<O> {
    pub(super) fn submit(&mut self, spec: Box<Prepared>) {
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
            let request = self.categories.prime(cat, class);
            self.apply_class_requests(request);
        }
        self.tasks.insert(
            id,
            TaskEntry {
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
            },
        );
        self.enqueue_task(id);
        self.stats.tasks_waiting += 1;
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
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let TaskState::Running {
            worker: w,
            attempt: a,
            allocation,
            ..
        } = task.state
        else {
            return;
        };
        if w != worker || a != attempt {
            return;
        }
        let has_outputs = !task.spec.outputs.is_empty();
        self.drop_grow_wait(worker, id);
        if let Some(wk) = self.workers.get_mut(&worker) {
            wk.running.remove(&id);
        }
        if has_outputs {
            self.out
                .to_worker(worker, Outgoing::ForgetOutputs { task: id, attempt });
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

    pub(super) fn task_done(&mut self, key: WorkerKey, report: TaskReport) {
        let id = report.task_id;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt,
            allocation,
            ..
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
            let requests = self.categories.attempt_ended(
                cat,
                &allocation,
                &report.measured,
                exhausted.is_some(),
                success,
            );
            if let Some(requests) = requests {
                learned = Some((cat, requests));
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
                    if let Some((cat, requests)) = learned {
                        self.apply_class_requests(requests);
                        self.retarget(cat);
                    }
                    return;
                }
                self.categories.note_exhausted(cat);
            }
        }
        if let Some((cat, requests)) = learned {
            self.apply_class_requests(requests);
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
        self.finish(id, outcome, Some((report, host)), error);
    }

    /// Removes the task and hands its result to the user.
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
        self.out.to_user(result);
    }

    pub(super) fn schedule(&mut self) {
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
                let growing = self
                    .workers
                    .get(&key)
                    .is_none_or(|w| !w.growth.growing.is_empty());
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
    pub(super) fn started(&mut self, key: WorkerKey, id: TaskId, attempt: u32) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let TaskState::Running {
            worker,
            attempt: a,
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
        self.touched.push(key);
        self.serve_growth(key);
    }
}
