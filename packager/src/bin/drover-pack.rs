//! Stand-alone `drover pack` for testing the packager on its own.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "drover-pack",
    about = "Build and use self-contained Python environments"
)]
struct Cli {
    #[command(flatten)]
    pack: drover_packager::cli::PackArgs,
}

fn main() {
    let cli = Cli::parse();
    match drover_packager::cli::run(cli.pack) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
