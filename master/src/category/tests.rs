use super::*;

fn mem(mb: f64) -> Sample {
    Sample {
        cores: 1.0,
        memory_mb: mb,
        disk_mb: 0.0,
        wall_s: 1.5,
    }
}

fn worker() -> Resources {
    Resources {
        cores: 12,
        memory_mb: 12_000,
        disk_mb: 0,
        gpus: 0,
    }
}

fn fixed(r: Request) -> Resources {
    match r {
        Request::Fixed(r) => r,
        Request::WholeWorker => panic!("expected a fixed request"),
    }
}

#[test]
fn no_samples_means_first_then_max_then_whole_worker() {
    let w = worker();
    let c = CategoryState::new("a", CategoryConfig::bucketing());
    assert_eq!(c.first(&Resources::default(), &w), Request::WholeWorker);
    let c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(5000));
    let r = fixed(c.first(&Resources::default(), &w));
    assert_eq!((r.memory_mb, r.cores), (5000, 12));
    let first = Resources {
        cores: 1,
        memory_mb: 700,
        ..Default::default()
    };
    let c = CategoryState::new(
        "a",
        CategoryConfig::bucketing().first(first).max_memory_mb(5000),
    );
    assert_eq!(fixed(c.first(&Resources::default(), &w)), first);
}

#[test]
fn learning_phase_uses_the_largest_peak() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    assert!(c.record(mem(400.0), &w));
    assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 440);
    c.record(mem(300.0), &w);
    assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 440);
    c.record(mem(1000.0), &w);
    assert_eq!(fixed(c.first(&Resources::default(), &w)).memory_mb, 1100);
}

#[test]
fn bimodal_samples_make_two_buckets_and_start_small() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    for i in 0..70 {
        c.record(mem(300.0 + (i % 30) as f64 * 10.0), &w);
    }
    for i in 0..30 {
        c.record(mem(2500.0 + (i % 15) as f64 * 100.0), &w);
    }
    let buckets = c.bucket_allocations();
    assert!(buckets.len() >= 2, "{buckets:?}");
    let start = fixed(c.first(&Resources::default(), &w));
    assert!(
        start.memory_mb < 1000,
        "starts in a small bucket: {start:?}"
    );
    // Killed in the small bucket: the next rung holds the big mode.
    let next = fixed(
        c.retry(&start, false, Dim::Memory, &Resources::default(), &w)
            .unwrap(),
    );
    assert!(next.memory_mb > start.memory_mb);
    let top = *buckets.last().unwrap();
    assert!(
        top.memory_mb >= 3900 && top.memory_mb <= 12_000,
        "{buckets:?}"
    );
}

/// A growing task goes to the median of the bigger peaks (plus the
/// small margin), then on from there; past the biggest peak it grows
/// by a step; never past the cap; not at all in fixed mode.
/// While bucketing learns, a task gets twice the cores seen, so that
/// half as many unknown tasks start together; once it has its samples,
/// and in max mode, the cores seen.
#[test]
fn learning_tasks_get_twice_the_cores_seen() {
    let w = worker();
    let none = Resources::default();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(3));
    let mut m = CategoryState::new("m", CategoryConfig::max_seen());
    for (i, mb) in [300.0, 320.0, 340.0].into_iter().enumerate() {
        c.record(mem(mb), &w);
        m.record(mem(mb), &w);
        let cores = fixed(c.first(&none, &w)).cores;
        let learned = i + 1 >= 3;
        assert_eq!(
            cores,
            if learned { 1 } else { 2 },
            "after {} samples",
            i + 1
        );
        assert_eq!(fixed(m.first(&none, &w)).cores, 1);
    }
    // On a 2-core worker it would halve what runs at once: it stays 1.
    let small = Resources { cores: 2, ..w };
    let mut c = CategoryState::new("s", CategoryConfig::bucketing().min_samples(3));
    c.record(mem(300.0), &small);
    assert_eq!(fixed(c.first(&none, &small)).cores, 1);
}

#[test]
fn the_growth_reserve_is_the_mean_overflow_once_bucketed() {
    let w = worker();
    let none = Resources::default();
    let small = Resources {
        cores: 1,
        memory_mb: 600,
        ..Default::default()
    };
    let config = CategoryConfig::bucketing().min_samples(5);
    let mut c = CategoryState::new("a", config.clone());
    for mb in [300.0, 400.0, 500.0, 3000.0] {
        c.record(mem(mb), &w);
    }
    // Still learning: tasks get the largest peak, and nothing is held.
    assert_eq!(c.growth_reserve(&small, &none, &w), 0);
    c.record(mem(2600.0), &w);
    // (3000 - 600 + 2600 - 600) / 5 samples.
    assert_eq!(c.growth_reserve(&small, &none, &w), 880);
    // Nothing past an allocation that holds every peak.
    let roomy = Resources {
        memory_mb: 3000,
        ..small
    };
    assert_eq!(c.growth_reserve(&roomy, &none, &w), 0);
    // Never past the cap: the worker, or the category maximum.
    let tight = Resources {
        memory_mb: 1_000,
        ..w
    };
    assert_eq!(c.growth_reserve(&small, &none, &tight), 400);
    // None where tasks do not grow, or declare their memory.
    let declared = Resources {
        memory_mb: 600,
        ..Default::default()
    };
    assert_eq!(c.growth_reserve(&small, &declared, &w), 0);
    for config in [
        config.clone().grow_in_place(false),
        config.mode(AllocationMode::Max),
    ] {
        let mut other = CategoryState::new("b", config);
        for mb in [300.0, 400.0, 500.0, 3000.0, 2600.0] {
            other.record(mem(mb), &w);
        }
        assert_eq!(other.growth_reserve(&small, &none, &w), 0);
    }
}

#[test]
fn the_reserve_hold_follows_recent_growth_ages_only() {
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    c.note_growth_age(f64::NAN);
    c.note_growth_age(-1.0);
    c.note_growth_age(20.0);
    for _ in 0..GROWTH_AGES_MIN - 1 {
        c.note_growth_age(1.0);
    }
    assert_eq!(c.reserve_hold_s(), Some(20.0 * GROWTH_AGE_MARGIN));
    // The 20 s age falls out of the window.
    for _ in 0..GROWTH_AGES_KEPT {
        c.note_growth_age(2.0);
    }
    assert_eq!(c.reserve_hold_s(), Some(2.0 * GROWTH_AGE_MARGIN));
    // Kept across a change of settings, like the samples.
    c.set_config(CategoryConfig::bucketing().min_samples(3));
    assert_eq!(c.reserve_hold_s(), Some(2.0 * GROWTH_AGE_MARGIN));
}

#[test]
fn a_growing_task_goes_to_the_median_of_bigger_peaks() {
    let w = worker();
    let none = Resources::default();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(6000));
    for mb in [300.0, 400.0, 500.0, 2500.0, 3000.0, 3500.0, 4000.0] {
        c.record(mem(mb), &w);
    }
    let small = Resources {
        cores: 1,
        memory_mb: 600,
        ..Default::default()
    };
    let grow = |c: &CategoryState, from: &Resources, seen: f64| {
        c.grow_seen(from, seen, &none, &w).map(fixed)
    };
    // Bigger than 650: 2500, 3000, 3500, 4000; the lower median is 3000.
    let first = grow(&c, &small, 650.0).unwrap();
    assert_eq!((first.memory_mb, first.cores), (3150, 1));
    // Past it: bigger than 3200 are 3500 and 4000.
    assert_eq!(grow(&c, &first, 3200.0).unwrap().memory_mb, 3675);
    // Past every peak: a step up from what it was seen using, within
    // the cap.
    let mut roomy = CategoryState::new("r", CategoryConfig::bucketing().max_memory_mb(10_000));
    for mb in [300.0, 4000.0] {
        roomy.record(mem(mb), &w);
    }
    assert_eq!(grow(&roomy, &first, 4000.0).unwrap().memory_mb, 6000);
    let near_cap = Resources {
        memory_mb: 4500,
        ..small
    };
    assert_eq!(grow(&c, &near_cap, 4600.0).unwrap().memory_mb, 6000);
    let at_cap = Resources {
        memory_mb: 6000,
        ..small
    };
    assert_eq!(grow(&c, &at_cap, 6100.0), None);
    let mut f = CategoryState::new("f", CategoryConfig::fixed());
    f.record(mem(5000.0), &w);
    assert_eq!(f.grow_seen(&small, 650.0, &none, &w), None);
}

#[test]
fn uniform_big_samples_start_big() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    for i in 0..50 {
        c.record(mem(3000.0 + (i % 10) as f64 * 10.0), &w);
    }
    let start = fixed(c.first(&Resources::default(), &w));
    assert!(start.memory_mb >= 3090, "{start:?}");
}

#[test]
fn ladder_without_max_doubles_then_whole_worker_then_fails() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    c.record(mem(1000.0), &w);
    let mut r = fixed(c.first(&Resources::default(), &w));
    assert_eq!(r.memory_mb, 1100);
    let mut seen = vec![r.memory_mb];
    loop {
        match c.retry(&r, false, Dim::Memory, &Resources::default(), &w) {
            Some(Request::Fixed(n)) => {
                assert!(n.memory_mb > r.memory_mb);
                r = n;
                seen.push(r.memory_mb);
            }
            Some(Request::WholeWorker) => break,
            None => panic!("ended before a whole worker: {seen:?}"),
        }
    }
    assert_eq!(seen, vec![1100, 2200, 4400, 8800]);
    assert_eq!(
        c.retry(&w, true, Dim::Memory, &Resources::default(), &w),
        None
    );
}

#[test]
fn retry_skips_rungs_below_what_the_task_was_seen_using() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
    for i in 0..20 {
        c.record(mem(400.0 + i as f64), &w);
        c.record(mem(1500.0 + i as f64), &w);
        c.record(mem(3500.0 + i as f64), &w);
    }
    let none = Resources::default();
    let start = fixed(c.first(&none, &w));
    // Seen at 2,000 MB when killed: the 1,500 MB bucket is skipped.
    let next = fixed(
        c.retry_seen(&start, false, Dim::Memory, 2000.0, &none, &w)
            .unwrap(),
    );
    assert!(
        next.memory_mb > 2000,
        "{next:?} from {:?}",
        c.bucket_allocations()
    );
    // Without the observation it goes to the next bucket up.
    let plain = fixed(c.retry(&start, false, Dim::Memory, &none, &w).unwrap());
    assert!(plain.memory_mb > start.memory_mb && plain.memory_mb <= next.memory_mb);
}

#[test]
fn bucket_allocation_estimates_the_upper_end_of_its_population() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
    for i in 0..30 {
        c.record(mem(400.0 + i as f64), &w);
    }
    // Two big members, 3,000 and 3,500 MB: the next big task may well
    // be bigger than 3,500, by about their spread.
    c.record(mem(3000.0), &w);
    c.record(mem(3500.0), &w);
    c.rebuild();
    let top = *c.bucket_allocations().last().unwrap();
    assert_eq!(top.memory_mb, 4400, "(3,500 + 500) * 1.1");
    // The small bucket: 429 + 29 / 29 = 430, plus 10%.
    assert_eq!(c.bucket_allocations()[0].memory_mb, 473);
    // Max mode keeps the largest peak plus the margin.
    let mut m = CategoryState::new("m", CategoryConfig::max_seen());
    m.record(mem(3000.0), &w);
    m.record(mem(3500.0), &w);
    assert_eq!(m.bucket_allocations()[0].memory_mb, 3850);
}

#[test]
fn tasks_killed_above_the_top_bucket_raise_it_for_those_climbing_to_it() {
    let w = worker();
    let none = Resources::default();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
    for i in 0..30 {
        c.record(mem(400.0 + i as f64), &w);
    }
    c.record(mem(3000.0), &w);
    c.rebuild();
    let buckets = c.bucket_allocations();
    let (small, top) = (buckets[0], *buckets.last().unwrap());
    assert_eq!(top.memory_mb, 3300);
    // Killed in the small bucket, nothing known above: the top bucket.
    let r = fixed(
        c.retry_seen(&small, false, Dim::Memory, 900.0, &none, &w)
            .unwrap(),
    );
    assert_eq!(r.memory_mb, 3300);
    // A task was killed in the top bucket, seen at 3,800 MB.
    let killed = Sample {
        memory_mb: 3800.0,
        wall_s: 1.0,
        ..mem(0.0)
    };
    c.record_attempt(&top, &killed, true);
    // That task goes on past the top bucket (doubling)...
    let r = fixed(
        c.retry_seen(&top, false, Dim::Memory, 3800.0, &none, &w)
            .unwrap(),
    );
    assert_eq!(r.memory_mb, 6600);
    // ...and the next one climbing from the small bucket gets what it
    // was seen using, plus the margin, not the known-too-small bucket.
    let r = fixed(
        c.retry_seen(&small, false, Dim::Memory, 900.0, &none, &w)
            .unwrap(),
    );
    assert_eq!(r.memory_mb, 4180);
    // The buckets themselves wait for real samples.
    assert_eq!(c.bucket_allocations().last().unwrap().memory_mb, 3300);
}

#[test]
fn retry_goes_to_the_cheapest_bucket_for_tasks_that_big() {
    let w = worker();
    let none = Resources::default();
    let three = |big_small: usize, big_big: usize| {
        let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
        for i in 0..60 {
            c.record(mem(400.0 + (i % 20) as f64), &w);
        }
        for i in 0..big_small {
            c.record(mem(2000.0 + (i % 10) as f64), &w);
        }
        for i in 0..big_big {
            c.record(mem(5000.0 + (i % 10) as f64), &w);
        }
        c.rebuild();
        c
    };
    // The buckets, and the retry of a task killed in the smallest one
    // after being seen at `seen` MB.
    let retry_from_small = |c: &CategoryState, seen: f64| {
        let b: Vec<u64> = c.bucket_allocations().iter().map(|r| r.memory_mb).collect();
        let small = c.bucket_allocations()[0];
        let r = fixed(
            c.retry_seen(&small, false, Dim::Memory, seen, &none, &w)
                .unwrap(),
        );
        (b, r.memory_mb)
    };
    // Most big tasks are 2,000 MB: the 2,000 MB bucket first.
    let (b, r) = retry_from_small(&three(30, 3), 900.0);
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(r, b[1], "{b:?}");
    // Most are 5,000 MB: trying 2,000 first would mostly be killed.
    let (b, r) = retry_from_small(&three(3, 30), 900.0);
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(r, b[2], "{b:?}");
    // Seen past the middle bucket already: only the top one is left.
    let (b, r) = retry_from_small(&three(30, 3), 2500.0);
    assert_eq!(r, b[2], "{b:?}");
}

#[test]
fn ladder_with_max_ends_at_max() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().max_memory_mb(3000));
    c.record(mem(1000.0), &w);
    let r = fixed(c.first(&Resources::default(), &w));
    let m = fixed(
        c.retry(&r, false, Dim::Memory, &Resources::default(), &w)
            .unwrap(),
    );
    assert_eq!(m.memory_mb, 3000);
    assert_eq!(
        c.retry(&m, false, Dim::Memory, &Resources::default(), &w),
        None
    );
}

#[test]
fn declared_resources_win_and_are_never_raised() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    c.record(mem(1000.0), &w);
    let declared = Resources {
        cores: 3,
        ..Default::default()
    };
    let r = fixed(c.first(&declared, &w));
    assert_eq!((r.cores, r.memory_mb), (3, 1100));
    let declared = Resources {
        memory_mb: 500,
        ..Default::default()
    };
    let r = fixed(c.first(&declared, &w));
    assert_eq!(r.memory_mb, 500);
    assert_eq!(c.retry(&r, false, Dim::Memory, &declared, &w), None);
}

#[test]
fn fixed_mode_never_retries() {
    let w = worker();
    let c = CategoryState::new("a", CategoryConfig::fixed());
    let r = fixed(c.first(&Resources::default(), &w));
    assert_eq!(r.cores, 1);
    assert_eq!(
        c.retry(&r, false, Dim::Memory, &Resources::default(), &w),
        None
    );
}

#[test]
fn uncovered_sample_between_clusterings_gets_a_bucket() {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing().min_samples(4));
    for _ in 0..40 {
        c.record(mem(500.0), &w);
    }
    c.record(mem(5000.0), &w);
    assert!(c
        .samples()
        .all(|s| c.bucket_allocations().iter().any(|b| covers(b, s))));
}

#[test]
fn waste_counts_unused_and_killed() {
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    let a = Resources {
        cores: 1,
        memory_mb: 1000,
        ..Default::default()
    };
    c.record_attempt(
        &a,
        &Sample {
            cores: 1.0,
            memory_mb: 400.0,
            disk_mb: 0.0,
            wall_s: 2.0,
        },
        false,
    );
    c.record_attempt(
        &a,
        &Sample {
            cores: 1.0,
            memory_mb: 1001.0,
            disk_mb: 0.0,
            wall_s: 0.5,
        },
        true,
    );
    let s = c.stats(&worker());
    assert!((s.waste_memory_mb_s - (600.0 * 2.0 + 1000.0 * 0.5)).abs() < 1e-9);
    assert!((s.waste_cores_s - 0.5).abs() < 1e-9);
}

#[test]
fn config_validation() {
    assert!(CategoryConfig::default().validate().is_ok());
    assert!(CategoryConfig::default().margin(-1.0).validate().is_err());
    assert!(CategoryConfig::default()
        .margin(f64::NAN)
        .validate()
        .is_err());
    assert!(CategoryConfig::default().window(0).validate().is_err());
    assert!(CategoryConfig::default().max_buckets(0).validate().is_err());
    let big = Resources {
        memory_mb: 9000,
        ..Default::default()
    };
    assert!(CategoryConfig::default()
        .first(big)
        .max_memory_mb(1000)
        .validate()
        .is_err());
    let e: Result<CategoryConfig, _> = serde_json::from_str(r#"{"mode":"sometimes"}"#);
    assert!(e.is_err());
    let e: Result<CategoryConfig, _> = serde_json::from_str(r#"{"maximum":3}"#);
    assert!(e.is_err());
    let ok: CategoryConfig = serde_json::from_str(r#"{"mode":"max"}"#).unwrap();
    assert_eq!(ok.mode, AllocationMode::Max);
    assert_eq!(ok.window, 2048);
}

/// Buckets that come out the same clustering after clustering are
/// clustered ever less often (a million-task run spent ~25 us per task in
/// k-means), and a sample past every bucket brings the usual pace back.
#[test]
fn settled_buckets_are_clustered_less_often() {
    use rand::{Rng, SeedableRng};
    let w = worker();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut c = CategoryState::new("settled", CategoryConfig::bucketing());
    let window = c.config().window;
    for _ in 0..20 * window {
        c.record(mem(500.0 * rng.gen_range(0.95..1.05)), &w);
    }
    let settled = c.stats.clusterings;
    let every_quarter = (20 * window / (window / 4)) as u64;
    assert!(
        settled * 4 < every_quarter,
        "{settled} clusterings, against {every_quarter} at a quarter window each"
    );
    // The tasks change: a sample no bucket covers resets the pace.
    c.record(mem(5000.0), &w);
    assert_eq!(c.stable_clusterings, 0);
}

/// Samples of `modes` (MB centre, count), each spread ±5% around its
/// centre, interleaved as a workflow would produce them.
fn modes_of(modes: &[(f64, usize)], wall_s: f64) -> Vec<Sample> {
    let n: usize = modes.iter().map(|m| m.1).sum();
    let mut left: Vec<usize> = modes.iter().map(|m| m.1).collect();
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        let m = i % modes.len();
        if left[m] > 0 {
            let (centre, count) = modes[m];
            let j = count - left[m];
            let spread = ((j * 7) % 11) as f64 / 10.0 - 0.5; // -0.5..0.5
            out.push(Sample {
                wall_s,
                ..mem(centre * (1.0 + 0.1 * spread))
            });
            left[m] -= 1;
        }
        i += 1;
    }
    out
}

fn buckets_for(samples: &[Sample]) -> (Vec<Resources>, Resources) {
    let w = worker();
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    for s in samples {
        c.record(*s, &w);
    }
    c.rebuild();
    (
        c.bucket_allocations(),
        fixed(c.first(&Resources::default(), &w)),
    )
}

#[test]
fn k_follows_the_data_three_modes_three_buckets() {
    let (b, first) = buckets_for(&modes_of(&[(300.0, 60), (1500.0, 30), (3800.0, 10)], 10.0));
    assert_eq!(b.len(), 3, "{b:?}");
    assert!(
        first.memory_mb < 400,
        "starts in the small bucket: {first:?}"
    );
}

#[test]
fn k_follows_the_data_one_mode_one_bucket() {
    let (b, first) = buckets_for(&modes_of(&[(800.0, 100)], 10.0));
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(first.memory_mb < 1000, "{first:?}");
}

#[test]
fn k_follows_the_data_two_modes_two_buckets() {
    let (b, first) = buckets_for(&modes_of(&[(200.0, 70), (2500.0, 30)], 10.0));
    assert_eq!(b.len(), 2, "{b:?}");
    assert!(first.memory_mb < 300, "{first:?}");
}

/// Uniform draws from `modes` (low MB, high MB, weight), a fixed LCG so the
/// test is the same everywhere.
fn drawn(modes: &[(f64, f64, f64)], n: usize, seed: u64) -> Vec<Sample> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let total: f64 = modes.iter().map(|m| m.2).sum();
    (0..n)
        .map(|_| {
            let mut u = next() * total;
            let mut pick = modes[modes.len() - 1];
            for m in modes {
                if u < m.2 {
                    pick = *m;
                    break;
                }
                u -= m.2;
            }
            let wall_s = 1.0 + next();
            Sample {
                wall_s,
                ..mem(pick.0 + (pick.1 - pick.0) * next())
            }
        })
        .collect()
}

#[test]
fn k_follows_the_data_on_w4_and_three_random_modes() {
    for seed in 1..=5 {
        let w4 = drawn(&[(300.0, 600.0, 0.7), (2500.0, 4000.0, 0.3)], 120, seed);
        let (b, first) = buckets_for(&w4);
        assert_eq!(b.len(), 2, "W4, seed {seed}: {b:?}");
        assert!(first.memory_mb < 1000, "W4 starts small: {first:?}");
        let three = drawn(
            &[
                (150.0, 250.0, 0.4),
                (1200.0, 1500.0, 0.35),
                (3200.0, 3800.0, 0.25),
            ],
            120,
            seed,
        );
        let (b, first) = buckets_for(&three);
        assert_eq!(b.len(), 3, "three modes, seed {seed}: {b:?}");
        assert!(first.memory_mb < 400, "three modes start small: {first:?}");
    }
}

/// Tasks that grow in place a moment after they start lose little when
/// they start in a bucket too small for them: with that measured, the cost
/// model cuts the big mode finer (each big task books closer to its own
/// peak), still starting in the small bucket.
#[test]
fn misses_that_grow_early_make_finer_buckets() {
    let w = worker();
    let w4 = drawn(&[(300.0, 600.0, 0.7), (2500.0, 4000.0, 0.3)], 120, 3);
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    for s in &w4 {
        c.record(*s, &w);
    }
    c.rebuild();
    let coarse = c.bucket_allocations();
    for _ in 0..10 {
        c.note_growth_age(0.1);
    }
    c.rebuild();
    let fine = c.bucket_allocations();
    assert_eq!(coarse.len(), 2, "{coarse:?}");
    assert!(fine.len() > coarse.len(), "{fine:?}");
    let first = fixed(c.first(&Resources::default(), &w));
    assert!(first.memory_mb < 1000, "{first:?}");
}

/// A category on [`worker`] whose window is `samples` (cores, MB), each of
/// 1 s, for calling the retry ladder's choice directly.
fn ladder_category(samples: &[(f64, f64, usize)]) -> CategoryState {
    let mut c = CategoryState::new("a", CategoryConfig::bucketing());
    c.largest = worker();
    for &(cores, mb, n) in samples {
        for _ in 0..n {
            c.push(Sample {
                cores,
                memory_mb: mb,
                disk_mb: 0.0,
                wall_s: 1.0,
            });
            c.ok_time.add(1.0);
        }
    }
    c
}

fn rung(cores: u32, memory_mb: u64) -> Resources {
    Resources {
        cores,
        memory_mb,
        disk_mb: 0,
        gpus: 0,
    }
}

/// The ladder charges what bucket choice charges: the worker-time of the
/// resource that runs out first over all the tasks, not each attempt's
/// dominant share. 4-core rungs of 2,200 and 5,500 MB on a 12-core,
/// 12,000 MB worker; 20 tasks of 2,000 MB and 10 of 5,000 MB above the
/// kill. Starting at 2,200 holds 13.3 worker-seconds of cores (the binding
/// total; memory 10.1), starting at 5,500 holds 13.75 of memory. Summed
/// dominant shares (the old model) said the opposite: 2,200 first cost
/// 14.6, since each miss was charged its cores and then its memory.
#[test]
fn retry_rung_is_chosen_by_the_resource_that_runs_out_first() {
    let c = ladder_category(&[(1.0, 300.0, 40), (4.0, 2000.0, 20), (4.0, 5000.0, 10)]);
    let rungs = [rung(4, 2200), rung(4, 5500)];
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[0]));
    // Mostly big ones: the top rung, as before.
    let c = ladder_category(&[(1.0, 300.0, 40), (4.0, 2000.0, 10), (4.0, 5000.0, 10)]);
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[1]));
}

/// A task fits a rung as it fits a bucket: when its peak plus the margin
/// does. Tasks of 2,100 MB would be killed near a 2,200 MB limit (the
/// monitor samples); the bare peak counted them as fitting, so the ladder
/// sent every retry there.
#[test]
fn retry_rung_fits_with_the_margin_as_buckets_do() {
    let c = ladder_category(&[(1.0, 300.0, 40), (1.0, 2100.0, 20)]);
    let rungs = [rung(1, 2200), rung(1, 2400)];
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[1]));
    let c = ladder_category(&[(1.0, 300.0, 40), (1.0, 1950.0, 20)]);
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[0]));
}

/// Growth counts as a miss, with what it cost: where misses grow in place
/// a moment after they start, trying the smaller rung first is cheap and
/// the ladder does; where a miss costs a whole run (no growth or kill
/// measured yet), it goes straight to the rung that holds most of them.
#[test]
fn retry_rung_follows_how_much_a_miss_costs() {
    let mut c = ladder_category(&[(1.0, 300.0, 40), (1.0, 2000.0, 5), (1.0, 5000.0, 10)]);
    let rungs = [rung(1, 2200), rung(1, 5500)];
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[1]));
    for _ in 0..10 {
        c.note_growth_age(0.05);
    }
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 400), Some(rungs[0]));
    // Nothing seen above the kill: the smallest rung.
    assert_eq!(c.cheapest_rung(&rungs, Dim::Memory, 6000), Some(rungs[0]));
}
