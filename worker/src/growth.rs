//! Growth in place on the worker, in one place: a learned task that goes
//! over its memory allocation is frozen by the monitor, which calls the hook
//! made here ([`ask_hook`]) to ask the master for more (`WorkerMsg::Grow`);
//! the master's answer (`MasterMsg::Grow`) is checked against what this
//! worker has free ([`grant`]) and handed to the task's monitor
//! ([`answer`]): thawed with a bigger limit, or killed as over its limit.
//! The master's side is `master/src/engine/growth.rs`.

use drover_monitor::MemoryLimitHook;
use drover_protocol::{Resources, RunTask, WorkerMsg};
use tokio::sync::mpsc;

use crate::exec::Running;
use crate::transfer::Outgoing;

/// What a task's monitor calls when the task goes over its memory limit:
/// a request to the master to grow it. `None` for a task that may not grow
/// (not growable, or no memory limit to grow).
pub(crate) fn ask_hook(
    task: &RunTask,
    has_memory_limit: bool,
    to_master: &mpsc::UnboundedSender<Outgoing>,
) -> Option<MemoryLimitHook> {
    if !task.growable || !has_memory_limit {
        return None;
    }
    let (to_master, task_id, attempt) = (to_master.clone(), task.task_id, task.attempt);
    Some(Box::new(move |hit| {
        let _ = to_master.send(Outgoing::Msg(WorkerMsg::Grow {
            task_id,
            attempt,
            limit_mb: hit.limit,
            used_mb: hit.value,
        }));
    }))
}

/// The allocation a task may grow to, given the master's answer (`None`:
/// refused) and what this worker has free. The master's books match ours,
/// but a worker never overcommits on anyone's word: the new allocation must
/// hold the old one, keep its gpus, and its extra must fit in `free`.
pub(crate) fn grant(
    current: &Resources,
    answer: Option<Resources>,
    free: &Resources,
) -> Option<Resources> {
    answer.filter(|new| {
        let extra = new.saturating_sub(current);
        current.fits_in(new) && new.gpus == current.gpus && extra.fits_in(free)
    })
}

/// Hands the decision to the frozen task's monitor.
pub(crate) fn answer(child: &Running, granted: Option<Resources>) {
    match granted {
        Some(allocation) => child.grow_memory(allocation.memory_mb),
        None => child.refuse_growth(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cores: u32, memory_mb: u64, gpus: u32) -> Resources {
        Resources {
            cores,
            memory_mb,
            disk_mb: 0,
            gpus,
        }
    }

    #[test]
    fn a_grant_must_hold_the_old_allocation_and_fit_what_is_free() {
        let now = r(1, 1000, 0);
        let free = r(1, 500, 0);
        assert_eq!(grant(&now, Some(r(1, 1400, 0)), &free), Some(r(1, 1400, 0)));
        assert_eq!(
            grant(&now, Some(r(1, 1600, 0)), &free),
            None,
            "over what is free"
        );
        assert_eq!(
            grant(&now, Some(r(1, 800, 0)), &free),
            None,
            "smaller than it holds"
        );
        assert_eq!(
            grant(&now, Some(r(1, 1200, 1)), &free),
            None,
            "gpus never change"
        );
        assert_eq!(grant(&now, None, &free), None, "the master refused");
    }
}
