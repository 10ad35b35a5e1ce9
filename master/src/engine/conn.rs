//! The network side of the engine: accepting connections, the handshake
//! (a worker or a status client), and each worker connection's reader,
//! which forwards messages to the engine and streams output bodies to disk
//! (see `transfer`); its writer is `transfer::write_loop`.

use super::*;

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

/// Who passed the handshake: a worker, or a status client (which got no
/// welcome; `proof` is the master's, owed in the status answer).
enum Greeting {
    Worker(Box<Hello>),
    Status { proof: Option<String> },
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
) -> anyhow::Result<Greeting> {
    let mut buf = Vec::new();
    let refuse = |reason: String| async move { reason };
    let msg: WorkerMsg = read_frame(reader, &mut buf)
        .await
        .map_err(|e| anyhow::anyhow!("bad hello: {e}"))?;
    // A status client goes through the same checks as a worker; only the
    // last step differs.
    let (hello, protocol_version, has_password, who) = match msg {
        WorkerMsg::Hello(hello) => {
            let (v, p) = (hello.protocol, hello.password);
            let who = format!(
                "worker {} (drover {})",
                hello.hostname, hello.drover_version
            );
            (Some(hello), v, p, who)
        }
        WorkerMsg::StatusQuery { protocol, password } => {
            (None, protocol, password, "status client".to_string())
        }
        other => anyhow::bail!("expected a hello, got {other:?}"),
    };
    let mut refusal = None;
    if protocol_version != PROTOCOL_VERSION {
        refusal = Some(format!(
            "protocol version mismatch: this master speaks version {PROTOCOL_VERSION} (drover {}), the {who} version {protocol_version}",
            env!("CARGO_PKG_VERSION"),
        ));
    } else if password.is_some() && !has_password {
        refusal =
            Some("this master requires a password; start the worker with --password-file".into());
    } else if password.is_none() && has_password {
        refusal = Some("this master has no password but the worker was given one; refusing so that neither side is fooled".into());
    }
    if let Some(reason) = refusal {
        let reason = refuse(reason).await;
        protocol::write_frame(
            writer,
            &MasterMsg::Refused {
                reason: reason.clone(),
            },
        )
        .await?;
        writer.flush().await?;
        anyhow::bail!("{reason}");
    }
    let mut proof = None;
    if let Some(password) = password {
        let mine = protocol::new_nonce();
        protocol::write_frame(
            writer,
            &MasterMsg::Challenge {
                nonce: mine.clone(),
            },
        )
        .await?;
        writer.flush().await?;
        let msg: WorkerMsg = read_frame(reader, &mut buf)
            .await
            .map_err(|e| anyhow::anyhow!("bad auth reply: {e}"))?;
        let WorkerMsg::AuthProof {
            nonce,
            proof: theirs,
        } = msg
        else {
            anyhow::bail!("expected a password proof, got {msg:?}");
        };
        if !protocol::verify_proof(password, ROLE_WORKER, &mine, &nonce, &theirs) {
            protocol::write_frame(
                writer,
                &MasterMsg::Refused {
                    reason: "wrong password".into(),
                },
            )
            .await?;
            writer.flush().await?;
            anyhow::bail!("{who} gave a wrong password");
        }
        proof = Some(protocol::auth_proof(password, ROLE_MASTER, &nonce, &mine));
    }
    let Some(hello) = hello else {
        return Ok(Greeting::Status { proof });
    };
    protocol::write_frame(
        writer,
        &MasterMsg::Welcome {
            proof,
            keepalive_interval_s: keepalive.as_secs_f64(),
        },
    )
    .await?;
    writer.flush().await?;
    Ok(Greeting::Worker(hello))
}

async fn read_loop(
    reader: &mut BufReader<OwnedReadHalf>,
    key: WorkerKey,
    events: &mpsc::UnboundedSender<Event>,
    plans: &mut mpsc::UnboundedReceiver<Outgoing>,
    timeout: Duration,
) -> String {
    let mut buf = Vec::new();
    let mut expected: HashMap<(TaskId, u32), OutputPlan> = HashMap::new();
    loop {
        let msg: WorkerMsg = match tokio::time::timeout(timeout, read_frame(reader, &mut buf)).await
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
