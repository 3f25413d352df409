"""scripts/setup.sh leaves no policy-rc.d behind when apt fails (review #21).

apt and dpkg are stood in for by two-line scripts on PATH: this box has every package, and a
failing apt is what the test is about. POLICY_RC_D keeps the host's own /usr/sbin untouched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_policy_rc_d_is_removed_when_apt_fails(tmp_path):
    bin_dir, policy = tmp_path / "bin", tmp_path / "policy-rc.d"
    bin_dir.mkdir()
    stub(bin_dir, "dpkg-query", "exit 1")  # every package missing
    # apt fails, after noting whether the policy was in place while it ran.
    stub(bin_dir, "apt-get", f'[ -x "{policy}" ] && echo in-place >> "{tmp_path}/seen"; exit 100')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "POLICY_RC_D": str(policy)}
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 100
    assert (tmp_path / "seen").read_text() == "in-place\n"
    assert not policy.exists()


def test_an_existing_policy_rc_d_is_left_alone(tmp_path):
    bin_dir, policy = tmp_path / "bin", tmp_path / "policy-rc.d"
    bin_dir.mkdir()
    policy.write_text("#!/bin/sh\n# the admin's own\nexit 0\n")
    stub(bin_dir, "dpkg-query", "exit 1")
    stub(bin_dir, "apt-get", "exit 100")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "POLICY_RC_D": str(policy)}
    subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, timeout=60)
    assert "the admin's own" in policy.read_text()
