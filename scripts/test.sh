#!/usr/bin/env bash
# The whole test suite: unit, roles, and integration tests against real sandbox nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-torch
exec .venv/bin/python -m pytest tests "$@"
