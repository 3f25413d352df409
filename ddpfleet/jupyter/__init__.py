"""Jupyter on the nodes, from the controller (being split into settings, node, status)."""

from ddpfleet.jupyter.node import *  # noqa: F401,F403
from ddpfleet.jupyter.node import _prompted  # noqa: F401
