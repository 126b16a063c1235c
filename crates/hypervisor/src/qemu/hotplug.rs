//! Adding hardware to a running guest ([`crate::Hypervisor::hotplug`]).
//!
//! | change      | QMP, in order                                                    | room needed              |
//! |-------------|------------------------------------------------------------------|--------------------------|
//! | `AddDisk`   | (`qemu-img create`) `blockdev-add` qcow2, `object-add` throttle-group, `blockdev-add` throttle, `device_add virtio-blk-pci` | a free PCI slot |
//! | `AddNic`    | [tc on the tap] `netdev_add tap`, `device_add virtio-net-pci`    | the tap, made by the network layer |
//! | `SetVcpus`  | `device_add` of free slots from `query-hotpluggable-cpus`        | `-smp N,maxcpus=M`       |
//! | `SetMemory` | `object-add memory-backend-ram`, `device_add pc-dimm`            | `-m S,slots=K,maxmem=X`  |
//! | `GrowDisk`  | `block_resize` of the image node (the guest gets a capacity-change notice) | room on the pool |
//!
//! Devices get the ids and node names the command line gives the same
//! hardware (`disk{i}`, `vdisk{i}`, `nic{i}`, ...), so a hot-added disk or
//! NIC looks the same after a restart as before it. The room for vCPUs and
//! memory is what `cmdline::hotplug_ceilings` reserved at start.
//!
//! # Never half-applied
//!
//! Each step that leaves something behind pushes its undo; when a later
//! step fails, the undos run in reverse order. The guest's record
//! (`guest.json`) is rewritten just before the final `device_add`, the one
//! step the guest sees: a record restore is a local file write, far more
//! certain than a `device_del`, which needs the guest's cooperation. Only a
//! vCPU change adds several devices; a failure on the second unplugs the
//! first (logged if the guest does not let go).
//!
//! Refusals (`Unsupported`, or `InvalidState` for a guest that is not
//! Running) are decided before the first step, so they leave nothing.
//!
//! # What the guest must do
//!
//! PCI devices (disks, NICs) appear in the guest by ACPI PCI hotplug on the
//! `pc` machine's root bus. Hot-added vCPUs and memory appear offline in
//! guests without udev rules to online them (like the test image): the
//! guest writes `1` to `/sys/devices/system/cpu/cpuN/online` and `online`
//! to `/sys/devices/system/memory/memoryN/state`. Measured under TCG
//! (QEMU 7.2, Debian 12 kernel): both work.

use std::path::PathBuf;

use drove_model::{ByteSize, DiskSpec, GuestId, HypervisorKind, NicSpec};
use serde_json::{Value, json};

use super::cmdline::{self, MEMORY_SLOTS};
use super::guest_dir::GuestDir;
use super::{QemuError, QemuHypervisor, Slot, backend, tc};
use crate::{GuestConfig, HostResources, Hotplug, HvError, RuntimeState};

/// Memory is added in multiples of this: the x86-64 Linux memory block,
/// the unit in which a guest onlines hot-added memory. A DIMM of another
/// size would leave part of it unusable.
const MEMORY_STEP: ByteSize = ByteSize::mib(128);

const OP: &str = "hotplug";

/// A refusal: the change cannot be made, and nothing was done.
fn refuse(reason: impl Into<String>) -> HvError {
    HvError::Unsupported { op: OP, backend: HypervisorKind::Qemu, reason: reason.into() }
}

/// How to take back one step of a change.
#[derive(Debug)]
enum Undo {
    RemoveFile(PathBuf),
    ObjectDel(String),
    BlockdevDel(String),
    NetdevDel(String),
    DeviceDel(String),
    Record(Box<GuestConfig>),
    ClearTc { tap: String, ifb: String },
}

/// One change in progress on a guest whose lock we hold.
struct Plug<'a> {
    hv: &'a QemuHypervisor,
    dir: &'a GuestDir,
    slot: &'a mut Slot,
    pid: u32,
    /// The record as it was before the change.
    config: GuestConfig,
    undo: Vec<Undo>,
}

impl QemuHypervisor {
    pub(super) async fn hotplug_guest(&self, id: GuestId, change: &Hotplug) -> Result<(), HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let config = self.record(&dir, id, OP)?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend(OP, id))?;
        let (RuntimeState::Running, Some(pid)) = (state, pid) else {
            return Err(HvError::InvalidState { id, op: OP, state });
        };
        let mut plug = Plug { hv: self, dir: &dir, slot: &mut slot, pid, config, undo: Vec::new() };
        let result = match change {
            Hotplug::AddDisk { size } => plug.add_disk(*size).await,
            Hotplug::AddNic { nic } => plug.add_nic(nic).await,
            Hotplug::SetVcpus { vcpus } => plug.set_vcpus(*vcpus).await,
            Hotplug::SetMemory { memory } => plug.set_memory(*memory).await,
            Hotplug::GrowDisk { index, size } => plug.grow_disk(*index as usize, *size).await,
        };
        match result {
            Ok(()) => {
                tracing::info!(guest = %id, change = %change.describe(), "hotplugged");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(guest = %id, change = %change.describe(), error = %e, "hotplug failed; undoing it");
                plug.roll_back().await;
                Err(e)
            }
        }
    }
}

/// "gen code size USED/SIZE" of `x-query-jit`'s text, bytes.
fn jit_code_size(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("gen code size"))?;
    let (used, size) = line.trim_start_matches("gen code size").trim().split_once('/')?;
    Some((used.trim().parse().ok()?, size.trim().parse().ok()?))
}

/// Whether a hot-added vCPU can get a region of the translation cache.
/// QEMU splits the cache into regions (at most 8 per possible vCPU, at
/// least 2 MiB each); each vCPU thread fills its own and takes the next
/// free one when it is full, and the cache is flushed only when a running
/// vCPU finds none left. A new vCPU thread that finds none aborts QEMU
/// (`tcg_region_initial_alloc__locked: assertion failed`, QEMU 10.0). So a
/// vCPU is added only while a quarter of the cache is still untouched,
/// which covers the regions the running vCPUs hold partly filled.
fn jit_room_for_a_vcpu(used: u64, size: u64) -> bool {
    used.saturating_mul(4) <= size.saturating_mul(3)
}

impl Plug<'_> {
    fn id(&self) -> GuestId {
        self.config.id
    }

    fn host(&self) -> HostResources {
        let c = &self.hv.inner.config;
        HostResources { cores: c.cores, memory: c.memory }
    }

    async fn qmp(&mut self, command: &str, arguments: Value) -> Result<Value, HvError> {
        self.slot.execute(self.dir, self.pid, command, Some(arguments)).await.map_err(backend(OP, self.config.id))
    }

    async fn query(&mut self, command: &str) -> Result<Value, HvError> {
        self.slot.execute(self.dir, self.pid, command, None).await.map_err(backend(OP, self.config.id))
    }

    /// Writes the changed definition, remembering the old one.
    fn commit_record(&mut self, changed: GuestConfig) -> Result<(), HvError> {
        self.dir.write_record(&changed).map_err(backend(OP, self.config.id))?;
        self.undo.push(Undo::Record(Box::new(self.config.clone())));
        Ok(())
    }

    /// Takes back every step done, newest first. Failures are logged: the
    /// change has failed already, and the original error is the one to
    /// report.
    async fn roll_back(&mut self) {
        let id = self.id();
        while let Some(step) = self.undo.pop() {
            let result = match &step {
                Undo::RemoveFile(path) => {
                    std::fs::remove_file(path).map_err(|e| backend(OP, id)(QemuError::io("removing", path, e)))
                }
                Undo::ObjectDel(obj) => self.qmp("object-del", json!({ "id": obj })).await.map(drop),
                Undo::BlockdevDel(node) => self.qmp("blockdev-del", json!({ "node-name": node })).await.map(drop),
                Undo::NetdevDel(netdev) => self.qmp("netdev_del", json!({ "id": netdev })).await.map(drop),
                Undo::DeviceDel(dev) => self.qmp("device_del", json!({ "id": dev })).await.map(drop),
                Undo::Record(old) => self.dir.write_record(old).map_err(backend(OP, id)),
                Undo::ClearTc { tap, ifb } => tc::clear(tap, ifb).await.map_err(|e| backend(OP, id)(e.into())),
            };
            if let Err(e) = result {
                tracing::error!(guest = %id, ?step, error = %e, "cannot undo a step of a failed hotplug");
            }
        }
    }

    async fn add_disk(&mut self, size: ByteSize) -> Result<(), HvError> {
        if size.bytes() == 0 {
            return Err(refuse("a disk needs a size above zero"));
        }
        let i = self.config.spec.disks.len();
        let Some(slot) = cmdline::disk_slot(i) else {
            return Err(refuse(format!("the guest has {i} disks, the most it can have")));
        };
        let path = self.dir.disk_path(i, drove_model::DiskFormat::Qcow2);
        let qemu_img = self.hv.inner.config.qemu_img.clone();
        super::create_qcow2(&qemu_img, &path, size, None).await.map_err(backend(OP, self.id()))?;
        self.undo.push(Undo::RemoveFile(path.clone()));

        let node = format!("disk{i}");
        self.qmp(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": node, "file": { "driver": "file", "filename": path } }),
        )
        .await?;
        self.undo.push(Undo::BlockdevDel(node.clone()));
        // The same layout as the command line's (see cmdline.rs): the
        // device on a throttle node over the image, limits or not.
        let group = format!("throttle{i}");
        let mut args = json!({ "qom-type": "throttle-group", "id": group });
        for (key, value) in cmdline::throttle_props(&self.config.spec.limits) {
            args[key] = json!(value);
        }
        self.qmp("object-add", args).await?;
        self.undo.push(Undo::ObjectDel(group.clone()));
        let drive = format!("throttled{i}");
        self.qmp(
            "blockdev-add",
            json!({ "driver": "throttle", "node-name": drive, "throttle-group": group, "file": node }),
        )
        .await?;
        self.undo.push(Undo::BlockdevDel(drive.clone()));

        let mut changed = self.config.clone();
        changed.spec.disks.push(DiskSpec::qcow2(size));
        self.commit_record(changed)?;
        self.qmp(
            "device_add",
            json!({ "driver": "virtio-blk-pci", "drive": drive, "id": format!("vdisk{i}"), "serial": format!("disk{i}"),
                    "addr": slot }),
        )
        .await?;
        Ok(())
    }

    async fn grow_disk(&mut self, index: usize, size: ByteSize) -> Result<(), HvError> {
        if index >= self.config.spec.disks.len() {
            return Err(refuse(format!("the guest has no disk {index}")));
        }
        if let Some(why) = self.config.spec.grow_refusal(index) {
            return Err(refuse(why));
        }
        // What the image is now, from QEMU: a disk on a user's image may
        // have started larger than its spec said.
        let nodes = self.query("query-named-block-nodes").await?;
        let node = cmdline::image_node(&nodes, index);
        let current = nodes
            .as_array()
            .and_then(|all| all.iter().find(|n| n["node-name"] == node.as_str()))
            .and_then(|n| n["image"]["virtual-size"].as_u64())
            .ok_or_else(|| refuse(format!("QEMU does not report the size of node {node}")))?;
        if size.bytes() <= current {
            return Err(refuse(format!(
                "disk {index} is {}; it can only grow (shrinking cuts off data), not to {size}",
                ByteSize(current)
            )));
        }
        if !size.bytes().is_multiple_of(512) {
            return Err(refuse(format!("a disk size is whole 512-byte sectors, not {} bytes", size.bytes())));
        }
        // The node the device reads from: only a resize there reaches the
        // guest (a filter over the image passes the new length through,
        // but the device hears only of its own node's resize).
        let root = cmdline::root_nodes(&nodes, index + 1).pop().unwrap_or(node);
        let mut changed = self.config.clone();
        changed.spec.grow_disk_to(index, size);
        self.commit_record(changed)?;
        self.qmp("block_resize", json!({ "node-name": root, "size": size.bytes() })).await?;
        Ok(())
    }

    async fn add_nic(&mut self, nic: &NicSpec) -> Result<(), HvError> {
        let mac = nic.mac.as_str();
        if !is_mac(mac) {
            return Err(refuse(format!("{mac:?} is not a MAC address (six hex pairs separated by colons)")));
        }
        let Some(slot) = cmdline::nic_slot(self.config.spec.nics.len()) else {
            return Err(refuse(format!("the guest has {} NICs, the most it can have", self.config.spec.nics.len())));
        };
        if self.config.spec.nics.iter().any(|n| n.mac.eq_ignore_ascii_case(mac)) {
            return Err(refuse(format!("the guest already has a NIC with MAC {mac}")));
        }
        let id = self.id();
        let i = self.config.spec.nics.len();
        let tap = QemuHypervisor::tap_name(id, i);
        if !drove_net::cmd::device_exists(&tap) {
            return Err(refuse(format!(
                "no tap {tap} exists on this host for NIC {i} of the guest; the network layer must create it \
                 before the NIC can be added"
            )));
        }
        if let Some(rate) = nic.effective_rate(&self.config.spec.limits) {
            let ifb = tc::ifb_name(id, i);
            tc::apply(&tap, &ifb, rate).await.map_err(|e| backend(OP, id)(e.into()))?;
            self.undo.push(Undo::ClearTc { tap: tap.clone(), ifb });
        }
        let netdev = format!("net{i}");
        self.qmp(
            "netdev_add",
            json!({ "type": "tap", "id": netdev, "ifname": tap, "script": "no", "downscript": "no" }),
        )
        .await?;
        self.undo.push(Undo::NetdevDel(netdev.clone()));

        let mut changed = self.config.clone();
        changed.spec.nics.push(nic.clone());
        self.commit_record(changed)?;
        self.qmp(
            "device_add",
            json!({ "driver": "virtio-net-pci", "netdev": netdev, "id": format!("nic{i}"), "mac": nic.mac, "addr": slot }),
        )
        .await?;
        Ok(())
    }

    async fn set_vcpus(&mut self, vcpus: u32) -> Result<(), HvError> {
        let current = self.config.spec.vcpus;
        if vcpus < current {
            return Err(refuse(format!(
                "vCPUs can only be added while running, not removed: the guest has {current}, {vcpus} asked"
            )));
        }
        if vcpus == current {
            return Ok(());
        }
        // Not a QEMU on TCG (KVM has no translation cache): nothing to check.
        if let Ok(jit) = self.slot.execute(self.dir, self.pid, "x-query-jit", None).await {
            let text = jit.get("human-readable-text").and_then(Value::as_str).unwrap_or_default();
            if let Some((used, size)) = jit_code_size(text)
                && !jit_room_for_a_vcpu(used, size)
            {
                return Err(refuse(format!(
                    "the guest's TCG translation cache is nearly full ({} of {} MiB): QEMU cannot start a vCPU \
                     then; try again after the cache is flushed, or restart the guest with more vCPUs",
                    used >> 20,
                    size >> 20
                )));
            }
        }
        let slots = self.query("query-hotpluggable-cpus").await?;
        let slots = slots.as_array().cloned().unwrap_or_default();
        let present = slots.iter().filter(|s| s.get("qom-path").is_some()).count();
        let mut free: Vec<&Value> = slots.iter().filter(|s| s.get("qom-path").is_none()).collect();
        // Lowest topology ids first, as a boot with more vCPUs would fill them.
        free.sort_by_key(|s| {
            let p = |k: &str| s["props"].get(k).and_then(Value::as_u64).unwrap_or(0);
            (p("socket-id"), p("die-id"), p("core-id"), p("thread-id"))
        });
        let wanted = usize::try_from(vcpus).unwrap_or(usize::MAX).saturating_sub(present);
        if wanted > free.len() {
            return Err(refuse(format!(
                "the guest was started with room for {} vCPUs (maxcpus: twice its boot vCPUs, at most the \
                 host's cores and {}); {vcpus} needs a restart with more vCPUs defined",
                slots.len(),
                cmdline::MAX_HOTPLUG_VCPUS
            )));
        }
        let adds: Vec<Value> = free
            .into_iter()
            .take(wanted)
            .map(|s| {
                let mut args = s["props"].clone();
                let p = |k: &str| args.get(k).and_then(Value::as_u64).unwrap_or(0);
                let dev = cmdline::cpu_device_id(p("socket-id"), p("core-id"), p("thread-id"));
                args["driver"] = s["type"].clone();
                args["id"] = json!(dev);
                args
            })
            .collect();

        let mut changed = self.config.clone();
        changed.spec.grow_vcpus_to(vcpus);
        self.commit_record(changed)?;
        for args in adds {
            let dev = args["id"].as_str().unwrap_or_default().to_owned();
            self.qmp("device_add", args).await?;
            self.undo.push(Undo::DeviceDel(dev));
        }
        Ok(())
    }

    async fn set_memory(&mut self, memory: ByteSize) -> Result<(), HvError> {
        let current = self.config.spec.memory;
        if memory < current {
            return Err(refuse(format!(
                "memory can only be added while running, not removed: the guest has {current}, {memory} asked"
            )));
        }
        if memory == current {
            return Ok(());
        }
        let delta = ByteSize(memory.bytes() - current.bytes());
        if !delta.bytes().is_multiple_of(MEMORY_STEP.bytes()) {
            return Err(refuse(format!(
                "memory grows in steps of {MEMORY_STEP} (the guest's memory block); adding {delta} to {current} is not"
            )));
        }
        let summary = self.query("query-memory-size-summary").await?;
        let base = ByteSize(summary.get("base-memory").and_then(Value::as_u64).unwrap_or(current.bytes()));
        let plugged = summary.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0);
        let dimms = self.query("query-memory-devices").await?.as_array().map_or(0, Vec::len);
        let (_, max) = cmdline::hotplug_ceilings(1, base, self.host());
        if base.bytes() + plugged + delta.bytes() > max.bytes() {
            return Err(refuse(format!(
                "the guest was started with room for {max} of memory (maxmem: {}x its boot memory, at most the \
                 host's); {memory} needs a restart with more memory defined",
                cmdline::MEMORY_GROWTH_FACTOR
            )));
        }
        if dimms >= MEMORY_SLOTS as usize {
            return Err(refuse(format!(
                "all {MEMORY_SLOTS} memory slots of the guest are used; more memory needs a restart"
            )));
        }
        // Named by where the DIMM starts in the guest's memory: unique, as
        // memory only grows while the guest runs.
        let at = (base.bytes() + plugged) / ByteSize::mib(1).bytes();
        let (backing, dimm) = cmdline::dimm_ids(at);
        self.qmp("object-add", json!({ "qom-type": "memory-backend-ram", "id": backing, "size": delta.bytes() }))
            .await?;
        self.undo.push(Undo::ObjectDel(backing.clone()));

        let mut changed = self.config.clone();
        changed.spec.grow_memory_to(memory);
        self.commit_record(changed)?;
        self.qmp("device_add", json!({ "driver": "pc-dimm", "id": dimm, "memdev": backing })).await?;
        Ok(())
    }
}

/// Six pairs of hex digits separated by colons.
fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_is_added_only_while_the_translation_cache_has_room() {
        let text = "Accelerator settings:\none-insn-per-tb: off\n\nTranslation buffer state:\n\
                    gen code size       51699619/134135808\nTB count            56036\n";
        assert_eq!(jit_code_size(text), Some((51_699_619, 134_135_808)));
        assert!(jit_room_for_a_vcpu(51_699_619, 134_135_808));
        // A 32 MiB cache right after boot: full, and QEMU would abort.
        assert!(!jit_room_for_a_vcpu(32_274_067, 33_472_512));
        assert_eq!(jit_code_size("no such line"), None);
        assert_eq!(jit_code_size("gen code size  12/x"), None);
    }

    #[test]
    fn macs_are_six_hex_pairs() {
        assert!(is_mac("52:54:00:ab:CD:ef"));
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52-54-00-ab-cd-ef",
            "52:54:00:ab:cd:eg",
            "5:54:00:ab:cd:ef0",
        ] {
            assert!(!is_mac(bad), "{bad}");
        }
    }
}
