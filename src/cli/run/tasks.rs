//! Reading a task file: one shell command per line, or one JSON object.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use drover_master::{Resources, Task};
use serde::Deserialize;

/// One line of a JSON task file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TaskLine {
    command: String,
    #[serde(default)]
    cores: Option<u32>,
    #[serde(default)]
    memory: Option<u64>,
    #[serde(default)]
    disk: Option<u64>,
    #[serde(default)]
    gpus: Option<u32>,
    #[serde(default)]
    wall_time: Option<f64>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    inputs: Vec<FileLine>,
    #[serde(default)]
    outputs: Vec<FileLine>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    /// A packed environment (`drover pack create`) to run the command in.
    #[serde(default)]
    environment: Option<PathBuf>,
}

/// A file given as "name" (same local and remote name) or {"local", "remote", "cache"}.
#[derive(Deserialize)]
#[serde(untagged)]
enum FileLine {
    Same(String),
    Full {
        local: PathBuf,
        remote: String,
        #[serde(default = "yes")]
        cache: bool,
    },
}

fn yes() -> bool {
    true
}

/// A task as the file gave it: where it came from, the line itself (for
/// `failed.txt`), and what it declared it needs.
pub struct Entry {
    /// 1-based line number in the task file.
    pub line_no: usize,
    /// The line as written, without surrounding blanks.
    pub text: String,
    /// What the line declared (0 where it declared nothing).
    pub declared: Resources,
    /// The task to submit.
    pub task: Task,
}

/// Parses one non-empty, non-comment line.
pub fn parse_line(line: &str) -> anyhow::Result<(Task, Resources)> {
    if !line.starts_with('{') {
        return Ok((Task::new(line), Resources::default()));
    }
    let spec: TaskLine = serde_json::from_str(line)?;
    let declared = Resources {
        cores: spec.cores.unwrap_or(0),
        memory_mb: spec.memory.unwrap_or(0),
        disk_mb: spec.disk.unwrap_or(0),
        gpus: spec.gpus.unwrap_or(0),
    };
    let mut task = Task::new(spec.command);
    if let Some(c) = spec.cores {
        task = task.cores(c);
    }
    if let Some(m) = spec.memory {
        task = task.memory_mb(m);
    }
    if let Some(d) = spec.disk {
        task = task.disk_mb(d);
    }
    if let Some(g) = spec.gpus {
        task = task.gpus(g);
    }
    if let Some(w) = spec.wall_time {
        // try_from: 1e300 is finite and positive, but no Duration holds it.
        let limit = Duration::try_from_secs_f64(w)
            .ok()
            .filter(|d| w > 0.0 && !d.is_zero())
            .ok_or_else(|| {
                anyhow::anyhow!("wall_time must be a positive number of seconds, not {w:e}")
            })?;
        task = task.wall_time(limit);
    }
    if let Some(c) = spec.category {
        task = task.category(c);
    }
    if let Some(t) = spec.tag {
        task = task.tag(t);
    }
    if let Some(p) = spec.priority {
        task = task.priority(p);
    }
    if let Some(r) = spec.max_retries {
        task = task.max_retries(r);
    }
    for input in spec.inputs {
        task = match input {
            FileLine::Same(name) => task.input_file(&name, name.clone(), true),
            FileLine::Full {
                local,
                remote,
                cache,
            } => task.input_file(local, remote, cache),
        };
    }
    for output in spec.outputs {
        task = match output {
            FileLine::Same(name) => task.output_file(name.clone(), &name),
            FileLine::Full { local, remote, .. } => task.output_file(remote, local),
        };
    }
    for (k, v) in spec.env {
        task = task.env(k, v);
    }
    if let Some(env) = spec.environment {
        if !env.is_file() {
            bail!("environment {} does not exist", env.display());
        }
        task = task.environment(env);
    }
    Ok((task, declared))
}

/// Reads every task of a file (`-` for stdin); a bad line names the file
/// and its line number.
pub fn read_tasks(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot open task file {}", path.display()))?,
        ))
    };
    let mut tasks = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (task, declared) =
            parse_line(line).with_context(|| format!("{}:{}: bad task", path.display(), n + 1))?;
        tasks.push(Entry {
            line_no: n + 1,
            text: line.to_string(),
            declared,
            task,
        });
    }
    Ok(tasks)
}

/// Refuses, at submit, a task that asks for more than the only worker
/// there will be, instead of letting it wait for ever.
pub fn check_fits(path: &Path, tasks: &[Entry], worker: &Resources) -> anyhow::Result<()> {
    for e in tasks {
        let d = &e.declared;
        let over = [
            ("cores", u64::from(d.cores), u64::from(worker.cores), ""),
            ("memory", d.memory_mb, worker.memory_mb, " MB"),
            ("disk", d.disk_mb, worker.disk_mb, " MB"),
            ("gpus", u64::from(d.gpus), u64::from(worker.gpus), ""),
        ]
        .into_iter()
        .find(|(_, want, have, _)| want > have);
        if let Some((what, want, have, unit)) = over {
            bail!(
                "{}:{}: the task asks for {want}{unit} {what} but the local worker has {have}{unit}; \
                 give the local worker more (--{what}) or use remote workers (--workers 0 --port PORT)",
                path.display(),
                e.line_no
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_and_plain_lines() {
        assert_eq!(parse_line("echo hi").unwrap().0.command(), "echo hi");
        let (t, declared) = parse_line(r#"{"command":"wc -c a","cores":2,"tag":"t","inputs":["a"],"outputs":[{"remote":"o","local":"/tmp/o"}]}"#).unwrap();
        assert_eq!(t.command(), "wc -c a");
        assert_eq!(declared.cores, 2);
        assert!(parse_line(r#"{"command":"x","bogus":1}"#).is_err());
        assert!(parse_line(r#"{"command":"x","wall_time":-1}"#).is_err());
        assert!(parse_line(r#"{"command":"x","wall_time":1e300}"#).is_err());
        assert!(parse_line(r#"{"command":"x","wall_time":0}"#).is_err());
        assert!(parse_line(r#"{"command":"x","environment":"/nonexistent.tar.gz"}"#).is_err());
    }

    #[test]
    fn a_task_bigger_than_the_worker_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.txt");
        std::fs::write(&file, "# c\necho small\n{\"command\":\"x\",\"cores\":64}\n").unwrap();
        let tasks = read_tasks(&file).unwrap();
        assert_eq!(tasks[1].line_no, 3);
        let worker = Resources {
            cores: 2,
            memory_mb: 1000,
            disk_mb: 1000,
            gpus: 0,
        };
        let e = check_fits(&file, &tasks, &worker).unwrap_err().to_string();
        assert!(e.contains("t.txt:3:") && e.contains("64 cores"), "{e}");
        assert!(check_fits(&file, &tasks[..1], &worker).is_ok());
    }
}
