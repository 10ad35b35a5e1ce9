//! Local: worker processes on this machine, for tests and for one big node.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tracing::warn;

use crate::batch::{Job, JobState, Submitted, WorkerSpec};

/// How long a worker gets to leave after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The local backend: each "job" is a `drover worker` child process.
pub struct Local {
    name: String,
    log_dir: PathBuf,
    next: u64,
    children: Vec<(String, Child)>,
}

impl Local {
    /// Workers named `name-N`, their output in `log_dir`.
    pub fn new(name: String, log_dir: PathBuf) -> Local {
        Local {
            name,
            log_dir,
            next: 0,
            children: Vec::new(),
        }
    }

    pub(crate) fn submit(&mut self, spec: &WorkerSpec, n: usize) -> Submitted {
        let mut ids = Vec::new();
        for _ in 0..n {
            match self.spawn(spec) {
                Ok(id) => ids.push(id),
                Err(error) => {
                    return Submitted {
                        ids,
                        error: Some(error),
                    }
                }
            }
        }
        Submitted { ids, error: None }
    }

    fn spawn(&mut self, spec: &WorkerSpec) -> anyhow::Result<String> {
        let id = format!("local-{}", self.next);
        let log = self.log_path(&id);
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let password = spec
            .password_file
            .as_deref()
            .map(crate::batch::path_str)
            .transpose()?;
        let child = Command::new(&spec.drover)
            .args(spec.args(password))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for the factory reaches
            // the workers through the factory's cleanup, in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", spec.drover.display()))?;
        self.next += 1;
        self.children.push((id.clone(), child));
        Ok(id)
    }

    pub(crate) fn list(&mut self) -> anyhow::Result<Vec<Job>> {
        self.children
            .retain_mut(|(id, child)| match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    if !status.success() {
                        warn!(worker = %id, "local worker exited with {status}");
                    }
                    false
                }
                Err(e) => {
                    warn!(worker = %id, "cannot check local worker: {e}");
                    true
                }
            });
        Ok(self
            .children
            .iter()
            .map(|(id, _)| Job {
                id: id.clone(),
                state: JobState::Running,
            })
            .collect())
    }

    pub(crate) async fn remove_all(&mut self) -> anyhow::Result<()> {
        for (_, child) in &self.children {
            if let Some(pid) = child.id() {
                // SAFETY: plain syscall on our own child's pid, which is not
                // reaped yet (we hold its handle), so it cannot be reused.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for (id, mut child) in self.children.drain(..) {
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                warn!(worker = %id, "local worker ignored SIGTERM for {STOP_GRACE:?}; killing it");
                let _ = child.kill().await;
            }
        }
        Ok(())
    }

    pub(crate) fn describe(&self, spec: &WorkerSpec) -> anyhow::Result<String> {
        spec.shell_command()
    }

    /// The output file of worker `id`.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{id}.log", self.name))
    }
}
