//! In-place rewriting of ELF `RPATH`/`RUNPATH` entries.
//!
//! A pyenv- or source-built Python records the absolute directory of
//! `libpython` in its run path. Copied elsewhere, the binary would keep loading
//! the host's library (or fail where there is none). Rewriting the entry to an
//! `$ORIGIN`-relative path makes the copy find its own `libpython` wherever it
//! is unpacked, with no `LD_LIBRARY_PATH`. The new string is never longer than
//! the old one here, so it fits in the string table in place and no section
//! has to move; that is what keeps this small enough not to need patchelf.

use std::path::Path;

use anyhow::{bail, Context, Result};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Outcome of [`rewrite_runpath`].
#[derive(Debug, PartialEq, Eq)]
pub enum Patched {
    /// Not an ELF file, or one without a run path: nothing to do.
    NotApplicable,
    /// The run path did not mention the replaced directory.
    Unchanged,
    /// The run path was rewritten.
    Rewritten {
        /// The run path before.
        old: String,
        /// The run path after.
        new: String,
    },
}

/// Replaces every run-path element of `file` that equals `from` (or lies
/// under it) with `to` (typically `$ORIGIN/../lib`). Only little-endian
/// ELF64 files are handled; others are reported as not applicable. Errors if
/// the new run path would not fit in place.
pub fn rewrite_runpath(file: &Path, from: &Path, to: &str) -> Result<Patched> {
    let mut data =
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Ok(Patched::NotApplicable);
    }
    let bad = || anyhow::anyhow!("{} is not a well-formed ELF file", file.display());
    let phoff = u64_at(&data, 0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(&data, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(&data, 0x38).ok_or_else(bad)? as usize;

    let mut loads = Vec::new();
    let mut dynamic = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(&data, ph).ok_or_else(bad)?;
        let p_offset = u64_at(&data, ph + 8).ok_or_else(bad)?;
        let p_vaddr = u64_at(&data, ph + 16).ok_or_else(bad)?;
        let p_filesz = u64_at(&data, ph + 32).ok_or_else(bad)?;
        match p_type {
            PT_LOAD => loads.push((p_offset, p_vaddr, p_filesz)),
            PT_DYNAMIC => dynamic = Some((p_offset, p_filesz)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Ok(Patched::NotApplicable);
    };

    let mut strtab_vaddr = None;
    let mut paths = Vec::new();
    let mut off = dyn_off as usize;
    let end = (dyn_off + dyn_size) as usize;
    while off + 16 <= end {
        let tag = u64_at(&data, off).ok_or_else(bad)?;
        let val = u64_at(&data, off + 8).ok_or_else(bad)?;
        match tag {
            DT_NULL => break,
            DT_STRTAB => strtab_vaddr = Some(val),
            DT_RPATH | DT_RUNPATH => paths.push(val),
            _ => {}
        }
        off += 16;
    }
    if paths.is_empty() {
        return Ok(Patched::NotApplicable);
    }
    let strtab_vaddr = strtab_vaddr.ok_or_else(bad)?;
    let strtab_off = loads
        .iter()
        .find(|(_, vaddr, size)| strtab_vaddr >= *vaddr && strtab_vaddr < vaddr + size)
        .map(|(offset, vaddr, _)| strtab_vaddr - vaddr + offset)
        .ok_or_else(bad)? as usize;

    let from = from.to_string_lossy();
    let from = from.trim_end_matches('/');
    let mut result = Patched::Unchanged;
    for str_off in paths {
        let start = strtab_off + str_off as usize;
        let len = data
            .get(start..)
            .and_then(|s| s.iter().position(|&b| b == 0))
            .ok_or_else(bad)?;
        let old = String::from_utf8_lossy(&data[start..start + len]).to_string();
        let mut changed = false;
        let new: Vec<String> = old
            .split(':')
            .map(|elem| {
                let e = elem.trim_end_matches('/');
                if e == from {
                    changed = true;
                    to.to_string()
                } else if let Some(rest) = e.strip_prefix(from).filter(|r| r.starts_with('/')) {
                    changed = true;
                    format!("{to}{rest}")
                } else {
                    elem.to_string()
                }
            })
            .collect();
        if !changed {
            continue;
        }
        let new = new.join(":");
        if new.len() > len {
            bail!(
                "cannot rewrite the run path of {} in place ({old:?} -> {new:?} is longer)",
                file.display()
            );
        }
        data[start..start + len].fill(0);
        data[start..start + new.len()].copy_from_slice(new.as_bytes());
        result = Patched::Rewritten { old, new };
    }
    if result != Patched::Unchanged {
        std::fs::write(file, &data).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(result)
}
