#!/usr/bin/env bash
# Creates (idempotently) a Python virtual environment holding moto's S3
# server (PyPI `moto[server]`), the S3-compatible store the object-storage
# tests run on 127.0.0.1, at target/moto-venv, and prints the path of its
# `moto_server` on stdout.
#
# Idempotent: when the venv exists with the pinned version, it does nothing
# but print the path.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'moto-venv: %s\n' "$*" >&2; }

# Pinned: the tests rely on its multipart handling and its minimum part size.
requirement="moto[server]==5.2.1"
venv_dir="${COCHLEA_MOTO_VENV:-target/moto-venv}"
python="$venv_dir/bin/python"
stamp="$venv_dir/.requirements.installed"
server="$venv_dir/bin/moto_server"

if [ -x "$server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirement" ]; then
  printf '%s\n' "$(cd "$(dirname "$server")" && pwd)/moto_server"
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
"$python" -m pip install --quiet --disable-pip-version-check "$requirement" >&2
[ -x "$server" ]
printf '%s' "$requirement" >"$stamp"
printf '%s\n' "$(cd "$(dirname "$server")" && pwd)/moto_server"
