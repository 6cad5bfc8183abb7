#!/usr/bin/env bash
# The Bento's container image with podman (`make image`, tests/integration/test_image.py).
#
#   deploy/image/image.sh build   bentoml build + bentoml containerize (podman backend); the image
#                                 reference is the last line printed
#   deploy/image/image.sh env     the exports that point podman at this project's state: run
#                                 `eval "$(deploy/image/image.sh env)"` to use podman by hand
#   deploy/image/image.sh check   can podman run here, with room enough? (exit 0, or 77 and why)
#
# All of podman's and buildah's state and temporary files live in podman-state/ (git-ignored):
# storage (CONTAINERS_STORAGE_CONF), runtime state, the temporary copies of layers
# (image_copy_tmp_dir in CONTAINERS_CONF) and TMPDIR. Nothing is written to /var/lib/containers or
# /var/tmp, whose filesystem may be small.
#
# Exit status 77: podman cannot run here (not installable, no usable runtime, or too little free
# disk for a build: the message gives the space needed and the space free). Any other failure is
# an error.
#
# Settings (environment):
#   IMAGE            the tag to give the image (default servery:<pyproject version>-cpu, what
#                    deploy/overlays name)
#   BENTOFILE        bentofile.yaml (default)
#   IMAGE_BASE       auto (default): the bentofile's own base image where a registry is reachable,
#                    else a local Debian 12 base made by deploy/image/base.sh; `bentoml` or `local`
#                    force either
#   IMAGE_DISK_GB    free disk a build needs (default 20: a cold build's measured peak is 17.9 GB,
#                    docs/images.md)
#   TORCH_INDEX_URL  as in the Makefile: where PyTorch's CPU wheel comes from; where it cannot be
#                    reached, a pip find-links folder of this machine holding the wheel is mounted
#                    into the build instead
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
P="${IMAGE_STATE:-$ROOT/podman-state}"  # IMAGE_STATE: another state folder (bench: a cold build)
VENV="$(cd "$ROOT" && realpath -m "${VENV:-.venv}")"
BENTOFILE="${BENTOFILE:-bentofile.yaml}"
IMAGE_BASE="${IMAGE_BASE:-auto}"
IMAGE_DISK_GB="${IMAGE_DISK_GB:-20}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-servery:$VERSION-cpu}"
# The local base image's tag names its recipe: a changed recipe makes a new one.
BASE_LOCAL="localhost/servery-base:bookworm-py3.11-$(cat "$ROOT/deploy/image/base.sh" | sha256sum | cut -c1-12)"

cannot() {
	echo "image: podman cannot run here: $*" >&2
	exit 77
}

write_conf() {
	mkdir -p "$P/storage" "$P/run" "$P/tmp"
	local nofile
	nofile="$(ulimit -Hn)"
	[ "$nofile" = unlimited ] && nofile=1048576
	[ "$nofile" -gt 1048576 ] && nofile=1048576
	cat >"$P/storage.conf" <<-EOF
		# written by deploy/image/image.sh
		[storage]
		driver = "overlay"
		graphroot = "$P/storage"
		runroot = "$P/run/storage"
	EOF
	# runc, not crun (crun fails on hybrid cgroups); ulimits at or below the host's hard limits
	cat >"$P/containers.conf" <<-EOF
		# written by deploy/image/image.sh
		[containers]
		default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
		[engine]
		runtime = "runc"
		cgroup_manager = "cgroupfs"
		events_logger = "file"
		events_logfile_path = "$P/run/events.log"
		tmp_dir = "$P/run/libpod"
		image_copy_tmp_dir = "$P/tmp"
		static_dir = "$P/storage/libpod"
		volume_path = "$P/storage/volumes"
	EOF
}

export_env() {
	export CONTAINERS_CONF="$P/containers.conf" CONTAINERS_STORAGE_CONF="$P/storage.conf"
	export TMPDIR="$P/tmp" BUILDAH_TMPDIR="$P/tmp" XDG_RUNTIME_DIR="$P/run"
	export BUILDAH_LAYERS=true BENTOML_DO_NOT_TRACK=True
}

install_tools() {
	local missing=()
	for tool in podman buildah runc mmdebstrap; do
		command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	echo "image: installing ${missing[*]} (Debian's packages)" >&2
	{ apt-get install -y --no-install-recommends podman buildah runc mmdebstrap >/dev/null 2>&1 ||
		{ apt-get update >/dev/null 2>&1 &&
			apt-get install -y --no-install-recommends podman buildah runc mmdebstrap >/dev/null 2>&1; }; } ||
		cannot "podman, buildah, runc and mmdebstrap are not installed and apt-get cannot install them"
}

# Free space on the filesystem that holds podman-state/ (storage and temporary files alike). The
# whole need is asked even where the layers are cached: a changed lock rebuilds the install layer
# (the bulk of the peak) while the old one is still stored.
check_space() {
	local free_kb need_kb=$((IMAGE_DISK_GB * 1024 * 1024))
	free_kb="$(df -Pk "$P" | awk 'NR==2 {print $4}')"
	if [ "$free_kb" -lt "$need_kb" ]; then
		cannot "a build needs ${IMAGE_DISK_GB} GB free on the filesystem of $P (IMAGE_DISK_GB);" \
			"$((free_kb / 1024 / 1024)) GB are free"
	fi
}

check() {
	write_conf
	export_env
	check_space
	install_tools
	podman info >/dev/null 2>"$P/tmp/info.err" || cannot "podman info fails: $(tail -3 "$P/tmp/info.err")"
}

base_image() {
	if [ "$IMAGE_BASE" = bentoml ] || { [ "$IMAGE_BASE" = auto ] &&
		curl -s -m 10 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ | grep -q '^401$'; }; then
		return 0 # the bentofile's own base image (BentoML's python:3.11-slim)
	fi
	if ! podman image exists "$BASE_LOCAL"; then
		bash "$ROOT/deploy/image/base.sh" "$BASE_LOCAL" "$VENV/bin/uv" >&2
	fi
	echo "$BASE_LOCAL"
}

# A folder of this machine's pip find-links holding the lock's torch wheel, where PyTorch's CPU
# index is out of reach (as the Makefile's venv install does).
torch_wheels() {
	grep -q 'download.pytorch.org' "$ROOT/$BENTOFILE" || return 0
	curl -sf -m 10 -o /dev/null "$TORCH_INDEX_URL/torch/" && return 0
	local torch dir
	torch="$(grep -oE '^torch==[^ ;]+[+]cpu' "$ROOT/requirements-cpu.txt" | head -1 | cut -d= -f3)"
	for dir in $("$VENV/bin/python" -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'/\1/p" | sort -u); do
		if ls "$dir"/torch-"$torch"-*.whl >/dev/null 2>&1; then
			echo "$dir"
			return 0
		fi
	done
	echo "image: PyTorch's CPU index ($TORCH_INDEX_URL) is out of reach and no find-links folder holds torch $torch" >&2
	return 1
}

build() {
	check
	local base wheels tag t0 opts=()
	t0=$SECONDS
	base="$(base_image)"
	wheels="$(torch_wheels)"
	[ -n "$base" ] && opts+=(--opt "from=$base")
	if [ -n "$wheels" ]; then
		opts+=(--opt "volume=$wheels:/srv/torch-wheels:ro" --opt "build-arg=SERVERY_TORCH_FIND_LINKS=/srv/torch-wheels")
	fi
	# The Bento: code and the environment's recipe only (no models: they come from the store)
	tag="$(cd "$ROOT" && "$VENV/bin/bentoml" build -f "$BENTOFILE" --output tag | sed -n 's/^__tag__://p')"
	[ -n "$tag" ] || {
		echo "image: bentoml build printed no tag" >&2
		exit 1
	}
	echo "image: $tag -> $IMAGE${base:+ (base $base)}" >&2
	(cd "$ROOT" && "$VENV/bin/bentoml" containerize "$tag" --backend podman -t "$IMAGE" \
		--opt network=host "${opts[@]}") >&2
	# What the build leaves behind: the intermediate containers and untagged images (the layers
	# of the tagged images, the cache of the next build, stay)
	podman container prune -f >/dev/null 2>&1 || true
	podman image prune -f >/dev/null 2>&1 || true
	echo "image: built in $((SECONDS - t0)) s; podman-state/ holds $(du -shx "$P" | cut -f1)" >&2
	echo "localhost/$IMAGE"
}

case "${1:-}" in
build) build ;;
check) check ;;
env)
	write_conf
	echo "export CONTAINERS_CONF='$P/containers.conf' CONTAINERS_STORAGE_CONF='$P/storage.conf' TMPDIR='$P/tmp' BUILDAH_TMPDIR='$P/tmp' XDG_RUNTIME_DIR='$P/run'"
	;;
*)
	echo "usage: $0 build|check|env" >&2
	exit 2
	;;
esac
