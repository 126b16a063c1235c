//! Bearer tokens and roles.
//!
//! Tokens are 32 random bytes, hex-encoded, handed out once; the store only
//! keeps their SHA-256, so a copy of the store does not grant access. On
//! first start the manager mints an `admin` token and an `agent` token and
//! writes them to files with mode 0600 in its data directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Only the agent protocol (register, heartbeat).
    Agent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Who uses it: recorded in the audit log.
    pub name: String,
    pub role: Role,
    pub created_at: String,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

pub fn hash_token(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no randomness available to mint a token")]
    Random(#[source] getrandom::Error),
    #[error("writing token file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn mint_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(TokenError::Random)?;
    Ok(hex::encode(bytes))
}

/// Write `token` to `path`, readable only by its owner.
pub fn write_token_file(path: &Path, token: &str) -> Result<(), TokenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TokenError::Write { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(token.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
