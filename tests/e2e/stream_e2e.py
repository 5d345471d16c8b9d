#!/usr/bin/env python3
"""End-to-end transcription through cochlea, scored against the reference.

Streams, at real-time pace and all at once (one session each):
  - every sentence of SPEECH_DIR/sentences.tsv (16 kHz mono s16 WAV), and
  - the two-speaker call SPEECH_DIR/call-8k-mulaw.wav (stereo, 8 kHz mu-law),
    whose turns are listed in SPEECH_DIR/call.tsv (channel, start, end, text),
  - SPEECH_DIR/long.wav, a sentence of about 6 s, with interim=true,
through a running cochlea with a transcription backend, in 20 ms messages
with framing=seq. --only picks some of the three (sentences, long, call);
--transcribe BACKEND asks every session for that backend (transcribe=...,
and `started` must name it) instead of the server's default. Then scores
the transcripts with wer.py:

  - sentences: corpus word accuracy, which must be at least --min-accuracy
    and, when --direct-accuracy is given, no worse than it (the same engine
    on the same files without cochlea, from direct_baseline.py) minus
    --tolerance;
  - partials (long.wav): at least two partials before the final of its
    utterance, whose stable_text never shrinks and is never ahead of a
    later partial's; the final's words match its text;
  - word timings: every final of every session carries words, in order,
    inside its utterance's [start, end];
  - stream time: every final lies within its file (each session streams
    one file from its first sample, so stream time is the file's time);
  - the call: every transcript must come back tagged with the channel of the
    speaker whose turn it overlaps, and each channel's word accuracy is
    reported (and must be at least --min-call-accuracy).

Prints one line per item and a final JSON line; exits 1 on failure.
Needs the `websockets` package (the e2e venv has it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
import wave

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wer  # noqa: E402

MESSAGE_MS = 20
# How far past the last sample a final may end (seconds): rounding to the
# resampler's and the detector's frames.
STREAM_TIME_SLACK_S = 0.05


def read_riff(path):
    """(format tag, channels, rate, bits, data bytes) of a WAV, G.711 included."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    at, fmt, payload = 12, None, None
    while at + 8 <= len(data):
        chunk_id, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        body = data[at + 8:at + 8 + size]
        if chunk_id == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif chunk_id == b"data":
            payload = body
        at += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise ValueError(f"{path}: no fmt or data chunk")
    tag, channels, rate, _, _, bits = fmt
    return tag, channels, rate, bits, payload


async def stream(url, query, payload, frame_bytes, rate, label, backend=None):
    """Streams payload in real time; returns the server's messages. With
    `backend`, the session must have been started with that backend."""
    messages = []
    async with websockets.connect(f"{url}?{query}", max_size=None) as ws:
        started = json.loads(await ws.recv())
        if started.get("type") != "started":
            raise RuntimeError(f"{label}: expected started, got {started}")
        if started.get("transcribe") is None:
            raise RuntimeError(f"{label}: the server is not transcribing: {started}")
        if backend is not None and started["transcribe"] != backend:
            raise RuntimeError(f"{label}: asked for backend {backend}, started with {started}")

        async def send():
            per_message = rate * MESSAGE_MS // 1000 * frame_bytes
            t0 = time.monotonic()
            seq = 0
            for offset in range(0, len(payload), per_message):
                chunk = payload[offset:offset + per_message]
                position = offset // frame_bytes
                # A message leaves when its last sample would exist.
                due = t0 + (position + len(chunk) // frame_bytes) / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await ws.send(struct.pack("<IQ", seq, position) + chunk)
                seq += 1
            await ws.send(json.dumps({"type": "stop"}))

        sender = asyncio.create_task(send())
        async for text in ws:
            if isinstance(text, bytes):
                continue
            message = json.loads(text)
            messages.append(message)
            if message["type"] == "closed":
                break
        await sender
    return messages


def transcripts(messages):
    """The finals (partials have is_final false)."""
    return [m for m in messages if m["type"] == "transcript" and m.get("is_final", True)]


def partials(messages):
    return [m for m in messages if m["type"] == "transcript" and m.get("is_final") is False]


def check_words(label, final):
    """Problems with a final's word timings: [] when they are fine."""
    words = final.get("words")
    if words is None:
        return [f"{label}: final without words: {final}"]
    if final["text"].strip() and not words:
        return [f"{label}: final with text but no words: {final}"]
    problems = []
    previous = final["start"]
    for word in words:
        if not (final["start"] - 1e-3 <= word["start"] <= word["end"] <= final["end"] + 1e-3):
            problems.append(f"{label}: word {word} outside its utterance {final['start']}-{final['end']}")
        if word["start"] < previous - 1e-3:
            problems.append(f"{label}: words out of order at {word}")
        previous = word["start"]
    if [w["word"] for w in words] != final["text"].split():
        problems.append(f"{label}: words {[w['word'] for w in words]} are not the text {final['text']!r}")
    return problems


def check_partials(messages):
    """Problems with the partials of a one-sentence interim session, and the
    number of partials before the first final."""
    problems = []
    all_transcripts = [m for m in messages if m["type"] == "transcript"]
    finals = [i for i, m in enumerate(all_transcripts) if m.get("is_final")]
    if not finals:
        return ["long: no final"], 0
    first = all_transcripts[finals[0]]
    before = [m for m in all_transcripts[:finals[0]] if m["utterance_id"] == first["utterance_id"]]
    if len(before) < 2:
        problems.append(f"long: {len(before)} partials before the final, expected at least 2")
    stable = {}
    for m in partials(messages):
        now = m.get("stable_text")
        if now is None:
            problems.append(f"long: partial without stable_text: {m}")
            continue
        previous = stable.get(m["utterance_id"], "")
        if not now.startswith(previous):
            problems.append(f"long: stable text shrank or changed: {previous!r} then {now!r}")
        stable[m["utterance_id"]] = now
    for i, m in enumerate(all_transcripts):
        if m.get("is_final") and any(
                p["utterance_id"] == m["utterance_id"] and p.get("is_final") is False
                for p in all_transcripts[i + 1:]):
            problems.append(f"long: a partial after the final of utterance {m['utterance_id']}")
    return problems, len(before)


def failures(messages):
    return [m for m in messages if m["type"] == "error"]


def check_stream_time(label, final, duration_s):
    """Problems with where a final lies: [] when it is inside the stream.

    The session streams one file from its first sample, so stream time is
    the file's time: a final must lie within [0, duration] (a final that
    ends a little after the last sample is allowed STREAM_TIME_SLACK_S for
    rounding and for a detector that pads the end)."""
    start, end = final["start"], final["end"]
    if not (-STREAM_TIME_SLACK_S <= start < duration_s):
        return [f"{label}: final starts at {start:.3f} s, outside the stream's 0-{duration_s:.3f} s: {final}"]
    if not (start <= end <= duration_s + STREAM_TIME_SLACK_S):
        return [f"{label}: final ends at {end:.3f} s, not within {start:.3f}-{duration_s:.3f} s: {final}"]
    return []


ITEMS = ("sentences", "long", "call")


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v1/stream")
    parser.add_argument("--speech-dir", required=True)
    parser.add_argument("--direct-accuracy", type=float,
                        help="the engine alone on the sentences; without it the "
                             "'no worse than the engine alone' check is skipped")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--min-call-accuracy", type=float, default=0.7)
    parser.add_argument("--transcribe", metavar="BACKEND",
                        help="ask every session for this backend (transcribe=BACKEND; "
                             "default: the server's default backend)")
    parser.add_argument("--only", default=",".join(ITEMS),
                        help=f"comma-separated items to stream, of {', '.join(ITEMS)} (default: all)")
    args = parser.parse_args()
    only = [item.strip() for item in args.only.split(",") if item.strip()]
    unknown = [item for item in only if item not in ITEMS]
    if unknown or not only:
        parser.error(f"--only takes some of {', '.join(ITEMS)}, not {args.only!r}")
    extra = f"&transcribe={args.transcribe}" if args.transcribe else ""

    def session(url, query, payload, frame_bytes, rate, label):
        return stream(url, query + extra, payload, frame_bytes, rate, label, args.transcribe)

    jobs = {}
    sentences = []
    durations = {}
    if "sentences" in only:
        with open(os.path.join(args.speech_dir, "sentences.tsv")) as f:
            sentences = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        for name, _ in sentences:
            with wave.open(os.path.join(args.speech_dir, name), "rb") as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), name
                payload = w.readframes(w.getnframes())
            durations[name] = len(payload) / 2 / 16000
            query = "encoding=pcm_s16le&sample_rate=16000&framing=seq"
            jobs[name] = session(args.url, query, payload, 2, 16000, name)
    if "long" in only:
        with wave.open(os.path.join(args.speech_dir, "long.wav"), "rb") as w:
            long_payload = w.readframes(w.getnframes())
        durations["long"] = len(long_payload) / 2 / 16000
        with open(os.path.join(args.speech_dir, "long.txt")) as f:
            long_reference = f.read().strip()
        jobs["long"] = session(args.url, "encoding=pcm_s16le&sample_rate=16000&framing=seq&interim=true",
                               long_payload, 2, 16000, "long")
    if "call" in only:
        tag, channels, rate, bits, call = read_riff(os.path.join(args.speech_dir, "call-8k-mulaw.wav"))
        assert (tag, channels, rate, bits) == (7, 2, 8000, 8), "the call must be stereo 8 kHz mu-law"
        durations["call"] = len(call) / 2 / 8000
        jobs["call"] = session(args.url, "encoding=mulaw&sample_rate=8000&channels=2&framing=seq",
                               call, 2, 8000, "call")
    results = dict(zip(jobs, await asyncio.gather(*jobs.values())))

    ok = True
    problems = []
    summary = {"transcribe": args.transcribe, "items": only}
    for label, messages in results.items():
        for final in transcripts(messages):
            problems.extend(check_words(label, final))
            if label in durations:
                problems.extend(check_stream_time(label, final, durations[label]))

    if "long" in results:
        long_messages = results["long"]
        long_problems, partial_count = check_partials(long_messages)
        problems.extend(long_problems)
        long_hypothesis = " ".join(m["text"] for m in transcripts(long_messages))
        print(f"long: {partial_count} partials before the final; stable texts: "
              f"{[m.get('stable_text') for m in partials(long_messages)]}")
        print(f"{wer.score(long_reference, long_hypothesis).accuracy:6.3f}  long.wav  {long_reference}  ||  {long_hypothesis}")
        for error in failures(long_messages):
            print(f"long: error {error}")
            ok = False
        summary["long_partials_before_final"] = partial_count
    for problem in problems:
        print(f"FAIL {problem}")
        ok = False

    if sentences:
        pairs = []
        for name, reference in sentences:
            messages = results[name]
            hypothesis = " ".join(m["text"] for m in transcripts(messages))
            for error in failures(messages):
                print(f"{name}: error {error}")
                ok = False
            counts = wer.score(reference, hypothesis)
            pairs.append((reference, hypothesis))
            print(f"{counts.accuracy:6.3f}  {name}  {reference}  ||  {hypothesis}")
        sentences_counts = wer.corpus(pairs)
        accuracy = sentences_counts.accuracy
        direct = "" if args.direct_accuracy is None else f"; directly: {args.direct_accuracy:.4f}"
        print(f"sentences through cochlea{f' (transcribe={args.transcribe})' if args.transcribe else ''}: "
              f"word accuracy {accuracy:.4f} "
              f"({sentences_counts.errors} errors / {sentences_counts.ref_words} words){direct}")
        if accuracy < args.min_accuracy:
            print(f"FAIL: accuracy {accuracy:.4f} < {args.min_accuracy}")
            ok = False
        if args.direct_accuracy is not None and accuracy < args.direct_accuracy - args.tolerance:
            print(f"FAIL: accuracy {accuracy:.4f} is worse than the engine alone ({args.direct_accuracy:.4f})")
            ok = False
        summary["sentences"] = len(sentences)
        summary["cochlea_word_accuracy"] = round(accuracy, 4)
        summary["direct_word_accuracy"] = args.direct_accuracy

    if "call" in results:
        # The call: each transcript belongs to the turn it overlaps, and that
        # turn's speaker must be on the transcript's channel.
        call_messages = results["call"]
        with open(os.path.join(args.speech_dir, "call.tsv")) as f:
            turns = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        turns = [(int(c), float(s), float(e), text) for c, s, e, text in turns]
        heard = {i: [] for i in range(len(turns))}
        for m in transcripts(call_messages):
            overlaps = [i for i, (_, s, e, _) in enumerate(turns) if m["start"] < e and m["end"] > s]
            if not overlaps:
                print(f"call: transcript outside every turn: {m}")
                ok = False
                continue
            best = max(overlaps, key=lambda i: min(m["end"], turns[i][2]) - max(m["start"], turns[i][1]))
            if turns[best][0] != m["channel"]:
                print(f"FAIL call: transcript on channel {m['channel']} during a turn of channel {turns[best][0]}: {m}")
                ok = False
                continue
            heard[best].append(m["text"])
        for error in failures(call_messages):
            print(f"call: error {error}")
            ok = False
        per_channel = {}
        for i, (channel, start, end, text) in enumerate(turns):
            hypothesis = " ".join(heard[i])
            per_channel.setdefault(channel, []).append((text, hypothesis))
            print(f"call ch{channel} {start:6.2f}-{end:6.2f}  {wer.score(text, hypothesis).accuracy:6.3f}  {text}  ||  {hypothesis}")
        call_accuracy = {}
        for channel, channel_pairs in sorted(per_channel.items()):
            counts = wer.corpus(channel_pairs)
            call_accuracy[channel] = round(counts.accuracy, 4)
            if counts.accuracy < args.min_call_accuracy:
                print(f"FAIL: call channel {channel} accuracy {counts.accuracy:.4f} < {args.min_call_accuracy}")
                ok = False
        summary["call_word_accuracy_by_channel"] = call_accuracy
    summary["ok"] = ok
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
