//! Task directories, reused from one task to the next.
//!
//! A task directory holds the task's `sandbox` and the files its `stdout`
//! and `stderr` go to. Creating and removing them for every task was, after
//! starting the process, the worker's largest cost for short tasks: each
//! directory and file is an inode to allocate, journal, and later evict and
//! discard. A finished task's directory is therefore emptied (usually
//! nothing to remove: the sandbox held only what the task wrote, and its
//! output files are truncated) and handed to the next task, with its output
//! files still open, so that no task opens them by path again. Once the
//! task's whole tree is dead (the monitor guarantees it before the report),
//! nothing of it can write there any more.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The names inside a task directory.
pub(crate) const SANDBOX: &str = "sandbox";
pub(crate) const STDOUT: &str = "stdout";
pub(crate) const STDERR: &str = "stderr";

/// A task directory, handed to one task at a time.
pub(crate) struct Slot {
    pub dir: PathBuf,
    /// Its `stdout` and `stderr`, open and empty, once a task has used the
    /// slot (before that, or if its task never got to open them, they are
    /// opened by path). The task writes through duplicates of these and
    /// its report reads through them, so a task that renames or replaces
    /// the files in its directory changes nothing.
    pub outputs: Option<(File, File)>,
    /// Its task's monitor saw the sandbox empty once no process of the
    /// task was left (`drover_monitor::Report::sandbox_empty`): cleaning it
    /// need not read it again.
    pub sandbox_empty: bool,
}

pub(crate) struct Slots {
    root: PathBuf,
    free: Mutex<Vec<Slot>>,
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
    /// the caller to create (with no `outputs`).
    pub fn take(&self) -> Slot {
        if let Some(slot) = self.lock().pop() {
            return slot;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Slot {
            dir: self.root.join(format!("s{n}")),
            outputs: None,
            sandbox_empty: false,
        }
    }

    /// Blocking: empties a finished task's directory and keeps it for the
    /// next task, or removes it when it cannot be made clean or enough are
    /// kept already.
    pub fn recycle(&self, mut slot: Slot) {
        if self.lock().len() < self.keep && matches!(clean(&slot, true), Ok(Cleaned::Yes)) {
            slot.sandbox_empty = false;
            self.lock().push(slot);
            return;
        }
        let _ = fs::remove_dir_all(&slot.dir);
    }

    /// Recycles `slot` if that takes only a look (its task left nothing
    /// in the sandbox), which is quick enough for an async task and spares
    /// a hand-off to the blocking pool per report; else gives it back, for
    /// [`Slots::recycle`] there.
    pub fn recycle_if_quick(&self, mut slot: Slot) -> Option<Slot> {
        if self.lock().len() < self.keep && matches!(clean(&slot, false), Ok(Cleaned::Yes)) {
            slot.sandbox_empty = false;
            self.lock().push(slot);
            return None;
        }
        Some(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The largest output file [`Slots::recycle_if_quick`] truncates itself.
const QUICK_TRUNCATE_BYTES: u64 = 1 << 20;

/// Whether [`clean`] left the slot clean.
enum Cleaned {
    Yes,
    /// The sandbox has entries, and removing them was not allowed.
    NotEmpty,
}

/// Leaves `slot` as a new slot would be: an empty sandbox (a real directory
/// its owner can write) and empty (or absent, when not open) output files.
/// Removes what the task left in the sandbox only if `may_remove`.
fn clean(slot: &Slot, may_remove: bool) -> io::Result<Cleaned> {
    let dir = &slot.dir;
    let sandbox = dir.join(SANDBOX);
    let meta = match fs::symlink_metadata(&sandbox) {
        Ok(meta) => meta,
        // A new slot no task created (a Python call without files runs on
        // the function server): as clean as when it was taken, with no
        // hand-off to the blocking pool to remove nothing.
        Err(e) if e.kind() == io::ErrorKind::NotFound && slot.outputs.is_none() => {
            return match fs::symlink_metadata(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Cleaned::Yes),
                _ => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Err(io::Error::other("the sandbox is no longer a directory"));
    }
    if meta.permissions().mode() & 0o700 != 0o700 {
        fs::set_permissions(&sandbox, fs::Permissions::from_mode(0o755))?;
    }
    // Reading even an empty directory costs more than the rest of the
    // cleaning together (ext4 builds a hash tree of it for every read).
    let entries = if slot.sandbox_empty {
        None
    } else {
        Some(fs::read_dir(&sandbox)?)
    };
    for entry in entries.into_iter().flatten() {
        let entry = entry?;
        if !may_remove {
            return Ok(Cleaned::NotEmpty);
        }
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    // Freeing a large file's blocks can take a while: not for a quick look.
    let too_big = |len: u64| !may_remove && len > QUICK_TRUNCATE_BYTES;
    if let Some((stdout, stderr)) = &slot.outputs {
        for mut file in [stdout, stderr] {
            let len = file.metadata()?.len();
            if too_big(len) {
                return Ok(Cleaned::NotEmpty);
            }
            if len > 0 {
                file.set_len(0)?;
                // The task's writes moved the offset it shares with this
                // descriptor; the next task starts at the beginning.
                file.seek(SeekFrom::Start(0))?;
            }
        }
        return Ok(Cleaned::Yes);
    }
    for name in [STDOUT, STDERR] {
        let path = dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == 0 => {}
            Ok(m) if m.is_file() && too_big(m.len()) => return Ok(Cleaned::NotEmpty),
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
    Ok(Cleaned::Yes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn slot_with_leftovers(slots: &Slots) -> Slot {
        let slot = slots.take();
        let dir = &slot.dir;
        let sb = dir.join(SANDBOX);
        fs::create_dir_all(sb.join("sub/deeper")).unwrap();
        fs::write(sb.join("sub/deeper/f"), b"x").unwrap();
        fs::write(sb.join("out"), b"result").unwrap();
        std::os::unix::fs::symlink("/etc", sb.join("link")).unwrap();
        fs::write(dir.join(STDOUT), b"lots of output").unwrap();
        fs::write(dir.join(STDERR), b"").unwrap();
        fs::set_permissions(&sb, fs::Permissions::from_mode(0o500)).unwrap();
        slot
    }

    #[test]
    fn a_slot_no_task_created_is_reused_without_a_trace() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 4);
        let slot = slots.take();
        let dir = slot.dir.clone();
        assert!(
            slots.recycle_if_quick(slot).is_none(),
            "quick: nothing to look at"
        );
        assert_eq!(slots.take().dir, dir);
        assert!(!dir.exists());
    }

    #[test]
    fn a_recycled_slot_is_empty_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 4);
        let slot = slot_with_leftovers(&slots);
        let dir = slot.dir.clone();
        slots.recycle(slot);
        let again = slots.take();
        assert_eq!(again.dir, dir, "the clean slot is handed out again");
        let sb = again.dir.join(SANDBOX);
        assert_eq!(fs::read_dir(&sb).unwrap().count(), 0);
        assert_eq!(
            fs::metadata(&sb).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::metadata(again.dir.join(STDOUT)).unwrap().len(), 0);
        assert_ne!(slots.take().dir, dir, "a slot is handed out once");
    }

    #[test]
    fn a_slot_keeps_its_output_files_open_and_empty_from_the_start() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 4);
        let mut slot = slot_with_leftovers(&slots);
        let open = |name| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(slot.dir.join(name))
                .unwrap()
        };
        let (mut stdout, stderr) = (open(STDOUT), open(STDERR));
        // A task writes through a duplicate, which shares the offset.
        stdout
            .try_clone()
            .unwrap()
            .write_all(b"a long first task")
            .unwrap();
        // ...and replaces the file at the path: the slot's own is unaffected.
        fs::remove_file(slot.dir.join(STDOUT)).unwrap();
        stdout.flush().unwrap();
        slot.outputs = Some((stdout, stderr));
        let dir = slot.dir.clone();
        slots.recycle(slot);

        let again = slots.take();
        assert_eq!(again.dir, dir);
        let (stdout, _) = again.outputs.expect("the open files come back");
        assert_eq!(stdout.metadata().unwrap().len(), 0);
        stdout.try_clone().unwrap().write_all(b"ab").unwrap();
        let mut back = vec![0u8; 8];
        let n = stdout.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..n], b"ab", "the next task writes from the start");
    }

    #[test]
    fn only_a_slot_that_needs_no_removal_is_recycled_quickly() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 4);
        let fresh = |slots: &Slots| {
            let slot = slots.take();
            fs::create_dir_all(slot.dir.join(SANDBOX)).unwrap();
            slot
        };

        let quiet = fresh(&slots);
        fs::write(quiet.dir.join(STDOUT), b"one line\n").unwrap();
        let quiet_dir = quiet.dir.clone();
        assert!(slots.recycle_if_quick(quiet).is_none());
        assert_eq!(fs::metadata(quiet_dir.join(STDOUT)).unwrap().len(), 0);
        assert_eq!(slots.take().dir, quiet_dir, "recycled");

        let left_files = fresh(&slots);
        fs::write(left_files.dir.join(SANDBOX).join("result"), b"x").unwrap();
        let back = slots
            .recycle_if_quick(left_files)
            .expect("needs removing: not quick");
        assert!(back.dir.join(SANDBOX).join("result").exists(), "untouched");
        slots.recycle(back);

        let loud = fresh(&slots);
        let big = vec![b'x'; QUICK_TRUNCATE_BYTES as usize + 1];
        fs::write(loud.dir.join(STDERR), &big).unwrap();
        let back = slots
            .recycle_if_quick(loud)
            .expect("a large output: not quick");
        assert_eq!(
            fs::metadata(back.dir.join(STDERR)).unwrap().len(),
            big.len() as u64
        );
    }

    #[test]
    fn a_slot_that_cannot_be_cleaned_or_is_surplus_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::new(root.path().to_owned(), 1);
        let broken = slots.take();
        fs::create_dir_all(&broken.dir).unwrap();
        // The task replaced its sandbox with a symlink: not reused.
        std::os::unix::fs::symlink("/tmp", broken.dir.join(SANDBOX)).unwrap();
        let broken_dir = broken.dir.clone();
        slots.recycle(broken);
        assert!(!broken_dir.exists());
        let a = slot_with_leftovers(&slots);
        let b = slot_with_leftovers(&slots);
        let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
        slots.recycle(a);
        slots.recycle(b);
        assert!(
            a_dir.exists() && !b_dir.exists(),
            "only `keep` slots are kept"
        );
    }
}
