//! Scale: one master, up to a million queued tasks and a thousand light
//! simulated workers spread over several processes (issue 22).
//!
//! The workers speak the real protocol over real TCP and report each task
//! done as soon as they get it, so what is measured is the master's own cost
//! per task. Three variants:
//!
//! * `plain`: tasks of one core, no category, no input;
//! * `categories`: tasks spread over four categories in bucketing mode;
//!   the workers report a measured peak memory that depends on the
//!   category, so each category learns its buckets while the run goes on;
//! * `cached`: every task takes the same 1 MB input, cached on the worker,
//!   so each worker receives the body once and every later task only names
//!   it.
//!
//! Prints one JSON line: master CPU per task (us; the bench process is the
//! master plus this result loop), RSS growth per queued task (bytes, while
//! every task is queued and no worker is connected), the dispatch rate from
//! the start of the workers to the last result, and how many tasks were
//! lost (never reported) or duplicated (reported more than once).
//!
//! `cargo bench -p drover-master --bench scale -- --tasks 1000000 --workers 1000 --procs 4 --variant plain`
//! (without `--tasks`, e.g. under `cargo test`, it does nothing);
//! benches/scale/run.sh runs the grid.

/// The allocator of the `drover` binary and the Python module, so that the
/// master measured here is the one users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_master::{CategoryConfig, Manager, Outcome, Task};
use drover_protocol::auth::{self, PeerHandshake};
use drover_protocol::{
    read_frame, write_frame, Ending, Hello, MasterMsg, Measured, Resources, TaskReport, WorkerMsg,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

/// Categories of the `categories` variant.
const CATEGORIES: u64 = 4;

fn arg(name: &str) -> Option<String> {
    let mut it = std::env::args();
    while let Some(a) = it.next() {
        if a == name {
            return it.next();
        }
    }
    None
}

fn arg_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
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

/// One simulator process: `workers` connections to `port`, numbered from
/// `first`, each answering every task at once.
fn simulate(port: u16, first: usize, workers: usize, cores: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut handles = Vec::with_capacity(workers);
        for i in first..first + workers {
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

/// What the simulated task "measured": a peak memory that depends on the
/// task's category (its id modulo [`CATEGORIES`], as the master side
/// assigns them) with some spread, so bucketing has something to learn.
fn measured(task_id: u64) -> Measured {
    let category = task_id % CATEGORIES;
    Measured {
        wall_time_s: 0.001,
        cpu_time_s: 0.001,
        memory_mb: 100.0 + 400.0 * category as f64 + (task_id % 17) as f64 * 5.0,
        disk_mb: 1.0,
        cores: 1.0,
        summary: None,
    }
}

async fn one_worker(port: u16, i: usize, cores: u32) -> std::io::Result<()> {
    // A real worker whose connection is dropped during the handshake (the
    // master keeps at most 256 handshakes open, and 1,000 workers starting
    // at once overflow that) connects again; so does this one.
    let (mut reader, mut writer) = loop {
        match connect(port, i, cores).await {
            Ok(halves) => break halves,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut buf = Vec::new();
    loop {
        let msg: MasterMsg = match read_frame(&mut reader, &mut buf).await {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        match msg {
            MasterMsg::PutFile { size, .. } => {
                // Take the body; the master then names the file in every
                // later task of this worker without sending it again.
                let mut body = (&mut reader).take(size);
                let got = tokio::io::copy(&mut body, &mut tokio::io::sink()).await?;
                if got != size {
                    return Ok(());
                }
            }
            MasterMsg::Run(task) => {
                let report = TaskReport {
                    task_id: task.task_id,
                    attempt: task.attempt,
                    ending: Ending::Exited,
                    exit_code: Some(0),
                    signal: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    measured: measured(task.task_id),
                    limit_exceeded: None,
                    missing_outputs: Vec::new(),
                    error: None,
                    started_ms: 0,
                    call_result: None,
                    call_raised: false,
                    call_result_size: None,
                };
                write_frame(
                    &mut writer,
                    &WorkerMsg::TaskDone {
                        report: Box::new(report),
                        outputs: Vec::new(),
                    },
                )
                .await?;
            }
            MasterMsg::Recall { task_id, attempt } => {
                // Every task ran as soon as it came: there is none to give back.
                let answer = WorkerMsg::Recalled {
                    task_id,
                    attempt,
                    given_back: false,
                };
                write_frame(&mut writer, &answer).await?;
            }
            MasterMsg::Ping => write_frame(&mut writer, &WorkerMsg::Pong).await?,
            MasterMsg::Shutdown | MasterMsg::Refused { .. } => return Ok(()),
            _ => {}
        }
        // Flush when nothing else is already waiting to be read, so a burst
        // of runs is answered in one write; after any message, not only a
        // run, or a report held back by a message after it would wait for
        // the next frame (a keepalive ping, 30 s later).
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

type Halves = (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    BufWriter<tokio::net::tcp::OwnedWriteHalf>,
);

/// Connects and passes the handshake as worker `i`.
async fn connect(port: u16, i: usize, cores: u32) -> std::io::Result<Halves> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut writer = BufWriter::new(w);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        drover_version: "scale-sim".into(),
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
    Ok((reader, writer))
}

/// Which tasks the run is made of.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Categories,
    Cached,
}

fn main() {
    if let Some(port) = arg("--simulate") {
        let port = port.parse().expect("port");
        simulate(
            port,
            arg_or("--first", 0),
            arg_or("--workers", 250),
            arg_or("--cores", 4),
        );
        return;
    }
    let Some(n) = arg("--tasks").and_then(|n| n.parse::<usize>().ok()) else {
        eprintln!(
            "usage: scale --tasks 1000000 --workers 1000 [--procs 4] [--cores 4] \
             [--variant plain|categories|cached]"
        );
        return;
    };
    let workers: usize = arg_or("--workers", 1000);
    let procs: usize = arg_or("--procs", 4).clamp(1, workers.max(1));
    let cores: u32 = arg_or("--cores", 4);
    let variant_name = arg("--variant").unwrap_or_else(|| "plain".into());
    let variant = match variant_name.as_str() {
        "plain" => Variant::Plain,
        "categories" => Variant::Categories,
        "cached" => Variant::Cached,
        other => {
            eprintln!("unknown variant {other:?}: plain, categories or cached");
            std::process::exit(2);
        }
    };

    let mut manager = Manager::builder()
        .port(0)
        .bind("127.0.0.1")
        .keepalive(Duration::from_secs(30), Duration::from_secs(300))
        .build()
        .expect("manager");
    let scratch = tempfile::tempdir().expect("scratch directory");
    let input = scratch.path().join("shared-1mb.dat");
    if variant == Variant::Cached {
        std::fs::write(&input, vec![7u8; 1 << 20]).expect("write the shared input");
    }
    if variant == Variant::Categories {
        for c in 0..CATEGORIES {
            manager
                .set_category(&format!("c{c}"), CategoryConfig::default())
                .expect("category");
        }
    }
    // One byte per task id, to count results; calloc'd, so its pages only
    // become resident during the result loop, after the RSS sample.
    let mut seen = vec![0u8; n + 1];

    // No worker is connected yet, so every task stays queued: the growth
    // is what the master keeps per queued task.
    let rss0 = rss();
    for i in 0..n {
        let task = Task::new(format!("true {i}"));
        let task = match variant {
            Variant::Plain => task.cores(1),
            // Ids start at 1 and are given in submission order, so the
            // simulator can tell the category from the id.
            Variant::Categories => task.category(format!("c{}", (i as u64 + 1) % CATEGORIES)),
            Variant::Cached => task.cores(1).input_file(&input, "data", true),
        };
        manager.submit(task).expect("submit");
    }
    while manager.stats().tasks_waiting < n as u64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss1 = rss();

    let cpu0 = cpu_s();
    let start = Instant::now();
    let exe = std::env::current_exe().expect("own path");
    let port = manager.port().to_string();
    let mut sims: Vec<Child> = (0..procs)
        .map(|p| {
            let first = workers * p / procs;
            let count = workers * (p + 1) / procs - first;
            Command::new(&exe)
                .args(["--simulate", &port])
                .args(["--first", &first.to_string()])
                .args(["--workers", &count.to_string()])
                .args(["--cores", &cores.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .expect("start a simulator process")
        })
        .collect();

    let (mut ok, mut failed, mut duplicated) = (0usize, 0usize, 0usize);
    let mut reported = 0usize;
    while reported < n {
        let Some(r) = manager.wait(Some(Duration::from_secs(120))) else {
            break;
        };
        match seen.get_mut(r.id as usize) {
            Some(s) if *s == 0 => {
                *s = 1;
                reported += 1;
                if r.outcome == Outcome::Success {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            _ => duplicated += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu0;
    // A duplicate would come after the last first report; give it a moment.
    while let Some(_late) = manager.wait(Some(Duration::from_millis(200))) {
        duplicated += 1;
    }
    let stats = manager.stats();
    let (connected, files_sent) = (stats.workers_connected, stats.files_sent);
    manager.shutdown_workers();
    for sim in &mut sims {
        let _ = sim.kill();
        let _ = sim.wait();
    }
    let lost = n - reported;
    println!(
        "{{\"system\":\"drover\",\"workload\":\"scale\",\"variant\":\"{variant_name}\",\"n\":{n},\"workers\":{workers},\"procs\":{procs},\"workers_connected_at_end\":{connected},\"succeeded\":{ok},\"failed\":{failed},\"lost\":{lost},\"duplicated\":{duplicated},\"wall_s\":{wall:.3},\"dispatch_per_s\":{:.0},\"master_bytes_per_queued_task\":{:.0},\"master_cpu_s\":{cpu:.2},\"master_cpu_us_per_task\":{:.2},\"files_sent\":{files_sent}}}",
        reported as f64 / wall,
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        cpu * 1e6 / n as f64
    );
}
