#!/usr/bin/env bash
# Installs the host packages drove's QEMU backend and its test image need.
#
# Idempotent and quick when everything is present: it only runs
# `apt-get update` + `apt-get install` when a command is missing, so CI can
# call it at the start of every run. Must run as root on Debian 12.
#
# qemu-utils is installed in the same command as qemu-system-x86 on purpose:
# installing qemu-system-x86 alone can remove a newer preinstalled qemu-utils
# and leave the host without `qemu-img`.
set -euo pipefail

# command -> Debian package that provides it
declare -A wanted=(
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-img]=qemu-utils
    [busybox]=busybox-static
    [cpio]=cpio
    [socat]=socat
    [ip]=iproute2
    [nsenter]=util-linux
    [xz]=xz-utils
    [zstd]=zstd
    [gzip]=gzip
    [mkfs.vfat]=dosfstools
    [syslinux]=syslinux
    [mcopy]=mtools
)

# mkfs.vfat lives in sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin
missing=()
for cmd in "${!wanted[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("${wanted[$cmd]}")
    fi
done
# busybox may come from the dynamic `busybox` package; the image needs the
# static one (it runs in an initramfs without libc).
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    missing+=(busybox-static)
fi
# syslinux's boot sector and modules (ldlinux.sys) come from syslinux-common.
if ! dpkg-query -W -f='${Status}' syslinux-common 2>/dev/null | grep -q 'install ok installed'; then
    missing+=(syslinux-common)
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages (${missing[*]}) and not root; run as root" >&2
    exit 1
fi

echo "install-deps: missing ${missing[*]}; installing the full set so versions stay consistent"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Pin qemu-utils to the version of qemu-system-x86 that apt will install: a
# newer qemu-utils (e.g. from backports) "Breaks" the older
# qemu-system-common, and apt would rather refuse than downgrade it.
qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
if [ -z "$qemu_ver" ] || [ "$qemu_ver" = "(none)" ]; then
    echo "install-deps: apt knows no qemu-system-x86 package (is this Debian with main enabled?)" >&2
    exit 1
fi
apt-get install -y -q --no-install-recommends --allow-downgrades \
    qemu-system-x86 "qemu-utils=$qemu_ver" busybox-static cpio socat iproute2 xz-utils zstd gzip \
    dosfstools syslinux syslinux-common mtools util-linux
echo "install-deps: done"
