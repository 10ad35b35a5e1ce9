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
//!   with k-means (linfa-clustering) into at most `max_buckets` buckets; a
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
//! allocator computes, over the sample window, the expected resource-time a
//! task ties up: an attempt in bucket `b` that fits costs
//! `share(b) * t`, one that does not costs `share(b) * f * t` and goes on to
//! the next bucket, and past the last bucket the task takes the top rung
//! (the category maximum or a whole worker). `share(b)` is the bucket's
//! dominant share of the largest worker (cores, memory, disk), `t` the
//! sample's wall time and `f` the measured fraction of a successful run's
//! time that a killed attempt lasted (1 until a kill is seen). The start with
//! the lowest expected cost has the highest expected throughput (tasks per
//! unit of worker time), the criterion of Work Queue's max-throughput mode,
//! here applied to k-means buckets with retries counted. The number of
//! buckets is chosen the same way: k = 1..=`max_buckets` are tried and the
//! cheapest kept (fewer buckets on ties).
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
//! to go to. The cost per sample is therefore O(buckets) plus, amortised,
//! one clustering of `window` points per `window / 4` samples.
//!
//! # The retry ladder
//!
//! A task killed for exceeding `resource` goes to a bucket strictly larger
//! in that resource than both its allocation and what the monitor saw it
//! using when it was killed: of those, the one with the lowest expected
//! cost (the model above) over the samples that needed more than that,
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
//! something (see `category.rs`), so a task killed early does not run on a
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

use std::collections::VecDeque;

use drover_protocol::Resources;
use linfa::prelude::*;
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::scheduler::Request;

/// How a category decides what to reserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationMode {
    /// What the task declares (else `first`, then `max`, then one core).
    Fixed,
    /// The largest peak measured so far, plus the margin.
    Max,
    /// k-means buckets of measured peaks (the default).
    #[default]
    Bucketing,
}

/// The settings of one category.
///
/// ```
/// use drover_master::{AllocationMode, CategoryConfig};
/// let config = CategoryConfig::bucketing().max_memory_mb(16_000).margin(0.2);
/// assert_eq!(config.mode, AllocationMode::Bucketing);
/// assert_eq!(config.max.unwrap().memory_mb, 16_000);
/// // Serializable, for configuration files and the Python bindings:
/// let json = serde_json::to_string(&config).unwrap();
/// let back: CategoryConfig = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, config);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CategoryConfig {
    /// How allocations are decided.
    pub mode: AllocationMode,
    /// The most any task of the category may get; a zero component means
    /// no limit in that resource (up to the largest worker).
    pub max: Option<Resources>,
    /// What a task gets while the category has no sample yet (instead of
    /// the maximum or a whole worker).
    pub first: Option<Resources>,
    /// Fraction added to a bucket's largest member (default 0.1).
    pub margin: f64,
    /// Samples needed before k-means bucketing starts (default 10).
    pub min_samples: usize,
    /// How many recent samples are kept (default 2,048).
    pub window: usize,
    /// Most buckets k-means may make (default 8).
    pub max_buckets: usize,
    /// Seed of the k-means initialisation.
    pub seed: u64,
    /// A task that goes over its memory allocation is frozen where it runs
    /// and given the allocation of its next rung there, if its worker has
    /// (or soon frees) the room, instead of being killed and run again from
    /// the start (default true). Only where the worker can freeze a task
    /// (a cgroup v2 per task); elsewhere the task is killed and retried.
    pub grow_in_place: bool,
}

impl Default for CategoryConfig {
    fn default() -> Self {
        CategoryConfig {
            mode: AllocationMode::Bucketing,
            max: None,
            first: None,
            margin: 0.1,
            min_samples: 10,
            window: 2048,
            max_buckets: 8,
            seed: 0,
            grow_in_place: true,
        }
    }
}

impl CategoryConfig {
    /// Bucketing with the defaults.
    pub fn bucketing() -> Self {
        Self::default()
    }

    /// The declared resources, never learned.
    pub fn fixed() -> Self {
        Self::default().mode(AllocationMode::Fixed)
    }

    /// The largest peak seen so far.
    pub fn max_seen() -> Self {
        Self::default().mode(AllocationMode::Max)
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: AllocationMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the maximum allocation (zero components: no limit).
    pub fn max(mut self, max: Resources) -> Self {
        self.max = Some(max);
        self
    }

    /// Sets the maximum memory, MB, keeping other maximum components.
    pub fn max_memory_mb(mut self, mb: u64) -> Self {
        self.max.get_or_insert_with(Resources::default).memory_mb = mb;
        self
    }

    /// Sets the allocation used before any sample exists.
    pub fn first(mut self, first: Resources) -> Self {
        self.first = Some(first);
        self
    }

    /// Sets the margin added to a bucket's largest member (0.1 = 10%).
    pub fn margin(mut self, margin: f64) -> Self {
        self.margin = margin;
        self
    }

    /// Sets how many samples are needed before k-means bucketing.
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n;
        self
    }

    /// Sets how many recent samples are kept.
    pub fn window(mut self, n: usize) -> Self {
        self.window = n;
        self
    }

    /// Sets the most buckets k-means may make.
    pub fn max_buckets(mut self, n: usize) -> Self {
        self.max_buckets = n;
        self
    }

    /// Sets whether a task over its memory allocation may grow in place
    /// (see [`CategoryConfig::grow_in_place`]).
    pub fn grow_in_place(mut self, grow: bool) -> Self {
        self.grow_in_place = grow;
        self
    }

    /// Sets the k-means seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks the settings; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.margin.is_finite() && (0.0..=10.0).contains(&self.margin)) {
            return Err(format!(
                "margin must be between 0 and 10 (a fraction), got {}",
                self.margin
            ));
        }
        if self.window < 1 || self.window > 1_000_000 {
            return Err(format!(
                "window must be between 1 and 1,000,000 samples, got {}",
                self.window
            ));
        }
        if self.max_buckets < 1 || self.max_buckets > 64 {
            return Err(format!(
                "max_buckets must be between 1 and 64, got {}",
                self.max_buckets
            ));
        }
        if let (Some(first), Some(max)) = (&self.first, &self.max) {
            let over = |f: u64, m: u64| m != 0 && f > m;
            if over(first.cores.into(), max.cores.into())
                || over(first.memory_mb, max.memory_mb)
                || over(first.disk_mb, max.disk_mb)
                || over(first.gpus.into(), max.gpus.into())
            {
                return Err(format!(
                    "first allocation {first:?} is larger than the maximum {max:?}"
                ));
            }
        }
        Ok(())
    }
}

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
    fn sane(mut self) -> Sample {
        let fix = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        self.cores = fix(self.cores);
        self.memory_mb = fix(self.memory_mb);
        self.disk_mb = fix(self.disk_mb);
        self.wall_s = fix(self.wall_s);
        self
    }
}

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

#[derive(Clone, Debug)]
struct Bucket {
    allocation: Resources,
    low: Sample,
    high: Sample,
    count: u64,
    /// Dominant share of the largest worker, for ordering and cost.
    share: f64,
}

/// The learned state of one category. See the module documentation.
#[derive(Clone, Debug)]
pub struct CategoryState {
    name: String,
    config: CategoryConfig,
    window: VecDeque<Sample>,
    total: u64,
    max_seen: Sample,
    buckets: Vec<Bucket>,
    /// Index in `buckets` where a first attempt starts.
    start: usize,
    /// Buckets added for uncovered samples since the last clustering.
    extra: usize,
    since_clustering: usize,
    clustered: bool,
    /// Mean wall time of successful samples and of killed attempts, for `f`.
    ok_time: Mean,
    killed_time: Mean,
    /// What the most recent killed attempts were seen using (lower bounds
    /// of what those tasks need), at most [`KILL_MEMORY`] of them.
    kills: VecDeque<Sample>,
    /// How long recent tasks had run when they first asked to grow, s, at
    /// most [`GROWTH_AGES_KEPT`] of them (see [`CategoryState::reserve_hold_s`]).
    growth_ages: VecDeque<f64>,
    /// The largest worker the buckets were computed for.
    largest: Resources,
    stats: Counters,
}

#[derive(Clone, Debug, Default)]
struct Counters {
    allocations: u64,
    retries: Retries,
    exhausted: u64,
    grown: u64,
    clusterings: u64,
    waste_memory: f64,
    waste_cores: f64,
    waste_disk: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    n: u64,
    sum: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
    }
    fn get(&self) -> Option<f64> {
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

    fn of(self, r: &Resources) -> u64 {
        match self {
            Dim::Cores => r.cores.into(),
            Dim::Memory => r.memory_mb,
            Dim::Disk => r.disk_mb,
        }
    }

    fn of_sample(self, s: &Sample) -> f64 {
        match self {
            Dim::Cores => s.cores,
            Dim::Memory => s.memory_mb,
            Dim::Disk => s.disk_mb,
        }
    }

    fn set(self, r: &mut Resources, v: u64) {
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

/// Margin over the sample a growing task's target is taken from (see
/// [`CategoryState::grow_seen`]): small, because going over it again costs
/// only another freeze, not a rerun.
pub const GROW_MARGIN: f64 = 0.05;

/// Factor a growing task's memory grows by when no bigger peak is known
/// (see [`CategoryState::grow_seen`]). Past every known peak a retry
/// rung is sized generously (it doubles while a category is young),
/// because a rerun is dear; a growing task steps gentler, because growing
/// again is cheap and what it asks for beyond its need is held from the
/// others: W4's first big tasks, doubling, asked for 6.2 GB to use
/// 3.6 GB, and waited for that much room.
pub const GROW_STEP: f64 = 1.5;

/// How many first-growth ages a category keeps (see
/// [`CategoryState::reserve_hold_s`]).
pub const GROWTH_AGES_KEPT: usize = 64;

/// First-growth ages needed before a task's growth reserve is let go
/// before it ends.
pub const GROWTH_AGES_MIN: usize = 5;

/// Margin over the latest first-growth age seen, past which a task is
/// taken not to grow: ages stretch when the worker's CPU is contended.
pub const GROWTH_AGE_MARGIN: f64 = 1.5;

/// Factor on the cores a task of a bucketing category gets while the
/// category has fewer than `min_samples` samples, where the largest worker
/// still runs four such tasks at once (see `make_bucket`).
pub const LEARNING_CORES_FACTOR: u32 = 2;

/// Smallest memory ever allocated by learning, MB: peaks of tiny commands
/// jitter by a few MB, and a retry for that is pure loss.
pub const MIN_MEMORY_MB: u64 = 64;

/// No bound in any resource.
const UNLIMITED: Resources = Resources {
    cores: u32::MAX,
    memory_mb: u64::MAX,
    disk_mb: u64::MAX,
    gpus: u32::MAX,
};

/// Component-wise minimum.
fn clamp(r: Resources, cap: &Resources) -> Resources {
    Resources {
        cores: r.cores.min(cap.cores),
        memory_mb: r.memory_mb.min(cap.memory_mb),
        disk_mb: r.disk_mb.min(cap.disk_mb),
        gpus: r.gpus.min(cap.gpus),
    }
}

/// `declared`'s non-zero components over `r`.
fn overlay(r: Resources, declared: &Resources) -> Resources {
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
    fn cap(&self, largest: &Resources) -> Resources {
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

    fn has_max(&self) -> bool {
        self.config.max.is_some_and(|m| !m.is_zero())
    }

    /// The category maximum as an allocation: its set components, the
    /// largest worker's for the others.
    fn max_allocation(&self, largest: &Resources) -> Option<Resources> {
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
            // A partial declaration keeps its declared part, and gets the
            // rest of a whole worker.
            *largest
        };
        Request::Fixed(clamp(overlay(base, declared), &cap_with(declared, &cap)))
    }

    /// The memory a task running with `failed` grows to in place once it
    /// was seen using `seen` MB (see [`CategoryConfig::grow_in_place`]).
    ///
    /// A retry holds its allocation for the whole rerun, so it goes to a
    /// bucket that very likely holds the task ([`retry_seen`](Self::retry_seen)).
    /// Growing again costs only a freeze and a message, so a growing task
    /// gets the median of the peaks of this category's tasks that were
    /// bigger than `seen`, plus [`GROW_MARGIN`]: about half such tasks end
    /// there, the others grow again, from a higher start, and none holds a
    /// whole bucket's worth more than it needs. With no bigger peak known
    /// it grows by [`GROW_STEP`]. `None` when it cannot grow (fixed mode,
    /// declared memory, or already at the cap).
    pub fn grow_seen(
        &self,
        failed: &Resources,
        seen: f64,
        declared: &Resources,
        largest: &Resources,
    ) -> Option<Request> {
        if self.config.mode == AllocationMode::Fixed || declared.memory_mb != 0 {
            return None;
        }
        let need = if seen.is_finite() && seen > 0.0 {
            failed
                .memory_mb
                .max(seen.ceil().min(u64::MAX as f64) as u64)
        } else {
            failed.memory_mb
        };
        let mut bigger: Vec<f64> = self
            .window
            .iter()
            .map(|s| s.memory_mb)
            .filter(|&m| m > need as f64)
            .collect();
        let target = if bigger.is_empty() {
            (need as f64 * GROW_STEP).ceil().min(u64::MAX as f64) as u64
        } else {
            let mid = (bigger.len() - 1) / 2;
            let (_, median, _) = bigger.select_nth_unstable_by(mid, f64::total_cmp);
            (*median * (1.0 + GROW_MARGIN)).ceil().min(u64::MAX as f64) as u64
        };
        let mut r = *failed;
        r.memory_mb = target;
        let r = clamp(r, &cap_with(declared, &self.cap(largest)));
        (r.memory_mb > need).then_some(Request::Fixed(r))
    }

    /// Memory, MB, to hold free on a worker for each task that starts with
    /// `allocation` and may grow in place: what such tasks went over it by,
    /// on average over the samples (zero until k-means buckets exist, or
    /// where tasks do not grow). `allocation` plus this stays within the
    /// cap.
    ///
    /// A category whose first bucket is small and whose rare tasks are big
    /// (W4: 30% of its tasks need six times the first bucket) otherwise
    /// fills a worker with tasks in the small bucket, and the big ones
    /// among them find no room to grow: they freeze and wait for each
    /// other. Held together on the worker for all its unproven tasks, this
    /// room is there for whichever of them turn out to be big.
    ///
    /// ```
    /// use drover_master::alloc::{CategoryState, Sample};
    /// use drover_master::{CategoryConfig, Resources};
    /// let mut c = CategoryState::new("w", CategoryConfig::bucketing().min_samples(4));
    /// let worker = Resources { cores: 8, memory_mb: 16_000, ..Default::default() };
    /// for mb in [400.0, 450.0, 500.0, 3_000.0] {
    ///     let s = Sample { cores: 1.0, memory_mb: mb, wall_s: 1.0, ..Default::default() };
    ///     c.record(s, &worker);
    /// }
    /// let small = Resources { cores: 1, memory_mb: 600, ..Default::default() };
    /// assert_eq!(c.growth_reserve(&small, &Resources::default(), &worker), 600);
    /// ```
    pub fn growth_reserve(
        &self,
        allocation: &Resources,
        declared: &Resources,
        largest: &Resources,
    ) -> u64 {
        if self.config.mode != AllocationMode::Bucketing
            || !self.config.grow_in_place
            || !self.clustered
            || declared.memory_mb != 0
            || self.window.is_empty()
        {
            return 0;
        }
        let have = allocation.memory_mb as f64;
        let over: f64 = self
            .window
            .iter()
            .map(|s| (s.memory_mb - have).max(0.0))
            .sum();
        let mean = (over / self.window.len() as f64).ceil();
        let room = cap_with(declared, &self.cap(largest))
            .memory_mb
            .saturating_sub(allocation.memory_mb);
        (mean.min(u64::MAX as f64) as u64).min(room)
    }

    /// A task of this category that started in a bucket first asked to
    /// grow after running `ran_s` seconds.
    pub fn note_growth_age(&mut self, ran_s: f64) {
        if !(ran_s.is_finite() && ran_s >= 0.0) {
            return;
        }
        if self.growth_ages.len() >= GROWTH_AGES_KEPT {
            self.growth_ages.pop_front();
        }
        self.growth_ages.push_back(ran_s);
    }

    /// How long a task keeps its growth reserve
    /// ([`growth_reserve`](Self::growth_reserve)) if it has not asked to
    /// grow: the latest age at which recent tasks first did, with a margin
    /// ([`GROWTH_AGE_MARGIN`]). A task that runs past it without growing is
    /// almost surely one of the small ones, and the room it held is better
    /// used to start another. `None` (keep it to the end) until
    /// [`GROWTH_AGES_MIN`] ages are known.
    ///
    /// ```
    /// use drover_master::alloc::CategoryState;
    /// use drover_master::CategoryConfig;
    /// let mut c = CategoryState::new("w", CategoryConfig::bucketing());
    /// for s in [0.4, 0.9, 0.6, 0.5] {
    ///     c.note_growth_age(s);
    /// }
    /// assert_eq!(c.reserve_hold_s(), None);
    /// c.note_growth_age(0.7);
    /// assert_eq!(c.reserve_hold_s(), Some(0.9 * 1.5));
    /// ```
    pub fn reserve_hold_s(&self) -> Option<f64> {
        if self.growth_ages.len() < GROWTH_AGES_MIN {
            return None;
        }
        let latest = self.growth_ages.iter().copied().fold(0.0, f64::max);
        Some(latest * GROWTH_AGE_MARGIN)
    }

    /// The next rung after an attempt with `failed` (a whole worker if
    /// `was_whole`) was killed for exceeding `dim`; `None` when the ladder
    /// is exhausted and the task should fail.
    pub fn retry(
        &self,
        failed: &Resources,
        was_whole: bool,
        dim: Dim,
        declared: &Resources,
        largest: &Resources,
    ) -> Option<Request> {
        self.retry_seen(failed, was_whole, dim, 0.0, declared, largest)
    }

    /// [`retry`](Self::retry) knowing that the task was seen using `seen`
    /// of `dim` when it was killed (the monitor samples, so this is often
    /// well past the limit): no rung that small is tried.
    pub fn retry_seen(
        &self,
        failed: &Resources,
        was_whole: bool,
        dim: Dim,
        seen: f64,
        declared: &Resources,
        largest: &Resources,
    ) -> Option<Request> {
        if was_whole || self.config.mode == AllocationMode::Fixed || dim.of(declared) != 0 {
            return None;
        }
        let cap = cap_with(declared, &self.cap(largest));
        let have = dim.of(failed);
        let seen = if seen.is_finite() && seen > 0.0 {
            seen.ceil().min(u64::MAX as f64) as u64
        } else {
            0
        };
        // What the next rung must exceed: the allocation, and what the
        // task was already seen using.
        let need = have.max(seen);
        let candidate = |r: Resources| -> Option<Resources> {
            let r = clamp(overlay(Resources::max_each(&r, failed), declared), &cap);
            (dim.of(&r) > need).then_some(r)
        };
        let grow = |x: f64| (x * (1.0 + self.config.margin)).ceil().min(u64::MAX as f64) as u64;
        // The top bucket, and the most any recently killed attempt was seen
        // using (a lower bound of what that task needs).
        let top = self
            .buckets
            .iter()
            .map(|b| dim.of(&b.allocation))
            .max()
            .unwrap_or(0);
        let killed_max = self
            .kills
            .iter()
            .map(|s| dim.of_sample(s))
            .fold(seen as f64, f64::max);
        // Tasks seen above the top bucket prove it too small: a task that
        // goes up to it from a lower bucket gets at least what they were
        // seen using. (One killed in the top bucket itself goes on past it,
        // below.)
        let raised_top = if have < top && killed_max > top as f64 {
            grow(killed_max)
        } else {
            0
        };
        // The buckets that are bigger where it mattered; of those, the one
        // with the lowest expected cost for tasks that big.
        let mut rungs: Vec<Resources> = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            let mut a = b.allocation;
            if dim.of(&a) == top && raised_top > top {
                dim.set(&mut a, raised_top);
            }
            if let Some(r) = candidate(a) {
                rungs.push(r);
            }
        }
        rungs.sort_by_key(|r| (dim.of(r), *r));
        rungs.dedup();
        if let Some(r) = self.cheapest_rung(&rungs, dim, need) {
            return Some(Request::Fixed(r));
        }
        if let Some(max) = self.max_allocation(largest) {
            if dim.of(&self.config.max.unwrap_or_default()) != 0 {
                // The maximum bounds this resource: it is the top rung.
                return candidate(max).map(Request::Fixed);
            }
        }
        // No maximum for this resource: double, then a whole worker.
        let limit = dim.of(&cap);
        let floor = match dim {
            Dim::Memory => MIN_MEMORY_MB,
            _ => 1,
        };
        let doubled = have.saturating_mul(2).max(floor).max(grow(need as f64));
        if doubled < limit {
            let mut r = *failed;
            dim.set(&mut r, doubled);
            if let Some(r) = candidate(r) {
                return Some(Request::Fixed(r));
            }
        }
        if self.has_max() {
            // Other resources are bounded by the maximum; a whole worker
            // would break it.
            let mut r = *failed;
            dim.set(&mut r, limit.min(doubled));
            return candidate(r).map(Request::Fixed);
        }
        Some(Request::WholeWorker)
    }

    /// A task of this category succeeded with this measured peak.
    /// Returns true when what [`first`](Self::first) answers may have changed.
    pub fn record(&mut self, sample: Sample, largest: &Resources) -> bool {
        if self.config.mode == AllocationMode::Fixed {
            self.total += 1;
            self.note_max(&sample.sane());
            return false;
        }
        let sample = sample.sane();
        self.ok_time.add(sample.wall_s);
        self.total += 1;
        self.note_max(&sample);
        self.push(sample);
        self.since_clustering += 1;
        let largest_changed = *largest != self.largest;
        self.largest = *largest;
        let want_kmeans = self.config.mode == AllocationMode::Bucketing
            && self.window.len() >= self.config.min_samples.max(1);
        if !want_kmeans {
            // Max mode, or still learning: one bucket, the largest seen.
            let before = self.buckets.first().map(|b| b.allocation);
            self.rebuild_max_bucket();
            return largest_changed || before != self.buckets.first().map(|b| b.allocation);
        }
        let due = if self.clustered {
            let held = self.window.len().min(self.config.window);
            self.since_clustering >= (held / 4).max(1)
        } else {
            true
        };
        if due || largest_changed {
            self.rebuild();
            return true;
        }
        // Between clusterings: count the sample in the smallest bucket
        // that holds it, or give it a bucket so that coverage holds.
        let before = self.buckets.get(self.start).map(|b| b.allocation);
        if let Some(i) = self
            .buckets
            .iter()
            .position(|b| covers(&b.allocation, &sample))
        {
            let b = &mut self.buckets[i];
            b.count += 1;
            b.low = min_sample(&b.low, &sample);
            b.high = max_sample(&b.high, &sample);
            return false;
        }
        if self.extra < self.config.max_buckets {
            self.extra += 1;
            let b = self.make_bucket(sample, sample, 1);
            self.buckets.push(b);
        } else if let Some(top) = self.buckets.last_mut().map(|b| (b.low, b.high, b.count)) {
            let (low, high, count) = top;
            let b = self.make_bucket(
                min_sample(&low, &sample),
                max_sample(&high, &sample),
                count + 1,
            );
            if let Some(last) = self.buckets.last_mut() {
                *last = b;
            }
        }
        self.sort_buckets();
        before != self.buckets.get(self.start).map(|b| b.allocation)
    }

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

    /// The current buckets' allocations, smallest first.
    pub fn bucket_allocations(&self) -> Vec<Resources> {
        self.buckets.iter().map(|b| b.allocation).collect()
    }

    /// The samples in the window, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.window.iter()
    }

    fn push(&mut self, sample: Sample) {
        if self.window.len() >= self.config.window {
            self.window.pop_front();
        }
        self.window.push_back(sample);
    }

    fn note_max(&mut self, s: &Sample) {
        self.max_seen = max_sample(&self.max_seen, s);
    }

    fn rebuild(&mut self) {
        if self.window.is_empty() {
            self.buckets.clear();
            self.start = 0;
            return;
        }
        let kmeans = self.config.mode == AllocationMode::Bucketing
            && self.window.len() >= self.config.min_samples.max(1);
        if kmeans {
            self.cluster();
        } else {
            self.rebuild_max_bucket();
        }
    }

    /// One bucket holding every sample in the window: max mode, and the
    /// learning phase of bucketing.
    fn rebuild_max_bucket(&mut self) {
        let Some(first) = self.window.front().copied() else {
            return;
        };
        let (low, high) = self.window.iter().fold((first, first), |(l, h), s| {
            (min_sample(&l, s), max_sample(&h, s))
        });
        let b = self.make_bucket(low, high, self.window.len() as u64);
        self.buckets = vec![b];
        self.start = 0;
    }

    fn make_bucket(&self, low: Sample, high: Sample, count: u64) -> Bucket {
        let m = 1.0 + self.config.margin;
        let up = |x: f64| -> u64 {
            // The epsilon keeps 400 * 1.1 at 440, not 441.
            let v = (x * m - 1e-6).ceil();
            if v >= u64::MAX as f64 {
                u64::MAX
            } else {
                v as u64
            }
        };
        // A k-means bucket stands for a population of which `count` members
        // were seen: its allocation aims at the largest member that
        // population may have, not the largest seen. For n draws spread over
        // [low, high], high + (high - low) / (n - 1) is the unbiased estimate
        // of the upper end of a uniform range; few members, or a wide
        // spread, get more room. (Max mode and the learning phase keep the
        // plain largest peak: that is their definition.)
        let estimate = self.config.mode == AllocationMode::Bucketing
            && self.window.len() >= self.config.min_samples.max(1)
            && count >= 2;
        let top = |lo: f64, hi: f64| {
            if estimate {
                hi + (hi - lo).max(0.0) / (count - 1) as f64
            } else {
                hi
            }
        };
        // Cores are not a limit a task is killed for: round the measured
        // average to whole cores with a little slack instead of a margin.
        let cores = ((high.cores - 0.2).ceil().max(1.0)).min(f64::from(u32::MAX)) as u32;
        // While bucketing learns, each task gets twice the cores seen: that
        // many fewer unknown tasks start together, so fewer of them turn
        // out big at once and wait frozen on each other for room (W4's
        // first wave of 12 held 4-5 big tasks that could not all fit).
        let learning = self.config.mode == AllocationMode::Bucketing
            && self.window.len() < self.config.min_samples.max(1);
        // Not where that would leave fewer than four tasks running on the
        // largest worker: a laptop's first tasks would run one at a time.
        let cores = if learning {
            cores
                .saturating_mul(LEARNING_CORES_FACTOR)
                .min(cores.max(self.largest.cores / 4))
        } else {
            cores
        };
        let memory = if high.memory_mb > 0.0 {
            up(top(low.memory_mb, high.memory_mb)).max(MIN_MEMORY_MB)
        } else {
            MIN_MEMORY_MB
        };
        let disk = if high.disk_mb > 0.0 {
            up(top(low.disk_mb, high.disk_mb))
        } else {
            0
        };
        let allocation = clamp(
            Resources {
                cores,
                memory_mb: memory,
                disk_mb: disk,
                gpus: 0,
            },
            &self.cap(&self.largest),
        );
        let share = self.share(&allocation);
        Bucket {
            allocation,
            low,
            high,
            count,
            share,
        }
    }

    /// Dominant share of the largest worker (or of the largest sample where
    /// no worker is known).
    fn share(&self, r: &Resources) -> f64 {
        let scale = self.scale();
        (f64::from(r.cores) / scale[0])
            .max(r.memory_mb as f64 / scale[1])
            .max(r.disk_mb as f64 / scale[2])
    }

    fn scale(&self) -> [f64; 3] {
        let pick = |w: u64, seen: f64| {
            if w > 0 {
                w as f64
            } else if seen > 0.0 {
                seen * (1.0 + self.config.margin)
            } else {
                1.0
            }
        };
        [
            pick(self.largest.cores.into(), self.max_seen.cores.max(1.0)),
            pick(self.largest.memory_mb, self.max_seen.memory_mb),
            pick(self.largest.disk_mb, self.max_seen.disk_mb),
        ]
    }

    fn sort_buckets(&mut self) {
        self.buckets.sort_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then_with(|| a.allocation.cmp(&b.allocation))
        });
        self.start = self.best_start(&self.buckets).0;
    }

    /// k-means for k = 1..=max_buckets; keeps the cheapest bucket set.
    fn cluster(&mut self) {
        self.stats.clusterings += 1;
        self.since_clustering = 0;
        self.extra = 0;
        self.clustered = true;
        let samples: Vec<Sample> = self.window.iter().copied().collect();
        let n = samples.len();
        let scale = self.scale();
        let mut data = Array2::<f64>::zeros((n, 3));
        for (i, s) in samples.iter().enumerate() {
            data[[i, 0]] = s.cores / scale[0];
            data[[i, 1]] = s.memory_mb / scale[1];
            data[[i, 2]] = s.disk_mb / scale[2];
        }
        let distinct = count_distinct(&samples, self.config.max_buckets);
        let kmax = self.config.max_buckets.min(distinct).max(1);
        let mut best: Option<(f64, Vec<Bucket>, usize)> = None;
        for k in 1..=kmax {
            let labels: Vec<usize> = if k == 1 {
                vec![0; n]
            } else {
                let rng = StdRng::seed_from_u64(
                    self.config.seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let dataset = DatasetBase::from(data.clone());
                match KMeans::params_with_rng(k, rng)
                    .n_runs(2)
                    .max_n_iterations(60)
                    .tolerance(1e-4)
                    .fit(&dataset)
                {
                    Ok(model) => model.predict(&data).to_vec(),
                    Err(_) => continue,
                }
            };
            let buckets = self.buckets_from(&samples, &labels, k);
            let (start, cost) = self.best_start(&buckets);
            // A new bucket must pay for itself: 1% better or it is noise.
            if best.as_ref().is_none_or(|(c, _, _)| cost < c * 0.99) {
                best = Some((cost, buckets, start));
            }
        }
        if let Some((_, buckets, start)) = best {
            self.buckets = buckets;
            self.start = start;
        }
    }

    fn buckets_from(&self, samples: &[Sample], labels: &[usize], k: usize) -> Vec<Bucket> {
        let mut acc: Vec<Option<(Sample, Sample, u64)>> = vec![None; k];
        for (s, &l) in samples.iter().zip(labels) {
            let slot = &mut acc[l.min(k - 1)];
            *slot = Some(match slot {
                None => (*s, *s, 1),
                Some((lo, hi, c)) => (min_sample(lo, s), max_sample(hi, s), *c + 1),
            });
        }
        let mut buckets: Vec<Bucket> = acc
            .into_iter()
            .flatten()
            .map(|(lo, hi, c)| self.make_bucket(lo, hi, c))
            .collect();
        buckets.sort_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then_with(|| a.allocation.cmp(&b.allocation))
        });
        // Clusters that round to the same allocation are one bucket.
        buckets.dedup_by(|b, a| {
            if a.allocation == b.allocation {
                a.count += b.count;
                a.low = min_sample(&a.low, &b.low);
                a.high = max_sample(&a.high, &b.high);
                true
            } else {
                false
            }
        });
        buckets
    }

    /// `f` of the cost model: how long a killed attempt lasts, as a fraction
    /// of a successful run (1 until both have been seen).
    fn kill_fraction(&self) -> f64 {
        match (self.killed_time.get(), self.ok_time.get()) {
            (Some(k), Some(ok)) if ok > 0.0 => (k / ok).clamp(0.01, 1.0),
            _ => 1.0,
        }
    }

    /// Of `rungs` (each larger than `need` in `dim`, smallest first), the
    /// one to retry a killed task in: the lowest expected resource-time
    /// (the model of [`best_start`](Self::best_start)) over the samples
    /// that needed more than `need`, the tasks this one is now known to be
    /// like. The smallest when no sample is that big.
    fn cheapest_rung(&self, rungs: &[Resources], dim: Dim, need: u64) -> Option<Resources> {
        let first = *rungs.first()?;
        let f = self.kill_fraction();
        let top = match self.max_allocation(&self.largest) {
            Some(max) => self.share(&max),
            None => 1.0_f64.max(self.share(&rungs[rungs.len() - 1])),
        };
        let shares: Vec<f64> = rungs.iter().map(|r| self.share(r)).collect();
        let mut best = (first, f64::INFINITY);
        let mut any = false;
        for start in 0..rungs.len() {
            let mut cost = 0.0;
            for s in self
                .window
                .iter()
                .filter(|s| dim.of_sample(s) > need as f64)
            {
                any = true;
                let t = s.wall_s.max(1e-3);
                let mut placed = false;
                for (r, share) in rungs[start..].iter().zip(&shares[start..]) {
                    if covers(r, s) {
                        cost += share * t;
                        placed = true;
                        break;
                    }
                    cost += share * f * t;
                }
                if !placed {
                    cost += top * t;
                }
            }
            if !any {
                return Some(first);
            }
            // A bigger rung must be cheaper, not just as cheap.
            if cost < best.1 * 0.999 {
                best = (rungs[start], cost);
            }
        }
        Some(best.0)
    }

    /// The start bucket with the lowest expected resource-time per task,
    /// and that cost. See the module documentation for the model.
    fn best_start(&self, buckets: &[Bucket]) -> (usize, f64) {
        if buckets.is_empty() {
            return (0, f64::INFINITY);
        }
        let f = self.kill_fraction();
        let top = match self.max_allocation(&self.largest) {
            Some(max) => self.share(&max),
            None => 1.0_f64.max(buckets.last().map_or(1.0, |b| b.share)),
        };
        let mut best = (0, f64::INFINITY);
        for start in 0..buckets.len() {
            let mut cost = 0.0;
            for s in &self.window {
                let t = s.wall_s.max(1e-3);
                let mut c = 0.0;
                let mut placed = false;
                for b in &buckets[start..] {
                    if covers(&b.allocation, s) {
                        c += b.share * t;
                        placed = true;
                        break;
                    }
                    c += b.share * f * t;
                }
                if !placed {
                    c += top * t;
                }
                cost += c;
            }
            if cost < best.1 {
                best = (start, cost);
            }
        }
        (best.0, best.1 / self.window.len().max(1) as f64)
    }
}

/// `r` with `declared`'s components as a cap of their own: a declared
/// resource is both the allocation and the limit.
fn cap_with(declared: &Resources, cap: &Resources) -> Resources {
    overlay(*cap, declared)
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

/// True when a task with peak `s` would not be killed under `a`: memory and
/// disk are the limits a task is killed for (zero means no limit).
pub fn covers(a: &Resources, s: &Sample) -> bool {
    let ok = |limit: u64, used: f64| limit == 0 || used <= limit as f64;
    ok(a.memory_mb, s.memory_mb) && ok(a.disk_mb, s.disk_mb)
}

fn min_sample(a: &Sample, b: &Sample) -> Sample {
    Sample {
        cores: a.cores.min(b.cores),
        memory_mb: a.memory_mb.min(b.memory_mb),
        disk_mb: a.disk_mb.min(b.disk_mb),
        wall_s: a.wall_s.min(b.wall_s),
    }
}

fn max_sample(a: &Sample, b: &Sample) -> Sample {
    Sample {
        cores: a.cores.max(b.cores),
        memory_mb: a.memory_mb.max(b.memory_mb),
        disk_mb: a.disk_mb.max(b.disk_mb),
        wall_s: a.wall_s.max(b.wall_s),
    }
}

/// Distinct (cores, memory, disk) points, counting up to `limit`: k-means
/// cannot make more clusters than that.
fn count_distinct(samples: &[Sample], limit: usize) -> usize {
    let mut seen: Vec<[u64; 3]> = Vec::new();
    for s in samples {
        let key = [
            s.cores.to_bits(),
            s.memory_mb.to_bits(),
            s.disk_mb.to_bits(),
        ];
        if !seen.contains(&key) {
            seen.push(key);
            if seen.len() >= limit {
                break;
            }
        }
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mb: f64) -> Sample {
        Sample {
            cores: 1.0,
            memory_mb: mb,
            disk_mb: 0.0,
            wall_s: 1.5,
        }
    }

    fn worker() -> Resources {
        Resources {
            cores: 12,
            memory_mb: 12_000,
            disk_mb: 0,
            gpus: 0,
        }
    }

    fn fixed(r: Request) -> Resources {
        match r {
            Request::Fixed(r) => r,
            Request::WholeWorker => panic!("expected a fixed request"),
        }
    }

    #[test]
    fn no_samples_means_first_then_max_then_whole_worker() {
        let w = worker();
        let c = CategoryState::new("a", CategoryConfig::bucketing());
        assert_eq!(c.first(&Resources::default(), &w), Request::WholeWorker);
        let c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(5000));
        let r = fixed(c.first(&Resources::default(), &w));
        assert_eq!((r.memory_mb, r.cores), (5000, 12));
        let first = Resources {
            cores: 1,
            memory_mb: 700,
            ..Default::default()
        };
        let c = CategoryState::new(
            "a",
            CategoryConfig::bucketing().first(first).max_memory_mb(5000),
        );
        assert_eq!(fixed(c.first(&Resources::default(), &w)), first);
    }

    #[test]
    fn learning_phase_uses_the_largest_peak() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        assert!(c.record(mem(400.0), &w));
        assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 440);
        c.record(mem(300.0), &w);
        assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 440);
        c.record(mem(1000.0), &w);
        assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 1100);
    }

    #[test]
    fn bimodal_samples_make_two_buckets_and_start_small() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        for i in 0..70 {
            c.record(mem(300.0 + (i % 30) as f64 * 10.0), &w);
        }
        for i in 0..30 {
            c.record(mem(2500.0 + (i % 15) as f64 * 100.0), &w);
        }
        let buckets = c.bucket_allocations();
        assert!(buckets.len() >= 2, "{buckets:?}");
        let start = fixed(c.first(&Resources::default(), &w));
        assert!(
            start.memory_mb < 1000,
            "starts in a small bucket: {start:?}"
        );
        // Killed in the small bucket: the next rung holds the big mode.
        let next = fixed(
            c.retry(&start, false, Dim::Memory, &Resources::default(), &w)
                .unwrap(),
        );
        assert!(next.memory_mb > start.memory_mb);
        let top = *buckets.last().unwrap();
        assert!(
            top.memory_mb >= 3900 && top.memory_mb <= 12_000,
            "{buckets:?}"
        );
    }

    /// A growing task goes to the median of the bigger peaks (plus the
    /// small margin), then on from there; past the biggest peak it grows
    /// by a step; never past the cap; not at all in fixed mode.
    /// While bucketing learns, a task gets twice the cores seen, so that
    /// half as many unknown tasks start together; once it has its samples,
    /// and in max mode, the cores seen.
    #[test]
    fn learning_tasks_get_twice_the_cores_seen() {
        let w = worker();
        let none = Resources::default();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(3));
        let mut m = CategoryState::new("m", CategoryConfig::max_seen());
        for (i, mb) in [300.0, 320.0, 340.0].into_iter().enumerate() {
            c.record(mem(mb), &w);
            m.record(mem(mb), &w);
            let cores = fixed(c.first(&none, &w)).cores;
            let learned = i + 1 >= 3;
            assert_eq!(
                cores,
                if learned { 1 } else { 2 },
                "after {} samples",
                i + 1
            );
            assert_eq!(fixed(m.first(&none, &w)).cores, 1);
        }
        // On a 2-core worker it would halve what runs at once: it stays 1.
        let small = Resources { cores: 2, ..w };
        let mut c = CategoryState::new("s", CategoryConfig::bucketing().min_samples(3));
        c.record(mem(300.0), &small);
        assert_eq!(fixed(c.first(&none, &small)).cores, 1);
    }

    #[test]
    fn the_growth_reserve_is_the_mean_overflow_once_bucketed() {
        let w = worker();
        let none = Resources::default();
        let small = Resources {
            cores: 1,
            memory_mb: 600,
            ..Default::default()
        };
        let config = CategoryConfig::bucketing().min_samples(5);
        let mut c = CategoryState::new("a", config.clone());
        for mb in [300.0, 400.0, 500.0, 3000.0] {
            c.record(mem(mb), &w);
        }
        // Still learning: tasks get the largest peak, and nothing is held.
        assert_eq!(c.growth_reserve(&small, &none, &w), 0);
        c.record(mem(2600.0), &w);
        // (3000 - 600 + 2600 - 600) / 5 samples.
        assert_eq!(c.growth_reserve(&small, &none, &w), 880);
        // Nothing past an allocation that holds every peak.
        let roomy = Resources {
            memory_mb: 3000,
            ..small
        };
        assert_eq!(c.growth_reserve(&roomy, &none, &w), 0);
        // Never past the cap: the worker, or the category maximum.
        let tight = Resources {
            memory_mb: 1_000,
            ..w
        };
        assert_eq!(c.growth_reserve(&small, &none, &tight), 400);
        // None where tasks do not grow, or declare their memory.
        let declared = Resources {
            memory_mb: 600,
            ..Default::default()
        };
        assert_eq!(c.growth_reserve(&small, &declared, &w), 0);
        for config in [
            config.clone().grow_in_place(false),
            config.mode(AllocationMode::Max),
        ] {
            let mut other = CategoryState::new("b", config);
            for mb in [300.0, 400.0, 500.0, 3000.0, 2600.0] {
                other.record(mem(mb), &w);
            }
            assert_eq!(other.growth_reserve(&small, &none, &w), 0);
        }
    }

    #[test]
    fn the_reserve_hold_follows_recent_growth_ages_only() {
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        c.note_growth_age(f64::NAN);
        c.note_growth_age(-1.0);
        c.note_growth_age(20.0);
        for _ in 0..GROWTH_AGES_MIN - 1 {
            c.note_growth_age(1.0);
        }
        assert_eq!(c.reserve_hold_s(), Some(20.0 * GROWTH_AGE_MARGIN));
        // The 20 s age falls out of the window.
        for _ in 0..GROWTH_AGES_KEPT {
            c.note_growth_age(2.0);
        }
        assert_eq!(c.reserve_hold_s(), Some(2.0 * GROWTH_AGE_MARGIN));
        // Kept across a change of settings, like the samples.
        c.set_config(CategoryConfig::bucketing().min_samples(3));
        assert_eq!(c.reserve_hold_s(), Some(2.0 * GROWTH_AGE_MARGIN));
    }

    #[test]
    fn a_growing_task_goes_to_the_median_of_bigger_peaks() {
        let w = worker();
        let none = Resources::default();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(6000));
        for mb in [300.0, 400.0, 500.0, 2500.0, 3000.0, 3500.0, 4000.0] {
            c.record(mem(mb), &w);
        }
        let small = Resources {
            cores: 1,
            memory_mb: 600,
            ..Default::default()
        };
        let grow = |c: &CategoryState, from: &Resources, seen: f64| {
            c.grow_seen(from, seen, &none, &w).map(fixed)
        };
        // Bigger than 650: 2500, 3000, 3500, 4000; the lower median is 3000.
        let first = grow(&c, &small, 650.0).unwrap();
        assert_eq!((first.memory_mb, first.cores), (3150, 1));
        // Past it: bigger than 3200 are 3500 and 4000.
        assert_eq!(grow(&c, &first, 3200.0).unwrap().memory_mb, 3675);
        // Past every peak: a step up from what it was seen using, within
        // the cap.
        let mut roomy = CategoryState::new("r", CategoryConfig::bucketing().max_memory_mb(10_000));
        for mb in [300.0, 4000.0] {
            roomy.record(mem(mb), &w);
        }
        assert_eq!(grow(&roomy, &first, 4000.0).unwrap().memory_mb, 6000);
        let near_cap = Resources {
            memory_mb: 4500,
            ..small
        };
        assert_eq!(grow(&c, &near_cap, 4600.0).unwrap().memory_mb, 6000);
        let at_cap = Resources {
            memory_mb: 6000,
            ..small
        };
        assert_eq!(grow(&c, &at_cap, 6100.0), None);
        let mut f = CategoryState::new("f", CategoryConfig::fixed());
        f.record(mem(5000.0), &w);
        assert_eq!(f.grow_seen(&small, 650.0, &none, &w), None);
    }

    #[test]
    fn uniform_big_samples_start_big() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        for i in 0..50 {
            c.record(mem(3000.0 + (i % 10) as f64 * 10.0), &w);
        }
        let start = fixed(c.first(&Resources::default(), &w));
        assert!(start.memory_mb >= 3090, "{start:?}");
    }

    #[test]
    fn ladder_without_max_doubles_then_whole_worker_then_fails() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        c.record(mem(1000.0), &w);
        let mut r = fixed(c.first(&Resources::default(), &w));
        assert_eq!(r.memory_mb, 1100);
        let mut seen = vec![r.memory_mb];
        loop {
            match c.retry(&r, false, Dim::Memory, &Resources::default(), &w) {
                Some(Request::Fixed(n)) => {
                    assert!(n.memory_mb > r.memory_mb);
                    r = n;
                    seen.push(r.memory_mb);
                }
                Some(Request::WholeWorker) => break,
                None => panic!("ended before a whole worker: {seen:?}"),
            }
        }
        assert_eq!(seen, vec![1100, 2200, 4400, 8800]);
        assert_eq!(
            c.retry(&w, true, Dim::Memory, &Resources::default(), &w),
            None
        );
    }

    #[test]
    fn retry_skips_rungs_below_what_the_task_was_seen_using() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
        for i in 0..20 {
            c.record(mem(400.0 + i as f64), &w);
            c.record(mem(1500.0 + i as f64), &w);
            c.record(mem(3500.0 + i as f64), &w);
        }
        let none = Resources::default();
        let start = fixed(c.first(&none, &w));
        // Seen at 2,000 MB when killed: the 1,500 MB bucket is skipped.
        let next = fixed(
            c.retry_seen(&start, false, Dim::Memory, 2000.0, &none, &w)
                .unwrap(),
        );
        assert!(
            next.memory_mb > 2000,
            "{next:?} from {:?}",
            c.bucket_allocations()
        );
        // Without the observation it goes to the next bucket up.
        let plain = fixed(c.retry(&start, false, Dim::Memory, &none, &w).unwrap());
        assert!(plain.memory_mb > start.memory_mb && plain.memory_mb <= next.memory_mb);
    }

    #[test]
    fn bucket_allocation_estimates_the_upper_end_of_its_population() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
        for i in 0..30 {
            c.record(mem(400.0 + i as f64), &w);
        }
        // Two big members, 3,000 and 3,500 MB: the next big task may well
        // be bigger than 3,500, by about their spread.
        c.record(mem(3000.0), &w);
        c.record(mem(3500.0), &w);
        c.rebuild();
        let top = *c.bucket_allocations().last().unwrap();
        assert_eq!(top.memory_mb, 4400, "(3,500 + 500) * 1.1");
        // The small bucket: 429 + 29 / 29 = 430, plus 10%.
        assert_eq!(c.bucket_allocations()[0].memory_mb, 473);
        // Max mode keeps the largest peak plus the margin.
        let mut m = CategoryState::new("m", CategoryConfig::max_seen());
        m.record(mem(3000.0), &w);
        m.record(mem(3500.0), &w);
        assert_eq!(m.bucket_allocations()[0].memory_mb, 3850);
    }

    #[test]
    fn tasks_killed_above_the_top_bucket_raise_it_for_those_climbing_to_it() {
        let w = worker();
        let none = Resources::default();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
        for i in 0..30 {
            c.record(mem(400.0 + i as f64), &w);
        }
        c.record(mem(3000.0), &w);
        c.rebuild();
        let buckets = c.bucket_allocations();
        let (small, top) = (buckets[0], *buckets.last().unwrap());
        assert_eq!(top.memory_mb, 3300);
        // Killed in the small bucket, nothing known above: the top bucket.
        let r = fixed(
            c.retry_seen(&small, false, Dim::Memory, 900.0, &none, &w)
                .unwrap(),
        );
        assert_eq!(r.memory_mb, 3300);
        // A task was killed in the top bucket, seen at 3,800 MB.
        let killed = Sample {
            memory_mb: 3800.0,
            wall_s: 1.0,
            ..mem(0.0)
        };
        c.record_attempt(&top, &killed, true);
        // That task goes on past the top bucket (doubling)...
        let r = fixed(
            c.retry_seen(&top, false, Dim::Memory, 3800.0, &none, &w)
                .unwrap(),
        );
        assert_eq!(r.memory_mb, 6600);
        // ...and the next one climbing from the small bucket gets what it
        // was seen using, plus the margin, not the known-too-small bucket.
        let r = fixed(
            c.retry_seen(&small, false, Dim::Memory, 900.0, &none, &w)
                .unwrap(),
        );
        assert_eq!(r.memory_mb, 4180);
        // The buckets themselves wait for real samples.
        assert_eq!(c.bucket_allocations().last().unwrap().memory_mb, 3300);
    }

    #[test]
    fn retry_goes_to_the_cheapest_bucket_for_tasks_that_big() {
        let w = worker();
        let none = Resources::default();
        let three = |big_small: usize, big_big: usize| {
            let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
            for i in 0..60 {
                c.record(mem(400.0 + (i % 20) as f64), &w);
            }
            for i in 0..big_small {
                c.record(mem(2000.0 + (i % 10) as f64), &w);
            }
            for i in 0..big_big {
                c.record(mem(5000.0 + (i % 10) as f64), &w);
            }
            c.rebuild();
            c
        };
        // The buckets, and the retry of a task killed in the smallest one
        // after being seen at `seen` MB.
        let retry_from_small = |c: &CategoryState, seen: f64| {
            let b: Vec<u64> = c.bucket_allocations().iter().map(|r| r.memory_mb).collect();
            let small = c.bucket_allocations()[0];
            let r = fixed(
                c.retry_seen(&small, false, Dim::Memory, seen, &none, &w)
                    .unwrap(),
            );
            (b, r.memory_mb)
        };
        // Most big tasks are 2,000 MB: the 2,000 MB bucket first.
        let (b, r) = retry_from_small(&three(30, 3), 900.0);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(r, b[1], "{b:?}");
        // Most are 5,000 MB: trying 2,000 first would mostly be killed.
        let (b, r) = retry_from_small(&three(3, 30), 900.0);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(r, b[2], "{b:?}");
        // Seen past the middle bucket already: only the top one is left.
        let (b, r) = retry_from_small(&three(30, 3), 2500.0);
        assert_eq!(r, b[2], "{b:?}");
    }

    #[test]
    fn ladder_with_max_ends_at_max() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(3000));
        c.record(mem(1000.0), &w);
        let r = fixed(c.first(&Resources::default(), &w));
        let m = fixed(
            c.retry(&r, false, Dim::Memory, &Resources::default(), &w)
                .unwrap(),
        );
        assert_eq!(m.memory_mb, 3000);
        assert_eq!(
            c.retry(&m, false, Dim::Memory, &Resources::default(), &w),
            None
        );
    }

    #[test]
    fn declared_resources_win_and_are_never_raised() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        c.record(mem(1000.0), &w);
        let declared = Resources {
            cores: 3,
            ..Default::default()
        };
        let r = fixed(c.first(&declared, &w));
        assert_eq!((r.cores, r.memory_mb), (3, 1100));
        let declared = Resources {
            memory_mb: 500,
            ..Default::default()
        };
        let r = fixed(c.first(&declared, &w));
        assert_eq!(r.memory_mb, 500);
        assert_eq!(c.retry(&r, false, Dim::Memory, &declared, &w), None);
    }

    #[test]
    fn fixed_mode_never_retries() {
        let w = worker();
        let c = CategoryState::new("a", CategoryConfig::fixed());
        let r = fixed(c.first(&Resources::default(), &w));
        assert_eq!(r.cores, 1);
        assert_eq!(
            c.retry(&r, false, Dim::Memory, &Resources::default(), &w),
            None
        );
    }

    #[test]
    fn uncovered_sample_between_clusterings_gets_a_bucket() {
        let w = worker();
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
        for _ in 0..40 {
            c.record(mem(500.0), &w);
        }
        c.record(mem(5000.0), &w);
        assert!(c
            .samples()
            .all(|s| c.bucket_allocations().iter().any(|b| covers(b, s))));
    }

    #[test]
    fn waste_counts_unused_and_killed() {
        let mut c = CategoryState::new("a", CategoryConfig::bucketing());
        let a = Resources {
            cores: 1,
            memory_mb: 1000,
            ..Default::default()
        };
        c.record_attempt(
            &a,
            &Sample {
                cores: 1.0,
                memory_mb: 400.0,
                disk_mb: 0.0,
                wall_s: 2.0,
            },
            false,
        );
        c.record_attempt(
            &a,
            &Sample {
                cores: 1.0,
                memory_mb: 1001.0,
                disk_mb: 0.0,
                wall_s: 0.5,
            },
            true,
        );
        let s = c.stats(&worker());
        assert!((s.waste_memory_mb_s - (600.0 * 2.0 + 1000.0 * 0.5)).abs() < 1e-9);
        assert!((s.waste_cores_s - 0.5).abs() < 1e-9);
    }

    #[test]
    fn config_validation() {
        assert!(CategoryConfig::default().validate().is_ok());
        assert!(CategoryConfig::default().margin(-1.0).validate().is_err());
        assert!(CategoryConfig::default()
            .margin(f64::NAN)
            .validate()
            .is_err());
        assert!(CategoryConfig::default().window(0).validate().is_err());
        assert!(CategoryConfig::default().max_buckets(0).validate().is_err());
        let big = Resources {
            memory_mb: 9000,
            ..Default::default()
        };
        assert!(CategoryConfig::default()
            .first(big)
            .max_memory_mb(1000)
            .validate()
            .is_err());
        let e: Result<CategoryConfig, _> = serde_json::from_str(r#"{"mode":"sometimes"}"#);
        assert!(e.is_err());
        let e: Result<CategoryConfig, _> = serde_json::from_str(r#"{"maximum":3}"#);
        assert!(e.is_err());
        let ok: CategoryConfig = serde_json::from_str(r#"{"mode":"max"}"#).unwrap();
        assert_eq!(ok.mode, AllocationMode::Max);
        assert_eq!(ok.window, 2048);
    }
}
