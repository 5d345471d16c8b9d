#!/usr/bin/env python3
"""Live-transcription latency through cochlea (issue 17, part 4). A benchmark:
it measures and asserts nothing about time.

Starts the reference backend (samples/stt-server, pocketsphinx) and, once per
configuration, a real `cochlea serve` (target/release/cochlea; this script
builds nothing), both on 127.0.0.1 with port 0. For each configuration it
streams ONE session over /v1/stream in real time (20 ms messages, paced to the
wall clock, framing=seq): LEAD_S of silence, then every sentence of
SPEECH_DIR/sentences.tsv and SPEECH_DIR/long.wav, each followed by GAP_S of
silence (tests/e2e/make_speech.sh makes them). Configurations: interim off
(finals only), then `interim=true` with each --intervals value of
`transcription.interim_interval_ms`.

The speech onset and offset of each clip are known: the first and last 10 ms
window whose RMS is within 30 dB of the clip's loudest (flite pads its clips
with a few tens of ms of silence). Per utterance it measures:

  first partial  wall time from sending the 20 ms message that holds the
                 onset to receiving the first `transcript` with is_final false
                 of an utterance that the server's `vad` speech_started put
                 inside the clip;
  final          wall time from sending the message that holds the last voiced
                 sample to receiving the last final (is_final true) of those
                 utterances; compare it with the VAD hangover
                 (transcription.vad.hangover_ms, 400 ms by default), which is
                 stream time the server must see before it can end the
                 utterance;
  vad lag        media time: speech_started.time - onset and
                 speech_ended.time - offset (what the VAD itself adds).

and per stream the interim cost: seconds of audio the backend was sent
(partials and finals, read from the reference server's per-request log) per
second of stream, and the backend's decode time per second of stream.

Prints one block per configuration and a JSON line with every figure; medians
and p90 are over the utterances (9: eight sentences and long.wav).

Run (holding the shared lock for the whole run, at low priority):
  cargo build --release --bin cochlea           # under the lock, once
  tests/e2e/make_speech.sh
  flock /tmp/cochlea-cargo.lock nice -n 10 "$(scripts/stt-venv.sh)" tests/e2e/bench_latency.py
Needs the `websockets` package (the e2e venv has it). Takes about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import wave

import websockets

RATE = 16000
MESSAGE_MS = 20
SAMPLES_PER_MESSAGE = RATE * MESSAGE_MS // 1000
WINDOW_SAMPLES = RATE // 100  # 10 ms, for the onset and offset
VOICED_DB_BELOW_PEAK = 30.0
HANGOVER_MS_DEFAULT = 400
# "stt-server: 2.34 s of audio (16000 Hz x1) decoded in 512 ms (498 ms CPU): 'text'"
DECODE_LOG = re.compile(r"stt-server: ([0-9.]+) s of audio .* decoded in ([0-9]+) ms \(([0-9]+) ms CPU\)")


def voiced_span(samples):
    """(first, last + 1) sample index of the voiced part of a clip: windows
    whose RMS is within VOICED_DB_BELOW_PEAK of the loudest window."""
    windows = []
    for at in range(0, len(samples) - WINDOW_SAMPLES + 1, WINDOW_SAMPLES):
        chunk = samples[at:at + WINDOW_SAMPLES]
        windows.append(math.sqrt(sum(s * s for s in chunk) / len(chunk)))
    peak = max(windows)
    floor = peak * 10 ** (-VOICED_DB_BELOW_PEAK / 20)
    voiced = [i for i, rms in enumerate(windows) if rms >= floor]
    return voiced[0] * WINDOW_SAMPLES, (voiced[-1] + 1) * WINDOW_SAMPLES


def read_clip(path):
    with wave.open(path, "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            raise SystemExit(f"{path}: expected 16 kHz mono s16 (tests/e2e/make_speech.sh makes it)")
        return w.readframes(w.getnframes())


def build_stream(speech_dir, lead_s, gap_s):
    """(payload, [(label, onset_sample, offset_sample)]): the clips back to
    back with silence around them, and where each clip's speech is."""
    with open(os.path.join(speech_dir, "sentences.tsv")) as f:
        names = [line.split("\t")[0] for line in f if line.strip()]
    names.append("long.wav")
    parts = [bytes(2 * int(lead_s * RATE))]
    position = int(lead_s * RATE)
    spans = []
    for name in names:
        clip = read_clip(os.path.join(speech_dir, name))
        samples = struct.unpack(f"<{len(clip) // 2}h", clip)
        first, end = voiced_span(samples)
        spans.append((name, position + first, position + end))
        parts.append(clip)
        position += len(samples)
        gap = int(gap_s * RATE)
        parts.append(bytes(2 * gap))
        position += gap
    return b"".join(parts), spans


async def stream(url, query, payload):
    """Streams payload in real time. Returns (send wall time per message
    index, [(receive wall time, message)]), times from time.monotonic()."""
    sent_at = []
    received = []
    async with websockets.connect(f"{url}?{query}", max_size=None) as ws:
        started = json.loads(await ws.recv())
        if started.get("type") != "started" or started.get("transcribe") is None:
            raise RuntimeError(f"expected a transcribing session, got {started}")

        async def send():
            per_message = SAMPLES_PER_MESSAGE * 2
            t0 = time.monotonic()
            for seq, offset in enumerate(range(0, len(payload), per_message)):
                chunk = payload[offset:offset + per_message]
                position = offset // 2
                # A message leaves when its last sample would exist.
                due = t0 + (position + len(chunk) // 2) / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await ws.send(struct.pack("<IQ", seq, position) + chunk)
                sent_at.append(time.monotonic())
            await ws.send(json.dumps({"type": "stop"}))

        sender = asyncio.create_task(send())
        async for text in ws:
            if isinstance(text, bytes):
                continue
            message = json.loads(text)
            received.append((time.monotonic(), message))
            if message["type"] == "closed":
                break
        await sender
    return sent_at, received


def quantile(values, q):
    """Nearest-rank quantile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 3),
            "p90": round(quantile(values, 0.9), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def analyse(spans, sent_at, received, stream_s, backend_lines):
    vad = [(t, m) for t, m in received if m["type"] == "vad"]
    transcripts = [(t, m) for t, m in received if m["type"] == "transcript"]
    errors = [m for _, m in received if m["type"] == "error"]
    rows = []
    for label, onset, offset in spans:
        onset_s, offset_s = onset / RATE, offset / RATE
        # Utterances whose detected onset lies in this clip's speech (give or
        # take the pre-roll and hangover); the gaps keep clips apart.
        starts = [m for _, m in vad if m["event"] == "speech_started"
                  and onset_s - 0.5 <= m["time"] <= offset_s + 0.5]
        ids = {m["utterance_id"] for m in starts}
        ends = [m for _, m in vad if m["event"] == "speech_ended" and m["utterance_id"] in ids]
        onset_sent = sent_at[onset // SAMPLES_PER_MESSAGE]
        offset_sent = sent_at[(offset - 1) // SAMPLES_PER_MESSAGE]
        partials = [(t, m) for t, m in transcripts if m["utterance_id"] in ids and m.get("is_final") is False]
        finals = [(t, m) for t, m in transcripts if m["utterance_id"] in ids and m.get("is_final") is True]
        rows.append({
            "clip": label,
            "speech_s": round(offset_s - onset_s, 3),
            "utterances": len(ids),
            "vad_onset_lag_s": round(min(m["time"] for m in starts) - onset_s, 3) if starts else None,
            "vad_offset_lag_s": round(max(m["time"] for m in ends) - offset_s, 3) if ends else None,
            "partials": len(partials),
            "first_partial_s": round(partials[0][0] - onset_sent, 3) if partials else None,
            "final_s": round(finals[-1][0] - offset_sent, 3) if finals else None,
            "final_backend_ms": finals[-1][1].get("backend_ms") if finals else None,
            "final_text": finals[-1][1]["text"] if finals else None,
        })
    audio_s = [float(m.group(1)) for m in map(DECODE_LOG.search, backend_lines) if m]
    decode_s = [int(m.group(2)) / 1000 for m in map(DECODE_LOG.search, backend_lines) if m]
    final_audio_s = sum(m["end"] - m["start"] for _, m in transcripts if m.get("is_final") is True)
    return {
        "utterances": rows,
        "first_partial_s": summary([r["first_partial_s"] for r in rows]),
        "final_s": summary([r["final_s"] for r in rows]),
        "vad_onset_lag_s": summary([r["vad_onset_lag_s"] for r in rows]),
        "vad_offset_lag_s": summary([r["vad_offset_lag_s"] for r in rows]),
        "partials_per_utterance": summary([r["partials"] for r in rows]),
        "stream_s": round(stream_s, 3),
        "backend_requests": len(audio_s),
        "backend_audio_s": round(sum(audio_s), 3),
        "final_audio_s": round(final_audio_s, 3),
        "backend_audio_per_stream_s": round(sum(audio_s) / stream_s, 3),
        "backend_decode_per_stream_s": round(sum(decode_s) / stream_s, 3),
        "errors": errors,
    }


def wait_for_line(path, prefix, process, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {prefix!r} in {path}")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_config(args, work, stt_addr, stt_log, interval_ms, payload, spans):
    name = "off" if interval_ms is None else f"interim_{interval_ms}ms"
    out, err = os.path.join(work, f"{name}.out"), os.path.join(work, f"{name}.err")
    command = [args.cochlea, "serve", "--listen", "127.0.0.1:0",
               "--recordings-dir", os.path.join(work, f"rec-{name}"),
               "--transcribe-url", f"http://{stt_addr}",
               "--transcribe-request-timeout-ms", "60000", "--transcribe-stop-wait-ms", "60000"]
    if interval_ms is not None:
        command += ["--transcribe-interim-interval-ms", str(interval_ms)]
    if args.hangover_ms is not None:
        command += ["--vad-hangover-ms", str(args.hangover_ms)]
    with open(out, "w") as o, open(err, "w") as e:
        cochlea = subprocess.Popen(command, stdout=o, stderr=e)
    try:
        addr = wait_for_line(out, "cochlea listening on http://", cochlea)
        with open(stt_log) as f:
            before = len(f.readlines())
        query = "encoding=pcm_s16le&sample_rate=16000&framing=seq&transcribe=default"
        if interval_ms is not None:
            query += "&interim=true"
        sent_at, received = asyncio.run(asyncio.wait_for(
            stream(f"ws://{addr}/v1/stream", query, payload), timeout=len(payload) / 2 / RATE + 120))
        time.sleep(0.5)  # the backend's last log line
        with open(stt_log) as f:
            backend_lines = f.readlines()[before:]
    finally:
        stop(cochlea)
    result = analyse(spans, sent_at, received, len(payload) / 2 / RATE, backend_lines)
    result["config"] = name
    result["command"] = " ".join(command[1:])
    return result


def report(result):
    print(f"\n== {result['config']}: {result['command']}")
    for r in result["utterances"]:
        print(f"  {r['clip']:9} speech {r['speech_s']:5.2f}s utt {r['utterances']} partials {r['partials']:2} "
              f"first partial {r['first_partial_s']} s, final {r['final_s']} s (backend {r['final_backend_ms']} ms), "
              f"vad lag +{r['vad_onset_lag_s']}/+{r['vad_offset_lag_s']} s: {r['final_text']!r}")
    for key in ("first_partial_s", "final_s", "vad_onset_lag_s", "vad_offset_lag_s", "partials_per_utterance"):
        print(f"  {key:24} {result[key]}")
    print(f"  backend: {result['backend_requests']} requests, {result['backend_audio_s']} s of audio "
          f"(finals {result['final_audio_s']} s) over a {result['stream_s']} s stream: "
          f"{result['backend_audio_per_stream_s']} backend-s of audio and "
          f"{result['backend_decode_per_stream_s']} s of decoding per stream-s")
    for error in result["errors"]:
        print(f"  error: {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speech-dir", default="target/e2e-speech")
    parser.add_argument("--cochlea", default="target/release/cochlea")
    parser.add_argument("--stt-python", default=sys.executable, help="python with pocketsphinx (the e2e venv)")
    parser.add_argument("--intervals", default="1000,500", help="interim_interval_ms values, comma-separated")
    parser.add_argument("--no-baseline", action="store_true", help="skip the finals-only stream")
    parser.add_argument("--workers", type=int, default=2, help="reference server decoder processes")
    parser.add_argument("--lead-s", type=float, default=1.0)
    parser.add_argument("--gap-s", type=float, default=2.0, help="silence after each clip (> hangover)")
    parser.add_argument("--hangover-ms", type=int, help="cochlea's --vad-hangover-ms (default: its own, 400)")
    args = parser.parse_args()
    for path in (args.cochlea, os.path.join(args.speech_dir, "long.wav")):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: cargo build --release --bin cochlea; tests/e2e/make_speech.sh")

    payload, spans = build_stream(args.speech_dir, args.lead_s, args.gap_s)
    configs = ([] if args.no_baseline else [None]) + [int(v) for v in args.intervals.split(",") if v]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = []
    with tempfile.TemporaryDirectory() as work:
        stt_out, stt_log = os.path.join(work, "stt.out"), os.path.join(work, "stt.err")
        with open(stt_out, "w") as o, open(stt_log, "w") as e:
            stt = subprocess.Popen([args.stt_python, os.path.join(root, "samples/stt-server/stt_server.py"),
                                    "--port", "0", "--workers", str(args.workers)], stdout=o, stderr=e)
        try:
            stt_addr = wait_for_line(stt_out, "listening on http://", stt, timeout_s=120)
            for interval_ms in configs:
                result = run_config(args, work, stt_addr, stt_log, interval_ms, payload, spans)
                report(result)
                results.append(result)
        finally:
            stop(stt)
    print(json.dumps({"load_average": os.getloadavg(), "hangover_ms": args.hangover_ms or HANGOVER_MS_DEFAULT,
                      "results": [{k: v for k, v in r.items() if k != "utterances"} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
