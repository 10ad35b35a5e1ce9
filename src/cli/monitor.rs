//! `drover monitor`: measure (and limit) one command, like CCTools'
//! `resource_monitor`. The work is `drover_monitor::cli::run`.

use std::ffi::OsString;
use std::path::PathBuf;

use drover_monitor::cli::MonitorConfig;
use drover_monitor::{Limits, Method};

/// How to find the command's processes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum MethodArg {
    /// A cgroup v2 group when one can be created, else /proc sampling.
    #[default]
    Auto,
    /// /proc sampling only.
    Proc,
}

/// Options of `drover monitor`.
#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// Limits; the whole tree is killed when memory (MB), disk (MB, of the
    /// sandbox) or wall_time (s) goes over, and the exit status is 147.
    /// cores throttles when possible and is advisory otherwise.
    #[arg(long, value_name = "memory=MB,disk=MB,wall_time=S,cores=N")]
    limit: Option<Limits>,
    /// Milliseconds between samples.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    interval: u64,
    /// Write the JSON summary here instead of to stdout.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Write one JSON object per sample, one per line, here.
    #[arg(long, value_name = "FILE")]
    series: Option<PathBuf>,
    /// Directory whose size is the task's disk usage (default: none, unless
    /// a disk limit is given, then the current directory).
    #[arg(long, value_name = "DIR")]
    sandbox: Option<PathBuf>,
    /// How to find the command's processes.
    #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
    method: MethodArg,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// Runs `drover monitor`; returns the exit status to exit with.
pub fn run(args: MonitorArgs) -> anyhow::Result<i32> {
    drover_monitor::cli::run(MonitorConfig {
        limit: args.limit,
        interval: args.interval,
        summary: args.summary,
        series: args.series,
        sandbox: args.sandbox,
        method: match args.method {
            MethodArg::Auto => Method::Auto,
            MethodArg::Proc => Method::Proc,
        },
        command: args.command,
    })
}
