//! [`Watched`]: the caller's handle on one task, from its start to its
//! final report.

use crate::monitor::Monitor;
use crate::oom::{self, Facts};
use crate::procscan::ProcReader;
use crate::sample::{round3, Pass, Sample};
use crate::summary::{Exit, LimitExceeded, Report, Summary, MB};
use crate::sys::{epoch_now, has_exited, lock, wait_readable};
use crate::task::{Task, TaskState};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A task being watched. Dropping it before it finished kills and reaps the
/// tree and discards the report.
pub struct Watched {
    monitor: Monitor,
    task: Arc<Task>,
    /// An adopted task's exit, as its parent reported it.
    exit: Option<Reaped>,
}

/// What reaping the root told: how it ended and what it used.
struct Reaped {
    status: i32,
    /// User + system CPU of the root and its reaped descendants, seconds.
    cpu: f64,
    /// Largest resident set of one of them, bytes.
    maxrss: u64,
}

impl Watched {
    pub(crate) fn new(monitor: Monitor, task: Arc<Task>) -> Watched {
        Watched {
            monitor,
            task,
            exit: None,
        }
    }

    /// For a task started by another process ([`crate::Monitor::reserve`]):
    /// the final report, given the wait status and rusage (CPU seconds,
    /// peak RSS in bytes) its parent reaped it with. Call once its pidfd
    /// is readable.
    pub fn finish_adopted(mut self, status: i32, cpu: f64, maxrss: u64) -> io::Result<Report> {
        self.exit = Some(Reaped {
            status,
            cpu,
            maxrss,
        });
        self.wait()
    }

    /// Pid of the root process (also its process group id, and its
    /// session id unless it was started in a cgroup by a process without a
    /// controlling terminal).
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
    /// [`crate::SpawnOptions::on_memory_limit`]) go on with a limit of `memory_mb`.
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
        let core = self.monitor.core();
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
                    value: round3(st.memory as f64 / MB),
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
        let core = self.monitor.core();
        let mut st = lock(&task.st);
        if st.reaped {
            return Err(io::Error::other("task already finished"));
        }
        let exited = if task.adopted {
            wait_readable(task.exit_fd.as_fd(), 0)?
        } else {
            has_exited(task.pid, false)?
        };
        if !exited {
            return Ok(None);
        }
        st.root_exited = true;
        let end = Instant::now();
        let end_epoch = epoch_now();
        let mut reader = ProcReader::new();
        let mut buf = String::new();
        let mut pids = Vec::new();
        // A task group with no live process stays so (see
        // `TaskGroup::populated`): what the final walk sees is then what
        // the tree left.
        let tree_gone = task.group.as_ref().is_some_and(|g| !g.populated());
        let members = if tree_gone {
            vec![task.exited_root(&st)]
        } else {
            task.members_now(&st, &mut reader, &mut pids)
        };
        let mut cx = Sample {
            core,
            reader: &mut reader,
            buf: &mut buf,
            now: end,
            pass: Pass::Last,
        };
        task.sample(&mut st, &members, &mut cx);
        // Whether the monitor killed the root: the kill of leftovers below
        // comes after its death.
        let killed_by_us = st.killed;
        task.kill_tree(&mut st, &mut reader);
        let reaped = match (task.adopted, self.exit.take()) {
            (false, _) => reap(task.pid)?,
            (true, Some(exit)) => exit,
            // Dropped before its parent said: it was killed.
            (true, None) => Reaped {
                status: libc::SIGKILL,
                cpu: 0.0,
                maxrss: 0,
            },
        };
        st.reaped = true;
        st.finished = true;
        if task.group.is_none() {
            task.wait_tree_dead(&st, &mut reader, &mut pids);
        }
        let mut cpu = st.cpu.max(reaped.cpu);
        // A task seen alive by a sample is measured by its samples when its
        // root's `ru_maxrss` may be the spawner's peak (see
        // `Task::spawner_peak`): a 13 MB task spawned by a 31 MB worker
        // measured 31 MB. One that ended before any sample keeps the
        // `ru_maxrss`, an overestimate, rather than nothing.
        let root_peak = if st.memory > 0 && reaped.maxrss <= task.spawner_peak {
            0
        } else {
            reaped.maxrss
        };
        let mut memory = st.memory.max(root_peak);
        let mut cgroup_oom_kills = None;
        if let Some(g) = &task.group {
            g.kill();
            g.wait_empty();
            // Read after the group emptied, so the CPU of leftovers killed
            // just now is included (the final sample's read has it all when
            // there were none).
            if let Some(us) = g.cpu_usec().filter(|_| !tree_gone) {
                cpu = cpu.max(us as f64 / 1e6);
            }
            if let Some(m) = g.memory_peak() {
                memory = memory.max(m);
            }
            cgroup_oom_kills = g.oom_kills();
            match &core.cgroup {
                Some(base) => base.release(g),
                None => g.rmdir(),
            }
        }
        lock(&core.state).tasks.retain(|t| t.id != task.id);

        let exit = if libc::WIFSIGNALED(reaped.status) {
            Exit::Signal(libc::WTERMSIG(reaped.status))
        } else {
            Exit::Code(libc::WEXITSTATUS(reaped.status))
        };
        let memory_exhausted = if st.exceeded.is_some() {
            None
        } else {
            let outside_sigkill = exit == Exit::Signal(libc::SIGKILL) && !killed_by_us;
            oom::evidence(&Facts {
                cgroup_oom_kills,
                outside_sigkill,
                peak: memory,
                baseline: task.oom_baseline,
                oom_kills_now: outside_sigkill.then(oom::machine_oom_kills).flatten(),
            })
        };
        let mut summary = summarize(task, &st, exit, end, end_epoch, cpu, memory);
        summary.memory_exhausted = memory_exhausted;
        st.series = None;
        let sandbox_empty = st.sandbox_entries.filter(|_| tree_gone).map(|n| n == 0);
        Ok(Some(Report {
            exit,
            summary,
            sandbox_empty,
        }))
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

/// Reaps the exited root with wait4, for its status and rusage.
fn reap(pid: i32) -> io::Result<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: reaping our own exited child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(e);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Reaped {
        status,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss: u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024,
    })
}

/// The summary of a finished task, its numbers rounded to three decimals
/// (milliseconds, or about a kilobyte): more digits are float noise.
fn summarize(
    task: &Task,
    st: &TaskState,
    exit: Exit,
    end: Instant,
    end_epoch: f64,
    cpu: f64,
    memory: u64,
) -> Summary {
    let wall = end.duration_since(task.start).as_secs_f64();
    let cores_avg = if wall > 0.0 { cpu / wall } else { 0.0 };
    let exit_type = match (&st.exceeded, exit) {
        (Some(_), _) => "limits",
        (None, Exit::Signal(_)) => "signal",
        (None, Exit::Code(_)) => "normal",
    };
    let mb = |bytes: u64| round3(bytes as f64 / MB);
    Summary {
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
        start: round3(task.start_epoch),
        end: round3(end_epoch),
        // A task that ran took some time: under half a millisecond still
        // reads as one, not as none.
        wall_time: round3(wall).max(0.001),
        cpu_time: round3(cpu),
        cores: round3(st.cores_peak.max(cores_avg)),
        cores_avg: round3(cores_avg),
        memory: mb(memory),
        virtual_memory: mb(st.vm),
        swap_memory: mb(st.swap),
        max_concurrent_processes: st.max_procs.max(1),
        total_processes: st.total_procs.max(1),
        bytes_read: mb(st.rchar),
        bytes_written: mb(st.wchar),
        disk: mb(st.disk),
        total_files: st.files,
        monitor_method: task.method().to_string(),
        limits_exceeded: st.exceeded.clone(),
        memory_exhausted: None,
        samples: st.samples,
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let reaped = lock(&self.task.st).reaped;
        if !reaped {
            self.kill();
            if self.task.adopted {
                let _ = wait_readable(self.task.exit_fd.as_fd(), 5000);
            } else {
                let _ = has_exited(self.task.pid, true);
            }
            if let Err(e) = self.try_finish() {
                tracing::warn!(pid = self.task.pid, "cleaning up a dropped task: {e}");
            }
        }
    }
}
