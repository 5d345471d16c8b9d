#!/usr/bin/env python3
"""End-to-end transcription through cochlea, scored against the reference.

Streams, at real-time pace and all at once (one session each):
  - every sentence of SPEECH_DIR/sentences.tsv (16 kHz mono s16 WAV), and
  - the two-speaker call SPEECH_DIR/call-8k-mulaw.wav (stereo, 8 kHz mu-law),
    whose turns are listed in SPEECH_DIR/call.tsv (channel, start, end, text),
  - SPEECH_DIR/long.wav, a sentence of about 6 s, with interim=true,
through a running cochlea with a transcription backend, in 20 ms messages
with framing=seq. Then scores the transcripts with wer.py:

  - sentences: corpus word accuracy, which must be at least --min-accuracy
    and no worse than --direct-accuracy (the same engine on the same files
    without cochlea, from direct_baseline.py) minus --tolerance;
  - partials (long.wav): at least two partials before the final of its
    utterance, whose stable_text never shrinks and is never ahead of a
    later partial's; the final's words match its text;
  - word timings: every final of every session carries words, in order,
    inside its utterance's [start, end];
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


async def stream(url, query, payload, frame_bytes, rate, label):
    """Streams payload in real time; returns the server's messages."""
    messages = []
    async with websockets.connect(f"{url}?{query}", max_size=None) as ws:
        started = json.loads(await ws.recv())
        if started.get("type") != "started":
            raise RuntimeError(f"{label}: expected started, got {started}")
        if started.get("transcribe") is None:
            raise RuntimeError(f"{label}: the server is not transcribing: {started}")

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


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v1/stream")
    parser.add_argument("--speech-dir", required=True)
    parser.add_argument("--direct-accuracy", type=float, required=True)
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--min-call-accuracy", type=float, default=0.7)
    args = parser.parse_args()

    jobs = []
    with open(os.path.join(args.speech_dir, "sentences.tsv")) as f:
        sentences = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for name, _ in sentences:
        with wave.open(os.path.join(args.speech_dir, name), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), name
            payload = w.readframes(w.getnframes())
        query = "encoding=pcm_s16le&sample_rate=16000&framing=seq"
        jobs.append(stream(args.url, query, payload, 2, 16000, name))
    with wave.open(os.path.join(args.speech_dir, "long.wav"), "rb") as w:
        long_payload = w.readframes(w.getnframes())
    with open(os.path.join(args.speech_dir, "long.txt")) as f:
        long_reference = f.read().strip()
    jobs.append(stream(args.url, "encoding=pcm_s16le&sample_rate=16000&framing=seq&interim=true",
                       long_payload, 2, 16000, "long"))
    tag, channels, rate, bits, call = read_riff(os.path.join(args.speech_dir, "call-8k-mulaw.wav"))
    assert (tag, channels, rate, bits) == (7, 2, 8000, 8), "the call must be stereo 8 kHz mu-law"
    jobs.append(stream(args.url, "encoding=mulaw&sample_rate=8000&channels=2&framing=seq",
                       call, 2, 8000, "call"))
    results = await asyncio.gather(*jobs)

    ok = True
    long_messages = results[-2]
    problems, partial_count = check_partials(long_messages)
    long_finals = transcripts(long_messages)
    long_hypothesis = " ".join(m["text"] for m in long_finals)
    print(f"long: {partial_count} partials before the final; stable texts: "
          f"{[m.get('stable_text') for m in partials(long_messages)]}")
    print(f"{wer.score(long_reference, long_hypothesis).accuracy:6.3f}  long.wav  {long_reference}  ||  {long_hypothesis}")
    for label, messages in [(name, m) for (name, _), m in zip(sentences, results[:-2])] + [
            ("long", long_messages), ("call", results[-1])]:
        for final in transcripts(messages):
            problems.extend(check_words(label, final))
    for problem in problems:
        print(f"FAIL {problem}")
        ok = False
    for error in failures(long_messages):
        print(f"long: error {error}")
        ok = False

    pairs = []
    for (name, reference), messages in zip(sentences, results[:-2]):
        hypothesis = " ".join(m["text"] for m in transcripts(messages))
        for error in failures(messages):
            print(f"{name}: error {error}")
            ok = False
        counts = wer.score(reference, hypothesis)
        pairs.append((reference, hypothesis))
        print(f"{counts.accuracy:6.3f}  {name}  {reference}  ||  {hypothesis}")
    sentences_counts = wer.corpus(pairs)
    accuracy = sentences_counts.accuracy
    print(f"sentences through cochlea: word accuracy {accuracy:.4f} "
          f"({sentences_counts.errors} errors / {sentences_counts.ref_words} words); "
          f"directly: {args.direct_accuracy:.4f}")
    if accuracy < args.min_accuracy:
        print(f"FAIL: accuracy {accuracy:.4f} < {args.min_accuracy}")
        ok = False
    if accuracy < args.direct_accuracy - args.tolerance:
        print(f"FAIL: accuracy {accuracy:.4f} is worse than the engine alone ({args.direct_accuracy:.4f})")
        ok = False

    # The call: each transcript belongs to the turn it overlaps, and that
    # turn's speaker must be on the transcript's channel.
    call_messages = results[-1]
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
    print(json.dumps({
        "sentences": len(sentences),
        "cochlea_word_accuracy": round(accuracy, 4),
        "direct_word_accuracy": args.direct_accuracy,
        "call_word_accuracy_by_channel": call_accuracy,
        "long_partials_before_final": partial_count,
        "ok": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
