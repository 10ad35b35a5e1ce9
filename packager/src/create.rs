//! Building an environment from a spec.
//!
//! Layout of an environment (for Python 3.11):
//!
//! ```text
//! bin/python3.11           the host's interpreter binary, run path -> $ORIGIN/../lib
//! bin/python3, bin/python  symlinks to it
//! bin/activate             `. bin/activate` from bash or zsh
//! bin/drover-run           `bin/drover-run CMD ARGS...`
//! bin/<console scripts>    shebangs rewritten to find the interpreter next to them
//! lib/libpython3.11.so.1.0 when the interpreter links it dynamically (run path -> $ORIGIN)
//! lib/python3.11/          the standard library (no test suites, no tkinter/idle)
//! lib/python3.11/site-packages/   the requirements, installed by pip
//! <files>                  the spec's extra files
//! drover-env.json          the spec, its key and the interpreter version
//! ```
//!
//! CPython finds its prefix by walking up from the binary to the
//! `lib/pythonX.Y/os.py` landmark, so this layout works at any path with no
//! `PYTHONHOME`. All bytecode is compiled in `unchecked-hash` mode: it is
//! valid regardless of file times, which the archive fixes to a constant, and
//! Python never rewrites it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::archive::{self, Stats};
use crate::cache::{link_or_copy, Cache};
use crate::elf;
use crate::meta::{EnvMeta, META_FILE};
use crate::python::{self, HostPython};
use crate::spec::{Spec, FORMAT_VERSION};

/// How to build.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Interpreter to copy instead of searching for one.
    pub python_exe: Option<PathBuf>,
    /// Where builds are cached.
    pub cache: Cache,
    /// Reuse a cached build of the same spec (and record this one).
    pub use_cache: bool,
    /// Deflate level, 0-9.
    pub level: u32,
    /// Compression threads.
    pub threads: usize,
    /// Show pip's output as it runs.
    pub verbose: bool,
}

impl CreateOptions {
    /// Defaults: cache on, level 6, all cores.
    pub fn new(cache: Cache) -> Self {
        CreateOptions {
            python_exe: std::env::var_os("DROVER_PYTHON")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            cache,
            use_cache: true,
            level: 6,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            verbose: false,
        }
    }
}

/// A built environment.
#[derive(Debug, Clone)]
pub struct Created {
    /// BLAKE3 of the tarball's bytes.
    pub hash: String,
    /// The tarball in the cache (`envs/<hash>.tar.gz`).
    pub path: PathBuf,
    /// Whether it came from the cache.
    pub cache_hit: bool,
    /// Archive statistics (only for a fresh build).
    pub stats: Option<Stats>,
    /// Seconds spent in each phase of a fresh build.
    pub timings: Vec<(&'static str, f64)>,
}

impl Created {
    fn cached(hash: String, path: PathBuf) -> Created {
        Created {
            hash,
            path,
            cache_hit: true,
            stats: None,
            timings: Vec::new(),
        }
    }
}

/// Removes a directory when dropped, so failed builds leave nothing behind.
struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = archive::make_writable(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Builds (or finds in the cache) the environment for `spec` (normalized).
pub fn create(spec: &Spec, opts: &CreateOptions) -> Result<Created> {
    let key = spec.key()?;
    if opts.use_cache {
        if let Some((hash, path)) = opts.cache.lookup(&key) {
            return Ok(Created::cached(hash, path));
        }
    }
    let _lock = opts.cache.lock_spec(&key)?;
    if opts.use_cache {
        // Another process may have built it while we waited for the lock.
        if let Some((hash, path)) = opts.cache.lookup(&key) {
            return Ok(Created::cached(hash, path));
        }
    }

    let host = python::find(&spec.python, opts.python_exe.as_deref())?;
    check_supported(&host)?;

    let tmp = opts.cache.tmp_dir()?;
    let staging = TempTree(tmp.join(format!("build-{}-{}", &key[..16], std::process::id())));
    if staging.0.exists() {
        std::fs::remove_dir_all(&staging.0)
            .with_context(|| format!("cannot clear {}", staging.0.display()))?;
    }
    std::fs::create_dir_all(&staging.0)
        .with_context(|| format!("cannot create {}", staging.0.display()))?;

    let mut timings = Vec::new();
    build_tree(spec, &key, &host, &staging.0, &tmp, opts, &mut timings)?;

    let started = Instant::now();
    let out_tmp = tmp.join(format!("{key}.{}.tar.gz", std::process::id()));
    let written = archive::write_archive(&staging.0, &out_tmp, opts.level, opts.threads);
    let (hash, stats) = match written {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&out_tmp);
            return Err(e);
        }
    };
    timings.push(("archive", started.elapsed().as_secs_f64()));
    let path = opts.cache.env_path(&hash);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::rename(&out_tmp, &path)
        .with_context(|| format!("cannot store {} in the cache", path.display()))?;
    if opts.use_cache {
        opts.cache.record(&key, &hash)?;
    }
    Ok(Created {
        hash,
        path,
        cache_hit: false,
        stats: Some(stats),
        timings,
    })
}

/// Places a created tarball at the user's output: `out` itself, or
/// `<out>/<hash>.tar.gz` if `out` is a directory, or `./<hash>.tar.gz` if no
/// output was given. Returns the path written.
pub fn place_output(created: &Created, out: Option<&Path>) -> Result<PathBuf> {
    let name = format!("{}.tar.gz", created.hash);
    let dest = match out {
        None => PathBuf::from(name),
        Some(p) if p.is_dir() => p.join(name),
        Some(p) => p.to_path_buf(),
    };
    link_or_copy(&created.path, &dest)?;
    Ok(dest)
}

fn check_supported(host: &HostPython) -> Result<()> {
    if host.implementation != "cpython" {
        bail!(
            "{} is {}, only CPython can be packaged",
            host.executable.display(),
            host.implementation
        );
    }
    let mut parts = host.minor.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    // unchecked-hash bytecode, which makes archives reproducible, is 3.7+.
    if (major, minor) < (3, 7) {
        bail!(
            "Python {} is too old to package (3.7 or newer is needed)",
            host.version
        );
    }
    if !host.platform.starts_with("linux") {
        bail!(
            "packaging is only supported on Linux (host is {})",
            host.platform
        );
    }
    Ok(())
}

/// Parts of the standard library left out: test suites, GUI toolkits that need
/// system Tk anyway, and the static library used only to embed Python. None is
/// imported by ordinary programs.
fn excluded(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    let first = s.split('/').next().unwrap_or("");
    if matches!(
        first,
        "site-packages" | "dist-packages" | "test" | "idlelib" | "tkinter" | "turtledemo"
    ) {
        return true;
    }
    if s.ends_with("__pycache__")
        || matches!(
            s.as_ref(),
            "lib2to3/tests"
                | "distutils/tests"
                | "unittest/test"
                | "ctypes/test"
                | "sqlite3/test"
                | "idlelib/idle_test"
        )
    {
        return true;
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    (first.starts_with("config-") && name.ends_with(".a"))
        || (first == "lib-dynload" && name.starts_with("_tkinter"))
}

/// Copies `src` into `dst` (created), skipping what `skip` rejects. Symlinks
/// are copied as links when relative and as the file they point to otherwise,
/// so nothing in the environment refers to the host.
fn copy_tree(src: &Path, dst: &Path, rel: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let rel = rel.join(&name);
        if skip(&rel) {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            let target = std::fs::read_link(&from)?;
            if target.is_relative() {
                std::os::unix::fs::symlink(&target, &to)?;
                continue;
            }
            let meta = std::fs::metadata(&from)?;
            if meta.is_dir() {
                copy_tree(&from, &to, &rel, skip)?;
            } else {
                copy_file(&from, &to, meta.permissions().mode())?;
            }
        } else if ft.is_dir() {
            copy_tree(&from, &to, &rel, skip)?;
        } else if ft.is_file() {
            copy_file(&from, &to, entry.metadata()?.permissions().mode())?;
        }
    }
    Ok(())
}

/// Copies a file with a normalized mode (owner-writable, so it can be patched
/// and removed).
fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn build_tree(
    spec: &Spec,
    key: &str,
    host: &HostPython,
    root: &Path,
    tmp: &Path,
    opts: &CreateOptions,
    timings: &mut Vec<(&'static str, f64)>,
) -> Result<()> {
    let minor = &host.minor;
    let exe_name = format!("python{minor}");
    let lib = root.join("lib");
    let stdlib = lib.join(format!("python{minor}"));
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;

    let t = Instant::now();
    copy_file(&host.executable, &bin.join(&exe_name), 0o755)?;
    for alias in ["python3", "python"] {
        if alias != exe_name {
            std::os::unix::fs::symlink(&exe_name, bin.join(alias))?;
        }
    }
    copy_tree(&host.stdlib, &stdlib, Path::new(""), &excluded)?;
    if host.platstdlib != host.stdlib && host.platstdlib.is_dir() {
        copy_tree(&host.platstdlib, &stdlib, Path::new(""), &excluded)?;
    }
    std::fs::create_dir_all(stdlib.join("site-packages"))?;
    if !stdlib.join("os.py").is_file() {
        bail!(
            "{} has no os.py; is {} a complete installation?",
            host.stdlib.display(),
            host.executable.display()
        );
    }

    let mut native = vec![bin.join(&exe_name)];
    if let Ok(rd) = std::fs::read_dir(stdlib.join("lib-dynload")) {
        let mut so: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "so"))
            .collect();
        so.sort();
        native.extend(so);
    }
    let mut shared_lib = None;
    if host.shared {
        let (Some(libdir), Some(soname)) = (&host.libdir, &host.instsoname) else {
            bail!(
                "{} links libpython dynamically but does not say where it is",
                host.executable.display()
            );
        };
        let so = libdir.join(soname);
        copy_file(&so, &lib.join(soname), 0o755)
            .with_context(|| format!("cannot copy the interpreter's library {}", so.display()))?;
        native.push(lib.join(soname));
        shared_lib = Some((libdir, soname));
    }
    strip_debug(&native);
    let mut needs_ld_library_path = false;
    if let Some((libdir, soname)) = shared_lib {
        needs_ld_library_path = !relocate_elf(&bin.join(&exe_name), libdir, "$ORIGIN/../lib");
        relocate_elf(&lib.join(soname), libdir, "$ORIGIN");
    }
    if let Some(libdir) = &host.libdir {
        if let Ok(rd) = std::fs::read_dir(stdlib.join("lib-dynload")) {
            for e in rd.flatten() {
                relocate_elf(&e.path(), libdir, "$ORIGIN/../..");
            }
        }
    }
    timings.push(("copy interpreter", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    if !spec.requirements.is_empty() {
        pip_install(spec, key, host, &bin.join(&exe_name), tmp, opts)?;
    }
    timings.push(("pip install", t.elapsed().as_secs_f64()));

    relocate_scripts(&bin, &exe_name)?;
    for f in &spec.files {
        let dest = root.join(f.dest_path()?);
        if dest.exists() {
            bail!(
                "spec file destination {} is already used by the environment",
                f.dest_path()?
            );
        }
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d)?;
        }
        let meta = std::fs::metadata(&f.src)
            .with_context(|| format!("spec file {} is missing", f.src.display()))?;
        if meta.is_dir() {
            copy_tree(&f.src, &dest, Path::new(""), &|_| false)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            copy_file(&f.src, &dest, meta.permissions().mode())?;
        }
    }
    write_activation(root, spec, needs_ld_library_path)?;

    let t = Instant::now();
    compile_bytecode(&bin.join(&exe_name), &stdlib, minor)?;
    timings.push(("compile bytecode", t.elapsed().as_secs_f64()));

    let meta = EnvMeta {
        format: FORMAT_VERSION,
        spec: spec.portable()?,
        spec_key: key.to_string(),
        python_version: host.version.clone(),
        platform: host.platform.clone(),
        python: format!("bin/{exe_name}"),
        site_packages: format!("lib/python{minor}/site-packages"),
        needs_ld_library_path,
    };
    let mut text = serde_json::to_string_pretty(&meta)?;
    text.push('\n');
    std::fs::write(root.join(META_FILE), text)?;
    Ok(())
}

/// Drops the debug sections of the interpreter's own binaries (the copies),
/// with binutils' `strip --strip-debug`. Source-built interpreters (pyenv's)
/// carry DWARF that is 60% of `libpython` and of `lib-dynload`, about 25 MB
/// that every worker would download and unpack for nothing; symbols stay, so
/// backtraces still name functions. Packages installed by pip are left alone:
/// wheels are already stripped, and some were patched by patchelf in ways
/// `strip` is known to break. Without `strip` on the host the files are kept
/// as they are.
fn strip_debug(files: &[PathBuf]) {
    if files.is_empty() {
        return;
    }
    match Command::new("strip")
        .arg("--strip-debug")
        .args(files)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            "strip failed, keeping debug information: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => tracing::debug!("no strip ({e}); keeping debug information"),
    }
}

/// Points an ELF file's run path at `to` instead of the host's `libdir`.
/// Returns false if that was needed but impossible.
fn relocate_elf(file: &Path, libdir: &Path, to: &str) -> bool {
    match elf::rewrite_runpath(file, libdir, to) {
        Ok(elf::Patched::Rewritten { old, new }) => {
            tracing::debug!(file = %file.display(), %old, %new, "rewrote run path");
            true
        }
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("{e:#}; falling back to LD_LIBRARY_PATH");
            false
        }
    }
}

fn pip_install(
    spec: &Spec,
    key: &str,
    host: &HostPython,
    python: &Path,
    tmp: &Path,
    opts: &CreateOptions,
) -> Result<()> {
    let reqs = tmp.join(format!(
        "requirements-{}-{}.txt",
        &key[..16],
        std::process::id()
    ));
    std::fs::write(&reqs, spec.requirements.join("\n") + "\n")?;
    // Prefer pip's own wheel from ensurepip, run by the copied interpreter:
    // pip then installs into that interpreter's prefix and sees no host
    // packages. Fall back to the host's pip driving the copy via --python.
    let mut cmd = if let Some(wheel) = host.pip_wheel.as_ref().filter(|w| w.is_file()) {
        let mut c = Command::new(python);
        c.arg(wheel.join("pip"));
        c
    } else if host.has_pip {
        let mut c = Command::new(&host.executable);
        c.args(["-m", "pip", "--python"]).arg(python);
        c
    } else {
        bail!(
            "{} has neither ensurepip's bundled pip nor pip installed, so the requirements cannot be installed",
            host.executable.display()
        );
    };
    cmd.args([
        "install",
        "--no-compile",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        "--no-input",
        "--ignore-installed",
        "-r",
    ])
    .arg(&reqs)
    .env_remove("PYTHONHOME")
    .env_remove("PYTHONPATH")
    .env_remove("PIP_TARGET")
    .env_remove("PIP_PREFIX")
    .env("PIP_USER", "0")
    .env("PIP_REQUIRE_VIRTUALENV", "0")
    .env("PIP_ROOT_USER_ACTION", "ignore")
    .env("PYTHONNOUSERSITE", "1")
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .stdin(Stdio::null());
    let result = if opts.verbose {
        cmd.status().map(|status| (status, String::new()))
    } else {
        cmd.output().map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status, text)
        })
    };
    let _ = std::fs::remove_file(&reqs);
    let (status, output) =
        result.with_context(|| format!("cannot run pip with {}", python.display()))?;
    if !status.success() {
        let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("ERROR:")).collect();
        let detail = if errors.is_empty() {
            let lines: Vec<&str> = output.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        } else {
            errors.join("\n")
        };
        return Err(anyhow!(
            "pip could not install the spec's requirements ({}) ({status}):\n{detail}",
            spec.requirements.join(", ")
        ));
    }
    Ok(())
}

/// Makes console scripts independent of where the environment is: the
/// absolute interpreter path in their shebang becomes a `/bin/sh` preamble
/// that runs the interpreter next to the script (pip's own trick for shebangs
/// too long for the kernel). The rest of the file is untouched Python.
fn relocate_scripts(bin: &Path, exe_name: &str) -> Result<()> {
    let header = format!(
        "#!/bin/sh\n'''exec' \"$(dirname -- \"$(readlink -f -- \"$0\")\")/{exe_name}\" \"$0\" \"$@\"\n' '''\n"
    );
    let mut names: Vec<_> = std::fs::read_dir(bin)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        let data = std::fs::read(&path)?;
        if !data.starts_with(b"#!") {
            continue;
        }
        let text = match std::str::from_utf8(&data) {
            Ok(t) => t,
            Err(_) => continue,
        };
        let mut lines = text.split_inclusive('\n');
        let first = lines.next().unwrap_or("");
        let rest: String = if first.contains("python") {
            lines.collect()
        } else if first.trim_end() == "#!/bin/sh" {
            // pip's own preamble for long paths: `'''exec' "/abs/python" ...`
            // followed by `' '''`.
            let second = lines.next().unwrap_or("");
            if !second.starts_with("'''exec'") {
                continue;
            }
            let third = lines.next().unwrap_or("");
            if third.trim_end() != "' '''" {
                continue;
            }
            lines.collect()
        } else {
            continue;
        };
        std::fs::write(&path, format!("{header}{rest}"))?;
    }
    Ok(())
}

/// Quotes `value` for sh, letting `${DROVER_ENV_ROOT}` expand.
fn sh_value(value: &str) -> String {
    value
        .split("${DROVER_ENV_ROOT}")
        .map(|part| format!("'{}'", part.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join("\"$DROVER_ENV_ROOT\"")
}

fn write_activation(root: &Path, spec: &Spec, needs_ld_library_path: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut exports = String::from(
        "export DROVER_ENV_ROOT\n\
         PATH=\"$DROVER_ENV_ROOT/bin${PATH:+:$PATH}\"; export PATH\n\
         PYTHONNOUSERSITE=1; export PYTHONNOUSERSITE\n\
         PYTHONDONTWRITEBYTECODE=1; export PYTHONDONTWRITEBYTECODE\n\
         unset PYTHONHOME\n",
    );
    if needs_ld_library_path {
        exports.push_str(
            "LD_LIBRARY_PATH=\"$DROVER_ENV_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\"; export LD_LIBRARY_PATH\n",
        );
    }
    let env: &BTreeMap<String, String> = &spec.env;
    for (k, v) in env {
        if !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("spec: environment variable name {k:?} cannot be exported from sh");
        }
        exports.push_str(&format!("{k}={}; export {k}\n", sh_value(v)));
    }
    let activate = format!(
        "# Activate this environment in the current shell (bash or zsh):\n\
         #   . /path/to/env/bin/activate\n\
         if [ -n \"${{BASH_SOURCE:-}}\" ]; then\n\
         \x20   _drover_src=\"$BASH_SOURCE\"\n\
         elif [ -n \"${{ZSH_VERSION:-}}\" ]; then\n\
         \x20   eval '_drover_src=\"${{(%):-%x}}\"'\n\
         else\n\
         \x20   _drover_src=\"$0\"\n\
         fi\n\
         DROVER_ENV_ROOT=\"$(cd \"$(dirname -- \"$_drover_src\")/..\" && pwd -P)\"\n\
         unset _drover_src\n\
         {exports}"
    );
    let run = format!(
        "#!/bin/sh\n\
         # Run a command inside this environment: bin/drover-run CMD ARGS...\n\
         DROVER_ENV_ROOT=\"$(cd \"$(dirname -- \"$(readlink -f -- \"$0\")\")/..\" && pwd -P)\"\n\
         {exports}\
         exec \"$@\"\n"
    );
    let bin = root.join("bin");
    std::fs::write(bin.join("activate"), activate)?;
    std::fs::write(bin.join("drover-run"), run)?;
    std::fs::set_permissions(
        bin.join("drover-run"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    Ok(())
}

/// Compiles every module to `unchecked-hash` bytecode with the environment's
/// own interpreter. Source paths recorded in the bytecode are rooted at a
/// fixed `/drover-env` rather than the build directory, keeping the bytes
/// reproducible (CPython substitutes the real path when it loads a module).
fn compile_bytecode(python: &Path, stdlib: &Path, minor: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-I", "-m", "compileall", "-q", "-f", "-j", "0"])
        .args(["--invalidation-mode", "unchecked-hash", "-d"])
        .arg(format!("/drover-env/lib/python{minor}"))
        .arg(stdlib)
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        // A module that does not compile (py2-only templates shipped in some
        // packages) is compiled, and fails, only if imported; that is the
        // package's business, not a reason to fail the build.
        tracing::debug!(
            "compileall reported errors: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The interpreter must at least start: a broken copy should fail here,
    // not on a worker.
    let check = Command::new(python)
        .args(["-I", "-c", "import sys, encodings, site"])
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONPATH")
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !check.status.success() {
        bail!(
            "the copied interpreter does not start: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    Ok(())
}
