//! Blocking client for masters (reporting) and workers, factories and
//! `drover status` (querying). Reports go out as plain UDP datagrams and
//! queries by HTTP with reqwest's blocking client, which runs its own small
//! runtime: call these from a plain thread (or `spawn_blocking`), never from
//! inside an async task.

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::report::MasterReport;

/// Port the catalog listens on (UDP and TCP) unless told otherwise.
pub const DEFAULT_PORT: u16 = 9097;

/// Largest report, in bytes of JSON, sent as a UDP datagram. Larger reports
/// (typically masters listing many workers) go by HTTP POST instead: 8 KiB
/// fits in a single datagram on loopback and in few enough IP fragments
/// elsewhere that loss stays rare.
pub const MAX_DATAGRAM_BYTES: usize = 8 * 1024;

/// How long a connect, a send or a read may take before the call fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes of a response this client reads; guards against a broken or
/// hostile server.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Splits `HOST:PORT` (or `HOST`, or `[V6]:PORT`, optionally behind `http://`)
/// into host and port.
pub fn parse_catalog(catalog: &str) -> anyhow::Result<(String, u16)> {
    let s = catalog.trim();
    let s = s.strip_prefix("http://").unwrap_or(s);
    let s = s.trim_end_matches('/');
    if s.is_empty() {
        bail!("empty catalog address");
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .with_context(|| format!("bad catalog address {catalog:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p, catalog)?,
            None if after.is_empty() => DEFAULT_PORT,
            None => bail!("bad catalog address {catalog:?}"),
        };
        return Ok((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => Ok((s.to_string(), DEFAULT_PORT)),
        Some((host, p)) => Ok((host.to_string(), parse_port(p, catalog)?)),
        None => Ok((s.to_string(), DEFAULT_PORT)),
    }
}

fn parse_port(p: &str, catalog: &str) -> anyhow::Result<u16> {
    p.parse()
        .with_context(|| format!("bad port {p:?} in catalog address {catalog:?}"))
}

fn resolve(catalog: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let (host, port) = parse_catalog(catalog)?;
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving catalog {catalog:?}"))?
        .collect();
    if addrs.is_empty() {
        bail!("catalog {catalog:?} resolved to no address");
    }
    Ok(addrs)
}

/// Sends `report` to the catalog at `catalog` (`HOST:PORT`).
///
/// Reports up to [`MAX_DATAGRAM_BYTES`] of JSON go as one fire-and-forget UDP
/// datagram: success means it was sent, not that it arrived. Larger ones are
/// POSTed to `/update`, which waits up to [`TIMEOUT`] for the catalog.
pub fn send_report(catalog: &str, report: &MasterReport) -> anyhow::Result<()> {
    send_signed_report(catalog, report, None)
}

/// [`send_report`], signed with `key` (the catalog key) when there is one,
/// so that a catalog holding the same key takes it.
pub fn send_signed_report(
    catalog: &str,
    report: &MasterReport,
    key: Option<&[u8]>,
) -> anyhow::Result<()> {
    let body = report_body(report, key)?;
    if body.len() > MAX_DATAGRAM_BYTES {
        return post_json(catalog, "/update", &body);
    }
    let addrs = resolve(catalog)?;
    let mut last_err = None;
    for addr in addrs {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let sent = UdpSocket::bind(local).and_then(|s| s.send_to(&body, addr));
        match sent {
            Ok(_) => return Ok(()),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Err(e).with_context(|| format!("sending report to catalog {catalog}")),
        None => bail!("catalog {catalog:?} resolved to no address"),
    }
}

/// POSTs `report` to the catalog's `/update` whatever its size, for callers
/// that want to know it arrived (a master's last report, say).
pub fn post_report(catalog: &str, report: &MasterReport) -> anyhow::Result<()> {
    post_signed_report(catalog, report, None)
}

/// [`post_report`], signed with `key` when there is one.
pub fn post_signed_report(
    catalog: &str,
    report: &MasterReport,
    key: Option<&[u8]>,
) -> anyhow::Result<()> {
    let body = report_body(report, key)?;
    post_json(catalog, "/update", &body)
}

fn report_body(report: &MasterReport, key: Option<&[u8]>) -> anyhow::Result<Vec<u8>> {
    let json = serde_json::to_vec(report)?;
    Ok(match key {
        Some(k) => crate::secret::sign(k, &json),
        None => json,
    })
}

fn post_json(catalog: &str, path: &str, body: &[u8]) -> anyhow::Result<()> {
    http_request(catalog, reqwest::Method::POST, path, &[], Some(body))?;
    Ok(())
}

/// Longest project regex the catalog accepts, to bound compile time.
pub const MAX_PROJECT_REGEX_LEN: usize = 1024;

/// Compiles a project regex with the limits the catalog applies, so a
/// client can reject a pattern up front instead of at every query.
pub fn project_regex(pattern: &str) -> anyhow::Result<regex::Regex> {
    if pattern.len() > MAX_PROJECT_REGEX_LEN {
        bail!("project regex longer than {MAX_PROJECT_REGEX_LEN} bytes");
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| anyhow::anyhow!("bad project regex {pattern:?}: {}", one_line(&e)))
}

/// The regex crate's message in one line: its syntax errors draw the pattern
/// with a caret over several lines, which reads badly in a log or a JSON
/// error; the last line says what is wrong.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    last.trim().trim_start_matches("error: ").to_string()
}

/// Checks that the catalog would accept `pattern` as a project regex.
pub fn check_project_regex(pattern: &str) -> anyhow::Result<()> {
    project_regex(pattern).map(|_| ())
}

/// Masters whose project matches `project_regex` (all masters if `None`),
/// most recently updated first. The regex is matched anywhere in the project
/// name, so anchor it (`^name$`) for an exact match.
pub fn query(catalog: &str, project_regex: Option<&str>) -> anyhow::Result<Vec<MasterReport>> {
    let query: Vec<(&str, &str)> = project_regex
        .map(|re| ("project", re))
        .into_iter()
        .collect();
    let body = http_request(catalog, reqwest::Method::GET, "/api/projects", &query, None)?;
    serde_json::from_slice(&body).with_context(|| format!("parsing answer of catalog {catalog}"))
}

/// The most recently updated master matching `project_regex` that has not
/// announced it stopped; what a worker connects to.
pub fn find_master(catalog: &str, project_regex: &str) -> anyhow::Result<Option<MasterReport>> {
    let (masters, _) = rank_masters(query(catalog, Some(project_regex))?);
    Ok(masters.into_iter().next())
}

/// The running masters among `masters` in the order a worker should try
/// them: signed reports (checked by a catalog with a key) first, then the
/// entry owned by the first address before rival entries from elsewhere,
/// newest first otherwise. Also returns one line per project that more than
/// one master claims, naming each of them, for the worker to log: two masters
/// of the same name are either a mistake or an impostor, and a worker must
/// not move between them unseen.
pub fn rank_masters(masters: Vec<MasterReport>) -> (Vec<MasterReport>, Vec<String>) {
    let mut live: Vec<MasterReport> = masters.into_iter().filter(|m| !m.stopped).collect();
    // Stable, so the catalog's newest-first order holds among equals.
    live.sort_by_key(|m| (!m.signed, m.rival));
    let mut warnings = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for m in &live {
        if seen.contains(&m.project.as_str()) {
            continue;
        }
        seen.push(&m.project);
        let claims: Vec<String> = live
            .iter()
            .filter(|o| o.project == m.project)
            .map(describe_claim)
            .collect();
        if claims.len() > 1 {
            warnings.push(format!(
                "{} masters claim project {:?}: {}; trying them in this order",
                claims.len(),
                m.project,
                claims.join(", ")
            ));
        }
    }
    (live, warnings)
}

fn describe_claim(m: &MasterReport) -> String {
    let mut s = format!("{} (reported from {}", m.address(), m.source_addr);
    if m.signed {
        s.push_str(", signed");
    }
    if m.rival {
        s.push_str(", rival of an earlier entry");
    }
    s.push(')');
    s
}

/// GETs `path` from the catalog and returns the body of a 2xx answer.
pub fn get(catalog: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    http_request(catalog, reqwest::Method::GET, path, &[], None)
}

/// Sends one request to the catalog and returns the body of a 2xx answer;
/// any other status is an error carrying the catalog's own message.
fn http_request(
    catalog: &str,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<Vec<u8>> {
    let (host, port) = parse_catalog(catalog)?;
    let url = if host.contains(':') {
        format!("http://[{host}]:{port}{path}")
    } else {
        format!("http://{host}:{port}{path}")
    };
    // A catalog is a service on the local network: a proxy configured for
    // the web must not stand between it and its masters and workers.
    let client = reqwest::blocking::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .no_proxy()
        .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("starting the HTTP client")?;
    let mut req = client
        .request(method.clone(), &url)
        .query(query)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(b) = body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b.to_vec());
    }
    let resp = req
        .send()
        .with_context(|| format!("asking catalog {catalog} ({method} {path})"))?;
    let status = resp.status();
    let mut raw = Vec::new();
    resp.take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading answer of catalog {catalog}"))?;
    if raw.len() > MAX_RESPONSE_BYTES {
        bail!("answer of catalog {catalog} is larger than {MAX_RESPONSE_BYTES} bytes");
    }
    if !status.is_success() {
        bail!(
            "catalog {catalog} refused {method} {path} ({status}): {}",
            error_message(&raw)
        );
    }
    Ok(raw)
}

/// The `error` field of the catalog's JSON error body, else the body as
/// text, on one line.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_prefers_signed_then_owner_and_names_every_claimant() {
        let mut rival = MasterReport::new_master("p", "10.0.0.66", 9);
        rival.rival = true;
        rival.source_addr = "10.0.0.66".into();
        let mut owner = MasterReport::new_master("p", "10.0.0.1", 9);
        owner.source_addr = "10.0.0.1".into();
        let mut stopped = owner.clone();
        stopped.project = "q".into();
        stopped.stopped = true;
        let (ranked, warnings) = rank_masters(vec![rival.clone(), owner.clone(), stopped]);
        assert_eq!(ranked, vec![owner.clone(), rival.clone()]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("10.0.0.1:9") && warnings[0].contains("10.0.0.66:9"));
        let mut signed = rival.clone();
        signed.signed = true;
        let (ranked, _) = rank_masters(vec![owner.clone(), signed.clone()]);
        assert_eq!(ranked[0], signed);
        let (_, warnings) = rank_masters(vec![owner]);
        assert!(warnings.is_empty());
    }

    #[test]
    fn catalog_addresses() {
        assert_eq!(parse_catalog("h:1").unwrap(), ("h".into(), 1));
        assert_eq!(parse_catalog("h").unwrap(), ("h".into(), DEFAULT_PORT));
        assert_eq!(parse_catalog("http://h:2/").unwrap(), ("h".into(), 2));
        assert_eq!(parse_catalog("[::1]:3").unwrap(), ("::1".into(), 3));
        assert_eq!(
            parse_catalog("[::1]").unwrap(),
            ("::1".into(), DEFAULT_PORT)
        );
        assert_eq!(parse_catalog("::1").unwrap(), ("::1".into(), DEFAULT_PORT));
        assert!(parse_catalog("h:notaport").is_err());
        assert!(parse_catalog("").is_err());
        assert!(parse_catalog("[::1").is_err());
    }

    #[test]
    fn project_regexes() {
        assert!(check_project_regex("^e2e-[0-9]+$").is_ok());
        let e = format!("{:#}", check_project_regex("(unclosed").unwrap_err());
        assert!(e.contains("bad project regex"), "{e}");
        assert!(check_project_regex(&"a".repeat(MAX_PROJECT_REGEX_LEN + 1)).is_err());
    }

    #[test]
    fn error_bodies_read_as_one_line() {
        assert_eq!(
            error_message(br#"{"error":"bad project regex \"(\":\n unclosed group"}"#),
            r#"bad project regex "(": unclosed group"#
        );
        assert_eq!(error_message(b"plain\ntext"), "plain text");
    }
}
