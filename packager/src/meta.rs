//! `drover-env.json`: the description every environment carries at its root.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::spec::Spec;

/// File name of the metadata at the root of an environment.
pub const META_FILE: &str = "drover-env.json";

/// Metadata stored in each environment. It holds nothing time- or
/// host-specific, so it does not spoil reproducibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvMeta {
    /// [`crate::spec::FORMAT_VERSION`] of the packager that built it.
    pub format: u32,
    /// The normalized spec it was built from, with each file's `src` set to
    /// its place in the environment ([`Spec::portable`]).
    pub spec: Spec,
    /// The spec's cache key.
    pub spec_key: String,
    /// Full interpreter version, e.g. `3.11.7`.
    pub python_version: String,
    /// `sysconfig.get_platform()` of the build host, e.g. `linux-x86_64`.
    pub platform: String,
    /// The interpreter, relative to the root (`bin/python3.11`).
    pub python: String,
    /// The site-packages directory, relative to the root.
    pub site_packages: String,
    /// Whether `lib/` must be on `LD_LIBRARY_PATH` (only when the
    /// interpreter's run path could not be made relative).
    pub needs_ld_library_path: bool,
}

impl EnvMeta {
    /// Reads the metadata of the environment at `root`.
    pub fn load(root: &Path) -> Result<EnvMeta> {
        let path = root.join(META_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}
