//! Cost of learning: 100,000 samples fed to one bucketing category (window
//! 2,048, re-clustered every 512 new samples once the window is full), then
//! the cost of asking for an allocation. Prints one JSON line.
//!
//! `cargo bench -p drover-master --bench alloc`

use std::hint::black_box;
use std::time::Instant;

use drover_master::category::{CategoryConfig, CategoryState, Sample};
use drover_master::Resources;

/// Deterministic generator (a 64-bit LCG), so runs are comparable.
struct Gen(u64);

impl Gen {
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::args()
        .skip_while(|a| a != "--samples")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let largest = Resources {
        cores: 12,
        memory_mb: 12_000,
        disk_mb: 100_000,
        gpus: 0,
    };
    let mut c = CategoryState::new("bench", CategoryConfig::bucketing());
    let mut g = Gen(7);
    let start = Instant::now();
    let mut worst = 0f64;
    for _ in 0..n {
        let memory_mb = if g.unit() < 0.7 {
            300.0 + 300.0 * g.unit()
        } else {
            2500.0 + 1500.0 * g.unit()
        };
        let s = Sample {
            cores: 0.5 + g.unit(),
            memory_mb,
            disk_mb: 10.0 + 100.0 * g.unit(),
            wall_s: 1.0 + g.unit(),
        };
        let t = Instant::now();
        c.record(s, &largest);
        worst = worst.max(t.elapsed().as_secs_f64());
    }
    let learn = start.elapsed().as_secs_f64();
    let none = Resources::default();
    let t = Instant::now();
    for _ in 0..100_000 {
        black_box(c.first(black_box(&none), &largest));
    }
    let ask = t.elapsed().as_secs_f64() / 100_000.0;
    let stats = c.stats(&largest);
    println!(
        "{{\"system\":\"drover\",\"workload\":\"alloc_learning\",\"n\":{n},\"wall_s\":{learn:.3},\"us_per_sample\":{:.2},\"clusterings\":{},\"worst_record_ms\":{:.2},\"first_allocation_ns\":{:.0},\"buckets_mb\":{:?}}}",
        learn * 1e6 / n as f64,
        stats.clusterings,
        worst * 1e3,
        ask * 1e9,
        stats.buckets.iter().map(|b| b.allocation.memory_mb).collect::<Vec<_>>()
    );
}
