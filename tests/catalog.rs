//! End to end with real processes: a real `drover catalog`, a master (the
//! Manager in this test process) reporting to it over UDP and HTTP, real
//! `drover worker` processes that find the master by project name through the
//! catalog, and `drover status` reading it back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{collect, drover_bin, wait_until, CatalogServer, Worker};
use drover_catalog::MasterReport;
use drover_master::{Manager, Outcome, StartError, Task};

/// Short so that tests see changes quickly; the default is 15 s.
const INTERVAL: Duration = Duration::from_millis(200);

fn unique_project(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("e2e-{tag}-{}-{nanos}", std::process::id())
}

fn reporting_manager(catalog: &CatalogServer, project: &str) -> Manager {
    Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project(project)
        .catalog(&catalog.addr)
        .catalog_interval(INTERVAL)
        .build()
        .expect("start manager")
}

/// `drover status --catalog ... --json --project REGEX`, parsed.
fn status_json(catalog: &CatalogServer, project_regex: &str) -> Vec<MasterReport> {
    let out = Command::new(drover_bin())
        .args(["status", "--catalog", &catalog.addr, "--json"])
        .args(["--project", project_regex])
        .output()
        .expect("run drover status");
    assert!(out.status.success(), "drover status failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("drover status --json prints JSON")
}

/// Polls `drover status` until `pred` holds for the list; a hang guard, not a
/// timing assertion.
fn wait_status(
    catalog: &CatalogServer,
    project_regex: &str,
    what: &str,
    pred: impl Fn(&[MasterReport]) -> bool,
) -> Vec<MasterReport> {
    poll_until(what, || status_json(catalog, project_regex), |l| pred(l))
}

/// Calls `fetch` until `pred` holds for what it returns; a hang guard, not a
/// timing assertion.
fn poll_until<T: std::fmt::Debug>(
    what: &str,
    fetch: impl Fn() -> T,
    pred: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = fetch();
        if pred(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last saw {got:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn anchored(project: &str) -> String {
    format!("^{project}$")
}

#[test]
fn worker_finds_master_by_project_status_shows_it_and_entry_expires() {
    let catalog = CatalogServer::start(&["--expiry-secs", "3"]);
    let project = unique_project("find");
    let mut manager = reporting_manager(&catalog, &project);
    // A second master whose project name contains the first one's: the
    // worker's anchored regex must not pick it.
    let decoy = reporting_manager(&catalog, &format!("{project}-decoy"));

    for i in 0..6 {
        manager
            .submit(
                Task::new(format!("echo task-{i}"))
                    .cores(1)
                    .category(if i % 2 == 0 { "even" } else { "odd" }),
            )
            .unwrap();
    }

    // Before any worker: the queue, by task size, is in the report.
    let list = wait_status(&catalog, &anchored(&project), "the waiting tasks", |l| {
        l.len() == 1 && l[0].tasks_waiting == 6
    });
    let shapes = &list[0].waiting_shapes;
    assert_eq!(shapes.len(), 1, "{shapes:?}");
    assert_eq!((shapes[0].cores, shapes[0].count), (1, 6), "{shapes:?}");
    assert_eq!(list[0].workers_connected, 0);

    let worker = Worker::start_without_master(&[
        "--catalog",
        &catalog.addr,
        "--project",
        &anchored(&project),
        "--cores",
        "2",
        "--memory",
        "2000",
        "--disk",
        "1000",
    ]);
    wait_until(&manager, "the worker to find the master", |s| {
        s.workers_connected == 1
    });

    let results = collect(&manager, 6);
    for r in &results {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
        assert_eq!(r.stdout.trim(), format!("task-{}", r.id - 1));
    }

    // drover status shows the project with the counts the master has.
    let list = wait_status(&catalog, &anchored(&project), "final counts", |l| {
        l.len() == 1 && l[0].tasks_done == 6 && l[0].tasks_running == 0
    });
    let m = &list[0];
    assert_eq!(m.project, project);
    assert_eq!(m.port, manager.port());
    assert_eq!(m.host, "127.0.0.1");
    assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
    assert!(!m.owner.is_empty());
    assert!(m.start_time > 0 && m.start_time <= m.last_update, "{m:?}");
    assert!(!m.stopped);
    assert!(m.run_id != 0 && m.seq > 1, "{m:?}");
    assert_eq!((m.tasks_waiting, m.tasks_failed), (0, 0));
    assert_eq!((m.workers_connected, m.workers_busy), (1, 0));
    assert_eq!((m.cores_inuse, m.cores_total), (0, 2));
    assert_eq!(m.memory_total_mb, 2000);
    assert_eq!(m.workers.len(), 1);
    assert_eq!(m.workers[0].cores, 2);
    // Both categories, each saying how it sizes its tasks.
    let mut cats: Vec<&str> = m.categories.iter().map(|c| c.name.as_str()).collect();
    cats.sort_unstable();
    assert_eq!(cats, ["even", "odd"], "{:?}", m.categories);
    assert!(
        m.categories.iter().all(|c| c.allocation.is_some()),
        "{:?}",
        m.categories
    );
    assert!(m.waiting_shapes.is_empty(), "{:?}", m.waiting_shapes);
    // The same through the master's own API.
    let own = manager.status_report();
    assert_eq!(
        (own.project.as_str(), own.tasks_done),
        (project.as_str(), 6)
    );

    // The table view names it too; the broader regex also lists the decoy.
    let table = Command::new(drover_bin())
        .args(["status", "--catalog", &catalog.addr, "--project", &project])
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("PROJECT"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(&format!("{project}-decoy")), "{table}");

    // Stopping sends a last report that says so...
    manager.shutdown();
    let last_seq = m.seq;
    let list = wait_status(&catalog, &anchored(&project), "the stopped flag", |l| {
        l.len() == 1 && l[0].stopped
    });
    assert_eq!(list[0].tasks_done, 6);
    assert!(list[0].seq > last_seq);
    // ...and the entry expires once the master no longer reports.
    wait_status(&catalog, &anchored(&project), "expiry", |l| l.is_empty());

    // The worker did not go to the decoy, and said why it found nothing.
    assert_eq!(decoy.stats().workers_connected, 0);
    let mut worker = worker;
    let _ = worker.child.kill();
    let (_, stderr) = worker.wait_exit(Duration::from_secs(30));
    assert!(
        stderr.contains("knows no running master whose project matches"),
        "{stderr}"
    );
}

#[test]
fn worker_finds_the_master_again_after_it_restarts_on_another_port() {
    let catalog = CatalogServer::start(&[]);
    let project = unique_project("restart");
    let first = reporting_manager(&catalog, &project);
    let _worker = Worker::start_without_master(&[
        "--catalog",
        &catalog.addr,
        "--project",
        &anchored(&project),
        "--cores",
        "1",
        "--idle-timeout",
        "300",
    ]);
    first.submit(Task::new("echo first")).unwrap();
    let r = collect(&first, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    let first_port = first.port();
    drop(first);

    let second = reporting_manager(&catalog, &project);
    assert_ne!(second.port(), first_port);
    second.submit(Task::new("echo second")).unwrap();
    let r = collect(&second, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.stdout.trim(), "second");
    assert_eq!(second.stats().workers_connected, 1);

    // The catalog holds both: the old one marked stopped, the new one live.
    let list = status_json(&catalog, &anchored(&project));
    assert_eq!(list.len(), 2, "{list:#?}");
    let live: Vec<_> = list.iter().filter(|m| !m.stopped).collect();
    assert_eq!(live.len(), 1, "{list:#?}");
    assert_eq!(live[0].port, second.port());
}

#[test]
fn worker_without_a_catalog_retries_and_keeps_its_idle_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let worker = Worker::start_without_master(&[
        "--catalog",
        &format!("127.0.0.1:{port}"),
        "--project",
        "anything",
        "--idle-timeout",
        "2",
    ]);
    let (code, stderr) = worker.wait_exit(Duration::from_secs(60));
    // It never reached a master: whoever started it hears so (issue 19).
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("asking catalog"), "{stderr}");
    assert!(stderr.contains("idle timeout"), "{stderr}");
}

#[test]
fn worker_needs_exactly_one_of_master_and_project() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(drover_bin())
            .arg("worker")
            .arg("--workdir")
            .arg(dir.path())
            .args(args)
            .args(["--idle-timeout", "1"])
            .output()
            .unwrap()
    };
    let neither = run(&[]);
    assert!(!neither.status.success());
    let both = run(&["127.0.0.1:1", "--project", "p"]);
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
        "{both:?}"
    );
    let catalog_alone = run(&["127.0.0.1:1", "--catalog", "127.0.0.1:2"]);
    assert!(!catalog_alone.status.success());
    let bad_regex = run(&["--project", "(unclosed"]);
    assert!(!bad_regex.status.success());
    assert!(
        String::from_utf8_lossy(&bad_regex.stderr).contains("bad project regex"),
        "{bad_regex:?}"
    );
}

#[test]
fn reporting_needs_a_project_and_a_valid_catalog_address() {
    let no_project = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .catalog("127.0.0.1:9097")
        .build();
    assert!(
        matches!(&no_project, Err(StartError::Config(m)) if m.contains("project")),
        "{:?}",
        no_project.err()
    );
    let bad_addr = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project("p")
        .catalog("host:notaport")
        .build();
    assert!(
        matches!(&bad_addr, Err(StartError::Config(m)) if m.contains("notaport")),
        "{:?}",
        bad_addr.err()
    );
    // drover run says so too, before doing anything.
    let out = Command::new(drover_bin())
        .args(["run", "--catalog", "127.0.0.1:9097", "-"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--project"),
        "{out:?}"
    );
}

#[test]
fn master_keeps_working_when_the_catalog_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project(unique_project("nocatalog"))
        .catalog(format!("127.0.0.1:{port}"))
        .catalog_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let _worker = Worker::start(manager.port(), &["--cores", "1"]);
    for i in 0..3 {
        manager.submit(Task::new(format!("echo {i}"))).unwrap();
    }
    for r in collect(&manager, 3) {
        assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    }
    // The last report fails (nobody listens) and shutdown still returns.
    manager.shutdown();
}

/// A UDP socket on 127.0.0.2: to the catalog on 127.0.0.1, reports from
/// it come from another host than the real master's.
fn other_address() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2 (loopback /8)")
}

fn catalog_stats(catalog: &CatalogServer) -> drover_catalog::server::CatalogStats {
    let body = drover_catalog::client::get(&catalog.addr, "/api/stats").expect("GET /api/stats");
    serde_json::from_slice(&body).expect("stats JSON")
}

/// Waits for the real master's own (non-rival) entry and returns it.
fn owner_entry(catalog: &CatalogServer, project: &str) -> MasterReport {
    let list = wait_status(catalog, &anchored(project), "the master's entry", |l| {
        l.iter().any(|m| !m.rival && m.seq > 0)
    });
    list.into_iter().find(|m| !m.rival).unwrap()
}

/// Runs one task through a `--project` worker and checks it reached
/// `manager`; returns the worker's stderr.
fn project_worker_runs_a_task(catalog: &CatalogServer, manager: &Manager, project: &str) -> String {
    let worker = Worker::start_without_master(&[
        "--catalog",
        &catalog.addr,
        "--project",
        &anchored(project),
        "--cores",
        "1",
    ]);
    manager.submit(Task::new("echo reached")).unwrap();
    let r = collect(manager, 1).remove(0);
    assert_eq!(r.outcome, Outcome::Success, "{r:?}");
    assert_eq!(r.stdout.trim(), "reached");
    let mut worker = worker;
    let _ = worker.child.kill();
    worker.wait_exit(Duration::from_secs(30)).1
}

#[test]
fn spoofed_stop_rival_entry_and_flood_from_another_address_leave_the_master_listed() {
    let catalog = CatalogServer::start(&[]);
    let project = unique_project("spoof");
    let manager = reporting_manager(&catalog, &project);
    let real = owner_entry(&catalog, &project);
    let spoofer = other_address();
    let udp_target: std::net::SocketAddr = catalog.addr.parse().unwrap();

    // A "stopped" report for the real entry with a far higher sequence number.
    let mut stop = real.clone();
    stop.stopped = true;
    stop.seq += 1_000_000;
    spoofer
        .send_to(&serde_json::to_vec(&stop).unwrap(), udp_target)
        .unwrap();
    // A rival master for the same project: a port that accepts connections
    // and never answers, so a worker sent there would never run the task.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut rival = real.clone();
    rival.port = trap.local_addr().unwrap().port();
    rival.run_id = 1;
    rival.seq = 1;
    spoofer
        .send_to(&serde_json::to_vec(&rival).unwrap(), udp_target)
        .unwrap();
    let list = wait_status(&catalog, &anchored(&project), "both rivals", |l| {
        l.iter().filter(|m| m.rival).count() == 2
    });
    for m in list.iter().filter(|m| m.rival) {
        assert_eq!(m.source_addr, "127.0.0.2", "{m:?}");
    }

    // 10,000 fake projects, while the page keeps answering.
    for i in 0..10_000 {
        let fake = MasterReport::new_master(&format!("flood-{i}"), "127.0.0.2", 1);
        let _ = spoofer.send_to(&serde_json::to_vec(&fake).unwrap(), udp_target);
        if i % 2_000 == 0 {
            catalog_stats(&catalog);
        }
    }
    let stats = wait_until_stats(&catalog, "the flood to fill the table", |s| {
        s.entries >= s.max_entries
    });
    assert!(stats.rivals >= 2, "{stats:?}");

    // Later reports of the real master still count: not stale, not stopped.
    let seq_before = owner_entry(&catalog, &project).seq;
    let list = wait_status(&catalog, &anchored(&project), "fresh reports", |l| {
        l.iter()
            .any(|m| !m.rival && !m.stopped && m.seq > seq_before)
    });
    let owner = list.iter().find(|m| !m.rival).unwrap();
    assert_eq!(owner.port, manager.port());
    assert_eq!(owner.source_addr, "127.0.0.1");

    let stderr = project_worker_runs_a_task(&catalog, &manager, &project);
    assert!(stderr.contains("masters claim project"), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", rival.port)),
        "the worker names the rival: {stderr}"
    );
}

fn wait_until_stats(
    catalog: &CatalogServer,
    what: &str,
    pred: impl Fn(&drover_catalog::server::CatalogStats) -> bool,
) -> drover_catalog::server::CatalogStats {
    poll_until(what, || catalog_stats(catalog), pred)
}

#[test]
fn a_catalog_with_a_key_drops_unsigned_and_wrongly_signed_reports() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("catalog.key");
    std::fs::write(&key_file, "the catalog key\n").unwrap();
    let key_path = key_file.to_str().unwrap();
    let catalog = CatalogServer::start(&["--catalog-key-file", key_path]);
    let project = unique_project("signed");
    let manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .project(&project)
        .catalog(&catalog.addr)
        .catalog_interval(INTERVAL)
        .catalog_key_file(&key_file)
        .build()
        .expect("start manager");
    let real = owner_entry(&catalog, &project);
    assert!(real.signed, "{real:?}");

    let spoofer = other_address();
    let target: std::net::SocketAddr = catalog.addr.parse().unwrap();
    let mut stop = real.clone();
    stop.stopped = true;
    stop.seq += 1_000_000;
    let json = serde_json::to_vec(&stop).unwrap();
    spoofer.send_to(&json, target).unwrap();
    let forged = drover_catalog::secret::sign(b"a guessed key", &json);
    spoofer.send_to(&forged, target).unwrap();
    let stats = wait_until_stats(&catalog, "both drops", |s| {
        s.dropped_unsigned >= 1 && s.dropped_bad_signature >= 1
    });
    assert_eq!(stats.rivals, 0, "{stats:?}");
    // The same by HTTP is refused, and says why.
    let posted = drover_catalog::client::post_report(&catalog.addr, &stop).unwrap_err();
    assert!(format!("{posted:#}").contains("not signed"), "{posted:#}");

    let list = status_json(&catalog, &anchored(&project));
    assert_eq!(list.len(), 1, "{list:#?}");
    assert!(!list[0].stopped && list[0].signed, "{list:#?}");
    project_worker_runs_a_task(&catalog, &manager, &project);
}

#[test]
fn state_goes_under_xdg_state_home_and_bad_input_fails_at_start_in_one_line() {
    let state_home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(drover_bin());
    cmd.env("XDG_STATE_HOME", state_home.path())
        .current_dir(cwd.path());
    drop(CatalogServer::start_with(cmd));
    assert!(state_home.path().join("drover").is_dir());
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);

    let missing = cwd.path().join("no-such-dir").join("state.json");
    let out = Command::new(drover_bin())
        .args([
            "catalog",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--state-file",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");

    let out = Command::new(drover_bin())
        .args(["status", "--catalog", "127.0.0.1:1", "--project", "("])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // clap's usage error: the first line says it all, once.
    let first = stderr.lines().next().unwrap_or_default();
    assert_eq!(first.matches("bad project regex").count(), 1, "{stderr}");
    assert!(
        first.contains("unclosed group") && !stderr.contains("\\n"),
        "{stderr}"
    );
}

#[test]
fn a_password_or_key_file_others_can_read_is_named_in_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let worker_stderr_with_mode = |mode: u32| {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = Command::new(drover_bin())
            .args(["worker", "127.0.0.1:1", "--idle-timeout", "1", "--workdir"])
            .arg(dir.path().join("work"))
            .arg("--password-file")
            .arg(&secret)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = worker_stderr_with_mode(0o644);
    assert!(
        stderr.contains("password file") && stderr.contains("read or written by others"),
        "{stderr}"
    );
    let stderr = worker_stderr_with_mode(0o600);
    assert!(!stderr.contains("by others"), "{stderr}");
}
