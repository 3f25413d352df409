#!/usr/bin/env bash
# The whole test suite: unit, roles, and integration tests against real sandbox nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-torch
bash scripts/lint.sh  # ruff format --check + ruff check (pinned in the test extra)
exec .venv/bin/python -m pytest tests "$@"
