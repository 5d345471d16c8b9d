#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment for the reference
# transcription server (samples/stt-server) and the end-to-end tests
# (tests/e2e), at target/stt-venv, and prints its python's path on stdout.
#
# Idempotent: when the venv exists and already satisfies
# samples/stt-server/requirements.txt, it does nothing but print the path.
# Needs python3 with the venv module (Debian: python3-venv); installs that with
# apt-get when missing, like scripts/setup.sh does for system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'stt-venv: %s\n' "$*" >&2; }

venv_dir="${COCHLEA_STT_VENV:-target/stt-venv}"
requirements="samples/stt-server/requirements.txt"
python="$venv_dir/bin/python"
# A stamp holding the requirements file's content: when it matches, the venv
# is up to date and pip (slow, and it may touch the network) is not run again.
stamp="$venv_dir/.requirements.installed"

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing: $* (no apt-get here: install them by hand)"
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  log "installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

# The server's requirements and the e2e client's (websockets), as one stamp.
e2e_requirements="tests/e2e/requirements.txt"
wanted=$(cat "$requirements" "$e2e_requirements")

if [ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
   && "$python" -c 'import pocketsphinx, websockets' >/dev/null 2>&1; then
  printf '%s\n' "$(cd "$(dirname "$python")" && pwd)/python"
  exit 0
fi

command -v python3 >/dev/null 2>&1 || apt_install python3
# Debian splits venv's pip bootstrap (ensurepip) into python3-venv.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi

if [ ! -x "$python" ]; then
  log "creating $venv_dir"
  mkdir -p "$(dirname "$venv_dir")"
  python3 -m venv "$venv_dir"
fi
log "installing $requirements"
"$python" -m pip install --quiet --disable-pip-version-check -r "$requirements" -r "$e2e_requirements" >&2
"$python" -c 'import pocketsphinx, websockets'
printf '%s' "$wanted" >"$stamp"
printf '%s\n' "$(cd "$(dirname "$python")" && pwd)/python"
