"""doctor's checks: facts in, `Check(name, status, message, fix)` out. Pure, tested as tables.

Cross-node checks (GPU counts, versions) compare each node with what most nodes have, ties going
to the master. Each threshold says why it is where it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from ddpfleet import envs, gpu
from ddpfleet.doctor.node import EnvFacts, PortTest
from ddpfleet.errors import AuthError, HostKeyChanged, HostKeyUnknown, NodeError
from ddpfleet.inventory import Node

CUDA_118_DRIVER = (520, 61, 5)  # facts.md B4: CUDA 11.8 GA on Linux
MINOR_COMPAT_DRIVER = (450, 80, 2)  # CUDA 11.x minor-version compatibility, limited features
CLOCK_WARN_S, CLOCK_FAIL_S = 2.0, 30.0
DISK_WARN_KIB, DISK_FAIL_KIB = 10 * 2**20, 2 * 2**20


class Status(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""


def ok(name: str, message: str) -> Check:
    return Check(name, Status.PASS, message)


def warn(name: str, message: str, fix: str = "") -> Check:
    return Check(name, Status.WARN, message, fix)


def fail(name: str, message: str, fix: str) -> Check:
    return Check(name, Status.FAIL, message, fix)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if i == 2 else str(part) for i, part in enumerate(version))


def check_ssh(node: Node, error: NodeError | None) -> Check:
    if error is None:
        return ok("ssh", f"{node.user}@{node.address}, host key checked")
    fix = "check host/port in the inventory and that sshd runs there (invoke ping)"
    if isinstance(error, HostKeyUnknown):
        fix = f"invoke trust --nodes {node.name}"
    elif isinstance(error, HostKeyChanged):
        fix = "if the node was reinstalled: remove its known_hosts line, then invoke trust"
    elif isinstance(error, AuthError):
        fix = "add the public key to the node's authorized_keys, or fix ssh.key"
    return fail("ssh", error.message, fix)


def check_sudo(
    uid: int | None,
    sudo_rc: int | None,
    user: str,
    become: str = "auto",
    password_given: bool = False,
) -> Check:
    """Bootstrap needs root: the login user, or sudo (ssh.become). A failure when it cannot
    have it; sudo that asks a password passes only when a password will be given."""
    if uid == 0:
        return ok("sudo", "root")
    as_root = "log in as root (ssh.user: root)"
    if become == "none":
        return fail(
            "sudo", f"{user} is not root and ssh.become is none; bootstrap needs root",
            f"set ssh.become: auto (sudo) or {as_root}",
        )  # fmt: skip
    if sudo_rc == 0:
        return ok("sudo", f"{user} has passwordless sudo (ssh.become)")
    if sudo_rc == 127:
        return fail(
            "sudo", f"{user} is not root and the node has no sudo; bootstrap needs root",
            f"install sudo there, or {as_root}",
        )  # fmt: skip
    if password_given:
        return ok("sudo", f"{user} has sudo with a password; bootstrap gives the one set here")
    return fail(
        "sudo", f"sudo asks {user}'s password (or {user} may not use sudo); bootstrap needs root",
        "give the password with --ask-become-pass, $DDPFLEET_BECOME_PASSWORD or "
        f"ssh.become_password_file, or {as_root}",
    )  # fmt: skip


def check_train_user(node: str, ids: Mapping[str, str], want: str, name: str) -> Check:
    """The training user exists here with the inventory's uid:gid (so the same on every node);
    `ids` is every reached node's "uid:gid" ("" when missing), `want` the inventory's."""
    here = ids.get(node, "")
    if not here:
        return fail("train user", f"no user {name} here", "invoke bootstrap (train_user role)")
    if here != want:
        others = ", ".join(f"{n} {i or '-'}" for n, i in sorted(ids.items()))
        return fail(
            "train user",
            f"{name} has uid:gid {here} here, the inventory says {want} ({others})",
            "equal ids on every node: renumber the user or set train_user.uid/gid",
        )
    return ok("train user", f"{name} uid:gid {here}, as the inventory says")


def check_driver(gpus: gpu.NodeGpus, expected: int | None) -> Check:
    """CUDA 11.8 wants >= 520.61.05; >= 450.80.02 runs it through minor-version compatibility.
    No driver is fine on a CPU node, a failure where the inventory says the node has GPUs."""
    install = f"install an NVIDIA driver >= {_dotted(CUDA_118_DRIVER)}, then reboot"
    error = gpus.driver_error
    if error and gpus.exit_code == gpu.NO_DEVICES_CODE:  # a driver without GPUs: reboot no cure
        if expected:
            return fail(
                "driver",
                f"gpus: {expected} in the inventory, but the driver lists no device ({error})",
                "check that the node sees its GPUs (lspci | grep -i nvidia; a VM needs them "
                "passed through), or fix the node's gpus: in the inventory",
            )
        return warn("driver", f"CPU only: the driver lists no device ({error})")
    if error and gpus.exit_code not in gpu.NO_DRIVER_CODES:  # there, but broken (15: off the bus)
        return fail("driver", f"nvidia-smi exit {gpus.exit_code}: {error}", "reboot the node")
    if error and expected:
        return fail("driver", f"gpus: {expected} in the inventory, but {error}", install)
    if error:
        return warn("driver", f"CPU only ({error})")
    driver = gpus.gpus[0].driver
    version = _version(driver)
    if version >= CUDA_118_DRIVER:
        return ok("driver", f"{driver} >= {_dotted(CUDA_118_DRIVER)} (CUDA 11.8)")
    if version >= MINOR_COMPAT_DRIVER:
        why = "CUDA 11.8 through minor-version compatibility only (limited, no PTX JIT)"
        return warn("driver", f"{driver}: {why}", install)
    limit = _dotted(MINOR_COMPAT_DRIVER)
    return fail("driver", f"{driver} < {limit}: too old for CUDA 11.8", install)


def _reference(values: Mapping[str, object], master: str) -> object:
    """What most nodes have; on a tie, the master's value (it hosts rank 0)."""
    counts = Counter(values.values())
    top = max(counts.values())
    if master in values and counts[values[master]] == top:
        return values[master]
    return next(v for v in values.values() if counts[v] == top)


def _holders(values: Mapping[str, object], value: object) -> str:
    return ", ".join(name for name, v in values.items() if v == value)


def check_gpu_count(
    name: str, counts: Mapping[str, int], master: str, expected: int | None
) -> Check:
    """Equal GPUs on every node (torchrun starts the same --nproc-per-node everywhere), and as
    many as the inventory's gpus: says."""
    mine, usual = counts[name], _reference(counts, master)
    if expected is not None and mine != expected:
        fix = f"check nvidia-smi -L on {name}, or fix nodes.{name}.gpus"
        return fail("gpus", f"{mine} GPUs, the inventory says gpus: {expected}", fix)
    if mine != usual:
        fix = "train on nodes with equal GPUs (--nodes), or pass --nproc-per-node"
        holders = _holders(counts, usual)
        verb = "has" if "," not in holders else "have"
        return fail("gpus", f"{mine} GPUs; {holders} {verb} {usual}", fix)
    odd = [n for n, count in counts.items() if count != usual]
    if odd:
        return ok("gpus", f"{mine} GPUs; differs on {', '.join(odd)}")
    return ok("gpus", f"{mine} GPUs" + (" on every node" if len(counts) > 1 else ""))


def check_env(name: str, env: EnvFacts, gpus: int, manager: str = "venv") -> Check:
    """The env imports torch; on a node whose driver lists GPUs, its CUDA works on all of them
    (envs.cuda_problem, the env roles' own verify), else training there cannot start."""
    fix = f"invoke bootstrap --nodes {name}"
    if not env.present:
        return fail("env", f"no env: {env.python} not found", fix)
    if env.error or not env.torch:
        return fail("env", f"import torch failed: {env.error}", fix)
    found = f"torch {env.torch}, CUDA {env.cuda or '-'}, NCCL {env.nccl or '-'}"
    record = {"torch": env.torch, "cuda": env.cuda, "available": env.available,
              "gpus": env.gpus, "node_gpus": gpus}  # fmt: skip
    problem = envs.cuda_problem(record, gpu_node=gpus > 0)
    if problem:
        if not env.cuda:
            pin = (
                "set python_env.cpu_only: auto (or false) so the env gets pytorch-cuda"
                if manager == "conda"
                else "pin a CUDA build in python_env (torch, index_url: auto gives cu118)"
            )
            return fail("env", f"{problem} on a node with {gpus} GPUs", f"{pin}, then {fix}")
        return fail(
            "env", f"{found}: {problem}",
            f"check the driver (invoke gpu-status --nodes {name}), then {fix}",
        )  # fmt: skip
    return ok("env", found)


def check_versions(name: str, versions: Mapping[str, tuple], master: str) -> Check:
    """torch / CUDA / NCCL equal on every node with a working env (the others fail `env`)."""
    usual = _reference(versions, master)
    labels = ("torch", "CUDA", "NCCL")
    diff = [
        f"{label} {a or '-'}"
        for label, a, b in zip(labels, versions[name], usual, strict=True)
        if a != b
    ]
    if diff:
        theirs = ", ".join(f"{label} {b or '-'}" for label, b in zip(labels, usual, strict=True))
        fix = "pin the same versions in python_env, then invoke bootstrap"
        return fail("versions", f"{', '.join(diff)}; {_holders(versions, usual)}: {theirs}", fix)
    odd = [n for n, v in versions.items() if v != usual]
    if odd:
        return ok("versions", f"differs on {', '.join(odd)}")
    return ok("versions", "same on every node" if len(versions) > 1 else "one env only")


def check_port(name: str, test: PortTest) -> Check:
    """On the master: the port is free. On a worker: it connects to the master's listener."""
    where, port = f"{test.master}:{test.port}", test.port
    if name == test.master and test.free:
        return ok("master port", f"{port} free")
    if name == test.master and test.free is None:
        return warn("master port", f"{port} not tested: {test.error}", "install python3")
    if name == test.master:
        fix = (
            f"stop what holds it (ss -ltnp 'sport = :{port}'), or pick another port: "
            "cluster.master_port, train --master-port"
        )
        return fail("master port", f"{port} in use: {test.error}", fix)
    if not test.free:
        return warn("master port", f"{where} not tested", f"see {test.master}'s master port")
    error = test.reached.get(name, "not tested")
    if error is None:
        return ok("master port", f"reached {where}")
    fix = f"allow TCP {port} from the workers to {test.master} (firewall)"
    return fail("master port", f"cannot reach {where}: {error}", fix)


def check_clock(offset_s: float | None) -> Check:
    if offset_s is None:
        return warn("clock", "could not read the node's clock")
    text = f"{round(offset_s, 3) + 0.0:+.3f}s from this machine"  # + 0.0: no "-0.000s"
    fix = "enable time sync on the nodes (timedatectl set-ntp true, or chrony)"
    if abs(offset_s) < CLOCK_WARN_S:
        return ok("clock", text)
    return (warn if abs(offset_s) < CLOCK_FAIL_S else fail)("clock", text, fix)


def check_disk(free_kib: int | None, path: str, prefix: str) -> Check:
    if free_kib is None:
        return warn("disk", f"could not read the free space under {prefix}")
    text = f"{free_kib / 2**20:.1f} GiB free at {path}"
    text += f" (for {prefix})" if path != prefix else ""
    fix = f"free space on {path}: the env with torch takes ~5 GiB, checkpoints more"
    if free_kib < DISK_FAIL_KIB:
        return fail("disk", text, fix)
    return warn("disk", text, fix) if free_kib < DISK_WARN_KIB else ok("disk", text)


def check_tcp(tcp: Mapping[str, str | None] | str) -> Check:
    """Each other node's SSH port from this node: the cheapest proof the nodes see each other."""
    if isinstance(tcp, str):
        return warn("tcp", f"not tested: {tcp}", "install python3 on the node")
    bad = "; ".join(f"{peer}: {why}" for peer, why in tcp.items() if why is not None)
    if bad:
        return fail("tcp", f"cannot connect to {bad}", "allow TCP between the nodes")
    if not tcp:
        return ok("tcp", "no other node")
    names = ", ".join(tcp) if len(tcp) <= 4 else f"all {len(tcp)} other nodes"
    return ok("tcp", f"reached the SSH port of {names}")
