//! The master's recent past, for people watching it: a ring of per-second
//! counts, a bounded list of recent events, and tasks ended per category.
//!
//! Cheap by construction: a task costs one counter bump (and a category
//! lookup) when it is submitted and when it ends; the counts that need a
//! walk over the workers are sampled at most once a second, from the
//! engine's loop. Seconds in which nothing happened are filled in from the
//! last sample when they are next looked at, since nothing changed then.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use drover_catalog::report::{MAX_EVENTS, MAX_EVENT_TEXT, MAX_HISTORY};
use drover_catalog::{EventSummary, History as HistoryReport};
use rustc_hash::FxHashMap as HashMap;

/// The counts of one second. `done` and `failed` are running totals, so
/// that a missed second loses no task; the report sends differences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    pub done: u64,
    pub failed: u64,
    pub running: u64,
    pub waiting: u64,
    pub workers: u64,
    pub cores_inuse: u64,
}

/// A category's tasks: not ended yet, and ended each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CategoryCounts {
    /// Submitted and not ended (waiting or running).
    pub live: u64,
    pub done: u64,
    /// Ended in any other way, cancelled included (as the report counts).
    pub failed: u64,
    /// Tasks ever submitted whose size the category learns (they did not
    /// declare everything); 0 means the category sizes nothing.
    pub learned: u64,
}

/// See the module's comment.
pub(crate) struct History {
    start: Instant,
    /// Seconds since `start` of the newest sample.
    last_second: Option<u64>,
    samples: VecDeque<Sample>,
    /// The totals of the newest sample that fell off the ring: the base of
    /// the oldest kept sample's difference.
    dropped: (u64, u64),
    /// Unix time of the newest sample.
    last_unix: u64,
    events: VecDeque<EventSummary>,
    /// Events ever recorded; the newest has number `events_total - 1`.
    events_total: u64,
    categories: HashMap<String, CategoryCounts>,
}

impl History {
    pub(crate) fn new(start: Instant) -> History {
        History {
            start,
            last_second: None,
            samples: VecDeque::with_capacity(MAX_HISTORY),
            dropped: (0, 0),
            last_unix: 0,
            events: VecDeque::with_capacity(MAX_EVENTS),
            events_total: 0,
            categories: HashMap::default(),
        }
    }

    /// True when `now` is in a second not sampled yet; call
    /// [`History::record`] then (the sample costs a walk over the workers,
    /// so it is only taken when needed).
    pub(crate) fn due(&self, now: Instant) -> bool {
        Some(self.second(now)) != self.last_second
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Records `sample` as the counts of `now`'s second, and the last
    /// sample's counts for the seconds since it, in which nothing happened.
    pub(crate) fn record(&mut self, now: Instant, sample: Sample) {
        let second = self.second(now);
        if let (Some(last), Some(&prev)) = (self.last_second, self.samples.back()) {
            let idle = second.saturating_sub(last + 1).min(MAX_HISTORY as u64);
            for _ in 0..idle {
                self.push(prev);
            }
        }
        self.push(sample);
        self.last_second = Some(second);
        self.last_unix = unix_now();
    }

    fn push(&mut self, s: Sample) {
        if self.samples.len() == MAX_HISTORY {
            if let Some(old) = self.samples.pop_front() {
                self.dropped = (old.done, old.failed);
            }
        }
        self.samples.push_back(s);
    }

    /// Remembers an event, forgetting the oldest past [`MAX_EVENTS`].
    pub(crate) fn event(&mut self, mut e: EventSummary) {
        if e.time == 0 {
            e.time = unix_now();
        }
        drover_catalog::report::truncate_utf8(&mut e.detail, MAX_EVENT_TEXT);
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
        self.events_total += 1;
    }

    /// The events numbered `seen` and later that are still kept, and the
    /// number to ask from next time.
    pub(crate) fn events_since(&self, seen: u64) -> (u64, Vec<EventSummary>) {
        let first_kept = self.events_total - self.events.len() as u64;
        let skip = seen.saturating_sub(first_kept) as usize;
        (
            self.events_total,
            self.events.iter().skip(skip).cloned().collect(),
        )
    }

    /// A task of `category` was submitted; `learned`: its category sizes it.
    pub(crate) fn submitted(&mut self, category: &str, learned: bool) {
        let c = self.category(category);
        c.live += 1;
        c.learned += u64::from(learned);
    }

    /// A task of `category` ended, successfully or not.
    pub(crate) fn ended(&mut self, category: &str, success: bool) {
        let c = self.category(category);
        c.live = c.live.saturating_sub(1);
        if success {
            c.done += 1;
        } else {
            c.failed += 1;
        }
    }

    fn category(&mut self, name: &str) -> &mut CategoryCounts {
        // get_mut first: the name is only copied for a category's first task.
        if !self.categories.contains_key(name) {
            self.categories
                .insert(name.to_string(), CategoryCounts::default());
        }
        self.categories.get_mut(name).expect("inserted just above")
    }

    /// Counts of each category that has had tasks.
    pub(crate) fn categories(&self) -> &HashMap<String, CategoryCounts> {
        &self.categories
    }

    /// Recent events, oldest first.
    pub(crate) fn events(&self) -> Vec<EventSummary> {
        self.events.iter().cloned().collect()
    }

    /// The ring as the report's columns: tasks ended per second, the rest
    /// as sampled. `None` before the first sample.
    pub(crate) fn report(&self) -> Option<HistoryReport> {
        if self.samples.is_empty() {
            return None;
        }
        let mut h = HistoryReport {
            end_time: self.last_unix,
            step_secs: 1,
            ..Default::default()
        };
        let (mut done, mut failed) = self.dropped;
        for s in &self.samples {
            h.done.push(s.done.saturating_sub(done));
            h.failed.push(s.failed.saturating_sub(failed));
            (done, failed) = (s.done, s.failed);
            h.running.push(s.running);
            h.waiting.push(s.waiting);
            h.workers.push(s.workers);
            h.cores_inuse.push(s.cores_inuse);
        }
        Some(h)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(h: &History, secs: u64) -> Instant {
        h.start + Duration::from_secs(secs)
    }

    #[test]
    fn idle_seconds_repeat_the_last_sample_and_done_is_per_second() {
        let mut h = History::new(Instant::now());
        let s = |done, running| Sample {
            done,
            running,
            workers: 2,
            ..Default::default()
        };
        assert!(h.due(at(&h, 0)));
        h.record(at(&h, 0), s(0, 2));
        assert!(!h.due(at(&h, 0)));
        h.record(at(&h, 1), s(5, 2));
        // Seconds 2 and 3 had no event: they hold second 1's counts.
        h.record(at(&h, 4), s(9, 1));
        let r = h.report().unwrap();
        assert_eq!(r.done, vec![0, 5, 0, 0, 4]);
        assert_eq!(r.running, vec![2, 2, 2, 2, 1]);
        assert_eq!(r.workers, vec![2; 5]);
        assert_eq!(r.step_secs, 1);
    }

    #[test]
    fn the_ring_is_bounded_and_keeps_differences_right() {
        let mut h = History::new(Instant::now());
        for i in 0..(MAX_HISTORY as u64 + 100) {
            h.record(
                at(&h, i),
                Sample {
                    done: i * 2,
                    ..Default::default()
                },
            );
        }
        // A long silence costs no more than the ring holds.
        h.record(at(&h, 1_000_000), Sample::default());
        let r = h.report().unwrap();
        assert_eq!(r.len(), MAX_HISTORY);
        assert!(r.failed.iter().all(|&f| f == 0));
    }

    #[test]
    fn events_are_bounded_and_categories_count() {
        let mut h = History::new(Instant::now());
        for i in 0..(MAX_EVENTS + 5) {
            h.event(EventSummary {
                kind: "task failed".into(),
                task: Some(i as u64),
                detail: "e".repeat(MAX_EVENT_TEXT * 2),
                ..Default::default()
            });
        }
        let ev = h.events();
        assert_eq!(ev.len(), MAX_EVENTS);
        let (next, newer) = h.events_since(MAX_EVENTS as u64 + 3);
        assert_eq!(next, MAX_EVENTS as u64 + 5);
        assert_eq!(newer.len(), 2);
        assert_eq!(h.events_since(0).1.len(), MAX_EVENTS);
        assert!(h.events_since(next).1.is_empty());
        assert_eq!(ev[0].task, Some(5));
        assert!(ev
            .iter()
            .all(|e| e.detail.len() <= MAX_EVENT_TEXT && e.time > 0));
        h.submitted("a", false);
        h.submitted("a", false);
        h.submitted("b", true);
        h.ended("a", true);
        h.ended("b", false);
        assert_eq!(
            h.categories()["a"],
            CategoryCounts {
                live: 1,
                done: 1,
                failed: 0,
                learned: 0
            }
        );
        assert_eq!(h.categories()["b"].failed, 1);
    }
}
