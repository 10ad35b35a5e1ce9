//! Property test for class queues and re-queued tasks: whatever mix of
//! plain requests, class requests that change while tasks wait, and tasks
//! moved from one queue to another, every placement is of a task that was
//! waiting and reserves exactly what that task asks for at that moment.

use std::collections::BTreeMap;

use drover_master::scheduler::{Placement, Request, Scheduler};
use drover_protocol::Resources;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Queue (or move) task `t` with a plain request of `mb` MB.
    Plain(u64, u64),
    /// Queue (or move) task `t` into class `c`.
    Class(u64, u32),
    /// Class `c` now asks for `mb` MB.
    SetClass(u32, u64),
    Cancel(u64),
    Schedule,
    /// Finish the oldest running task.
    Release,
}

fn mem(mb: u64) -> Resources {
    Resources {
        cores: 1,
        memory_mb: mb,
        disk_mb: 0,
        gpus: 0,
    }
}

fn op() -> impl Strategy<Value = Op> {
    let mb = prop::sample::select(vec![100u64, 300, 600, 1200, 2400]);
    prop_oneof![
        (0u64..12, mb.clone()).prop_map(|(t, m)| Op::Plain(t, m)),
        (0u64..12, 0u32..3).prop_map(|(t, c)| Op::Class(t, c)),
        (0u32..3, mb).prop_map(|(c, m)| Op::SetClass(c, m)),
        (0u64..12).prop_map(Op::Cancel),
        Just(Op::Schedule),
        Just(Op::Release),
    ]
}

/// Half the tasks carry a cached input, as W4's do; seqs repeat across
/// tasks, as a requeued task keeps its own.
fn files(t: u64) -> Vec<u32> {
    if t.is_multiple_of(2) {
        vec![5]
    } else {
        Vec::new()
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Asks {
    Plain(u64),
    Class(u32),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn placements_reserve_what_the_task_asks_for_now(ops in prop::collection::vec(op(), 1..80)) {
        let mut s = Scheduler::new();
        s.add_worker(1, Resources { cores: 4, memory_mb: 3000, disk_mb: 0, gpus: 0 });
        s.note_cached(1, 5);
        let mut waiting: BTreeMap<u64, Asks> = BTreeMap::new();
        let mut classes: BTreeMap<u32, u64> = BTreeMap::new();
        let mut running: Vec<(u64, Resources)> = Vec::new();
        let mut out: Vec<Placement> = Vec::new();
        for op in ops {
            match op {
                Op::Plain(t, mb) => {
                    if running.iter().any(|r| r.0 == t) { continue; }
                    s.enqueue(t, Request::Fixed(mem(mb)), 0, t * 7 % 5, &files(t));
                    waiting.insert(t, Asks::Plain(mb));
                }
                Op::Class(t, c) => {
                    if running.iter().any(|r| r.0 == t) { continue; }
                    if let std::collections::btree_map::Entry::Vacant(e) = classes.entry(c) {
                        e.insert(300);
                        s.set_class_request(c, Request::Fixed(mem(300)));
                    }
                    s.enqueue_class(t, c, 0, t * 7 % 5, &files(t));
                    waiting.insert(t, Asks::Class(c));
                }
                Op::SetClass(c, mb) => {
                    classes.insert(c, mb);
                    s.set_class_request(c, Request::Fixed(mem(mb)));
                }
                Op::Cancel(t) => {
                    prop_assert_eq!(s.remove_waiting(t), waiting.remove(&t).is_some());
                }
                Op::Schedule => {
                    out.clear();
                    s.schedule(&mut out);
                    for p in &out {
                        let asks = waiting.remove(&p.task);
                        prop_assert!(asks.is_some(), "task {} placed but not waiting", p.task);
                        let want = match asks.unwrap() {
                            Asks::Plain(mb) => mb,
                            Asks::Class(c) => classes[&c],
                        };
                        prop_assert_eq!(p.allocation, mem(want), "task {}", p.task);
                        running.push((p.task, p.allocation));
                    }
                }
                Op::Release => {
                    if !running.is_empty() {
                        let (_, a) = running.remove(0);
                        s.release(1, a);
                    }
                }
            }
        }
    }
}
