//! Where drover keeps state by default: the XDG state directory, so that
//! running a catalog or a factory leaves no files in the current directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// `$XDG_STATE_HOME/drover`, or `~/.local/state/drover`; `None` when neither
/// variable is set to an absolute path.
pub fn state_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| {
        let p = PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    std::env::var_os("XDG_STATE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".local").join("state"))
        })
        .map(|d| d.join("drover"))
}

/// `name` inside [`state_dir`] (created if missing), falling back to the
/// current directory when there is no home to put it in.
pub fn default_state_path(name: &str) -> anyhow::Result<PathBuf> {
    match state_dir() {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
            Ok(dir.join(name))
        }
        None => Ok(PathBuf::from(name)),
    }
}

/// Fails unless the directory that will hold `file` exists, so that a typo
/// shows at start rather than when the first save fails.
pub fn check_parent_dir(file: &Path, what: &str) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        bail!(
            "{what} {}: directory {} does not exist",
            file.display(),
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_parent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_parent_dir(&dir.path().join("f.json"), "state file").is_ok());
        assert!(check_parent_dir(Path::new("f.json"), "state file").is_ok());
        let e = check_parent_dir(&dir.path().join("no/f.json"), "state file").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
