#!/usr/bin/env bash
# Installs what ddpfleet and its sandbox need on a fresh Debian/Ubuntu machine, as root:
# the Debian packages (only those missing) and the controller's virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# Overridable for the test that makes apt fail (tests/unit/test_setup_script.py).
POLICY_RC_D=${POLICY_RC_D:-/usr/sbin/policy-rc.d}
pkgs=(openssh-client openssh-server iproute2 python3-venv python3-pip util-linux procps rsync
      pdsh chromium munge slurmctld slurmd slurm-client sudo)
# Sandbox nodes see the host's /usr and /etc/passwd through their overlay, so the slurm role's
# packages and users come from here. munge and slurm need the same uid on every node (the roles'
# slurm_munge_uid / slurm_slurm_uid defaults): made before apt, whose adduser would pick any.
fixed_users=(munge:990 slurm:991)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  # Keep the host's own sshd from being started by the package scripts. The trap removes our
  # policy-rc.d however apt ends: left behind, it stops every later upgrade restarting services.
  made_policy=0
  if [ ! -e "$POLICY_RC_D" ]; then
    trap 'rm -f "$POLICY_RC_D"' EXIT
    trap 'exit 129' HUP  # bash skips the EXIT trap on a fatal HUP/TERM; an exit runs it
    trap 'exit 143' TERM
    printf '#!/bin/sh\nexit 101\n' > "$POLICY_RC_D" && chmod +x "$POLICY_RC_D"
    made_policy=1
  fi
  for entry in "${fixed_users[@]}"; do
    name=${entry%%:*} id=${entry#*:}
    getent group "$name" >/dev/null || groupadd --system --gid "$id" "$name"
    getent passwd "$name" >/dev/null || useradd --system --uid "$id" --gid "$name" \
      --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$name"
  done
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  if [ "$made_policy" = 1 ]; then
    rm -f "$POLICY_RC_D"
    trap - EXIT HUP TERM
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# compat mode: a plain path in a .pth file, not an import hook that every Python start (every
# `invoke`) would load; the quick commands start measurably faster (bench/ping.py)
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
  --config-settings editable_mode=compat
# bytecode for the project too (pip compiles only what it copies): a start that finds none
# compiles every module again, and PYTHONDONTWRITEBYTECODE (set on some machines) never saves it
.venv/bin/python -m compileall -q -j 0 ddpfleet roles tasks.py >/dev/null
if [ "${1:-}" = "--with-torch" ]; then
  # The controller runs scripts/train_ddp.py in the unit tests; nodes get torch from bootstrap.
  .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: ok (.venv ready)"
