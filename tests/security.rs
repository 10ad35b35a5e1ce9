//! Trust on the wire, end to end: a real master (the Manager library or
//! `drover run`), real `drover worker` processes, and a real TCP relay
//! between them that plays the attacker on the path.
//!
//! The relay injects a forged `run` frame toward the worker and a forged
//! `task_done` toward the master once the connection is quiet (the task is
//! running and waits for a gate file). Without a password both are obeyed,
//! which shows the forged frames are well formed; with a password (sealed
//! records) or TLS, nothing runs, nothing forged is accepted, and both ends
//! drop the connection saying "frame authentication failed".

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{collect, drover_bin, tls_init, wait_until, write_file, Worker};
use drover_master::{Manager, Outcome, Task};

/// Everything the in-process master logs, for the tests to search.
fn master_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn master_log_text() -> String {
    String::from_utf8_lossy(&master_log().lock().unwrap()).into_owned()
}

/// A frame as an attacker writes it: length, then JSON.
fn frame(json: &str) -> Vec<u8> {
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// How the master and worker protect their connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nothing,
    Password,
    Tls,
}

/// The relay: forwards every connection to the master; on the first one,
/// once the connection has been quiet for a while after `armed` is set, it
/// writes `to_worker` and `to_master` into the streams.
struct Relay {
    port: u16,
    armed: Arc<AtomicBool>,
    injected: Arc<AtomicBool>,
    /// The relay's address as the master sees the first connection.
    first_peer: Arc<Mutex<Option<SocketAddr>>>,
}

impl Relay {
    fn start(master_port: u16, to_worker: Vec<u8>, to_master: Vec<u8>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = listener.local_addr().expect("relay addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let injected = Arc::new(AtomicBool::new(false));
        let first_peer = Arc::new(Mutex::new(None));
        let (a, i, f) = (armed.clone(), injected.clone(), first_peer.clone());
        thread::spawn(move || {
            for (n, worker_side) in listener.incoming().enumerate() {
                let Ok(worker_side) = worker_side else { return };
                let Ok(master_side) = TcpStream::connect(("127.0.0.1", master_port)) else {
                    return;
                };
                let activity = Arc::new(AtomicUsize::new(0));
                // On the first connection, an end that closes is not passed
                // on before both forged frames are written, so each end
                // surely reads its forged frame.
                let hold = (n == 0).then(|| i.clone());
                pipe(&worker_side, &master_side, &activity, hold.clone());
                pipe(&master_side, &worker_side, &activity, hold);
                if n == 0 {
                    *f.lock().unwrap() = master_side.local_addr().ok();
                    let (a, i) = (a.clone(), i.clone());
                    let (tw, tm) = (to_worker.clone(), to_master.clone());
                    thread::spawn(move || {
                        while !a.load(Ordering::SeqCst) {
                            thread::sleep(Duration::from_millis(50));
                        }
                        // Quiet: no byte crossed for a whole second, so the
                        // forged frames land between real ones.
                        loop {
                            let before = activity.load(Ordering::SeqCst);
                            thread::sleep(Duration::from_secs(1));
                            if activity.load(Ordering::SeqCst) == before {
                                break;
                            }
                        }
                        let (mut w, mut m) = (&worker_side, &master_side);
                        let _ = w.write_all(&tw);
                        let _ = m.write_all(&tm);
                        i.store(true, Ordering::SeqCst);
                    });
                }
            }
        });
        Relay {
            port,
            armed,
            injected,
            first_peer,
        }
    }
}

/// Copies `from` to `to` on a thread of its own, counting chunks.
fn pipe(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Arc<AtomicUsize>,
    hold: Option<Arc<AtomicBool>>,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let activity = Arc::clone(activity);
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    activity.fetch_add(1, Ordering::SeqCst);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(hold) = hold {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !hold.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Runs the attack in `mode`; returns the task's result, whether the
/// injected command ran, the worker's stderr, and the master's log.
fn attack(mode: Mode) -> (drover_master::TaskResult, bool, String, String) {
    master_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("injected-ran");
    let gate = dir.path().join("go");
    let pw = write_file(dir.path(), "pw", b"correct horse\n");
    let mut builder = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        // No pings while the relay waits for a quiet connection.
        .keepalive(Duration::from_secs(60), Duration::from_secs(300));
    let mut worker_args: Vec<String> =
        vec!["--cores".into(), "2".into(), "--exit-on-disconnect".into()];
    if mode != Mode::Nothing {
        builder = builder.password_file(&pw);
        worker_args.push("--password-file".into());
        worker_args.push(pw.display().to_string());
    }
    if mode == Mode::Tls {
        let (ca, cert, key, _) = tls_init(dir.path());
        builder = builder.tls(&cert, &key);
        worker_args.push("--tls-ca".into());
        worker_args.push(ca.display().to_string());
    }
    let manager = builder.build().expect("start manager");
    let id = manager
        .submit(
            Task::new(format!(
                "while [ ! -e {} ]; do sleep 0.05; done; echo real",
                gate.display()
            ))
            .cores(1)
            .memory_mb(10)
            .disk_mb(10),
        )
        .expect("submit");

    let run = format!(
        r#"{{"type":"run","task_id":{},"attempt":1,"command":"touch {}","allocation":{{"cores":1,"memory_mb":10,"disk_mb":10,"gpus":0}}}}"#,
        id + 1000,
        marker.display()
    );
    let done = format!(
        r#"{{"type":"task_done","report":{{"task_id":{id},"attempt":1,"ending":"exited","exit_code":0,"signal":null,"stdout":"forged\n","stderr":"","measured":{{"wall_time_s":0.1,"cpu_time_s":0.0,"memory_mb":1.0}},"started_ms":0}},"outputs":[]}}"#
    );
    let (mut to_worker, mut to_master) = (frame(&run), frame(&done));
    if mode == Mode::Password {
        // An attacker who knows the record format appends a tag of its own
        // making: without the session key it cannot be the right one.
        to_worker.extend_from_slice(&[0x5a; 32]);
        to_master.extend_from_slice(&[0x5a; 32]);
    }
    let relay = Relay::start(manager.port(), to_worker, to_master);
    let args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
    let worker = Worker::start(relay.port, &args);
    wait_until(&manager, "the task to run", |s| s.tasks_running >= 1);
    relay.armed.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !relay.injected.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the relay never found the connection quiet"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let worker_log = if mode == Mode::Nothing {
        // The forged frames are obeyed: wait for what they do, then let the
        // real task end too.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the injected command never ran");
            thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(&gate, b"").expect("open the gate");
        String::new()
    } else {
        // The worker drops the connection and (with --exit-on-disconnect)
        // exits; a second worker, straight to the master, runs the task.
        let (_, log) = worker.wait_exit(Duration::from_secs(60));
        std::fs::write(&gate, b"").expect("open the gate");
        log
    };
    let _second = (mode != Mode::Nothing).then(|| Worker::start(manager.port(), &args));
    let result = collect(&manager, 1).remove(0);
    let ran = marker.exists();
    let peer = relay.first_peer.lock().unwrap().expect("relay connected");
    let log = master_log_text()
        .lines()
        .filter(|l| l.contains(&peer.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    (result, ran, worker_log, log)
}

fn assert_attack_refused(mode: Mode) {
    let (result, ran, worker_log, master_log) = attack(mode);
    assert!(!ran, "{mode:?}: the injected run frame was obeyed");
    assert_eq!(result.outcome, Outcome::Success, "{result:?}");
    assert_eq!(
        result.stdout.trim(),
        "real",
        "{mode:?}: forged output accepted: {result:?}"
    );
    assert!(
        worker_log.contains("frame authentication failed from the master"),
        "{mode:?}: worker log:\n{worker_log}"
    );
    assert!(
        master_log.contains("frame authentication failed from"),
        "{mode:?}: master log for the relayed connection:\n{master_log}\nworker:\n{worker_log}\nall:\n{}", master_log_text()
    );
}

#[test]
fn without_protection_injected_frames_are_obeyed() {
    // The control: the same relay and frames against an unprotected pair.
    let (result, ran, _, _) = attack(Mode::Nothing);
    assert!(
        ran,
        "the injected run frame did not run: the test would prove nothing"
    );
    assert_eq!(result.stdout.trim(), "forged", "{result:?}");
}

#[test]
fn with_a_password_injected_frames_close_the_connection() {
    assert_attack_refused(Mode::Password);
}

#[test]
fn with_tls_injected_frames_close_the_connection() {
    assert_attack_refused(Mode::Tls);
}

#[test]
fn a_worker_refuses_a_master_it_does_not_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, key, _) = tls_init(&dir.path().join("real"));
    let (rogue_ca, _, _, _) = tls_init(&dir.path().join("rogue"));
    let manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .tls(&cert, &key)
        .build()
        .expect("start manager");
    let wrong_pin = "00".repeat(32);
    for (flag, value, expect) in [
        (
            "--tls-ca",
            rogue_ca.display().to_string(),
            "invalid peer certificate",
        ),
        ("--tls-fingerprint", wrong_pin, "not the pinned one"),
    ] {
        let worker = Worker::start(manager.port(), &[flag, &value, "--exit-on-disconnect"]);
        let (code, log) = worker.wait_exit(Duration::from_secs(60));
        assert_ne!(code, Some(0), "{flag}: {log}");
        assert!(
            log.contains("TLS handshake with the master") && log.contains(expect),
            "{flag}: {log}"
        );
    }
    // A worker without TLS at all does not get in either.
    let worker = Worker::start(manager.port(), &["--exit-on-disconnect"]);
    let (code, log) = worker.wait_exit(Duration::from_secs(60));
    assert_ne!(code, Some(0), "{log}");
    assert_eq!(manager.stats().workers_connected, 0);
}

/// VmRSS of a process, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn stalled_connections_declaring_big_frames_cost_the_master_no_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", b"secret\n");
    let tasks = write_file(dir.path(), "tasks.txt", b"echo done-for-real\n");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut master = std::process::Command::new(drover_bin())
        .arg("run")
        .arg(&tasks)
        .args(["--workers", "0", "--listen", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--show-output")
        .arg("--failed-dir")
        .arg(dir.path().join("failed"))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        // A file, not a pipe nobody reads: 400 refused connections are 400
        // log lines.
        .stderr(std::fs::File::create(dir.path().join("master.log")).expect("log file"))
        .spawn()
        .expect("start drover run");
    let pid = master.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "drover run never listened");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    let before = rss_kb(pid);
    // Each declares an 8 MiB frame, sends one byte of it, and stalls.
    let mut stalled = Vec::new();
    for _ in 0..400 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut bytes = (8u32 << 20).to_be_bytes().to_vec();
            bytes.push(b'{');
            let _ = s.write_all(&bytes);
            stalled.push(s);
        }
    }
    assert!(
        stalled.len() >= 300,
        "only {} connections opened",
        stalled.len()
    );
    thread::sleep(Duration::from_secs(1));
    let during = rss_kb(pid);
    let worker = Worker::start(port, &["--password-file", &pw.display().to_string()]);
    let mut out = String::new();
    let status = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = master.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = master.kill();
                let log =
                    std::fs::read_to_string(dir.path().join("master.log")).unwrap_or_default();
                panic!("drover run did not finish with stalled connections around:\n{log}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    };
    let _ = master.stdout.take().map(|mut o| o.read_to_string(&mut out));
    drop(worker);
    drop(stalled);
    assert!(status.success(), "{status:?}");
    assert!(out.contains("done-for-real"), "{out}");
    // A few MB of slack for the runtime and socket bookkeeping; 400
    // connections of 8 MiB each would have been 3 GB.
    assert!(
        during < before + 8 * 1024,
        "master RSS went from {before} kB to {during} kB"
    );
}

#[test]
fn drover_run_gives_its_local_worker_the_certificate_to_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, key, _) = tls_init(dir.path());
    let pw = write_file(dir.path(), "pw", b"secret\n");
    let tasks = write_file(dir.path(), "tasks.txt", b"echo over-tls\n");
    let out = std::process::Command::new(drover_bin())
        .arg("run")
        .arg(&tasks)
        .args(["--show-output", "--listen", "127.0.0.1", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--password-file")
        .arg(&pw)
        .current_dir(dir.path())
        .output()
        .expect("run drover run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("over-tls"), "{stdout}");
}
