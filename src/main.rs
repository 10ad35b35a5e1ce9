//! `drover`: the one binary a node needs. Subcommands run tasks, serve as a
//! worker, measure a command, build environments, and report status.

mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_worker::{detect_resources, run_worker, MasterSource, WorkerConfig};

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Resource-aware master/worker task scheduling"
)]
struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a file of tasks (one command per line, or JSON lines) on a local worker.
    Run(run::RunArgs),
    /// Connect to a master and run its tasks.
    Worker(WorkerArgs),
    /// Run a command under the resource monitor and print what it used.
    Monitor(drover_monitor::cli::MonitorArgs),
    /// Build, inspect and use self-contained software environments.
    Pack(drover_packager::cli::PackArgs),
    /// Run the catalog server that masters report to.
    Catalog(drover_catalog::server::CatalogArgs),
    /// Show the masters a catalog knows, like work_queue_status.
    Status(drover_catalog::status::StatusArgs),
    /// Keep worker jobs in Slurm, HTCondor or local processes as a master's demand rises and falls.
    Factory(drover_factory::FactoryArgs),
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// The master, as HOST:PORT (or find it with --project).
    #[arg(required_unless_present = "project", conflicts_with = "project")]
    master: Option<String>,
    /// Find the master through the catalog: the newest running master whose
    /// project matches this regex (asked again at every reconnect).
    #[arg(long, value_name = "REGEX")]
    project: Option<String>,
    /// Catalog to look the project up in, HOST:PORT [default: $DROVER_CATALOG, else localhost:9097].
    #[arg(long, value_name = "HOST:PORT", requires = "project")]
    catalog: Option<String>,
    /// Cores to offer (default: all of this machine's).
    #[arg(long)]
    cores: Option<u32>,
    /// Memory to offer, MB (default: this machine's total).
    #[arg(long)]
    memory: Option<u64>,
    /// Disk to offer, MB (default: free space under --workdir).
    #[arg(long)]
    disk: Option<u64>,
    /// GPUs to offer; tasks get device ids 0..N-1 through CUDA_VISIBLE_DEVICES.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// File holding the master's password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Exit after this many seconds without a task.
    #[arg(long, default_value_t = 900)]
    idle_timeout: u64,
    /// Directory for the file cache and task sandboxes (default: $TMPDIR/drover-worker-UID).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Exit when the connection to the master ends instead of reconnecting.
    #[arg(long, hide = true)]
    exit_on_disconnect: bool,
}

fn init_logging(verbose: u8, default: &str) {
    let level = match verbose {
        0 => default,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn default_workdir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("drover-worker-{uid}"))
}

fn worker_main(args: WorkerArgs) -> anyhow::Result<i32> {
    let workdir = args.workdir.unwrap_or_else(default_workdir);
    std::fs::create_dir_all(&workdir)
        .with_context(|| format!("creating workdir {}", workdir.display()))?;
    let detected = detect_resources(&workdir);
    let resources = drover_worker::Resources {
        cores: args.cores.unwrap_or(detected.cores),
        memory_mb: args.memory.unwrap_or(detected.memory_mb),
        disk_mb: args.disk.unwrap_or(detected.disk_mb),
        gpus: args.gpus,
    };
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
        (None, Some(project)) => {
            regex_check(&project)?;
            MasterSource::Catalog {
                catalog: drover_catalog::status::catalog_address(args.catalog.as_deref()),
                project,
            }
        }
        // clap enforces exactly one of them.
        _ => anyhow::bail!("give exactly one of the master's HOST:PORT and --project"),
    };
    let config = WorkerConfig {
        master,
        resources,
        password,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        workdir,
        exit_on_disconnect: args.exit_on_disconnect,
    };
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
    tracing::info!("worker stopped: {reason:?}");
    Ok(0)
}

/// A project regex the catalog would refuse fails here, at start, rather
/// than at every reconnect.
fn regex_check(project: &str) -> anyhow::Result<()> {
    if project.is_empty() {
        anyhow::bail!("--project must not be empty");
    }
    drover_catalog::client::check_project_regex(project)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Run(args) => {
            init_logging(cli.verbose, "warn");
            run::run(args)
        }
        Commands::Worker(args) => {
            init_logging(cli.verbose, "info");
            worker_main(args)
        }
        Commands::Monitor(args) => {
            init_logging(cli.verbose, "warn");
            drover_monitor::cli::run(args)
        }
        Commands::Pack(args) => {
            init_logging(cli.verbose, "warn");
            drover_packager::cli::run(args)
        }
        Commands::Catalog(args) => {
            init_logging(cli.verbose, "info");
            drover_catalog::server::run(args)
        }
        Commands::Status(args) => {
            init_logging(cli.verbose, "warn");
            drover_catalog::status::run(args)
        }
        Commands::Factory(args) => {
            init_logging(cli.verbose, "info");
            drover_factory::run(args)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("drover: {e:#}");
            ExitCode::from(2)
        }
    }
}
