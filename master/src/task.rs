//! Tasks as the user describes them, and results as the user gets them back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use drover_protocol::Measured;
use drover_protocol::Resources;
use serde::{Deserialize, Serialize};

/// A task's id, unique within one [`crate::Manager`].
pub type TaskId = u64;

/// A command to run on a worker, with its files and resources.
///
/// ```
/// use drover_master::Task;
/// let task = Task::new("wc -c input.txt > count.txt")
///     .input_file("/etc/hostname", "input.txt", true)
///     .output_file("count.txt", "/tmp/count.txt")
///     .cores(1)
///     .memory_mb(100)
///     .tag("count");
/// assert_eq!(task.command(), "wc -c input.txt > count.txt");
/// ```
#[derive(Clone, Debug, Default)]
pub struct Task {
    pub(crate) command: String,
    pub(crate) inputs: Vec<InputSpec>,
    pub(crate) outputs: Vec<(String, PathBuf)>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) resources: Resources,
    pub(crate) wall_time: Option<Duration>,
    pub(crate) category: Option<String>,
    pub(crate) tag: Option<String>,
    pub(crate) priority: i32,
    pub(crate) max_retries: Option<u32>,
    pub(crate) environment: Option<PathBuf>,
    pub(crate) call: Option<drover_protocol::FunctionCall>,
}

/// Where an input's bytes come from.
#[derive(Clone, Debug)]
pub(crate) enum InputSource {
    File { path: PathBuf, cache: bool },
    Buffer(std::sync::Arc<[u8]>),
}

#[derive(Clone, Debug)]
pub(crate) struct InputSpec {
    pub(crate) source: InputSource,
    pub(crate) remote: String,
}

impl Task {
    /// A task that runs `command` under `/bin/sh -c` in its own sandbox directory.
    pub fn new(command: impl Into<String>) -> Task {
        Task {
            command: command.into(),
            ..Default::default()
        }
    }

    /// The command line.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Sends the local file `local` to the sandbox as `remote`. A `cache`d file
    /// is kept on the worker by content and crosses the network once per worker.
    pub fn input_file(
        mut self,
        local: impl AsRef<Path>,
        remote: impl Into<String>,
        cache: bool,
    ) -> Task {
        self.inputs.push(InputSpec {
            source: InputSource::File {
                path: local.as_ref().to_path_buf(),
                cache,
            },
            remote: remote.into(),
        });
        self
    }

    /// Writes `bytes` to the sandbox as `remote`.
    pub fn input_buffer(mut self, bytes: impl Into<Vec<u8>>, remote: impl Into<String>) -> Task {
        let bytes: Vec<u8> = bytes.into();
        self.inputs.push(InputSpec {
            source: InputSource::Buffer(bytes.into()),
            remote: remote.into(),
        });
        self
    }

    /// Brings the sandbox file `remote` back to the local path `local` when the task ends.
    pub fn output_file(mut self, remote: impl Into<String>, local: impl AsRef<Path>) -> Task {
        self.outputs
            .push((remote.into(), local.as_ref().to_path_buf()));
        self
    }

    /// Sets an environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Task {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Whole cores to reserve.
    pub fn cores(mut self, cores: u32) -> Task {
        self.resources.cores = cores;
        self
    }

    /// Memory to reserve, MB; also the limit past which the task is killed.
    pub fn memory_mb(mut self, mb: u64) -> Task {
        self.resources.memory_mb = mb;
        self
    }

    /// Sandbox disk to reserve, MB; also the limit past which the task is killed.
    pub fn disk_mb(mut self, mb: u64) -> Task {
        self.resources.disk_mb = mb;
        self
    }

    /// GPUs to reserve; the task sees their device ids in `CUDA_VISIBLE_DEVICES`.
    pub fn gpus(mut self, gpus: u32) -> Task {
        self.resources.gpus = gpus;
        self
    }

    /// All four resources at once.
    pub fn resources(mut self, resources: Resources) -> Task {
        self.resources = resources;
        self
    }

    /// Kill the task if it runs longer than this.
    pub fn wall_time(mut self, limit: Duration) -> Task {
        self.wall_time = Some(limit);
        self
    }

    /// The category this task's resource measurements are pooled in
    /// (default "default"). A task that declares no resources is sized by
    /// its category (see [`crate::Manager::set_category`]).
    pub fn category(mut self, category: impl Into<String>) -> Task {
        self.category = Some(category.into());
        self
    }

    /// A label to find the task by (and cancel it by) later.
    pub fn tag(mut self, tag: impl Into<String>) -> Task {
        self.tag = Some(tag.into());
        self
    }

    /// Higher runs first; equal priorities run in submission order.
    pub fn priority(mut self, priority: i32) -> Task {
        self.priority = priority;
        self
    }

    /// How many times the task is run again after its worker is lost or a
    /// cached input vanished from it (default 5). Retries in a bigger
    /// allocation after going over a learned one (see
    /// [`crate::CategoryConfig`]) do not count against this budget: the
    /// category's retry ladder bounds those.
    pub fn max_retries(mut self, retries: u32) -> Task {
        self.max_retries = Some(retries);
        self
    }

    /// Makes this task a Python function call: the worker hands `payload`
    /// (`cloudpickle.dumps((fn, args, kwargs))`) to its function server,
    /// which has imported `modules` and forks a child for the call; the
    /// pickled outcome comes back in [`TaskResult::call_result`]. The
    /// command stays what runs where the worker has no function server.
    /// A payload over [`drover_protocol::INLINE_CALL_BYTES`] travels as an
    /// input file instead of inside the task message.
    pub fn function_call(mut self, payload: impl Into<Arc<[u8]>>, modules: Vec<String>) -> Task {
        self.call = Some(drover_protocol::FunctionCall {
            payload: payload.into(),
            modules,
        });
        self
    }

    /// A packaged environment (from `drover pack create`) to run the command in.
    pub fn environment(mut self, tarball: impl AsRef<Path>) -> Task {
        self.environment = Some(tarball.as_ref().to_path_buf());
        self
    }
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Exit code 0 and every output present.
    Success,
    /// The command exited non-zero or was killed by a signal.
    Failed,
    /// An input could not be placed in the sandbox.
    InputMissing,
    /// The command succeeded but a declared output is missing (or refused, e.g. a link out of the sandbox).
    OutputMissing,
    /// Killed for using more of `resource` than allowed.
    ResourceExhausted { resource: String },
    /// Killed at its wall-time limit.
    WallTimeExceeded,
    /// A function call ([`Task::function_call`]) ran and raised; its
    /// exception is in [`TaskResult::call_result`].
    FunctionFailed,
    /// Its workers kept disappearing; retries are used up.
    WorkerLost,
    /// Cancelled by the user.
    Cancelled,
    /// The command succeeded but the master could not write an output
    /// locally (a full disk, no permission, a directory in the way); the
    /// user's file, if any, is left as it was. `error` is the OS's word.
    OutputWriteFailed { error: String },
    /// No connected worker could ever run it, for as long as
    /// `ManagerBuilder::fits_no_worker_wait`; `need` says what it lacked,
    /// e.g. "needs 64 cores, largest worker has 2".
    FitsNoWorker { need: String },
}

impl Outcome {
    /// How a task (or one attempt) ended, for people: "exit 3", "killed by
    /// signal 9", "memory limit exceeded", "wall time exceeded", ...
    ///
    /// ```
    /// use drover_master::Outcome;
    /// assert_eq!(Outcome::Failed.words(Some(3), None), "exit 3");
    /// ```
    pub fn words(&self, exit_code: Option<i32>, signal: Option<i32>) -> String {
        match self {
            Outcome::Success => "done".into(),
            Outcome::Failed => match (exit_code, signal) {
                (_, Some(signal)) => format!("killed by signal {signal}"),
                (Some(code), None) => format!("exit {code}"),
                (None, None) => "failed".into(),
            },
            Outcome::InputMissing => "input missing".into(),
            Outcome::OutputMissing => "output missing".into(),
            Outcome::ResourceExhausted { resource } => format!("{resource} limit exceeded"),
            Outcome::WallTimeExceeded => "wall time exceeded".into(),
            Outcome::FunctionFailed => "function raised".into(),
            Outcome::WorkerLost => "worker lost".into(),
            Outcome::Cancelled => "cancelled".into(),
            Outcome::OutputWriteFailed { error } => format!("output write failed: {error}"),
            Outcome::FitsNoWorker { need } => format!("fits no worker: {need}"),
        }
    }
}

/// One try at running a task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub host: String,
    pub allocation: Resources,
    /// What ended this attempt, e.g. "worker lost", "success", "memory over 1000 MB".
    pub ending: String,
}

/// Everything known about a finished task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResult {
    pub id: TaskId,
    pub tag: Option<String>,
    pub category: String,
    pub command: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Captured stdout, capped at [`drover_protocol::OUTPUT_CAP_BYTES`] (head and tail kept).
    pub stdout: String,
    /// Captured stderr, capped likewise.
    pub stderr: String,
    /// A message about what went wrong outside the command, if anything did.
    pub error: Option<String>,
    pub allocated: Resources,
    pub measured: Measured,
    pub submitted: SystemTime,
    pub started: Option<SystemTime>,
    pub finished: SystemTime,
    /// Host of the worker of the last attempt.
    pub host: Option<String>,
    /// Every attempt, in order (worker lost, retried in a bigger allocation, ...).
    pub attempts: Vec<Attempt>,
    /// A function call's pickled outcome (see [`Task::function_call`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_result: Option<Vec<u8>>,
}

impl TaskResult {
    /// True for [`Outcome::Success`].
    pub fn succeeded(&self) -> bool {
        self.outcome == Outcome::Success
    }
}

/// Default number of times a task is retried after losing its worker.
pub const DEFAULT_MAX_RETRIES: u32 = 5;

/// A task after submit-time validation: file names resolved, paths checked.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub id: TaskId,
    pub command: String,
    pub inputs: Inputs,
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
    pub call: Option<drover_protocol::FunctionCall>,
}

/// A task's inputs. The engine lets a task share the list of the task
/// submitted before it when both name the same cached files under the same
/// names, as a campaign's tasks usually do: one allocation for all of them,
/// so that a million queued tasks do not each hold their own copy, nor does
/// each placement read a copy of its own from a cold line of memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inputs(Option<Arc<[PreparedInput]>>);

impl Inputs {
    pub(crate) fn new(list: Vec<PreparedInput>) -> Inputs {
        Inputs((!list.is_empty()).then(|| Arc::from(list)))
    }

    /// Whether there are inputs and every one is a cached file.
    pub(crate) fn all_cached(&self) -> bool {
        !self.is_empty() && self.iter().all(|i| i.cache_id.is_some())
    }

    /// Whether `other` is `self` for a worker: every input is a cached file
    /// and each names the same file (the same content name, which the
    /// master's file namer hands out as one shared string) under the same
    /// sandbox name, in the same order. Either list can then stand for the
    /// other, whichever local copy of the content it was named from.
    pub(crate) fn same_cached_files(&self, other: &Inputs) -> bool {
        let (a, b) = (&**self, &**other);
        a.len() == b.len()
            && !a.is_empty()
            && a.iter()
                .zip(b)
                .all(|(x, y)| match (&x.cache_id, &y.cache_id) {
                    (Some(i), Some(j)) => Arc::ptr_eq(i, j) && x.remote == y.remote,
                    _ => false,
                })
    }
}

#[cfg(test)]
impl Inputs {
    /// Whether the two are one allocation.
    pub(crate) fn is_shared_with(&self, other: &Inputs) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::ops::Deref for Inputs {
    type Target = [PreparedInput];

    fn deref(&self) -> &[PreparedInput] {
        self.0.as_deref().unwrap_or(&[])
    }
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
