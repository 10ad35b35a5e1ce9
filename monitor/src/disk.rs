//! Size of a task's sandbox directory.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Apparent size in bytes of everything under `root` (not following
/// symlinks, hard links counted once) and the number of entries (files,
/// directories, links; `root` itself excluded); `None` when `root` itself
/// cannot be read. Entries that vanish during the walk are skipped: the
/// task is still running.
pub(crate) fn usage(root: &Path) -> Option<(u64, u64)> {
    let mut bytes = 0u64;
    let mut files = 0u64;
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(_) if dir == root => return None,
            // Vanished meanwhile.
            Err(_) => continue,
        };
        for entry in rd.flatten() {
            // The type comes with the directory entry on most file systems;
            // only a regular file needs a stat, for its size and links.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                files += 1;
                stack.push(entry.path());
            } else if !kind.is_file() {
                files += 1;
            } else {
                let Ok(md) = entry.metadata() else { continue };
                files += 1;
                if md.nlink() > 1 && !seen_links.insert((md.dev(), md.ino())) {
                    continue;
                }
                bytes += md.len();
            }
        }
    }
    Some((bytes, files))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_files_and_bytes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("sub/a2")).unwrap();
        let (bytes, files) = super::usage(d.path()).unwrap();
        assert_eq!(bytes, 1024);
        assert_eq!(files, 4);
        assert_eq!(super::usage(&d.path().join("missing")), None);
    }
}
