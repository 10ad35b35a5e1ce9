//! W5, scale (BRIEF section 6), through the whole master: 100,000 queued
//! tasks, then 1,000 light simulated workers that speak the real protocol
//! (`drover_protocol`, over real TCP, from a separate process) and
//! report each task done as soon as they get it.
//!
//! Prints one JSON line: master memory per queued task (RSS growth while the
//! tasks are queued and no worker is connected, divided by the count),
//! placements per second from the first worker's connection to the last
//! result, and the master process's CPU seconds per task.
//!
//! `cargo bench -p drover-master --bench w5 -- --tasks 100000 --workers 1000`
//! (without `--tasks`, e.g. under `cargo test`, it does nothing).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{Manager, Outcome, Task};
use drover_protocol::auth::{self, PeerHandshake};
use drover_protocol::Resources;
use drover_protocol::{
    read_frame, write_frame, Ending, Hello, MasterMsg, TaskReport, WorkerMsg, PROTOCOL_VERSION,
};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

fn arg(name: &str) -> Option<String> {
    let mut it = std::env::args();
    while let Some(a) = it.next() {
        if a == name {
            return it.next();
        }
    }
    None
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// CPU seconds (user + system) this process has used.
fn cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    }
}

/// The simulated workers' process: `workers` connections to `port`, each
/// answering every task at once.
fn simulate(port: u16, workers: usize, cores: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            handles.push(tokio::spawn(one_worker(port, i, cores)));
            if i % 50 == 49 {
                // Do not flood the listen backlog.
                tokio::task::yield_now().await;
            }
        }
        for h in handles {
            let _ = h.await;
        }
    });
}

async fn one_worker(port: u16, i: usize, cores: u32) -> std::io::Result<()> {
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut writer = BufWriter::new(w);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        drover_version: "w5-sim".into(),
        hostname: format!("sim-{i}"),
        os: "linux".into(),
        arch: "x86_64".into(),
        resources: Resources {
            cores,
            memory_mb: 16_000,
            disk_mb: 100_000,
            gpus: 0,
        },
        password: false,
        cached: Vec::new(),
    };
    let (mut handshake, first) = PeerHandshake::worker(None, hello, Vec::new());
    auth::run(&mut handshake, &mut reader, &mut writer, Some(first))
        .await
        .map_err(std::io::Error::other)?;
    let mut buf = Vec::new();
    loop {
        let msg: MasterMsg = match read_frame(&mut reader, &mut buf).await {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        match msg {
            MasterMsg::Run(task) => {
                let report = TaskReport {
                    task_id: task.task_id,
                    attempt: task.attempt,
                    ending: Ending::Exited,
                    exit_code: Some(0),
                    signal: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    measured: Default::default(),
                    limit_exceeded: None,
                    missing_outputs: Vec::new(),
                    error: None,
                    started_ms: 0,
                };
                write_frame(
                    &mut writer,
                    &WorkerMsg::TaskDone {
                        report: Box::new(report),
                        outputs: Vec::new(),
                    },
                )
                .await?;
                writer.flush().await?;
            }
            MasterMsg::Ping => {
                write_frame(&mut writer, &WorkerMsg::Pong).await?;
                writer.flush().await?;
            }
            MasterMsg::Shutdown | MasterMsg::Refused { .. } => return Ok(()),
            _ => {}
        }
    }
}

fn main() {
    if let Some(port) = arg("--simulate") {
        let port = port.parse().expect("port");
        let workers = arg("--workers")
            .and_then(|w| w.parse().ok())
            .unwrap_or(1000);
        let cores = arg("--cores").and_then(|w| w.parse().ok()).unwrap_or(4);
        simulate(port, workers, cores);
        return;
    }
    let Some(n) = arg("--tasks").and_then(|n| n.parse::<usize>().ok()) else {
        eprintln!("usage: w5 --tasks 100000 --workers 1000 [--cores 4]");
        return;
    };
    let workers: usize = arg("--workers")
        .and_then(|w| w.parse().ok())
        .unwrap_or(1000);
    let cores: u32 = arg("--cores").and_then(|w| w.parse().ok()).unwrap_or(4);
    let mut manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .keepalive(Duration::from_secs(30), Duration::from_secs(300))
        .build()
        .expect("manager");
    // No worker is connected yet, so every task stays queued: the growth
    // is what the master keeps per queued task (spec, table entry,
    // scheduler entry, allocator slack).
    let rss0 = rss();
    for i in 0..n {
        manager
            .submit(Task::new(format!("true {i}")).cores(1))
            .expect("submit");
    }
    while manager.stats().tasks_waiting < n as u64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss1 = rss();
    let cpu0 = cpu_s();
    let start = Instant::now();
    let exe = std::env::current_exe().expect("own path");
    let mut sim = Command::new(exe)
        .args(["--simulate", &manager.port().to_string()])
        .args([
            "--workers",
            &workers.to_string(),
            "--cores",
            &cores.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the simulated workers");
    let mut ok = 0usize;
    for _ in 0..n {
        match manager.wait(Some(Duration::from_secs(300))) {
            Some(r) if r.outcome == Outcome::Success => ok += 1,
            Some(_) => {}
            None => break,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu0;
    let connected = manager.stats().workers_connected;
    manager.shutdown_workers();
    let _ = sim.kill();
    let _ = sim.wait();
    println!(
        "{{\"system\":\"drover\",\"workload\":\"W5\",\"n\":{n},\"workers\":{workers},\"workers_connected_at_end\":{connected},\"succeeded\":{ok},\"wall_s\":{wall:.3},\"tasks_per_s\":{:.0},\"placements_per_s\":{:.0},\"master_bytes_per_queued_task\":{:.0},\"master_cpu_s\":{cpu:.2},\"master_cpu_us_per_task\":{:.1}}}",
        n as f64 / wall,
        ok as f64 / wall,
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        cpu * 1e6 / n as f64
    );
}
