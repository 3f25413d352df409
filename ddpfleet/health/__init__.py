"""`invoke health`: find the sick node before the run does.

    probe.script(python)      one POSIX sh snippet per node, one SSH round trip (probe.run)
    facts.parse(text)         its output -> NodeFacts, pure (recordings in tests/ drive it)
    judge.judge(...)          NodeFacts + the inventory's expectations -> Check rows, pure
                              (xid.py names Xid codes; versions.py holds nodes against the fleet)
    table.run(fleet)          the one table or the `ddpfleet.health/1` JSON, the history file
    deep.measure / judge      --deep: gloo all_reduce busbw between nodes, in O(1) rounds
    gate.check(fleet)         what `invoke train` runs before it launches

The quick checks need only nvidia-smi, the kernel log and the env's python (no torch import),
so they take a second; a node without nvidia-smi passes the GPU checks as "no GPU" unless the
inventory gives it GPUs.
"""
