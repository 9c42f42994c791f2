#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian bookworm
# machine: a Docker engine (overlay2 storage where it mounts, else vfs; no bridge, no iptables), docker
# compose v2 (from trixie, pinned low), busybox-static for the stand-in image,
# debootstrap for the local Debian bases of the image builds (images/base/),
# Prometheus, and kubectl (trixie's package, pinned low: bookworm's
# kubernetes-client is 1.20) for `kubectl apply` against the API emulator of
# tests/k8s. Idempotent: safe to run twice.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_apt=0
for bin in dockerd busybox prometheus kubectl debootstrap chromium chromedriver; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
[ -x /bin/busybox ] || need_apt=1
docker compose version >/dev/null 2>&1 || need_apt=1

if [ "$need_apt" = 1 ]; then
  if [ ! -f /etc/apt/sources.list.d/trixie.sources ]; then
    cat >/etc/apt/sources.list.d/trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat >/etc/apt/preferences.d/trixie-low <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
  fi
  apt-get update -qq
  # debootstrap: images/base/build-local.sh makes the Debian bases of the image builds.
  apt-get install -y -qq --no-install-recommends docker.io busybox-static prometheus iproute2 procps debootstrap >/dev/null
  apt-get install -y -qq --no-install-recommends -t trixie docker-compose >/dev/null
  # tests/process/test_status_page.py drives the status page in Debian's Chromium (Selenium; nothing downloads a browser).
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  command -v kubectl >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends -t trixie kubectl >/dev/null
fi

start_dockerd() {  # $1: storage driver; returns 0 once the engine answers
  nohup dockerd --storage-driver "$1" --iptables=false --ip6tables=false --bridge=none \
    >/var/log/vramctl-dockerd.log 2>&1 &
  local pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return 1
}

if ! docker info >/dev/null 2>&1; then
  mkdir -p /var/log
  # overlay2 copies nothing per layer or container (vfs copies the whole
  # filesystem each time: image builds ~10x slower, container starts 13-43 s
  # instead of ~1 s). Fall back to vfs where overlayfs does not mount.
  if ! start_dockerd overlay2; then
    echo "setup-infra: overlay2 did not work here; falling back to vfs (slower)" >&2
    tail -5 /var/log/vramctl-dockerd.log >&2 || true
    start_dockerd vfs || { echo "dockerd did not start; see /var/log/vramctl-dockerd.log" >&2; tail -20 /var/log/vramctl-dockerd.log >&2; exit 1; }
  fi
fi
echo "setup-infra: docker storage driver: $(docker info --format '{{.Driver}}')"
docker compose version
# tests/e2e/test_prometheus.py runs /usr/bin/prometheus on a port of its own.
# Installing the package may start Debian's prometheus service where an init
# system runs (on :9090); the tests neither need nor disturb it.
prometheus --version 2>&1 | head -1
