#!/usr/bin/env bash
# Set up the environment, then run the test suite.
#   scripts/test.sh            default suite (CI): everything but the slow simulator tests
#   scripts/test.sh --slow     only the slow simulator tests
#   scripts/test.sh --all      both
# Extra arguments after the mode go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"

marker='not slow'
case "${1:-}" in
  --slow) marker='slow'; shift ;;
  --all) marker=''; shift ;;
esac

cd "$ROOT"
set +e
"$ROOT/.venv/bin/python" -m pytest ${marker:+-m "$marker"} "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $status
