#!/usr/bin/env bash
# Runs every test of cochlea on this machine: installs what is missing, then
# the unit and integration tests (the integration tests start real servers on
# 127.0.0.1 with port 0, so they need no free fixed port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --all-targets "$@"
# Transcription end to end with a real engine (pocketsphinx in a venv under
# target/): speech from flite, streamed through cochlea in real time.
python=$(scripts/stt-venv.sh)
"$python" -m unittest discover -s tests/e2e -p 'test_*.py'
tests/e2e/run.sh
# The official Deepgram SDK against /v1/listen (a venv under target/).
scripts/deepgram-sdk-test.sh
