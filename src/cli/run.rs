//! `drover run FILE`: the embedded default. Runs a file of tasks on a local
//! worker (a real `drover worker` process on loopback) or on remote workers.

mod progress;
mod report;
mod tasks;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_master::{Manager, Outcome, Resources, TaskId, TaskResult};

use super::{host_port, Offer, HOST_PORT, PROJECT};
use progress::Progress;
use report::Origin;

/// Exit status after Ctrl-C, as a shell reports a command killed by SIGINT.
const INTERRUPTED_STATUS: i32 = 130;
/// How long cancelled tasks get to report back after Ctrl-C.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// Failed tasks listed one by one in the summary.
const LISTED_FAILURES: usize = 20;
/// How long the run loop lets results gather when none is ready.
const GATHER: Duration = Duration::from_millis(5);
/// Set to `0`, a worker starts no Python function server.
const FUNCTION_SERVER_VAR: &str = "DROVER_FUNCTION_SERVER";

/// Options of `drover run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The task file: one shell command per line, or JSON objects (see README). `-` reads stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Local worker processes to start; 0 waits for remote workers on --port.
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: u32,
    /// What each local worker offers.
    #[command(flatten)]
    offer: Offer,
    /// Address to listen on for workers [default: 127.0.0.1 when only local
    /// workers come (--workers N without --port), else all interfaces].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Tasks a full worker may hold waiting to start, so it starts the next
    /// one without a round trip to the master (good for short tasks); 0
    /// keeps every waiting task in the master until a core is free.
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    prefetch: u16,
    /// Serve workers over TLS with this certificate (PEM; `drover tls init`
    /// makes one). Needs --tls-key; local workers are given its fingerprint.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Port to listen on for workers (0: any free port).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    port: u16,
    /// Project name (for the catalog).
    #[arg(long, value_name = PROJECT)]
    project: Option<String>,
    /// Report to this catalog, so that `drover status` shows the run and
    /// workers started with `--project` find it (needs --project).
    #[arg(long, value_name = HOST_PORT, value_parser = host_port, requires = "project")]
    catalog: Option<String>,
    /// Seconds between reports to the catalog.
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0, value_parser = positive_seconds)]
    catalog_interval: f64,
    /// Sign catalog reports with the key in this file (a catalog started
    /// with the same --catalog-key-file drops unsigned reports).
    #[arg(long, value_name = "FILE", requires = "catalog")]
    catalog_key_file: Option<PathBuf>,
    /// Password file that workers must prove they know.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Where failed tasks' logs and `failed.txt` (their lines, to run again) are written.
    #[arg(long, value_name = "DIR", default_value = "drover-failed")]
    failed_dir: PathBuf,
    /// Print each task's stdout as it finishes.
    #[arg(long)]
    show_output: bool,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
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

fn start_local_workers(
    args: &RunArgs,
    port: u16,
    resources: &Resources,
) -> anyhow::Result<LocalWorkers> {
    let exe = std::env::current_exe().context("cannot find the drover executable")?;
    let workdir = tempfile::Builder::new()
        .prefix("drover-run-")
        .tempdir()
        .context("creating a worker directory")?;
    // Local workers reach the master where it listens: loopback unless
    // --listen named one address.
    let host = match args.listen.as_deref() {
        Some(a) if a != "0.0.0.0" && a != "::" && a.contains(':') => format!("[{a}]"),
        Some(a) if a != "0.0.0.0" && a != "::" => a.to_string(),
        _ => "127.0.0.1".to_string(),
    };
    // A local worker trusts exactly the certificate its master serves.
    let tls_pin = match &args.tls_cert {
        Some(cert) => Some(drover_worker::protocol::tls::cert_file_fingerprint(cert)?),
        None => None,
    };
    let mut children = Vec::new();
    for _ in 0..args.workers {
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg(format!("{host}:{port}"))
            .arg("--exit-on-disconnect");
        cmd.arg("--workdir").arg(workdir.path());
        cmd.arg("--idle-timeout").arg("86400");
        cmd.arg("--cores").arg(resources.cores.to_string());
        cmd.arg("--memory").arg(resources.memory_mb.to_string());
        cmd.arg("--disk").arg(resources.disk_mb.to_string());
        if let Some(p) = &args.password_file {
            cmd.arg("--password-file").arg(p);
        }
        if let Some(pin) = &tls_pin {
            cmd.arg("--tls-fingerprint").arg(pin);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        // A task file holds shell commands, never Python calls, so its
        // workers need no Python function server: starting one held each
        // worker back by a quarter of a second (the interpreter importing
        // cloudpickle) before it connected, 4% of a 10,000-task W1 run.
        if std::env::var_os(FUNCTION_SERVER_VAR).is_none() {
            cmd.env(FUNCTION_SERVER_VAR, "0");
        }
        // Its own session, so that Ctrl-C at the terminal reaches only
        // `drover run`, which then cancels the tasks cleanly (the workers
        // are killed when the run ends), and so that the worker has no
        // controlling terminal: its tasks then need only a process group of
        // their own, not a session each (see `drover_monitor::Monitor::spawn_exec`).
        // SAFETY: setsid is async-signal-safe and touches nothing of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        children.push(cmd.spawn().context("starting a local worker")?);
    }
    Ok(LocalWorkers(children, workdir))
}

/// SIGINTs received; the handler only counts, the run loop acts.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

fn catch_sigint() {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Runs `drover run`: 0 when every task succeeded, 1 when some failed, 130
/// after Ctrl-C.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let entries = tasks::read_tasks(&args.file)?;
    let local_only = args.workers > 0 && args.port == 0;
    let worker_resources = args.offer.resolve(&std::env::temp_dir(), 0);
    if local_only {
        tasks::check_fits(&args.file, &entries, &worker_resources)?;
    }
    let total = entries.len() as u64;
    let mut builder = Manager::builder()
        .port(args.port)
        .prefetch(usize::from(args.prefetch));
    match &args.listen {
        Some(addr) => builder = builder.bind(addr.as_str()),
        None if local_only => builder = builder.bind("127.0.0.1"),
        None => {}
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls(cert, key);
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
        Some(start_local_workers(
            &args,
            manager.port(),
            &worker_resources,
        )?)
    } else {
        None
    };
    report::clear_failed(&args.failed_dir);
    catch_sigint();
    let start = Instant::now();
    // Task id -> (line number, line), to name failures by where they are.
    let mut origins: HashMap<TaskId, (usize, String)> = HashMap::new();
    for e in entries {
        let id = manager
            .submit(e.task)
            .with_context(|| format!("{}:{}", args.file.display(), e.line_no))?;
        origins.insert(id, (e.line_no, e.text));
    }
    let mut progress = Progress::new(total, args.workers == 0);
    let (mut done, mut failed, mut cancelled) = (0u64, 0u64, 0u64);
    let mut failures: Vec<Failure> = Vec::new();
    let mut failed_lines: Vec<(usize, String)> = Vec::new();
    let mut cancel_deadline: Option<Instant> = None;
    while !manager.is_empty() {
        if INTERRUPTS.load(Ordering::Relaxed) > 0 && cancel_deadline.is_none() {
            progress.finish(true);
            eprintln!("drover: interrupted; cancelling the tasks not yet finished");
            for id in origins.keys() {
                manager.cancel(*id);
            }
            cancel_deadline = Some(Instant::now() + CANCEL_WAIT);
        }
        if cancel_deadline.is_some_and(|d| Instant::now() >= d)
            || INTERRUPTS.load(Ordering::Relaxed) > 1
        {
            break;
        }
        if cancel_deadline.is_none() {
            progress.poll(&manager);
        }
        let Some(result) = next_result(&manager) else {
            if cancel_deadline.is_none() {
                progress.update(done, failed);
            }
            continue;
        };
        let (line_no, text) = origins.remove(&result.id).unwrap_or_default();
        if args.show_output && !result.stdout.is_empty() {
            print!("{}", result.stdout);
        }
        match result.outcome {
            Outcome::Success => done += 1,
            Outcome::Cancelled if cancel_deadline.is_some() => cancelled += 1,
            _ => {
                failed += 1;
                let origin = Origin {
                    file: &args.file,
                    line_no,
                    text: &text,
                };
                let saved = report::save_failed(&args.failed_dir, &origin, &result).ok();
                failures.push(Failure {
                    line_no,
                    result,
                    log: saved,
                });
                failed_lines.push((line_no, text));
            }
        }
        if cancel_deadline.is_none() {
            progress.update(done, failed);
        }
    }
    let interrupted = cancel_deadline.is_some();
    progress.finish(interrupted);
    cancelled += origins.len() as u64;
    let counts = Counts {
        done,
        failed,
        cancelled,
        total,
        workers_lost: progress.workers_lost,
    };
    summarize(&args, &counts, start, &failures, &mut failed_lines);
    Ok(if interrupted {
        INTERRUPTED_STATUS
    } else if failed > 0 {
        1
    } else {
        0
    })
}

/// The next result, waiting at most half a second. When none is ready it
/// first lets results gather for [`GATHER`] and then takes them one after
/// another without blocking: blocking for each one cost a futex wake in
/// the master and a sleep and wake-up of this thread per task, while
/// the results themselves only feed counts and a progress display.
fn next_result(manager: &Manager) -> Option<TaskResult> {
    if let Some(r) = manager.wait(Some(Duration::ZERO)) {
        return Some(r);
    }
    std::thread::sleep(GATHER);
    manager.wait(Some(Duration::from_millis(500) - GATHER))
}

/// A task that did not succeed, and where it came from.
struct Failure {
    line_no: usize,
    result: TaskResult,
    log: Option<PathBuf>,
}

/// How many tasks ended which way.
struct Counts {
    done: u64,
    failed: u64,
    cancelled: u64,
    total: u64,
    workers_lost: u64,
}

/// The closing lines: counts and rate, then each failed task by file line,
/// tag and outcome, and where its log and the lines to re-run are.
fn summarize(
    args: &RunArgs,
    c: &Counts,
    start: Instant,
    failures: &[Failure],
    failed_lines: &mut [(usize, String)],
) {
    let wall = start.elapsed().as_secs_f64();
    let finished = c.done + c.failed;
    let mut extra = if c.cancelled > 0 {
        format!(", {} cancelled", c.cancelled)
    } else {
        String::new()
    };
    if c.workers_lost > 0 {
        extra.push_str(&format!(
            "; {} lost",
            progress::plural(c.workers_lost, "worker")
        ));
    }
    eprintln!(
        "drover: {} done, {} failed{extra}, {} in {wall:.1} s ({:.1} tasks/s)",
        c.done,
        c.failed,
        progress::plural(c.total, "task"),
        if wall > 0.0 {
            finished as f64 / wall
        } else {
            0.0
        }
    );
    let file = args.file.display();
    for f in failures.iter().take(LISTED_FAILURES) {
        let result = &f.result;
        let place = f
            .log
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(log not saved)".into());
        let tag = result
            .tag
            .as_deref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default();
        eprintln!(
            "drover: {file}:{}{tag}: {} ({}): {} -> {place}",
            f.line_no,
            report::outcome_words(result),
            report::measured_words(result),
            result.command,
        );
    }
    if failures.len() > LISTED_FAILURES {
        eprintln!(
            "drover: ... and {} more failed tasks in {}",
            failures.len() - LISTED_FAILURES,
            args.failed_dir.display()
        );
    }
    if !failed_lines.is_empty() {
        let mut lines: Vec<(usize, &str)> =
            failed_lines.iter().map(|(n, t)| (*n, t.as_str())).collect();
        match report::save_failed_list(&args.failed_dir, &mut lines) {
            Ok(path) => eprintln!(
                "drover: the failed lines are in {0}; run them again with: drover run {0}",
                path.display()
            ),
            Err(e) => eprintln!("drover: cannot save the failed lines: {e:#}"),
        }
    }
}
