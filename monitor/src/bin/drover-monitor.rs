//! Stand-alone `drover monitor`, for testing the crate without the root binary.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "drover-monitor",
    about = "Measure and limit the resources of a command"
)]
struct Cli {
    #[command(flatten)]
    args: drover_monitor::cli::MonitorArgs,
}

fn main() {
    let cli = Cli::parse();
    match drover_monitor::cli::run(cli.args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("drover monitor: {e:#}");
            std::process::exit(1);
        }
    }
}
