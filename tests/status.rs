//! `drover status` views (`--workers`, `--tasks`, `--able`, `--json`)
//! against a real master with real workers, asked directly on its worker
//! port and through a real catalog.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{drover_bin, tls_init, wait_until, CatalogServer, Worker};
use drover_master::{Manager, Task};

/// Runs `drover status ARGS` and returns its stdout; fails the test on a
/// non-zero exit.
fn status(args: &[&str]) -> String {
    let out = Command::new(drover_bin())
        .arg("status")
        .args(args)
        .output()
        .expect("run drover status");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "drover status {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Polls `drover status ARGS` until `ok` holds for its output.
fn status_until(args: &[&str], what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = status(args);
        if ok(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "drover status {args:?} never showed {what}; last:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A master with two 1-core workers: one task runs (tag `long`), one
/// failed, one asks for 64 cores and fits no worker.
fn busy_master(catalog: Option<&str>) -> (Manager, Vec<Worker>) {
    let mut b = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project("status-views");
    if let Some(c) = catalog {
        b = b.catalog(c).catalog_interval(Duration::from_millis(200));
    }
    let m = b.build().expect("start manager");
    let workers = (0..2)
        .map(|_| Worker::start(m.port(), &["--cores", "1", "--memory", "500"]))
        .collect();
    m.submit(Task::new("sleep 60").tag("long").category("sim"))
        .expect("submit");
    m.submit(Task::new("echo no such input >&2; exit 2").category("sim"))
        .expect("submit");
    m.submit(Task::new("true").cores(64).category("big"))
        .expect("submit");
    wait_until(&m, "one running, one failed, two workers", |s| {
        s.tasks_running == 1 && s.tasks_failed == 1 && s.workers_connected == 2
    });
    (m, workers)
}

#[test]
fn status_views_of_a_master_asked_directly() {
    let (m, mut workers) = busy_master(None);
    let addr = format!("127.0.0.1:{}", m.port());

    let masters = status(&[&addr]);
    assert!(masters.starts_with("PROJECT"), "{masters}");
    assert!(masters.contains("status-views"), "{masters}");

    let ws = status(&[&addr, "--workers"]);
    let rows: Vec<&str> = ws.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{ws}");
    assert!(ws.lines().next().unwrap_or("").contains("ADDRESS"), "{ws}");
    // Two workers of one host, told apart by their address.
    assert!(rows.iter().all(|r| r.contains("127.0.0.1:")), "{ws}");
    assert!(rows.iter().any(|r| r.contains("1/1")), "{ws}");

    let tasks = status(&[&addr, "--tasks"]);
    let sim = tasks
        .lines()
        .find(|l| l.contains(" sim "))
        .unwrap_or_else(|| panic!("no sim row in\n{tasks}"));
    // WAITING RUNNING DONE FAILED
    let nums: Vec<&str> = sim.split_whitespace().skip(2).take(4).collect();
    assert_eq!(nums, ["0", "1", "0", "1"], "{tasks}");
    assert!(tasks.contains("RUNNING FOR"), "{tasks}");
    assert!(
        tasks
            .lines()
            .any(|l| l.contains("long") && l.contains("127.0.0.1:")),
        "{tasks}"
    );

    let able = status(&[&addr, "--able"]);
    let big = able
        .lines()
        .find(|l| l.contains("64 cores"))
        .unwrap_or_else(|| panic!("no 64-core row in\n{able}"));
    assert!(big.contains("fits no worker"), "{able}");

    let json: serde_json::Value =
        serde_json::from_str(&status(&[&addr, "--workers", "--json"])).expect("JSON");
    assert_eq!(json[0]["project"], "status-views");
    assert_eq!(json[0]["workers"].as_array().map(Vec::len), Some(2));

    // A killed worker is in the master's events, with its address.
    let victim = workers.remove(0);
    drop(victim);
    let out = status_until(&[&addr, "--json"], "the lost worker", |o| {
        o.contains("\"worker lost\"")
    });
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let events = report[0]["events"].as_array().cloned().unwrap_or_default();
    let failed = events
        .iter()
        .find(|e| e["kind"] == "task failed")
        .expect("a task failed event");
    assert!(
        failed["detail"]
            .as_str()
            .is_some_and(|d| d.contains("exit 2") && d.contains("no such input")),
        "{failed}"
    );
    let lost = events
        .iter()
        .find(|e| e["kind"] == "worker lost")
        .expect("a worker lost event");
    assert!(
        lost["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{lost}"
    );
    assert!(report[0]["history"]["workers"].as_array().is_some());
}

#[test]
fn status_views_through_the_catalog() {
    let catalog = CatalogServer::start(&[]);
    let (_m, _workers) = busy_master(Some(&catalog.addr));
    let args = ["--catalog", &catalog.addr, "--project", "^status-views$"];
    let with = |extra: &'static str| {
        let mut a = args.to_vec();
        a.push(extra);
        a
    };
    let ws = status_until(&with("--workers"), "two workers", |o| {
        o.lines().filter(|l| l.contains("127.0.0.1:")).count() == 2
    });
    assert!(ws.starts_with("MASTER"), "{ws}");
    let able = status_until(&with("--able"), "the task no worker fits", |o| {
        o.contains("fits no worker")
    });
    assert!(able.contains("64 cores"), "{able}");
    let tasks = status_until(&with("--tasks"), "the running task", |o| o.contains("long"));
    assert!(tasks.contains("big"), "{tasks}");
}

#[test]
fn status_refuses_a_master_and_a_catalog_together() {
    let out = Command::new(drover_bin())
        .args([
            "status",
            "127.0.0.1:1",
            "--catalog",
            "127.0.0.1:2",
            "--workers",
        ])
        .output()
        .expect("run drover status");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// A master with TLS answers `drover status HOST:PORT` given its CA or its
/// fingerprint; without them, or with another pin, the query fails.
#[test]
fn status_of_a_master_with_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key, fingerprint) = tls_init(dir.path());
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project("status-tls")
        .tls(&cert, &key)
        .build()
        .expect("start manager");
    let addr = format!("127.0.0.1:{}", m.port());
    let ca = ca.to_str().expect("utf-8 path");
    for trust in [["--tls-ca", ca], ["--tls-fingerprint", &fingerprint]] {
        let out = status(&[&addr, "--json", trust[0], trust[1]]);
        assert!(out.contains("status-tls"), "{trust:?}: {out}");
    }
    let wrong_pin = ["00"; 32].join(":");
    for extra in [vec![], vec!["--tls-fingerprint", wrong_pin.as_str()]] {
        let out = Command::new(drover_bin())
            .args(["status", &addr])
            .args(&extra)
            .output()
            .expect("run drover status");
        assert!(!out.status.success(), "{extra:?} was answered");
    }
}
