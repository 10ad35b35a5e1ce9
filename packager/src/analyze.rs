//! Deriving a spec from a script's imports.
//!
//! The script is parsed by the target interpreter's own `ast` module (so the
//! grammar is exactly the one the script will run under), following local
//! modules and packages next to the script. Each remaining top-level module
//! name that is not in the standard library is mapped to the installed
//! distribution that provides it, and that distribution and everything it
//! requires (markers evaluated for the target interpreter) are pinned to the
//! installed versions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::spec::{FileSpec, Spec};

/// What analysis found, beyond the spec itself.
#[derive(Debug, Clone, Deserialize)]
pub struct Analysis {
    /// `MAJOR.MINOR` of the interpreter that did the analysis.
    pub python: String,
    /// Pinned requirements (`Name==version`), direct and transitive.
    pub requirements: Vec<String>,
    /// Top-level modules provided by the standard library.
    pub stdlib: Vec<String>,
    /// Top-level modules found next to the script (not packages).
    pub local: Vec<String>,
    /// Module name -> distribution that provides it.
    pub provided_by: BTreeMap<String, String>,
    /// Imported modules that no installed distribution provides. They are
    /// left out of the spec; the script fails on them only if the import is
    /// actually reached (e.g. optional imports in `try`).
    pub unresolved: Vec<String>,
}

/// Runs under the target interpreter (3.8+: needs importlib.metadata).
/// Reads the script paths from argv and prints one JSON object.
const ANALYZER: &str = r#"
import ast, json, os, sys
import importlib.util
try:
    from importlib import metadata
except ImportError:
    sys.stderr.write("analysis needs Python 3.8 or newer\n")
    sys.exit(3)

# `-c` puts the current directory first on sys.path, where the script will
# have its own directory instead (covered by local_module): distributions
# lying in the current directory must not count as installed.
if sys.path and sys.path[0] == "":
    del sys.path[0]

def top_imports(path):
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    names, relative = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative = True
            elif node.module:
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            # __import__("x") and importlib.import_module("x") with literals.
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else "")
            if fname in ("__import__", "import_module") and node.args:
                a = node.args[0]
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and not a.value.startswith("."):
                    names.add(a.value.split(".")[0])
    return names, relative

if hasattr(sys, "stdlib_module_names"):
    STDLIB = set(sys.stdlib_module_names)
else:
    import sysconfig
    STDLIB = set(sys.builtin_module_names)
    for d in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}:
        for base in (d, os.path.join(d, "lib-dynload")):
            try:
                entries = os.listdir(base)
            except OSError:
                continue
            for n in entries:
                if n in ("site-packages", "dist-packages"):
                    continue
                STDLIB.add(n.split(".")[0])
STDLIB.add("__future__")

def local_module(name, dirs):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p + ".py"):
            return [p + ".py"]
        if os.path.isdir(p) and any(x.endswith(".py") for x in os.listdir(p)):
            out = []
            for root, subdirs, files in os.walk(p):
                subdirs.sort()
                out.extend(os.path.join(root, x) for x in sorted(files) if x.endswith(".py"))
            return out
    return None

scripts = [os.path.abspath(p) for p in sys.argv[1:]]
dirs = sorted({os.path.dirname(p) for p in scripts})
todo, seen_files = list(scripts), set()
imports, local = set(), set()
while todo:
    path = todo.pop()
    if path in seen_files:
        continue
    seen_files.add(path)
    names, _ = top_imports(path)
    # Relative imports only reach the script's own package: local by definition.
    for n in names:
        if n in imports or n in local:
            continue
        if n in STDLIB:
            imports.add(n)
            continue
        files = local_module(n, dirs)
        if files is not None:
            local.add(n)
            todo.extend(files)
        else:
            imports.add(n)

def canon(n):
    import re
    return re.sub(r"[-_.]+", "-", n).lower()

dists = {}
provides = {}
for d in metadata.distributions():
    name = d.metadata["Name"]
    if not name or canon(name) in dists:
        continue
    dists[canon(name)] = d
    tops = set()
    txt = d.read_text("top_level.txt")
    if txt:
        tops.update(x.strip() for x in txt.split() if x.strip())
    for f in d.files or ():
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        top = parts[0]
        if len(parts) == 1:
            if top.endswith(".py"):
                top = top[:-3]
            elif top.endswith(".so") or top.endswith(".pyd"):
                top = top.split(".")[0]
            else:
                continue
        tops.add(top)
    for t in tops:
        provides.setdefault(t, []).append(name)

try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None

def requires(dist, extras):
    out = []
    for r in dist.requires or ():
        if Requirement is None:
            if ";" in r:
                continue
            import re
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r)
            if m:
                out.append((m.group(1), ()))
            continue
        try:
            req = Requirement(r)
        except Exception:
            continue
        if req.marker is not None:
            envs = [{"extra": e} for e in (extras or [""])]
            if not any(req.marker.evaluate(e) for e in envs):
                continue
        out.append((req.name, tuple(sorted(req.extras))))
    return out

provided_by, unresolved, stdlib_used = {}, [], []
pinned = {}
queue = []
for n in sorted(imports):
    if n in STDLIB:
        stdlib_used.append(n)
        continue
    cands = provides.get(n)
    if not cands:
        unresolved.append(n)
        continue
    # Several distributions can claim one name (namespace packages); take
    # all of them, so the import finds what it found here.
    provided_by[n] = ", ".join(sorted(set(cands)))
    for c in cands:
        queue.append((c, ()))
seen = set()
while queue:
    name, extras = queue.pop()
    key = (canon(name), extras)
    if key in seen:
        continue
    seen.add(key)
    d = dists.get(canon(name))
    if d is None:
        continue
    pinned[canon(name)] = "%s==%s" % (d.metadata["Name"], d.version)
    for dep in requires(d, list(extras)):
        queue.append(dep)

print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "requirements": [pinned[k] for k in sorted(pinned)],
    "stdlib": sorted(stdlib_used),
    "local": sorted(local),
    "provided_by": provided_by,
    "unresolved": sorted(unresolved),
}))
"#;

/// Analyzes `scripts` with `python` (an interpreter path or name; the
/// environment's packages are the ones installed for it).
pub fn analyze(scripts: &[PathBuf], python: &Path) -> Result<Analysis> {
    if scripts.is_empty() {
        bail!("no script to analyze");
    }
    for s in scripts {
        if !s.is_file() {
            bail!("script {} does not exist", s.display());
        }
    }
    let out = Command::new(python)
        .arg("-c")
        .arg(ANALYZER)
        .args(scripts)
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // A SyntaxError traceback's last lines say where; the rest is our
        // analyzer's frames.
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} could not analyze {}:\n{}",
            python.display(),
            scripts
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            tail.join("\n")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("unexpected analyzer output: {line:?}"))
}

impl Analysis {
    /// The spec for this analysis, with extra files and variables added.
    pub fn to_spec(&self, files: Vec<FileSpec>, env: BTreeMap<String, String>) -> Result<Spec> {
        let mut spec = Spec {
            python: self.python.clone(),
            requirements: self.requirements.clone(),
            files,
            env,
        };
        spec.normalize()?;
        Ok(spec)
    }
}
