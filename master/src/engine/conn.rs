//! The network side of the engine: accepting connections, the handshake
//! (a worker or a status client), and each worker connection's reader,
//! which forwards messages to the engine and streams output bodies to disk
//! (see `transfer`); its writer is `transfer::write_loop`.

use super::*;
use drover_protocol::auth::{self, AuthError, Greeting, MasterHandshake};

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
    loop {
        let msg =
            match tokio::time::timeout(timeout, crate::wire::read_worker_msg(reader, &mut buf))
                .await
            {
                Err(_) => return format!("no message for {timeout:?}"),
                Ok(Err(FrameError::Closed)) => return "connection closed".into(),
                Ok(Err(e)) => return format!("protocol error: {e}"),
                Ok(Ok(m)) => m,
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
            if let Err(e) = receive_outputs(reader, outputs, dests.as_deref()).await {
                return format!("receiving outputs of task {}: {e}", report.task_id);
            }
        }
        if events.send(Event::Msg { key, msg }).is_err() {
            return "master shutting down".into();
        }
    }
}
