//! Property tests of everything that reads bytes from the network, run by
//! `cargo test` so CI runs them: the frame decoder, every message the master
//! and the worker accept (from arbitrary bytes and from valid frames with
//! bytes changed), both halves of the handshake, and the sealed-record
//! reader. None may panic, none may allocate by what a peer declares rather
//! than what it sent, and anything invalid is an error.

use drover_protocol::auth::{Handshake, MasterHandshake, PeerHandshake, Step};
use drover_protocol::stream::{End, MacReader, SessionKeys};
use drover_protocol::{
    read_frame_within, Ending, FrameError, Hello, InputRef, MasterMsg, Measured, OutputHeader,
    Resources, RunTask, TaskReport, WorkerMsg, HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use proptest::prelude::*;
use tokio::io::AsyncReadExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
}

/// One valid message of every kind each side sends.
fn worker_msgs() -> Vec<WorkerMsg> {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        drover_version: "0.1.0".into(),
        hostname: "node1".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        resources: Resources {
            cores: 4,
            memory_mb: 8000,
            disk_mb: 1000,
            gpus: 1,
        },
        password: true,
        cached: vec!["b3-aa".into()],
    };
    let report = TaskReport {
        stdout: "out\n".into(),
        exit_code: Some(0),
        measured: Measured {
            wall_time_s: 1.5,
            cpu_time_s: 1.0,
            memory_mb: 12.0,
            ..Measured::default()
        },
        ..TaskReport::never_started(7, 1, Ending::Exited, 123)
    };
    vec![
        WorkerMsg::Hello(Box::new(hello)),
        WorkerMsg::AuthProof {
            nonce: "ab".repeat(32),
            proof: "cd".repeat(32),
        },
        WorkerMsg::Pong,
        WorkerMsg::DiskFree { free_mb: 512 },
        WorkerMsg::Recalled {
            task_id: 3,
            attempt: 2,
            given_back: true,
        },
        WorkerMsg::TaskDone {
            report: Box::new(report),
            outputs: vec![OutputHeader {
                name: "out.txt".into(),
                size: 10,
            }],
        },
        WorkerMsg::Rejected {
            task_id: 1,
            attempt: 1,
            reason: "no room".into(),
        },
        WorkerMsg::Started {
            task_id: 1,
            attempt: 1,
        },
        WorkerMsg::Exited {
            task_id: 2,
            attempt: 1,
        },
        WorkerMsg::Grow {
            task_id: 1,
            attempt: 1,
            limit_mb: 100.0,
            used_mb: 99.0,
        },
        WorkerMsg::Goodbye {
            reason: "idle".into(),
        },
        WorkerMsg::Cached {
            ids: vec!["b3-aa".into(), "b3-bb".into()],
        },
        WorkerMsg::StatusQuery {
            protocol: PROTOCOL_VERSION,
            password: false,
        },
    ]
}

fn master_msgs() -> Vec<MasterMsg> {
    let run = RunTask {
        task_id: 3,
        attempt: 1,
        command: "echo hi > out.txt".into(),
        env: vec![("A".into(), "1".into())],
        inputs: vec![InputRef {
            file_id: "b3-aa".into(),
            name: "in.txt".into(),
            cached: true,
        }],
        outputs: vec!["out.txt".into()],
        allocation: Resources {
            cores: 1,
            memory_mb: 100,
            disk_mb: 10,
            gpus: 0,
        },
        enforce_limits: true,
        wall_time_s: Some(60.0),
        environment: None,
        growable: true,
        queued: false,
        call: Some(drover_protocol::FunctionCall {
            payload: vec![0u8, 1, 255].into(),
            modules: vec!["numpy".into()],
        }),
    };
    vec![
        MasterMsg::Challenge {
            nonce: "ab".repeat(32),
        },
        MasterMsg::Welcome {
            proof: Some("cd".repeat(32)),
            keepalive_interval_s: 10.0,
        },
        MasterMsg::Refused {
            reason: "wrong password".into(),
        },
        MasterMsg::PutFile {
            id: "b3-aa".into(),
            size: 5,
            cache: true,
        },
        MasterMsg::Run(Box::new(run)),
        MasterMsg::Kill {
            task_id: 3,
            attempt: 1,
        },
        MasterMsg::Grow {
            task_id: 3,
            attempt: 1,
            allocation: None,
        },
        MasterMsg::Ping,
        MasterMsg::Shutdown,
        MasterMsg::Recall {
            task_id: 3,
            attempt: 2,
        },
    ]
}

fn framed(json: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json);
    out
}

/// A valid frame of either side with some bytes changed, cut or added.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for m in worker_msgs() {
        frames.push(framed(&serde_json::to_vec(&m).expect("encode")));
    }
    for m in master_msgs() {
        frames.push(framed(&serde_json::to_vec(&m).expect("encode")));
    }
    (
        proptest::sample::select(frames),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        any::<prop::sample::Index>(),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(mut f, flips, cut, tail)| {
            for (at, byte) in flips {
                let i = at.index(f.len());
                f[i] = byte;
            }
            f.truncate(cut.index(f.len() + 1));
            f.extend_from_slice(&tail);
            f
        })
}

/// Feeds `bytes` to the frame decoder under `cap` and decodes as `T`;
/// checks the rules every result must keep.
fn decode<T: serde::de::DeserializeOwned>(rt: &tokio::runtime::Runtime, bytes: &[u8], cap: u32) {
    let mut buf = Vec::new();
    let mut reader = bytes;
    let got: Result<T, FrameError> = rt.block_on(read_frame_within(&mut reader, &mut buf, cap));
    // Memory follows what arrived, not what the length prefix claimed.
    assert!(
        buf.capacity() <= 2 * bytes.len() + 64,
        "{} bytes held for {} received",
        buf.capacity(),
        bytes.len()
    );
    if bytes.len() >= 4 {
        let declared = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if declared > cap {
            assert!(matches!(got, Err(FrameError::TooLarge { .. })));
        } else if (bytes.len() - 4) < declared as usize {
            assert!(matches!(got, Err(FrameError::Closed)));
        }
    } else {
        assert!(matches!(got, Err(FrameError::Closed)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let rt = runtime();
        for cap in [HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES] {
            decode::<WorkerMsg>(&rt, &bytes, cap);
            decode::<MasterMsg>(&rt, &bytes, cap);
        }
        let _ = serde_json::from_slice::<WorkerMsg>(&bytes);
        let _ = serde_json::from_slice::<MasterMsg>(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic_and_decode_only_to_what_they_say(bytes in mutated_frame()) {
        let rt = runtime();
        for cap in [HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES] {
            decode::<WorkerMsg>(&rt, &bytes, cap);
            decode::<MasterMsg>(&rt, &bytes, cap);
        }
        // What decodes re-encodes to a message that decodes to itself.
        if bytes.len() > 4 {
            if let Ok(m) = serde_json::from_slice::<WorkerMsg>(&bytes[4..]) {
                let again: WorkerMsg = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
                prop_assert_eq!(again, m);
            }
        }
    }

    #[test]
    fn both_handshakes_take_any_message_without_panicking(bytes in mutated_frame()) {
        if bytes.len() < 4 {
            return Ok(());
        }
        if let Ok(msg) = serde_json::from_slice::<WorkerMsg>(&bytes[4..]) {
            for pw in [None, Some(&b"pw"[..])] {
                let mut master = MasterHandshake::new(pw, 1.0);
                // Fed twice: the second lands in whatever state the first left.
                for _ in 0..2 {
                    if let Step::Fail { .. } | Step::Finish { .. } = master.step(msg.clone()) {
                        break;
                    }
                }
            }
        }
        if let Ok(msg) = serde_json::from_slice::<MasterMsg>(&bytes[4..]) {
            for pw in [None, Some(&b"pw"[..])] {
                let (mut worker, _) = PeerHandshake::worker(pw, worker_hello(), Vec::new());
                let _ = worker.step(msg.clone());
                let (mut status, _) = PeerHandshake::status(pw);
                let _ = status.step(msg.clone());
            }
        }
    }

    #[test]
    fn sealed_records_from_anyone_without_the_key_yield_nothing(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..600), mutated_frame()]
    ) {
        let rt = runtime();
        let keys = SessionKeys::derive(b"pw", "m", "w");
        let mut reader = MacReader::new(&bytes[..], keys, End::Worker);
        let mut out = Vec::new();
        let got = rt.block_on(reader.read_to_end(&mut out));
        // Only an empty stream reads cleanly; nothing forged comes out.
        prop_assert!(out.is_empty());
        prop_assert_eq!(got.is_ok(), bytes.is_empty());
    }
}

fn worker_hello() -> Hello {
    match worker_msgs().remove(0) {
        WorkerMsg::Hello(h) => *h,
        _ => unreachable!("the first sample is a hello"),
    }
}
