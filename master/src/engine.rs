//! The master's networking and bookkeeping around the pure scheduler.
//!
//! One engine task owns every table (tasks, workers, files, scheduler), so
//! the engine and the connections take no lock (the only locks are the
//! `Manager`'s, on the user's thread: its results receiver in `wait`, its
//! file-name memo in `submit`; each uncontended with one user thread). Each worker connection
//! has a reader task (frames in, output files streamed to disk) and a writer
//! task (frames and input files out); both talk to the engine through
//! unbounded channels, so a slow worker never blocks the engine and the user
//! not calling `wait` for a while never stalls the runtime.
//!
//! The engine's decisions go out through an [`Outbox`] and it reads time
//! from its own `now`, so everything but this file's loop and the
//! connections runs in-process in the tests (`engine/tests.rs`). Code map:
//!
//! * this file: the loop, the events it takes, the outbox of the running master.
//! * `conn`: accepting, the handshake, each connection's reader.
//! * `state`: the tables, commands, a worker joining.
//! * `lifecycle`: a task from submit to its result, retries included.
//! * `transfer`: a placement's inputs and task out, outputs back.
//! * `growth`: growth in place and the growth reserves (its one owner).

use std::collections::VecDeque;

// See scheduler.rs: the keys are ids the master assigns, so SipHash's
// defence against chosen keys buys nothing here and costs ~10% of the
// master's instructions per task (scale bench).
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use drover_protocol::stream::{Reader, Writer};
use drover_protocol::Resources;
use drover_protocol::{
    self as protocol, Ending, FrameError, Hello, MasterMsg, OutputHeader, RunTask, TaskReport,
    WorkerMsg,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
use crate::task::{
    Attempt, FileSource, Inputs, Outcome, Prepared, PreparedInput, TaskId, TaskResult,
};

mod conn;
mod growth;
mod lifecycle;
mod link;
mod state;
mod transfer;

use conn::accept_loop;
pub(crate) use conn::raise_fd_limit;
use growth::WorkerGrowth;
use link::{Link, WriteGate};
use state::{Engine, TaskEntry, TaskState};
pub(crate) use transfer::part_path;
use transfer::{receive_attempt, write_loop};

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
    /// An attempt's outputs could not be written here; its report follows.
    OutputsFailed {
        task: TaskId,
        attempt: u32,
        error: String,
    },
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
    /// Frames the engine encoded, to the writer, written as they are.
    Bytes(Vec<u8>),
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

/// The outbox of the running master: the connections' channels and the
/// results channel that `Manager::wait` reads.
struct Links {
    links: HashMap<WorkerKey, Link>,
    results: std::sync::mpsc::Sender<Vec<TaskResult>>,
    /// Results of this engine pass, handed over together at its end
    /// ([`Links::hand_over`]): one wake-up of the user's thread per pass.
    finished: Vec<TaskResult>,
    /// Links with frames of this pass not written yet.
    dirty: Vec<WorkerKey>,
}

impl Links {
    /// Ends an engine pass: its frames to the workers, its results to the user.
    fn hand_over(&mut self) {
        for key in self.dirty.drain(..) {
            if let Some(link) = self.links.get_mut(&key) {
                link.flush();
            }
        }
        if !self.finished.is_empty() {
            let _ = self.results.send(std::mem::take(&mut self.finished));
        }
    }
}

impl Outbox for Links {
    fn to_worker(&mut self, worker: WorkerKey, item: Outgoing) {
        let Some(link) = self.links.get_mut(&worker) else {
            return;
        };
        if link.send(item) {
            self.dirty.push(worker);
        }
    }

    fn to_user(&mut self, result: TaskResult) {
        self.finished.push(result);
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
    /// Serve workers over TLS with this configuration.
    pub tls: Option<Arc<drover_protocol::tls::rustls::ServerConfig>>,
    /// See `ManagerBuilder::fits_no_worker_wait`.
    pub fits_no_worker_wait: Option<Duration>,
}

/// Starts the engine on `listener`; returns when told to shut down.
pub(crate) async fn run(
    listener: TcpListener,
    config: EngineConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    results: std::sync::mpsc::Sender<Vec<TaskResult>>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let password = config.password.clone().map(Arc::<[u8]>::from);
    let keepalive = (config.keepalive_interval, config.keepalive_timeout);
    let security = conn::Security {
        password,
        tls: config
            .tls
            .clone()
            .map(drover_protocol::tls::tokio_rustls::TlsAcceptor::from),
    };
    let accept = tokio::spawn(accept_loop(listener, events_tx, security, keepalive));
    let links = Links {
        links: HashMap::default(),
        results,
        finished: Vec::new(),
        dirty: Vec::new(),
    };
    let mut engine = Engine::new(links, config.report_identity.clone(), config.prefetch);
    engine.fits_no_worker_wait = config.fits_no_worker_wait;
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
                    engine.out.hand_over();
                    engine.shutdown();
                    accept.abort();
                    let _ = done.send(());
                    return;
                }
                for _ in 0..4096 {
                    match commands.try_recv() {
                        Ok(cmd) => if let Some(done) = engine.on_command(cmd) {
                            engine.out.hand_over();
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
            _ = reserve_tick.tick(), if !engine.reserving_workers.is_empty()
                || !engine.blocked_workers.is_empty()
                || !engine.unfit.is_empty() => {
                engine.now = Instant::now();
                engine.let_go_of_aged_reserves();
                engine.unblock_workers();
                engine.end_unfit_tasks();
            }
        }
        engine.schedule();
        engine.sample_history();
        engine.out.hand_over();
    }
    engine.out.hand_over();
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
            Event::OutputsFailed {
                task,
                attempt,
                error,
            } => {
                self.failed_writes.insert((task, attempt), error);
            }
        }
    }

    fn shutdown(&mut self) {
        self.out.hand_over();
        // Dropping the senders ends each writer, which closes its connection.
        self.out.links.clear();
        self.workers.clear();
    }
}

#[cfg(test)]
mod tests;
