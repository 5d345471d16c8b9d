#!/usr/bin/env bash
# Runs the official Deepgram Python SDK (PyPI deepgram-sdk, unmodified)
# against cochlea's Deepgram-compatible endpoint /v1/listen: see
# tests/deepgram_sdk/live_client.py. Called by scripts/test.sh.
#
# Installs the SDK into a venv under target/ on first use (idempotent: an
# existing venv that imports the SDK is used as is). Needs python3 with the
# venv module (Debian: python3-venv, installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'deepgram-sdk-test: %s\n' "$*" >&2; }

venv=target/deepgram-venv
python="$venv/bin/python"

if ! "$python" -c 'import deepgram' >/dev/null 2>&1; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
      log "python3 has no venv module and there is no apt-get: install python3-venv by hand"
      exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    log "installing python3-venv"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  log "installing deepgram-sdk into $venv"
  "$python" -m pip install --quiet --disable-pip-version-check 'deepgram-sdk>=7,<8'
fi

cargo build --quiet --bin cochlea
"$python" tests/deepgram_sdk/live_client.py target/debug/cochlea tests/fixtures/speech-16k.wav
