//! End-to-end tests of packaged environments on real `drover worker`
//! processes: the master ships the tarball as a cached input, the worker
//! unpacks it once and runs tasks inside it.
//!
//! The environments are small trees written with the packager's own archive
//! writer (the format `drover pack create` produces), not built from PyPI:
//! what is tested here is the worker's side, not building Python.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use drover_master::{Manager, Outcome, Task, TaskResult};

/// An environment whose `bin/` holds one program, `name`, printing `says`.
fn make_env(dir: &Path, name: &str, says: &str) -> PathBuf {
    let root = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let prog = root.join("bin").join(name);
    std::fs::write(&prog, format!("#!/bin/sh\necho {says}\n")).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tarball = dir.join(format!("{name}.tar.gz"));
    drover_packager::archive::write_archive(&root, &tarball, 6, 1).unwrap();
    tarball
}

/// A command printing, one per line: the first entry of `PATH`, the
/// environment root, where `prog` is found, what it says, and the root's inode.
fn probe(prog: &str) -> String {
    format!(
        "echo \"${{PATH%%:*}}\"; echo \"$DROVER_ENV_ROOT\"; command -v {prog}; {prog}; \
         stat -c %i \"$DROVER_ENV_ROOT\""
    )
}

struct Probe {
    first_on_path: String,
    root: String,
    found: String,
    said: String,
    inode: String,
}

fn parse(r: &TaskResult) -> Probe {
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "stdout: {}", r.stdout);
    Probe {
        first_on_path: lines[0].into(),
        root: lines[1].into(),
        found: lines[2].into(),
        said: lines[3].into(),
        inode: lines[4].into(),
    }
}

/// Unpacked environments (not the worker's bookkeeping) under a workdir.
fn unpacked(workdir: &Path) -> Vec<String> {
    match std::fs::read_dir(workdir.join("envs")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn tasks_run_inside_their_environment_unpacked_once_per_worker() {
    let dir = tempfile::tempdir().unwrap();
    let env = make_env(dir.path(), "envprobe", "inside-the-env");
    let m = manager();
    let w = Worker::start(m.port(), &["--cores", "2"]);
    // Two at once (they share one unpack), then one more (it finds it done).
    let submit = || {
        m.submit(Task::new(probe("envprobe")).cores(1).environment(&env))
            .unwrap()
    };
    submit();
    submit();
    let mut results = collect(&m, 2);
    submit();
    results.extend(collect(&m, 1));
    let probes: Vec<Probe> = results.iter().map(parse).collect();
    let envs = unpacked(w.workdir.path());
    assert_eq!(envs.len(), 1, "unpacked environments: {envs:?}");
    let expected_root = w.workdir.path().join("envs").join(&envs[0]);
    for p in &probes {
        assert_eq!(Path::new(&p.root), expected_root);
        assert_eq!(p.first_on_path, format!("{}/bin", p.root));
        assert_eq!(p.found, format!("{}/bin/envprobe", p.root));
        assert_eq!(p.said, "inside-the-env");
        assert_eq!(
            p.inode, probes[0].inode,
            "the environment was unpacked again"
        );
    }
    // The tarball crossed the network once.
    assert_eq!(m.stats().files_sent, 1);
}

#[test]
fn the_managers_default_environment_applies_to_tasks_that_name_none() {
    let dir = tempfile::tempdir().unwrap();
    let default_env = make_env(dir.path(), "defaultprobe", "from-the-default");
    let own_env = make_env(dir.path(), "ownprobe", "from-its-own");
    let m = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .environment(&default_env)
        .build()
        .unwrap();
    let _w = Worker::start(m.port(), &["--cores", "1"]);
    let plain = m.submit(Task::new(probe("defaultprobe"))).unwrap();
    let own = m
        .submit(Task::new(probe("ownprobe")).environment(&own_env))
        .unwrap();
    let results = collect(&m, 2);
    let get = |id| parse(results.iter().find(|r| r.id == id).unwrap());
    assert_eq!(get(plain).said, "from-the-default");
    let own = get(own);
    assert_eq!(own.said, "from-its-own");
    assert_eq!(own.first_on_path, format!("{}/bin", own.root));
}

#[test]
fn a_corrupt_environment_fails_its_task_and_the_worker_runs_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let good = make_env(dir.path(), "goodprobe", "still-healthy");
    let garbage = write_file(
        dir.path(),
        "garbage.tar.gz",
        b"this is not a tarball at all\n",
    );
    let bytes = std::fs::read(&good).unwrap();
    let truncated = write_file(dir.path(), "truncated.tar.gz", &bytes[..bytes.len() / 2]);
    let m = manager();
    let mut w = Worker::start(m.port(), &["--cores", "1"]);
    for bad in [&garbage, &truncated] {
        m.submit(Task::new("echo ran anyway").environment(bad))
            .unwrap();
        let r = collect(&m, 1).remove(0);
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert!(r.stdout.is_empty(), "the command must not run: {r:?}");
        let error = r.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("environment") && error.contains("cannot unpack"),
            "error: {error:?}"
        );
        assert!(w.child.try_wait().unwrap().is_none(), "the worker died");
    }
    m.submit(Task::new(probe("goodprobe")).environment(&good))
        .unwrap();
    let r = collect(&m, 1).remove(0);
    assert_eq!(parse(&r).said, "still-healthy");
    // Nothing half-unpacked was left behind.
    let leftovers: Vec<String> = std::fs::read_dir(w.workdir.path().join("envs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(unpacked(w.workdir.path()).len(), 1);
}
