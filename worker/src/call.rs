//! A Python function call ([`drover_protocol::FunctionCall`]) as a task:
//! handed to the worker's function server. A call without files runs on
//! one of the server's long-lived call runners, which measures it by
//! differences while the server holds it to its memory limit (no fork per
//! call: the common case's speed; see [`on_runner`]). A call with files
//! gets a child forked for it, which the monitor adopts as the task's
//! process (in its own cgroup where there is one) and which runs in the
//! task's sandbox. No shell. Where the worker has no server, the call runs
//! `remote.py` in a new interpreter as a command task ([`as_command`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use drover_monitor::SpawnOptions;
use drover_protocol::messages::FUNCTION_SERVER_LOST;
use drover_protocol::{
    cap_output, Ending, FunctionCall, LimitHit, RunTask, TaskReport, WorkerMsg, CALL_FILE,
};
use tokio::sync::mpsc;

use crate::exec::Running;
use crate::functions::{Client, Done, Event, Request};
use crate::growth;
use crate::task::{
    describe, dev_null, now_ms, prepare, supervise, task_limits, Control, NotStarted, TaskContext,
};
use crate::transfer::{Finished, Outgoing};

const MIB: f64 = 1024.0 * 1024.0;

/// Where a call run in its own interpreter leaves its pickled outcome.
const RESULT_FILE: &str = ".drover-result.pkl";

/// Puts a call's pickled outcome in its report. One too big for the
/// report's frame is taken out again by the writer and sent after the
/// report as a body of its own (`transfer::write_loop`).
fn set_call_result(report: &mut TaskReport, raised: bool, result: Vec<u8>) {
    report.call_raised = raised;
    report.call_result = Some(result);
}

/// Runs `task`'s call through the function server behind `client`.
pub(crate) async fn run_call(
    task: RunTask,
    mut ctx: TaskContext,
    mut control: mpsc::UnboundedReceiver<Control>,
    client: Arc<Client>,
) -> Finished {
    let mut report =
        TaskReport::never_started(task.task_id, task.attempt, Ending::SetupFailed, now_ms());
    let Some(call) = task.call.as_ref() else {
        report.error = Some("not a function call".into());
        return ctx.finished(&task, report, Vec::new(), None);
    };
    let has_files = !task.inputs.is_empty() || !task.outputs.is_empty();
    let (cwd, slot_files) = if has_files {
        match prepare(&task, &mut ctx, &mut control).await {
            Ok(ready) => (Some(ready.sandbox), ready.output_files),
            Err(NotStarted { ending, error }) => {
                report.ending = ending;
                report.error = error;
                return ctx.finished(&task, report, Vec::new(), None);
            }
        }
    } else {
        // Untouched, so the slot keeps them for its next task.
        (None, ctx.output_files.take())
    };
    let limits = task_limits(&task);
    // Without files there is no sandbox, so no disk to limit.
    if !has_files && runners_on() {
        return on_runner(task, ctx, control, client, report, slot_files).await;
    }
    let reserved = (monitored() || has_files).then(|| ctx.monitor.reserve(&limits));
    let sent = client.call(&Request {
        cwd: cwd.as_deref(),
        cgroup_procs: reserved.as_ref().and_then(|r| r.cgroup_procs()),
        modules: &call.modules,
        env: &task.env,
        payload: &call.payload,
    });
    let start = (Instant::now(), epoch_now());
    let (id, mut events) = match sent {
        Ok(sent) => sent,
        Err(e) => {
            report.error = Some(server_lost(format_args!("handing it the call: {e}")));
            return ctx.finished(&task, report, Vec::new(), slot_files);
        }
    };
    let pid = match events.recv().await {
        Some(Event::Started(pid)) => pid,
        other => {
            client.forget(id);
            report.error = Some(match other {
                None | Some(Event::Lost) => server_lost(format_args!("before the call started")),
                Some(e) => format!("the function server did not start the call ({e:?})"),
            });
            return ctx.finished(&task, report, Vec::new(), slot_files);
        }
    };
    let Some(reserved) = reserved else {
        return unwatched(task, ctx, client, id, events, report, slot_files).await;
    };
    let opts = SpawnOptions {
        on_memory_limit: growth::ask_hook(&task, limits.memory_mb.is_some(), &ctx.to_master),
        ..SpawnOptions::default()
    };
    let sandbox = has_files.then_some(ctx.task_dir.as_path());
    let watched = reserved
        .adopt(pid, "python call".into(), start, sandbox, limits, opts)
        .and_then(Running::watch);
    let running = match watched {
        Ok(r) => r,
        Err(e) => {
            // Not watched, so not run: the server ends it.
            let _ = client.kill(id);
            let _ = wait_done(&mut events).await;
            report.error = Some(format!("watching the call's process {pid}: {e}"));
            return ctx.finished(&task, report, Vec::new(), slot_files);
        }
    };
    report.started_ms = now_ms();
    let mut done = None;
    let ending = match client.adopted(id) {
        Ok(()) => tokio::select! {
            ending = supervise(&task, &running, &mut control) => Some(ending),
            () = until_lost(&mut events, &mut done) => None,
        },
        Err(_) => None,
    };
    if ending.is_some() {
        ctx.root_exited(&task).await;
    }
    if ending.is_some() && done.is_none() {
        done = wait_done(&mut events).await;
    }
    let run = match &done {
        Some(d) => running.finish_adopted(d.status, d.cpu, d.maxrss).await,
        None => {
            // The server died holding the call: its result cannot come
            // back, so it is ended here and run again by the master.
            running.kill();
            let killed = running.finish_adopted(libc::SIGKILL, 0.0, 0).await;
            match ending {
                None | Some(Ending::Exited) => {
                    report.error = Some(server_lost(format_args!("while the call ran")));
                    return ctx.finished(&task, report, Vec::new(), slot_files);
                }
                Some(_) => killed,
            }
        }
    };
    // Set whenever the call was supervised to its end.
    let ending = ending.unwrap_or(Ending::Exited);
    let outputs = match (dev_null(), dev_null()) {
        (Ok(a), Ok(b)) => describe(&task, &ctx, &mut report, ending, run, &(a, b)).await,
        (Err(e), _) | (_, Err(e)) => {
            report.error = Some(format!("opening /dev/null: {e}"));
            Vec::new()
        }
    };
    if let Some(outcome) = done.and_then(|d| d.outcome) {
        report.stdout = cap_output(&outcome.stdout);
        report.stderr = cap_output(&outcome.stderr);
        if report.ending == Ending::Exited {
            set_call_result(&mut report, outcome.raised, outcome.result);
        }
    }
    ctx.finished(&task, report, outputs, slot_files)
}

/// Whether calls are watched by the monitor: `DROVER_CALL_MONITOR=0` turns
/// it off, to measure what watching costs per call (benches only: the
/// call is then neither measured nor limited).
fn monitored() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DROVER_CALL_MONITOR").map_or(true, |v| v != "0"))
}

/// Whether calls without files run on call runners: `DROVER_CALL_RUNNERS=0`
/// forks every call instead (to compare the two in one build).
fn runners_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DROVER_CALL_RUNNERS").map_or(true, |v| v != "0"))
}

/// Runs a call without files on one of the server's call runners, which
/// measures it by differences. The server
/// samples the runner's resident set against the call's memory limit: over
/// it, a call that may grow is stopped while the master is asked for more,
/// any other is killed; a call that ended over it (between samples) is
/// over it too unless it may grow. Either way the call ends as over its
/// limit, and its category retries it bigger. Its wall time limit and a
/// cancel kill the runner (the server starts another for the next call);
/// so does a call that ends its own process, which then ends with the
/// runner's exit status and no outcome.
async fn on_runner(
    task: RunTask,
    ctx: TaskContext,
    mut control: mpsc::UnboundedReceiver<Control>,
    client: Arc<Client>,
    mut report: TaskReport,
    slot_files: Option<(std::fs::File, std::fs::File)>,
) -> Finished {
    let Some(call) = task.call.as_ref() else {
        report.error = Some("not a function call".into());
        return ctx.finished(&task, report, Vec::new(), slot_files);
    };
    let limits = task_limits(&task);
    let growable = task.growable && limits.memory_mb.is_some();
    let mut limit_mb = limits.memory_mb;
    let sent = client.call_on_runner(
        &Request {
            cwd: None,
            cgroup_procs: None,
            modules: &call.modules,
            env: &task.env,
            payload: &call.payload,
        },
        limit_mb.map(|mb| (mb, growable)),
    );
    let (id, mut events) = match sent {
        Ok(sent) => sent,
        Err(e) => {
            report.error = Some(server_lost(format_args!("handing it the call: {e}")));
            return ctx.finished(&task, report, Vec::new(), slot_files);
        }
    };
    report.started_ms = now_ms();
    let started = Instant::now();
    let deadline = async {
        match limits.wall_time {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut ending = Ending::Exited;
    // The resident set (MB) the runner was stopped at, over its limit.
    let mut frozen: Option<f64> = None;
    let mut refused: Option<f64> = None;
    let done = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Done(d)) => break Some(d),
                None | Some(Event::Lost) => break None,
                Some(Event::Started(_)) => {}
                Some(Event::Frozen(rss)) => {
                    let used = rss as f64 / MIB;
                    frozen = Some(used);
                    let _ = ctx.to_master.send(Outgoing::Msg(WorkerMsg::Grow {
                        task_id: task.task_id,
                        attempt: task.attempt,
                        limit_mb: limit_mb.unwrap_or(0) as f64,
                        used_mb: used,
                    }));
                }
            },
            _ = &mut deadline, if ending == Ending::Exited => {
                ending = Ending::WallTime;
                let _ = client.kill(id);
            }
            c = control.recv(), if ending == Ending::Exited => match c {
                // A dropped sender (lost connection) also means kill.
                None | Some(Control::Kill) => {
                    ending = Ending::Killed;
                    let _ = client.kill(id);
                }
                Some(Control::Grow(allocation)) => {
                    if frozen.take().is_some() {
                        limit_mb = Some(allocation.memory_mb);
                        if client.grow(id, allocation.memory_mb).is_err() {
                            let _ = client.kill(id);
                        }
                    }
                }
                Some(Control::Refuse) => {
                    if let Some(used) = frozen.take() {
                        refused = Some(used);
                        let _ = client.kill(id);
                    }
                }
            }
        }
    };
    let Some(done) = done else {
        client.forget(id);
        report.error = Some(server_lost(format_args!("while the call ran")));
        return ctx.finished(&task, report, Vec::new(), slot_files);
    };
    if libc::WIFSIGNALED(done.status) {
        report.signal = Some(libc::WTERMSIG(done.status));
    } else {
        report.exit_code = Some(libc::WEXITSTATUS(done.status));
    }
    let wall = done.wall.unwrap_or_else(|| started.elapsed().as_secs_f64());
    let used = refused.unwrap_or(done.maxrss as f64 / MIB);
    report.measured.wall_time_s = wall;
    report.measured.cpu_time_s = done.cpu;
    report.measured.memory_mb = used;
    report.measured.cores = if wall > 0.0 { done.cpu / wall } else { 0.0 };
    report.measured.summary = Some(serde_json::json!({
        "monitor_method": "runner",
        "wall_time": wall,
        "cpu_time": done.cpu,
        "memory": used,
    }));
    // Killed over its limit, refused growth, or (not growable) ended over
    // it between two samples.
    let over = limit_mb.filter(|&mb| refused.is_some() || (!growable && used > mb as f64));
    if let (Some(limit), Ending::Exited) = (over, ending) {
        ending = Ending::LimitExceeded;
        report.error = Some(format!(
            "memory went over its limit: {used:.1} MB used, {limit:.1} MB allowed"
        ));
        report.limit_exceeded = Some(LimitHit {
            resource: "memory".into(),
            limit: limit as f64,
            value: used,
        });
    }
    if ending == Ending::WallTime {
        report.limit_exceeded = Some(LimitHit {
            resource: "wall_time".into(),
            limit: limits.wall_time.map_or(0.0, |d| d.as_secs_f64()),
            value: wall,
        });
    }
    report.ending = ending;
    match done.outcome {
        Some(outcome) => {
            report.stdout = cap_output(&outcome.stdout);
            report.stderr = cap_output(&outcome.stderr);
            if ending == Ending::Exited {
                set_call_result(&mut report, outcome.raised, outcome.result);
            }
        }
        None if ending == Ending::Exited => {
            report.error = Some(format!(
                "the call ended its runner process ({}) before it returned",
                match report.signal {
                    Some(s) => format!("signal {s}"),
                    None => format!("exit status {}", report.exit_code.unwrap_or(0)),
                }
            ));
        }
        None => {}
    }
    ctx.finished(&task, report, Vec::new(), slot_files)
}

/// A call run without the monitor: only its exit and rusage are known.
async fn unwatched(
    task: RunTask,
    ctx: TaskContext,
    client: Arc<Client>,
    id: u64,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut report: TaskReport,
    slot_files: Option<(std::fs::File, std::fs::File)>,
) -> Finished {
    report.started_ms = now_ms();
    let started = Instant::now();
    if let Err(e) = client.adopted(id) {
        report.error = Some(format!("the function server went away: {e}"));
    }
    let Some(done) = wait_done(&mut events).await else {
        report.error = Some(server_lost(format_args!("while the call ran")));
        return ctx.finished(&task, report, Vec::new(), slot_files);
    };
    report.ending = Ending::Exited;
    if libc::WIFSIGNALED(done.status) {
        report.signal = Some(libc::WTERMSIG(done.status));
    } else {
        report.exit_code = Some(libc::WEXITSTATUS(done.status));
    }
    report.measured.wall_time_s = started.elapsed().as_secs_f64();
    report.measured.cpu_time_s = done.cpu;
    report.measured.memory_mb = done.maxrss as f64 / (1024.0 * 1024.0);
    if let Some(outcome) = done.outcome {
        report.stdout = cap_output(&outcome.stdout);
        report.stderr = cap_output(&outcome.stderr);
        set_call_result(&mut report, outcome.raised, outcome.result);
    }
    ctx.finished(&task, report, Vec::new(), slot_files)
}

/// The error of a call whose function server died while it held the call
/// (ending `SetupFailed`): the master runs it again without blaming the
/// worker, which starts a new server (`functions::restart`).
fn server_lost(when: std::fmt::Arguments<'_>) -> String {
    format!("{FUNCTION_SERVER_LOST} {when}")
}

/// Returns once the server is gone; a [`Done`] that comes first (the call
/// ended and was reaped while its supervision winds up) is kept in `done`.
async fn until_lost(events: &mut mpsc::UnboundedReceiver<Event>, done: &mut Option<Done>) {
    loop {
        match events.recv().await {
            Some(Event::Done(d)) => {
                *done = Some(d);
                return std::future::pending().await;
            }
            Some(Event::Started(_)) | Some(Event::Frozen(_)) => {}
            None | Some(Event::Lost) => return,
        }
    }
}

/// The server's answer once the call's child is reaped; `None` if the
/// server went away first.
async fn wait_done(events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Done> {
    loop {
        match events.recv().await? {
            Event::Done(d) => return Some(d),
            Event::Lost => return None,
            Event::Started(_) | Event::Frozen(_) => {}
        }
    }
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Makes a call the command that runs it in a new interpreter, for a worker
/// without a function server or a call in a packaged environment (whose
/// `python3` comes first on its PATH).
pub(crate) fn as_command(task: &mut RunTask) {
    task.command = match crate::functions::runner() {
        Some(runner) => {
            let quoted = runner.display().to_string().replace('\'', r"'\''");
            let python = if task.environment.is_some() {
                "python3"
            } else {
                "\"${DROVER_PYTHON:-python3}\""
            };
            format!("exec {python} '{quoted}' {CALL_FILE} {RESULT_FILE}")
        }
        None => "echo 'drover: this worker has no python runner' >&2; exit 127".into(),
    };
}

/// Puts an inline call in the sandbox for [`as_command`]'s interpreter.
pub(crate) fn write_payload(sandbox: &Path, call: &FunctionCall) -> Result<(), String> {
    if call.payload.is_empty() {
        return Ok(()); // a large call, already placed as an input
    }
    let path = sandbox.join(CALL_FILE);
    std::fs::write(&path, &call.payload).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Takes the outcome an interpreter run by [`as_command`] left.
pub(crate) fn read_result(sandbox: &Path, report: &mut TaskReport) {
    if report.ending != Ending::Exited {
        return;
    }
    if let Ok(data) = std::fs::read(sandbox.join(RESULT_FILE)) {
        let raised = report.exit_code == Some(1);
        set_call_result(report, raised, data);
    }
}
