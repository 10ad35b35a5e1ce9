//! Running one command inside an environment, as `drover pack run` does.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::Unpacked;

/// Unpacks `env` under `unpack_root` unless it already is, then runs
/// `command` inside it and returns its exit status (128 + N when killed by
/// signal N). The unpacked environment is returned through `on_unpacked`
/// before the command starts, so a caller can say what happened.
pub fn run_in_environment(
    env: &Path,
    unpack_root: &Path,
    command: &[String],
    on_unpacked: impl FnOnce(&Unpacked),
) -> Result<i32> {
    let unpacked = crate::unpack_once(env, unpack_root)?;
    on_unpacked(&unpacked);
    let root = std::fs::canonicalize(&unpacked.dir)
        .with_context(|| format!("cannot resolve {}", unpacked.dir.display()))?;
    let path = std::env::var("PATH").unwrap_or_default();
    let vars = crate::activation_env(&root, &path)?;
    let Some((program, rest)) = command.split_first() else {
        bail!("no command given");
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    for (k, v) in &vars {
        if k == "PYTHONHOME" && v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    // Command resolves the program with the child's PATH once it is set, so
    // `python3` finds the environment's interpreter.
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {program} in {}", root.display()))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
