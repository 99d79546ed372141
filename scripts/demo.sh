#!/usr/bin/env bash
# Set up the environment, then run the LIBERO-in-the-loop demo through the ROS topics with the
# built-in default model: a policy node and the sim bridge as separate processes over DDS.
# Extra arguments go to `rsd eval-libero` (see `rsd eval-libero --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/rsd" eval-libero --suite libero_spatial --tasks 0 1 --trials 1 \
  --policy rsd --video --out results/demo "$@"
