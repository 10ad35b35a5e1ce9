//! The worker: connects to a master, keeps a content-addressed file cache,
//! runs tasks in sandboxes within its declared resources, and reports back.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use drover_monitor::{Exec, Limits, Monitor, SpawnOptions};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::env::{EnvError, Environments};
use crate::exec::Running;
use crate::locate::MasterSource;
use crate::protocol::{
    self, auth_proof, check_sandbox_name, read_frame, verify_proof, Ending, FrameError, Hello,
    LimitHit, MasterMsg, Measured, OutputHeader, RunTask, TaskReport, WorkerMsg, PROTOCOL_VERSION,
    ROLE_MASTER, ROLE_WORKER,
};
use crate::slots::{self, Slot, Slots};
use crate::Resources;

/// How a worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The master's `HOST:PORT`, or the catalog and project to look it up by
    /// (`"host:port".into()` for the former).
    pub master: MasterSource,
    pub resources: Resources,
    pub password: Option<Vec<u8>>,
    /// Exit after this long without a task (connected or not).
    pub idle_timeout: Duration,
    /// Holds the file cache (shared by workers on this machine, kept across runs) and task sandboxes.
    pub workdir: PathBuf,
    /// Exit when the connection ends instead of reconnecting (embedded local workers).
    pub exit_on_disconnect: bool,
}

/// Why a worker stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum StopReason {
    IdleTimeout,
    MasterShutdown,
    Disconnected,
}

/// Detects this machine's resources: all cores, total memory, free disk under `workdir`.
pub fn detect_resources(workdir: &Path) -> Resources {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mb = procfs::Meminfo::current_mb().unwrap_or(1024);
    let disk_mb = free_disk_mb(workdir).unwrap_or(1024);
    Resources {
        cores,
        memory_mb,
        disk_mb,
        gpus: 0,
    }
}

trait MeminfoMb {
    fn current_mb() -> Option<u64>;
}

impl MeminfoMb for procfs::Meminfo {
    fn current_mb() -> Option<u64> {
        use procfs::Current;
        procfs::Meminfo::current()
            .ok()
            .map(|m| m.mem_total / (1024 * 1024))
    }
}

fn free_disk_mb(path: &Path) -> Option<u64> {
    let probe = std::iter::successors(Some(path), |p| p.parent()).find(|p| p.exists())?;
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct from a valid C string path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64 / (1024 * 1024))
}

/// Runs a worker until its idle timeout, until the master tells it to stop, or
/// (with `exit_on_disconnect`) until the connection ends. Reconnects with
/// exponential backoff otherwise.
pub async fn run_worker(config: WorkerConfig) -> anyhow::Result<StopReason> {
    let dirs = Dirs::create(&config.workdir)?;
    let shared = Shared {
        monitor: Monitor::new(drover_monitor::DEFAULT_INTERVAL),
        envs: Arc::new(Environments::new(
            config.workdir.join("envs"),
            dirs.cache.clone(),
        )),
        // Enough clean directories for every task that can run at once.
        slots: Arc::new(Slots::new(
            dirs.tasks.clone(),
            (config.resources.cores as usize).clamp(1, 1024) * 2,
        )),
    };
    info!(method = shared.monitor.method(), "tasks run monitored");
    let mut backoff = Duration::from_millis(250);
    let mut last_busy = Instant::now();
    let mut last_error = String::new();
    loop {
        // A catalog is asked again at every attempt: the master may have
        // restarted elsewhere.
        match config.master.connect().await {
            Ok((stream, addr)) => {
                backoff = Duration::from_millis(250);
                last_error.clear();
                let _ = stream.set_nodelay(true);
                info!(master = %addr, "connected");
                let outcome = Session::new(&config, &dirs, &shared)
                    .run(stream, &mut last_busy)
                    .await;
                match outcome {
                    Ok(StopReason::Disconnected) => {
                        warn!(master = %addr, "connection to the master ended");
                        if config.exit_on_disconnect {
                            return Ok(StopReason::Disconnected);
                        }
                    }
                    Ok(reason) => return Ok(reason),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => {
                let e = format!("{e:#}");
                if config.exit_on_disconnect {
                    bail!("{e}");
                }
                // Why the master cannot be reached is news once, not at
                // every retry; a user with nothing listening must see it.
                if e != last_error {
                    warn!("{e}; retrying until the idle timeout");
                } else {
                    debug!("{e}");
                }
                last_error = e;
            }
        }
        if last_busy.elapsed() >= config.idle_timeout {
            info!("idle timeout reached while disconnected; exiting");
            return Ok(StopReason::IdleTimeout);
        }
        tokio::time::sleep(backoff.min(config.idle_timeout.saturating_sub(last_busy.elapsed())))
            .await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// The worker's directories. The cache is shared by every worker process that
/// uses the same workdir; each process has its own task directory.
struct Dirs {
    cache: PathBuf,
    transfer: PathBuf,
    tasks: PathBuf,
}

impl Dirs {
    fn create(workdir: &Path) -> anyhow::Result<Dirs> {
        let cache = workdir.join("cache");
        let own = workdir.join(format!("w{}", std::process::id()));
        let dirs = Dirs {
            cache,
            transfer: own.join("transfer"),
            tasks: own.join("tasks"),
        };
        for d in [&dirs.cache, &dirs.transfer, &dirs.tasks] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(dirs)
    }

    fn cached_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.cache) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if let Some(own) = self.tasks.parent() {
            let _ = std::fs::remove_dir_all(own);
        }
    }
}

/// What a finished task hands to the writer: the report frame and the output files to stream after it.
struct Finished {
    report: TaskReport,
    outputs: Vec<(OutputHeader, PathBuf)>,
    task_dir: PathBuf,
    /// The task's stdout and stderr, open, for the slot's next task.
    output_files: Option<(std::fs::File, std::fs::File)>,
    allocation: Resources,
    gpus: Vec<u32>,
}

enum Outgoing {
    Msg(WorkerMsg),
    Done(Box<Finished>),
}

/// What the session tells a running task.
enum Control {
    /// Cancel (or the master is gone).
    Kill,
    /// Frozen over its memory allocation: go on with this allocation.
    Grow(Resources),
    /// Frozen over its memory allocation: end as over it.
    Refuse,
}

/// What a session has handed out, for starting queued tasks.
struct Book<'a> {
    free: &'a mut Resources,
    free_gpus: &'a mut Vec<u32>,
    running: &'a mut HashMap<(u64, u32), TaskHandle>,
}

/// The session's view of a task it started.
struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
    /// What it holds of this worker now (its allocation, grown or not).
    allocation: Resources,
}

/// What every task of this worker process shares, across reconnects.
struct Shared {
    /// The one poller that measures and limits every task.
    monitor: Monitor,
    envs: Arc<Environments>,
    slots: Arc<Slots>,
}

struct Session<'a> {
    config: &'a WorkerConfig,
    dirs: &'a Dirs,
    shared: &'a Shared,
}

impl<'a> Session<'a> {
    fn new(config: &'a WorkerConfig, dirs: &'a Dirs, shared: &'a Shared) -> Self {
        Session {
            config,
            dirs,
            shared,
        }
    }

    async fn run(&self, stream: TcpStream, last_busy: &mut Instant) -> anyhow::Result<StopReason> {
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
        let keepalive = self.handshake(&mut reader, &mut writer).await?;

        let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
        // Finished tasks pass through this loop before the writer, so their
        // resources are free before the master can read the report and send
        // the next task: otherwise a prompt master races the bookkeeping and
        // gets a spurious "refusing to overcommit".
        let (fin_tx, mut fin_rx) = mpsc::unbounded_channel::<Box<Finished>>();
        let writer_task = tokio::spawn(write_loop(writer, out_rx, Arc::clone(&self.shared.slots)));
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<MasterMsg>();
        let transfer = self.dirs.transfer.clone();
        let cache = self.dirs.cache.clone();
        let reader_task = tokio::spawn(read_loop(reader, msg_tx, cache, transfer));

        let total = self.config.resources;
        let mut free = total;
        let mut free_gpus: Vec<u32> = (0..total.gpus).rev().collect();
        let mut running: HashMap<(u64, u32), TaskHandle> = HashMap::new();
        // Tasks sent ahead (`RunTask::queued`), not started yet.
        let mut queue: VecDeque<Box<RunTask>> = VecDeque::new();
        // The master pings every `keepalive`; silence for several intervals means it is gone.
        let silence_limit = Duration::from_secs_f64((keepalive * 4.0).max(5.0));
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let reason = loop {
            tokio::select! {
                msg = msg_rx.recv() => {
                    let Some(msg) = msg else { break StopReason::Disconnected };
                    last_heard = Instant::now();
                    match msg {
                        MasterMsg::Run(task) => {
                            *last_busy = Instant::now();
                            let key = (task.task_id, task.attempt);
                            let known = running.contains_key(&key) || queue.iter().any(|t| (t.task_id, t.attempt) == key);
                            let room = if task.queued { total } else { free };
                            if !task.allocation.fits_in(&room) || known {
                                let reason = format!(
                                    "task {} needs {:?} but this worker has {:?} free; refusing to overcommit",
                                    task.task_id, task.allocation, room
                                );
                                warn!("{reason}");
                                let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Rejected { task_id: task.task_id, attempt: task.attempt, reason }));
                                continue;
                            }
                            if task.queued {
                                // It may fit already: a task may have ended
                                // while the master sent it.
                                queue.push_back(task);
                                let mut book = Book { free: &mut free, free_gpus: &mut free_gpus, running: &mut running };
                                self.start_queued(&mut queue, &mut book, &fin_tx, &out_tx);
                            } else {
                                let (control, control_rx) = mpsc::unbounded_channel();
                                free = free.saturating_sub(&task.allocation);
                                running.insert(key, TaskHandle { control, allocation: task.allocation });
                                self.start(task, control_rx, &mut free_gpus, &fin_tx, &out_tx);
                            }
                        }
                        MasterMsg::Kill { task_id, attempt } => {
                            if let Some(t) = running.get(&(task_id, attempt)) {
                                let _ = t.control.send(Control::Kill);
                            } else if let Some(pos) = queue.iter().position(|t| (t.task_id, t.attempt) == (task_id, attempt)) {
                                // Never started: it ends here, holding nothing.
                                queue.remove(pos);
                                let report = TaskReport::never_started(task_id, attempt, Ending::Killed, now_ms());
                                let _ = out_tx.send(Outgoing::Msg(WorkerMsg::TaskDone { report: Box::new(report), outputs: Vec::new() }));
                            }
                        }
                        MasterMsg::Grow { task_id, attempt, allocation } => {
                            // Gone meanwhile (it ended, or was killed): nothing to do.
                            let Some(t) = running.get_mut(&(task_id, attempt)) else { continue };
                            let grant = allocation.filter(|new| {
                                // The master's books match ours, but a worker
                                // never overcommits on anyone's word.
                                let extra = new.saturating_sub(&t.allocation);
                                t.allocation.fits_in(new) && new.gpus == t.allocation.gpus && extra.fits_in(&free)
                            });
                            match grant {
                                Some(new) => {
                                    free = free.saturating_sub(&new.saturating_sub(&t.allocation));
                                    t.allocation = new;
                                    let _ = t.control.send(Control::Grow(new));
                                }
                                None => {
                                    if let Some(new) = allocation {
                                        warn!("task {task_id}: refusing to grow to {new:?} with {free:?} free");
                                    }
                                    let _ = t.control.send(Control::Refuse);
                                }
                            }
                        }
                        MasterMsg::Ping => {
                            let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Pong));
                        }
                        MasterMsg::Shutdown => break StopReason::MasterShutdown,
                        other => warn!("unexpected message from master: {other:?}"),
                    }
                }
                fin = fin_rx.recv() => {
                    // This loop holds a sender, so the channel never closes here.
                    let Some(mut finished) = fin else { continue };
                    let held = running
                        .remove(&(finished.report.task_id, finished.report.attempt))
                        .map_or(finished.allocation, |t| t.allocation);
                    free = free.saturating_add(&held);
                    free_gpus.append(&mut finished.gpus);
                    *last_busy = Instant::now();
                    let _ = out_tx.send(Outgoing::Done(finished));
                    let mut book = Book { free: &mut free, free_gpus: &mut free_gpus, running: &mut running };
                    self.start_queued(&mut queue, &mut book, &fin_tx, &out_tx);
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        warn!("no word from the master for {:?}; dropping the connection", last_heard.elapsed());
                        break StopReason::Disconnected;
                    }
                    if running.is_empty() && queue.is_empty() && last_busy.elapsed() >= self.config.idle_timeout {
                        info!("idle for {:?}; leaving", self.config.idle_timeout);
                        let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Goodbye { reason: "idle timeout".into() }));
                        break StopReason::IdleTimeout;
                    }
                }
            }
        };
        // Tasks of a lost master are killed: the master requeues them elsewhere.
        for (_, t) in running.drain() {
            let _ = t.control.send(Control::Kill);
        }
        drop(out_tx);
        reader_task.abort();
        if reason == StopReason::Disconnected {
            writer_task.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
        }
        Ok(reason)
    }

    /// Starts the tasks sent ahead, in order, while the first fits, and
    /// tells the master of each.
    fn start_queued(
        &self,
        queue: &mut VecDeque<Box<RunTask>>,
        book: &mut Book<'_>,
        fin_tx: &mpsc::UnboundedSender<Box<Finished>>,
        out_tx: &mpsc::UnboundedSender<Outgoing>,
    ) {
        while queue
            .front()
            .is_some_and(|t| t.allocation.fits_in(book.free))
        {
            let Some(task) = queue.pop_front() else { break };
            let key = (task.task_id, task.attempt);
            let (control, control_rx) = mpsc::unbounded_channel();
            *book.free = book.free.saturating_sub(&task.allocation);
            book.running.insert(
                key,
                TaskHandle {
                    control,
                    allocation: task.allocation,
                },
            );
            let _ = out_tx.send(Outgoing::Msg(WorkerMsg::Started {
                task_id: key.0,
                attempt: key.1,
            }));
            self.start(task, control_rx, book.free_gpus, fin_tx, out_tx);
        }
    }

    /// Starts `task`, whose resources the caller has just taken from the
    /// free ones (gpus are picked here).
    fn start(
        &self,
        task: Box<RunTask>,
        control: mpsc::UnboundedReceiver<Control>,
        free_gpus: &mut Vec<u32>,
        fin_tx: &mpsc::UnboundedSender<Box<Finished>>,
        out_tx: &mpsc::UnboundedSender<Outgoing>,
    ) {
        let at = free_gpus
            .len()
            .saturating_sub(task.allocation.gpus as usize);
        let gpus = free_gpus.split_off(at);
        let slot = self.shared.slots.take();
        let ctx = TaskContext {
            task_dir: slot.dir,
            output_files: slot.outputs,
            cache: self.dirs.cache.clone(),
            transfer: self.dirs.transfer.clone(),
            gpus,
            monitor: self.shared.monitor.clone(),
            envs: Arc::clone(&self.shared.envs),
            to_master: out_tx.clone(),
        };
        let fin_tx = fin_tx.clone();
        tokio::spawn(async move {
            let finished = run_task(*task, ctx, control).await;
            let _ = fin_tx.send(Box::new(finished));
        });
    }

    async fn handshake(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        writer: &mut BufWriter<OwnedWriteHalf>,
    ) -> anyhow::Result<f64> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            drover_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: hostname(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            resources: self.config.resources,
            password: self.config.password.is_some(),
            cached: self.dirs.cached_ids(),
        };
        protocol::write_frame(writer, &WorkerMsg::Hello(Box::new(hello))).await?;
        writer.flush().await?;
        let mut buf = Vec::new();
        let mut my_nonce: Option<(String, String)> = None;
        loop {
            let msg: MasterMsg = read_frame(reader, &mut buf).await.map_err(|e| match e {
                FrameError::Closed => {
                    anyhow::anyhow!("the master closed the connection during the handshake")
                }
                other => anyhow::anyhow!("handshake with the master failed: {other}"),
            })?;
            match msg {
                MasterMsg::Refused { reason } => bail!("the master refused this worker: {reason}"),
                MasterMsg::Challenge { nonce } => {
                    let Some(password) = &self.config.password else {
                        bail!(
                            "the master requires a password; start the worker with --password-file"
                        );
                    };
                    let mine = protocol::new_nonce();
                    let proof = auth_proof(password, ROLE_WORKER, &nonce, &mine);
                    protocol::write_frame(
                        writer,
                        &WorkerMsg::AuthProof {
                            nonce: mine.clone(),
                            proof,
                        },
                    )
                    .await?;
                    writer.flush().await?;
                    my_nonce = Some((nonce, mine));
                }
                MasterMsg::Welcome {
                    proof,
                    keepalive_interval_s,
                } => {
                    if let Some(password) = &self.config.password {
                        let verified = match (&proof, &my_nonce) {
                            (Some(proof), Some((theirs, mine))) => {
                                verify_proof(password, ROLE_MASTER, mine, theirs, proof)
                            }
                            _ => false,
                        };
                        if !verified {
                            bail!("the master did not prove that it knows the password; refusing to work for it");
                        }
                    }
                    return Ok(keepalive_interval_s);
                }
                other => {
                    bail!("unexpected message from the master during the handshake: {other:?}")
                }
            }
        }
    }
}

/// Reads frames from the master. File bodies are streamed to disk here, so
/// that the main loop only sees small messages.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    msgs: mpsc::UnboundedSender<MasterMsg>,
    cache: PathBuf,
    transfer: PathBuf,
) {
    let mut buf = Vec::new();
    loop {
        let msg: MasterMsg = match read_frame(&mut reader, &mut buf).await {
            Ok(m) => m,
            Err(FrameError::Closed) => return,
            Err(e) => {
                warn!("bad frame from the master, dropping the connection: {e}");
                return;
            }
        };
        if let MasterMsg::PutFile {
            id,
            size,
            cache: keep,
        } = msg
        {
            let dir = if keep { &cache } else { &transfer };
            if let Err(e) = receive_file(&mut reader, dir, &id, size).await {
                warn!("receiving file {id}: {e}; dropping the connection");
                return;
            }
            continue;
        }
        if msgs.send(msg).is_err() {
            return;
        }
    }
}

/// Streams `size` bytes into `dir/id` through a temporary name, checking the
/// content hash for content-named files so a corrupt transfer never enters the cache.
async fn receive_file(
    reader: &mut BufReader<OwnedReadHalf>,
    dir: &Path,
    id: &str,
    size: u64,
) -> anyhow::Result<()> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        bail!("invalid file id {id:?}");
    }
    let tmp = dir.join(format!(".part-{}-{id}", std::process::id()));
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut hasher = id.starts_with("b3-").then(blake3::Hasher::new);
    let got = protocol::copy_body(reader, &mut file, size, |chunk| {
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
        }
    })
    .await?;
    if got < size {
        let _ = tokio::fs::remove_file(&tmp).await;
        bail!(
            "connection closed with {} bytes of the file still to come",
            size - got
        );
    }
    file.flush().await?;
    drop(file);
    if let Some(h) = hasher {
        let got = h.finalize().to_hex();
        if id.strip_prefix("b3-") != Some(got.as_str()) {
            let _ = tokio::fs::remove_file(&tmp).await;
            bail!("content of {id} does not match its name (got b3-{got})");
        }
    }
    // Read-only: cached inputs are hard-linked into sandboxes, and a task must not change what the next one reads.
    let mut perms = tokio::fs::metadata(&tmp).await?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    tokio::fs::set_permissions(&tmp, perms).await?;
    tokio::fs::rename(&tmp, dir.join(id)).await?;
    Ok(())
}

async fn write_loop(
    mut writer: BufWriter<OwnedWriteHalf>,
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    slots: Arc<Slots>,
) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(4096);
    let mut sent_sandboxes = Vec::new();
    while let Some(first) = out.recv().await {
        let mut next = Some(first);
        // Drain whatever is ready before flushing: one syscall for a burst of reports.
        while let Some(item) = next.take() {
            match item {
                Outgoing::Msg(msg) => {
                    frame.clear();
                    protocol::encode_frame(&msg, &mut frame)?;
                    writer.write_all(&frame).await?;
                }
                Outgoing::Done(finished) => {
                    let Finished {
                        report,
                        outputs,
                        task_dir,
                        output_files,
                        ..
                    } = *finished;
                    let headers = outputs.iter().map(|(h, _)| h.clone()).collect();
                    frame.clear();
                    protocol::encode_frame(
                        &WorkerMsg::TaskDone {
                            report: Box::new(report),
                            outputs: headers,
                        },
                        &mut frame,
                    )?;
                    writer.write_all(&frame).await?;
                    for (header, path) in &outputs {
                        stream_file(&mut writer, path, header.size).await?;
                    }
                    sent_sandboxes.push(Slot {
                        dir: task_dir,
                        outputs: output_files,
                    });
                }
            }
            next = out.try_recv().ok();
        }
        writer.flush().await?;
        // The reports go out first. A task directory whose task left nothing
        // takes a look to recycle, done here; one with files to remove is
        // cleaned on the blocking pool, off the writer's path.
        let slow: Vec<Slot> = sent_sandboxes
            .drain(..)
            .filter_map(|slot| slots.recycle_if_quick(slot))
            .collect();
        if !slow.is_empty() {
            let slots = Arc::clone(&slots);
            tokio::task::spawn_blocking(move || {
                for slot in slow {
                    slots.recycle(slot);
                }
            });
        }
    }
    writer.flush().await?;
    Ok(())
}

/// Streams exactly `size` bytes of `path`: if the file changed size since the
/// header was written, it is cut or zero-padded so the stream stays in step.
async fn stream_file(
    writer: &mut BufWriter<OwnedWriteHalf>,
    path: &Path,
    size: u64,
) -> anyhow::Result<()> {
    let mut sent = 0u64;
    if let Ok(mut file) = tokio::fs::File::open(path).await {
        sent = protocol::copy_body(&mut file, writer, size, |_| {}).await?;
    }
    if sent < size {
        warn!("{} shrank while being sent; padding", path.display());
        let zeros = vec![0u8; 64 * 1024];
        let mut left = size - sent;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            writer.write_all(&zeros[..n]).await?;
            left -= n as u64;
        }
    }
    Ok(())
}

struct TaskContext {
    task_dir: PathBuf,
    /// A reused slot's open (and empty) stdout and stderr; the sandbox
    /// exists then too.
    output_files: Option<(std::fs::File, std::fs::File)>,
    cache: PathBuf,
    transfer: PathBuf,
    gpus: Vec<u32>,
    monitor: Monitor,
    envs: Arc<Environments>,
    /// For a growable task's requests for more memory.
    to_master: mpsc::UnboundedSender<Outgoing>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run_task(
    task: RunTask,
    mut ctx: TaskContext,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Finished {
    let mut report =
        TaskReport::never_started(task.task_id, task.attempt, Ending::SetupFailed, now_ms());
    let sandbox = ctx.task_dir.join(slots::SANDBOX);
    let finished = |report: TaskReport, outputs| Finished {
        report,
        outputs,
        task_dir: ctx.task_dir.clone(),
        output_files: None,
        allocation: task.allocation,
        gpus: ctx.gpus.clone(),
    };
    // A slot that comes with its output files open has its sandbox too.
    let mut reused_outputs = ctx.output_files.take();
    if reused_outputs.is_none() {
        if let Err(e) = std::fs::create_dir_all(&sandbox) {
            report.error = Some(format!("cannot create sandbox {}: {e}", sandbox.display()));
            return finished(report, Vec::new());
        }
    }
    match place_inputs(&task, &sandbox, &ctx) {
        Ok(()) => {}
        Err(InputError::Missing(msg)) => {
            report.ending = Ending::InputMissing;
            report.error = Some(msg);
            return finished(report, Vec::new());
        }
        Err(InputError::Setup(msg)) => {
            report.error = Some(msg);
            return finished(report, Vec::new());
        }
    }
    // After the inputs, so that a task whose environment cannot be had
    // costs no unpack when its inputs are missing anyway.
    let activation = match &task.environment {
        Some(file_id) => match tokio::select! {
            r = activate(&ctx.envs, file_id, &task.env) => r,
            // A cancel need not wait for a large unpack; one left running
            // still completes for the next task that needs it. Nothing
            // but a kill can come before the task runs.
            _ = control.recv() => {
                report.ending = Ending::Killed;
                return finished(report, Vec::new());
            }
        } {
            Ok(vars) => vars,
            Err(EnvError::Missing(msg)) => {
                report.ending = Ending::InputMissing;
                report.error = Some(msg);
                return finished(report, Vec::new());
            }
            Err(EnvError::Setup(msg)) => {
                warn!("task {}: {msg}", task.task_id);
                report.error = Some(msg);
                return finished(report, Vec::new());
            }
        },
        None => Vec::new(),
    };
    let stdout_path = ctx.task_dir.join(slots::STDOUT);
    let stderr_path = ctx.task_dir.join(slots::STDERR);
    let wall_limit = task
        .wall_time_s
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64);
    let positive = |mb: u64| (task.enforce_limits && mb > 0).then_some(mb);
    let limits = Limits {
        memory_mb: positive(task.allocation.memory_mb),
        disk_mb: positive(task.allocation.disk_mb),
        wall_time: wall_limit,
        // Cores stay advisory (CORES, OMP_NUM_THREADS): the scheduler
        // already keeps the sum of allocations within the worker.
        cores: None,
    };
    // Kept open (the task gets duplicates) and read back through these
    // descriptors when it ends: no second open of each file.
    let mut outputs_kept: Option<(std::fs::File, std::fs::File)> = None;
    let spawned = (|| -> std::io::Result<Running> {
        // `sh -c` semantics; a plain `prog args` skips starting the shell.
        let mut cmd = Exec::shell(&task.command);
        cmd.current_dir(&sandbox);
        cmd.stdin(dev_null()?);
        // No O_TRUNC: a slot's output files are empty or absent (see
        // `slots`), and truncating an existing file costs a journal entry.
        let output = |path: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        };
        let (stdout, stderr) = match reused_outputs.take() {
            Some(files) => files,
            None => (output(&stdout_path)?, output(&stderr_path)?),
        };
        cmd.stdout(stdout.try_clone()?);
        cmd.stderr(stderr.try_clone()?);
        outputs_kept = Some((stdout, stderr));
        cmd.env("DROVER_TASK_ID", task.task_id.to_string());
        cmd.env("DROVER_SANDBOX", &sandbox);
        let cores = task.allocation.cores.max(1).to_string();
        cmd.env("CORES", &cores);
        cmd.env("OMP_NUM_THREADS", &cores);
        if task.allocation.gpus > 0 {
            let ids: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
        }
        for (k, v) in &task.env {
            cmd.env(k, v);
        }
        // Last, so the environment's PATH (which already includes the
        // task's own PATH after its bin) wins.
        for (k, v) in &activation {
            cmd.env(k, v);
        }
        let mut opts = SpawnOptions::default();
        if task.growable && limits.memory_mb.is_some() {
            let (to_master, task_id, attempt) = (ctx.to_master.clone(), task.task_id, task.attempt);
            opts.on_memory_limit = Some(Box::new(move |hit| {
                let _ = to_master.send(Outgoing::Msg(WorkerMsg::Grow {
                    task_id,
                    attempt,
                    limit_mb: hit.limit,
                    used_mb: hit.value,
                }));
            }));
        }
        Running::spawn(&ctx.monitor, cmd, &sandbox, limits, opts)
    })();
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(format!("cannot start /bin/sh: {e}"));
            return finished(report, Vec::new());
        }
    };
    let deadline = async {
        match wall_limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut ending = Ending::Exited;
    tokio::pin!(deadline);
    let exited = loop {
        tokio::select! {
            r = child.exited() => break r,
            _ = &mut deadline, if ending == Ending::Exited => {
                ending = Ending::WallTime;
                child.kill();
            }
            c = control.recv(), if ending == Ending::Exited => match c {
                // A dropped sender (lost connection) also means kill.
                None | Some(Control::Kill) => {
                    ending = Ending::Killed;
                    child.kill();
                }
                Some(Control::Grow(allocation)) => child.grow_memory(allocation.memory_mb),
                Some(Control::Refuse) => child.refuse_growth(),
            }
        }
    };
    let finished_run = match exited {
        Ok(()) => child.finish().await,
        Err(e) => {
            // Without the exit notification, end the tree rather than wait
            // on it blind; finishing then reaps it.
            child.kill();
            warn!("task {}: waiting for its exit: {e}", task.task_id);
            child.finish().await
        }
    };
    match finished_run {
        Ok(run) => {
            let summary = &run.summary;
            match run.exit {
                drover_monitor::Exit::Code(c) => report.exit_code = Some(c),
                drover_monitor::Exit::Signal(s) => report.signal = Some(s),
            }
            report.measured = Measured {
                wall_time_s: summary.wall_time,
                cpu_time_s: summary.cpu_time,
                memory_mb: summary.memory,
                disk_mb: summary.disk,
                cores: summary.cores_avg,
                summary: serde_json::to_value(summary).ok(),
            };
            match (&summary.limits_exceeded, ending) {
                // A cancel stays a cancel even if a limit was hit meanwhile.
                (_, Ending::Killed) => {}
                (Some(hit), _) => {
                    ending = if hit.resource == "wall_time" {
                        Ending::WallTime
                    } else {
                        Ending::LimitExceeded
                    };
                    let unit = if hit.resource == "wall_time" {
                        "s"
                    } else {
                        "MB"
                    };
                    report.error = Some(format!(
                        "{} went over its limit: {:.1} {unit} used, {:.1} {unit} allowed",
                        hit.resource, hit.value, hit.limit
                    ));
                    report.limit_exceeded = Some(LimitHit {
                        resource: hit.resource.clone(),
                        limit: hit.limit,
                        value: hit.value,
                    });
                }
                (None, Ending::WallTime) => {
                    report.limit_exceeded = Some(LimitHit {
                        resource: "wall_time".into(),
                        limit: wall_limit.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                        value: summary.wall_time,
                    });
                }
                (None, _) => {}
            }
        }
        Err(e) => report.error = Some(format!("waiting for the task: {e}")),
    }
    report.ending = ending;
    if let Some((stdout, stderr)) = &outputs_kept {
        report.stdout = read_capped(stdout);
        report.stderr = read_capped(stderr);
    }
    let mut outputs = Vec::with_capacity(task.outputs.len());
    let canonical_sandbox = if task.outputs.is_empty() {
        sandbox.clone()
    } else {
        sandbox.canonicalize().unwrap_or_else(|_| sandbox.clone())
    };
    for name in &task.outputs {
        match check_output(&canonical_sandbox, name) {
            Ok((path, size)) => outputs.push((
                OutputHeader {
                    name: name.clone(),
                    size,
                },
                path,
            )),
            Err(msg) => {
                debug!("task {}: {msg}", task.task_id);
                report.missing_outputs.push(name.clone());
                if report.error.is_none() && msg.contains("escapes") {
                    report.error = Some(msg);
                }
            }
        }
    }
    let mut done = finished(report, outputs);
    done.output_files = outputs_kept;
    done
}

/// Makes the task's environment ready and returns the variables that
/// activate it, with the task's own `PATH` (or the worker's) after the
/// environment's `bin`.
async fn activate(
    envs: &Environments,
    file_id: &str,
    task_env: &[(String, String)],
) -> Result<Vec<(String, String)>, EnvError> {
    let root = envs.ensure(file_id).await?;
    let path = match task_env.iter().rev().find(|(k, _)| k == "PATH") {
        Some((_, v)) => v.clone(),
        None => std::env::var("PATH").unwrap_or_default(),
    };
    drover_packager::activation_env(&root, &path)
        .map_err(|e| EnvError::Setup(format!("environment {file_id} cannot be activated: {e:#}")))
}

enum InputError {
    Missing(String),
    Setup(String),
}

fn place_inputs(task: &RunTask, sandbox: &Path, ctx: &TaskContext) -> Result<(), InputError> {
    for input in &task.inputs {
        check_sandbox_name(&input.name).map_err(InputError::Setup)?;
        let dest = sandbox.join(&input.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| InputError::Setup(format!("creating {}: {e}", parent.display())))?;
        }
        if input.cached {
            let src = ctx.cache.join(&input.file_id);
            if !src.exists() {
                return Err(InputError::Missing(format!(
                    "input {} ({}) is not in the worker's cache",
                    input.name, input.file_id
                )));
            }
            // Linked, not copied: a cached input costs no disk or time per task.
            if std::fs::hard_link(&src, &dest).is_err() {
                std::fs::copy(&src, &dest)
                    .map_err(|e| InputError::Setup(format!("placing input {}: {e}", input.name)))?;
            }
        } else {
            let src = ctx.transfer.join(&input.file_id);
            std::fs::rename(&src, &dest).map_err(|e| {
                InputError::Missing(format!(
                    "input {} ({}) was not received: {e}",
                    input.name, input.file_id
                ))
            })?;
            let mut perms = std::fs::metadata(&dest)
                .map_err(|e| InputError::Setup(e.to_string()))?
                .permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
            let _ = std::fs::set_permissions(&dest, perms);
        }
    }
    Ok(())
}

/// An output must be a regular file whose real path stays inside the sandbox:
/// a link to `/etc/passwd` is refused, not sent.
fn check_output(sandbox: &Path, name: &str) -> Result<(PathBuf, u64), String> {
    check_sandbox_name(name)?;
    let path = sandbox.join(name);
    let real = path
        .canonicalize()
        .map_err(|_| format!("output {name} was not created"))?;
    if !real.starts_with(sandbox) {
        return Err(format!(
            "output {name} escapes the task sandbox (it resolves to {})",
            real.display()
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("output {name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("output {name} is not a regular file"));
    }
    Ok((real, meta.len()))
}

/// Reads a captured stream without loading more than the cap into memory.
/// A duplicate of one `/dev/null` kept open for the worker's life: a dup
/// is cheaper than an open, once per task.
fn dev_null() -> std::io::Result<std::fs::File> {
    static DEV_NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    match DEV_NULL.get() {
        Some(f) => f.try_clone(),
        None => {
            let f = std::fs::File::open("/dev/null")?;
            let dup = f.try_clone()?;
            let _ = DEV_NULL.set(f);
            Ok(dup)
        }
    }
}

/// A task's output, from the worker's own descriptor of the file (read at
/// explicit offsets: the task's duplicate shares the file position).
fn read_capped(file: &std::fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    if len == 0 {
        return String::new();
    }
    if len <= protocol::OUTPUT_CAP_BYTES {
        let mut bytes = vec![0u8; len];
        return match file.read_exact_at(&mut bytes, 0) {
            Ok(()) => protocol::cap_output(&bytes),
            Err(_) => String::new(),
        };
    }
    let half = protocol::OUTPUT_CAP_BYTES / 2;
    let mut head = vec![0u8; half];
    let mut tail = vec![0u8; half];
    let ok = file.read_exact_at(&mut head, 0).is_ok()
        && file.read_exact_at(&mut tail, (len - half) as u64).is_ok();
    if !ok {
        return String::new();
    }
    format!(
        "{}\n[drover: {} bytes omitted]\n{}",
        String::from_utf8_lossy(&head),
        len - 2 * half,
        String::from_utf8_lossy(&tail)
    )
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a valid buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
