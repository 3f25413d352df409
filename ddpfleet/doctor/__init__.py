"""`invoke doctor`: what would break training, found before training starts."""

from ddpfleet.doctor.node import *  # noqa: F401,F403
from ddpfleet.doctor.node import _REACH  # noqa: F401
