//! The user's handle on a master: a blocking API over an internal tokio runtime.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use drover_protocol::{check_sandbox_name, CALL_FILE, INLINE_CALL_BYTES};
use tokio::sync::{mpsc, oneshot};

use crate::category::{CategoryConfig, CategoryStats};
use crate::command::Command;
use crate::engine::{self, EngineConfig};
use crate::files::FileNamer;
use crate::stats::{Stats, WorkerInfo};
use crate::task::{
    FileSource, InputSource, Inputs, Prepared, PreparedInput, Task, TaskId, TaskResult,
    DEFAULT_MAX_RETRIES,
};

/// Why a task was not accepted.
#[derive(thiserror::Error, Debug)]
pub enum SubmitError {
    #[error("input file missing at submit: {0}")]
    InputMissing(String),
    #[error("invalid file name: {0}")]
    InvalidName(String),
    #[error("invalid task: {0}")]
    Invalid(String),
    #[error("the manager has shut down")]
    ShutDown,
}

/// Why a manager could not start.
#[derive(thiserror::Error, Debug)]
pub enum StartError {
    #[error("cannot listen on port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("{0}")]
    Password(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Configures a [`Manager`].
///
/// ```no_run
/// use drover_master::{Manager, Task};
/// let manager = Manager::builder().port(0).project("demo").build()?;
/// println!("workers connect to port {}", manager.port());
/// manager.submit(Task::new("echo hello"))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct ManagerBuilder {
    port: u16,
    bind: String,
    project: Option<String>,
    password_file: Option<PathBuf>,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    catalog: Option<String>,
    catalog_key_file: Option<PathBuf>,
    catalog_interval: Duration,
    environment: Option<PathBuf>,
    prefetch: usize,
    tls: Option<(PathBuf, PathBuf)>,
    fits_no_worker_wait: Option<Duration>,
}

impl Default for ManagerBuilder {
    fn default() -> Self {
        ManagerBuilder {
            port: 9123,
            bind: "0.0.0.0".into(),
            project: None,
            password_file: None,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            catalog: None,
            catalog_key_file: None,
            catalog_interval: crate::report::DEFAULT_CATALOG_INTERVAL,
            environment: None,
            prefetch: 2,
            tls: None,
            fits_no_worker_wait: Some(Duration::from_secs(60)),
        }
    }
}

impl ManagerBuilder {
    /// TCP port for workers; 0 picks any free port (see [`Manager::port`]). Default 9123.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Address to listen on (default all interfaces).
    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.bind = addr.into();
        self
    }

    /// Project name, by which workers and `drover status` find this master through a catalog.
    pub fn project(mut self, name: impl Into<String>) -> Self {
        self.project = Some(name.into());
        self
    }

    /// Require workers to prove they know the password in this file.
    pub fn password_file(mut self, path: impl AsRef<Path>) -> Self {
        self.password_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// How many tasks a full worker may hold waiting (default 2), so that
    /// it starts the next one the moment one ends instead of after a round
    /// trip to the master; for short tasks that round trip is a good part
    /// of the worker's time. Tasks are sent ahead only while more tasks
    /// wait than there are workers (so none of them sits idle for want of
    /// a task held elsewhere), and only tasks whose request is fixed (not
    /// one a category is still learning). 0 turns it off.
    pub fn prefetch(mut self, tasks: usize) -> Self {
        self.prefetch = tasks;
        self
    }

    /// How long a task that fits no connected worker (it declares more
    /// cores, memory, disk or gpus than the largest has) waits, counted
    /// from the last worker that joined, before it ends with
    /// [`crate::Outcome::FitsNoWorker`]. Until then it is counted in
    /// `Stats::tasks_fit_no_worker`. `None` waits for ever: use it when
    /// a factory may yet start bigger workers. Default 60 s.
    pub fn fits_no_worker_wait(mut self, wait: Option<Duration>) -> Self {
        self.fits_no_worker_wait = wait;
        self
    }

    /// How often an idle connection is pinged, and how long silence means a worker is gone.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// Report to the catalog at `HOST:PORT` (needs a [`project`](Self::project)):
    /// every [`catalog_interval`](Self::catalog_interval) and once more when
    /// the manager stops, from a thread of its own.
    pub fn catalog(mut self, addr: impl Into<String>) -> Self {
        self.catalog = Some(addr.into());
        self
    }

    /// Sign catalog reports with the key in this file, for a catalog started
    /// with the same `--catalog-key-file` (it drops unsigned reports).
    pub fn catalog_key_file(mut self, path: impl AsRef<Path>) -> Self {
        self.catalog_key_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// How often to report to the catalog (default 15 s).
    pub fn catalog_interval(mut self, interval: Duration) -> Self {
        self.catalog_interval = interval;
        self
    }

    /// A packaged environment (from `drover pack create`) for every task
    /// that names none with [`Task::environment`]. Each worker receives the
    /// tarball once and unpacks it once.
    pub fn environment(mut self, tarball: impl AsRef<Path>) -> Self {
        self.environment = Some(tarball.as_ref().to_path_buf());
        self
    }

    /// Serve workers over TLS with this certificate (chain) and private key,
    /// both PEM (`drover tls init` makes a pair). Workers then need
    /// `--tls-ca` or `--tls-fingerprint`; with a password too, its proof is
    /// bound to each TLS session.
    pub fn tls(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.tls = Some((cert.as_ref().to_path_buf(), key.as_ref().to_path_buf()));
        self
    }

    /// Starts listening and returns the manager.
    pub fn build(self) -> Result<Manager, StartError> {
        if let Some(c) = &self.catalog {
            if !matches!(self.project.as_deref(), Some(p) if !p.trim().is_empty()) {
                return Err(StartError::Config(
                    "reporting to a catalog needs a project name, which workers find the master by"
                        .into(),
                ));
            }
            drover_catalog::client::parse_catalog(c)
                .map_err(|e| StartError::Config(format!("{e:#}")))?;
        }
        let catalog_key = match &self.catalog_key_file {
            Some(p) => Some(
                drover_catalog::secret::read_secret_file(p, "catalog key")
                    .map_err(StartError::Password)?,
            ),
            None => None,
        };
        let password = match &self.password_file {
            Some(p) => Some(drover_protocol::read_password_file(p).map_err(StartError::Password)?),
            None => None,
        };
        let tls = match &self.tls {
            Some((cert, key)) => Some(
                drover_protocol::tls::server_config(cert, key)
                    .map_err(|e| StartError::Config(e.to_string()))?,
            ),
            None => None,
        };
        crate::engine::raise_fd_limit();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("drover-master")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((
                self.bind.as_str(),
                self.port,
            )))
            .map_err(|source| StartError::Listen {
                port: self.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            port: self.port,
            source,
        })?;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (results_tx, results) = std::sync::mpsc::channel();
        let started = SystemTime::now();
        let report_identity = std::sync::Arc::new(crate::report::identity(
            self.project.as_deref().unwrap_or(""),
            &crate::report::advertised_host(&self.bind),
            addr.port(),
            started,
        ));
        let config = EngineConfig {
            password,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            report_identity: report_identity.clone(),
            prefetch: self.prefetch,
            tls,
            fits_no_worker_wait: self.fits_no_worker_wait,
        };
        runtime.spawn(engine::run(listener, config, commands_rx, results_tx));
        let reporter = match &self.catalog {
            Some(c) => Some(
                crate::report::Reporter::start(
                    c.clone(),
                    self.catalog_interval,
                    commands.clone(),
                    catalog_key,
                )
                .map_err(StartError::Runtime)?,
            ),
            None => None,
        };
        Ok(Manager {
            runtime: Some(runtime),
            addr,
            project: self.project,
            report_identity,
            reporter,
            commands,
            results: Mutex::new(Results {
                rx: results,
                ready: std::collections::VecDeque::new(),
            }),
            next_id: AtomicU64::new(1),
            outstanding: AtomicUsize::new(0),
            namer: FileNamer::default(),
            started,
            default_environment: self.environment,
        })
    }
}

/// The results the engine handed over, in batches of one engine pass (a
/// wake-up of the user's thread per batch, not per task), and those of the
/// last batch not yet taken.
struct Results {
    rx: std::sync::mpsc::Receiver<Vec<TaskResult>>,
    ready: std::collections::VecDeque<TaskResult>,
}

/// A master: holds the task queue, accepts workers, hands back results.
///
/// All methods are blocking and may be called from any thread; the network
/// work runs on an internal runtime and goes on while nobody calls [`Manager::wait`].
pub struct Manager {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    project: Option<String>,
    /// Everything in a catalog report but the counts.
    pub(crate) report_identity: std::sync::Arc<drover_catalog::MasterReport>,
    reporter: Option<crate::report::Reporter>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    results: Mutex<Results>,
    next_id: AtomicU64,
    outstanding: AtomicUsize,
    namer: FileNamer,
    /// Environment of tasks that name none.
    default_environment: Option<PathBuf>,
    started: SystemTime,
}

impl Manager {
    /// This master's status as the catalog sees it: identity, task and worker
    /// counts, resources in use and in total, workers and categories. Works
    /// whether or not the manager reports to a catalog; factories use it to
    /// see what the queue needs.
    pub fn status_report(&self) -> drover_catalog::MasterReport {
        crate::report::snapshot(&self.commands).unwrap_or_else(|| {
            let mut r = (*self.report_identity).clone();
            r.stopped = true;
            r
        })
    }

    /// What happened since event number `seen` (workers joined and lost,
    /// tasks failed; the last 40 are kept), and the number to pass next
    /// time. Start with 0. Empty once the manager has stopped.
    pub fn events_since(&self, seen: u64) -> (u64, Vec<drover_catalog::EventSummary>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.commands.send(Command::EventsSince(seen, tx)).is_err() {
            return (seen, Vec::new());
        }
        rx.blocking_recv().unwrap_or((seen, Vec::new()))
    }

    /// A builder with the defaults.
    pub fn builder() -> ManagerBuilder {
        ManagerBuilder::default()
    }

    /// The port workers connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The project name, if any.
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// When this manager started.
    pub fn start_time(&self) -> SystemTime {
        self.started
    }

    /// Queues a task. Inputs are checked now: a missing file or a name that
    /// escapes the sandbox is an error here, not a failure later.
    pub fn submit(&self, task: Task) -> Result<TaskId, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prepared = self.prepare(id, task)?;
        self.commands
            .send(Command::Submit(Box::new(prepared)))
            .map_err(|_| SubmitError::ShutDown)?;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn prepare(&self, id: TaskId, task: Task) -> Result<Prepared, SubmitError> {
        if task.command.trim().is_empty() {
            return Err(SubmitError::Invalid("empty command".into()));
        }
        check_bounds(&task)?;
        let mut inputs = Vec::with_capacity(task.inputs.len());
        let mut names = std::collections::HashSet::new();
        for input in task.inputs {
            check_sandbox_name(&input.remote).map_err(SubmitError::InvalidName)?;
            if !names.insert(input.remote.clone()) {
                return Err(SubmitError::InvalidName(format!(
                    "two inputs are both named {:?}",
                    input.remote
                )));
            }
            inputs.push(match input.source {
                InputSource::File { path, cache } => {
                    let cache_id = if cache {
                        Some(
                            self.namer
                                .name(&path)
                                .map_err(|e| SubmitError::InputMissing(e.to_string()))?,
                        )
                    } else {
                        let meta = std::fs::metadata(&path).map_err(|e| {
                            SubmitError::InputMissing(format!("{}: {e}", path.display()))
                        })?;
                        if !meta.is_file() {
                            return Err(SubmitError::InputMissing(format!(
                                "{} is not a regular file",
                                path.display()
                            )));
                        }
                        None
                    };
                    PreparedInput {
                        cache_id,
                        source: FileSource::Path(path),
                        remote: input.remote,
                    }
                }
                InputSource::Buffer(bytes) => PreparedInput {
                    cache_id: None,
                    source: FileSource::Bytes(bytes),
                    remote: input.remote,
                },
            });
        }
        for (remote, local) in &task.outputs {
            check_sandbox_name(remote).map_err(SubmitError::InvalidName)?;
            // What an interrupted transfer of an earlier run left beside
            // the user's file goes before this run writes there.
            let _ = std::fs::remove_file(crate::engine::part_path(local));
        }
        let environment = match task
            .environment
            .or_else(|| self.default_environment.clone())
        {
            Some(path) => {
                let cache_id = self
                    .namer
                    .name(&path)
                    .map_err(|e| SubmitError::InputMissing(e.to_string()))?;
                Some(PreparedInput {
                    cache_id: Some(cache_id),
                    source: FileSource::Path(path),
                    remote: ".drover-env.tar.gz".into(),
                })
            }
            None => None,
        };
        let mut call = task.call;
        if let Some(c) = call
            .as_mut()
            .filter(|c| c.payload.len() > INLINE_CALL_BYTES)
        {
            // Too big for a task message: a file in the sandbox, which the
            // function server reads when the inline payload is empty.
            inputs.push(PreparedInput {
                cache_id: None,
                source: FileSource::Bytes(std::mem::replace(&mut c.payload, Arc::from(&[][..]))),
                remote: CALL_FILE.into(),
            });
        }
        Ok(Prepared {
            id,
            command: task.command,
            call,
            inputs: Inputs::new(inputs),
            outputs: task.outputs,
            env: task.env,
            resources: task.resources,
            wall_time_s: task.wall_time.map(|d| d.as_secs_f64()),
            category: task.category.unwrap_or_else(|| "default".into()),
            tag: task.tag,
            priority: task.priority,
            max_retries: task.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            environment,
            submitted: SystemTime::now(),
        })
    }

    /// The next finished task, waiting at most `timeout` (None waits forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<TaskResult> {
        let mut results = self.results.lock().ok()?;
        if results.ready.is_empty() {
            let batch = match timeout {
                Some(t) => match results.rx.recv_timeout(t) {
                    Ok(batch) => batch,
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                        return None
                    }
                },
                None => results.rx.recv().ok()?,
            };
            results.ready.extend(batch);
        }
        let got = results.ready.pop_front();
        if got.is_some() {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        got
    }

    /// Up to `max` finished tasks: waits at most `timeout` for the first
    /// (None waits forever), then takes those already finished without
    /// waiting. Empty when none came in time. One call hands a caller (a
    /// Python binding) many results for one crossing.
    pub fn wait_many(&self, max: usize, timeout: Option<Duration>) -> Vec<TaskResult> {
        if max == 0 {
            return Vec::new(); // asked for nothing: no reason to wait
        }
        let Ok(mut results) = self.results.lock() else {
            return Vec::new();
        };
        if results.ready.is_empty() {
            let first = match timeout {
                Some(t) => results.rx.recv_timeout(t).ok(),
                None => results.rx.recv().ok(),
            };
            let Some(batch) = first else {
                return Vec::new();
            };
            results.ready.extend(batch);
        }
        // Batches the engine already handed over, without waiting for more.
        while results.ready.len() < max {
            match results.rx.try_recv() {
                Ok(batch) => results.ready.extend(batch),
                Err(_) => break,
            }
        }
        let take = max.min(results.ready.len());
        let out: Vec<TaskResult> = results.ready.drain(..take).collect();
        self.outstanding.fetch_sub(out.len(), Ordering::Relaxed);
        out
    }

    fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).ok()?;
        rx.blocking_recv().ok()
    }

    /// Cancels a task; its result (outcome cancelled) still comes out of `wait`. False if it is not queued or running.
    pub fn cancel(&self, id: TaskId) -> bool {
        self.ask(|tx| Command::Cancel(id, tx)).unwrap_or(false)
    }

    /// Cancels every task with this tag; returns how many.
    pub fn cancel_by_tag(&self, tag: &str) -> usize {
        self.ask(|tx| Command::CancelTag(tag.to_string(), tx))
            .unwrap_or(0)
    }

    /// Counts of tasks and workers, and resources in use.
    pub fn stats(&self) -> Stats {
        self.ask(Command::Stats).unwrap_or_default()
    }

    /// Configures the category `name` (tasks join it with
    /// [`Task::category`]); its waiting tasks follow the new settings at
    /// once, and what it has learned is kept. Tasks of a category nobody
    /// configured are sized by bucketing if they declare no resources.
    ///
    /// ```no_run
    /// use drover_master::{CategoryConfig, Manager, Task};
    /// let manager = Manager::builder().port(0).build()?;
    /// // Learn the memory of "sim" tasks; never give one more than 16 GB.
    /// manager.set_category("sim", CategoryConfig::bucketing().max_memory_mb(16_000))?;
    /// for i in 0..100 {
    ///     manager.submit(Task::new(format!("./sim --seed {i}")).category("sim"))?;
    /// }
    /// while !manager.is_empty() {
    ///     if let Some(result) = manager.wait(None) {
    ///         // Each try (with its allocation) is in result.attempts.
    ///         println!("{} took {} attempts", result.id, result.attempts.len());
    ///     }
    /// }
    /// let stats = manager.category_stats("sim").expect("the category exists");
    /// for b in &stats.buckets {
    ///     println!("{} MB: {} tasks", b.allocation.memory_mb, b.count);
    /// }
    /// println!("retries for memory: {}", stats.retries.memory);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_category(&self, name: &str, config: CategoryConfig) -> Result<(), SubmitError> {
        config
            .validate()
            .map_err(|e| SubmitError::Invalid(format!("category {name:?}: {e}")))?;
        self.ask(|tx| Command::SetCategory(name.to_string(), Box::new(config), tx))
            .ok_or(SubmitError::ShutDown)
    }

    /// What the category `name` has learned and what it cost; `None` if no
    /// task or config ever named it.
    pub fn category_stats(&self, name: &str) -> Option<CategoryStats> {
        self.ask(|tx| Command::CategoryStats(Some(name.to_string()), tx))
            .and_then(|v| v.into_iter().next())
    }

    /// Statistics of every category, by name.
    pub fn categories(&self) -> Vec<CategoryStats> {
        self.ask(|tx| Command::CategoryStats(None, tx))
            .unwrap_or_default()
    }

    /// The connected workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.ask(Command::Workers).unwrap_or_default()
    }

    /// True when more tasks would keep the workers busy: fewer tasks wait than
    /// twice the cores connected (or than 100 when no worker is connected yet).
    pub fn hungry(&self) -> bool {
        let s = self.stats();
        let want = if s.workers_connected == 0 {
            100
        } else {
            2 * s.resources_total.cores as u64
        };
        s.tasks_waiting < want
    }

    /// True when every submitted task has been returned by `wait`.
    pub fn is_empty(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) == 0
    }

    /// Stops listening and closes every worker connection; running tasks are
    /// killed by their workers, which then look for a master again until their
    /// idle timeout (so pilot jobs outlive one run). Also done on drop.
    pub fn shutdown(&mut self) {
        // While the engine still runs, so the last report has the final counts.
        if let Some(reporter) = self.reporter.take() {
            reporter.stop();
        }
        if let Some(rt) = self.runtime.take() {
            let _ = self.ask(Command::Shutdown);
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Tells every connected worker to exit, then shuts down.
    pub fn shutdown_workers(&mut self) {
        if self.runtime.is_some() {
            let _ = self.ask(Command::DismissWorkers);
            // Let the writers deliver the message before the runtime goes.
            std::thread::sleep(Duration::from_millis(100));
        }
        self.shutdown();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Largest values a task may declare: far beyond any machine, but small
/// enough that every sum and conversion downstream stays exact. A value past
/// them is a mistake (`u64::MAX` MB, 10^9 cores, a wall time of 10^300 s),
/// refused at submit with its name rather than left waiting for ever.
const MAX_CORES: u32 = 1 << 20;
const MAX_GPUS: u32 = 1 << 16;
const MAX_MB: u64 = 1 << 40;
const MAX_WALL_TIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn check_bounds(task: &Task) -> Result<(), SubmitError> {
    let r = &task.resources;
    let too_big = |what: &str, value: String, max: String| {
        Err(SubmitError::Invalid(format!(
            "{what} {value} is more than any worker can have (at most {max})"
        )))
    };
    if r.cores > MAX_CORES {
        return too_big("cores", r.cores.to_string(), MAX_CORES.to_string());
    }
    if r.gpus > MAX_GPUS {
        return too_big("gpus", r.gpus.to_string(), MAX_GPUS.to_string());
    }
    if r.memory_mb > MAX_MB {
        return too_big(
            "memory",
            format!("{} MB", r.memory_mb),
            format!("{MAX_MB} MB"),
        );
    }
    if r.disk_mb > MAX_MB {
        return too_big("disk", format!("{} MB", r.disk_mb), format!("{MAX_MB} MB"));
    }
    if let Some(w) = task.wall_time {
        if w.is_zero() {
            return Err(SubmitError::Invalid(
                "wall time must be more than 0 s".into(),
            ));
        }
        if w > MAX_WALL_TIME {
            return too_big(
                "wall time",
                format!("{} s", w.as_secs()),
                format!("{} s, ten years", MAX_WALL_TIME.as_secs()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod thread_safety {
    /// Python and multi-threaded Rust users share one `Manager` across
    /// threads; this fails to compile if a field makes it `!Sync`.
    #[test]
    fn manager_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Manager>();
    }
}
