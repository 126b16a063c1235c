//! Choosing between KVM and TCG by trying.
//!
//! `/dev/kvm` existing proves little: on a host that is itself a VM without
//! working nested virtualisation, QEMU opens it, `query-kvm` says enabled,
//! and the firmware even runs, but the guest kernel hangs before its first
//! message. So the probe boots the real test kernel under KVM and waits for
//! `DROVE-READY` on the serial line; under KVM that takes well under a
//! second, the timeout allows for a loaded host.
//!
//! The answer is cached in `<state_dir>/accel-probe.json` together with the
//! kernel's boot id: an agent restart on the same boot reuses it, a host
//! reboot (which may change the kernel, modules or BIOS settings) probes
//! again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::cmdline::{BootImage, ResolvedAccel};

/// How long a KVM guest may take to report readiness before KVM counts as
/// broken.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

const READY: &str = "DROVE-READY";

/// Which accelerator guests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM if a probe guest actually boots under it ([`probe_kvm`]), else
    /// TCG. A usable-looking `/dev/kvm` is not enough: on a host that is
    /// itself a VM without working nested virtualisation the guest kernel
    /// hangs. The answer is cached in `<state_dir>/accel-probe.json` for
    /// the current host boot.
    #[default]
    Auto,
    /// Emulation; works everywhere, 10-50x slower.
    Tcg,
    /// KVM without probing.
    Kvm,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    qemu: PathBuf,
    kernel: PathBuf,
    kvm_works: bool,
}

/// Resolves `Auto` to what works on this host; see the module docs.
pub async fn resolve(accel: Accel, qemu: &Path, image: &BootImage, state_dir: &Path) -> ResolvedAccel {
    match accel {
        Accel::Tcg => return ResolvedAccel::Tcg,
        Accel::Kvm => return ResolvedAccel::Kvm,
        Accel::Auto => {}
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        tracing::info!(error = %e, "cannot open /dev/kvm; guests use TCG");
        return ResolvedAccel::Tcg;
    }
    let cache_path = state_dir.join("accel-probe.json");
    let boot_id =
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default();
    let cached = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(|c| !boot_id.is_empty() && c.boot_id == boot_id && c.qemu == qemu && c.kernel == image.kernel);
    if let Some(cached) = cached {
        return if cached.kvm_works { ResolvedAccel::Kvm } else { ResolvedAccel::Tcg };
    }

    let kvm_works = match probe_kvm(qemu, image, KVM_PROBE_TIMEOUT).await {
        Ok(works) => works,
        Err(e) => {
            tracing::warn!(error = %e, "the KVM probe could not run; guests use TCG");
            false
        }
    };
    tracing::info!(kvm_works, "probed KVM by booting the test kernel");
    let cached = Cached { boot_id, qemu: qemu.to_owned(), kernel: image.kernel.clone(), kvm_works };
    // Only an optimisation: a failure to cache costs a probe next time.
    let written =
        serde_json::to_vec(&cached).map_err(std::io::Error::other).and_then(|bytes| std::fs::write(&cache_path, bytes));
    if let Err(e) = written {
        tracing::warn!(path = %cache_path.display(), error = %e, "cannot cache the KVM probe");
    }
    if kvm_works { ResolvedAccel::Kvm } else { ResolvedAccel::Tcg }
}

/// Boots `image` under KVM and reports whether it printed `DROVE-READY`
/// within `timeout`. Errors mean the probe itself could not run.
pub async fn probe_kvm(qemu: &Path, image: &BootImage, timeout: Duration) -> std::io::Result<bool> {
    for path in [&image.kernel, &image.initrd] {
        if !path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is missing; build it with scripts/build-image.sh", path.display()),
            ));
        }
    }
    let mut child = tokio::process::Command::new(qemu)
        .args(["-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "128M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 drove.name=kvm-probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // The probe must never outlive us, whatever happens.
        .kill_on_drop(true)
        .spawn()?;
    let Some(stdout) = child.stdout.take() else {
        return Err(std::io::Error::other("no stdout pipe from the probe QEMU"));
    };
    let mut lines = BufReader::new(stdout);
    let saw_ready = tokio::time::timeout(timeout, async {
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return false,
                Ok(_) if String::from_utf8_lossy(&line).contains(READY) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    // Ignore errors: the process may have exited on its own already.
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(saw_ready)
}
