//! The shared poller: one sampler thread for every watched task.

use crate::cgroup::{join_raw, CgroupBase, TaskGroup};
use crate::disk;
use crate::procscan::{original_fd_limit, raise_fd_limit, swap_enabled, ProcReader, ProcStat};
use crate::scan::{all_processes, Scanner, Wanted};
use crate::spawn::{self, Exec};
use crate::summary::{Exit, LimitExceeded, Limits, Report, Summary, MB};
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default sampling interval. Like `resource_monitor`'s default of one
/// second: limits are enforced within a second, and 1000 watched processes
/// cost well under 1% of a core (see `benches/monitor/README.md`). Memory
/// peaks shorter than the interval are only seen through the root's rusage
/// (or exactly, through `memory.peak`, when the cgroup has the memory
/// controller).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Peak cores are measured over windows at least this long, so that one
/// short burst between two close samples does not read as many cores.
const CORES_WINDOW: Duration = Duration::from_secs(1);

/// How soon a task started with a memory limit gets its first look. Its
/// growth is unknown until then, so the look cannot wait for the next pass;
/// but a look at the instant it starts finds nothing to measure (and a short
/// task is gone before the sampler wakes), while one wake a few milliseconds
/// later serves every task started meanwhile: W1 tasks start every ~0.5 ms,
/// and one wake and sample per start cost a quarter of W1's rate. A task
/// can touch at most some tens of MB past its limit in this time.
const FIRST_LOOK: Duration = Duration::from_millis(5);

/// I/O counters are read every this many samples (and at a process's
/// first and the task's last sample). They are reported, never enforced,
/// and are cumulative, so skipped samples lose nothing except the I/O of an
/// orphan that dies unseen between two reads; reading them every time
/// would cost a fifth of the sampler's CPU.
const IO_EVERY: u64 = 4;

/// How the monitor finds a task's processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// A cgroup v2 group per task when one can be created, else /proc.
    #[default]
    Auto,
    /// Always /proc sampling (for comparison, or when cgroups must not be touched).
    Proc,
}

/// Options of a [`Monitor`].
#[derive(Clone, Debug)]
pub struct MonitorOptions {
    /// Time between samples.
    pub interval: Duration,
    /// cgroup or /proc.
    pub method: Method,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            interval: DEFAULT_INTERVAL,
            method: Method::Auto,
        }
    }
}

/// Called on the sampler thread when a task goes over its memory limit,
/// instead of killing it (see [`SpawnOptions::on_memory_limit`]). It must
/// not block: it runs with the task's state locked.
pub type MemoryLimitHook = Box<dyn Fn(&LimitExceeded) + Send + Sync>;

/// Per-task options beyond the command, sandbox and limits.
#[derive(Default)]
pub struct SpawnOptions {
    /// Receives one JSON object per line per sample (see the crate docs).
    pub series: Option<Box<dyn Write + Send>>,
    /// When set, a task that goes over its memory limit is frozen (its
    /// cgroup's `cgroup.freeze`) instead of killed, and the hook is told.
    /// The caller then decides: [`Watched::grow_memory`] raises the limit
    /// and thaws it, [`Watched::refuse_growth`] kills it as over its limit.
    /// A killed attempt's work is lost; a grown one's is not, which is
    /// what lets a scheduler start tasks in a small allocation cheaply.
    /// Only tasks in a cgroup can be frozen; others are killed as usual.
    ///
    /// ```no_run
    /// use drover_monitor::{Limits, Monitor, SpawnOptions};
    /// use std::sync::mpsc;
    /// let monitor = Monitor::new(std::time::Duration::from_secs(1));
    /// let (tx, rx) = mpsc::channel();
    /// let tx = std::sync::Mutex::new(tx);
    /// let opts = SpawnOptions {
    ///     on_memory_limit: Some(Box::new(move |hit| {
    ///         let _ = tx.lock().map(|t| t.send(hit.value));
    ///     })),
    ///     ..Default::default()
    /// };
    /// let limits = Limits { memory_mb: Some(100), ..Default::default() };
    /// let cmd = std::process::Command::new("my-task");
    /// let watched = monitor.spawn_with(cmd, None, limits, opts).unwrap();
    /// if let Ok(used_mb) = rx.recv() {
    ///     // Room for it: let it go on with 2 GB.
    ///     watched.grow_memory((used_mb as u64).max(2000));
    /// }
    /// let report = watched.wait().unwrap();
    /// ```
    pub on_memory_limit: Option<MemoryLimitHook>,
}

/// One shared poller. Clone is cheap (Arc inside). Creating it spawns exactly
/// one sampler thread, which sleeps on a condition variable while no task is
/// watched and exits when the last `Monitor` clone and [`Watched`] are gone.
#[derive(Clone)]
pub struct Monitor {
    handle: Arc<Handle>,
}

struct Handle {
    core: Arc<Core>,
    thread: Option<thread::JoinHandle<()>>,
}

struct Core {
    interval: Duration,
    cgroup: Option<CgroupBase>,
    swap: bool,
    ticks: f64,
    next_id: AtomicU64,
    state: Mutex<CoreState>,
    cv: Condvar,
}

#[derive(Default)]
struct CoreState {
    tasks: Vec<Arc<Task>>,
    shutdown: bool,
    /// A task needs a close look by this time, which may come before the
    /// sampler's next deadline (it started with a memory limit, or was let
    /// go on after a freeze).
    watch_by: Option<Instant>,
    /// When the sleeping sampler means to wake; `None` while it works, or
    /// has no task.
    sleeping_until: Option<Instant>,
}

impl CoreState {
    /// Asks for a look by `when`; true if the sampler must be woken for it
    /// (it sleeps past `when`), false if it will look by then anyway.
    fn look_by(&mut self, when: Instant) -> bool {
        self.watch_by = Some(self.watch_by.map_or(when, |w| w.min(when)));
        self.sleeping_until.is_some_and(|until| until > when)
    }
}

struct Task {
    id: u64,
    pid: i32,
    command: String,
    start: Instant,
    start_epoch: f64,
    /// A pidfd, or an eventfd the sampler signals when pidfd_open is missing.
    exit_fd: OwnedFd,
    is_pidfd: bool,
    group: Option<TaskGroup>,
    sandbox: Option<PathBuf>,
    limits: Limits,
    on_memory_limit: Option<MemoryLimitHook>,
    st: Mutex<TaskState>,
}

#[derive(Clone, Copy)]
struct Member {
    starttime: u64,
    ppid: i32,
    cpu_ticks: u64,
    rchar: u64,
    wchar: u64,
}

#[derive(Default)]
struct TaskState {
    members: HashMap<i32, Member>,
    /// Counters of processes that vanished without a live parent in the
    /// tree to inherit them (escapees reaped by init).
    dead_cpu_ticks: u64,
    dead_rchar: u64,
    dead_wchar: u64,
    cpu: f64,
    rchar: u64,
    wchar: u64,
    memory: u64,
    vm: u64,
    swap: u64,
    max_procs: u64,
    total_procs: u64,
    disk: u64,
    files: u64,
    next_disk: Option<Instant>,
    /// How long the last walk of the sandbox took.
    disk_walk: Duration,
    /// Past half its memory limit at the last sample, or on course to pass
    /// it before the next full pass: sampled more often.
    near_limit: bool,
    /// The memory in use at the last sample, and when: how fast it grows.
    memory_seen: Option<(Instant, u64)>,
    window: VecDeque<(Instant, f64)>,
    cores_peak: f64,
    last: Option<(Instant, f64)>,
    samples: u64,
    exceeded: Option<LimitExceeded>,
    /// The memory limit now: the spawn's, or what [`Watched::grow_memory`]
    /// raised it to.
    memory_limit_mb: Option<u64>,
    /// Frozen over its memory limit, waiting for [`Watched::grow_memory`]
    /// or [`Watched::refuse_growth`].
    growing: Option<LimitExceeded>,
    killed: bool,
    exit_signalled: bool,
    reaped: bool,
    finished: bool,
    series: Option<Box<dyn Write + Send>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one sampling pass must not stop every later task from
    // finishing; the state is only counters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `pid` (our unreaped child) has exited, without reaping it, so the
/// final sample can still read its /proc entry.
fn has_exited(pid: i32, block: bool) -> io::Result<bool> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
        // SAFETY: waitid on our own child with a valid siginfo pointer.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: reading the pid field waitid filled (0 when nothing exited).
        return Ok(unsafe { info.si_pid() } != 0);
    }
}

impl Monitor {
    /// A monitor sampling every `interval`, using a cgroup when it can.
    pub fn new(interval: Duration) -> Monitor {
        Monitor::with_options(MonitorOptions {
            interval,
            method: Method::Auto,
        })
    }

    /// A monitor with explicit options.
    pub fn with_options(opts: MonitorOptions) -> Monitor {
        let cgroup = match opts.method {
            Method::Auto => CgroupBase::create(),
            Method::Proc => None,
        };
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let core = Arc::new(Core {
            interval: opts.interval.max(Duration::from_millis(1)),
            cgroup,
            swap: swap_enabled(),
            ticks: if ticks > 0 { ticks as f64 } else { 100.0 },
            next_id: AtomicU64::new(1),
            state: Mutex::new(CoreState::default()),
            cv: Condvar::new(),
        });
        let thread_core = Arc::clone(&core);
        let spawned = thread::Builder::new()
            .name("drover-monitor".into())
            .spawn(move || sampler(thread_core));
        let thread = spawned
            .map_err(|e| {
                // Tasks still get exit, rusage and final-sample measurements,
                // just no periodic samples or limits.
                tracing::error!("cannot start the monitor's sampler thread: {e}");
            })
            .ok();
        Monitor {
            handle: Arc::new(Handle { core, thread }),
        }
    }

    /// `"cgroup2"`, `"cgroup2+proc"` or `"proc"`: what tasks spawned now
    /// would most likely use (a task falls back to `"proc"` if its own group
    /// cannot be created).
    pub fn method(&self) -> &'static str {
        match &self.handle.core.cgroup {
            Some(b) if b.has_memory() => "cgroup2",
            Some(_) => "cgroup2+proc",
            None => "proc",
        }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.handle.core.interval
    }

    /// Spawns `cmd` in its own session and process group (and cgroup when
    /// possible, joined in `pre_exec` before exec so no descendant escapes),
    /// and watches it. `sandbox` is the directory whose size is the task's
    /// disk usage. Stdio and the working directory are the caller's to set
    /// on `cmd`; `Stdio::piped()` handles are closed, so use files or
    /// inherited descriptors.
    pub fn spawn(
        &self,
        cmd: Command,
        sandbox: Option<&Path>,
        limits: Limits,
    ) -> io::Result<Watched> {
        self.spawn_with(cmd, sandbox, limits, SpawnOptions::default())
    }

    /// [`Monitor::spawn`] with a sample series and other options.
    pub fn spawn_with(
        &self,
        cmd: Command,
        sandbox: Option<&Path>,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Watched> {
        self.launch(Launch::Command(cmd), sandbox, limits, opts)
    }

    /// Like [`Monitor::spawn`], for an [`Exec`]: the child is started with
    /// `clone(CLONE_VM | CLONE_VFORK)` instead of `fork`, which in a big
    /// multi-threaded process is several times cheaper (see the `spawn`
    /// module). The worker starts every task this way.
    pub fn spawn_exec(
        &self,
        exec: Exec,
        sandbox: Option<&Path>,
        limits: Limits,
    ) -> io::Result<Watched> {
        self.launch(Launch::Exec(exec), sandbox, limits, SpawnOptions::default())
    }

    /// [`Monitor::spawn_exec`] with options.
    pub fn spawn_exec_with(
        &self,
        exec: Exec,
        sandbox: Option<&Path>,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Watched> {
        self.launch(Launch::Exec(exec), sandbox, limits, opts)
    }

    fn launch(
        &self,
        how: Launch,
        sandbox: Option<&Path>,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Watched> {
        let core = &self.handle.core;
        let id = core.next_id.fetch_add(1, Ordering::Relaxed);
        let group = core.cgroup.as_ref().and_then(|b| {
            b.task_group(&format!("task-{id}"))
                .map_err(|e| tracing::debug!("no cgroup for task {id}: {e}"))
                .ok()
        });
        if let (Some(g), Some(cores)) = (&group, limits.cores) {
            g.set_cores(cores);
        }
        let fd_limit = original_fd_limit();
        let procs = group.as_ref().map(|g| g.procs_path.clone());
        let start = Instant::now();
        let start_epoch = epoch_now();
        let (command, spawned) = {
            let dir_fd = group.as_ref().map(|g| g.dir_fd());
            let cgroup = group.as_ref().map(|g| spawn::CgroupTarget {
                procs: &g.procs_path,
                dir_fd: dir_fd
                    .as_ref()
                    .and_then(|fd| fd.as_ref())
                    .map(|fd| fd.as_fd()),
            });
            match how {
                Launch::Exec(exec) => (exec.command_line(), spawn::spawn(exec, cgroup, fd_limit)),
                Launch::Command(cmd) => {
                    let mut command = cmd.get_program().to_string_lossy().into_owned();
                    for a in cmd.get_args() {
                        command.push(' ');
                        command.push_str(&a.to_string_lossy());
                    }
                    (command, spawn_command(cmd, procs, fd_limit))
                }
            }
        };
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(g) = &group {
                    g.remove();
                }
                return Err(e);
            }
        };
        let (exit_fd, is_pidfd) = match pidfd_open(pid) {
            Ok(fd) => (fd, true),
            Err(e) => {
                tracing::debug!("pidfd_open unavailable ({e}); exit is signalled by the sampler");
                match eventfd() {
                    Ok(fd) => (fd, false),
                    Err(e) => {
                        // SAFETY: killing and reaping the child we just spawned.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                            libc::waitpid(pid, std::ptr::null_mut(), 0);
                        }
                        if let Some(g) = &group {
                            g.remove();
                        }
                        return Err(e);
                    }
                }
            }
        };
        let task = Arc::new(Task {
            id,
            pid,
            command,
            start,
            start_epoch,
            exit_fd,
            is_pidfd,
            group,
            sandbox: sandbox.map(Path::to_path_buf),
            st: Mutex::new(TaskState {
                series: opts.series,
                memory_limit_mb: limits.memory_mb,
                // Nothing is known of how fast it grows (see `sample`).
                near_limit: limits.memory_mb.is_some(),
                ..TaskState::default()
            }),
            limits,
            on_memory_limit: opts.on_memory_limit,
        });
        let watch_closely = task.limits.memory_mb.is_some();
        let wake = {
            let mut s = lock(&core.state);
            s.tasks.push(Arc::clone(&task));
            let sleeper_too_late = watch_closely && s.look_by(task.start + FIRST_LOOK);
            s.tasks.len() == 1 || sleeper_too_late
        };
        // A sampler with tasks already sleeps only until its next pass,
        // which will see this one; waking it for every start cost a thread
        // switch per task. A task with a memory limit cannot wait that long,
        // but it can wait for a wake already planned within FIRST_LOOK.
        if wake {
            core.cv.notify_all();
        }
        Ok(Watched {
            monitor: self.clone(),
            task,
        })
    }
}

/// How a task's process is started.
enum Launch {
    Command(Command),
    Exec(Exec),
}

/// Starts `cmd` with `fork` (std's only way with a `pre_exec` hook) in a
/// new session and in the cgroup whose `cgroup.procs` is `procs`. Returns
/// the pid; the caller reaps it.
fn spawn_command(
    mut cmd: Command,
    procs: Option<CString>,
    fd_limit: Option<libc::rlimit>,
) -> io::Result<i32> {
    // SAFETY: the closure only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(lim) = &fd_limit {
                // Best effort: the task gets the limit the user set.
                libc::setrlimit(libc::RLIMIT_NOFILE, lim);
            }
            // A session of its own gives the tree a process group to kill
            // and a session id that survives double forks, for /proc mode.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(p) = &procs {
                join_raw(p)?;
            }
            Ok(())
        });
    }
    // The Child handle is not needed: the pid stays ours until we reap it
    // with wait4, and dropping Child neither waits nor kills.
    Ok(cmd.spawn()?.id() as i32)
}

impl Drop for Handle {
    /// Runs when the last `Monitor` and `Watched` are gone. Joining makes the
    /// thread's reference to the core go away now, so the monitor's cgroup is
    /// removed before the process (e.g. the CLI) exits.
    fn drop(&mut self) {
        lock(&self.core.state).shutdown = true;
        self.core.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sampler(core: Arc<Core>) {
    let mut reader = ProcReader::keeping(raise_fd_limit());
    let mut scanner = Scanner::default();
    let mut pids = Vec::new();
    let mut buf = String::new();
    let fast =
        (core.interval / 10).clamp(Duration::from_millis(50).min(core.interval), core.interval);
    let mut next_full = Instant::now();
    loop {
        let tasks = {
            let mut s = lock(&core.state);
            while !s.shutdown && s.tasks.is_empty() {
                s = core.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.shutdown {
                return;
            }
            s.watch_by = None;
            s.tasks.clone()
        };
        let now = Instant::now();
        if now >= next_full {
            full_pass(
                &core,
                &tasks,
                &mut scanner,
                &mut reader,
                &mut pids,
                &mut buf,
                now,
            );
            reader.end_pass();
            next_full = now + core.interval;
        } else {
            // Between full passes, only the tasks close to their memory
            // limit, through the processes already known.
            for t in &tasks {
                let mut st = lock(&t.st);
                if st.reaped || !st.near_limit {
                    continue;
                }
                let members = match &t.group {
                    Some(g) => t.group_members(g, &st, &mut reader, &mut pids),
                    None => t.known_members(&st, &mut reader),
                };
                t.sample(&core, &mut st, &members, &mut reader, &mut buf, now, false);
            }
        }
        let near_limit = tasks.iter().any(|t| lock(&t.st).near_limit);
        drop(tasks);
        let deadline = if near_limit {
            (now + fast).min(next_full)
        } else {
            next_full
        };
        let mut s = lock(&core.state);
        loop {
            let deadline = s.watch_by.map_or(deadline, |w| w.min(deadline));
            let left = deadline.saturating_duration_since(Instant::now());
            if s.shutdown || left.is_zero() {
                s.sleeping_until = None;
                break;
            }
            s.sleeping_until = Some(deadline);
            s = core
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// One sample of every task: /proc-mode tasks through one scan of /proc.
fn full_pass(
    core: &Core,
    tasks: &[Arc<Task>],
    scanner: &mut Scanner,
    reader: &mut ProcReader,
    pids: &mut Vec<i32>,
    buf: &mut String,
    now: Instant,
) {
    let mut by_scan: Vec<Option<Vec<ProcStat>>> = vec![None; tasks.len()];
    let mut scanned = Vec::new();
    let mut wanted = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let st = lock(&t.st);
        if t.group.is_none() && !st.reaped {
            let known = st.members.iter().map(|(&p, m)| (p, m.starttime)).collect();
            wanted.push(Wanted { root: t.pid, known });
            scanned.push(i);
        }
    }
    if !wanted.is_empty() {
        let found = scanner.pass(reader, wanted);
        for (i, members) in scanned.into_iter().zip(found) {
            by_scan[i] = Some(members);
        }
    }
    for (i, t) in tasks.iter().enumerate() {
        let mut st = lock(&t.st);
        if st.reaped {
            continue;
        }
        let members = match &t.group {
            Some(g) => t.group_members(g, &st, reader, pids),
            None => by_scan[i].take().unwrap_or_default(),
        };
        t.sample(core, &mut st, &members, reader, buf, now, false);
        if !t.is_pidfd && !st.exit_signalled && has_exited(t.pid, false).unwrap_or(false) {
            st.exit_signalled = true;
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to our eventfd.
            unsafe { libc::write(t.exit_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

impl Task {
    /// The group's processes. A process already seen is re-read through
    /// `statm` (its start time and parent are known, and the group's
    /// `cpu.stat` gives CPU time), a new one through `stat`.
    fn group_members(
        &self,
        g: &TaskGroup,
        st: &TaskState,
        reader: &mut ProcReader,
        pids: &mut Vec<i32>,
    ) -> Vec<ProcStat> {
        pids.clear();
        if g.pids(pids).is_err() {
            return Vec::new();
        }
        let mut out: Vec<ProcStat> = Vec::with_capacity(pids.len() + 1);
        for &pid in pids.iter() {
            let known = st.members.get(&pid).and_then(|m| {
                let (vsize, rss_bytes) = reader.statm(pid)?;
                Some(ProcStat {
                    pid,
                    ppid: m.ppid,
                    pgrp: 0,
                    session: 0,
                    starttime: m.starttime,
                    zombie: vsize == 0,
                    cpu_ticks: m.cpu_ticks,
                    vsize,
                    rss_bytes,
                })
            });
            if let Some(s) = known.or_else(|| reader.stat(pid)) {
                out.push(s);
            }
        }
        // A zombie leaves cgroup.procs before its parent reaps it; the root is
        // read anyway so the final sample still sees its counters.
        if !out.iter().any(|s| s.pid == self.pid) {
            if let Some(s) = reader.stat(self.pid) {
                out.push(s);
            }
        }
        out
    }

    /// Known processes only, for the final sample of a /proc-mode task,
    /// which must not cost a full /proc scan per finished task.
    fn known_members(&self, st: &TaskState, reader: &mut ProcReader) -> Vec<ProcStat> {
        let mut out: Vec<ProcStat> = st
            .members
            .iter()
            .filter(|(&pid, _)| pid != self.pid)
            .filter_map(|(&pid, m)| reader.stat(pid).filter(|s| s.starttime == m.starttime))
            .collect();
        if let Some(s) = reader.stat(self.pid) {
            out.push(s);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn sample(
        &self,
        core: &Core,
        st: &mut TaskState,
        members: &[ProcStat],
        reader: &mut ProcReader,
        buf: &mut String,
        now: Instant,
        last: bool,
    ) {
        let (mut rss, mut vm, mut swap, mut live) = (0u64, 0u64, 0u64, 0u64);
        let (mut cpu_ticks, mut rchar, mut wchar) = (0u64, 0u64, 0u64);
        let mut current: HashMap<i32, Member> = HashMap::with_capacity(members.len());
        for s in members {
            let prev = st
                .members
                .get(&s.pid)
                .filter(|m| m.starttime == s.starttime)
                .copied();
            if prev.is_none() {
                st.total_procs += 1;
            }
            let fresh_io = last || prev.is_none() || st.samples.is_multiple_of(IO_EVERY);
            let io = if fresh_io { reader.io(s.pid) } else { None };
            let (r, w) = io.or(prev.map(|m| (m.rchar, m.wchar))).unwrap_or((0, 0));
            if !s.zombie {
                live += 1;
                rss += s.rss_bytes;
                vm += s.vsize;
                if core.swap {
                    swap += reader.swap(s.pid).unwrap_or(0);
                }
            }
            cpu_ticks += s.cpu_ticks;
            rchar += r;
            wchar += w;
            current.insert(
                s.pid,
                Member {
                    starttime: s.starttime,
                    ppid: s.ppid,
                    cpu_ticks: s.cpu_ticks,
                    rchar: r,
                    wchar: w,
                },
            );
        }
        for (pid, m) in &st.members {
            if current.get(pid).is_some_and(|c| c.starttime == m.starttime) {
                continue;
            }
            // A parent still in the tree adds a reaped child's counters to its
            // own cumulative ones; only orphans' counters would be lost.
            if current.contains_key(&m.ppid) {
                continue;
            }
            st.dead_cpu_ticks += m.cpu_ticks;
            st.dead_rchar += m.rchar;
            st.dead_wchar += m.wchar;
        }
        st.members = current;
        st.samples += 1;

        let cpu_proc = (cpu_ticks + st.dead_cpu_ticks) as f64 / core.ticks;
        let cpu_cg = self
            .group
            .as_ref()
            .and_then(|g| g.cpu_usec())
            .map(|us| us as f64 / 1e6);
        st.cpu = st.cpu.max(cpu_cg.unwrap_or(cpu_proc));
        st.rchar = st.rchar.max(rchar + st.dead_rchar);
        st.wchar = st.wchar.max(wchar + st.dead_wchar);
        let cg_mem = self.group.as_ref().and_then(|g| g.memory_peak());
        let memory = cg_mem.unwrap_or(rss);
        st.memory = st.memory.max(memory);
        st.vm = st.vm.max(vm);
        let swap = self
            .group
            .as_ref()
            .and_then(|g| g.swap_peak(buf))
            .unwrap_or(swap);
        st.swap = st.swap.max(swap);
        st.max_procs = st.max_procs.max(live);

        let cpu = st.cpu;
        st.window.push_back((now, cpu));
        while st.window.len() > 2 && now.duration_since(st.window[1].0) >= CORES_WINDOW {
            st.window.pop_front();
        }
        if let Some(&(t0, c0)) = st.window.front() {
            let dt = now.duration_since(t0);
            if dt >= CORES_WINDOW {
                st.cores_peak = st.cores_peak.max((cpu - c0) / dt.as_secs_f64());
            }
        }

        if let Some(dir) = &self.sandbox {
            if last || !matches!(st.next_disk, Some(t) if now < t) {
                let t0 = Instant::now();
                let (bytes, files) = disk::usage(dir);
                // Big sandboxes are walked less often, so that the walk
                // costs at most ~2% of the time between walks.
                st.disk_walk = t0.elapsed();
                let cost = st.disk_walk * 50;
                st.next_disk = Some(now + cost.max(core.interval));
                st.disk = st.disk.max(bytes);
                st.files = st.files.max(files);
            }
        }

        // A task past half its memory limit is sampled ten times as often
        // (see `sampler`), so that one that keeps growing is stopped close
        // to its limit rather than up to an interval's worth of growth past
        // it: touching memory costs CPU, and a killed attempt's is lost.
        // One growing fast (W4's tasks touch about 800 MB a second here)
        // can pass a limit it is far from within one interval: its course
        // counts too.
        // Its course is unknown until a second sample: watched closely.
        let projected = match st.memory_seen {
            Some((then, before)) if memory > before && now > then => {
                let per_s = (memory - before) as f64 / now.duration_since(then).as_secs_f64();
                memory.saturating_add((per_s * core.interval.as_secs_f64()) as u64)
            }
            Some(_) => memory,
            None => u64::MAX,
        };
        st.memory_seen = Some((now, memory));
        st.near_limit = st.exceeded.is_none()
            && st.growing.is_none()
            && st.memory_limit_mb.is_some_and(|l| {
                let limit = l.saturating_mul(MB as u64);
                memory.saturating_mul(2) >= limit || projected >= limit
            });
        if !last && st.exceeded.is_none() {
            let hit = self.check_limits(st, memory, cg_mem.is_some(), reader, now);
            if let Some(hit) = hit {
                tracing::debug!(pid = self.pid, "limit exceeded: {hit:?}");
                if !self.freeze_for_growth(st, &hit) {
                    st.exceeded = Some(hit);
                }
            }
        }
        if !last && st.exceeded.is_some() {
            // Repeated every sample until the root is reaped: a seen
            // escapee may have forked again since the last kill.
            self.kill_tree(st, reader);
        }

        if let Some(series) = st.series.as_mut() {
            let wall = now.duration_since(self.start).as_secs_f64();
            let cores_now = match st.last {
                Some((t, c)) if now > t => (cpu - c) / now.duration_since(t).as_secs_f64(),
                _ => 0.0,
            };
            let line = serde_json::json!({
                "wall_time": wall,
                "cpu_time": cpu,
                "cores": cores_now,
                "memory": memory as f64 / MB,
                "virtual_memory": vm as f64 / MB,
                "swap_memory": swap as f64 / MB,
                "processes": live,
                "total_processes": st.total_procs,
                "bytes_read": st.rchar as f64 / MB,
                "bytes_written": st.wchar as f64 / MB,
                "disk": st.disk as f64 / MB,
                "total_files": st.files,
            });
            if let Err(e) = writeln!(series, "{line}").and_then(|_| series.flush()) {
                tracing::warn!("cannot write sample series: {e}");
                st.series = None;
            }
        }
        st.last = Some((now, cpu));
    }

    /// SIGKILL is delivered asynchronously; waits (bounded) until the seen
    /// processes, and any unseen one still in the task's session or process
    /// group, are dead, so the caller can rely on the tree being gone. Called
    /// after the root is reaped; the cgroup path waits on `cgroup.events`.
    fn wait_tree_dead(&self, st: &TaskState, reader: &mut ProcReader, pids: &mut Vec<i32>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let wait = |reader: &mut ProcReader, pid: i32, starttime: u64| {
            while reader
                .stat(pid)
                .is_some_and(|s| s.starttime == starttime && !s.zombie)
            {
                if Instant::now() >= deadline {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
        };
        for (&pid, m) in &st.members {
            if pid != self.pid {
                wait(reader, pid, m.starttime);
            }
        }
        // The process group id stays reserved while any process (even a
        // zombie) is in the group, so ESRCH means nothing is left and the
        // common case costs one syscall instead of a /proc scan.
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(-self.pid, 0) } != 0 {
            return;
        }
        for p in &all_processes(reader, pids) {
            if (p.session == self.pid || p.pgrp == self.pid) && !p.zombie {
                // SAFETY: a process in the task's session or group, seen just now.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
                wait(reader, p.pid, p.starttime);
            }
        }
    }

    fn check_limits(
        &self,
        st: &TaskState,
        memory: u64,
        exact_memory: bool,
        reader: &mut ProcReader,
        now: Instant,
    ) -> Option<LimitExceeded> {
        let over = |resource: &str, limit: f64, value: f64| {
            Some(LimitExceeded {
                resource: resource.to_string(),
                limit,
                value,
            })
        };
        if let (Some(limit), None) = (st.memory_limit_mb, &st.growing) {
            let limit_b = limit.saturating_mul(MB as u64);
            if memory > limit_b {
                // Summed RSS counts a page shared by k processes k times, so
                // before killing, the breach is confirmed with PSS, which
                // counts every page once in total.
                let value = if exact_memory {
                    memory
                } else {
                    st.members.keys().filter_map(|&p| reader.pss(p)).sum()
                };
                if value > limit_b {
                    return over("memory", limit as f64, value as f64 / MB);
                }
            }
        }
        if let Some(limit) = self.limits.disk_mb {
            if st.disk > limit.saturating_mul(MB as u64) {
                return over("disk", limit as f64, st.disk as f64 / MB);
            }
        }
        if let Some(limit) = self.limits.wall_time {
            let wall = now.duration_since(self.start);
            if wall > limit {
                return over("wall_time", limit.as_secs_f64(), wall.as_secs_f64());
            }
        }
        None
    }

    /// A memory breach of a task with a growth hook: freezes its group and
    /// tells the hook. False when the task must be killed instead (another
    /// resource, no hook, no cgroup, or the freeze failed).
    fn freeze_for_growth(&self, st: &mut TaskState, hit: &LimitExceeded) -> bool {
        let (Some(hook), Some(group)) = (&self.on_memory_limit, &self.group) else {
            return false;
        };
        if hit.resource != "memory" || st.reaped {
            return false;
        }
        if let Err(e) = group.freeze(true) {
            tracing::debug!(pid = self.pid, "cannot freeze the task's group: {e}");
            return false;
        }
        st.growing = Some(hit.clone());
        hook(hit);
        true
    }

    /// SIGKILLs the group, the process group, every seen escapee still
    /// alive with the same start time (so a recycled pid is left alone), and
    /// the root. Never after the root is reaped: its pid, and so the process
    /// group id, could then belong to someone else.
    fn kill_tree(&self, st: &mut TaskState, reader: &mut ProcReader) {
        if st.reaped {
            return;
        }
        st.killed = true;
        if let Some(g) = &self.group {
            g.kill();
        }
        // SAFETY: the root is our unreaped child, so its pid and process
        // group id cannot have been recycled.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        for (&pid, m) in &st.members {
            if pid != self.pid && reader.stat(pid).is_some_and(|s| s.starttime == m.starttime) {
                // SAFETY: sending a signal to a process we identified above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if self.is_pidfd {
            // SAFETY: pidfd_send_signal on our pidfd with no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.exit_fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        } else {
            // SAFETY: the root is our unreaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

/// A task being watched. Dropping it before it finished kills and reaps the
/// tree and discards the report.
pub struct Watched {
    monitor: Monitor,
    task: Arc<Task>,
}

impl Watched {
    /// Pid of the root process (also its session and process group id).
    pub fn pid(&self) -> i32 {
        self.task.pid
    }

    /// How this task is measured: `"cgroup2"`, `"cgroup2+proc"` or `"proc"`.
    pub fn method(&self) -> &'static str {
        self.task.method()
    }

    /// A descriptor that becomes readable when the root process exits; wrap
    /// it in tokio's `AsyncFd` and call [`Watched::try_finish`] when it is.
    ///
    /// It is a pidfd (`pidfd_open`, Linux 5.3+), readable the moment the root
    /// exits. Without pidfd support it is an eventfd the sampler thread
    /// signals when it notices the exit, so exit is then learnt up to one
    /// interval late.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.task.exit_fd.as_fd()
    }

    /// Lets a task frozen over its memory limit (see
    /// [`SpawnOptions::on_memory_limit`]) go on with a limit of `memory_mb`.
    /// Does nothing if the task is not waiting for growth (it ended, or was
    /// killed meanwhile). A limit still below what it uses is breached again
    /// at the next sample.
    pub fn grow_memory(&self, memory_mb: u64) {
        let mut st = lock(&self.task.st);
        if st.growing.take().is_none() || st.exceeded.is_some() {
            return;
        }
        st.memory_limit_mb = Some(memory_mb);
        // It grows on from where it stopped, at or past its old limit, at a
        // pace the frozen samples do not show.
        st.near_limit = true;
        st.memory_seen = None;
        let core = &self.monitor.handle.core;
        lock(&core.state).look_by(Instant::now());
        core.cv.notify_all();
        if let Some(group) = &self.task.group {
            if let Err(e) = group.freeze(false) {
                // A frozen task that cannot be thawed would hang until its
                // wall time: end it as over its limit instead.
                tracing::warn!(pid = self.task.pid, "cannot thaw the task's group: {e}");
                st.exceeded = Some(LimitExceeded {
                    resource: "memory".into(),
                    limit: memory_mb as f64,
                    value: st.memory as f64 / MB,
                });
                let mut reader = ProcReader::new();
                self.task.kill_tree(&mut st, &mut reader);
            }
        }
    }

    /// Kills a task frozen over its memory limit, reported as over it (as
    /// if it had had no growth hook). Does nothing if it is not waiting.
    pub fn refuse_growth(&self) {
        let mut st = lock(&self.task.st);
        let Some(hit) = st.growing.take() else {
            return;
        };
        if st.exceeded.is_none() {
            st.exceeded = Some(hit);
        }
        let mut reader = ProcReader::new();
        self.task.kill_tree(&mut st, &mut reader);
    }

    /// Kills the whole tree now (cancel). Idempotent; the report of a killed
    /// task still comes from [`Watched::try_finish`] or [`Watched::wait`].
    pub fn kill(&self) {
        let mut st = lock(&self.task.st);
        let mut reader = ProcReader::new();
        self.task.kill_tree(&mut st, &mut reader);
    }

    /// Non-blocking: if the root has exited, takes a last sample, kills
    /// leftover descendants (a task's tree must not outlive it), reaps the
    /// root with wait4 (for its rusage), removes the cgroup, and returns the
    /// final report. `Ok(None)` while the root is still running. Calling it
    /// again after it returned a report is an error.
    pub fn try_finish(&mut self) -> io::Result<Option<Report>> {
        let task = &self.task;
        let core = &self.monitor.handle.core;
        let mut st = lock(&task.st);
        if st.reaped {
            return Err(io::Error::other("task already finished"));
        }
        if !has_exited(task.pid, false)? {
            return Ok(None);
        }
        let end = Instant::now();
        let end_epoch = epoch_now();
        let mut reader = ProcReader::new();
        let mut buf = String::new();
        let mut pids = Vec::new();
        let members = match &task.group {
            Some(g) => task.group_members(g, &st, &mut reader, &mut pids),
            None => task.known_members(&st, &mut reader),
        };
        task.sample(core, &mut st, &members, &mut reader, &mut buf, end, true);
        task.kill_tree(&mut st, &mut reader);

        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: reaping our own exited child.
            let r = unsafe { libc::wait4(task.pid, &mut status, 0, &mut ru) };
            if r == task.pid {
                break;
            }
            let e = io::Error::last_os_error();
            if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        st.reaped = true;
        st.finished = true;
        if task.group.is_none() {
            task.wait_tree_dead(&st, &mut reader, &mut pids);
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let ru_cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
        let ru_maxrss = u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024;
        let mut cpu = st.cpu.max(ru_cpu);
        let mut memory = st.memory.max(ru_maxrss);
        if let Some(g) = &task.group {
            g.kill();
            g.wait_empty();
            // Read after the group emptied, so the CPU of leftovers killed
            // just now is included.
            if let Some(us) = g.cpu_usec() {
                cpu = cpu.max(us as f64 / 1e6);
            }
            if let Some(m) = g.memory_peak() {
                memory = memory.max(m);
            }
            match &core.cgroup {
                Some(base) => base.release(g),
                None => g.rmdir(),
            }
        }
        {
            let mut s = lock(&core.state);
            s.tasks.retain(|t| t.id != task.id);
        }

        let exit = if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        };
        let wall = end.duration_since(task.start).as_secs_f64();
        let cores_avg = if wall > 0.0 { cpu / wall } else { 0.0 };
        let exit_type = match (&st.exceeded, exit) {
            (Some(_), _) => "limits",
            (None, Exit::Signal(_)) => "signal",
            (None, Exit::Code(_)) => "normal",
        };
        let summary = Summary {
            command: task.command.clone(),
            exit_type: exit_type.to_string(),
            exit_status: match exit {
                Exit::Code(c) => Some(c),
                Exit::Signal(_) => None,
            },
            signal: match exit {
                Exit::Signal(s) => Some(s),
                Exit::Code(_) => None,
            },
            start: task.start_epoch,
            end: end_epoch,
            wall_time: wall,
            cpu_time: cpu,
            cores: st.cores_peak.max(cores_avg),
            cores_avg,
            memory: memory as f64 / MB,
            virtual_memory: st.vm as f64 / MB,
            swap_memory: st.swap as f64 / MB,
            max_concurrent_processes: st.max_procs.max(1),
            total_processes: st.total_procs.max(1),
            bytes_read: st.rchar as f64 / MB,
            bytes_written: st.wchar as f64 / MB,
            disk: st.disk as f64 / MB,
            total_files: st.files,
            monitor_method: task.method().to_string(),
            limits_exceeded: st.exceeded.clone(),
            samples: st.samples,
        };
        st.series = None;
        Ok(Some(Report { exit, summary }))
    }

    /// Whether finishing can block: `false` once the root has exited if the
    /// task's cgroup is already empty and its sandbox is quick to walk, so
    /// [`Watched::wait`] only reaps and reads counters (a few system calls)
    /// and may run on an async thread. Without a cgroup, finishing may wait
    /// for escaped processes to die.
    pub fn finish_may_block(&self) -> bool {
        let slow_walk = lock(&self.task.st).disk_walk > Duration::from_millis(1);
        match &self.task.group {
            Some(g) => slow_walk || g.populated(),
            None => true,
        }
    }

    /// Blocks until the root exits, then finishes as [`Watched::try_finish`].
    pub fn wait(mut self) -> io::Result<Report> {
        loop {
            if let Some(r) = self.try_finish()? {
                return Ok(r);
            }
            if self.task.is_pidfd {
                wait_readable(self.pidfd(), -1)?;
            } else {
                has_exited(self.task.pid, true)?;
            }
        }
    }
}

/// Polls one descriptor for readability; `timeout_ms` < 0 waits forever.
/// Returns whether it became readable.
fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Task {
    fn method(&self) -> &'static str {
        match &self.group {
            Some(g) if g.memory => "cgroup2",
            Some(_) => "cgroup2+proc",
            None => "proc",
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let reaped = lock(&self.task.st).reaped;
        if !reaped {
            self.kill();
            let _ = has_exited(self.task.pid, true);
            if let Err(e) = self.try_finish() {
                tracing::warn!(pid = self.task.pid, "cleaning up a dropped task: {e}");
            }
        }
    }
}
