//! The environment spec: what goes into an environment, and the key that names
//! a build of it in the cache.
//!
//! A spec is JSON:
//!
//! ```json
//! {
//!   "python": "3.11",
//!   "requirements": ["six==1.17.0"],
//!   "files": [{"src": "data/model.bin", "dest": "files/model.bin"}],
//!   "env": {"OMP_NUM_THREADS": "1"}
//! }
//! ```
//!
//! Relative `src` paths are resolved against the directory holding the spec
//! file when it is loaded, so a spec can travel with its files.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Bumped whenever the layout or bytes of created environments change, so that
/// cached builds from an older packager are not reused.
pub const FORMAT_VERSION: u32 = 2;

/// A file or directory copied into the environment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileSpec {
    /// Source on the machine running `create`.
    pub src: PathBuf,
    /// Destination relative to the environment root; defaults to
    /// `files/<basename of src>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

impl FileSpec {
    /// The destination inside the environment, with the default applied.
    pub fn dest_path(&self) -> Result<String> {
        let dest = match &self.dest {
            Some(d) => d.trim_matches('/').to_string(),
            None => {
                let name = self
                    .src
                    .file_name()
                    .with_context(|| format!("file {} has no name", self.src.display()))?;
                format!("files/{}", name.to_string_lossy())
            }
        };
        check_relative(&dest)?;
        Ok(dest)
    }
}

/// What an environment contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Interpreter version as `MAJOR.MINOR` (e.g. `"3.11"`); a patch level is
    /// accepted and then must match exactly.
    pub python: String,
    /// pip requirement strings, normally pinned (`name==version`).
    #[serde(default)]
    pub requirements: Vec<String>,
    /// Extra files copied into the environment.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Environment variables set when running inside the environment. The
    /// literal `${DROVER_ENV_ROOT}` in a value is replaced with the
    /// environment's root at run time.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl Spec {
    /// Reads a spec from `path`, resolving relative file sources against the
    /// spec's directory, and normalizes it.
    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read spec {}", path.display()))?;
        let mut spec: Spec = serde_json::from_str(&text)
            .with_context(|| format!("spec {} is not valid", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base)
            .with_context(|| format!("cannot resolve {}", base.display()))?;
        for f in &mut spec.files {
            if f.src.is_relative() {
                f.src = base.join(&f.src);
            }
        }
        spec.normalize()?;
        Ok(spec)
    }

    /// Writes the spec as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Puts the spec in canonical form so that equivalent specs hash alike:
    /// trimmed, sorted, de-duplicated requirements (by their text with the
    /// project name canonicalized per PEP 503), files sorted by destination,
    /// and a validated `python` version.
    pub fn normalize(&mut self) -> Result<()> {
        let python = self.python.trim().trim_start_matches("python").to_string();
        let parts: Vec<&str> = python.split('.').collect();
        if !(2..=3).contains(&parts.len())
            || parts
                .iter()
                .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            bail!(
                "spec: \"python\" must look like \"3.11\" (or \"3.11.7\"), got {:?}",
                self.python
            );
        }
        self.python = python;

        let mut reqs: Vec<String> = Vec::new();
        for r in &self.requirements {
            let r = r.trim();
            if r.is_empty() || r.starts_with('#') {
                continue;
            }
            if r.starts_with('-') {
                bail!("spec: requirement {r:?} looks like a pip option; only requirement strings are allowed");
            }
            reqs.push(canonicalize_requirement(r));
        }
        reqs.sort_by(|a, b| {
            requirement_name(a)
                .cmp(&requirement_name(b))
                .then_with(|| a.cmp(b))
        });
        reqs.dedup();
        self.requirements = reqs;

        let mut seen = std::collections::BTreeSet::new();
        for f in &mut self.files {
            let dest = f.dest_path()?;
            if !seen.insert(dest.clone()) {
                bail!("spec: two files have the destination {dest:?}");
            }
            f.dest = Some(dest);
        }
        self.files.sort_by(|a, b| a.dest.cmp(&b.dest));

        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                bail!("spec: invalid environment variable name {k:?}");
            }
        }
        Ok(())
    }

    /// The `MAJOR.MINOR` part of the requested interpreter version.
    pub fn python_minor(&self) -> String {
        self.python.split('.').take(2).collect::<Vec<_>>().join(".")
    }

    /// The canonical JSON text of the (normalized) spec.
    pub fn canonical_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// The spec as the environment records it: each extra file's `src` is
    /// replaced by where it is inside the environment, so nothing about the
    /// build host's directories ends up in the environment or its key.
    pub fn portable(&self) -> Result<Spec> {
        let mut spec = self.clone();
        for f in &mut spec.files {
            f.src = PathBuf::from(f.dest_path()?);
        }
        Ok(spec)
    }

    /// The cache key of this spec: a BLAKE3 hash over the packager format
    /// version, the canonical [`Spec::portable`] spec and the contents of
    /// every extra file (not where they are). Two `create` runs with equal
    /// keys may share one build.
    pub fn key(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(format!("drover-packager format {FORMAT_VERSION}\0").as_bytes());
        h.update(self.portable()?.canonical_json()?.as_bytes());
        for f in &self.files {
            h.update(b"\0file\0");
            h.update(f.dest_path()?.as_bytes());
            hash_tree(&f.src, &mut h)
                .with_context(|| format!("cannot read spec file {}", f.src.display()))?;
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

/// Hashes a file or a directory tree (names, kinds, executable bits and
/// contents, in sorted order) into `h`.
fn hash_tree(path: &Path, h: &mut blake3::Hasher) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        h.update(b"d");
        let mut names: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for n in names {
            h.update(n.as_encoded_bytes());
            h.update(b"\0");
            hash_tree(&path.join(&n), h)?;
        }
        h.update(b"\0end\0");
    } else {
        let exec = meta.permissions().mode() & 0o111 != 0;
        h.update(if exec { b"x" } else { b"f" });
        h.update(&meta.len().to_le_bytes());
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

/// Rejects absolute paths and `..` so that nothing lands outside the
/// environment.
pub(crate) fn check_relative(p: &str) -> Result<()> {
    let path = Path::new(p);
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        bail!("path {p:?} must be relative and stay inside the environment");
    }
    Ok(())
}

/// The PEP 503 canonical project name of a requirement string.
pub fn requirement_name(req: &str) -> String {
    let end = req
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        .unwrap_or(req.len());
    canonical_name(&req[..end])
}

/// PEP 503 name normalization: lowercase, runs of `-_.` become `-`.
pub fn canonical_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if c == '-' || c == '_' || c == '.' {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Rewrites the name part of a requirement to its canonical form and strips
/// spaces around the version operator, so `Six == 1.17` and `six==1.17` are
/// one requirement.
fn canonicalize_requirement(req: &str) -> String {
    let end = req
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        .unwrap_or(req.len());
    let (name, rest) = req.split_at(end);
    let rest = rest.trim();
    // Markers (`; python_version < "3.12"`) keep their inner spacing; only the
    // version part is compacted.
    let (version, marker) = match rest.find(';') {
        Some(i) => (&rest[..i], Some(rest[i + 1..].trim())),
        None => (rest, None),
    };
    let version: String = version.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = canonical_name(name);
    out.push_str(&version);
    if let Some(m) = marker {
        out.push_str("; ");
        out.push_str(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_keys_equivalent_specs_alike() {
        let mut a = Spec {
            python: "3.11".into(),
            requirements: vec!["Six == 1.17.0".into(), "attrs==23.1".into()],
            files: vec![],
            env: BTreeMap::new(),
        };
        let mut b = Spec {
            python: " 3.11".into(),
            requirements: vec![
                "attrs==23.1".into(),
                "six==1.17.0".into(),
                "six==1.17.0".into(),
            ],
            files: vec![],
            env: BTreeMap::new(),
        };
        a.normalize().unwrap();
        b.normalize().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.requirements, vec!["attrs==23.1", "six==1.17.0"]);
        assert_eq!(a.key().unwrap(), b.key().unwrap());
        b.requirements.push("idna==3.7".into());
        b.normalize().unwrap();
        assert_ne!(a.key().unwrap(), b.key().unwrap());
    }

    #[test]
    fn rejects_bad_versions_and_paths() {
        for v in ["3", "three", "3.x", "3.11.7.1", ""] {
            let mut s = Spec {
                python: v.into(),
                requirements: vec![],
                files: vec![],
                env: BTreeMap::new(),
            };
            assert!(s.normalize().is_err(), "{v}");
        }
        assert!(check_relative("../x").is_err());
        assert!(check_relative("/etc/passwd").is_err());
        assert!(check_relative("files/a").is_ok());
    }

    #[test]
    fn key_follows_file_contents_not_locations() {
        let dir = tempfile::tempdir().unwrap();
        let spec_with = |src: &Path| {
            let mut s = Spec {
                python: "3.11".into(),
                requirements: vec![],
                files: vec![FileSpec {
                    src: src.to_path_buf(),
                    dest: Some("files/data".into()),
                }],
                env: BTreeMap::new(),
            };
            s.normalize().unwrap();
            s
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "same").unwrap();
        std::fs::write(&b, "same").unwrap();
        assert_eq!(spec_with(&a).key().unwrap(), spec_with(&b).key().unwrap());
        assert_eq!(
            spec_with(&a).portable().unwrap().files[0].src,
            Path::new("files/data")
        );
        std::fs::write(&b, "different").unwrap();
        assert_ne!(spec_with(&a).key().unwrap(), spec_with(&b).key().unwrap());
    }

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("Foo_Bar.baz"), "foo-bar-baz");
        assert_eq!(requirement_name("Foo_Bar[x]>=1"), "foo-bar");
        assert_eq!(
            canonicalize_requirement("Foo_Bar >= 1 ; python_version < \"3.12\""),
            "foo-bar>=1; python_version < \"3.12\""
        );
    }
}
