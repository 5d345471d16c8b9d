#!/usr/bin/env bash
# Installs what a fresh machine lacks to build, run and test cochlea.
# Idempotent: each step checks first and does nothing when already satisfied.
#
# Needs: a Rust toolchain (cargo). On Debian it installs missing system
# packages with apt-get (as root, or with sudo when available).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install a Rust toolchain (1.89 or newer) first"
  exit 1
fi

# System packages the build or the tests need, as "command:package" pairs.
# cmake builds the libopus that the opus crate bundles; curl and promtool
# (Debian's prometheus package) are for scripts/check-metrics.sh; flite and
# sox make the speech of the end-to-end transcription tests
# (tests/e2e/make_speech.sh), and python3 runs those tests and the reference
# transcription server (scripts/stt-venv.sh makes its venv); chromium runs
# the microphone page in the browser tests; node and npm run the Node sample
# client (samples/clients/) in the snippet tests; haproxy is the load balancer
# in front of the nodes of the cluster tests.
requirements=(cmake:cmake curl:curl promtool:prometheus flite:flite sox:sox python3:python3
  chromium:chromium node:nodejs npm:npm ffmpeg:ffmpeg opusdec:opus-tools flac:flac
  haproxy:haproxy)

needed_packages=()
for pair in "${requirements[@]}"; do
  # /usr/sbin too: haproxy lives there, outside a non-root user's PATH.
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
    || needed_packages+=("${pair#*:}")
done
# Python modules for Debian's own python3 (the one apt installs modules
# for, whatever python3 comes first in PATH), as "module:package" pairs:
# the Python sample client's one.
system_python=/usr/bin/python3
python_modules=(websockets:python3-websockets)
for pair in "${python_modules[@]}"; do
  "$system_python" -c "import ${pair%%:*}" >/dev/null 2>&1 || needed_packages+=("${pair#*:}")
done

if [ "${#needed_packages[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${needed_packages[*]} (no apt-get here: install them by hand)"
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  log "installing ${needed_packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${needed_packages[@]}"
fi

# The Node sample client's one dependency (ws), pinned by its lockfile.
clients_dir="$(dirname "$0")/../samples/clients"
if [ ! -f "$clients_dir/node_modules/ws/package.json" ]; then
  log "installing the Node sample client's dependencies (npm ci)"
  (cd "$clients_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# moto's S3 server for the object-storage tests (a venv under target/).
"$(dirname "$0")/moto-venv.sh" >/dev/null
# nats-server (2.15, newer than Debian's) for the cluster tests (a venv under target/).
"$(dirname "$0")/nats-venv.sh" >/dev/null
# aiortc, a second WebRTC stack, for the WHIP end-to-end test (a venv under target/).
"$(dirname "$0")/aiortc-venv.sh" >/dev/null

if ! command -v cc >/dev/null 2>&1; then
  log "no C compiler (cc) found; some dependencies need one"
  exit 1
fi
log "ready"
