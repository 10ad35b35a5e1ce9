//! What the factory needs from a batch system, and the one worker command
//! line every backend runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use drover_protocol::Resources;
use tokio::io::AsyncWriteExt;

use crate::condor::Condor;
use crate::local::Local;
use crate::slurm::Slurm;

/// Longest a batch command (sbatch, squeue, condor_q...) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a job is in its batch system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Queued, not started.
    Pending,
    /// Started: its worker runs or is starting.
    Running,
}

/// One of the factory's jobs that the batch system still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The batch system's id (`1234` in Slurm, `56.3` in HTCondor, `local-2`).
    pub id: String,
    /// Pending or running.
    pub state: JobState,
}

/// How a worker finds its master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterArg {
    /// At this `HOST:PORT`.
    Address(String),
    /// The newest running master whose project matches `project` in the
    /// catalog at `catalog`, looked up again at every reconnect.
    Catalog {
        /// The catalog's `HOST:PORT`.
        catalog: String,
        /// Project regex.
        project: String,
    },
}

/// The worker each job runs.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// The `drover` binary the job executes.
    pub drover: PathBuf,
    /// How the worker finds its master.
    pub master: MasterArg,
    /// What the worker offers.
    pub resources: Resources,
    /// Seconds without a task after which the worker exits.
    pub idle_timeout: u64,
    /// The master's password file, if it has one.
    pub password_file: Option<PathBuf>,
    /// The master's TLS certificate fingerprint, if it has TLS.
    pub tls_fingerprint: Option<String>,
}

impl WorkerSpec {
    /// The arguments after the executable: `worker HOST:PORT --cores ...`.
    /// `password_path` is how the job sees the password file (the batch
    /// system may ship it under another name).
    pub fn args(&self, password_path: Option<&str>) -> Vec<String> {
        let r = &self.resources;
        let mut a = vec!["worker".to_string()];
        match &self.master {
            MasterArg::Address(addr) => a.push(addr.clone()),
            MasterArg::Catalog { catalog, project } => a.extend([
                "--project".to_string(),
                project.clone(),
                "--catalog".to_string(),
                catalog.clone(),
            ]),
        }
        a.extend([
            "--cores".into(),
            r.cores.to_string(),
            "--memory".into(),
            r.memory_mb.to_string(),
            "--disk".into(),
            r.disk_mb.to_string(),
            "--gpus".into(),
            r.gpus.to_string(),
            "--idle-timeout".into(),
            self.idle_timeout.to_string(),
        ]);
        if let Some(p) = password_path {
            a.push("--password-file".into());
            a.push(p.to_string());
        }
        if let Some(pin) = &self.tls_fingerprint {
            a.push("--tls-fingerprint".into());
            a.push(pin.clone());
        }
        a
    }

    /// The whole command as one shell line, quoted.
    pub fn shell_command(&self) -> anyhow::Result<String> {
        let password = self.password_file.as_deref().map(path_str).transpose()?;
        let mut words = vec![path_str(&self.drover)?.to_string()];
        words.extend(self.args(password));
        shlex::try_join(words.iter().map(String::as_str))
            .context("the worker command cannot be quoted for a shell (it contains a NUL byte)")
    }
}

/// A path as UTF-8, which batch scripts need.
pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not valid UTF-8", p.display()))
}

/// The batch system the factory drives.
pub enum Backend {
    /// Slurm: sbatch, squeue, scancel.
    Slurm(Slurm),
    /// HTCondor: condor_submit, condor_q, condor_rm.
    Condor(Condor),
    /// Worker processes on this machine.
    Local(Local),
}

/// The outcome of submitting several jobs: the ones that went in, and the
/// error that stopped the rest.
pub struct Submitted {
    /// Ids of the jobs submitted.
    pub ids: Vec<String>,
    /// Why the remaining jobs were not submitted.
    pub error: Option<anyhow::Error>,
}

impl Backend {
    /// Submits `n` worker jobs.
    pub async fn submit(&mut self, spec: &WorkerSpec, n: usize) -> Submitted {
        match self {
            Backend::Slurm(b) => b.submit(spec, n).await,
            Backend::Condor(b) => b.submit(spec, n).await,
            Backend::Local(b) => b.submit(spec, n),
        }
    }

    /// The factory's jobs still in the system.
    pub async fn list(&mut self) -> anyhow::Result<Vec<Job>> {
        match self {
            Backend::Slurm(b) => b.list().await,
            Backend::Condor(b) => b.list().await,
            Backend::Local(b) => b.list(),
        }
    }

    /// Cancels those of `ids` that are still pending; started jobs are left alone.
    pub async fn cancel_pending(&mut self, ids: &[String]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Slurm(b) => b.cancel_pending(ids).await,
            Backend::Condor(b) => b.cancel_pending(ids).await,
            // Local workers start at once: nothing is ever pending.
            Backend::Local(_) => Ok(()),
        }
    }

    /// Removes every job this factory submitted, pending or running.
    /// `gently`: running workers get a SIGTERM of their own first (where the
    /// batch system would otherwise signal their tasks too), so that they
    /// leave the master before their tasks die and the master requeues
    /// those tasks instead of failing them.
    pub async fn remove_all(&mut self, gently: bool) -> anyhow::Result<()> {
        match self {
            Backend::Slurm(b) => b.remove_all(gently).await,
            // condor_rm signals the job's main process (the worker) first.
            Backend::Condor(b) => b.remove_all().await,
            // Local workers are signalled one by one, never their tasks.
            Backend::Local(b) => b.remove_all().await,
        }
    }

    /// How many of the factory's jobs the batch system still shows in any
    /// state, including ones on their way out (Slurm's COMPLETING).
    pub async fn remaining(&mut self) -> anyhow::Result<usize> {
        match self {
            Backend::Slurm(b) => b.remaining().await,
            other => other.list().await.map(|j| j.len()),
        }
    }

    /// What one submission would be, for `--dry-run`.
    pub fn describe(&self, spec: &WorkerSpec) -> anyhow::Result<String> {
        match self {
            Backend::Slurm(b) => b.describe(spec),
            Backend::Condor(b) => b.describe(spec, 1),
            Backend::Local(b) => b.describe(spec),
        }
    }

    /// Where a job's output goes, to point at when it fails.
    pub fn log_hint(&self, id: &str) -> String {
        match self {
            Backend::Slurm(b) => b.log_path(id).display().to_string(),
            Backend::Condor(b) => b.log_path(id).display().to_string(),
            Backend::Local(b) => b.log_path(id).display().to_string(),
        }
    }
}

/// Runs a batch command and returns its stdout. A failure carries the
/// command's stderr, which is what tells a person why (a bad partition, an
/// unreachable controller, a memory request the cluster cannot meet).
pub async fn run_command(
    program: &str,
    args: &[String],
    stdin: Option<&[u8]>,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{program} not found on PATH: is the batch system's client installed here?")
        }
        Err(e) => return Err(e).with_context(|| format!("starting {program}")),
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .await
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("{program} did not finish in {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let detail = if stderr.trim().is_empty() {
            stdout.trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        bail!("{program} failed ({}): {detail}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{program} printed non-UTF-8 output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_command_line_is_quoted() {
        let spec = WorkerSpec {
            drover: PathBuf::from("/opt/my tools/drover"),
            master: MasterArg::Address("node1:9123".into()),
            resources: Resources {
                cores: 4,
                memory_mb: 8000,
                disk_mb: 2000,
                gpus: 1,
            },
            idle_timeout: 60,
            password_file: Some(PathBuf::from("/home/u/it's secret")),
            tls_fingerprint: None,
        };
        let line = spec.shell_command().unwrap();
        let words = shlex::split(&line).unwrap();
        assert_eq!(words[0], "/opt/my tools/drover");
        assert_eq!(&words[1..3], ["worker", "node1:9123"]);
        assert!(line.contains("--cores 4 --memory 8000 --disk 2000 --gpus 1 --idle-timeout 60"));
        assert_eq!(words.last().unwrap(), "/home/u/it's secret");
    }
}
