#!/usr/bin/env bash
# Makes the base images of images/ on this machine, from Debian packages and
# a torch wheel, without pulling anything from an image registry:
#
#   vramctl-local/debian:bookworm-HASH  Debian 12 minbase, Python 3.11 in a venv
#                                       at /opt/venv (first on PATH)
#   vramctl-local/debian:trixie-HASH    Debian 13 minbase, Python 3.13, the same venv
#   vramctl-local/torch:2.13.0-cpu-HASH the bookworm base plus torch (CPU build)
#
#   images/base/build-local.sh [--force] [bookworm|trixie|torch ...]
#
# Each image is tagged with a hash of what made it (this script, the suite, the
# packages, the CA certificates, the torch wheels), plus a moving tag without
# the hash. Idempotent: an image whose hashed tag exists is not made again.
# The last lines on stdout name the images as build arguments:
#
#   PYTHON_IMAGE=vramctl-local/debian:trixie-0123456789ab
#   TORCH_IMAGE=vramctl-local/torch:2.13.0-cpu-0123456789ab
#
# so that, for example:
#
#   eval "$(images/base/build-local.sh | grep =)"
#   docker build --network host --build-arg TORCH_IMAGE="$TORCH_IMAGE" \
#     -f images/sdxl/Dockerfile -t vramctl/sdxl:dev images
#   docker build --network host --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" \
#     -f images/vramctl/Dockerfile -t vramctl/vramctl:dev .
#
# Needs root (debootstrap, chroot), debootstrap, a Debian mirror, and pip on
# the host. Settings (environment):
#   DEBIAN_MIRROR   the mirror debootstrap and the images' apt use
#                   (default http://deb.debian.org/debian)
#   EXTRA_CA_DIR    extra trusted CA certificates (*.crt) copied into the bases,
#                   for a TLS-intercepting proxy or an internal package index
#                   (default /usr/local/share/ca-certificates)
#   TORCH_VERSION   default 2.13.0
#   TORCH_PIP_ARGS  extra `pip download` arguments to find the CPU torch wheel
#                   and its dependencies, e.g. "--find-links /srv/wheels" or
#                   "--index-url https://download.pytorch.org/whl/cpu
#                    --extra-index-url https://pypi.org/simple"; without them the
#                   host's pip configuration decides
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
force=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    bookworm|trixie|torch) targets+=("$1") ;;
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "build-local.sh: unknown argument $1 (use --force, bookworm, trixie, torch)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(bookworm trixie torch)

mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_dir="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
torch_version="${TORCH_VERSION:-2.13.0}"
repo="vramctl-local"
packages="ca-certificates,python3,python3-venv"
export DEBIAN_FRONTEND=noninteractive

log() { echo "build-local: $*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

drop_old() {  # $1: the image a --force rebuild replaced under tag $2
  if [ -n "$1" ] && [ "$1" != "$(docker image inspect -f '{{ .Id }}' "$2")" ]; then
    docker image rm "$1" >/dev/null 2>&1 || true  # still used by an image or a container: leave it
  fi
}

prune_stale() {  # $1: repository, $2: tag prefix, $3: the tag to keep; earlier hashes of this base go
  docker image ls --format '{{.Repository}}:{{.Tag}}' "$1" | grep -F "$1:$2-" | grep -vxF "$3" |
    while read -r stale; do docker image rm "$stale" >/dev/null 2>&1 || true; done
}

ca_files() {  # the extra CA files, sorted (none is fine)
  [ -d "$ca_dir" ] && find "$ca_dir" -type f -name '*.crt' | LC_ALL=C sort || true
}

debian_hash() {  # $1: suite
  { cat "$0"; echo "$1 $mirror $packages"; ca_files | while read -r f; do cat "$f"; done; } | sha256sum | cut -c1-12
}

# A Debian root filesystem: debootstrap minbase, the extra CA certificates
# trusted system-wide (pip in the venv uses Debian's bundle), a venv at
# /opt/venv made with the distribution's Python, apt lists and caches removed.
build_debian() {  # $1: suite
  local suite="$1" hash tag started rootfs old_id
  hash="$(debian_hash "$suite")"
  tag="$repo/debian:$suite-$hash"
  if [ "$force" = 0 ] && have_image "$tag"; then
    log "$tag is up to date"
    echo "$tag"
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap not found: apt-get install debootstrap (bash .ci/setup-infra.sh)"; exit 1; }
  [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
  started="$(now)"
  old_id="$(docker image inspect -f '{{ .Id }}' "$tag" 2>/dev/null || true)"
  rootfs="$(mktemp -d /var/tmp/vramctl-rootfs.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: the trap must remove this rootfs
  trap "rm -rf '$rootfs'" EXIT
  log "debootstrap $suite from $mirror"
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  ca_files | while read -r f; do cp "$f" "$rootfs/usr/local/share/ca-certificates/"; done
  chroot "$rootfs" update-ca-certificates >/dev/null
  chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
  chroot "$rootfs" /opt/venv/bin/python -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)' >&2
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.cache
  # debootstrap copied this machine's; the engine provides both in a container.
  : >"$rootfs/etc/resolv.conf"
  echo localhost >"$rootfs/etc/hostname"
  tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import \
      --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV VIRTUAL_ENV=/opt/venv' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["/bin/bash"]' \
      --change "LABEL io.vramctl.base.hash=$hash" \
      --change "LABEL org.opencontainers.image.title=vramctl-local-debian-$suite" \
      --message "debootstrap --variant=minbase $suite ($mirror)" \
      - "$tag" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  docker tag "$tag" "$repo/debian:$suite"
  drop_old "$old_id" "$tag"
  prune_stale "$repo/debian" "$suite" "$tag"
  log "built $tag in $(took "$started") s"
  echo "$tag"
}

# torch on the bookworm base (Python 3.11). The wheels are fetched on the host
# (its pip configuration, or TORCH_PIP_ARGS), then installed into the venv in a
# container without network; the container becomes the image (docker commit).
# `torch==VERSION` names the wheel: the hash covers the version, not the file.
build_torch() {
  local base="$1" hash tag started wheels cid old_id
  hash="$( { echo "$base $torch_version ${TORCH_PIP_ARGS:-}"; sed -n '/^build_torch()/,/^}/p' "$0"; } | sha256sum | cut -c1-12)"
  tag="$repo/torch:$torch_version-cpu-$hash"
  if [ "$force" = 0 ] && have_image "$tag"; then
    log "$tag is up to date"
    echo "$tag"
    return
  fi
  started="$(now)"
  old_id="$(docker image inspect -f '{{ .Id }}' "$tag" 2>/dev/null || true)"
  wheels="$(mktemp -d /var/tmp/vramctl-wheels.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: the trap must remove this folder
  trap "rm -rf '$wheels'" EXIT
  log "pip download torch==$torch_version"
  # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
  python3 -m pip download -q --no-cache-dir --dest "$wheels" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    ${TORCH_PIP_ARGS:-} "torch==$torch_version" >&2
  ls "$wheels"/torch-* >/dev/null 2>&1 || { log "pip download found no torch==$torch_version wheel"; exit 1; }
  case "$(basename "$wheels"/torch-*)" in
    *+cpu*) ;;
    *) log "warning: $(basename "$wheels"/torch-*) is not a +cpu build (CUDA libraries follow)" ;;
  esac
  cid="$(docker create --network none -v "$wheels:/wheels:ro" "$base" \
    pip install -q --no-index --no-cache-dir --disable-pip-version-check --find-links /wheels "torch==$torch_version")"
  if ! docker start -a "$cid" >&2; then
    docker rm -f "$cid" >/dev/null; log "installing torch failed"; exit 1
  fi
  docker commit \
    --change "LABEL io.vramctl.base.hash=$hash" \
    --change "LABEL org.opencontainers.image.title=vramctl-local-torch-cpu" \
    --change 'CMD ["/bin/bash"]' \
    --message "torch==$torch_version (CPU) on $base" \
    "$cid" "$tag" >/dev/null
  docker rm "$cid" >/dev/null
  rm -rf "$wheels"
  trap - EXIT
  docker tag "$tag" "$repo/torch:$torch_version-cpu"
  drop_old "$old_id" "$tag"
  prune_stale "$repo/torch" "$torch_version-cpu" "$tag"
  log "built $tag in $(took "$started") s"
  echo "$tag"
}

declare -A built=()
for t in "${targets[@]}"; do
  case "$t" in
    bookworm|trixie) built[$t]="$(build_debian "$t")" ;;
    torch)
      [ -n "${built[bookworm]:-}" ] || built[bookworm]="$(build_debian bookworm)"
      built[torch]="$(build_torch "${built[bookworm]}")" ;;
  esac
done
[ -z "${built[bookworm]:-}" ] || echo "DEBIAN_BOOKWORM_IMAGE=${built[bookworm]}"
[ -z "${built[trixie]:-}" ] || echo "PYTHON_IMAGE=${built[trixie]}"
[ -z "${built[torch]:-}" ] || echo "TORCH_IMAGE=${built[torch]}"
