//! `drover tls`: certificates for TLS between a master and its workers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_worker::protocol::tls::tokio_rustls::rustls::ClientConfig;
use drover_worker::protocol::tls::{self, client_config, Trust};

/// Options of `drover tls`.
#[derive(clap::Args, Debug)]
pub struct TlsArgs {
    #[command(subcommand)]
    command: TlsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TlsCommand {
    /// Make a cluster CA and a master certificate it signs, in DIR, and
    /// print the commands that use them.
    Init(InitArgs),
}

/// Options of `drover tls init`.
#[derive(clap::Args, Debug)]
struct InitArgs {
    /// Directory to write ca.pem, master.pem and master-key.pem into.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// A name or address workers reach the master by (repeat for more)
    /// [default: this machine's host name; localhost and 127.0.0.1 always].
    #[arg(long = "host", value_name = "NAME")]
    hosts: Vec<String>,
}

/// Runs `drover tls`.
pub fn run(args: TlsArgs) -> anyhow::Result<i32> {
    let TlsCommand::Init(init) = args.command;
    let hosts = if init.hosts.is_empty() {
        vec![drover_worker::hostname()]
    } else {
        init.hosts
    };
    let made = tls::init(&init.dir, &hosts).map_err(|e| {
        anyhow::anyhow!(
            "cannot write a certificate authority and a master certificate into {}: {e}",
            init.dir.display()
        )
    })?;
    let host = hosts.first().map_or("localhost", String::as_str);
    println!(
        "wrote {} (give it to workers), {} and {} (the master's; keep the key private)",
        made.ca_cert.display(),
        made.cert.display(),
        made.key.display()
    );
    println!(
        "certificate valid for: localhost, 127.0.0.1, {}",
        hosts.join(", ")
    );
    println!("fingerprint (SHA-256): {}", made.fingerprint);
    println!();
    println!("# on the master (with a password file, so only your workers get tasks):");
    println!(
        "drover run tasks.txt --workers 0 --port 9123 --tls-cert {} --tls-key {} --password-file pw.txt",
        made.cert.display(),
        made.key.display()
    );
    println!("# on each worker, trusting the CA:");
    println!(
        "drover worker {host}:9123 --tls-ca {} --password-file pw.txt",
        made.ca_cert.display()
    );
    println!("# or, pinning the certificate instead of trusting the CA:");
    println!(
        "drover worker {host}:9123 --tls-fingerprint {} --password-file pw.txt",
        made.fingerprint
    );
    Ok(0)
}

/// The TLS set-up of a client of the master (a worker, `drover status`,
/// the factory) from its `--tls-ca` or `--tls-fingerprint`; `None` for
/// plain TCP.
pub fn client_tls(
    ca: Option<&Path>,
    fingerprint: Option<&str>,
) -> anyhow::Result<Option<Arc<ClientConfig>>> {
    let trust = match (ca, fingerprint) {
        (Some(ca), _) => Trust::Ca(ca.to_path_buf()),
        (None, Some(pin)) => Trust::fingerprint(pin)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(client_config(&trust)?))
}
