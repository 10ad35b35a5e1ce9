//! The master/worker wire protocol.
//!
//! Every message is a frame: a `u32` big-endian length, then that many bytes
//! of JSON (one [`MasterMsg`] or [`WorkerMsg`], tagged by `type`). File bodies
//! never travel inside frames: a [`MasterMsg::PutFile`] or
//! [`WorkerMsg::TaskDone`] header announces sizes and the raw bytes follow
//! the frame directly, so a file is streamed and never held whole in memory.
//! A frame longer than [`MAX_FRAME_BYTES`] closes the connection, because a
//! peer that sends one is either broken or hostile, and reading it would let
//! it choose how much memory we allocate.
//!
//! Handshake: the worker sends [`WorkerMsg::Hello`]; the master answers
//! [`MasterMsg::Refused`] (version mismatch, password required or wrong) or,
//! when it has a password, [`MasterMsg::Challenge`] with a fresh nonce. The
//! worker answers with its own nonce and `HMAC-SHA256(password, "drover-worker"
//! ‖ master_nonce ‖ worker_nonce)`; the master checks it and proves itself in
//! [`MasterMsg::Welcome`] with `HMAC-SHA256(password, "drover-master" ‖
//! worker_nonce ‖ master_nonce)`. The password never crosses the wire and a
//! recorded exchange cannot be replayed because both sides pick a nonce.
//!
//! Growth in place: a task sent with [`RunTask::growable`] that goes over its
//! memory allocation is frozen by the worker, which asks
//! [`WorkerMsg::Grow`]; the master answers [`MasterMsg::Grow`] with a bigger
//! allocation (the task goes on) or none (it is killed as over its limit,
//! and retried as before).
//!
//! A client that only wants the master's status (`drover factory`) sends
//! [`WorkerMsg::StatusQuery`] instead of a hello and goes through the same
//! refusal and challenge steps; the master then answers [`MasterMsg::Status`]
//! (with its proof in place of the welcome's) and closes the connection.

use std::io;

use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Resources;

/// Bumped whenever a message changes shape; peers with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame either side accepts. Task descriptions and reports are far
/// smaller; file bodies are streamed outside frames.
pub const MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;

/// Stdout and stderr are each capped at this many bytes in a task report:
/// the first and last halves are kept, with a marker line between them.
pub const OUTPUT_CAP_BYTES: usize = 64 * 1024;

/// Messages from the master to a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMsg {
    /// The master requires a password; answer with [`WorkerMsg::AuthProof`].
    Challenge { nonce: String },
    /// The worker is accepted. `proof` is the master's HMAC when a password is in use.
    Welcome {
        proof: Option<String>,
        keepalive_interval_s: f64,
    },
    /// The worker is refused; `reason` is meant for a person.
    Refused { reason: String },
    /// `size` raw bytes follow this frame: a file named `id`, kept in the
    /// worker's cache when `cache` is true, consumed by one task otherwise.
    PutFile { id: String, size: u64, cache: bool },
    /// Run a task. Its inputs were sent before it on the same connection.
    Run(Box<RunTask>),
    /// Kill a running task (cancel); the worker still reports it.
    Kill { task_id: u64, attempt: u32 },
    /// The answer to [`WorkerMsg::Grow`]: the task's new allocation (it
    /// goes on), or `None` (it is killed as over its limit).
    Grow {
        task_id: u64,
        attempt: u32,
        allocation: Option<Resources>,
    },
    /// Keepalive; the worker answers [`WorkerMsg::Pong`].
    Ping,
    /// The master is done with this worker; it should exit.
    Shutdown,
    /// The answer to [`WorkerMsg::StatusQuery`], after which the master closes
    /// the connection: the report it would send its catalog. `proof` is the
    /// master's HMAC, as in [`MasterMsg::Welcome`], when a password is in use.
    Status {
        proof: Option<String>,
        report: Box<drover_catalog::MasterReport>,
    },
}

/// Messages from a worker to the master.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Hello(Box<Hello>),
    AuthProof {
        nonce: String,
        proof: String,
    },
    Pong,
    /// A task ended. The bodies of `outputs` follow, in order, each exactly `size` bytes.
    TaskDone {
        report: Box<TaskReport>,
        outputs: Vec<OutputHeader>,
    },
    /// The worker will not run this task (it would overcommit, or the request is malformed).
    Rejected {
        task_id: u64,
        attempt: u32,
        reason: String,
    },
    /// A task sent ahead ([`RunTask::queued`]) has started.
    Started {
        task_id: u64,
        attempt: u32,
    },
    /// A growable task (see [`RunTask::growable`]) went over its memory
    /// allocation and is frozen: may it have more? The master answers
    /// [`MasterMsg::Grow`]. `used_mb` is what the monitor saw, `limit_mb`
    /// the allocation it went over.
    Grow {
        task_id: u64,
        attempt: u32,
        limit_mb: f64,
        used_mb: f64,
    },
    /// The worker is leaving (idle timeout, signal).
    Goodbye {
        reason: String,
    },
    /// Sent instead of a hello by a client that is not a worker (`drover
    /// factory`): it wants the master's status report, not tasks. With a
    /// password it must answer the same challenge a worker does.
    StatusQuery {
        protocol: u32,
        password: bool,
    },
}

/// What a worker says about itself when it connects.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub drover_version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub resources: Resources,
    /// Whether the worker was given a password (so a mismatch gets a clear message).
    pub password: bool,
    /// Content ids of files already in the worker's cache from earlier runs.
    pub cached: Vec<String>,
}

/// One input of a task: a file already sent to the worker, placed at `name` in the sandbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InputRef {
    pub file_id: String,
    pub name: String,
    pub cached: bool,
}

/// A task as the worker sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunTask {
    pub task_id: u64,
    pub attempt: u32,
    pub command: String,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub inputs: Vec<InputRef>,
    #[serde(default)]
    pub outputs: Vec<String>,
    pub allocation: Resources,
    /// Enforce the allocation's memory and disk as limits (the monitor kills the task past them).
    #[serde(default)]
    pub enforce_limits: bool,
    #[serde(default)]
    pub wall_time_s: Option<f64>,
    /// File id of a packaged environment (a tarball sent as a cached input) to run the command in.
    #[serde(default)]
    pub environment: Option<String>,
    /// Over its memory allocation, freeze the task and ask the master for
    /// more ([`WorkerMsg::Grow`]) instead of killing it. Set for tasks whose
    /// allocation is a category's guess.
    #[serde(default)]
    pub growable: bool,
    /// Sent ahead: wait on the worker, after the tasks sent ahead before
    /// it, until it fits, then start and say so ([`WorkerMsg::Started`]),
    /// instead of being refused for want of room. Saves the round trip to
    /// the master between one task's end and the next one's start.
    #[serde(default)]
    pub queued: bool,
}

/// Announces one output file whose body follows the [`WorkerMsg::TaskDone`] frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct OutputHeader {
    pub name: String,
    pub size: u64,
}

/// How a task's process ended, as the worker saw it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The command exited (any code) or was killed by a signal it did not get from us.
    Exited,
    /// The monitor killed it for going over a limit (see `limit_exceeded`).
    LimitExceeded,
    /// It ran past its wall-time limit.
    WallTime,
    /// The master cancelled it.
    Killed,
    /// An input the task needs was not on the worker.
    InputMissing,
    /// The sandbox or environment could not be prepared, or the command could not be started.
    SetupFailed,
}

/// Resources a task was measured to use.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Measured {
    pub wall_time_s: f64,
    pub cpu_time_s: f64,
    /// Peak resident memory of the task's process tree, MB.
    pub memory_mb: f64,
    /// Peak disk used in the sandbox, MB (0 when not measured).
    #[serde(default)]
    pub disk_mb: f64,
    /// Average cores used.
    #[serde(default)]
    pub cores: f64,
    /// The monitor's full summary, when the task ran under it.
    #[serde(default)]
    pub summary: Option<serde_json::Value>,
}

/// What a worker reports when a task ends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskReport {
    pub task_id: u64,
    pub attempt: u32,
    pub ending: Ending,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub measured: Measured,
    /// Which resource went over its limit, and by how much, for [`Ending::LimitExceeded`].
    #[serde(default)]
    pub limit_exceeded: Option<LimitHit>,
    /// Declared outputs that the task did not produce (or that were refused, e.g. a link out of the sandbox).
    #[serde(default)]
    pub missing_outputs: Vec<String>,
    /// A message for a person when something went wrong outside the command itself.
    #[serde(default)]
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch when the command started.
    pub started_ms: u64,
}

impl TaskReport {
    /// The report of an attempt that ended with `ending` before its command
    /// started (set-up failed, cancelled while it waited on the worker).
    pub fn never_started(task_id: u64, attempt: u32, ending: Ending, now_ms: u64) -> TaskReport {
        TaskReport {
            task_id,
            attempt,
            ending,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            measured: Measured::default(),
            limit_exceeded: None,
            missing_outputs: Vec::new(),
            error: None,
            started_ms: now_ms,
        }
    }
}

/// A limit that a task broke.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LimitHit {
    pub resource: String,
    pub limit: f64,
    pub value: f64,
}

/// Errors while reading a frame.
#[derive(thiserror::Error, Debug)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(io::Error),
}

/// Reads one frame and decodes it. `buf` is reused across calls to avoid an allocation per frame.
pub async fn read_frame<R, T>(reader: &mut R, buf: &mut Vec<u8>) -> Result<T, FrameError>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let len = match reader.read_u32().await {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    };
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    reader.read_exact(buf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(serde_json::from_slice(buf)?)
}

/// Encodes `msg` as a frame and appends it to `out` (no I/O, so callers can batch frames).
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, msg).map_err(io::Error::other)?;
    let len = out.len() - start - 4;
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            io::Error::other(format!("message of {len} bytes is over the frame limit"))
        })?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Encodes and writes one frame (not flushed).
pub async fn write_frame<W, T>(writer: &mut W, msg: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut out = Vec::with_capacity(256);
    encode_frame(msg, &mut out)?;
    writer.write_all(&out).await
}

type HmacSha256 = Hmac<Sha256>;

/// A fresh random nonce, hex-encoded.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The proof that `role` knows `password`, bound to both nonces.
pub fn auth_proof(password: &[u8], role: &str, first: &str, second: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC takes any key length");
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a proof in constant time.
pub fn verify_proof(password: &[u8], role: &str, first: &str, second: &str, proof: &str) -> bool {
    let Ok(given) = hex::decode(proof) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC takes any key length");
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// Chunk size of [`copy_body`].
pub const BODY_CHUNK_BYTES: usize = 1 << 20;

/// Copies up to `size` bytes of a file body from `from` to `to` and returns
/// how many it copied (fewer only at end of input), calling `seen` on each
/// chunk (to hash it). A chunk is filled before it is written: on either
/// side, a `tokio::fs::File` costs a hand-off to the blocking pool per
/// call, and `tokio::io::copy`'s 8 KiB calls made a 50 MB input about
/// 6,400 of them on each side of the connection.
pub async fn copy_body<R, W>(
    from: &mut R,
    to: &mut W,
    size: u64,
    mut seen: impl FnMut(&[u8]),
) -> io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; size.min(BODY_CHUNK_BYTES as u64) as usize];
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(buf.len() as u64) as usize;
        let mut filled = 0;
        while filled < want {
            let n = from.read(&mut buf[filled..want]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        seen(&buf[..filled]);
        to.write_all(&buf[..filled]).await?;
        done += filled as u64;
        if filled < want {
            break;
        }
    }
    Ok(done)
}

/// Role strings bound into the proofs, so a worker's proof can't be reflected back as the master's.
pub const ROLE_WORKER: &str = "drover-worker";
pub const ROLE_MASTER: &str = "drover-master";

/// Reads a password file: its content with one trailing newline removed.
pub fn read_password_file(path: &std::path::Path) -> io::Result<Vec<u8>> {
    drover_catalog::secret::read_secret_file(path, "password")
}

/// Checks that a name given for a file inside a task's sandbox stays inside
/// it: relative, not empty, and without `..`. Returns a message for a person.
///
/// ```
/// use drover_worker::protocol::check_sandbox_name;
/// assert!(check_sandbox_name("data/in.txt").is_ok());
/// assert!(check_sandbox_name("../../x").is_err());
/// assert!(check_sandbox_name("/etc/x").is_err());
/// ```
pub fn check_sandbox_name(name: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.contains('\0') {
        return Err(format!("file name {name:?} contains a NUL byte"));
    }
    let path = Path::new(name);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "file name {name:?} escapes the task sandbox (contains ..)"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "file name {name:?} escapes the task sandbox (absolute path)"
                ))
            }
        }
    }
    if path.components().all(|c| matches!(c, Component::CurDir)) {
        return Err(format!("file name {name:?} names the sandbox itself"));
    }
    Ok(())
}

/// Keeps at most [`OUTPUT_CAP_BYTES`] of a captured stream: the head and the tail.
pub fn cap_output(bytes: &[u8]) -> String {
    if bytes.len() <= OUTPUT_CAP_BYTES {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let half = OUTPUT_CAP_BYTES / 2;
    let omitted = bytes.len() - 2 * half;
    format!(
        "{}\n[drover: {omitted} bytes omitted]\n{}",
        String::from_utf8_lossy(&bytes[..half]),
        String::from_utf8_lossy(&bytes[bytes.len() - half..])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_is_copied_exactly_in_full_chunks_and_seen_whole() {
        let data: Vec<u8> = (0..(BODY_CHUNK_BYTES * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        // Exactly `size` bytes, even with more input behind them (the next frame).
        let (mut out, mut seen, mut chunks) = (Vec::new(), Vec::new(), 0);
        let size = BODY_CHUNK_BYTES as u64 + 7;
        let n = copy_body(&mut &data[..], &mut out, size, |c| {
            seen.extend_from_slice(c);
            chunks += 1;
        })
        .await
        .unwrap();
        assert_eq!(n, size);
        assert_eq!(out, data[..size as usize]);
        assert_eq!(seen, out);
        assert_eq!(chunks, 2, "one full chunk, then the rest");
        // Input that ends early: what there was, and the caller sees the shortfall.
        let mut out = Vec::new();
        let n = copy_body(&mut &data[..10], &mut out, 100, |_| {})
            .await
            .unwrap();
        assert_eq!((n, out.as_slice()), (10, &data[..10]));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_refused() {
        let mut out = Vec::new();
        encode_frame(&MasterMsg::Ping, &mut out).unwrap();
        encode_frame(
            &MasterMsg::Kill {
                task_id: 7,
                attempt: 2,
            },
            &mut out,
        )
        .unwrap();
        let mut reader = &out[..];
        let mut buf = Vec::new();
        let a: MasterMsg = read_frame(&mut reader, &mut buf).await.unwrap();
        let b: MasterMsg = read_frame(&mut reader, &mut buf).await.unwrap();
        assert_eq!(a, MasterMsg::Ping);
        assert_eq!(
            b,
            MasterMsg::Kill {
                task_id: 7,
                attempt: 2
            }
        );
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Closed)
        ));

        let huge = (MAX_FRAME_BYTES + 1).to_be_bytes();
        let mut reader = &huge[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::TooLarge(_))
        ));

        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"hello");
        let mut reader = &garbage[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn proofs_bind_role_password_and_nonces() {
        let (m, w) = (new_nonce(), new_nonce());
        let proof = auth_proof(b"secret", ROLE_WORKER, &m, &w);
        assert!(verify_proof(b"secret", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"wrong", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_MASTER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &w, &m, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &m, &w, "zz"));
    }

    #[test]
    fn sandbox_names() {
        for bad in ["", "..", "../x", "a/../../x", "/etc/passwd", ".", "./"] {
            assert!(
                check_sandbox_name(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        for good in ["x", "a/b/c.txt", "./x", ".hidden"] {
            assert!(
                check_sandbox_name(good).is_ok(),
                "{good:?} should be accepted"
            );
        }
    }

    #[test]
    fn output_is_capped_head_and_tail() {
        let big = vec![b'a'; OUTPUT_CAP_BYTES * 3];
        let capped = cap_output(&big);
        assert!(capped.len() < OUTPUT_CAP_BYTES + 100);
        assert!(capped.contains("bytes omitted"));
        assert_eq!(cap_output(b"short"), "short");
    }
}
