#!/usr/bin/env bash
# Runs every test of cochlea on this machine: installs what is missing, then
# the unit and integration tests (the integration tests start real servers on
# 127.0.0.1 with port 0, so they need no free fixed port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The browser tests run apart, one at a time, after the rest: Chromium's fake
# microphone drops or repeats 10 ms buffers when it is starved of CPU, and the
# recording is compared with the source sample by sample.
# (Criterion's bench harnesses take no --skip, so the benches' test mode
# runs in its own step.)
# The cluster tests (three or four nodes, nats-server, moto and haproxy, up
# to 24 real-time streams each) also run apart, one at a time: beside the
# other tests they starve the timing-sensitive ones on two cores.
cargo test --lib --bins --tests --examples "$@" -- --skip browser:: --skip scale_out::
cargo test --benches "$@"
cargo test --test integration "$@" -- scale_out:: --test-threads=1
cargo test --test integration "$@" -- browser:: --test-threads=1
# Transcription end to end with a real engine (pocketsphinx in a venv under
# target/): speech from flite, streamed through cochlea in real time.
python=$(scripts/stt-venv.sh)
"$python" -m unittest discover -s tests/e2e -p 'test_*.py'
tests/e2e/run.sh
# WHIP from aiortc, a WebRTC stack independent of the server's (a venv under
# target/): a WAV sent as Opus, its recording compared with the source.
python=$(scripts/aiortc-venv.sh)
"$python" tests/e2e/whip_aiortc.py
# The official Deepgram SDK against /v1/listen (a venv under target/).
scripts/deepgram-sdk-test.sh
