#!/usr/bin/env bash
# Makes the speech for the end-to-end transcription tests, with Debian's flite
# and sox (scripts/setup.sh installs both). Deterministic: the same inputs give
# byte-identical files (sox -R).
#
# Usage: tests/e2e/make_speech.sh [OUT_DIR]      (default target/e2e-speech)
# Env:   SENTENCE_VOICE (default slt)  voice of the mono sentence set
#        LEFT_VOICE     (default rms)  voice on the call's left channel (0)
#        RIGHT_VOICE    (default awb)  voice on the call's right channel (1)
#
# Writes into OUT_DIR:
#   sNN.wav        one sentence each, 16 kHz mono 16-bit PCM
#   sentences.tsv  "file<TAB>reference text", one line per sentence
#   call-8k-mulaw.wav  a two-speaker phone call: stereo, 8 kHz, G.711 mu-law.
#                  The speakers alternate: while one channel speaks the other
#                  is silent, with GAP_S of silence between turns.
#   long.wav       one sentence of about 6 s (slt, 16 kHz mono), for partial
#                  transcripts; its text in long.txt
#   call.tsv       "channel<TAB>start_s<TAB>end_s<TAB>reference text", one
#                  line per turn, times in seconds from the start of the file
#                  (the span of flite's clip, which includes its own few tens
#                  of ms of silence around the words).
#
# Why not slt on the call: after the 8 kHz mu-law round trip the engine gets
# only 0.64 of slt's words right (0.95 at 16 kHz), but 0.97 of rms's and 0.90
# of awb's (two different male speakers: rms US, awb Scottish). Figures from
# tests/e2e/voice_survey.py; see tests/e2e/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${1:-target/e2e-speech}"
sentence_voice="${SENTENCE_VOICE:-slt}"
left_voice="${LEFT_VOICE:-rms}"
right_voice="${RIGHT_VOICE:-awb}"
rate=16000
lead_s=0.5   # silence before the first turn
gap_s=1.0    # silence between turns, longer than any VAD hangover
tail_s=1.0   # silence after the last turn

for tool in flite sox soxi; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make_speech: $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done

# Eight everyday sentences of 2-4 s, from tests/e2e/voice_survey.py's pool
# (see tests/e2e/README.md): slt is recognized perfectly on six of them and
# with one error on two, so the direct baseline is high (about 0.98) but not
# a perfect score that any single error through cochlea would fall below.
sentences=(
  "the weather is nice today so we will go for a walk in the park"
  "please call me back when you get home tonight"
  "the meeting has been moved to next monday morning"
  "can you tell me how to get to the train station"
  "my brother bought a new car last week"
  "the children are playing in the garden after school"
  "there is a small coffee shop at the end of the street"
  "the doctor told him to drink more water every day"
)

# The call: turns alternate left (0) and right (1).
call_turns=(
  "0|hello thank you for calling how can i help you today"
  "1|hi i would like to change the address on my account"
  "0|of course can you tell me your new address please"
  "1|it is near the old school on the north side of the river"
  "0|thank you i have updated your account"
  "1|great that was quick thanks for your help"
  "0|is there anything else i can do for you today"
  "1|no that is all have a good day"
)

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# speak VOICE TEXT OUT: flite, then 16 kHz mono 16-bit (the recipe in
# shared/notes/testing.md).
speak() {
  flite -voice "$1" -t "$2" -o "$tmp/raw.wav"
  sox -R "$tmp/raw.wav" -r "$rate" -c 1 -b 16 -e signed-integer "$3"
}

# silence SAMPLES OUT
silence() {
  # The rate and channels go before -n: they are the null input's.
  sox -R -r "$rate" -c 1 -n -b 16 -e signed-integer "$2" trim 0 "$1s"
}

seconds() { awk -v n="$1" -v r="$rate" 'BEGIN { printf "%.4f", n / r }'; }

: >"$out/sentences.tsv"
i=0
for text in "${sentences[@]}"; do
  i=$((i + 1))
  name=$(printf 's%02d.wav' "$i")
  speak "$sentence_voice" "$text" "$out/$name"
  printf '%s\t%s\n' "$name" "$text" >>"$out/sentences.tsv"
done

# A longer sentence (about 6 s), for the partial transcripts test.
long_text="on saturday morning we walked down to the old market to buy fresh bread and some apples for the week"
speak "$sentence_voice" "$long_text" "$out/long.wav"
printf '%s\n' "$long_text" >"$out/long.txt"

lead_n=$(awk -v s="$lead_s" -v r="$rate" 'BEGIN { printf "%d", s * r }')
gap_n=$(awk -v s="$gap_s" -v r="$rate" 'BEGIN { printf "%d", s * r }')
tail_n=$(awk -v s="$tail_s" -v r="$rate" 'BEGIN { printf "%d", s * r }')
silence "$lead_n" "$tmp/lead.wav"
silence "$gap_n" "$tmp/gap.wav"
silence "$tail_n" "$tmp/tail.wav"

left=("$tmp/lead.wav")
right=("$tmp/lead.wav")
pos_n=$lead_n
: >"$out/call.tsv"
t=0
for turn in "${call_turns[@]}"; do
  t=$((t + 1))
  channel=${turn%%|*}
  text=${turn#*|}
  if [ "$channel" = 0 ]; then voice=$left_voice; else voice=$right_voice; fi
  speak "$voice" "$text" "$tmp/turn$t.wav"
  n=$(soxi -s "$tmp/turn$t.wav")
  silence "$n" "$tmp/quiet$t.wav"
  if [ "$channel" = 0 ]; then
    left+=("$tmp/turn$t.wav"); right+=("$tmp/quiet$t.wav")
  else
    left+=("$tmp/quiet$t.wav"); right+=("$tmp/turn$t.wav")
  fi
  printf '%s\t%s\t%s\t%s\n' "$channel" "$(seconds "$pos_n")" "$(seconds $((pos_n + n)))" "$text" >>"$out/call.tsv"
  pos_n=$((pos_n + n))
  if [ "$t" -lt "${#call_turns[@]}" ]; then
    left+=("$tmp/gap.wav"); right+=("$tmp/gap.wav"); pos_n=$((pos_n + gap_n))
  fi
done
left+=("$tmp/tail.wav")
right+=("$tmp/tail.wav")

sox -R "${left[@]}" "$tmp/left.wav"
sox -R "${right[@]}" "$tmp/right.wav"
sox -R -M "$tmp/left.wav" "$tmp/right.wav" "$tmp/call16.wav"
# sox's band-limited resampler to 8 kHz, then G.711 mu-law, as a phone
# network would carry it. -R everywhere: sox seeds its dither with a fixed
# number, so the files are the same on every run.
sox -R "$tmp/call16.wav" -r 8000 -e u-law -b 8 "$out/call-8k-mulaw.wav"

printf 'make_speech: %d sentences (%s) and a %s s call (left %s, right %s) in %s\n' \
  "${#sentences[@]}" "$sentence_voice" "$(soxi -D "$out/call-8k-mulaw.wav")" \
  "$left_voice" "$right_voice" "$out" >&2
