//! Categories: how much to allocate to tasks that do not say what they need.
//!
//! This module is pure: no I/O, no clock, no thread. The engine feeds it the
//! measured peaks of finished tasks ([`CategoryState::record`]) and asks it
//! what to reserve for a task's first attempt ([`CategoryState::first`]) and
//! after a task was killed for going over its allocation
//! ([`CategoryState::retry`]). The same samples in the same order with the
//! same seed give the same buckets and the same answers.
//!
//! # Modes
//!
//! * [`AllocationMode::Fixed`]: the task's declaration is the allocation (or
//!   the category's `first`, then `max`, then one core). No learning, no
//!   retry: a task killed for going over its limit fails.
//! * [`AllocationMode::Max`]: the largest peak seen so far in the category,
//!   plus the margin.
//! * [`AllocationMode::Bucketing`] (the default): the peaks are clustered
//!   with k-means (linfa-clustering) into as many buckets as the cost
//!   model below picks; a
//!   bucket's allocation is an estimate of the largest member its
//!   population can have, plus the margin: for a bucket of n ≥ 2 members
//!   spread over [low, high], high + (high − low) / (n − 1) (the unbiased
//!   estimate of the upper end of a uniform range), else its largest
//!   member. A bucket known from few members, or from a wide spread, gets
//!   more room: killing a task in a big bucket wastes everything it did up
//!   to its limit, which is most of a big task's work.
//!
//! Before a category has any sample, a task gets the category's `first`
//! allocation, else its `max`, else a whole worker: one task is measured
//! on a whole worker. From the first sample until `min_samples`, a
//! bucketing category allocates the largest peak seen (as `Max` does), which
//! keeps the learning phase short: the whole-worker phase lasts one task,
//! not `min_samples` tasks in a row. Where the largest worker would still
//! run four such tasks at once, it gives twice the cores seen, though: half
//! as many unknown tasks start together, so fewer of them turn out big at
//! once and wait on each other for the room to grow.
//!
//! # Choosing a bucket
//!
//! Every task of a category looks the same before it runs, so the choice is
//! where to start it on the ladder of buckets. For each candidate start the
//! allocator computes, over the sample window, the expected worker-time a
//! task ties up, per resource: an attempt in bucket `b` that fits holds
//! `b`'s cores, memory and disk (as fractions of the largest worker) for
//! `t`, one that does not holds them for `f * t` and goes on to the next
//! bucket, and past the last bucket the task takes the top rung (the
//! category maximum or a whole worker). A sample fits a bucket when its peak
//! plus the margin does (the margin is the room kept for members not yet
//! seen, so it is not counted as waste that a smaller bucket could save).
//! `t` is the sample's wall time and `f` the measured fraction of a
//! successful run's time that a killed attempt lasted (1 until a kill is
//! seen). The cost is the largest of the three totals: the resource that runs
//! out first bounds the throughput, so booking more of the others is free
//! (a 200 MB and a 1,500 MB one-core task are not the same cost on a 12-core,
//! 12,000 MB worker, though each is 1/12 of its cores). The start with the
//! lowest expected cost has the highest expected throughput, the criterion
//! of Work Queue's max-throughput mode, here applied to k-means buckets with
//! retries counted. The number of buckets is chosen by the same cost: k = 1,
//! 2, ... are tried while one of the last [`K_PATIENCE`] + 1 lowered it by
//! 1% or more, and the cheapest kept (fewer buckets on ties); `max_buckets`
//! is only a bound the user may set.
//!
//! # Bounded cost
//!
//! Samples live in a sliding window of the `window` most recent ones (a
//! window rather than a reservoir, so that a workflow whose tasks change
//! over time is followed). The category re-clusters when the number of new
//! samples since the last clustering reaches a quarter of the window size
//! (or of the samples held, while the window fills). A sample that no bucket
//! covers in between gets a bucket of its own right away (up to
//! `max_buckets` of them, after which the largest bucket grows to cover it),
//! so every sample in the window is always covered and retries have a rung
//! to go to. The spacing doubles while clusterings keep giving the same
//! buckets, and is never less than a quarter of the samples seen since a
//! sample last fell outside every bucket (`learn`), so noisy peaks that
//! never give the same buckets twice still cost O(log N) clusterings over N
//! samples. The cost per sample is therefore O(buckets) plus, amortised, a
//! fraction of a clustering of `window` points that falls as the run goes on.
//!
//! # The retry ladder
//!
//! A task killed for exceeding `resource` goes to a bucket strictly larger
//! in that resource than both its allocation and what the monitor saw it
//! using when it was killed: of those, the one with the lowest expected
//! cost (the model above, the same function as bucket choice: the
//! resource that runs out first, fitting with the margin, growth and kills
//! as misses) over the samples that needed more than that,
//! since those are the tasks it is now known to be like. (With buckets of
//! 2,000 and 5,000 MB, a task killed at 900 MB goes to 2,000 MB when most
//! tasks above 900 MB fit there, and straight to 5,000 MB when most do not.)
//! Then, when the category has a maximum, to that maximum; without a
//! maximum, the exhausted resource doubles (or grows to what the task was
//! seen using plus the margin, if that is more) until it reaches the
//! largest worker and then the task gets a whole worker. Past the top rung
//! (the maximum, or a whole worker) it fails as resource exhausted.
//! Declared resources are never raised: they are the user's limit. The
//! engine decides a waiting task's rung again whenever its category learns
//! something (see `registry`), so a task killed early does not run on a
//! rung chosen from what was known then.
//!
//! A killed attempt is a censored sample: the task needed more than what it
//! was seen using. The category keeps what its last [`KILL_MEMORY`] killed
//! attempts were seen using. When some of them are above the top bucket,
//! the top bucket is known to be too small, and a task that climbs to it
//! from a lower bucket gets at least the largest of them plus the margin
//! (the bucket itself is unchanged; the next clustering sees the samples of
//! those tasks once they succeed). Without this, while the top bucket is
//! built from a few early members, every task bigger than them is killed
//! twice, the second time after doing almost all of its work. A task killed
//! in the top bucket itself goes on past it (doubling), so that a task just
//! over the top bucket does not take the most any task was seen using.
//!
//! # Code map
//!
//! * [`config`]: the user's settings of a category.
//! * [`stats`]: what a category reports (and the counters behind it).
//! * `buckets`: the sample window and the k-means buckets.
//! * `ladder`: the retry ladder after a kill.
//! * `learn`: how often the buckets are recomputed, and the max bucket kept
//!   up to date without a pass over the window per sample.
//! * [`growth`]: what a task frozen over its memory grows to, and the room
//!   held for it (the learning side; the engine's `engine::growth` acts on it).
//! * `registry`: the engine's table of categories and their scheduler
//!   classes; it returns the class requests it wants, the engine applies them.

use std::collections::VecDeque;

use drover_protocol::Resources;
use serde::{Deserialize, Serialize};

use crate::scheduler::Request;

mod buckets;
pub mod config;
pub mod growth;
mod ladder;
mod learn;
pub(crate) mod registry;
pub mod stats;
#[cfg(test)]
mod tests;

pub use config::{AllocationMode, CategoryConfig};
pub use growth::{GROWTH_AGES_KEPT, GROWTH_AGES_MIN, GROWTH_AGE_MARGIN, GROW_MARGIN, GROW_STEP};
pub use stats::{BucketStats, CategoryStats, Retries, RetryCause};

/// One measured peak of a successful task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Average cores used.
    pub cores: f64,
    /// Peak memory, MB.
    pub memory_mb: f64,
    /// Peak sandbox disk, MB.
    pub disk_mb: f64,
    /// Wall time, s.
    pub wall_s: f64,
}

impl Sample {
    pub(super) fn sane(mut self) -> Sample {
        let fix = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        self.cores = fix(self.cores);
        self.memory_mb = fix(self.memory_mb);
        self.disk_mb = fix(self.disk_mb);
        self.wall_s = fix(self.wall_s);
        self
    }
}

#[derive(Clone, Debug)]
pub(super) struct Bucket {
    pub(super) allocation: Resources,
    pub(super) low: Sample,
    pub(super) high: Sample,
    pub(super) count: u64,
    /// Dominant share of the largest worker, for ordering and cost.
    pub(super) share: f64,
}

/// The learned state of one category. See the module documentation.
#[derive(Clone, Debug)]
pub struct CategoryState {
    pub(super) name: String,
    pub(super) config: CategoryConfig,
    pub(super) window: VecDeque<Sample>,
    pub(super) total: u64,
    pub(super) max_seen: Sample,
    pub(super) buckets: Vec<Bucket>,
    /// Index in `buckets` where a first attempt starts.
    pub(super) start: usize,
    /// Buckets added for uncovered samples since the last clustering.
    pub(super) extra: usize,
    pub(super) since_clustering: usize,
    /// Clusterings in a row that gave the same buckets (within
    /// [`STABLE_WITHIN`]): each doubles the samples until the next one, up
    /// to [`MAX_SPACING_DOUBLINGS`] times, since re-running k-means on data
    /// that says the same thing cost a million-task run ~25 us per task.
    pub(super) stable_clusterings: u32,
    /// Samples since a sample last fell outside every bucket (see
    /// `learn::CADENCE_DIVISOR`).
    pub(super) settled: usize,
    pub(super) clustered: bool,
    /// Mean wall time of successful samples and of killed attempts, for `f`.
    pub(super) ok_time: Mean,
    pub(super) killed_time: Mean,
    /// What the most recent killed attempts were seen using (lower bounds
    /// of what those tasks need), at most [`KILL_MEMORY`] of them.
    pub(super) kills: VecDeque<Sample>,
    /// How long recent tasks had run when they first asked to grow, s, at
    /// most [`GROWTH_AGES_KEPT`] of them (see [`CategoryState::reserve_hold_s`]).
    pub(super) growth_ages: VecDeque<f64>,
    /// The largest worker the buckets were computed for.
    pub(super) largest: Resources,
    pub(super) stats: Counters,
}

/// Buckets whose allocations all moved less than this fraction count as
/// the same (see `CategoryState::stable_clusterings`).
pub(super) const STABLE_WITHIN: f64 = 0.05;
/// At most this many doublings of the spacing between clusterings: with a
/// window of 1,000 samples, every 8,000 samples once the buckets settle.
pub(super) const MAX_SPACING_DOUBLINGS: u32 = 5;
/// k-means goes on to k + this many past the best k so far before the
/// search for the cheapest number of buckets stops.
pub(super) const K_PATIENCE: usize = 2;

#[derive(Clone, Debug, Default)]
pub(super) struct Counters {
    pub(super) allocations: u64,
    pub(super) retries: Retries,
    pub(super) exhausted: u64,
    pub(super) grown: u64,
    pub(super) clusterings: u64,
    pub(super) waste_memory: f64,
    pub(super) waste_cores: f64,
    pub(super) waste_disk: f64,
}

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Mean {
    pub(super) n: u64,
    pub(super) sum: f64,
}

impl Mean {
    pub(super) fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
    }
    pub(super) fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// The resources the allocator learns (gpus are only ever declared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Cores.
    Cores,
    /// Memory, MB.
    Memory,
    /// Sandbox disk, MB.
    Disk,
}

impl Dim {
    /// The resource named in a worker's limit report ("memory", "disk",
    /// "cores"); anything else is taken as memory, the usual culprit.
    pub fn parse(name: &str) -> Dim {
        match name {
            "disk" | "disk_mb" => Dim::Disk,
            "cores" | "cpu" | "cpus" => Dim::Cores,
            _ => Dim::Memory,
        }
    }

    pub(super) fn of(self, r: &Resources) -> u64 {
        match self {
            Dim::Cores => r.cores.into(),
            Dim::Memory => r.memory_mb,
            Dim::Disk => r.disk_mb,
        }
    }

    pub(super) fn of_sample(self, s: &Sample) -> f64 {
        match self {
            Dim::Cores => s.cores,
            Dim::Memory => s.memory_mb,
            Dim::Disk => s.disk_mb,
        }
    }

    pub(super) fn set(self, r: &mut Resources, v: u64) {
        match self {
            Dim::Cores => r.cores = u32::try_from(v).unwrap_or(u32::MAX),
            Dim::Memory => r.memory_mb = v,
            Dim::Disk => r.disk_mb = v,
        }
    }
}

/// How many killed attempts' observations a category keeps for the
/// retry ladder (see the module documentation).
pub const KILL_MEMORY: usize = 64;

/// Factor on the cores a task of a bucketing category gets while the
/// category has fewer than `min_samples` samples, where the largest worker
/// still runs four such tasks at once (see `make_bucket`).
pub const LEARNING_CORES_FACTOR: u32 = 2;

/// Smallest memory ever allocated by learning, MB: peaks of tiny commands
/// jitter by a few MB, and a retry for that is pure loss.
pub const MIN_MEMORY_MB: u64 = 64;

/// No bound in any resource.
pub(super) const UNLIMITED: Resources = Resources {
    cores: u32::MAX,
    memory_mb: u64::MAX,
    disk_mb: u64::MAX,
    gpus: u32::MAX,
};

/// Component-wise minimum.
pub(super) fn clamp(r: Resources, cap: &Resources) -> Resources {
    Resources {
        cores: r.cores.min(cap.cores),
        memory_mb: r.memory_mb.min(cap.memory_mb),
        disk_mb: r.disk_mb.min(cap.disk_mb),
        gpus: r.gpus.min(cap.gpus),
    }
}

/// `declared`'s non-zero components over `r`.
pub(super) fn overlay(r: Resources, declared: &Resources) -> Resources {
    let o = |v: u64, d: u64| if d != 0 { d } else { v };
    Resources {
        cores: o(r.cores.into(), declared.cores.into()) as u32,
        memory_mb: o(r.memory_mb, declared.memory_mb),
        disk_mb: o(r.disk_mb, declared.disk_mb),
        gpus: o(r.gpus.into(), declared.gpus.into()) as u32,
    }
}

impl CategoryState {
    /// A category with no samples. The config should be
    /// [validated](CategoryConfig::validate) first; out-of-range values are
    /// clamped here so that a bad config can never panic.
    pub fn new(name: impl Into<String>, config: CategoryConfig) -> Self {
        let mut config = config;
        config.window = config.window.clamp(1, 1_000_000);
        config.max_buckets = config.max_buckets.clamp(1, 64);
        if !(config.margin.is_finite() && config.margin >= 0.0) {
            config.margin = 0.1;
        }
        CategoryState {
            name: name.into(),
            config,
            window: VecDeque::new(),
            total: 0,
            max_seen: Sample::default(),
            buckets: Vec::new(),
            start: 0,
            extra: 0,
            since_clustering: 0,
            stable_clusterings: 0,
            settled: 0,
            clustered: false,
            ok_time: Mean::default(),
            killed_time: Mean::default(),
            kills: VecDeque::new(),
            growth_ages: VecDeque::new(),
            largest: Resources::default(),
            stats: Counters::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CategoryConfig {
        &self.config
    }

    /// Replaces the settings, keeping the samples; buckets are recomputed.
    pub fn set_config(&mut self, config: CategoryConfig) {
        let name = std::mem::take(&mut self.name);
        let old = std::mem::replace(self, CategoryState::new(name, config));
        self.stats = old.stats;
        self.ok_time = old.ok_time;
        self.killed_time = old.killed_time;
        self.kills = old.kills;
        self.growth_ages = old.growth_ages;
        self.largest = old.largest;
        for s in old.window {
            self.push(s);
        }
        self.total = old.total;
        self.max_seen = old.max_seen;
        self.rebuild();
    }

    /// True when this category learns resources a task did not declare.
    pub fn learns(&self) -> bool {
        self.config.mode != AllocationMode::Fixed
    }

    /// The cap on every allocation: the largest worker, and the category
    /// maximum where it sets a component.
    pub(super) fn cap(&self, largest: &Resources) -> Resources {
        // With no worker known yet nothing bounds an allocation but the
        // maximum; once one is, a resource no worker has cannot be asked for.
        let mut cap = if largest.is_zero() {
            UNLIMITED
        } else {
            *largest
        };
        if let Some(max) = &self.config.max {
            let m = |c: u64, m: u64| if m == 0 { c } else { c.min(m) };
            cap.cores = m(cap.cores.into(), max.cores.into()) as u32;
            cap.memory_mb = m(cap.memory_mb, max.memory_mb);
            cap.disk_mb = m(cap.disk_mb, max.disk_mb);
            cap.gpus = m(cap.gpus.into(), max.gpus.into()) as u32;
        }
        cap
    }

    pub(super) fn has_max(&self) -> bool {
        self.config.max.is_some_and(|m| !m.is_zero())
    }

    /// The category maximum as an allocation: its set components, the
    /// largest worker's for the others.
    pub(super) fn max_allocation(&self, largest: &Resources) -> Option<Resources> {
        let max = self.config.max.filter(|m| !m.is_zero())?;
        Some(overlay(*largest, &max))
    }

    /// What to reserve for a task's first attempt. `declared` are the task's
    /// own (non-zero) resources, which always win; `largest` is the
    /// component-wise largest connected worker (zero if none yet).
    pub fn first(&self, declared: &Resources, largest: &Resources) -> Request {
        let cap = self.cap(largest);
        let base = if self.config.mode == AllocationMode::Fixed {
            self.config.first.or(self.config.max).unwrap_or(Resources {
                cores: 1,
                ..Default::default()
            })
        } else if let Some(b) = self.buckets.get(self.start) {
            b.allocation
        } else if let Some(first) = self.config.first {
            first
        } else if let Some(max) = self.max_allocation(largest) {
            max
        } else if declared.is_zero() {
            return Request::WholeWorker;
        } else {
            // A partial declaration before anything is known: what it
            // declares, and nothing booked for the rest until a sample says
            // how much. Booking the rest of a whole worker ran the
            // category's first tasks one at a time (and sent a factory off
            // for a worker per task); one that runs out of memory meanwhile
            // is retried sized by what it was seen using.
            Resources::default()
        };
        Request::Fixed(clamp(overlay(base, declared), &cap_with(declared, &cap)))
    }
}

/// `r` with `declared`'s components as a cap of their own: a declared
/// resource is both the allocation and the limit.
pub(super) fn cap_with(declared: &Resources, cap: &Resources) -> Resources {
    overlay(*cap, declared)
}

/// True when a task with peak `s` would not be killed under `a`: memory and
/// disk are the limits a task is killed for (zero means no limit).
pub fn covers(a: &Resources, s: &Sample) -> bool {
    let ok = |limit: u64, used: f64| limit == 0 || used <= limit as f64;
    ok(a.memory_mb, s.memory_mb) && ok(a.disk_mb, s.disk_mb)
}

pub(super) fn min_sample(a: &Sample, b: &Sample) -> Sample {
    Sample {
        cores: a.cores.min(b.cores),
        memory_mb: a.memory_mb.min(b.memory_mb),
        disk_mb: a.disk_mb.min(b.disk_mb),
        wall_s: a.wall_s.min(b.wall_s),
    }
}

pub(super) fn max_sample(a: &Sample, b: &Sample) -> Sample {
    Sample {
        cores: a.cores.max(b.cores),
        memory_mb: a.memory_mb.max(b.memory_mb),
        disk_mb: a.disk_mb.max(b.disk_mb),
        wall_s: a.wall_s.max(b.wall_s),
    }
}
