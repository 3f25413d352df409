"""Programs that run ON the nodes: stdlib only (python 3.8+), sent as bytes, never imported here.

Each file is a whole program (or a helper another one loads by path on the node); the controller
reads its source from NODE_DIR and ships it over an SSH channel (launch.sync.helper_source), so
ddpfleet works from a checkout and from an installed wheel alike.
"""

from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent


def source(name: str) -> bytes:
    """The bytes of the node program `name` (e.g. "proctree.py")."""
    return (NODE_DIR / name).read_bytes()
