//! Start-to-finish cost of one monitored task, started with `Exec`
//! (clone3 into its cgroup, no fork) against `Command` (fork, then a move
//! into the cgroup), alternating in the same loop so that load on the
//! machine hits both alike. Prints one JSON line per command.
//!
//! `cargo bench -p drover-monitor --bench spawn` (env `BENCH_N`, default 40).

use drover_monitor::{Exec, Limits, Monitor};
use serde_json::json;
use std::process::Command;
use std::time::Instant;

fn main() {
    let n: u32 = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let m = Monitor::new(drover_monitor::DEFAULT_INTERVAL);
    let dir = tempfile::tempdir().expect("tempdir");
    for cmdline in ["true", "sleep 0.05"] {
        let (mut exec_spawn, mut exec_total, mut cmd_spawn, mut cmd_total) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..n {
            let t = Instant::now();
            let mut e = Exec::new("/bin/sh");
            e.arg("-c").arg(cmdline).current_dir(dir.path());
            let w = m
                .spawn_exec(e, Some(dir.path()), Limits::default())
                .expect("spawn_exec");
            exec_spawn += t.elapsed().as_secs_f64();
            w.wait().expect("wait");
            exec_total += t.elapsed().as_secs_f64();

            let t = Instant::now();
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(cmdline).current_dir(dir.path());
            let w = m
                .spawn(c, Some(dir.path()), Limits::default())
                .expect("spawn");
            cmd_spawn += t.elapsed().as_secs_f64();
            w.wait().expect("wait");
            cmd_total += t.elapsed().as_secs_f64();
        }
        let ms = |s: f64| (s * 1000.0 / n as f64 * 1000.0).round() / 1000.0;
        println!(
            "{}",
            json!({
                "bench": "spawn", "command": cmdline, "n": n, "method": m.method(),
                "exec_spawn_ms": ms(exec_spawn), "exec_total_ms": ms(exec_total),
                "command_spawn_ms": ms(cmd_spawn), "command_total_ms": ms(cmd_total),
                "total_ratio_exec_to_command": (exec_total / cmd_total * 1000.0).round() / 1000.0,
            })
        );
    }
}
