//! End-to-end tests against the real `drover catalog` and `drover status`.
//!
//! A test-only reporter stands in for a master here: a thread calling
//! `client::send_report` with changing counts, exactly what a master does
//! every 15 s, so the catalog is tested without building the master. The full
//! test with a real master and real workers is the workspace's
//! `tests/catalog.rs`.

mod catalog_helpers;
mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_catalog::client;
use drover_catalog::report::{MasterReport, WorkerSummary};

use catalog_helpers::{master, wait_until, Catalog, BIN};

fn status_cmd(catalog: &Catalog, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["status", "--catalog", &catalog.addr])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn master_report_is_found_shown_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::start(&["--expiry-secs", "2"], &dir.path().join("s.json"));

    // The stand-in master: reports every 100 ms with more tasks done.
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let (stop, addr) = (stop.clone(), cat.addr.clone());
        std::thread::spawn(move || {
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) {
                client::send_report(&addr, &master("genome-assembly", 9123, done)).unwrap();
                client::send_report(&addr, &master("other-project", 9124, 1)).unwrap();
                done = (done + 1).min(100);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // A worker looks the master up by project name.
    let found = wait_until("master in catalog", Duration::from_secs(10), || {
        client::find_master(&cat.addr, "^genome").unwrap()
    });
    assert_eq!(found.project, "genome-assembly");
    assert_eq!(found.address(), "127.0.0.1:9123");
    assert_eq!(found.source_addr, "127.0.0.1");
    assert_eq!(
        found.categories[0].allocation.as_deref(),
        Some("bucketing: 3 buckets")
    );
    let first_done = found.tasks_done;
    wait_until("counts to change", Duration::from_secs(10), || {
        let now = client::find_master(&cat.addr, "^genome").unwrap()?;
        (now.tasks_done > first_done).then_some(())
    });
    assert_eq!(client::query(&cat.addr, None).unwrap().len(), 2);
    assert_eq!(
        client::query(&cat.addr, Some("nothing-like-it")).unwrap(),
        vec![]
    );
    let err = client::query(&cat.addr, Some("(unclosed")).unwrap_err();
    assert!(format!("{err:#}").contains("400"), "{err:#}");

    // `status` shows it as a table and as JSON.
    let table = status_cmd(&cat, &["--project", "genome"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PROJECT"), "{table}");
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[1].starts_with("genome-assembly"), "{table}");
    assert!(
        lines[1].contains("127.0.0.1") && lines[1].contains("9123"),
        "{table}"
    );
    let json: Vec<MasterReport> = serde_json::from_str(&status_cmd(&cat, &["--json"])).unwrap();
    assert_eq!(json.len(), 2);

    // The master stops reporting: after the expiry it is gone.
    stop.store(true, Ordering::Relaxed);
    reporter.join().unwrap();
    let stopped = Instant::now();
    wait_until("entry to expire", Duration::from_secs(10), || {
        client::query(&cat.addr, None)
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert!(stopped.elapsed() >= Duration::from_millis(900));
    assert!(client::find_master(&cat.addr, "genome").unwrap().is_none());
    assert_eq!(status_cmd(&cat, &[]).lines().count(), 1);
    wait_until("the sweep to count it", Duration::from_secs(5), || {
        (cat.stats().expired == 2).then_some(())
    });
}

#[test]
fn a_stopped_master_is_not_offered_to_workers() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::start(&[], &dir.path().join("s.json"));
    let mut r = master("proj", 1, 0);
    client::post_report(&cat.addr, &r).unwrap();
    assert!(client::find_master(&cat.addr, "^proj$").unwrap().is_some());
    r.stopped = true;
    client::post_report(&cat.addr, &r).unwrap();
    assert!(client::find_master(&cat.addr, "^proj$").unwrap().is_none());
    assert!(status_cmd(&cat, &[]).contains("proj (stopped)"));
}

#[test]
fn restart_keeps_what_has_not_expired() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let cat = Catalog::start(&[], &state);
    client::post_report(&cat.addr, &master("survivor", 7000, 42)).unwrap();
    let before = client::query(&cat.addr, None).unwrap();
    assert!(cat.terminate().success());
    assert!(state.exists());

    let cat = Catalog::start(&[], &state);
    let after = client::query(&cat.addr, None).unwrap();
    assert_eq!(after, before, "same entries, same last_update");

    // A restart with a short expiry drops what is too old to keep.
    assert!(cat.terminate().success());
    std::thread::sleep(Duration::from_millis(1100));
    let cat = Catalog::start(&["--expiry-secs", "1"], &state);
    assert!(client::query(&cat.addr, None).unwrap().is_empty());

    // A corrupt state file does not keep the catalog down.
    drop(cat);
    std::fs::write(&state, b"{ torn").unwrap();
    let cat = Catalog::start(&[], &state);
    assert!(client::query(&cat.addr, None).unwrap().is_empty());
}

fn raw_http(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer and close before reading a huge body.
    let _ = s.write_all(request);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn bad_input_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::start(&["--max-report-bytes", "16384"], &dir.path().join("s.json"));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bad: [&[u8]; 6] = [
        b"",
        b"not json",
        b"[1,2,3]",
        br#"{"project":""}"#,
        br#"{"project":"p","port":70000}"#,
        &[0xff, 0xfe, 0x00, 0x7b],
    ];
    for d in bad {
        udp.send_to(d, &cat.addr).unwrap();
    }
    udp.send_to(&vec![b'{'; 20_000], &cat.addr).unwrap();

    let resp = raw_http(
        &cat.addr,
        b"POST /update HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnot json",
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let mut big =
        b"POST /update HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
            .to_vec();
    big.extend(vec![b' '; 100_000]);
    let resp = raw_http(&cat.addr, &big);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // Chunked, so the size is only known while reading.
    let mut chunked = b"POST /update HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..10 {
        chunked.extend(b"1000\r\n");
        chunked.extend(vec![b' '; 4096]);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let resp = raw_http(&cat.addr, &chunked);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let resp = raw_http(
        &cat.addr,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    let stats = wait_until("drops to be counted", Duration::from_secs(5), || {
        let s = cat.stats();
        (s.dropped_malformed == 7 && s.dropped_oversized == 3).then_some(s)
    });
    assert_eq!(stats.entries, 0);

    // A report too big for one datagram goes by POST and arrives whole
    // (and within this catalog's 16 KiB).
    let mut large = master("many-workers", 1, 0);
    large.workers = (0..60)
        .map(|i| WorkerSummary {
            host: format!("worker-{i:04}.a-rather-long-cluster-domain.example.org"),
            cores: 4,
            memory_mb: 4096,
            running: 1,
            ..Default::default()
        })
        .collect();
    assert!(serde_json::to_vec(&large).unwrap().len() > client::MAX_DATAGRAM_BYTES);
    client::send_report(&cat.addr, &large).unwrap();
    let got = client::find_master(&cat.addr, "many").unwrap().unwrap();
    assert_eq!(got.workers.len(), 60);
    assert_eq!(cat.stats().http_received, 1);

    // Still alive and serving the page.
    let page = String::from_utf8(client::get(&cat.addr, "/").unwrap()).unwrap();
    assert!(page.contains("drover catalog"));
}

#[test]
fn entries_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::start(&["--max-entries", "50"], &dir.path().join("s.json"));
    for i in 0..300 {
        client::post_report(&cat.addr, &master(&format!("p{i}"), 1, 0)).unwrap();
    }
    let s = cat.stats();
    assert_eq!(s.entries, 50);
    // Every entry reported within the last minute, so none is pushed out
    // for a newcomer: the flood is what gets refused.
    assert_eq!(s.evicted, 0);
    assert_eq!(s.refused_full, 250);
    let all = client::query(&cat.addr, None).unwrap();
    assert_eq!(all.len(), 50);
    assert!(all.iter().any(|r| r.project == "p0"));
    assert!(!all.iter().any(|r| r.project == "p299"));
}
