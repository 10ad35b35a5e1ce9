//! `drover pack ...`: analyze, create and run environments with
//! `drover_packager`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use drover_packager::cache::Cache;
use drover_packager::create::{self, CreateOptions};
use drover_packager::spec::{FileSpec, Spec};

/// Build and use self-contained, relocatable Python environments.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Cache directory (default: $DROVER_CACHE_DIR/packager,
    /// $XDG_CACHE_HOME/drover/packager or ~/.cache/drover/packager).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    command: PackCommand,
}

/// The `drover pack` subcommands. Each says more with the global `-v`.
#[derive(Debug, Subcommand)]
enum PackCommand {
    /// Write a spec for a script from its imports and the installed packages.
    Analyze {
        /// The script(s) to analyze.
        #[arg(required = true, value_name = "SCRIPT")]
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
    /// Build the environment described by a spec (-v shows pip's output and
    /// the time of each phase).
    Create {
        /// The spec (from `analyze`, or written by hand).
        #[arg(value_name = "SPEC.json")]
        spec: PathBuf,
        /// Output file, or directory for `<hash>.tar.gz` (default:
        /// ./<hash>.tar.gz).
        #[arg(short, long, value_name = "ENV.tar.gz")]
        output: Option<PathBuf>,
        /// Host interpreter to copy (default: search for the spec's version).
        #[arg(long, alias = "python-exe", value_name = "PYTHON")]
        python: Option<PathBuf>,
        /// Build even if the cache has this spec (the result is still
        /// stored).
        #[arg(long)]
        no_cache: bool,
        /// Deflate level 0-9.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        level: u32,
    },
    /// Run a command inside an environment, unpacking it first if needed (-v
    /// says whether it was unpacked or found).
    Run {
        /// The environment tarball.
        #[arg(value_name = "ENV.tar.gz")]
        env: PathBuf,
        /// Where environments are unpacked (default: <cache>/unpacked).
        #[arg(long, value_name = "DIR")]
        unpack_dir: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

fn cache(dir: &Option<PathBuf>) -> Result<Cache> {
    match dir {
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

/// Runs a `drover pack` command and returns the process exit code; `verbose`
/// is the global `-v` count.
pub fn run(args: PackArgs, verbose: u8) -> Result<i32> {
    let verbose = verbose > 0;
    match args.command {
        PackCommand::Analyze {
            scripts,
            output,
            python,
            files,
            env,
        } => analyze(&scripts, output, &python, &files, &env),
        PackCommand::Create {
            spec,
            output,
            python,
            no_cache,
            level,
        } => {
            let started = Instant::now();
            let spec = Spec::load(&spec)?;
            let mut opts = CreateOptions::new(cache(&args.cache_dir)?);
            if python.is_some() {
                opts.python_exe = python;
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
            command,
        } => {
            let unpack_root = match unpack_dir {
                Some(d) => d,
                None => cache(&args.cache_dir)?.unpack_root(),
            };
            drover_packager::run_in_environment(&env, &unpack_root, &command, |unpacked| {
                if !verbose {
                    return;
                }
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
            })
        }
    }
}

fn analyze(
    scripts: &[PathBuf],
    output: Option<PathBuf>,
    python: &std::path::Path,
    files: &[String],
    env: &[String],
) -> Result<i32> {
    let analysis = drover_packager::analyze::analyze(scripts, python)?;
    let files = files
        .iter()
        .map(|f| parse_file(f))
        .collect::<Result<Vec<_>>>()?;
    let mut vars = BTreeMap::new();
    for e in env {
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
