//! `drover pack ...`: analyze, create and run environments.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::cache::Cache;
use crate::create::{self, CreateOptions};
use crate::spec::{FileSpec, Spec};

/// Build and use self-contained, relocatable Python environments.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Cache directory (default: $DROVER_CACHE_DIR/packager,
    /// $XDG_CACHE_HOME/drover/packager or ~/.cache/drover/packager).
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: PackCommand,
}

/// The `drover pack` subcommands.
#[derive(Debug, Subcommand)]
pub enum PackCommand {
    /// Write a spec for a script from its imports and the installed packages.
    Analyze {
        /// The script(s) to analyze.
        #[arg(required = true)]
        scripts: Vec<PathBuf>,
        /// Where to write the spec (default: stdout).
        #[arg(short, long, value_name = "SPEC.json")]
        output: Option<PathBuf>,
        /// Interpreter whose parser and installed packages to use.
        #[arg(long, default_value = "python3", value_name = "PYTHON")]
        python: PathBuf,
        /// Extra file or directory to ship, as SRC or SRC:DEST.
        #[arg(long = "file", value_name = "SRC[:DEST]")]
        files: Vec<String>,
        /// Environment variable to set in the environment, as NAME=VALUE.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
    },
    /// Build the environment described by a spec.
    Create {
        /// The spec (from `analyze`, or written by hand).
        spec: PathBuf,
        /// Output file, or directory for `<hash>.tar.gz` (default:
        /// ./<hash>.tar.gz).
        #[arg(short, long, value_name = "ENV.tar.gz")]
        output: Option<PathBuf>,
        /// Host interpreter to copy (default: search for the spec's version).
        #[arg(long, value_name = "PYTHON")]
        python_exe: Option<PathBuf>,
        /// Build even if the cache has this spec (the result is still
        /// stored).
        #[arg(long)]
        no_cache: bool,
        /// Deflate level 0-9.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        level: u32,
        /// Show pip's output.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Run a command inside an environment, unpacking it first if needed.
    Run {
        /// The environment tarball.
        env: PathBuf,
        /// Where environments are unpacked (default: <cache>/unpacked).
        #[arg(long, value_name = "DIR")]
        unpack_dir: Option<PathBuf>,
        /// Say on stderr whether the environment was unpacked or found.
        #[arg(short, long)]
        verbose: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

fn cache(args: &Option<PathBuf>) -> Result<Cache> {
    match args {
        Some(d) => Ok(Cache::new(d.clone())),
        None => Cache::open_default(),
    }
}

fn parse_file(s: &str) -> Result<FileSpec> {
    let (src, dest) = match s.split_once(':') {
        Some((a, b)) => (a, Some(b.to_string())),
        None => (s, None),
    };
    let src = std::fs::canonicalize(src).with_context(|| format!("file {src} does not exist"))?;
    Ok(FileSpec { src, dest })
}

/// Runs a `drover pack` command and returns the process exit code.
pub fn run(args: PackArgs) -> Result<i32> {
    match args.command {
        PackCommand::Analyze {
            scripts,
            output,
            python,
            files,
            env,
        } => {
            let analysis = crate::analyze::analyze(&scripts, &python)?;
            let files = files
                .iter()
                .map(|f| parse_file(f))
                .collect::<Result<Vec<_>>>()?;
            let mut vars = BTreeMap::new();
            for e in &env {
                let Some((k, v)) = e.split_once('=') else {
                    bail!("--env {e:?} must be NAME=VALUE");
                };
                vars.insert(k.to_string(), v.to_string());
            }
            let spec = analysis.to_spec(files, vars)?;
            if !analysis.local.is_empty() {
                eprintln!(
                    "local modules (not packaged; ship them with the task or add --file): {}",
                    analysis.local.join(", ")
                );
            }
            if !analysis.unresolved.is_empty() {
                eprintln!(
                    "warning: no installed package provides {}; left out of the spec",
                    analysis.unresolved.join(", ")
                );
            }
            match output {
                Some(path) => {
                    spec.save(&path)?;
                    eprintln!(
                        "wrote {} (python {}, {} requirements)",
                        path.display(),
                        spec.python,
                        spec.requirements.len()
                    );
                }
                None => println!("{}", serde_json::to_string_pretty(&spec)?),
            }
            Ok(0)
        }
        PackCommand::Create {
            spec,
            output,
            python_exe,
            no_cache,
            level,
            verbose,
        } => {
            let started = Instant::now();
            let spec = Spec::load(&spec)?;
            let mut opts = CreateOptions::new(cache(&args.cache_dir)?);
            if python_exe.is_some() {
                opts.python_exe = python_exe;
            }
            opts.use_cache = !no_cache;
            opts.level = level;
            opts.verbose = verbose;
            let created = create::create(&spec, &opts)?;
            let out = create::place_output(&created, output.as_deref())?;
            if verbose {
                for (phase, secs) in &created.timings {
                    eprintln!("  {phase}: {secs:.2} s");
                }
                if let Some(s) = &created.stats {
                    eprintln!(
                        "  {} entries, {:.1} MB of files, {:.1} MB compressed",
                        s.entries,
                        s.content_bytes as f64 / 1e6,
                        s.compressed_bytes as f64 / 1e6
                    );
                }
            }
            let how = if created.cache_hit {
                "cache hit"
            } else {
                "built"
            };
            eprintln!(
                "{how} in {:.3} s: {}",
                started.elapsed().as_secs_f64(),
                out.display()
            );
            println!("{}", out.display());
            Ok(0)
        }
        PackCommand::Run {
            env,
            unpack_dir,
            verbose,
            command,
        } => {
            let unpack_root = match unpack_dir {
                Some(d) => d,
                None => cache(&args.cache_dir)?.unpack_root(),
            };
            let unpacked = crate::unpack_once(&env, &unpack_root)?;
            if verbose {
                match &unpacked.stats {
                    Some(s) => eprintln!(
                        "unpacked environment {} ({} entries, {:.1} MB) in {:.3} s: {}",
                        unpacked.hash,
                        s.entries,
                        s.content_bytes as f64 / 1e6,
                        unpacked.seconds,
                        unpacked.dir.display()
                    ),
                    None => eprintln!(
                        "environment {} already unpacked: {}",
                        unpacked.hash,
                        unpacked.dir.display()
                    ),
                }
            }
            let root = std::fs::canonicalize(&unpacked.dir)
                .with_context(|| format!("cannot resolve {}", unpacked.dir.display()))?;
            let path = std::env::var("PATH").unwrap_or_default();
            let vars = crate::activation_env(&root, &path)?;
            let Some((program, rest)) = command.split_first() else {
                bail!("no command given");
            };
            let mut cmd = std::process::Command::new(program);
            cmd.args(rest);
            for (k, v) in &vars {
                if k == "PYTHONHOME" && v.is_empty() {
                    cmd.env_remove(k);
                } else {
                    cmd.env(k, v);
                }
            }
            // Command resolves the program with the child's PATH once it is
            // set, so `python3` finds the environment's interpreter.
            let status = cmd
                .status()
                .with_context(|| format!("cannot run {program} in {}", root.display()))?;
            use std::os::unix::process::ExitStatusExt;
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
    }
}
