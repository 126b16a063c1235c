//! Moving a guest's disks between this host's pools
//! ([`crate::Hypervisor::move_storage`]): vSphere's "Storage vMotion".
//!
//! ```text
//!  with a QEMU process                         without one
//!  ───────────────────                         ───────────
//!  refuse: internal snapshots (a copy drops    the same refusals
//!    them), no shared pool, a migration
//!  qemu-img create each new file (qcow2, the   qemu-img convert old → new.moving,
//!    disk's virtual size, no backing file)       rename into place
//!  blockdev-add the new qcow2 node
//!  blockdev-mirror throttled{i} → new node,
//!    replaces disk{i}, sync=full,
//!    copy-mode=write-blocking
//!  … until every job is ready: from then on
//!    every guest write reaches both files
//!  ── commit: the `shared` link flips ───────── commit: the `shared` link flips
//!     (made or removed), guest.json follows       guest.json follows
//!  block-job-complete: the throttle node now
//!    reads the new node (the pivot)
//!  blockdev-del the old image nodes
//!  remove the old files                        remove the old files
//! ```
//!
//! # The commit point
//!
//! The guest's `shared` link decides where its disks are
//! (`GuestDir::disk_path`): that one rename-free step (a symlink made or
//! removed) is the commit. Before it the old files are the guest's, and a
//! failure cancels the mirrors and removes the new nodes and files: the
//! guest runs on as before. `guest.json` is written right after the link;
//! a record that disagrees with the link (an agent that died between the
//! two) is corrected to it by the next move call.
//!
//! The commit comes *before* the pivot, while the mirrors are ready in
//! write-blocking mode: every write the guest makes reaches both files
//! before it completes, so the new files are at least as current as the
//! old ones from the commit on. An agent that dies between commit and
//! pivot leaves a QEMU that keeps mirroring, and its next start boots the
//! new files, which hold everything. Pivoting first would open a window in
//! which QEMU writes only the new files while the link still names the old
//! ones, and a restart then would lose those writes. A pivot that does not
//! happen (a job that failed between ready and complete) is taken back: the
//! link and the record return to the old pool, whose files QEMU still
//! writes. With several disks, a pivot that happens for some and not others
//! cannot be taken back; the error says so and no file is removed.
//!
//! Every move call first settles what an interrupted one left in the QEMU
//! (`Mover::finish_interrupted`): mirrors into files where the link points
//! were committed, and are switched now; mirrors elsewhere never were, and
//! are ended and their files removed. So repeating a call after a lost
//! answer or a dead agent finishes the move or leaves the guest cleanly on
//! its old files.
//!
//! # Backing chains
//!
//! `sync=full` copies what the guest sees through its whole chain, so each
//! new file stands alone: a disk that was an overlay on a user's base image
//! or on a template's disk no longer depends on it (at the cost of the
//! base's data on the target pool). Keeping the backing file would need it
//! on a pool both sides see, which a host-local template is not.
//!
//! # Node names
//!
//! The new image node is `disk{i}-m<stamp>` for the rest of this QEMU's
//! life (QMP cannot rename a node); [`cmdline::image_node`] finds it for
//! snapshots and hotplug. The next start names it `disk{i}` again.
//!
//! # Snapshots
//!
//! Internal snapshots (ADR 0008) live inside the qcow2 files; neither a
//! mirror nor `qemu-img convert` carries them, so a guest with any is
//! refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drove_model::guest::Storage;
use drove_model::{ByteSize, DiskFormat, DiskSpec, GuestId, HypervisorKind};
use serde_json::{Value, json};

use super::guest_dir::{GuestDir, disk_file_name};
use super::migrate::{POLL, Stall, u};
use super::snapshot::{Snap, is_transient, qemu_img, transient};
use super::{QemuError, QemuHypervisor, Slot, backend, cmdline, create_disk_file};
use crate::{GuestConfig, HvError, RuntimeState, StorageMoved};

const OP: &str = "move_storage";
/// Job ids of our mirrors start with this.
const JOB_PREFIX: &str = "drove-move";
/// How long the pivot (or a cancel) may take once asked for.
const END_TIMEOUT: Duration = Duration::from_secs(60);

fn job(i: usize) -> String {
    format!("{JOB_PREFIX}{i}")
}

fn refuse(id: GuestId, reason: impl std::fmt::Display) -> HvError {
    HvError::Unsupported { op: OP, backend: HypervisorKind::Qemu, reason: format!("guest {id}: {reason}") }
}

/// The pool the guest's disks are on: the `shared` link says.
fn pool_of(dir: &GuestDir) -> Storage {
    if dir.is_shared() { Storage::Shared } else { Storage::Local }
}

/// Makes the guest's disks live on `to` from now on: the commit point.
fn flip(dir: &GuestDir, to: Storage, pool: Option<&Path>) -> Result<(), QemuError> {
    match (to, pool) {
        (Storage::Shared, Some(pool)) => dir.link_shared(pool),
        (Storage::Shared, None) => {
            Err(QemuError::io("linking", dir.shared_link(), std::io::Error::other("this host has no shared pool")))
        }
        (Storage::Local, _) => dir.unlink_shared(),
    }
}

fn remove_file(path: &Path) -> Result<(), QemuError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(QemuError::io("removing", path, e)),
        _ => Ok(()),
    }
}

/// Bytes the file takes on its filesystem (a thin qcow2: what it holds).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Undo of one step of a live move, before its commit.
#[derive(Debug)]
enum Undo {
    RemoveFile(PathBuf),
    BlockdevDel(String),
    EndJob(String),
}

impl QemuHypervisor {
    pub(super) async fn move_guest_storage(&self, id: GuestId, to: Storage) -> Result<StorageMoved, HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let mut config = self.record(&dir, id, OP)?;
        let from = pool_of(&dir);
        if config.spec.storage != from {
            tracing::warn!(guest = %id, record = %config.spec.storage, link = %from,
                "the guest's record and its disks' link disagree (an interrupted move); the link decides");
            config.spec.storage = from;
            dir.write_record(&config).map_err(backend(OP, id))?;
        }
        if let Some(reason) = config.spec.storage_move_refusal() {
            return Err(HvError::DiskKind { id, op: OP, reason });
        }
        let pool = self.inner.config.shared_dir.clone();
        if from != to && to == Storage::Shared && pool.is_none() {
            return Err(refuse(id, "this host has no shared pool"));
        }
        let (state, pid) = self.observe_and_remember(&guest, &dir, &mut slot).await.map_err(backend(OP, id))?;
        {
            let mut mover = Mover {
                hv: self,
                dir: &dir,
                slot: &mut slot,
                config: config.clone(),
                pool: pool.as_deref(),
                undo: Vec::new(),
            };
            mover.finish_interrupted(pid, from).await.map_err(backend(OP, id))?;
        }
        if from == to {
            return Ok(StorageMoved { from, to, live: pid.is_some(), bytes: 0, duration_ms: 0 });
        }
        if dir.root().join("outgoing").exists() {
            return Err(refuse(id, "it is being migrated; move its disks before or after"));
        }
        let live = match (state, pid) {
            (RuntimeState::Running | RuntimeState::Paused, Some(pid)) => {
                let status = slot.query_status(&dir, pid).await.map_err(backend(OP, id))?;
                if !matches!(status.as_str(), "running" | "paused") {
                    return Err(refuse(id, format!("its QEMU is {status:?}; a move needs it running or paused")));
                }
                Some(pid)
            }
            (RuntimeState::Stopped | RuntimeState::Crashed, None) => None,
            (state, _) => return Err(HvError::InvalidState { id, op: OP, state }),
        };
        // Raw files hold no snapshots (and `qemu-img snapshot` refuses them).
        let snapshots: BTreeSet<String> = if config.spec.first_non_qcow2_disk().is_some() {
            BTreeSet::new()
        } else {
            let mut snap = Snap { hv: self, dir: &dir, slot: &mut slot, config: config.clone(), op: OP };
            let per_disk = snap.per_disk(live).await.map_err(backend(OP, id))?;
            // A clone that was interrupted left its transient snapshot here
            // (no clone runs now: this guest's lock is ours). It is nobody's
            // snapshot: remove it rather than refuse the move over it.
            for name in &transient(&per_disk) {
                snap.remove(live, name).await.map_err(backend(OP, id))?;
            }
            per_disk.into_iter().flatten().map(|s| s.name).filter(|n| !is_transient(n)).collect()
        };
        if !snapshots.is_empty() {
            let names: Vec<String> = snapshots.into_iter().collect();
            return Err(refuse(
                id,
                format!(
                    "it has internal snapshots ({}), which live inside its disk files and a copy would drop; \
                     delete them first",
                    names.join(", ")
                ),
            ));
        }
        let disks = config.spec.disks.len();
        let formats: Vec<DiskFormat> = config.spec.disks.iter().map(|d| d.format).collect();
        let format = |i: usize| formats[i];
        // Only while the guest is on the shared pool: its directory there.
        let old_pool_dir = match from {
            Storage::Shared => Some(
                std::fs::read_link(dir.shared_link())
                    .map_err(|e| backend(OP, id)(QemuError::io("reading the link", dir.shared_link(), e)))?,
            ),
            Storage::Local => None,
        };
        // Resolved now: the link is gone once the move commits.
        let old: Vec<PathBuf> = (0..disks)
            .map(|i| match &old_pool_dir {
                Some(pool_dir) => pool_dir.join(disk_file_name(i, format(i))),
                None => dir.local_disk_path(i, format(i)),
            })
            .collect();
        let new: Vec<PathBuf> = (0..disks)
            .map(|i| match (to, &pool) {
                (Storage::Shared, Some(pool)) => dir.pool_disk_path(pool, i, format(i)),
                _ => dir.local_disk_path(i, format(i)),
            })
            .collect();
        if let (Storage::Shared, Some(pool)) = (to, &pool) {
            let target = dir.pool_dir(pool);
            std::fs::create_dir_all(&target).map_err(|e| backend(OP, id)(QemuError::io("creating", &target, e)))?;
        }
        tracing::info!(guest = %id, %from, %to, live = live.is_some(), disks, "moving the guest's disks");
        let started = Instant::now();
        let mut mover = Mover { hv: self, dir: &dir, slot: &mut slot, config, pool: pool.as_deref(), undo: Vec::new() };
        let moved = match live {
            Some(pid) => mover.live(pid, from, to, &old, &new).await,
            None => mover.offline(from, to, &old, &new).await,
        };
        let bytes = match moved {
            // What the new files hold: the data the copy wrote (the
            // mirror's own count is the disks' whole virtual size).
            Ok(()) => new.iter().map(|p| allocated(p)).sum(),
            Err(e) => {
                // The guest's directory on the pool, if we made it and it
                // holds nothing (remove_dir refuses otherwise).
                if let (Storage::Shared, Some(pool)) = (to, &pool) {
                    let _ = std::fs::remove_dir(dir.pool_dir(pool));
                }
                return Err(backend(OP, id)(e));
            }
        };
        // Committed and switched: the old files are nobody's now.
        for path in &old {
            if let Err(e) = remove_file(path) {
                tracing::warn!(guest = %id, error = %e, "cannot remove a disk file the guest moved away from");
            }
        }
        if let Some(old_dir) = old_pool_dir
            && let Err(e) = std::fs::remove_dir(&old_dir)
        {
            tracing::warn!(guest = %id, dir = %old_dir.display(), error = %e, "cannot remove the guest's old directory on the shared pool");
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(guest = %id, %from, %to, bytes, duration_ms, "moved the guest's disks");
        Ok(StorageMoved { from, to, live: live.is_some(), bytes, duration_ms })
    }
}

/// One move in progress on a guest whose lock we hold.
struct Mover<'a> {
    hv: &'a QemuHypervisor,
    dir: &'a GuestDir,
    slot: &'a mut Slot,
    /// The record as it was before the move.
    config: GuestConfig,
    pool: Option<&'a Path>,
    undo: Vec<Undo>,
}

impl Mover<'_> {
    async fn qmp(&mut self, pid: u32, command: &str, args: Value) -> Result<Value, QemuError> {
        let args = if args.is_null() { None } else { Some(args) };
        self.slot.execute(self.dir, pid, command, args).await
    }

    /// The commit: the link, then the record.
    fn commit(&mut self, from: Storage, to: Storage) -> Result<(), QemuError> {
        flip(self.dir, to, self.pool)?;
        let mut moved = self.config.clone();
        moved.spec.storage = to;
        if let Err(e) = self.dir.write_record(&moved) {
            // Not committed after all: the link goes back.
            if let Err(back) = flip(self.dir, from, self.pool) {
                tracing::error!(error = %back, "cannot take back the link of a move whose record was not written");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Takes a commit back (only while the old files are still current).
    fn uncommit(&mut self, from: Storage) {
        if let Err(e) = flip(self.dir, from, self.pool) {
            tracing::error!(error = %e, "cannot take back the link of a failed move");
        }
        if let Err(e) = self.dir.write_record(&self.config) {
            tracing::error!(error = %e, "cannot take back the record of a failed move");
        }
    }

    /// A guest without a process: copy each file, commit.
    async fn offline(&mut self, from: Storage, to: Storage, old: &[PathBuf], new: &[PathBuf]) -> Result<(), QemuError> {
        let result = match self.copy_files(old, new).await {
            Ok(()) => self.commit(from, to),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.roll_back(None).await;
        }
        result
    }

    async fn copy_files(&mut self, old: &[PathBuf], new: &[PathBuf]) -> Result<(), QemuError> {
        let qemu_img_path = self.hv.inner.config.qemu_img.clone();
        let formats: Vec<&'static str> = self.config.spec.disks.iter().map(|d| d.format.as_str()).collect();
        for ((src, dst), format) in old.iter().zip(new).zip(formats) {
            let tmp = PathBuf::from(format!("{}.moving", dst.display()));
            remove_file(&tmp)?;
            remove_file(dst)?;
            self.undo.push(Undo::RemoveFile(tmp.clone()));
            // The same format as it is: a raw file stays raw (and sparse).
            let src = src.display().to_string();
            qemu_img(&qemu_img_path, &["convert", "-q", "-f", format, "-O", format, &src], &tmp).await?;
            std::fs::rename(&tmp, dst).map_err(|e| QemuError::io("renaming into place", dst, e))?;
            self.undo.push(Undo::RemoveFile(dst.clone()));
        }
        Ok(())
    }

    /// A guest with a process: mirror, commit, pivot.
    async fn live(
        &mut self,
        pid: u32,
        from: Storage,
        to: Storage,
        old: &[PathBuf],
        new: &[PathBuf],
    ) -> Result<(), QemuError> {
        let old_nodes = match self.mirror(pid, new).await {
            Ok(nodes) => nodes,
            Err(e) => {
                self.roll_back(Some(pid)).await;
                return Err(e);
            }
        };
        if let Err(e) = self.commit(from, to) {
            self.roll_back(Some(pid)).await;
            return Err(e);
        }
        let disks = new.len();
        match self.pivot(pid, disks).await {
            Ok(()) => {
                for node in old_nodes {
                    if let Err(e) = self.qmp(pid, "blockdev-del", json!({ "node-name": node })).await {
                        tracing::warn!(%node, error = %e, "cannot close an image node the guest moved away from");
                    }
                }
                Ok(())
            }
            Err((0, e)) => {
                // No disk switched: QEMU still writes the old files, which
                // are as current as ever.
                self.uncommit(from);
                self.roll_back(Some(pid)).await;
                Err(e)
            }
            Err((pivoted, e)) => {
                // Some disks read the new files and some the old: neither
                // pool holds the whole guest. Keep every file.
                self.undo.clear();
                tracing::error!(pivoted, disks, error = %e, old = ?old, new = ?new,
                    "a storage move switched only some disks; all files kept, the guest needs an operator");
                Err(QemuError::Job {
                    job: JOB_PREFIX.into(),
                    error: format!(
                        "only {pivoted} of {disks} disks switched to the new pool ({e}); every file is kept, \
                         the guest needs an operator before it restarts"
                    ),
                })
            }
        }
    }

    /// Starts a mirror of every disk into a new file and waits until all
    /// are ready; the image nodes the mirrors will replace.
    async fn mirror(&mut self, pid: u32, new: &[PathBuf]) -> Result<Vec<String>, QemuError> {
        let named = self.qmp(pid, "query-named-block-nodes", json!({ "flat": true })).await?;
        let disks = new.len();
        let roots = cmdline::root_nodes(&named, disks);
        // Before the new nodes exist: then each disk has one image node.
        let images: Vec<String> = (0..disks).map(|i| cmdline::image_node(&named, i)).collect();
        let stamp = unix_ms();
        for (i, path) in new.iter().enumerate() {
            let image = images[i].clone();
            let size = named
                .as_array()
                .and_then(|all| all.iter().find(|n| n["node-name"] == image.as_str()))
                .and_then(|n| n["image"]["virtual-size"].as_u64())
                .ok_or_else(|| QemuError::Job {
                    job: job(i),
                    error: format!("QEMU does not report the size of node {image}"),
                })?;
            remove_file(path)?;
            self.undo.push(Undo::RemoveFile(path.clone()));
            let disk = self.config.spec.disks.get(i).cloned().unwrap_or_else(|| DiskSpec::qcow2(ByteSize(size)));
            create_disk_file(&self.hv.inner.config.qemu_img, path, disk.format, ByteSize(size), None).await?;
            let node = format!("disk{i}-m{stamp}");
            self.qmp(pid, "blockdev-add", cmdline::image_blockdev_json(&node, &disk, path)).await?;
            self.undo.push(Undo::BlockdevDel(node.clone()));
            // An earlier move's job that nobody dismissed would block the id.
            let _ = self.qmp(pid, "job-dismiss", json!({ "id": job(i) })).await;
            self.qmp(
                pid,
                "blockdev-mirror",
                json!({ "job-id": job(i), "device": roots[i], "target": node, "replaces": image,
                        "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false }),
            )
            .await?;
            self.undo.push(Undo::EndJob(job(i)));
        }
        let mut stall = Stall::new();
        loop {
            let jobs = self.jobs(pid).await?;
            let mut done = 0;
            let mut ready = 0;
            for i in 0..disks {
                let j = jobs.iter().find(|j| j["device"] == job(i).as_str());
                let Some(j) = j.filter(|j| !matches!(j["status"].as_str(), Some("concluded" | "aborting" | "null")))
                else {
                    let error = j.and_then(|j| j["error"].as_str()).unwrap_or("it ended before it was ready");
                    return Err(QemuError::Job { job: job(i), error: error.to_owned() });
                };
                done += u(j, "/offset");
                if j["ready"].as_bool() == Some(true) {
                    ready += 1;
                }
            }
            stall.check(done, "mirroring the disks to the new pool")?;
            if ready == disks {
                return Ok(images);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn jobs(&mut self, pid: u32) -> Result<Vec<Value>, QemuError> {
        let jobs = self.qmp(pid, "query-block-jobs", Value::Null).await?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["device"].as_str().is_some_and(|d| d.starts_with(JOB_PREFIX)))
            .cloned()
            .collect())
    }

    /// Switches every disk to its mirror's target. On failure, how many
    /// disks did switch, and why the rest did not.
    async fn pivot(&mut self, pid: u32, disks: usize) -> Result<(), (usize, QemuError)> {
        let mut failure = None;
        for i in 0..disks {
            if let Err(e) = self.qmp(pid, "block-job-complete", json!({ "device": job(i) })).await {
                failure.get_or_insert(e);
            }
        }
        let deadline = Instant::now() + END_TIMEOUT;
        let mut pivoted = 0;
        loop {
            let jobs = match self.jobs(pid).await {
                Ok(j) => j,
                Err(e) => return Err((pivoted, e)),
            };
            let concluded: Vec<&Value> = jobs.iter().filter(|j| j["status"] == "concluded").collect();
            if concluded.len() == disks || Instant::now() > deadline {
                pivoted = concluded.iter().filter(|j| j.get("error").is_none()).count();
                for j in &concluded {
                    if let Some(error) = j["error"].as_str() {
                        failure.get_or_insert(QemuError::Job {
                            job: j["device"].as_str().unwrap_or(JOB_PREFIX).to_owned(),
                            error: error.to_owned(),
                        });
                    }
                }
                if concluded.len() < disks {
                    failure.get_or_insert(QemuError::Timeout {
                        what: "switching to the new disks".into(),
                        after: END_TIMEOUT,
                    });
                }
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        for i in 0..disks {
            let _ = self.qmp(pid, "job-dismiss", json!({ "id": job(i) })).await;
        }
        match failure {
            None => {
                self.undo.clear();
                Ok(())
            }
            Some(e) => Err((pivoted, e)),
        }
    }

    /// Settles what an interrupted move (an agent that died half-way)
    /// left in the guest's QEMU, given the pool its link names now
    /// (`current`). Mirrors into files on that pool were committed (the
    /// link flipped while they were in sync): the switch is made now.
    /// Mirrors into files elsewhere never were: they are ended, and their
    /// nodes and files removed. Then image nodes that are no disk's any
    /// more are closed, and, for a guest on the shared pool, local disk
    /// files left behind removed. (Leftovers on the shared pool are left
    /// for an operator: another host might use them, for all this one
    /// knows.)
    async fn finish_interrupted(&mut self, pid: Option<u32>, current: Storage) -> Result<(), QemuError> {
        let disks = self.config.spec.disks.len();
        if let Some(pid) = pid {
            let jobs = self.jobs(pid).await?;
            if !jobs.is_empty() {
                let named = self.qmp(pid, "query-named-block-nodes", json!({ "flat": true })).await?;
                // The node each disk's mirror writes: its latest moved one.
                let targets: Vec<Option<(String, PathBuf)>> = (0..disks)
                    .map(|i| {
                        let node = cmdline::image_node(&named, i);
                        let file = named
                            .as_array()
                            .and_then(|all| all.iter().find(|n| n["node-name"] == node.as_str()))
                            .and_then(|n| n["file"].as_str())
                            .map(PathBuf::from);
                        node.starts_with(&format!("disk{i}-m")).then_some(node).zip(file)
                    })
                    .collect();
                let here: Vec<PathBuf> = (0..disks).map(|i| self.path_on(current, i)).collect();
                let committed = jobs.len() == disks
                    && jobs.iter().all(|j| j["ready"].as_bool() == Some(true))
                    && targets.iter().zip(&here).all(|(t, p)| t.as_ref().is_some_and(|(_, f)| f == p));
                tracing::warn!(guest = %self.config.id, jobs = jobs.len(), committed,
                    "settling the mirrors of an interrupted storage move");
                if committed {
                    if let Err((pivoted, e)) = self.pivot(pid, disks).await {
                        return Err(QemuError::Job {
                            job: JOB_PREFIX.into(),
                            error: format!(
                                "finishing an interrupted move switched {pivoted} of {disks} disks ({e}); \
                                 every file is kept"
                            ),
                        });
                    }
                } else {
                    for j in &jobs {
                        if let Some(id) = j["device"].as_str() {
                            self.end_job(pid, id).await?;
                        }
                    }
                    for ((node, file), path) in targets.into_iter().flatten().zip(&here) {
                        if &file != path {
                            self.qmp(pid, "blockdev-del", json!({ "node-name": node })).await?;
                            remove_file(&file)?;
                        }
                    }
                }
            }
            // Image nodes that are no disk's current one: replaced.
            let named = self.qmp(pid, "query-named-block-nodes", json!({ "flat": true })).await?;
            let names: Vec<String> = named
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
                .collect();
            for i in 0..disks {
                let current_node = cmdline::image_node(&named, i);
                let (plain, moved) = (format!("disk{i}"), format!("disk{i}-m"));
                for stale in names.iter().filter(|n| (**n == plain || n.starts_with(&moved)) && **n != current_node) {
                    // Refused while in use (it still is the disk): harmless.
                    if self.qmp(pid, "blockdev-del", json!({ "node-name": stale })).await.is_ok() {
                        tracing::info!(node = %stale, "closed an image node an interrupted storage move replaced");
                    }
                }
            }
        }
        if current == Storage::Shared {
            for i in 0..disks {
                let path = self.dir.local_disk_path(i, self.format(i));
                if path.exists() {
                    tracing::info!(path = %path.display(), "removing a disk file an interrupted storage move left");
                    remove_file(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Where disk `i` is when the guest's disks are on `pool`.
    fn path_on(&self, pool: Storage, i: usize) -> PathBuf {
        match (pool, std::fs::read_link(self.dir.shared_link()), self.pool) {
            (Storage::Local, _, _) => self.dir.local_disk_path(i, self.format(i)),
            (Storage::Shared, Ok(link), _) => link.join(disk_file_name(i, self.format(i))),
            (Storage::Shared, Err(_), Some(pool)) => self.dir.pool_disk_path(pool, i, self.format(i)),
            (Storage::Shared, Err(_), None) => self.dir.disk_path(i, self.format(i)),
        }
    }

    /// The format of disk `i` (qcow2 for one the record does not name).
    fn format(&self, i: usize) -> DiskFormat {
        self.config.spec.disks.get(i).map_or(DiskFormat::Qcow2, |d| d.format)
    }

    /// Undoes the steps done so far, newest first; failures are logged
    /// (the guest runs on its old files whatever is left).
    async fn roll_back(&mut self, pid: Option<u32>) {
        while let Some(step) = self.undo.pop() {
            let result = match (&step, pid) {
                (Undo::RemoveFile(path), _) => remove_file(path),
                (Undo::BlockdevDel(node), Some(pid)) => {
                    self.qmp(pid, "blockdev-del", json!({ "node-name": node })).await.map(drop)
                }
                (Undo::EndJob(id), Some(pid)) => self.end_job(pid, id).await,
                (_, None) => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(?step, error = %e, "cannot undo a step of a failed storage move");
            }
        }
    }

    /// Cancels a mirror without switching (forced: a target that fails
    /// must not hold it up) and dismisses it once it has ended.
    async fn end_job(&mut self, pid: u32, id: &str) -> Result<(), QemuError> {
        let _ = self.qmp(pid, "block-job-cancel", json!({ "device": id, "force": true })).await;
        let deadline = Instant::now() + END_TIMEOUT;
        loop {
            let jobs = self.jobs(pid).await?;
            match jobs.iter().find(|j| j["device"] == id) {
                None => return Ok(()),
                Some(j) if j["status"] == "concluded" => {
                    self.qmp(pid, "job-dismiss", json!({ "id": id })).await?;
                    return Ok(());
                }
                Some(_) if Instant::now() > deadline => {
                    return Err(QemuError::Timeout { what: format!("cancelling the mirror {id}"), after: END_TIMEOUT });
                }
                Some(_) => tokio::time::sleep(POLL).await,
            }
        }
    }
}
