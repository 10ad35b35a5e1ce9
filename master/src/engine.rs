//! The master's networking and bookkeeping around the pure scheduler.
//!
//! One engine task owns every table (tasks, workers, files, scheduler), so
//! nothing in the master needs a lock on its hot path. Each worker connection
//! has a reader task (frames in, output files streamed to disk) and a writer
//! task (frames and input files out); both talk to the engine through
//! unbounded channels, so a slow worker never blocks the engine and the user
//! not calling `wait` for a while never stalls the runtime.
//!
//! The engine's decisions go out through an [`Outbox`] and it reads time
//! from its own `now`, so everything but this file's loop and connections
//! runs in-process in the tests (`engine/tests.rs`). Code map:
//!
//! * `state`: the tables, commands, a worker joining.
//! * `lifecycle`: a task from submit to its result, retries included.
//! * `transfer`: a placement's inputs and task out, outputs back.
//! * `growth`: growth in place and the growth reserves (its one owner).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use drover_protocol::Resources;
use drover_protocol::{
    self as protocol, read_frame, Ending, FrameError, Hello, MasterMsg, OutputHeader, RunTask,
    TaskReport, WorkerMsg, PROTOCOL_VERSION, ROLE_MASTER, ROLE_WORKER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::category::registry::{
    CatId, Categories, ClassRequest, Kill, Sizing, MAX_RESOURCE_RETRIES,
};
use crate::category::{Dim, RetryCause};
use crate::command::Command;
use crate::scheduler::{ClassKey, FileKey, Placement, Request, Scheduler, WorkerKey};
use crate::stats::{Stats, WorkerInfo};
use crate::task::{Attempt, FileSource, Outcome, Prepared, PreparedInput, TaskId, TaskResult};

mod growth;
mod lifecycle;
mod state;
mod transfer;

use growth::WorkerGrowth;
use state::{Engine, TaskEntry, TaskState};
use transfer::{receive_outputs, write_loop};

enum Event {
    Joined {
        key: WorkerKey,
        hello: Box<Hello>,
        addr: SocketAddr,
        link: Link,
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

/// (name in the sandbox, local destination) for each declared output.
type OutputPlan = Vec<(String, PathBuf)>;

/// What the engine sends down one worker's connection.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A message, to the writer.
    Msg(MasterMsg),
    /// An input file's body, to the writer.
    File {
        id: String,
        cache: bool,
        source: FileSource,
    },
    /// To the reader: where this attempt's outputs go when it reports.
    /// Keyed by (task, attempt) so a stale report never writes over a
    /// newer attempt's files.
    ExpectOutputs {
        task: TaskId,
        attempt: u32,
        plan: OutputPlan,
    },
    /// To the reader: the attempt was taken back; drop its plan.
    ForgetOutputs { task: TaskId, attempt: u32 },
}

/// Where every decision of the engine goes: items down a worker's
/// connection, and finished tasks' results to the user. The engine does
/// no I/O of its own, so its task lifecycle runs in-process in the tests
/// against an outbox that records.
pub(crate) trait Outbox {
    /// Queues `item` on `worker`'s connection (dropped if it is gone).
    fn to_worker(&mut self, worker: WorkerKey, item: Outgoing);
    /// Hands a task's final result to the user.
    fn to_user(&mut self, result: TaskResult);
}

/// One worker connection, as the engine's outbox holds it.
struct Link {
    /// To its writer task.
    tx: mpsc::UnboundedSender<Outgoing>,
    /// To its reader task: output plans (a channel, not a shared map, so
    /// that no lock is taken per task).
    plans: mpsc::UnboundedSender<Outgoing>,
}

/// The outbox of the running master: the connections' channels and the
/// results channel that `Manager::wait` reads.
struct Links {
    links: HashMap<WorkerKey, Link>,
    results: std::sync::mpsc::Sender<TaskResult>,
}

impl Outbox for Links {
    fn to_worker(&mut self, worker: WorkerKey, item: Outgoing) {
        let Some(link) = self.links.get(&worker) else {
            return;
        };
        let _ = match item {
            Outgoing::ExpectOutputs { .. } | Outgoing::ForgetOutputs { .. } => {
                link.plans.send(item)
            }
            _ => link.tx.send(item),
        };
    }

    fn to_user(&mut self, result: TaskResult) {
        let _ = self.results.send(result);
    }
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
    let links = Links {
        links: HashMap::new(),
        results,
    };
    let mut engine = Engine::new(links, config.report_identity.clone(), config.prefetch);
    let mut grow_tick = tokio::time::interval(Duration::from_millis(200));
    grow_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reserve_tick = tokio::time::interval(Duration::from_millis(100));
    reserve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                engine.now = Instant::now();
                engine.on_event(ev);
                // Take what else is ready before scheduling, so a burst costs one scheduling pass.
                for _ in 0..4096 {
                    match events.try_recv() { Ok(ev) => engine.on_event(ev), Err(_) => break }
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                engine.now = Instant::now();
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
            _ = grow_tick.tick(), if !engine.growing_workers.is_empty() => {
                engine.now = Instant::now();
                engine.grow_timeouts();
            }
            _ = reserve_tick.tick(), if !engine.reserving_workers.is_empty() => {
                engine.now = Instant::now();
                engine.let_go_of_aged_reserves();
            }
        }
        engine.schedule();
    }
    engine.shutdown();
    accept.abort();
}

impl Engine<Links> {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Joined {
                key,
                hello,
                addr,
                link,
            } => {
                self.out.links.insert(key, link);
                self.worker_joined(key, hello, addr);
            }
            Event::Msg { key, msg } => self.on_worker_msg(key, msg),
            Event::Gone { key, reason } => {
                self.worker_gone(key, &reason);
                self.out.links.remove(&key);
            }
            Event::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
        }
    }

    fn shutdown(&mut self) {
        // Dropping the senders ends each writer, which closes its connection.
        self.out.links.clear();
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
    let (plans, mut plans_rx) = mpsc::unbounded_channel();
    if events
        .send(Event::Joined {
            key,
            hello,
            addr,
            link: Link { tx, plans },
        })
        .is_err()
    {
        return Ok(());
    }
    let writer_task = tokio::spawn(write_loop(writer, rx, interval));
    let reason = read_loop(&mut reader, key, &events, &mut plans_rx, timeout).await;
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
    plans: &mut mpsc::UnboundedReceiver<Outgoing>,
    timeout: Duration,
) -> String {
    let mut buf = Vec::new();
    let mut expected: HashMap<(TaskId, u32), OutputPlan> = HashMap::new();
    loop {
        let msg: WorkerMsg = match tokio::time::timeout(timeout, read_frame(reader, &mut buf)).await
        {
            Err(_) => return format!("no message for {timeout:?}"),
            Ok(Err(FrameError::Closed)) => return "connection closed".into(),
            Ok(Err(e)) => return format!("protocol error: {e}"),
            Ok(Ok(m)) => m,
        };
        if let WorkerMsg::TaskDone { report, outputs } = &msg {
            // The engine sent the plan before the task, so it is here by now.
            while let Ok(change) = plans.try_recv() {
                match change {
                    Outgoing::ExpectOutputs {
                        task,
                        attempt,
                        plan,
                    } => {
                        expected.insert((task, attempt), plan);
                    }
                    Outgoing::ForgetOutputs { task, attempt } => {
                        expected.remove(&(task, attempt));
                    }
                    _ => {}
                }
            }
            let dests = expected.remove(&(report.task_id, report.attempt));
            if let Err(e) = receive_outputs(reader, outputs, dests.as_deref()).await {
                return format!("receiving outputs of task {}: {e}", report.task_id);
            }
        }
        if events.send(Event::Msg { key, msg }).is_err() {
            return "master shutting down".into();
        }
    }
}

#[cfg(test)]
mod tests;
