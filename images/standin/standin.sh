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
# Sleep, like vLLM's sleep mode, with STANDIN_SLEEP=1 (the server is then
# busybox nc running this script per connection instead of httpd):
#   POST /sleep?level=1|2  answers after STANDIN_SLEEP_SECONDS (default 0.2)
#                          {"is_sleeping": true, ..., "residue_mib": N};
#                          STANDIN_SLEEP_STATUS (default 200) makes it fail.
#   POST /wake_up          answers after STANDIN_WAKE_SECONDS (default 0.2);
#                          with STANDIN_WAKE_BROKEN=1 /health is 503 after it.
#   GET  /is_sleeping      {"is_sleeping", "state", "level", "cycles", "residue_mib"}:
#                          STANDIN_RESIDUE_MIB (default 512) plus
#                          STANDIN_RESIDUE_GROWTH_MIB for each further cycle.
#   POST /v1/...           when awake, OpenAI-shaped answers (as the Python
#                          stand-in's): /v1/chat/completions (with "stream":
#                          true, Server-Sent Events, one per token, then
#                          `data: [DONE]`), /v1/completions, /v1/embeddings,
#                          /v1/images/generations (a 1x1 PNG as b64_json);
#                          "max_tokens" tokens (default 8) "tok0 tok1 ...",
#                          STANDIN_TOKEN_SECONDS (default 0) apart; other
#                          /v1 paths {"object": "standin"}. 503 with
#                          Retry-After while loading, asleep or in between.
#   GET  /health           still 404 while loading, 200 when loaded (asleep too).
# STANDIN_OPENAI=1 serves the same (nc) way without using the sleep API.
#
# Meant to run as PID 1: every sleep is `sleep N & wait $!`, so a trapped
# signal interrupts it at once.

WWW="${STANDIN_WWW:-/tmp/standin-www}"

# ---------------------------------------------------------------- one request
# `standin.sh --serve`: run by nc for each connection (STANDIN_SLEEP=1),
# stdin/stdout are the socket. HTTP/1.0, one request, then close.
if [ "${1:-}" = --serve ]; then
  CR="$(printf '\r')"
  answer() { # status, body, [extra header line]
    printf 'HTTP/1.0 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n' "$1" "${#2}"
    [ -n "${3:-}" ] && printf '%s\r\n' "$3"
    printf '\r\n%s' "$2"
  }
  state() { cat "$WWW/state" 2>/dev/null || echo awake; }
  field() { # the string or number after "NAME": in the request body (a sketch of JSON, enough here)
    case "$body" in *"\"$1\":"*) ;; *) return 1 ;; esac
    v="${body#*\"$1\":}"
    v="${v# }"
    case "$v" in
      \"*) v="${v#\"}"; v="${v%%\"*}" ;;
      *) v="${v%%[!0-9a-z]*}" ;;
    esac
    printf '%s' "$v"
  }
  openai() { # the OpenAI-shaped answer to POST $1
    model="$(field model || echo standin)"
    n="$(field max_tokens || echo 8)"
    case "$n" in '' | *[!0-9]*) n=8 ;; esac
    [ "$n" -gt 1000 ] && n=1000
    gap="${STANDIN_TOKEN_SECONDS:-0}"
    text="" i=0
    while [ "$i" -lt "$n" ]; do text="${text}tok$i " i=$((i + 1)); done
    usage="{\"prompt_tokens\": 1, \"completion_tokens\": $n, \"total_tokens\": $((n + 1))}"
    case "$1" in
      /v1/chat/completions)
        if [ "$(field stream)" = true ]; then
          printf 'HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n'
          chunk() { printf 'data: {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": "%s", "choices": [{"index": 0, "delta": %s, "finish_reason": %s}]}\n\n' "$model" "$1" "$2"; }
          chunk '{"role": "assistant", "content": ""}' null
          i=0
          while [ "$i" -lt "$n" ]; do
            [ "$i" -gt 0 ] && [ "$gap" != 0 ] && sleep "$gap"
            chunk "{\"content\": \"tok$i \"}" null
            i=$((i + 1))
          done
          chunk '{}' '"stop"'
          printf 'data: [DONE]\n\n'
        else
          [ "$gap" != 0 ] && [ "$n" -gt 0 ] && sleep "$(awk "BEGIN { print $gap * $n }")"
          answer "200 OK" "{\"id\": \"chatcmpl-standin\", \"object\": \"chat.completion\", \"created\": 0, \"model\": \"$model\", \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"$text\"}, \"finish_reason\": \"stop\"}], \"usage\": $usage}"
        fi ;;
      /v1/completions)
        answer "200 OK" "{\"id\": \"cmpl-standin\", \"object\": \"text_completion\", \"created\": 0, \"model\": \"$model\", \"choices\": [{\"index\": 0, \"text\": \"$text\", \"finish_reason\": \"stop\", \"logprobs\": null}], \"usage\": $usage}" ;;
      /v1/embeddings)
        answer "200 OK" "{\"object\": \"list\", \"data\": [{\"object\": \"embedding\", \"index\": 0, \"embedding\": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}], \"model\": \"$model\", \"usage\": {\"prompt_tokens\": 1, \"total_tokens\": 1}}" ;;
      /v1/images/generations)
        answer "200 OK" '{"created": 0, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJRU5ErkJggg=="}]}' ;;
      *) answer "200 OK" '{"object": "standin"}' ;;
    esac
  }
  # The main script's stdout (the container's log), not the socket.
  say() { [ -n "${STANDIN_LOG:-}" ] && echo "standin: $*" >>"$STANDIN_LOG"; }
  num() { cat "$WWW/$1" 2>/dev/null || echo 0; }
  snapshot() {
    st="$(state)"
    cycles="$(num cycles)"
    residue=$(( ${STANDIN_RESIDUE_MIB:-512} + ${STANDIN_RESIDUE_GROWTH_MIB:-0} * (cycles > 0 ? cycles - 1 : 0) ))
    asleep=false
    [ "$st" = asleep ] && asleep=true
    printf '{"is_sleeping": %s, "state": "%s", "level": %s, "cycles": %s, "residue_mib": %s}' "$asleep" "$st" "$(num level)" "$cycles" "$residue"
  }
  settle() { # wait (bounded) while a sleep or wake runs
    n=0
    while :; do
      case "$(state)" in sleeping|waking) ;; *) return ;; esac
      n=$((n + 1))
      [ "$n" -gt 600 ] && return
      sleep 0.05
    done
  }
  IFS= read -r line || exit 0
  line="${line%"$CR"}"
  method="${line%% *}"
  target="${line#* }"
  target="${target%% *}"
  path="${target%%\?*}"
  query=""
  case "$target" in *\?*) query="${target#*\?}" ;; esac
  len=0
  while IFS= read -r h; do
    h="${h%"$CR"}"
    [ -z "$h" ] && break
    case "$h" in [Cc]ontent-[Ll]ength:*) len="${h#*:}"; len="${len# }" ;; esac
  done
  case "$len" in '' | *[!0-9]*) len=0 ;; esac
  body=""
  [ "$len" -gt 0 ] && [ "$len" -le 1048576 ] && body="$(head -c "$len")"
  loaded=0
  [ -f "$WWW/health" ] && loaded=1
  case "$method $path" in
    "GET /health")
      if [ -f "$WWW/broken" ]; then answer "503 Service Unavailable" '{"status": "broken after wake"}'
      elif [ "$loaded" = 1 ]; then answer "200 OK" '{"status": "ok"}'
      else answer "404 Not Found" '{"status": "loading"}'; fi ;;
    "GET /is_sleeping") answer "200 OK" "$(snapshot)" ;;
    "POST /sleep")
      level=1
      case "&$query&" in *"&level=2&"*) level=2 ;; *"&level=1&"* | "&&") level=1 ;; *"&level="*) level=bad ;; esac
      if [ "$loaded" = 0 ]; then answer "503 Service Unavailable" '{"error": "loading"}' "Retry-After: 1"
      elif [ "$level" = bad ]; then answer "400 Bad Request" '{"error": "level must be 1 or 2"}'
      elif [ "${STANDIN_SLEEP_STATUS:-200}" != 200 ]; then answer "${STANDIN_SLEEP_STATUS} Sleep Failed" '{"error": "sleep failed (STANDIN_SLEEP_STATUS)"}'
      else
        settle
        if [ "$(state)" != asleep ]; then
          echo sleeping >"$WWW/state"
          say "sleeping (level $level, ${STANDIN_SLEEP_SECONDS:-0.2} s)"
          sleep "${STANDIN_SLEEP_SECONDS:-0.2}"
          echo "$level" >"$WWW/level"
          echo $(( $(num cycles) + 1 )) >"$WWW/cycles"
          echo asleep >"$WWW/state"
          snapshot >/dev/null
          say "asleep (residue $residue MiB)"
        fi
        answer "200 OK" "$(snapshot)"
      fi ;;
    "POST /wake_up")
      if [ "$loaded" = 0 ]; then answer "503 Service Unavailable" '{"error": "loading"}' "Retry-After: 1"
      else
        settle
        if [ "$(state)" != awake ]; then
          echo waking >"$WWW/state"
          say "waking (${STANDIN_WAKE_SECONDS:-0.2} s)"
          sleep "${STANDIN_WAKE_SECONDS:-0.2}"
          [ "${STANDIN_WAKE_BROKEN:-0}" = 1 ] && touch "$WWW/broken"
          echo 0 >"$WWW/level"
          echo awake >"$WWW/state"
          say awake
        fi
        answer "200 OK" "$(snapshot)"
      fi ;;
    "POST /v1/"*)
      if [ "$loaded" = 1 ] && [ "$(state)" = awake ]; then openai "$path"
      else answer "503 Service Unavailable" "{\"error\": \"model is $(state)\"}" "Retry-After: 1"; fi ;;
    *) answer "404 Not Found" '{"error": "not found"}' ;;
  esac
  exit 0
fi

PORT="${STANDIN_PORT:-8000}"
HOST="${STANDIN_HOST:-127.0.0.1}"
LOAD="${STANDIN_LOAD_SECONDS:-2}"
STOP="${STANDIN_STOP_SECONDS:-1}"
CRASH="${STANDIN_CRASH_AFTER_SECONDS:-}"
CODE="${STANDIN_EXIT_CODE:-1}"

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
rm -f "$WWW/health" "$WWW/state" "$WWW/level" "$WWW/cycles" "$WWW/broken"
if [ "${STANDIN_SLEEP:-0}" = 1 ] || [ "${STANDIN_OPENAI:-0}" = 1 ]; then
  # One sh per connection, a backlog of 16 (one per -l).
  STANDIN_LOG="/proc/$$/fd/1"
  export STANDIN_LOG
  nc -llllllllllllllll -p "$PORT" "$HOST" -e /bin/sh "$0" --serve &
else
  httpd -f -p "$HOST:$PORT" -h "$WWW" &
fi
HTTPD_PID=$!

log "loading ($LOAD s)"
nap "$LOAD"
echo ok >"$WWW/health"
log "ready on :$PORT"

while :; do
  nap 3600
done
