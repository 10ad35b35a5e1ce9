//! A table of tasks by id, laid out for ids that the master hands out in
//! order: the engine's tasks and the scheduler's waiting ones.
//!
//! A hash table of a million tasks costs each lookup a probe of a random
//! group of its 16 MB of slots (a cache miss) before the entry itself;
//! at 1M tasks x 1,000 workers that probe was a quarter of the engine's
//! samples in its per-task handler. Here live ids sit in a run of slots
//! indexed by `id - base`, and since tasks are dispatched and finish
//! roughly in id order, consecutive lookups touch neighbouring slots.
//! Ids outside the run (a task left far behind while later ones finish,
//! or an id far ahead) live in a side hash map, so that the run stays at
//! most about twice the live tasks in it plus [`SLACK`]: memory is
//! O(live tasks) whatever the pattern.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::task::TaskId;

/// Empty slots the run may hold beyond as many as it has live entries.
const SLACK: usize = 4096;

/// A map from task id to `V` (see the module documentation).
#[derive(Debug)]
pub(crate) struct IdTable<V> {
    /// Id of `slots[0]`.
    base: TaskId,
    slots: VecDeque<Option<(TaskId, V)>>,
    /// Live entries in `slots`.
    in_slots: usize,
    far: FxHashMap<TaskId, V>,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable {
            base: 0,
            slots: VecDeque::new(),
            in_slots: 0,
            far: FxHashMap::default(),
        }
    }
}

impl<V> IdTable<V> {
    fn index(&self, id: TaskId) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// The entry of `id`.
    pub(crate) fn get(&self, id: &TaskId) -> Option<&V> {
        // An id inside the run may still be in the side map: it was put
        // there before the run grew past it.
        match self.index(*id).and_then(|i| self.slots[i].as_ref()) {
            Some((_, v)) => Some(v),
            None if self.far.is_empty() => None,
            None => self.far.get(id),
        }
    }

    /// The entry of `id`, to change.
    pub(crate) fn get_mut(&mut self, id: &TaskId) -> Option<&mut V> {
        match self.index(*id) {
            Some(i) if self.slots[i].is_some() => self.slots[i].as_mut().map(|(_, v)| v),
            _ => self.far.get_mut(id),
        }
    }

    /// True when `id` has an entry.
    pub(crate) fn contains_key(&self, id: &TaskId) -> bool {
        self.get(id).is_some()
    }

    /// Sets `id`'s entry; returns the one it replaces.
    pub(crate) fn insert(&mut self, id: TaskId, v: V) -> Option<V> {
        if self.slots.is_empty() && !self.far.contains_key(&id) {
            self.base = id;
        }
        if !self.far.is_empty() {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.far.entry(id) {
                return Some(e.insert(v));
            }
        }
        if let Some(i) = self.index(id) {
            let old = self.slots[i].replace((id, v)).map(|(_, old)| old);
            if old.is_none() {
                self.in_slots += 1;
            }
            return old;
        }
        let end = self.base.saturating_add(self.slots.len() as u64);
        let gap = id.checked_sub(end).and_then(|g| usize::try_from(g).ok());
        match gap {
            Some(gap) if gap <= self.in_slots + SLACK => {
                self.slots.extend(std::iter::repeat_with(|| None).take(gap));
                self.slots.push_back(Some((id, v)));
                self.in_slots += 1;
                self.compact();
                None
            }
            _ => self.far.insert(id, v),
        }
    }

    /// Takes `id`'s entry out.
    pub(crate) fn remove(&mut self, id: &TaskId) -> Option<V> {
        let Some(i) = self.index(*id).filter(|&i| self.slots[i].is_some()) else {
            return self.far.remove(id);
        };
        let (_, v) = self.slots[i].take()?;
        self.in_slots -= 1;
        self.compact();
        Some(v)
    }

    /// Drops empty slots at both ends, and moves entries left far behind
    /// to the side map while the run holds too many empty slots.
    fn compact(&mut self) {
        while matches!(self.slots.back(), Some(None)) {
            self.slots.pop_back();
        }
        loop {
            match self.slots.front() {
                Some(None) => {}
                Some(Some(_)) if self.slots.len() > 2 * self.in_slots + SLACK => {}
                _ => break,
            }
            if let Some(Some((id, v))) = self.slots.pop_front() {
                self.far.insert(id, v);
                self.in_slots -= 1;
            }
            self.base = self.base.saturating_add(1);
        }
        if self.slots.is_empty() {
            self.base = 0;
        }
    }

    /// Every entry, those in the run in id order, then the others.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TaskId, &V)> {
        self.slots
            .iter()
            .flatten()
            .map(|(id, v)| (id, v))
            .chain(self.far.iter())
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> usize {
        self.in_slots + self.far.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    /// Random inserts and removes, mostly in id order with stragglers and
    /// jumps, give what a hash map gives, and the run stays bounded.
    #[test]
    fn behaves_as_a_map_and_stays_bounded() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut table = IdTable::default();
        let mut model = HashMap::new();
        let mut next: TaskId = 1;
        for step in 0..200_000u64 {
            match rng.gen_range(0..10) {
                0..=4 => {
                    let id = if rng.gen_bool(0.001) {
                        next + rng.gen_range(10_000..1_000_000)
                    } else {
                        next += 1;
                        next
                    };
                    assert_eq!(table.insert(id, step), model.insert(id, step));
                }
                5..=8 => {
                    // Mostly the oldest live ids, as tasks finish in order.
                    let id = next.saturating_sub(rng.gen_range(0..200));
                    assert_eq!(table.remove(&id), model.remove(&id));
                }
                _ => {
                    let id = rng.gen_range(0..next + 10);
                    assert_eq!(table.get(&id), model.get(&id));
                    if let Some(v) = table.get_mut(&id) {
                        *v += 1;
                        *model.get_mut(&id).unwrap() += 1;
                    }
                }
            }
            assert_eq!(table.len(), model.len());
            assert!(table.slots.len() <= 2 * table.in_slots + 2 * SLACK + 1);
        }
        let mut all: Vec<(TaskId, u64)> = table.iter().map(|(&k, &v)| (k, v)).collect();
        all.sort_unstable();
        let mut want: Vec<(TaskId, u64)> = model.into_iter().collect();
        want.sort_unstable();
        assert_eq!(all, want);
    }

    #[test]
    fn empty_and_reused() {
        let mut t: IdTable<&str> = IdTable::default();
        assert_eq!(t.get(&0), None);
        assert_eq!(t.remove(&5), None);
        assert_eq!(t.insert(5, "a"), None);
        assert_eq!(t.insert(5, "b"), Some("a"));
        assert!(t.contains_key(&5));
        assert_eq!(t.remove(&5), Some("b"));
        assert_eq!(t.len(), 0);
        assert_eq!(t.insert(u64::MAX, "max"), None);
        assert_eq!(t.insert(1, "one"), None);
        assert_eq!(t.get(&u64::MAX), Some(&"max"));
        assert_eq!(t.get(&1), Some(&"one"));
    }
}
