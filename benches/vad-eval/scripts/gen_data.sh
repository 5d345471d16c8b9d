#!/usr/bin/env bash
# Generates the raw material for the VAD evaluation (deterministic).
# Output: data/sent/NN.f32 (slt, 16 kHz mono f32le), data/babble/VOICE_NN.f32, data/noise/{white,pink,brown}.f32
set -euo pipefail
cd "$(dirname "$0")/.."
command -v flite >/dev/null && command -v sox >/dev/null || { apt-get update && apt-get install -y flite sox; }
mkdir -p data/sent data/babble data/noise data/tmp
SENTENCES=(
  "Yes."
  "Okay, go ahead."
  "Please transfer me to the billing department."
  "No, that is not what I said."
  "The quick brown fox jumps over the lazy dog."
  "Could you repeat the last number, please?"
  "Hmm, let me think about it for a second."
  "My account number is four seven two, nine nine one, three."
  "Thanks."
  "We should schedule the meeting for next Tuesday afternoon."
  "Right."
  "I have been waiting on hold for almost twenty minutes now."
  "Sure, that works for me."
  "Is there anything else I can help you with today?"
  "Stop."
  "The weather forecast says heavy rain and strong winds tonight."
  "Hello?"
  "Actually, I would like to cancel my subscription."
  "Seven."
  "She sells sea shells by the sea shore, or so they say."
  "Wait, what?"
  "Please hold while I look up your order."
  "Absolutely."
  "After the beep, say your name and the reason for your call."
)
i=0
for s in "${SENTENCES[@]}"; do
  n=$(printf %02d $i)
  flite -voice slt -t "$s" -o data/tmp/raw.wav
  sox data/tmp/raw.wav -r 16000 -c 1 -b 16 data/tmp/out.wav
  sox data/tmp/out.wav -t f32 data/sent/$n.f32
  i=$((i+1))
done
# background talkers for the babble condition: other voices, all sentences
for v in kal16 awb rms; do
  i=0
  for s in "${SENTENCES[@]}"; do
    n=$(printf %02d $i)
    flite -voice $v -t "$s" -o data/tmp/raw.wav
    sox data/tmp/raw.wav -r 16000 -c 1 -b 16 data/tmp/out.wav
    sox data/tmp/out.wav -t f32 data/babble/${v}_$n.f32
    i=$((i+1))
  done
done
# noise beds, 400 s each (sox -R: repeatable random seed)
for kind in whitenoise pinknoise brownnoise; do
  sox -R -n -r 16000 -c 1 -t f32 data/noise/${kind%noise}.f32 synth 400 $kind vol 0.3
done
rm -rf data/tmp
ls data/sent | wc -l; ls data/babble | wc -l; ls -la data/noise
