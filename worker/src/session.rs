//! One connection to a master: the handshake, then the message loop that
//! admits tasks within the worker's resources (never overcommitting, even
//! when asked), queues tasks sent ahead, grants or refuses growth, answers
//! pings, and notices a silent master.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use drover_protocol::auth::{self, Answer, AuthError, PeerHandshake};
use drover_protocol::{
    hostname, Ending, Hello, MasterMsg, Resources, RunTask, TaskReport, WorkerMsg, PROTOCOL_VERSION,
};
use tokio::io::{BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::main_loop::{Dirs, Shared, StopReason, WorkerConfig};
use crate::task::{now_ms, run_task, Control, TaskContext};
use crate::transfer::{read_loop, write_loop, Finished, Outgoing};

/// What a session has handed out, for starting queued tasks.
struct Book<'a> {
    free: &'a mut Resources,
    free_gpus: &'a mut Vec<u32>,
    running: &'a mut HashMap<(u64, u32), TaskHandle>,
}

/// The session's view of a task it started.
struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
    /// What it holds of this worker now (its allocation, grown or not).
    allocation: Resources,
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
        last_busy: &mut Instant,
    ) -> anyhow::Result<StopReason> {
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
        let keepalive = self.handshake(&mut reader, &mut writer).await?;

        let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
        // Finished tasks pass through this loop before the writer, so their
        // resources are free before the master can read the report and send
        // the next task: otherwise a prompt master races the bookkeeping and
        // gets a spurious "refusing to overcommit".
        let (fin_tx, mut fin_rx) = mpsc::unbounded_channel::<Box<Finished>>();
        let writer_task = tokio::spawn(write_loop(writer, out_rx, Arc::clone(&self.shared.slots)));
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<MasterMsg>();
        let transfer = self.dirs.transfer.clone();
        let cache = self.dirs.cache.clone();
        let reader_task = tokio::spawn(read_loop(reader, msg_tx, cache, transfer));

        let total = self.config.resources;
        let mut free = total;
        let mut free_gpus: Vec<u32> = (0..total.gpus).rev().collect();
        let mut running: HashMap<(u64, u32), TaskHandle> = HashMap::new();
        // Tasks sent ahead (`RunTask::queued`), not started yet.
        let mut queue: VecDeque<Box<RunTask>> = VecDeque::new();
        // The master pings every `keepalive`; silence for several intervals means it is gone.
        let silence_limit = Duration::from_secs_f64((keepalive * 4.0).max(5.0));
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
                            let key = (task.task_id, task.attempt);
                            let known = running.contains_key(&key) || queue.iter().any(|t| (t.task_id, t.attempt) == key);
                            let room = if task.queued { total } else { free };
                            if !task.allocation.fits_in(&room) || known {
                                let reason = format!(
                                    "task {} needs {:?} but this worker has {:?} free; refusing to overcommit",
                                    task.task_id, task.allocation, room
                                );
                                warn!("{reason}");
                                let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Rejected { task_id: task.task_id, attempt: task.attempt, reason }));
                                continue;
                            }
                            if task.queued {
                                // It may fit already: a task may have ended
                                // while the master sent it.
                                queue.push_back(task);
                                let mut book = Book { free: &mut free, free_gpus: &mut free_gpus, running: &mut running };
                                self.start_queued(&mut queue, &mut book, &fin_tx, &out_tx);
                            } else {
                                let (control, control_rx) = mpsc::unbounded_channel();
                                free = free.saturating_sub(&task.allocation);
                                running.insert(key, TaskHandle { control, allocation: task.allocation });
                                self.start(task, control_rx, &mut free_gpus, &fin_tx, &out_tx);
                            }
                        }
                        MasterMsg::Kill { task_id, attempt } => {
                            if let Some(t) = running.get(&(task_id, attempt)) {
                                let _ = t.control.send(Control::Kill);
                            } else if let Some(pos) = queue.iter().position(|t| (t.task_id, t.attempt) == (task_id, attempt)) {
                                // Never started: it ends here, holding nothing.
                                queue.remove(pos);
                                let report = TaskReport::never_started(task_id, attempt, Ending::Killed, now_ms());
                                let _ = out_tx.send(Outgoing::Msg(WorkerMsg::TaskDone { report: Box::new(report), outputs: Vec::new() }));
                            }
                        }
                        MasterMsg::Grow { task_id, attempt, allocation } => {
                            // Gone meanwhile (it ended, or was killed): nothing to do.
                            let Some(t) = running.get_mut(&(task_id, attempt)) else { continue };
                            let grant = allocation.filter(|new| {
                                // The master's books match ours, but a worker
                                // never overcommits on anyone's word.
                                let extra = new.saturating_sub(&t.allocation);
                                t.allocation.fits_in(new) && new.gpus == t.allocation.gpus && extra.fits_in(&free)
                            });
                            match grant {
                                Some(new) => {
                                    free = free.saturating_sub(&new.saturating_sub(&t.allocation));
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
                        MasterMsg::Ping => {
                            let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Pong));
                        }
                        MasterMsg::Shutdown => break StopReason::MasterShutdown,
                        other => warn!("unexpected message from master: {other:?}"),
                    }
                }
                fin = fin_rx.recv() => {
                    // This loop holds a sender, so the channel never closes here.
                    let Some(mut finished) = fin else { continue };
                    let held = running
                        .remove(&(finished.report.task_id, finished.report.attempt))
                        .map_or(finished.allocation, |t| t.allocation);
                    free = free.saturating_add(&held);
                    free_gpus.append(&mut finished.gpus);
                    *last_busy = Instant::now();
                    let _ = out_tx.send(Outgoing::Done(finished));
                    let mut book = Book { free: &mut free, free_gpus: &mut free_gpus, running: &mut running };
                    self.start_queued(&mut queue, &mut book, &fin_tx, &out_tx);
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        warn!("no word from the master for {:?}; dropping the connection", last_heard.elapsed());
                        break StopReason::Disconnected;
                    }
                    if running.is_empty() && queue.is_empty() && last_busy.elapsed() >= self.config.idle_timeout {
                        info!("idle for {:?}; leaving", self.config.idle_timeout);
                        let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Goodbye { reason: "idle timeout".into() }));
                        break StopReason::IdleTimeout;
                    }
                }
            }
        };
        // Tasks of a lost master are killed: the master requeues them elsewhere.
        for (_, t) in running.drain() {
            let _ = t.control.send(Control::Kill);
        }
        drop(out_tx);
        reader_task.abort();
        if reason == StopReason::Disconnected {
            writer_task.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
        }
        Ok(reason)
    }

    /// Starts the tasks sent ahead, in order, while the first fits, and
    /// tells the master of each.
    fn start_queued(
        &self,
        queue: &mut VecDeque<Box<RunTask>>,
        book: &mut Book<'_>,
        fin_tx: &mpsc::UnboundedSender<Box<Finished>>,
        out_tx: &mpsc::UnboundedSender<Outgoing>,
    ) {
        while queue
            .front()
            .is_some_and(|t| t.allocation.fits_in(book.free))
        {
            let Some(task) = queue.pop_front() else { break };
            let key = (task.task_id, task.attempt);
            let (control, control_rx) = mpsc::unbounded_channel();
            *book.free = book.free.saturating_sub(&task.allocation);
            book.running.insert(
                key,
                TaskHandle {
                    control,
                    allocation: task.allocation,
                },
            );
            let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Started {
                task_id: key.0,
                attempt: key.1,
            }));
            self.start(task, control_rx, book.free_gpus, fin_tx, out_tx);
        }
    }

    /// Starts `task`, whose resources the caller has just taken from the
    /// free ones (gpus are picked here).
    fn start(
        &self,
        task: Box<RunTask>,
        control: mpsc::UnboundedReceiver<Control>,
        free_gpus: &mut Vec<u32>,
        fin_tx: &mpsc::UnboundedSender<Box<Finished>>,
        out_tx: &mpsc::UnboundedSender<Outgoing>,
    ) {
        let at = free_gpus
            .len()
            .saturating_sub(task.allocation.gpus as usize);
        let gpus = free_gpus.split_off(at);
        let slot = self.shared.slots.take();
        let ctx = TaskContext {
            task_dir: slot.dir,
            output_files: slot.outputs,
            cache: self.dirs.cache.clone(),
            transfer: self.dirs.transfer.clone(),
            gpus,
            monitor: self.shared.monitor.clone(),
            envs: Arc::clone(&self.shared.envs),
            to_master: out_tx.clone(),
        };
        let fin_tx = fin_tx.clone();
        tokio::spawn(async move {
            let finished = run_task(*task, ctx, control).await;
            let _ = fin_tx.send(Box::new(finished));
        });
    }

    async fn handshake(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        writer: &mut BufWriter<OwnedWriteHalf>,
    ) -> anyhow::Result<f64> {
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
        let (mut handshake, first) = PeerHandshake::worker(
            self.config.password.as_deref(),
            hello,
            self.dirs.cached_ids(),
        );
        match auth::run(&mut handshake, reader, writer, Some(first)).await {
            Ok(Answer::Welcome {
                keepalive_interval_s,
            }) => Ok(keepalive_interval_s),
            Ok(Answer::Status(_)) => bail!("the master answered a hello with its status"),
            Err(AuthError::Closed) => {
                bail!("the master closed the connection during the handshake")
            }
            Err(AuthError::Refused(reason)) => bail!("the master refused this worker: {reason}"),
            Err(e) => bail!("handshake with the master failed: {e}"),
        }
    }
}
