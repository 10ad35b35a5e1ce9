//! HTCondor: a submit description per batch of workers, all under the
//! factory's `batch_name`, so that `condor_q` and `condor_rm` select exactly
//! this factory's jobs by `JobBatchName`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use tracing::warn;

use crate::batch::{path_str, run_command, Job, JobState, Submitted, WorkerSpec};

/// The HTCondor backend.
pub struct Condor {
    name: String,
    log_dir: PathBuf,
    shared_path: bool,
    time_limit_s: Option<u64>,
    options: Vec<String>,
}

impl Condor {
    /// Jobs in batch `name`, logs in `log_dir`. With `shared_path` the drover
    /// binary and the password file are read in place on the execute node
    /// (a shared filesystem); otherwise HTCondor ships them with each job.
    /// `options` are extra `key = value` lines for the description.
    pub fn new(
        name: String,
        log_dir: PathBuf,
        shared_path: bool,
        time_limit_s: Option<u64>,
        options: Vec<String>,
    ) -> Condor {
        Condor {
            name,
            log_dir,
            shared_path,
            time_limit_s,
            options,
        }
    }

    /// The submit description for `count` workers.
    pub fn describe(&self, spec: &WorkerSpec, count: usize) -> anyhow::Result<String> {
        let drover = path_str(&spec.drover)?;
        let password = spec.password_file.as_deref().map(path_str).transpose()?;
        // Shipped files land in the job's scratch directory under their own name.
        let password_arg = match password {
            Some(p) if !self.shared_path => Some(
                spec.password_file
                    .as_deref()
                    .and_then(|f| f.file_name())
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("password file {p} has no file name"))?,
            ),
            other => other,
        };
        let args = spec.args(password_arg);
        let log = |suffix: &str| -> anyhow::Result<String> {
            Ok(path_str(&self.log_dir.join(format!("{}{suffix}", self.name)))?.to_string())
        };
        let r = &spec.resources;
        let mut lines: Vec<(String, String)> = vec![
            ("universe".into(), "vanilla".into()),
            ("batch_name".into(), self.name.clone()),
            ("executable".into(), drover.to_string()),
            ("arguments".into(), condor_arguments(&args)),
            (
                "transfer_executable".into(),
                if self.shared_path { "False" } else { "True" }.into(),
            ),
            (
                "should_transfer_files".into(),
                if self.shared_path { "IF_NEEDED" } else { "YES" }.into(),
            ),
            ("when_to_transfer_output".into(), "ON_EXIT".into()),
        ];
        if let (Some(p), false) = (password, self.shared_path) {
            lines.push(("transfer_input_files".into(), p.to_string()));
        }
        lines.push(("request_cpus".into(), r.cores.max(1).to_string()));
        if r.memory_mb > 0 {
            lines.push(("request_memory".into(), r.memory_mb.to_string()));
        }
        if r.disk_mb > 0 {
            // request_disk is in KiB unless a unit is given.
            lines.push(("request_disk".into(), (r.disk_mb * 1024).to_string()));
        }
        if r.gpus > 0 {
            lines.push(("request_gpus".into(), r.gpus.to_string()));
        }
        if let Some(t) = self.time_limit_s {
            lines.push(("allowed_job_duration".into(), t.to_string()));
        }
        lines.push(("output".into(), log("-$(ClusterId).$(ProcId).out")?));
        lines.push(("error".into(), log("-$(ClusterId).$(ProcId).err")?));
        lines.push(("log".into(), log(".log")?));
        lines.push(("+DroverFactory".into(), format!("\"{}\"", self.name)));
        let mut text = format!("# drover factory {}: {count} worker(s)\n", self.name);
        for (k, v) in &lines {
            if v.contains('\n') {
                bail!("submit description value for {k} contains a newline: {v:?}");
            }
            text.push_str(&format!("{k} = {v}\n"));
        }
        for opt in &self.options {
            let opt = opt.trim();
            if !opt.is_empty() {
                text.push_str(opt);
                text.push('\n');
            }
        }
        text.push_str(&format!("queue {count}\n"));
        Ok(text)
    }

    pub(crate) async fn submit(&mut self, spec: &WorkerSpec, n: usize) -> Submitted {
        match self.submit_inner(spec, n).await {
            Ok(ids) => Submitted { ids, error: None },
            Err(error) => Submitted {
                ids: Vec::new(),
                error: Some(error),
            },
        }
    }

    async fn submit_inner(&mut self, spec: &WorkerSpec, n: usize) -> anyhow::Result<Vec<String>> {
        let description = self.describe(spec, n)?;
        let file = self.log_dir.join(format!("{}.sub", self.name));
        tokio::fs::write(&file, &description)
            .await
            .with_context(|| format!("writing {}", file.display()))?;
        let out = run_command(
            "condor_submit",
            &["-terse".into(), path_str(&file)?.to_string()],
            None,
        )
        .await?;
        parse_terse(&out).with_context(|| format!("condor_submit printed {:?}", out.trim()))
    }

    pub(crate) async fn list(&mut self) -> anyhow::Result<Vec<Job>> {
        let out = run_command(
            "condor_q",
            &[
                "-constraint".into(),
                self.constraint(),
                "-af:t".into(),
                "ClusterId".into(),
                "ProcId".into(),
                "JobStatus".into(),
                "HoldReason".into(),
            ],
            None,
        )
        .await?;
        let (jobs, held) = parse_condor_q(&out);
        // A held job never runs by itself; remove it and say why, so the
        // factory's failure backoff sees it as the failed submission it is.
        for (id, reason) in &held {
            warn!(job = %id, "HTCondor holds the job ({reason}); removing it");
        }
        if !held.is_empty() {
            let ids: Vec<String> = held.into_iter().map(|(id, _)| id).collect();
            self.remove_ids(&ids, None).await?;
        }
        Ok(jobs)
    }

    pub(crate) async fn cancel_pending(&mut self, ids: &[String]) -> anyhow::Result<()> {
        // JobStatus == 1 (idle): a job that started since is left alone.
        self.remove_ids(ids, Some("JobStatus == 1")).await
    }

    async fn remove_ids(&mut self, ids: &[String], extra: Option<&str>) -> anyhow::Result<()> {
        let mut which = Vec::new();
        for id in ids {
            let (c, p) = id
                .split_once('.')
                .with_context(|| format!("bad HTCondor job id {id:?}"))?;
            let (c, p): (u64, u64) = (c.parse()?, p.parse()?);
            which.push(format!("(ClusterId == {c} && ProcId == {p})"));
        }
        let mut constraint = format!("{} && ({})", self.constraint(), which.join(" || "));
        if let Some(e) = extra {
            constraint.push_str(&format!(" && {e}"));
        }
        run_command("condor_rm", &["-constraint".into(), constraint], None)
            .await
            .map(drop)
    }

    pub(crate) async fn remove_all(&mut self) -> anyhow::Result<()> {
        run_command(
            "condor_rm",
            &["-constraint".into(), self.constraint()],
            None,
        )
        .await
        .map(drop)
    }

    fn constraint(&self) -> String {
        format!("JobBatchName == \"{}\"", self.name)
    }

    /// The output file of job `id` (`CLUSTER.PROC`).
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{id}.out", self.name))
    }
}

/// Arguments in HTCondor's "new" syntax: the whole list in double quotes,
/// an argument with spaces or single quotes inside single quotes (a single
/// quote doubled), and every double quote doubled.
pub fn condor_arguments(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            let a = if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "''"))
            } else {
                a.clone()
            };
            a.replace('"', "\"\"")
        })
        .collect();
    format!("\"{}\"", quoted.join(" "))
}

/// `condor_submit -terse` prints `CLUSTER.FIRST - CLUSTER.LAST`.
fn parse_terse(out: &str) -> anyhow::Result<Vec<String>> {
    let line = out
        .lines()
        .find(|l| l.contains(" - "))
        .context("no job range in the output")?;
    let (first, last) = line.split_once(" - ").context("no job range")?;
    let parse = |s: &str| -> anyhow::Result<(u64, u64)> {
        let (c, p) = s.trim().split_once('.').context("no CLUSTER.PROC")?;
        Ok((c.parse()?, p.parse()?))
    };
    let ((c1, p1), (c2, p2)) = (parse(first)?, parse(last)?);
    if c1 != c2 || p2 < p1 {
        bail!("job range {first} - {last} spans clusters");
    }
    Ok((p1..=p2).map(|p| format!("{c1}.{p}")).collect())
}

/// Tab-separated `ClusterId ProcId JobStatus HoldReason` lines: the live
/// jobs, and the held ones with their reason.
fn parse_condor_q(out: &str) -> (Vec<Job>, Vec<(String, String)>) {
    let mut jobs = Vec::new();
    let mut held = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [cluster, proc_, status, rest @ ..] = f.as_slice() else {
            continue;
        };
        let id = format!("{}.{}", cluster.trim(), proc_.trim());
        // 1 idle, 2 running, 3 removed, 4 completed, 5 held,
        // 6 transferring output, 7 suspended.
        match status.trim() {
            "1" => jobs.push(Job {
                id,
                state: JobState::Pending,
            }),
            "2" | "6" | "7" => jobs.push(Job {
                id,
                state: JobState::Running,
            }),
            "5" => held.push((id, rest.first().unwrap_or(&"").trim().to_string())),
            _ => {}
        }
    }
    (jobs, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_use_the_new_syntax() {
        let a = |v: &[&str]| condor_arguments(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&["worker", "h:1"]), "\"worker h:1\"");
        assert_eq!(
            a(&["a b", "it's", "say \"x\""]),
            "\"'a b' 'it''s' 'say \"\"x\"\"'\""
        );
        assert_eq!(a(&[""]), "\"''\"");
    }

    #[test]
    fn parses_terse_and_condor_q() {
        assert_eq!(
            parse_terse("12.0 - 12.2\n").unwrap(),
            ["12.0", "12.1", "12.2"]
        );
        assert!(parse_terse("nothing").is_err());
        assert!(parse_terse("1.0 - 2.0").is_err());
        let (jobs, held) = parse_condor_q(
            "7\t0\t1\tundefined\n7\t1\t2\tundefined\n7\t2\t5\tdisk full\n7\t3\t4\tundefined\n",
        );
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].state, JobState::Pending);
        assert_eq!(jobs[1].id, "7.1");
        assert_eq!(held, vec![("7.2".to_string(), "disk full".to_string())]);
    }
}
