//! Property tests of the master's own worker-frame decoder (`wire`), which
//! has a fast path of its own beside serde's: any bytes, and `task_done`
//! frames with bytes changed, never panic it, and whatever the general
//! decoder accepts, the master decodes to the same message.

use drover_protocol::{Ending, TaskReport, WorkerMsg};
use proptest::prelude::*;

use crate::wire::decode_worker_msg;

fn task_done() -> Vec<u8> {
    let msg = WorkerMsg::TaskDone {
        report: Box::new(TaskReport {
            stdout: "out\n".into(),
            exit_code: Some(0),
            ..TaskReport::never_started(7, 1, Ending::Exited, 123)
        }),
        outputs: vec![drover_protocol::OutputHeader {
            name: "out.txt".into(),
            size: 10,
        }],
    };
    serde_json::to_vec(&msg).expect("encode")
}

fn check(body: &[u8]) {
    let fast = decode_worker_msg(body);
    if let Ok(general) = serde_json::from_slice::<WorkerMsg>(body) {
        assert_eq!(fast.ok(), Some(general));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&body);
    }

    #[test]
    fn changed_task_done_frames_decode_as_the_general_decoder_says(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut body = task_done();
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        body.truncate(cut.index(body.len() + 1).max(body.len() / 2));
        check(&body);
    }
}
