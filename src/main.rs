//! `drover`: the one binary a node needs. Subcommands run tasks, serve as a
//! worker, measure a command, build environments, and report status. Every
//! command-line type lives under [`cli`]; the library crates take plain
//! config structs.

mod cli;

/// The master allocates and frees per task (frames, reports, results) on
/// several threads; mimalloc's per-thread free lists cost 6-14% less master
/// CPU per task than glibc's malloc at 1M tasks x 1,000 workers
/// (benches/README, issue 22 round 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Resource-aware master/worker task scheduling"
)]
struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides. The same in
    /// every subcommand.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a file of tasks (one command per line, or JSON lines) on a local worker.
    Run(cli::run::RunArgs),
    /// Connect to a master and run its tasks.
    Worker(cli::worker::WorkerArgs),
    /// Run a command under the resource monitor and print what it used.
    Monitor(cli::monitor::MonitorArgs),
    /// Build, inspect and use self-contained software environments.
    Pack(cli::pack::PackArgs),
    /// Run the catalog server that masters report to.
    Catalog(cli::catalog::CatalogArgs),
    /// Show the masters a catalog knows, like work_queue_status.
    Status(cli::status::StatusArgs),
    /// Keep worker jobs in Slurm, HTCondor or local processes as a master's demand rises and falls.
    Factory(cli::factory::FactoryArgs),
    /// Make the certificates for TLS between a master and its workers.
    Tls(cli::tls::TlsArgs),
}

/// Logs go to stderr, coloured only when stderr is a terminal, so a log
/// file or a pipe gets plain text.
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
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// An error and its causes on one line, each cause once: a library error
/// often repeats its source in its own message ("cannot listen on port 80:
/// Address in use"), which `{:#}` would print twice.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Starts logging at `default` (raised by `-v`) and runs one subcommand.
fn logged<A>(
    verbose: u8,
    default: &str,
    run: impl FnOnce(A) -> anyhow::Result<i32>,
    args: A,
) -> anyhow::Result<i32> {
    init_logging(verbose, default);
    run(args)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let v = cli.verbose;
    // Long-running services log what they do by default; one-shot commands
    // only what went wrong.
    let result = match cli.command {
        Commands::Run(args) => logged(v, "warn", cli::run::run, args),
        Commands::Worker(args) => logged(v, "info", cli::worker::run, args),
        Commands::Monitor(args) => logged(v, "warn", cli::monitor::run, args),
        Commands::Pack(args) => logged(v, "warn", |a| cli::pack::run(a, v), args),
        Commands::Catalog(args) => logged(v, "info", cli::catalog::run, args),
        Commands::Status(args) => logged(v, "warn", cli::status::run, args),
        Commands::Factory(args) => logged(v, "info", cli::factory::run, args),
        Commands::Tls(args) => logged(v, "warn", cli::tls::run, args),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("drover: {}", error_line(&e));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every leaf parses a typical call into its types; a subcommand whose
    /// fields disagree with the global options (the `-v` of `pack create`
    /// once did) panics here.
    #[test]
    fn every_leaf_parses_a_typical_call() {
        let calls = [
            "run tasks.txt --memory 500 --disk 100",
            "worker localhost:9123 -v",
            "worker --project ^demo$ --catalog localhost:9097",
            "monitor --limit memory=100 -- sleep 1",
            "pack analyze script.py -o spec.json",
            "pack create spec.json -o env.tar.gz -v",
            "pack -v run env.tar.gz -- python3 script.py",
            "catalog --port 0",
            "tls init certs --host node1",
            "status --project demo --json",
            "factory --batch local --master h:1 --max-workers 1 --cores 1 --memory 100 --disk 100",
        ];
        let mut leaves = Vec::new();
        collect_leaves(&Cli::command(), String::new(), &mut leaves);
        for leaf in &leaves {
            let words: Vec<&str> = leaf.split(' ').collect();
            assert!(
                calls.iter().any(|c| {
                    let positional: Vec<&str> =
                        c.split(' ').filter(|w| !w.starts_with('-')).collect();
                    positional.starts_with(&words)
                }),
                "no typical call for `drover {leaf}`"
            );
        }
        for call in calls {
            let argv = std::iter::once("drover").chain(call.split(' '));
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("drover {call}: {e}");
            }
        }
    }

    fn collect_leaves(cmd: &clap::Command, path: String, out: &mut Vec<String>) {
        let subs: Vec<_> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            out.push(path);
            return;
        }
        for s in subs {
            let p = if path.is_empty() {
                s.get_name().to_string()
            } else {
                format!("{path} {}", s.get_name())
            };
            collect_leaves(s, p, out);
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address in use");
        let e = anyhow::Error::new(io).context("cannot listen on port 80: Address in use");
        assert_eq!(error_line(&e), "cannot listen on port 80: Address in use");
        let e = anyhow::anyhow!("root").context("outer");
        assert_eq!(error_line(&e), "outer: root");
    }
}
