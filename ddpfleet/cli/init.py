"""`ddpfleet init`: a project of one's own. A commented inventory.yaml for the current directory,
and the .gitignore lines for what ddpfleet writes there (state, run logs); nothing is overwritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from invoke import task

from ddpfleet import report
from ddpfleet.cli.common import cli
from ddpfleet.errors import DdpfleetError

# What ddpfleet writes into a project: .ddpfleet/ (host keys, the run index, a sandbox's state)
# logs/ (every run's and bootstrap's logs) and /runs/ (what `fetch` brings home: checkpoints
# are large and no one's source). envs/ is env-export's output, kept on purpose.
IGNORED = (".ddpfleet/", "logs/", "/runs/")

TEMPLATE = """\
# ddpfleet's inventory for this project: the nodes, how to reach them, what to install.
# Every key is in ddpfleet's README ("Inventory"); a mistake is named with its line.
# Next: set the hosts and the key, then
#   ddpfleet trust        # show each node's SSH host key, pin it in .ddpfleet/known_hosts
#   ddpfleet ping         # every node answers
#   ddpfleet bootstrap    # SSH hardening, the Python env with PyTorch, Jupyter
#   ddpfleet train --script train.py
cluster:
  name: {name}
  master: node0                        # the rendezvous node (default: the first node)
  master_port: 29500

ssh:                                   # for every node; a node may override any of these
  user: ubuntu                         # the login user; root work goes through its sudo
  key: ~/.ssh/id_ed25519               # a private key the nodes accept
  port: 22
  known_hosts: .ddpfleet/known_hosts   # the pinned host keys (ddpfleet trust writes them)
  connect_timeout: 10
  forks: 32                            # nodes worked on at once

python_env:
  manager: conda                       # conda (Miniconda, PyTorch with CUDA) or venv (pip)

# Anaconda's Terms of Service cover Miniconda's default channels: say `accept_tos: true` if
# you accept them for these nodes, or use `flavor: miniforge` (conda-forge, nothing to accept).
miniconda:
  flavor: miniforge

nodes:                                 # name: {{host: address or ~/.ssh/config alias, gpus: N}}
  node0: {{host: 10.0.0.10}}
  node1: {{host: 10.0.0.11}}
"""


def project_name(directory: Path) -> str:
    """The directory's name as a cluster name (it goes into paths and key comments)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", directory.name).strip(".-_")[:63]
    return name or "cluster"


def init_project(directory: Path) -> list[str]:
    """Write inventory.yaml (never over an existing one) and add the missing .gitignore lines;
    what was done, one line each."""
    inventory = directory / "inventory.yaml"
    try:  # O_EXCL: an inventory (or a link named so) that appeared meanwhile is never written
        fd = os.open(inventory, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise DdpfleetError(
            f"{inventory}: already exists; edit it, or remove it first to start over"
        ) from None
    except OSError as e:
        raise DdpfleetError(f"{inventory}: cannot write it ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(TEMPLATE.format(name=project_name(directory)))
    done = [f"wrote {inventory.name}: set the hosts and ssh.key"]
    ignore = directory / ".gitignore"
    present = ignore.read_text().splitlines() if ignore.is_file() else []
    missing = [line for line in IGNORED if line not in present and line.rstrip("/") not in present]
    if missing:
        head = "\n" if present and not ignore.read_text().endswith("\n") else ""
        with ignore.open("a") as f:
            f.write(head + "".join(f"{line}\n" for line in missing))
        done.append(f"{ignore.name}: added {', '.join(missing)}")
    return done


@task
@cli
def init(c):
    """Start a project here: inventory.yaml, .gitignore."""
    for line in init_project(Path.cwd()):
        report.show(line)
