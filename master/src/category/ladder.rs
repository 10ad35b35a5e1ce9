//! The retry ladder: where a task killed for going over its allocation
//! goes next (see the module documentation of [`super`]).

use drover_protocol::Resources;

use super::*;

impl CategoryState {
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

    /// `f` of the cost model: how long an attempt that did not fit its
    /// bucket held that bucket, as a fraction of a successful run (1 until
    /// both have been seen). A killed attempt held it until it was killed; a
    /// task that grew in place held it until it first asked to grow, and
    /// then goes on in the bigger allocation without starting again, which
    /// is what the model's next bucket charges. Counting only kills charged
    /// a miss as a whole run even where misses grow in a moment, so the
    /// model kept too few buckets and every task booked for the top of its
    /// mode.
    pub(super) fn kill_fraction(&self) -> f64 {
        let grown: f64 = self.growth_ages.iter().sum();
        let n = self.killed_time.n + self.growth_ages.len() as u64;
        match self.ok_time.get() {
            Some(ok) if ok > 0.0 && n > 0 => {
                ((self.killed_time.sum + grown) / n as f64 / ok).clamp(0.01, 1.0)
            }
            _ => 1.0,
        }
    }

    /// Of `rungs` (each larger than `need` in `dim`, smallest first), the
    /// one to retry a killed task in: the lowest expected cost
    /// ([`ladder_cost`](Self::ladder_cost), the model bucket choice uses:
    /// worker-time of the resource that runs out first, a sample fitting
    /// when its peak plus the margin does, growth and kills as misses) over
    /// the samples that needed more than `need`, the tasks this one is now
    /// known to be like. The smallest when no sample is that big.
    pub(super) fn cheapest_rung(
        &self,
        rungs: &[Resources],
        dim: Dim,
        need: u64,
    ) -> Option<Resources> {
        let first = *rungs.first()?;
        let bigger = || {
            self.window
                .iter()
                .filter(move |s| dim.of_sample(s) > need as f64)
        };
        if bigger().next().is_none() {
            return Some(first);
        }
        let ladder = self.ladder_of(rungs.iter());
        let mut best = (first, f64::INFINITY);
        for (start, (rung, _)) in ladder.iter().enumerate() {
            let cost = self.ladder_cost(&ladder[start..], bigger());
            // A bigger rung must be cheaper, not just as cheap.
            if cost < best.1 * 0.999 {
                best = (*rung, cost);
            }
        }
        Some(best.0)
    }
}
