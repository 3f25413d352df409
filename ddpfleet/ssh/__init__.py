"""The SSH layer: the only importer of paramiko and fabric (connection, fleet, host keys, become,
jumps, dial, tunnel, the keeper and its client)."""
