#!/usr/bin/env bash
# Creates (idempotently) a Python virtual environment holding aiortc (PyPI
# `aiortc`, a WebRTC stack in Python, with PyAV to decode and encode the
# audio) and numpy, for the WHIP end-to-end test (tests/e2e/whip_aiortc.py),
# at target/aiortc-venv, and prints the absolute path of its python on stdout.
#
# Why: a second WebRTC implementation, independent of the server's (str0m)
# and of Chromium's, talks to /v1/whip.
#
# Idempotent: when the venv exists with the pinned versions, it does nothing
# but print the path.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'aiortc-venv: %s\n' "$*" >&2; }

# Pinned: the versions the test was verified with (binary wheels for
# CPython 3.11 on x86_64 Linux; PyAV's wheel bundles its own FFmpeg and
# libopus). aioice is aiortc's ICE agent; numpy computes the correlation.
requirements=(aiortc==1.16.0 aioice==0.13.0 av==18.1.0 numpy==2.4.6)
requirement="${requirements[*]}"
venv_dir="${COCHLEA_AIORTC_VENV:-target/aiortc-venv}"
python="$venv_dir/bin/python"
stamp="$venv_dir/.requirements.installed"

if [ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirement" ] \
   && "$python" -c 'import aiortc, av, numpy' >/dev/null 2>&1; then
  printf '%s\n' "$(cd "$(dirname "$python")" && pwd)/python"
  exit 0
fi

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing: python3-venv (no apt-get here: install it by hand)"
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  log "installing python3-venv"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
fi
if [ ! -x "$python" ]; then
  log "creating $venv_dir"
  mkdir -p "$(dirname "$venv_dir")"
  python3 -m venv "$venv_dir"
fi
log "installing $requirement"
"$python" -m pip install --quiet --disable-pip-version-check --prefer-binary "${requirements[@]}" >&2
"$python" -c 'import aiortc, av, numpy'
printf '%s' "$requirement" >"$stamp"
printf '%s\n' "$(cd "$(dirname "$python")" && pwd)/python"
