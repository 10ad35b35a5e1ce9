//! Task directories, reused from one task to the next.
//!
//! A task directory holds the task's `sandbox` and the files its `stdout`
//! and `stderr` go to. Creating and removing them for every task was, after
//! starting the process, the worker's largest cost for short tasks: each
//! directory and file is an inode to allocate, journal, and later evict and
//! discard. A finished task's directory is therefore emptied (usually
//! nothing to remove: the sandbox held only what the task wrote, and its
//! output files are truncated) and handed to the next task. Once the task's
//! whole tree is dead (the monitor guarantees it before the report), nothing
//! of it can write there any more.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The names inside a task directory.
pub(crate) const SANDBOX: &str = "sandbox";
pub(crate) const STDOUT: &str = "stdout";
pub(crate) const STDERR: &str = "stderr";

pub(crate) struct Slots {
    root: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// At most this many clean directories are kept; more are removed.
    keep: usize,
}

impl Slots {
    pub fn new(root: PathBuf, keep: usize) -> Slots {
        Slots {
            root,
            free: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            keep,
        }
    }

    /// A clean task directory: a reused one, or the path of a new one for
    /// the caller to create.
    pub fn take(&self) -> PathBuf {
        if let Some(dir) = self.lock().pop() {
            return dir;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!("s{n}"))
    }

    /// Blocking: empties a finished task's directory and keeps it for the
    /// next task, or removes it when it cannot be made clean or enough are
    /// kept already.
    pub fn recycle(&self, dir: PathBuf) {
        if self.lock().len() < self.keep && clean(&dir).is_ok() {
            self.lock().push(dir);
            return;
        }
        let _ = fs::remove_dir_all(&dir);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Leaves `dir` as a new slot would be: an empty sandbox (a real directory
/// its owner can write) and empty or absent output files.
fn clean(dir: &Path) -> io::Result<()> {
    let sandbox = dir.join(SANDBOX);
    let meta = fs::symlink_metadata(&sandbox)?;
    if !meta.is_dir() {
        return Err(io::Error::other("the sandbox is no longer a directory"));
    }
    if meta.permissions().mode() & 0o700 != 0o700 {
        fs::set_permissions(&sandbox, fs::Permissions::from_mode(0o755))?;
    }
    for entry in fs::read_dir(&sandbox)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    for name in [STDOUT, STDERR] {
        let path = dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == 0 => {}
            Ok(m) if m.is_file() => {
                fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)?;
            }
            Ok(_) => return Err(io::Error::other("an output file was replaced")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_with_leftovers(slots: &Slots) -> PathBuf {
        let dir = slots.take();
        let sb = dir.join(SANDBOX);
        fs::create_dir_all(sb.join("sub/deeper")).unwrap();
        fs::write(sb.join("sub/deeper/f"), b"x").unwrap();
        fs::write(sb.join("out"), b"result").unwrap();
        std::os::unix::fs::symlink("/etc", sb.join("link")).unwrap();
        fs::write(dir.join(STDOUT), b"lots of output").unwrap();
        fs::write(dir.join(STDERR), b"").unwrap();
        fs::set_permissions(&sb, fs::Permissions::from_mode(0o500)).unwrap();
        dir
    }

    #[test]
    fn a_recycled_slot_is_empty_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 4);
        let dir = slot_with_leftovers(&slots);
        slots.recycle(dir.clone());
        let again = slots.take();
        assert_eq!(again, dir, "the clean slot is handed out again");
        let sb = again.join(SANDBOX);
        assert_eq!(fs::read_dir(&sb).unwrap().count(), 0);
        assert_eq!(
            fs::metadata(&sb).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::metadata(again.join(STDOUT)).unwrap().len(), 0);
        assert_ne!(slots.take(), dir, "a slot is handed out once");
    }

    #[test]
    fn a_slot_that_cannot_be_cleaned_or_is_surplus_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 1);
        let broken = slots.take();
        fs::create_dir_all(&broken).unwrap();
        // The task replaced its sandbox with a symlink: not reused.
        std::os::unix::fs::symlink("/tmp", broken.join(SANDBOX)).unwrap();
        slots.recycle(broken.clone());
        assert!(!broken.exists());
        let a = slot_with_leftovers(&slots);
        let b = slot_with_leftovers(&slots);
        slots.recycle(a.clone());
        slots.recycle(b.clone());
        assert!(a.exists() && !b.exists(), "only `keep` slots are kept");
    }
}
