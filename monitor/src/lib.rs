//! Resource measurement and limits for process trees: the lightweight
//! function monitor of drover.
//!
//! A [`Monitor`] runs one sampler thread for every task it watches. Each task
//! is spawned in its own session and process group, and, when the host
//! allows it, in its own cgroup v2 group, joined between fork and exec so
//! that no descendant (double-forked or not) escapes it. (A task that
//! [`Monitor::spawn_exec`] starts in a cgroup, from a process without a
//! controlling terminal, gets only a process group of its own: the group
//! finds its tree, and a session per task costs a scheduler autogroup.) The summary's
//! `monitor_method` says how the task was measured:
//!
//! | method          | membership                     | memory                          | cpu_time           |
//! |-----------------|--------------------------------|---------------------------------|--------------------|
//! | `cgroup2`       | `cgroup.procs`                 | `memory.peak` of the group      | `cpu.stat`         |
//! | `cgroup2+proc`  | `cgroup.procs`                 | summed RSS from /proc (below)   | `cpu.stat`         |
//! | `proc`          | session, process group, ppid   | summed RSS from /proc (below)   | /proc + rusage     |
//!
//! `cgroup2+proc` is a group without the memory controller (hybrid hosts,
//! where memory is bound to the v1 hierarchy). `proc` is used when no
//! cgroup2 group can be created (no mount, not root and not delegated): it
//! finds the tree by walking /proc for the task's session id and process
//! group, plus every descendant (by ppid) of a process already seen, and
//! remembers each process it saw (by pid and start time). A descendant that
//! both calls `setsid` and double-forks between two samples is missed.
//!
//! # How shared pages count in `memory`
//!
//! * `cgroup2`: each page is charged once, to the group that first touched
//!   it. The value includes page cache the task caused (files it read or
//!   wrote) and kernel memory such as page tables, because that is what the
//!   kernel reclaims or OOM-kills against.
//! * `cgroup2+proc` and `proc`: the sum over the tree's live processes of
//!   their resident set (`/proc/PID/stat` rss = anonymous + file-backed +
//!   shmem pages). A page mapped by k processes of the tree counts k times:
//!   shared libraries (about 1 MB per small process) and copy-on-write pages
//!   a fork has not yet copied. This never underestimates, and costs one
//!   small file read per process. Because it can overestimate a tree that
//!   forks a large parent, a memory limit breach is confirmed with PSS
//!   (`/proc/PID/smaps_rollup`, each shared page divided among its mappers,
//!   so every page counts once in total) before the tree is killed; the
//!   `limits_exceeded.value` is then that PSS.
//!
//! The peak is the largest value seen at a sample, raised to the root's
//! `ru_maxrss` (largest single process among the root and its reaped
//! descendants) so a task that ends before the first sample still reports
//! its memory. Linux raises `ru_maxrss` at exec to the peak of the memory a
//! process had before, which for a spawned task is the spawner's (the
//! worker's): a root `ru_maxrss` no larger than the spawner's own peak at
//! the spawn is therefore not used for a task that a sample saw alive, and
//! such a task is measured by its samples.
//!
//! # Summary schema
//!
//! Field names follow CCTools `resource_monitor`. "MB" is 2^20 bytes.
//! Numbers are rounded to three decimals (milliseconds, about a kilobyte);
//! more digits would be float noise.
//!
//! | field | unit | meaning |
//! |---|---|---|
//! | `command` | | the command line |
//! | `exit_type` | | `normal`, `signal` or `limits` |
//! | `exit_status` / `signal` | | exit code, or terminating signal |
//! | `start`, `end` | s | since the Unix epoch |
//! | `wall_time` | s | from spawn to the root's exit |
//! | `cpu_time` | s | user + system of the whole tree |
//! | `cores` | cores | peak of cpu/wall over sliding windows of ≥ 1 s (≥ `cores_avg`) |
//! | `cores_avg` | cores | `cpu_time / wall_time` |
//! | `memory` | MB | peak memory, see above |
//! | `virtual_memory` | MB | peak of summed VSZ |
//! | `swap_memory` | MB | peak swap (`memory.swap.peak`, else summed VmSwap; 0 without swap) |
//! | `max_concurrent_processes` | procs | most live processes at one full pass or the final sample |
//! | `total_processes` | procs | distinct processes alive at a full pass or the final sample (those living < 1 interval may be missed; see `sample`) |
//! | `bytes_read`, `bytes_written` | MB | `rchar`/`wchar`: bytes through read/write syscalls, incl. pipes and cached I/O |
//! | `disk` | MB | peak apparent size of the sandbox's files (hard links once) |
//! | `total_files` | files | peak number of entries in the sandbox |
//! | `monitor_method` | | see above |
//! | `limits_exceeded` | | `{resource, limit, value}` in the units above, or null |
//! | `memory_exhausted` | | `{source, evidence, memory}` when the task ran out of memory without a limit of the monitor's (an OOM kill), or null; see [`MemoryExhausted`] |
//! | `samples` | | samples taken, including the final one |
//!
//! Cumulative counters (cpu, bytes) survive process exits: a parent's
//! /proc counters include the children it reaped, and the last seen values
//! of an orphan (reaped by init) are kept. `cpu_time` is at least the
//! root's rusage.
//!
//! # Limits
//!
//! Memory, disk and wall time are checked at every sample; the first breach
//! kills the whole tree (`cgroup.kill`, the process group, and every seen
//! escapee), and the summary's `limits_exceeded` names it. A task killed
//! for lack of memory by anything else (the kernel's OOM killer, a cgroup
//! cap someone else set) has `memory_exhausted` instead, with the evidence
//! (`oom_kill` in its cgroup's `memory.events`, or a SIGKILL while the OOM
//! killer ran); [`Report::ran_out_of_memory`] says either, and the worker
//! reports both to the master as memory exhaustion, to retry with more. Cores are
//! throttled with `cpu.max` when the group has the cpu controller and are
//! otherwise advisory.
//!
//! # Sample series
//!
//! With [`SpawnOptions::series`] (`drover monitor --series FILE`), each
//! sample is one JSON object per line with `wall_time`, `cpu_time`, `cores`
//! (since the previous sample), `memory`, `virtual_memory`, `swap_memory`,
//! `processes` (live now), `total_processes`, `bytes_read`, `bytes_written`,
//! `disk` and `total_files`, in the units above.

mod cgroup;
pub mod cli;
mod disk;
mod monitor;
mod oom;
mod procscan;
mod sample;
mod sampler;
mod scan;
mod spawn;
mod summary;
mod sys;
mod task;
mod watched;

pub use monitor::{
    MemoryLimitHook, Method, Monitor, MonitorOptions, Reserved, SpawnOptions, DEFAULT_INTERVAL,
};
pub use spawn::{BaseEnv, Exec};
pub use summary::{
    Exit, LimitExceeded, LimitParseError, Limits, MemoryExhausted, OomSource, Report, Summary,
    LIMIT_EXIT_STATUS, MB, UNITS,
};
pub use watched::Watched;
