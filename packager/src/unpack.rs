//! Unpacking an environment once per worker, and the variables that activate
//! it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};

use crate::archive;
use crate::cache::{is_hash, FileLock};
use crate::meta::{EnvMeta, META_FILE};

/// The content hash a tarball's file name claims, if it is named
/// `<64 hex digits>.tar.gz` (as `create` names its outputs).
pub fn hash_from_name(tarball: &Path) -> Option<String> {
    let name = tarball.file_name()?.to_str()?;
    let stem = name.strip_suffix(".tar.gz")?;
    is_hash(stem).then(|| stem.to_string())
}

/// BLAKE3 of a file's bytes, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Where a hash computed for a file with a given identity (path, device,
/// inode, size, change times) is remembered, so that asking again about an
/// unchanged file costs one `stat` instead of a pass over its bytes.
fn memo_path(tarball: &Path, cache_root: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::fs::canonicalize(tarball).ok()?;
    let m = std::fs::metadata(&abs).ok()?;
    let mut h = blake3::Hasher::new();
    h.update(abs.as_os_str().as_encoded_bytes());
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        h.update(&v.to_le_bytes());
    }
    Some(
        cache_root
            .join(".memo")
            .join(h.finalize().to_hex().as_str()),
    )
}

/// The content hash of `tarball` and whether it still has to be verified
/// while unpacking (it does when it was only read off the file name).
fn tarball_hash(tarball: &Path, cache_root: &Path) -> Result<(String, bool)> {
    if let Some(h) = hash_from_name(tarball) {
        return Ok((h, true));
    }
    let memo = memo_path(tarball, cache_root);
    if let Some(m) = &memo {
        if let Ok(text) = std::fs::read_to_string(m) {
            let text = text.trim();
            if is_hash(text) {
                return Ok((text.to_string(), false));
            }
        }
    }
    let hash = hash_file(tarball)?;
    if let Some(m) = memo {
        // The memo only saves time later; failing to write it is harmless.
        if let Some(dir) = m.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = m.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &hash).is_ok() {
            let _ = std::fs::rename(&tmp, &m);
        }
    }
    Ok((hash, false))
}

/// Removes a directory tree even if parts of it were made read-only.
fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_err() {
        let _ = archive::make_writable(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Unpacks `tarball` once into `<cache_root>/<hash>/` and returns that
/// directory.
///
/// `<hash>` is the BLAKE3 hash of the tarball's bytes. If the file is named
/// `<hash>.tar.gz` (as `create` names its outputs) the name is trusted for the
/// lookup, so finding an environment that is already unpacked costs a `stat`,
/// and the bytes are checked against the name while unpacking. Otherwise the
/// file is hashed, and the hash is remembered under `<cache_root>/.memo/`
/// keyed by the file's path, inode, size and times.
///
/// The tree is built in a temporary sibling directory and renamed into place
/// atomically, under an exclusive lock per hash: concurrent callers, threads
/// or processes, wait for the first one and then share its result; nobody
/// ever sees half an environment. A corrupt or truncated tarball, a hash
/// mismatch or a full disk gives an error naming the cause, and leaves no
/// partial directory behind.
pub fn ensure_unpacked(tarball: &Path, cache_root: &Path) -> Result<PathBuf> {
    unpack_once(tarball, cache_root).map(|u| u.dir)
}

/// What [`unpack_once`] did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The unpacked environment, `<cache_root>/<hash>`.
    pub dir: PathBuf,
    /// The environment's content hash.
    pub hash: String,
    /// Statistics of the unpack this call did, or `None` if the environment
    /// was already there (possibly after waiting for another process that
    /// was unpacking it).
    pub stats: Option<archive::Stats>,
    /// Seconds this call spent unpacking (0 if it found the environment).
    pub seconds: f64,
}

impl Unpacked {
    fn found(dir: PathBuf, hash: String) -> Unpacked {
        Unpacked {
            dir,
            hash,
            stats: None,
            seconds: 0.0,
        }
    }
}

/// [`ensure_unpacked`], also telling whether this call did the unpacking.
pub fn unpack_once(tarball: &Path, cache_root: &Path) -> Result<Unpacked> {
    let (hash, verify) = tarball_hash(tarball, cache_root)?;
    let final_dir = cache_root.join(&hash);
    if final_dir.is_dir() {
        return Ok(Unpacked::found(final_dir, hash));
    }
    if !tarball.is_file() {
        bail!("environment {} does not exist", tarball.display());
    }
    std::fs::create_dir_all(cache_root)
        .with_context(|| format!("cannot create {}", cache_root.display()))?;
    let _lock = FileLock::acquire(&cache_root.join(".locks").join(&hash))?;
    if final_dir.is_dir() {
        return Ok(Unpacked::found(final_dir, hash));
    }
    // Anything left under our prefix was abandoned by a process that died
    // mid-unpack: holding the lock, we are the only one who could be using it.
    let prefix = format!(".tmp-{hash}-");
    if let Ok(rd) = std::fs::read_dir(cache_root) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                remove_tree(&e.path());
            }
        }
    }
    let tmp = cache_root.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&tmp).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            anyhow!("no space left on device in {}", cache_root.display())
        } else {
            anyhow!("cannot create {}: {e}", tmp.display())
        }
    })?;
    let started = std::time::Instant::now();
    let unpacked = archive::unpack(tarball, &tmp, verify.then_some(hash.as_str()));
    let stats = match unpacked {
        Ok(s) => s,
        Err(e) => {
            remove_tree(&tmp);
            return Err(e.context(format!(
                "cannot unpack environment {} into {}",
                tarball.display(),
                cache_root.display()
            )));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &final_dir) {
        remove_tree(&tmp);
        // Someone not using our lock (an older packager) may have won.
        if final_dir.is_dir() {
            return Ok(Unpacked {
                dir: final_dir,
                hash,
                stats: None,
                seconds: 0.0,
            });
        }
        return Err(anyhow!(
            "cannot move the unpacked environment into {}: {e}",
            final_dir.display()
        ));
    }
    // Persist the rename itself; the files' data is left to the kernel, as
    // losing the cache on a power cut only costs another unpack.
    if let Ok(d) = std::fs::File::open(cache_root) {
        let _ = d.sync_all();
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        env = %hash,
        entries = stats.entries,
        bytes = stats.content_bytes,
        ms = (seconds * 1e3) as u64,
        "unpacked environment"
    );
    Ok(Unpacked {
        dir: final_dir,
        hash,
        stats: Some(stats),
        seconds,
    })
}

/// Environment variables that run a command inside the unpacked environment
/// at `env_root` (which must be absolute), given the caller's `PATH`:
///
/// - `PATH`: the environment's `bin/` first;
/// - `DROVER_ENV_ROOT`: the root;
/// - `PYTHONHOME` set to the empty string, which Python treats as unset, so
///   that a `PYTHONHOME` inherited from the worker cannot point the
///   interpreter at another installation;
/// - `PYTHONNOUSERSITE=1`, so `~/.local` packages do not leak in;
/// - `PYTHONDONTWRITEBYTECODE=1`, so tasks do not write into an environment
///   shared by other tasks (it ships compiled bytecode already);
/// - `LD_LIBRARY_PATH=<root>/lib` only if the environment needs it;
/// - the spec's own variables, with `${DROVER_ENV_ROOT}` expanded.
///
/// It reads the environment's `drover-env.json` (if there is none, as for an
/// arbitrary tarball, only the generic variables are returned) and changes
/// nothing.
pub fn activation_env(env_root: &Path, current_path: &str) -> Result<Vec<(String, String)>> {
    if !env_root.is_absolute() {
        bail!(
            "environment root {} must be an absolute path",
            env_root.display()
        );
    }
    let root = env_root
        .to_str()
        .with_context(|| format!("environment root {} is not UTF-8", env_root.display()))?;
    let bin = format!("{root}/bin");
    let path = if current_path.is_empty() {
        bin
    } else {
        format!("{bin}:{current_path}")
    };
    let mut vars = vec![
        ("PATH".to_string(), path),
        ("DROVER_ENV_ROOT".to_string(), root.to_string()),
        ("PYTHONHOME".to_string(), String::new()),
        ("PYTHONNOUSERSITE".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ];
    if env_root.join(META_FILE).exists() {
        let meta = EnvMeta::load(env_root)?;
        if meta.needs_ld_library_path {
            vars.push(("LD_LIBRARY_PATH".to_string(), format!("{root}/lib")));
        }
        for (k, v) in &meta.spec.env {
            let v = v.replace("${DROVER_ENV_ROOT}", root);
            match vars.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v,
                None => vars.push((k.clone(), v)),
            }
        }
    }
    Ok(vars)
}
