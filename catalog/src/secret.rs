//! Shared secrets: reading a password or key file, and signing catalog
//! reports with HMAC-SHA256 under a catalog key.
//!
//! A signed report on the wire is one line `drover-hmac-sha256 HEX\n`
//! followed by the report's JSON; the HMAC covers the JSON bytes exactly as
//! sent. A catalog without a key takes the JSON and ignores the signature (it
//! cannot check it); a catalog with a key drops anything not signed by it.

use std::io;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First word of a signed report.
pub const SIGNATURE_PREFIX: &[u8] = b"drover-hmac-sha256 ";

type HmacSha256 = Hmac<Sha256>;

/// Reads a password or key file (`what` names it in messages), dropping
/// trailing newlines. An empty file is an error; a file that others can read
/// or write (any of mode 0o077) is used with a warning, since anyone who can
/// read it can impersonate its owner.
pub fn read_secret_file(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{what} file {}: {e}", path.display())))?;
    warn_if_shared(path, what);
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} file {} is empty", path.display()),
        ));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn warn_if_shared(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} file {} can be read or written by others (mode {:o}); \
                 run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path, _what: &str) {}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// `json` with a signature line under `key` in front.
pub fn sign(key: &[u8], json: &[u8]) -> Vec<u8> {
    let mut m = mac(key);
    m.update(json);
    let tag = hex::encode(m.finalize().into_bytes());
    let mut out = Vec::with_capacity(SIGNATURE_PREFIX.len() + tag.len() + 1 + json.len());
    out.extend_from_slice(SIGNATURE_PREFIX);
    out.extend_from_slice(tag.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(json);
    out
}

/// A received report split into its signature (hex, if there is a
/// signature line) and its JSON.
pub fn split(bytes: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let Some(rest) = bytes.strip_prefix(SIGNATURE_PREFIX) else {
        return (None, bytes);
    };
    match rest.iter().position(|b| *b == b'\n') {
        Some(nl) => (Some(&rest[..nl]), &rest[nl + 1..]),
        None => (Some(rest), &[]),
    }
}

/// True if `tag_hex` is the HMAC of `json` under `key` (compared in
/// constant time).
pub fn verify(key: &[u8], tag_hex: &[u8], json: &[u8]) -> bool {
    let Ok(tag) = hex::decode(tag_hex) else {
        return false;
    };
    let mut m = mac(key);
    m.update(json);
    m.verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_split_verify() {
        let signed = sign(b"k", b"{\"project\":\"p\"}");
        let (tag, json) = split(&signed);
        let tag = tag.expect("a signature line");
        assert_eq!(json, b"{\"project\":\"p\"}");
        assert!(verify(b"k", tag, json));
        assert!(!verify(b"other", tag, json));
        assert!(!verify(b"k", tag, b"{\"project\":\"q\"}"));
        assert!(!verify(b"k", b"zz", json));
        assert_eq!(split(b"{}"), (None, &b"{}"[..]));
    }

    #[test]
    fn secret_file_trims_and_rejects_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, b"s3cret\n").unwrap();
        assert_eq!(read_secret_file(&p, "key").unwrap(), b"s3cret");
        std::fs::write(&p, b"\n").unwrap();
        let e = read_secret_file(&p, "catalog key").unwrap_err();
        assert!(e.to_string().contains("catalog key file"), "{e}");
        assert!(read_secret_file(&dir.path().join("none"), "key").is_err());
    }
}
