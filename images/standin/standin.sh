#!/bin/sh
# vramctl stand-in model server: behaves like a slow-loading, slow-stopping
# inference server, driven entirely by environment variables.
#
#   STANDIN_PORT                 HTTP port (default 8000); GET /health is 404
#                                until loaded, then 200.
#   STANDIN_HOST                 address httpd binds (default 127.0.0.1).
#   STANDIN_LOAD_SECONDS         seconds before /health answers (default 2).
#   STANDIN_STOP_SECONDS         seconds spent shutting down after SIGTERM or
#                                SIGINT, then exit 0 (default 1).
#   STANDIN_IGNORE_SIGTERM=1     ignore SIGTERM and SIGINT: only SIGKILL ends it.
#   STANDIN_CRASH_AFTER_SECONDS  exit with STANDIN_EXIT_CODE (default 1) this
#                                long after starting.
#
# Meant to run as PID 1: every sleep is `sleep N & wait $!`, so a trapped
# signal interrupts it at once.

PORT="${STANDIN_PORT:-8000}"
HOST="${STANDIN_HOST:-127.0.0.1}"
LOAD="${STANDIN_LOAD_SECONDS:-2}"
STOP="${STANDIN_STOP_SECONDS:-1}"
CRASH="${STANDIN_CRASH_AFTER_SECONDS:-}"
CODE="${STANDIN_EXIT_CODE:-1}"
WWW="${STANDIN_WWW:-/tmp/standin-www}"

HTTPD_PID=""
SLEEP_PID=""
CRASH_PID=""

log() { echo "standin: $*"; }

cleanup() {
  trap '' TERM INT USR1
  for p in $SLEEP_PID $CRASH_PID; do kill -KILL "$p" 2>/dev/null; done
  if [ -n "$HTTPD_PID" ]; then
    kill -TERM "$HTTPD_PID" 2>/dev/null
    wait "$HTTPD_PID" 2>/dev/null
  fi
  rm -f "$WWW/health"
}

on_signal() {
  log "got $1, stopping in $STOP s"
  cleanup
  sleep "$STOP"
  log "stopped"
  exit 0
}

on_crash() {
  cleanup
  log "crashing with exit code $CODE"
  exit "$CODE"
}

# Interruptible sleep.
nap() {
  sleep "$1" &
  SLEEP_PID=$!
  wait "$SLEEP_PID"
  SLEEP_PID=""
}

if [ "${STANDIN_IGNORE_SIGTERM:-0}" = 1 ]; then
  trap '' TERM INT
  log "ignoring SIGTERM and SIGINT"
else
  trap 'on_signal SIGTERM' TERM
  trap 'on_signal SIGINT' INT
fi
trap 'on_crash' USR1

if [ -n "$CRASH" ]; then
  # $$ is this shell even inside the subshell; USR1 makes it crash.
  (sleep "$CRASH" && kill -USR1 $$) &
  CRASH_PID=$!
  log "will crash after $CRASH s with exit code $CODE"
fi

mkdir -p "$WWW" || exit 70
rm -f "$WWW/health"
httpd -f -p "$HOST:$PORT" -h "$WWW" &
HTTPD_PID=$!

log "loading ($LOAD s)"
nap "$LOAD"
echo ok >"$WWW/health"
log "ready on :$PORT"

while :; do
  nap 3600
done
