//! Where built and unpacked environments are kept, and the locks that keep
//! concurrent users of one cache from stepping on each other.
//!
//! Default location: `$DROVER_CACHE_DIR/packager` if set, else
//! `$XDG_CACHE_HOME/drover/packager`, else `$HOME/.cache/drover/packager`.
//! Layout:
//!
//! ```text
//! packager/
//!   specs/<spec key>        text: content hash of the build of that spec
//!   envs/<hash>.tar.gz      built environments, named by content hash
//!   unpacked/<hash>/        environments unpacked by `drover pack run`
//!   tmp/                    builds in progress
//! ```
//!
//! Everything in it can be deleted at any time when no `drover pack` runs.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The packager's cache root (see the module docs for how it is chosen).
pub fn default_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("DROVER_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("packager"));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("drover").join("packager"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot find a cache directory: set DROVER_CACHE_DIR or HOME")?;
    Ok(PathBuf::from(home)
        .join(".cache")
        .join("drover")
        .join("packager"))
}

/// A packager cache rooted at a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (without creating anything yet) the cache at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// Opens the cache at [`default_root`].
    pub fn open_default() -> Result<Self> {
        Ok(Cache::new(default_root()?))
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a built environment with content hash `hash` is stored.
    pub fn env_path(&self, hash: &str) -> PathBuf {
        self.root.join("envs").join(format!("{hash}.tar.gz"))
    }

    /// The directory `drover pack run` unpacks environments under.
    pub fn unpack_root(&self) -> PathBuf {
        self.root.join("unpacked")
    }

    /// Scratch space for builds in progress.
    pub fn tmp_dir(&self) -> Result<PathBuf> {
        let d = self.root.join("tmp");
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }

    /// The built environment recorded for `spec_key`, if it is still there.
    pub fn lookup(&self, spec_key: &str) -> Option<(String, PathBuf)> {
        let hash = std::fs::read_to_string(self.root.join("specs").join(spec_key)).ok()?;
        let hash = hash.trim().to_string();
        if !is_hash(&hash) {
            return None;
        }
        let path = self.env_path(&hash);
        path.is_file().then_some((hash, path))
    }

    /// Records that `spec_key` builds to `hash`, atomically.
    pub fn record(&self, spec_key: &str, hash: &str) -> Result<()> {
        let dir = self.root.join("specs");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".{spec_key}.{}", std::process::id()));
        std::fs::write(&tmp, format!("{hash}\n"))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(spec_key))
            .with_context(|| format!("cannot record {spec_key} in the cache"))?;
        Ok(())
    }

    /// Takes the exclusive build lock for `spec_key`, waiting for any other
    /// process building the same spec.
    pub fn lock_spec(&self, spec_key: &str) -> Result<FileLock> {
        FileLock::acquire(&self.root.join("locks").join(format!("spec-{spec_key}")))
    }
}

/// Whether `s` looks like one of our content hashes (64 lowercase hex digits).
pub fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An exclusive `flock` on a lock file, released on drop. `flock` locks
/// belong to the open file, so they exclude threads of one process as well
/// as other processes, and the kernel drops them if the holder dies.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Creates `path` (and its directory) if needed and locks it, blocking.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        Ok(FileLock { _file: file })
    }
}

/// Hard-links `from` to `to` (replacing `to`), falling back to a copy across
/// file systems. Linking keeps a cache hit at a few milliseconds even for a
/// large environment.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(from), std::fs::canonicalize(to)) {
        if a == b {
            return Ok(());
        }
    }
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = to
        .file_name()
        .with_context(|| format!("{} is not a file path", to.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(from, &tmp).is_err() {
        std::fs::copy(from, &tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    }
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))?;
    Ok(())
}
