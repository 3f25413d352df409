"""The controller files an inventory names that must never leave the controller.

    secretfiles.named(inventory)   # {Path}: keys, known_hosts, password files, CA, .ddpfleet/

The code sync mirrors --project-dir to every node, readable by the training user there. An
inventory kept inside the project (examples/gpu-cluster.yaml's shape) names files that then lie
in what is mirrored: the SSH key, known_hosts, the sudo and jupyter password files, the cluster
CA, and <inventory dir>/.ddpfleet/ (munge key, wheelhouse, sandbox keys). The sync leaves each
of these out whatever .gitignore says (ddpfleet.launch.sync.project_files' `keep_out`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ddpfleet.engine.settings import load_role
from ddpfleet.hygiene import STATE_DIR
from ddpfleet.inventory import Inventory


def named(inventory: Inventory) -> frozenset[Path]:
    """Every secret file or directory the inventory names, for every node it declares (not only
    those --nodes selected), as the code that reads each one resolves it."""
    root = inventory.root
    found = {root / STATE_DIR}
    if inventory.sandbox is not None:
        found.add(inventory.sandbox.state_dir)  # the client key, the sudo password, host keys
    jupyter, sshd = load_role("jupyter"), load_role("openssh_server")
    for node in inventory.declared or inventory.nodes:
        if node.key is not None:  # its .pub and certificate are the controller's, not the code's
            found |= {node.key, Path(f"{node.key}.pub"), Path(f"{node.key}-cert.pub")}
        found.add(node.known_hosts)
        if node.become_password_file is not None:
            found.add(node.become_password_file)
        password = jupyter.config(inventory, node)["password_file"]
        if password:  # as ddpfleet.jupyter.settings.find_secret reads it
            found.add(root / Path(str(password)).expanduser())
        ca = sshd.config(inventory, node)["cluster_ca"]
        if ca:  # as roles/openssh_server/peers.py reads it
            found.add(root / str(ca))
    return frozenset(Path(os.path.normpath(p)) for p in found)  # 'cluster/../id' as 'id'
