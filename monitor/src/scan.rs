//! Finding the processes of /proc-mode tasks (no cgroup) in one pass over
//! /proc for all of them.
//!
//! A task's processes are its root, everything in its session or process
//! group (which survive double forks), processes already known to belong
//! to it, and every descendant of those (which catches children that called
//! `setsid`). Finding them needs the parent, session and group of every
//! process on the machine; reading `/proc/PID/stat` of each one every pass
//! was most of the /proc mode's cost. Instead a process found to belong to
//! no task keeps the `stat` read when it was first seen, and is not read
//! again while its pid stays listed:
//!
//! * a process cannot join a task later: a new session or group id is the
//!   caller's own pid, and children are new pids, read when they appear;
//! * its pid cannot name another process without first leaving the listing,
//!   unless the kernel's cyclic pid allocator wraps all of `pid_max` within
//!   one interval;
//! * a task registered just after a pass that saw its root as nobody's is
//!   still found: the cached session and group of its processes name the
//!   root, and every process matched that way is read afresh.

use crate::procscan::{all_pids, ProcReader, ProcStat};
use std::collections::HashMap;

/// One /proc-mode task, as the scan needs it.
pub(crate) struct Wanted {
    /// Root pid: also its session and process-group id.
    pub root: i32,
    /// Processes already known to be the task's: pid and start time.
    pub known: Vec<(i32, u64)>,
}

/// Between passes: the processes that belonged to no task.
#[derive(Default)]
pub(crate) struct Scanner {
    others: HashMap<i32, ProcStat>,
    next_others: HashMap<i32, ProcStat>,
    pids: Vec<i32>,
    procs: Vec<(ProcStat, bool)>,
    children: HashMap<i32, Vec<usize>>,
}

impl Scanner {
    /// The processes of each task in `tasks`, freshly read, in the same
    /// order as `tasks`.
    pub fn pass(&mut self, reader: &mut ProcReader, tasks: Vec<Wanted>) -> Vec<Vec<ProcStat>> {
        let mut owner_of_root: HashMap<i32, usize> = HashMap::with_capacity(tasks.len());
        let mut known: HashMap<i32, (usize, u64)> = HashMap::new();
        for (i, t) in tasks.into_iter().enumerate() {
            owner_of_root.insert(t.root, i);
            for (pid, starttime) in t.known {
                known.insert(pid, (i, starttime));
            }
        }
        let n_tasks = owner_of_root.len();

        self.pids.clear();
        all_pids(&mut self.pids);
        self.procs.clear();
        for &pid in &self.pids {
            let stale = self.others.get(&pid).copied();
            let entry = match stale {
                Some(s) => Some((s, true)),
                None => reader.stat(pid).map(|s| (s, false)),
            };
            if let Some(e) = entry {
                self.procs.push(e);
            }
        }

        let mut owner: Vec<Option<usize>> = vec![None; self.procs.len()];
        let mut queue = Vec::new();
        for (i, (p, _)) in self.procs.iter().enumerate() {
            let direct = owner_of_root
                .get(&p.pid)
                .or_else(|| owner_of_root.get(&p.session))
                .or_else(|| owner_of_root.get(&p.pgrp))
                .copied()
                .or_else(|| {
                    known
                        .get(&p.pid)
                        .filter(|(_, start)| *start == p.starttime)
                        .map(|(t, _)| *t)
                });
            if direct.is_some() {
                owner[i] = direct;
                queue.push(i);
            }
        }
        if !queue.is_empty() {
            for v in self.children.values_mut() {
                v.clear();
            }
            for (i, (p, _)) in self.procs.iter().enumerate() {
                self.children.entry(p.ppid).or_default().push(i);
            }
            while let Some(i) = queue.pop() {
                let parent = self.procs[i].0.pid;
                if let Some(kids) = self.children.get(&parent) {
                    for &k in kids {
                        if owner[k].is_none() {
                            owner[k] = owner[i];
                            queue.push(k);
                        }
                    }
                }
            }
            // Forget parents that no longer exist, so the map stays the
            // size of the process table.
            self.children.retain(|_, v| !v.is_empty());
        }

        let mut out: Vec<Vec<ProcStat>> = (0..n_tasks).map(|_| Vec::new()).collect();
        self.next_others.clear();
        for (i, &(p, stale)) in self.procs.iter().enumerate() {
            match owner[i] {
                Some(t) if stale => {
                    // Matched on a cached read: read it now, and only keep
                    // it if it is still the same process.
                    if let Some(fresh) = reader.stat(p.pid).filter(|f| f.starttime == p.starttime) {
                        out[t].push(fresh);
                    }
                }
                Some(t) => out[t].push(p),
                None => {
                    self.next_others.insert(p.pid, p);
                }
            }
        }
        std::mem::swap(&mut self.others, &mut self.next_others);
        out
    }
}

/// Every process on the machine, read now: for the rare checks outside the
/// sampler (a finished task's leftovers).
pub(crate) fn all_processes(reader: &mut ProcReader, pids: &mut Vec<i32>) -> Vec<ProcStat> {
    pids.clear();
    all_pids(pids);
    pids.iter().filter_map(|&p| reader.stat(p)).collect()
}
