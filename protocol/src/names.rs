//! Rules for names inside a task's sandbox, and the cap on captured output.

/// Stdout and stderr are each capped at this many bytes in a task report:
/// the first and last halves are kept, with a marker line between them.
pub const OUTPUT_CAP_BYTES: usize = 64 * 1024;

/// Checks that a name given for a file inside a task's sandbox stays inside
/// it: relative, not empty, and without `..`. Returns a message for a person.
///
/// ```
/// use drover_protocol::check_sandbox_name;
/// assert!(check_sandbox_name("data/in.txt").is_ok());
/// assert!(check_sandbox_name("../../x").is_err());
/// assert!(check_sandbox_name("/etc/x").is_err());
/// ```
pub fn check_sandbox_name(name: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.contains('\0') {
        return Err(format!("file name {name:?} contains a NUL byte"));
    }
    let path = Path::new(name);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "file name {name:?} escapes the task sandbox (contains ..)"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "file name {name:?} escapes the task sandbox (absolute path)"
                ))
            }
        }
    }
    if path.components().all(|c| matches!(c, Component::CurDir)) {
        return Err(format!("file name {name:?} names the sandbox itself"));
    }
    Ok(())
}

/// Keeps at most [`OUTPUT_CAP_BYTES`] of a captured stream: the head and the tail.
pub fn cap_output(bytes: &[u8]) -> String {
    if bytes.len() <= OUTPUT_CAP_BYTES {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let half = OUTPUT_CAP_BYTES / 2;
    let omitted = bytes.len() - 2 * half;
    format!(
        "{}\n[drover: {omitted} bytes omitted]\n{}",
        String::from_utf8_lossy(&bytes[..half]),
        String::from_utf8_lossy(&bytes[bytes.len() - half..])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names() {
        for bad in ["", "..", "../x", "a/../../x", "/etc/passwd", ".", "./"] {
            assert!(
                check_sandbox_name(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        for good in ["x", "a/b/c.txt", "./x", ".hidden"] {
            assert!(
                check_sandbox_name(good).is_ok(),
                "{good:?} should be accepted"
            );
        }
    }

    #[test]
    fn output_is_capped_head_and_tail() {
        let big = vec![b'a'; OUTPUT_CAP_BYTES * 3];
        let capped = cap_output(&big);
        assert!(capped.len() < OUTPUT_CAP_BYTES + 100);
        assert!(capped.contains("bytes omitted"));
        assert_eq!(cap_output(b"short"), "short");
    }
}
