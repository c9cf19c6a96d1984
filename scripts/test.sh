#!/usr/bin/env bash
# The test command: set up (idempotent), lint (ruff, configured in pyproject.toml), then every
# test, slow ones included. pytest exits 5 when it collects nothing; that is a failure here,
# never a silent pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
