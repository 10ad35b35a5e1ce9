//! Where the factory learns a master's demand: from the master itself (a
//! status query over the worker port) or from a catalog.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use drover_catalog::MasterReport;
use drover_protocol::auth::{self, Answer, AuthError, PeerHandshake};
use drover_protocol::stream::Handshaking;
use drover_protocol::tls::tokio_rustls::rustls::ClientConfig;
use tokio::net::TcpStream;

/// How long one status query may take, connect to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the master at `addr` (`HOST:PORT`, its worker port) for its status
/// report. With a password the query proves it the way a worker does, and
/// the master's answer must prove it back; with `tls` (a master that has
/// TLS) it goes over TLS, trusting the master as a worker would.
pub async fn query_master(
    addr: &str,
    password: Option<&[u8]>,
    tls: Option<&Arc<ClientConfig>>,
) -> anyhow::Result<MasterReport> {
    tokio::time::timeout(QUERY_TIMEOUT, query_master_inner(addr, password, tls))
        .await
        .with_context(|| {
            format!("master {addr} did not answer a status query in {QUERY_TIMEOUT:?}")
        })?
}

async fn query_master_inner(
    addr: &str,
    password: Option<&[u8]>,
    tls: Option<&Arc<ClientConfig>>,
) -> anyhow::Result<MasterReport> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to master {addr}"))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Handshaking::connect(stream, addr, tls).await?;
    let (handshake, query) = PeerHandshake::status(password);
    // Over TLS the proofs are bound to the session, as the master expects.
    let mut handshake = handshake.bound_to(conn.binding());
    match auth::run(
        &mut handshake,
        &mut conn.reader,
        &mut conn.writer,
        Some(query),
    )
    .await
    {
        Ok(Answer::Status(report)) => Ok(*report),
        Ok(Answer::Welcome { .. }) => bail!("master {addr} welcomed a status query as a worker"),
        Err(AuthError::Refused(reason)) => bail!("master {addr} refused the query: {reason}"),
        Err(AuthError::Password(why)) => {
            bail!("master {addr}: {why} (check --password-file)")
        }
        Err(e) => Err(e).with_context(|| format!("reading the answer of master {addr}")),
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
