#!/usr/bin/env bash
# Sets everything up, brings the local 2-node sandbox cluster up, and runs ddpfleet on it:
# ping, bootstrap (sshd hardening, venv + torch from the controller's wheelhouse, Jupyter),
# a 2-node DDP training run, and gpu-status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

if [ -z "${DDPFLEET_JUPYTER_PASSWORD:-}" ]; then
  # The sandbox's Jupyter password: made once, kept in a 0600 file, never on a command line.
  secret=.ddpfleet/jupyter_password
  mkdir -p .ddpfleet
  [ -s "$secret" ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(18))' > "$secret")
  DDPFLEET_JUPYTER_PASSWORD=$(cat "$secret")
  export DDPFLEET_JUPYTER_PASSWORD
  echo "quickstart: the sandbox's Jupyter password is in $secret"
fi

invoke sandbox.up
invoke ping
invoke bootstrap
invoke train --nodes node0,node1 --args "--epochs 2"
invoke gpu-status
echo "quickstart: done. Jupyter: invoke jupyter --node node0; remove the sandbox: invoke sandbox.down"
