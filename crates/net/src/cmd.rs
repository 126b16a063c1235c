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

/// Whether the network device `name` exists in this process's namespace.
pub fn device_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}
