//! Slurm: one `sbatch` per worker, all under the factory's job name, so that
//! `squeue --name` counts exactly this factory's jobs and `scancel --name`
//! removes them.

use std::path::PathBuf;

use anyhow::Context;

use crate::batch::{path_str, run_command, Job, JobState, Submitted, WorkerSpec};

/// The Slurm backend.
pub struct Slurm {
    name: String,
    log_dir: PathBuf,
    time_limit_s: Option<u64>,
    options: Vec<String>,
}

impl Slurm {
    /// Jobs named `name`, logs in `log_dir`, `options` added to every sbatch.
    pub fn new(
        name: String,
        log_dir: PathBuf,
        time_limit_s: Option<u64>,
        options: Vec<String>,
    ) -> Slurm {
        Slurm {
            name,
            log_dir,
            time_limit_s,
            options,
        }
    }

    /// The arguments of one `sbatch`.
    pub fn sbatch_args(&self, spec: &WorkerSpec) -> anyhow::Result<Vec<String>> {
        let r = &spec.resources;
        let mut a = vec![
            "--parsable".to_string(),
            format!("--job-name={}", self.name),
            format!("--cpus-per-task={}", r.cores.max(1)),
            format!(
                "--output={}",
                path_str(&self.log_dir.join(format!("{}-%j.log", self.name)))?
            ),
        ];
        // Slurm takes no --mem=0 as "all the node's memory"; a worker that
        // offers none asks for the cluster's default instead.
        if r.memory_mb > 0 {
            a.push(format!("--mem={}M", r.memory_mb));
        }
        if r.gpus > 0 {
            a.push(format!("--gres=gpu:{}", r.gpus));
        }
        if let Some(t) = self.time_limit_s {
            a.push(format!("--time={}", slurm_time(t)));
        }
        a.extend(self.options.iter().cloned());
        // exec: scancel's SIGTERM reaches the worker itself, which then says
        // goodbye to the master instead of vanishing.
        a.push(format!("--wrap=exec {}", spec.shell_command()?));
        Ok(a)
    }

    pub(crate) async fn submit(&mut self, spec: &WorkerSpec, n: usize) -> Submitted {
        let mut ids = Vec::new();
        let args = match self.sbatch_args(spec) {
            Ok(a) => a,
            Err(error) => {
                return Submitted {
                    ids,
                    error: Some(error),
                }
            }
        };
        for _ in 0..n {
            match run_command("sbatch", &args, None).await.and_then(|out| {
                parse_sbatch(&out).with_context(|| format!("sbatch printed {:?}", out.trim()))
            }) {
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

    pub(crate) async fn list(&mut self) -> anyhow::Result<Vec<Job>> {
        Ok(parse_squeue(&self.squeue().await?))
    }

    pub(crate) async fn remaining(&mut self) -> anyhow::Result<usize> {
        Ok(self
            .squeue()
            .await?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }

    async fn squeue(&self) -> anyhow::Result<String> {
        run_command(
            "squeue",
            &[
                "--noheader".into(),
                format!("--name={}", self.name),
                "--format=%i %T".into(),
            ],
            None,
        )
        .await
    }

    pub(crate) async fn cancel_pending(&mut self, ids: &[String]) -> anyhow::Result<()> {
        // --state=PENDING makes the cancel a no-op for a job that started in
        // the meantime, so no running worker is killed by a stale decision.
        let mut args = vec!["--state=PENDING".to_string()];
        args.extend(ids.iter().cloned());
        run_command("scancel", &args, None).await.map(drop)
    }

    pub(crate) async fn remove_all(&mut self, gently: bool) -> anyhow::Result<()> {
        let name = format!("--name={}", self.name);
        if !gently {
            return run_command("scancel", &[name], None).await.map(drop);
        }
        // A plain scancel signals every process of a job, the worker's tasks
        // included, and a task killed before its worker leaves is reported
        // as failed. --batch signals only the batch shell, which is the
        // worker (exec'd); Slurm cleans up the rest when the job ends.
        let pending = run_command("scancel", &["--state=PENDING".into(), name.clone()], None).await;
        let running = run_command(
            "scancel",
            &[
                "--batch".into(),
                "--signal=TERM".into(),
                "--state=RUNNING".into(),
                name,
            ],
            None,
        )
        .await;
        pending.and(running).map(drop)
    }

    pub(crate) fn describe(&self, spec: &WorkerSpec) -> anyhow::Result<String> {
        let mut words = vec!["sbatch".to_string()];
        words.extend(self.sbatch_args(spec)?);
        shlex::try_join(words.iter().map(String::as_str)).context("quoting the sbatch command")
    }

    /// The output file of job `id`.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{id}.log", self.name))
    }
}

/// `sbatch --parsable` prints `ID` or `ID;CLUSTER`.
fn parse_sbatch(out: &str) -> anyhow::Result<String> {
    let id = out.trim().split(';').next().unwrap_or("").trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        anyhow::bail!("no job id in sbatch's output");
    }
    Ok(id.to_string())
}

/// Lines of `ID STATE`. States that end a job (COMPLETING and after) are
/// left out: their worker is gone or going.
fn parse_squeue(out: &str) -> Vec<Job> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let id = f.next()?;
            let state = match f.next()? {
                "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" => JobState::Pending,
                "RUNNING" | "CONFIGURING" | "SUSPENDED" | "RESIZING" | "SIGNALING"
                | "STAGE_OUT" => JobState::Running,
                _ => return None,
            };
            Some(Job {
                id: id.to_string(),
                state,
            })
        })
        .collect()
}

/// Seconds as Slurm's `HOURS:MM:SS`, at least one minute (Slurm's unit).
fn slurm_time(secs: u64) -> String {
    let secs = secs.max(60);
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::MasterArg;
    use drover_protocol::Resources;

    #[test]
    fn sbatch_command_has_size_name_time_and_log() {
        let s = Slurm::new(
            "drover-factory-x".into(),
            PathBuf::from("/logs"),
            Some(3725),
            vec!["--partition=debug".into()],
        );
        let spec = WorkerSpec {
            drover: PathBuf::from("/bin/drover"),
            master: MasterArg::Address("h:1".into()),
            resources: Resources {
                cores: 2,
                memory_mb: 500,
                disk_mb: 100,
                gpus: 1,
            },
            idle_timeout: 30,
            password_file: None,
            tls_fingerprint: None,
        };
        let a = s.sbatch_args(&spec).unwrap();
        for want in [
            "--job-name=drover-factory-x",
            "--cpus-per-task=2",
            "--mem=500M",
            "--gres=gpu:1",
            "--time=1:02:05",
            "--output=/logs/drover-factory-x-%j.log",
            "--partition=debug",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        let wrap = a.last().unwrap();
        assert!(wrap.starts_with("--wrap=exec /bin/drover worker h:1 --cores 2"));
        assert_eq!(
            s.log_path("17"),
            PathBuf::from("/logs/drover-factory-x-17.log")
        );
    }

    #[test]
    fn parses_sbatch_and_squeue() {
        assert_eq!(parse_sbatch("42\n").unwrap(), "42");
        assert_eq!(parse_sbatch("42;cluster\n").unwrap(), "42");
        assert!(parse_sbatch("").is_err());
        assert!(parse_sbatch("Submitted batch job 42").is_err());
        let jobs =
            parse_squeue("12 PENDING\n13 RUNNING\n14 COMPLETING\n\ngarbage\n15 CONFIGURING\n");
        assert_eq!(
            jobs,
            vec![
                Job {
                    id: "12".into(),
                    state: JobState::Pending
                },
                Job {
                    id: "13".into(),
                    state: JobState::Running
                },
                Job {
                    id: "15".into(),
                    state: JobState::Running
                },
            ]
        );
        assert_eq!(slurm_time(1), "0:01:00");
        assert_eq!(slurm_time(90_000), "25:00:00");
    }
}
