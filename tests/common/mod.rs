//! Helpers for end-to-end tests: real `drover worker` processes against a real master.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, TaskResult};

pub fn drover_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drover"))
}

/// A worker process, killed when dropped.
pub struct Worker {
    pub child: Child,
    pub workdir: tempfile::TempDir,
}

impl Worker {
    pub fn start(port: u16, args: &[&str]) -> Worker {
        let workdir = tempfile::tempdir().expect("tempdir");
        Worker::start_in(port, args, workdir)
    }

    pub fn start_in(port: u16, args: &[&str], workdir: tempfile::TempDir) -> Worker {
        let master = format!("127.0.0.1:{port}");
        Worker::spawn(Some(&master), args, workdir)
    }

    fn spawn(master: Option<&str>, args: &[&str], workdir: tempfile::TempDir) -> Worker {
        let child = Command::new(drover_bin())
            .arg("worker")
            .args(master)
            .arg("--workdir")
            .arg(workdir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start drover worker");
        Worker { child, workdir }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the worker to exit and returns (status code, stderr).
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn manager() -> Manager {
    Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .build()
        .expect("start manager")
}

/// Waits until `cond(stats)` holds, polling; panics after a generous timeout.
pub fn wait_until(manager: &Manager, what: &str, cond: impl Fn(&drover_master::Stats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = manager.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; stats: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects `n` results, panicking if they don't all arrive within a generous timeout.
pub fn collect(manager: &Manager, n: usize) -> Vec<TaskResult> {
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} results arrived",
            out.len()
        );
        if let Some(r) = manager.wait(Some(Duration::from_millis(200))) {
            out.push(r);
        }
    }
    out
}

pub fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write file");
    p
}

impl Worker {
    /// A worker started with `args` only (no master address), e.g. one that
    /// finds its master through a catalog with `--catalog ... --project ...`.
    pub fn start_without_master(args: &[&str]) -> Worker {
        Worker::spawn(None, args, tempfile::tempdir().expect("tempdir"))
    }
}

/// A real `drover catalog` process on a free loopback port with no state
/// file, killed when dropped.
pub struct CatalogServer {
    pub child: Child,
    /// `127.0.0.1:PORT`, for `--catalog`.
    pub addr: String,
    /// Kept open so that a later line on stdout does not hit a closed pipe.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl CatalogServer {
    /// Starts `drover catalog --port 0 --no-state-file` with extra `args`.
    pub fn start(args: &[&str]) -> CatalogServer {
        let mut all = vec!["--no-state-file"];
        all.extend_from_slice(args);
        let (child, addr, stdout) = start_catalog(&all);
        CatalogServer {
            child,
            addr,
            _stdout: stdout,
        }
    }

    /// Like [`CatalogServer::start`] with the state file at its default
    /// place; `cmd` (a `Command` for the drover binary) carries the extra
    /// arguments, environment and working directory.
    pub fn start_with(cmd: Command) -> CatalogServer {
        // The subcommand and its fixed options go before whatever `cmd` has.
        let extra: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
        let mut full = Command::new(cmd.get_program());
        full.args(["catalog", "--port", "0", "--bind", "127.0.0.1"])
            .args(extra);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => full.env(k, v),
                None => full.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            full.current_dir(d);
        }
        let (child, addr, stdout) = spawn_catalog(full);
        CatalogServer {
            child,
            addr,
            _stdout: stdout,
        }
    }
}

/// Starts `drover catalog` on a free loopback port with extra `args`, and
/// waits for the line on stdout that names the port it got; returns the
/// process, its `127.0.0.1:PORT` and its stdout.
pub fn start_catalog(
    args: &[&str],
) -> (Child, String, std::io::BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(drover_bin());
    cmd.args(["catalog", "--port", "0", "--bind", "127.0.0.1"])
        .args(args);
    spawn_catalog(cmd)
}

/// Starts a `drover catalog` command and waits for the line on stdout that
/// names the address it got.
fn spawn_catalog(
    mut cmd: Command,
) -> (Child, String, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start drover catalog");
    let stdout = child.stdout.take().expect("catalog stdout");
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read catalog stdout");
    // "drover catalog listening on 127.0.0.1:PORT (HTTP and UDP)"
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("catalog did not say where it listens: {line:?}"))
        .to_string();
    (child, addr, stdout)
}

impl Drop for CatalogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live (not zombie) processes whose command line contains `marker`, as
/// `(pid, command line)`, read from /proc.
pub fn live_processes_with(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        // A zombie's cmdline is empty, so only live processes match.
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Panics unless every process whose command line contains `marker` is gone
/// (polling, with a generous timeout that only guards against a hang).
pub fn assert_none_left(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = live_processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of a finished task are still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until at least `n` live processes have `marker` in their command line.
pub fn wait_for_processes(marker: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while live_processes_with(marker).len() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} processes with {marker:?} ever ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Says that a test is skipped, and why, where the summary shows it: the test runner captures
/// `eprintln!`, so a skip written that way is never seen. This writes to the process's stderr
/// directly, past the capture.
pub fn skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Writes `spec.json` into `dir`: the host's `python3` and no requirements,
/// so `drover pack create` builds it offline.
pub fn write_stdlib_spec(dir: &Path) {
    let out = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .expect("this test needs python3 on the host");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let spec = serde_json::json!({"python": version, "requirements": []});
    std::fs::write(dir.join("spec.json"), spec.to_string()).expect("write spec.json");
}

impl Worker {
    /// Breaks this worker's disk under it, as a failing node's would be:
    /// its task directory becomes a regular file, so it can set up no task
    /// (not even as root) and fails every one it is sent. Call it once the
    /// worker is connected (it made the directory at start).
    pub fn break_task_dir(&self) {
        let tasks = self
            .workdir
            .path()
            .join(format!("w{}", self.pid()))
            .join("tasks");
        std::fs::remove_dir_all(&tasks).expect("remove the worker's task directory");
        std::fs::write(&tasks, "a file where a directory should be").expect("break it");
    }
}

/// Certificates from the real `drover tls init` in `dir`/certs: the CA,
/// the master's certificate and key, and its fingerprint.
pub fn tls_init(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
    let certs = dir.join("certs");
    let out = Command::new(drover_bin())
        .args(["tls", "init"])
        .arg(&certs)
        .output()
        .expect("run drover tls init");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fingerprint = text
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint (SHA-256): "))
        .expect("a fingerprint line")
        .to_string();
    for line in [
        "drover run",
        "drover worker",
        "--tls-ca",
        "--tls-fingerprint",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    (
        certs.join("ca.pem"),
        certs.join("master.pem"),
        certs.join("master-key.pem"),
        fingerprint,
    )
}
