#!/usr/bin/env bash
# Build the agentbox test base image without any image registry: debootstrap a
# minimal Debian from the mirror apt already uses, then `docker import` it.
# Usage: agentbox image build [--tag TAG]  (or: bash pytest_agentbox/build-base-image.sh [TAG])   (default: agentbox/base:bookworm)
set -euo pipefail

tag="${1:-agentbox/base:bookworm}"
suite="${AGENTBOX_SUITE:-bookworm}"
# Packages: python3 for the agent and proxies, sudo so that its removal is really
# tested, util-linux/mount for the hidepid remount, CA certificates, curl and pip
# for egress tests with ordinary tools.
include="python3,python3-venv,python3-pip,sudo,mount,ca-certificates,curl,procps,passwd"

mirror="${AGENTBOX_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  # The first Debian main-archive URI apt is configured with (deb822 or one-line form).
  mirror=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
command -v docker >/dev/null || { echo "docker CLI is missing: apt-get install docker.io" >&2; exit 1; }

root=$(mktemp -d /tmp/agentbox-rootfs.XXXXXXXX)
trap 'rm -rf "$root"' EXIT
echo "agentbox: debootstrap $suite from $mirror into $root (takes a few minutes)"
debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; echo "debootstrap failed (log above)" >&2; exit 1; }
rm -f "$root.log"

# The unprivileged agent user; uid 1000 matches what the plugin expects by default.
chroot "$root" useradd --create-home --uid 1000 --shell /bin/sh agent
# Keep the image small and reproducible: no apt lists or caches inside.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

echo "agentbox: importing as $tag"
tar -C "$root" -c . | docker import \
  --change 'CMD ["/bin/sh"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'LABEL org.agentbox.image=base' \
  - "$tag" >/dev/null
echo "agentbox: built $tag"
