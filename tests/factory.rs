//! End-to-end tests of `drover factory`: a real master (a `Manager` in this
//! process), the real `drover` binary as factory and workers, and a real
//! batch system where one can run here.
//!
//! - Slurm: the single-node cluster of `.ci/local-slurm.sh`
//!   (CI starts it before the tests). Without it the Slurm tests fail when
//!   `CI=true` and are skipped, saying why, otherwise.
//! - HTCondor: no pool can run on this machine (no packages provide the
//!   daemons); the generated submit description is checked with the PyPI
//!   `htcondor` bindings instead.
//! - Local: worker processes on this machine.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{drover_bin, manager, wait_until, CatalogServer};
use drover_master::{Manager, Outcome, Task};

/// Slurm tests share one 2-core node; run them one at a time so that one's
/// jobs do not hold the other's pending.
static SLURM: Mutex<()> = Mutex::new(());

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True if a Slurm controller answers. In CI a missing Slurm is a failure.
fn slurm_available() -> bool {
    let conf = std::env::var_os("SLURM_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/slurm/slurm.conf"));
    let answered = conf.exists()
        && Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if answered {
        return true;
    }
    let why = format!(
        "no Slurm controller answers (config {}): start one with `eval \"$(bash .ci/local-slurm.sh start)\"`",
        conf.display()
    );
    assert!(!in_ci(), "CI=true and {why}");
    common::skip(&why);
    false
}

/// A running `drover factory` process, killed if still alive when dropped.
struct Factory {
    child: Child,
    name: String,
    log_dir: tempfile::TempDir,
    /// Holds `stderr`, the factory's log, readable while it runs.
    _err_dir: tempfile::TempDir,
    stderr: PathBuf,
}

impl Factory {
    fn start(batch: &str, source: &[&str], args: &[&str]) -> Factory {
        let log_dir = tempfile::tempdir().expect("tempdir");
        let name = format!(
            "drover-factory-test-{}-{}",
            std::process::id(),
            rand_suffix()
        );
        let err_dir = tempfile::tempdir().expect("tempdir");
        let stderr = err_dir.path().join("factory.stderr");
        let child = Command::new(drover_bin())
            .args(["factory", "--batch", batch])
            .args(source)
            .args(["--name", &name, "--interval", "0.5"])
            .arg("--log-dir")
            .arg(log_dir.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start drover factory");
        Factory {
            child,
            name,
            log_dir,
            _err_dir: err_dir,
            stderr,
        }
    }

    /// What the factory has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns (code, stdout, stderr).
    fn terminate(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "factory did not exit within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        (status.code(), out, self.log())
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            // A factory killed hard cannot clean up; do it for it.
            let _ = Command::new("scancel")
                .arg(format!("--name={}", self.name))
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

/// The factory's jobs in Slurm's queue, as (id, state).
fn squeue(name: &str) -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%i %T", &format!("--name={name}")])
        .output()
        .expect("run squeue");
    assert!(
        out.status.success(),
        "squeue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, st) = l.trim().split_once(' ')?;
            Some((id.to_string(), st.to_string()))
        })
        .collect()
}

/// Polls `cond` until it holds; panics with `what` after `timeout` (a hang
/// guard, not a timing assertion).
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The JSON summary line the factory prints on exit.
fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no summary line in factory output: {stdout:?}"));
    serde_json::from_str(line).expect("summary is JSON")
}

fn submit_sleeps(m: &Manager, n: usize, seconds: &str, cores: u32) {
    for i in 0..n {
        m.submit(Task::new(format!("sleep {seconds}; echo done {i}")).cores(cores))
            .expect("submit");
    }
}

/// Collects `n` results, polling, while `each` watches the system.
fn collect_watching(
    m: &Manager,
    n: usize,
    mut each: impl FnMut(),
) -> Vec<drover_master::TaskResult> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} tasks finished",
            out.len()
        );
        if let Some(r) = m.wait(Some(Duration::from_millis(200))) {
            out.push(r);
        }
        each();
    }
    out
}

/// Worker sizing shared by the factory tests: `max` workers of `cores`
/// cores, 100 MB memory and disk, idle timeout `timeout` seconds.
fn small_workers<'a>(max: &'a str, cores: &'a str, timeout: &'a str) -> Vec<&'a str> {
    vec![
        "--max-workers",
        max,
        "--cores",
        cores,
        "--memory",
        "100",
        "--disk",
        "100",
        "--worker-timeout",
        timeout,
    ]
}

#[test]
fn slurm_factory_runs_a_burst_within_max_workers_and_leaves_no_jobs() {
    let _serial = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_available() {
        return;
    }
    let m = manager();
    submit_sleeps(&m, 40, "0.1", 1);
    let master = format!("127.0.0.1:{}", m.port());
    let factory = Factory::start(
        "slurm",
        &["--master", &master],
        &small_workers("2", "1", "3"),
    );
    let name = factory.name.clone();
    let mut most_jobs = 0;
    let mut most_workers = 0;
    let results = collect_watching(&m, 40, || {
        most_jobs = most_jobs.max(squeue(&name).len());
        most_workers = most_workers.max(m.stats().workers_connected);
    });
    assert!(results.iter().all(|r| r.outcome == Outcome::Success));
    assert!(
        most_jobs <= 2,
        "the factory held {most_jobs} jobs, over --max-workers 2"
    );
    assert!(
        most_workers <= 2,
        "{most_workers} workers connected, over --max-workers 2"
    );
    assert!(most_workers >= 1);
    // With the queue empty the workers leave by their idle timeout, the jobs
    // end, and the factory (still running) submits no more.
    wait_for(
        "the workers to exit when idle",
        Duration::from_secs(120),
        || squeue(&name).is_empty() && m.stats().workers_connected == 0,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        squeue(&name).is_empty(),
        "the factory submitted jobs with nothing to do"
    );
    let logs = std::fs::read_dir(factory.log_dir.path())
        .expect("log dir")
        .count();
    let (code, out, err) = factory.terminate(Duration::from_secs(90));
    assert_eq!(code, Some(0), "factory stderr:\n{err}");
    let s = summary(&out);
    let submitted = s["submitted"].as_u64().unwrap();
    assert!(submitted >= 1, "{s}");
    assert_eq!(s["failed"], 0, "factory stderr:\n{err}");
    let cancelled = s["cancelled"].as_u64().unwrap();
    assert_eq!(
        logs as u64,
        submitted - cancelled,
        "one Slurm output file per job that ran"
    );
    assert!(squeue(&name).is_empty());
}

#[test]
fn slurm_factory_killed_with_sigterm_removes_its_pending_and_running_jobs() {
    let _serial = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_available() {
        return;
    }
    let m = manager();
    submit_sleeps(&m, 20, "60", 1);
    let master = format!("127.0.0.1:{}", m.port());
    // Three 1-core jobs on a 2-core node: some run, at least one waits.
    let factory = Factory::start(
        "slurm",
        &["--master", &master],
        &small_workers("3", "1", "60"),
    );
    let name = factory.name.clone();
    wait_for("jobs to be running", Duration::from_secs(120), || {
        let jobs = squeue(&name);
        jobs.len() == 3 && jobs.iter().any(|(_, s)| s == "RUNNING")
    });
    wait_for("a worker to connect", Duration::from_secs(60), || {
        m.stats().workers_connected >= 1
    });
    let (code, out, err) = factory.terminate(Duration::from_secs(90));
    assert_eq!(code, Some(0), "factory stderr:\n{err}");
    assert_eq!(summary(&out)["submitted"], 3);
    // The running and pending jobs it removed are counted (not as "cancelled",
    // which is pending jobs dropped as demand fell).
    assert_eq!(summary(&out)["removed_at_stop"], 3, "{out}");
    let left = squeue(&name);
    assert!(left.is_empty(), "jobs left behind: {left:?}");
    // The killed workers said goodbye or dropped; the master lost no task.
    wait_for("the workers to be gone", Duration::from_secs(60), || {
        m.stats().workers_connected == 0
    });
    let s = m.stats();
    if let Some(r) = m.wait(Some(Duration::from_millis(10))) {
        panic!("a task ended while its worker was being removed: {r:?}");
    }
    assert_eq!(s.tasks_waiting + s.tasks_running, 20);
    assert_eq!(s.tasks_done + s.tasks_failed, 0);
}

#[test]
fn local_factory_packs_multi_core_tasks_and_honours_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "sesame\n").unwrap();
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .password_file(&pw)
        .build()
        .expect("manager");
    // Six 2-core tasks on 4-core workers: three workers' worth, not six.
    submit_sleeps(&m, 6, "1", 2);
    let master = format!("127.0.0.1:{}", m.port());
    let pw_arg = pw.to_str().unwrap();
    let factory = Factory::start(
        "local",
        &["--master", &master],
        &[
            small_workers("10", "4", "2"),
            vec!["--password-file", pw_arg],
        ]
        .concat(),
    );
    let mut most_workers = 0;
    let results = collect_watching(&m, 6, || {
        most_workers = most_workers.max(m.stats().workers_connected);
    });
    assert!(results.iter().all(|r| r.outcome == Outcome::Success));
    assert!(
        (1..=3).contains(&most_workers),
        "{most_workers} 4-core workers for six 2-core tasks"
    );
    wait_for(
        "local workers to exit when idle",
        Duration::from_secs(60),
        || m.stats().workers_connected == 0,
    );
    let (code, out, err) = factory.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "factory stderr:\n{err}");
    let s = summary(&out);
    assert!(
        (1..=3).contains(&s["submitted"].as_u64().unwrap()),
        "{s}\n{err}"
    );
}

/// A master with TLS: the factory reads its demand over TLS, pinning the
/// certificate, and its local workers reach it the same way.
#[test]
fn local_factory_serves_a_master_with_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, key, fingerprint) = common::tls_init(dir.path());
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .tls(&cert, &key)
        .build()
        .expect("manager");
    submit_sleeps(&m, 2, "0", 1);
    let master = format!("127.0.0.1:{}", m.port());
    let factory = Factory::start(
        "local",
        &["--master", &master],
        &[
            small_workers("2", "1", "2"),
            vec!["--tls-fingerprint", &fingerprint],
        ]
        .concat(),
    );
    let results = collect_watching(&m, 2, || {});
    assert!(
        results.iter().all(|r| r.outcome == Outcome::Success),
        "{results:?}\n{}",
        factory.log()
    );
    let (code, out, err) = factory.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "factory stderr:\n{err}");
    assert!(
        summary(&out)["submitted"].as_u64() >= Some(1),
        "{out}\n{err}"
    );
}

#[test]
fn a_factory_with_the_wrong_password_starts_nothing_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (pw, wrong) = (dir.path().join("pw"), dir.path().join("wrong"));
    std::fs::write(&pw, "sesame").unwrap();
    std::fs::write(&wrong, "open barley").unwrap();
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .password_file(&pw)
        .build()
        .expect("manager");
    submit_sleeps(&m, 3, "0", 1);
    let master = format!("127.0.0.1:{}", m.port());
    let common = [
        "--max-workers",
        "2",
        "--cores",
        "1",
        "--memory",
        "100",
        "--disk",
        "100",
    ];
    let mut args = common.to_vec();
    args.extend(["--password-file", wrong.to_str().unwrap()]);
    let bad = Factory::start("local", &["--master", &master], &args);
    // And one without any password at all.
    let none = Factory::start("local", &["--master", &master], &common);
    for (f, why) in [(&bad, "wrong password"), (&none, "requires a password")] {
        wait_for(why, Duration::from_secs(60), || f.log().contains(why));
    }
    // A few more rounds, in which it must not start anything either.
    std::thread::sleep(Duration::from_secs(2));
    for (f, why) in [(bad, "wrong password"), (none, "password")] {
        let (code, out, err) = f.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0));
        assert_eq!(summary(&out)["submitted"], 0, "{err}");
        assert!(err.contains(why), "stderr does not say {why:?}:\n{err}");
    }
    assert_eq!(m.stats().tasks_waiting, 3);
}

#[test]
fn local_factory_finds_its_master_through_the_catalog() {
    let catalog = CatalogServer::start(&[]);
    let project = format!("factory-test-{}", rand_suffix());
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project(&project)
        .catalog(&catalog.addr)
        .catalog_interval(Duration::from_millis(500))
        .build()
        .expect("manager");
    submit_sleeps(&m, 4, "0.5", 1);
    let factory = Factory::start(
        "local",
        &[
            "--catalog",
            &catalog.addr,
            "--project",
            &format!("^{project}$"),
        ],
        &small_workers("1", "2", "2"),
    );
    let results = collect_watching(&m, 4, || {});
    assert!(results.iter().all(|r| r.outcome == Outcome::Success));
    let (code, out, err) = factory.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    assert!(summary(&out)["submitted"].as_u64().unwrap() >= 1);
}

#[test]
fn bad_factory_options_are_refused_with_a_reason() {
    for (args, says) in [
        (
            vec![
                "--master",
                "h:1",
                "--max-workers",
                "1",
                "--min-workers",
                "2",
            ],
            "--min-workers",
        ),
        (
            vec!["--master", "h:1", "--max-workers", "0"],
            "--max-workers",
        ),
        (
            vec!["--master", "h:1", "--max-workers", "1", "--name", "a b"],
            "job name",
        ),
        (
            vec![
                "--master",
                "h:1",
                "--max-workers",
                "1",
                "--batch-options",
                "'open",
            ],
            "unclosed quote",
        ),
        (
            vec![
                "--master",
                "h:1",
                "--max-workers",
                "1",
                "--password-file",
                "/nonexistent/pw",
            ],
            "/nonexistent/pw",
        ),
        (vec!["--max-workers", "1"], "--master"),
    ] {
        let out = Command::new(drover_bin())
            .args([
                "factory", "--batch", "slurm", "--cores", "1", "--memory", "1", "--disk", "1",
            ])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            err.contains(says),
            "{args:?}: stderr does not mention {says:?}:\n{err}"
        );
    }
}

/// The PyPI `htcondor` bindings, or why they are missing.
fn htcondor_python() -> Option<String> {
    let ok = Command::new("python3")
        // htcondor >= 24 on PyPI ships the `htcondor2` module; older ones `htcondor`.
        .args([
            "-c",
            "try:\n    import htcondor2\nexcept ImportError:\n    import htcondor",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some("python3".into());
    }
    let why = "python3 cannot import htcondor (pip install htcondor)";
    assert!(!in_ci(), "CI=true and {why}");
    common::skip(why);
    None
}

fn condor_description(extra: &[&str], pw: &Path) -> String {
    let out = Command::new(drover_bin())
        .args([
            "factory",
            "--batch",
            "condor",
            "--master",
            "node1.example.org:9123",
            "--max-workers",
            "5",
            "--cores",
            "4",
            "--memory",
            "8000",
            "--disk",
            "2000",
            "--gpus",
            "1",
            "--worker-timeout",
            "120",
            "--time-limit",
            "3600",
            "--name",
            "drover-factory-condor-test",
            "--log-dir",
            "/tmp/drover-factory-condor-test",
            "--batch-options",
            "requirements = (OpSys == \"LINUX\"); +ProjectName = \"drover\"",
            "--dry-run",
        ])
        .arg("--password-file")
        .arg(pw)
        .args(extra)
        .output()
        .expect("run drover factory --dry-run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn condor_submit_description_parses_with_the_htcondor_bindings() {
    // No HTCondor pool can run on this machine: Debian has no HTCondor
    // package and the PyPI wheel carries only the bindings, so the
    // description is checked by HTCondor's own parser instead of a schedd.
    eprintln!("note: no HTCondor pool available; checking the submit description only");
    let Some(python) = htcondor_python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("secret pw");
    std::fs::write(&pw, "x").unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("factory/tests/check_condor_submit.py");
    let drover = drover_bin();
    for (extra, shared) in [(&[][..], false), (&["--shared-path"][..], true)] {
        let text = condor_description(extra, &pw);
        let file = dir.path().join("job.sub");
        std::fs::write(&file, &text).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(&file)
            .arg(&drover)
            .arg(&pw)
            .arg(if shared { "shared" } else { "transfer" })
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the htcondor check failed:\n{}\n{}\ndescription:\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_status_query_reports_waiting_shapes_and_is_not_a_worker() {
    let m = manager();
    for _ in 0..3 {
        m.submit(Task::new("true").cores(4).memory_mb(1000))
            .unwrap();
    }
    submit_sleeps(&m, 2, "0", 1);
    // Submits travel on the user's command channel and the query on its
    // own connection: without this, the query may overtake the last submit.
    wait_until(&m, "five tasks queued", |s| s.tasks_waiting == 5);
    let addr = format!("127.0.0.1:{}", m.port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(drover_factory::status::query_master(&addr, None, None))
        .expect("status query");
    assert_eq!(r.tasks_waiting, 5);
    assert_eq!(r.port, m.port());
    let shape = |cores| {
        r.waiting_shapes
            .iter()
            .find(|s| s.cores == cores)
            .unwrap_or_else(|| panic!("no {cores}-core shape in {:?}", r.waiting_shapes))
    };
    assert_eq!((shape(4).memory_mb, shape(4).count), (1000, 3));
    assert_eq!(shape(1).count, 2);
    // Packed by the master's own logic: three 4-core tasks and two 1-core
    // ones fill two 8-core workers, or three 4-core ones.
    let need = |cores| {
        drover_master::scheduler::workers_needed_for(
            drover_factory::plan::waiting_requests(&r),
            drover_master::Resources {
                cores,
                memory_mb: 4000,
                disk_mb: 0,
                gpus: 0,
            },
            100,
        )
    };
    assert_eq!((need(8), need(4)), (2, 4));
    // A status client is not a worker, and a password the master does not
    // have is refused, as it is for workers.
    let err = rt
        .block_on(drover_factory::status::query_master(
            &addr,
            Some(b"pw"),
            None,
        ))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no password"), "{err:#}");
    assert_eq!(m.stats().workers_connected, 0);
    assert_eq!(m.stats().tasks_waiting, 5);
}

#[test]
fn slurm_submission_failures_back_off_and_say_why() {
    let _serial = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_available() {
        return;
    }
    let m = manager();
    submit_sleeps(&m, 5, "0", 1);
    let master = format!("127.0.0.1:{}", m.port());
    let factory = Factory::start(
        "slurm",
        &["--master", &master],
        &[
            "--max-workers",
            "2",
            "--cores",
            "1",
            "--memory",
            "100",
            "--disk",
            "100",
            "--batch-options",
            "--partition=no-such-partition",
        ],
    );
    // sbatch's own reason is in the log, and the second failure comes
    // after a longer wait than the first.
    wait_for("two failed submissions", Duration::from_secs(120), || {
        factory.log().contains("2 time(s) in a row")
    });
    let log = factory.log();
    assert!(
        log.contains("invalid partition"),
        "no sbatch reason in:\n{log}"
    );
    assert!(
        log.contains("next try in 1s") && log.contains("next try in 2s"),
        "{log}"
    );
    let (code, out, err) = factory.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let s = summary(&out);
    assert_eq!(s["submitted"], 0);
    assert!(s["submit_errors"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(m.stats().tasks_waiting, 5);
}
