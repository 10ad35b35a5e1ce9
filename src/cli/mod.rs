//! Every clap type of `drover`, one module per subcommand. Each module turns
//! its options into the plain config struct of the library that does the
//! work, so the libraries carry no command-line parsing.
//!
//! One vocabulary across subcommands: addresses are `HOST:PORT`, project
//! patterns are `PROJECT` (a regex), interpreters are `--python`, and `-v`
//! is only ever the global verbosity.

pub mod catalog;
pub mod factory;
pub mod monitor;
pub mod pack;
pub mod run;
pub mod status;
pub mod tls;
pub mod worker;

/// What a worker offers; shared by `drover worker` and the local workers
/// of `drover run`, so both say it the same way.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Offer {
    /// Cores the worker offers (default: all of this machine's).
    // A worker of 0 cores, or of more than the master accepts in a task,
    // is a mistake: refused here, with the range.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub cores: Option<u32>,
    /// Memory the worker offers, MB (default: this machine's total).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub memory: Option<u64>,
    /// Disk the worker offers, MB (default: free space under its directory).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub disk: Option<u64>,
}

impl Offer {
    /// The options given, else what the machine has (disk measured under `dir`).
    pub fn resolve(&self, dir: &std::path::Path, gpus: u32) -> drover_master::Resources {
        let detected = drover_worker::detect_resources(dir);
        drover_master::Resources {
            cores: self.cores.unwrap_or(detected.cores),
            memory_mb: self.memory.unwrap_or(detected.memory_mb),
            disk_mb: self.disk.unwrap_or(detected.disk_mb),
            gpus,
        }
    }
}

/// Value name of every address option.
pub const HOST_PORT: &str = "HOST:PORT";
/// Value name of every project-pattern option.
pub const PROJECT: &str = "PROJECT";

/// Checks a `HOST:PORT` at parse time, so `drover worker localhost` is
/// refused at start instead of retrying an address that cannot work.
pub fn host_port(s: &str) -> Result<String, String> {
    let bare = s.trim();
    let (host, port) = match bare.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h, p),
        _ => {
            return Err(format!(
                "{s:?} has no port; give it as HOST:PORT (for example localhost:9123)"
            ))
        }
    };
    // A bare IPv6 address has colons of its own; it needs brackets.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("{s:?}: write an IPv6 address as [ADDR]:PORT"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(bare.to_string()),
        _ => Err(format!(
            "{s:?}: the port {port:?} is not a number from 1 to 65535"
        )),
    }
}

/// Checks a project regex at parse time, so a pattern the catalog would
/// refuse is a one-line error here rather than the catalog's answer.
pub fn project_regex(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the project pattern must not be empty".into());
    }
    drover_catalog::client::check_project_regex(s)
        .map(|()| s.to_string())
        // Already one line: the catalog's checker keeps only what is wrong.
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_port() {
        assert_eq!(host_port("localhost:9123").unwrap(), "localhost:9123");
        assert_eq!(host_port("[::1]:9123").unwrap(), "[::1]:9123");
        for bad in ["localhost", "localhost:", ":9", "h:0", "h:70000", "::1:9"] {
            assert!(host_port(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn project_patterns_are_checked() {
        assert!(project_regex("^demo$").is_ok());
        let e = project_regex("(").unwrap_err();
        assert!(!e.contains('\n') && e.contains("unclosed group"), "{e}");
        assert!(project_regex("").is_err());
    }
}
