//! Snapshots as qcow2 *internal* snapshots ([`crate::Hypervisor::snapshot_create`]
//! and friends).
//!
//! Every disk of a guest is a qcow2 file; a snapshot named `N` is an
//! internal snapshot `N` in each of them. A memory snapshot also carries
//! the VM state, kept in disk 0 (`vm-state-size` > 0 there), which is how
//! its kind is told apart when listing. No side file: the images are the
//! only record, so what is listed is what exists.
//!
//! | guest                 | create (disk)                                   | create (memory)      | restore                                      |
//! |-----------------------|-------------------------------------------------|----------------------|----------------------------------------------|
//! | with a QEMU process   | QMP `transaction` of `blockdev-snapshot-internal-sync`, one per disk: atomic, no vCPU pause (measured ~6 ms of I/O quiescence) | `snapshot-save` job (the VM is stopped while RAM is written) | memory: `snapshot-load` job, live; disk: quit QEMU, `qemu-img snapshot -a` per disk, launch again |
//! | without one           | `qemu-img snapshot -c` per disk, undone on failure | refused (InvalidState) | `qemu-img snapshot -a` per disk; stays Stopped |
//!
//! Delete: `blockdev-snapshot-delete-internal-sync` per disk that has it
//! (with a process) or `qemu-img snapshot -d` (without).
//!
//! # Partial snapshots
//!
//! A snapshot counts only when every disk has it. A process killed half-way
//! through a `qemu-img` sequence, or a `snapshot-save` that died with its
//! QEMU, can leave `N` on some disks only: it is not listed, a create of `N`
//! first removes those parts, and a delete of `N` removes whatever parts
//! there are. So the caller's recovery is simple: `snapshot_delete` undoes
//! any attempt, finished or not, and `snapshot_list` says which finished.
//!
//! Restoring a disk snapshot of a running guest takes the guest down and up
//! again (QEMU cannot revert the disks under a running guest: `snapshot-load`
//! refuses a snapshot without VM state); a process killed between the two
//! leaves the guest Crashed, and repeating the restore finishes the job.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use drove_model::DiskFormat::Qcow2;
use drove_model::{ByteSize, GuestId, HypervisorKind};
use serde_json::{Value, json};

use super::guest_dir::{GuestDir, Intent};
use super::{QemuError, QemuHypervisor, Slot, backend, cmdline, terminate};
use crate::{GuestConfig, HvError, RestoreOutcome, RuntimeState, SnapshotInfo, SnapshotKind, check_snapshot_name};

/// How long a snapshot job (writing or loading the VM state) may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a running job is polled.
const JOB_POLL: Duration = Duration::from_millis(5);

/// One internal snapshot as one disk holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DiskSnapshot {
    pub(super) name: String,
    vm_state_size: u64,
    date_sec: u64,
}

pub(super) fn parse_snapshots(image: &Value) -> Vec<DiskSnapshot> {
    image
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|s| {
                    Some(DiskSnapshot {
                        name: s.get("name")?.as_str()?.to_owned(),
                        vm_state_size: s.get("vm-state-size").and_then(Value::as_u64).unwrap_or(0),
                        date_sec: s.get("date-sec").and_then(Value::as_u64).unwrap_or(0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshots every disk has, in disk 0's order (creation order).
pub(super) fn complete(per_disk: &[Vec<DiskSnapshot>]) -> Vec<SnapshotInfo> {
    let Some((first, rest)) = per_disk.split_first() else { return Vec::new() };
    first
        .iter()
        .filter(|s| rest.iter().all(|d| d.iter().any(|o| o.name == s.name)))
        .map(|s| SnapshotInfo {
            name: s.name.clone(),
            kind: if s.vm_state_size > 0 { SnapshotKind::Memory } else { SnapshotKind::Disk },
            created_unix: s.date_sec,
            vm_state_size: ByteSize(s.vm_state_size),
        })
        .collect()
}

/// The complete snapshots operators see: all but clones' transient ones.
pub(super) fn visible(per_disk: &[Vec<DiskSnapshot>]) -> Vec<SnapshotInfo> {
    complete(per_disk).into_iter().filter(|s| !is_transient(&s.name)).collect()
}

/// The transient snapshots clones took and left (an interrupted clone),
/// on any disk.
pub(super) fn transient(per_disk: &[Vec<DiskSnapshot>]) -> BTreeSet<String> {
    per_disk.iter().flatten().map(|s| s.name.clone()).filter(|n| is_transient(n)).collect()
}

pub(super) fn is_transient(name: &str) -> bool {
    name.starts_with(crate::CLONE_SNAPSHOT_PREFIX)
}

/// Runs `qemu-img ARGS`; its stdout, or the failure with its stderr.
pub(super) async fn qemu_img(program: &Path, args: &[&str], file: &Path) -> Result<Vec<u8>, QemuError> {
    let name = || program.to_string_lossy().into_owned();
    let output = tokio::process::Command::new(program)
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        // A call dropped midway (its agent call cancelled) must not leave a
        // qemu-img writing on: the next attempt removes its leftovers and
        // writes the same temporary file.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| QemuError::Spawn { program: name(), source })?;
    if !output.status.success() {
        return Err(QemuError::CommandFailed {
            program: name(),
            what: format!("{} of {}", args.join(" "), file.display()),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

/// One snapshot call on a guest whose lock is held.
pub(super) struct Snap<'a> {
    pub(super) hv: &'a QemuHypervisor,
    pub(super) dir: &'a GuestDir,
    pub(super) slot: &'a mut Slot,
    pub(super) config: GuestConfig,
    pub(super) op: &'static str,
}

impl Snap<'_> {
    fn id(&self) -> GuestId {
        self.config.id
    }

    fn disks(&self) -> usize {
        self.config.spec.disks.len()
    }

    pub(super) fn err(&self) -> impl FnOnce(QemuError) -> HvError + use<> {
        backend(self.op, self.config.id)
    }

    fn qemu_img_path(&self) -> &Path {
        &self.hv.inner.config.qemu_img
    }

    /// Each disk's internal snapshots: from QEMU while it runs (it holds
    /// the images open), from the files otherwise.
    pub(super) async fn per_disk(&mut self, pid: Option<u32>) -> Result<Vec<Vec<DiskSnapshot>>, QemuError> {
        let mut out = Vec::with_capacity(self.disks());
        match pid {
            Some(pid) => {
                let nodes = self.slot.execute(self.dir, pid, "query-named-block-nodes", None).await?;
                for i in 0..self.disks() {
                    let name = cmdline::image_node(&nodes, i);
                    let image = nodes
                        .as_array()
                        .and_then(|l| l.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(&name)))
                        .and_then(|n| n.get("image"))
                        .cloned()
                        .unwrap_or(Value::Null);
                    out.push(parse_snapshots(&image));
                }
            }
            None => {
                for i in 0..self.disks() {
                    let path = self.dir.disk_path(i, Qcow2);
                    let stdout =
                        qemu_img(self.qemu_img_path(), &["info", "--output=json", "--force-share"], &path).await?;
                    let info: Value = serde_json::from_slice(&stdout).unwrap_or(Value::Null);
                    out.push(parse_snapshots(&info));
                }
            }
        }
        Ok(out)
    }

    /// The root node of each disk: QEMU's internal-snapshot commands
    /// (`blockdev-snapshot-internal-sync`, `-delete-internal-sync`) refuse
    /// a node with a parent, and every disk's image node sits under its
    /// throttle node ([`cmdline::root_nodes`]); the filter passes them
    /// through to the image.
    async fn roots(&mut self, pid: u32) -> Result<Vec<String>, QemuError> {
        let named = self.slot.execute(self.dir, pid, "query-named-block-nodes", None).await?;
        Ok(cmdline::root_nodes(&named, self.disks()))
    }

    async fn root(&mut self, pid: u32, i: usize) -> Result<String, QemuError> {
        Ok(self.roots(pid).await?.swap_remove(i))
    }

    /// Writes what the host still caches of the disk files to storage
    /// while the guest runs on. The snapshot's transaction flushes the
    /// files with the guest's I/O drained (its console, on the big QEMU
    /// lock, waits too): after a guest wrote 256 MiB, that flush alone
    /// stopped it for 128 ms where later snapshots took 8. Now it finds
    /// little left to write. Best effort: the transaction flushes anyway.
    async fn flush_ahead(&self) {
        let files: Vec<std::path::PathBuf> =
            (0..self.disks()).map(|i| self.dir.disk_path(i, self.config.spec.disks[i].format)).collect();
        let synced = tokio::task::spawn_blocking(move || {
            for file in &files {
                if let Err(e) = std::fs::File::open(file).and_then(|f| f.sync_data()) {
                    tracing::debug!(file = %file.display(), error = %e, "cannot flush ahead of a snapshot");
                }
            }
        });
        let _ = synced.await;
    }

    /// Removes `name` from every disk that has it (complete or partial).
    pub(super) async fn remove(&mut self, pid: Option<u32>, name: &str) -> Result<(), QemuError> {
        let per_disk = self.per_disk(pid).await?;
        for (i, snaps) in per_disk.iter().enumerate() {
            if !snaps.iter().any(|s| s.name == name) {
                continue;
            }
            match pid {
                Some(pid) => {
                    let args = json!({ "device": self.root(pid, i).await?, "name": name });
                    self.slot.execute(self.dir, pid, "blockdev-snapshot-delete-internal-sync", Some(args)).await?;
                }
                None => {
                    qemu_img(self.qemu_img_path(), &["snapshot", "-d", name], &self.dir.disk_path(i, Qcow2)).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs a snapshot job (`snapshot-save` / `snapshot-load`) to its end.
    async fn job(&mut self, pid: u32, command: &str, name: &str) -> Result<(), QemuError> {
        let job_id = format!("drove-{command}");
        // The image nodes, not the roots: the jobs take any node, and
        // `snapshot-load` on a filter closes and reopens it around the
        // revert, after which the throttle node left the guest's disk
        // requests hanging (QEMU 7.2, measured).
        let named = self.slot.execute(self.dir, pid, "query-named-block-nodes", None).await?;
        let devices: Vec<String> = (0..self.disks()).map(|i| cmdline::image_node(&named, i)).collect();
        let vmstate = cmdline::image_node(&named, 0);
        let args = json!({ "job-id": job_id, "tag": name, "vmstate": vmstate, "devices": devices });
        // A job of an earlier call that died half-way would block the id.
        let _ = self.slot.execute(self.dir, pid, "job-dismiss", Some(json!({ "id": job_id }))).await;
        self.slot.execute(self.dir, pid, command, Some(args)).await?;
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let jobs = self.slot.execute(self.dir, pid, "query-jobs", None).await?;
            let job = jobs
                .as_array()
                .and_then(|l| l.iter().find(|j| j.get("id").and_then(Value::as_str) == Some(job_id.as_str())))
                .cloned();
            match job {
                Some(j) if j.get("status").and_then(Value::as_str) == Some("concluded") => {
                    self.slot.execute(self.dir, pid, "job-dismiss", Some(json!({ "id": job_id }))).await?;
                    return match j.get("error").and_then(Value::as_str) {
                        Some(error) => Err(QemuError::Job { job: command.to_owned(), error: error.to_owned() }),
                        None => Ok(()),
                    };
                }
                Some(_) => {}
                None => {
                    return Err(QemuError::Job { job: command.to_owned(), error: "the job disappeared".to_owned() });
                }
            }
            if Instant::now() > deadline {
                return Err(QemuError::Timeout { what: format!("{command} of {name}"), after: JOB_TIMEOUT });
            }
            tokio::time::sleep(JOB_POLL).await;
        }
    }

    pub(super) async fn create(
        &mut self,
        state: RuntimeState,
        pid: Option<u32>,
        name: &str,
        kind: SnapshotKind,
    ) -> Result<(), HvError> {
        let id = self.id();
        if kind == SnapshotKind::Memory && pid.is_none() {
            return Err(HvError::InvalidState { id, op: self.op, state });
        }
        let existing = complete(&self.per_disk(pid).await.map_err(self.err())?);
        if existing.iter().any(|s| s.name == name) {
            return Err(HvError::InvalidSnapshot {
                id,
                name: name.to_owned(),
                reason: "a snapshot of that name exists".to_owned(),
            });
        }
        // Parts of an interrupted earlier attempt.
        self.remove(pid, name).await.map_err(self.err())?;
        if let (Some(_), SnapshotKind::Disk) = (pid, kind) {
            self.flush_ahead().await;
        }
        let made = match (pid, kind) {
            (Some(pid), SnapshotKind::Disk) => match self.roots(pid).await {
                Ok(roots) => {
                    let actions: Vec<Value> = roots
                        .iter()
                        .map(|root| json!({ "type": "blockdev-snapshot-internal-sync", "data": { "device": root, "name": name } }))
                        .collect();
                    self.slot
                        .execute(self.dir, pid, "transaction", Some(json!({ "actions": actions })))
                        .await
                        .map(|_| ())
                }
                Err(e) => Err(e),
            },
            (Some(pid), SnapshotKind::Memory) => self.job(pid, "snapshot-save", name).await,
            (None, _) => {
                let mut result = Ok(());
                for i in 0..self.disks() {
                    result = qemu_img(self.qemu_img_path(), &["snapshot", "-c", name], &self.dir.disk_path(i, Qcow2))
                        .await
                        .map(|_| ());
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        };
        if let Err(e) = made {
            // Leave no part of it behind.
            if let Err(undo) = self.remove(pid, name).await {
                tracing::error!(guest = %id, snapshot = name, error = %undo, "cannot remove a failed snapshot's parts");
            }
            return Err(self.err()(e));
        }
        Ok(())
    }

    async fn restore(&mut self, state: RuntimeState, pid: Option<u32>, name: &str) -> Result<RestoreOutcome, HvError> {
        let id = self.id();
        let snapshot = complete(&self.per_disk(pid).await.map_err(self.err())?)
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| HvError::SnapshotNotFound { id, name: name.to_owned() })?;
        let live = matches!(state, RuntimeState::Running | RuntimeState::Paused);
        match (pid, live, snapshot.kind) {
            (Some(pid), true, SnapshotKind::Memory) => {
                self.job(pid, "snapshot-load", name).await.map_err(self.err())?;
                Ok(RestoreOutcome::Live)
            }
            (Some(pid), true, SnapshotKind::Disk) => {
                terminate(self.dir, self.slot, pid).await.map_err(self.err())?;
                self.revert_files(name).await?;
                let config = self.config.clone();
                self.hv.launch(self.dir, self.slot, &config, false).await.map_err(self.err())?;
                Ok(RestoreOutcome::Restarted)
            }
            (pid, _, _) => {
                // Crashed with its QEMU alive (a panicked guest): end it.
                if let Some(pid) = pid {
                    terminate(self.dir, self.slot, pid).await.map_err(self.err())?;
                }
                self.dir.write_intent(Intent::Stopped).map_err(self.err())?;
                self.revert_files(name).await?;
                Ok(RestoreOutcome::DisksOnly)
            }
        }
    }

    async fn revert_files(&self, name: &str) -> Result<(), HvError> {
        for i in 0..self.disks() {
            qemu_img(self.qemu_img_path(), &["snapshot", "-a", name], &self.dir.disk_path(i, Qcow2))
                .await
                .map_err(self.err())?;
        }
        Ok(())
    }
}

impl QemuHypervisor {
    /// Locks the guest, checks the name and that it has disks, observes it,
    /// and runs `f` with what it found.
    async fn with_snap<T>(
        &self,
        id: GuestId,
        name: Option<&str>,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Snap<'_>, RuntimeState, Option<u32>) -> Result<T, HvError>,
    ) -> Result<T, HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let config = self.record(&dir, id, op)?;
        if let Some(name) = name {
            check_snapshot_name(id, name)?;
        }
        if config.spec.disks.is_empty() {
            return Err(HvError::Unsupported {
                op,
                backend: HypervisorKind::Qemu,
                reason: "the guest has no disk to keep snapshots on".to_owned(),
            });
        }
        if let Some(reason) = config.spec.snapshot_refusal() {
            // Nothing to list or delete; a create or restore is refused.
            return Err(HvError::DiskKind { id, op, reason });
        }
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend(op, id))?;
        let mut snap = Snap { hv: self, dir: &dir, slot: &mut slot, config, op };
        f(&mut snap, state, pid).await
    }

    pub(super) async fn snapshot_create_guest(
        &self,
        id: GuestId,
        name: &str,
        kind: SnapshotKind,
    ) -> Result<SnapshotInfo, HvError> {
        let op = "snapshot_create";
        self.with_snap(id, Some(name), op, async |snap, state, pid| {
            let t0 = Instant::now();
            snap.create(state, pid, name, kind).await?;
            tracing::info!(guest = %id, snapshot = name, ?kind, took = ?t0.elapsed(), "snapshot taken");
            complete(&snap.per_disk(pid).await.map_err(snap.err())?).into_iter().find(|s| s.name == name).ok_or_else(
                || backend(op, id)(QemuError::Job { job: op.to_owned(), error: "the snapshot is not listed".into() }),
            )
        })
        .await
    }

    pub(super) async fn snapshot_list_guest(&self, id: GuestId) -> Result<Vec<SnapshotInfo>, HvError> {
        let op = "snapshot_list";
        match self
            .with_snap(id, None, op, async |snap, _, pid| Ok(visible(&snap.per_disk(pid).await.map_err(snap.err())?)))
            .await
        {
            // Nowhere to keep snapshots: none.
            Err(HvError::Unsupported { .. } | HvError::DiskKind { .. }) => Ok(Vec::new()),
            other => other,
        }
    }

    pub(super) async fn snapshot_delete_guest(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        match self
            .with_snap(id, Some(name), "snapshot_delete", async |snap, _, pid| {
                snap.remove(pid, name).await.map_err(snap.err())
            })
            .await
        {
            // It has none: deleting one is done (deletes are idempotent).
            Err(HvError::DiskKind { .. }) => Ok(()),
            other => other,
        }
    }

    pub(super) async fn snapshot_restore_guest(&self, id: GuestId, name: &str) -> Result<RestoreOutcome, HvError> {
        self.with_snap(id, Some(name), "snapshot_restore", async |snap, state, pid| {
            let t0 = Instant::now();
            let outcome = snap.restore(state, pid, name).await?;
            tracing::info!(guest = %id, snapshot = name, ?outcome, took = ?t0.elapsed(), "snapshot restored");
            Ok(outcome)
        })
        .await
    }
}
