//! Stand-alone `drover-catalog` binary: the catalog server and the status
//! command without the rest of drover, for tests and small deployments.
//! The main `drover` binary offers the same as `drover catalog` and
//! `drover status`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "drover-catalog",
    version,
    about = "drover catalog server and status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the catalog server.
    Serve(drover_catalog::server::CatalogArgs),
    /// Show the masters a catalog knows.
    Status(drover_catalog::status::StatusArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => drover_catalog::server::run(args),
        Command::Status(args) => drover_catalog::status::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("drover-catalog: {e:#}");
            std::process::exit(1);
        }
    }
}
