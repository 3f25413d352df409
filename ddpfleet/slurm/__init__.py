"""Slurm, the job side: `invoke slurm.status` (the role lives in roles/slurm)."""

from ddpfleet.slurm import status

__all__ = ["status"]
