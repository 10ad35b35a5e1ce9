//! The master's decoding of worker frames and encoding of its own, with a
//! fast path for the two messages that go once per task each way.
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

use std::io;

use drover_protocol::{
    encode_frame, encode_frame_with, read_frame_body, FrameError, MasterMsg, OutputHeader,
    Resources, RunTask, TaskReport, WorkerMsg, MAX_FRAME_BYTES,
};
use serde::{Deserialize, Serialize};
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

/// Appends one frame holding `msg` to `out`, as `drover_protocol::encode_frame`
/// does and with the same bytes. A `run` frame, one per task, is written
/// field by field: serde_json escapes every key of a struct at run time
/// (about twenty per `run`), which made encoding `run` the largest part of
/// the master's per-task encoding cost in the scale bench (issue 22).
pub(crate) fn encode_master_frame(msg: &MasterMsg, out: &mut Vec<u8>) -> io::Result<()> {
    match msg {
        MasterMsg::Run(run) => {
            encode_frame_with(out, |out| encode_run(run, out).map_err(io::Error::other))
        }
        _ => encode_frame(msg, out),
    }
}

/// Writes `key` (JSON punctuation and name, written as is) and then `v` as
/// serde_json does (strings escaped, numbers as ryu/itoa give them).
fn field<T: Serialize + ?Sized>(out: &mut Vec<u8>, key: &[u8], v: &T) -> serde_json::Result<()> {
    out.extend_from_slice(key);
    serde_json::to_writer(&mut *out, v)
}

/// The body of a `run` frame, in the order serde writes the fields of
/// [`RunTask`] (the test below holds the two to the same bytes, so a field
/// added to `RunTask` and not here fails it).
fn encode_run(r: &RunTask, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let RunTask {
        task_id,
        attempt,
        command,
        env,
        inputs,
        outputs,
        allocation,
        enforce_limits,
        wall_time_s,
        environment,
        growable,
        queued,
        call,
    } = r;
    field(out, br#"{"type":"run","task_id":"#, task_id)?;
    field(out, br#","attempt":"#, attempt)?;
    field(out, br#","command":"#, command)?;
    field(out, br#","env":"#, env)?;
    out.extend_from_slice(br#","inputs":["#);
    for (i, input) in inputs.iter().enumerate() {
        let open: &[u8] = if i == 0 {
            br#"{"file_id":"#
        } else {
            br#",{"file_id":"#
        };
        field(out, open, &input.file_id)?;
        field(out, br#","name":"#, &input.name)?;
        field(out, br#","cached":"#, &input.cached)?;
        out.push(b'}');
    }
    field(out, br#"],"outputs":"#, outputs)?;
    let Resources {
        cores,
        memory_mb,
        disk_mb,
        gpus,
    } = allocation;
    field(out, br#","allocation":{"cores":"#, cores)?;
    field(out, br#","memory_mb":"#, memory_mb)?;
    field(out, br#","disk_mb":"#, disk_mb)?;
    field(out, br#","gpus":"#, gpus)?;
    field(out, br#"},"enforce_limits":"#, enforce_limits)?;
    field(out, br#","wall_time_s":"#, wall_time_s)?;
    field(out, br#","environment":"#, environment)?;
    field(out, br#","growable":"#, growable)?;
    field(out, br#","queued":"#, queued)?;
    field(out, br#","call":"#, call)?;
    out.push(b'}');
    Ok(())
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

    /// A `run` frame written field by field is byte for byte what serde
    /// writes, with every field set (and escapes, a float, empty lists), and
    /// other messages are serde's.
    #[test]
    fn run_fast_path_writes_what_serde_writes() {
        let full = RunTask {
            task_id: u64::MAX,
            attempt: 3,
            command: "echo \"a\tb\" \u{1} é > out.txt".into(),
            env: vec![("K".into(), "v\n".into()), ("X".into(), String::new())],
            inputs: vec![
                drover_protocol::InputRef {
                    file_id: "c-1".into(),
                    name: "in/a b".into(),
                    cached: true,
                },
                drover_protocol::InputRef {
                    file_id: "u-1-1-1".into(),
                    name: "x".into(),
                    cached: false,
                },
            ],
            outputs: vec!["out.txt".into(), "o\"2".into()],
            allocation: Resources {
                cores: 2,
                memory_mb: 1 << 40,
                disk_mb: 5,
                gpus: 1,
            },
            enforce_limits: true,
            wall_time_s: Some(0.1 + 0.2),
            environment: Some("env-1".into()),
            growable: true,
            queued: true,
            call: Some(drover_protocol::FunctionCall {
                payload: b"\x80\x05call".to_vec().into(),
                modules: vec!["numpy".into()],
            }),
        };
        let bare = RunTask {
            task_id: 0,
            attempt: 1,
            command: String::new(),
            env: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            allocation: Resources::default(),
            enforce_limits: false,
            wall_time_s: None,
            environment: None,
            growable: false,
            queued: false,
            call: None,
        };
        for msg in [
            MasterMsg::Run(Box::new(full)),
            MasterMsg::Run(Box::new(bare)),
            MasterMsg::Ping,
        ] {
            let (mut ours, mut serdes) = (b"prefix".to_vec(), b"prefix".to_vec());
            encode_master_frame(&msg, &mut ours).unwrap();
            encode_frame(&msg, &mut serdes).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&serdes)
            );
        }
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
