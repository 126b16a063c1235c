//! Running `ip` and `tc`: the one way drove changes a host's network.

use std::process::{ExitStatus, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("running {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
    #[error("cannot read the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
}

/// Runs `program args...`; its standard output if it succeeds.
pub async fn run(program: &'static str, args: &[impl AsRef<str>]) -> Result<String, CmdError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let output = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| CmdError::Spawn { program, source })?;
    if !output.status.success() {
        return Err(CmdError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command whose standard output is JSON (`ip -j`, `tc -j`).
pub async fn run_json(program: &'static str, args: &[impl AsRef<str>]) -> Result<serde_json::Value, CmdError> {
    let out = run(program, args).await?;
    serde_json::from_str(&out).map_err(|e| CmdError::Output {
        command: format!("{program} {}", args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ")),
        reason: e.to_string(),
    })
}

/// The network devices of this process's network namespace.
///
/// From `/proc/self/net/dev`, which always shows the namespace of the
/// reader; `/sys/class/net` shows that of whoever mounted sysfs, which is
/// not ours when a lab host's agent joined its namespace without a mount
/// namespace of its own (it needs the host's cgroup mounts).
pub fn devices() -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(text.lines().skip(2).filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_owned())).collect())
}

/// Whether the network device `name` exists in this process's namespace.
pub fn device_exists(name: &str) -> bool {
    devices().is_ok_and(|d| d.iter().any(|n| n == name))
}

/// A TCP port free on `addr` now (the caller binds it soon after).
pub fn free_port(addr: std::net::IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((addr, 0))?.local_addr()?.port())
}
