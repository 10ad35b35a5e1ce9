//! The factory's decision, as pure code: from what the master needs and what
//! the batch system holds, how many jobs to submit or cancel.
//!
//! The master's queue only holds tasks that fit on no connected worker, so
//! its waiting tasks are exactly what new workers would take. How many
//! workers of the factory's size they can keep busy is answered by the
//! master's own packing ([`workers_needed_for`]); the factory then counts
//! the workers that are already on their way: jobs still pending in the
//! batch system, and jobs that started running so recently that their worker
//! may not have connected yet ("arriving"). Jobs running for longer are
//! taken to be connected workers, busy with the tasks that are not waiting.

use drover_catalog::report::ShapeCount;
use drover_catalog::MasterReport;
use drover_protocol::packing::{workers_needed_for, Request};
use drover_protocol::Resources;

/// The bounds a factory keeps its jobs within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs kept even with no demand.
    pub min_workers: usize,
    /// Jobs never exceeded, pending and running together.
    pub max_workers: usize,
    /// Most jobs waiting in the batch queue at once: a cluster that cannot
    /// start more workers now gets no more requests than this.
    pub max_pending: usize,
    /// What each worker offers the master.
    pub worker: Resources,
}

/// The factory's own jobs, as the batch system last listed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Queued, not started.
    pub pending: usize,
    /// Started (includes `arriving`).
    pub running: usize,
    /// Started so recently that their worker may not be connected yet.
    pub arriving: usize,
}

/// What to do this round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Workers the waiting tasks could use on top of the connected ones.
    pub needed: usize,
    /// How many jobs the factory wants in total (pending and running).
    pub target: usize,
    /// Jobs to submit now.
    pub submit: usize,
    /// Pending jobs to cancel now.
    pub cancel: usize,
}

/// The waiting tasks of `report` as requests for the packing. A report from
/// a master that sends no shapes but has waiting tasks is read as that many
/// one-core tasks: the master's own default for a task that declares nothing.
pub fn waiting_requests(report: &MasterReport) -> Vec<(Request, usize)> {
    // Tasks sent ahead wait on a worker that will run them: no demand.
    let in_queue = report
        .tasks_waiting
        .saturating_sub(report.tasks_queued_on_workers);
    if report.waiting_shapes.is_empty() && in_queue > 0 {
        let one_core = Resources {
            cores: 1,
            ..Default::default()
        };
        return vec![(Request::Fixed(one_core), to_usize(in_queue))];
    }
    report.waiting_shapes.iter().map(request_of).collect()
}

fn request_of(s: &ShapeCount) -> (Request, usize) {
    let request = if s.whole_worker {
        Request::WholeWorker
    } else {
        Request::Fixed(Resources {
            cores: u32::try_from(s.cores).unwrap_or(u32::MAX),
            memory_mb: s.memory_mb,
            disk_mb: s.disk_mb,
            gpus: u32::try_from(s.gpus).unwrap_or(u32::MAX),
        })
    };
    (request, to_usize(s.count))
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Waiting tasks that no worker of size `worker` could ever run: the factory
/// says so instead of submitting workers they cannot use.
pub fn unfit_tasks(requests: &[(Request, usize)], worker: &Resources) -> usize {
    requests
        .iter()
        .filter(|(r, _)| matches!(r, Request::Fixed(r) if !r.fits_in(worker)))
        .map(|(_, n)| *n)
        .sum()
}

/// Decides one round. `report` is `None` when the master could not be
/// reached or found: nothing is needed then beyond the minimum.
pub fn decide(limits: &Limits, report: Option<&MasterReport>, jobs: JobCounts) -> Decision {
    let max = limits.max_workers;
    let min = limits.min_workers.min(max);
    let needed = match report {
        Some(r) if !r.stopped => workers_needed_for(waiting_requests(r), limits.worker, max),
        _ => 0,
    };
    let arriving = jobs.arriving.min(jobs.running);
    let active = jobs.running - arriving;
    let target = active.saturating_add(needed).clamp(min, max);
    let have = jobs.pending.saturating_add(jobs.running);
    let room = limits.max_pending.saturating_sub(jobs.pending);
    Decision {
        needed,
        target,
        submit: target.saturating_sub(have).min(room),
        // Only pending jobs are cancelled: a started worker may already hold
        // tasks, and it leaves by itself once idle.
        cancel: have.saturating_sub(target).min(jobs.pending),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(min: usize, max: usize, cores: u32) -> Limits {
        Limits {
            min_workers: min,
            max_workers: max,
            max_pending: usize::MAX,
            worker: Resources {
                cores,
                memory_mb: 4000,
                disk_mb: 1000,
                gpus: 0,
            },
        }
    }

    fn report(shapes: &[(u64, u64, u64)]) -> MasterReport {
        let mut r = MasterReport::new_master("p", "h", 1);
        for &(cores, memory_mb, count) in shapes {
            r.waiting_shapes.push(ShapeCount {
                cores,
                memory_mb,
                count,
                ..Default::default()
            });
            r.tasks_waiting += count;
        }
        r
    }

    fn jobs(pending: usize, running: usize, arriving: usize) -> JobCounts {
        JobCounts {
            pending,
            running,
            arriving,
        }
    }

    #[test]
    fn a_burst_fills_up_to_max_and_no_further() {
        let l = limits(0, 2, 1);
        let r = report(&[(1, 100, 40)]);
        let d = decide(&l, Some(&r), jobs(0, 0, 0));
        assert_eq!((d.needed, d.target, d.submit, d.cancel), (2, 2, 2, 0));
        // Submitted and still pending: nothing more.
        assert_eq!(decide(&l, Some(&r), jobs(2, 0, 0)).submit, 0);
        // Running and connected, the queue still full: at max already.
        assert_eq!(decide(&l, Some(&r), jobs(0, 2, 0)).submit, 0);
    }

    #[test]
    fn multi_core_tasks_are_packed_not_counted_per_core() {
        let l = limits(0, 100, 8);
        // Ten 4-core tasks: five 8-core workers, not ten or forty.
        let d = decide(&l, Some(&report(&[(4, 1000, 10)])), jobs(0, 0, 0));
        assert_eq!(d.submit, 5);
        // Two running workers are busy with other tasks; these still need 5.
        let d = decide(&l, Some(&report(&[(4, 1000, 10)])), jobs(1, 2, 0));
        assert_eq!((d.target, d.submit), (7, 4));
    }

    #[test]
    fn arriving_workers_count_as_on_their_way() {
        let l = limits(0, 10, 1);
        let r = report(&[(1, 0, 3)]);
        // Three jobs just started; their workers have not taken the tasks yet.
        let d = decide(&l, Some(&r), jobs(0, 3, 3));
        assert_eq!((d.target, d.submit), (3, 0));
        // Once connected they are busy with other tasks and these 3 still wait.
        assert_eq!(decide(&l, Some(&r), jobs(0, 3, 0)).submit, 3);
    }

    #[test]
    fn falling_demand_cancels_pending_jobs_only_down_to_min() {
        let l = limits(1, 10, 1);
        let empty = report(&[]);
        let d = decide(&l, Some(&empty), jobs(4, 2, 0));
        assert_eq!((d.target, d.submit, d.cancel), (2, 0, 4));
        let d = decide(&l, Some(&empty), jobs(4, 0, 0));
        assert_eq!((d.target, d.cancel), (1, 3));
        // Running jobs are never cancelled, even above the target.
        let d = decide(&limits(0, 1, 1), Some(&empty), jobs(0, 3, 3));
        assert_eq!((d.submit, d.cancel), (0, 0));
    }

    #[test]
    fn min_is_kept_without_a_master_and_min_over_max_is_max() {
        let l = limits(2, 5, 1);
        assert_eq!(decide(&l, None, jobs(0, 0, 0)).submit, 2);
        let mut stopped = report(&[(1, 0, 50)]);
        stopped.stopped = true;
        assert_eq!(decide(&l, Some(&stopped), jobs(0, 0, 0)).submit, 2);
        assert_eq!(decide(&limits(9, 3, 1), None, jobs(0, 0, 0)).submit, 3);
    }

    #[test]
    fn max_pending_caps_what_waits_in_the_queue() {
        let l = Limits {
            max_pending: 2,
            ..limits(0, 10, 1)
        };
        let r = report(&[(1, 0, 50)]);
        let d = decide(&l, Some(&r), jobs(0, 0, 0));
        assert_eq!((d.target, d.submit), (10, 2));
        assert_eq!(decide(&l, Some(&r), jobs(2, 3, 0)).submit, 0);
        assert_eq!(decide(&l, Some(&r), jobs(1, 3, 0)).submit, 1);
    }

    #[test]
    fn tasks_too_big_for_the_worker_ask_for_nothing() {
        let l = limits(0, 10, 2);
        let r = report(&[(4, 0, 5), (1, 100_000, 2)]);
        let d = decide(&l, Some(&r), jobs(0, 0, 0));
        assert_eq!(d.submit, 0);
        assert_eq!(unfit_tasks(&waiting_requests(&r), &l.worker), 7);
    }

    #[test]
    fn whole_worker_and_shapeless_reports() {
        let l = limits(0, 10, 4);
        let mut r = report(&[]);
        r.waiting_shapes.push(ShapeCount {
            whole_worker: true,
            count: 3,
            ..Default::default()
        });
        assert_eq!(decide(&l, Some(&r), jobs(0, 0, 0)).submit, 3);
        // An older master without shapes: its waiting tasks as 1-core ones.
        let mut old = report(&[]);
        old.tasks_waiting = 9;
        assert_eq!(decide(&l, Some(&old), jobs(0, 0, 0)).submit, 3);
    }

    #[test]
    fn tasks_sent_ahead_are_no_demand() {
        let r = MasterReport {
            tasks_waiting: 4,
            tasks_queued_on_workers: 4,
            ..Default::default()
        };
        assert!(
            waiting_requests(&r).is_empty(),
            "they wait on workers already"
        );
        let r = MasterReport {
            tasks_waiting: 6,
            tasks_queued_on_workers: 4,
            ..Default::default()
        };
        assert_eq!(waiting_requests(&r).len(), 1);
        assert_eq!(waiting_requests(&r)[0].1, 2);
    }
}
