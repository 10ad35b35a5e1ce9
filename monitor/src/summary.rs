//! The measured resources of one task, and the limits it may be held to.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Bytes in one "MB" of the summary. Like `resource_monitor`, "MB" means MiB.
pub const MB: f64 = 1024.0 * 1024.0;

/// Exit status of `drover monitor` when the task was killed for going over a
/// limit. It is 128 + SIGSTOP: a shell never reports it for a command,
/// because SIGSTOP stops a process but cannot terminate it.
pub const LIMIT_EXIT_STATUS: i32 = 147;

/// Unit of every numeric field of [`Summary`] (and of [`LimitExceeded`]
/// values for the named resource). Fields not listed are unit-less counts or
/// strings.
pub const UNITS: &[(&str, &str)] = &[
    ("start", "s"),
    ("end", "s"),
    ("wall_time", "s"),
    ("cpu_time", "s"),
    ("cores", "cores"),
    ("cores_avg", "cores"),
    ("memory", "MB"),
    ("virtual_memory", "MB"),
    ("swap_memory", "MB"),
    ("bytes_read", "MB"),
    ("bytes_written", "MB"),
    ("disk", "MB"),
    ("max_concurrent_processes", "procs"),
    ("total_processes", "procs"),
    ("total_files", "files"),
];

/// Resource limits for one task. `None` means unlimited.
///
/// Memory, disk and wall time are enforced by killing the whole tree at the
/// first sample that sees them exceeded. `cores` is enforced by throttling
/// (cgroup `cpu.max`) when the cgroup has the cpu controller, and is advisory
/// otherwise: a task never gets killed for using more cores than it asked for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Peak memory of the tree, in MB (see [`Summary::memory`]).
    pub memory_mb: Option<u64>,
    /// Size of the sandbox directory, in MB (see [`Summary::disk`]).
    pub disk_mb: Option<u64>,
    /// Time since the task was spawned.
    pub wall_time: Option<Duration>,
    /// Cores the task may use on average.
    pub cores: Option<f64>,
}

/// Error parsing a `--limit` specification.
#[derive(Debug, thiserror::Error)]
pub enum LimitParseError {
    /// A `key=value` pair whose key is not a known resource.
    #[error("unknown limit {0:?} (expected memory, disk, wall_time or cores)")]
    UnknownResource(String),
    /// A value that is not a non-negative number.
    #[error("bad value {value:?} for limit {resource}")]
    BadValue {
        /// The resource being limited.
        resource: String,
        /// The text that failed to parse.
        value: String,
    },
    /// An element without `=`.
    #[error("expected resource=value, got {0:?}")]
    Syntax(String),
}

impl FromStr for Limits {
    type Err = LimitParseError;

    /// Parses `memory=MB,disk=MB,wall_time=S,cores=N` (any subset, any order).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut limits = Limits::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| LimitParseError::Syntax(part.to_string()))?;
            let bad = || LimitParseError::BadValue {
                resource: key.to_string(),
                value: value.to_string(),
            };
            let num: f64 = value.trim().parse().map_err(|_| bad())?;
            if !num.is_finite() || num < 0.0 {
                return Err(bad());
            }
            match key.trim() {
                "memory" => limits.memory_mb = Some(num.ceil() as u64),
                "disk" => limits.disk_mb = Some(num.ceil() as u64),
                "wall_time" => {
                    limits.wall_time = Some(Duration::try_from_secs_f64(num).map_err(|_| bad())?)
                }
                "cores" => limits.cores = Some(num),
                other => return Err(LimitParseError::UnknownResource(other.to_string())),
            }
        }
        Ok(limits)
    }
}

/// The limit a task broke, and the measurement that broke it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct LimitExceeded {
    /// `"memory"`, `"disk"` or `"wall_time"`.
    pub resource: String,
    /// The limit, in the unit of the summary field of the same name.
    pub limit: f64,
    /// The measured value that went over it, same unit.
    pub value: f64,
}

/// How the monitor knows a task ran out of memory it did not limit (see
/// [`MemoryExhausted`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OomSource {
    /// `oom_kill` in the task cgroup's `memory.events`.
    CgroupEvents,
    /// The root died of an outside SIGKILL while the kernel's OOM killer
    /// ran (`oom_kill` in `/proc/vmstat` rose).
    KernelOomKiller,
    /// The root died of an outside SIGKILL at a peak near the memory the
    /// machine had available when it started.
    NearAvailable,
}

/// Evidence that a task ran out of memory although the monitor did not
/// kill it for a memory limit: the kernel's OOM killer (for the machine,
/// or for a cgroup limit someone else set), or a SIGKILL from outside at a
/// peak near the machine's available memory.
///
/// A scheduler should treat such a task as resource exhaustion of memory
/// (retry it with more memory), not as a failure of the task itself: the
/// drover worker reports it to the master as a memory limit exceeded, with
/// this `evidence` as the error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemoryExhausted {
    /// Which evidence it is.
    pub source: OomSource,
    /// The evidence in words, e.g. "oom_kill in memory.events: ...", or
    /// "killed by SIGKILL at peak 3800 MB while the kernel's OOM killer ran".
    pub evidence: String,
    /// The task's peak memory, MB.
    pub memory: f64,
}

/// Measurements of one task. Field names follow CCTools `resource_monitor`;
/// units are listed in [`UNITS`] and in the crate documentation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// The command line, space-joined.
    pub command: String,
    /// `"normal"` (exited), `"signal"` (killed by a signal it was not sent by
    /// the monitor for a limit) or `"limits"` (killed for a limit).
    pub exit_type: String,
    /// Exit code when `exit_type` is `"normal"`.
    pub exit_status: Option<i32>,
    /// Terminating signal otherwise.
    pub signal: Option<i32>,
    /// Spawn time, seconds since the Unix epoch.
    pub start: f64,
    /// Time the root process was seen to exit, seconds since the Unix epoch.
    pub end: f64,
    /// `end - start`, seconds.
    pub wall_time: f64,
    /// User + system CPU time of the whole tree, seconds.
    pub cpu_time: f64,
    /// Peak cores: the largest CPU time / wall time over a sliding window
    /// of at least one second (or `cores_avg` for shorter tasks).
    pub cores: f64,
    /// `cpu_time / wall_time`.
    pub cores_avg: f64,
    /// Peak memory of the tree, MB. See the crate docs for how shared pages
    /// count under each `monitor_method`.
    pub memory: f64,
    /// Peak of the summed virtual memory sizes of the tree, MB.
    pub virtual_memory: f64,
    /// Peak of the summed swap usage of the tree, MB.
    pub swap_memory: f64,
    /// Largest number of live processes seen in one sample.
    pub max_concurrent_processes: u64,
    /// Distinct processes seen (processes living less than one interval
    /// may be missed).
    pub total_processes: u64,
    /// Bytes passed to read-family syscalls by the tree (`rchar`), MB.
    pub bytes_read: f64,
    /// Bytes passed to write-family syscalls by the tree (`wchar`), MB.
    pub bytes_written: f64,
    /// Peak apparent size of the files in the sandbox, MB.
    pub disk: f64,
    /// Peak number of files, directories and links in the sandbox.
    pub total_files: u64,
    /// `"cgroup2"`, `"cgroup2+proc"` or `"proc"`; see the crate docs.
    pub monitor_method: String,
    /// Set when the task was killed for going over a limit.
    pub limits_exceeded: Option<LimitExceeded>,
    /// Set when the task ran out of memory without going over a limit of
    /// the monitor's (the kernel's OOM killer, or a SIGKILL from outside
    /// when memory ran out). Never set with `limits_exceeded`.
    #[serde(default)]
    pub memory_exhausted: Option<MemoryExhausted>,
    /// Number of samples taken (including the final one).
    pub samples: u64,
}

impl Summary {
    /// One line saying why the task ended early, for people: the limit it
    /// went over and what it used (`memory went over its limit: 153.2 MB
    /// used, 100 MB allowed`), or the evidence that it ran out of memory.
    /// `None` when neither happened.
    pub fn ending_message(&self) -> Option<String> {
        if let Some(hit) = &self.limits_exceeded {
            let unit = UNITS
                .iter()
                .find(|(field, _)| *field == hit.resource)
                .map_or("", |(_, unit)| unit);
            return Some(format!(
                "killed for going over its {} limit: {} {unit} used, {} {unit} allowed",
                hit.resource,
                one_decimal(hit.value),
                one_decimal(hit.limit)
            ));
        }
        self.memory_exhausted
            .as_ref()
            .map(|e| format!("ran out of memory: {}", e.evidence))
    }

    /// The summary as a JSON object with an added `"units"` map, as printed by
    /// `drover monitor`.
    pub fn to_json_with_units(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut v {
            let units: serde_json::Map<String, serde_json::Value> = UNITS
                .iter()
                .map(|(k, u)| (k.to_string(), serde_json::Value::from(*u)))
                .collect();
            map.insert("units".into(), serde_json::Value::Object(units));
        }
        v
    }
}

/// `x` with one decimal, or none when it is whole.
fn one_decimal(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// How the root process of a task ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It called exit with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// The result of a finished task.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// How the root process ended.
    pub exit: Exit,
    /// What the task used.
    pub summary: Summary,
    /// Whether the sandbox held no entry at the end, as the final walk saw
    /// it at a moment when none of the task's processes was alive any more
    /// (so none could add one later). `None` when that is not known: no
    /// sandbox, one that could not be read, or a task followed through
    /// /proc, whose processes cannot all be known dead before the walk.
    pub sandbox_empty: Option<bool>,
}

impl Report {
    /// Whether the task ran out of memory: the monitor killed it for its
    /// memory limit, or there is evidence of an OOM kill it did not make
    /// ([`Summary::memory_exhausted`]). Either way, more memory is what
    /// it needs, not a fix of the task.
    pub fn ran_out_of_memory(&self) -> bool {
        let s = &self.summary;
        s.memory_exhausted.is_some()
            || s.limits_exceeded
                .as_ref()
                .is_some_and(|l| l.resource == "memory")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_limits() {
        let l: Limits = "memory=100,disk=5,wall_time=1.5,cores=2".parse().unwrap();
        assert_eq!(l.memory_mb, Some(100));
        assert_eq!(l.disk_mb, Some(5));
        assert_eq!(l.wall_time, Some(Duration::from_millis(1500)));
        assert_eq!(l.cores, Some(2.0));
        assert!("memory=x".parse::<Limits>().is_err());
        assert!("foo=1".parse::<Limits>().is_err());
        assert!("memory".parse::<Limits>().is_err());
        assert!("wall_time=-1".parse::<Limits>().is_err());
    }

    #[test]
    fn ending_messages_name_the_limit_and_the_use() {
        let mut s = Summary::default();
        assert_eq!(s.ending_message(), None);
        s.limits_exceeded = Some(LimitExceeded {
            resource: "memory".into(),
            limit: 100.0,
            value: 153.25,
        });
        assert_eq!(
            s.ending_message().unwrap(),
            "killed for going over its memory limit: 153.2 MB used, 100 MB allowed"
        );
        s.limits_exceeded = Some(LimitExceeded {
            resource: "wall_time".into(),
            limit: 1.5,
            value: 1.6,
        });
        assert!(s
            .ending_message()
            .unwrap()
            .contains("1.6 s used, 1.5 s allowed"));
        s.limits_exceeded = None;
        s.memory_exhausted = Some(MemoryExhausted {
            source: OomSource::CgroupEvents,
            evidence: "oom_kill in memory.events".into(),
            memory: 512.0,
        });
        assert_eq!(
            s.ending_message().unwrap(),
            "ran out of memory: oom_kill in memory.events"
        );
    }

    #[test]
    fn units_cover_numeric_fields() {
        let v = serde_json::to_value(Summary::default()).unwrap();
        for (k, val) in v.as_object().unwrap() {
            if val.is_f64() {
                assert!(UNITS.iter().any(|(n, _)| n == k), "no unit for {k}");
            }
        }
    }
}
