#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Installs cargo-fuzz when missing, seeds each target's corpus from
# tests/fixtures (and small hand-made inputs) when the corpus is empty, runs
# each target for SECONDS_PER_TARGET seconds, and prints one summary line per
# target. Exits non-zero if any target crashed; the crashing input is left in
# fuzz/artifacts/TARGET/ (replay it with `cargo fuzz run TARGET FILE`).
#
# Idempotent: the corpora in fuzz/corpus/ only grow, and a rerun starts from
# what earlier runs found. Needs python3 to build the Opus and PCM seeds;
# without it those targets start from an empty corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi

log() { printf 'fuzz: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install a Rust toolchain first"
  exit 1
fi
# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null 2>&1; then
  log "no C++ compiler (c++) found; libFuzzer needs one (Debian: g++)"
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz needs nightly flags (-Zsanitizer, sancov passes); RUSTC_BOOTSTRAP
# lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1

targets=(ogg_demux webm_demux opus_packets seq_header control_messages pcm_g711
  dialect_twilio dialect_vonage dialect_audiofork dialect_deepgram)
fixtures=$root/tests/fixtures

# ---- seeds -----------------------------------------------------------------

# True when the corpus directory of $1 is missing or empty.
corpus_empty() {
  local dir=fuzz/corpus/$1
  [ ! -d "$dir" ] || [ -z "$(ls -A "$dir")" ]
}

# Container targets: the fixture with one byte in front (the slice size).
seed_container() {
  local target=$1
  shift
  local dir=fuzz/corpus/$target i=0 file
  for file in "$@"; do
    for cut in '\x3f' '\xff' '\x00'; do
      i=$((i + 1))
      { printf "$cut"; cat "$fixtures/$file"; } >"$dir/seed-$i"
    done
  done
}

seed_seq_header() {
  local dir=fuzz/corpus/seq_header
  # seq 0, timestamp 0, no payload; seq 1, timestamp 160, 4 payload bytes;
  # a truncated header.
  printf '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >"$dir/seed-empty-payload"
  printf '\x01\x00\x00\x00\xa0\x00\x00\x00\x00\x00\x00\x00\x11\x22\x33\x44' >"$dir/seed-payload"
  printf '\x01\x00\x00' >"$dir/seed-truncated"
}

seed_control_messages() {
  local dir=fuzz/corpus/control_messages
  printf '%s' '{"type":"start","encoding":"pcm_s16le","sample_rate":16000,"channels":1,"framing":"seq","sinks":["record"],"metadata":{"call":"42"}}' >"$dir/seed-start"
  printf '%s' '{"type":"start","encoding":"webm_opus"}' >"$dir/seed-start-webm"
  printf '%s' '{"type":"keepalive"}' >"$dir/seed-keepalive"
  printf '%s' '{"type":"flush"}' >"$dir/seed-flush"
  printf '%s' '{"type":"stop"}' >"$dir/seed-stop"
  printf '%s' 'encoding=mulaw&channels=2&framing=seq&sinks=record,transcribe' >"$dir/seed-query"
  printf '%s' 'resume=3f2a&resume_token=c0ffee' >"$dir/seed-resume"
  # A query string, a newline, then a start message merged over it.
  printf '%s\n%s' 'sample_rate=8000&sinks=none' '{"type":"start","encoding":"opus","sample_rate":48000}' >"$dir/seed-merge"
}

# opus_packets ([mode][len u8][message]...) from the Ogg fixtures' packets,
# pcm_g711 ([mode][len u16 LE][message]...) from the WAV fixtures, and the
# dialect targets (QUERY\n[tag][len u16 LE][message]...) from each
# platform's documented messages and the fixtures.
seed_with_python() {
  local target=$1
  if ! command -v python3 >/dev/null 2>&1; then
    log "python3 not found: $target starts from an empty corpus"
    return
  fi
  python3 - "$target" "$fixtures" "fuzz/corpus/$target" <<'PY'
import struct, sys
from pathlib import Path

target, fixtures, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def ogg_packets(path):
    """Packets of the first logical stream, headers (OpusHead, OpusTags) dropped."""
    data, pos, packets, partial = path.read_bytes(), 0, [], b""
    while data.startswith(b"OggS", pos):
        nseg = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + nseg]
        body = pos + 27 + nseg
        for lace in lacing:
            partial += data[body : body + lace]
            body += lace
            if lace < 255:
                packets.append(partial)
                partial = b""
        pos = body
    return [p for p in packets if not p.startswith((b"OpusHead", b"OpusTags"))]

def wav_data(path):
    data, pos = path.read_bytes(), 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if kind == b"data":
            return data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
    raise SystemExit(f"{path}: no data chunk")

def seq(seq, timestamp):
    return struct.pack("<IQ", seq, timestamp)

def write(name, data):
    (out / name).write_bytes(data)

if target == "opus_packets":
    # mode: bits 0-1 rate (0: 8k, 1: 16k, 2: 48k), bit 2 stereo, bit 3 seq.
    for name, stereo in (("speech-opusenc.opus", 0), ("call-stereo.opus", 4)):
        packets = [p for p in ogg_packets(fixtures / name) if len(p) <= 255 - 12][:25]
        stem = name.split(".")[0]
        write(f"seed-{stem}-raw", bytes([2 | stereo]) + b"".join(bytes([len(p)]) + p for p in packets))
        # 20 ms packets at 48 kHz are 960 frames apart; drop every 7th to
        # exercise concealment, and swap two to exercise reordering.
        order = [i for i in range(len(packets)) if i % 7 != 6]
        order[3], order[4] = order[4], order[3]
        body = b""
        for i in order:
            message = seq(i, i * 960) + packets[i]
            body += bytes([len(message)]) + message
        write(f"seed-{stem}-seq", bytes([2 | stereo | 8]) + body)
elif target == "pcm_g711":
    # mode: bits 0-1 encoding (s16, f32, mulaw, alaw), bits 2-3 rate (8k, 16k,
    # 44.1k, 48k), bit 4 stereo, bit 5 seq, bits 6-7 clock step.
    def raw(mode, audio, size, count=6):
        chunks = [audio[i * size : (i + 1) * size] for i in range(count)]
        return bytes([mode]) + b"".join(struct.pack("<H", len(c)) + c for c in chunks)

    def seq_stream(mode, audio, frame_bytes, frames, order):
        body = b""
        for i in order:
            payload = audio[i * frames * frame_bytes : (i + 1) * frames * frame_bytes]
            message = seq(i, i * frames) + payload
            body += struct.pack("<H", len(message)) + message
        return bytes([mode]) + body

    s16_8k = wav_data(fixtures / "speech-8k.wav")[16000:]
    s16_16k = wav_data(fixtures / "speech-16k.wav")[32000:]
    mulaw = wav_data(fixtures / "speech-8k-mulaw.wav")[8000:]
    alaw = wav_data(fixtures / "speech-8k-alaw.wav")[8000:]
    stereo = wav_data(fixtures / "call-stereo-8k.wav")[32000:]
    samples = struct.unpack_from("<320h", s16_16k)
    f32 = struct.pack("<320f", *(s / 32768 for s in samples))
    f32_odd = struct.pack("<4f", float("nan"), float("inf"), -2.0, 0.5)

    write("seed-s16-8k-raw", raw(0b00_0_0_00_00, s16_8k, 320))
    write("seed-s16-stereo-raw", raw(0b00_0_1_00_00, stereo, 640))
    write("seed-f32-16k-raw", raw(0b00_0_0_01_01, f32 + f32_odd, 640, 3))
    write("seed-mulaw-raw", raw(0b00_0_0_00_10, mulaw, 160))
    write("seed-alaw-raw", raw(0b00_0_0_00_11, alaw, 160))
    # seq: a lost message, a reordered pair, a duplicate, a late arrival.
    order = [0, 2, 1, 3, 3, 5, 6, 4, 7]
    write("seed-s16-16k-seq", seq_stream(0b01_1_0_01_00, s16_16k, 2, 320, order))
    write("seed-mulaw-seq", seq_stream(0b10_1_0_00_10, mulaw, 1, 160, order))
    write("seed-alaw-stereo-seq", seq_stream(0b11_1_1_00_11, alaw, 2, 80, order))
    write("seed-f32-seq", seq_stream(0b00_1_0_01_01, f32, 4, 80, [0, 1, 3, 2]))
elif target.startswith("dialect_"):
    import base64, json

    def connection(query, *messages):
        """QUERY\n, then [tag][len u16 LE][payload]: tag 0 text, 1 binary."""
        body = query.encode() + b"\n"
        for message in messages:
            if isinstance(message, (dict, list)):
                message = json.dumps(message)
            binary = isinstance(message, bytes)
            payload = message if binary else message.encode()
            body += bytes([1 if binary else 0]) + struct.pack("<H", len(payload)) + payload
        return body

    def chunks(data, size, count):
        return [data[i * size : (i + 1) * size] for i in range(count)]

    if target == "dialect_twilio":
        mulaw = wav_data(fixtures / "speech-8k-mulaw.wav")[8000:]

        def media(seq, track, chunk, timestamp, audio):
            return {"event": "media", "sequenceNumber": str(seq), "streamSid": "MZ1",
                    "media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp),
                              "payload": base64.b64encode(audio).decode()}}

        def start(tracks, custom):
            return {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                    "start": {"streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1",
                              "tracks": tracks, "customParameters": custom,
                              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        audio = chunks(mulaw, 160, 6)
        write("seed-inbound", connection("", connected, start(["inbound"], {"agent": "ana"}),
              *[media(k + 2, "inbound", k + 1, k * 20, a) for k, a in enumerate(audio)],
              {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}},
              {"event": "mark", "mark": {"name": "m1"}}, {"event": "stop"}))
        both = []
        for k, a in enumerate(audio):
            both.append(media(2 * k + 2, "inbound", k + 1, k * 20, a))
            both.append(media(2 * k + 3, "outbound", k + 1, k * 20 + 40, a[::-1]))
        write("seed-both-tracks", connection("sinks=record", connected,
              start(["inbound", "outbound"], {"transcribe": "none"}), *both, {"event": "stop"}))
        # A timestamp jump on one of two tracks (issue 15), then normal media.
        write("seed-jump", connection("", connected, start(["inbound", "outbound"], {}),
              media(2, "inbound", 1, 0, audio[0]), media(3, "inbound", 2, 99999999999999999, audio[1]),
              media(4, "outbound", 1, 20, audio[2]), {"event": "stop"}))
        # The last millisecond whose first sample frame still fits in u64.
        write("seed-last-timestamp", connection("", connected, start(["inbound"], {}),
              media(2, "inbound", 1, 2**64 // 8 - 1, audio[0]), {"event": "stop"}))
    elif target == "dialect_vonage":
        l16 = wav_data(fixtures / "speech-16k.wav")[32000:]
        write("seed-16k", connection("transcribe=none",
              {"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "call": {"id": 42}},
              *chunks(l16, 640, 4), {"event": "websocket:dtmf", "digit": "5", "duration": 260},
              {"event": "websocket:other"}, *chunks(l16[2560:], 640, 2)))
        write("seed-8k", connection("", {"event": "websocket:connected", "content-type": "audio/l16; rate=8000"},
              *chunks(wav_data(fixtures / "speech-8k.wav")[16000:], 320, 4)))
    elif target == "dialect_audiofork":
        l16 = wav_data(fixtures / "call-stereo-8k.wav")[32000:]
        write("seed-stereo", connection("mix_type=stereo&sampling_rate=8k",
              {"to": "6173333456", "callid": "abc"}, *chunks(l16, 640, 4), "dtmf 5", *chunks(l16[2560:], 640, 2)))
        write("seed-audio-first", connection("sampling_rate=16k",
              *chunks(wav_data(fixtures / "speech-16k.wav")[32000:], 640, 3), "call 42"))
    elif target == "dialect_deepgram":
        s16 = wav_data(fixtures / "speech-16k.wav")[32000:]
        # Raw PCM cut inside sample frames, then the control messages.
        write("seed-linear16", connection("encoding=linear16&sample_rate=16000&channels=1&vad_events=true&utterance_end_ms=1000&model=nova-2",
              *chunks(s16, 641, 4), {"type": "KeepAlive"}, {"type": "Finalize"},
              {"type": "Configure", "keyterms": ["x"]}, {"type": "CloseStream"}))
        write("seed-mulaw", connection("encoding=mulaw&sample_rate=8000",
              *chunks(wav_data(fixtures / "speech-8k-mulaw.wav")[8000:], 157, 4), b""))
        # Containers without `encoding`, sniffed from their first bytes.
        for name, cut in (("speech-8k.wav", 30), ("call-stereo-8k.wav", 7),
                          ("speech-opusenc.opus", 100), ("speech-ffmpeg.webm", 300)):
            data = (fixtures / name).read_bytes()[:4000]
            write(f"seed-{name}", connection("", data[:cut], data[cut:cut + 1000], data[cut + 1000:]))
PY
}

for target in "${targets[@]}"; do
  corpus_empty "$target" || continue
  mkdir -p "fuzz/corpus/$target"
  log "seeding fuzz/corpus/$target"
  case $target in
    ogg_demux) seed_container "$target" speech-opusenc.opus speech-ffmpeg.ogg call-stereo.opus ;;
    webm_demux) seed_container "$target" speech-ffmpeg.webm ;;
    seq_header) seed_seq_header ;;
    control_messages) seed_control_messages ;;
    opus_packets | pcm_g711 | dialect_*) seed_with_python "$target" ;;
  esac
done

# ---- build and run ---------------------------------------------------------

# Release builds with debug assertions and overflow checks, so arithmetic
# that would silently wrap in a plain release build is reported as a crash.
build_flags=(--release --debug-assertions)

cd fuzz
log "building the fuzz targets"
cargo fuzz build "${build_flags[@]}"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

failed=()
for target in "${targets[@]}"; do
  log "running $target for ${seconds}s"
  mkdir -p "corpus/$target" "artifacts/$target"
  status=0
  # -timeout: one input running over 30 s is reported as a hang (and keeps
  # the run bounded); -rss_limit_mb: a runaway allocation is a crash too.
  cargo fuzz run "${build_flags[@]}" "$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 >"$logs/$target.log" 2>&1 || status=$?
  # libFuzzer ends a clean run with "Done N runs in S second(s)".
  runs=$(sed -n 's/^Done \([0-9][0-9]*\) runs in .*/\1/p' "$logs/$target.log" | tail -n 1)
  if [ "$status" -eq 0 ] && [ -n "$runs" ]; then
    echo "fuzz $target: $runs executions, 0 crashes"
    continue
  fi
  failed+=("$target")
  # No "Done" line after a crash: take the last status line's count.
  runs=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$logs/$target.log" | tail -n 1)
  echo "fuzz $target: ${runs:-?} executions, 1 crash (exit status $status)"
  # The panic or sanitizer report, and where the input was saved.
  # (a Rust panic's message is on the line after "panicked at").
  awk '/panicked at/ { print; getline; print; next }
       /ERROR: (libFuzzer|AddressSanitizer)|^SUMMARY:|Test unit written to|^Base64:/' \
    "$logs/$target.log" | head -n 20 | sed 's/^/    /' || true
  if ! grep -q "Test unit written to" "$logs/$target.log"; then
    tail -n 30 "$logs/$target.log" | sed 's/^/    /'
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  log "crashed: ${failed[*]} (inputs in fuzz/artifacts/TARGET/)"
  exit 1
fi
