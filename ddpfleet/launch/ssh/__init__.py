"""The SSH launcher: a gang of per-node runners (attached) or supervisors (detached)."""
