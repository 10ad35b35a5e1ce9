//! The engine's side of categories: which tasks learn their allocation,
//! and keeping the scheduler's class requests in step with what each
//! category has learned. The learning itself is in [`crate::alloc`].

use std::collections::HashMap;

use drover_worker::protocol::Measured;
use drover_worker::Resources;

use crate::alloc::{
    AllocationMode, CategoryConfig, CategoryState, CategoryStats, Dim, RetryCause, Sample,
};
use crate::scheduler::{ClassKey, Request, Scheduler};

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

#[derive(Default)]
pub(crate) struct Categories {
    ids: HashMap<String, CatId>,
    states: Vec<CategoryState>,
    /// Set by the user (as opposed to created on first use with defaults).
    configured: Vec<bool>,
    classes: Vec<Vec<Class>>,
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
        self.configured.push(false);
        self.classes.push(Vec::new());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Sets a category's config (validated by the caller) and re-targets
    /// its waiting tasks.
    pub(crate) fn configure(&mut self, name: &str, config: CategoryConfig, sched: &mut Scheduler) {
        let id = self.id(name);
        self.configured[id as usize] = true;
        self.states[id as usize].set_config(config);
        self.refresh(id, sched);
    }

    /// How a newly submitted task of `category` declaring `declared` is sized.
    pub(crate) fn sizing(&mut self, category: &str, declared: &Resources) -> Sizing {
        let cat = self.id(category);
        let state = &self.states[cat as usize];
        let covers_all = declared.cores != 0 && declared.memory_mb != 0 && declared.disk_mb != 0;
        // An implicit category only sizes tasks that declare nothing, so
        // that a task saying `cores(1)` keeps exactly that; a category the
        // user configured also learns what a task leaves undeclared.
        let learn =
            state.learns() && !covers_all && (declared.is_zero() || self.configured[cat as usize]);
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

    /// The request a class should have now. Call before enqueueing into a
    /// new class so the scheduler knows it.
    pub(crate) fn prime(&self, cat: CatId, class: ClassKey, sched: &mut Scheduler) {
        if let Some(c) = self.classes[cat as usize].iter().find(|c| c.key == class) {
            let r = self.states[cat as usize].first(&c.declared, &self.largest);
            sched.set_class_request(class, r);
        }
    }

    fn refresh(&self, cat: CatId, sched: &mut Scheduler) {
        let state = &self.states[cat as usize];
        for c in &self.classes[cat as usize] {
            sched.set_class_request(c.key, state.first(&c.declared, &self.largest));
        }
    }

    /// The largest worker may have changed: caps and shares follow it.
    pub(crate) fn set_largest(&mut self, largest: Resources, sched: &mut Scheduler) {
        if largest == self.largest {
            return;
        }
        self.largest = largest;
        for cat in 0..self.states.len() as CatId {
            self.refresh(cat, sched);
        }
    }

    /// An attempt of a learned task started.
    pub(crate) fn note_allocation(&mut self, cat: CatId) {
        self.states[cat as usize].note_allocation();
    }

    /// An attempt of a learned task ended with `measured` after holding
    /// `allocation`; `success` records the peak as a sample.
    pub(crate) fn attempt_ended(
        &mut self,
        cat: CatId,
        allocation: &Resources,
        measured: &Measured,
        killed: bool,
        success: bool,
        sched: &mut Scheduler,
    ) {
        let sample = Sample {
            cores: measured.cores,
            memory_mb: measured.memory_mb,
            disk_mb: measured.disk_mb,
            wall_s: measured.wall_time_s,
        };
        let largest = self.largest;
        let state = &mut self.states[cat as usize];
        state.record_attempt(allocation, &sample, killed);
        if success && state.record(sample, &largest) {
            self.refresh(cat, sched);
        }
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
        let declared = self.classes[cat as usize]
            .iter()
            .find(|c| c.key == class)
            .map(|c| c.declared)
            .unwrap_or_default();
        self.states[cat as usize].retry_seen(failed, was_whole, dim, seen, &declared, &self.largest)
    }

    pub(crate) fn note_retry(&mut self, cat: CatId, cause: RetryCause) {
        self.states[cat as usize].note_retry(cause);
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
