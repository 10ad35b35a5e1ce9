//! One sample of one task: read its processes' counters, keep the peaks,
//! watch its course toward its memory limit, enforce its limits, and write
//! its line of the sample series.
//!
//! # What counts as a process
//!
//! `total_processes` counts the distinct processes alive at a full pass
//! (every interval, the same for every task) or at the task's final sample,
//! and `max_concurrent_processes` the most alive at one of those. The
//! closer looks a task near its memory limit gets between full passes see
//! its processes too, but do not count them: a limit would otherwise
//! change the count. A process that lives less than one interval is
//! counted only if a full pass happens to see it, so a command that starts
//! short-lived helpers (a pyenv shim runs about ten bash processes in its
//! first 100 ms before it execs Python) reports how many of those a pass
//! caught; a process that lives longer than an interval is always counted.

use crate::disk;
use crate::monitor::Core;
use crate::procscan::{ProcReader, ProcStat};
use crate::summary::MB;
use crate::task::{Member, Task, TaskState};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// Peak cores are measured over windows at least this long, so that one
/// short burst between two close samples does not read as many cores.
const CORES_WINDOW: Duration = Duration::from_secs(1);

/// I/O counters are read every this many samples (and at a process's
/// first and the task's last sample). They are reported, never enforced,
/// and are cumulative, so skipped samples lose nothing except the I/O of an
/// orphan that dies unseen between two reads; reading them every time
/// would cost a fifth of the sampler's CPU.
const IO_EVERY: u64 = 4;

/// Which kind of sample this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Part of a full pass over every task, once per interval.
    Full,
    /// A closer look between full passes at a task near its memory limit.
    Close,
    /// The final sample, after the root exited: no limit is enforced.
    Last,
}

impl Pass {
    /// Whether processes seen now count (see the module docs).
    fn counts_processes(self) -> bool {
        self != Pass::Close
    }
}

/// What one sample of a task works with.
pub(crate) struct Sample<'a> {
    pub(crate) core: &'a Core,
    pub(crate) reader: &'a mut ProcReader,
    /// Scratch space for reading small files.
    pub(crate) buf: &'a mut String,
    pub(crate) now: Instant,
    pub(crate) pass: Pass,
}

/// What one sample adds up over the tree's live processes.
#[derive(Default)]
struct Tally {
    rss: u64,
    vm: u64,
    swap: u64,
    live: u64,
    cpu_ticks: u64,
    rchar: u64,
    wchar: u64,
}

impl Task {
    /// Takes one sample of the task whose processes are now `members`.
    pub(crate) fn sample(&self, st: &mut TaskState, members: &[ProcStat], cx: &mut Sample<'_>) {
        let tally = self.tally(st, members, cx);
        st.samples += 1;
        let (memory, exact) = self.record(st, &tally, cx);
        record_cores(st, cx.now);
        self.measure_disk(st, cx);
        watch_course(st, memory, cx);
        if cx.pass != Pass::Last {
            self.enforce(st, memory, exact, cx);
        }
        self.write_series(st, memory, &tally, cx.now);
        st.last = Some((cx.now, st.cpu));
    }

    /// Sums the members' counters, replaces the known members with them,
    /// and keeps the counters of members gone with no parent to inherit
    /// them.
    fn tally(&self, st: &mut TaskState, members: &[ProcStat], cx: &mut Sample<'_>) -> Tally {
        let mut t = Tally::default();
        let counting = cx.pass.counts_processes();
        let mut current: HashMap<i32, Member> = HashMap::with_capacity(members.len());
        for s in members {
            let prev = st
                .members
                .get(&s.pid)
                .filter(|m| m.starttime == s.starttime)
                .copied();
            let counted = prev.is_some_and(|m| m.counted);
            let fresh_io =
                cx.pass == Pass::Last || prev.is_none() || st.samples.is_multiple_of(IO_EVERY);
            let io = if fresh_io { cx.reader.io(s.pid) } else { None };
            // A zombie already reaped by the last look has no counters to
            // read; kept as a member, it would stand for the children it
            // reaped (whose writes it no longer shows) and their counters
            // would be dropped. As a dead member it hands them on instead.
            if s.zombie && cx.pass == Pass::Last && io.is_none() {
                continue;
            }
            if counting && !counted {
                st.total_procs += 1;
            }
            let (r, w) = io.or(prev.map(|m| (m.rchar, m.wchar))).unwrap_or((0, 0));
            if !s.zombie {
                t.live += 1;
                t.rss += s.rss_bytes;
                t.vm += s.vsize;
                if cx.core.swap {
                    t.swap += cx.reader.swap(s.pid).unwrap_or(0);
                }
            }
            t.cpu_ticks += s.cpu_ticks;
            t.rchar += r;
            t.wchar += w;
            current.insert(
                s.pid,
                Member {
                    starttime: s.starttime,
                    ppid: s.ppid,
                    cpu_ticks: s.cpu_ticks,
                    rchar: r,
                    wchar: w,
                    counted: counted || counting,
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
        if counting {
            st.max_procs = st.max_procs.max(t.live);
        }
        t
    }

    /// Raises the peaks and cumulative counters to this sample's. Returns
    /// the memory in use now, and whether it is exact (the cgroup's) rather
    /// than summed RSS.
    fn record(&self, st: &mut TaskState, t: &Tally, cx: &mut Sample<'_>) -> (u64, bool) {
        let cpu_proc = (t.cpu_ticks + st.dead_cpu_ticks) as f64 / cx.core.ticks;
        let cpu_cg = self
            .group
            .as_ref()
            .and_then(|g| g.cpu_usec())
            .map(|us| us as f64 / 1e6);
        st.cpu = st.cpu.max(cpu_cg.unwrap_or(cpu_proc));
        st.rchar = st.rchar.max(t.rchar + st.dead_rchar);
        st.wchar = st.wchar.max(t.wchar + st.dead_wchar);
        let cg_mem = self.group.as_ref().and_then(|g| g.memory_peak());
        let memory = cg_mem.unwrap_or(t.rss);
        st.memory = st.memory.max(memory);
        st.vm = st.vm.max(t.vm);
        let swap = self
            .group
            .as_ref()
            .and_then(|g| g.swap_peak(cx.buf))
            .unwrap_or(t.swap);
        st.swap = st.swap.max(swap);
        (memory, cg_mem.is_some())
    }

    /// Walks the sandbox when it is due: big sandboxes are walked less
    /// often, so that the walk costs at most ~2% of the time between walks.
    fn measure_disk(&self, st: &mut TaskState, cx: &Sample<'_>) {
        let Some(dir) = &self.sandbox else { return };
        let due = cx.pass == Pass::Last || !matches!(st.next_disk, Some(t) if cx.now < t);
        if !due {
            return;
        }
        let t0 = Instant::now();
        let walked = disk::usage(dir);
        st.sandbox_entries = walked.map(|(_, files)| files);
        let (mut bytes, mut files) = walked.unwrap_or((0, 0));
        for f in &self.disk_files {
            bytes += f.metadata().map_or(0, |m| m.len());
            files += 1;
        }
        st.disk_walk = t0.elapsed();
        let cost = st.disk_walk * 50;
        st.next_disk = Some(cx.now + cost.max(cx.core.interval));
        st.disk = st.disk.max(bytes);
        st.files = st.files.max(files);
    }

    /// Checks the limits; a breach freezes the task for growth when it has
    /// a hook, else kills it. The kill is repeated every sample until the
    /// root is reaped: a seen escapee may have forked again since.
    fn enforce(&self, st: &mut TaskState, memory: u64, exact: bool, cx: &mut Sample<'_>) {
        if st.exceeded.is_none() {
            if let Some(hit) = self.check_limits(st, memory, exact, cx.reader, cx.now) {
                tracing::debug!(pid = self.pid, "limit exceeded: {hit:?}");
                if !self.freeze_for_growth(st, &hit) {
                    st.exceeded = Some(hit);
                }
            }
        }
        if st.exceeded.is_some() {
            self.kill_tree(st, cx.reader);
        }
    }

    /// One line of the sample series, when the task has one.
    fn write_series(&self, st: &mut TaskState, memory: u64, t: &Tally, now: Instant) {
        let Some(series) = st.series.as_mut() else {
            return;
        };
        let cpu = st.cpu;
        let wall = now.duration_since(self.start).as_secs_f64();
        let cores_now = match st.last {
            Some((then, c)) if now > then => (cpu - c) / now.duration_since(then).as_secs_f64(),
            _ => 0.0,
        };
        let line = serde_json::json!({
            "wall_time": round3(wall),
            "cpu_time": round3(cpu),
            "cores": round3(cores_now),
            "memory": round3(memory as f64 / MB),
            "virtual_memory": round3(t.vm as f64 / MB),
            "swap_memory": round3(t.swap as f64 / MB),
            "processes": t.live,
            "total_processes": st.total_procs,
            "bytes_read": round3(st.rchar as f64 / MB),
            "bytes_written": round3(st.wchar as f64 / MB),
            "disk": round3(st.disk as f64 / MB),
            "total_files": st.files,
        });
        if let Err(e) = writeln!(series, "{line}").and_then(|_| series.flush()) {
            tracing::warn!("cannot write sample series: {e}");
            st.series = None;
        }
    }
}

/// Raises the peak cores to the CPU used over the sliding window ending now.
fn record_cores(st: &mut TaskState, now: Instant) {
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
}

/// Decides whether the task needs closer looks between full passes.
///
/// A task past half its memory limit is sampled ten times as often (see
/// [`crate::sampler`]), so that one that keeps growing is stopped close to
/// its limit rather than up to an interval's worth of growth past it:
/// touching memory costs CPU, and a killed attempt's is lost. One growing
/// fast (W4's tasks touch about 800 MB a second here) can pass a limit it
/// is far from within one interval: its course counts too. Its course is
/// unknown until a second sample: watched closely.
fn watch_course(st: &mut TaskState, memory: u64, cx: &Sample<'_>) {
    let now = cx.now;
    let projected = match st.memory_seen {
        Some((then, before)) if memory > before && now > then => {
            let per_s = (memory - before) as f64 / now.duration_since(then).as_secs_f64();
            memory.saturating_add((per_s * cx.core.interval.as_secs_f64()) as u64)
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
}

/// `x` rounded to three decimals: milliseconds, or about a kilobyte, in
/// the summary's units; more digits are noise of the float arithmetic.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
