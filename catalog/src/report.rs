//! The status report a master sends to the catalog.
//!
//! The serde JSON form of [`MasterReport`] is the wire format everywhere: UDP
//! datagrams, `POST /update` bodies, the entries of `GET /query.json` and the
//! state file. Every field has a default so that reports from older or newer
//! masters still parse; unknown fields are ignored.

use serde::{Deserialize, Serialize};

/// The `kind` a drover master puts in its reports.
pub const MASTER_KIND: &str = "drover-master";

/// Most workers a report keeps; a master with more sends the first ones only.
pub const MAX_WORKERS: usize = 200;

/// Most categories a report keeps.
pub const MAX_CATEGORIES: usize = 200;

/// Longest string field (in bytes) the catalog keeps; longer ones are cut.
pub const MAX_FIELD_LEN: usize = 256;

/// Most waiting-task shapes a report keeps.
pub const MAX_SHAPES: usize = 200;

/// Most seconds of history a report keeps (ten minutes at one a second).
pub const MAX_HISTORY: usize = 600;

/// Most recent events a report keeps.
pub const MAX_EVENTS: usize = 40;

/// Most running tasks a report lists (the oldest ones).
pub const MAX_RUNNING_LISTED: usize = 50;

/// Longest event text (a failed task's stderr tail and the like), in bytes.
pub const MAX_EVENT_TEXT: usize = 400;

/// One master's status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct MasterReport {
    /// What sent this report; [`MASTER_KIND`] for drover masters.
    pub kind: String,
    /// The project name workers look the master up by.
    pub project: String,
    /// Host name (or address) workers should connect to.
    pub host: String,
    /// Port workers should connect to.
    pub port: u16,
    /// User running the master.
    pub owner: String,
    /// drover version of the master.
    pub version: String,
    /// When the master started, in unix seconds.
    pub start_time: u64,
    /// When the catalog received this report, in unix seconds; set by the catalog.
    pub last_update: u64,
    /// The address the report came from, as seen by the catalog; set by the
    /// catalog, so a worker can still reach a master whose `host` does not
    /// resolve.
    pub source_addr: String,
    /// True in the last report a master sends as it shuts down.
    pub stopped: bool,
    /// Reports received for this entry; set by the catalog. Under a flood the
    /// entries with the fewest reports go first.
    pub reports: u64,
    /// True when the catalog checked this report's HMAC under its catalog
    /// key; set by the catalog. Workers prefer signed masters.
    pub signed: bool,
    /// True for an entry whose project, host and port are already held by a
    /// report from another address; set by the catalog. A rival never
    /// replaces the first entry, and workers are told about both.
    pub rival: bool,
    /// Random number naming one run of a master (a restart gets a new one,
    /// even on the same port in the same second). 0: unknown.
    pub run_id: u64,
    /// Number of this report within its run, from 1; lets the catalog drop
    /// a datagram that arrives after a newer report of the same run (a late
    /// periodic report must not undo the final "stopped" one). 0: unknown.
    pub seq: u64,
    /// Tasks not started yet: in the master's queue, or sent ahead to wait
    /// on a full worker (`tasks_queued_on_workers` of them).
    pub tasks_waiting: u64,
    /// Of `tasks_waiting`, those sent ahead to wait on a worker: they need
    /// no new worker.
    #[serde(default)]
    pub tasks_queued_on_workers: u64,
    /// Of `tasks_waiting`, those bigger than every connected worker: they
    /// wait for a bigger worker, or end as "fits no worker".
    #[serde(default)]
    pub tasks_fit_no_worker: u64,
    /// Workers the master sends nothing to for a while, because they kept
    /// refusing or failing to set up tasks.
    #[serde(default)]
    pub workers_blocked: u64,
    /// Tasks whose process runs on a worker now.
    pub tasks_running: u64,
    /// Tasks finished successfully.
    pub tasks_done: u64,
    /// Tasks finished with a failure.
    pub tasks_failed: u64,
    /// Workers connected to the master.
    pub workers_connected: u64,
    /// Connected workers running at least one task.
    pub workers_busy: u64,
    /// Cores allocated to running tasks.
    pub cores_inuse: u64,
    /// Cores of all connected workers.
    pub cores_total: u64,
    /// Memory allocated to running tasks, in MB.
    pub memory_inuse_mb: u64,
    /// Memory of all connected workers, in MB.
    pub memory_total_mb: u64,
    /// GPUs allocated to running tasks.
    pub gpus_inuse: u64,
    /// GPUs of all connected workers.
    pub gpus_total: u64,
    /// Per-category task counts.
    pub categories: Vec<CategorySummary>,
    /// Connected workers, at most [`MAX_WORKERS`].
    pub workers: Vec<WorkerSummary>,
    /// Waiting tasks grouped by the resources they ask for, at most
    /// [`MAX_SHAPES`]: what a factory needs to decide which workers to start.
    pub waiting_shapes: Vec<ShapeCount>,
    /// The master's recent counts, one sample a second; `None` from masters
    /// that keep no history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
    /// Recent events (workers joining and lost, tasks failing), oldest
    /// first, at most [`MAX_EVENTS`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventSummary>,
    /// Running tasks, longest running first, at most [`MAX_RUNNING_LISTED`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<RunningTask>,
}

/// A master's counts over its last minutes, one sample per `step_secs`,
/// as columns of equal length (the last one is the sample at `end_time`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct History {
    /// Unix time of the last sample.
    pub end_time: u64,
    /// Seconds between samples.
    pub step_secs: u64,
    /// Tasks that succeeded during each step.
    pub done: Vec<u64>,
    /// Tasks that failed during each step.
    pub failed: Vec<u64>,
    /// Tasks running at each sample.
    pub running: Vec<u64>,
    /// Tasks waiting (in the queue or sent ahead) at each sample.
    pub waiting: Vec<u64>,
    /// Workers connected at each sample.
    pub workers: Vec<u64>,
    /// Cores allocated to running tasks at each sample.
    pub cores_inuse: Vec<u64>,
}

impl History {
    /// Samples held (the length of every column).
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// True with no samples.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    fn columns_mut(&mut self) -> [&mut Vec<u64>; 6] {
        [
            &mut self.done,
            &mut self.failed,
            &mut self.running,
            &mut self.waiting,
            &mut self.workers,
            &mut self.cores_inuse,
        ]
    }

    /// Keeps the newest `n` samples at most, and makes every column as long
    /// as the shortest (a hostile or broken report may send uneven ones).
    pub fn keep_last(&mut self, n: usize) {
        let shortest = self
            .columns_mut()
            .iter()
            .map(|c| c.len())
            .min()
            .unwrap_or(0);
        let keep = shortest.min(n);
        for c in self.columns_mut() {
            let cut = c.len() - keep;
            c.drain(..cut);
        }
    }
}

/// What happened at a master that people watching it want to see.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct EventSummary {
    /// Unix time of the event.
    pub time: u64,
    /// `worker joined`, `worker lost` or `task failed`.
    pub kind: String,
    /// The worker's host name, if a worker is concerned.
    pub host: String,
    /// The worker's address (`IP:PORT`), if a worker is concerned.
    pub addr: String,
    /// The task's id, for task events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// The task's tag, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// In words: why a worker was lost, how a task ended and its stderr's
    /// last lines. At most [`MAX_EVENT_TEXT`] bytes.
    pub detail: String,
}

/// One running task, as the page and `drover status --tasks` list it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct RunningTask {
    /// The task's id.
    pub id: u64,
    /// Its tag, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Its category.
    pub category: String,
    /// Host name of the worker it runs on.
    pub host: String,
    /// Address of that worker.
    pub addr: String,
    /// Seconds since it was placed.
    pub age_secs: u64,
    /// Cores it holds.
    pub cores: u64,
    /// Memory it holds, in MB.
    pub memory_mb: u64,
}

/// How many waiting tasks ask for one shape of resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct ShapeCount {
    /// Cores each task asks for.
    pub cores: u64,
    /// Memory each task asks for, in MB (0: none reserved).
    pub memory_mb: u64,
    /// Disk each task asks for, in MB (0: none reserved).
    pub disk_mb: u64,
    /// GPUs each task asks for.
    pub gpus: u64,
    /// True for tasks that take a whole worker, whatever its size; the
    /// resource fields are then 0.
    pub whole_worker: bool,
    /// Waiting tasks of this shape.
    pub count: u64,
}

/// Task counts and sizing of one category of a master.
///
/// A count is `None` when the master does not track it per category (it
/// then reports only the name and allocation); the page shows a dash rather
/// than a zero that would read as "no tasks".
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct CategorySummary {
    /// Category name.
    pub name: String,
    /// Tasks waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u64>,
    /// Tasks running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<u64>,
    /// Tasks done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// Tasks failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    /// How the master sizes this category's tasks, as text for people
    /// (for example `"bucketing: 3 buckets"`).
    pub allocation: Option<String>,
}

/// One worker connected to a master.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct WorkerSummary {
    /// Worker host name.
    pub host: String,
    /// Cores the worker offers.
    pub cores: u64,
    /// Memory the worker offers, in MB.
    pub memory_mb: u64,
    /// Tasks running on the worker.
    pub running: u64,
    /// The worker's address as the master sees it (`IP:PORT`): tells apart
    /// workers on one host.
    pub addr: String,
    /// Disk the worker offers, in MB.
    pub disk_mb: u64,
    /// GPUs the worker offers.
    pub gpus: u64,
    /// Cores allocated to tasks on it now.
    pub cores_inuse: u64,
    /// Tasks that ended on it (any outcome) since it joined.
    pub tasks_ended: u64,
    /// Seconds since it joined.
    pub connected_secs: u64,
}

/// The identity of an entry: the catalog keeps only the newest report per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryKey {
    /// Report kind.
    pub kind: String,
    /// Reported host.
    pub host: String,
    /// Reported port.
    pub port: u16,
    /// Reported project.
    pub project: String,
    /// For a rival entry, the address its reports come from; empty for the
    /// entry owned by the first address.
    pub rival_from: String,
}

impl std::fmt::Display for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}|{}|{}|{}",
            self.kind, self.host, self.port, self.project
        )?;
        if !self.rival_from.is_empty() {
            write!(f, "|from {}", self.rival_from)?;
        }
        Ok(())
    }
}

impl MasterReport {
    /// A report of a drover master with the given project, host and port.
    pub fn new_master(project: &str, host: &str, port: u16) -> Self {
        MasterReport {
            kind: MASTER_KIND.to_string(),
            project: project.to_string(),
            host: host.to_string(),
            port,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    /// The key the catalog stores this report under.
    pub fn key(&self) -> EntryKey {
        EntryKey {
            kind: self.kind.clone(),
            host: self.host.clone(),
            port: self.port,
            project: self.project.clone(),
            rival_from: if self.rival {
                self.source_addr.clone()
            } else {
                String::new()
            },
        }
    }

    /// `host:port` to connect to, bracketing IPv6 literals.
    pub fn address(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// `source_addr`'s host with the reported port: a fallback for workers
    /// when `host` does not resolve from where they run.
    pub fn source_address(&self) -> Option<String> {
        if self.source_addr.is_empty() {
            None
        } else {
            Some(join_host_port(&self.source_addr, self.port))
        }
    }

    /// Fraction of tasks done, `done / (done + waiting + running + failed)`,
    /// in 0..=1; 0 with no tasks. Failed tasks count against progress so a
    /// run that fails everything does not look finished.
    pub fn progress(&self) -> f64 {
        let total = self
            .tasks_done
            .saturating_add(self.tasks_failed)
            .saturating_add(self.tasks_waiting)
            .saturating_add(self.tasks_running);
        if total == 0 {
            0.0
        } else {
            self.tasks_done as f64 / total as f64
        }
    }

    /// Cuts the report down to what the catalog is willing to keep, so one
    /// entry's memory is bounded whatever a sender puts in it.
    pub fn clamp(&mut self) {
        for s in [
            &mut self.kind,
            &mut self.project,
            &mut self.host,
            &mut self.owner,
            &mut self.version,
            &mut self.source_addr,
        ] {
            truncate_utf8(s, MAX_FIELD_LEN);
        }
        self.categories.truncate(MAX_CATEGORIES);
        for c in &mut self.categories {
            truncate_utf8(&mut c.name, MAX_FIELD_LEN);
            if let Some(a) = c.allocation.as_mut() {
                truncate_utf8(a, MAX_FIELD_LEN);
            }
        }
        self.workers.truncate(MAX_WORKERS);
        self.waiting_shapes.truncate(MAX_SHAPES);
        for w in &mut self.workers {
            truncate_utf8(&mut w.host, MAX_FIELD_LEN);
            truncate_utf8(&mut w.addr, MAX_FIELD_LEN);
        }
        if let Some(h) = self.history.as_mut() {
            h.keep_last(MAX_HISTORY);
        }
        let extra = self.events.len().saturating_sub(MAX_EVENTS);
        self.events.drain(..extra);
        for e in &mut self.events {
            for s in [&mut e.kind, &mut e.host, &mut e.addr] {
                truncate_utf8(s, MAX_FIELD_LEN);
            }
            if let Some(t) = e.tag.as_mut() {
                truncate_utf8(t, MAX_FIELD_LEN);
            }
            truncate_utf8(&mut e.detail, MAX_EVENT_TEXT);
        }
        self.running.truncate(MAX_RUNNING_LISTED);
        for t in &mut self.running {
            for s in [&mut t.category, &mut t.host, &mut t.addr] {
                truncate_utf8(s, MAX_FIELD_LEN);
            }
            if let Some(tag) = t.tag.as_mut() {
                truncate_utf8(tag, MAX_FIELD_LEN);
            }
        }
    }
}

#[cfg(test)]
impl History {
    fn columns_mut_len_equal(&self) -> bool {
        let n = self.done.len();
        [
            &self.failed,
            &self.running,
            &self.waiting,
            &self.workers,
            &self.cores_inuse,
        ]
        .iter()
        .all(|c| c.len() == n)
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Truncates `s` to at most `max` bytes without splitting a character.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Current time in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unknown_fields_parse() {
        let r: MasterReport =
            serde_json::from_str(r#"{"project":"p","port":9123,"some_future_field":[1,2]}"#)
                .unwrap();
        assert_eq!(r.project, "p");
        assert_eq!(r.port, 9123);
        assert_eq!(r.tasks_done, 0);
        assert!(r.categories.is_empty());
        let c: CategorySummary = serde_json::from_str(r#"{"name":"c"}"#).unwrap();
        assert_eq!(c.allocation, None);
        assert_eq!(c.done, None);
        let c: CategorySummary =
            serde_json::from_str(r#"{"name":"c","done":3,"waiting":null}"#).unwrap();
        assert_eq!((c.done, c.waiting), (Some(3), None));
    }

    #[test]
    fn round_trip() {
        let mut r = MasterReport::new_master("proj", "h", 1);
        r.categories.push(CategorySummary {
            name: "c".into(),
            allocation: Some("bucketing: 3 buckets".into()),
            ..Default::default()
        });
        r.workers.push(WorkerSummary {
            host: "w".into(),
            cores: 4,
            memory_mb: 100,
            running: 1,
            ..Default::default()
        });
        r.waiting_shapes.push(ShapeCount {
            cores: 2,
            memory_mb: 1000,
            count: 7,
            ..Default::default()
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<MasterReport>(&s).unwrap(), r);
    }

    #[test]
    fn clamp_bounds_size() {
        let mut r = MasterReport::new_master(&"é".repeat(1000), "h", 1);
        r.workers = vec![WorkerSummary::default(); 1000];
        r.categories = vec![CategorySummary::default(); 1000];
        r.waiting_shapes = vec![ShapeCount::default(); 1000];
        r.events = vec![
            EventSummary {
                detail: "x".repeat(10_000),
                ..Default::default()
            };
            1000
        ];
        r.running = vec![RunningTask::default(); 1000];
        r.history = Some(History {
            done: vec![1; 5000],
            failed: vec![0; 5000],
            running: vec![2; 10],
            waiting: vec![3; 5000],
            workers: vec![1; 5000],
            cores_inuse: vec![1; 5000],
            ..Default::default()
        });
        r.clamp();
        assert_eq!(r.events.len(), MAX_EVENTS);
        assert!(r.events.iter().all(|e| e.detail.len() == MAX_EVENT_TEXT));
        assert_eq!(r.running.len(), MAX_RUNNING_LISTED);
        let h = r.history.as_ref().unwrap();
        // Uneven columns are cut to the shortest.
        assert_eq!(h.len(), 10);
        assert!(h.columns_mut_len_equal());
        assert!(r.project.len() <= MAX_FIELD_LEN);
        assert!(r.project.chars().all(|c| c == 'é'));
        assert_eq!(r.workers.len(), MAX_WORKERS);
        assert_eq!(r.categories.len(), MAX_CATEGORIES);
        assert_eq!(r.waiting_shapes.len(), MAX_SHAPES);
    }

    #[test]
    fn progress_and_address() {
        let mut r = MasterReport::new_master("p", "::1", 5);
        assert_eq!(r.progress(), 0.0);
        r.tasks_done = 4;
        r.tasks_failed = 1;
        r.tasks_waiting = 3;
        assert!((r.progress() - 0.5).abs() < 1e-9);
        assert_eq!(r.address(), "[::1]:5");
        assert_eq!(r.source_address(), None);
        r.source_addr = "127.0.0.1".into();
        assert_eq!(r.source_address().as_deref(), Some("127.0.0.1:5"));
    }
}
