"""`invoke doctor`: what would break training, found before training starts.

    node.py     what runs on the nodes (facts, clock, master port) and its parse; gathering
    checks.py   pure: facts in, Check(name, status, message, fix) out
    run.py      evaluate, diagnose, render, exit_if_failed

Every name the module had before the split is still importable from ddpfleet.doctor.
"""

from ddpfleet.doctor.checks import (
    CLOCK_FAIL_S,
    CLOCK_WARN_S,
    CUDA_118_DRIVER,
    DISK_FAIL_KIB,
    DISK_WARN_KIB,
    MINOR_COMPAT_DRIVER,
    Check,
    Status,
    check_clock,
    check_disk,
    check_driver,
    check_env,
    check_gpu_count,
    check_port,
    check_ssh,
    check_sudo,
    check_tcp,
    check_versions,
    fail,
    ok,
    warn,
)
from ddpfleet.doctor.node import (
    _LISTEN,
    _REACH,
    _TCP,
    _TORCH,
    FACTS_TIMEOUT_S,
    MARK,
    REACH_S,
    EnvFacts,
    NodeFacts,
    PortTest,
    clock_offset,
    facts_script,
    gather_facts,
    parse_facts,
    port_test,
)
from ddpfleet.doctor.run import (
    Gathered,
    diagnose,
    evaluate,
    exit_if_failed,
    gather,
    render,
    summary,
)

__all__ = [
    "CLOCK_FAIL_S", "CLOCK_WARN_S", "CUDA_118_DRIVER", "DISK_FAIL_KIB", "DISK_WARN_KIB",
    "FACTS_TIMEOUT_S", "MARK", "MINOR_COMPAT_DRIVER", "REACH_S", "Check", "EnvFacts", "Gathered",
    "NodeFacts", "PortTest", "Status", "check_clock", "check_disk", "check_driver", "check_env",
    "check_gpu_count", "check_port", "check_ssh", "check_sudo", "check_tcp", "check_versions",
    "clock_offset", "diagnose", "evaluate", "exit_if_failed", "facts_script", "fail", "gather",
    "gather_facts", "master_of", "ok", "parse_facts", "port_test", "render", "summary", "warn",
    "_LISTEN", "_REACH", "_TCP", "_TORCH",
]  # fmt: skip
