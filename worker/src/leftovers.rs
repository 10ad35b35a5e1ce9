//! What dead workers left in a shared workdir: their `w<pid>` directories
//! (task sandboxes, per-task inputs) and their part files in the shared
//! cache. A worker SIGKILLed mid-task cannot clean up after itself, so the
//! next worker on the same workdir does it at start.
//!
//! A live worker holds an exclusive `flock` on `w<pid>/lock` for its whole
//! life: the kernel drops it however the process ends, so a lock that can
//! be taken proves the owner dead even if its pid was reused since. A
//! directory without a lock file (a worker still creating it, or one from
//! an older drover) is judged by its pid alone.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

use crate::transfer::PART_PREFIX;

/// The lock file inside a worker's own directory.
const LOCK: &str = "lock";

/// This worker's claim on its own directory, held until the process ends.
pub(crate) struct OwnLock {
    _file: File,
}

impl OwnLock {
    /// Creates `own/lock` and takes an exclusive lock on it.
    pub(crate) fn take(own: &Path) -> io::Result<OwnLock> {
        let file = File::create(own.join(LOCK))?;
        if !try_lock(&file)? {
            return Err(io::Error::other(format!(
                "{} is locked by another live worker",
                own.display()
            )));
        }
        Ok(OwnLock { _file: file })
    }
}

/// Takes an exclusive lock on `file` without waiting; false if another
/// process holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether a process with this pid exists (EPERM: it does, not ours).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks existence.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the worker that made `workdir/w<pid>` is gone.
fn worker_dead(workdir: &Path, pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return false;
    }
    match File::open(workdir.join(format!("w{pid}")).join(LOCK)) {
        // Taking the lock proves no live process holds it; it is released
        // when `file` closes.
        Ok(file) => try_lock(&file).unwrap_or(false),
        Err(_) => !pid_alive(pid),
    }
}

/// What [`remove_stale`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    pub(crate) dirs: usize,
    pub(crate) parts: usize,
}

/// Removes the `w<pid>` directories of dead workers under `workdir` and the
/// part files they left in `cache`. Errors are skipped: a leftover that
/// cannot be removed now is tried again by the next worker.
pub(crate) fn remove_stale(workdir: &Path, cache: &Path) -> Removed {
    let mut removed = Removed::default();
    for (pid, path) in entries_with_pid(workdir, dir_pid) {
        if worker_dead(workdir, pid) {
            match fs::remove_dir_all(&path) {
                Ok(()) => removed.dirs += 1,
                Err(e) => debug!("cannot remove {}: {e}", path.display()),
            }
        }
    }
    for (pid, path) in entries_with_pid(cache, part_pid) {
        if worker_dead(workdir, pid) && fs::remove_file(&path).is_ok() {
            removed.parts += 1;
        }
    }
    if removed != Removed::default() {
        info!(
            directories = removed.dirs,
            part_files = removed.parts,
            "removed what dead workers left in {}",
            workdir.display()
        );
    }
    removed
}

/// `w<pid>`: a worker's own directory.
fn dir_pid(name: &str) -> Option<&str> {
    name.strip_prefix('w')
}

/// `.part-<pid>-<id>`: the pid of the worker that was receiving it.
fn part_pid(name: &str) -> Option<&str> {
    name.strip_prefix(PART_PREFIX)?
        .split_once('-')
        .map(|(p, _)| p)
}

/// The entries of `dir` whose name `pid_of` maps to a pid.
fn entries_with_pid(dir: &Path, pid_of: fn(&str) -> Option<&str>) -> Vec<(i32, PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let pid = pid_of(name.to_str()?)?.parse().ok()?;
            Some((pid, e.path()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has: past the kernel's maximum.
    const DEAD: i32 = 1 << 30;

    #[test]
    fn only_dead_workers_leftovers_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let (workdir, cache) = (root.path(), root.path().join("cache"));
        fs::create_dir_all(&cache).unwrap();
        let dead_dir = workdir.join(format!("w{DEAD}"));
        fs::create_dir_all(dead_dir.join("tasks/s0/sandbox")).unwrap();
        // A dead worker's lock file with no holder: dead however its pid reads.
        let unlocked = workdir.join("w1");
        fs::create_dir_all(&unlocked).unwrap();
        File::create(unlocked.join(LOCK)).unwrap();
        // A live worker (this process) holds its lock.
        let own = workdir.join(format!("w{}", std::process::id()));
        fs::create_dir_all(&own).unwrap();
        let _lock = OwnLock::take(&own).unwrap();
        let other = workdir.join("wnot-a-pid");
        fs::create_dir_all(&other).unwrap();
        let dead_part = cache.join(format!("{PART_PREFIX}{DEAD}-b3-abc"));
        let own_part = cache.join(format!("{PART_PREFIX}{}-b3-abc", std::process::id()));
        fs::write(&dead_part, b"half").unwrap();
        fs::write(&own_part, b"half").unwrap();
        fs::write(cache.join("b3-def"), b"whole").unwrap();

        let removed = remove_stale(workdir, &cache);
        assert_eq!(removed, Removed { dirs: 2, parts: 1 });
        assert!(!dead_dir.exists() && !unlocked.exists() && !dead_part.exists());
        assert!(own.exists() && own_part.exists() && other.exists());
        assert!(cache.join("b3-def").exists(), "cached files stay");
    }

    #[test]
    fn a_held_lock_is_not_taken_twice() {
        let root = tempfile::tempdir().unwrap();
        let _held = OwnLock::take(root.path()).unwrap();
        let again = File::open(root.path().join(LOCK)).unwrap();
        assert!(!try_lock(&again).unwrap(), "flock is per open file");
    }
}
