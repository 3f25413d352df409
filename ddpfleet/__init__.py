"""ddpfleet: a few SSH-reachable machines -> a ready PyTorch distributed-training cluster.

Dependencies point one way: inventory -> connection -> roles -> launch.
"""

__version__ = "0.1.0"
