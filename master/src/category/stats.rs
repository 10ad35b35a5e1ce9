//! What a category reports: its buckets, retries, growth and waste, and
//! the counters behind them.

use drover_protocol::Resources;
use serde::{Deserialize, Serialize};

use super::*;

/// A bucket as shown in statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketStats {
    /// What a task in this bucket gets.
    pub allocation: Resources,
    /// Smallest member, per resource.
    pub low: Sample,
    /// Largest member, per resource.
    pub high: Sample,
    /// Samples that fell in this bucket.
    pub count: u64,
}

/// Times tasks went back to the queue, by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retries {
    /// Killed for going over their memory allocation.
    pub memory: u64,
    /// Killed for going over their disk allocation.
    pub disk: u64,
    /// Killed for going over their cores (or another resource).
    pub cores: u64,
    /// Their worker disappeared.
    pub worker_lost: u64,
    /// An input vanished from the worker's cache, or the worker refused the task.
    pub other: u64,
}

/// What a category has learned and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryStats {
    /// The category's name.
    pub name: String,
    /// Its settings.
    pub config: CategoryConfig,
    /// Peaks recorded, all time.
    pub samples: u64,
    /// Peaks currently in the window.
    pub window_samples: usize,
    /// The largest peak seen, all time.
    pub max_seen: Sample,
    /// Current buckets, smallest first (one for `max` mode or while learning).
    pub buckets: Vec<BucketStats>,
    /// What a new task of the category gets now; `None` means a whole worker.
    pub next_allocation: Option<Resources>,
    /// Memory, MB, held free on its worker beside each such task while it
    /// runs, for whichever of them grows (see
    /// [`CategoryState::growth_reserve`]).
    #[serde(default)]
    pub growth_reserve_mb: u64,
    /// Attempts started.
    pub allocations: u64,
    /// Retries by cause.
    pub retries: Retries,
    /// Tasks that failed for good as resource-exhausted.
    pub exhausted: u64,
    /// Times a running task went over its memory allocation and was given
    /// more where it ran, instead of being killed and retried.
    #[serde(default)]
    pub grown: u64,
    /// How many times k-means ran.
    pub clusterings: u64,
    /// Allocated minus used memory, integrated over attempts' run time (MB·s).
    /// A killed attempt wastes all of its allocation.
    pub waste_memory_mb_s: f64,
    /// Likewise for cores (core·s).
    pub waste_cores_s: f64,
    /// Likewise for disk (MB·s).
    pub waste_disk_mb_s: f64,
}

/// Why a task went back to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCause {
    /// Killed for exceeding this resource.
    Exhausted(Dim),
    /// Its worker disappeared.
    WorkerLost,
    /// Anything else (lost cached input, refused by the worker).
    Other,
}

impl CategoryState {
    /// An attempt ended after `wall_s` seconds holding `allocation` and
    /// using `used` at its peak; `killed` when it went over its allocation
    /// (so nothing it did is kept).
    pub fn record_attempt(&mut self, allocation: &Resources, used: &Sample, killed: bool) {
        let used = used.sane();
        let t = used.wall_s;
        if killed {
            self.killed_time.add(t);
            if self.kills.len() >= KILL_MEMORY {
                self.kills.pop_front();
            }
            self.kills.push_back(used);
            self.stats.waste_memory += allocation.memory_mb as f64 * t;
            self.stats.waste_cores += f64::from(allocation.cores) * t;
            self.stats.waste_disk += allocation.disk_mb as f64 * t;
        } else {
            self.stats.waste_memory += (allocation.memory_mb as f64 - used.memory_mb).max(0.0) * t;
            self.stats.waste_cores += (f64::from(allocation.cores) - used.cores).max(0.0) * t;
            self.stats.waste_disk += (allocation.disk_mb as f64 - used.disk_mb).max(0.0) * t;
        }
    }

    /// An attempt was started.
    pub fn note_allocation(&mut self) {
        self.stats.allocations += 1;
    }

    /// A task went back to the queue for `cause`.
    pub fn note_retry(&mut self, cause: RetryCause) {
        let r = &mut self.stats.retries;
        match cause {
            RetryCause::Exhausted(Dim::Memory) => r.memory += 1,
            RetryCause::Exhausted(Dim::Disk) => r.disk += 1,
            RetryCause::Exhausted(Dim::Cores) => r.cores += 1,
            RetryCause::WorkerLost => r.worker_lost += 1,
            RetryCause::Other => r.other += 1,
        }
    }

    /// A running task was given a bigger allocation where it ran.
    pub fn note_grown(&mut self) {
        self.stats.grown += 1;
    }

    /// A task failed for good as resource-exhausted.
    pub fn note_exhausted(&mut self) {
        self.stats.exhausted += 1;
    }

    /// Statistics, with `largest` the largest connected worker (for the
    /// next allocation shown).
    pub fn stats(&self, largest: &Resources) -> CategoryStats {
        CategoryStats {
            name: self.name.clone(),
            config: self.config.clone(),
            samples: self.total,
            window_samples: self.window.len(),
            max_seen: self.max_seen,
            buckets: self
                .buckets
                .iter()
                .map(|b| BucketStats {
                    allocation: b.allocation,
                    low: b.low,
                    high: b.high,
                    count: b.count,
                })
                .collect(),
            next_allocation: match self.first(&Resources::default(), largest) {
                Request::Fixed(r) => Some(r),
                Request::WholeWorker => None,
            },
            growth_reserve_mb: match self.first(&Resources::default(), largest) {
                Request::Fixed(r) => self.growth_reserve(&r, &Resources::default(), largest),
                Request::WholeWorker => 0,
            },
            allocations: self.stats.allocations,
            retries: self.stats.retries.clone(),
            exhausted: self.stats.exhausted,
            grown: self.stats.grown,
            clusterings: self.stats.clusterings,
            waste_memory_mb_s: self.stats.waste_memory,
            waste_cores_s: self.stats.waste_cores,
            waste_disk_mb_s: self.stats.waste_disk,
        }
    }
}
