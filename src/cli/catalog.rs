//! `drover catalog`: the catalog server, run by `drover_catalog::server`.

use std::net::IpAddr;
use std::path::PathBuf;

use drover_catalog::server::CatalogConfig;

/// Options of `drover catalog`.
#[derive(clap::Args, Debug)]
pub struct CatalogArgs {
    /// Port for both HTTP (TCP) and reports (UDP); 0 picks a free one, which
    /// is printed on stdout.
    #[arg(long, value_name = "PORT", default_value_t = drover_catalog::client::DEFAULT_PORT)]
    port: u16,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Seconds an entry lives after its last report.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    expiry_secs: u64,
    /// Where entries are saved and reloaded from on start
    /// [default: drover-catalog-PORT.json in $XDG_STATE_HOME/drover or
    /// ~/.local/state/drover].
    #[arg(long, value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Keep entries in memory only.
    #[arg(long, conflicts_with = "state_file")]
    no_state_file: bool,
    /// Most entries kept; when full, the one with the fewest reports that
    /// has not reported for a minute is dropped.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_entries: usize,
    /// Largest report accepted, in bytes of JSON (UDP or POST).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    max_report_bytes: usize,
    /// Seconds between saves of the state file (only when something changed).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    save_interval_secs: u64,
    /// File holding the catalog key: reports must carry an HMAC under it
    /// (masters sign with the same file, `drover run --catalog-key-file`);
    /// unsigned or wrongly signed reports are dropped.
    #[arg(long, value_name = "FILE")]
    catalog_key_file: Option<PathBuf>,
}

/// Runs the catalog until SIGINT or SIGTERM.
pub fn run(args: CatalogArgs) -> anyhow::Result<i32> {
    drover_catalog::server::run(CatalogConfig {
        port: args.port,
        bind: args.bind,
        expiry_secs: args.expiry_secs,
        state_file: args.state_file,
        no_state_file: args.no_state_file,
        max_entries: args.max_entries,
        max_report_bytes: args.max_report_bytes,
        save_interval_secs: args.save_interval_secs,
        catalog_key_file: args.catalog_key_file,
    })
}
