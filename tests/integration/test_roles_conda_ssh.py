"""openssh_server, miniconda and conda_env on the real sandbox nodes.

Anaconda's servers and the pytorch channel cannot be reached from the sandbox, so the installer
is the Miniconda-CLI-compatible stand-in of tests/standins/conda/ (its `conda` logs every call
to /var/log/ddpfleet-standin-conda.log on the node), uploaded by the controller or served over
HTTP from the controller's bridge address. Everything else is real: sshd, sshd -t / -T, SFTP,
curl, sha256sum, the nodes' python.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import ipaddress
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster
from tests.integration.test_gpu_status import select, standin

NODES = ("node0", "node1")
STANDINS = Path(__file__).resolve().parents[1] / "standins" / "conda"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpu-cluster.yaml"
PREFIX = "/opt/miniconda3"
ENV = f"{PREFIX}/envs/ddp"
LOG = "/var/log/ddpfleet-standin-conda.log"
DROPIN = "/etc/ssh/sshd_config.d/00-ddpfleet-hardening.conf"
ROLES = "openssh_server,miniconda,conda_env"
GPU_NODE, CPU_NODE = NODES  # `installed` gives node0 the GPU stand-in


def build_installer(directory: Path, name: str) -> tuple[Path, str]:
    """The stand-in installer: header + the stand-in conda as its payload; and its SHA-256."""
    path = directory / name
    path.write_bytes((STANDINS / "installer.sh").read_bytes() + (STANDINS / "conda").read_bytes())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def write(
    cluster: Cluster,
    name: str,
    miniconda: dict | None = None,
    python_env: dict | None = None,
    openssh_server: dict | None = None,
) -> Path:
    """The session cluster's inventory with these role sections (conda manager)."""
    data = cluster.data
    data["miniconda"] = miniconda or {}
    data["python_env"] = {"manager": "conda", **(python_env or {})}
    if openssh_server:
        data["openssh_server"] = openssh_server
    path = cluster.dir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def gpu_node_as(cluster: Cluster, installer, name: str, recording: str):
    """An env `name` of its own (inventory, env path) while the GPU node's nvidia-smi stand-in
    plays `recording`; afterwards the stand-in is the module's a100x8 again and the env gone."""
    path, sha = installer
    inventory = write(
        cluster,
        f"inventory-conda-{name}.yaml",
        miniconda={"installer": str(path), "sha256": sha, "accept_tos": True},
        python_env={"name": name},
    )
    select(cluster, GPU_NODE, recording)
    env = f"{PREFIX}/envs/{name}"
    try:
        yield inventory, env
    finally:
        select(cluster, GPU_NODE, "a100x8")
        for node in NODES:
            cluster.ssh(node, f"rm -rf {env} {PREFIX}/ddpfleet/{name}.environment.yml")


def bootstrap(cluster: Cluster, inventory: Path, *flags: str, roles: str = ROLES):
    start = time.monotonic()
    result = cluster.invoke("bootstrap", "--roles", roles, *flags, inventory=inventory, timeout=900)
    return result, time.monotonic() - start


def recap(stdout: str) -> dict[str, dict[str, str]]:
    """The recap table's rows: {node: {column: value}}."""
    rows = [
        [c.strip() for c in line.strip().strip("│┃").replace("┃", "│").split("│")]
        for line in stdout.splitlines()
        if line.count("│") > 2 or line.count("┃") > 2
    ]
    header = next(r for r in rows if r[0] == "node")
    return {r[0]: dict(zip(header, r)) for r in rows if r[0] in NODES}


def changed(result) -> dict[str, int]:
    return {node: int(row["changed"]) for node, row in recap(result.stdout).items()}


def run_log(result) -> str:
    """The bootstrap's own log (every step, ok ones included), named on its last line."""
    line = next(ln for ln in reversed(result.stdout.splitlines()) if ln.startswith("log: "))
    return Path(line[len("log: ") :]).read_text()


def conda_log(cluster: Cluster, node: str, prefix: str = PREFIX) -> list[dict]:
    """What the stand-in installer and conda were asked to do under `prefix` on `node`."""
    out = cluster.ssh(node, f"cat {LOG} 2>/dev/null || true").stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if e.get("prefix") == prefix]


def actions(entries: list[dict], action: str) -> list[dict]:
    return [e for e in entries if e["action"] == action]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # the test checks the step, not access logs
        pass


@pytest.fixture(scope="module")
def installer(cluster: Cluster) -> tuple[Path, str]:
    return build_installer(cluster.dir, "Miniconda3-standin-Linux-x86_64.sh")


@pytest.fixture(scope="module")
def installed(cluster: Cluster, installer):
    """All three roles once on fresh nodes, with examples/gpu-cluster.yaml's settings (its consent
    choice; cpu_only: auto) and the stand-in installer uploaded from the controller.
    node0 has 8 GPUs (the nvidia-smi stand-in): a CUDA 11.8 env that must see them; node1 none:
    a cpuonly env. The GPU stand-in stays for the module (every test after this one sees it)."""
    path, sha = installer
    example = yaml.safe_load(EXAMPLE.read_text())  # its consent choice and env settings
    inventory = write(
        cluster,
        "inventory-conda.yaml",
        miniconda={**example["miniconda"], "installer": str(path), "sha256": sha},
        python_env=example.get("python_env"),
    )
    with standin(cluster, [GPU_NODE], "a100x8"):
        result, seconds = bootstrap(cluster, inventory)
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"fresh bootstrap ({ROLES}) of {len(NODES)} nodes: {seconds:.1f}s")
        yield inventory, result


def test_checksum_mismatch_refuses_before_executing(cluster: Cluster, installer):
    path, _ = installer
    prefix = "/opt/ddpfleet-test-mismatch"
    inventory = write(
        cluster,
        "inventory-mismatch.yaml",
        miniconda={"installer": str(path), "sha256": "0" * 64, "prefix": prefix},
    )
    result, _ = bootstrap(cluster, inventory, roles="miniconda")
    assert result.returncode != 0
    assert "sha256 mismatch" in result.stdout + result.stderr
    for node in NODES:
        cache = cluster.ssh(node, "ls /var/cache/ddpfleet/ 2>/dev/null || true").stdout
        assert path.name not in cache  # the mismatching file was deleted (.part included)
        assert cluster.ssh(node, f"test -e {prefix}").returncode == 1  # nothing installed
        assert conda_log(cluster, node, prefix) == []  # the installer never ran


def test_success_installs_the_env_and_verifies_torch(cluster: Cluster, installed):
    _, first = installed
    assert all(n > 0 for n in changed(first).values()), first.stdout
    for node in NODES:
        version = cluster.ssh(node, f"{PREFIX}/bin/conda --version")
        assert version.stdout.strip() == "conda 24.9.2", version.stderr
        torch = cluster.ssh(
            node,
            f"{ENV}/bin/python -c 'import torch; print(torch.__version__, torch.version.cuda)'",
        )
        cuda = "11.8" if node == GPU_NODE else "None"
        assert torch.stdout.split() == ["2.5.1", cuda], torch.stderr
        cache = cluster.ssh(node, "ls /var/cache/ddpfleet/").stdout.split()
        assert not [f for f in cache if f.endswith((".sh", ".part"))]  # installer cleaned up
    assert "torch 2.5.1, CUDA 11.8, cuda available: yes, GPUs: 8" in run_log(first)
    assert "torch 2.5.1, CUDA none, cuda available: no, GPUs: 0" in run_log(first)


def test_second_run_changes_nothing(cluster: Cluster, installed):
    inventory, _ = installed
    result, seconds = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert changed(result) == {n: 0 for n in NODES}, result.stdout
    node_seconds = {n: row["seconds"] for n, row in recap(result.stdout).items()}
    print(
        f"converged {ROLES} on {len(NODES)} nodes: {seconds:.2f}s wall (invoke included), "
        f"per node {node_seconds}"
    )


def test_environment_yml_pins_the_cuda_118_pairing(cluster: Cluster, installed):
    for node in NODES:
        doc = yaml.safe_load(cluster.ssh(node, f"cat {PREFIX}/ddpfleet/ddp.environment.yml").stdout)
        gpu = node == GPU_NODE
        assert doc["channels"] == ["pytorch", *(["nvidia"] * gpu), "defaults"]
        for dep in (
            "python=3.10",
            "pytorch::pytorch==2.5.1",
            "pytorch::torchvision==0.20.1",
            "pytorch::torchaudio==2.5.1",
            "pytorch::pytorch-cuda=11.8" if gpu else "pytorch::cpuonly",
            "mkl<2024.1",
            "jupyterlab",
        ):
            assert dep in doc["dependencies"], (node, doc)


def test_the_pinned_conda_is_never_asked_tos_and_no_recreate(cluster: Cluster, installed):
    """conda 24.9.2 has no `conda tos` (no plugin, detected from conda-meta): consent is
    ddpfleet's policy alone, and no conda command is run that would fail."""
    inventory, first = installed
    assert "no ToS plugin" in " ".join(run_log(first).split())
    again, _ = bootstrap(cluster, inventory)
    assert again.returncode == 0, again.stdout + again.stderr
    for node in NODES:
        entries = conda_log(cluster, node)
        assert not actions(entries, "tos accept"), entries
        assert len(actions(entries, "env create")) == 1, entries  # never re-created
        assert not [e for e in entries if e["action"].startswith("refused")], entries


def numpy_inventory(cluster: Cluster, installer) -> Path:
    path, sha = installer
    return write(
        cluster,
        "inventory-conda-numpy.yaml",
        miniconda={"installer": str(path), "sha256": sha, "accept_tos": True},
        python_env={"conda_packages": ["jupyterlab", "numpy"]},
    )


def creates(cluster: Cluster, node: str) -> list[dict]:
    return [e for e in actions(conda_log(cluster, node), "env create") if e["env"] == ENV]


def test_changed_spec_rebuilds_the_env_then_converges(cluster: Cluster, installer, installed):
    """A fresh `env create` at the env's path, never `env update --prune`; the old env waits
    beside it and is gone once the new one verified."""
    before = {node: len(creates(cluster, node)) for node in NODES}
    result, _ = bootstrap(cluster, numpy_inventory(cluster, installer))
    assert result.returncode == 0, result.stdout + result.stderr
    for node in NODES:
        made = creates(cluster, node)
        assert len(made) == before[node] + 1 and "numpy" in made[-1]["spec"]["dependencies"]
        assert not actions(conda_log(cluster, node), "env update")
        assert cluster.ssh(node, f"test -e {ENV}.ddpfleet-old").returncode == 1
    again, _ = bootstrap(cluster, numpy_inventory(cluster, installer))
    assert changed(again) == {n: 0 for n in NODES}, again.stdout
    back, _ = bootstrap(cluster, installed[0])  # and back to the module's spec
    assert back.returncode == 0, back.stdout + back.stderr


def test_a_rebuild_that_fails_to_verify_keeps_the_old_env(cluster: Cluster, installer, installed):
    """node0's driver stops (exit 9) before a spec change: its new env has no CUDA, so the old
    env, verified before, is put back as it was, old spec hash and all; node1 rebuilds."""
    spec = f"cat {ENV}/.ddpfleet-spec.sha256 {ENV}/conda-meta/standin-spec.json"
    old = cluster.ssh(GPU_NODE, spec).stdout
    select(cluster, GPU_NODE, "a100x8 fail=9")
    try:
        result, _ = bootstrap(cluster, numpy_inventory(cluster, installer))
    finally:
        select(cluster, GPU_NODE, "a100x8")
    out = " ".join(result.stdout.split())
    assert result.returncode != 0 and f"the old env is back at {ENV}" in out, out
    assert cluster.ssh(GPU_NODE, spec).stdout == old  # the old env, unchanged
    assert cluster.ssh(GPU_NODE, f"test -e {ENV}.ddpfleet-old").returncode == 1
    torch = cluster.ssh(GPU_NODE, f"{ENV}/bin/python -c 'import torch; print(torch.version.cuda)'")
    assert torch.stdout.strip() == "11.8", torch.stderr
    back, _ = bootstrap(cluster, installed[0])
    assert back.returncode == 0, back.stdout + back.stderr


def test_half_installed_prefix_is_repaired(cluster: Cluster, installed):
    inventory, _ = installed
    before = {node: len(creates(cluster, node)) for node in NODES}
    cluster.ssh("node0", f"rm {PREFIX}/bin/conda")  # an install cut short
    cluster.ssh("node1", f"printf '#!/bin/sh\\nexit 1\\n' > {PREFIX}/bin/conda")  # broken
    result, _ = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "half-installed" in result.stdout
    for node in NODES:
        runs = actions(conda_log(cluster, node), "installer")
        assert runs[-1]["argv"] == f"-b -p {PREFIX} -u", runs
        assert cluster.ssh(node, f"{PREFIX}/bin/conda --version").returncode == 0
        assert len(creates(cluster, node)) == before[node]  # the env was kept
    again, _ = bootstrap(cluster, inventory)
    assert changed(again) == {n: 0 for n in NODES}, again.stdout


def test_no_tos_consent_unless_asked(cluster: Cluster, installer):
    path, sha = installer
    prefix = "/opt/ddpfleet-test-notos"
    inventory = write(
        cluster,
        "inventory-notos.yaml",
        miniconda={"installer": str(path), "sha256": sha, "prefix": prefix},
    )
    result, _ = bootstrap(cluster, inventory, roles="miniconda,conda_env")
    assert result.returncode != 0
    out = " ".join((result.stdout + result.stderr).split())
    assert "accept_tos: true" in out and "flavor: miniforge" in out
    assert "ddpfleet's consent policy" in out and "would not stop by itself" in out
    for node in NODES:
        entries = conda_log(cluster, node, prefix)
        assert actions(entries, "installer")  # conda itself was installed
        assert not actions(entries, "tos accept") and not actions(entries, "env create")


def test_miniforge_downloaded_over_http_needs_no_consent(cluster: Cluster):
    (cluster.dir / "served").mkdir(exist_ok=True)
    path, sha = build_installer(cluster.dir / "served", "Miniforge3-standin-Linux-x86_64.sh")
    bridge = str(ipaddress.IPv4Network(cluster.data["sandbox"]["subnet"])[1])
    handler = functools.partial(QuietHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer((bridge, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://{bridge}:{server.server_address[1]}/{path.name}"
        prefix = "/opt/ddpfleet-test-forge"
        inventory = write(
            cluster,
            "inventory-forge.yaml",
            miniconda={"installer": url, "sha256": sha, "prefix": prefix, "flavor": "miniforge"},
        )
        result, _ = bootstrap(cluster, inventory, roles="miniconda,conda_env")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"downloaded {url}" in " ".join(result.stdout.split())
    for node in NODES:
        entries = conda_log(cluster, node, prefix)
        assert not actions(entries, "tos accept")
        create = actions(entries, "env create")
        gpu = cluster.ssh(node, "command -v nvidia-smi").returncode == 0  # after `installed`
        chans = ["pytorch", *(["nvidia"] * gpu), "conda-forge"]
        assert len(create) == 1 and create[0]["spec"]["channels"] == chans
        variant = "pytorch::pytorch-cuda=11.8" if gpu else "pytorch::cpuonly"
        assert variant in create[0]["spec"]["dependencies"]


def test_a_node_without_sftp_fails_alone_in_the_recap(cluster: Cluster, installer):
    # The installer goes over SFTP (sshd hardening needs none): node1 refuses it, node0 does not.
    path, sha = installer
    prefix = "/opt/ddpfleet-test-nosftp"
    sftp = "/usr/lib/openssh/sftp-server"
    inventory = write(
        cluster,
        "inventory-nosftp.yaml",
        miniconda={"installer": str(path), "sha256": sha, "prefix": prefix, "accept_tos": True},
    )
    bind = cluster.ssh(
        "node1", f"rm -f /var/cache/ddpfleet/{path.name}; mount --bind /bin/false {sftp}"
    )
    assert bind.returncode == 0, bind.stderr
    try:
        result, _ = bootstrap(cluster, inventory, roles="miniconda")
    finally:
        cluster.ssh("node1", f"umount {sftp}")
        for node in NODES:
            cluster.ssh(node, f"rm -rf {prefix}")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out
    rows = recap(result.stdout)
    assert rows["node0"]["failed"] == "0" and rows["node0"]["unreachable"] == "0", out
    assert rows["node1"]["failed"] != "0", out
    assert "node1: miniconda" in result.stderr and "SFTP" in result.stderr, result.stderr


def test_check_on_a_new_prefix_changes_nothing(cluster: Cluster, installer):
    path, sha = installer
    prefix = "/opt/ddpfleet-test-check"
    inventory = write(
        cluster,
        "inventory-check.yaml",
        miniconda={"installer": str(path), "sha256": sha, "prefix": prefix, "accept_tos": True},
    )
    result, _ = bootstrap(cluster, inventory, "--check", roles="miniconda,conda_env")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(n > 0 for n in changed(result).values())
    for node in NODES:
        assert cluster.ssh(node, f"test -e {prefix}").returncode == 1
        assert conda_log(cluster, node, prefix) == []


def test_rejected_sshd_dropin_is_not_installed_and_the_node_stays_reachable(
    cluster: Cluster, installed
):
    before = {n: cluster.ssh(n, f"cat {DROPIN}").stdout for n in NODES}
    inventory = write(
        cluster, "inventory-bad-sshd.yaml", openssh_server={"permit_root_login": "maybe"}
    )
    result, _ = bootstrap(cluster, inventory, roles="openssh_server")
    assert result.returncode != 0
    assert "sshd -t rejected" in result.stdout + result.stderr
    for node in NODES:
        assert cluster.ssh(node, "true").returncode == 0  # still reachable
        assert cluster.ssh(node, f"cat {DROPIN}").stdout == before[node]
        assert "maybe" not in cluster.ssh(node, "cat /etc/ssh/sshd_config.d/*").stdout
        assert cluster.ssh(node, f"ls {DROPIN}.ddpfleet-new 2>/dev/null").stdout == ""


def test_node_to_node_ssh_is_off_by_default(cluster: Cluster, installed):
    # The contract changed (review finding 2): no shared root key; on only for a named user,
    # which tests/integration/test_node_ssh.py covers.
    for src, dst in (("node0", "node1"), ("node1", "node0")):
        got = cluster.ssh(src, f"ssh -o BatchMode=yes -o StrictHostKeyChecking=yes {dst} hostname")
        assert got.returncode == 255 and "Permission denied" in got.stderr
        assert cluster.ssh(src, "ls ~/.ssh/ddpfleet_cluster_ed25519* 2>/dev/null").stdout == ""


def test_password_auth_is_off_per_sshd_T(cluster: Cluster, installed):
    for node in NODES:
        effective = dict(
            line.split(" ", 1)
            for line in cluster.ssh(node, "sshd -T").stdout.splitlines()
            if " " in line
        )
        assert effective["passwordauthentication"] == "no"
        assert effective["kbdinteractiveauthentication"] == "no"
        assert effective["pubkeyauthentication"] == "yes"
        assert effective["permitrootlogin"] in ("prohibit-password", "without-password")


def test_no_working_cuda_on_a_gpu_node_fails_verify_and_is_retried(
    cluster: Cluster, installer, installed
):
    """node0's driver is not loaded (nvidia-smi exit 9): its GPUs are there, so cpu_only: auto
    gives it pytorch-cuda, whose torch sees no CUDA; verify fails there and records no spec hash
    (the next bootstrap tries again). node1 (no GPUs) verifies its cpuonly env. Last in the
    module: it adds an `env create` to the log that earlier tests count."""
    with gpu_node_as(cluster, installer, "ddp-nodriver", "a100x8 fail=9") as (inventory, env):
        for _ in range(2):
            result, _ = bootstrap(cluster, inventory, roles="miniconda,conda_env")
            assert result.returncode != 0
            out = " ".join(result.stdout.split())
            assert "no working CUDA" in out and "is_available() is False" in out, out
            assert changed(result)[GPU_NODE] > 0  # tried again: the env was updated
        assert cluster.ssh(GPU_NODE, f"test -e {env}/.ddpfleet-spec.sha256").returncode == 1
        assert cluster.ssh(CPU_NODE, f"test -e {env}/.ddpfleet-spec.sha256").returncode == 0


def test_a_driver_without_devices_gets_cpuonly(cluster: Cluster, installer, installed):
    """node0's nvidia-smi says "No devices were found" (exit 6): cpu_only: auto gives it the
    cpuonly env, which verifies; no "reboot" anywhere. Last in the module, like the one above."""
    with gpu_node_as(cluster, installer, "ddp-nodevices", "no_devices") as (inventory, _):
        result, _ = bootstrap(cluster, inventory, roles="miniconda,conda_env")
        assert result.returncode == 0, result.stdout + result.stderr
        for node in NODES:
            doc = yaml.safe_load(
                cluster.ssh(node, f"cat {PREFIX}/ddpfleet/ddp-nodevices.environment.yml").stdout
            )
            assert "pytorch::cpuonly" in doc["dependencies"], doc
            assert "nvidia" not in doc["channels"], doc


def test_a_tos_plugin_conda_needs_consent_even_with_nodefaults(cluster: Cluster):
    """A user-supplied newer Miniconda (25.5.1: the ToS plugin): nodefaults in the env file
    does not avoid the check, so ddpfleet refuses without consent; with it, the role accepts both
    channels system-wide and the env is created."""
    path, sha = build_installer(cluster.dir, "Miniconda3-py310_25.5.1-1-Linux-x86_64.sh")
    prefix = "/opt/ddpfleet-test-plugin"
    no = write(
        cluster,
        "inventory-plugin-no.yaml",
        miniconda={"installer": str(path), "sha256": sha, "prefix": prefix},
        python_env={"channels": ["pytorch", "nvidia", "conda-forge", "nodefaults"]},
    )
    try:
        refused, _ = bootstrap(cluster, no, roles="miniconda,conda_env")
        assert refused.returncode != 0
        out = " ".join((refused.stdout + refused.stderr).split())
        assert "nodefaults does not avoid it" in out and f"{prefix}/.condarc" in out, out
        for node in NODES:
            entries = conda_log(cluster, node, prefix)
            assert actions(entries, "installer") and not actions(entries, "env create")
        yes = write(
            cluster,
            "inventory-plugin-yes.yaml",
            miniconda={"installer": str(path), "sha256": sha, "prefix": prefix, "accept_tos": True},
        )
        result, _ = bootstrap(cluster, yes, roles="miniconda,conda_env")
        assert result.returncode == 0, result.stdout + result.stderr
        for node in NODES:
            entries = conda_log(cluster, node, prefix)
            accepted = actions(entries, "tos accept")
            assert sorted(e["channel"] for e in accepted) == [
                "https://repo.anaconda.com/pkgs/main",
                "https://repo.anaconda.com/pkgs/r",
            ]
            assert {e["scope"] for e in accepted} == {"--system"}
            assert len(actions(entries, "env create")) == 1, entries
    finally:
        for node in NODES:
            cluster.ssh(node, f"rm -rf {prefix}")
