//! Clones: a new guest's disks made from another guest's on this host, or
//! from the shared pool ([`crate::Hypervisor::create`] of a spec with
//! `clone_of`).
//!
//! | source                      | how each disk is made                                                      |
//! |-----------------------------|----------------------------------------------------------------------------|
//! | template (`Overlay`)        | `qemu-img create -b <source disk>`: a thin overlay; the source never runs   |
//! | stopped (`Copy`)            | `qemu-img convert` of the source's file                                      |
//! | running (`Copy`)            | a transient internal snapshot of all its disks in one QMP `transaction` (no vCPU pause), `qemu-img convert -U -l snapshot.name=...` of each, the snapshot deleted |
//! | at snapshot `N` (`Copy`)    | `qemu-img convert -l snapshot.name=N` (`-U` if the source runs)              |
//!
//! A copy of a disk that is an overlay of a boot image keeps that image as
//! its backing file (`-B`): only what the source changed is copied. A
//! running source's snapshot tables and the data its internal snapshot
//! references do not change while it exists (qcow2 copies on write what a
//! snapshot shares), which is what makes the shared read (`-U`) safe. The
//! source's lock is held throughout, so no lifecycle call or snapshot
//! operation of the source interleaves.
//!
//! A source whose record is on another host (its disks on the shared pool,
//! [`crate::shared_source`]) is read from the pool directly: overlays on
//! its files or `qemu-img convert` of them (at a snapshot with `-l`), never
//! with `-U`, so a source that some QEMU writes is refused by its image
//! lock. The manager sends only templates and stopped sources there: a
//! running one's transient snapshot needs its own QEMU.
//!
//! Every disk is written under a temporary name and renamed into place, and
//! the clone's record is written last (`create`), so an interrupted clone
//! has no record; the next `create` removes its leftovers and starts again
//! from a new instant, and a `destroy` removes them. Transient snapshots an
//! interrupted clone left in its source are removed by the next clone of
//! that source and are never listed.

use std::collections::BTreeSet;
use std::path::Path;

use drove_model::DiskFormat::Qcow2;
use drove_model::{CloneMode, CloneSource, GuestId, SnapshotKind};

use super::guest_dir::GuestDir;
use super::snapshot::{Snap, parse_snapshots, qemu_img, transient, visible};
use super::{QemuError, QemuHypervisor, backend, create_overlay};
use crate::{CLONE_SNAPSHOT_PREFIX, GuestConfig, HvError, RuntimeState, check_clone};

/// The transient snapshot a clone takes of its running source.
fn transient_name(clone: GuestId) -> String {
    format!("{CLONE_SNAPSHOT_PREFIX}{}", &clone.as_uuid().simple().to_string()[..12])
}

/// `qemu-img convert` of `from` (at `snapshot`) to a new qcow2 file `to`,
/// written beside and renamed into place.
async fn convert_qcow2(
    qemu_img_path: &Path,
    from: &Path,
    to: &Path,
    snapshot: Option<&str>,
    shared: bool,
    backing: Option<&Path>,
    from_format: Option<&str>,
) -> Result<(), QemuError> {
    let tmp = to.with_extension("qcow2.tmp");
    let mut args: Vec<String> = vec!["convert".into(), "-q".into(), "-O".into(), "qcow2".into()];
    if let Some(format) = from_format {
        args.extend(["-f".into(), format.into()]);
    }
    if shared {
        args.push("-U".into());
    }
    if let Some(name) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={name}")]);
    }
    if let Some(base) = backing {
        args.extend(["-B".into(), base.display().to_string(), "-F".into(), "qcow2".into()]);
    }
    args.push(from.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Err(e) = qemu_img(qemu_img_path, &args, &tmp).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, to).map_err(|e| QemuError::io("renaming into place", to, e))
}

impl QemuHypervisor {
    /// Makes the disks of clone `config` in `dir` from `from`, under the
    /// source's lock; checks first, so a refusal makes nothing.
    pub(super) async fn clone_disks(
        &self,
        dir: &GuestDir,
        config: &GuestConfig,
        from: &CloneSource,
    ) -> Result<(), HvError> {
        let (op, id) = ("create", config.id);
        let source = self.guest(from.guest);
        let mut slot = source.change().await;
        let sdir = self.dir(from.guest);
        let sconfig = sdir.read_record().map_err(backend(op, id))?;
        if sconfig.is_none()
            && let Some(source) = crate::shared_source(config, from)
        {
            drop(slot);
            return self.clone_from_pool(dir, config, from, &source).await;
        }
        let mut pid = None;
        let mut names = Vec::new();
        let mut transient_left = BTreeSet::new();
        if let Some(sc) = &sconfig {
            pid = self.observe(&sdir, &mut slot).await.map_err(backend(op, id))?.1;
            // Raw files hold no snapshots (check_clone refuses what needs one).
            if !sc.spec.disks.is_empty() && sc.spec.first_non_qcow2_disk().is_none() {
                let mut snap = Snap { hv: self, dir: &sdir, slot: &mut slot, config: sc.clone(), op };
                let per_disk = snap.per_disk(pid).await.map_err(backend(op, id))?;
                names = visible(&per_disk).into_iter().map(|s| s.name).collect();
                transient_left = transient(&per_disk);
            }
        }
        check_clone(config, from, sconfig.as_ref(), pid.is_some(), &names)?;
        let Some(sconfig) = sconfig else { return Err(HvError::NotFound { id: from.guest }) };
        let qemu_img_path = &self.inner.config.qemu_img;
        let t0 = std::time::Instant::now();
        if from.mode == CloneMode::Overlay {
            for (i, disk) in config.spec.disks.iter().enumerate() {
                let base = &sconfig.spec.disks[i];
                // A qcow2 overlay works over a raw base as well as a qcow2 one.
                create_overlay(
                    qemu_img_path,
                    &dir.disk_path(i, Qcow2),
                    disk.size,
                    &sdir.disk_path(i, base.format),
                    base,
                )
                .await
                .map_err(backend(op, id))?;
            }
            tracing::info!(guest = %id, source = %from.guest, took = ?t0.elapsed(), "cloned as overlays");
            return Ok(());
        }
        let mut snap = Snap { hv: self, dir: &sdir, slot: &mut slot, config: sconfig.clone(), op };
        for name in &transient_left {
            snap.remove(pid, name).await.map_err(backend(op, id))?;
        }
        let transient = (from.snapshot.is_none() && pid.is_some()).then(|| transient_name(id));
        if let Some(name) = &transient {
            snap.create(RuntimeState::Running, pid, name, SnapshotKind::Disk).await?;
        }
        let at = from.snapshot.clone().or_else(|| transient.clone());
        let mut result = Ok(());
        for i in 0..config.spec.disks.len() {
            let backing = sconfig.spec.image.as_deref().filter(|_| i == 0).map(Path::new);
            result = convert_qcow2(
                qemu_img_path,
                &sdir.disk_path(i, sconfig.spec.disks[i].format),
                &dir.disk_path(i, Qcow2),
                at.as_deref(),
                pid.is_some(),
                backing,
                sconfig.spec.disks.get(i).map(|d| d.format.as_str()),
            )
            .await;
            if result.is_err() {
                break;
            }
        }
        if let Some(name) = &transient
            && let Err(e) = snap.remove(pid, name).await
        {
            // The next clone of this source removes it; it is never listed.
            tracing::warn!(guest = %id, source = %from.guest, error = %e, "cannot remove a clone's transient snapshot");
        }
        result.map_err(backend(op, id))?;
        tracing::info!(guest = %id, source = %from.guest, snapshot = ?from.snapshot, took = ?t0.elapsed(), "cloned as copies");
        Ok(())
    }

    /// Makes the disks of clone `config` from `source`, whose record is on
    /// another host, by reading its files on the shared pool. Nothing here
    /// opens them for writing, and nothing passes `-U`: a source that some
    /// QEMU has open after all (the manager refuses to start it meanwhile)
    /// is refused by its image lock rather than read while it changes.
    async fn clone_from_pool(
        &self,
        dir: &GuestDir,
        config: &GuestConfig,
        from: &CloneSource,
        source: &GuestConfig,
    ) -> Result<(), HvError> {
        let (op, id) = ("create", config.id);
        let refuse = |reason: String| HvError::CloneSource { id, source_guest: from.guest, reason };
        let Some(pool) = self.inner.config.shared_dir.clone() else {
            return Err(refuse(
                "its disks are on the shared pool and this host has none (drove agent --shared-dir)".into(),
            ));
        };
        let qemu_img_path = &self.inner.config.qemu_img;
        let sdir = self.dir(from.guest);
        let mut paths = Vec::with_capacity(source.spec.disks.len());
        let mut per_disk = Vec::with_capacity(source.spec.disks.len());
        for (i, disk) in source.spec.disks.iter().enumerate() {
            let path = sdir.pool_disk_path(&pool, i, disk.format);
            if !disk.on_pool() {
                // A host block device: check_clone refuses it below.
                paths.push(path);
                continue;
            }
            if !path.exists() {
                return Err(refuse(format!("its disk {i} is not on the shared pool ({})", path.display())));
            }
            let args = ["info", "--output=json", "-f", disk.format.as_str()];
            let stdout = qemu_img(qemu_img_path, &args, &path).await.map_err(backend(op, id))?;
            let info: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or(serde_json::Value::Null);
            per_disk.push(parse_snapshots(&info));
            paths.push(path);
        }
        let names: Vec<String> = visible(&per_disk).into_iter().map(|s| s.name).collect();
        check_clone(config, from, Some(source), false, &names)?;
        let t0 = std::time::Instant::now();
        for (i, disk) in config.spec.disks.iter().enumerate() {
            let base = &source.spec.disks[i];
            let to = dir.disk_path(i, Qcow2);
            let made = if from.mode == CloneMode::Overlay {
                create_overlay(qemu_img_path, &to, disk.size, &paths[i], base).await
            } else {
                let backing = config.spec.image.as_deref().filter(|_| i == 0).map(Path::new);
                let at = from.snapshot.as_deref();
                convert_qcow2(qemu_img_path, &paths[i], &to, at, false, backing, Some(base.format.as_str())).await
            };
            made.map_err(backend(op, id))?;
        }
        tracing::info!(guest = %id, source = %from.guest, mode = ?from.mode, took = ?t0.elapsed(), "cloned from the shared pool");
        Ok(())
    }
}
