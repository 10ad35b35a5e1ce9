//! Packaged environments on a worker: each tarball is unpacked once (per
//! worker directory, shared by every worker process that uses it) and reused
//! by every task that names it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Why a task's environment could not be made ready.
#[derive(Debug)]
pub enum EnvError {
    /// The tarball is not in the worker's cache (the master should send it again).
    Missing(String),
    /// It is there but cannot be unpacked or activated (corrupt, disk full...).
    Setup(String),
}

/// The environments of one worker process.
pub struct Environments {
    /// Where environments are unpacked: `<workdir>/envs/<hash>/`.
    root: PathBuf,
    /// The worker's file cache, where the tarballs arrive.
    cache: PathBuf,
    /// One cell per tarball id, so concurrent tasks share one unpack. A
    /// failed unpack leaves its cell empty: the next task tries again,
    /// because a full disk may have been cleared meanwhile.
    unpacked: Mutex<HashMap<String, Arc<OnceCell<PathBuf>>>>,
}

impl Environments {
    /// Environments unpacked under `root`, from tarballs in `cache`.
    pub fn new(root: PathBuf, cache: PathBuf) -> Environments {
        Environments {
            root,
            cache,
            unpacked: Mutex::new(HashMap::new()),
        }
    }

    /// The unpacked root of the environment whose tarball is the cached file
    /// `file_id`, unpacking it first if no task did yet.
    pub async fn ensure(&self, file_id: &str) -> Result<PathBuf, EnvError> {
        if file_id.is_empty() || file_id.contains('/') || file_id.starts_with('.') {
            return Err(EnvError::Setup(format!(
                "invalid environment file id {file_id:?}"
            )));
        }
        let cell = {
            let mut map = self.unpacked.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(file_id.to_string()).or_default())
        };
        let dir = cell
            .get_or_try_init(|| async {
                let tarball = self.cache.join(file_id);
                if !tarball.is_file() {
                    return Err(EnvError::Missing(format!(
                        "environment {file_id} is not in the worker's cache"
                    )));
                }
                let source = content_named(&tarball, file_id, &self.root);
                let root = self.root.clone();
                tokio::task::spawn_blocking(move || {
                    drover_packager::ensure_unpacked(&source, &root)
                })
                .await
                .map_err(|e| EnvError::Setup(format!("unpacking environment {file_id}: {e}")))?
                .map_err(|e| {
                    if is_the_workers(&e) {
                        EnvError::Setup(format!(
                            "environment {file_id} cannot be used on this worker: {e:#}"
                        ))
                    } else {
                        EnvError::Setup(format!(
                            "{}: environment {file_id}: {e:#}",
                            drover_protocol::messages::CORRUPT_ENVIRONMENT
                        ))
                    }
                })
            })
            .await?;
        Ok(dir.clone())
    }
}

/// Whether an unpack failed because of this worker (its disk is full or
/// read-only, a permission, an I/O error) rather than the archive: only
/// then may another worker do better.
fn is_the_workers(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.raw_os_error(),
                Some(
                    libc::ENOSPC
                        | libc::EDQUOT
                        | libc::EACCES
                        | libc::EROFS
                        | libc::EIO
                        | libc::EMFILE
                )
            )
        })
}

/// A name for the tarball that lets the packager find an unpacked copy
/// without reading it. A `b3-<hex>` cache file is named by the same BLAKE3
/// hash of its bytes that the packager names environments by (and was
/// checked against it when received), so a hard link named `<hex>.tar.gz`
/// is trusted for the lookup and verified while unpacking; anything else is
/// hashed by the packager (once, then remembered).
fn content_named(tarball: &Path, file_id: &str, root: &Path) -> PathBuf {
    let Some(hex) = file_id.strip_prefix("b3-") else {
        return tarball.to_path_buf();
    };
    if !drover_packager::cache::is_hash(hex) {
        return tarball.to_path_buf();
    }
    let dir = root.join(".tarballs");
    let link = dir.join(format!("{hex}.tar.gz"));
    if link.is_file() {
        return link;
    }
    let linked = std::fs::create_dir_all(&dir).and_then(|_| std::fs::hard_link(tarball, &link));
    match linked {
        Ok(()) => link,
        // Another worker process linked it first.
        Err(_) if link.is_file() => link,
        Err(e) => {
            tracing::debug!(
                "cannot link {} as {}: {e}",
                tarball.display(),
                link.display()
            );
            tarball.to_path_buf()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A tarball in the packager's format, stored in `cache` under its
    /// content id as the worker receives it; returns the id.
    fn cached_env(dir: &Path, cache: &Path) -> String {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        let prog = tree.join("bin").join("hello");
        std::fs::write(&prog, "#!/bin/sh\necho hello\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = dir.join("env.tar.gz");
        let (hash, _) = drover_packager::archive::write_archive(&tree, &out, 1, 1).unwrap();
        let id = format!("b3-{hash}");
        std::fs::create_dir_all(cache).unwrap();
        std::fs::rename(&out, cache.join(&id)).unwrap();
        id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_tasks_share_one_unpack_named_by_the_content_hash() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let id = cached_env(dir.path(), &cache);
        let envs = Arc::new(Environments::new(dir.path().join("envs"), cache));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let envs = Arc::clone(&envs);
                let id = id.clone();
                tokio::spawn(async move { envs.ensure(&id).await.map_err(|e| format!("{e:?}")) })
            })
            .collect();
        let mut roots = Vec::new();
        for h in handles {
            roots.push(h.await.unwrap().unwrap());
        }
        assert!(roots.iter().all(|r| r == &roots[0]));
        assert_eq!(roots[0], dir.path().join("envs").join(&id[3..]));
        assert!(roots[0].join("bin/hello").is_file());
    }

    #[tokio::test]
    async fn missing_invalid_and_corrupt_tarballs_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let envs = Environments::new(dir.path().join("envs"), cache.clone());
        assert!(matches!(
            envs.ensure("b3-not-here").await,
            Err(EnvError::Missing(_))
        ));
        for bad in ["", "../x", ".hidden"] {
            assert!(matches!(envs.ensure(bad).await, Err(EnvError::Setup(_))));
        }
        std::fs::write(cache.join("m-corrupt"), b"not gzip").unwrap();
        match envs.ensure("m-corrupt").await {
            Err(EnvError::Setup(msg)) => {
                assert!(
                    msg.contains("m-corrupt") && msg.contains("cannot unpack"),
                    "{msg}"
                )
            }
            other => panic!("expected a setup error, got {other:?}"),
        }
    }
}
