//! The worker's Python function server: one persistent interpreter per
//! worker process that runs each Python call on a long-lived call runner it
//! forked once, or in a child it forks for the call, instead of starting an
//! interpreter for it (TaskVine's "library" idea, HTEX's worker pool).
//!
//! A call without files runs on a runner: no fork per call. The runner
//! measures the call by differences (CPU, wall, its peak resident set after
//! resetting it) and the server samples its resident set against the
//! call's memory limit, stopping (to grow) or killing it over the limit
//! (see `call.rs`). A call with files gets a child forked for it, watched
//! by the monitor in its own cgroup where there is one.
//! Runners share state between calls (modules, globals), as any pool of
//! persistent workers does; each call's environment and directory are
//! restored after it.
//!
//! A task with a [`drover_protocol::FunctionCall`] is handed to the server
//! over one socket pair, with length-prefixed messages multiplexed by call
//! id (the format is in `python/drover/forkserver.py`): no shell, and no
//! sandbox directory unless the call has files. The server forks a child
//! per call and says its pid at once; the worker's monitor adopts that pid
//! as the task's process (in the task's own cgroup, which the child joins
//! before it runs anything, or through /proc), so the call's own memory,
//! CPU and wall time are measured and its limits enforced. The pickled
//! outcome and the call's stdout and stderr come back in the server's
//! answer, and then inline in the task report.
//!
//! A worker started from anywhere (a remote `drover worker`, or one that
//! Python's `LocalWorker` starts) starts its own server here. The server's
//! scripts are compiled into the binary: a worker's Python needs
//! `cloudpickle`, not the `drover` package. Without a server (no Python, no
//! cloudpickle, `DROVER_FUNCTION_SERVER=0`) a call runs `remote.py` in a
//! new interpreter in a sandbox.
//!
//! The server lives in its own process group and watches this process: when
//! the worker dies, by any signal, it removes its directory and kills itself
//! and every call still running. Dropping [`FunctionServer`] does the same.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Set to `0` to run every Python call in a new interpreter.
pub const ENABLE_VAR: &str = "DROVER_FUNCTION_SERVER";

const FORKSERVER_PY: &str = include_str!("../../python/drover/forkserver.py");
const REMOTE_PY: &str = include_str!("../../python/drover/remote.py");

/// How long the interpreter may take to import cloudpickle.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The descriptor the server finds its socket at.
const SERVER_FD: i32 = 3;

/// Largest message the server may send (a result, its stdout and stderr):
/// what its 32-bit length can say. A result too big for a report frame goes
/// to the master as a body of its own, so this is the only cap on it.
const MAX_MESSAGE: usize = u32::MAX as usize;

mod restart;

/// The server calls go to: the worker's first, then each one started after
/// the one before died ([`restart`]).
static CLIENT: Mutex<Option<Arc<Client>>> = Mutex::new(None);
static RUNNER: OnceLock<PathBuf> = OnceLock::new();

/// The running server of this worker process, if it has one that is alive.
pub fn client() -> Option<Arc<Client>> {
    CLIENT.lock().ok()?.as_ref().filter(|c| c.alive()).cloned()
}

/// `remote.py` on disk, for calls run in a new interpreter; `None` before
/// [`FunctionServer::start_for_worker`].
pub fn runner() -> Option<&'static Path> {
    RUNNER.get().map(PathBuf::as_path)
}

/// What the server says about one call.
#[derive(Debug)]
pub enum Event {
    /// The call's child runs as this pid.
    Started(i32),
    /// The child ended and was reaped (after [`Client::adopted`]), or the
    /// runner answered or died.
    Done(Done),
    /// The runner of a call that may grow went over its memory limit with
    /// this resident set (bytes) and is stopped until [`Client::grow`] or
    /// [`Client::kill`].
    Frozen(u64),
    /// The server is gone.
    Lost,
}

/// A finished call as the server reaped it.
#[derive(Debug)]
pub struct Done {
    /// The wait status.
    pub status: i32,
    /// User and system CPU, seconds.
    pub cpu: f64,
    /// Peak resident set, bytes.
    pub maxrss: u64,
    /// The call's own wall seconds, as a call runner measured it; `None`
    /// for a forked child (its monitor measures it).
    pub wall: Option<f64>,
    /// What the child sent back; `None` when it died before.
    pub outcome: Option<Outcome>,
}

/// A call's answer: whether it raised, its pickled outcome, its output.
#[derive(Debug, Default)]
pub struct Outcome {
    pub raised: bool,
    pub result: Vec<u8>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One call to make.
pub struct Request<'a> {
    /// Working directory of the call (a sandbox), or none (the server's).
    pub cwd: Option<&'a Path>,
    /// The `cgroup.procs` the child joins first.
    pub cgroup_procs: Option<&'a std::ffi::CStr>,
    pub modules: &'a [String],
    pub env: &'a [(String, String)],
    /// The pickled call; empty to read the sandbox's call file.
    pub payload: &'a [u8],
}

/// The worker's end of the server's socket.
pub struct Client {
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    next: AtomicU64,
    lost: AtomicBool,
}

impl Client {
    /// False once the server is gone.
    pub fn alive(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
    }

    /// Sends a call to run in a forked child; its events come on the
    /// receiver: [`Event::Started`], then [`Event::Done`] after
    /// [`Client::adopted`].
    pub fn call(
        &self,
        req: &Request<'_>,
    ) -> std::io::Result<(u64, mpsc::UnboundedReceiver<Event>)> {
        let procs = req.cgroup_procs.map(|c| c.to_bytes()).unwrap_or(b"");
        self.request(b'R', req, procs)
    }

    /// Sends a call to run on one of the server's call runners, measured
    /// by the runner: [`Event::Done`] (or [`Event::Lost`]), after
    /// [`Event::Frozen`] for a call that may grow. The server kills the
    /// runner when its resident set goes over the limit of `memory_mb`
    /// (MB, and whether the call may grow instead); [`Client::kill`] kills
    /// it too.
    pub fn call_on_runner(
        &self,
        req: &Request<'_>,
        memory_mb: Option<(u64, bool)>,
    ) -> std::io::Result<(u64, mpsc::UnboundedReceiver<Event>)> {
        let limit = match memory_mb {
            Some((mb, true)) => format!("{mb}g"),
            Some((mb, false)) => mb.to_string(),
            None => String::new(),
        };
        self.request(b'Q', req, limit.as_bytes())
    }

    /// Sends `kind` with `req`, whose second field is `second` (the cgroup
    /// to join, or a runner call's memory limit).
    fn request(
        &self,
        kind: u8,
        req: &Request<'_>,
        second: &[u8],
    ) -> std::io::Result<(u64, mpsc::UnboundedReceiver<Event>)> {
        use std::os::unix::ffi::OsStrExt;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending.lock().map_err(poisoned)?.insert(id, tx);
        let mut body = Vec::with_capacity(64 + req.payload.len());
        let env: Vec<u8> = req
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\0")
            .into_bytes();
        for part in [
            req.cwd.map(|p| p.as_os_str().as_bytes()).unwrap_or(b""),
            second,
            req.modules.join(",").as_bytes(),
            &env,
        ] {
            body.extend_from_slice(&(part.len() as u32).to_be_bytes());
            body.extend_from_slice(part);
        }
        body.extend_from_slice(req.payload);
        let sent = self.send(kind, id, &body);
        if sent.is_err() {
            self.forget(id);
        }
        sent.map(|()| (id, rx))
    }

    /// The worker watches the call's pid now: the server may reap it.
    pub fn adopted(&self, id: u64) -> std::io::Result<()> {
        self.send(b'A', id, &[])
    }

    /// A frozen runner's call may go on with a limit of `memory_mb`.
    pub fn grow(&self, id: u64, memory_mb: u64) -> std::io::Result<()> {
        self.send(b'U', id, &memory_mb.to_be_bytes())
    }

    /// The worker could not watch the call, or gives up on it: the server
    /// ends it (a runner's call, by killing the runner).
    pub fn kill(&self, id: u64) -> std::io::Result<()> {
        self.send(b'K', id, &[])
    }

    /// Stops routing events of `id` (its task gave up on it).
    pub fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    fn send(&self, kind: u8, id: u64, body: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(9 + body.len())
            .map_err(|_| std::io::Error::other("a call too large for the function server"))?;
        let mut head = [0u8; 13];
        head[..4].copy_from_slice(&len.to_be_bytes());
        head[4] = kind;
        head[5..].copy_from_slice(&id.to_be_bytes());
        let mut w = self.writer.lock().map_err(poisoned)?;
        w.write_all(&head)?;
        w.write_all(body)
    }

    /// Reads the server's messages until it closes; every call still
    /// waiting then hears it is lost.
    fn read_loop(self: Arc<Self>, mut reader: UnixStream) {
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if reader.read_exact(&mut len).is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if !(9..=MAX_MESSAGE).contains(&len) {
                warn!("the function server sent a message of {len} bytes; dropping it");
                break;
            }
            buf.resize(len, 0);
            if reader.read_exact(&mut buf).is_err() {
                break;
            }
            let kind = buf[0];
            let mut id = [0u8; 8];
            id.copy_from_slice(&buf[1..9]);
            let id = u64::from_be_bytes(id);
            let event = match parse_event(kind, &buf[9..]) {
                Some(e) => e,
                None => {
                    warn!("a malformed message from the function server (kind {kind})");
                    continue;
                }
            };
            let last = matches!(event, Event::Done(_));
            let Ok(mut pending) = self.pending.lock() else {
                break;
            };
            let tx = if last {
                pending.remove(&id)
            } else {
                pending.get(&id).cloned()
            };
            drop(pending);
            if let Some(tx) = tx {
                let _ = tx.send(event);
            }
        }
        self.lost.store(true, Ordering::Release);
        if let Ok(mut p) = self.pending.lock() {
            for (_, tx) in p.drain() {
                let _ = tx.send(Event::Lost);
            }
        }
        restart::after_death();
    }
}

fn poisoned<T>(_: T) -> std::io::Error {
    std::io::Error::other("the function server's client is poisoned")
}

/// Reads `n` bytes at `at`, moving it on.
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
    let s = b.get(*at..at.checked_add(n)?)?;
    *at += n;
    Some(s)
}

fn take_blob(b: &[u8], at: &mut usize) -> Option<Vec<u8>> {
    let n = u32::from_be_bytes(take(b, at, 4)?.try_into().ok()?) as usize;
    take(b, at, n).map(<[u8]>::to_vec)
}

fn parse_event(kind: u8, b: &[u8]) -> Option<Event> {
    let mut at = 0;
    match kind {
        b'P' => Some(Event::Started(i32::from_be_bytes(
            take(b, &mut at, 4)?.try_into().ok()?,
        ))),
        b'G' => Some(Event::Frozen(u64::from_be_bytes(
            take(b, &mut at, 8)?.try_into().ok()?,
        ))),
        b'D' | b'F' => {
            let status = i32::from_be_bytes(take(b, &mut at, 4)?.try_into().ok()?);
            let cpu = f64::from_be_bytes(take(b, &mut at, 8)?.try_into().ok()?);
            let maxrss = u64::from_be_bytes(take(b, &mut at, 8)?.try_into().ok()?);
            let wall = if kind == b'F' {
                Some(f64::from_be_bytes(take(b, &mut at, 8)?.try_into().ok()?))
            } else {
                None
            };
            let outcome = if at == b.len() {
                None
            } else {
                let raised = take(b, &mut at, 1)?[0] != 0;
                Some(Outcome {
                    raised,
                    result: take_blob(b, &mut at)?,
                    stdout: take_blob(b, &mut at)?,
                    stderr: take_blob(b, &mut at)?,
                })
            };
            Some(Event::Done(Done {
                status,
                cpu,
                maxrss,
                wall,
                outcome,
            }))
        }
        _ => None,
    }
}

/// A running function server; stopped (and its directory removed) on drop.
pub struct FunctionServer {
    child: Arc<Mutex<Child>>,
    pid: i32,
    dir: PathBuf,
    /// The worker's own (from [`FunctionServer::start_for_worker`]): its
    /// drop also stops the servers started after it died.
    owner: bool,
}

impl FunctionServer {
    /// Starts the server for this worker process unless turned off
    /// (`DROVER_FUNCTION_SERVER=0`), and makes it the one tasks use
    /// ([`client`]). Writes `remote.py` for calls that run in their own
    /// interpreter either way.
    ///
    /// A worker whose Python cannot run the server (no interpreter, no
    /// cloudpickle) still works: its calls start their own interpreter, as
    /// the warning says.
    pub fn start_for_worker(workdir: &Path) -> Option<FunctionServer> {
        let runner = workdir.join(format!("remote-{}.py", std::process::id()));
        match std::fs::write(&runner, REMOTE_PY) {
            Ok(()) => {
                let _ = RUNNER.set(runner);
            }
            Err(e) => warn!("cannot write {}: {e}", runner.display()),
        }
        if std::env::var(ENABLE_VAR).is_ok_and(|v| v == "0") {
            return None;
        }
        let python = std::env::var("DROVER_PYTHON").unwrap_or_else(|_| "python3".into());
        match FunctionServer::start(workdir, &python) {
            Ok((mut server, client)) => {
                info!(python, "python function server ready");
                if let Ok(mut c) = CLIENT.lock() {
                    *c = Some(client);
                }
                restart::remember(workdir, &python);
                server.owner = true;
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
    pub fn start(workdir: &Path, python: &str) -> anyhow::Result<(FunctionServer, Arc<Client>)> {
        let dir = workdir.join(format!("functions-{}", std::process::id()));
        // A directory of a dead worker with our pid: its server is gone too.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let made = (|| -> anyhow::Result<(FunctionServer, Arc<Client>)> {
            std::fs::write(dir.join("forkserver.py"), FORKSERVER_PY)?;
            std::fs::write(dir.join("remote.py"), REMOTE_PY)?;
            let (ours, theirs) = UnixStream::pair().context("a socket for the function server")?;
            let their_fd = theirs.as_raw_fd();
            let mut cmd = Command::new(python);
            cmd.arg(dir.join("forkserver.py"))
                .arg(SERVER_FD.to_string())
                .arg(&dir)
                .current_dir(&dir)
                .env("DROVER_FORKSERVER_READY", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Its own group: the server kills the group (itself and
                // its calls) when the worker goes away.
                .process_group(0);
            // SAFETY: dup2 and fcntl are async-signal-safe; the descriptor
            // is open in the parent for the duration of the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if their_fd == SERVER_FD {
                        let flags = libc::fcntl(SERVER_FD, libc::F_GETFD);
                        libc::fcntl(SERVER_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(their_fd, SERVER_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn().with_context(|| format!("starting {python}"))?;
            drop(theirs);
            let pid = child.id() as i32;
            let stdout = child.stdout.take().context("the server's stdout")?;
            let child = Arc::new(Mutex::new(child));
            let server = FunctionServer {
                child: child.clone(),
                pid,
                dir: dir.clone(),
                owner: false,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("function-server".into())
                .spawn(move || watch(stdout, tx, child))
                .context("starting the function server's watcher")?;
            if rx.recv_timeout(READY_TIMEOUT).is_err() {
                bail!("{python} did not start the function server (is cloudpickle installed?)")
            }
            let reader = ours.try_clone().context("the function server's socket")?;
            let client = Arc::new(Client {
                writer: Mutex::new(ours),
                pending: Mutex::new(HashMap::new()),
                next: AtomicU64::new(1),
                lost: AtomicBool::new(false),
            });
            let c = client.clone();
            std::thread::Builder::new()
                .name("function-calls".into())
                .spawn(move || c.read_loop(reader))
                .context("starting the function server's reader")?;
            Ok((server, client))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }
}

/// Reads the server's ready line, then waits for it to end.
fn watch(
    stdout: std::process::ChildStdout,
    ready: std::sync::mpsc::Sender<()>,
    child: Arc<Mutex<Child>>,
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
    if let Ok(mut c) = child.lock() {
        match c.try_wait() {
            Ok(Some(status)) => warn!("python function server ended ({status})"),
            _ => warn!("python function server closed its output"),
        }
    }
}

impl Drop for FunctionServer {
    fn drop(&mut self) {
        if self.owner {
            restart::stop();
        }
        // A server that died and was reaped may have its pid reused: no
        // signal to that group then.
        let ended = self
            .child
            .lock()
            .is_ok_and(|mut c| matches!(c.try_wait(), Ok(Some(_))));
        // The group holds the server and every call still running.
        // SAFETY: plain syscall on a process group we started.
        if !ended {
            unsafe {
                libc::killpg(self.pid, libc::SIGKILL);
            }
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
