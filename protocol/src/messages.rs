//! The messages each side sends, and what they carry.

use serde::{Deserialize, Serialize};

use crate::Resources;

/// Bumped whenever a message changes shape; peers with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 6;

/// How a worker's `SetupFailed` error starts when the task itself is at
/// fault (its environment archive is corrupt), not the worker: such a task
/// fails on every worker, so the master ends it instead of blocking the
/// worker and trying the next one.
pub const CORRUPT_ENVIRONMENT: &str = "corrupt environment";

/// How a worker's error starts when the task's command cannot be started
/// (a program that does not exist): the task's fault, like
/// [`CORRUPT_ENVIRONMENT`].
pub const CANNOT_START: &str = "cannot start the command";

/// Whether a `SetupFailed` error is the task's own fault rather than the
/// worker's (see [`CORRUPT_ENVIRONMENT`]).
///
/// ```
/// use drover_protocol::messages::setup_failure_is_the_tasks;
/// assert!(setup_failure_is_the_tasks("cannot start the command: No such file"));
/// assert!(!setup_failure_is_the_tasks("preparing the sandbox: No space left on device"));
/// ```
pub fn setup_failure_is_the_tasks(error: &str) -> bool {
    error.starts_with(CANNOT_START) || error.starts_with(CORRUPT_ENVIRONMENT)
}

/// Messages from the master to a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMsg {
    /// The master requires a password; answer with [`WorkerMsg::AuthProof`].
    Challenge { nonce: String },
    /// The worker is accepted. `proof` is the master's HMAC when a password is in use.
    Welcome {
        proof: Option<String>,
        keepalive_interval_s: f64,
    },
    /// The worker is refused; `reason` is meant for a person.
    Refused { reason: String },
    /// `size` raw bytes follow this frame: a file named `id`, kept in the
    /// worker's cache when `cache` is true, consumed by one task otherwise.
    PutFile { id: String, size: u64, cache: bool },
    /// Run a task. Its inputs were sent before it on the same connection.
    Run(Box<RunTask>),
    /// Kill a running task (cancel); the worker still reports it.
    Kill { task_id: u64, attempt: u32 },
    /// The answer to [`WorkerMsg::Grow`]: the task's new allocation (it
    /// goes on), or `None` (it is killed as over its limit).
    Grow {
        task_id: u64,
        attempt: u32,
        allocation: Option<Resources>,
    },
    /// Keepalive; the worker answers [`WorkerMsg::Pong`].
    Ping,
    /// The master is done with this worker; it should exit.
    Shutdown,
    /// The answer to [`WorkerMsg::StatusQuery`], after which the master closes
    /// the connection: the report it would send its catalog. `proof` is the
    /// master's HMAC, as in [`MasterMsg::Welcome`], when a password is in use.
    Status {
        proof: Option<String>,
        report: Box<drover_catalog::MasterReport>,
    },
    /// Give back a task sent ahead ([`RunTask::queued`]) that has not
    /// started: another worker has room for it now. The worker answers
    /// [`WorkerMsg::Recalled`].
    Recall { task_id: u64, attempt: u32 },
}

/// Messages from a worker to the master.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Hello(Box<Hello>),
    AuthProof {
        nonce: String,
        proof: String,
    },
    Pong,
    /// A task ended. The bodies of `outputs` follow, in order, each exactly `size` bytes.
    TaskDone {
        report: Box<TaskReport>,
        outputs: Vec<OutputHeader>,
    },
    /// The worker will not run this task (it would overcommit, or the request is malformed).
    Rejected {
        task_id: u64,
        attempt: u32,
        reason: String,
    },
    /// A task sent ahead ([`RunTask::queued`]) has started.
    Started {
        task_id: u64,
        attempt: u32,
    },
    /// A running task's process has exited and what it held on this worker
    /// is free from now: the worker starts what it was sent ahead in that
    /// room (its [`WorkerMsg::Started`] follows) while it finishes the
    /// task's accounting. The task's [`WorkerMsg::TaskDone`] comes later.
    /// Sent only when a task sent ahead starts in the room it left.
    Exited {
        task_id: u64,
        attempt: u32,
    },
    /// A growable task (see [`RunTask::growable`]) went over its memory
    /// allocation and is frozen: may it have more? The master answers
    /// [`MasterMsg::Grow`]. `used_mb` is what the monitor saw, `limit_mb`
    /// the allocation it went over.
    Grow {
        task_id: u64,
        attempt: u32,
        limit_mb: f64,
        used_mb: f64,
    },
    /// The worker is leaving (idle timeout, signal).
    Goodbye {
        reason: String,
    },
    /// The ids of the files in the worker's cache, sent right after the
    /// welcome: the hello is read before the worker is authenticated, under
    /// a small frame limit that a long cache list would break.
    Cached {
        ids: Vec<String>,
    },
    /// Sent instead of a hello by a client that is not a worker (`drover
    /// factory`): it wants the master's status report, not tasks. With a
    /// password it must answer the same challenge a worker does.
    StatusQuery {
        protocol: u32,
        password: bool,
    },
    /// Disk pressure: what this worker really has free for inputs and task
    /// files, MB (the file system's free space, at most its declared disk).
    /// Sent after the welcome and when it changes by much, so the master
    /// places no task there whose disk cannot fit.
    DiskFree {
        free_mb: u64,
    },
    /// The answer to [`MasterMsg::Recall`]: `given_back` if the task was
    /// still waiting here and is dropped (it will not start here); false if
    /// it had started already (its [`WorkerMsg::Started`] went first) or
    /// was not here.
    Recalled {
        task_id: u64,
        attempt: u32,
        given_back: bool,
    },
}

/// What a worker says about itself when it connects.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub drover_version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub resources: Resources,
    /// Whether the worker was given a password (so a mismatch gets a clear message).
    pub password: bool,
    /// Content ids of files already in the worker's cache from earlier runs.
    /// Sent empty: the list follows the welcome ([`WorkerMsg::Cached`]),
    /// and the master's half of the handshake puts it here.
    #[serde(default)]
    pub cached: Vec<String>,
}

/// One input of a task: a file already sent to the worker, placed at `name` in the sandbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InputRef {
    pub file_id: String,
    pub name: String,
    pub cached: bool,
}

/// A task as the worker sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunTask {
    pub task_id: u64,
    pub attempt: u32,
    pub command: String,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub inputs: Vec<InputRef>,
    #[serde(default)]
    pub outputs: Vec<String>,
    pub allocation: Resources,
    /// Enforce the allocation's memory and disk as limits (the monitor kills the task past them).
    #[serde(default)]
    pub enforce_limits: bool,
    #[serde(default)]
    pub wall_time_s: Option<f64>,
    /// File id of a packaged environment (a tarball sent as a cached input) to run the command in.
    #[serde(default)]
    pub environment: Option<String>,
    /// Over its memory allocation, freeze the task and ask the master for
    /// more ([`WorkerMsg::Grow`]) instead of killing it. Set for tasks whose
    /// allocation is a category's guess.
    #[serde(default)]
    pub growable: bool,
    /// Sent ahead: wait on the worker, after the tasks sent ahead before
    /// it, until it fits, then start and say so ([`WorkerMsg::Started`]),
    /// instead of being refused for want of room. Saves the round trip to
    /// the master between one task's end and the next one's start.
    #[serde(default)]
    pub queued: bool,
    /// A Python function call to run through the worker's function server
    /// instead of `command` (see [`FunctionCall`]).
    #[serde(default)]
    pub call: Option<FunctionCall>,
}

/// A Python function call carried in a [`RunTask`]: the worker hands
/// `payload` (`cloudpickle.dumps((fn, args, kwargs))`) to its function
/// server, which forks a child per call from an interpreter that has
/// already imported `modules`. The result comes back in
/// [`TaskReport::call_result`]: inline when small, else as a body after the
/// report ([`TaskReport::call_result_size`]). Without inputs, outputs or an environment
/// the call runs with no shell and no sandbox directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FunctionCall {
    /// The pickled call, base64 on the wire.
    #[serde(with = "b64")]
    pub payload: std::sync::Arc<[u8]>,
    /// Modules the server imports before forking (once per server).
    #[serde(default)]
    pub modules: Vec<String>,
}

/// Largest pickled call sent inline in a [`RunTask`]; bigger ones travel as
/// a content-cached input file (`call.pkl` in the sandbox).
pub const INLINE_CALL_BYTES: usize = 1 << 20;

/// The sandbox name of a call too big to send inline (its
/// [`FunctionCall::payload`] is then empty).
pub const CALL_FILE: &str = ".drover-call.pkl";

/// Largest pickled call outcome sent inline in a [`TaskReport`] (base64 in
/// the frame); a bigger one follows the report's output bodies as a body of
/// its own ([`TaskReport::call_result_size`]).
pub const INLINE_RESULT_BYTES: usize = 1 << 20;

/// How a worker's `SetupFailed` error starts when its Python function
/// server died while it held the call. Not the worker's failing (it starts
/// a new server) and not known to be the call's: the master runs the call
/// again, within its retry budget, without counting it against the worker.
pub const FUNCTION_SERVER_LOST: &str = "the function server went away";

/// Byte strings as base64 text in the JSON frames.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, B: AsRef<[u8]>>(v: &B, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v.as_ref()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, B: From<Vec<u8>>>(d: D) -> Result<B, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(B::from)
            .map_err(serde::de::Error::custom)
    }

    /// The same for an optional byte string.
    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
            text.map(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
        }
    }
}

/// Announces one output file whose body follows the [`WorkerMsg::TaskDone`] frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct OutputHeader {
    pub name: String,
    pub size: u64,
}

/// How a task's process ended, as the worker saw it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The command exited (any code) or was killed by a signal it did not get from us.
    Exited,
    /// The monitor killed it for going over a limit (see `limit_exceeded`).
    LimitExceeded,
    /// It ran past its wall-time limit.
    WallTime,
    /// The master cancelled it.
    Killed,
    /// An input the task needs was not on the worker.
    InputMissing,
    /// The sandbox or environment could not be prepared, or the command could not be started.
    SetupFailed,
}

/// Resources a task was measured to use.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Measured {
    pub wall_time_s: f64,
    pub cpu_time_s: f64,
    /// Peak resident memory of the task's process tree, MB.
    pub memory_mb: f64,
    /// Peak disk used in the sandbox, MB (0 when not measured).
    #[serde(default)]
    pub disk_mb: f64,
    /// Average cores used.
    #[serde(default)]
    pub cores: f64,
    /// The monitor's full summary, when the task ran under it.
    #[serde(default)]
    pub summary: Option<serde_json::Value>,
}

/// What a worker reports when a task ends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskReport {
    pub task_id: u64,
    pub attempt: u32,
    pub ending: Ending,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub measured: Measured,
    /// Which resource went over its limit, and by how much, for [`Ending::LimitExceeded`].
    #[serde(default)]
    pub limit_exceeded: Option<LimitHit>,
    /// Declared outputs that the task did not produce (or that were refused, e.g. a link out of the sandbox).
    #[serde(default)]
    pub missing_outputs: Vec<String>,
    /// A message for a person when something went wrong outside the command itself.
    #[serde(default)]
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch when the command started.
    pub started_ms: u64,
    /// For a [`RunTask::call`]: the pickled outcome (`("ok", value)` or
    /// `("err", ...)`), base64 on the wire; `None` when the call left none
    /// (killed, crashed).
    #[serde(default, with = "b64::opt", skip_serializing_if = "Option::is_none")]
    pub call_result: Option<Vec<u8>>,
    /// For a [`RunTask::call`]: the call raised (its outcome is the
    /// function's failure, not success).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub call_raised: bool,
    /// For a [`RunTask::call`] whose pickled outcome is over
    /// [`INLINE_RESULT_BYTES`]: its size. The outcome is then not in this
    /// frame but follows the output bodies as one more body of this many
    /// bytes, and the master reads it into `call_result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_result_size: Option<u64>,
}

impl TaskReport {
    /// The report of an attempt that ended with `ending` before its command
    /// started (set-up failed, cancelled while it waited on the worker).
    pub fn never_started(task_id: u64, attempt: u32, ending: Ending, now_ms: u64) -> TaskReport {
        TaskReport {
            task_id,
            attempt,
            ending,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            measured: Measured::default(),
            limit_exceeded: None,
            missing_outputs: Vec::new(),
            error: None,
            started_ms: now_ms,
            call_result: None,
            call_raised: false,
            call_result_size: None,
        }
    }
}

/// A limit that a task broke.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LimitHit {
    pub resource: String,
    pub limit: f64,
    pub value: f64,
}
