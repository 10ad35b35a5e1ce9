//! The network side of the engine: accepting connections, the handshake
//! (a worker or a status client), and each worker connection's reader,
//! which forwards messages to the engine and streams output bodies to disk
//! (see `transfer`); its writer is `transfer::write_loop`.

use super::*;
use drover_protocol::auth::{self, AuthError, Greeting, MasterHandshake};
use drover_protocol::stream::{is_auth_failure, End, Handshaking};
use drover_protocol::tls::tokio_rustls::TlsAcceptor;
use tracing::error;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use tokio::io::AsyncRead;

static NEXT_WORKER: AtomicU32 = AtomicU32::new(1);

/// How long a connection has to finish its handshake (TLS and password):
/// a real worker needs a few round trips, and a connection that stalls
/// holds a descriptor until then.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Connections that may be in their handshake at once. A new one past this
/// drops the oldest, so stalled connections cannot shut real workers out:
/// a real worker finishes in milliseconds and is never the oldest for long.
const MAX_HANDSHAKING: usize = 256;

/// How often, at most, connections that missed the handshake deadline are
/// logged at WARN: a flood of stalled connections would otherwise log a
/// line each. The first one of a quiet spell is logged at once, then one
/// line per interval with how many more there were.
const STALL_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// The counting behind [`STALL_LOG_INTERVAL`].
#[derive(Default)]
struct StallLog {
    /// Until when stalls are counted, not logged one by one.
    quiet_until: Option<tokio::time::Instant>,
    counted: u64,
}

/// What to do about a stalled connection, from [`StallLog::stalled`].
#[derive(Debug, PartialEq)]
enum Stall {
    /// Log it now.
    Log,
    /// Counted; the first one counted in an interval asks for a
    /// [`StallLog::flush`] at the given instant.
    Counted(Option<tokio::time::Instant>),
}

impl StallLog {
    fn stalled(&mut self, now: tokio::time::Instant) -> Stall {
        match self.quiet_until {
            Some(until) if now < until => {
                self.counted += 1;
                Stall::Counted((self.counted == 1).then_some(until))
            }
            _ => {
                self.quiet_until = Some(now + STALL_LOG_INTERVAL);
                Stall::Log
            }
        }
    }

    /// How many were counted since the last flush; when there were any, a
    /// new interval starts (the flood may go on).
    fn flush(&mut self, now: tokio::time::Instant) -> u64 {
        let counted = std::mem::take(&mut self.counted);
        if counted > 0 {
            self.quiet_until = Some(now + STALL_LOG_INTERVAL);
        }
        counted
    }
}

/// Logs a connection that missed the handshake deadline, aggregated by
/// [`StallLog`].
fn log_stall(handshakes: &Arc<std::sync::Mutex<Handshakes>>, addr: SocketAddr) {
    let Ok(mut h) = handshakes.lock() else {
        return;
    };
    match h.stalls.stalled(tokio::time::Instant::now()) {
        Stall::Log => warn!(
            peer = %addr,
            "connection from {addr} did not complete the handshake in {HANDSHAKE_DEADLINE:?} \
             (more are counted, logged every {STALL_LOG_INTERVAL:?})"
        ),
        Stall::Counted(flush_at) => {
            debug!(peer = %addr, "connection from {addr} did not complete the handshake in {HANDSHAKE_DEADLINE:?}");
            if let Some(at) = flush_at {
                let handshakes = Arc::clone(handshakes);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let counted = match handshakes.lock() {
                        Ok(mut h) => h.stalls.flush(tokio::time::Instant::now()),
                        Err(_) => return,
                    };
                    if counted > 0 {
                        warn!(
                            "{counted} more connections did not complete the handshake in \
                             {HANDSHAKE_DEADLINE:?} in the last {STALL_LOG_INTERVAL:?} \
                             (latest from {addr})"
                        );
                    }
                });
            }
        }
    }
}

/// What a connection must show before it is a worker.
#[derive(Clone)]
pub(super) struct Security {
    pub password: Option<Arc<[u8]>>,
    pub tls: Option<TlsAcceptor>,
}

/// Connections in their handshake, oldest first, each with the means to
/// drop it.
#[derive(Default)]
struct Handshakes {
    next: u64,
    open: VecDeque<(u64, oneshot::Sender<()>)>,
    stalls: StallLog,
}

impl Handshakes {
    /// Registers a new connection; drops the oldest if there are too many.
    fn enter(&mut self) -> (u64, oneshot::Receiver<()>) {
        if self.open.len() >= MAX_HANDSHAKING {
            if let Some((_, drop_it)) = self.open.pop_front() {
                let _ = drop_it.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.open.push_back((id, tx));
        (id, rx)
    }

    fn leave(&mut self, id: u64) {
        if let Some(i) = self.open.iter().position(|(k, _)| *k == id) {
            self.open.remove(i);
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, so
/// that a crowd of connections (stalled or real) does not run the master
/// out of descriptors, and says so in the log.
pub(crate) fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur >= lim.rlim_max {
            info!(
                limit = lim.rlim_cur,
                "open file limit is already at its hard limit"
            );
            return;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            info!(
                from = old,
                to = lim.rlim_max,
                "raised the open file limit to its hard limit"
            );
        } else {
            warn!(
                limit = old,
                "could not raise the open file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    security: Security,
    keepalive: (Duration, Duration),
) {
    let handshakes = Arc::new(std::sync::Mutex::new(Handshakes::default()));
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
        let security = security.clone();
        let (id, dropped) = match handshakes.lock() {
            Ok(mut h) => h.enter(),
            Err(_) => return,
        };
        let handshakes = Arc::clone(&handshakes);
        tokio::spawn(async move {
            let greeted = tokio::select! {
                r = tokio::time::timeout(
                    HANDSHAKE_DEADLINE,
                    handshake(stream, addr, &security, keepalive.0),
                ) => r,
                _ = dropped => {
                    debug!(peer = %addr, "dropped in its handshake: {MAX_HANDSHAKING} newer connections were in theirs");
                    return;
                }
            };
            if let Ok(mut h) = handshakes.lock() {
                h.leave(id);
            }
            let (greeting, reader, writer, fd) = match greeted {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    warn!(peer = %addr, "refused connection from {addr}: {e:#}");
                    return;
                }
                Err(_) => {
                    log_stall(&handshakes, addr);
                    return;
                }
            };
            if let Err(e) = connection(greeting, reader, writer, fd, addr, events, keepalive).await
            {
                warn!(peer = %addr, "{e}");
            }
        });
    }
}

/// TLS (if the master has it), then the password handshake; hands on the
/// connection's streams, sealed when there is a password but no TLS.
async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    security: &Security,
    keepalive: Duration,
) -> anyhow::Result<(Greeting, Reader, Writer, RawFd)> {
    // The socket itself, for the worker-loss clock to peek at (see `Silence`).
    let fd = stream.as_raw_fd();
    let mut conn = match &security.tls {
        Some(acceptor) => {
            let tls = acceptor
                .accept(stream)
                .await
                .map_err(|e| anyhow::anyhow!("TLS handshake failed: {e}"))?;
            Handshaking::tls(tls.into())?
        }
        None => Handshaking::plain(stream),
    };
    let mut hs = MasterHandshake::new(security.password.as_deref(), keepalive.as_secs_f64())
        .bound_to(conn.binding());
    let greeting = auth::run(&mut hs, &mut conn.reader, &mut conn.writer, None)
        .await
        .map_err(|e: AuthError| anyhow::anyhow!(e))?;
    debug!(peer = %addr, tls = conn.binding().is_some(), "handshake done");
    // A status client reads the answer as the last message of its handshake,
    // unsealed (over TLS it is protected all the same).
    let keys = match greeting {
        Greeting::Worker(_) => hs.session_keys(),
        Greeting::Status { .. } => None,
    };
    let (reader, writer) = conn.finish(keys, End::Master);
    Ok((greeting, reader, writer, fd))
}

async fn connection(
    greeting: Greeting,
    mut reader: Reader,
    mut writer: Writer,
    fd: RawFd,
    addr: SocketAddr,
    events: mpsc::UnboundedSender<Event>,
    (interval, timeout): (Duration, Duration),
) -> anyhow::Result<()> {
    let hello = match greeting {
        Greeting::Worker(hello) => hello,
        Greeting::Status { proof } => {
            return answer_status(&mut writer, &events, proof).await;
        }
    };
    let key = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let (plans, mut plans_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(WriteGate::default());
    let direct = link::direct_socket(&writer);
    if events
        .send(Event::Joined {
            key,
            hello,
            addr,
            link: Link::new(tx, plans, direct, Arc::clone(&gate)),
        })
        .is_err()
    {
        return Ok(());
    }
    let writer_task = tokio::spawn(write_loop(writer, rx, gate, interval));
    let reason = read_loop(&mut reader, fd, key, &events, &mut plans_rx, timeout).await;
    if reason.starts_with(AUTH_FAILED) {
        // Not a glitch: someone on the path is tampering with the connection.
        error!(peer = %addr, "frame authentication failed from {addr}: {reason}");
    }
    writer_task.abort();
    let _ = events.send(Event::Gone { key, reason });
    Ok(())
}

/// How a reason for losing a worker starts when one of its frames failed
/// authentication.
const AUTH_FAILED: &str = "frame authentication failed";

/// Sends a status client the master's report and ends the connection.
async fn answer_status(
    writer: &mut Writer,
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

async fn read_loop(
    reader: &mut Reader,
    fd: RawFd,
    key: WorkerKey,
    events: &mpsc::UnboundedSender<Event>,
    plans: &mut mpsc::UnboundedReceiver<Outgoing>,
    timeout: Duration,
) -> String {
    let mut buf = Vec::new();
    let mut expected: HashMap<(TaskId, u32), OutputPlan> = HashMap::default();
    let silence = Silence::new(fd, timeout);
    // One timer for the connection's life, moved on only when it fires: a
    // timer made per frame cost a timer-wheel insert and removal per task.
    let watchdog = tokio::time::sleep_until(silence.deadline());
    tokio::pin!(watchdog);
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
                    _ = &mut watchdog => {
                        if silence.gone() {
                            return format!("no byte for {timeout:?}");
                        }
                        watchdog.as_mut().reset(silence.deadline());
                    }
                }
            }
        };
        let mut msg = match msg {
            Err(FrameError::Closed) => return "connection closed".into(),
            Err(FrameError::Io(e)) if is_auth_failure(&e) => return format!("{AUTH_FAILED}: {e}"),
            Err(e) => return format!("protocol error: {e}"),
            Ok(m) => m,
        };
        if let WorkerMsg::TaskDone { report, outputs } = &mut msg {
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
            // A command that exited 0 wrote whole files, even if it left
            // some declared outputs out (a Python call's result, which says
            // why, comes back that way); a failed or killed one's are not
            // trusted.
            let keep = report.ending == Ending::Exited && report.exit_code == Some(0);
            match receive_attempt(&mut *reader, report, outputs, dests.as_deref(), keep).await {
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
                Err(e) if is_auth_failure(e.as_ref()) => {
                    return format!(
                        "{AUTH_FAILED}: receiving outputs of task {}: {e}",
                        report.task_id
                    );
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
    fn new(fd: RawFd, timeout: Duration) -> Silence {
        Silence {
            fd,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_cap_the_oldest_handshake_is_dropped_first() {
        let mut h = Handshakes::default();
        let mut rxs: Vec<_> = (0..MAX_HANDSHAKING).map(|_| h.enter()).collect();
        // One finishes in time: it leaves and is never dropped.
        let (done, _) = rxs.remove(3);
        h.leave(done);
        let (_, mut newest) = h.enter();
        assert!(
            rxs.iter_mut().all(|(_, rx)| rx.try_recv().is_err()),
            "room was left"
        );
        let _ = h.enter();
        assert!(rxs[0].1.try_recv().is_ok(), "the oldest was not dropped");
        assert!(rxs[1].1.try_recv().is_err(), "a younger one was dropped");
        assert!(newest.try_recv().is_err());
        assert_eq!(h.open.len(), MAX_HANDSHAKING);
    }

    #[test]
    fn stalled_handshakes_are_logged_once_then_counted_per_interval() {
        let mut log = StallLog::default();
        let t0 = tokio::time::Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(log.stalled(t0), Stall::Log);
        let flush_at = t0 + STALL_LOG_INTERVAL;
        assert_eq!(log.stalled(t0 + second), Stall::Counted(Some(flush_at)));
        // Only the first one counted asks for a flush.
        for i in 2..100 {
            assert_eq!(log.stalled(t0 + second * i / 50), Stall::Counted(None));
        }
        assert_eq!(log.flush(flush_at), 99);
        // The flood goes on: still counted, in a new interval.
        let next = flush_at + STALL_LOG_INTERVAL;
        assert_eq!(log.stalled(flush_at + second), Stall::Counted(Some(next)));
        assert_eq!(log.flush(next), 1);
        // Quiet since: the next interval has nothing to say, and a stall
        // after it is logged at once again.
        let later = next + STALL_LOG_INTERVAL;
        assert_eq!(log.flush(later), 0);
        assert_eq!(log.stalled(later), Stall::Log);
    }
}
