//! The password handshake.

use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A fresh random nonce, hex-encoded.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The proof that `role` knows `password`, bound to both nonces.
pub fn auth_proof(password: &[u8], role: &str, first: &str, second: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC takes any key length");
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a proof in constant time.
pub fn verify_proof(password: &[u8], role: &str, first: &str, second: &str, proof: &str) -> bool {
    let Ok(given) = hex::decode(proof) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC takes any key length");
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// Role strings bound into the proofs, so a worker's proof can't be reflected back as the master's.
pub const ROLE_WORKER: &str = "drover-worker";
pub const ROLE_MASTER: &str = "drover-master";

/// Reads a password file: its content with one trailing newline removed.
pub fn read_password_file(path: &std::path::Path) -> io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("password file {}: {e}", path.display())))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("password file {} is empty", path.display()),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_role_password_and_nonces() {
        let (m, w) = (new_nonce(), new_nonce());
        let proof = auth_proof(b"secret", ROLE_WORKER, &m, &w);
        assert!(verify_proof(b"secret", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"wrong", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_MASTER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &w, &m, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &m, &w, "zz"));
    }
}
