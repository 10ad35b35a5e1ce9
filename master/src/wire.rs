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
    encode_frame, encode_frame_with, read_frame_body, Ending, FrameError, MasterMsg, OutputHeader,
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
        if let Some(msg) = decode_task_done_exact(body) {
            return Ok(msg);
        }
        let TaskDoneFields { report, outputs } = serde_json::from_slice(body)?;
        return Ok(WorkerMsg::TaskDone { report, outputs });
    }
    serde_json::from_slice(body)
}

/// A frame body read in order: JSON punctuation and keys are matched as
/// bytes, values are decoded by serde_json from where the cursor stands.
struct Cursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn lit(&mut self, expected: &[u8]) -> Option<()> {
        let rest = self.body.get(self.pos..)?;
        rest.starts_with(expected)
            .then(|| self.pos += expected.len())
    }

    fn value<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        let rest = self.body.get(self.pos..)?;
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<T>();
        let v = values.next()?.ok()?;
        self.pos += values.byte_offset();
        Some(v)
    }

    /// An integer as JSON writes it (no leading zero, no fraction); serde
    /// costs a deserializer per value, several times this.
    fn int<T: TryFrom<i128>>(&mut self) -> Option<T> {
        let rest = self.body.get(self.pos..)?;
        let sign = usize::from(rest.first() == Some(&b'-'));
        let digits = rest[sign..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > 20 || (digits > 1 && rest[sign] == b'0') {
            return None;
        }
        let end = sign + digits;
        if matches!(rest.get(end), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let magnitude = rest[sign..end]
            .iter()
            .fold(0i128, |v, d| v * 10 + i128::from(d - b'0'));
        let v = T::try_from(if sign == 1 { -magnitude } else { magnitude }).ok()?;
        self.pos += end;
        Some(v)
    }

    /// A float as the worker writes it, where that is plain decimal
    /// digits short enough that the value is exact (at most 2^53 with at
    /// most 22 decimals: one correctly rounded division, the same double
    /// serde gives); anything else (an exponent, a sign, more digits) is
    /// left to serde.
    fn float(&mut self) -> Option<f64> {
        let rest = self.body.get(self.pos..)?;
        let int = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if int == 0 || (int > 1 && rest[0] == b'0') {
            return self.value();
        }
        let frac = match rest.get(int) {
            Some(b'.') => rest[int + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count(),
            _ => 0,
        };
        let end = if frac > 0 { int + 1 + frac } else { int };
        if int + frac > 19 || frac > 22 || matches!(rest.get(end), Some(b'.' | b'e' | b'E')) {
            return self.value();
        }
        let significand = rest[..end]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
        if significand > 1 << 53 {
            return self.value();
        }
        self.pos += end;
        Some(significand as f64 / POW10[frac])
    }

    /// `null` or a value.
    fn opt<T>(&mut self, value: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.lit(b"null").is_some() {
            return Some(None);
        }
        value(self).map(Some)
    }

    /// A value whose empty form (`""`, `[]`) is its default, as most
    /// strings and lists of a report are.
    fn or_empty<T: serde::de::DeserializeOwned + Default>(&mut self, empty: &[u8]) -> Option<T> {
        if self.lit(empty).is_some() {
            return Some(T::default());
        }
        self.value()
    }
}

/// Powers of ten that a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// How a task ended, as the worker's serde writes each.
const ENDINGS: [(&[u8], Ending); 6] = [
    (br#""exited""#, Ending::Exited),
    (br#""limit_exceeded""#, Ending::LimitExceeded),
    (br#""wall_time""#, Ending::WallTime),
    (br#""killed""#, Ending::Killed),
    (br#""input_missing""#, Ending::InputMissing),
    (br#""setup_failed""#, Ending::SetupFailed),
];

/// A JSON string with nothing in it.
const EMPTY_STRING: &[u8] = b"\"\"";

/// A `task_done` body with exactly the keys, in the order and spelling,
/// that the worker's serde writes; `None` at the first difference (another
/// order, a field added on either side, whitespace), and the caller takes
/// serde's path, which means the same. Each of the ~24 keys serde decoded
/// as a string (UTF-8 checked, then matched against every field name) was
/// most of the master's decoding cost per task (issue 22).
fn decode_task_done_exact(body: &[u8]) -> Option<WorkerMsg> {
    let mut c = Cursor { body, pos: 0 };
    c.lit(br#"{"type":"task_done","report":{"task_id":"#)?;
    let task_id = c.int()?;
    c.lit(br#","attempt":"#)?;
    let attempt = c.int()?;
    c.lit(br#","ending":"#)?;
    let ending = match ENDINGS.iter().find(|(text, _)| c.lit(text).is_some()) {
        Some(&(_, ending)) => ending,
        None => c.value()?,
    };
    let mut r = TaskReport::never_started(task_id, attempt, ending, 0);
    c.lit(br#","exit_code":"#)?;
    r.exit_code = c.opt(Cursor::int)?;
    c.lit(br#","signal":"#)?;
    r.signal = c.opt(Cursor::int)?;
    c.lit(br#","stdout":"#)?;
    r.stdout = c.or_empty(EMPTY_STRING)?;
    c.lit(br#","stderr":"#)?;
    r.stderr = c.or_empty(EMPTY_STRING)?;
    let m = &mut r.measured;
    c.lit(br#","measured":{"wall_time_s":"#)?;
    m.wall_time_s = c.float()?;
    c.lit(br#","cpu_time_s":"#)?;
    m.cpu_time_s = c.float()?;
    c.lit(br#","memory_mb":"#)?;
    m.memory_mb = c.float()?;
    c.lit(br#","disk_mb":"#)?;
    m.disk_mb = c.float()?;
    c.lit(br#","cores":"#)?;
    m.cores = c.float()?;
    c.lit(br#","summary":"#)?;
    m.summary = c.opt(Cursor::value)?;
    c.lit(br#"},"limit_exceeded":"#)?;
    r.limit_exceeded = c.opt(Cursor::value)?;
    c.lit(br#","missing_outputs":"#)?;
    r.missing_outputs = c.or_empty(b"[]")?;
    c.lit(br#","error":"#)?;
    r.error = c.opt(Cursor::value)?;
    c.lit(br#","started_ms":"#)?;
    r.started_ms = c.int()?;
    c.lit(br#"},"outputs":"#)?;
    let outputs = c.or_empty(b"[]")?;
    c.lit(b"}")?;
    (c.pos == body.len()).then_some(())?;
    Some(WorkerMsg::TaskDone {
        report: Box::new(r),
        outputs,
    })
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

    /// Every field of a report set (escapes, nulls and values, a summary),
    /// as the worker writes it, takes the exact path and decodes to what
    /// serde gives. A field added to `TaskReport`, `Measured` or `TaskDone`
    /// makes the exact path give up (this fails): add it to
    /// `decode_task_done_exact` in serde's order.
    #[test]
    fn task_done_exact_path_decodes_every_field() {
        let mut full = report();
        full.exit_code = Some(-3);
        full.signal = Some(9);
        full.stderr = "é\n\u{1}".into();
        full.measured = drover_protocol::Measured {
            wall_time_s: 0.1 + 0.2,
            cpu_time_s: 1e-7,
            memory_mb: 123.5,
            disk_mb: 4.0,
            cores: 1.25,
            summary: Some(serde_json::json!({"peak": [1, 2]})),
        };
        full.limit_exceeded = Some(drover_protocol::LimitHit {
            resource: "memory".into(),
            limit: 100.0,
            value: 101.5,
        });
        full.missing_outputs = vec!["a".into(), "b\"c".into()];
        full.error = Some("boom".into());
        full.started_ms = u64::MAX;
        for (report, outputs) in [
            (report(), Vec::new()),
            (
                full,
                vec![OutputHeader {
                    name: "o".into(),
                    size: 1 << 40,
                }],
            ),
        ] {
            let msg = WorkerMsg::TaskDone {
                report: Box::new(report),
                outputs,
            };
            let mut frame = Vec::new();
            encode_frame(&msg, &mut frame).unwrap();
            let body = &frame[4..];
            assert_eq!(decode_task_done_exact(body), Some(msg.clone()));
            assert_eq!(serde_json::from_slice::<WorkerMsg>(body).unwrap(), msg);
            // Anything after the object, or a key out of place, is left to serde.
            let mut trailing = body.to_vec();
            trailing.extend_from_slice(b" x");
            assert_eq!(decode_task_done_exact(&trailing), None);
            let text = String::from_utf8(body.to_vec()).unwrap();
            let swapped = text.replace(r#""attempt""#, r#""attempT""#);
            assert_eq!(decode_task_done_exact(swapped.as_bytes()), None);
            // Numbers JSON does not allow, or that do not fit, are serde's to refuse.
            for bad in [r#""task_id":07,"#, r#""task_id":7.0,"#, r#""task_id":-7,"#] {
                let bad = text.replace(r#""task_id":7,"#, bad);
                assert_eq!(decode_task_done_exact(bad.as_bytes()), None, "{bad}");
            }
        }
    }

    /// The float fast path gives serde's double, bit for bit, or leaves
    /// the number to serde.
    #[test]
    fn floats_decode_to_what_serde_gives() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut texts: Vec<String> = [
            "0",
            "0.0",
            "100.0",
            "0.001",
            "1e-7",
            "-1.5",
            "00.5",
            "1.",
            "4.0e2",
            "7.25E1",
            "9007199254740993.0",
            "12345678901234567890.5",
            "0.30000000000000004",
        ]
        .map(String::from)
        .to_vec();
        for _ in 0..20_000 {
            let scale = if rng.gen_bool(0.5) { 1.0 } else { 1e-9 };
            let x: f64 = rng.gen_range(0.0..1e6) * scale;
            texts.push(serde_json::to_string(&x).unwrap());
            texts.push(format!("{x:.3}"));
        }
        for t in texts {
            let body = format!("{t},");
            let mut c = Cursor {
                body: body.as_bytes(),
                pos: 0,
            };
            let ours = c.float();
            let serdes = serde_json::from_str::<f64>(&t).ok();
            assert_eq!(ours.map(f64::to_bits), serdes.map(f64::to_bits), "{t}");
            if ours.is_some() {
                assert_eq!(&body[c.pos..], ",", "{t}");
            }
        }
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
