#!/usr/bin/env bash
# deploy/image/base.sh REF UV: a base image made from Debian's packages, for builds where no
# container registry is reachable (deploy/image/image.sh decides; docs/images.md says why).
#
# What BentoML's python:3.11-slim base gives its Dockerfile, from Debian 12 (bookworm) and the
# apt sources this machine uses: Python 3.11 at /usr/bin with its headers (torch.compile's C++
# code includes Python.h: vLLM's engine on CPU dies without them), bash, the packages BentoML's Dockerfile
# apt-installs (ca-certificates gnupg2 build-essential curl: installed here, so its apt-get step
# is a no-op; git), libnuma1 (the CPU bentofile's system package), and uv (the BentoML Dockerfile
# needs >= 0.13.4 on the PATH; this copies the venv's, the lock's version). The machine's extra CA
# certificates go in too, so pip/uv inside builds reach package indexes as the host does.
# Runs inside deploy/image/image.sh's environment (podman state in podman-state/, TMPDIR there).
set -euo pipefail
ref="$1"
uv="$2"
work="$(mktemp -d "${TMPDIR:-/tmp}/base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ca" "$work/bin"
cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true
cp "$uv" "$work/bin/uv"
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
echo "base: mmdebstrap bookworm ($sources) -> $ref" >&2
# In a mount namespace of its own: the chroot's /proc and /dev mounts stay invisible to the host
# (a `bentoml build` walking the project meanwhile would trip over them)
unshare --mount --propagation private mmdebstrap --variant=minbase --quiet \
	--include=python3.11,python3.11-dev,python3.11-venv,python3-pip,ca-certificates,bash,gnupg2,build-essential,git,curl,libnuma1 \
	--customize-hook="copy-in $work/ca/. /usr/local/share/ca-certificates/" \
	--customize-hook="copy-in $work/bin/uv /usr/local/bin/" \
	--customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
	--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
	bookworm "$work/rootfs.tar" "$sources"
# An imported image has no PATH, nor the certificates' bundle named for uv (which otherwise uses
# its own roots and would miss the machine's)
podman import \
	--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	--change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
	--change 'CMD ["/bin/bash"]' \
	"$work/rootfs.tar" "$ref" >/dev/null
echo "base: $ref" >&2
