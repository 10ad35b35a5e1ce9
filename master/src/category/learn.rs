//! How often a category does its learning work, and the single bucket of
//! max mode and of the learning phase kept up to date without a pass over
//! the window per sample.
//!
//! A clustering costs O(k × window) per k tried plus the cost model's
//! O(buckets² × window). Spacing clusterings by a quarter of the window,
//! doubled while they keep giving the same buckets, bounds that per sample
//! but not well for tasks whose peaks are noisy enough that the buckets
//! never come out the same twice: those paid a clustering every 512
//! samples for the whole run. The pace therefore also grows with the
//! samples seen since the data last moved past the buckets (a sample no
//! bucket covers resets it), so a run of N such samples clusters
//! O(log N) times: the window of the last clustering stood for a quarter
//! of them as well as the new window would.

use super::*;

/// Between clusterings, at least this fraction of the samples recorded
/// since the data last moved past the buckets: with 4, each clustering
/// comes 1.25x as many samples after that point as the previous one.
pub(super) const CADENCE_DIVISOR: usize = 4;

impl CategoryState {
    /// True when enough samples came since the last clustering that
    /// another one may change the buckets (always before the first one).
    pub(super) fn clustering_due(&self) -> bool {
        if !self.clustered {
            return true;
        }
        let held = self.window.len().min(self.config.window);
        let spacing = self.stable_clusterings.min(MAX_SPACING_DOUBLINGS);
        let pace = ((held / 4).max(1) << spacing).max(self.settled / CADENCE_DIVISOR);
        self.since_clustering >= pace
    }

    /// The one bucket of max mode and of the learning phase after `added`
    /// joined the window and `dropped` left it: the extremes only widen
    /// with the new sample, unless the one that left was an extreme in some
    /// resource, which is the only case that needs the pass over the window
    /// (for noisy peaks, about 8 in a window's worth of samples).
    pub(super) fn follow_max_bucket(&mut self, added: Sample, dropped: Option<Sample>) {
        let edges = match self.buckets.as_slice() {
            [only] => Some((only.low, only.high)),
            _ => None,
        };
        let Some((low, high)) = edges else {
            self.rebuild_max_bucket();
            return;
        };
        if dropped.is_some_and(|d| on_edge(&d, &low, &high)) {
            self.rebuild_max_bucket();
            return;
        }
        let b = self.make_bucket(
            min_sample(&low, &added),
            max_sample(&high, &added),
            self.window.len() as u64,
        );
        self.buckets[0] = b;
        self.start = 0;
    }
}

/// True when `s` equals `low` or `high` in some resource (wall time
/// included: a bucket's extremes are reported in full).
fn on_edge(s: &Sample, low: &Sample, high: &Sample) -> bool {
    let fields = |x: &Sample| [x.cores, x.memory_mb, x.disk_mb, x.wall_s];
    let (s, low, high) = (fields(s), fields(low), fields(high));
    (0..4).any(|i| s[i] <= low[i] || s[i] >= high[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn worker() -> Resources {
        Resources {
            cores: 16,
            memory_mb: 64_000,
            disk_mb: 100_000,
            gpus: 0,
        }
    }

    fn sample(memory_mb: f64, wall_s: f64) -> Sample {
        Sample {
            cores: 1.0,
            memory_mb,
            disk_mb: 10.0,
            wall_s,
        }
    }

    /// Peaks that never give the same buckets twice still cost only a
    /// logarithmic number of clusterings.
    #[test]
    fn noisy_peaks_are_clustered_a_logarithmic_number_of_times() {
        let w = worker();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // A small window keeps the test quick; the pace is relative to it.
        let mut c = CategoryState::new("noisy", CategoryConfig::bucketing().window(64));
        let n = 200_000;
        for _ in 0..n {
            // Two modes with wide noise: the k-means split moves each time.
            let centre = if rng.gen_bool(0.5) { 100.0 } else { 900.0 };
            c.record(sample(centre * rng.gen_range(0.5..1.5), 0.01), &w);
        }
        let spaced_by_window = (n / (64 / 4)) as u64;
        assert!(
            c.stats.clusterings < 80,
            "{} clusterings for {n} samples (a quarter window each: {spaced_by_window})",
            c.stats.clusterings
        );
        // Every sample in the window still has a bucket that holds it.
        assert!(c
            .samples()
            .all(|s| c.bucket_allocations().iter().any(|b| covers(b, s))));
    }

    /// A sample past every bucket brings the usual pace back.
    #[test]
    fn a_sample_past_every_bucket_resets_the_pace() {
        let w = worker();
        let mut c = CategoryState::new("moved", CategoryConfig::bucketing().window(64));
        for i in 0..10_000 {
            c.record(sample(500.0 + (i % 7) as f64, 0.01), &w);
        }
        assert!(c.settled > 0);
        c.record(sample(20_000.0, 0.01), &w);
        assert_eq!(c.settled, 0);
        let before = c.stats.clusterings;
        for _ in 0..64 {
            c.record(sample(20_000.0, 0.01), &w);
        }
        assert!(c.stats.clusterings > before, "no clustering after the move");
    }

    /// The incrementally kept max bucket is the one a pass over the window
    /// gives, sample after sample, also while samples leave the window.
    #[test]
    fn max_bucket_kept_incrementally_matches_a_full_pass() {
        let w = worker();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut c = CategoryState::new("max", CategoryConfig::max_seen().window(50));
        for i in 0..2_000 {
            // A slow rise and fall, so extremes leave the window often.
            let base = 1_000.0 + 800.0 * ((i as f64) / 150.0).sin();
            c.record(
                sample(base * rng.gen_range(0.9..1.1), rng.gen_range(0.1..2.0)),
                &w,
            );
            let kept = c.buckets.clone();
            c.rebuild_max_bucket();
            assert_eq!(kept.len(), 1);
            assert_eq!(kept[0].allocation, c.buckets[0].allocation, "sample {i}");
            assert_eq!(kept[0].low, c.buckets[0].low, "sample {i}");
            assert_eq!(kept[0].high, c.buckets[0].high, "sample {i}");
            assert_eq!(kept[0].count, c.buckets[0].count, "sample {i}");
        }
    }
}
