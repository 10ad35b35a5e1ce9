//! Memory exhaustion the monitor did not enforce: a task killed by the
//! kernel's OOM killer (for the machine, or for a cgroup limit set by
//! someone else, such as a batch system's job group), or by a SIGKILL from
//! outside at a moment when the machine was out of memory.
//!
//! The evidence, strongest first:
//!
//! 1. `oom_kill` in the task cgroup's `memory.events` (tasks measured as
//!    `cgroup2`): the kernel counts every OOM kill of a process in the
//!    group there, whichever limit (the group's, an ancestor's, or the
//!    whole machine's) ran out.
//! 2. Without one: the root died of a SIGKILL the monitor did not send,
//!    and the machine's OOM-kill count (`oom_kill` in `/proc/vmstat`) rose
//!    while it ran.
//! 3. Or it died so, at a peak near the memory the machine had available
//!    when it started.
//!
//! The summary reports it as `memory_exhausted` (see
//! [`crate::MemoryExhausted`]); the monitor's own kill for a memory limit
//! is `limits_exceeded` instead, and a task with either ran out of memory
//! ([`crate::Report::ran_out_of_memory`]).

use crate::summary::{MemoryExhausted, OomSource, MB};
use crate::sys::lock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A peak at least this share of the memory available at the task's start
/// counts as "near" it.
const NEAR_AVAILABLE: f64 = 0.9;

/// What the machine looked like when a task started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct OomBaseline {
    /// `oom_kill` of `/proc/vmstat`: OOM kills since boot (Linux 4.13+).
    pub(crate) oom_kills: Option<u64>,
    /// `MemAvailable` of `/proc/meminfo`, bytes.
    pub(crate) available: Option<u64>,
}

impl OomBaseline {
    /// Reads both counters now.
    pub(crate) fn read() -> OomBaseline {
        OomBaseline {
            oom_kills: machine_oom_kills(),
            available: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("MemAvailable:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .map(|kb| kb * 1024),
        }
    }
}

/// OOM kills on this machine since boot, from `/proc/vmstat`.
pub(crate) fn machine_oom_kills() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/vmstat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// The machine's baseline, read at most once per `max_age` for all the
/// tasks that start meanwhile (the sampler refreshes it at every full
/// pass), so a task's start costs no /proc read.
#[derive(Default)]
pub(crate) struct MachineWatch {
    last: Mutex<Option<(Instant, OomBaseline)>>,
}

impl MachineWatch {
    /// Reads the counters now (the sampler's full pass).
    pub(crate) fn refresh(&self) {
        let now = OomBaseline::read();
        *lock(&self.last) = Some((Instant::now(), now));
    }

    /// The baseline for a task starting now: the last one read, unless it
    /// is older than `max_age`.
    pub(crate) fn baseline(&self, max_age: Duration) -> OomBaseline {
        let mut last = lock(&self.last);
        match *last {
            Some((at, b)) if at.elapsed() <= max_age => b,
            _ => {
                let b = OomBaseline::read();
                *last = Some((Instant::now(), b));
                b
            }
        }
    }
}

/// What is known of a finished task that bears on memory exhaustion.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Facts {
    /// `oom_kill` of the task cgroup's `memory.events`, when it has one.
    pub(crate) cgroup_oom_kills: Option<u64>,
    /// The root died of a SIGKILL that the monitor did not send.
    pub(crate) outside_sigkill: bool,
    /// Peak memory, bytes.
    pub(crate) peak: u64,
    /// The machine when the task started.
    pub(crate) baseline: OomBaseline,
    /// The machine's OOM-kill count now (only read for an outside SIGKILL).
    pub(crate) oom_kills_now: Option<u64>,
}

/// The evidence that the task ran out of memory, if there is any.
pub(crate) fn evidence(f: &Facts) -> Option<MemoryExhausted> {
    let peak_mb = f.peak as f64 / MB;
    let found = |source, evidence: String| {
        Some(MemoryExhausted {
            source,
            evidence,
            memory: crate::sample::round3(peak_mb),
        })
    };
    if let Some(n) = f.cgroup_oom_kills.filter(|&n| n > 0) {
        let what = if n == 1 { "process" } else { "processes" };
        return found(
            OomSource::CgroupEvents,
            format!("oom_kill in memory.events: the kernel killed {n} {what} of the task's cgroup for lack of memory"),
        );
    }
    if !f.outside_sigkill {
        return None;
    }
    if let (Some(before), Some(now)) = (f.baseline.oom_kills, f.oom_kills_now) {
        if now > before {
            return found(
                OomSource::KernelOomKiller,
                format!(
                    "killed by SIGKILL at peak {peak_mb:.0} MB while the kernel's OOM killer ran (oom_kill in /proc/vmstat rose by {})",
                    now - before
                ),
            );
        }
    }
    if let Some(available) = f.baseline.available {
        if available > 0 && f.peak as f64 >= NEAR_AVAILABLE * available as f64 {
            return found(
                OomSource::NearAvailable,
                format!(
                    "killed by SIGKILL at peak {peak_mb:.0} MB, near the {:.0} MB the machine had available when it started",
                    available as f64 / MB
                ),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn facts() -> Facts {
        Facts {
            cgroup_oom_kills: None,
            outside_sigkill: true,
            peak: GB,
            baseline: OomBaseline {
                oom_kills: Some(3),
                available: Some(8 * GB),
            },
            oom_kills_now: Some(3),
        }
    }

    #[test]
    fn a_cgroup_oom_kill_is_evidence_whatever_the_exit() {
        let f = Facts {
            cgroup_oom_kills: Some(1),
            outside_sigkill: false,
            ..facts()
        };
        let e = evidence(&f).unwrap();
        assert_eq!(e.source, OomSource::CgroupEvents);
        assert!(e.evidence.contains("oom_kill in memory.events"), "{e:?}");
        assert_eq!(e.memory, 1024.0);
        let none = Facts {
            cgroup_oom_kills: Some(0),
            outside_sigkill: false,
            ..facts()
        };
        assert_eq!(evidence(&none), None);
    }

    #[test]
    fn an_outside_sigkill_needs_the_oom_killer_or_a_peak_near_available() {
        // A plain SIGKILL from someone else, far from exhaustion: no evidence.
        assert_eq!(evidence(&facts()), None);
        let oom_ran = Facts {
            oom_kills_now: Some(4),
            ..facts()
        };
        let e = evidence(&oom_ran).unwrap();
        assert_eq!(e.source, OomSource::KernelOomKiller);
        assert!(
            e.evidence.starts_with("killed by SIGKILL at peak 1024 MB"),
            "{e:?}"
        );
        let near = Facts {
            peak: 7 * GB + GB / 2,
            ..facts()
        };
        let e = evidence(&near).unwrap();
        assert_eq!(e.source, OomSource::NearAvailable);
        assert!(e.evidence.contains("8192 MB"), "{e:?}");
    }

    #[test]
    fn the_monitors_own_kill_is_not_evidence() {
        let ours = Facts {
            outside_sigkill: false,
            oom_kills_now: Some(9),
            peak: 8 * GB,
            ..facts()
        };
        assert_eq!(evidence(&ours), None);
    }

    #[test]
    fn the_machine_counters_are_readable_here() {
        let b = OomBaseline::read();
        assert!(b.available.is_some_and(|a| a > 0), "{b:?}");
    }
}
