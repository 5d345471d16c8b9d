#!/usr/bin/env bash
# Checks that /metrics is valid Prometheus text exposition format.
#
# Builds cochlea, starts it on a free port of 127.0.0.1 with a throwaway
# recordings directory, waits for /healthz, fetches /metrics and runs
# `promtool check metrics` on it (format, metric naming and HELP lint). The
# metrics registered at zero at startup are enough for the format check.
# Prints promtool's verdict and exits with its status.
#
# Needs curl and promtool (Debian: prometheus); scripts/setup.sh installs both.
# Set COCHLEA_BIN to check an already-built binary without building.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'check-metrics: %s\n' "$*" >&2; }

for tool in curl promtool; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "$tool not found: run scripts/setup.sh"
    exit 1
  fi
done

bin=${COCHLEA_BIN:-}
if [ -z "$bin" ]; then
  cargo build --quiet
  bin=target/debug/cochlea
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

mkdir "$work/recordings"
"$bin" serve --listen 127.0.0.1:0 --recordings-dir "$work/recordings" \
  >"$work/stdout" 2>"$work/stderr" &
server_pid=$!

# The server prints "cochlea listening on http://ADDR" once bound.
addr=""
for _ in $(seq 1 300); do
  addr=$(sed -n 's|^cochlea listening on http://\([^[:space:]]*\).*|\1|p' "$work/stdout" | head -n 1)
  [ -n "$addr" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    log "the server exited before listening:"
    cat "$work/stderr" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$addr" ]; then
  log "no 'cochlea listening on http://ADDR' line within 30 s:"
  cat "$work/stdout" "$work/stderr" >&2
  exit 1
fi

curl --silent --show-error --fail --max-time 10 \
  --retry 20 --retry-delay 1 --retry-connrefused \
  "http://$addr/healthz" >/dev/null
curl --silent --show-error --fail --max-time 10 "http://$addr/metrics" >"$work/metrics.txt"

series=$(grep -cv '^#' "$work/metrics.txt" || true)
log "fetched /metrics from $addr: $series samples"

status=0
promtool check metrics <"$work/metrics.txt" >"$work/promtool.out" 2>&1 || status=$?
if [ "$status" -eq 0 ]; then
  # promtool says nothing when every metric passes.
  echo "promtool check metrics: OK ($series samples, no problems)"
else
  echo "promtool check metrics: FAILED (exit status $status)"
  sed 's/^/  /' "$work/promtool.out"
fi
exit "$status"
