//! Finding a host interpreter of a given version and asking it where its
//! pieces live.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Everything `create` needs to know about a host interpreter, as reported by
/// the interpreter itself.
#[derive(Debug, Clone, Deserialize)]
pub struct HostPython {
    /// Real path of the interpreter binary (symlinks resolved).
    pub executable: PathBuf,
    /// Full version, e.g. `3.11.7`.
    pub version: String,
    /// `MAJOR.MINOR`, e.g. `3.11`.
    pub minor: String,
    /// `sys.implementation.name`.
    pub implementation: String,
    /// `sys.base_prefix`.
    pub base_prefix: PathBuf,
    /// `sysconfig.get_path("stdlib")`.
    pub stdlib: PathBuf,
    /// `sysconfig.get_path("platstdlib")`.
    pub platstdlib: PathBuf,
    /// The `LIBDIR` config var: where `libpythonX.Y.so` lives.
    pub libdir: Option<PathBuf>,
    /// The `INSTSONAME` config var (`libpython3.11.so.1.0`).
    pub instsoname: Option<String>,
    /// Whether the interpreter links `libpython` dynamically.
    pub shared: bool,
    /// The pip wheel bundled with `ensurepip`, if any.
    pub pip_wheel: Option<PathBuf>,
    /// `sysconfig.get_platform()`, e.g. `linux-x86_64`.
    pub platform: String,
    /// Whether this interpreter itself can run `-m pip`.
    pub has_pip: bool,
}

/// Runs under the candidate interpreter; must stay valid Python 3.6+ so that
/// old interpreters report their version instead of failing to parse it.
const PROBE: &str = r#"
import json, os, sys, sysconfig, glob
try:
    import importlib.util as u
    has_pip = u.find_spec("pip") is not None
except Exception:
    has_pip = False
exe = getattr(sys, "_base_executable", None) or sys.executable
if sys.prefix != sys.base_prefix and os.path.basename(exe) == os.path.basename(sys.executable):
    cand = os.path.join(sys.base_prefix, "bin", os.path.basename(sys.executable))
    if os.path.exists(cand):
        exe = cand
stdlib = sysconfig.get_path("stdlib")
wheels = sorted(glob.glob(os.path.join(stdlib, "ensurepip", "_bundled", "pip-*.whl")))
cv = sysconfig.get_config_var
print(json.dumps({
    "executable": os.path.realpath(exe),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "minor": "%d.%d" % sys.version_info[:2],
    "implementation": sys.implementation.name,
    "base_prefix": sys.base_prefix,
    "stdlib": stdlib,
    "platstdlib": sysconfig.get_path("platstdlib"),
    "libdir": cv("LIBDIR"),
    "instsoname": cv("INSTSONAME"),
    "shared": bool(cv("Py_ENABLE_SHARED")),
    "pip_wheel": wheels[-1] if wheels else None,
    "platform": sysconfig.get_platform(),
    "has_pip": has_pip,
}))
"#;

/// Asks `exe` about itself.
pub fn probe(exe: &Path) -> Result<HostPython> {
    let out = Command::new(exe)
        .args(["-I", "-c", PROBE])
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONPATH")
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed to describe itself: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .with_context(|| format!("{} gave an unexpected description: {line:?}", exe.display()))
}

/// Candidate interpreter paths for `MAJOR.MINOR`, best first: `pythonX.Y` on
/// `PATH`, then pyenv's versions, then the usual system locations.
fn candidates(minor: &str) -> Vec<PathBuf> {
    let name = format!("python{minor}");
    let mut out = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            out.push(dir.join(&name));
        }
    }
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(root) = pyenv_root {
        if let Ok(rd) = std::fs::read_dir(root.join("versions")) {
            let mut versions: Vec<(Vec<u32>, PathBuf)> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    let rest = n.strip_prefix(minor)?;
                    if !(rest.is_empty() || rest.starts_with('.')) {
                        return None;
                    }
                    let nums = n
                        .split('.')
                        .map(|p| p.parse().ok())
                        .collect::<Option<Vec<u32>>>()?;
                    Some((nums, e.path().join("bin").join(&name)))
                })
                .collect();
            // Newest patch release first.
            versions.sort_by(|a, b| b.0.cmp(&a.0));
            out.extend(versions.into_iter().map(|(_, p)| p));
        }
    }
    for dir in ["/usr/local/bin", "/usr/bin", "/opt/python/bin"] {
        out.push(Path::new(dir).join(&name));
    }
    out
}

/// Finds a host interpreter for `version` (`MAJOR.MINOR` or
/// `MAJOR.MINOR.PATCH`). `explicit` (from `--python-exe` or
/// `DROVER_PYTHON`) wins if given, but must still match.
pub fn find(version: &str, explicit: Option<&Path>) -> Result<HostPython> {
    let minor: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let matches = |p: &HostPython| {
        p.minor == minor && (version.split('.').count() < 3 || p.version == version)
    };
    if let Some(exe) = explicit {
        let p = probe(exe)?;
        if !matches(&p) {
            bail!(
                "{} is Python {}, but the spec asks for Python {version}",
                exe.display(),
                p.version
            );
        }
        return Ok(p);
    }
    let mut tried = Vec::new();
    for cand in candidates(&minor) {
        if !cand.is_file() {
            continue;
        }
        match probe(&cand) {
            Ok(p) if matches(&p) => return Ok(p),
            Ok(p) => tried.push(format!("{} (is {})", cand.display(), p.version)),
            // pyenv shims fail for versions that are installed but not active;
            // the versions directory is searched separately.
            Err(_) => tried.push(format!("{} (does not run)", cand.display())),
        }
    }
    let mut msg = format!(
        "no Python {version} interpreter found on this host: looked for python{minor} on PATH, \
         in pyenv's versions and in /usr/local/bin, /usr/bin"
    );
    if !tried.is_empty() {
        msg.push_str(&format!(" (tried {})", tried.join(", ")));
    }
    msg.push_str(&format!(
        "; install Python {minor} or point --python-exe (or DROVER_PYTHON) at one"
    ));
    bail!(msg)
}
