//! The network side of the engine: accepting connections, the handshake
//! (a worker or a status client), and each worker connection's reader,
//! which forwards messages to the engine and streams output bodies to disk
//! (see `transfer`); its writer is `transfer::write_loop`.

use super::*;
use drover_protocol::auth::{self, AuthError, Greeting, MasterHandshake};

use std::sync::atomic::AtomicU64;

static NEXT_WORKER: AtomicU32 = AtomicU32::new(1);

pub(super) async fn accept_loop(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    password: Option<Arc<[u8]>>,
    keepalive: (Duration, Duration),
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        let password = password.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, addr, events, password, keepalive).await {
                warn!(peer = %addr, "{e}");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::UnboundedSender<Event>,
    password: Option<Arc<[u8]>>,
    (interval, timeout): (Duration, Duration),
) -> anyhow::Result<()> {
    let (r, w) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut writer = BufWriter::with_capacity(64 * 1024, w);
    let hello = match tokio::time::timeout(
        Duration::from_secs(30),
        handshake(&mut reader, &mut writer, password.as_deref(), interval),
    )
    .await
    {
        Ok(Ok(Greeting::Worker(hello))) => hello,
        Ok(Ok(Greeting::Status { proof })) => {
            return answer_status(&mut writer, &events, proof).await;
        }
        Ok(Err(e)) => anyhow::bail!("refused connection from {addr}: {e}"),
        Err(_) => anyhow::bail!("connection from {addr} did not complete the handshake in 30 s"),
    };
    let key = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let (plans, mut plans_rx) = mpsc::unbounded_channel();
    if events
        .send(Event::Joined {
            key,
            hello,
            addr,
            link: Link { tx, plans },
        })
        .is_err()
    {
        return Ok(());
    }
    let writer_task = tokio::spawn(write_loop(writer, rx, interval));
    let reason = read_loop(&mut reader, key, &events, &mut plans_rx, timeout).await;
    writer_task.abort();
    let _ = events.send(Event::Gone { key, reason });
    Ok(())
}

/// Sends a status client the master's report and ends the connection.
async fn answer_status(
    writer: &mut BufWriter<OwnedWriteHalf>,
    events: &mpsc::UnboundedSender<Event>,
    proof: Option<String>,
) -> anyhow::Result<()> {
    let (tx, rx) = oneshot::channel();
    if events.send(Event::Status(tx)).is_err() {
        return Ok(());
    }
    let Ok(report) = rx.await else {
        return Ok(());
    };
    protocol::write_frame(
        writer,
        &MasterMsg::Status {
            proof,
            report: Box::new(report),
        },
    )
    .await?;
    writer.flush().await?;
    Ok(())
}

async fn handshake(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut BufWriter<OwnedWriteHalf>,
    password: Option<&[u8]>,
    keepalive: Duration,
) -> Result<Greeting, AuthError> {
    let mut handshake = MasterHandshake::new(password, keepalive.as_secs_f64());
    auth::run(&mut handshake, reader, writer, None).await
}

async fn read_loop(
    reader: &mut BufReader<OwnedReadHalf>,
    key: WorkerKey,
    events: &mpsc::UnboundedSender<Event>,
    plans: &mut mpsc::UnboundedReceiver<Outgoing>,
    timeout: Duration,
) -> String {
    let mut buf = Vec::new();
    let mut expected: HashMap<(TaskId, u32), OutputPlan> = HashMap::default();
    let silence = Silence::new(reader.get_ref(), timeout);
    loop {
        let msg = {
            let mut touched = Touch {
                inner: &mut *reader,
                silence: &silence,
            };
            let read = crate::wire::read_worker_msg(&mut touched, &mut buf);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    biased;
                    r = &mut read => break r,
                    _ = tokio::time::sleep_until(silence.deadline()) => {
                        if silence.gone() {
                            return format!("no byte for {timeout:?}");
                        }
                    }
                }
            }
        };
        let msg = match msg {
            Err(FrameError::Closed) => return "connection closed".into(),
            Err(e) => return format!("protocol error: {e}"),
            Ok(m) => m,
        };
        if let WorkerMsg::TaskDone { report, outputs } = &msg {
            // The engine sent the plan before the task, so it is here by now.
            while let Ok(change) = plans.try_recv() {
                match change {
                    Outgoing::ExpectOutputs {
                        task,
                        attempt,
                        plan,
                    } => {
                        expected.insert((task, attempt), plan);
                    }
                    Outgoing::ForgetOutputs { task, attempt } => {
                        expected.remove(&(task, attempt));
                    }
                    _ => {}
                }
            }
            let dests = expected.remove(&(report.task_id, report.attempt));
            let keep = report.ending == Ending::Exited
                && report.exit_code == Some(0)
                && report.missing_outputs.is_empty();
            match receive_outputs(&mut *reader, outputs, dests.as_deref(), keep).await {
                Ok(None) => {}
                Ok(Some(error)) => {
                    let failed = Event::OutputsFailed {
                        task: report.task_id,
                        attempt: report.attempt,
                        error,
                    };
                    if events.send(failed).is_err() {
                        return "master shutting down".into();
                    }
                }
                Err(e) => return format!("receiving outputs of task {}: {e}", report.task_id),
            }
            // Output bodies are read outside the clock: they may be long.
            silence.heard();
        }
        if events.send(Event::Msg { key, msg }).is_err() {
            return "master shutting down".into();
        }
    }
}

/// When a worker has been silent too long. The clock runs from the last
/// byte read (see [`Touch`]), and before a worker is declared gone its
/// socket is looked at: bytes (or its close) already waiting there were
/// received in time, only not read yet, as when this process was stopped
/// (SIGSTOP) for longer than the timeout. So a report that was waiting is
/// read, not discarded.
struct Silence {
    fd: std::os::fd::RawFd,
    timeout: Duration,
    start: Instant,
    /// Nanoseconds from `start` to the last byte read.
    last_ns: AtomicU64,
}

impl Silence {
    fn new(socket: &OwnedReadHalf, timeout: Duration) -> Silence {
        use std::os::fd::AsRawFd;
        Silence {
            fd: socket.as_ref().as_raw_fd(),
            timeout,
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn heard(&self) {
        let ns = self.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.last() + self.timeout)
    }

    /// True if nothing came for the timeout and nothing waits in the
    /// socket; else the clock restarts from now.
    fn gone(&self) -> bool {
        if self.last().elapsed() < self.timeout {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: `fd` is the connection's socket, open for as long as the
        // reader that borrows it here; MSG_PEEK | MSG_DONTWAIT neither
        // consumes nor blocks, and the buffer is one valid byte.
        let n = unsafe {
            libc::recv(
                self.fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // n == 0: the peer closed, which the reader then reports itself.
        if n >= 0 {
            self.heard();
            return false;
        }
        true
    }
}

/// A reader that tells its [`Silence`] whenever bytes come in, so a large
/// frame that trickles in is not taken for silence.
struct Touch<'a, R> {
    inner: &'a mut R,
    silence: &'a Silence,
}

impl<R: AsyncRead + Unpin> AsyncRead for Touch<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.silence.heard();
        }
        poll
    }
}
