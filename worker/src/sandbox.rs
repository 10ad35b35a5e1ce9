//! A task's sandbox: inputs placed in it, outputs checked out of it. All of
//! it is blocking file work (links, copies, renames, metadata), which the
//! task runs on the blocking pool, off the runtime's threads.

use std::path::{Path, PathBuf};

use drover_protocol::{check_sandbox_name, InputRef, OutputHeader};

/// Why a sandbox could not be made ready.
pub(crate) enum InputError {
    /// An input the task needs is not on the worker.
    Missing(String),
    /// The sandbox or an input could not be set up.
    Setup(String),
}

/// Makes `sandbox` ready: creates it (unless it `exists` already, as a
/// reused slot's does) and places the task's inputs in it, cached ones from
/// `cache`, per-task ones from `transfer`.
pub(crate) fn prepare(
    sandbox: &Path,
    exists: bool,
    inputs: &[InputRef],
    cache: &Path,
    transfer: &Path,
) -> Result<(), InputError> {
    if !exists {
        std::fs::create_dir_all(sandbox).map_err(|e| {
            InputError::Setup(format!("cannot create sandbox {}: {e}", sandbox.display()))
        })?;
    }
    place_inputs(inputs, sandbox, cache, transfer)
}

fn place_inputs(
    inputs: &[InputRef],
    sandbox: &Path,
    cache: &Path,
    transfer: &Path,
) -> Result<(), InputError> {
    for input in inputs {
        check_sandbox_name(&input.name).map_err(InputError::Setup)?;
        let dest = sandbox.join(&input.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| InputError::Setup(format!("creating {}: {e}", parent.display())))?;
        }
        if input.cached {
            let src = cache.join(&input.file_id);
            if !src.exists() {
                return Err(InputError::Missing(format!(
                    "input {} ({}) is not in the worker's cache",
                    input.name, input.file_id
                )));
            }
            // Linked, not copied: a cached input costs no disk or time per task.
            if std::fs::hard_link(&src, &dest).is_err() {
                std::fs::copy(&src, &dest)
                    .map_err(|e| InputError::Setup(format!("placing input {}: {e}", input.name)))?;
            }
        } else {
            let src = transfer.join(&input.file_id);
            std::fs::rename(&src, &dest).map_err(|e| {
                InputError::Missing(format!(
                    "input {} ({}) was not received: {e}",
                    input.name, input.file_id
                ))
            })?;
            let mut perms = std::fs::metadata(&dest)
                .map_err(|e| InputError::Setup(e.to_string()))?
                .permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
            let _ = std::fs::set_permissions(&dest, perms);
        }
    }
    Ok(())
}

/// A task's declared outputs after it ended.
pub(crate) struct Outputs {
    /// Found, with the header to send and the file to send it from.
    pub(crate) found: Vec<(OutputHeader, PathBuf)>,
    /// Not sent: the name, and why.
    pub(crate) missing: Vec<(String, String)>,
}

/// Looks for each declared output in `sandbox`.
pub(crate) fn collect_outputs(sandbox: &Path, names: &[String]) -> Outputs {
    let mut found = Vec::with_capacity(names.len());
    let mut missing = Vec::new();
    let canonical = sandbox
        .canonicalize()
        .unwrap_or_else(|_| sandbox.to_path_buf());
    for name in names {
        match check_output(&canonical, name) {
            Ok((path, size)) => found.push((
                OutputHeader {
                    name: name.clone(),
                    size,
                },
                path,
            )),
            Err(msg) => missing.push((name.clone(), msg)),
        }
    }
    Outputs { found, missing }
}

/// An output must be a regular file whose real path stays inside the sandbox:
/// a link to `/etc/passwd` is refused, not sent.
fn check_output(sandbox: &Path, name: &str) -> Result<(PathBuf, u64), String> {
    check_sandbox_name(name)?;
    let path = sandbox.join(name);
    let real = path
        .canonicalize()
        .map_err(|_| format!("output {name} was not created"))?;
    if !real.starts_with(sandbox) {
        return Err(format!(
            "output {name} escapes the task sandbox (it resolves to {})",
            real.display()
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("output {name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("output {name} is not a regular file"));
    }
    Ok((real, meta.len()))
}
