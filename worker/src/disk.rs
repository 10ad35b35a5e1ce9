//! Free disk: what this machine really has under a directory, and whether
//! a file of a given size may be stored there.

use std::path::Path;

/// Left free whatever the declared disk says: a disk filled to its last
/// block fails every later task (even `echo`), not just the one that filled it.
pub(crate) const RESERVE_BYTES: u64 = 16 << 20;

/// Bytes free to an unprivileged user on the file system holding `path`
/// (or its nearest existing ancestor).
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let probe = std::iter::successors(Some(path), |p| p.parent()).find(|p| p.exists())?;
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct from a valid C string path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether a file of `size` bytes may be stored in `dir` on a worker that
/// declared `declared_mb` of disk: not over the declared disk, and not
/// into the last [`RESERVE_BYTES`] really free. Checked at each file, so a
/// worker whose disk filled takes files again once space is freed.
pub(crate) fn room_for(dir: &Path, size: u64, declared_mb: u64) -> Result<(), String> {
    let mb = |b: u64| b.div_ceil(1024 * 1024);
    if size > declared_mb.saturating_mul(1024 * 1024) {
        return Err(format!(
            "{} MB is more than this worker's declared disk of {declared_mb} MB",
            mb(size)
        ));
    }
    if let Some(free) = free_bytes(dir) {
        if size.saturating_add(RESERVE_BYTES) > free {
            return Err(format!(
                "{} MB does not fit in the {} MB free on this worker's disk",
                mb(size),
                mb(free.saturating_sub(RESERVE_BYTES))
            ));
        }
    }
    Ok(())
}

/// What a worker tells its master it has free, MB: the really free disk
/// under `dir` less the reserve, at most its declared disk.
pub(crate) fn free_mb(dir: &Path, declared_mb: u64) -> u64 {
    let free = free_bytes(dir).map_or(u64::MAX, |b| b.saturating_sub(RESERVE_BYTES));
    (free / (1024 * 1024)).min(declared_mb)
}

/// Reports of free disk, sent when the figure moved by much since the last.
#[derive(Default)]
pub(crate) struct Pressure {
    last: Option<u64>,
}

impl Pressure {
    /// The free disk to report now, if it changed by an eighth or more
    /// since the last report (or there was none).
    pub(crate) fn report(&mut self, dir: &Path, declared_mb: u64) -> Option<u64> {
        let now = free_mb(dir, declared_mb);
        let moved = self.last.is_none_or(|last| now.abs_diff(last) > last / 8);
        moved.then(|| {
            self.last = Some(now);
            now
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_the_declared_or_the_real_free_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(room_for(dir.path(), 1 << 20, 25).is_ok());
        let over = room_for(dir.path(), 40 << 20, 25).unwrap_err();
        assert!(over.contains("declared disk of 25 MB"), "{over}");
        let free = free_bytes(dir.path()).expect("statvfs works here");
        let huge = room_for(dir.path(), free, u64::MAX / (2 << 20)).unwrap_err();
        assert!(huge.contains("free on this worker's disk"), "{huge}");
    }

    #[test]
    fn pressure_is_reported_first_then_only_when_it_moves() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pressure::default();
        assert_eq!(
            p.report(dir.path(), 25),
            Some(25),
            "at most the declared disk"
        );
        assert_eq!(p.report(dir.path(), 25), None);
        assert_eq!(p.report(dir.path(), 10), Some(10));
    }
}
