//! Files that hold secrets: passwords, keys.

use std::path::Path;

/// Logs a warning when `path` can be read or written by anyone but its
/// owner: a secret others can read is no longer one.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} {} has mode {mode:o}: others can read it; `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
}
