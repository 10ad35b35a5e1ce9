//! Properties of the category allocator (`drover_master::category`), on random
//! samples, configs and worker sizes.

use drover_master::category::{covers, CategoryConfig, CategoryState, Dim, Sample};
use drover_master::scheduler::Request;
use drover_master::Resources;
use proptest::prelude::*;

fn sample() -> impl Strategy<Value = Sample> {
    // Bimodal memory (the common case), some disk, cores around 1.
    (
        prop_oneof![3 => 10.0f64..800.0, 1 => 2000.0f64..9000.0],
        prop_oneof![3 => Just(0.0f64), 1 => 1.0f64..5000.0],
        0.0f64..4.0,
        0.01f64..10.0,
    )
        .prop_map(|(memory_mb, disk_mb, cores, wall_s)| Sample {
            cores,
            memory_mb,
            disk_mb,
            wall_s,
        })
}

fn worker() -> impl Strategy<Value = Resources> {
    (
        1u32..64,
        1000u64..64_000,
        prop_oneof![Just(0u64), 1000u64..100_000],
    )
        .prop_map(|(cores, memory_mb, disk_mb)| Resources {
            cores,
            memory_mb,
            disk_mb,
            gpus: 0,
        })
}

fn config() -> impl Strategy<Value = CategoryConfig> {
    (
        prop::option::of((0u32..16, 0u64..20_000, 0u64..50_000)),
        0.0f64..0.5,
        1usize..20,
        1usize..60,
        1usize..10,
        any::<u64>(),
    )
        .prop_map(|(max, margin, min_samples, window, max_buckets, seed)| {
            let mut c = CategoryConfig::bucketing()
                .margin(margin)
                .min_samples(min_samples)
                .window(window)
                .max_buckets(max_buckets)
                .seed(seed);
            if let Some((cores, memory_mb, disk_mb)) = max {
                c = c.max(Resources {
                    cores,
                    memory_mb,
                    disk_mb,
                    gpus: 0,
                });
            }
            c
        })
}

fn dim() -> impl Strategy<Value = Dim> {
    prop_oneof![Just(Dim::Memory), Just(Dim::Disk), Just(Dim::Cores)]
}

fn get(d: Dim, r: &Resources) -> u64 {
    match d {
        Dim::Cores => r.cores.into(),
        Dim::Memory => r.memory_mb,
        Dim::Disk => r.disk_mb,
    }
}

/// The cap every allocation must respect: the largest worker, and the
/// category maximum where it sets a component.
fn within(r: &Resources, largest: &Resources, config: &CategoryConfig) -> bool {
    let max = config.max.unwrap_or_default();
    let ok = |v: u64, w: u64, m: u64| v <= w && (m == 0 || v <= m);
    ok(r.cores.into(), largest.cores.into(), max.cores.into())
        && ok(r.memory_mb, largest.memory_mb, max.memory_mb)
        && ok(r.disk_mb, largest.disk_mb, max.disk_mb)
}

fn has_max(config: &CategoryConfig) -> bool {
    config.max.is_some_and(|m| !m.is_zero())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn allocations_respect_the_largest_worker_and_the_maximum(
        config in config(),
        largest in worker(),
        samples in prop::collection::vec(sample(), 0..40),
        d in dim(),
    ) {
        let none = Resources::default();
        let mut c = CategoryState::new("p", config.clone());
        let check = |c: &CategoryState| -> Result<(), TestCaseError> {
            match c.first(&none, &largest) {
                Request::Fixed(r) => {
                    prop_assert!(within(&r, &largest, &config), "{r:?} over {largest:?} / {:?}", config.max);
                    // What a placement is charged, its growth reserve too.
                    let mut charged = r;
                    charged.memory_mb += c.growth_reserve(&r, &none, &largest);
                    prop_assert!(within(&charged, &largest, &config), "{charged:?} over {largest:?} / {:?}", config.max);
                }
                Request::WholeWorker => prop_assert!(!has_max(&config), "a whole worker breaks the maximum"),
            }
            // Every rung of the ladder too.
            let mut rung = c.first(&none, &largest);
            let mut steps = 0;
            while let Request::Fixed(r) = rung {
                match c.retry(&r, false, d, &none, &largest) {
                    None => break,
                    Some(Request::Fixed(n)) => {
                        prop_assert!(within(&n, &largest, &config), "{n:?} over {largest:?} / {:?}", config.max);
                        prop_assert!(get(d, &n) > get(d, &r), "retry {n:?} not larger than {r:?} in {d:?}");
                        rung = Request::Fixed(n);
                    }
                    Some(Request::WholeWorker) => {
                        prop_assert!(!has_max(&config));
                        rung = Request::WholeWorker;
                    }
                }
                steps += 1;
                prop_assert!(steps < 200, "the ladder does not end");
            }
            if rung == Request::WholeWorker {
                prop_assert_eq!(c.retry(&largest, true, d, &none, &largest), None);
            }
            Ok(())
        };
        check(&c)?;
        for s in samples {
            c.record(s, &largest);
            check(&c)?;
        }
    }

    #[test]
    fn retries_after_kills_grow_and_respect_the_cap(
        config in config(),
        largest in worker(),
        samples in prop::collection::vec(sample(), 0..40),
        kills in prop::collection::vec(sample(), 0..20),
        seen in prop::collection::vec(0.0f64..20_000.0, 1..8),
        d in dim(),
    ) {
        // Killed attempts' observations (lower bounds, possibly far above
        // every bucket) and what the monitor saw at each kill change which
        // rung comes next, never the ladder's guarantees.
        let none = Resources::default();
        let mut c = CategoryState::new("p", config.clone());
        for s in samples {
            c.record(s, &largest);
        }
        let mut rung = c.first(&none, &largest);
        for (i, k) in kills.iter().enumerate() {
            if let Request::Fixed(r) = rung {
                c.record_attempt(&r, k, true);
            }
            let Request::Fixed(r) = rung else { break };
            let v = seen[i % seen.len()];
            match c.retry_seen(&r, false, d, v, &none, &largest) {
                None => break,
                Some(Request::Fixed(n)) => {
                    prop_assert!(within(&n, &largest, &config), "{n:?} over {largest:?} / {:?}", config.max);
                    prop_assert!(get(d, &n) > get(d, &r), "retry {n:?} not larger than {r:?} in {d:?}");
                    prop_assert!(get(d, &n) as f64 > v.ceil(), "retry {n:?} not above what was seen ({v}) in {d:?}");
                    rung = Request::Fixed(n);
                }
                Some(Request::WholeWorker) => {
                    prop_assert!(!has_max(&config));
                    rung = Request::WholeWorker;
                }
            }
        }
    }

    #[test]
    fn buckets_cover_every_sample_in_the_window(
        config in config(),
        largest in worker(),
        samples in prop::collection::vec(sample(), 1..80),
    ) {
        let mut c = CategoryState::new("p", config);
        for s in samples {
            c.record(s, &largest);
            let buckets = c.bucket_allocations();
            for s in c.samples() {
                // A bucket capped by the worker or maximum cannot hold a
                // sample bigger than the cap; that task gets the top rung.
                let capped = Sample {
                    memory_mb: s.memory_mb.min(largest.memory_mb as f64),
                    disk_mb: if largest.disk_mb == 0 { s.disk_mb } else { s.disk_mb.min(largest.disk_mb as f64) },
                    ..*s
                };
                let capped = match c.config().max {
                    Some(m) => Sample {
                        memory_mb: if m.memory_mb == 0 { capped.memory_mb } else { capped.memory_mb.min(m.memory_mb as f64) },
                        disk_mb: if m.disk_mb == 0 { capped.disk_mb } else { capped.disk_mb.min(m.disk_mb as f64) },
                        ..capped
                    },
                    None => capped,
                };
                prop_assert!(buckets.iter().any(|b| covers(b, &capped)), "{s:?} in no bucket of {buckets:?}");
            }
        }
    }

    #[test]
    fn same_samples_and_seed_give_the_same_buckets(
        config in config(),
        largest in worker(),
        samples in prop::collection::vec(sample(), 1..80),
    ) {
        let mut a = CategoryState::new("a", config.clone());
        let mut b = CategoryState::new("b", config);
        for s in &samples {
            prop_assert_eq!(a.record(*s, &largest), b.record(*s, &largest));
        }
        prop_assert_eq!(a.bucket_allocations(), b.bucket_allocations());
        let none = Resources::default();
        prop_assert_eq!(a.first(&none, &largest), b.first(&none, &largest));
    }

    #[test]
    fn declared_resources_are_kept_and_never_raised(
        largest in worker(),
        samples in prop::collection::vec(sample(), 0..60),
        memory in 1u64..10_000,
    ) {
        let declared = Resources { memory_mb: memory, ..Default::default() };
        let mut c = CategoryState::new("p", CategoryConfig::bucketing());
        for s in samples {
            c.record(s, &largest);
        }
        match c.first(&declared, &largest) {
            Request::Fixed(r) => {
                prop_assert_eq!(r.memory_mb, memory);
                prop_assert_eq!(c.retry(&r, false, Dim::Memory, &declared, &largest), None);
            }
            Request::WholeWorker => prop_assert!(false, "a declared task got a whole worker"),
        }
    }
}

/// A category's waiting tasks follow its learned request: the scheduler's
/// class shape changes request in place, however many tasks wait.
#[test]
fn class_requests_retarget_waiting_tasks() {
    use drover_master::scheduler::{Placement, Scheduler};
    let mut s = Scheduler::new();
    let worker = Resources {
        cores: 12,
        memory_mb: 12_000,
        disk_mb: 0,
        gpus: 0,
    };
    s.add_worker(1, worker);
    // Before anything is learned a class asks for a whole worker.
    for t in 0..10 {
        s.enqueue_class(t, 7, 0, t, &[]);
    }
    let mut out: Vec<Placement> = Vec::new();
    s.schedule(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].allocation, worker);
    // Learned: 1 core and 1,000 MB each; the 9 waiting tasks are blocked
    // (the worker is full) until the class request changes and room frees.
    let small = Resources {
        cores: 1,
        memory_mb: 1000,
        ..Default::default()
    };
    s.set_class_request(7, Request::Fixed(small));
    out.clear();
    s.schedule(&mut out);
    assert!(
        out.is_empty(),
        "the whole-worker task still holds the worker"
    );
    s.release(1, worker);
    s.schedule(&mut out);
    assert_eq!(out.len(), 9);
    assert!(out.iter().all(|p| p.allocation == small));
    // New tasks of the class get the current request too.
    s.enqueue_class(100, 7, 0, 100, &[]);
    out.clear();
    s.schedule(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].allocation, small);
    assert_eq!(s.waiting(), 0);
}
