//! The engine's table of categories: which tasks learn their allocation,
//! and what request each scheduler class should have as its category
//! learns. It never touches the scheduler: every change comes back as
//! [`ClassRequest`]s, which the engine applies. The learning itself is in
//! the sibling modules.
//!
//! A task killed for going over its allocation waits for its next rung. The
//! rung is re-decided from the kill (what the task held, what it was seen
//! using) whenever its category learns something, not fixed at the kill:
//! a task killed early in a workflow may wait long, and the buckets known at
//! its kill may by then be known to be too small for tasks like it.

// Keys are the master's own ids and its user's category names: SipHash's
// defence against chosen keys buys nothing (see scheduler.rs).
use rustc_hash::FxHashMap as HashMap;

use drover_protocol::Measured;
use drover_protocol::Resources;

use super::{
    AllocationMode, CategoryConfig, CategoryState, CategoryStats, Dim, RetryCause, Sample,
};
use crate::scheduler::{ClassKey, Request};
use crate::task::TaskId;

/// How many waiting retried tasks are re-decided per change of a
/// category's buckets (see [`Categories::retargets`]).
pub(crate) const RETARGET_LIMIT: usize = 256;

/// Index of a category in [`Categories`].
pub(crate) type CatId = u32;

/// How a task's allocation is decided, fixed at submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sizing {
    /// A request that never changes (declared, or a fixed-mode category).
    Plain(Request),
    /// Learned by its category: the task waits in the scheduler class of
    /// (category, declared resources).
    Learned { cat: CatId, class: ClassKey },
}

/// Upper bound on retries for resource exhaustion, whatever the ladder
/// says: a category whose buckets keep moving cannot bounce a task forever.
pub(crate) const MAX_RESOURCE_RETRIES: u32 = 16;

struct Class {
    key: ClassKey,
    declared: Resources,
}

/// What a scheduler class should ask for now: a first attempt's request,
/// and the memory its placements should hold on their worker for growth
/// (see [`CategoryState::growth_reserve`]). The engine charges the
/// scheduler both (see `engine::growth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassRequest {
    pub class: ClassKey,
    pub request: Request,
    pub reserve_mb: u64,
}

/// A learned task's last kill for going over its allocation: enough to
/// decide its next rung again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kill {
    pub class: ClassKey,
    /// The allocation it was killed in.
    pub failed: Resources,
    /// That allocation was a whole worker.
    pub was_whole: bool,
    pub dim: Dim,
    /// What the monitor saw it using in `dim` when it was killed.
    pub seen: f64,
}

#[derive(Default)]
pub(crate) struct Categories {
    ids: HashMap<String, CatId>,
    states: Vec<CategoryState>,
    classes: Vec<Vec<Class>>,
    /// Per category, tasks retried after a kill that may still be waiting
    /// (the engine drops the ones that are not when it re-targets).
    retrying: Vec<HashMap<TaskId, Kill>>,
    class_ids: HashMap<(CatId, Resources), ClassKey>,
    next_class: ClassKey,
    /// Component-wise largest connected worker.
    largest: Resources,
}

impl Categories {
    fn id(&mut self, name: &str) -> CatId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.states.len() as CatId;
        self.states
            .push(CategoryState::new(name, CategoryConfig::default()));
        self.classes.push(Vec::new());
        self.retrying.push(HashMap::default());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Sets a category's config (validated by the caller) and re-targets
    /// its waiting tasks.
    pub(crate) fn configure(&mut self, name: &str, config: CategoryConfig) -> Vec<ClassRequest> {
        let id = self.id(name);
        self.states[id as usize].set_config(config);
        self.refresh(id)
    }

    /// How a newly submitted task of `category` declaring `declared` is sized.
    pub(crate) fn sizing(&mut self, category: &str, declared: &Resources) -> Sizing {
        let cat = self.id(category);
        let state = &self.states[cat as usize];
        let covers_all = declared.cores != 0 && declared.memory_mb != 0 && declared.disk_mb != 0;
        // What a task declares is its own (never raised, never lowered);
        // what it leaves undeclared comes from its category's learning, in
        // every category. A task saying only `cores(1)` otherwise ran with
        // no memory booked and no limit, and a dozen of them on one worker
        // were OOM-killed by the kernel instead of being sized.
        let learn = state.learns() && !covers_all;
        if !learn {
            if declared.is_zero() && state.config().mode == AllocationMode::Fixed {
                return Sizing::Plain(state.first(declared, &self.largest));
            }
            return Sizing::Plain(plain_request(declared));
        }
        let class = match self.class_ids.get(&(cat, *declared)) {
            Some(&k) => k,
            None => {
                let k = self.next_class;
                self.next_class += 1;
                self.class_ids.insert((cat, *declared), k);
                self.classes[cat as usize].push(Class {
                    key: k,
                    declared: *declared,
                });
                k
            }
        };
        Sizing::Learned { cat, class }
    }

    /// The request a class should have now. Apply it before enqueueing
    /// into a new class so the scheduler knows it.
    pub(crate) fn prime(&self, cat: CatId, class: ClassKey) -> Option<ClassRequest> {
        let state = &self.states[cat as usize];
        self.classes[cat as usize]
            .iter()
            .find(|c| c.key == class)
            .map(|c| class_request(state, c, &self.largest))
    }

    fn refresh(&self, cat: CatId) -> Vec<ClassRequest> {
        let state = &self.states[cat as usize];
        self.classes[cat as usize]
            .iter()
            .map(|c| class_request(state, c, &self.largest))
            .collect()
    }

    /// The largest worker may have changed: caps and shares follow it.
    pub(crate) fn set_largest(&mut self, largest: Resources) -> Vec<ClassRequest> {
        if largest == self.largest {
            return Vec::new();
        }
        self.largest = largest;
        (0..self.states.len() as CatId)
            .flat_map(|cat| self.refresh(cat))
            .collect()
    }

    /// An attempt of a learned task started.
    pub(crate) fn note_allocation(&mut self, cat: CatId) {
        self.states[cat as usize].note_allocation();
    }

    /// An attempt of a learned task ended with `measured` after holding
    /// `allocation`; `success` records the peak as a sample. `Some` with
    /// the category's class requests when its answers may have changed
    /// (see [`Self::retargets`]).
    pub(crate) fn attempt_ended(
        &mut self,
        cat: CatId,
        allocation: &Resources,
        measured: &Measured,
        killed: bool,
        success: bool,
    ) -> Option<Vec<ClassRequest>> {
        let sample = Sample {
            cores: measured.cores,
            memory_mb: measured.memory_mb,
            disk_mb: measured.disk_mb,
            wall_s: measured.wall_time_s,
        };
        let largest = self.largest;
        let state = &mut self.states[cat as usize];
        state.record_attempt(allocation, &sample, killed);
        (success && state.record(sample, &largest)).then(|| self.refresh(cat))
    }

    /// `task` was killed as `kill` says and waits for its next rung.
    pub(crate) fn note_retrying(&mut self, cat: CatId, task: TaskId, kill: Kill) {
        self.retrying[cat as usize].insert(task, kill);
    }

    /// `task` no longer waits for a rung (placed, finished or cancelled).
    pub(crate) fn forget_retrying(&mut self, cat: CatId, task: TaskId) {
        let retrying = &mut self.retrying[cat as usize];
        // Almost always empty: skip the hashing once per task.
        if !retrying.is_empty() {
            retrying.remove(&task);
        }
    }

    /// The rung each task retried in `cat` would get now, by task id;
    /// `None` where the ladder now says the task should fail (the engine
    /// then keeps its current rung: a task is never failed while waiting).
    ///
    /// At most [`RETARGET_LIMIT`] tasks, the oldest first: a rung costs up to
    /// O(buckets² × window) to decide, and this runs on the engine's thread
    /// whenever the category's buckets change.
    pub(crate) fn retargets(&self, cat: CatId) -> Vec<(TaskId, Option<Request>)> {
        let retrying = &self.retrying[cat as usize];
        let mut ids: Vec<TaskId> = retrying.keys().copied().collect();
        ids.sort_unstable();
        ids.truncate(RETARGET_LIMIT);
        ids.into_iter()
            .filter_map(|task| {
                let k = retrying.get(&task)?;
                let next = self.retry(cat, k.class, &k.failed, k.was_whole, k.dim, k.seen);
                Some((task, next))
            })
            .collect()
    }

    /// The next rung for a task killed for exceeding `resource`.
    pub(crate) fn retry(
        &self,
        cat: CatId,
        class: ClassKey,
        failed: &Resources,
        was_whole: bool,
        dim: Dim,
        seen: f64,
    ) -> Option<Request> {
        let declared = self.declared(cat, class);
        self.states[cat as usize].retry_seen(failed, was_whole, dim, seen, &declared, &self.largest)
    }

    fn declared(&self, cat: CatId, class: ClassKey) -> Resources {
        self.classes[cat as usize]
            .iter()
            .find(|c| c.key == class)
            .map(|c| c.declared)
            .unwrap_or_default()
    }

    pub(crate) fn note_retry(&mut self, cat: CatId, cause: RetryCause) {
        self.states[cat as usize].note_retry(cause);
    }

    /// What a task of `class` running with `failed` grows to, in place,
    /// once seen using `seen` MB (see [`CategoryState::grow_seen`]).
    pub(crate) fn grow(
        &self,
        cat: CatId,
        class: ClassKey,
        failed: &Resources,
        seen: f64,
    ) -> Option<Request> {
        let declared = self.declared(cat, class);
        self.states[cat as usize].grow_seen(failed, seen, &declared, &self.largest)
    }

    /// Whether `cat`'s tasks may grow in place over their memory allocation.
    pub(crate) fn grows(&self, cat: CatId) -> bool {
        self.states[cat as usize].config().grow_in_place
    }

    /// A task of `cat` placed with a growth reserve first asked to grow
    /// after running `ran`.
    pub(crate) fn note_growth_age(&mut self, cat: CatId, ran: std::time::Duration) {
        self.states[cat as usize].note_growth_age(ran.as_secs_f64());
    }

    /// How long a task of `cat` that has not asked to grow keeps its
    /// growth reserve; `None`: to its end.
    pub(crate) fn reserve_hold(&self, cat: CatId) -> Option<std::time::Duration> {
        self.states[cat as usize]
            .reserve_hold_s()
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
    }

    pub(crate) fn note_grown(&mut self, cat: CatId) {
        self.states[cat as usize].note_grown();
    }

    pub(crate) fn note_exhausted(&mut self, cat: CatId) {
        self.states[cat as usize].note_exhausted();
    }

    /// Statistics of one category, if it exists.
    pub(crate) fn stats(&self, name: &str) -> Option<CategoryStats> {
        let &id = self.ids.get(name)?;
        Some(self.states[id as usize].stats(&self.largest))
    }

    /// Statistics of every category, by name.
    pub(crate) fn all_stats(&self) -> Vec<CategoryStats> {
        let mut v: Vec<_> = self.states.iter().map(|s| s.stats(&self.largest)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// `class`'s request now: its first allocation, and the room its tasks'
/// growth is expected to need.
fn class_request(state: &CategoryState, class: &Class, largest: &Resources) -> ClassRequest {
    let request = state.first(&class.declared, largest);
    let reserve_mb = match request {
        Request::Fixed(r) if r.memory_mb > 0 => state.growth_reserve(&r, &class.declared, largest),
        _ => 0,
    };
    ClassRequest {
        class: class.key,
        request,
        reserve_mb,
    }
}

/// A task that declares nothing and is not learned gets one core.
pub(crate) fn plain_request(resources: &Resources) -> Request {
    if resources.is_zero() {
        Request::Fixed(Resources {
            cores: 1,
            ..Default::default()
        })
    } else {
        Request::Fixed(*resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(memory_mb: f64) -> Measured {
        Measured {
            wall_time_s: 2.0,
            memory_mb,
            cores: 1.0,
            ..Default::default()
        }
    }

    fn fixed(r: Option<Request>) -> Resources {
        match r {
            Some(Request::Fixed(r)) => r,
            other => panic!("expected a fixed rung, got {other:?}"),
        }
    }

    #[test]
    fn a_waiting_retry_takes_the_rung_the_category_chooses_now() {
        let mut cats = Categories::default();
        let worker = Resources {
            cores: 12,
            memory_mb: 12_000,
            disk_mb: 0,
            gpus: 0,
        };
        cats.set_largest(worker);
        let Sizing::Learned { cat, class } = cats.sizing("w", &Resources::default()) else {
            panic!("a task declaring nothing learns");
        };
        let small = Resources {
            cores: 1,
            memory_mb: 500,
            ..Default::default()
        };
        for i in 0..20 {
            cats.attempt_ended(cat, &small, &measured(400.0 + i as f64), false, true);
        }
        let buckets = cats.states[cat as usize].bucket_allocations();
        let start = buckets[0];
        // Killed in the small bucket, seen at 900 MB: nothing is known
        // above, so the ladder doubles past what was seen.
        let kill = Kill {
            class,
            failed: start,
            was_whole: false,
            dim: Dim::Memory,
            seen: 900.0,
        };
        let first = fixed(cats.retry(cat, class, &start, false, Dim::Memory, 900.0));
        cats.note_retrying(cat, 7, kill);
        assert_eq!(cats.retargets(cat), vec![(7, Some(Request::Fixed(first)))]);
        // While it waits, big tasks succeed: the category now knows them,
        // and the waiting task is re-targeted to the bucket that holds them.
        let mut changed = false;
        for i in 0..6 {
            changed |= cats
                .attempt_ended(
                    cat,
                    &worker,
                    &measured(3000.0 + 100.0 * i as f64),
                    false,
                    true,
                )
                .is_some();
        }
        assert!(changed);
        let now = cats.retargets(cat);
        let rung = fixed(now[0].1);
        assert!(
            rung.memory_mb >= 3500 && rung.memory_mb > first.memory_mb,
            "{rung:?} from {first:?}, buckets {:?}",
            cats.states[cat as usize].bucket_allocations()
        );
        // Placed, finished or cancelled: forgotten.
        cats.forget_retrying(cat, 7);
        assert!(cats.retargets(cat).is_empty());
    }
}
