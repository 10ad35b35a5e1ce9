//! Blocking client for masters (reporting) and workers, factories and
//! `drover status` (querying). It needs no async runtime: reports go out as
//! plain UDP datagrams and queries are HTTP/1.1 over a std `TcpStream`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
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
    let (status, resp) = http_request(catalog, "POST", path, Some(body))?;
    if !(200..300).contains(&status) {
        bail!(
            "catalog {catalog} answered {status} to POST {path}: {}",
            String::from_utf8_lossy(&resp).trim()
        );
    }
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
        .with_context(|| format!("bad project regex {pattern:?}"))
}

/// Checks that the catalog would accept `pattern` as a project regex.
pub fn check_project_regex(pattern: &str) -> anyhow::Result<()> {
    project_regex(pattern).map(|_| ())
}

/// Masters whose project matches `project_regex` (all masters if `None`),
/// most recently updated first. The regex is matched anywhere in the project
/// name, so anchor it (`^name$`) for an exact match.
pub fn query(catalog: &str, project_regex: Option<&str>) -> anyhow::Result<Vec<MasterReport>> {
    let path = match project_regex {
        Some(re) => format!("/api/projects?project={}", percent_encode(re)),
        None => "/api/projects".to_string(),
    };
    let body = get(catalog, &path)?;
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
    let (status, body) = http_request(catalog, "GET", path, None)?;
    if !(200..300).contains(&status) {
        bail!(
            "catalog {catalog} answered {status} to GET {path}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

fn connect(catalog: &str) -> anyhow::Result<TcpStream> {
    let mut last_err = None;
    for addr in resolve(catalog)? {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Err(e).with_context(|| format!("connecting to catalog {catalog}")),
        None => bail!("catalog {catalog:?} resolved to no address"),
    }
}

fn http_request(
    catalog: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let (host, port) = parse_catalog(catalog)?;
    let mut stream = connect(catalog)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: drover/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    stream
        .write_all(&out)
        .with_context(|| format!("sending request to catalog {catalog}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading answer of catalog {catalog}"))?;
    if raw.len() > MAX_RESPONSE_BYTES {
        bail!("answer of catalog {catalog} is larger than {MAX_RESPONSE_BYTES} bytes");
    }
    parse_response(&raw).with_context(|| format!("bad HTTP answer from catalog {catalog}"))
}

/// Parses a whole HTTP/1.1 response read until the server closed.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("headers are not UTF-8")?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("no status line")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()
        .context("bad status code")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad Content-Length")?);
        }
    }
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            bail!("body cut short: {} of {n} bytes", rest.len());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn decode_chunked(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line not terminated")?;
        let size_text = std::str::from_utf8(&data[..eol]).context("chunk size not UTF-8")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
    fn responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[]"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"abcde"[..]));
        let (s, b) = parse_response(b"HTTP/1.1 400 Bad Request\r\n\r\nno").unwrap();
        assert_eq!((s, b.as_slice()), (400, &b"no"[..]));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(percent_encode("^a.b$"), "%5Ea.b%24");
        assert_eq!(percent_encode("é &"), "%C3%A9%20%26");
    }
}
