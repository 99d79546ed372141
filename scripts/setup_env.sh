#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and the default model bundle.
# Idempotent: a second run checks a stamp and returns in seconds.
# Usage: source scripts/setup_env.sh   (or run it; it never changes the caller's shell options)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.rsd-setup-stamp"

log() { echo "[setup] $*"; }

pick_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: CPython 3.11 is required (the ROS 2 Kilted wheels are built for it)" >&2
  return 1
}

wanted="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/setup.py" \
  "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  py="$(pick_python)"
  log "creating virtual environment in $VENV with $py"
  "$py" -m venv "$VENV"
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]]; then
  log "environment up to date ($VENV)"
else
  log "installing pinned requirements (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q \
    -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt"
  log "installing the rsd_ros package (editable)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation \
    -e "$ROOT"
  echo "$wanted" >"$STAMP"
  log "environment ready"
fi

log "checking the default model bundle"
"$VENV/bin/rsd" build-default --if-missing --observations "$ROOT/data/observations/libero_spatial"
