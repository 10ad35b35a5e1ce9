//! `drover status`: the masters a catalog knows, like work_queue_status, or
//! one master asked directly on its worker port.

use std::path::PathBuf;

use anyhow::Context;
use drover_catalog::status::{StatusQuery, View};

use super::{host_port, project_regex, HOST_PORT, PROJECT};

/// Options of `drover status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Ask this master directly (its worker port) instead of a catalog.
    #[arg(value_name = HOST_PORT, value_parser = host_port, conflicts_with_all = ["catalog", "project"])]
    master: Option<String>,
    /// Catalog to ask [default: $DROVER_CATALOG, else localhost:9097].
    #[arg(long, value_name = HOST_PORT, value_parser = host_port)]
    catalog: Option<String>,
    /// Only masters whose project matches this regex.
    #[arg(long, value_name = PROJECT, value_parser = project_regex)]
    project: Option<String>,
    /// List each master's connected workers.
    #[arg(long, group = "view")]
    workers: bool,
    /// List tasks by category and state, then the running tasks.
    #[arg(long, group = "view")]
    tasks: bool,
    /// List each size of waiting task and the workers able to run it.
    #[arg(long, group = "view")]
    able: bool,
    /// Password file of the master asked directly (as its workers use).
    #[arg(long, value_name = "FILE", requires = "master")]
    password_file: Option<PathBuf>,
    /// Reach the master asked directly over TLS, trusting its certificate
    /// if this CA (PEM, as its workers use) signed it for the master's host.
    #[arg(
        long,
        value_name = "FILE",
        requires = "master",
        conflicts_with = "tls_fingerprint"
    )]
    tls_ca: Option<PathBuf>,
    /// Reach the master asked directly over TLS, trusting only the
    /// certificate with this SHA-256 fingerprint (as its workers use).
    #[arg(long, value_name = "SHA256", requires = "master")]
    tls_fingerprint: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the masters the catalog knows, or the one asked directly.
pub fn run(args: StatusArgs) -> anyhow::Result<i32> {
    let view = match (args.workers, args.tasks, args.able) {
        (true, _, _) => View::Workers,
        (_, true, _) => View::Tasks,
        (_, _, true) => View::Able,
        _ => View::Masters,
    };
    let Some(master) = args.master else {
        return drover_catalog::status::run(StatusQuery {
            catalog: args.catalog,
            project: args.project,
            json: args.json,
            view,
        });
    };
    let password = match &args.password_file {
        Some(p) => Some(drover_worker::protocol::read_password_file(p)?),
        None => None,
    };
    let tls = super::tls::client_tls(args.tls_ca.as_deref(), args.tls_fingerprint.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut report = runtime.block_on(drover_factory::status::query_master(
        &master,
        password.as_deref(),
        tls.as_ref(),
    ))?;
    // The master does not know when a catalog last heard from it; it
    // answered now.
    report.last_update = drover_catalog::report::now_unix();
    print!(
        "{}",
        drover_catalog::status::render(
            &[report],
            view,
            args.json,
            drover_catalog::report::now_unix()
        )?
    );
    Ok(0)
}
