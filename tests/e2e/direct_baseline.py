#!/usr/bin/env python3
"""Word accuracy of the reference engine run directly on the test speech.

This is the figure the end-to-end test through cochlea is compared with: the
same pocketsphinx decoder with the same settings as samples/stt-server (it is
imported from there), on the files tests/e2e/make_speech.sh writes, without
cochlea or HTTP in between.

  * sentences: each sNN.wav (16 kHz mono) decoded as one utterance.
  * call: the stereo 8 kHz mu-law call, each channel decoded from mu-law and
    resampled to 16 kHz the way cochlea does it (band-limited; here sox's
    resampler by default, or the reference server's own with
    --resampler server), then cut into its turns from call.tsv with 0.2 s
    before and 0.4 s after each (a VAD's pre-roll and hangover) and each turn
    decoded as one utterance.

Run with the venv's python (scripts/stt-venv.sh prints its path):
    $(scripts/stt-venv.sh) tests/e2e/direct_baseline.py [--speech-dir DIR]
Prints one line per utterance, then one JSON line:
    {"engine": "pocketsphinx ...", "sentences": {...}, "call": {"left": {...},
     "right": {...}, "both": {...}}}
where each {...} holds wer.Counts.as_dict() (word_accuracy, errors, ...)
pooled over its files. --min-accuracy X exits 1 if any of those is below X.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "samples", "stt-server"))

import stt_server  # noqa: E402
import wer  # noqa: E402

PRE_ROLL_S = 0.2
HANGOVER_S = 0.4


def read_tsv(path: str) -> List[List[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def channel_16k(call_path: str, channel: int, resampler: str, tmp: str) -> Tuple[bytes, int]:
    """One channel of the call as 16 kHz mono s16le PCM, and its rate."""
    if resampler == "sox":
        out = os.path.join(tmp, f"ch{channel}.wav")
        # sox decodes mu-law on reading; `rate` is its band-limited resampler.
        subprocess.run(["sox", "-R", call_path, "-e", "signed-integer", "-b", "16", out,
                        "remix", str(channel + 1), "rate", str(stt_server.TARGET_RATE_HZ)], check=True)
        with wave.open(out) as w:
            assert w.getframerate() == stt_server.TARGET_RATE_HZ and w.getnchannels() == 1
            return w.readframes(w.getnframes()), stt_server.TARGET_RATE_HZ
    # The reference server's own path (its mu-law table and resampler) on
    # this channel alone, which sox only extracts, still as mu-law.
    out = os.path.join(tmp, f"ch{channel}-8k.wav")
    subprocess.run(["sox", "-R", call_path, out, "remix", str(channel + 1)], check=True)
    with open(out, "rb") as f:
        audio = stt_server.read_wav(f.read())
    return audio.pcm16k, stt_server.TARGET_RATE_HZ


def cut(pcm: bytes, rate: int, start_s: float, end_s: float) -> bytes:
    first = max(0, int((start_s - PRE_ROLL_S) * rate))
    last = min(len(pcm) // 2, int((end_s + HANGOVER_S) * rate))
    return pcm[first * 2:last * 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speech-dir", default=os.path.join(ROOT, "target", "e2e-speech"),
                        help="make_speech.sh's output (default target/e2e-speech)")
    parser.add_argument("--resampler", choices=("sox", "server"), default="sox",
                        help="how the call's channels get to 16 kHz (default sox)")
    parser.add_argument("--skip-call", action="store_true", help="only the sentences")
    parser.add_argument("--min-accuracy", type=float, help="exit 1 if any pooled accuracy is below this")
    args = parser.parse_args()

    sentences_tsv = os.path.join(args.speech_dir, "sentences.tsv")
    if not os.path.exists(sentences_tsv):
        print(f"direct_baseline: {sentences_tsv} is missing: run tests/e2e/make_speech.sh", file=sys.stderr)
        return 2
    decoder = stt_server.make_decoder()
    report: Dict[str, object] = {
        "engine": f"pocketsphinx {importlib.metadata.version('pocketsphinx')}",
        "speech_dir": args.speech_dir,
    }
    audio_s = 0.0
    cpu_s = 0.0

    total = wer.Counts()
    for name, ref in read_tsv(sentences_tsv):
        with open(os.path.join(args.speech_dir, name), "rb") as f:
            audio = stt_server.read_wav(f.read())
        result = stt_server.transcribe(decoder, audio.pcm16k)
        counts = wer.score(ref, result.text)
        total = total + counts
        audio_s += audio.duration_s
        cpu_s += result.cpu_s
        print(f"{counts.accuracy:6.3f}  {name}  {ref}  ||  {result.text}")
    report["sentences"] = {"files": len(read_tsv(sentences_tsv)), **total.as_dict()}

    if not args.skip_call:
        call_path = os.path.join(args.speech_dir, "call-8k-mulaw.wav")
        turns = read_tsv(os.path.join(args.speech_dir, "call.tsv"))
        per_channel = {0: wer.Counts(), 1: wer.Counts()}
        tmp = tempfile.mkdtemp()
        try:
            for channel in (0, 1):
                pcm, rate = channel_16k(call_path, channel, args.resampler, tmp)
                for ch, start, end, ref in turns:
                    if int(ch) != channel:
                        continue
                    piece = cut(pcm, rate, float(start), float(end))
                    result = stt_server.transcribe(decoder, piece)
                    counts = wer.score(ref, result.text)
                    per_channel[channel] = per_channel[channel] + counts
                    audio_s += len(piece) / 2 / rate
                    cpu_s += result.cpu_s
                    print(f"{counts.accuracy:6.3f}  call ch{channel} {float(start):6.2f}s  {ref}  ||  {result.text}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report["call"] = {
            "resampler": args.resampler,
            "left": per_channel[0].as_dict(),
            "right": per_channel[1].as_dict(),
            "both": (per_channel[0] + per_channel[1]).as_dict(),
        }
    report["cpu_s_per_audio_s"] = round(cpu_s / audio_s, 3) if audio_s else None
    print(json.dumps(report))

    if args.min_accuracy is not None:
        pooled = [report["sentences"]["word_accuracy"]]  # type: ignore[index]
        if "call" in report:
            pooled += [report["call"][k]["word_accuracy"] for k in ("left", "right")]  # type: ignore[index]
        if min(pooled) < args.min_accuracy:
            print(f"direct_baseline: word accuracy {min(pooled)} is below {args.min_accuracy}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
