#!/usr/bin/env bash
# Set up, then run the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k prepare`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
