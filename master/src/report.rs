//! The master's status report for the catalog, and the thread that sends it.
//!
//! The engine is never made to wait on the network: a separate thread asks it
//! for a snapshot (the same `Stats` and worker list the user can ask for, one
//! message each), turns that into a [`MasterReport`] and sends it. A catalog
//! that is slow, unreachable or gone costs the engine nothing.

use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_catalog::report::{MAX_CATEGORIES, MAX_WORKERS};
use drover_catalog::{
    CategorySummary, EventSummary, MasterReport, RunningTask, ShapeCount, WorkerSummary,
};
use drover_protocol::{Resources, TaskReport};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::category::{AllocationMode, CategoryStats};
use crate::command::Command;
use crate::history::CategoryCounts;
use crate::scheduler::Request;
use crate::stats::{Stats, WorkerInfo};
use crate::task::Attempt;

/// How often a master reports unless told otherwise (as CCTools masters do).
pub const DEFAULT_CATALOG_INTERVAL: Duration = Duration::from_secs(15);

/// Longest a shutting-down manager waits for its last report to go out; past
/// that the report is abandoned rather than holding up the user's program.
const FINAL_REPORT_WAIT: Duration = Duration::from_secs(3);

/// What a master says about itself that does not change while it runs:
/// everything in a report except the counts.
pub(crate) fn identity(project: &str, host: &str, port: u16, started: SystemTime) -> MasterReport {
    let mut r = MasterReport::new_master(project, host, port);
    r.owner = owner();
    r.start_time = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Never 0, which means "unknown" to the catalog.
    r.run_id = rand::random::<u64>().max(1);
    r
}

/// The host name workers should use: the bind address when it names one
/// interface, else this machine's name. The catalog also records the address
/// reports come from, which workers fall back on if the name does not resolve.
pub(crate) fn advertised_host(bind: &str) -> String {
    match bind.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => drover_protocol::hostname(),
        _ => bind.to_string(),
    }
}

fn owner() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    passwd_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// The user name of `uid` from the password database (batch jobs and
/// containers often run without $USER).
fn passwd_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes
    // into it and into `buf` (of the length given) only, and on success
    // `result` points at `pwd`, whose strings live in `buf`.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy();
        (!name.is_empty()).then(|| name.into_owned())
    }
}

/// Fills `identity` with the counts of `stats` and the `workers` list: the
/// pure part of building a report, kept apart from the engine round trips so
/// it is tested alone.
pub(crate) fn build_report(
    identity: &MasterReport,
    stats: &Stats,
    workers: &[WorkerInfo],
) -> MasterReport {
    let mut r = identity.clone();
    // A task sent ahead waits on its worker, not yet running: the page and
    // `drover status` count it as waiting, so "running" never exceeds cores.
    r.tasks_waiting = stats.tasks_waiting + stats.tasks_queued_on_workers;
    r.tasks_queued_on_workers = stats.tasks_queued_on_workers;
    r.tasks_fit_no_worker = stats.tasks_fit_no_worker;
    r.workers_blocked = stats.workers_blocked;
    r.tasks_running = stats.tasks_running;
    r.tasks_done = stats.tasks_done;
    // Cancelled tasks did not succeed; counting them as failed keeps the
    // progress bar honest about how much of the submitted work got done.
    r.tasks_failed = stats.tasks_failed.saturating_add(stats.tasks_cancelled);
    r.workers_connected = stats.workers_connected;
    r.workers_busy = stats.workers_busy;
    r.cores_inuse = stats.resources_in_use.cores.into();
    r.cores_total = stats.resources_total.cores.into();
    r.memory_inuse_mb = stats.resources_in_use.memory_mb;
    r.memory_total_mb = stats.resources_total.memory_mb;
    r.gpus_inuse = stats.resources_in_use.gpus.into();
    r.gpus_total = stats.resources_total.gpus.into();
    // Busiest workers first, so the ones a report has room for are the
    // interesting ones when a master has more than MAX_WORKERS.
    let mut ws: Vec<&WorkerInfo> = workers.iter().collect();
    ws.sort_by(|a, b| b.running.cmp(&a.running).then_with(|| a.host.cmp(&b.host)));
    r.workers = ws
        .into_iter()
        .take(MAX_WORKERS)
        .map(|w| WorkerSummary {
            host: w.host.clone(),
            cores: w.resources.cores.into(),
            memory_mb: w.resources.memory_mb,
            running: w.running as u64,
            addr: w.addr.clone(),
            ..Default::default()
        })
        .collect();
    r
}

/// Per-category summaries: each category's task counts and, for people,
/// how it sizes its tasks. `counts` are the engine's per-category tallies
/// (see `History`), `running` the tasks running now; a category with
/// counts but no sizing state (its tasks all declared what they need) is
/// listed too, and categories with live tasks come first.
pub(crate) fn category_summaries(
    categories: &[CategoryStats],
    counts: &rustc_hash::FxHashMap<String, CategoryCounts>,
    running: &[RunningTask],
) -> Vec<CategorySummary> {
    let mut running_by: rustc_hash::FxHashMap<&str, u64> = Default::default();
    for t in running {
        *running_by.entry(t.category.as_str()).or_default() += 1;
    }
    let mut names: Vec<&str> = counts.keys().map(String::as_str).collect();
    for c in categories {
        if !counts.contains_key(&c.name) {
            names.push(&c.name);
        }
    }
    let sizing: rustc_hash::FxHashMap<&str, &CategoryStats> =
        categories.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut out: Vec<CategorySummary> = names
        .into_iter()
        .map(|name| {
            let n = counts.get(name).copied().unwrap_or_default();
            let running = running_by.get(name).copied().unwrap_or(0);
            CategorySummary {
                name: name.to_string(),
                waiting: Some(n.live.saturating_sub(running)),
                running: Some(running),
                done: Some(n.done),
                failed: Some(n.failed),
                allocation: Some(match sizing.get(name) {
                    // A category none of whose tasks it sized (they declared
                    // what they need) would read "learning" for ever.
                    Some(c) if n.learned > 0 || n.live + n.done + n.failed == 0 => {
                        describe_allocation(c)
                    }
                    _ => "as declared by each task".to_string(),
                }),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let live = |c: &CategorySummary| c.waiting.unwrap_or(0) + c.running.unwrap_or(0);
        live(b).cmp(&live(a)).then_with(|| a.name.cmp(&b.name))
    });
    out.truncate(MAX_CATEGORIES);
    out
}

/// Most bytes of a failed task's stderr an event keeps (its last lines,
/// where the error usually is).
const STDERR_TAIL: usize = 240;

/// The event of a task that failed: how it ended and its stderr's tail.
pub(crate) fn failure_event(
    id: u64,
    tag: &Option<String>,
    attempts: &[Attempt],
    error: Option<&str>,
    report: Option<&TaskReport>,
) -> EventSummary {
    let last = attempts.last();
    let mut detail = last
        .map(|a| a.ending.clone())
        .unwrap_or_else(|| "never ran".to_string());
    if let Some(e) = error {
        detail.push_str(": ");
        detail.push_str(e);
    }
    if let Some(r) = report {
        let tail = tail_of(r.stderr.trim_end(), STDERR_TAIL);
        if !tail.is_empty() {
            detail.push_str("; stderr: ");
            detail.push_str(tail);
        }
    }
    EventSummary {
        kind: "task failed".into(),
        host: last.map(|a| a.host.clone()).unwrap_or_default(),
        task: Some(id),
        tag: tag.clone(),
        detail,
        ..Default::default()
    }
}

/// The last `max` bytes of `s` at most, not splitting a character.
fn tail_of(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Largest report the master sends, in bytes of JSON: under the catalog's
/// default limit (64 KiB), so a busy master's report is never dropped.
pub(crate) const MAX_REPORT_BYTES: usize = 60 * 1024;

/// Cuts a report to [`MAX_REPORT_BYTES`]: history first (its oldest half
/// at a time), then running tasks, events and workers, the parts that
/// grow with a master's size.
pub(crate) fn fit(r: &mut MasterReport) {
    let size = |r: &MasterReport| serde_json::to_vec(r).map(|v| v.len()).unwrap_or(0);
    let mut guard = 0;
    while size(r) > MAX_REPORT_BYTES && guard < 64 {
        guard += 1;
        if let Some(h) = r.history.as_mut().filter(|h| h.len() > 60) {
            let n = (h.len() / 2).max(60);
            h.keep_last(n);
        } else if r.running.len() > 5 {
            r.running.truncate(r.running.len() / 2);
        } else if r.events.len() > 5 {
            let n = r.events.len() / 2;
            r.events.drain(..n);
        } else if r.workers.len() > 10 {
            r.workers.truncate(r.workers.len() / 2);
        } else if r.categories.len() > 10 {
            r.categories.truncate(r.categories.len() / 2);
        } else {
            break;
        }
    }
}

/// "bucketing: 3 buckets; next 2 cores, 1200 MB", and the like.
fn describe_allocation(c: &CategoryStats) -> String {
    let mut out = match c.config.mode {
        AllocationMode::Fixed => "fixed".to_string(),
        AllocationMode::Max if c.samples == 0 => "max seen: learning".to_string(),
        AllocationMode::Max => "max seen".to_string(),
        AllocationMode::Bucketing if c.window_samples < c.config.min_samples => format!(
            "bucketing: learning ({} of {} samples)",
            c.window_samples, c.config.min_samples
        ),
        AllocationMode::Bucketing => match c.buckets.len() {
            1 => "bucketing: 1 bucket".to_string(),
            n => format!("bucketing: {n} buckets"),
        },
    };
    match &c.next_allocation {
        Some(r) => out.push_str(&format!("; next {}", describe_resources(r))),
        None => out.push_str("; next a whole worker"),
    }
    if c.exhausted > 0 {
        out.push_str(&format!("; {} exhausted", c.exhausted));
    }
    out
}

fn describe_resources(r: &Resources) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut parts = vec![plural(r.cores.into(), "core", "cores")];
    if r.memory_mb > 0 {
        parts.push(format!("{} MB", r.memory_mb));
    }
    if r.disk_mb > 0 {
        parts.push(format!("{} MB disk", r.disk_mb));
    }
    if r.gpus > 0 {
        parts.push(plural(r.gpus.into(), "gpu", "gpus"));
    }
    parts.join(", ")
}

/// Waiting tasks grouped by shape, from `Scheduler::demand()`. Biggest
/// groups first, so a report cut at `MAX_SHAPES` keeps the shapes that
/// matter most.
pub(crate) fn waiting_shapes(demand: &[(Request, usize)]) -> Vec<ShapeCount> {
    let mut shapes: Vec<ShapeCount> = demand
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(req, n)| match req {
            Request::Fixed(r) => ShapeCount {
                cores: r.cores.into(),
                memory_mb: r.memory_mb,
                disk_mb: r.disk_mb,
                gpus: r.gpus.into(),
                whole_worker: false,
                count: *n as u64,
            },
            Request::WholeWorker => ShapeCount {
                whole_worker: true,
                count: *n as u64,
                ..Default::default()
            },
        })
        .collect();
    // Classes of different categories may ask for the same shape: one row
    // each would read as two kinds of task.
    let key = |s: &ShapeCount| (s.whole_worker, s.cores, s.memory_mb, s.disk_mb, s.gpus);
    shapes.sort_by_key(key);
    shapes.dedup_by(|later, kept| {
        let same = key(later) == key(kept);
        if same {
            kept.count += later.count;
        }
        same
    });
    shapes.sort_by_key(|s| std::cmp::Reverse(s.count));
    shapes
}

fn ask<T>(
    commands: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    commands.send(make(tx)).ok()?;
    rx.blocking_recv().ok()
}

/// The master's report as of now; `None` once the engine has stopped.
/// Blocks on the engine's answer, so never call it from inside the runtime.
pub(crate) fn snapshot(commands: &mpsc::UnboundedSender<Command>) -> Option<MasterReport> {
    // One round trip: the engine builds the whole report in one step, so
    // its counts, history and events agree with each other.
    ask(commands, Command::Report)
}

/// The thread that reports a master to a catalog every interval, and once
/// more, marked stopped, when [`Reporter::stop`] is called.
pub(crate) struct Reporter {
    stop: std_mpsc::Sender<()>,
    // A bare Receiver is !Sync, which would make `Manager` unusable from
    // several threads at once (Python calls it from any thread).
    done: std::sync::Mutex<std_mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting to `catalog` right away, then every `interval`.
    pub(crate) fn start(
        catalog: String,
        interval: Duration,
        commands: mpsc::UnboundedSender<Command>,
        catalog_key: Option<Vec<u8>>,
    ) -> std::io::Result<Reporter> {
        let (stop, stop_rx) = std_mpsc::channel();
        let (done_tx, done) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("drover-catalog-report".into())
            .spawn(move || {
                let mut link = Link::new(catalog, catalog_key);
                let mut seq = 0;
                loop {
                    if let Some(mut r) = snapshot(&commands) {
                        seq += 1;
                        r.seq = seq;
                        link.send(&r, false);
                    }
                    match stop_rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                if let Some(mut r) = snapshot(&commands) {
                    r.stopped = true;
                    r.seq = seq + 1;
                    link.send(&r, true);
                }
                let _ = done_tx.send(());
            })?;
        Ok(Reporter {
            stop,
            done: std::sync::Mutex::new(done),
            thread: Some(thread),
        })
    }

    /// Sends the last report, marked stopped, with the counts of this moment.
    /// Call it while the engine still runs. Waits at most
    /// [`FINAL_REPORT_WAIT`] for it to go out.
    pub(crate) fn stop(mut self) {
        let _ = self.stop.send(());
        let done = self.done.get_mut().unwrap_or_else(|e| e.into_inner());
        match done.recv_timeout(FINAL_REPORT_WAIT) {
            Ok(()) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
            // The thread gives up on its own within the client's timeout;
            // it is left to finish detached.
            Err(_) => debug!("the final catalog report is taking long; not waiting for it"),
        }
    }
}

/// The sending side, which logs a failing catalog once rather than at every
/// interval, and says when it works again.
struct Link {
    catalog: String,
    /// The catalog key reports are signed with, if any.
    key: Option<Vec<u8>>,
    failing: Option<String>,
}

impl Link {
    fn new(catalog: String, key: Option<Vec<u8>>) -> Link {
        Link {
            catalog,
            key,
            failing: None,
        }
    }

    fn send(&mut self, report: &MasterReport, last: bool) {
        // The last report goes by HTTP so that it is known to arrive (and the
        // entry shows the master stopped); the periodic ones by UDP, which
        // costs the catalog and the master next to nothing.
        let sent = if last {
            drover_catalog::client::post_signed_report(&self.catalog, report, self.key.as_deref())
        } else {
            drover_catalog::client::send_signed_report(&self.catalog, report, self.key.as_deref())
        };
        match sent {
            Ok(()) => {
                if self.failing.take().is_some() {
                    info!(catalog = %self.catalog, "reporting to the catalog again");
                }
            }
            Err(e) => {
                let e = format!("{e:#}");
                if self.failing.as_deref() != Some(e.as_str()) {
                    warn!(catalog = %self.catalog, "cannot report to the catalog: {e}");
                } else {
                    debug!(catalog = %self.catalog, "cannot report to the catalog: {e}");
                }
                self.failing = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_catalog::report::MASTER_KIND;

    fn worker(host: &str, cores: u32, running: usize) -> WorkerInfo {
        WorkerInfo {
            host: host.into(),
            addr: "127.0.0.1:1".into(),
            resources: Resources {
                cores,
                memory_mb: 1000 * cores as u64,
                disk_mb: 0,
                gpus: 0,
            },
            running,
        }
    }

    #[test]
    fn report_carries_identity_and_counts() {
        let started = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let id = identity("proj", "node1", 9123, started);
        let stats = Stats {
            tasks_waiting: 5,
            tasks_running: 3,
            tasks_done: 10,
            tasks_failed: 1,
            tasks_cancelled: 2,
            tasks_fit_no_worker: 4,
            workers_blocked: 1,
            workers_connected: 2,
            workers_busy: 1,
            resources_in_use: Resources {
                cores: 3,
                memory_mb: 300,
                disk_mb: 0,
                gpus: 1,
            },
            resources_total: Resources {
                cores: 8,
                memory_mb: 8000,
                disk_mb: 0,
                gpus: 2,
            },
            ..Default::default()
        };
        let r = build_report(&id, &stats, &[worker("a", 4, 0), worker("b", 4, 3)]);
        assert_eq!(r.kind, MASTER_KIND);
        assert_eq!(
            (r.project.as_str(), r.host.as_str(), r.port),
            ("proj", "node1", 9123)
        );
        assert_eq!(r.start_time, 1_700_000_000);
        assert_eq!((r.tasks_fit_no_worker, r.workers_blocked), (4, 1));
        assert!(!r.owner.is_empty());
        assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            (
                r.tasks_waiting,
                r.tasks_running,
                r.tasks_done,
                r.tasks_failed
            ),
            (5, 3, 10, 3)
        );
        assert_eq!((r.workers_connected, r.workers_busy), (2, 1));
        assert_eq!((r.cores_inuse, r.cores_total), (3, 8));
        assert_eq!((r.memory_inuse_mb, r.memory_total_mb), (300, 8000));
        assert_eq!((r.gpus_inuse, r.gpus_total), (1, 2));
        assert!(!r.stopped);
        // Busiest first.
        assert_eq!(r.workers[0].host, "b");
        assert_eq!(r.workers[0].running, 3);
        assert_eq!(r.workers[1].memory_mb, 4000);
    }

    #[test]
    fn worker_list_is_bounded() {
        let id = identity("p", "h", 1, SystemTime::now());
        let many: Vec<WorkerInfo> = (0..MAX_WORKERS + 50)
            .map(|i| worker(&format!("w{i}"), 1, i % 3))
            .collect();
        let r = build_report(&id, &Stats::default(), &many);
        assert_eq!(r.workers.len(), MAX_WORKERS);
        // The busiest are the ones kept.
        let busiest = many.iter().filter(|w| w.running == 2).count();
        assert_eq!(r.workers.iter().filter(|w| w.running == 2).count(), busiest);
        assert!(r.workers.windows(2).all(|p| p[0].running >= p[1].running));
    }

    #[test]
    fn shapes_from_demand() {
        let small = Resources {
            cores: 1,
            memory_mb: 100,
            disk_mb: 0,
            gpus: 0,
        };
        let big = Resources {
            cores: 4,
            memory_mb: 8000,
            disk_mb: 10,
            gpus: 1,
        };
        let shapes = waiting_shapes(&[
            (Request::Fixed(big), 2),
            (Request::Fixed(small), 7),
            (Request::WholeWorker, 1),
            (Request::Fixed(small), 0),
        ]);
        assert_eq!(shapes.len(), 3);
        assert_eq!(
            (shapes[0].cores, shapes[0].memory_mb, shapes[0].count),
            (1, 100, 7)
        );
        assert_eq!(
            (
                shapes[1].cores,
                shapes[1].disk_mb,
                shapes[1].gpus,
                shapes[1].count
            ),
            (4, 10, 1, 2)
        );
        assert!(shapes[2].whole_worker);
        assert_eq!(shapes[2].count, 1);
    }

    #[test]
    fn categories_say_how_they_size_tasks() {
        use crate::category::{CategoryConfig, CategoryState};
        let largest = Resources {
            cores: 8,
            memory_mb: 16000,
            disk_mb: 0,
            gpus: 0,
        };
        let fixed = CategoryState::new("render", CategoryConfig::fixed()).stats(&largest);
        let mut learning = CategoryState::new("align", CategoryConfig::default()).stats(&largest);
        learning.window_samples = 3;
        let mut learned = learning.clone();
        learned.name = "assemble".into();
        learned.window_samples = learned.config.min_samples;
        learned.buckets = vec![
            learned.buckets.first().cloned().unwrap_or(
                crate::category::BucketStats {
                    allocation: largest,
                    low: Default::default(),
                    high: Default::default(),
                    count: 1,
                },
            );
            3
        ];
        learned.next_allocation = Some(Resources {
            cores: 2,
            memory_mb: 1200,
            disk_mb: 0,
            gpus: 1,
        });
        learned.exhausted = 2;
        let cats = category_summaries(&[fixed, learning, learned], &Default::default(), &[]);
        assert_eq!(cats.len(), 3);
        assert_eq!(cats[2].name, "render");
        assert!(cats[2].allocation.as_deref().unwrap().starts_with("fixed"));
        let a = cats[0].allocation.as_deref().unwrap();
        assert!(a.starts_with("bucketing: learning (3 of "), "{a}");
        assert_eq!(
            cats[1].allocation.as_deref(),
            Some("bucketing: 3 buckets; next 2 cores, 1200 MB, 1 gpu; 2 exhausted")
        );
        assert!(cats
            .iter()
            .all(|c| c.done == Some(0) && c.waiting == Some(0)));
    }

    #[test]
    fn categories_count_their_tasks_and_declared_ones_say_so() {
        use crate::history::CategoryCounts;
        let mut counts = rustc_hash::FxHashMap::default();
        counts.insert(
            "sim".to_string(),
            CategoryCounts {
                live: 5,
                done: 7,
                failed: 1,
                learned: 0,
            },
        );
        counts.insert("idle".to_string(), CategoryCounts::default());
        let running = vec![
            RunningTask {
                category: "sim".into(),
                ..Default::default()
            };
            2
        ];
        let cats = category_summaries(&[], &counts, &running);
        assert_eq!(cats[0].name, "sim");
        assert_eq!(
            (
                cats[0].waiting,
                cats[0].running,
                cats[0].done,
                cats[0].failed
            ),
            (Some(3), Some(2), Some(7), Some(1))
        );
        assert_eq!(
            cats[0].allocation.as_deref(),
            Some("as declared by each task")
        );
        assert_eq!(cats[1].name, "idle");
    }

    #[test]
    fn a_failure_event_has_the_ending_and_the_stderr_tail() {
        let attempts = vec![Attempt {
            host: "node1".into(),
            allocation: Resources::default(),
            ending: "exit 3".into(),
        }];
        let mut report = TaskReport::never_started(4, 1, drover_protocol::Ending::Exited, 0);
        report.stderr = format!("{}\nlast: no such file\n", "x".repeat(1000));
        let e = failure_event(4, &Some("sample-7".into()), &attempts, None, Some(&report));
        assert_eq!(e.kind, "task failed");
        assert_eq!(
            (e.task, e.tag.as_deref(), e.host.as_str()),
            (Some(4), Some("sample-7"), "node1")
        );
        assert!(e.detail.starts_with("exit 3; stderr: "), "{}", e.detail);
        assert!(e.detail.ends_with("last: no such file"), "{}", e.detail);
        assert!(e.detail.len() < 300);
    }

    #[test]
    fn fit_keeps_a_huge_report_under_the_limit() {
        let mut r = identity("p", "h", 1, SystemTime::now());
        r.history = Some(drover_catalog::History {
            done: vec![u64::MAX; 600],
            failed: vec![u64::MAX; 600],
            running: vec![u64::MAX; 600],
            waiting: vec![u64::MAX; 600],
            workers: vec![u64::MAX; 600],
            cores_inuse: vec![u64::MAX; 600],
            ..Default::default()
        });
        r.events = vec![
            EventSummary {
                detail: "d".repeat(400),
                ..Default::default()
            };
            40
        ];
        r.workers = vec![
            WorkerSummary {
                host: "h".repeat(200),
                ..Default::default()
            };
            200
        ];
        fit(&mut r);
        assert!(serde_json::to_vec(&r).unwrap().len() <= MAX_REPORT_BYTES);
        // The newest history is what is kept.
        assert_eq!(r.history.as_ref().unwrap().len(), 60);
    }

    #[test]
    fn owner_name_from_the_password_database() {
        // uid 0 is root wherever these tests run.
        assert_eq!(passwd_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn advertised_host_prefers_a_specific_bind() {
        assert_eq!(advertised_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(advertised_host("node7.example.org"), "node7.example.org");
        assert_eq!(advertised_host("0.0.0.0"), drover_protocol::hostname());
        assert_eq!(advertised_host("::"), drover_protocol::hostname());
    }
}
