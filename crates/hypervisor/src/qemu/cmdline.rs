//! The QEMU command line for a guest, as a pure function of its definition.
//!
//! Choices and why:
//! * `-M pc` with direct boot of an uncompressed `vmlinux`: under TCG the
//!   in-guest decompression of a bzImage costs seconds; `microvm` boots a
//!   little faster but hung in 2 of 3 boots here, and `pc` gives ACPI
//!   PCI hotplug on the root bus for later hotplug work. q35 measured the
//!   same as pc.
//! * `-daemonize -pidfile`: QEMU outlives the agent; `-daemonize` also makes
//!   the launcher exit only once QEMU is initialised, so its exit status and
//!   stderr tell whether the guest came up.
//! * `-no-shutdown`: when the guest powers itself off, QEMU stays in the
//!   `shutdown` run state instead of exiting. An exit can then only be a
//!   crash or our own `quit`, whether or not the agent was watching.
//! * `-action panic=pause` with a pvpanic device: a guest kernel panic leaves
//!   QEMU in `guest-panicked`, reported as Crashed, with the state kept for
//!   inspection.
//! * Serial console on a unix socket with a log file: `vm log` reads the
//!   file, `vm console` may connect to the socket. QEMU still logs while no
//!   one is connected.
//! * `-display none` rather than `-nographic`, which QEMU refuses together
//!   with `-daemonize`.
//! * A virtio-serial port named `org.qemu.guest_agent.0` on a unix socket,
//!   the channel every QEMU guest agent looks for (`qga.rs`). Always there:
//!   whether an agent answers is the guest's business.
//! * Disk limits (`disk_bps`, `disk_iops`): QEMU's own I/O throttling, a
//!   `throttle-group` object per disk and a `throttle` block node between
//!   the device and the qcow2 node. Every disk gets them, limits or not (a
//!   group without limits lets everything through): QEMU 7.2 cannot put a
//!   filter node under a device that is in use, so only a node present
//!   from the start lets a running guest's disk limits be set, changed or
//!   removed (`qom-set` of the group's `limits`, `limits.rs`).
//! * Room for hotplug (`hotplug.rs`): `-smp N,maxcpus=M` and
//!   `-m SIZE,slots=S,maxmem=X`, with the ceilings of [`hotplug_ceilings`].
//!   Without them QEMU cannot add a vCPU or a DIMM to a running guest at
//!   all; reserving the room costs no guest memory (DIMMs are allocated
//!   when added) and did not measurably slow TCG boots.
//! * A guest with a base image of its own (`GuestSpec::image`) boots it
//!   through the BIOS (SeaBIOS) from disk 0, an overlay of that image: no
//!   `-kernel`, `-initrd` or `-append`, and disk 0 is the boot device.
//! * Values inside QEMU's `key=value,...` options double their commas.

use std::ffi::OsString;
use std::path::Path;

use drove_model::{ByteSize, DiskSpec, GuestSpec, ResourceLimits};

use super::guest_dir::GuestDir;
use crate::{GuestConfig, HostResources};

/// TCG translation cache per guest, MiB. Booting the test image translates
/// about 50 MiB of host code: a smaller cache is flushed during boot and the
/// boot pays for translating again. It also leaves room for a hot-added
/// vCPU, which QEMU 10 gives a region of its own and aborts when every
/// region is taken (see `hotplug::jit_room_for_a_vcpu`). Only the code
/// actually translated is resident.
pub const TCG_TB_SIZE_MIB: u32 = 128;

/// The accelerator a guest actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Tcg,
    Kvm,
}

/// The kernel and initramfs the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    pub kernel: std::path::PathBuf,
    pub initrd: std::path::PathBuf,
}

/// Everything a launch needs beyond the guest's definition.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub config: &'a GuestConfig,
    pub dir: &'a GuestDir,
    pub image: &'a BootImage,
    pub accel: ResolvedAccel,
    /// One entry per NIC of the spec: the host tap to attach, or `None` to
    /// leave that NIC out.
    pub taps: &'a [Option<String>],
    /// Appended to the kernel command line.
    pub extra_kernel_args: &'a [String],
    /// What the host offers guests: bounds the room left for hotplug.
    pub host: HostResources,
    /// Wait for a migration stream instead of booting (`-incoming defer`:
    /// the address comes later, over QMP, after the TLS set-up).
    pub incoming: bool,
}

/// Whether the guest's QEMU runs without transparent huge pages (its
/// process is started with `PR_SET_THP_DISABLE`, which QEMU's own
/// `MADV_HUGEPAGE` on guest RAM cannot override).
///
/// Only a TCG migration target: the pages the source sends last are written
/// while the guest is paused, and on a target with huge pages each one that
/// lands in memory not yet touched faults in and zeroes a whole 2 MiB page
/// first. That was the tail of the pause (ADR 0022). A TCG guest gains
/// little from huge pages afterwards (its TLB is QEMU's own); a KVM guest's
/// nested paging does, so KVM targets keep them.
pub fn without_huge_pages(launch: &Launch<'_>) -> bool {
    launch.incoming && launch.accel == ResolvedAccel::Tcg
}

/// The most vCPUs a guest is started with room for, whatever its host.
pub const MAX_HOTPLUG_VCPUS: u32 = 16;
/// DIMM slots for memory hotplug: each SetMemory uses one.
pub const MEMORY_SLOTS: u32 = 8;

/// Most disks a guest can have: each has its own PCI slot ([`disk_slot`]).
pub const MAX_DISKS: usize = 16;

/// The PCI slot of disk `i` on the `pc` machine's root bus, `None` past
/// [`MAX_DISKS`].
///
/// Every PCI device sits at a fixed slot, whether it came with the boot
/// or was hot-added: a migration target (built from the guest's definition)
/// must have each device exactly where the source has it, and QEMU would
/// otherwise number boot devices in command-line order and hot-added ones
/// by the first free slot. Slots 0 and 1 are the host and ISA bridges;
/// 2: virtio-rng, 3: virtio-serial, 4–19: disks, 20–27: NICs,
/// 28: the config drive.
pub fn disk_slot(i: usize) -> Option<String> {
    (i < MAX_DISKS).then(|| format!("{:#04x}", 0x04 + i))
}

/// The PCI slot of NIC `i` (see [`disk_slot`]).
pub fn nic_slot(i: usize) -> Option<String> {
    (i < drove_model::guest::MAX_NICS).then(|| format!("{:#04x}", 0x14 + i))
}

const RNG_SLOT: &str = "0x02";
const SERIAL_SLOT: &str = "0x03";
const CONFIG_DRIVE_SLOT: &str = "0x1c";

/// The QOM type of a vCPU device for `accel` (its `-cpu` model).
pub fn cpu_device_type(accel: ResolvedAccel) -> &'static str {
    match accel {
        ResolvedAccel::Tcg => "qemu64-x86_64-cpu",
        ResolvedAccel::Kvm => "host-x86_64-cpu",
    }
}

/// The id of the vCPU device at `socket` (one core and thread per socket,
/// QEMU's default topology for `-smp N,maxcpus=M`): the same whether it
/// was hot-added or is on a command line.
pub fn cpu_device_id(socket: u64, core: u64, thread: u64) -> String {
    format!("cpu-{socket}-{core}-{thread}")
}

/// The ids of the memory backend and DIMM of a module that starts at
/// `at_mib` in the guest's memory: unique, as memory only grows.
pub fn dimm_ids(at_mib: u64) -> (String, String) {
    (format!("mem-at-{at_mib}m"), format!("dimm-at-{at_mib}m"))
}
/// How much a guest's memory may grow while running, as a multiple of the
/// memory it boots with.
pub const MEMORY_GROWTH_FACTOR: u64 = 4;

/// How far a guest booted with `spec` can grow while running: (`maxcpus`,
/// `maxmem`). vCPUs up to twice the boot count (at most
/// [`MAX_HOTPLUG_VCPUS`]) and memory up to [`MEMORY_GROWTH_FACTOR`] times,
/// both capped by what the host offers but never below what the guest
/// boots with.
pub fn hotplug_ceilings(vcpus: u32, memory: ByteSize, host: HostResources) -> (u32, ByteSize) {
    let vcpus = vcpus.max(1);
    let max_vcpus = vcpus.saturating_mul(2).min(MAX_HOTPLUG_VCPUS).min(host.cores).max(vcpus);
    let mib = memory.as_mib().max(1);
    let max_mib = mib.saturating_mul(MEMORY_GROWTH_FACTOR).min(host.memory.as_mib()).max(mib);
    (max_vcpus, ByteSize::mib(max_mib))
}

/// [`hotplug_ceilings`] of a spec: of its boot layout, which hot-added
/// hardware does not change.
fn spec_ceilings(spec: &GuestSpec, host: HostResources) -> (u32, ByteSize) {
    hotplug_ceilings(spec.base_vcpus(), spec.base_memory(), host)
}

/// The throttle-group properties for the guest's disk limits, as
/// (property, value) pairs; empty without limits. Shared by the command
/// line and disk hotplug so both throttle alike. (A running group takes
/// its limits as one `limits` object instead: [`throttle_limits_object`].)
pub fn throttle_props(limits: &ResourceLimits) -> Vec<(&'static str, u64)> {
    let mut props = Vec::new();
    if let Some(bps) = limits.disk_bps {
        props.push(("x-bps-total", bps));
    }
    if let Some(iops) = limits.disk_iops {
        props.push(("x-iops-total", iops));
    }
    props
}

/// Kernel parameters that shorten the test image's boot under TCG
/// (measured to `DROVE-READY`: ~2.4 s without them, ~1.9 s with the first
/// line, ~1.7 s with all).
///
/// - `mitigations=off` and `rodata=off` skip patching the kernel's text for
///   CPU-bug workarounds and the W+X page walk, ~0.25 s. They weaken only
///   the isolation of processes *inside* the guest from each other, which
///   the single-purpose test image does not need; the host's isolation
///   from the guest is QEMU's and unchanged.
/// - `swiotlb=512`: a 1 MiB bounce buffer instead of a failed 64 MiB one
///   and its retry; virtio devices reach all guest memory.
///
/// Not here: `initcall_blacklist=` of the kprobe/trace set-ups and a KDF
/// self-test would save ~0.13 s more, but with it QEMU 7.2 (TCG) dies when
/// a vCPU is hot-added.
pub const FAST_BOOT_ARGS: &str = "i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check 8250.nr_uarts=1 \
                                  cryptomgr.notests mitigations=off rodata=off swiotlb=512";

/// The minimal firmware for direct kernel boot, from QEMU's data files
/// (Debian: qemu-system-data, which qemu-system-x86 depends on).
pub const QBOOT: &str = "qboot.rom";

/// The guest's kernel command line. See `scripts/build-image.sh` for the
/// `drove.*` parameters the test image understands.
pub fn kernel_cmdline(config: &GuestConfig, extra: &[String]) -> String {
    // quiet: every printk line on an emulated UART costs boot time under TCG.
    // panic=-1: reboot at once; with pvpanic QEMU pauses first (see above).
    // The rest skips probes that cost ~0.4 s under TCG and mean nothing to
    // a guest with no PS/2 devices and one UART: i8042 probing, TSC
    // calibration checks, three unused 8250 ports, crypto self-tests.
    // memhp_default_state=online: memory modules present at boot (added
    // while it ran before, see `GuestSpec::hot_added`) are usable at once;
    // the test image has no udev rule to online them.
    let mut line = format!("console=ttyS0 quiet panic=-1 memhp_default_state=online {FAST_BOOT_ARGS}");
    for arg in super::config_drive::identity_words(config).iter().chain(extra) {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
pub fn opt_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The `-blockdev` of disk `i`'s image node `disk{i}`: a qcow2 or raw file
/// at `file` (its place on the pool), or a host block device, raw over
/// `host_device` with O_DIRECT (the host's page cache would only double
/// what the guest caches; the device is the guest's alone).
pub fn image_blockdev(i: usize, disk: &DiskSpec, file: &Path) -> String {
    match disk.block_path() {
        Some(dev) => format!(
            "driver=raw,node-name=disk{i},file.driver=host_device,file.filename={},cache.direct=on",
            dev.replace(',', ",,")
        ),
        None => format!("driver={},node-name=disk{i},file.driver=file,file.filename={}", disk.format, opt_value(file)),
    }
}

/// The QMP `blockdev-add` arguments of the same node as [`image_blockdev`],
/// named `node`.
pub fn image_blockdev_json(node: &str, disk: &DiskSpec, file: &Path) -> serde_json::Value {
    match disk.block_path() {
        Some(dev) => serde_json::json!({ "driver": "raw", "node-name": node, "cache": { "direct": true },
                                          "file": { "driver": "host_device", "filename": dev } }),
        None => serde_json::json!({ "driver": disk.format.as_str(), "node-name": node,
                                    "file": { "driver": "file", "filename": file } }),
    }
}

/// The throttle-group object of disk `i` for the guest's disk limits. One
/// group per disk: the limits are per disk (a group shared by all disks
/// would split one budget among them). Totals count reads and writes
/// together; QEMU's default burst (a tenth of the rate) applies.
pub fn throttle_group(i: usize, limits: &ResourceLimits) -> String {
    let mut object = format!("throttle-group,id=throttle{i}");
    for (key, value) in throttle_props(limits) {
        object.push_str(&format!(",{key}={value}"));
    }
    object
}

/// The node each of `disks` disks' device reads from, the root node that
/// QEMU's snapshot commands and mirrors work on, from the answer to
/// `query-named-block-nodes`: the throttle node over the image, or the
/// image node of a QEMU started before every disk had one.
pub fn root_nodes(named: &serde_json::Value, disks: usize) -> Vec<String> {
    let names: Vec<&str> = named
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.get("node-name").and_then(serde_json::Value::as_str))
        .collect();
    (0..disks)
        .map(|i| {
            let throttled = format!("throttled{i}");
            if names.contains(&throttled.as_str()) { throttled } else { format!("disk{i}") }
        })
        .collect()
}

/// The image (qcow2) node of disk `i`, from the answer to
/// `query-named-block-nodes`: `disk{i}` as the command line and hotplug
/// name it, or, after a live storage move (`storage.rs`) in this QEMU's
/// life, the node that replaced it (`disk{i}-m<stamp>`, the latest stamp:
/// an older one is a replaced node that could not be closed), which keeps
/// its name until the next start.
pub fn image_node(named: &serde_json::Value, i: usize) -> String {
    let plain = format!("disk{i}");
    let moved = format!("disk{i}-m");
    let names = named.as_array().into_iter().flatten().filter_map(|n| n.get("node-name")?.as_str());
    let latest =
        names.filter_map(|n| Some((n.strip_prefix(&moved)?.parse::<u128>().ok()?, n))).max().map(|(_, n)| n.to_owned());
    latest.unwrap_or(plain)
}

/// The `limits` property of a running throttle group for the guest's disk
/// limits: every limit we set, 0 for none (QEMU keeps a limit left out).
pub fn throttle_limits_object(limits: &ResourceLimits) -> serde_json::Value {
    serde_json::json!({
        "bps-total": limits.disk_bps.unwrap_or(0),
        "iops-total": limits.disk_iops.unwrap_or(0),
    })
}

/// The arguments after the program name.
pub fn qemu_args(l: &Launch<'_>) -> Vec<OsString> {
    let spec = &l.config.spec;
    let mut args: Vec<String> = Vec::new();
    fn push(args: &mut Vec<String>, key: &str, value: String) {
        args.push(key.to_owned());
        args.push(value);
    }
    push(&mut args, "-name", format!("guest={},debug-threads=on", spec.name.replace(',', ",,")));
    push(&mut args, "-uuid", l.config.id.to_string());
    push(&mut args, "-machine", "pc".to_owned());
    match l.accel {
        // TCG's translation cache defaults to a gigabyte per guest on
        // 64-bit hosts; 32 MiB holds a small guest's hot code, and the
        // cache is memory each guest costs beyond its own RAM.
        ResolvedAccel::Tcg => push(&mut args, "-accel", format!("tcg,tb-size={TCG_TB_SIZE_MIB}")),
        ResolvedAccel::Kvm => {
            push(&mut args, "-accel", "kvm".to_owned());
            push(&mut args, "-cpu", "host".to_owned());
        }
    }
    let (max_vcpus, max_memory) = spec_ceilings(spec, l.host);
    // The boot layout, then what was hot-added, as devices in the same
    // places and with the same ids as the hotplug gave them.
    let base_vcpus = spec.base_vcpus().max(1);
    let base_mib = spec.base_memory().as_mib().max(1);
    // The topology spelled out (QEMU's default for `-smp N,maxcpus=M`
    // changed between versions): one core per socket, so vCPU `i` is
    // socket `i` whether it booted or was hot-added.
    push(&mut args, "-smp", format!("{base_vcpus},maxcpus={max_vcpus},sockets={max_vcpus},cores=1,threads=1"));
    push(&mut args, "-m", format!("{base_mib}M,slots={MEMORY_SLOTS},maxmem={}M", max_memory.as_mib()));
    for socket in u64::from(base_vcpus)..u64::from(spec.vcpus.max(base_vcpus)) {
        push(
            &mut args,
            "-device",
            format!(
                "{},id={},socket-id={socket},die-id=0,core-id=0,thread-id=0",
                cpu_device_type(l.accel),
                cpu_device_id(socket, 0, 0)
            ),
        );
    }
    let mut at = base_mib;
    for dimm in spec.hot_added.iter().flat_map(|h| &h.dimms) {
        let (backing, id) = dimm_ids(at);
        push(&mut args, "-object", format!("memory-backend-ram,id={backing},size={}", dimm.bytes()));
        push(&mut args, "-device", format!("pc-dimm,id={id},memdev={backing}"));
        at += dimm.as_mib();
    }
    args.extend(["-nodefaults", "-no-user-config", "-no-shutdown"].map(str::to_owned));
    push(&mut args, "-display", "none".to_owned());
    push(&mut args, "-action", "panic=pause".to_owned());
    push(&mut args, "-device", "pvpanic".to_owned());
    // Entropy from the host: a TCG guest's own takes minutes to seed its
    // generator (getrandom and /dev/urandom wait for it).
    push(&mut args, "-device", format!("virtio-rng-pci,addr={RNG_SLOT}"));

    let bios_boot = spec.image.is_some();
    if !bios_boot {
        // qboot, not SeaBIOS: it only loads the kernel QEMU hands it, and
        // reaches it ~0.1 s sooner under TCG. ACPI (hotplug, power button)
        // still comes from QEMU's tables. Both ends of a migration build
        // the same command line, so they agree on the firmware.
        push(&mut args, "-bios", QBOOT.to_owned());
        push(&mut args, "-kernel", l.image.kernel.to_string_lossy().into_owned());
        push(&mut args, "-initrd", l.image.initrd.to_string_lossy().into_owned());
        push(&mut args, "-append", kernel_cmdline(l.config, l.extra_kernel_args));
    }

    push(
        &mut args,
        "-chardev",
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            opt_value(&l.dir.console_path()),
            opt_value(&l.dir.serial_log_path())
        ),
    );
    push(&mut args, "-serial", "chardev:serial0".to_owned());
    // QEMU's own messages, which -daemonize would send to /dev/null. (With
    // -D, startup errors go there too, not to the launcher's stderr.)
    push(&mut args, "-D", l.dir.qemu_log_path().to_string_lossy().into_owned());
    push(&mut args, "-chardev", format!("socket,id=qmp,path={},server=on,wait=off", opt_value(&l.dir.qmp_path())));
    push(&mut args, "-mon", "chardev=qmp,mode=control".to_owned());
    push(&mut args, "-device", format!("virtio-serial-pci,id=vser0,addr={SERIAL_SLOT}"));
    push(&mut args, "-chardev", format!("socket,id=qga0,path={},server=on,wait=off", opt_value(&l.dir.qga_path())));
    push(&mut args, "-device", format!("virtserialport,bus=vser0.0,chardev=qga0,name={}", super::qga::PORT_NAME));

    for (i, disk) in spec.disks.iter().enumerate() {
        push(&mut args, "-blockdev", image_blockdev(i, disk, &l.dir.disk_path(i, disk.format)));
        // The device sits on a throttle node over the qcow2 node, so node
        // `disk{i}` stays the image for anything that works on it.
        push(&mut args, "-object", throttle_group(i, &spec.limits));
        push(
            &mut args,
            "-blockdev",
            format!("driver=throttle,node-name=throttled{i},throttle-group=throttle{i},file=disk{i}"),
        );
        let boot = if bios_boot && i == 0 { ",bootindex=0" } else { "" };
        let slot = disk_slot(i).map(|s| format!(",addr={s}")).unwrap_or_default();
        push(&mut args, "-device", format!("virtio-blk-pci,drive=throttled{i},id=vdisk{i},serial=disk{i}{slot}{boot}"));
    }
    for (i, (nic, tap)) in spec.nics.iter().zip(l.taps).enumerate() {
        let Some(tap) = tap else { continue };
        push(&mut args, "-netdev", format!("tap,id=net{i},ifname={},script=no,downscript=no", tap.replace(',', ",,")));
        push(
            &mut args,
            "-device",
            format!(
                "virtio-net-pci,netdev=net{i},id=nic{i},mac={}{}",
                nic.mac.replace(',', ",,"),
                nic_slot(i).map(|s| format!(",addr={s}")).unwrap_or_default()
            ),
        );
    }
    if bios_boot {
        // Read-only: both ends of a migration open their own copy.
        push(
            &mut args,
            "-blockdev",
            format!(
                "driver=raw,node-name=cidata,read-only=on,file.driver=file,file.filename={}",
                opt_value(&l.dir.config_drive_path())
            ),
        );
        push(
            &mut args,
            "-device",
            format!(
                "virtio-blk-pci,drive=cidata,id=cidata,serial={},addr={CONFIG_DRIVE_SLOT}",
                super::config_drive::SERIAL
            ),
        );
    }

    if l.incoming {
        push(&mut args, "-incoming", "defer".to_owned());
    }
    push(&mut args, "-pidfile", l.dir.pid_path().to_string_lossy().into_owned());
    args.push("-daemonize".to_owned());
    args.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use drove_model::{ByteSize, DiskSpec, GuestId, GuestSpec, NicAddress, NicSpec, Priority, VlanTag};

    use super::*;

    pub(crate) fn config() -> GuestConfig {
        GuestConfig {
            id: GuestId::new_v4(),
            generation: 1,
            spec: GuestSpec {
                name: "web-1".into(),
                vcpus: 2,
                memory: ByteSize::mib(512),
                disks: vec![DiskSpec::qcow2(ByteSize::gib(1)), DiskSpec::qcow2(ByteSize::gib(2))],
                nics: vec![
                    NicSpec {
                        address: Some(NicAddress {
                            ip: "10.0.10.5".parse().unwrap(),
                            prefix: 24,
                            gateway: Some("10.0.10.1".parse().unwrap()),
                        }),
                        ..NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:00:00:01")
                    },
                    NicSpec::new(VlanTag::new(20).unwrap(), "52:54:00:00:00:02"),
                ],
                priority: Priority::default(),
                load_profile: None,
                limits: Default::default(),
                image: None,
                clone_of: None,
                storage: Default::default(),
                anti_affinity: None,
                hot_added: None,
            },
        }
    }

    const HOST: HostResources = HostResources { cores: 8, memory: ByteSize(16 << 30) };

    fn args_of(l: &Launch<'_>) -> Vec<String> {
        qemu_args(l).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    /// The arguments for `c` with no taps and no extra kernel parameters.
    fn plain_args(c: &GuestConfig, accel: ResolvedAccel) -> Vec<String> {
        let dir = GuestDir::new(Path::new("/s"), c.id);
        let image = BootImage { kernel: "/k".into(), initrd: "/i".into() };
        args_of(&Launch {
            incoming: false,
            config: c,
            dir: &dir,
            image: &image,
            accel,
            taps: &[],
            extra_kernel_args: &[],
            host: HOST,
        })
    }

    #[test]
    fn command_line_carries_disks_sockets_and_only_supplied_taps() {
        let c = config();
        let dir = GuestDir::new(Path::new("/state/with,comma"), c.id);
        let image = BootImage { kernel: "/img/vmlinux".into(), initrd: "/img/initramfs.cpio".into() };
        let taps = [None, Some("dvtap1".to_owned())];
        let args = args_of(&Launch {
            incoming: false,
            config: &c,
            dir: &dir,
            image: &image,
            accel: ResolvedAccel::Tcg,
            taps: &taps,
            extra_kernel_args: &["drove.ip=eth0:10.0.0.5/24".to_owned()],
            host: HOST,
        });
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(
            joined.contains("-smp 2,maxcpus=4,sockets=4,cores=1,threads=1 -m 512M,slots=8,maxmem=2048M"),
            "{joined}"
        );
        assert!(joined.contains(&format!("file.filename=/state/with,,comma/{}/disk1.qcow2", c.id)));
        assert_eq!(args.iter().filter(|a| a.starts_with("virtio-blk-pci")).count(), 2);
        // Only the NIC with a tap is attached, with its own MAC.
        assert_eq!(args.iter().filter(|a| a.starts_with("virtio-net-pci")).count(), 1);
        assert!(joined.contains("tap,id=net1,ifname=dvtap1,script=no,downscript=no"), "{joined}");
        assert!(joined.contains("netdev=net1,id=nic1,mac=52:54:00:00:00:02"), "{joined}");
        assert!(joined.contains(" drove.ip=mac-52-54-00-00-00-01:10.0.10.5/24:10.0.10.1"), "{joined}");
        assert_eq!(joined.matches("drove.ip=mac-").count(), 1, "only NICs with an address: {joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.starts_with("console=ttyS0 "), "{append}");
        assert!(append.contains("drove.name=web-1"), "{append}");
        assert!(append.ends_with(" drove.ip=eth0:10.0.0.5/24"), "{append}");
        // Every boot parameter is one word (the constant spans lines).
        assert!(append.split(' ').any(|w| w == "8250.nr_uarts=1"), "{append}");
        assert!(!append.contains("  "), "{append}");
        assert!(joined.contains("-bios qboot.rom -kernel "), "direct boot through qboot: {joined}");
        assert_eq!(args.last().unwrap(), "-daemonize");
        assert!(!args.contains(&"-nographic".to_owned()));
        // The guest agent's channel, on a socket in the guest's directory.
        assert!(joined.contains(&format!("socket,id=qga0,path=/state/with,,comma/{}/qga.sock,server=on", c.id)));
        assert!(joined.contains("virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"), "{joined}");
    }

    #[test]
    fn a_guest_with_its_own_image_boots_disk_0_through_the_bios() {
        let mut c = config();
        c.spec.image = Some("/images/debian.qcow2".into());
        let args = plain_args(&c, ResolvedAccel::Tcg);
        for direct in ["-kernel", "-initrd", "-append", "-bios"] {
            assert!(!args.iter().any(|a| a == direct), "{args:?}");
        }
        assert!(
            args.contains(&"virtio-blk-pci,drive=throttled0,id=vdisk0,serial=disk0,addr=0x04,bootindex=0".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"virtio-blk-pci,drive=throttled1,id=vdisk1,serial=disk1,addr=0x05".to_owned()),
            "{args:?}"
        );
    }

    #[test]
    fn hot_added_hardware_is_on_the_command_line_where_the_hotplug_put_it() {
        let mut c = config();
        c.spec.vcpus = 1;
        c.spec.memory = ByteSize::mib(256);
        c.spec.grow_vcpus_to(2);
        c.spec.grow_memory_to(ByteSize::mib(384));
        c.spec.grow_memory_to(ByteSize::mib(640));
        let joined = plain_args(&c, ResolvedAccel::Tcg).join(" ");
        // The boot layout's ceilings, not the grown totals'.
        assert!(
            joined.contains("-smp 1,maxcpus=2,sockets=2,cores=1,threads=1 -m 256M,slots=8,maxmem=1024M"),
            "{joined}"
        );
        assert!(joined.contains("-device qemu64-x86_64-cpu,id=cpu-1-0-0,socket-id=1,"), "{joined}");
        assert_eq!(joined.matches("qemu64-x86_64-cpu").count(), 1, "{joined}");
        assert!(joined.contains("-object memory-backend-ram,id=mem-at-256m,size=134217728 -device pc-dimm,id=dimm-at-256m,memdev=mem-at-256m"), "{joined}");
        assert!(joined.contains("-object memory-backend-ram,id=mem-at-384m,size=268435456 -device pc-dimm,id=dimm-at-384m,memdev=mem-at-384m"), "{joined}");
    }

    #[test]
    fn hotplug_ceilings_double_vcpus_and_quadruple_memory_within_the_host() {
        let host = HostResources { cores: 2, memory: ByteSize::gib(1) };
        assert_eq!(hotplug_ceilings(1, ByteSize::mib(256), host), (2, ByteSize::gib(1)));
        // Never below what the guest boots with, even beyond the host.
        assert_eq!(hotplug_ceilings(4, ByteSize::gib(2), host), (4, ByteSize::gib(2)));
        let big = HostResources { cores: 64, memory: ByteSize::gib(256) };
        assert_eq!(hotplug_ceilings(12, ByteSize::gib(1), big), (MAX_HOTPLUG_VCPUS, ByteSize::gib(4)));
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let joined = plain_args(&config(), ResolvedAccel::Kvm).join(" ");
        assert!(joined.contains("-accel kvm -cpu host"), "{joined}");
        assert!(!joined.contains("netdev"), "{joined}");
    }

    #[test]
    fn the_image_node_is_the_moved_one_after_a_storage_move() {
        let named = |names: &[&str]| {
            serde_json::Value::Array(names.iter().map(|n| serde_json::json!({ "node-name": n })).collect())
        };
        let plain = named(&["disk0", "throttled0", "disk1", "throttled1"]);
        assert_eq!((image_node(&plain, 0), image_node(&plain, 1)), ("disk0".into(), "disk1".into()));
        // Moved once (disk 1 only), then again, with the first one's node
        // left behind; disk1 is not disk10.
        let moved = named(&["disk0", "disk1-m1700000000000", "disk1-m1700000000123", "disk10-m1800000000000"]);
        assert_eq!(image_node(&moved, 0), "disk0");
        assert_eq!(image_node(&moved, 1), "disk1-m1700000000123");
        assert_eq!(image_node(&moved, 10), "disk10-m1800000000000");
        assert_eq!(image_node(&serde_json::Value::Null, 2), "disk2");
    }

    #[test]
    fn every_disk_sits_behind_its_own_throttle_group() {
        let mut c = config();
        let launch = |c: &GuestConfig| plain_args(c, ResolvedAccel::Tcg).join(" ");
        // Without limits too, so that limits can be set while it runs.
        let plain = launch(&c);
        assert!(plain.contains("-object throttle-group,id=throttle1 "), "{plain}");
        assert!(plain.contains("virtio-blk-pci,drive=throttled1,"), "{plain}");

        c.spec.limits.disk_bps = Some(2_097_152);
        c.spec.limits.disk_iops = Some(100);
        let joined = launch(&c);
        for i in 0..2 {
            assert!(
                joined.contains(&format!("-object throttle-group,id=throttle{i},x-bps-total=2097152,x-iops-total=100")),
                "{joined}"
            );
            assert!(
                joined.contains(&format!(
                    "-blockdev driver=throttle,node-name=throttled{i},throttle-group=throttle{i},file=disk{i}"
                )),
                "{joined}"
            );
            assert!(joined.contains(&format!("virtio-blk-pci,drive=throttled{i},id=vdisk{i}")), "{joined}");
        }
        c.spec.limits.disk_bps = None;
        assert!(launch(&c).contains("throttle-group,id=throttle0,x-iops-total=100 "));
    }
}
