#!/usr/bin/env bash
# End-to-end transcription test with a real speech-to-text engine.
#
#   1. makes speech with flite (tests/e2e/make_speech.sh),
#   2. scores the engine alone on it (direct_baseline.py),
#   3. starts the reference backend (samples/stt-server, pocketsphinx) and
#      cochlea pointed at it, both on 127.0.0.1 with port 0,
#   4. streams every file through cochlea in real time and scores the
#      transcripts (stream_e2e.py): word accuracy >= 0.9 and no worse than
#      the engine alone; the stereo call's transcripts on the right channels.
#
# Called by scripts/test.sh after `cargo test` (which built target/debug/cochlea).
# Everything it starts is stopped on exit, and every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf 'e2e: %s\n' "$*" >&2; }

python=$(scripts/stt-venv.sh)
cochlea=${COCHLEA_BIN:-target/debug/cochlea}
[ -x "$cochlea" ] || cargo build --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

speech=target/e2e-speech
tests/e2e/make_speech.sh "$speech" >/dev/null

log "the engine alone"
"$python" tests/e2e/direct_baseline.py --speech-dir "$speech" >"$work/direct.txt"
direct=$(tail -n 1 "$work/direct.txt")
direct_accuracy=$(printf '%s' "$direct" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["sentences"]["word_accuracy"])')
log "direct word accuracy (sentences): $direct_accuracy"

# wait_for_line FILE PREFIX: prints the rest of the first line of FILE that
# starts with PREFIX, waiting at most 60 s.
wait_for_line() {
  for _ in $(seq 1 600); do
    line=$(grep -m1 "^$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then
      printf '%s' "${line#"$2"}"
      return 0
    fi
    sleep 0.1
  done
  log "timed out waiting for '$2' in $1"
  cat "$1" >&2 || true
  return 1
}

"$python" samples/stt-server/stt_server.py --port 0 --workers 2 --quiet >"$work/stt.out" 2>"$work/stt.err" &
pids+=($!)
stt_addr=$(wait_for_line "$work/stt.out" "listening on http://")
log "reference backend on $stt_addr"

"$cochlea" serve --listen 127.0.0.1:0 --recordings-dir "$work/recordings" \
  --transcribe-url "http://$stt_addr" --transcribe-stop-wait-ms 120000 \
  --transcribe-request-timeout-ms 60000 >"$work/cochlea.out" 2>"$work/cochlea.err" &
pids+=($!)
addr=$(wait_for_line "$work/cochlea.out" "cochlea listening on http://")
log "cochlea on $addr"

status=0
timeout 300 "$python" tests/e2e/stream_e2e.py --url "ws://$addr/v1/stream" \
  --speech-dir "$speech" --direct-accuracy "$direct_accuracy" | tee "$work/e2e.txt" || status=$?
mkdir -p target/e2e
cp "$work/direct.txt" target/e2e/direct.txt
cp "$work/e2e.txt" target/e2e/through-cochlea.txt 2>/dev/null || true
if [ "$status" -ne 0 ]; then
  log "FAILED (status $status); cochlea log tail:"
  tail -n 30 "$work/cochlea.err" >&2 || true
  exit "$status"
fi
log "passed"
