//! One watched task: what is fixed at its start ([`Task`]), what the
//! sampler learns about it ([`TaskState`]), finding its processes, holding
//! it to its limits and killing its tree.

use crate::cgroup::TaskGroup;
use crate::monitor::MemoryLimitHook;
use crate::oom::OomBaseline;
use crate::procscan::{ProcReader, ProcStat};
use crate::sample::round3;
use crate::scan::all_processes;
use crate::summary::{LimitExceeded, Limits, MB};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// What is fixed about a task from its start.
pub(crate) struct Task {
    pub(crate) id: u64,
    pub(crate) pid: i32,
    pub(crate) command: String,
    pub(crate) start: Instant,
    pub(crate) start_epoch: f64,
    /// A pidfd, or an eventfd the sampler signals when pidfd_open is missing.
    pub(crate) exit_fd: OwnedFd,
    pub(crate) is_pidfd: bool,
    /// Started by another process (see [`crate::Monitor::reserve`]): not
    /// our child, so its exit comes from its parent, not from wait4.
    pub(crate) adopted: bool,
    /// The spawning process's peak resident size at the spawn, bytes. Linux
    /// raises a process's `ru_maxrss` at exec to the peak of the memory it
    /// had before, which for a spawned task is this process's: a root
    /// `ru_maxrss` no larger than this may be the spawner's, not the task's.
    pub(crate) spawner_peak: u64,
    pub(crate) group: Option<TaskGroup>,
    pub(crate) sandbox: Option<PathBuf>,
    pub(crate) limits: Limits,
    pub(crate) on_memory_limit: Option<MemoryLimitHook>,
    /// Files outside the sandbox counted as in it ([`crate::SpawnOptions::disk_files`]).
    pub(crate) disk_files: Vec<std::fs::File>,
    /// The machine's OOM-kill count at the start, to tell at the end
    /// whether the kernel's OOM killer ran meanwhile.
    pub(crate) oom_baseline: OomBaseline,
    pub(crate) st: Mutex<TaskState>,
}

/// One process of the tree, as last seen.
#[derive(Clone, Copy)]
pub(crate) struct Member {
    pub(crate) starttime: u64,
    pub(crate) ppid: i32,
    pub(crate) cpu_ticks: u64,
    pub(crate) rchar: u64,
    pub(crate) wchar: u64,
    /// Already in `total_processes` (see [`crate::sample`]).
    pub(crate) counted: bool,
}

/// What the sampler has learnt about a task so far.
#[derive(Default)]
pub(crate) struct TaskState {
    pub(crate) members: HashMap<i32, Member>,
    /// Counters of processes that vanished without a live parent in the
    /// tree to inherit them (escapees reaped by init).
    pub(crate) dead_cpu_ticks: u64,
    pub(crate) dead_rchar: u64,
    pub(crate) dead_wchar: u64,
    pub(crate) cpu: f64,
    pub(crate) rchar: u64,
    pub(crate) wchar: u64,
    pub(crate) memory: u64,
    pub(crate) vm: u64,
    pub(crate) swap: u64,
    pub(crate) max_procs: u64,
    pub(crate) total_procs: u64,
    pub(crate) disk: u64,
    pub(crate) files: u64,
    pub(crate) next_disk: Option<Instant>,
    /// How long the last walk of the sandbox took.
    pub(crate) disk_walk: Duration,
    /// Entries found in the sandbox itself (not counting `disk_files`) by
    /// the last walk; `None` before one, or if it could not be read.
    pub(crate) sandbox_entries: Option<u64>,
    /// Past half its memory limit at the last sample, or on course to pass
    /// it before the next full pass: sampled more often.
    pub(crate) near_limit: bool,
    /// The memory in use at the last sample, and when: how fast it grows.
    pub(crate) memory_seen: Option<(Instant, u64)>,
    pub(crate) window: VecDeque<(Instant, f64)>,
    pub(crate) cores_peak: f64,
    pub(crate) last: Option<(Instant, f64)>,
    pub(crate) samples: u64,
    pub(crate) exceeded: Option<LimitExceeded>,
    /// The memory limit now: the spawn's, or what
    /// [`crate::Watched::grow_memory`] raised it to.
    pub(crate) memory_limit_mb: Option<u64>,
    /// Frozen over its memory limit, waiting for
    /// [`crate::Watched::grow_memory`] or [`crate::Watched::refuse_growth`].
    pub(crate) growing: Option<LimitExceeded>,
    /// The monitor killed the tree (a limit, a cancel, a drop).
    pub(crate) killed: bool,
    pub(crate) exit_signalled: bool,
    /// The root has exited (it is being finished): a kill is for what it left.
    pub(crate) root_exited: bool,
    pub(crate) reaped: bool,
    pub(crate) finished: bool,
    pub(crate) series: Option<Box<dyn Write + Send>>,
}

impl TaskState {
    /// The state of a task just started with `limits`.
    pub(crate) fn new(limits: &Limits, series: Option<Box<dyn Write + Send>>) -> TaskState {
        TaskState {
            series,
            memory_limit_mb: limits.memory_mb,
            // Nothing is known of how fast it grows (see `sample`).
            near_limit: limits.memory_mb.is_some(),
            ..TaskState::default()
        }
    }
}

impl Task {
    /// How this task is measured: `"cgroup2"`, `"cgroup2+proc"` or `"proc"`.
    pub(crate) fn method(&self) -> &'static str {
        match &self.group {
            Some(g) if g.memory => "cgroup2",
            Some(_) => "cgroup2+proc",
            None => "proc",
        }
    }

    /// The task's processes now: the group's, or (without a group) the
    /// ones already known, which is what the final sample and the close
    /// looks between full passes use.
    pub(crate) fn members_now(
        &self,
        st: &TaskState,
        reader: &mut ProcReader,
        pids: &mut Vec<i32>,
    ) -> Vec<ProcStat> {
        match &self.group {
            Some(g) => self.group_members(g, st, reader, pids),
            None => self.known_members(st, reader),
        }
    }

    /// Whether the root, our own child, has exited: its task is about to
    /// be finished, and the final sample measures it then, so a sample now
    /// would only be read again. (An adopted root is reaped by its own
    /// parent, which may take a while to report: it is sampled as usual.)
    pub(crate) fn root_exited(&self) -> bool {
        self.is_pidfd
            && !self.adopted
            && crate::sys::wait_readable(self.exit_fd.as_fd(), 0).unwrap_or(false)
    }

    /// The group's processes. A process already seen is re-read through
    /// `statm` (its start time and parent are known, and the group's
    /// `cpu.stat` gives CPU time), a new one through `stat`.
    pub(crate) fn group_members(
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

    /// The task's processes once its root has exited and its group holds
    /// no live process: the root alone, a zombie, as last seen. Reading its
    /// /proc entry would tell nothing more: a zombie uses no memory, and
    /// the group's `cpu.stat` (with the root's rusage) gives the CPU time.
    pub(crate) fn exited_root(&self, st: &TaskState) -> ProcStat {
        let seen = st.members.get(&self.pid);
        ProcStat {
            pid: self.pid,
            ppid: seen.map_or(0, |m| m.ppid),
            pgrp: self.pid,
            session: 0,
            starttime: seen.map_or(0, |m| m.starttime),
            zombie: true,
            cpu_ticks: seen.map_or(0, |m| m.cpu_ticks),
            vsize: 0,
            rss_bytes: 0,
        }
    }

    /// Known processes only, for the final sample of a /proc-mode task,
    /// which must not cost a full /proc scan per finished task.
    pub(crate) fn known_members(&self, st: &TaskState, reader: &mut ProcReader) -> Vec<ProcStat> {
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

    /// SIGKILL is delivered asynchronously; waits (bounded) until the seen
    /// processes, and any unseen one still in the task's session or process
    /// group, are dead, so the caller can rely on the tree being gone. Called
    /// after the root is reaped; the cgroup path waits on `cgroup.events`.
    pub(crate) fn wait_tree_dead(
        &self,
        st: &TaskState,
        reader: &mut ProcReader,
        pids: &mut Vec<i32>,
    ) {
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

    pub(crate) fn check_limits(
        &self,
        st: &TaskState,
        memory: u64,
        exact_memory: bool,
        reader: &mut ProcReader,
        now: Instant,
    ) -> Option<LimitExceeded> {
        // Rounded as the summary is, so a growth hook and the summary
        // report the same numbers.
        let over = |resource: &str, limit: f64, value: f64| {
            Some(LimitExceeded {
                resource: resource.to_string(),
                limit: round3(limit),
                value: round3(value),
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
    pub(crate) fn freeze_for_growth(&self, st: &mut TaskState, hit: &LimitExceeded) -> bool {
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
    pub(crate) fn kill_tree(&self, st: &mut TaskState, reader: &mut ProcReader) {
        if st.reaped {
            return;
        }
        st.killed = true;
        if let Some(g) = &self.group {
            g.kill();
        }
        // An adopted root is reaped by its own parent: its pid is only
        // certainly its own while its pidfd says it has not exited.
        let root_alive =
            !self.adopted || !crate::sys::wait_readable(self.exit_fd.as_fd(), 0).unwrap_or(true);
        if root_alive {
            // SAFETY: the root is our unreaped child (or alive), so its pid
            // and process group id cannot have been recycled.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
        for (&pid, m) in &st.members {
            if pid != self.pid && reader.stat(pid).is_some_and(|s| s.starttime == m.starttime) {
                // SAFETY: sending a signal to a process we identified above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if st.root_exited {
            // Signalling an exited root does nothing.
        } else if self.is_pidfd {
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
