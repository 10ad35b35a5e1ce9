//! The flood test, in its own test binary so that it does not share the two
//! cores with the other end-to-end tests while it measures.

mod catalog_helpers;
mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog_helpers::{master, Catalog};
use drover_catalog::client;

/// A local client floods 10,000 updates per second for a bounded time, many
/// with new keys so the table stays full and evicting; the page and the JSON
/// must keep answering quickly.
#[test]
fn flood_does_not_stop_the_page() {
    const RATE: u64 = 10_000;
    const SECS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::start(&[], &dir.path().join("s.json"));
    let port = cat.port();

    // Built ahead so the sender, not JSON encoding, sets the pace.
    let payloads: Vec<Vec<u8>> = (0..5000)
        .map(|i| serde_json::to_vec(&master(&format!("flood-{i}"), 1, i % 100)).unwrap())
        .collect();
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let target = ("127.0.0.1", port);
            let start = Instant::now();
            let mut sent = 0u64;
            // Paced in 10 ms slices so the rate is what it says.
            while start.elapsed() < Duration::from_secs(SECS) {
                let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
                while sent < due {
                    let p = &payloads[(sent % payloads.len() as u64) as usize];
                    let _ = sock.send_to(p, target);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            flooding.store(false, Ordering::Relaxed);
            sent
        })
    };

    let mut latencies = Vec::new();
    while flooding.load(Ordering::Relaxed) {
        for path in ["/", "/query.json", "/api/projects?project=flood-1"] {
            let t = Instant::now();
            let body = client::get(&cat.addr, path).expect("page answers during the flood");
            latencies.push(t.elapsed());
            assert!(!body.is_empty());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = flooder.join().unwrap();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let stats = cat.stats();
    eprintln!(
        "flood: sent {sent} datagrams in {SECS} s, catalog took {} ({} dropped by the kernel or in flight), entries {}, evicted {}; \
         {} page/JSON requests during the flood: p50 {:?}, p99 {:?}, max {:?}",
        stats.udp_received,
        sent.saturating_sub(stats.udp_received),
        stats.entries,
        stats.evicted,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
    );
    assert!(sent >= RATE * SECS * 9 / 10, "flooder only sent {sent}");
    assert!(latencies.len() >= 10);
    assert!(stats.entries <= 1000);
    // Generous for an unoptimized build on a loaded 2-core CI machine; the
    // release build answers in milliseconds.
    assert!(pct(0.99) < Duration::from_secs(1), "p99 {:?}", pct(0.99));
}
