//! Every `drover` subcommand through the real binary: the test walks the
//! command tree from `drover --help`, so a new subcommand without a case
//! here fails it, and runs each leaf's `--help` and one small real call.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::drover_bin;

/// The subcommand names listed under "Commands:" in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every leaf command path under `drover`, found by asking for help.
fn leaves(path: &[String]) -> Vec<Vec<String>> {
    let out = drover(path.iter().map(String::as_str).chain(["--help"]), None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{path:?} --help: {}",
        text(&out)
    );
    let subs = subcommands(&String::from_utf8_lossy(&out.stdout));
    if subs.is_empty() {
        return vec![path.to_vec()];
    }
    subs.into_iter()
        .flat_map(|s| {
            let mut p = path.to_vec();
            p.push(s);
            leaves(&p)
        })
        .collect()
}

/// One packager cache for the whole test, so `pack run` reuses what `pack
/// create` built.
fn pack_cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| tempfile::tempdir().expect("cache dir"))
        .path()
}

fn drover<'a>(args: impl IntoIterator<Item = &'a str>, dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(drover_bin());
    cmd.args(args)
        .env("DROVER_CACHE_DIR", pack_cache())
        .stdin(Stdio::null());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().expect("start drover")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `drover ARGS` in `dir` and asserts it exits 0 without panicking.
fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = drover(args.iter().copied(), Some(dir));
    let all = text(&out);
    assert!(
        !all.contains("panicked"),
        "drover {} panicked:\n{all}",
        args.join(" ")
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "drover {}:\n{all}",
        args.join(" ")
    );
    out
}

/// One real call per leaf; each asserts what the call is for.
fn cases() -> BTreeMap<&'static str, fn(&Path)> {
    let mut m: BTreeMap<&'static str, fn(&Path)> = BTreeMap::new();
    m.insert("run", |d| {
        std::fs::write(d.join("tasks.txt"), "echo hello-from-run\n").unwrap();
        let out = ok(d, &["run", "tasks.txt", "--show-output", "--cores", "1"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("hello-from-run"));
    });
    m.insert("worker", |d| {
        let mut manager = common::manager();
        let id = manager
            .submit(drover_master::Task::new("echo hello-from-worker"))
            .unwrap();
        let mut worker = Command::new(drover_bin())
            .arg("worker")
            .arg(format!("127.0.0.1:{}", manager.port()))
            .args(["--cores", "1", "--idle-timeout", "60", "--workdir"])
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let result = manager.wait(Some(Duration::from_secs(120)));
        manager.shutdown_workers();
        let status = worker.wait().unwrap();
        let result = result.expect("the worker ran the task");
        assert_eq!(result.id, id);
        assert_eq!(result.stdout, "hello-from-worker\n");
        assert_eq!(status.code(), Some(0), "the dismissed worker exits cleanly");
    });
    m.insert("monitor", |d| {
        let out = ok(d, &["monitor", "--", "sh", "-c", "exit 0"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["exit_status"], 0);
    });
    m.insert("pack analyze", |d| {
        std::fs::write(
            d.join("script.py"),
            "import json\nprint(json.dumps('packed'))\n",
        )
        .unwrap();
        ok(d, &["pack", "analyze", "script.py", "-o", "spec.json"]);
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("spec.json")).unwrap()).unwrap();
        assert!(spec["python"].is_string(), "{spec}");
    });
    m.insert("pack create", |d| {
        common::write_stdlib_spec(d);
        ok(d, &["pack", "create", "spec.json", "-o", "env.tar.gz"]);
        assert!(d.join("env.tar.gz").is_file());
    });
    m.insert("pack run", |d| {
        common::write_stdlib_spec(d);
        ok(d, &["pack", "create", "spec.json", "-o", "env.tar.gz"]);
        std::fs::write(
            d.join("script.py"),
            "import sys\nprint('in-env', sys.prefix)\n",
        )
        .unwrap();
        let out = ok(
            d,
            &["pack", "run", "env.tar.gz", "--", "python3", "script.py"],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("in-env "), "{stdout}");
        assert!(!stdout.contains(" /usr"), "ran the host's python: {stdout}");
    });
    m.insert("catalog", |d| {
        let catalog = common::CatalogServer::start(&[]);
        let out = ok(d, &["status", "--catalog", &catalog.addr]);
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("PROJECT"));
    });
    m.insert("status", |d| {
        let catalog = common::CatalogServer::start(&[]);
        let out = ok(d, &["status", "--catalog", &catalog.addr, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, serde_json::json!([]));
    });
    m.insert("factory", |d| {
        let args = "factory --batch local --master 127.0.0.1:9 --max-workers 1 \
                    --cores 1 --memory 100 --disk 100 --dry-run";
        let out = ok(d, &args.split_whitespace().collect::<Vec<_>>());
        assert!(String::from_utf8_lossy(&out.stdout).contains("worker"));
    });
    m.insert("tls init", |d| {
        let out = ok(d, &["tls", "init", "certs", "--host", "node1"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("--tls-ca") && stdout.contains("node1"),
            "{stdout}"
        );
        for f in ["ca.pem", "master.pem", "master-key.pem"] {
            assert!(d.join("certs").join(f).exists(), "{f} missing");
        }
        // A directory that cannot be made is named in the error.
        std::fs::write(d.join("a-file"), "").unwrap();
        let out = drover(["tls", "init", "a-file/certs"], Some(d));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("a-file/certs"), "{stderr}");
    });
    m
}

#[test]
fn every_subcommand_has_help_and_runs() {
    let cases = cases();
    let leaves = leaves(&[]);
    let names: Vec<String> = leaves.iter().map(|l| l.join(" ")).collect();
    for name in &names {
        assert!(
            cases.contains_key(name.as_str()),
            "no case for `drover {name}`"
        );
    }
    for (name, case) in &cases {
        assert!(names.iter().any(|n| n == name), "stale case `{name}`");
        let dir = tempfile::tempdir().unwrap();
        eprintln!("--- drover {name}");
        case(dir.path());
    }
}

/// Runs `drover ARGS` and returns (exit code, stderr).
fn failing(args: &[&str]) -> (Option<i32>, String) {
    let out = drover(args.iter().copied(), None);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mistakes_get_one_clear_line() {
    let (code, err) = failing(&["worker", "localhost"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no port"), "{err}");

    // A worker offering nothing, or more than any task may ask for.
    for args in [
        &["worker", "localhost:1", "--cores", "0"][..],
        &["worker", "localhost:1", "--memory", "18446744073709551615"],
        &["run", "t.txt", "--cores", "0"],
        &[
            "factory",
            "--batch",
            "local",
            "--master",
            "h:1",
            "--max-workers",
            "1",
            "--cores",
            "1",
            "--memory",
            "100",
            "--disk",
            "0",
            "--dry-run",
        ],
    ] {
        let (code, err) = failing(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("is not in 1.."), "{args:?}: {err}");
    }

    let (code, err) = failing(&["status", "--project", "("]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("unclosed group") && !err.contains("\\n"),
        "{err}"
    );

    // A port taken by someone else: the OS error is said once.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), "true\n").unwrap();
    let file = dir.path().join("t.txt");
    let file = file.to_str().unwrap();
    for args in [
        vec!["run", file, "--workers", "0", "--port", &port],
        vec!["catalog", "--port", &port, "--no-state-file"],
    ] {
        let (code, err) = failing(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.matches("os error").count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn an_unreachable_master_is_logged_plainly_and_retried() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let master = format!("127.0.0.1:{port}");
    let workdir = dir.path().to_str().unwrap();
    let args = [
        "worker",
        &master,
        "--idle-timeout",
        "2",
        "--workdir",
        workdir,
    ];
    let (code, err) = failing(&args);
    // Never reached a master: exit 2 with the reason (issue 19), each
    // failed attempt logged with the wait before the next.
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("WARN") && err.contains("Connection refused") && err.contains("retrying in"),
        "{err}"
    );
    assert!(
        err.contains("no master reached within the idle timeout"),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "colour codes in a log that is not a terminal: {err}"
    );
}
