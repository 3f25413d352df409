#!/usr/bin/env bash
# Sets everything up, brings the local 2-node sandbox cluster up, and runs ddpfleet on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
invoke sandbox.up
invoke ping
