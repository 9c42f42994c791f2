#!/bin/sh
# vramctl model images: run the GPU preflight, then become the model server.
#
#   entrypoint.sh COMMAND [ARGS...]
#
# The preflight (preflight.py beside this file) fails in a second or two, with
# one line a reason, when the image cannot work on this machine: no CUDA device,
# a GPU older than the image supports, a torch without kernels for it, no SDPA
# kernel that runs, or xformers installed. On success the command replaces this
# shell (exec), so it is PID 1 and receives the supervisor's SIGTERM itself.
#
#   VRAMCTL_PREFLIGHT=0        skip the preflight (prints that it was skipped)
#   VRAMCTL_PREFLIGHT_PYTHON   the Python that has the image's torch (default python3)
#   VRAMCTL_MIN_CAPABILITY, VRAMCTL_ALLOW_XFORMERS, VRAMCTL_PREFLIGHT_ENGINE: see preflight.py
set -eu

here="$(dirname "$0")"
if [ "${VRAMCTL_PREFLIGHT:-1}" = "0" ]; then
  echo "preflight: skipped (VRAMCTL_PREFLIGHT=0)" >&2
else
  "${VRAMCTL_PREFLIGHT_PYTHON:-python3}" "$here/preflight.py" || {
    rc=$?
    echo "preflight: exit $rc; not starting $1" >&2
    exit "$rc"
  }
fi
if [ $# -eq 0 ]; then
  echo "entrypoint.sh: no command to run" >&2
  exit 2
fi
exec "$@"
