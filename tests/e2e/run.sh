#!/usr/bin/env bash
# End-to-end transcription test with a real speech-to-text engine.
#
#   1. makes speech with flite (tests/e2e/make_speech.sh),
#   2. scores the engine alone on it (direct_baseline.py),
#   3. starts the reference backend (samples/stt-server, pocketsphinx) on
#      127.0.0.1 with port 0, as every server here,
#   4. stage 1: cochlea pointed at it (--transcribe-url); streams every file
#      through cochlea in real time and scores the transcripts
#      (stream_e2e.py): word accuracy >= 0.9 and no worse than the engine
#      alone; the stereo call's transcripts on the right channels;
#   5. stage 2, the `deepgram` backend kind through two cochleas: cochlea B
#      (--transcribe-url, the same reference backend) serves /v1/listen, and
#      cochlea A (a config file with backend `up`, kind "deepgram", url
#      ws://B/v1/listen) streams each session to it. Every file goes into A
#      with transcribe=up in real time and is scored as in stage 1 but with
#      word accuracy >= 0.8 and no comparison with the engine alone. In both
#      stages: every final carries words inside its [start, end] and lies in
#      stream time (within its file), and the interim session (long.wav)
#      gets at least two partials before its final (through A: B's interim
#      Results, asked for with interim_results=true).
#
# Called by scripts/test.sh after `cargo test` (which built target/debug/cochlea).
# Everything it starts is stopped on exit, and every wait is bounded.
# Outputs: target/e2e/direct.txt, through-cochlea.txt, through-upstream.txt.
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

# start_cochlea NAME ARGS...: starts `cochlea serve` on 127.0.0.1, port 0,
# logging to $work/NAME.out and .err. Not in a $(...) subshell, so that its
# pid reaches the cleanup; cochlea_addr NAME then waits for its host:port.
start_cochlea() {
  local name=$1
  shift
  "$cochlea" serve --listen 127.0.0.1:0 --recordings-dir "$work/recordings-$name" \
    --transcribe-stop-wait-ms 120000 --transcribe-request-timeout-ms 60000 \
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
}
cochlea_addr() { wait_for_line "$work/$1.out" "cochlea listening on http://"; }

# accuracy_of FILE: the sentences' word accuracy in stream_e2e.py's last line.
accuracy_of() {
  tail -n 1 "$1" | "$python" -c 'import json,sys; print(json.load(sys.stdin).get("cochlea_word_accuracy"))'
}

# failed STAGE STATUS NAME...: reports a failed stage with the log tails of
# the cochleas it started.
failed() {
  log "$1 FAILED (status $2)"
  shift 2
  for name in "$@"; do
    log "$name log tail:"
    tail -n 30 "$work/$name.err" >&2 || true
  done
}

mkdir -p target/e2e
cp "$work/direct.txt" target/e2e/direct.txt

log "stage 1: through cochlea"
start_cochlea cochlea --transcribe-url "http://$stt_addr"
addr=$(cochlea_addr cochlea)
log "cochlea on $addr"
status=0
timeout 300 "$python" tests/e2e/stream_e2e.py --url "ws://$addr/v1/stream" \
  --speech-dir "$speech" --direct-accuracy "$direct_accuracy" | tee "$work/e2e.txt" || status=$?
cp "$work/e2e.txt" target/e2e/through-cochlea.txt 2>/dev/null || true
if [ "$status" -ne 0 ]; then
  failed "stage 1" "$status" cochlea
  exit "$status"
fi
log "stage 1 passed: word accuracy (sentences) $(accuracy_of "$work/e2e.txt") through cochlea, $direct_accuracy directly"

# Stage 2: cochlea A's `deepgram` kind against cochlea B's /v1/listen. B
# transcribes with the same reference backend; A only relays B's Results.
log "stage 2: through cochlea A, backend kind deepgram, to cochlea B's /v1/listen"
start_cochlea upstream-b --transcribe-url "http://$stt_addr"
b_addr=$(cochlea_addr upstream-b)
printf '[transcription.backends.up]\nkind = "deepgram"\nurl = "ws://%s/v1/listen"\n' \
  "$b_addr" >"$work/upstream-a.toml"
start_cochlea upstream-a --config "$work/upstream-a.toml"
a_addr=$(cochlea_addr upstream-a)
log "cochlea B (the upstream) on $b_addr, cochlea A on $a_addr"
status=0
timeout 300 "$python" tests/e2e/stream_e2e.py --url "ws://$a_addr/v1/stream" \
  --speech-dir "$speech" --transcribe up --min-accuracy 0.8 | tee "$work/upstream.txt" || status=$?
cp "$work/upstream.txt" target/e2e/through-upstream.txt 2>/dev/null || true
if [ "$status" -ne 0 ]; then
  failed "stage 2" "$status" upstream-a upstream-b
  exit "$status"
fi
log "stage 2 passed: word accuracy (sentences) $(accuracy_of "$work/upstream.txt") through two cochleas (deepgram upstream)"
log "passed"
