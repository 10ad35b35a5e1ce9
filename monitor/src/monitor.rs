//! The public face of the monitor: [`Monitor`] (one sampler thread for
//! every watched task), its options, and the start of one task.

use crate::cgroup::{join_raw, CgroupBase};
use crate::oom::MachineWatch;
use crate::procscan::{original_fd_limit, swap_enabled};
use crate::sampler::sampler;
use crate::spawn::{self, Exec};
use crate::summary::{LimitExceeded, Limits};
use crate::sys::{epoch_now, eventfd, lock, pidfd_open};
use crate::task::{Task, TaskState};
use crate::watched::Watched;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Default sampling interval. Like `resource_monitor`'s default of one
/// second: limits are enforced within a second, and 1000 watched processes
/// cost well under 1% of a core (see `benches/monitor/README.md`). Memory
/// peaks shorter than the interval are only seen through the root's rusage
/// (or exactly, through `memory.peak`, when the cgroup has the memory
/// controller).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a task started with a memory limit gets its first look. Its
/// growth is unknown until then, so the look cannot wait for the next pass;
/// but a look at the instant it starts finds nothing to measure (and a short
/// task is gone before the sampler wakes), while one wake a few milliseconds
/// later serves every task started meanwhile: W1 tasks start every ~0.5 ms,
/// and one wake and sample per start cost a quarter of W1's rate. A task
/// can touch at most some tens of MB past its limit in this time.
pub(crate) const FIRST_LOOK: Duration = Duration::from_millis(5);

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
    /// Open files outside the sandbox that count against the task's disk
    /// as if they were in it (each one entry, its size in bytes), such as
    /// the files its standard output and error go to. Read through these
    /// descriptors, they cost no directory walk.
    pub disk_files: Vec<std::fs::File>,
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

/// What the sampler thread and every task share.
pub(crate) struct Core {
    pub(crate) interval: Duration,
    pub(crate) cgroup: Option<CgroupBase>,
    pub(crate) swap: bool,
    /// Clock ticks per second, the unit of /proc CPU times.
    pub(crate) ticks: f64,
    /// The machine's OOM-kill count and available memory, for the
    /// evidence of memory exhaustion (see [`crate::oom`]).
    pub(crate) machine: MachineWatch,
    pub(crate) state: Mutex<CoreState>,
    pub(crate) cv: Condvar,
}

/// The tasks being watched, and what the sampler is asked to do.
#[derive(Default)]
pub(crate) struct CoreState {
    pub(crate) tasks: Vec<Arc<Task>>,
    pub(crate) shutdown: bool,
    /// A task needs a close look by this time, which may come before the
    /// sampler's next deadline (it started with a memory limit, or was let
    /// go on after a freeze).
    pub(crate) watch_by: Option<Instant>,
    /// When the sleeping sampler means to wake; `None` while it works, or
    /// has no task.
    pub(crate) sleeping_until: Option<Instant>,
    /// A task that wants a first look (see [`FIRST_LOOK`]) started since
    /// the sampler's last pass began.
    pub(crate) closely_started: bool,
}

impl CoreState {
    /// Asks for a look by `when`; true if the sampler must be woken for it
    /// (it sleeps past `when`), false if it will look by then anyway.
    pub(crate) fn look_by(&mut self, when: Instant) -> bool {
        self.watch_by = Some(self.watch_by.map_or(when, |w| w.min(when)));
        self.sleeping_until.is_some_and(|until| until > when)
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
            machine: MachineWatch::default(),
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

    /// The state shared with the sampler thread.
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.handle.core
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
    /// module). The worker starts every task this way. A child born in a
    /// cgroup of a process without a controlling terminal leads a process
    /// group of its own rather than a session, which costs less; it has no
    /// controlling terminal either way.
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
        let (id, group) = self.new_group(&limits);
        let fd_limit = original_fd_limit();
        let procs = group.as_ref().map(|g| g.procs_path.clone());
        let start = Instant::now();
        let start_epoch = epoch_now();
        let spawner_peak = own_peak_rss();
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
                Launch::Exec(exec) => {
                    let exec_line = exec.command_line();
                    let own_session = spawn::own_session_needed(cgroup.is_some());
                    let pid = spawn::spawn(exec, cgroup, fd_limit, own_session);
                    (exec_line, pid)
                }
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
        self.register(
            Started {
                id,
                pid,
                command,
                start,
                start_epoch,
                group,
                adopted: false,
                spawner_peak,
            },
            sandbox,
            limits,
            opts,
        )
    }

    /// A task id and, where the monitor has cgroups, the task's own empty
    /// group with `limits`' cores set.
    fn new_group(&self, limits: &Limits) -> (u64, Option<crate::cgroup::TaskGroup>) {
        let core = &self.handle.core;
        // One count for the whole process: its monitors share one base
        // group, in which each task's group is named by this id.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let group = core.cgroup.as_ref().and_then(|b| {
            b.task_group(&format!("task-{id}"))
                .map_err(|e| tracing::debug!("no cgroup for task {id}: {e}"))
                .ok()
        });
        if let (Some(g), Some(cores)) = (&group, limits.cores) {
            g.set_cores(cores);
        }
        (id, group)
    }

    /// Readies the watch of a process that another process will start (a
    /// function server's forked call): its cgroup, when the monitor has
    /// them, which the process should join before it does anything else
    /// ([`Reserved::cgroup_procs`]); then [`Reserved::adopt`] with its pid.
    pub fn reserve(&self, limits: &Limits) -> Reserved {
        let (id, group) = self.new_group(limits);
        Reserved {
            monitor: self.clone(),
            id,
            group,
        }
    }

    /// Watches a started process: its exit descriptor, its state, and its
    /// place in the sampler's list.
    fn register(
        &self,
        started: Started,
        sandbox: Option<&Path>,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Watched> {
        let core = &self.handle.core;
        let (pid, adopted, group) = (started.pid, started.adopted, started.group);
        let (exit_fd, is_pidfd) = match pidfd_open(pid) {
            Ok(fd) => (fd, true),
            // Only a pidfd tells when a process that is not our child ends.
            Err(e) if adopted => {
                if let Some(g) = &group {
                    g.remove();
                }
                return Err(e);
            }
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
            id: started.id,
            pid,
            command: started.command,
            start: started.start,
            start_epoch: started.start_epoch,
            exit_fd,
            is_pidfd,
            adopted,
            spawner_peak: started.spawner_peak,
            group,
            sandbox: sandbox.map(Path::to_path_buf),
            st: Mutex::new(TaskState::new(&limits, opts.series)),
            oom_baseline: core.machine.baseline(core.interval * 2),
            limits,
            on_memory_limit: opts.on_memory_limit,
            disk_files: opts.disk_files,
        });
        let watch_closely = task.limits.memory_mb.is_some();
        let wake = {
            let mut s = lock(&core.state);
            s.tasks.push(Arc::clone(&task));
            s.closely_started |= watch_closely;
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
        Ok(Watched::new(self.clone(), task))
    }
}

/// A process just started, before it is watched.
struct Started {
    id: u64,
    pid: i32,
    command: String,
    start: Instant,
    start_epoch: f64,
    group: Option<crate::cgroup::TaskGroup>,
    adopted: bool,
    /// This process's peak resident size when it spawned the task, bytes;
    /// 0 for an adopted task (see `Task::spawner_peak`).
    spawner_peak: u64,
}

/// This process's peak resident size so far, bytes (`getrusage`).
fn own_peak_rss() -> u64 {
    // SAFETY: rusage is plain data, filled by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024
}

/// A watch readied for a process another process starts (see
/// [`Monitor::reserve`]). Dropped without [`Reserved::adopt`], its cgroup
/// is removed.
pub struct Reserved {
    monitor: Monitor,
    id: u64,
    group: Option<crate::cgroup::TaskGroup>,
}

impl Reserved {
    /// The `cgroup.procs` file the process should write its pid to before
    /// it allocates, so that everything it uses is its task's; `None`
    /// where the monitor samples /proc only.
    pub fn cgroup_procs(&self) -> Option<&std::ffi::CStr> {
        self.group.as_ref().map(|g| g.procs_path.as_c_str())
    }

    /// Watches `pid` (started `start` ago at the latest, not a child of
    /// this process) as a task with these limits. Its exit is learnt from
    /// a pidfd; its status and rusage from whoever reaps it, through
    /// [`Watched::finish_adopted`]. It should lead its own session or
    /// process group, which a kill of the task reaches.
    pub fn adopt(
        mut self,
        pid: i32,
        command: String,
        started: (Instant, f64),
        sandbox: Option<&Path>,
        limits: Limits,
        opts: SpawnOptions,
    ) -> io::Result<Watched> {
        let group = self.group.take();
        self.monitor.register(
            Started {
                id: self.id,
                pid,
                command,
                start: started.0,
                start_epoch: started.1,
                group,
                adopted: true,
                spawner_peak: 0,
            },
            sandbox,
            limits,
            opts,
        )
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(g) = &self.group {
            g.remove();
        }
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
