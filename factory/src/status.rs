//! Where the factory learns a master's demand: from the master itself (a
//! status query over the worker port) or from a catalog.

use std::time::Duration;

use anyhow::{bail, Context};
use drover_catalog::MasterReport;
use drover_protocol::{
    self as protocol, read_frame, MasterMsg, WorkerMsg, PROTOCOL_VERSION, ROLE_MASTER, ROLE_WORKER,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one status query may take, connect to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the master at `addr` (`HOST:PORT`, its worker port) for its status
/// report. With a password the query proves it the way a worker does, and
/// the master's answer must prove it back.
pub async fn query_master(addr: &str, password: Option<&[u8]>) -> anyhow::Result<MasterReport> {
    tokio::time::timeout(QUERY_TIMEOUT, query_master_inner(addr, password))
        .await
        .with_context(|| {
            format!("master {addr} did not answer a status query in {QUERY_TIMEOUT:?}")
        })?
}

async fn query_master_inner(addr: &str, password: Option<&[u8]>) -> anyhow::Result<MasterReport> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to master {addr}"))?;
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    protocol::write_frame(
        &mut w,
        &WorkerMsg::StatusQuery {
            protocol: PROTOCOL_VERSION,
            password: password.is_some(),
        },
    )
    .await?;
    w.flush().await?;
    let mut my_nonce = None;
    loop {
        let msg: MasterMsg = read_frame(&mut reader, &mut buf)
            .await
            .with_context(|| format!("reading the answer of master {addr}"))?;
        match msg {
            MasterMsg::Challenge { nonce } => {
                let Some(password) = password else {
                    bail!("master {addr} asks for a password; give the factory --password-file");
                };
                if my_nonce.is_some() {
                    bail!("master {addr} sent a second challenge");
                }
                let mine = protocol::new_nonce();
                let proof = protocol::auth_proof(password, ROLE_WORKER, &nonce, &mine);
                protocol::write_frame(
                    &mut w,
                    &WorkerMsg::AuthProof {
                        nonce: mine.clone(),
                        proof,
                    },
                )
                .await?;
                w.flush().await?;
                my_nonce = Some((nonce, mine));
            }
            MasterMsg::Status { proof, report } => {
                if let Some(password) = password {
                    let Some((theirs, mine)) = &my_nonce else {
                        bail!("master {addr} answered without the password challenge it owes");
                    };
                    let ok = proof.as_deref().is_some_and(|p| {
                        protocol::verify_proof(password, ROLE_MASTER, mine, theirs, p)
                    });
                    if !ok {
                        bail!("master {addr} could not prove it knows the password");
                    }
                }
                return Ok(*report);
            }
            MasterMsg::Refused { reason } => bail!("master {addr} refused the query: {reason}"),
            other => bail!("master {addr} answered a status query with {other:?}"),
        }
    }
}

/// The newest running master whose project matches `project` in the catalog
/// at `catalog`, or `None` if there is none.
pub async fn query_catalog(catalog: &str, project: &str) -> anyhow::Result<Option<MasterReport>> {
    let (catalog, project) = (catalog.to_string(), project.to_string());
    tokio::task::spawn_blocking(move || drover_catalog::client::find_master(&catalog, &project))
        .await
        .context("catalog query thread")?
}
