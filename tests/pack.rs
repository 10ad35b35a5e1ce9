//! End-to-end tests of `drover pack` through the `drover` binary: a real environment built from a real PyPI
//! package with the host's real interpreter, unpacked and run elsewhere.
//!
//! Needs: a CPython 3.7+ on the host as `python3` (pyenv's in CI) and access
//! to PyPI. One environment is built once per test run and shared by the
//! tests that only read it, and a second, independent build of the same spec
//! runs alongside it for the reproducibility test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The small real package every environment here installs.
const PACKAGE: &str = "six";
const VERSION: &str = "1.17.0";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drover"))
}

/// `drover pack --cache-dir CACHE ARGS...` with the test's environment.
fn pack(cache: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("pack").arg("--cache-dir").arg(cache).args(args);
    cmd.stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("cannot start drover pack");
    eprintln!(
        "{cmd:?}\n--- exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asks the host's `python3` for `MAJOR.MINOR` and its installation prefix.
fn host_python() -> (String, String) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.base_prefix)",
        ])
        .output()
        .expect("these tests need python3 on the host");
    assert!(out.status.success(), "python3 does not run");
    let text = stdout(&out);
    let mut lines = text.lines();
    (
        lines.next().unwrap().to_string(),
        lines.next().unwrap().to_string(),
    )
}

/// A directory with only the tools the activation scripts use, so that a
/// `PATH` made of it has no Python on it.
fn tools_without_python(dir: &Path) -> PathBuf {
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    for t in ["dirname", "readlink", "cat"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(t))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{t} not found"));
        let _ = std::os::unix::fs::symlink(found, tools.join(t));
    }
    tools
}

/// Writes a spec for `python` with [`PACKAGE`], an extra file and a variable.
fn write_spec(dir: &Path, python: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/greeting.txt"), "hello from a spec file\n").unwrap();
    let spec = serde_json::json!({
        "python": python,
        "requirements": [format!("{PACKAGE}=={VERSION}")],
        "files": [{"src": "data/greeting.txt", "dest": "files/greeting.txt"}],
        "env": {"DROVER_TEST_DATA": "${DROVER_ENV_ROOT}/files/greeting.txt"},
    });
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    path
}

fn is_hash_name(p: &Path) -> bool {
    drover_packager::hash_from_name(p).is_some()
}

/// The environment built once for the whole run.
struct Fixture {
    dir: PathBuf,
    python: String,
    host_prefix: String,
    spec: PathBuf,
    /// The first build's cache.
    cache: PathBuf,
    /// The tarball `create` wrote (named `<hash>.tar.gz`).
    tarball: PathBuf,
    /// The same bytes under a name that says nothing, elsewhere.
    moved: PathBuf,
    /// The environment unpacked by `run`, at a path unrelated to the build.
    unpacked: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Under the target dir and wiped first, so at most one stale copy
        // is ever left behind.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packager-pack-tests");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (python, host_prefix) = host_python();
        let spec = write_spec(&dir.join("spec"), &python);
        let cache = dir.join("cache-a");
        let out_dir = dir.join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        // The second, independent build for the reproducibility test runs
        // at the same time: a separate cache and --no-cache.
        let second = pack(&dir.join("cache-b"), &["create", "--no-cache"])
            .arg(&spec)
            .arg("-o")
            .arg(dir.join("second.tar.gz"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start drover pack");
        let o = run(pack(&cache, &["create"]).arg(&spec).arg("-o").arg(&out_dir));
        let second = second.wait_with_output().unwrap();
        std::fs::write(dir.join("second.log"), &second.stderr).unwrap();
        assert!(
            second.status.success(),
            "second create failed: {}",
            stderr(&second)
        );
        assert!(o.status.success(), "create failed: {}", stderr(&o));
        assert!(stderr(&o).contains("built in"), "{}", stderr(&o));
        let tarball = PathBuf::from(stdout(&o).trim());
        assert!(
            is_hash_name(&tarball),
            "{} is not named by its hash",
            tarball.display()
        );
        assert_eq!(
            drover_packager::hash_from_name(&tarball).unwrap(),
            drover_packager::hash_file(&tarball).unwrap(),
            "the name is not the content hash"
        );

        // The run side never sees the build's paths.
        let elsewhere = dir.join("somewhere/else");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let moved = elsewhere.join("env.tar.gz");
        std::fs::copy(&tarball, &moved).unwrap();
        let unpack_dir = dir.join("worker-cache");
        let o = run(pack(&unpack_dir, &["run", "-v"])
            .arg(&moved)
            .args(["--", "python3", "-c", "import sys; print(sys.prefix)"])
            .env_clear());
        assert!(o.status.success(), "run failed: {}", stderr(&o));
        assert!(stderr(&o).contains("unpacked environment"));
        let unpacked = PathBuf::from(stdout(&o).trim());
        Fixture {
            dir,
            python,
            host_prefix,
            spec,
            cache,
            tarball,
            moved,
            unpacked,
        }
    })
}

/// Run inside the environment: checks that everything comes from it.
const CHECK: &str = r#"
import os, sys, shutil
root = os.path.realpath(os.environ["DROVER_ENV_ROOT"])
host_prefix = sys.argv[1]
assert os.path.realpath(sys.prefix) == root, (sys.prefix, root)
assert os.path.realpath(sys.executable).startswith(root + "/"), sys.executable
import six
assert six.__version__ == "1.17.0", six.__version__
assert os.path.realpath(six.__file__).startswith(root + "/"), six.__file__
# C extension modules of the copied standard library load.
import ssl, sqlite3, ctypes, decimal, json, zlib, hashlib
assert all(not p.startswith(host_prefix) for p in sys.path), sys.path
with open("/proc/self/maps") as f:
    maps = f.read()
assert host_prefix + "/" not in maps, "the host's Python is mapped"
assert "libpython" not in maps or root in maps
with open(os.environ["DROVER_TEST_DATA"]) as f:
    assert f.read() == "hello from a spec file\n"
assert os.path.dirname(os.path.realpath(shutil.which("python3"))) == root + "/bin"
print("ok", six.__version__)
"#;

#[test]
fn environment_runs_unpacked_elsewhere_without_host_python() {
    let f = fixture();
    assert!(f.unpacked.starts_with(f.dir.join("worker-cache")));
    // No PATH at all, no PYTHONHOME or PYTHONPATH: `python3` can only be the
    // environment's, which `run` puts first on the PATH.
    let script = f.dir.join("check.py");
    std::fs::write(&script, CHECK).unwrap();
    let o = run(pack(&f.dir.join("worker-cache"), &["run"])
        .arg(&f.moved)
        .arg("--")
        .arg("python3")
        .arg(&script)
        .arg(&f.host_prefix)
        .env_clear());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("ok {VERSION}"));
}

#[test]
fn plain_tar_and_activation_scripts_work_at_another_path() {
    let f = fixture();
    // Unpacked by GNU tar: the archive is an ordinary .tar.gz.
    let dest = f.dir.join("by-tar/deeper/env");
    std::fs::create_dir_all(&dest).unwrap();
    let o = run(Command::new("tar")
        .arg("-xzf")
        .arg(&f.tarball)
        .arg("-C")
        .arg(&dest));
    assert!(o.status.success());
    let tools = tools_without_python(&f.dir);
    let script = f.dir.join("check-tar.py");
    std::fs::write(&script, CHECK).unwrap();

    let o = run(Command::new(dest.join("bin/drover-run"))
        .arg("python3")
        .arg(&script)
        .arg(&f.host_prefix)
        .env_clear()
        .env("PATH", &tools));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("ok {VERSION}"));

    let o = run(Command::new("/bin/bash")
        .arg("-c")
        .arg(format!(
            ". '{}/bin/activate' && python3 '{}' '{}'",
            dest.display(),
            script.display(),
            f.host_prefix
        ))
        .env_clear()
        .env("PATH", &tools));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("ok {VERSION}"));
}

#[test]
fn second_create_is_a_cache_hit() {
    let f = fixture();
    let out = f.dir.join("again.tar.gz");
    let o = run(pack(&f.cache, &["create"]).arg(&f.spec).arg("-o").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("cache hit"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&f.tarball).unwrap()
    );

    // A spec that differs only in formatting and requirement spelling is
    // the same spec.
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f.spec).unwrap()).unwrap();
    let mut respelled = spec.clone();
    respelled["requirements"] = serde_json::json!([format!("  SIX == {VERSION} ")]);
    let path = f.spec.with_file_name("respelled.json");
    std::fs::write(&path, serde_json::to_string(&respelled).unwrap()).unwrap();
    let o = run(pack(&f.cache, &["create"]).arg(&path).arg("-o").arg(&f.dir));
    assert!(stderr(&o).contains("cache hit"), "{}", stderr(&o));
    assert_eq!(
        PathBuf::from(stdout(&o).trim()).file_name(),
        f.tarball.file_name()
    );
}

#[test]
fn same_spec_twice_gives_identical_bytes() {
    let f = fixture();
    // The fixture built it a second time, with a separate cache and
    // --no-cache.
    let log = std::fs::read_to_string(f.dir.join("second.log")).unwrap();
    assert!(log.contains("built in"), "{log}");
    let a = std::fs::read(&f.tarball).unwrap();
    let b = std::fs::read(f.dir.join("second.tar.gz")).unwrap();
    assert!(a == b, "two builds of one spec differ");
    // The gzip header carries no time and no name (RFC 1952: MTIME at 4..8,
    // FLG bit 3 is FNAME).
    assert_eq!(&a[..4], &[0x1f, 0x8b, 8, 4]);
    assert_eq!(&a[4..8], &[0, 0, 0, 0]);
}

#[test]
fn concurrent_runs_unpack_once() {
    let f = fixture();
    let cache = f.dir.join("concurrent");
    let children: Vec<_> = (0..4)
        .map(|_| {
            pack(&cache, &["run", "-v"])
                .arg(&f.tarball)
                .args(["--", "python3", "-c", "import six; print(six.__version__)"])
                .env_clear()
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut unpacked = 0;
    for o in &outs {
        eprintln!("{}", stderr(o));
        assert!(o.status.success(), "{}", stderr(o));
        assert_eq!(stdout(o).trim(), VERSION);
        if stderr(o).contains("unpacked environment") {
            unpacked += 1;
        } else {
            assert!(stderr(o).contains("already unpacked"), "{}", stderr(o));
        }
    }
    assert_eq!(unpacked, 1, "the environment was unpacked {unpacked} times");
    let names: Vec<String> = std::fs::read_dir(cache.join("unpacked"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".locks"))
        .collect();
    assert_eq!(names.len(), 1, "leftovers: {names:?}");
}

#[test]
fn corrupt_tarball_is_a_clear_error() {
    let f = fixture();
    let bytes = std::fs::read(&f.tarball).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    for b in &mut flipped[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let truncated = bytes[..bytes.len() * 2 / 3].to_vec();
    let dir = f.dir.join("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let hash_name = f.tarball.file_name().unwrap();
    for (name, data) in [
        ("flipped", &flipped),
        ("truncated", &truncated),
        ("flipped-hash-named", &flipped),
    ] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let path = if name.ends_with("hash-named") {
            sub.join(hash_name)
        } else {
            sub.join("env.tar.gz")
        };
        std::fs::write(&path, data).unwrap();
        let cache = sub.join("cache");
        let marker = sub.join("ran");
        let o = run(pack(&cache, &["run"])
            .arg(&path)
            .args(["--", "touch"])
            .arg(&marker));
        assert!(!o.status.success(), "{name}: a corrupt tarball was run");
        let err = stderr(&o);
        assert!(err.contains("corrupt"), "{name}: unclear error: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(!marker.exists(), "{name}: the command ran");
        // Nothing half-unpacked is left to be mistaken for an environment.
        let left: Vec<_> = std::fs::read_dir(cache.join("unpacked"))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name())
                    .filter(|n| n != ".locks" && n != ".memo")
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{name}: left behind {left:?}");
    }
}

#[test]
fn missing_package_is_a_clear_error() {
    let f = fixture();
    let dir = f.dir.join("missing-package");
    std::fs::create_dir_all(&dir).unwrap();
    let name = "drover-no-such-package-4f1c";
    let spec = dir.join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({"python": f.python, "requirements": [format!("{name}==1.0"), "six==1.17.0"]})
            .to_string(),
    )
    .unwrap();
    let cache = dir.join("cache");
    let o = run(pack(&cache, &["create"]).arg(&spec).arg("-o").arg(&dir));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("pip could not install"), "{err}");
    assert!(
        err.contains(name),
        "the error does not name the package: {err}"
    );
    // Nothing was cached or written, and the build tree is gone.
    assert!(
        !cache.join("specs").exists()
            || std::fs::read_dir(cache.join("specs"))
                .unwrap()
                .next()
                .is_none()
    );
    let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "build leftovers: {tmp:?}");
    assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tar.gz")));
}

#[test]
fn interpreter_not_on_host_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"python": "3.99", "requirements": ["six==1.17.0"]}"#,
    )
    .unwrap();
    let o = run(pack(&dir.path().join("cache"), &["create"]).arg(&spec));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("no Python 3.99 interpreter found"), "{err}");

    // An interpreter given explicitly must match too.
    let o = run(pack(
        &dir.path().join("cache"),
        &["create", "--python-exe", "python3"],
    )
    .arg(&spec));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("but the spec asks for Python 3.99"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malformed_spec_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expect) in [
        ("{\"python\": \"3.11\", ", "is not valid"),
        ("{\"python\": \"eleven\"}", "\"python\" must look like"),
        (
            "{\"python\": \"3.11\", \"requirments\": []}",
            "unknown field",
        ),
        (
            "{\"python\": \"3.11\", \"requirements\": [\"--index-url=http://x\"]}",
            "pip option",
        ),
        (
            "{\"python\": \"3.11\", \"files\": [{\"src\": \"spec.json\", \"dest\": \"../x\"}]}",
            "must be relative",
        ),
    ] {
        let spec = dir.path().join("spec.json");
        std::fs::write(&spec, text).unwrap();
        let o = run(pack(&dir.path().join("cache"), &["create"]).arg(&spec));
        assert!(!o.status.success(), "{text}");
        assert!(stderr(&o).contains(expect), "{text}: {}", stderr(&o));
    }
}

#[test]
fn analyze_lists_only_installed_packages_with_versions() {
    let f = fixture();
    // The environment's interpreter as the target: its only installed
    // distribution is six (pip ran from ensurepip's wheel, outside it).
    let python = f.unpacked.join("bin/python3");
    let dir = f.dir.join("analyze");
    std::fs::create_dir_all(dir.join("mypkg")).unwrap();
    std::fs::write(
        dir.join("main.py"),
        "import os, sys, json\n\
         from collections import OrderedDict\n\
         import helper\n\
         from mypkg import tools\n\
         import six.moves\n\
         try:\n    import drover_not_installed_anywhere\nexcept ImportError:\n    pass\n\
         def f():\n    import importlib\n    return importlib.import_module('sqlite3')\n",
    )
    .unwrap();
    std::fs::write(dir.join("helper.py"), "import re, textwrap\n").unwrap();
    std::fs::write(dir.join("mypkg/__init__.py"), "").unwrap();
    std::fs::write(
        dir.join("mypkg/tools.py"),
        "from . import other\nimport csv\n",
    )
    .unwrap();
    std::fs::write(dir.join("mypkg/other.py"), "import math\n").unwrap();
    let out = dir.join("spec.json");
    let o = run(pack(&f.dir.join("analyze-cache"), &["analyze"])
        .arg(dir.join("main.py"))
        .arg("--python")
        .arg(&python)
        .arg("-o")
        .arg(&out)
        .env_remove("PYTHONPATH")
        .current_dir(&dir));
    assert!(o.status.success(), "{}", stderr(&o));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(spec["python"], f.python.as_str());
    assert_eq!(
        spec["requirements"],
        serde_json::json!([format!("{PACKAGE}=={VERSION}")])
    );
    let err = stderr(&o);
    assert!(err.contains("helper") && err.contains("mypkg"), "{err}");
    assert!(err.contains("drover_not_installed_anywhere"), "{err}");

    // A syntax error is reported with the interpreter's own message.
    std::fs::write(dir.join("bad.py"), "import six\ndef broken(:\n").unwrap();
    let o = run(pack(&f.dir.join("analyze-cache"), &["analyze"])
        .arg(dir.join("bad.py"))
        .arg("--python")
        .arg(&python));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SyntaxError"), "{}", stderr(&o));
}
