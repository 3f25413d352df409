"""`invoke health`: find the sick node before the run does.

    probe.script(python, m)   one POSIX sh snippet per node, one SSH round trip (probe.run)
    facts.parse(text)         its output -> NodeFacts, pure (recordings in tests/ drive it)
    judge.judge(...)          NodeFacts + the inventory's expectations -> Check rows, pure
                              (xid.py names Xid codes; versions.py holds nodes against the fleet)
    netif.rows(...)           the interface NCCL and gloo would use towards the master m
    table.run(fleet)          the one table or the `ddpfleet.health/1` JSON, the history file
    deepgpu.measure / judge   --deep: per GPU GEMM TFLOPS and a memory fill-and-verify, NCCL
                              busbw inside each node (deep_node.py: the torch program it runs)
    deep.measure / judge      --deep: gloo all_reduce busbw between nodes, in O(1) rounds
    gate.check(fleet, order)  what `invoke train` runs before it launches
    node/health_node.py       the same fail-level rules on a node, for a spare without us

The quick checks need only nvidia-smi, the kernel log, `ip` and the env's python (no torch import),
so they take a second; a node without nvidia-smi passes the GPU checks as "no GPU" unless the
inventory gives it GPUs.
"""
