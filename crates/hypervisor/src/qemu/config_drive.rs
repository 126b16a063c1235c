//! The config drive: a guest's identity for images that boot through the
//! BIOS, where drove cannot write the kernel command line.
//!
//! A small read-only FAT disk labelled `CIDATA`, in cloud-init's NoCloud
//! layout, so stock cloud images pick it up:
//!
//! ```text
//!  meta-data        instance-id (the guest's id), local-hostname
//!  user-data        #cloud-config, empty for now
//!  network-config   version 2: each NIC matched by MAC, its address and gateway
//!  drove            the same as `drove.*` kernel parameters, on one line
//!                   (what drove's test image reads: its /init has no YAML)
//! ```
//!
//! The drive is rewritten before every launch, so a changed identity (a
//! clone's new name and addresses) reaches the guest at its next boot. It is
//! byte-for-byte the same for the same identity — no random volume id, no
//! timestamps — because both ends of a live migration write their own copy
//! and the guest may have it mounted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::error::QemuError;
use super::guest_dir::GuestDir;
use crate::GuestConfig;

/// The file name in the guest's directory.
pub const FILE: &str = "config-drive.img";
/// The FAT volume label cloud-init's NoCloud source looks for.
pub const LABEL: &str = "CIDATA";
/// The virtio serial number the disk carries (also how drove's test image
/// finds it without a filesystem probe).
pub const SERIAL: &str = "cidata";
/// Size of the FAT image, KiB: far more than the few files need.
const SIZE_KIB: u32 = 1024;
/// What every file's modification time reads (FAT cannot store 1970).
const FIXED_MTIME: Duration = Duration::from_secs(1_577_836_800); // 2020-01-01

/// The guest's name as a hostname: what is not a letter, digit or `-`
/// becomes `-`.
pub fn hostname(config: &GuestConfig) -> String {
    config.spec.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect()
}

/// The guest's identity as `drove.*` words, the test image's vocabulary:
/// its name (also the hostname), its id, and each addressed NIC by MAC
/// (interface names inside depend on PCI order).
pub fn identity_words(config: &GuestConfig) -> Vec<String> {
    let mut words = vec![format!("drove.name={}", hostname(config)), format!("drove.id={}", config.id)];
    for nic in &config.spec.nics {
        if let Some(a) = &nic.address {
            let mut w = format!("drove.ip=mac-{}:{a}", nic.mac.replace(':', "-"));
            if let Some(gw) = a.gateway {
                w.push_str(&format!(":{gw}"));
            }
            words.push(w);
        }
    }
    words
}

/// The drive's files, by name.
pub fn files(config: &GuestConfig) -> Vec<(&'static str, String)> {
    let meta = format!("instance-id: {}\nlocal-hostname: {}\n", config.id, hostname(config));
    let mut net = String::from("version: 2\nethernets:\n");
    for (i, nic) in config.spec.nics.iter().enumerate() {
        net.push_str(&format!("  nic{i}:\n    match:\n      macaddress: \"{}\"\n", nic.mac.to_ascii_lowercase()));
        match &nic.address {
            Some(a) => {
                net.push_str(&format!("    addresses: [\"{}/{}\"]\n", a.ip, a.prefix));
                if let Some(gw) = a.gateway {
                    net.push_str(&format!("    gateway4: \"{gw}\"\n"));
                }
            }
            None => net.push_str("    dhcp4: false\n"),
        }
    }
    let mut drove = identity_words(config).join(" ");
    drove.push('\n');
    vec![("meta-data", meta), ("user-data", "#cloud-config\n".to_owned()), ("network-config", net), ("drove", drove)]
}

/// Writes the guest's config drive into its directory; its path.
pub async fn write(dir: &GuestDir, config: &GuestConfig) -> Result<PathBuf, QemuError> {
    let path = dir.config_drive_path();
    let staging = dir.root().join("config-drive.staging");
    let tmp = path.with_extension("img.tmp");
    let result = build(&staging, &tmp, config).await;
    let _ = std::fs::remove_dir_all(&staging);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(|e| QemuError::io("renaming into place", &path, e))?;
    Ok(path)
}

async fn build(staging: &Path, img: &Path, config: &GuestConfig) -> Result<(), QemuError> {
    let _ = std::fs::remove_dir_all(staging);
    let _ = std::fs::remove_file(img);
    std::fs::create_dir_all(staging).map_err(|e| QemuError::io("creating", staging, e))?;
    let failed = |what: &str| {
        let what = format!("{what} for {}", img.display());
        move |e: drove_net::cmd::CmdError| QemuError::ConfigDrive { what, source: e }
    };
    // The volume id from the guest's id: stable, and unlike its neighbour's.
    // (A UUID's text starts with 8 hex digits.)
    let volume_id: String = config.id.to_string().chars().take(8).collect();
    let img_s = img.to_string_lossy().into_owned();
    drove_net::cmd::run(
        "mkfs.vfat",
        &["-C", "--invariant", "-n", LABEL, "-i", &volume_id, &img_s, &SIZE_KIB.to_string()],
    )
    .await
    .map_err(failed("mkfs.vfat"))?;
    for (name, content) in files(config) {
        let file = staging.join(name);
        std::fs::write(&file, content).map_err(|e| QemuError::io("writing", &file, e))?;
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + FIXED_MTIME))
            .map_err(|e| QemuError::io("setting the time of", &file, e))?;
        let target = format!("::{name}");
        // -m keeps the fixed time; -o overwrites without asking.
        drove_net::cmd::run("mcopy", &["-m", "-o", "-i", &img_s, &file.to_string_lossy(), &target])
            .await
            .map_err(failed("mcopy"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> GuestConfig {
        crate::qemu::cmdline::tests::config()
    }

    #[test]
    fn the_identity_names_each_addressed_nic_by_mac() {
        let c = config();
        let words = identity_words(&c);
        assert_eq!(words[0], "drove.name=web-1");
        assert_eq!(words[1], format!("drove.id={}", c.id));
        assert_eq!(&words[2..], ["drove.ip=mac-52-54-00-00-00-01:10.0.10.5/24:10.0.10.1"]);
        let files = files(&c);
        let get = |n: &str| files.iter().find(|(f, _)| *f == n).map(|(_, s)| s.clone()).unwrap();
        assert!(get("meta-data").contains("local-hostname: web-1\n"));
        let net = get("network-config");
        assert!(net.contains("macaddress: \"52:54:00:00:00:01\"\n    addresses: [\"10.0.10.5/24\"]"), "{net}");
        assert!(net.contains("gateway4: \"10.0.10.1\""), "{net}");
        assert_eq!(get("drove"), format!("{}\n", words.join(" ")));
    }
}
