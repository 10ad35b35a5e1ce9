//! Running one task's process tree under the worker's shared monitor.
//!
//! Every task of a worker process is spawned through one
//! [`drover_monitor::Monitor`]: one sampler thread measures and limits all
//! of them, and the task's own wait costs no thread either, because the
//! root's exit is learnt from a pidfd registered with tokio's reactor. Only
//! the final accounting (reaping, killing leftovers, removing the cgroup),
//! which can block briefly, runs on the blocking pool.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use drover_monitor::{Exec, Limits, Monitor, Report, SpawnOptions, Watched};
use tokio::io::unix::AsyncFd;

/// A task's process tree being watched by the monitor.
pub struct Running {
    watched: Option<Watched>,
    /// A duplicate of the monitor's exit descriptor, owned here so tokio can
    /// poll it without borrowing from `watched`.
    exit: AsyncFd<OwnedFd>,
}

impl Running {
    /// Spawns `cmd` (stdio and working directory already set) under
    /// `monitor`, with `sandbox` as the directory whose size is its disk use.
    pub fn spawn(
        monitor: &Monitor,
        cmd: Exec,
        sandbox: &Path,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Running> {
        let watched = monitor.spawn_exec_with(cmd, Some(sandbox), limits, opts)?;
        Running::watch(watched)
    }

    /// Waits on a process the monitor adopted ([`drover_monitor::Reserved`]).
    pub fn watch(watched: Watched) -> io::Result<Running> {
        // On failure `watched` is dropped here, which kills and reaps the tree.
        let fd = watched.pidfd().try_clone_to_owned()?;
        // SAFETY: `fd` is a descriptor we own and move into the AsyncFd,
        // which closes it only after deregistering it.
        let exit = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(format!("registering the task's pidfd: {e}")))?;
        Ok(Running {
            watched: Some(watched),
            exit,
        })
    }

    /// Kills the whole tree (the task's cgroup, process group and every
    /// escaped descendant the monitor has seen). Idempotent.
    pub fn kill(&self) {
        if let Some(w) = &self.watched {
            w.kill();
        }
    }

    /// Lets a task frozen over its memory limit go on with `memory_mb`.
    pub fn grow_memory(&self, memory_mb: u64) {
        if let Some(w) = &self.watched {
            w.grow_memory(memory_mb);
        }
    }

    /// Ends a task frozen over its memory limit as over it.
    pub fn refuse_growth(&self) {
        if let Some(w) = &self.watched {
            w.refuse_growth();
        }
    }

    /// Resolves once the root process has exited. Cancel-safe: it only waits
    /// for readiness, so it can sit in a `select!` next to kill requests.
    pub async fn exited(&self) -> io::Result<()> {
        let mut guard = self.exit.readable().await?;
        // Readiness stays set (a pidfd stays readable once its process
        // exited); clearing it keeps a later call honest if the report is
        // not taken.
        guard.clear_ready();
        Ok(())
    }

    /// After [`Running::exited`], for an adopted process: the final report,
    /// with the wait status and rusage its parent reaped it with.
    pub async fn finish_adopted(
        mut self,
        status: i32,
        cpu: f64,
        maxrss: u64,
    ) -> io::Result<Report> {
        let Some(watched) = self.watched.take() else {
            return Err(io::Error::other("task already finished"));
        };
        drop(self.exit);
        if !watched.finish_may_block() {
            return watched.finish_adopted(status, cpu, maxrss);
        }
        tokio::task::spawn_blocking(move || watched.finish_adopted(status, cpu, maxrss))
            .await
            .map_err(|e| io::Error::other(format!("finishing the task: {e}")))?
    }

    /// After [`Running::exited`]: the final report. The root is reaped, any
    /// leftover descendant killed, and the measurements closed; on the
    /// blocking pool when leftovers may have to be waited for.
    pub async fn finish(mut self) -> io::Result<Report> {
        let Some(watched) = self.watched.take() else {
            return Err(io::Error::other("task already finished"));
        };
        drop(self.exit);
        // Usually nothing is left to kill or wait for, and finishing is a
        // few system calls: cheaper here than a hand-off to another thread.
        if !watched.finish_may_block() {
            return watched.wait();
        }
        tokio::task::spawn_blocking(move || watched.wait())
            .await
            .map_err(|e| io::Error::other(format!("finishing the task: {e}")))?
    }
}
