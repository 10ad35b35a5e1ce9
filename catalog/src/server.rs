//! `drover catalog`: receives master reports over UDP and HTTP, keeps the
//! newest per master for a while, and serves them as JSON and as a live page.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::report::{now_unix, MasterReport, MASTER_KIND};
use crate::store::{load_state, save_state, StateFile, Store};

/// What `drover catalog` serves and keeps; the binary fills it from its options.
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// Port for both HTTP (TCP) and reports (UDP); 0 picks a free one, which
    /// is printed on stdout.
    pub port: u16,
    /// Address to listen on.
    pub bind: IpAddr,
    /// Seconds an entry lives after its last report.
    pub expiry_secs: u64,
    /// Where entries are saved and reloaded from on start
    /// [default: drover-catalog-PORT.json in $XDG_STATE_HOME/drover or
    /// ~/.local/state/drover].
    pub state_file: Option<PathBuf>,
    /// Keep entries in memory only.
    pub no_state_file: bool,
    /// Most entries kept; when full, the least recently updated is dropped.
    pub max_entries: usize,
    /// Largest report accepted, in bytes of JSON (UDP or POST).
    pub max_report_bytes: usize,
    /// Seconds between saves of the state file (only when something changed).
    pub save_interval_secs: u64,
    /// File holding the catalog key: reports must carry an HMAC under it
    /// (masters sign with the same file); unsigned or wrongly signed reports
    /// are dropped.
    pub catalog_key_file: Option<PathBuf>,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            port: crate::client::DEFAULT_PORT,
            bind: IpAddr::from([0, 0, 0, 0]),
            expiry_secs: 900,
            state_file: None,
            no_state_file: false,
            max_entries: 1000,
            max_report_bytes: 64 * 1024,
            save_interval_secs: 10,
            catalog_key_file: None,
        }
    }
}

/// Counters of what the catalog received and dropped, served at `/api/stats`.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct CatalogStats {
    /// drover version of the catalog.
    pub version: String,
    /// When the catalog started, unix seconds.
    pub start_time: u64,
    /// Entries currently held (expired ones may linger until the next sweep).
    pub entries: u64,
    /// Cap on entries.
    pub max_entries: u64,
    /// Seconds an entry lives after its last report.
    pub expiry_secs: u64,
    /// Largest report accepted, bytes.
    pub max_report_bytes: u64,
    /// Reports accepted by UDP.
    pub udp_received: u64,
    /// Reports accepted by `POST /update`.
    pub http_received: u64,
    /// Reports dropped because they did not parse or lacked a project.
    pub dropped_malformed: u64,
    /// Reports dropped because they were larger than `max_report_bytes`.
    pub dropped_oversized: u64,
    /// Entries pushed out because the table was full.
    pub evicted: u64,
    /// Entries dropped by expiry.
    pub expired: u64,
    /// Reports dropped because they arrived after a newer one of the same
    /// master run (UDP reordering).
    pub dropped_stale: u64,
    /// Failed state file writes.
    pub save_errors: u64,
    /// Reports without a signature, dropped by a catalog with a key.
    pub dropped_unsigned: u64,
    /// Reports whose signature did not match the catalog key.
    pub dropped_bad_signature: u64,
    /// New entries refused because the table was full of entries that all
    /// reported within the last minute.
    pub refused_full: u64,
    /// Reports kept as rival entries because another address owns the
    /// project, host and port they name.
    pub rivals: u64,
}

#[derive(Default)]
struct Counters {
    udp_received: AtomicU64,
    http_received: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_oversized: AtomicU64,
    save_errors: AtomicU64,
    dropped_unsigned: AtomicU64,
    dropped_bad_signature: AtomicU64,
    /// Unix second of the last warning about a bad signature, so a flood of
    /// forged reports logs one line a minute, not one per datagram.
    last_signature_warning: AtomicU64,
}

struct Shared {
    store: Mutex<Store>,
    counters: Counters,
    args: CatalogConfig,
    /// The catalog key; with one, only reports signed under it are taken.
    key: Option<Vec<u8>>,
    start_time: u64,
    /// Serialized `/query.json`, reused briefly so that a page poll during a
    /// flood does not re-serialize a table that changes every microsecond.
    query_cache: Mutex<Option<(u64, Instant, Bytes)>>,
}

const QUERY_CACHE_MAX_AGE: Duration = Duration::from_millis(500);

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-updated
        // in a way that matters more than losing the catalog, so keep going.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and records one report; `Err` names the counter to bump.
    fn accept(&self, bytes: &[u8], from: IpAddr) -> Result<(), Dropped> {
        if bytes.len() > self.args.max_report_bytes {
            return Err(Dropped::Oversized);
        }
        let (tag, bytes) = crate::secret::split(bytes);
        let signed = match (&self.key, tag) {
            (None, _) => false,
            (Some(_), None) => return Err(Dropped::Unsigned),
            (Some(key), Some(tag)) => {
                if !crate::secret::verify(key, tag, bytes) {
                    return Err(Dropped::BadSignature);
                }
                true
            }
        };
        let mut report: MasterReport =
            serde_json::from_slice(bytes).map_err(|_| Dropped::Malformed)?;
        report.signed = signed;
        if report.project.trim().is_empty() {
            return Err(Dropped::Malformed);
        }
        if report.kind.is_empty() {
            report.kind = MASTER_KIND.to_string();
        }
        let from = canonical_ip(from).to_string();
        if report.host.is_empty() {
            report.host = from.clone();
        }
        report.source_addr = from;
        // A stale report is well-formed; the store counts it and keeps the
        // newer entry.
        self.store().insert(report, now_unix());
        Ok(())
    }

    fn count_drop(&self, d: Dropped, from: IpAddr) {
        let c = &self.counters;
        let counter = match d {
            Dropped::Oversized => &c.dropped_oversized,
            Dropped::Malformed => &c.dropped_malformed,
            Dropped::Unsigned => &c.dropped_unsigned,
            Dropped::BadSignature => &c.dropped_bad_signature,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(d, Dropped::Unsigned | Dropped::BadSignature) {
            tracing::debug!(%from, "dropped a report: {}", d.reason());
            let now = now_unix();
            let last = c.last_signature_warning.load(Ordering::Relaxed);
            if now >= last.saturating_add(60)
                && c.last_signature_warning
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    %from,
                    "dropping reports not signed with the catalog key ({} unsigned, {} with a \
                     wrong signature so far; a master needs the same --catalog-key-file)",
                    c.dropped_unsigned.load(Ordering::Relaxed),
                    c.dropped_bad_signature.load(Ordering::Relaxed)
                );
            }
        }
    }

    fn stats(&self) -> CatalogStats {
        let (entries, evicted, expired, dropped_stale, refused_full, rivals) = {
            let s = self.store();
            (
                s.len() as u64,
                s.evicted,
                s.expired,
                s.stale,
                s.refused,
                s.rivals,
            )
        };
        let c = &self.counters;
        CatalogStats {
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: self.start_time,
            entries,
            max_entries: self.args.max_entries as u64,
            expiry_secs: self.args.expiry_secs,
            max_report_bytes: self.args.max_report_bytes as u64,
            udp_received: c.udp_received.load(Ordering::Relaxed),
            http_received: c.http_received.load(Ordering::Relaxed),
            dropped_malformed: c.dropped_malformed.load(Ordering::Relaxed),
            dropped_oversized: c.dropped_oversized.load(Ordering::Relaxed),
            evicted,
            expired,
            dropped_stale,
            save_errors: c.save_errors.load(Ordering::Relaxed),
            dropped_unsigned: c.dropped_unsigned.load(Ordering::Relaxed),
            dropped_bad_signature: c.dropped_bad_signature.load(Ordering::Relaxed),
            refused_full,
            rivals,
        }
    }

    fn snapshot(&self) -> (u64, StateFile) {
        let now = now_unix();
        let s = self.store();
        let entries = s.live(now).into_iter().cloned().collect();
        (
            s.generation(),
            StateFile {
                version: 1,
                saved_at: now,
                entries,
            },
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Dropped {
    Oversized,
    Malformed,
    Unsigned,
    BadSignature,
}

impl Dropped {
    fn reason(self) -> &'static str {
        match self {
            Dropped::Oversized => "report too large",
            Dropped::Malformed => "report is not valid JSON with a project",
            Dropped::Unsigned => "report is not signed and this catalog has a key",
            Dropped::BadSignature => "report's signature does not match the catalog key",
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Runs the catalog until SIGINT or SIGTERM, then saves its state and returns
/// the exit code. Builds its own tokio runtime, so call it from plain `main`.
pub fn run(args: CatalogConfig) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drover-catalog")
        .build()
        .context("starting tokio runtime")?;
    rt.block_on(serve(args))
}

fn state_path(args: &CatalogConfig, port: u16) -> anyhow::Result<Option<PathBuf>> {
    if args.no_state_file {
        return Ok(None);
    }
    let path = match &args.state_file {
        Some(p) => p.clone(),
        None => crate::paths::default_state_path(&format!("drover-catalog-{port}.json"))?,
    };
    crate::paths::check_parent_dir(&path, "state file")?;
    Ok(Some(path))
}

/// Binds TCP and UDP on the same port; with port 0 it retries until a port
/// the kernel picked for TCP is also free for UDP.
fn bind_both(
    ip: IpAddr,
    port: u16,
) -> anyhow::Result<(std::net::TcpListener, std::net::UdpSocket)> {
    let attempts = if port == 0 { 20 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let tcp = std::net::TcpListener::bind(SocketAddr::new(ip, port))
            .with_context(|| format!("listening on TCP {ip}:{port}"))?;
        let actual = tcp.local_addr()?.port();
        match std::net::UdpSocket::bind(SocketAddr::new(ip, actual)) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Err(e).with_context(|| format!("listening on UDP {ip}:{port}")),
        None => anyhow::bail!("could not bind {ip}:{port}"),
    }
}

async fn serve(args: CatalogConfig) -> anyhow::Result<i32> {
    let (tcp, udp) = bind_both(args.bind, args.port)?;
    let addr = tcp.local_addr()?;
    let state_path = state_path(&args, addr.port())?;

    let key = match &args.catalog_key_file {
        Some(p) => Some(crate::secret::read_secret_file(p, "catalog key")?),
        None => None,
    };
    let mut store = Store::new(args.max_entries, args.expiry_secs);
    if let Some(path) = &state_path {
        match load_state(path) {
            Ok(state) => {
                store.restore(state.entries, now_unix());
                tracing::info!("reloaded {} entries from {}", store.len(), path.display());
            }
            // A corrupt state file must not keep the catalog down; it is
            // overwritten at the next save.
            Err(e) => eprintln!("drover catalog: ignoring state file: {e:#}"),
        }
    }

    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        counters: Counters::default(),
        args: args.clone(),
        key,
        start_time: now_unix(),
        query_cache: Mutex::new(None),
    });

    tcp.set_nonblocking(true)?;
    udp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let udp = tokio::net::UdpSocket::from_std(udp)?;

    let udp_task = tokio::spawn(udp_loop(udp, shared.clone()));
    let maint_task = tokio::spawn(maintenance_loop(shared.clone(), state_path.clone()));

    let app = router(shared.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(tcp, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .await
    });

    println!("drover catalog listening on {addr} (HTTP and UDP)");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let signal = wait_for_signal().await;
    tracing::info!("{signal}: shutting down");
    let _ = stop_tx.send(true);
    udp_task.abort();
    maint_task.abort();
    // Browsers keep connections open; do not let one hold up the final save.
    match tokio::time::timeout(Duration::from_secs(3), server).await {
        Ok(Ok(Err(e))) => eprintln!("drover catalog: HTTP server: {e}"),
        Ok(Err(e)) => eprintln!("drover catalog: HTTP server task: {e}"),
        _ => {}
    }
    if let Some(path) = &state_path {
        let (_, state) = shared.snapshot();
        let path = path.clone();
        tokio::task::spawn_blocking(move || save_state(&path, &state))
            .await
            .context("saving state")??;
    }
    Ok(0)
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupt"
    }
}

async fn udp_loop(udp: tokio::net::UdpSocket, shared: Arc<Shared>) {
    // One byte more than the limit, so an oversized datagram is seen as such
    // rather than silently truncated into something that might parse.
    let mut buf = vec![0u8; shared.args.max_report_bytes.saturating_add(1).min(65_536)];
    let mut since_yield = 0u32;
    loop {
        // Under a flood the socket is always ready; step aside now and then
        // so HTTP requests on the same runtime are still answered.
        since_yield += 1;
        if since_yield == 64 {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => match shared.accept(&buf[..n], from.ip()) {
                Ok(()) => {
                    shared.counters.udp_received.fetch_add(1, Ordering::Relaxed);
                }
                Err(d) => shared.count_drop(d, from.ip()),
            },
            // ICMP errors from earlier sends and the like; the socket is fine.
            Err(e) => {
                tracing::debug!("udp receive: {e}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

async fn maintenance_loop(shared: Arc<Shared>, state_path: Option<PathBuf>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut saved_generation = None;
    let mut last_save = Instant::now();
    let save_every = Duration::from_secs(shared.args.save_interval_secs.max(1));
    loop {
        tick.tick().await;
        shared.store().expire(now_unix());
        let Some(path) = &state_path else { continue };
        if last_save.elapsed() < save_every {
            continue;
        }
        let (generation, state) = shared.snapshot();
        if saved_generation == Some(generation) {
            continue;
        }
        last_save = Instant::now();
        let path = path.clone();
        match tokio::task::spawn_blocking(move || save_state(&path, &state)).await {
            Ok(Ok(())) => saved_generation = Some(generation),
            Ok(Err(e)) => {
                shared.counters.save_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("drover catalog: {e:#}");
            }
            Err(e) => eprintln!("drover catalog: saving state: {e}"),
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/index.html",
            get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { static_file(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/favicon.svg",
            get(|| async { static_file(FAVICON_SVG, "image/svg+xml") }),
        )
        .route("/query.json", get(query_json))
        .route("/api/projects", get(api_projects))
        .route("/api/stats", get(api_stats))
        .route("/update", post(update))
        .with_state(shared)
}

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");
const FAVICON_SVG: &str = include_str!("../static/favicon.svg");

/// The page builds its DOM from text only; the policy makes sure that even a
/// mistake there cannot run injected script or load anything from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The data is public by design; let other dashboards read it.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

fn json_ok<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => json_response(StatusCode::OK, Bytes::from(b)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    json_response(status, Bytes::from(body))
}

async fn query_json(State(shared): State<Arc<Shared>>) -> Response {
    let generation = shared.store().generation();
    {
        let cache = shared.query_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, at, body)) = cache.as_ref() {
            // Same generation is only exact if no entry expired since, which
            // the one-second sweep bumps the generation for.
            if *g == generation || at.elapsed() < QUERY_CACHE_MAX_AGE {
                return json_response(StatusCode::OK, body.clone());
            }
        }
    }
    let serialized = {
        let s = shared.store();
        serde_json::to_vec(&s.live(now_unix()))
    };
    match serialized {
        Ok(b) => {
            let body = Bytes::from(b);
            *shared.query_cache.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((generation, Instant::now(), body.clone()));
            json_response(StatusCode::OK, body)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize)]
struct ProjectsQuery {
    project: Option<String>,
}

async fn api_projects(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<ProjectsQuery>,
) -> Response {
    let re = match q.project.as_deref().filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => match crate::client::project_regex(p) {
            Ok(re) => Some(re),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
        },
    };
    let s = shared.store();
    let matching: Vec<&MasterReport> = s
        .live(now_unix())
        .into_iter()
        .filter(|r| r.kind == MASTER_KIND)
        .filter(|r| match &re {
            Some(re) => re.is_match(&r.project),
            None => true,
        })
        .collect();
    json_ok(&matching)
}

async fn api_stats(State(shared): State<Arc<Shared>>) -> Response {
    json_ok(&shared.stats())
}

async fn update(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let limit = shared.args.max_report_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        shared.count_drop(Dropped::Oversized, peer.ip());
        return error(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            // Either past the limit (chunked) or the client went away; both
            // are input we drop.
            shared.count_drop(Dropped::Oversized, peer.ip());
            return error(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
        }
    };
    match shared.accept(&bytes, peer.ip()) {
        Ok(()) => {
            shared
                .counters
                .http_received
                .fetch_add(1, Ordering::Relaxed);
            json_response(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
        }
        Err(d) => {
            shared.count_drop(d, peer.ip());
            let status = match d {
                Dropped::Oversized => StatusCode::PAYLOAD_TOO_LARGE,
                Dropped::Malformed => StatusCode::BAD_REQUEST,
                Dropped::Unsigned | Dropped::BadSignature => StatusCode::FORBIDDEN,
            };
            error(status, d.reason())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(max_entries: usize) -> Shared {
        shared_with_key(max_entries, None)
    }

    fn shared_with_key(max_entries: usize, key: Option<&[u8]>) -> Shared {
        let args = CatalogConfig {
            max_entries,
            max_report_bytes: 1000,
            ..Default::default()
        };
        Shared {
            store: Mutex::new(Store::new(max_entries, args.expiry_secs)),
            counters: Counters::default(),
            args,
            key: key.map(|k| k.to_vec()),
            start_time: 0,
            query_cache: Mutex::new(None),
        }
    }

    #[test]
    fn accept_validates_and_fills_in() {
        let s = shared(10);
        let ip: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(matches!(s.accept(b"not json", ip), Err(Dropped::Malformed)));
        assert!(matches!(s.accept(b"[1,2]", ip), Err(Dropped::Malformed)));
        assert!(matches!(
            s.accept(br#"{"project":"  "}"#, ip),
            Err(Dropped::Malformed)
        ));
        assert!(matches!(
            s.accept(br#"{"project":"p","port":"x"}"#, ip),
            Err(Dropped::Malformed)
        ));
        assert!(matches!(
            s.accept(&vec![b' '; 1001], ip),
            Err(Dropped::Oversized)
        ));
        s.accept(br#"{"project":"p","port":5}"#, ip).unwrap();
        let st = s.store();
        let live = st.live(now_unix());
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].kind, MASTER_KIND);
        assert_eq!(live[0].host, "10.1.2.3");
        assert_eq!(live[0].source_addr, "10.1.2.3");
        assert!(live[0].last_update > 0);
    }

    #[test]
    fn a_catalog_with_a_key_takes_only_reports_signed_with_it() {
        let s = shared_with_key(10, Some(b"key"));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let json = br#"{"project":"p","port":5}"#;
        assert!(matches!(s.accept(json, ip), Err(Dropped::Unsigned)));
        let forged = crate::secret::sign(b"not the key", json);
        assert!(matches!(s.accept(&forged, ip), Err(Dropped::BadSignature)));
        s.accept(&crate::secret::sign(b"key", json), ip).unwrap();
        assert!(s.store().live(now_unix())[0].signed);
        // Without a key, a signature cannot be checked and proves nothing.
        let plain = shared(10);
        plain.accept(&forged, ip).unwrap();
        assert!(!plain.store().live(now_unix())[0].signed);
    }

    #[test]
    fn state_path_follows_port_and_checks_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = CatalogConfig {
            state_file: Some(dir.path().join("missing").join("s.json")),
            ..Default::default()
        };
        let e = state_path(&a, 1234).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        a.no_state_file = true;
        assert_eq!(state_path(&a, 1234).unwrap(), None);
    }
}
