//! The in-memory mirror of the store, and the key layout.
//!
//! Keys: `hosts/<id>`, `leases/<host id>`, `guests/<id>`, `vlans/<tag, 4 digits>`, `ops/<id>`,
//! `audit/<seq, 20 digits>`, `tokens/<sha256 of token>`, `load/<guest id>` (its
//! measured load profile, see [`crate::load`]), `meta/schema`.
//! Values are JSON. The schema version in `meta/schema` guards against a
//! newer store being opened by an older manager.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use drove_model::{Guest, GuestId, HostId, HostInfo, Operation, OperationId, Vlan, VlanTag};
use drove_store::{Op, Precondition, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::TokenRecord;

pub const SCHEMA_KEY: &str = "meta/schema";
pub const SCHEMA_VERSION: u32 = 1;

pub fn host_key(id: HostId) -> String {
    format!("hosts/{id}")
}
pub fn guest_key(id: GuestId) -> String {
    format!("guests/{id}")
}
pub fn vlan_key(tag: VlanTag) -> String {
    format!("vlans/{:04}", tag.get())
}
pub fn op_key(id: OperationId) -> String {
    format!("ops/{id}")
}
pub fn audit_key(seq: u64) -> String {
    format!("audit/{seq:020}")
}
pub fn image_key(name: &str) -> String {
    format!("images/{name}")
}
pub fn lease_key(id: HostId) -> String {
    format!("leases/{id}")
}
pub fn load_key(id: GuestId) -> String {
    format!("load/{id}")
}
/// The HA settings' one record.
pub const HA_SETTINGS_KEY: &str = "settings/ha";

pub fn token_key(hash: &str) -> String {
    format!("tokens/{hash}")
}

pub fn put<T: Serialize>(key: String, value: &T) -> Op {
    // Serializing our own plain data types cannot fail.
    let value = serde_json::to_vec(value).unwrap_or_default();
    Op::Put { key, value, precondition: Precondition::Any }
}
pub fn delete(key: String) -> Op {
    Op::Delete { key, precondition: Precondition::Any }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {prefix} from the state store")]
    Store {
        prefix: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("decoding stored record {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store schema version {found} is newer than this manager understands ({SCHEMA_VERSION})")]
    Schema { found: u32 },
}

/// A host as the manager holds it: the stored record plus liveness.
#[derive(Debug, Clone)]
pub struct HostEntry {
    pub info: HostInfo,
    /// When the agent was last heard from by this manager process.
    pub last_seen: Option<Instant>,
    /// Guests the agent reports that the manager has no record of.
    pub orphans: u32,
    /// The storage pools its last heartbeat reported (not stored: the next
    /// heartbeat says again).
    pub pools: Vec<drove_api::PoolReport>,
    /// Wakes this host's long-polling heartbeat when its desired state changes.
    pub poke: std::sync::Arc<tokio::sync::Notify>,
}

impl HostEntry {
    /// Whether its last heartbeat reported the shared pool (its agent runs
    /// with `--shared-dir`).
    pub fn has_shared_pool(&self) -> bool {
        self.pools.iter().any(|p| p.name == drove_model::guest::Storage::Shared.as_str())
    }

    pub fn new(info: HostInfo) -> Self {
        HostEntry { info, last_seen: None, orphans: 0, pools: Vec::new(), poke: Default::default() }
    }

    /// Takes up, in a manager that just started, the lease the store holds
    /// for this host (`now_ms` being the wall clock now).
    ///
    /// A host the previous manager had declared down lost its lease under
    /// that manager's eyes: nobody has renewed it since, so its failover
    /// carries on at once. Every other host gets a full lease from this
    /// start, as if it had just been heard from: while no manager ran, an
    /// agent that still reached its isolation addresses kept its guests
    /// running, rightly, and must have a chance to renew (ADR 0011).
    pub fn resume_lease(&mut self, lease: &drove_model::Lease, now_ms: u64) {
        if self.info.state != drove_model::HostState::Down {
            return;
        }
        // A wall clock that went back makes `ago` 0: a full lease, the
        // safe side.
        let ago = std::time::Duration::from_millis(now_ms.saturating_sub(lease.renewed_at_ms));
        self.last_seen = Instant::now().checked_sub(ago);
    }
}

/// What the guests placed on one host hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    pub vcpus: u32,
    pub memory: u64,
    pub guests: u32,
    /// Uplink bandwidth its guests' NIC limits reserve, bits per second.
    pub nic_bps: u64,
}

impl Allocation {
    /// Reserves what a guest of `spec` takes.
    fn hold(&mut self, spec: &drove_model::GuestSpec) {
        self.vcpus += spec.vcpus;
        self.memory += spec.memory.bytes();
        self.nic_bps += spec.nic_reservation();
    }

    /// Gives back what [`Allocation::hold`] reserved.
    fn release(&mut self, spec: &drove_model::GuestSpec) {
        self.vcpus = self.vcpus.saturating_sub(spec.vcpus);
        self.memory = self.memory.saturating_sub(spec.memory.bytes());
        self.nic_bps = self.nic_bps.saturating_sub(spec.nic_reservation());
    }
}

#[derive(Debug, Default)]
pub struct Inventory {
    pub hosts: HashMap<HostId, HostEntry>,
    pub host_names: HashMap<String, HostId>,
    pub guests: HashMap<GuestId, Guest>,
    pub guest_names: HashMap<String, GuestId>,
    /// The operation currently driving each guest, if any.
    pub active_ops: HashMap<GuestId, OperationId>,
    pub vlans: BTreeMap<VlanTag, Vlan>,
    pub images: BTreeMap<String, drove_model::image::Image>,
    pub ops: HashMap<OperationId, Operation>,
    pub macs: HashSet<String>,
    /// The addresses NICs hold, per VLAN (IPAM).
    pub addresses: HashMap<VlanTag, std::collections::BTreeSet<std::net::Ipv4Addr>>,
    /// Where each VLAN's next-fit allocation continues (not persisted).
    pub address_cursor: HashMap<VlanTag, std::net::Ipv4Addr>,
    pub tokens: HashMap<String, TokenRecord>,
    /// The guests placed on each host.
    pub by_host: HashMap<HostId, std::collections::BTreeSet<GuestId>>,
    /// Guests whose pending stop should be forced (not persisted: a
    /// restarted manager falls back to a graceful stop).
    pub force_stop: HashSet<GuestId>,
    /// Resources held on each host by the guests placed there.
    pub allocated: HashMap<HostId, Allocation>,
    pub ha: drove_api::HaSettings,
    /// Next audit sequence number.
    pub audit_seq: u64,
    /// Hash of the last audit record: the next one links to it.
    pub audit_last_hash: String,
    /// Each guest's measured load profile.
    pub load: HashMap<GuestId, crate::load::LoadEntry>,
}

async fn load_all<T: DeserializeOwned>(store: &dyn Store, prefix: &'static str) -> Result<Vec<(String, T)>, LoadError> {
    let (kvs, _) = store.list(prefix).await.map_err(|source| LoadError::Store { prefix, source })?;
    kvs.into_iter()
        .map(|kv| {
            let v = serde_json::from_slice(&kv.value)
                .map_err(|source| LoadError::Decode { key: kv.key.clone(), source })?;
            Ok((kv.key, v))
        })
        .collect()
}

impl Inventory {
    /// Rebuild the inventory from the store.
    pub async fn load(store: &dyn Store) -> Result<(Inventory, Vec<Op>), LoadError> {
        let mut init = Vec::new();
        match store.get(SCHEMA_KEY).await.map_err(|source| LoadError::Store { prefix: SCHEMA_KEY, source })? {
            Some(kv) => {
                let found: u32 = serde_json::from_slice(&kv.value)
                    .map_err(|source| LoadError::Decode { key: kv.key.clone(), source })?;
                if found > SCHEMA_VERSION {
                    return Err(LoadError::Schema { found });
                }
            }
            None => init.push(put(SCHEMA_KEY.to_owned(), &SCHEMA_VERSION)),
        }
        let mut inv = Inventory::default();
        for (_, info) in load_all::<HostInfo>(store, "hosts/").await? {
            inv.host_names.insert(info.name.clone(), info.id);
            inv.hosts.insert(info.id, HostEntry::new(info));
        }
        for (_, lease) in load_all::<drove_model::Lease>(store, "leases/").await? {
            if let Some(h) = inv.hosts.get_mut(&lease.host) {
                h.resume_lease(&lease, crate::now_ms());
            }
        }
        for (_, g) in load_all::<Guest>(store, "guests/").await? {
            inv.index_guest(&g);
            inv.guests.insert(g.id, g);
        }
        for (key, profile) in load_all::<drove_model::MeasuredLoad>(store, "load/").await? {
            match key.strip_prefix("load/").and_then(|id| id.parse::<GuestId>().ok()) {
                Some(id) if inv.guests.contains_key(&id) => {
                    inv.load.insert(id, crate::load::LoadEntry::loaded(profile));
                }
                // Its guest's deletion and this record's are one
                // transaction, so this is a record nothing refers to:
                // dropped rather than kept for ever.
                _ => init.push(delete(key)),
            }
        }
        for (_, v) in load_all::<Vlan>(store, "vlans/").await? {
            inv.vlans.insert(v.tag, v);
        }
        for (_, op) in load_all::<Operation>(store, "ops/").await? {
            if !op.state.is_final() {
                inv.active_ops.insert(GuestId::from_uuid(op.target), op.id);
            }
            inv.ops.insert(op.id, op);
        }
        for (_, img) in load_all::<drove_model::image::Image>(store, "images/").await? {
            inv.images.insert(img.name.clone(), img);
        }
        for (_, t) in load_all::<TokenRecord>(store, "tokens/").await? {
            inv.tokens.insert(t.hash.clone(), t);
        }
        if let Some(kv) =
            store.get(HA_SETTINGS_KEY).await.map_err(|source| LoadError::Store { prefix: HA_SETTINGS_KEY, source })?
        {
            inv.ha = serde_json::from_slice(&kv.value)
                .map_err(|source| LoadError::Decode { key: kv.key.clone(), source })?;
        }
        let (audit, _) = store.list("audit/").await.map_err(|source| LoadError::Store { prefix: "audit/", source })?;
        inv.audit_seq =
            audit.last().and_then(|kv| kv.key.strip_prefix("audit/")?.parse::<u64>().ok()).map_or(1, |s| s + 1);
        inv.audit_last_hash = match audit.last() {
            Some(kv) => {
                serde_json::from_slice::<drove_api::AuditRecord>(&kv.value)
                    .map_err(|source| LoadError::Decode { key: kv.key.clone(), source })?
                    .hash
            }
            None => drove_api::AuditRecord::GENESIS.to_owned(),
        };
        Ok((inv, init))
    }

    /// Indexes guest `g`: its name, host, the room it holds, and its NICs'
    /// MACs and addresses (those of a NIC a pending change adds too: its
    /// host may have it already, so no other guest may get them).
    pub fn index_guest(&mut self, g: &Guest) {
        self.guest_names.insert(g.spec.name.clone(), g.id);
        self.by_host.entry(g.host).or_default().insert(g.id);
        let a = self.allocated.entry(g.host).or_default();
        a.hold(&g.spec);
        a.guests += 1;
        // A migration holds its room on the target until it ends.
        if let Some(m) = g.migration.as_ref().filter(|m| m.target != g.host) {
            self.allocated.entry(m.target).or_default().hold(&g.spec);
        }
        for nic in nics_held(g) {
            self.macs.insert(nic.mac.clone());
            if let Some(a) = nic.address {
                self.addresses.entry(nic.vlan).or_default().insert(a.ip);
                self.address_cursor.insert(nic.vlan, std::net::Ipv4Addr::from(u32::from(a.ip).wrapping_add(1)));
            }
        }
    }

    pub fn unindex_guest(&mut self, g: &Guest) {
        self.guest_names.remove(&g.spec.name);
        if let Some(set) = self.by_host.get_mut(&g.host) {
            set.remove(&g.id);
        }
        if let Some(a) = self.allocated.get_mut(&g.host) {
            a.release(&g.spec);
            a.guests = a.guests.saturating_sub(1);
        }
        if let Some(m) = g.migration.as_ref().filter(|m| m.target != g.host)
            && let Some(t) = self.allocated.get_mut(&m.target)
        {
            t.release(&g.spec);
        }
        for nic in nics_held(g) {
            self.release_nic(nic);
        }
    }

    /// Frees a NIC's MAC and address for other guests.
    pub fn release_nic(&mut self, nic: &drove_model::NicSpec) {
        self.macs.remove(&nic.mac);
        if let (Some(a), Some(set)) = (nic.address, self.addresses.get_mut(&nic.vlan)) {
            set.remove(&a.ip);
        }
    }

    /// The anti-affinity groups each host holds members of (a migrating
    /// member counts on its target too).
    pub fn host_groups(&self) -> drove_placement::HostGroups {
        let mut groups = drove_placement::HostGroups::default();
        for g in self.guests.values() {
            if let Some(group) = &g.spec.anti_affinity {
                groups.entry(g.host).or_default().insert(group.clone());
                if let Some(m) = &g.migration {
                    groups.entry(m.target).or_default().insert(group.clone());
                }
            }
        }
        groups
    }

    /// Hosts that run a member of `group` other than `except`, each with
    /// one member's name.
    pub fn group_members(&self, group: &str, except: Option<GuestId>) -> Vec<(HostId, String)> {
        let mut out: Vec<(HostId, String)> = Vec::new();
        for g in self.guests.values() {
            if g.spec.anti_affinity.as_deref() != Some(group) || Some(g.id) == except {
                continue;
            }
            for h in std::iter::once(g.host).chain(g.migration.as_ref().map(|m| m.target)) {
                if !out.iter().any(|(x, _)| *x == h) {
                    out.push((h, g.spec.name.clone()));
                }
            }
        }
        out
    }

    /// An address for a new NIC on `vlan`: `wanted` if it is free, else the
    /// next free one; `pending` holds addresses of the same request not yet
    /// indexed. `None` on a VLAN without a subnet (unless an address was
    /// asked for: that is an error).
    pub fn assign_address(
        &self,
        vlan: &drove_model::Vlan,
        wanted: Option<std::net::Ipv4Addr>,
        pending: &[std::net::Ipv4Addr],
    ) -> Result<Option<drove_model::NicAddress>, drove_model::vlan::IpamError> {
        let held = self.addresses.get(&vlan.tag);
        let used = |ip| pending.contains(&ip) || held.is_some_and(|s| s.contains(&ip));
        match wanted {
            Some(ip) => vlan.claim(ip, used).map(Some),
            None => vlan.allocate(used, self.address_cursor.get(&vlan.tag).copied()),
        }
    }

    /// Tell `host`'s agent that its desired state changed.
    pub fn poke(&self, host: HostId) {
        if let Some(h) = self.hosts.get(&host) {
            h.poke.notify_one();
        }
    }

    /// Find a guest by id or name.
    pub fn find_guest(&self, key: &str) -> Option<&Guest> {
        if let Some(g) = key.parse::<GuestId>().ok().and_then(|id| self.guests.get(&id)) {
            return Some(g);
        }
        self.guest_names.get(key).and_then(|id| self.guests.get(id))
    }

    /// Find a host by id or name.
    pub fn find_host(&self, key: &str) -> Option<&HostEntry> {
        if let Some(h) = key.parse::<HostId>().ok().and_then(|id| self.hosts.get(&id)) {
            return Some(h);
        }
        self.host_names.get(key).and_then(|id| self.hosts.get(id))
    }

    /// Find a VLAN by id or name.
    pub fn find_vlan(&self, key: &str) -> Option<&Vlan> {
        if let Ok(tag) = key.parse::<u32>() {
            return VlanTag::new(tag).ok().and_then(|t| self.vlans.get(&t));
        }
        self.vlans.values().find(|v| v.name == key)
    }
}

/// The NICs whose MACs and addresses guest `g` holds: its spec's, and those
/// a pending change adds.
fn nics_held(g: &Guest) -> impl Iterator<Item = &drove_model::NicSpec> {
    g.spec.nics.iter().chain(pending_nics(g))
}

/// The NICs only guest `g`'s pending change has (a hot-added one).
pub fn pending_nics(g: &Guest) -> impl Iterator<Item = &drove_model::NicSpec> {
    let pending = g.pending_spec.iter().flat_map(|p| p.spec.nics.iter());
    pending.filter(|n| !g.spec.nics.iter().any(|s| s.mac == n.mac))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use drove_model::{ByteSize, HostInfo, HostState, HypervisorKind, Lease};

    use super::HostEntry;

    fn host(state: HostState) -> HostEntry {
        HostEntry::new(HostInfo {
            id: drove_model::HostId::new_v4(),
            name: "h".into(),
            cores: 2,
            memory: ByteSize::gib(1),
            hypervisor: HypervisorKind::Sim,
            state,
            registered_at: String::new(),
            uplink_bps: None,
            migration_address: None,
        })
    }

    fn lease(h: &HostEntry, renewed_at_ms: u64) -> Lease {
        Lease { host: h.info.id, renewed_at_ms, expires_at_ms: renewed_at_ms + 5000 }
    }

    #[test]
    fn a_host_down_under_the_old_manager_stays_silent_since_its_last_renewal() {
        let mut h = host(HostState::Down);
        h.resume_lease(&lease(&h, 100_000), 130_000);
        let silent = h.last_seen.expect("back-dated").elapsed();
        assert!(silent >= Duration::from_secs(30) && silent < Duration::from_secs(31), "{silent:?}");
    }

    #[test]
    fn a_host_up_at_the_restart_gets_a_full_lease_from_the_start() {
        for state in [HostState::Up, HostState::Maintenance] {
            let mut h = host(state);
            h.resume_lease(&lease(&h, 100_000), 130_000);
            assert_eq!(h.last_seen, None, "{state}: not a fresh lease");
        }
    }

    #[tokio::test]
    async fn a_load_profile_without_its_guest_is_dropped_at_load() {
        use drove_store::Store;
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = drove_store::embedded::EmbeddedStore::open(&dir.path().join("state.redb")).expect("a store");
        let orphan = drove_model::GuestId::new_v4();
        store
            .txn(vec![super::put(super::load_key(orphan), &drove_model::MeasuredLoad::default())])
            .await
            .expect("written");
        let (inv, init) = super::Inventory::load(&store).await.expect("loads");
        assert!(inv.load.is_empty());
        let deletes: Vec<&str> = init
            .iter()
            .filter_map(|op| match op {
                drove_store::Op::Delete { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deletes, [super::load_key(orphan)]);
    }

    #[test]
    fn a_clock_that_went_back_errs_on_the_side_of_a_full_lease() {
        let mut h = host(HostState::Down);
        h.resume_lease(&lease(&h, 200_000), 130_000);
        assert!(h.last_seen.expect("set").elapsed() < Duration::from_secs(1));
    }
}
