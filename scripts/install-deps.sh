#!/usr/bin/env bash
# Installs what hangar needs on Debian 12: QEMU (system emulator and qemu-img of the same
# version), busybox-static for guests, e2fsprogs for image building, debootstrap and
# squashfs-tools for Debian image layers, curl for the demo, PostgreSQL 15 (server and psql:
# the store's tests run on a throwaway cluster of it; `hangar server --store postgres://…`), and for
# `hangar bench`: libvirt (the comparison; its daemons are started only by the benchmark)
# and a font for its chart; Debian's chromium and chromium-driver for the web console's browser
# tests; Debian's prometheus, which the metrics test starts to scrape a server and an agent.
# Idempotent: installs only what is missing.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# qemu-img must come from the same QEMU release as the emulator; a newer qemu-utils (from
# backports) conflicts with Debian's qemu-system-x86, so both are pinned to one version.
if ! qemu-img --version 2>/dev/null | grep -q "version 7\." ; then need+=(qemu-utils); fi
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v curl >/dev/null || need+=(curl)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v psql >/dev/null || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql-15)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v dig >/dev/null || need+=(dnsutils)
# `ip netns` for private segments on kernel bridges (as root) and the farm tests' namespaces.
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
[ -x /usr/bin/prometheus ] || need+=(prometheus)

if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    as_root apt-get update -qq
    qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    pkgs=()
    for p in "${need[@]}"; do
        case "$p" in
            qemu-system-x86|qemu-utils) ;;
            *) pkgs+=("$p") ;;
        esac
    done
    if printf '%s\n' "${need[@]}" | grep -q '^qemu'; then
        pkgs+=("qemu-system-x86=$qemu_version" "qemu-utils=$qemu_version" "qemu-block-extra=$qemu_version")
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades "${pkgs[@]}" >/dev/null
fi

# The unprivileged user QEMU runs as when hangar runs as root (without it, `nobody`).
if ! id hangar-vm >/dev/null 2>&1; then
    as_root useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin hangar-vm
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found: install Rust 1.90 or newer (https://rustup.rs), then run this again" >&2
    exit 1
fi
