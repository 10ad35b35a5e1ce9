//! The worker's outer loop: connect (directly or through a catalog),
//! run one session, and reconnect with backoff until the idle timeout or
//! the master says stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drover_monitor::Monitor;
use drover_protocol::Resources;
use tracing::{info, warn};

use crate::env::Environments;
use crate::locate::MasterSource;
use crate::retry::{self, Backoff};
use crate::session::Session;
use crate::slots::Slots;

/// How a worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The master's `HOST:PORT`, or the catalog and project to look it up by
    /// (`"host:port".into()` for the former).
    pub master: MasterSource,
    pub resources: Resources,
    pub password: Option<Vec<u8>>,
    /// Exit after this long without a task (connected or not).
    pub idle_timeout: Duration,
    /// Holds the file cache (shared by workers on this machine, kept across runs) and task sandboxes.
    pub workdir: PathBuf,
    /// Exit when the connection ends instead of reconnecting (embedded local workers).
    pub exit_on_disconnect: bool,
    /// Reach the master over TLS, trusting it as this configuration says.
    pub tls: Option<std::sync::Arc<drover_protocol::tls::rustls::ClientConfig>>,
}

/// Why a worker stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum StopReason {
    IdleTimeout,
    MasterShutdown,
    Disconnected,
}

/// Runs a worker until its idle timeout, until the master tells it to stop, or
/// (with `exit_on_disconnect`) until the connection ends. Reconnects with
/// exponential backoff otherwise.
pub async fn run_worker(config: WorkerConfig) -> anyhow::Result<StopReason> {
    let dirs = Dirs::create(&config.workdir)?;
    let shared = Shared {
        monitor: Monitor::new(drover_monitor::DEFAULT_INTERVAL),
        envs: Arc::new(Environments::new(
            config.workdir.join("envs"),
            dirs.cache.clone(),
        )),
        // Enough clean directories for every task that can run at once.
        slots: Arc::new(Slots::new(
            dirs.tasks.clone(),
            (config.resources.cores as usize).clamp(1, 1024) * 2,
        )),
    };
    info!(method = shared.monitor.method(), "tasks run monitored");
    let mut backoff = Backoff::new();
    let mut last_busy = Instant::now();
    let mut reached = false;
    loop {
        // A catalog is asked again at every attempt: the master may have
        // restarted elsewhere.
        let connect = tokio::time::timeout(retry::HANDSHAKE_DEADLINE, config.master.connect());
        let connected = connect.await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no connection within {:?}",
                retry::HANDSHAKE_DEADLINE
            ))
        });
        let failure = match connected {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                info!(master = %addr, "connected");
                let outcome = Session::new(&config, &dirs, &shared)
                    .run(stream, &addr, &mut last_busy)
                    .await;
                match outcome {
                    Ok(StopReason::Disconnected) => {
                        reached = true;
                        backoff.reset();
                        warn!(master = %addr, "connection to the master ended");
                        if config.exit_on_disconnect {
                            return Ok(StopReason::Disconnected);
                        }
                        None
                    }
                    Ok(reason) => return Ok(reason),
                    Err(e) if !retry::is_retryable(&e) || config.exit_on_disconnect => {
                        return Err(e)
                    }
                    Err(e) => Some(format!("{addr}: {e:#}")),
                }
            }
            Err(e) if config.exit_on_disconnect => return Err(e),
            Err(e) => Some(format!("{e:#}")),
        };
        let left = config.idle_timeout.saturating_sub(last_busy.elapsed());
        if left.is_zero() {
            return match failure {
                // Never served a master: whoever started it should hear so.
                Some(why) if !reached => bail!(
                    "no master reached within the idle timeout ({:?}); last failure: {why}",
                    config.idle_timeout
                ),
                _ => {
                    info!("idle timeout reached while disconnected; exiting");
                    Ok(StopReason::IdleTimeout)
                }
            };
        }
        let wait = backoff.next_wait().min(left);
        if let Some(why) = failure {
            warn!("{why}; retrying in {:.1} s", wait.as_secs_f64());
        }
        tokio::time::sleep(wait).await;
    }
}

/// The worker's directories. The cache is shared by every worker process that
/// uses the same workdir; each process has its own task directory.
pub(crate) struct Dirs {
    pub(crate) cache: PathBuf,
    pub(crate) transfer: PathBuf,
    pub(crate) tasks: PathBuf,
    /// Tells later workers on this workdir that this one is alive.
    _lock: crate::leftovers::OwnLock,
}

impl Dirs {
    fn create(workdir: &Path) -> anyhow::Result<Dirs> {
        let cache = workdir.join("cache");
        let own = workdir.join(format!("w{}", std::process::id()));
        let (transfer, tasks) = (own.join("transfer"), own.join("tasks"));
        for d in [&cache, &transfer, &tasks] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let lock = crate::leftovers::OwnLock::take(&own)
            .with_context(|| format!("locking {}", own.display()))?;
        crate::leftovers::remove_stale(workdir, &cache);
        Ok(Dirs {
            cache,
            transfer,
            tasks,
            _lock: lock,
        })
    }

    pub(crate) fn cached_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.cache) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if let Some(own) = self.tasks.parent() {
            let _ = std::fs::remove_dir_all(own);
        }
    }
}

/// What every task of this worker process shares, across reconnects.
pub(crate) struct Shared {
    /// The one poller that measures and limits every task.
    pub(crate) monitor: Monitor,
    pub(crate) envs: Arc<Environments>,
    pub(crate) slots: Arc<Slots>,
}
