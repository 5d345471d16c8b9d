#!/usr/bin/env bash
# Regenerates the sample recordings in samples/audio/. Needs Debian's flite,
# sox and opus-tools. The outputs are committed (each under 200 KiB), so
# nothing else needs these tools.
#
#   speaker-16k.wav      one speaker, 16 kHz mono 16-bit PCM
#   call-8k-mulaw.wav    a two-speaker call, 8 kHz stereo G.711 μ-law:
#                        the agent on the left channel, the customer on the
#                        right, taking turns as on a phone line
#   speaker.opus         the one-speaker recording as Ogg/Opus, 20 ms frames
set -euo pipefail
cd "$(dirname "$0")/audio"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() { # say NAME RATE TEXT: flite's slt voice, resampled to RATE, mono 16-bit
  flite -voice slt -t "$3" -o "$tmp/$1-raw.wav"
  sox "$tmp/$1-raw.wav" -r "$2" -c 1 -b 16 -e signed-integer "$tmp/$1.wav"
}
silence() { # silence NAME RATE SECONDS
  sox -n -r "$2" -c 1 -b 16 -e signed-integer "$tmp/$1.wav" trim 0 "$3"
}

say speaker 16000 "Welcome to cochlea. This recording has one speaker, and it was made for testing the streaming client."
cp "$tmp/speaker.wav" speaker-16k.wav

say a1 8000 "Thank you for calling. How can I help you today?"
say b1 8000 "Hi. I would like to check on my order, please."
say a2 8000 "Of course. Can you read me the order number?"
silence a1-quiet 8000 "$(soxi -D "$tmp/a1.wav")"
silence b1-quiet 8000 "$(soxi -D "$tmp/b1.wav")"
silence a2-quiet 8000 "$(soxi -D "$tmp/a2.wav")"
sox "$tmp/a1.wav" "$tmp/b1-quiet.wav" "$tmp/a2.wav" "$tmp/left.wav"
sox "$tmp/a1-quiet.wav" "$tmp/b1.wav" "$tmp/a2-quiet.wav" "$tmp/right.wav"
sox -M "$tmp/left.wav" "$tmp/right.wav" -e u-law -b 8 call-8k-mulaw.wav

opusenc --quiet --framesize 20 --bitrate 24 speaker-16k.wav speaker.opus
ls -l ./*.wav ./*.opus
