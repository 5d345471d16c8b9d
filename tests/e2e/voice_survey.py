#!/usr/bin/env python3
"""How well the reference engine recognizes each flite voice, wideband and
over a phone line: the measurement behind make_speech.sh's choice of voices
and sentences.

For every voice and every sentence of a pool (the 8 sentences and 8 call
turns make_speech.sh uses, plus 12 more candidates), it makes the speech with
flite, and decodes it with the same decoder as samples/stt-server:
  * wide:  16 kHz mono 16-bit (sox from flite's output),
  * phone: sox to 8 kHz G.711 mu-law, then back to 16 kHz with sox's
           band-limited resampler (what cochlea does to a mu-law stream).
Prints per-sentence accuracies and a JSON line of pooled word accuracy per
voice and path. Takes a minute or two (about 0.25 s CPU per second of audio).

    $(scripts/stt-venv.sh) tests/e2e/voice_survey.py [--voices slt,rms,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "samples", "stt-server"))

import stt_server  # noqa: E402
import wer  # noqa: E402

POOL = [
    # 0-7: make_speech.sh's first sentence set, written before any measuring.
    "the weather is nice today so we will go for a walk in the park",
    "please call me back when you get home tonight",
    "i would like to order a large pizza and two drinks",
    "the meeting has been moved to next monday morning",
    "can you tell me how to get to the train station",
    "my brother bought a new car last week",
    "we need more time to finish the report",
    "thank you very much for your help with this problem",
    # 8-15: make_speech.sh's call turns (unchanged since), alternately left
    # and right.
    "hello thank you for calling how can i help you today",
    "hi i would like to change the address on my account",
    "of course can you tell me your new address please",
    "it is near the old school on the north side of the river",
    "thank you i have updated your account",
    "great that was quick thanks for your help",
    "is there anything else i can do for you today",
    "no that is all have a good day",
    # 16-27: more candidates, from which s06-s08 were taken.
    "the children are playing in the garden after school",
    "she said that the bus was late again this morning",
    "i will send you the pictures from our trip tomorrow",
    "there is a small coffee shop at the end of the street",
    "we are going to visit my parents for the weekend",
    "please turn off the lights when you leave the room",
    "the doctor told him to drink more water every day",
    "our flight leaves at seven in the evening",
    "he has been working at the bank for ten years",
    "do you know where i left my keys",
    "the store closes early on sunday afternoon",
    "i think it is going to rain later today",
]


def run(cmd: List[str]) -> None:
    subprocess.run(cmd, check=True)


def pcm_of(path: str) -> bytes:
    with open(path, "rb") as f:
        return stt_server.read_wav(f.read()).pcm16k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voices", default="slt,kal16,awb,rms", help="comma-separated flite voices")
    args = parser.parse_args()
    voices = args.voices.split(",")
    decoder = stt_server.make_decoder()
    totals: Dict[str, Dict[str, wer.Counts]] = {v: {"wide": wer.Counts(), "phone": wer.Counts()} for v in voices}
    with tempfile.TemporaryDirectory() as tmp:
        raw, wide, mulaw, phone = (os.path.join(tmp, n) for n in ("raw.wav", "wide.wav", "mulaw.wav", "phone.wav"))
        for i, text in enumerate(POOL):
            row = []
            for voice in voices:
                run(["flite", "-voice", voice, "-t", text, "-o", raw])
                run(["sox", "-R", raw, "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", wide])
                run(["sox", "-R", wide, "-r", "8000", "-e", "u-law", "-b", "8", mulaw])
                run(["sox", "-R", mulaw, "-e", "signed-integer", "-b", "16", phone, "rate", "16000"])
                for path_name, path in (("wide", wide), ("phone", phone)):
                    counts = wer.score(text, stt_server.transcribe(decoder, pcm_of(path)).text)
                    totals[voice][path_name] = totals[voice][path_name] + counts
                    row.append(f"{counts.accuracy:5.2f}")
            print(f"{i:2d} " + " ".join(row) + f"  {text}", flush=True)
    print("   " + " ".join(f"{v + ' ' + p:>11}" for v in voices for p in ("wide", "phone")))
    summary = {v: {p: round(c.accuracy, 4) for p, c in paths.items()} for v, paths in totals.items()}
    print(json.dumps({"sentences": len(POOL), "word_accuracy": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
