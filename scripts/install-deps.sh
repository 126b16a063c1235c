#!/usr/bin/env bash
# Installs the host packages drove's QEMU backend and its test image need.
#
# Idempotent and quick when everything is present: it only runs
# `apt-get update` + `apt-get install` when a command is missing or QEMU is
# too old, so CI can call it at the start of every run. Must run as root on
# Debian 12 or newer.
#
# QEMU must be 10.0 or newer (docs/adr/0014-qemu-10.md): 7.2, Debian 12's
# own, loses guest writes during a TCG live migration of a busy guest (about
# one migration in seven came up with a corrupted kernel). On Debian 12 it
# comes from bookworm-backports, which this script adds if no apt source
# names it; Debian 13 has it in main.
#
# qemu-utils is installed in the same command as qemu-system-x86 on purpose:
# installing qemu-system-x86 alone can remove a newer preinstalled qemu-utils
# and leave the host without `qemu-img`, and the two must be one version.
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
    # The stock guest agent users' images carry: tests drive our client
    # against it.
    [qemu-ga]=qemu-guest-agent
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

# The QEMU major version, or 0 when there is none.
qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | awk '/version/ {split($4, v, "."); print v[1]; exit}' | grep -E '^[0-9]+$' || echo 0
}
min_qemu=10
if [ "$(qemu_major)" -lt "$min_qemu" ]; then
    missing+=(qemu-system-x86 qemu-utils)
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
target=()
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "install-deps: adding bookworm-backports (QEMU $min_qemu)"
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
            > /etc/apt/sources.list.d/drove-backports.sources
    fi
    target=(-t bookworm-backports)
fi
apt-get update -q
# Pin qemu-utils to the version of qemu-system-x86 that apt will install: a
# qemu-utils of another version "Breaks" qemu-system-common, and apt would
# rather refuse than pick one.
qemu_ver=$(apt-cache policy "${target[@]}" qemu-system-x86 | awk '/Candidate:/ {print $2}')
if [ -z "$qemu_ver" ] || [ "$qemu_ver" = "(none)" ]; then
    echo "install-deps: apt knows no qemu-system-x86 package (is this Debian with main enabled?)" >&2
    exit 1
fi
apt-get install -y -q --no-install-recommends busybox-static cpio socat iproute2 xz-utils zstd gzip \
    dosfstools syslinux syslinux-common mtools util-linux qemu-guest-agent
# Only QEMU from backports: the rest (iproute2 among them) stays Debian's own.
apt-get install -y -q --no-install-recommends --allow-downgrades "${target[@]}" \
    "qemu-system-x86=$qemu_ver" "qemu-system-common=$qemu_ver" "qemu-system-data=$qemu_ver" "qemu-utils=$qemu_ver"
if [ "$(qemu_major)" -lt "$min_qemu" ]; then
    echo "install-deps: QEMU $(qemu_major) installed, drove needs $min_qemu or newer" >&2
    exit 1
fi
echo "install-deps: done"
