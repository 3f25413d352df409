"""`invoke health`: find the sick node before the run does.

    probe.script(python)      one POSIX sh snippet per node, one SSH round trip (probe.run)
    facts.parse(text)         its output -> NodeFacts, pure (recordings in tests/ drive it)
    judge.judge(...)          NodeFacts + the inventory's expectations -> Check rows, pure
    table.render / document   the one table, the `ddpfleet.health/1` JSON, the history file
    gate.refuse(...)          what `invoke train` runs before it launches

The quick checks need only nvidia-smi, the kernel log and the env's python (no torch import),
so they take a second; a node without nvidia-smi passes the GPU checks as "no GPU" unless the
inventory gives it GPUs.
"""
