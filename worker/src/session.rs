//! One connection to a master: the handshake, then the message loop that
//! admits tasks within the worker's resources (never overcommitting, even
//! when asked), queues tasks sent ahead, grants or refuses growth, answers
//! pings, and notices a silent master.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use drover_protocol::auth::{self, Answer, AuthError, PeerHandshake};
use drover_protocol::stream::{End, Handshaking, Reader, Writer};
use drover_protocol::{
    hostname, Ending, Hello, MasterMsg, Resources, RunTask, TaskReport, WorkerMsg, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::main_loop::{Dirs, Shared, StopReason, WorkerConfig};
use crate::retry::Fatal;
use crate::task::{now_ms, run_task, Control, TaskContext};
use crate::transfer::{read_loop, write_loop, Finished, Outgoing, ReadDirs};

/// The session's view of a task it started.
struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
    /// What it holds of this worker now (its allocation, grown or not).
    allocation: Resources,
    /// Its process exited and its room went to a task sent ahead before
    /// its accounting was done (see [`Tasks::exited`]): it holds nothing.
    room_given: bool,
}

/// What a task's own future tells the session.
pub(crate) enum TaskEvent {
    /// Its process exited; its final accounting and report are under way.
    Exited { task_id: u64, attempt: u32 },
    /// It is over, report and all.
    Finished(Box<Finished>),
}

/// The tasks of one session and what they hold of this worker: admits a
/// task only within what is free (never overcommitting, even when the
/// master asks), queues tasks sent ahead, grants growth from what is free,
/// and takes back what a finished task held.
struct Tasks<'a> {
    dirs: &'a Dirs,
    shared: &'a Shared,
    total: Resources,
    free: Resources,
    free_gpus: Vec<u32>,
    running: HashMap<(u64, u32), TaskHandle>,
    /// Tasks sent ahead (`RunTask::queued`), not started yet.
    queue: VecDeque<Box<RunTask>>,
    events: mpsc::UnboundedSender<TaskEvent>,
    out_tx: mpsc::UnboundedSender<Outgoing>,
}

impl Tasks<'_> {
    fn send(&self, msg: WorkerMsg) {
        let _ = self.out_tx.send(Outgoing::Msg(msg));
    }

    fn is_empty(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty()
    }

    /// A task from the master: started, queued (sent ahead) or rejected.
    fn run(&mut self, task: Box<RunTask>) {
        let key = (task.task_id, task.attempt);
        let known = self.running.contains_key(&key)
            || self.queue.iter().any(|t| (t.task_id, t.attempt) == key);
        let room = if task.queued { self.total } else { self.free };
        if !task.allocation.fits_in(&room) || known {
            let reason = format!(
                "task {} needs {:?} but this worker has {:?} free; refusing to overcommit",
                task.task_id, task.allocation, room
            );
            warn!("{reason}");
            self.send(WorkerMsg::Rejected {
                task_id: task.task_id,
                attempt: task.attempt,
                reason,
            });
            return;
        }
        if task.queued {
            // It may fit already: a task may have ended while the master sent it.
            self.queue.push_back(task);
            self.start_queued();
        } else {
            self.start(task);
        }
    }

    /// Cancels a task: a running one is killed (and reports itself), a
    /// queued one ends here, holding nothing.
    fn kill(&mut self, task_id: u64, attempt: u32) {
        if let Some(t) = self.running.get(&(task_id, attempt)) {
            let _ = t.control.send(Control::Kill);
        } else if self.unqueue(task_id, attempt) {
            let report = TaskReport::never_started(task_id, attempt, Ending::Killed, now_ms());
            self.send(WorkerMsg::TaskDone {
                report: Box::new(report),
                outputs: Vec::new(),
            });
        }
    }

    /// The master wants a task sent ahead back (another worker has room
    /// for it): given back if it has not started. A task that started has
    /// said so already, on the same connection, before this answer.
    fn recall(&mut self, task_id: u64, attempt: u32) {
        let given_back = self.unqueue(task_id, attempt);
        self.send(WorkerMsg::Recalled {
            task_id,
            attempt,
            given_back,
        });
    }

    /// Drops a task sent ahead that has not started, and the per-task
    /// input files it was sent with (a started task moves them into its
    /// sandbox). False if it is not waiting here.
    fn unqueue(&mut self, task_id: u64, attempt: u32) -> bool {
        let Some(pos) = self
            .queue
            .iter()
            .position(|t| (t.task_id, t.attempt) == (task_id, attempt))
        else {
            return false;
        };
        if let Some(task) = self.queue.remove(pos) {
            // Only ids a file could have been received under (see `receive_file`).
            let received = |id: &str| !id.is_empty() && !id.contains('/') && !id.starts_with('.');
            for input in task
                .inputs
                .iter()
                .filter(|i| !i.cached && received(&i.file_id))
            {
                let _ = std::fs::remove_file(self.dirs.transfer.join(&input.file_id));
            }
        }
        true
    }

    /// The master's answer to a frozen task's request to grow.
    fn grow(&mut self, task_id: u64, attempt: u32, allocation: Option<Resources>) {
        // Gone meanwhile (it ended, or was killed): nothing to do.
        let Some(t) = self.running.get_mut(&(task_id, attempt)) else {
            return;
        };
        if t.room_given {
            return;
        }
        let free = self.free;
        match crate::growth::grant(&t.allocation, allocation, &free) {
            Some(new) => {
                self.free = free.saturating_sub(&new.saturating_sub(&t.allocation));
                t.allocation = new;
                let _ = t.control.send(Control::Grow(new));
            }
            None => {
                if let Some(new) = allocation {
                    warn!("task {task_id}: refusing to grow to {new:?} with {free:?} free");
                }
                let _ = t.control.send(Control::Refuse);
            }
        }
    }

    /// A task's process exited. If the first task sent ahead fits in what
    /// it held, that room is given to it now, so that the slot's cores do
    /// not idle while the exited task is reaped, measured and reported:
    /// the master hears `Exited` (the room is free) before `Started`. A
    /// task holding gpus keeps them until its end (they are handed out by
    /// number, at its finish).
    fn exited(&mut self, task_id: u64, attempt: u32) {
        let Some(t) = self.running.get_mut(&(task_id, attempt)) else {
            return;
        };
        if t.room_given || t.allocation.gpus > 0 {
            return;
        }
        let room = self.free.saturating_add(&t.allocation);
        if !self
            .queue
            .front()
            .is_some_and(|q| q.allocation.fits_in(&room))
        {
            return;
        }
        t.room_given = true;
        self.free = room;
        debug!("task {task_id}: its process exited; its room goes to a task sent ahead");
        self.send(WorkerMsg::Exited { task_id, attempt });
        self.start_queued();
    }

    /// A task ended: what it held is free again before its report goes
    /// out (unless a task sent ahead has it already), and the tasks sent
    /// ahead that now fit start.
    fn finished(&mut self, mut finished: Box<Finished>) {
        let held = match self
            .running
            .remove(&(finished.report.task_id, finished.report.attempt))
        {
            Some(t) if t.room_given => Resources::default(),
            Some(t) => t.allocation,
            None => finished.allocation,
        };
        self.free = self.free.saturating_add(&held);
        self.free_gpus.append(&mut finished.gpus);
        let _ = self.out_tx.send(Outgoing::Done(finished));
        self.start_queued();
    }

    /// Starts the tasks sent ahead, in order, while the first fits, and
    /// tells the master of each.
    fn start_queued(&mut self) {
        while self
            .queue
            .front()
            .is_some_and(|t| t.allocation.fits_in(&self.free))
        {
            let Some(task) = self.queue.pop_front() else {
                break;
            };
            self.send(WorkerMsg::Started {
                task_id: task.task_id,
                attempt: task.attempt,
            });
            self.start(task);
        }
    }

    /// Starts `task`, which fits in what is free, taking its resources
    /// (gpus are picked here).
    fn start(&mut self, task: Box<RunTask>) {
        let (control, control_rx) = mpsc::unbounded_channel();
        self.free = self.free.saturating_sub(&task.allocation);
        self.running.insert(
            (task.task_id, task.attempt),
            TaskHandle {
                control,
                allocation: task.allocation,
                room_given: false,
            },
        );
        let at = self
            .free_gpus
            .len()
            .saturating_sub(task.allocation.gpus as usize);
        let gpus = self.free_gpus.split_off(at);
        let slot = self.shared.slots.take();
        let ctx = TaskContext {
            task_dir: slot.dir,
            output_files: slot.outputs,
            cache: self.dirs.cache.clone(),
            transfer: self.dirs.transfer.clone(),
            gpus,
            monitor: self.shared.monitor.clone(),
            envs: Arc::clone(&self.shared.envs),
            to_master: self.out_tx.clone(),
            to_session: self.events.clone(),
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            let finished = run_task(*task, ctx, control_rx).await;
            let _ = events.send(TaskEvent::Finished(Box::new(finished)));
        });
    }

    /// Kills every task: the master that sent them is gone, and requeues them elsewhere.
    fn kill_all(&mut self) {
        for (_, t) in self.running.drain() {
            let _ = t.control.send(Control::Kill);
        }
    }
}

/// One connection to a master, from handshake to its end.
pub(crate) struct Session<'a> {
    config: &'a WorkerConfig,
    dirs: &'a Dirs,
    shared: &'a Shared,
}

impl<'a> Session<'a> {
    pub(crate) fn new(config: &'a WorkerConfig, dirs: &'a Dirs, shared: &'a Shared) -> Self {
        Session {
            config,
            dirs,
            shared,
        }
    }

    pub(crate) async fn run(
        &self,
        stream: TcpStream,
        addr: &str,
        last_busy: &mut Instant,
    ) -> anyhow::Result<StopReason> {
        // A master that accepts and never speaks must not hold the worker.
        let (keepalive, reader, writer) = tokio::time::timeout(
            crate::retry::HANDSHAKE_DEADLINE,
            self.handshake(stream, addr),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the master did not finish the handshake within {:?}",
                crate::retry::HANDSHAKE_DEADLINE
            )
        })??;

        let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
        // Finished tasks pass through this loop before the writer, so their
        // resources are free before the master can read the report and send
        // the next task: otherwise a prompt master races the bookkeeping and
        // gets a spurious "refusing to overcommit".
        let (events, mut events_rx) = mpsc::unbounded_channel::<TaskEvent>();
        let writer_task = tokio::spawn(write_loop(writer, out_rx, Arc::clone(&self.shared.slots)));
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<MasterMsg>();
        let read_dirs = ReadDirs {
            cache: self.dirs.cache.clone(),
            transfer: self.dirs.transfer.clone(),
            disk_mb: self.config.resources.disk_mb,
        };
        let reader_task = tokio::spawn(read_loop(reader, msg_tx, out_tx.clone(), read_dirs));

        let total = self.config.resources;
        let mut tasks = Tasks {
            dirs: self.dirs,
            shared: self.shared,
            total,
            free: total,
            free_gpus: (0..total.gpus).rev().collect(),
            running: HashMap::new(),
            queue: VecDeque::new(),
            events,
            out_tx,
        };
        // The master pings every `keepalive`; silence for several intervals means it is gone.
        // The value comes off the wire: a NaN or an absurd one must not panic the worker.
        let seconds = if keepalive.is_finite() {
            (keepalive * 4.0).clamp(5.0, 86_400.0)
        } else {
            5.0
        };
        let silence_limit = Duration::from_secs_f64(seconds);
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let reason = loop {
            tokio::select! {
                msg = msg_rx.recv() => {
                    let Some(msg) = msg else { break StopReason::Disconnected };
                    last_heard = Instant::now();
                    match msg {
                        MasterMsg::Run(task) => {
                            *last_busy = Instant::now();
                            tasks.run(task);
                        }
                        MasterMsg::Kill { task_id, attempt } => tasks.kill(task_id, attempt),
                        MasterMsg::Grow { task_id, attempt, allocation } => tasks.grow(task_id, attempt, allocation),
                        MasterMsg::Ping => tasks.send(WorkerMsg::Pong),
                        MasterMsg::Recall { task_id, attempt } => tasks.recall(task_id, attempt),
                        MasterMsg::Shutdown => break StopReason::MasterShutdown,
                        other => warn!("unexpected message from master: {other:?}"),
                    }
                }
                event = events_rx.recv() => {
                    *last_busy = Instant::now();
                    // `tasks` holds a sender, so the channel never closes here.
                    match event {
                        Some(TaskEvent::Exited { task_id, attempt }) => tasks.exited(task_id, attempt),
                        Some(TaskEvent::Finished(finished)) => tasks.finished(finished),
                        None => {}
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        warn!("no word from the master for {:?}; dropping the connection", last_heard.elapsed());
                        break StopReason::Disconnected;
                    }
                    if tasks.is_empty() && last_busy.elapsed() >= self.config.idle_timeout {
                        info!("idle for {:?}; leaving", self.config.idle_timeout);
                        tasks.send(WorkerMsg::Goodbye { reason: "idle timeout".into() });
                        break StopReason::IdleTimeout;
                    }
                }
            }
        };
        tasks.kill_all();
        // Dropping the senders lets the writer finish what is queued.
        drop(tasks);
        reader_task.abort();
        if reason == StopReason::Disconnected {
            writer_task.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
        }
        Ok(reason)
    }

    /// TLS (when configured), then the password handshake; hands on the
    /// master's keepalive interval and the connection's streams, sealed when
    /// there is a password but no TLS.
    async fn handshake(
        &self,
        stream: TcpStream,
        addr: &str,
    ) -> anyhow::Result<(f64, Reader, Writer)> {
        let mut conn = Handshaking::connect(stream, addr, self.config.tls.as_ref()).await?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            drover_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: hostname(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            resources: self.config.resources,
            password: self.config.password.is_some(),
            cached: Vec::new(),
        };
        let (handshake, first) = PeerHandshake::worker(
            self.config.password.as_deref(),
            hello,
            self.dirs.cached_ids(),
        );
        let mut handshake = handshake.bound_to(conn.binding());
        let answer = auth::run(
            &mut handshake,
            &mut conn.reader,
            &mut conn.writer,
            Some(first),
        )
        .await;
        match answer {
            Ok(Answer::Welcome {
                keepalive_interval_s,
            }) => {
                let keepalive =
                    crate::checks::seconds("a keepalive interval", keepalive_interval_s)
                        .map_err(|e| anyhow::anyhow!("the master's welcome is unusable: {e}"))?;
                let (reader, writer) = conn.finish(handshake.session_keys(), End::Worker);
                Ok((keepalive, reader, writer))
            }
            Ok(Answer::Status(_)) => bail!("the master answered a hello with its status"),
            Err(AuthError::Closed) => {
                bail!("the master closed the connection during the handshake")
            }
            // Asking again would get the same answer.
            Err(AuthError::Refused(reason)) => {
                Err(Fatal(format!("the master refused this worker: {reason}")))?
            }
            Err(e @ AuthError::Password(_)) => Err(Fatal(e.to_string()))?,
            Err(e) => bail!("handshake with the master failed: {e}"),
        }
    }
}
