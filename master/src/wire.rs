//! The master's decoding of worker frames, with a fast path for the one
//! message that comes once per task.
//!
//! `WorkerMsg` is an internally tagged enum (`{"type": ..., ...}`). serde
//! decodes such an enum by first buffering the whole object into an
//! intermediate tree, then decoding the variant from that tree: for a
//! `task_done` frame this doubled the parsing and allocated every string
//! twice, and it was the largest single cost of the master's I/O thread in
//! the scale bench (issue 22). The worker writes the tag first (serde
//! serializes the tag before the fields), so a frame that starts with the
//! `task_done` tag is decoded straight into its fields; anything else,
//! including a `task_done` written in another key order, takes the general
//! path and means the same.

use drover_protocol::{
    read_frame_body, FrameError, OutputHeader, TaskReport, WorkerMsg, MAX_FRAME_BYTES,
};
use serde::Deserialize;
use tokio::io::AsyncRead;

/// The fields of [`WorkerMsg::TaskDone`]; the `type` key is ignored.
#[derive(Deserialize)]
struct TaskDoneFields {
    report: Box<TaskReport>,
    outputs: Vec<OutputHeader>,
}

const TASK_DONE_PREFIX: &[u8] = br#"{"type":"task_done","#;

/// Decodes one worker frame body.
pub(crate) fn decode_worker_msg(body: &[u8]) -> Result<WorkerMsg, serde_json::Error> {
    if body.starts_with(TASK_DONE_PREFIX) {
        let TaskDoneFields { report, outputs } = serde_json::from_slice(body)?;
        return Ok(WorkerMsg::TaskDone { report, outputs });
    }
    serde_json::from_slice(body)
}

/// Reads one length-prefixed frame into `buf` (reused across calls) and
/// decodes it, as `drover_protocol::read_frame` does (same cap, nothing
/// allocated ahead of the bytes that arrive).
pub(crate) async fn read_worker_msg<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<WorkerMsg, FrameError> {
    read_frame_body(reader, buf, MAX_FRAME_BYTES).await?;
    Ok(decode_worker_msg(buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::{encode_frame, Ending};

    fn report() -> TaskReport {
        let mut r = TaskReport::never_started(7, 2, Ending::Exited, 0);
        r.exit_code = Some(0);
        r.stdout = "out \"quoted\"".into();
        r.measured.memory_mb = 123.0;
        r
    }

    /// A frame as the worker writes it takes the fast path and decodes to
    /// exactly what the general decoder gives.
    #[test]
    fn task_done_fast_path_matches_the_general_decoder() {
        let msg = WorkerMsg::TaskDone {
            report: Box::new(report()),
            outputs: vec![OutputHeader {
                name: "out.txt".into(),
                size: 3,
            }],
        };
        let mut frame = Vec::new();
        encode_frame(&msg, &mut frame).unwrap();
        let body = &frame[4..];
        assert!(body.starts_with(TASK_DONE_PREFIX));
        assert_eq!(decode_worker_msg(body).unwrap(), msg);
        assert_eq!(serde_json::from_slice::<WorkerMsg>(body).unwrap(), msg);
    }

    /// Other messages, and a `task_done` with its tag elsewhere, still decode.
    #[test]
    fn other_messages_take_the_general_path() {
        assert_eq!(
            decode_worker_msg(br#"{"type":"pong"}"#).unwrap(),
            WorkerMsg::Pong
        );
        let mut value = serde_json::to_value(WorkerMsg::TaskDone {
            report: Box::new(report()),
            outputs: Vec::new(),
        })
        .unwrap();
        let tag = value.as_object_mut().unwrap().remove("type").unwrap();
        value.as_object_mut().unwrap().insert("type".into(), tag);
        let reordered = serde_json::to_vec(&value).unwrap();
        assert!(!reordered.starts_with(TASK_DONE_PREFIX));
        assert!(matches!(
            decode_worker_msg(&reordered).unwrap(),
            WorkerMsg::TaskDone { .. }
        ));
        assert!(decode_worker_msg(br#"{"type":"task_done","report":1}"#).is_err());
    }
}
