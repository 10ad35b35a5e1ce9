//! `drover factory`: keeps the right number of worker jobs in a batch system
//! (Slurm, HTCondor, or local processes) as a master's demand rises and
//! falls, like CCTools' `work_queue_factory` and HyperQueue's automatic
//! allocation.
//!
//! Every `--interval` the factory reads the master's status (from the master
//! itself, or from a catalog by project name), lists its own jobs in the
//! batch system, and decides ([`plan::decide`]) how many to submit or cancel.
//! How many workers the waiting tasks can use comes from the master's own
//! packing code, so a 4-core task asks for a share of a 4-core worker and
//! not for four 1-core workers. Workers run with `--idle-timeout`, so they
//! leave by themselves when the queue drains; pending jobs are cancelled when
//! demand falls. Failed submissions back off exponentially and are logged
//! with the batch system's own error. On SIGINT or SIGTERM the factory
//! removes every job it submitted (selected by its job name, not by user)
//! and exits.
//!
//! - [`plan`]: the decision, pure code.
//! - [`status`]: the master's status, from the master or a catalog.
//! - [`batch`]: the batch-system interface and the worker command line;
//!   [`slurm`], [`condor`], [`local`]: the backends.

pub mod batch;
pub mod condor;
pub mod local;
pub mod plan;
pub mod slurm;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drover_catalog::MasterReport;
use drover_protocol::tls::{self, rustls::ClientConfig};
use drover_protocol::Resources;
use tracing::{debug, info, warn};

use crate::batch::{Backend, Job, JobState, MasterArg, WorkerSpec};
use crate::plan::{JobCounts, Limits};

/// Longest wait between two submission attempts after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a started job counts as "arriving" (its worker may not have
/// connected yet) when the master's worker count cannot tell.
pub const CONNECT_GRACE: Duration = Duration::from_secs(15);

/// How long the factory waits, after removing its jobs, for the batch
/// system to show them gone.
pub const REMOVE_WAIT: Duration = Duration::from_secs(60);

/// How long workers get to leave by themselves, when the factory stops,
/// before their jobs are removed outright.
pub const GENTLE_STOP: Duration = Duration::from_secs(5);

/// The batch systems the factory can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// Slurm (sbatch, squeue, scancel).
    Slurm,
    /// HTCondor (condor_submit, condor_q, condor_rm).
    Condor,
    /// `drover worker` processes on this machine.
    Local,
}

/// What `drover factory` keeps running and where; the binary fills it from its options.
#[derive(Debug, Clone)]
pub struct FactoryConfig {
    /// The batch system to run workers in.
    pub batch: BatchKind,
    /// The master, as HOST:PORT (its worker port); the factory asks it for its status.
    pub master: Option<String>,
    /// A catalog, as HOST:PORT, to find the master in by --project.
    pub catalog: Option<String>,
    /// Regular expression matched against project names in the catalog.
    pub project: Option<String>,
    /// Worker jobs kept even without demand.
    pub min_workers: usize,
    /// Most worker jobs at once, pending and running together.
    pub max_workers: usize,
    /// Most jobs waiting in the batch queue at once (default: --max-workers).
    /// Keeps a busy cluster from collecting requests it cannot start.
    pub max_pending: Option<usize>,
    /// Cores each worker offers (and its job asks for).
    pub cores: u32,
    /// Memory each worker offers, MB.
    pub memory: u64,
    /// Disk each worker offers, MB.
    pub disk: u64,
    /// GPUs each worker offers.
    pub gpus: u32,
    /// Seconds without a task after which a worker exits (its --idle-timeout).
    pub worker_timeout: u64,
    /// Extra batch options: sbatch arguments for Slurm (shell-quoted), or
    /// `key = value` submit lines separated by ';' for HTCondor.
    pub batch_options: Option<String>,
    /// The master's password file, handed to the workers.
    pub password_file: Option<PathBuf>,
    /// The master's TLS certificate fingerprint: status queries and the
    /// workers reach the master over TLS and trust only that certificate.
    pub tls_fingerprint: Option<String>,
    /// Seconds between two looks at the master and the queue.
    pub interval: f64,
    /// Wall-time limit of each worker job, in seconds (default: the cluster's).
    pub time_limit: Option<u64>,
    /// Directory for job output and submit files (default: drover-factory-logs in $XDG_STATE_HOME/drover or
    /// ~/.local/state/drover).
    pub log_dir: Option<PathBuf>,
    /// The drover binary and password file are on a filesystem the execute
    /// nodes share: HTCondor does not ship them.
    pub shared_path: bool,
    /// The drover binary the jobs run (default: this one).
    pub drover: Option<PathBuf>,
    /// Job name (batch name) that marks this factory's jobs (default:
    /// drover-factory-PID-RANDOM). Letters, digits, '.', '_' and '-'.
    pub name: Option<String>,
    /// Print what one submission would be and exit.
    pub dry_run: bool,
}

/// What the factory did, printed as one JSON line when it exits.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Jobs submitted.
    pub submitted: u64,
    /// Pending jobs cancelled because demand fell.
    pub cancelled: u64,
    /// Jobs seen running.
    pub started: u64,
    /// Jobs that ended without having run long enough to be of use, or that
    /// vanished while pending.
    pub failed: u64,
    /// Submission attempts that failed.
    pub submit_errors: u64,
}

/// Where the demand comes from.
enum Source {
    Master(String),
    Catalog { catalog: String, project: String },
}

/// A job this factory submitted, as it has seen it.
struct Tracked {
    submitted_at: Instant,
    running_since: Option<Instant>,
}

/// Runs `drover factory` until SIGINT or SIGTERM; returns the exit code.
pub fn run(args: FactoryConfig) -> anyhow::Result<i32> {
    let factory = Factory::new(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(factory.main())
}

struct Factory {
    args: FactoryConfig,
    source: Source,
    backend: Backend,
    limits: Limits,
    password: Option<Vec<u8>>,
    password_file: Option<PathBuf>,
    /// TLS for the status queries (see [`FactoryConfig::tls_fingerprint`]).
    tls: Option<Arc<ClientConfig>>,
    drover: PathBuf,
    name: String,
    interval: Duration,
    jobs: HashMap<String, Tracked>,
    cancelled: HashSet<String>,
    failures: u32,
    next_submit: Option<Instant>,
    summary: Summary,
    last_line: String,
    last_error: Option<String>,
    unfit_warned: usize,
}

impl Factory {
    fn new(args: FactoryConfig) -> anyhow::Result<Factory> {
        if args.cores == 0 {
            bail!("--cores must be at least 1");
        }
        if args.max_workers == 0 {
            bail!("--max-workers must be at least 1");
        }
        if args.min_workers > args.max_workers {
            bail!(
                "--min-workers ({}) is more than --max-workers ({})",
                args.min_workers,
                args.max_workers
            );
        }
        if args.max_pending == Some(0) {
            bail!("--max-pending must be at least 1");
        }
        if !(args.interval.is_finite() && args.interval > 0.0 && args.interval <= 86_400.0) {
            bail!("--interval must be a number of seconds above 0");
        }
        let source = match (&args.master, &args.catalog, &args.project) {
            (Some(m), _, _) => Source::Master(m.clone()),
            (None, Some(c), Some(p)) => {
                drover_catalog::client::parse_catalog(c)?;
                Source::Catalog {
                    catalog: c.clone(),
                    project: p.clone(),
                }
            }
            _ => bail!("give --master HOST:PORT, or --catalog HOST:PORT with --project REGEX"),
        };
        let name = match &args.name {
            Some(n) => {
                check_name(n)?;
                n.clone()
            }
            None => format!(
                "drover-factory-{}-{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 3]>())
            ),
        };
        let (password, password_file) = match &args.password_file {
            Some(p) => {
                let bytes = drover_protocol::read_password_file(p)?;
                (Some(bytes), Some(absolute(p)?))
            }
            None => (None, None),
        };
        let tls = match &args.tls_fingerprint {
            Some(pin) => Some(tls::client_config(&tls::Trust::fingerprint(pin)?)?),
            None => None,
        };
        let drover = match &args.drover {
            Some(d) => absolute(d)?,
            None => std::env::current_exe().context("finding the drover binary")?,
        };
        if !drover.is_file() {
            bail!("the drover binary {} does not exist", drover.display());
        }
        let options = args.batch_options.clone().unwrap_or_default();
        let slurm_options = match args.batch {
            BatchKind::Slurm => shlex::split(&options)
                .with_context(|| format!("--batch-options {options:?} has an unclosed quote"))?,
            _ => Vec::new(),
        };
        let log_dir = args.log_dir.clone().unwrap_or_else(|| {
            let name = "drover-factory-logs";
            drover_catalog::paths::state_dir().map_or_else(|| PathBuf::from(name), |d| d.join(name))
        });
        if !args.dry_run {
            std::fs::create_dir_all(&log_dir)
                .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        }
        let log_dir = absolute(&log_dir)?;
        let backend = match args.batch {
            BatchKind::Slurm => Backend::Slurm(slurm::Slurm::new(
                name.clone(),
                log_dir,
                args.time_limit,
                slurm_options,
            )),
            BatchKind::Condor => Backend::Condor(condor::Condor::new(
                name.clone(),
                log_dir,
                args.shared_path,
                args.time_limit,
                options.split(';').map(|s| s.trim().to_string()).collect(),
            )),
            BatchKind::Local => {
                if !options.trim().is_empty() {
                    warn!("--batch-options has no meaning for local workers; ignored");
                }
                Backend::Local(local::Local::new(name.clone(), log_dir))
            }
        };
        let limits = Limits {
            min_workers: args.min_workers,
            max_workers: args.max_workers,
            max_pending: args.max_pending.unwrap_or(args.max_workers),
            worker: Resources {
                cores: args.cores,
                memory_mb: args.memory,
                disk_mb: args.disk,
                gpus: args.gpus,
            },
        };
        let interval = Duration::from_secs_f64(args.interval);
        Ok(Factory {
            args,
            source,
            backend,
            limits,
            password,
            password_file,
            tls,
            drover,
            name,
            interval,
            jobs: HashMap::new(),
            cancelled: HashSet::new(),
            failures: 0,
            next_submit: None,
            summary: Summary::default(),
            last_line: String::new(),
            last_error: None,
            unfit_warned: 0,
        })
    }

    fn spec(&self) -> WorkerSpec {
        let master = match &self.source {
            Source::Master(addr) => MasterArg::Address(addr.clone()),
            Source::Catalog { catalog, project } => MasterArg::Catalog {
                catalog: catalog.clone(),
                project: project.clone(),
            },
        };
        WorkerSpec {
            drover: self.drover.clone(),
            master,
            resources: self.limits.worker,
            idle_timeout: self.args.worker_timeout,
            password_file: self.password_file.clone(),
            tls_fingerprint: self.args.tls_fingerprint.clone(),
        }
    }

    async fn main(mut self) -> anyhow::Result<i32> {
        if self.args.dry_run {
            println!("{}", self.backend.describe(&self.spec())?);
            return Ok(0);
        }
        info!(
            name = %self.name,
            batch = ?self.args.batch,
            "factory started: workers of {:?}, {}..{} of them",
            self.limits.worker, self.limits.min_workers, self.limits.max_workers
        );
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.round() => {}
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        // Jobs still in the batch system when told to stop: running ones
        // too, which the "cancelled" count (pending jobs cancelled as
        // demand fell) does not include.
        let (cleaned, removed) = if self.summary.submitted == 0 {
            info!(name = %self.name, "stopping (this factory submitted no jobs)");
            (Ok(()), 0)
        } else {
            info!(name = %self.name, "stopping: removing this factory's jobs");
            let listed = self.backend.remaining().await.unwrap_or(0);
            (self.remove_everything().await, listed)
        };
        let s = &self.summary;
        println!(
            "{}",
            serde_json::json!({
                "factory": self.name,
                "submitted": s.submitted,
                "cancelled": s.cancelled,
                "removed_at_stop": removed,
                "started": s.started,
                "failed": s.failed,
                "submit_errors": s.submit_errors,
            })
        );
        match cleaned {
            Ok(()) => Ok(0),
            Err(e) => {
                warn!("{e:#}");
                Ok(1)
            }
        }
    }

    /// Removes every job and waits (a bounded time) until the batch system
    /// no longer lists any of them.
    async fn remove_everything(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        let deadline = start + REMOVE_WAIT;
        let mut last_err = None;
        let mut signalled = false;
        loop {
            // Workers are asked once to leave by themselves, and get a few
            // seconds for it; then the batch system removes what is left.
            let hard = start.elapsed() >= GENTLE_STOP;
            if hard || !signalled {
                if let Err(e) = self.backend.remove_all(!hard).await {
                    // Typically "no such job" races; the listing below decides.
                    debug!("removing jobs: {e:#}");
                    last_err = Some(e);
                }
                signalled = true;
            }
            match self.backend.remaining().await {
                Ok(0) => return Ok(()),
                Ok(n) => debug!("{n} job(s) still listed"),
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let why = last_err.map(|e| format!(": {e:#}")).unwrap_or_default();
                bail!(
                    "jobs named {} are still in the batch system after {REMOVE_WAIT:?}{why}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One look at the master and the queue, and what follows from it.
    async fn round(&mut self) {
        let report = self.fetch_status().await;
        let listed = match self.backend.list().await {
            Ok(jobs) => jobs,
            Err(e) => {
                // Without a count, submitting could overshoot --max-workers.
                self.note_error(format!("cannot list the factory's jobs: {e:#}"));
                return;
            }
        };
        let now = Instant::now();
        let counts = self.track(&listed, report.as_ref(), now);
        if let Some(r) = &report {
            let unfit = plan::unfit_tasks(&plan::waiting_requests(r), &self.limits.worker);
            if unfit > 0 && unfit != self.unfit_warned {
                warn!(
                    "{unfit} waiting task(s) ask for more than a worker of {:?} offers; no worker this factory starts can run them",
                    self.limits.worker
                );
            }
            self.unfit_warned = unfit;
        }
        let d = plan::decide(&self.limits, report.as_ref(), counts);
        let line = format!(
            "tasks waiting {}, running {}; workers connected {}; jobs pending {}, running {} ({} arriving); needed {}, target {}",
            report.as_ref().map_or(0, |r| r.tasks_waiting),
            report.as_ref().map_or(0, |r| r.tasks_running),
            report.as_ref().map_or(0, |r| r.workers_connected),
            counts.pending,
            counts.running,
            counts.arriving,
            d.needed,
            d.target
        );
        if line != self.last_line {
            info!("{line}");
            self.last_line = line;
        }
        if d.cancel > 0 {
            self.cancel_newest_pending(&listed, d.cancel).await;
        }
        if d.submit > 0 {
            self.submit(d.submit, now).await;
        }
    }

    async fn fetch_status(&mut self) -> Option<MasterReport> {
        let got = match &self.source {
            Source::Master(addr) => {
                status::query_master(addr, self.password.as_deref(), self.tls.as_ref())
                    .await
                    .map(Some)
            }
            Source::Catalog { catalog, project } => status::query_catalog(catalog, project).await,
        };
        match got {
            Ok(x) => {
                if self.last_error.take().is_some() {
                    info!("the master's status is readable again");
                }
                x
            }
            Err(e) => {
                self.note_error(format!("cannot read the master's status: {e:#}"));
                None
            }
        }
    }

    /// Logs an error once while it repeats.
    fn note_error(&mut self, e: String) {
        if self.last_error.as_deref() != Some(e.as_str()) {
            warn!("{e}");
        }
        self.last_error = Some(e);
    }

    /// Updates what the factory knows of its jobs from a listing, notes the
    /// ones that ended badly, and counts pending, running and arriving jobs.
    fn track(&mut self, listed: &[Job], report: Option<&MasterReport>, now: Instant) -> JobCounts {
        let mut counts = JobCounts::default();
        let mut young = 0;
        let listed_ids: HashSet<&str> = listed.iter().map(|j| j.id.as_str()).collect();
        for job in listed {
            let t = self.jobs.entry(job.id.clone()).or_insert(Tracked {
                // A job from before a restart of ours, or one whose submit
                // answer was lost: known from now on.
                submitted_at: now,
                running_since: None,
            });
            match job.state {
                JobState::Pending => counts.pending += 1,
                JobState::Running => {
                    counts.running += 1;
                    let since = *t.running_since.get_or_insert_with(|| {
                        self.summary.started += 1;
                        now
                    });
                    if now.duration_since(since) < CONNECT_GRACE.max(self.interval * 2) {
                        young += 1;
                    }
                }
            }
        }
        // Workers connect within a second or two of starting: once the
        // master counts as many workers as we run, none is still arriving.
        let unconnected = report.map_or(counts.running, |r| {
            counts
                .running
                .saturating_sub(usize::try_from(r.workers_connected).unwrap_or(usize::MAX))
        });
        counts.arriving = young.min(unconnected);
        let gone: Vec<String> = self
            .jobs
            .keys()
            .filter(|id| !listed_ids.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let Some(t) = self.jobs.remove(&id) else {
                continue;
            };
            if self.cancelled.remove(&id) {
                continue;
            }
            let early = Duration::from_secs(self.args.worker_timeout)
                .saturating_sub(self.interval * 2 + Duration::from_secs(1));
            let failed = match t.running_since {
                None => {
                    warn!(job = %id, "job left the queue without being seen running (output: {})", self.backend.log_hint(&id));
                    true
                }
                Some(since) if now.duration_since(since) < early => {
                    warn!(
                        job = %id,
                        "job ended {:.0?} after it started, before its worker could have idled out: the worker may have failed (output: {})",
                        now.duration_since(since),
                        self.backend.log_hint(&id)
                    );
                    true
                }
                Some(_) => false,
            };
            if failed {
                self.summary.failed += 1;
                self.fail_backoff(now);
            }
        }
        counts
    }

    async fn cancel_newest_pending(&mut self, listed: &[Job], n: usize) {
        let mut pending: Vec<(&str, Instant)> = listed
            .iter()
            .filter(|j| j.state == JobState::Pending)
            .map(|j| {
                let at = self
                    .jobs
                    .get(&j.id)
                    .map_or(Instant::now(), |t| t.submitted_at);
                (j.id.as_str(), at)
            })
            .collect();
        pending.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
        let ids: Vec<String> = pending
            .iter()
            .take(n)
            .map(|(id, _)| id.to_string())
            .collect();
        match self.backend.cancel_pending(&ids).await {
            Ok(()) => {
                info!(
                    "demand fell: cancelled {} pending job(s): {}",
                    ids.len(),
                    ids.join(" ")
                );
                self.summary.cancelled += ids.len() as u64;
                self.cancelled.extend(ids);
            }
            Err(e) => warn!("cannot cancel pending jobs {}: {e:#}", ids.join(" ")),
        }
    }

    async fn submit(&mut self, n: usize, now: Instant) {
        if let Some(at) = self.next_submit {
            if now < at {
                debug!("backing off; next submission in {:?}", at - now);
                return;
            }
        }
        let spec = self.spec();
        let result = self.backend.submit(&spec, n).await;
        let submitted_at = Instant::now();
        if !result.ids.is_empty() {
            info!(
                "submitted {} worker job(s): {}",
                result.ids.len(),
                result.ids.join(" ")
            );
            self.summary.submitted += result.ids.len() as u64;
            for id in result.ids {
                self.jobs.insert(
                    id,
                    Tracked {
                        submitted_at,
                        running_since: None,
                    },
                );
            }
        }
        match result.error {
            None => {
                self.failures = 0;
                self.next_submit = None;
            }
            Some(e) => {
                self.summary.submit_errors += 1;
                let wait = self.fail_backoff(submitted_at);
                warn!(
                    "submitting workers failed ({} time(s) in a row); next try in {wait:.0?}: {e:#}",
                    self.failures
                );
            }
        }
    }

    /// Doubles the wait before the next submission, up to [`MAX_BACKOFF`].
    fn fail_backoff(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = self
            .interval
            .saturating_mul(1u32 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.next_submit = Some(now + wait);
        wait
    }
}

/// Job names go into batch-system filters unquoted; keep them plain.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!("job name {name:?} must be 1-100 letters, digits, '.', '_' or '-'");
    }
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("making {} absolute", p.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGINT; stop the factory with SIGKILL and remove its jobs by name");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("drover-factory-12-ab_c.d").is_ok());
        for bad in ["", "a b", "a\"b", "x;rm", &"a".repeat(101)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
