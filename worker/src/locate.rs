//! Where a worker finds its master: a fixed address, or a project name looked
//! up in a catalog at every (re)connect, so that a master that restarted on
//! another host or port is found again.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// Most masters matching a project that one connect attempt tries, newest
/// first; more would only mean stale entries of masters long gone.
const MAX_CANDIDATES: usize = 8;

/// How long one connect to a master found in the catalog may take before the
/// next candidate is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a worker looks for its master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterSource {
    /// A fixed `HOST:PORT`.
    Address(String),
    /// The newest live master whose project matches `project` (a regex), as
    /// the catalog at `catalog` (`HOST:PORT`) knows it, asked anew at every
    /// connect.
    Catalog {
        /// The catalog, `HOST:PORT`.
        catalog: String,
        /// Regex the project name must match (anywhere; anchor it for an exact match).
        project: String,
    },
}

impl From<String> for MasterSource {
    fn from(address: String) -> Self {
        MasterSource::Address(address)
    }
}

impl From<&str> for MasterSource {
    fn from(address: &str) -> Self {
        MasterSource::Address(address.to_string())
    }
}

impl fmt::Display for MasterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterSource::Address(a) => f.write_str(a),
            MasterSource::Catalog { catalog, project } => {
                write!(f, "project /{project}/ in catalog {catalog}")
            }
        }
    }
}

impl MasterSource {
    /// Addresses to try, in order. For a catalog: each live master matching
    /// the project, newest first, by its reported host and then by the
    /// address its reports came from (for a host name that does not resolve
    /// here). An error says why there is nothing to try.
    pub async fn candidates(&self) -> anyhow::Result<Vec<String>> {
        match self {
            MasterSource::Address(a) => Ok(vec![a.clone()]),
            MasterSource::Catalog { catalog, project } => {
                let (c, p) = (catalog.clone(), project.clone());
                // The catalog client is blocking (and bounded by its own
                // timeouts); keep it off the runtime's threads.
                let masters = tokio::task::spawn_blocking(move || {
                    drover_catalog::client::query(&c, Some(&p))
                })
                .await
                .context("catalog lookup panicked")?
                .with_context(|| format!("asking catalog {catalog}"))?;
                let (masters, warnings) = drover_catalog::client::rank_masters(masters);
                for w in warnings {
                    warn!("{w}");
                }
                let mut out = Vec::new();
                for m in masters.iter().take(MAX_CANDIDATES) {
                    for a in std::iter::once(m.address()).chain(m.source_address()) {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                if out.is_empty() {
                    bail!("catalog {catalog} knows no running master whose project matches /{project}/");
                }
                Ok(out)
            }
        }
    }

    /// Connects to the master, asking the catalog first if there is one.
    /// Returns the stream and the address it reached.
    pub async fn connect(&self) -> anyhow::Result<(TcpStream, String)> {
        let candidates = self.candidates().await?;
        let catalog = matches!(self, MasterSource::Catalog { .. });
        let mut errors = Vec::new();
        for addr in candidates {
            let attempt = if catalog {
                // A stale entry may point at a host that no longer answers;
                // do not let it hold up the next candidate.
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )),
                }
            } else {
                TcpStream::connect(&addr).await
            };
            match attempt {
                Ok(stream) => {
                    if catalog {
                        info!(master = %addr, "found {self}");
                    }
                    return Ok((stream, addr));
                }
                Err(e) => {
                    debug!(master = %addr, "cannot connect: {e}");
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        match self {
            MasterSource::Address(a) => bail!(
                "cannot connect to master {a}: {}",
                errors.join("; ").trim_start_matches(&format!("{a}: "))
            ),
            MasterSource::Catalog { .. } => {
                bail!("no master of {self} answered: {}", errors.join("; "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_from() {
        assert_eq!(MasterSource::from("h:1").to_string(), "h:1");
        let c = MasterSource::Catalog {
            catalog: "cat:9097".into(),
            project: "^p$".into(),
        };
        assert_eq!(c.to_string(), "project /^p$/ in catalog cat:9097");
    }

    #[tokio::test]
    async fn unreachable_catalog_is_an_error_that_says_so() {
        // A port nobody listens on: bind one, note it, free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = MasterSource::Catalog {
            catalog: format!("127.0.0.1:{port}"),
            project: "x".into(),
        };
        let e = format!("{:#}", c.connect().await.unwrap_err());
        assert!(e.contains("asking catalog"), "{e}");
    }
}
