"""The Slurm launcher: one sbatch job instead of the gang; runs/logs/stop through scontrol."""
