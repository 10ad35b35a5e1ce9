//! How many workers of a size a set of waiting tasks can use. The master's
//! scheduler answers it for its own queue and a factory for the counts in a
//! status report, so both count the same way: the waiting requests packed
//! first-fit-decreasing into bins of the worker's size.

use crate::Resources;

/// What a task asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Exactly these resources.
    Fixed(Resources),
    /// A whole worker: placed only on a worker with nothing running;
    /// allocated that worker's total resources.
    WholeWorker,
}

/// How many workers of size `worker` (at most `limit`) a demand known as
/// counts per request could keep busy, such as the waiting shapes in a
/// master's status report or its own queue: how many
/// workers of size `worker` (at most `limit`) the tasks could keep busy,
/// packed first-fit-decreasing exactly as the master's own queue would be.
/// A factory uses it so that a 4-core task is not counted as four 1-core ones.
pub fn workers_needed_for(
    shapes: impl IntoIterator<Item = (Request, usize)>,
    worker: Resources,
    limit: usize,
) -> usize {
    let mut bins: usize = 0;
    let mut fixed: Vec<(Resources, usize)> = Vec::new();
    for (request, count) in shapes {
        if count == 0 {
            continue;
        }
        match request {
            Request::WholeWorker => bins = bins.saturating_add(count),
            Request::Fixed(r) if r.fits_in(&worker) => fixed.push((r, count)),
            Request::Fixed(_) => {}
        }
    }
    if bins >= limit {
        return limit;
    }
    fixed.sort_by(|a, b| {
        size_in(&b.0, &worker)
            .total_cmp(&size_in(&a.0, &worker))
            .then_with(|| b.0.cmp(&a.0))
    });
    // Runs of identical bins, in first-fit order: (room left, how many).
    let mut runs: Vec<(Resources, usize)> = Vec::new();
    for (request, count) in fixed {
        if request.is_zero() {
            // Takes no room, but something has to run it.
            if bins == 0 {
                bins = 1;
                runs.push((worker, 1));
            }
            continue;
        }
        let mut left = count;
        let mut i = 0;
        while left > 0 && i < runs.len() {
            let (room, n) = runs[i];
            let k = fit_count(&request, &room);
            if k == 0 {
                i += 1;
                continue;
            }
            let after = room.saturating_sub(&scale(&request, k));
            if left >= k.saturating_mul(n) {
                runs[i].0 = after;
                left -= k * n;
                i += 1;
                continue;
            }
            // The run splits: `full` bins take k each, one bin takes
            // the rest, and the remaining bins are untouched.
            let full = left / k;
            let part = left % k;
            let mut split = Vec::with_capacity(3);
            if full > 0 {
                split.push((after, full));
            }
            let mut untouched = n - full;
            if part > 0 {
                split.push((room.saturating_sub(&scale(&request, part)), 1));
                untouched -= 1;
            }
            if untouched > 0 {
                split.push((room, untouched));
            }
            runs.splice(i..=i, split);
            left = 0;
        }
        if left == 0 {
            continue;
        }
        let per_bin = fit_count(&request, &worker);
        let new_bins = left.div_ceil(per_bin);
        bins = bins.saturating_add(new_bins);
        if bins >= limit {
            return limit;
        }
        let full = left / per_bin;
        let part = left % per_bin;
        if full > 0 {
            runs.push((worker.saturating_sub(&scale(&request, per_bin)), full));
        }
        if part > 0 {
            runs.push((worker.saturating_sub(&scale(&request, part)), 1));
        }
    }
    bins.min(limit)
}

/// How many copies of `r` fit in `room` (`usize::MAX` if `r` is zero).
fn fit_count(r: &Resources, room: &Resources) -> usize {
    fn dim(need: u64, have: u64) -> u64 {
        // Needing none of a resource never limits the count.
        have.checked_div(need).unwrap_or(u64::MAX)
    }
    let n = dim(r.cores.into(), room.cores.into())
        .min(dim(r.memory_mb, room.memory_mb))
        .min(dim(r.disk_mb, room.disk_mb))
        .min(dim(r.gpus.into(), room.gpus.into()));
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `k` copies of `r`; only called with `k` no larger than what fits in some
/// bin, so it cannot overflow in practice, and saturates if it would.
fn scale(r: &Resources, k: usize) -> Resources {
    let k64 = u64::try_from(k).unwrap_or(u64::MAX);
    let k32 = u32::try_from(k).unwrap_or(u32::MAX);
    Resources {
        cores: r.cores.saturating_mul(k32),
        memory_mb: r.memory_mb.saturating_mul(k64),
        disk_mb: r.disk_mb.saturating_mul(k64),
        gpus: r.gpus.saturating_mul(k32),
    }
}

/// The share of a bin `r` takes in its most constrained dimension: the
/// "decreasing" in first-fit-decreasing for several dimensions at once.
fn size_in(r: &Resources, bin: &Resources) -> f64 {
    fn share(need: u64, have: u64) -> f64 {
        if need == 0 || have == 0 {
            0.0
        } else {
            need as f64 / have as f64
        }
    }
    share(r.cores.into(), bin.cores.into())
        .max(share(r.memory_mb, bin.memory_mb))
        .max(share(r.disk_mb, bin.disk_mb))
        .max(share(r.gpus.into(), bin.gpus.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(cores: u32) -> Resources {
        Resources {
            cores,
            ..Default::default()
        }
    }

    fn fixed(n: u32) -> Request {
        Request::Fixed(cores(n))
    }

    #[test]
    fn counts_pack_first_fit_decreasing() {
        let eight = cores(8);
        // Ten 4-core tasks need five 8-core workers, not ten (nor forty).
        assert_eq!(workers_needed_for([(fixed(4), 10)], eight, 100), 5);
        assert_eq!(workers_needed_for([(fixed(4), 10)], cores(1), 100), 0);
        assert_eq!(workers_needed_for([(fixed(1), 40)], cores(1), 2), 2);
        // 5+2 share a bin: six 5-core tasks take six bins, the 2s fill them.
        assert_eq!(
            workers_needed_for([(fixed(5), 6), (fixed(2), 5)], eight, 100),
            6
        );
        assert_eq!(
            workers_needed_for([(Request::WholeWorker, 3)], eight, 100),
            3
        );
        assert_eq!(workers_needed_for([(Request::WholeWorker, 3)], eight, 2), 2);
        // Tasks that need nothing still need one worker to run them.
        assert_eq!(workers_needed_for([(fixed(0), 4)], eight, 100), 1);
    }
}
