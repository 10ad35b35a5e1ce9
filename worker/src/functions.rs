//! The worker's Python function server: one persistent interpreter per
//! worker process that forks each Python call instead of starting an
//! interpreter for it.
//!
//! A `drover.PythonTask`'s command looks for `$DROVER_PY_FORKSERVER` (a FIFO)
//! and, when it is there, hands the call to the server behind it and waits
//! for the exit status (see `python/drover/forkserver.py`). Local workers
//! started from Python get a server from the Python side; a `drover worker`
//! started anywhere else starts its own here, so remote workers run calls at
//! the same per-call cost. The server's scripts are compiled into the binary:
//! a worker's Python needs `cloudpickle`, not the `drover` package.
//!
//! The forked call joins the cgroup of the task's waiting shell, so the
//! worker's monitor measures and limits each call on its own (memory summed
//! over the group where the memory controller is not delegated).
//!
//! The server lives in its own process group and watches this process: when
//! the worker dies, by any signal, it removes its directory and kills itself
//! and every call still running. Dropping [`FunctionServer`] does the same.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tracing::{info, warn};

/// The variable a PythonTask's command reads the request FIFO from.
pub const FORKSERVER_VAR: &str = "DROVER_PY_FORKSERVER";

/// Set to `0` to run every Python call in a new interpreter.
pub const ENABLE_VAR: &str = "DROVER_FUNCTION_SERVER";

const FORKSERVER_PY: &str = include_str!("../../python/drover/forkserver.py");
const REMOTE_PY: &str = include_str!("../../python/drover/remote.py");

/// How long the interpreter may take to import cloudpickle and open its FIFO.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running function server; stopped (and its directory removed) on drop.
pub struct FunctionServer {
    child: Arc<Mutex<Child>>,
    pid: i32,
    dir: PathBuf,
    fifo: PathBuf,
}

impl FunctionServer {
    /// Starts a server for this worker unless one is already given
    /// (`$DROVER_PY_FORKSERVER` set, as local workers started from Python
    /// have) or turned off (`DROVER_FUNCTION_SERVER=0`). On success the
    /// variable is set in this process's environment, which tasks inherit.
    /// Must be called before threads that read the environment start.
    ///
    /// A worker whose Python cannot run the server (no interpreter, no
    /// cloudpickle) still works: its calls start their own interpreter, as
    /// the warning says.
    pub fn start_for_worker(workdir: &Path) -> Option<FunctionServer> {
        if std::env::var_os(FORKSERVER_VAR).is_some_and(|v| !v.is_empty())
            || std::env::var(ENABLE_VAR).is_ok_and(|v| v == "0")
        {
            return None;
        }
        let python = std::env::var("DROVER_PYTHON").unwrap_or_else(|_| "python3".into());
        match FunctionServer::start(workdir, &python) {
            Ok(server) => {
                info!(python, fifo = %server.fifo.display(), "python function server ready");
                std::env::set_var(FORKSERVER_VAR, &server.fifo);
                Some(server)
            }
            Err(e) => {
                warn!(
                    "no python function server ({e:#}); python calls start their own interpreter"
                );
                None
            }
        }
    }

    /// Starts `python` running the fork server in a new directory under
    /// `workdir`, and waits until it reads requests.
    pub fn start(workdir: &Path, python: &str) -> anyhow::Result<FunctionServer> {
        let dir = workdir.join(format!("functions-{}", std::process::id()));
        // A directory of a dead worker with our pid: its server is gone too.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let made = (|| -> anyhow::Result<FunctionServer> {
            std::fs::write(dir.join("forkserver.py"), FORKSERVER_PY)?;
            std::fs::write(dir.join("remote.py"), REMOTE_PY)?;
            let fifo = dir.join("requests");
            make_fifo(&fifo)?;
            let mut child = Command::new(python)
                .arg(dir.join("forkserver.py"))
                .arg(&fifo)
                .arg(&dir)
                .current_dir(&dir)
                .env("DROVER_FORKSERVER_READY", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Its own group: the server kills the group (itself and
                // its calls) when the worker goes away.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {python}"))?;
            let pid = child.id() as i32;
            let stdout = child.stdout.take().context("the server's stdout")?;
            let child = Arc::new(Mutex::new(child));
            let server = FunctionServer {
                child: child.clone(),
                pid,
                dir: dir.clone(),
                fifo: fifo.clone(),
            };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("function-server".into())
                .spawn(move || watch(stdout, tx, child, fifo))
                .context("starting the function server's watcher")?;
            match rx.recv_timeout(READY_TIMEOUT) {
                Ok(()) => Ok(server),
                Err(_) => {
                    bail!("{python} did not start the function server (is cloudpickle installed?)")
                }
            }
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// The request FIFO tasks write to.
    pub fn fifo(&self) -> &Path {
        &self.fifo
    }
}

/// Reads the server's ready line, then waits for it to end: a server that
/// dies takes its FIFO along, so that later calls start their own
/// interpreter rather than wait on a FIFO nobody reads.
fn watch(
    stdout: std::process::ChildStdout,
    ready: std::sync::mpsc::Sender<()>,
    child: Arc<Mutex<Child>>,
    fifo: PathBuf,
) {
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    if lines.read_line(&mut line).is_ok() && line.trim() == "ready" {
        let _ = ready.send(());
    }
    // EOF: the server closed its stdout by ending.
    line.clear();
    while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    let _ = std::fs::remove_file(&fifo);
    if let Ok(mut c) = child.lock() {
        match c.try_wait() {
            Ok(Some(status)) => warn!("python function server ended ({status})"),
            _ => warn!("python function server closed its output"),
        }
    }
}

fn make_fifo(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("a NUL in {}", path.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("making the FIFO {}", path.display()));
    }
    Ok(())
}

impl Drop for FunctionServer {
    fn drop(&mut self) {
        // The group holds the server and every call still running.
        // SAFETY: plain syscall on a process group we started.
        unsafe {
            libc::killpg(self.pid, libc::SIGKILL);
        }
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_that_cannot_serve_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = FunctionServer::start(dir.path(), "/nonexistent/python3");
        assert!(r.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read").collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
