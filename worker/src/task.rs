//! One task, start to end, as separate steps: prepare (sandbox, inputs,
//! environment), launch (the command under the monitor), supervise (wall
//! time, cancel, growth), report (what it used, how it ended, its outputs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_monitor::{BaseEnv, Exec, Limits, Monitor, Report, SpawnOptions};
use drover_protocol::{
    self as protocol, Ending, LimitHit, Measured, OutputHeader, Resources, RunTask, TaskReport,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::env::{EnvError, Environments};
use crate::exec::Running;
use crate::functions;
use crate::growth;
use crate::sandbox::{self, InputError};
use crate::session::TaskEvent;
use crate::slots;
use crate::transfer::{Finished, Outgoing};

/// What the session tells a running task.
pub(crate) enum Control {
    /// Cancel (or the master is gone).
    Kill,
    /// Frozen over its memory allocation: go on with this allocation.
    Grow(Resources),
    /// Frozen over its memory allocation: end as over it.
    Refuse,
}

pub(crate) struct TaskContext {
    pub(crate) task_dir: PathBuf,
    /// A reused slot's open (and empty) stdout and stderr; the sandbox
    /// exists then too.
    pub(crate) output_files: Option<(std::fs::File, std::fs::File)>,
    pub(crate) cache: PathBuf,
    pub(crate) transfer: PathBuf,
    pub(crate) gpus: Vec<u32>,
    pub(crate) monitor: Monitor,
    pub(crate) envs: Arc<Environments>,
    /// For a growable task's requests for more memory.
    pub(crate) to_master: mpsc::UnboundedSender<Outgoing>,
    /// For word that its process exited, ahead of its report.
    pub(crate) to_session: mpsc::UnboundedSender<TaskEvent>,
}

impl TaskContext {
    /// Tells the session that `task`'s process exited, and lets it run
    /// (it may start a task sent ahead in the room this one held) before
    /// this task's final accounting takes the thread.
    pub(crate) async fn root_exited(&self, task: &RunTask) {
        let exited = TaskEvent::Exited {
            task_id: task.task_id,
            attempt: task.attempt,
        };
        if self.to_session.send(exited).is_ok() {
            tokio::task::yield_now().await;
        }
    }

    /// What goes back to the session for a task that ended with `report`.
    pub(crate) fn finished(
        &self,
        task: &RunTask,
        report: TaskReport,
        outputs: Vec<(OutputHeader, PathBuf)>,
        output_files: Option<(std::fs::File, std::fs::File)>,
    ) -> Finished {
        Finished {
            report,
            outputs,
            task_dir: self.task_dir.clone(),
            output_files,
            allocation: task.allocation,
            gpus: self.gpus.clone(),
            sandbox_empty: false,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs one task to its end and says how it went. Never fails: whatever
/// goes wrong is in the report.
pub(crate) async fn run_task(
    mut task: RunTask,
    mut ctx: TaskContext,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Finished {
    if task.call.is_some() {
        match functions::client() {
            // A packaged environment has its own Python, which the
            // worker's server is not.
            Some(client) if task.environment.is_none() => {
                return crate::call::run_call(task, ctx, control, client).await;
            }
            _ => crate::call::as_command(&mut task),
        }
    }
    let mut report =
        TaskReport::never_started(task.task_id, task.attempt, Ending::SetupFailed, now_ms());
    let ready = match prepare(&task, &mut ctx, &mut control).await {
        Ok(ready) => ready,
        Err(NotStarted { ending, error }) => {
            report.ending = ending;
            report.error = error;
            return ctx.finished(&task, report, Vec::new(), None);
        }
    };
    if let Some(call) = &task.call {
        if let Err(e) = crate::call::write_payload(&ready.sandbox, call) {
            report.error = Some(e);
            return ctx.finished(&task, report, Vec::new(), None);
        }
    }
    let (child, output_files) = match launch(&task, &ctx, ready) {
        Ok(started) => {
            // `started` is when the command's process started, not when
            // its sandbox and inputs were being made ready.
            report.started_ms = now_ms();
            started
        }
        Err(e) => {
            report.error = Some(format!("{}: {e}", drover_protocol::messages::CANNOT_START));
            return ctx.finished(&task, report, Vec::new(), None);
        }
    };
    let ending = supervise(&task, &child, &mut control).await;
    ctx.root_exited(&task).await;
    let run = child.finish().await;
    let sandbox_empty = matches!(&run, Ok(r) if r.sandbox_empty == Some(true));
    let outputs = describe(&task, &ctx, &mut report, ending, run, &output_files).await;
    if task.call.is_some() {
        crate::call::read_result(&ctx.task_dir.join(slots::SANDBOX), &mut report);
    }
    let mut finished = ctx.finished(&task, report, outputs, Some(output_files));
    finished.sandbox_empty = sandbox_empty;
    finished
}

/// Why a task ended before its command started.
pub(crate) struct NotStarted {
    pub(crate) ending: Ending,
    pub(crate) error: Option<String>,
}

impl NotStarted {
    fn because(ending: Ending, error: String) -> NotStarted {
        NotStarted {
            ending,
            error: Some(error),
        }
    }
}

/// A task ready to launch: its sandbox in place, its environment's
/// variables, and the slot's open output files when it came with them.
pub(crate) struct Ready {
    pub(crate) sandbox: PathBuf,
    activation: Vec<(String, String)>,
    pub(crate) output_files: Option<(std::fs::File, std::fs::File)>,
}

/// Makes the sandbox (on the blocking pool), places the inputs and readies
/// the environment. A cancel while an environment unpacks ends it here.
pub(crate) async fn prepare(
    task: &RunTask,
    ctx: &mut TaskContext,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<Ready, NotStarted> {
    let sandbox = ctx.task_dir.join(slots::SANDBOX);
    // A slot that comes with its output files open has its sandbox too.
    let output_files = ctx.output_files.take();
    let exists = output_files.is_some();
    if !exists || !task.inputs.is_empty() {
        let (dir, inputs) = (sandbox.clone(), task.inputs.clone());
        let (cache, transfer) = (ctx.cache.clone(), ctx.transfer.clone());
        let placed = tokio::task::spawn_blocking(move || {
            sandbox::prepare(&dir, exists, &inputs, &cache, &transfer)
        })
        .await
        .unwrap_or_else(|e| Err(InputError::Setup(format!("preparing the sandbox: {e}"))));
        match placed {
            Ok(()) => {}
            Err(InputError::Missing(msg)) => {
                return Err(NotStarted::because(Ending::InputMissing, msg))
            }
            Err(InputError::Setup(msg)) => {
                return Err(NotStarted::because(Ending::SetupFailed, msg))
            }
        }
    }
    // After the inputs, so that a task whose environment cannot be had
    // costs no unpack when its inputs are missing anyway.
    let activation = match &task.environment {
        Some(file_id) => match tokio::select! {
            r = activate(&ctx.envs, file_id, &task.env) => r,
            // A cancel need not wait for a large unpack; one left running
            // still completes for the next task that needs it. Nothing
            // but a kill can come before the task runs.
            _ = control.recv() => {
                return Err(NotStarted { ending: Ending::Killed, error: None });
            }
        } {
            Ok(vars) => vars,
            Err(EnvError::Missing(msg)) => {
                return Err(NotStarted::because(Ending::InputMissing, msg))
            }
            Err(EnvError::Setup(msg)) => {
                warn!("task {}: {msg}", task.task_id);
                return Err(NotStarted::because(Ending::SetupFailed, msg));
            }
        },
        None => Vec::new(),
    };
    Ok(Ready {
        sandbox,
        activation,
        output_files,
    })
}

/// The task's wall-time limit, if it has a usable one.
fn wall_limit(task: &RunTask) -> Option<Duration> {
    // From the wire: one too large for a Duration (1e300) means no limit
    // rather than a panic that would leak the task's slot.
    task.wall_time_s
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// Starts the command under the worker's monitor with the task's limits and
/// environment; returns it with the output files it writes to, kept open
/// (the task gets duplicates) to be read back without a second open.
pub(crate) fn task_limits(task: &RunTask) -> Limits {
    let positive = |mb: u64| (task.enforce_limits && mb > 0).then_some(mb);
    Limits {
        memory_mb: positive(task.allocation.memory_mb),
        disk_mb: positive(task.allocation.disk_mb),
        wall_time: wall_limit(task),
        // Cores stay advisory (CORES, OMP_NUM_THREADS): the scheduler
        // already keeps the sum of allocations within the worker.
        cores: None,
    }
}

fn launch(
    task: &RunTask,
    ctx: &TaskContext,
    ready: Ready,
) -> std::io::Result<(Running, (std::fs::File, std::fs::File))> {
    let Ready {
        sandbox,
        activation,
        output_files,
    } = ready;
    let limits = task_limits(task);
    // `sh -c` semantics; a plain `prog args` skips starting the shell.
    let mut cmd = Exec::shell_in(&task.command, worker_env());
    cmd.current_dir(&sandbox);
    cmd.stdin(dev_null()?);
    // No O_TRUNC: a slot's output files are empty or absent (see
    // `slots`), and truncating an existing file costs a journal entry.
    let output = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(ctx.task_dir.join(name))
    };
    let (stdout, stderr) = match output_files {
        Some(files) => files,
        None => (output(slots::STDOUT)?, output(slots::STDERR)?),
    };
    cmd.stdout(stdout.try_clone()?);
    cmd.stderr(stderr.try_clone()?);
    cmd.env("DROVER_TASK_ID", task.task_id.to_string());
    cmd.env("DROVER_SANDBOX", &sandbox);
    let cores = task.allocation.cores.max(1).to_string();
    cmd.env("CORES", &cores);
    cmd.env("OMP_NUM_THREADS", &cores);
    if task.allocation.gpus > 0 {
        let ids: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    for (k, v) in &task.env {
        cmd.env(k, v);
    }
    // Last, so the environment's PATH (which already includes the
    // task's own PATH after its bin) wins.
    for (k, v) in &activation {
        cmd.env(k, v);
    }
    // Its stdout and stderr count against its disk like any file it
    // writes; measured through descriptors, they cost the monitor no walk
    // of the task directory.
    let opts = SpawnOptions {
        on_memory_limit: growth::ask_hook(task, limits.memory_mb.is_some(), &ctx.to_master),
        disk_files: vec![stdout.try_clone()?, stderr.try_clone()?],
        ..SpawnOptions::default()
    };
    let child = Running::spawn(&ctx.monitor, cmd, &sandbox, limits, opts)?;
    Ok((child, (stdout, stderr)))
}

/// Waits for the task to end, killing it past its wall time or on a
/// cancel, and passing growth answers to its monitor meanwhile.
pub(crate) async fn supervise(
    task: &RunTask,
    child: &Running,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Ending {
    let wall_limit = wall_limit(task);
    let deadline = async {
        match wall_limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut ending = Ending::Exited;
    tokio::pin!(deadline);
    let exited = loop {
        tokio::select! {
            r = child.exited() => break r,
            _ = &mut deadline, if ending == Ending::Exited => {
                ending = Ending::WallTime;
                child.kill();
            }
            c = control.recv(), if ending == Ending::Exited => match c {
                // A dropped sender (lost connection) also means kill.
                None | Some(Control::Kill) => {
                    ending = Ending::Killed;
                    child.kill();
                }
                Some(Control::Grow(allocation)) => growth::answer(child, Some(allocation)),
                Some(Control::Refuse) => growth::answer(child, None),
            }
        }
    };
    if let Err(e) = exited {
        // Without the exit notification, end the tree rather than wait
        // on it blind; finishing then reaps it.
        child.kill();
        warn!("task {}: waiting for its exit: {e}", task.task_id);
    }
    ending
}

/// Fills `report` with how the task ended and what it used, reads its
/// captured output, and checks its declared outputs (on the blocking pool).
pub(crate) async fn describe(
    task: &RunTask,
    ctx: &TaskContext,
    report: &mut TaskReport,
    mut ending: Ending,
    run: std::io::Result<Report>,
    (stdout, stderr): &(std::fs::File, std::fs::File),
) -> Vec<(OutputHeader, PathBuf)> {
    match run {
        Ok(run) => {
            let summary = &run.summary;
            match run.exit {
                drover_monitor::Exit::Code(c) => report.exit_code = Some(c),
                drover_monitor::Exit::Signal(s) => report.signal = Some(s),
            }
            report.measured = Measured {
                wall_time_s: summary.wall_time,
                cpu_time_s: summary.cpu_time,
                memory_mb: summary.memory,
                disk_mb: summary.disk,
                cores: summary.cores_avg,
                summary: serde_json::to_value(summary).ok(),
            };
            ending = limit_hit(task, report, summary, ending);
        }
        Err(e) => report.error = Some(format!("waiting for the task: {e}")),
    }
    report.ending = ending;
    // At most the output cap each, just written, from the page cache: a
    // hop to the blocking pool would cost more than the read.
    report.stdout = read_capped(stdout);
    report.stderr = read_capped(stderr);
    if task.outputs.is_empty() {
        return Vec::new();
    }
    let (sandbox, names) = (ctx.task_dir.join(slots::SANDBOX), task.outputs.clone());
    let outputs = tokio::task::spawn_blocking(move || sandbox::collect_outputs(&sandbox, &names))
        .await
        .unwrap_or_else(|e| {
            let why = format!("checking outputs: {e}");
            sandbox::Outputs {
                found: Vec::new(),
                missing: task
                    .outputs
                    .iter()
                    .map(|n| (n.clone(), why.clone()))
                    .collect(),
            }
        });
    for (name, msg) in outputs.missing {
        debug!("task {}: {msg}", task.task_id);
        report.missing_outputs.push(name);
        if report.error.is_none() && msg.contains("escapes") {
            report.error = Some(msg);
        }
    }
    outputs.found
}

/// How a limit the task went over shows in its report; returns the ending.
fn limit_hit(
    task: &RunTask,
    report: &mut TaskReport,
    summary: &drover_monitor::Summary,
    ending: Ending,
) -> Ending {
    match (&summary.limits_exceeded, ending) {
        // A cancel stays a cancel even if a limit was hit meanwhile.
        (_, Ending::Killed) => ending,
        (Some(hit), _) => {
            let unit = if hit.resource == "wall_time" {
                "s"
            } else {
                "MB"
            };
            report.error = Some(format!(
                "{} went over its limit: {:.1} {unit} used, {:.1} {unit} allowed",
                hit.resource, hit.value, hit.limit
            ));
            report.limit_exceeded = Some(LimitHit {
                resource: hit.resource.clone(),
                limit: hit.limit,
                value: hit.value,
            });
            if hit.resource == "wall_time" {
                Ending::WallTime
            } else {
                Ending::LimitExceeded
            }
        }
        (None, Ending::WallTime) => {
            report.limit_exceeded = Some(LimitHit {
                resource: "wall_time".into(),
                limit: wall_limit(task).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                value: summary.wall_time,
            });
            ending
        }
        // Out of memory without our limit (the kernel's OOM killer,
        // an outside cgroup cap): the master's memory exhaustion, so
        // it retries with more memory rather than failing the task.
        (None, Ending::Exited) if report.exit_code != Some(0) => {
            let Some(oom) = &summary.memory_exhausted else {
                return ending;
            };
            report.error = Some(format!("ran out of memory: {}", oom.evidence));
            report.limit_exceeded = Some(LimitHit {
                resource: "memory".into(),
                limit: task.allocation.memory_mb as f64,
                value: oom.memory,
            });
            Ending::LimitExceeded
        }
        (None, _) => ending,
    }
}

/// Makes the task's environment ready and returns the variables that
/// activate it, with the task's own `PATH` (or the worker's) after the
/// environment's `bin`.
async fn activate(
    envs: &Environments,
    file_id: &str,
    task_env: &[(String, String)],
) -> Result<Vec<(String, String)>, EnvError> {
    let root = envs.ensure(file_id).await?;
    let path = match task_env.iter().rev().find(|(k, _)| k == "PATH") {
        Some((_, v)) => v.clone(),
        None => std::env::var("PATH").unwrap_or_default(),
    };
    drover_packager::activation_env(&root, &path)
        .map_err(|e| EnvError::Setup(format!("environment {file_id} cannot be activated: {e:#}")))
}

/// The worker's environment, which every task starts from, taken once:
/// the worker never changes its own.
fn worker_env() -> BaseEnv {
    static ENV: std::sync::OnceLock<BaseEnv> = std::sync::OnceLock::new();
    ENV.get_or_init(BaseEnv::current).clone()
}

/// A duplicate of one `/dev/null` kept open for the worker's life: a dup
/// is cheaper than an open, once per task.
pub(crate) fn dev_null() -> std::io::Result<std::fs::File> {
    static DEV_NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    match DEV_NULL.get() {
        Some(f) => f.try_clone(),
        None => {
            let f = std::fs::File::open("/dev/null")?;
            let dup = f.try_clone()?;
            let _ = DEV_NULL.set(f);
            Ok(dup)
        }
    }
}

/// A task's output, from the worker's own descriptor of the file (read at
/// explicit offsets: the task's duplicate shares the file position).
fn read_capped(file: &std::fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    if len == 0 {
        return String::new();
    }
    if len <= protocol::OUTPUT_CAP_BYTES {
        let mut bytes = vec![0u8; len];
        return match file.read_exact_at(&mut bytes, 0) {
            Ok(()) => protocol::cap_output(&bytes),
            Err(_) => String::new(),
        };
    }
    let half = protocol::OUTPUT_CAP_BYTES / 2;
    let mut head = vec![0u8; half];
    let mut tail = vec![0u8; half];
    let ok = file.read_exact_at(&mut head, 0).is_ok()
        && file.read_exact_at(&mut tail, (len - half) as u64).is_ok();
    if !ok {
        return String::new();
    }
    format!(
        "{}\n[drover: {} bytes omitted]\n{}",
        String::from_utf8_lossy(&head),
        len - 2 * half,
        String::from_utf8_lossy(&tail)
    )
}

#[cfg(test)]
mod wall_limit_tests {
    use super::*;

    /// Issue 19: a wall time of 1e300 from the master panicked the worker
    /// and leaked the task's slot; now it is no limit, and nonsense is none.
    #[test]
    fn a_wall_time_from_the_wire_never_panics() {
        let task = |s: Option<f64>| RunTask {
            wall_time_s: s,
            ..serde_json::from_value(serde_json::json!({
                "task_id": 1, "attempt": 1, "command": "true",
                "allocation": {"cores": 1, "memory_mb": 0, "disk_mb": 0, "gpus": 0}
            }))
            .expect("a minimal run message")
        };
        assert_eq!(wall_limit(&task(Some(1e300))), None);
        assert_eq!(wall_limit(&task(Some(f64::NAN))), None);
        assert_eq!(wall_limit(&task(Some(-1.0))), None);
        assert_eq!(
            wall_limit(&task(Some(2.5))),
            Some(Duration::from_millis(2500))
        );
    }
}
