//! The user's settings of a category: its mode, bounds and margins.

use drover_protocol::Resources;
use serde::{Deserialize, Serialize};

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
    /// Most buckets k-means may make (default 64, the most accepted): an
    /// upper bound only; the number of buckets is the one with the lowest
    /// modelled cost (see the module documentation of `category`).
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
            max_buckets: 64,
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
