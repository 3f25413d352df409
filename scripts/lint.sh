#!/usr/bin/env bash
# Format check and lint over the whole project, with the ruff pinned in the test extra
# (pyproject.toml holds the settings). Fix what it finds with: ruff format . && ruff check --fix .
set -euo pipefail
cd "$(dirname "$0")/.."
ruff=.venv/bin/ruff
[ -x "$ruff" ] || ruff=$(command -v ruff) || {
  echo "lint: ruff not found; run 'bash scripts/setup.sh' (it installs the test extra)" >&2
  exit 2
}
status=0
"$ruff" format --check --diff . || status=1
"$ruff" check . || status=1
exit "$status"
