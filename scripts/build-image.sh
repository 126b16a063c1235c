#!/usr/bin/env bash
# Builds drove's tiny test guest image from Debian packages.
#
#   scripts/build-image.sh [OUT_DIR]
#
# OUT_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/drove/image and ends up
# holding:
#   vmlinux            the Debian kernel, uncompressed: QEMU's direct kernel
#                      boot of an ELF vmlinux skips the in-guest
#                      decompression, which costs seconds under TCG
#   initramfs.cpio     busybox (static), the virtio/ACPI modules, drove's
#                      guest agent (static) and /init; uncompressed, for the
#                      same reason (unpacking gzip costs ~0.1 s under TCG)
#   vmlinuz            the same kernel as the package ships it (bzImage)
#   disk.qcow2         a BIOS-bootable disk with vmlinuz and the initramfs:
#                      an unpartitioned FAT "superfloppy" with syslinux,
#                      booting with console=ttyS0. It stands in for a user's
#                      own image (GuestSpec::image) in tests; its /init is
#                      the same, so it prints DROVE-READY too.
#   manifest           kernel version and the hashes of the inputs
#
# The result is cached: when OUT_DIR already holds an image built from the
# same inputs (this script and the guest agent's sources, crates/guest-agent,
# by sha256), nothing is done. Concurrent runs on the same OUT_DIR are
# serialised with flock.
#
# Nothing is fetched but Debian packages through apt (the kernel package is
# `apt-get download`ed and unpacked with `dpkg -x`, never installed) and the
# guest agent's crates through cargo.
#
# The guest's /init understands these kernel command line parameters (the
# QEMU backend passes drove.name and drove.id; more come from
# QemuConfig::extra_kernel_args):
#   drove.name=NAME               hostname of the guest
#   drove.id=UUID                 the guest id (informational)
#   drove.ip=IFACE:ADDR/PREFIX[:GATEWAY]
#                                 static IPv4 address for IFACE (eth0, eth1...,
#                                 in the order of the NICs on the QEMU command
#                                 line); repeat the parameter for more NICs
#   drove.ip=mac-XX-XX-XX-XX-XX-XX:ADDR/PREFIX[:GATEWAY]
#                                 the same, naming the NIC by its MAC ('-' for
#                                 ':' so the field separator stays unique)
# The same words can come from a config drive (a FAT disk whose virtio serial
# is "cidata"; its file `drove` holds them on one line): the QEMU backend
# attaches one to guests that boot their own image through the BIOS, whose
# kernel command line it cannot set. Words there win.
# It reports on the serial console (ttyS0) what it sees, for tests that
# assert from inside the guest ("drove: disk vda 64M", "drove: nic eth0 MAC",
# "drove: ip eth0 10.0.0.5/24", "drove: up after 2.1s"), then prints the
# line `DROVE-READY` once modules are loaded and NICs are configured, and
# keeps a shell on the console. Before that it starts drove-guest-agent
# (crates/guest-agent), which serves the QEMU guest agent protocol on the
# virtio-serial port org.qemu.guest_agent.0 and logs "drove: guest agent
# listening on /dev/vportNpM" once it has the port. The ACPI power button (QMP system_powerdown)
# powers the guest off through busybox acpid; a kernel panic is reported to
# QEMU through pvpanic.
set -euo pipefail

# --- arguments and cache check ------------------------------------------------

out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/drove/image}
repo=$(cd "$(dirname "$0")/.." && pwd)
script_hash=$(sha256sum "$0" | cut -d' ' -f1)
# Every file of the agent's crate, by path and content. Cargo.lock is left
# out on purpose: it changes with every dependency anyone adds to the
# workspace, and a patch release of serde does not change what the agent
# does.
agent_hash=$(cd "$repo" && find crates/guest-agent -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -d' ' -f1)
inputs_hash=$(printf 'script %s\nagent %s\n' "$script_hash" "$agent_hash" | sha256sum | cut -d' ' -f1)

mkdir -p "$out"
out=$(cd "$out" && pwd)

up_to_date() {
    [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/disk.qcow2" ] &&
        grep -qx "inputs_sha256=$inputs_hash" "$out/manifest" 2>/dev/null
}

if up_to_date; then
    echo "build-image: $out is up to date"
    exit 0
fi

# Serialise concurrent builders (e.g. several test binaries starting at once);
# whoever gets the lock second finds the image built.
exec 9>"$out/.lock"
flock 9
if up_to_date; then
    echo "build-image: $out is up to date"
    exit 0
fi

# mkfs.vfat lives in sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin
for cmd in apt-get apt-cache dpkg busybox cpio gzip xz zstd mkfs.vfat syslinux mcopy qemu-img; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "build-image: '$cmd' is missing; run scripts/install-deps.sh as root first" >&2
        exit 1
    fi
done
if ! command -v cargo >/dev/null 2>&1; then
    echo "build-image: cargo is missing; the guest agent is built from crates/guest-agent (install Rust >= 1.85)" >&2
    exit 1
fi
is_elf() { [ "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; }

busybox_bin=$(command -v busybox)
if ! is_elf "$busybox_bin"; then
    echo "build-image: $busybox_bin is not an ELF binary" >&2
    exit 1
fi
if ldd "$busybox_bin" >/dev/null 2>&1; then
    echo "build-image: $busybox_bin is dynamically linked; install busybox-static" >&2
    exit 1
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- the guest agent -----------------------------------------------------------

# Static, because the initramfs has no libc: crt-static links glibc in, and
# relocation-model=static makes a plain static executable rather than a
# static-pie. The flags reach the agent only: with an explicit --target,
# RUSTFLAGS skip build scripts and proc macros (serde_derive), which must stay
# dynamic. Its own target directory keeps the workspace's build from being
# invalidated by the different flags. Small beats fast here: every boot
# unpacks the initramfs under TCG.
agent_triple=x86_64-unknown-linux-gnu
agent_target="${CARGO_TARGET_DIR:-$repo/target}/guest-agent"
echo "build-image: building drove-guest-agent into $agent_target"
(
    cd "$repo"
    env -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS \
        CARGO_TARGET_DIR="$agent_target" \
        RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
        CARGO_PROFILE_RELEASE_LTO=true \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release --locked --quiet -p drove-guest-agent --target "$agent_triple"
)
agent_bin="$agent_target/$agent_triple/release/drove-guest-agent"
# ldd fails (status 1) on exactly the executables we want.
agent_ldd=$(ldd "$agent_bin" 2>&1 || true)
if ! grep -q 'not a dynamic executable' <<<"$agent_ldd"; then
    echo "build-image: $agent_bin is not a static executable: $agent_ldd" >&2
    exit 1
fi

# --- the kernel ----------------------------------------------------------------

# The current kernel ABI package is what the linux-image-amd64 metapackage
# depends on, e.g. linux-image-6.1.0-56-amd64.
find_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
# apt-get download writes into the current directory; _apt cannot always read
# our temp dir, which only produces a harmless warning.
download_kernel() {
    kpkg=$(find_kernel_pkg || true)
    [ -n "$kpkg" ] || return 1
    (cd "$work" && apt-get download -q "$kpkg" 2>&1 | grep -v 'unsandboxed' || true)
    deb=$(ls "$work"/"${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ]
}
# Stale or missing package lists (a fresh machine, a point release that
# removed the old kernel from the mirror): update them once and retry.
if ! download_kernel; then
    echo "build-image: cannot download the kernel with the current package lists; running apt-get update"
    apt-get update -q
    if ! download_kernel; then
        echo "build-image: cannot download ${kpkg:-the kernel package linux-image-amd64 depends on}" >&2
        exit 1
    fi
fi
kver=${kpkg#linux-image-}
echo "build-image: kernel $kpkg"
dpkg -x "$deb" "$work/kpkg"
vmlinuz="$work/kpkg/boot/vmlinuz-$kver"
moddir="$work/kpkg/lib/modules/$kver"
[ -f "$vmlinuz" ] || { echo "build-image: $deb has no boot/vmlinuz-$kver" >&2; exit 1; }
[ -d "$moddir" ] || { echo "build-image: $deb has no lib/modules/$kver" >&2; exit 1; }

# The extract-vmlinux approach: the bzImage carries the kernel as one
# compressed payload after the real-mode setup code. Find each candidate
# header by its magic bytes, decompress from there (trailing data is an error
# the decompressors report after writing the output, hence `|| true`), and
# keep the first result that is an ELF file. Debian 12 uses xz; the others are
# here so a kernel built differently still works.
extract_vmlinux() {
    local img=$1 dst=$2 magic tool off
    while read -r magic tool; do
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
            tail -c "+$((off + 1))" "$img" | $tool >"$dst" 2>/dev/null || true
            if [ -s "$dst" ] && is_elf "$dst"; then
                echo "build-image: vmlinux found at offset $off ($tool)"
                return 0
            fi
        done
    done <<'EOF'
\xFD7zXZ\x00 xz -dc
\x28\xB5\x2F\xFD zstd -dc
\x1F\x8B\x08 gzip -dc
EOF
    return 1
}
if ! extract_vmlinux "$vmlinuz" "$work/vmlinux"; then
    echo "build-image: found no xz/zstd/gzip payload in $vmlinuz that decompresses to an ELF vmlinux" >&2
    exit 1
fi

# --- modules -------------------------------------------------------------------

# What the guest needs: virtio over PCI (pc/q35) and MMIO (microvm), disks,
# NICs, the virtio console, the ACPI power button with evdev so that acpid
# sees the button, pvpanic (ISA, found through ACPI) so QEMU learns of a
# kernel panic, and virtio-rng: under TCG the kernel's own entropy takes
# minutes to seed its generator, and /dev/urandom blocks until it has.
wanted_modules="virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
virtio_mmio virtio_blk virtio_net virtio_console button evdev pvpanic_mmio virtio_rng"

# The package ships no modules.dep (depmod runs at install time), so read
# each module's own `depends=` from its .modinfo section. Modules load in
# dependency order: a module after everything it depends on.
declare -A modpath=()
while IFS= read -r f; do
    name=$(basename "$f" .ko)
    modpath[${name//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko')

declare -A visited=()
load_order=()
visit() {
    local m=${1//-/_} dep deps
    [ -n "${visited[$m]:-}" ] && return 0
    visited[$m]=1
    if [ -z "${modpath[$m]:-}" ]; then
        # Built into the kernel: nothing to load.
        if grep -q "/$m.ko$" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
        echo "build-image: module $m is neither in $kpkg nor built in" >&2
        return 1
    fi
    deps=$(tr '\0' '\n' <"${modpath[$m]}" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    load_order+=("$m")
}
for m in $wanted_modules; do
    # virtio_pci_legacy_dev/modern_dev only exist in newer kernels.
    case $m in virtio_pci_*_dev) [ -n "${modpath[$m]:-}" ] || continue ;; esac
    visit "$m"
done
echo "build-image: modules ${load_order[*]}"
boot_order=("${load_order[@]}")

# Loaded only when the guest has a config drive (a FAT disk): the test image
# booted through the BIOS, standing in for a user's image, reads its
# identity there. Direct kernel boots do not pay for them.
load_order=()
for m in vfat nls_cp437 nls_ascii; do
    visit "$m"
done
cidata_order=("${load_order[@]}")
echo "build-image: config drive modules ${cidata_order[*]}"

# --- the initramfs -------------------------------------------------------------

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,var/log,etc/acpi/PWRF,lib/modules}
cp "$busybox_bin" "$root/bin/busybox"
# Every applet as a symlink, at the path busybox itself reports.
for applet in $("$busybox_bin" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
for m in "${boot_order[@]}" "${cidata_order[@]}"; do
    cp "${modpath[$m]}" "$root/lib/modules/$m.ko"
done
cp "$agent_bin" "$root/usr/bin/drove-guest-agent"
printf '%s\n' "${boot_order[@]}" >"$root/lib/modules/load-order"
printf '%s\n' "${cidata_order[@]}" >"$root/lib/modules/cidata-order"
echo "$kver" >"$root/etc/drove-kernel"

# busybox acpid runs /etc/acpi/PWRF/00000080 for the power button.
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "drove: power button pressed, powering off" >/dev/console
sync
poweroff -f
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"

cat >"$root/init" <<'EOF'
#!/bin/sh
# drove test image init: see scripts/build-image.sh for the kernel parameters.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

log() { echo "drove: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null || log "module $m did not load"
done

# The guest agent waits for its virtio-serial port itself (virtio_console adds
# ports a moment after it loads), so it can start now, in the background.
# The OOM killer spares it: a guest out of memory must still answer the host
# (a killed agent leaves every command in flight unanswered).
drove-guest-agent </dev/null &
echo -1000 > /proc/$!/oom_score_adj

# drove.* words come from the kernel command line and, for an image booted
# through the BIOS, from the config drive drove attaches (a FAT disk with
# virtio serial "cidata", cloud-init's NoCloud layout): its file `drove`
# holds more words, which win over the command line's.
words=$(cat /proc/cmdline)
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = cidata ] || continue
    for m in $(cat /lib/modules/cidata-order); do
        insmod "/lib/modules/$m.ko" 2>/dev/null || log "module $m did not load"
    done
    mkdir -p /run/cidata
    if mount -t vfat -o ro "/dev/${d##*/}" /run/cidata; then
        words="$words $(cat /run/cidata/drove 2>/dev/null)"
        umount /run/cidata
        log "config drive ${d##*/} read"
    else
        log "config drive ${d##*/} did not mount"
    fi
done

name=
for arg in $words; do
    case $arg in
        drove.name=*) name=${arg#drove.name=} ;;
    esac
done
hostname "${name:-drove-guest}"

ip link set lo up

# drove.ip=IFACE:ADDR/PREFIX[:GATEWAY], IFACE may be mac-xx-xx-xx-xx-xx-xx
configure_ip() {
    spec=$1
    iface=${spec%%:*}
    rest=${spec#*:}
    addr=${rest%%:*}
    gw=
    [ "$rest" != "$addr" ] && gw=${rest#*:}
    case $iface in
        mac-*)
            mac=$(echo "${iface#mac-}" | tr 'A-F-' 'a-f:')
            iface=
            for d in /sys/class/net/*; do
                if [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ]; then
                    iface=${d##*/}
                fi
            done
            if [ -z "$iface" ]; then
                log "ip: no NIC with MAC $mac"
                return
            fi
            ;;
    esac
    if ! ip link set "$iface" up; then
        log "ip: no NIC $iface"
        return
    fi
    ip addr add "$addr" dev "$iface" || log "ip: cannot add $addr to $iface"
    if [ -n "$gw" ]; then
        ip route add default via "$gw" dev "$iface" || log "ip: cannot route via $gw"
    fi
    log "ip $iface $addr${gw:+ via $gw}"
}
for arg in $words; do
    case $arg in
        drove.ip=*) configure_ip "${arg#drove.ip=}" ;;
    esac
done

# What the guest sees, for tests that assert from inside the guest.
for d in /sys/block/vd*; do
    [ -e "$d" ] && log "disk ${d##*/} $(( $(cat "$d/size") / 2048 ))M"
done
for d in /sys/class/net/*; do
    [ "${d##*/}" = lo ] || log "nic ${d##*/} $(cat "$d/address")"
done

# busybox acpid exits at once when it cannot open its log file.
acpid -l /run/acpid.log || log "acpid did not start"

log "up after $(cut -d' ' -f1 /proc/uptime)s"
echo "DROVE-READY"

# A shell on the serial console for whoever connects to it; restart it when it
# exits so init never does (the kernel would panic).
while true; do
    setsid cttyhack sh -l
    sleep 1
done
EOF
chmod 755 "$root/init"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$work/initramfs.cpio"
# The bootable disk's copy is compressed: syslinux reads it through the BIOS.
gzip -6 -c "$work/initramfs.cpio" >"$work/initramfs.cpio.gz"

# --- the bootable disk -----------------------------------------------------------

# A FAT filesystem over the whole disk (no partition table) whose boot sector
# is syslinux's: SeaBIOS boots it like any disk with a 0x55AA signature.
# Short 8.3 names keep syslinux's FAT reader out of long-name territory.
cp "$vmlinuz" "$work/vmlinuz"
kib=$(( ($(stat -c %s "$work/vmlinuz") + $(stat -c %s "$work/initramfs.cpio.gz")) / 1024 + 8192 ))
mkfs.vfat -C -n DROVE "$work/disk.img" "$kib" >/dev/null
syslinux --install "$work/disk.img"
cat >"$work/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT drove
PROMPT 0
TIMEOUT 0
LABEL drove
    KERNEL /vmlinuz
    INITRD /initrd.gz
    APPEND console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check 8250.nr_uarts=1 cryptomgr.notests drove.name=drove-disk
EOF
mcopy -i "$work/disk.img" "$work/vmlinuz" ::/vmlinuz
mcopy -i "$work/disk.img" "$work/initramfs.cpio.gz" ::/initrd.gz
mcopy -i "$work/disk.img" "$work/syslinux.cfg" ::/syslinux.cfg
qemu-img convert -q -f raw -O qcow2 "$work/disk.img" "$work/disk.qcow2"

# --- install -------------------------------------------------------------------

# Files first, manifest last: a half-written image never looks up to date.
rm -f "$out/manifest"
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initramfs.cpio" "$out/initramfs.cpio"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/disk.qcow2" "$out/disk.qcow2"
cat >"$out/manifest.tmp" <<EOF
kernel_package=$kpkg
kernel_version=$kver
script_sha256=$script_hash
agent_sha256=$agent_hash
inputs_sha256=$inputs_hash
EOF
mv "$out/manifest.tmp" "$out/manifest"
echo "build-image: built $out (vmlinux $(du -h "$out/vmlinux" | cut -f1), initramfs $(du -h "$out/initramfs.cpio" | cut -f1), disk.qcow2 $(du -h "$out/disk.qcow2" | cut -f1), agent $(du -h "$agent_bin" | cut -f1))"
