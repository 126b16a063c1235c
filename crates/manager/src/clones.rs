//! Clones and templates.
//!
//! A clone is a new guest whose disks its host makes from another guest's
//! (`GuestSpec::clone_of`), on the source's pool. It is placed on the
//! source's host, unless the source's disks are on the shared pool and no
//! QEMU writes them (a template, or a stopped guest): then any host that
//! sees the pool can read them there (`CloneSource::shared_disks`), the one
//! asked for or one placement chooses per clone. A running source's instant
//! is taken by its own QEMU, so its clones stay on its host. It is created
//! by the create operation itself, so it is as durable and undoable as any
//! create:
//!
//! ```text
//!  request ──► validate the source (and the host asked for); for each
//!              clone: a fresh identity (name, MACs, addresses from its
//!              VLANs' IPAM), placement (the source's host, the one asked
//!              for, or chosen), the guest record (Creating) and its create
//!              operation — all clones in one store transaction (audited)
//!          ──► the host's agent creates it: copies of the source's disks
//!              (from one instant of a running source, or at a snapshot) or
//!              thin overlays on a template's, then boots it
//!          ──► failure or timeout: the create rolls back — the host destroys
//!              whatever it made, the record goes once it confirms; a
//!              manager restart resumes from the store
//! ```
//!
//! A template is a stopped guest marked read-only: it never starts, its
//! snapshots are neither taken nor restored, and clones of it are thin
//! overlays on its disks. A guest others depend on ([`dependents`]: overlay
//! clones always, copies while they are made) is deleted only by force,
//! together with them; a snapshot a clone is being copied from is not
//! deleted at all until the copy is made. While another host copies a
//! source's disks from the shared pool ([`remote_copies`]), the source is
//! not started or changed: that host holds none of its locks.

use std::collections::HashMap;
use std::sync::Arc;

use drove_api::{CloneGuestRequest, CreateGuestRequest, GuestView, NicRequest, OperationAccepted};
use drove_model::guest::{Storage, validate_name};
use drove_model::{CloneMode, CloneSource, Guest, GuestId, GuestState, PowerIntent, SnapshotState};

use crate::core::{ApiError, Ctx, GuestAction, Manager};
use crate::inventory::{Inventory, guest_key, op_key, put};

/// The most clones one request makes.
pub const MAX_CLONES: u32 = 64;

/// The guest whose disks `g` needs now (a clone still bound to its
/// source), unless `g` is being deleted.
fn needs_disks_of(g: &Guest) -> Option<GuestId> {
    if matches!(g.state, GuestState::Deleting | GuestState::Deleted) {
        return None;
    }
    g.spec.clone_of.as_ref().filter(|c| c.binds(g.state)).map(|c| c.guest)
}

/// The guests that need `id`'s disks now, except those being deleted.
pub fn dependents(inv: &Inventory, id: GuestId) -> Vec<&Guest> {
    let mut v: Vec<&Guest> = inv.guests.values().filter(|g| needs_disks_of(g) == Some(id)).collect();
    v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    v
}

/// Every guest's [`dependents`] by name, in one pass over the inventory:
/// asking per guest is quadratic, 26 s for a list of 50,000 guests.
pub fn all_dependents(inv: &Inventory) -> HashMap<GuestId, Vec<String>> {
    let mut map: HashMap<GuestId, Vec<String>> = HashMap::new();
    for g in inv.guests.values() {
        if let Some(source) = needs_disks_of(g) {
            map.entry(source).or_default().push(g.spec.name.clone());
        }
    }
    for names in map.values_mut() {
        names.sort();
    }
    map
}

/// The clones being copied from snapshot `name` of `id`.
pub fn snapshot_users<'a>(inv: &'a Inventory, id: GuestId, name: &str) -> Vec<&'a str> {
    dependents(inv, id)
        .into_iter()
        .filter(|g| g.spec.clone_of.as_ref().and_then(|c| c.snapshot.as_deref()) == Some(name))
        .map(|g| g.spec.name.as_str())
        .collect()
}

/// The clones another host is copying from `g`'s disks on the shared pool
/// now (not overlays: only templates have those, and they never change).
pub fn remote_copies<'a>(inv: &'a Inventory, g: &Guest) -> Vec<&'a str> {
    dependents(inv, g.id)
        .into_iter()
        .filter(|d| d.host != g.host && d.spec.clone_of.as_ref().is_some_and(|c| c.mode == CloneMode::Copy))
        .map(|d| d.spec.name.as_str())
        .collect()
}

/// `id`'s dependents and theirs, the deepest first.
fn dependents_deep(inv: &Inventory, id: GuestId) -> Vec<String> {
    let mut out = Vec::new();
    for d in dependents(inv, id) {
        out.extend(dependents_deep(inv, d.id));
        out.push(d.spec.name.clone());
    }
    out
}

impl Manager {
    /// Clone guest `key` `req.count` times.
    pub async fn clone_guest(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        req: CloneGuestRequest,
    ) -> Result<Vec<OperationAccepted>, ApiError> {
        let count = req.count.unwrap_or(1);
        if !(1..=MAX_CLONES).contains(&count) {
            return Err(ApiError::invalid("count", format!("count must be 1..={MAX_CLONES}, got {count}")));
        }
        let names: Vec<String> = if count == 1 {
            vec![req.name.clone()]
        } else {
            (1..=count).map(|i| format!("{}-{i}", req.name)).collect()
        };
        for n in &names {
            validate_name(n).map_err(|r| ApiError::invalid("name", format!("guest name {n:?} {r}")))?;
        }
        let (accepted, pending) = {
            let mut inv = self.lock();
            let src = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            let source = check_source(&inv, &src, req.snapshot.as_deref())?;
            let host = clone_host(&inv, &src, &source, req.host.as_deref())?;
            let mut made: Vec<(Guest, drove_model::Operation)> = Vec::new();
            let cursors = inv.address_cursor.clone();
            for name in &names {
                let create = clone_request(&src, name, req.start, host.clone());
                let from = source.clone();
                let image = src.spec.image.clone();
                match self.admit(&mut inv, &ctx.principal, &create, move |spec| {
                    spec.image = image;
                    spec.clone_of = Some(from);
                    Ok(())
                }) {
                    Ok(pair) => made.push(pair),
                    Err(e) => {
                        // All or none.
                        for (g, op) in made.iter().rev() {
                            Self::unadmit(&mut inv, g, op);
                        }
                        inv.address_cursor = cursors;
                        return Err(e);
                    }
                }
            }
            let mut writes = Vec::new();
            for (g, op) in &made {
                writes.push(put(guest_key(g.id), g));
                writes.push(put(op_key(op.id), op));
            }
            writes.push(Self::audit_op(&mut inv, ctx, Some(format!("guest/{}", src.spec.name)), "ok", 202));
            let accepted: Vec<OperationAccepted> =
                made.into_iter().map(|(g, op)| OperationAccepted { operation: op, guest: g.id }).collect();
            (accepted, self.persister().enqueue(writes))
        };
        self.notify_ops();
        pending.durable().await?;
        Ok(accepted)
    }

    /// Mark stopped guest `key` as a template (`on`), or a template as a
    /// plain guest again (refused while thin clones depend on it).
    pub async fn set_template(&self, ctx: &Ctx, key: &str, on: bool) -> Result<GuestView, ApiError> {
        let (view, pending) = {
            let mut inv = self.lock();
            let mut g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            Self::ensure_idle(&inv, &g)?;
            if on && !(g.state == GuestState::Stopped && g.intent == PowerIntent::Stopped) {
                return Err(ApiError::conflict(format!(
                    "guest {} is {}; only a stopped guest can become a template (stop it first)",
                    g.spec.name, g.state
                )));
            }
            if !on {
                let thin: Vec<&str> = dependents(&inv, g.id)
                    .into_iter()
                    .filter(|d| d.spec.clone_of.as_ref().is_some_and(|c| c.mode == CloneMode::Overlay))
                    .map(|d| d.spec.name.as_str())
                    .collect();
                if !thin.is_empty() {
                    return Err(ApiError::conflict(format!(
                        "template {} is the base of clones ({}); it stays a template while they exist",
                        g.spec.name,
                        thin.join(", ")
                    )));
                }
            }
            g.template = on;
            inv.guests.insert(g.id, g.clone());
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("guest/{}", g.spec.name)), "ok", 200);
            let view = Self::guest_view(&inv, &g);
            (view, self.persister().enqueue(vec![put(guest_key(g.id), &g), audit]))
        };
        pending.durable().await?;
        Ok(view)
    }

    /// Delete guest `key`; `force` deletes the guests that depend on it
    /// first (their own dependents before them), each its own operation.
    pub async fn delete_guest(&self, ctx: &Ctx, key: &str, force: bool) -> Result<OperationAccepted, ApiError> {
        if force {
            let deps = {
                let inv = self.lock();
                let g = inv.find_guest(key).ok_or_else(|| ApiError::not_found("guest", key))?;
                dependents_deep(&inv, g.id)
            };
            for d in deps {
                tracing::info!(guest = key, dependent = %d, "forced delete: deleting a dependent first");
                self.guest_action(ctx, &d, GuestAction::Delete).await?;
            }
        }
        self.guest_action(ctx, key, GuestAction::Delete).await
    }
}

/// Checks that `src` can be cloned (at `snapshot`) now; the clones' source.
fn check_source(inv: &Inventory, src: &Guest, snapshot: Option<&str>) -> Result<CloneSource, ApiError> {
    let name = &src.spec.name;
    if let Some(op) = inv.active_ops.get(&src.id).and_then(|o| inv.ops.get(o)) {
        return Err(ApiError::conflict(format!(
            "guest {name} has operation {} ({}) in progress; wait for it",
            op.id, op.kind
        )));
    }
    if !matches!(src.state, GuestState::Running | GuestState::Stopped) {
        return Err(ApiError::conflict(format!(
            "guest {name} is {}; a running or stopped guest, or a template, can be cloned",
            src.state
        )));
    }
    if src.spec.disks.is_empty() {
        return Err(ApiError::conflict(format!("guest {name} has no disks to clone")));
    }
    if let Some((i, d)) = src.spec.first_block_disk() {
        return Err(ApiError::conflict(format!(
            "guest {name} cannot be cloned: its disk {i} is host block device {}, which drove neither copies \
             nor overlays (give the clone its own device)",
            d.path.as_deref().unwrap_or("?")
        )));
    }
    if !src.template
        && snapshot.is_none()
        && src.state == GuestState::Running
        && let Some((i, _)) = src.spec.first_non_qcow2_disk()
    {
        return Err(ApiError::conflict(format!(
            "guest {name} runs and its disk {i} is raw: a copy of a running guest needs a qcow2 snapshot of \
             one instant; stop it first, or make it a template (its clones are then qcow2 overlays)"
        )));
    }
    if let Some(snap) = snapshot {
        let s = src
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| ApiError::not_found(&format!("snapshot of guest {name}"), snap))?;
        if s.state != SnapshotState::Ready {
            return Err(ApiError::conflict(format!("snapshot {snap} of guest {name} is {}", s.state)));
        }
    }
    // A template's disks never change again: thin overlays on them. A
    // snapshot cannot be a backing file: a copy.
    let mode = if src.template && snapshot.is_none() { CloneMode::Overlay } else { CloneMode::Copy };
    // Another host can read its files on the shared pool unless a QEMU
    // writes them: a running source's instant (or a snapshot inside files
    // it has open) is taken by its own QEMU, on its own host.
    let shared_disks = (src.spec.storage == Storage::Shared && (src.template || src.state == GuestState::Stopped))
        .then(|| src.spec.disks.clone());
    Ok(CloneSource { guest: src.id, snapshot: snapshot.map(Into::into), mode, shared_disks })
}

/// The host the clones of `src` are made on, as a create request names it:
/// `asked` if that can be honoured, else the source's own; `None` (placement
/// chooses per clone) for a source another host can read from the shared
/// pool (`source.shared_disks`) when none is asked for.
fn clone_host(
    inv: &Inventory,
    src: &Guest,
    source: &CloneSource,
    asked: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let name = &src.spec.name;
    let src_host = inv.hosts.get(&src.host).map(|h| h.info.name.clone()).unwrap_or_else(|| src.host.to_string());
    let Some(asked) = asked else {
        return Ok(if source.shared_disks.is_some() { None } else { Some(src_host) });
    };
    let host =
        inv.find_host(asked).ok_or_else(|| ApiError::invalid("host", format!("host {asked:?} does not exist")))?;
    if host.info.id == src.host || source.shared_disks.is_some() {
        if host.info.id != src.host && !host.has_shared_pool() {
            return Err(refuse_host(format!(
                "cannot clone {name} on host {}: it reports no shared pool, where {name}'s disks are (drove agent \
                 --shared-dir); clone it on a host that has one",
                host.info.name
            )));
        }
        return Ok(Some(host.info.name.clone()));
    }
    let why = if src.spec.storage != Storage::Shared {
        format!(
            "its disks are on host {src_host}'s local pool, which no other host reads; move its disks to the shared \
             pool first (drove vm move-storage {name} --to shared), or clone it on {src_host}"
        )
    } else {
        format!(
            "it runs, and a running guest's disks are cloned by its own QEMU on host {src_host}; stop it, or make it \
             a template (drove vm template {name} on), or clone it on {src_host}"
        )
    };
    Err(refuse_host(format!("cannot clone {name} on host {}: {why}", host.info.name)))
}

fn refuse_host(message: String) -> ApiError {
    ApiError { field: Some("host".into()), ..ApiError::conflict(message) }
}

/// The create request of one clone of `src`: its size, disks and their
/// pool, NICs on the same VLANs (with new MACs and addresses, none asked
/// for), limits and policies, on `host` (`None`: placement chooses).
fn clone_request(src: &Guest, name: &str, start: Option<bool>, host: Option<String>) -> CreateGuestRequest {
    CreateGuestRequest {
        disks: src.spec.disks.iter().map(|d| d.size.into()).collect(),
        nics: src
            .spec
            .nics
            .iter()
            .map(|n| NicRequest { rate_bps: n.rate_bps, ..NicRequest::on(n.vlan.to_string()) })
            .collect(),
        host,
        storage: Some(src.spec.storage),
        priority: Some(src.spec.priority.0),
        start,
        load_profile: src.spec.load_profile.clone(),
        restart_policy: Some(src.restart_policy),
        limits: Some(src.spec.limits.clone()),
        ..CreateGuestRequest::new(name, src.spec.vcpus, src.spec.memory)
    }
}
