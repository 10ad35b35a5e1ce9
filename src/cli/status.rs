//! `drover status`: the masters a catalog knows, like work_queue_status.

use drover_catalog::status::StatusQuery;

use super::{host_port, project_regex, HOST_PORT, PROJECT};

/// Options of `drover status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Catalog to ask [default: $DROVER_CATALOG, else localhost:9097].
    #[arg(long, value_name = HOST_PORT, value_parser = host_port)]
    catalog: Option<String>,
    /// Only masters whose project matches this regex.
    #[arg(long, value_name = PROJECT, value_parser = project_regex)]
    project: Option<String>,
    /// Print the reports as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the masters the catalog knows.
pub fn run(args: StatusArgs) -> anyhow::Result<i32> {
    drover_catalog::status::run(StatusQuery {
        catalog: args.catalog,
        project: args.project,
        json: args.json,
    })
}
