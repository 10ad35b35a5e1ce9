//! Files in and out of one connection: the reader streams each announced
//! file body into the cache (or the per-task transfer directory) and hands
//! on the small messages; the writer sends messages and each finished
//! task's report followed by its output files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use drover_protocol::stream::{is_auth_failure, Reader, Writer};
use drover_protocol::Resources;
use drover_protocol::{
    self as protocol, read_frame, FrameError, MasterMsg, OutputHeader, TaskReport, WorkerMsg,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::error;
use tracing::warn;

use crate::disk;
use crate::slots::{Slot, Slots};

/// What a finished task hands to the writer: the report frame and the output files to stream after it.
pub(crate) struct Finished {
    pub(crate) report: TaskReport,
    pub(crate) outputs: Vec<(OutputHeader, PathBuf)>,
    pub(crate) task_dir: PathBuf,
    /// The task's stdout and stderr, open, for the slot's next task.
    pub(crate) output_files: Option<(std::fs::File, std::fs::File)>,
    pub(crate) allocation: Resources,
    pub(crate) gpus: Vec<u32>,
    /// See [`Slot::sandbox_empty`].
    pub(crate) sandbox_empty: bool,
}

pub(crate) enum Outgoing {
    Msg(WorkerMsg),
    Done(Box<Finished>),
}

/// Reads frames from the master. File bodies are streamed to disk here, so
/// that the main loop only sees small messages. A task with an absurd
/// number (`checks`) is rejected here, before it holds anything. A file that cannot fit on
/// this worker (over its declared disk, or over what is really free) is
/// read past without writing a byte, and a task that needs it is rejected
/// here with the reason (`out`), so the master sends it elsewhere.
pub(crate) async fn read_loop(
    mut reader: Reader,
    msgs: mpsc::UnboundedSender<MasterMsg>,
    out: mpsc::UnboundedSender<Outgoing>,
    dirs: ReadDirs,
) {
    let mut buf = Vec::new();
    // Files refused on this connection, and why. A cached one stays
    // refused (the master believes it sent it); a per-task one is
    // forgotten with its task.
    let mut refused: HashMap<String, String> = HashMap::new();
    let mut pressure = disk::Pressure::default();
    let report_disk =
        |pressure: &mut disk::Pressure| match pressure.report(&dirs.cache, dirs.disk_mb) {
            Some(free_mb) => out
                .send(Outgoing::Msg(WorkerMsg::DiskFree { free_mb }))
                .is_ok(),
            None => true,
        };
    // The first report goes with the first keepalive, not before: a
    // master's first frames after the welcome are its own business.
    loop {
        let msg: MasterMsg = match read_frame(&mut reader, &mut buf).await {
            Ok(m) => m,
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(e)) if is_auth_failure(&e) => {
                // Not a glitch: someone on the path is tampering with the connection.
                error!("frame authentication failed from the master: {e}; dropping the connection");
                return;
            }
            Err(e) => {
                warn!("bad frame from the master, dropping the connection: {e}");
                return;
            }
        };
        let task = match msg {
            MasterMsg::PutFile {
                id,
                size,
                cache: keep,
            } => {
                let dir = if keep { &dirs.cache } else { &dirs.transfer };
                if let Err(why) = disk::room_for(dir, size, dirs.disk_mb) {
                    warn!("refusing file {id}: {why}");
                    refused.insert(id, why);
                    let skipped =
                        protocol::copy_body(&mut reader, &mut tokio::io::sink(), size, |_| {})
                            .await;
                    if !matches!(skipped, Ok(n) if n == size) || !report_disk(&mut pressure) {
                        return;
                    }
                } else if let Err(e) = receive_file(&mut reader, dir, &id, size).await {
                    warn!("receiving file {id}: {e}; dropping the connection");
                    return;
                }
                continue;
            }
            MasterMsg::Run(task) => task,
            // At each keepalive: disk fills and frees between tasks too.
            MasterMsg::Ping if !report_disk(&mut pressure) => return,
            other => {
                if msgs.send(other).is_err() {
                    return;
                }
                continue;
            }
        };
        let needs = task.inputs.iter().map(|i| (&i.file_id, i.cached));
        let needs = needs.chain(task.environment.iter().map(|e| (e, true)));
        let mut why = crate::checks::run_task(&task).err();
        for (id, cached) in needs {
            let reason = if cached {
                refused.get(id).cloned()
            } else {
                refused.remove(id)
            };
            why = why.or(reason.map(|r| format!("an input cannot be stored here: {r}")));
        }
        let sent = match why {
            Some(why) => out
                .send(Outgoing::Msg(WorkerMsg::Rejected {
                    task_id: task.task_id,
                    attempt: task.attempt,
                    reason: why,
                }))
                .is_ok(),
            None => msgs.send(MasterMsg::Run(task)).is_ok(),
        };
        if !sent {
            return;
        }
    }
}

/// Where the read loop stores files, and the disk this worker declared.
pub(crate) struct ReadDirs {
    pub(crate) cache: PathBuf,
    pub(crate) transfer: PathBuf,
    pub(crate) disk_mb: u64,
}

/// A file being received under a temporary name, removed when dropped
/// unless kept: a failed transfer (short read, lost connection, full disk,
/// bad content, or the read loop aborted with its session) leaves nothing.
struct PartFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The temporary name a file is received under in its directory; the pid
/// tells a later worker whose leftover it is (see `leftovers`).
pub(crate) const PART_PREFIX: &str = ".part-";

/// Streams `size` bytes into `dir/id` through a temporary name, checking the
/// content hash for content-named files so a corrupt transfer never enters the cache.
async fn receive_file(reader: &mut Reader, dir: &Path, id: &str, size: u64) -> anyhow::Result<()> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        bail!("invalid file id {id:?}");
    }
    let mut part = PartFile {
        path: dir.join(format!("{PART_PREFIX}{}-{id}", std::process::id())),
        kept: false,
    };
    let mut file = tokio::fs::File::create(&part.path)
        .await
        .with_context(|| format!("creating {}", part.path.display()))?;
    let mut hasher = id.starts_with("b3-").then(blake3::Hasher::new);
    let got = protocol::copy_body(reader, &mut file, size, |chunk| {
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
        }
    })
    .await
    .with_context(|| format!("writing {}", part.path.display()))?;
    if got < size {
        bail!(
            "connection closed with {} bytes of the file still to come",
            size - got
        );
    }
    file.flush().await?;
    drop(file);
    if let Some(h) = hasher {
        let got = h.finalize().to_hex();
        if id.strip_prefix("b3-") != Some(got.as_str()) {
            bail!("content of {id} does not match its name (got b3-{got})");
        }
    }
    // Read-only: cached inputs are hard-linked into sandboxes, and a task must not change what the next one reads.
    let mut perms = tokio::fs::metadata(&part.path).await?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    tokio::fs::set_permissions(&part.path, perms).await?;
    tokio::fs::rename(&part.path, dir.join(id)).await?;
    part.kept = true;
    Ok(())
}

pub(crate) async fn write_loop(
    mut writer: Writer,
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    slots: Arc<Slots>,
) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(4096);
    let mut sent_sandboxes = Vec::new();
    while let Some(first) = out.recv().await {
        let mut next = Some(first);
        // Drain whatever is ready before flushing: one syscall for a burst of reports.
        while let Some(item) = next.take() {
            match item {
                Outgoing::Msg(msg) => {
                    protocol::write_frame_in(&mut writer, &mut frame, &msg).await?
                }
                Outgoing::Done(finished) => {
                    let Finished {
                        mut report,
                        outputs,
                        task_dir,
                        output_files,
                        sandbox_empty,
                        ..
                    } = *finished;
                    let big_result = take_big_result(&mut report);
                    let headers = outputs.iter().map(|(h, _)| h.clone()).collect();
                    let done = WorkerMsg::TaskDone {
                        report: Box::new(report),
                        outputs: headers,
                    };
                    protocol::write_frame_in(&mut writer, &mut frame, &done).await?;
                    for (header, path) in &outputs {
                        stream_file(&mut writer, path, header.size).await?;
                    }
                    if let Some(body) = big_result {
                        writer.write_all(&body).await?;
                    }
                    sent_sandboxes.push(Slot {
                        dir: task_dir,
                        outputs: output_files,
                        sandbox_empty,
                    });
                }
            }
            next = out.try_recv().ok();
        }
        writer.flush().await?;
        // The reports go out first. A task directory whose task left nothing
        // takes a look to recycle, done here; one with files to remove is
        // cleaned on the blocking pool, off the writer's path.
        let slow: Vec<Slot> = sent_sandboxes
            .drain(..)
            .filter_map(|slot| slots.recycle_if_quick(slot))
            .collect();
        if !slow.is_empty() {
            let slots = Arc::clone(&slots);
            tokio::task::spawn_blocking(move || {
                for slot in slow {
                    slots.recycle(slot);
                }
            });
        }
    }
    writer.flush().await?;
    Ok(())
}

/// A call's pickled outcome too big to go inline in its report frame
/// (base64 would take it past the frame limit): taken out of the report,
/// which says its size instead, to be sent raw after the output bodies.
fn take_big_result(report: &mut TaskReport) -> Option<Vec<u8>> {
    if !matches!(&report.call_result, Some(r) if r.len() > protocol::INLINE_RESULT_BYTES) {
        return None;
    }
    let body = report.call_result.take()?;
    report.call_result_size = Some(body.len() as u64);
    Some(body)
}

/// Streams exactly `size` bytes of `path`: if the file changed size since the
/// header was written, it is cut or zero-padded so the stream stays in step.
async fn stream_file(writer: &mut Writer, path: &Path, size: u64) -> anyhow::Result<()> {
    let mut sent = 0u64;
    if let Ok(mut file) = tokio::fs::File::open(path).await {
        sent = protocol::copy_body(&mut file, writer, size, |_| {}).await?;
    }
    if sent < size {
        warn!("{} shrank while being sent; padding", path.display());
        protocol::pad(writer, size - sent).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_call_result_over_the_inline_limit_leaves_the_report() {
        let mut small = TaskReport::never_started(1, 1, protocol::Ending::Exited, 0);
        small.call_result = Some(vec![1; protocol::INLINE_RESULT_BYTES]);
        assert_eq!(take_big_result(&mut small), None);
        assert_eq!(small.call_result_size, None);
        assert!(small.call_result.is_some());

        let mut big = small.clone();
        big.call_result = Some(vec![2; protocol::INLINE_RESULT_BYTES + 1]);
        let body = take_big_result(&mut big).expect("taken out");
        assert_eq!(body.len(), protocol::INLINE_RESULT_BYTES + 1);
        assert_eq!(big.call_result, None);
        assert_eq!(big.call_result_size, Some(body.len() as u64));

        let mut none = TaskReport::never_started(1, 1, protocol::Ending::Exited, 0);
        assert_eq!(take_big_result(&mut none), None);
    }
}
