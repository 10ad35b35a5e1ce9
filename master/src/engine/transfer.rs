//! What travels with a task: a placement's inputs and its `RunTask`
//! down to the worker, and the output bodies back.

use super::*;

impl<O: Outbox> Engine<O> {
    pub(super) fn dispatch(&mut self, p: Placement, queued: bool) {
        if !self.tasks.contains_key(&p.task) {
            self.sched.release_task(p.worker, p.task, p.allocation);
            return;
        }
        if !self.workers.contains_key(&p.worker) {
            self.enqueue_task(p.task);
            return;
        }
        let (Some(task), Some(worker)) =
            (self.tasks.get_mut(&p.task), self.workers.get_mut(&p.worker))
        else {
            return;
        };
        let attempt = task.attempts.len() as u32 + 1;
        let mut p = p;
        let reserve_mb = growth::charge_reserve(&self.class_reserve_mb, &mut p, task);
        if worker.growth.hold(self.now, p.task, attempt, reserve_mb) {
            self.reserving_workers.insert(p.worker);
        }
        let (learned, growable) = match task.sizing {
            Sizing::Learned { cat, .. } => {
                self.categories.note_allocation(cat);
                let growable = self.categories.grows(cat)
                    && task.resource_retries < MAX_RESOURCE_RETRIES
                    && p.allocation.memory_mb > 0;
                (true, growable)
            }
            Sizing::Plain(_) => (false, false),
        };
        let spec = &task.spec;
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        // Interned at submit, in the order walked here (inputs, then the
        // environment): no name is hashed again per placement.
        let mut keys = task.cached_keys.iter().copied();
        let mut send = |input: &PreparedInput, n: usize| -> String {
            match &input.cache_id {
                Some(id) => {
                    let k = keys.next();
                    let fresh = k.map(|k| worker.files.insert(k)).unwrap_or(true);
                    if fresh {
                        if let Some(k) = k {
                            self.sched.note_cached(p.worker, k);
                        }
                        self.stats.files_sent += 1;
                        self.out.to_worker(
                            p.worker,
                            Outgoing::File {
                                id: id.to_string(),
                                cache: true,
                                source: input.source.clone(),
                            },
                        );
                    }
                    id.to_string()
                }
                None => {
                    let id = format!("u-{}-{}-{}", p.task, attempt, n);
                    self.stats.files_sent += 1;
                    self.out.to_worker(
                        p.worker,
                        Outgoing::File {
                            id: id.clone(),
                            cache: false,
                            source: input.source.clone(),
                        },
                    );
                    id
                }
            }
        };
        for (n, input) in spec.inputs.iter().enumerate() {
            let file_id = send(input, n);
            inputs.push(protocol::InputRef {
                file_id,
                name: input.remote.clone(),
                cached: input.cache_id.is_some(),
            });
        }
        let environment = spec.environment.as_ref().map(|e| send(e, usize::MAX));
        let run = RunTask {
            task_id: p.task,
            attempt,
            command: spec.command.clone(),
            env: spec.env.clone(),
            inputs,
            outputs: spec
                .outputs
                .iter()
                .map(|(remote, _)| remote.clone())
                .collect(),
            allocation: p.allocation,
            // A learned allocation is a limit too: going over it is how the
            // category finds out the task needs a bigger bucket.
            enforce_limits: learned || !spec.resources.is_zero(),
            wall_time_s: spec.wall_time_s,
            environment,
            growable,
            queued,
            call: spec.call.clone(),
        };
        if !spec.outputs.is_empty() {
            self.out.to_worker(
                p.worker,
                Outgoing::ExpectOutputs {
                    task: p.task,
                    attempt,
                    plan: spec.outputs.clone(),
                },
            );
        }
        self.out
            .to_worker(p.worker, Outgoing::Msg(MasterMsg::Run(Box::new(run))));
        worker.running.insert(p.task);
        task.state = TaskState::Running {
            worker: p.worker,
            attempt,
            allocation: p.allocation,
            started: self.now,
            on_worker_queue: queued,
            exited: false,
        };
        self.stats.tasks_waiting -= 1;
        if queued {
            self.stats.tasks_queued_on_workers += 1;
        } else {
            self.stats.tasks_running += 1;
        }
    }
}

/// Receives one attempt's output bodies. When `keep` (the attempt
/// succeeded) each expected body is written to a temporary name beside its
/// destination and, once every body is in, renamed over it; otherwise, and
/// for bodies nobody expects (a stale attempt, a name the task did not
/// declare), they are read and dropped. So neither a failed or killed
/// attempt's output nor a partial body ever replaces a user's file. Returns
/// the first local write failure (with the OS error), which is the task's
/// outcome; an `Err` is the connection's.
async fn receive_outputs<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    outputs: &[OutputHeader],
    dests: Option<&[(String, PathBuf)]>,
    keep: bool,
) -> anyhow::Result<Option<String>> {
    let mut parts = PartFiles::default();
    let mut failure: Option<String> = None;
    for header in outputs {
        let dest = dests
            .filter(|_| keep && failure.is_none())
            .and_then(|d| d.iter().find(|(name, _)| *name == header.name))
            .map(|(_, p)| p);
        let mut body = (&mut *reader).take(header.size);
        let Some(dest) = dest else {
            tokio::io::copy(&mut body, &mut tokio::io::sink()).await?;
            continue;
        };
        let tmp = part_path(dest);
        parts.0.push((tmp.clone(), dest.clone()));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let n = protocol::copy_body(&mut body, &mut file, header.size, |_| {}).await?;
            file.flush().await?;
            Ok::<u64, std::io::Error>(n)
        }
        .await;
        match written {
            Ok(n) if n == header.size => {}
            Ok(_) => {
                parts.remove_all().await;
                anyhow::bail!("connection closed in the middle of output {}", header.name)
            }
            Err(e) => {
                failure = Some(format!(
                    "cannot write output {} to {}: {e}",
                    header.name,
                    dest.display()
                ));
                if let Err(e) = tokio::io::copy(&mut body, &mut tokio::io::sink()).await {
                    parts.remove_all().await;
                    return Err(e.into());
                }
            }
        }
    }
    if failure.is_none() {
        failure = parts.rename_all().await;
    }
    parts.remove_all().await;
    Ok(failure)
}

/// The largest call outcome read as a body of its own: the function
/// server's messages have a 32-bit length, so no worker sends more.
const MAX_RESULT_BODY: u64 = u32::MAX as u64;

/// What is reserved up front for a call outcome's body; a bigger one grows
/// as its bytes arrive, so a size that lies costs no memory before them.
const RESULT_PREALLOC: u64 = 64 << 20;

/// Receives one attempt's output bodies ([`receive_outputs`]), then its
/// call's pickled outcome when it was too big for the report frame
/// ([`TaskReport::call_result_size`]): read into the report's
/// `call_result` in memory (nothing on the master's disk), which is the
/// one copy handed on to the user.
pub(super) async fn receive_attempt<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    report: &mut TaskReport,
    outputs: &[OutputHeader],
    dests: Option<&[(String, PathBuf)]>,
    keep: bool,
) -> anyhow::Result<Option<String>> {
    let failure = receive_outputs(&mut *reader, outputs, dests, keep).await?;
    if let Some(size) = report.call_result_size.take() {
        if size > MAX_RESULT_BODY {
            anyhow::bail!(
                "a call result of {size} bytes, over the {MAX_RESULT_BODY} a worker may send"
            );
        }
        let mut body = Vec::with_capacity(size.min(RESULT_PREALLOC) as usize);
        let got = (&mut *reader).take(size).read_to_end(&mut body).await?;
        if got as u64 != size {
            anyhow::bail!("connection closed in the middle of a call's result");
        }
        report.call_result = Some(body);
    }
    Ok(failure)
}

/// The temporary name an output is written to beside `dest` before it is
/// renamed over it. Fixed per destination, so a retry overwrites what an
/// interrupted transfer left, and `Manager::submit` can remove it.
pub(crate) fn part_path(dest: &Path) -> PathBuf {
    dest.with_file_name(format!(
        ".{}.drover-part",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
}

/// One attempt's outputs written so far: (temporary name, destination).
#[derive(Default)]
struct PartFiles(Vec<(PathBuf, PathBuf)>);

impl PartFiles {
    /// Renames each over its destination; the first failure, if any.
    async fn rename_all(&mut self) -> Option<String> {
        for (tmp, dest) in self.0.drain(..) {
            if let Err(e) = tokio::fs::rename(&tmp, &dest).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Some(format!("cannot write output to {}: {e}", dest.display()));
            }
        }
        None
    }

    /// Removes what is left of them.
    async fn remove_all(&mut self) {
        for (tmp, _) in self.0.drain(..) {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
    }
}

pub(super) async fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    gate: Arc<WriteGate>,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(4096);
    let mut last_write = tokio::time::Instant::now();
    // One timer for the connection's life, moved on only when it fires (a
    // timeout per wake-up cost a timer-wheel insert and removal per task):
    // it pings when nothing was written for `interval`. The engine's own
    // writes (see `link`) do not move it, so a busy connection gets a ping
    // per interval it would not need; that costs one small frame.
    let ping = tokio::time::sleep_until(last_write + interval);
    tokio::pin!(ping);
    loop {
        let item = tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            _ = &mut ping => {
                let now = tokio::time::Instant::now();
                if now < last_write + interval {
                    ping.as_mut().reset((last_write + interval).max(now + Duration::from_millis(10)));
                    continue;
                }
                frame.clear();
                protocol::encode_frame(&MasterMsg::Ping, &mut frame)?;
                gate.enter().await;
                let sent = async {
                    writer.write_all(&frame).await?;
                    writer.flush().await
                }
                .await;
                gate.leave();
                sent?;
                last_write = tokio::time::Instant::now();
                ping.as_mut().reset(last_write + interval);
                continue;
            }
        };
        gate.enter().await;
        let mut taken = 0;
        let sent = async {
            let mut next = Some(item);
            while let Some(item) = next.take() {
                taken += 1;
                write_item(&mut writer, &mut frame, item).await?;
                next = rx.try_recv().ok();
            }
            writer.flush().await?;
            anyhow::Ok(())
        }
        .await;
        gate.written(taken);
        gate.leave();
        sent?;
        last_write = tokio::time::Instant::now();
    }
    Ok(())
}

/// Writes one item the engine handed over (not flushed).
async fn write_item(
    writer: &mut Writer,
    frame: &mut Vec<u8>,
    item: Outgoing,
) -> anyhow::Result<()> {
    match item {
        Outgoing::Msg(msg) => {
            frame.clear();
            crate::wire::encode_master_frame(&msg, frame)?;
            writer.write_all(frame).await?;
        }
        Outgoing::Bytes(bytes) => writer.write_all(&bytes).await?,
        Outgoing::File { id, cache, source } => {
            send_file(writer, frame, id, cache, &source).await?
        }
        Outgoing::ExpectOutputs { .. } | Outgoing::ForgetOutputs { .. } => {}
    }
    Ok(())
}

pub(super) async fn send_file(
    writer: &mut Writer,
    frame: &mut Vec<u8>,
    id: String,
    cache: bool,
    source: &FileSource,
) -> anyhow::Result<()> {
    match source {
        FileSource::Bytes(bytes) => {
            frame.clear();
            protocol::encode_frame(
                &MasterMsg::PutFile {
                    id,
                    size: bytes.len() as u64,
                    cache,
                },
                frame,
            )?;
            writer.write_all(frame).await?;
            writer.write_all(bytes).await?;
        }
        FileSource::Path(path) => {
            // Opened and measured in one trip to the blocking pool (three
            // with tokio's file: open, metadata, into_std), once per body
            // per worker: 1,000 workers joining for a shared input made
            // 3,000 hand-offs between threads.
            let path_owned = path.clone();
            let file = tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path_owned)?;
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                Ok::<_, std::io::Error>((f, size))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let (file, size) = match file {
                Ok((f, size)) => (Some(f), size),
                Err(e) => {
                    // Send an empty body: the worker's content check (or the task) then reports the file as missing.
                    warn!(
                        "input {} vanished before it could be sent: {e}",
                        path.display()
                    );
                    (None, 0)
                }
            };
            frame.clear();
            protocol::encode_frame(&MasterMsg::PutFile { id, size, cache }, frame)?;
            writer.write_all(frame).await?;
            if let Some(f) = file {
                let sent = match sendfile_body(writer, &f, size).await {
                    Some(sent) => sent?,
                    None => {
                        let mut f = tokio::fs::File::from_std(f);
                        protocol::copy_body(&mut f, writer, size, |_| {}).await?
                    }
                };
                if sent < size {
                    // The file shrank while being sent; pad so the stream stays framed (the hash check catches it).
                    protocol::pad(writer, size - sent).await?;
                }
            }
        }
    }
    Ok(())
}

/// Sends `size` bytes of `file` on a plain TCP connection with
/// sendfile(2): the kernel hands the file's cached pages to the socket, with
/// no copy through this process and no buffer per body (a 1 MB input sent to
/// 1,000 workers was a 1 MB buffer allocated, faulted in, filled through the
/// blocking pool and copied out per worker). `None` when the connection is
/// not plain TCP (TLS, sealed frames): the caller copies. Returns how many
/// bytes went, fewer than `size` if the file shrank.
async fn sendfile_body(
    writer: &mut Writer,
    file: &std::fs::File,
    size: u64,
) -> Option<std::io::Result<u64>> {
    use drover_protocol::stream::{FrameWriter, RawWrite};
    use std::os::fd::AsRawFd;
    if !matches!(writer.get_ref(), FrameWriter::Plain(RawWrite::Tcp(_))) {
        return None;
    }
    // The frame before the body is still in the buffer.
    if let Err(e) = writer.flush().await {
        return Some(Err(e));
    }
    let FrameWriter::Plain(RawWrite::Tcp(half)) = writer.get_ref() else {
        return None;
    };
    let tcp: &TcpStream = half.as_ref();
    let (sock, fd) = (tcp.as_raw_fd(), file.as_raw_fd());
    let mut offset: libc::off_t = 0;
    while (offset as u64) < size {
        let left = (size - offset as u64).min(1 << 30) as usize;
        if let Err(e) = tcp.writable().await {
            return Some(Err(e));
        }
        let sent = tcp.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the whole call (the
            // socket is borrowed from the writer, the file from the caller)
            // and `offset` is a valid off_t that sendfile moves on.
            let n = unsafe { libc::sendfile(sock, fd, &mut offset, left) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(offset as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_of_size(size: u64) -> TaskReport {
        let mut r = TaskReport::never_started(1, 1, Ending::Exited, 0);
        r.call_result_size = Some(size);
        r
    }

    #[tokio::test]
    async fn a_call_result_sent_as_a_body_is_read_after_the_outputs() {
        let outputs = [OutputHeader {
            name: "o".into(),
            size: 3,
        }];
        let result: Vec<u8> = (0..5_000_000u32).map(|i| i as u8).collect();
        let mut wire = b"abc".to_vec();
        wire.extend_from_slice(&result);
        wire.extend_from_slice(b"next frame");
        let mut reader = &wire[..];
        let mut report = report_of_size(result.len() as u64);
        let failure = receive_attempt(&mut reader, &mut report, &outputs, None, false)
            .await
            .expect("received");
        assert_eq!(failure, None);
        assert_eq!(report.call_result.as_deref(), Some(&result[..]));
        assert_eq!(report.call_result_size, None);
        assert_eq!(reader, b"next frame", "read exactly the bodies");
    }

    #[tokio::test]
    async fn a_call_result_cut_short_is_the_connections_error() {
        let mut reader = &b"only part"[..];
        let mut report = report_of_size(100);
        let got = receive_attempt(&mut reader, &mut report, &[], None, true).await;
        assert!(got.is_err(), "{got:?}");
        let mut report = report_of_size(MAX_RESULT_BODY + 1);
        let got = receive_attempt(&mut &b""[..], &mut report, &[], None, true).await;
        assert!(got.is_err(), "{got:?}");
    }
}
