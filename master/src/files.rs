//! Naming input files by their content.
//!
//! A cached file is named `b3-<BLAKE3 of its content>` when it is at most
//! [`CONTENT_HASH_LIMIT`] bytes, so the same bytes reuse a worker's cache
//! across tasks, masters and runs, and the worker can check what it received.
//! A larger file is named `m-<BLAKE3 of its canonical path, size, mtime and
//! inode>` so that it is not read twice just to be named; changing it changes
//! its name. Names are memoized per (path, size, mtime, inode), so submitting
//! 10,000 tasks that share one input hashes it once.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Files larger than this are named by metadata rather than content.
pub const CONTENT_HASH_LIMIT: u64 = 256 * 1024 * 1024;

#[derive(Hash, PartialEq, Eq)]
struct Key {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

/// Memoized content names.
#[derive(Default)]
pub(crate) struct FileNamer {
    memo: Mutex<HashMap<Key, Arc<str>>>,
}

impl FileNamer {
    /// The cache name of `path`, shared with every other task naming the
    /// same file; errors name the path.
    pub(crate) fn name(&self, path: &Path) -> io::Result<Arc<str>> {
        let meta = std::fs::metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("input file {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("input {} is not a regular file", path.display()),
            ));
        }
        let key = Key {
            path: path.to_path_buf(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        };
        if let Some(name) = self
            .memo
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .get(&key)
        {
            return Ok(name.clone());
        }
        let name: Arc<str> = if meta.len() <= CONTENT_HASH_LIMIT {
            let mut hasher = blake3::Hasher::new();
            hasher.update_mmap(path).map_err(|e| {
                io::Error::new(e.kind(), format!("reading input {}: {e}", path.display()))
            })?;
            Arc::from(format!("b3-{}", hasher.finalize().to_hex()))
        } else {
            let canonical = path.canonicalize()?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(canonical.as_os_str().as_encoded_bytes());
            hasher.update(&key.size.to_le_bytes());
            hasher.update(&key.mtime_ns.to_le_bytes());
            hasher.update(&key.inode.to_le_bytes());
            Arc::from(format!("m-{}", hasher.finalize().to_hex()))
        };
        self.memo
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .insert(key, name.clone());
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_name_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"hello").unwrap();
        std::fs::write(&b, b"hello").unwrap();
        let namer = FileNamer::default();
        let name = namer.name(&a).unwrap();
        assert!(name.starts_with("b3-"));
        assert_eq!(name, namer.name(&b).unwrap());
        std::fs::write(&a, b"hello, world").unwrap();
        assert_ne!(name, namer.name(&a).unwrap());
        assert!(namer.name(&dir.path().join("missing")).is_err());
    }
}
