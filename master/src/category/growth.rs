//! Growth in place, the learning side: what a task frozen over its memory
//! allocation grows to, how much room a placement holds for its class's
//! growth, and how long it holds it. Pure; the engine's `engine::growth`
//! is what grants, refuses and books that room on a worker.

use drover_protocol::Resources;

use super::*;

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

impl CategoryState {
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
    /// use drover_master::category::{CategoryState, Sample};
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
    /// use drover_master::category::CategoryState;
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
}
