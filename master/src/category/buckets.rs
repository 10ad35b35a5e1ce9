//! The sample window and the buckets made from it: k-means clustering,
//! a bucket's allocation, and where a first attempt starts.

use drover_protocol::Resources;
use linfa::prelude::*;
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

impl CategoryState {
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
        let dropped = self.push(sample);
        self.since_clustering += 1;
        self.settled = self.settled.saturating_add(1);
        let largest_changed = *largest != self.largest;
        self.largest = *largest;
        let want_kmeans = self.config.mode == AllocationMode::Bucketing
            && self.window.len() >= self.config.min_samples.max(1);
        if !want_kmeans {
            // Max mode, or still learning: one bucket, the largest seen.
            let before = self.buckets.first().map(|b| b.allocation);
            self.follow_max_bucket(sample, dropped);
            return largest_changed || before != self.buckets.first().map(|b| b.allocation);
        }
        if self.clustering_due() || largest_changed {
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
        // The data moved past the buckets: cluster again at the usual pace.
        self.stable_clusterings = 0;
        self.settled = 0;
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

    /// The current buckets' allocations, smallest first.
    pub fn bucket_allocations(&self) -> Vec<Resources> {
        self.buckets.iter().map(|b| b.allocation).collect()
    }

    /// The samples in the window, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.window.iter()
    }

    /// Adds `sample` to the window; returns the sample it pushed out, if any.
    pub(super) fn push(&mut self, sample: Sample) -> Option<Sample> {
        let dropped = if self.window.len() >= self.config.window {
            self.window.pop_front()
        } else {
            None
        };
        self.window.push_back(sample);
        dropped
    }

    pub(super) fn note_max(&mut self, s: &Sample) {
        self.max_seen = max_sample(&self.max_seen, s);
    }

    pub(super) fn rebuild(&mut self) {
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
    pub(super) fn rebuild_max_bucket(&mut self) {
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

    pub(super) fn make_bucket(&self, low: Sample, high: Sample, count: u64) -> Bucket {
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
    pub(super) fn share(&self, r: &Resources) -> f64 {
        let scale = self.scale();
        (f64::from(r.cores) / scale[0])
            .max(r.memory_mb as f64 / scale[1])
            .max(r.disk_mb as f64 / scale[2])
    }

    pub(super) fn scale(&self) -> [f64; 3] {
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

    pub(super) fn sort_buckets(&mut self) {
        self.buckets.sort_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then_with(|| a.allocation.cmp(&b.allocation))
        });
        self.start = self.best_start(&self.buckets).0;
    }

    /// k-means for k = 1, 2, ... while a larger k may still lower the
    /// modelled cost (see [`K_PATIENCE`]); keeps the cheapest bucket set.
    pub(super) fn cluster(&mut self) {
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
        let mut best_k = 1;
        for k in 1..=kmax {
            // k is the data's choice, not a cap's: the search goes on while
            // some k in the last few lowered the modelled cost. k-means is
            // not monotone in k, so one worse k does not end it.
            if k > best_k + K_PATIENCE {
                break;
            }
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
                best_k = k;
            }
        }
        if let Some((_, buckets, start)) = best {
            let same = buckets.len() == self.buckets.len()
                && buckets
                    .iter()
                    .zip(&self.buckets)
                    .all(|(a, b)| close(&a.allocation, &b.allocation));
            self.stable_clusterings = if same {
                self.stable_clusterings.saturating_add(1)
            } else {
                0
            };
            self.buckets = buckets;
            self.start = start;
        }
    }

    pub(super) fn buckets_from(
        &self,
        samples: &[Sample],
        labels: &[usize],
        k: usize,
    ) -> Vec<Bucket> {
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

    /// The start bucket with the lowest expected cost per task, and that
    /// cost. See the module documentation for the model.
    pub(super) fn best_start(&self, buckets: &[Bucket]) -> (usize, f64) {
        if buckets.is_empty() {
            return (0, f64::INFINITY);
        }
        let ladder = self.ladder_of(buckets.iter().map(|b| &b.allocation));
        let mut best = (0, f64::INFINITY);
        for start in 0..buckets.len() {
            let cost = self.ladder_cost(&ladder[start..], self.window.iter());
            if cost < best.1 {
                best = (start, cost);
            }
        }
        (best.0, best.1 / self.window.len().max(1) as f64)
    }

    /// `allocations` with their use of the largest worker, per resource
    /// (see [`use_of`](Self::use_of)), for [`ladder_cost`](Self::ladder_cost).
    pub(super) fn ladder_of<'a>(
        &self,
        allocations: impl Iterator<Item = &'a Resources>,
    ) -> Vec<(Resources, [f64; 3])> {
        allocations.map(|a| (*a, self.use_of(a))).collect()
    }

    /// The cost model (module documentation) of starting `samples` on
    /// `ladder`, smallest first: per resource, the worker-time the attempts
    /// hold (one that does not fit holds its rung for `f * t` and goes on
    /// to the next, past the last the task takes the top rung), and of
    /// those totals the largest, the resource that runs out first. Bucket
    /// choice and the retry ladder both use it, so a retry goes where a
    /// first attempt of a task that big would be sent.
    pub(super) fn ladder_cost<'a>(
        &self,
        ladder: &[(Resources, [f64; 3])],
        samples: impl Iterator<Item = &'a Sample>,
    ) -> f64 {
        let f = self.kill_fraction();
        let top = match self.max_allocation(&self.largest) {
            Some(max) => self.use_of(&max),
            None => [1.0; 3],
        };
        let mut total = [0.0; 3];
        let mut add = |u: &[f64; 3], t: f64| {
            for (a, x) in total.iter_mut().zip(u) {
                *a += x * t;
            }
        };
        for s in samples {
            let t = s.wall_s.max(1e-3);
            let mut placed = false;
            for (a, u) in ladder {
                if self.fits(a, s) {
                    add(u, t);
                    placed = true;
                    break;
                }
                add(u, f * t);
            }
            if !placed {
                add(&top, t);
            }
        }
        total.iter().copied().fold(0.0, f64::max)
    }
}

impl CategoryState {
    /// True when the cost model counts a task with peak `s` as fitting
    /// allocation `a`: its peak plus the category's margin, the room every
    /// bucket is given for members not yet seen (never more than the cap).
    /// Counting the bare peak let a bucket cut from the lower part of a mode
    /// "cover" the whole mode with its margin, so splitting any mode looked
    /// cheaper in the model and k grew past the number of modes (4 buckets
    /// for 3 modes, 5 for 2); out of sample those extra buckets are kills.
    pub(super) fn fits(&self, a: &Resources, s: &Sample) -> bool {
        let m = 1.0 + self.config.margin;
        let cap = self.cap(&self.largest);
        let ok = |limit: u64, cap: u64, used: f64| {
            limit == 0 || (used * m).min(cap as f64).max(used) <= limit as f64 + 1e-3
        };
        ok(a.memory_mb, cap.memory_mb, s.memory_mb) && ok(a.disk_mb, cap.disk_mb, s.disk_mb)
    }

    /// `r` as fractions of the largest worker, per resource (cores, memory,
    /// disk; see [`scale`](Self::scale)).
    pub(super) fn use_of(&self, r: &Resources) -> [f64; 3] {
        let scale = self.scale();
        [
            f64::from(r.cores) / scale[0],
            r.memory_mb as f64 / scale[1],
            r.disk_mb as f64 / scale[2],
        ]
    }
}

/// Distinct (cores, memory, disk) points, counting up to `limit`: k-means
/// cannot make more clusters than that.
pub(super) fn count_distinct(samples: &[Sample], limit: usize) -> usize {
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

/// Two allocations that differ by less than [`STABLE_WITHIN`] in every
/// resource.
fn close(a: &Resources, b: &Resources) -> bool {
    let near = |x: u64, y: u64| {
        let (x, y) = (x as f64, y as f64);
        (x - y).abs() <= STABLE_WITHIN * x.max(y)
    };
    near(a.cores.into(), b.cores.into())
        && near(a.memory_mb, b.memory_mb)
        && near(a.disk_mb, b.disk_mb)
        && a.gpus == b.gpus
}
