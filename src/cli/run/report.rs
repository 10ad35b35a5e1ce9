//! What `drover run` tells the user about finished tasks: outcome words, a
//! log per failed task, and `failed.txt` to run again.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use drover_master::{Resources, TaskResult};

/// Where a task came from in the task file.
pub struct Origin<'a> {
    /// The task file as given on the command line.
    pub file: &'a Path,
    /// 1-based line number.
    pub line_no: usize,
    /// The line as written.
    pub text: &'a str,
}

/// How a task ended, in words: "exit 3", "killed by signal 9", "memory
/// limit exceeded".
pub fn outcome_words(r: &TaskResult) -> String {
    r.outcome.words(r.exit_code, r.signal)
}

/// "1 core, 100 MB memory, 50 MB disk" (parts that are 0 left out).
pub fn resources_words(r: &Resources) -> String {
    if r.is_zero() {
        return "nothing declared".into();
    }
    r.to_string()
}

/// An attempt's ending as the master wrote it, except that the last one,
/// which the master gives as its outcome's debug form, reads as words.
fn ending_words(r: &TaskResult, ending: &str) -> String {
    if ending == format!("{:?}", r.outcome) {
        outcome_words(r)
    } else {
        ending.to_string()
    }
}

/// What was measured and how many tries it took, for the summary line.
pub fn measured_words(r: &TaskResult) -> String {
    let attempts = r.attempts.len().max(1);
    format!(
        "{:.0} MB, {:.1} s, {attempts} attempt{}",
        r.measured.memory_mb,
        r.measured.wall_time_s,
        if attempts == 1 { "" } else { "s" }
    )
}

fn seconds_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The log of one failed task, as written to `drover-failed/line-N.log`.
pub fn failure_log(origin: &Origin<'_>, r: &TaskResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "task:      {}:{}", origin.file.display(), origin.line_no);
    let _ = writeln!(s, "line:      {}", origin.text);
    let _ = writeln!(s, "command:   {}", r.command);
    if let Some(tag) = &r.tag {
        let _ = writeln!(s, "tag:       {tag}");
    }
    let _ = writeln!(s, "category:  {}", r.category);
    let _ = writeln!(s, "outcome:   {}", outcome_words(r));
    if let Some(e) = &r.error {
        let _ = writeln!(s, "error:     {e}");
    }
    let _ = writeln!(s, "host:      {}", r.host.as_deref().unwrap_or("-"));
    let queued = r
        .started
        .map(|st| seconds_between(r.submitted, st))
        .unwrap_or_else(|| seconds_between(r.submitted, r.finished));
    let _ = writeln!(
        s,
        "times:     waited {queued:.1} s, ran {:.1} s (cpu {:.1} s)",
        r.measured.wall_time_s, r.measured.cpu_time_s
    );
    let _ = writeln!(s, "allocated: {}", resources_words(&r.allocated));
    let _ = writeln!(
        s,
        "measured:  {:.0} MB memory, {:.0} MB disk, {:.2} cores on average",
        r.measured.memory_mb, r.measured.disk_mb, r.measured.cores
    );
    for (i, a) in r.attempts.iter().enumerate() {
        let _ = writeln!(
            s,
            "attempt {}: on {} with {}: {}",
            i + 1,
            a.host,
            resources_words(&a.allocation),
            ending_words(r, &a.ending)
        );
    }
    let _ = writeln!(s, "--- stdout ---\n{}", r.stdout);
    let _ = writeln!(s, "--- stderr ---\n{}", r.stderr);
    s
}

/// Writes the log of one failed task; returns its path.
pub fn save_failed(dir: &Path, origin: &Origin<'_>, r: &TaskResult) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("line-{}.log", origin.line_no));
    std::fs::write(&path, failure_log(origin, r))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Clears what a previous run left in the failed directory, so nothing in it
/// describes another run.
pub fn clear_failed(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == FAILED_LIST || (name.starts_with("line-") && name.ends_with(".log")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Name of the file holding the failed lines, ready to run again.
pub const FAILED_LIST: &str = "failed.txt";

/// Writes the failed tasks' lines verbatim, in file order.
pub fn save_failed_list(dir: &Path, lines: &mut [(usize, &str)]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lines.sort_unstable_by_key(|(n, _)| *n);
    let path = dir.join(FAILED_LIST);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?,
    );
    for (_, text) in lines.iter() {
        writeln!(f, "{text}")?;
    }
    f.flush()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_master::Outcome;

    #[test]
    fn outcomes_read_as_words() {
        let mut r = TaskResult {
            id: 1,
            tag: None,
            category: "default".into(),
            command: "sh -c 'exit 3'".into(),
            outcome: Outcome::Failed,
            exit_code: Some(3),
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            error: None,
            allocated: Resources::default(),
            measured: Default::default(),
            submitted: SystemTime::UNIX_EPOCH,
            started: None,
            finished: SystemTime::UNIX_EPOCH,
            host: None,
            attempts: Vec::new(),
            call_result: None,
        };
        r.attempts.push(drover_master::Attempt {
            host: "vm".into(),
            allocation: Resources::default(),
            ending: r#"ResourceExhausted { resource: "memory" }"#.into(),
        });
        assert_eq!(outcome_words(&r), "exit 3");
        r.exit_code = None;
        r.signal = Some(9);
        assert_eq!(outcome_words(&r), "killed by signal 9");
        r.outcome = Outcome::ResourceExhausted {
            resource: "memory".into(),
        };
        assert_eq!(outcome_words(&r), "memory limit exceeded");
        let log = failure_log(
            &Origin {
                file: Path::new("t.txt"),
                line_no: 7,
                text: "x",
            },
            &r,
        );
        assert!(log.starts_with("task:      t.txt:7\n"), "{log}");
        assert!(
            log.contains("attempt 1: on vm with nothing declared: memory limit exceeded"),
            "{log}"
        );
        assert!(!log.contains("Some(") && !log.contains('{'), "{log}");
    }
}
