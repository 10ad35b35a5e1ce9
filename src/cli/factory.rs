//! `drover factory`: keep worker jobs in a batch system as a master's demand
//! rises and falls; run by `drover_factory::run`.

use std::path::PathBuf;

use drover_factory::{BatchKind, FactoryConfig};

use super::{host_port, project_regex, HOST_PORT, PROJECT};

/// The batch systems the factory can drive.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BatchArg {
    /// Slurm (sbatch, squeue, scancel).
    Slurm,
    /// HTCondor (condor_submit, condor_q, condor_rm).
    Condor,
    /// `drover worker` processes on this machine.
    Local,
}

/// Options of `drover factory`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["master", "catalog"])))]
pub struct FactoryArgs {
    /// The batch system to run workers in.
    #[arg(long, value_enum)]
    batch: BatchArg,
    /// The master (its worker port); the factory asks it for its status.
    #[arg(long, value_name = HOST_PORT, value_parser = host_port)]
    master: Option<String>,
    /// A catalog to find the master in by --project.
    #[arg(long, value_name = HOST_PORT, value_parser = host_port, requires = "project")]
    catalog: Option<String>,
    /// Regular expression matched against project names in the catalog.
    #[arg(long, value_name = PROJECT, value_parser = project_regex, requires = "catalog")]
    project: Option<String>,
    /// Worker jobs kept even without demand.
    #[arg(long, value_name = "N", default_value_t = 0)]
    min_workers: usize,
    /// Most worker jobs at once, pending and running together.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_workers: usize,
    /// Most jobs waiting in the batch queue at once (default: --max-workers).
    /// Keeps a busy cluster from collecting requests it cannot start.
    #[arg(long, value_name = "N")]
    max_pending: Option<usize>,
    /// Cores each worker offers (and its job asks for).
    // The same ranges as `drover worker`'s, which these are handed to.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    cores: u32,
    /// Memory each worker offers, MB.
    #[arg(long, value_name = "MB", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    memory: u64,
    /// Disk each worker offers, MB.
    #[arg(long, value_name = "MB", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    disk: u64,
    /// GPUs each worker offers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    gpus: u32,
    /// Seconds without a task after which a worker exits (its --idle-timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    worker_timeout: u64,
    /// Extra batch options: sbatch arguments for Slurm (shell-quoted), or
    /// `key = value` submit lines separated by ';' for HTCondor.
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    batch_options: Option<String>,
    /// The master's password file, handed to the workers.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// The master's TLS certificate fingerprint (SHA-256, as `drover tls
    /// init` prints it): the factory's status queries and its workers reach
    /// the master over TLS and trust only that certificate.
    #[arg(long, value_name = "SHA256")]
    tls_fingerprint: Option<String>,
    /// Seconds between two looks at the master and the queue.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    interval: f64,
    /// Wall-time limit of each worker job, in seconds (default: the cluster's).
    #[arg(long, value_name = "SECONDS")]
    time_limit: Option<u64>,
    /// Directory for job output and submit files (default: ./drover-factory-logs).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The drover binary and password file are on a filesystem the execute
    /// nodes share: HTCondor does not ship them.
    #[arg(long)]
    shared_path: bool,
    /// The drover binary the jobs run (default: this one).
    #[arg(long, value_name = "FILE")]
    drover: Option<PathBuf>,
    /// Job name (batch name) that marks this factory's jobs (default:
    /// drover-factory-PID-RANDOM). Letters, digits, '.', '_' and '-'.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print what one submission would be and exit.
    #[arg(long)]
    dry_run: bool,
}

/// True for an address that names this machine only: a compute node
/// given it would look for the master on itself.
fn is_loopback(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Runs `drover factory` until SIGINT or SIGTERM.
pub fn run(args: FactoryArgs) -> anyhow::Result<i32> {
    if let (Some(m), false) = (&args.master, matches!(args.batch, BatchArg::Local)) {
        if is_loopback(m) {
            tracing::warn!(
                "--master {m} is this machine's loopback address: workers on compute nodes \
                 will look for the master on themselves; give the master's host name"
            );
        }
    }
    drover_factory::run(FactoryConfig {
        batch: match args.batch {
            BatchArg::Slurm => BatchKind::Slurm,
            BatchArg::Condor => BatchKind::Condor,
            BatchArg::Local => BatchKind::Local,
        },
        master: args.master,
        catalog: args.catalog,
        project: args.project,
        min_workers: args.min_workers,
        max_workers: args.max_workers,
        max_pending: args.max_pending,
        cores: args.cores,
        memory: args.memory,
        disk: args.disk,
        gpus: args.gpus,
        worker_timeout: args.worker_timeout,
        batch_options: args.batch_options,
        password_file: args.password_file,
        tls_fingerprint: args.tls_fingerprint,
        interval: args.interval,
        time_limit: args.time_limit,
        log_dir: args.log_dir,
        shared_path: args.shared_path,
        drover: args.drover,
        name: args.name,
        dry_run: args.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_masters_are_recognised() {
        for a in ["localhost:9123", "127.0.0.1:1", "[::1]:5", "LOCALHOST:2"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["node7:9123", "10.0.0.5:1", "[2001:db8::1]:5"] {
            assert!(!is_loopback(a), "{a}");
        }
    }
}
