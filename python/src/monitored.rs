//! `drover.monitored`'s call path: the worker's own function server code
//! (`drover_worker::functions`, which runs `forkserver.py`) started here,
//! one server per interpreter, forks a child per call; the monitor adopts
//! the child as a worker does a call's, so a monitored call is measured
//! and limited exactly as a `PythonTask` is, without a master.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use drover_monitor::{Monitor, MonitorOptions, SpawnOptions, Watched};
use drover_worker::functions::{Client, Done, Event, FunctionServer, Request};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use pyo3::IntoPyObjectExt;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{parse_limits, seconds, DroverError, SIGNAL_SLICE};

/// The servers started here, by interpreter; one that died is started again
/// at the next call.
static SERVERS: Mutex<Vec<(String, Arc<Client>, FunctionServer)>> = Mutex::new(Vec::new());

/// The live server for `python`, started in `workdir` if there is none.
fn server_for(python: &str, workdir: &Path) -> PyResult<Arc<Client>> {
    let mut servers = SERVERS
        .lock()
        .map_err(|_| PyRuntimeError::new_err("the function servers' table is poisoned"))?;
    // A dead one goes (its drop removes its directory) before a new one is
    // made in the same place.
    servers.retain(|(p, c, _)| p != python || c.alive());
    if let Some((_, c, _)) = servers.iter().find(|(p, _, _)| p == python) {
        return Ok(c.clone());
    }
    let (server, client) = FunctionServer::start(workdir, python).map_err(|e| {
        DroverError::new_err(format!(
            "cannot start a function server with {python}: {e:#}"
        ))
    })?;
    servers.push((python.to_string(), client.clone(), server));
    Ok(client)
}

/// The next event but `Started`: the call's end, or `None` if the server
/// went away.
fn done_of(events: &mut UnboundedReceiver<Event>) -> Option<Done> {
    loop {
        match events.blocking_recv()? {
            Event::Done(d) => return Some(d),
            Event::Lost => return None,
            Event::Started(_) | Event::Frozen(_) => {}
        }
    }
}

/// Runs the pickled call `payload` in a child forked from the function
/// server of `python` (started under `workdir` the first time), in `cwd`
/// (whose disk is measured), under the monitor with `limits`. Returns
/// `(raised, result, stdout, stderr, exit_code, signal, limit_exceeded,
/// summary)`; `raised` and `result` are None when the call left no outcome
/// (killed, crashed). Blocks with the GIL released; Ctrl-C kills the call
/// and raises KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (payload, modules, python, workdir, cwd, limits=None, interval=0.1))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn monitored_call(
    py: Python<'_>,
    payload: &[u8],
    modules: Vec<String>,
    python: String,
    workdir: PathBuf,
    cwd: PathBuf,
    limits: Option<&Bound<'_, PyDict>>,
    interval: f64,
) -> PyResult<Py<PyTuple>> {
    let limits = parse_limits(limits)?;
    let interval = seconds(interval, "interval")?.max(std::time::Duration::from_millis(10));
    let client = py.allow_threads(|| server_for(&python, &workdir))?;
    let monitor = Monitor::with_options(MonitorOptions {
        interval,
        ..Default::default()
    });
    let reserved = monitor.reserve(&limits);
    let (id, mut events) = client
        .call(&Request {
            cwd: Some(&cwd),
            cgroup_procs: reserved.cgroup_procs(),
            modules: &modules,
            env: &[],
            payload,
        })
        .map_err(|e| DroverError::new_err(format!("handing the call to its server: {e}")))?;
    let start = (Instant::now(), crate::epoch(std::time::SystemTime::now()));
    let pid = match py.allow_threads(|| events.blocking_recv()) {
        Some(Event::Started(pid)) => pid,
        other => {
            client.forget(id);
            return Err(DroverError::new_err(format!(
                "the function server did not start the call ({other:?})"
            )));
        }
    };
    let watched = reserved.adopt(
        pid,
        "python call".into(),
        start,
        Some(&cwd),
        limits,
        SpawnOptions::default(),
    );
    let watched = match watched {
        Ok(w) => w,
        Err(e) => {
            let _ = client.kill(id);
            py.allow_threads(|| done_of(&mut events));
            return Err(PyRuntimeError::new_err(format!("monitor: {e}")));
        }
    };
    let sent = client.adopted(id);
    let interrupted = match sent {
        Ok(()) => wait_exit(py, &watched).err(),
        Err(_) => None,
    };
    if interrupted.is_some() {
        watched.kill();
    }
    let (done, report) = py.allow_threads(|| {
        let done = done_of(&mut events);
        let report = match &done {
            Some(d) => watched.finish_adopted(d.status, d.cpu, d.maxrss),
            None => {
                watched.kill();
                watched.finish_adopted(libc::SIGKILL, 0.0, 0)
            }
        };
        (done, report)
    });
    if let Some(e) = interrupted {
        return Err(e);
    }
    let Some(done) = done else {
        return Err(DroverError::new_err(
            "the function server went away during the call",
        ));
    };
    let report = report.map_err(|e| PyRuntimeError::new_err(format!("monitor: {e}")))?;
    let [code, signal, exceeded, summary] = crate::report_objects(py, &report)?;
    let (raised, result, stdout, stderr) = match done.outcome {
        Some(o) => (
            Some(o.raised),
            Some(PyBytes::new(py, &o.result)),
            o.stdout,
            o.stderr,
        ),
        None => (None, None, Vec::new(), Vec::new()),
    };
    Ok(PyTuple::new(
        py,
        [
            raised.into_py_any(py)?,
            result.into_py_any(py)?,
            PyBytes::new(py, &stdout).into_py_any(py)?,
            PyBytes::new(py, &stderr).into_py_any(py)?,
            code,
            signal,
            exceeded,
            summary,
        ],
    )?
    .unbind())
}

/// Waits for the watched call's process to exit, a slice at a time with
/// the GIL released; `Err` with Python's exception on a signal (Ctrl-C).
fn wait_exit(py: Python<'_>, watched: &Watched) -> PyResult<()> {
    let fd = watched.pidfd().as_raw_fd();
    loop {
        let ready = py.allow_threads(|| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the descriptor outlives this call.
            unsafe { libc::poll(&mut p, 1, SIGNAL_SLICE.as_millis() as libc::c_int) > 0 }
        });
        if ready {
            return Ok(());
        }
        py.check_signals()?;
    }
}
