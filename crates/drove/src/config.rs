//! The client configuration file: where the manager is and which token to
//! use. `drove up` writes it; every client command reads it.
//!
//! Location: `$DROVE_CONFIG`, else `$XDG_CONFIG_HOME/drove/config.json`,
//! else `~/.config/drove/config.json`. `DROVE_ENDPOINT` and `DROVE_TOKEN`
//! override its contents.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    pub version: u32,
    pub endpoint: String,
    pub token: String,
}

pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DROVE_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("drove").join("config.json")
}

pub fn load() -> Result<ClientConfig> {
    let path = config_path();
    let mut cfg = match std::fs::read(&path) {
        Ok(bytes) => {
            let cfg: ClientConfig = serde_json::from_slice(&bytes)
                .with_context(|| format!("client config {} is not valid", path.display()))?;
            if cfg.version != CONFIG_VERSION {
                bail!(
                    "client config {} has version {}, this drove understands {CONFIG_VERSION}",
                    path.display(),
                    cfg.version
                );
            }
            cfg
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ClientConfig { version: CONFIG_VERSION, endpoint: String::new(), token: String::new() }
        }
        Err(e) => return Err(e).with_context(|| format!("reading client config {}", path.display())),
    };
    if let Ok(e) = std::env::var("DROVE_ENDPOINT") {
        cfg.endpoint = e;
    }
    if let Ok(t) = std::env::var("DROVE_TOKEN") {
        cfg.token = t;
    }
    if cfg.endpoint.is_empty() || cfg.token.is_empty() {
        bail!(
            "no manager configured: run `drove up` (or set DROVE_ENDPOINT and DROVE_TOKEN); looked in {}",
            path.display()
        );
    }
    Ok(cfg)
}

pub fn save(cfg: &ClientConfig) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(cfg)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
