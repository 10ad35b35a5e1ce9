//! `drover worker`: connect to a master and run its tasks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use drover_worker::{run_worker, MasterSource, WorkerConfig};

use super::{host_port, project_regex, Offer, HOST_PORT, PROJECT};

/// Options of `drover worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The master (or find it with --project).
    #[arg(
        value_name = HOST_PORT,
        value_parser = host_port,
        required_unless_present = "project",
        conflicts_with = "project"
    )]
    master: Option<String>,
    /// Find the master through the catalog: the newest running master whose
    /// project matches this regex (asked again at every reconnect).
    #[arg(long, value_name = PROJECT, value_parser = project_regex)]
    project: Option<String>,
    /// Catalog to look the project up in [default: $DROVER_CATALOG, else localhost:9097].
    #[arg(long, value_name = HOST_PORT, value_parser = host_port, requires = "project")]
    catalog: Option<String>,
    #[command(flatten)]
    offer: Offer,
    /// GPUs to offer; tasks get device ids 0..N-1 through CUDA_VISIBLE_DEVICES.
    #[arg(long, value_name = "N", default_value_t = 0)]
    gpus: u32,
    /// File holding the master's password.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Reach the master over TLS and trust its certificate if this CA (PEM,
    /// `ca.pem` of `drover tls init`) signed it for the master's host name.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_fingerprint")]
    tls_ca: Option<PathBuf>,
    /// Reach the master over TLS and trust only the certificate with this
    /// SHA-256 fingerprint (hex, colons allowed; `drover tls init` prints it).
    #[arg(long, value_name = "SHA256")]
    tls_fingerprint: Option<String>,
    /// Exit after this many seconds without a task (or without a master).
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    idle_timeout: u64,
    /// Directory for the file cache and task sandboxes (default: $TMPDIR/drover-worker-UID).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Exit when the connection to the master ends instead of reconnecting.
    #[arg(long, hide = true)]
    exit_on_disconnect: bool,
}

fn default_workdir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("drover-worker-{uid}"))
}

/// Runs `drover worker` until its master says stop, it idles out, or it gets
/// SIGINT/SIGTERM.
pub fn run(args: WorkerArgs) -> anyhow::Result<i32> {
    let workdir = args.workdir.unwrap_or_else(default_workdir);
    std::fs::create_dir_all(&workdir)
        .with_context(|| format!("creating workdir {}", workdir.display()))?;
    let resources = args.offer.resolve(&workdir, args.gpus);
    let password = match &args.password_file {
        Some(p) => Some(drover_worker::protocol::read_password_file(p)?),
        None => None,
    };
    let master = match (args.master, args.project) {
        // clap lets this through when the master's address is given.
        (Some(_), None) if args.catalog.is_some() => {
            anyhow::bail!("--catalog is for finding the master by --project; give one or the other")
        }
        (Some(addr), None) => MasterSource::Address(addr),
        (None, Some(project)) => MasterSource::Catalog {
            catalog: drover_catalog::status::catalog_address(args.catalog.as_deref()),
            project,
        },
        // clap enforces exactly one of them.
        _ => anyhow::bail!("give exactly one of the master's HOST:PORT and --project"),
    };
    let tls = super::tls::client_tls(args.tls_ca.as_deref(), args.tls_fingerprint.as_deref())?;
    let config = WorkerConfig {
        master,
        resources,
        password,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        workdir,
        exit_on_disconnect: args.exit_on_disconnect,
        tls,
    };
    // Before the runtime's threads: it sets the variable tasks find it by.
    let _functions = drover_worker::functions::FunctionServer::start_for_worker(&config.workdir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let reason = runtime.block_on(async {
        // On a runtime thread rather than here on the main thread: the
        // session's loop and its tasks then wake each other within the
        // runtime's workers instead of through a futex to a parked main
        // thread, which cost W1 about 5% of its rate.
        let mut worker = tokio::spawn(run_worker(config));
        tokio::select! {
            r = &mut worker => r.unwrap_or_else(|e| Err(anyhow::anyhow!("worker task: {e}"))),
            _ = shutdown_signal() => {
                worker.abort();
                Ok(drover_worker::StopReason::MasterShutdown)
            }
        }
    })?;
    let why = match reason {
        drover_worker::StopReason::IdleTimeout => "idle timeout reached",
        drover_worker::StopReason::MasterShutdown => "asked to stop",
        drover_worker::StopReason::Disconnected => "the connection to the master ended",
    };
    tracing::info!("worker stopped: {why}");
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
