//! The master's status report for the catalog, and the thread that sends it.
//!
//! The engine is never made to wait on the network: a separate thread asks it
//! for a snapshot (the same `Stats` and worker list the user can ask for, one
//! message each), turns that into a [`MasterReport`] and sends it. A catalog
//! that is slow, unreachable or gone costs the engine nothing.

use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_catalog::report::{MAX_CATEGORIES, MAX_WORKERS};
use drover_catalog::{CategorySummary, MasterReport, ShapeCount, WorkerSummary};
use drover_protocol::Resources;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::category::{AllocationMode, CategoryStats};
use crate::command::Command;
use crate::scheduler::Request;
use crate::stats::{Stats, WorkerInfo};

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
        })
        .collect();
    r
}

/// Per-category summaries: each category's name and, for people, how it
/// sizes its tasks.
///
/// HOOK: the engine does not count tasks per category yet, so the counts are
/// left out (`None`; the page shows a dash). When `CategoryStats` (or `Stats`)
/// gains waiting/running/done/failed per category, fill them in here.
pub(crate) fn category_summaries(categories: &[CategoryStats]) -> Vec<CategorySummary> {
    categories
        .iter()
        .take(MAX_CATEGORIES)
        .map(|c| CategorySummary {
            name: c.name.clone(),
            allocation: Some(describe_allocation(c)),
            ..Default::default()
        })
        .collect()
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
pub(crate) fn snapshot(
    commands: &mpsc::UnboundedSender<Command>,
    identity: &MasterReport,
) -> Option<MasterReport> {
    let stats = ask(commands, Command::Stats)?;
    let workers = ask(commands, Command::Workers)?;
    let demand = ask(commands, Command::Demand)?;
    let categories = ask(commands, |tx| Command::CategoryStats(None, tx))?;
    let mut r = build_report(identity, &stats, &workers);
    r.waiting_shapes = waiting_shapes(&demand);
    r.categories = category_summaries(&categories);
    Some(r)
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
        identity: Arc<MasterReport>,
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
                    if let Some(mut r) = snapshot(&commands, &identity) {
                        seq += 1;
                        r.seq = seq;
                        link.send(&r, false);
                    }
                    match stop_rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                if let Some(mut r) = snapshot(&commands, &identity) {
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
        let cats = category_summaries(&[fixed, learning, learned]);
        assert_eq!(cats.len(), 3);
        assert_eq!(cats[0].name, "render");
        assert!(cats[0].allocation.as_deref().unwrap().starts_with("fixed"));
        let a = cats[1].allocation.as_deref().unwrap();
        assert!(a.starts_with("bucketing: learning (3 of "), "{a}");
        assert_eq!(
            cats[2].allocation.as_deref(),
            Some("bucketing: 3 buckets; next 2 cores, 1200 MB, 1 gpu; 2 exhausted")
        );
        // Counts are unknown per category, so they are left out, not zero.
        assert!(cats.iter().all(|c| c.done.is_none() && c.waiting.is_none()));
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
