//! The sampler thread: a full pass over every watched task once per
//! interval, and closer looks in between at the tasks near their memory
//! limit.

use crate::monitor::{Core, FIRST_LOOK};
use crate::procscan::{raise_fd_limit, ProcReader, ProcStat};
use crate::sample::{Pass, Sample};
use crate::scan::{Scanner, Wanted};
use crate::sys::{has_exited, lock};
use crate::task::Task;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sampler thread's body; returns when the monitor shuts down.
pub(crate) fn sampler(core: Arc<Core>) {
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
            (s.tasks.clone(), std::mem::take(&mut s.closely_started))
        };
        let (tasks, streaming) = tasks;
        let now = Instant::now();
        let full = now >= next_full;
        let mut cx = Sample {
            core: &core,
            reader: &mut reader,
            buf: &mut buf,
            now,
            pass: if full { Pass::Full } else { Pass::Close },
        };
        if full {
            core.machine.refresh();
            full_pass(&tasks, &mut scanner, &mut pids, &mut cx);
            reader.end_pass();
            next_full = now + core.interval;
        } else {
            close_pass(&tasks, &mut pids, &mut cx, fast);
            reader.end_close_pass();
        }
        let near_limit = tasks.iter().any(|t| lock(&t.st).near_limit);
        drop(tasks);
        let mut deadline = if near_limit {
            (now + fast).min(next_full)
        } else {
            next_full
        };
        if streaming {
            // Tasks that want a first look keep coming: waking on our own
            // every FIRST_LOOK serves each within FIRST_LOOK of its start,
            // and none has to wake us (a thread switch per start, and a
            // second wake to sleep again until its look).
            deadline = deadline.min(now + FIRST_LOOK);
        }
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

/// Between full passes, only the tasks close to their memory limit,
/// through the processes already known, each at most once per `spacing`
/// after its first look: a pass made for another task's first look comes
/// early for them, and two looks a few milliseconds apart would take a
/// task that had no time to grow for one that stopped growing.
fn close_pass(tasks: &[Arc<Task>], pids: &mut Vec<i32>, cx: &mut Sample<'_>, spacing: Duration) {
    for t in tasks {
        let mut st = lock(&t.st);
        let early = st
            .memory_seen
            .is_some_and(|(seen, _)| cx.now.saturating_duration_since(seen) < spacing);
        if st.reaped || !st.near_limit || early || t.root_exited() {
            continue;
        }
        let members = t.members_now(&st, cx.reader, pids);
        t.sample(&mut st, &members, cx);
    }
}

/// One sample of every task: /proc-mode tasks through one scan of /proc.
fn full_pass(tasks: &[Arc<Task>], scanner: &mut Scanner, pids: &mut Vec<i32>, cx: &mut Sample<'_>) {
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
        let found = scanner.pass(cx.reader, wanted);
        for (i, members) in scanned.into_iter().zip(found) {
            by_scan[i] = Some(members);
        }
    }
    for (i, t) in tasks.iter().enumerate() {
        let mut st = lock(&t.st);
        // A finished root's task is sampled by its finish; a /proc-mode
        // one's scan may still have found a process to remember, though.
        if st.reaped || (t.group.is_some() && t.root_exited()) {
            continue;
        }
        let members = match &t.group {
            Some(g) => t.group_members(g, &st, cx.reader, pids),
            None => by_scan[i].take().unwrap_or_default(),
        };
        t.sample(&mut st, &members, cx);
        if !t.is_pidfd && !st.exit_signalled && has_exited(t.pid, false).unwrap_or(false) {
            st.exit_signalled = true;
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to our eventfd.
            unsafe { libc::write(t.exit_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}
