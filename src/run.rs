//! `drover run FILE`: the embedded default. Runs a file of tasks on a local
//! worker (a real `drover worker` process on loopback) or on remote workers.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drover_master::{Manager, Outcome, Task, TaskResult};
use serde::Deserialize;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The task file: one shell command per line, or JSON objects (see README). `-` reads stdin.
    file: PathBuf,
    /// Local worker processes to start; 0 waits for remote workers on --port.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Cores for each local worker (default: all of this machine's).
    #[arg(long)]
    cores: Option<u32>,
    /// Port to listen on for workers (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Project name (for the catalog).
    #[arg(long)]
    project: Option<String>,
    /// Report to this catalog, HOST:PORT, so that `drover status` shows the
    /// run and workers started with `--project` find it (needs --project).
    #[arg(long, value_name = "HOST:PORT", requires = "project")]
    catalog: Option<String>,
    /// Seconds between reports to the catalog.
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0, value_parser = positive_seconds)]
    catalog_interval: f64,
    /// Sign catalog reports with the key in this file (a catalog started
    /// with the same --catalog-key-file drops unsigned reports).
    #[arg(long, requires = "catalog")]
    catalog_key_file: Option<PathBuf>,
    /// Password file that workers must prove they know.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Where failed tasks' stdout and stderr are written.
    #[arg(long, default_value = "drover-failed")]
    failed_dir: PathBuf,
    /// Print each task's stdout as it finishes.
    #[arg(long)]
    show_output: bool,
}

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

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn yes() -> bool {
    true
}

fn parse_line(line: &str) -> anyhow::Result<Task> {
    if !line.starts_with('{') {
        return Ok(Task::new(line));
    }
    let spec: TaskLine = serde_json::from_str(line)?;
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
        if !(w.is_finite() && w > 0.0) {
            bail!("wall_time must be a positive number of seconds");
        }
        task = task.wall_time(Duration::from_secs_f64(w));
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
    Ok(task)
}

fn read_tasks(path: &Path) -> anyhow::Result<Vec<Task>> {
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
        tasks.push(
            parse_line(line).with_context(|| format!("{}:{}: bad task", path.display(), n + 1))?,
        );
    }
    Ok(tasks)
}

/// Local worker processes; killed on drop so none outlives the run. The
/// directory is held only so that it is removed after them.
struct LocalWorkers(Vec<Child>, #[allow(dead_code)] tempfile::TempDir);

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_local_workers(args: &RunArgs, port: u16) -> anyhow::Result<LocalWorkers> {
    let exe = std::env::current_exe().context("cannot find the drover executable")?;
    let workdir = tempfile::Builder::new()
        .prefix("drover-run-")
        .tempdir()
        .context("creating a worker directory")?;
    let mut children = Vec::new();
    for _ in 0..args.workers {
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--exit-on-disconnect");
        cmd.arg("--workdir").arg(workdir.path());
        cmd.arg("--idle-timeout").arg("86400");
        if let Some(c) = args.cores {
            cmd.arg("--cores").arg(c.to_string());
        }
        if let Some(p) = &args.password_file {
            cmd.arg("--password-file").arg(p);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        children.push(cmd.spawn().context("starting a local worker")?);
    }
    Ok(LocalWorkers(children, workdir))
}

enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { last: Instant },
}

impl Progress {
    fn new(total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                last: Instant::now(),
            }
        }
    }

    fn update(&mut self, done: u64, failed: u64, total: u64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(done + failed);
                if failed > 0 {
                    bar.set_message(format!("{failed} failed"));
                }
            }
            Progress::Lines { last } => {
                if last.elapsed() >= Duration::from_secs(5) || done + failed == total {
                    eprintln!(
                        "drover: {}/{} finished ({} failed)",
                        done + failed,
                        total,
                        failed
                    );
                    *last = Instant::now();
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn save_failed(dir: &Path, result: &TaskResult) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = dir.join(format!("task-{}", result.id));
    let mut f = std::fs::File::create(base.with_extension("log"))?;
    writeln!(f, "command: {}", result.command)?;
    writeln!(f, "outcome: {:?}", result.outcome)?;
    writeln!(
        f,
        "exit code: {:?}  signal: {:?}",
        result.exit_code, result.signal
    )?;
    if let Some(e) = &result.error {
        writeln!(f, "error: {e}")?;
    }
    writeln!(f, "host: {}", result.host.as_deref().unwrap_or("-"))?;
    writeln!(f, "--- stdout ---\n{}", result.stdout)?;
    writeln!(f, "--- stderr ---\n{}", result.stderr)?;
    Ok(base.with_extension("log"))
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let tasks = read_tasks(&args.file)?;
    let total = tasks.len() as u64;
    let mut builder = Manager::builder().port(args.port);
    if args.workers > 0 && args.port == 0 {
        builder = builder.bind("127.0.0.1");
    }
    if let Some(p) = &args.project {
        builder = builder.project(p);
    }
    if let Some(c) = &args.catalog {
        builder = builder
            .catalog(c)
            .catalog_interval(Duration::from_secs_f64(args.catalog_interval));
    }
    if let Some(k) = &args.catalog_key_file {
        builder = builder.catalog_key_file(k);
    }
    if let Some(p) = &args.password_file {
        builder = builder.password_file(p);
    }
    let manager = builder.build()?;
    if args.workers == 0 {
        eprintln!("drover: waiting for workers on port {}", manager.port());
    }
    let _workers = if args.workers > 0 {
        Some(start_local_workers(&args, manager.port())?)
    } else {
        None
    };
    let start = Instant::now();
    for task in tasks {
        manager.submit(task)?;
    }
    let mut progress = Progress::new(total);
    let (mut done, mut failed) = (0u64, 0u64);
    let mut failures: Vec<(TaskResult, Option<PathBuf>)> = Vec::new();
    while !manager.is_empty() {
        let Some(result) = manager.wait(Some(Duration::from_millis(500))) else {
            progress.update(done, failed, total);
            continue;
        };
        if args.show_output && !result.stdout.is_empty() {
            print!("{}", result.stdout);
        }
        if result.outcome == Outcome::Success {
            done += 1;
        } else {
            failed += 1;
            let saved = save_failed(&args.failed_dir, &result).ok();
            failures.push((result, saved));
        }
        progress.update(done, failed, total);
    }
    progress.finish();
    let wall = start.elapsed().as_secs_f64();
    eprintln!(
        "drover: {done} done, {failed} failed, {total} tasks in {wall:.2} s ({:.1} tasks/s)",
        if wall > 0.0 { total as f64 / wall } else { 0.0 }
    );
    for (result, saved) in failures.iter().take(20) {
        let place = saved
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(not saved)".into());
        eprintln!(
            "drover: task {} {:?} (exit {:?}): {} -> {}",
            result.id, result.outcome, result.exit_code, result.command, place
        );
    }
    if failures.len() > 20 {
        eprintln!(
            "drover: ... and {} more failed tasks in {}",
            failures.len() - 20,
            args.failed_dir.display()
        );
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_and_plain_lines() {
        assert_eq!(parse_line("echo hi").unwrap().command(), "echo hi");
        let t = parse_line(r#"{"command":"wc -c a","cores":2,"inputs":["a"],"outputs":[{"remote":"o","local":"/tmp/o"}]}"#).unwrap();
        assert_eq!(t.command(), "wc -c a");
        assert!(parse_line(r#"{"command":"x","bogus":1}"#).is_err());
        assert!(parse_line(r#"{"command":"x","wall_time":-1}"#).is_err());
    }
}
