#!/usr/bin/env bash
# Builds vramctl/standin:dev without pulling anything: a busybox-static rootfs
# plus standin.sh, imported with `docker import`.
#
#   images/standin/build.sh [--force] [--tag TAG]
#
# Idempotent and fast: when an image with this tag exists and was built from
# the same busybox binary and scripts (content hash label), it does nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="vramctl/standin:dev"
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --tag) tag="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (use --force, --tag TAG)" >&2; exit 2 ;;
  esac
  shift
done

busybox_bin="${BUSYBOX:-/bin/busybox}"
if [ ! -x "$busybox_bin" ]; then
  echo "build.sh: $busybox_bin not found; install busybox-static (bash .ci/setup-infra.sh)" >&2
  exit 1
fi

hash="$(cat "$busybox_bin" "$here/standin.sh" "$here/build.sh" | sha256sum | cut -c1-16)"
if [ "$force" = 0 ]; then
  have="$(docker image inspect -f '{{ index .Config.Labels "io.vramctl.standin.hash" }}' "$tag" 2>/dev/null || true)"
  if [ "$have" = "$hash" ]; then
    echo "$tag is up to date ($hash)"
    exit 0
  fi
fi

old_id="$(docker image inspect -f '{{ .Id }}' "$tag" 2>/dev/null || true)"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,tmp,etc,proc,sys,dev}
chmod 1777 "$rootfs/tmp"
cp "$busybox_bin" "$rootfs/bin/busybox"
for applet in $("$busybox_bin" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
install -m 0755 "$here/standin.sh" "$rootfs/standin.sh"
echo 'root:x:0:0:root:/:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"

tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -c . |
  docker import \
    --change 'ENTRYPOINT ["/bin/sh", "/standin.sh"]' \
    --change 'ENV PATH=/bin' \
    --change 'EXPOSE 8000' \
    --change "LABEL io.vramctl.standin.hash=$hash" \
    --change 'LABEL org.opencontainers.image.title=vramctl-standin' \
    --message "vramctl stand-in model server" \
    - "$tag" >/dev/null
new_id="$(docker image inspect -f '{{ .Id }}' "$tag")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true  # still used by a container: leave it
fi
echo "built $tag ($hash)"
