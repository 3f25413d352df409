"""ddpfleet.engine.wheelhouse: platform tags, pip download plans, the cache, what a push sends; and the
pure half of ddpfleet.envexport (parsing, the report).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpfleet import report
from ddpfleet.engine import wheelhouse, wheelsums
from ddpfleet.engine.wheelhouse import Spec, Target
from ddpfleet.envexport import (
    Snapshot,
    differences,
    document,
    parse_conda_export,
    parse_freeze,
    render,
)
from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.shell import sha256

PROBE = {
    "base_py": "3.11",
    "base_impl": "cp",
    "base_abi": "cp311",
    "base_plat": "linux-x86_64",
    "base_glibc": "2.36",
}
CPU = Spec("torch==2.13.0", "", ("jupyterlab",))
CU118 = Spec("torch==2.5.1", "https://download.pytorch.org/whl/cu118", ("jupyterlab",))


def test_platform_tags_follow_pips_order_for_x86_64():
    tags = wheelhouse.platform_tags("linux-x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert tags[tags.index("manylinux_2_17_x86_64") + 1] == "manylinux2014_x86_64"
    assert tags[tags.index("manylinux_2_12_x86_64") + 1] == "manylinux2010_x86_64"
    assert tags[-3:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    assert "manylinux_2_28_x86_64" in tags  # torch's wheels


def test_aarch64_manylinux_starts_at_glibc_2_17():
    tags = wheelhouse.platform_tags("linux-aarch64", "2.31")
    assert tags[-3:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"]
    assert not any("manylinux2010" in t for t in tags)


@pytest.mark.parametrize(
    "plat, glibc, tags",
    [
        ("linux-x86_64", "", ["linux_x86_64"]),  # musl: no manylinux
        ("macosx-11.0-arm64", "", ["macosx_11_0_arm64"]),
    ],
)
def test_platform_tags_without_glibc(plat, glibc, tags):
    assert wheelhouse.platform_tags(plat, glibc) == tags


def test_target_from_probe_and_its_cache_tag():
    target = Target.from_probe(PROBE)
    assert target == Target("3.11", "cp", "cp311", "linux-x86_64", "2.36")
    assert target.tag == "cp311-manylinux_2_36_x86_64"


def test_target_from_a_probe_without_python3_is_a_clear_error():
    with pytest.raises(DdpfleetError, match=r"is python3 .* installed"):
        Target.from_probe({"base_py": "3.11"})


@pytest.mark.parametrize(
    "key, value",
    [
        ("base_abi", "../../.."),  # the review's #9: the cache dir would leave .ddpfleet/
        ("base_abi", "cp311/../../x"),
        ("base_abi", "/etc"),
        ("base_abi", "cp311 x"),
        ("base_plat", "linux-../../../tmp"),
        ("base_plat", "linux/x86_64"),
        ("base_impl", "c/p"),
        ("base_py", "3.11/.."),
        ("base_glibc", "2.36/../x"),
    ],
)
def test_a_node_reported_value_that_is_not_a_plain_token_is_refused(key, value):
    with pytest.raises(DdpfleetError) as e:
        Target.from_probe({**PROBE, key: value}, node="node1")
    message = str(e.value)
    assert message.startswith(f"node1: python3 reported {key}={value!r}, not ")
    assert "\n" not in message


@pytest.mark.parametrize(
    "changes",
    [
        {"base_abi": "cp313t"},
        {"base_abi": "cp37m", "base_py": "3.7"},
        {"base_impl": "pypy", "base_abi": "pypy310"},
        {"base_plat": "macosx-11.0-arm64", "base_glibc": ""},
        {"base_plat": "linux-aarch64", "base_glibc": "2.17"},
    ],
)
def test_real_probe_values_are_accepted(changes):
    target = Target.from_probe({**PROBE, **changes}, node="node1")
    assert "/" not in target.tag and ".." not in target.tag


def test_spec_digest_changes_with_every_part():
    digests = {
        CPU.digest(),
        CU118.digest(),
        Spec("torch==2.13.0", "", ()).digest(),
        Spec("torch==2.13.0", "https://x", ("jupyterlab",)).digest(),
    }
    assert len(digests) == 4
    assert CPU.digest() == Spec("torch==2.13.0", "", ("jupyterlab",)).digest()


def test_download_with_pips_own_config_is_one_command_for_the_target():
    ((argv, index),) = wheelhouse.download_commands(
        CPU, Target.from_probe(PROBE), Path("/c/t"), "py"
    )
    assert index == ""
    assert argv[:4] == ["py", "-m", "pip", "download"]
    assert argv[-2:] == ["torch==2.13.0", "jupyterlab"]
    for flag, value in (
        ("--python-version", "3.11"),
        ("--abi", "cp311"),
        ("--implementation", "cp"),
        ("--dest", "/c/t"),
    ):
        assert argv[argv.index(flag) + 1] == value
    assert "--only-binary=:all:" in argv
    assert argv.count("--platform") == len(wheelhouse.platform_tags("linux-x86_64", "2.36"))
    assert "--index-url" not in argv


def test_download_from_the_torch_index_then_the_rest_against_what_is_there():
    (first, index), (second, index2) = wheelhouse.download_commands(
        CU118, Target.from_probe(PROBE), Path("/c/t")
    )
    # The index goes to pip as PIP_INDEX_URL (it may carry a token), never on the argv.
    assert index == "https://download.pytorch.org/whl/cu118" and first[-1] == "torch==2.5.1"
    assert "--index-url" not in first and index not in " ".join(first)
    assert second[-4:] == ["--find-links", "/c/t", "torch==2.5.1", "jupyterlab"]
    assert index2 == "" and "--index-url" not in second


def test_saved_wheels_reads_pips_output():
    out = (
        "Collecting torch==2.13.0\n"
        "Saved /c/t/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl\n"
        "  File was already downloaded /c/t/filelock-3.16.1-py3-none-any.whl\n"
        "Saved /c/t/filelock-3.16.1-py3-none-any.whl\n"
        "Successfully downloaded torch filelock\n"
    )
    assert wheelhouse.saved_wheels(out) == [
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "filelock-3.16.1-py3-none-any.whl",
    ]


def test_stale_compares_names_and_digests():
    local = {"a.whl": "1" * 64, "b.whl": "2" * 64, "c.whl": "3" * 64}
    remote = {"a.whl": "1" * 64, "b.whl": "f" * 64, "old.whl": "4" * 64}
    assert wheelsums.stale(local, remote) == ["b.whl", "c.whl"]
    assert wheelsums.stale(local, local) == []


def test_parse_reads_digests_and_removed_parts():
    out = (
        "part torch-2.13.0-py3-none-any.whl.part\n"
        f"{'a' * 64}  six-1.16.0-py2.py3-none-any.whl\n"
        "Traceback (most recent call last):\n"
    )
    found = wheelsums.parse(out)
    assert found.digests == {"six-1.16.0-py2.py3-none-any.whl": "a" * 64}
    assert found.removed == ("torch-2.13.0-py3-none-any.whl.part",)


def test_local_digests_hash_each_version_once(tmp_path, monkeypatch):
    a, b = tmp_path / "a.whl", tmp_path / "b.whl"
    a.write_bytes(b"alpha")
    b.write_bytes(b"beta")
    hashed = []
    real = wheelsums._hash
    monkeypatch.setattr(wheelsums, "_hash", lambda f: hashed.append(f.name) or real(f))
    monkeypatch.setattr(wheelsums, "_memo", {})
    digests = wheelsums.local_digests([a, b])
    assert digests == {"a.whl": sha256(b"alpha"), "b.whl": sha256(b"beta")}
    assert wheelsums.local_digests([a, b]) == digests
    monkeypatch.setattr(wheelsums, "_memo", {})  # a later run: the directory's cache answers
    assert wheelsums.local_digests([a, b]) == digests
    assert sorted(hashed) == ["a.whl", "b.whl"]
    os.utime(a, ns=(0, 1))  # a new version (mtime) of a: hashed again, b not
    a.write_bytes(b"alphA")
    assert wheelsums.local_digests([a, b])["a.whl"] == sha256(b"alphA")
    assert sorted(hashed) == ["a.whl", "a.whl", "b.whl"]


# -- the cache, with pip stood in for --------------------------------------------------------


@pytest.fixture
def fake_pip(monkeypatch):
    """pip download that writes one wheel per requirement into --dest and says so."""
    calls = []

    def pip(argv, index_url=""):
        calls.append(argv)
        dest = Path(argv[argv.index("--dest") + 1])
        out = ""
        for req in (a for a in argv if a in ("torch==2.13.0", "jupyterlab")):
            wheel = dest / f"{req.replace('==', '-')}-py3-none-any.whl"
            wheel.write_bytes(b"x" * len(req))
            out += f"Saved {wheel}\n"
        return out

    monkeypatch.setattr(wheelhouse, "_pip", pip)
    return calls


def test_fetch_downloads_once_per_spec_and_platform(tmp_path, fake_pip):
    target = Target.from_probe(PROBE)
    files = wheelhouse.fetch(tmp_path, CPU, target)
    assert [f.name for f in files] == [
        "torch-2.13.0-py3-none-any.whl",
        "jupyterlab-py3-none-any.whl",
    ]
    assert all(f.parent == tmp_path / "cp311-manylinux_2_36_x86_64" for f in files)
    assert wheelhouse.fetch(tmp_path, CPU, target) == files
    assert len(fake_pip) == 1  # the manifest answered the second time: no pip, no network


def test_fetch_downloads_again_when_a_cached_wheel_is_gone(tmp_path, fake_pip):
    target = Target.from_probe(PROBE)
    files = wheelhouse.fetch(tmp_path, CPU, target)
    files[0].unlink()
    assert wheelhouse.fetch(tmp_path, CPU, target) == files
    assert len(fake_pip) == 2 and files[0].is_file()


def test_a_failed_pip_download_names_the_controller(tmp_path, monkeypatch):
    monkeypatch.setattr(
        wheelhouse.subprocess,
        "run",
        lambda *a, **k: type(
            "P",
            (),
            {
                "returncode": 1,
                "stderr": "ERROR: No matching distribution found for torch",
                "stdout": "",
            },
        )(),
    )
    with pytest.raises(DdpfleetError, match=r"controller: pip download failed .*No matching"):
        wheelhouse.fetch(tmp_path, CPU, Target.from_probe(PROBE))


# -- push, against a directory standing in for the node's SFTP -------------------------------


class DirSFTP:
    """The few SFTP calls push makes, on a local directory."""

    def __init__(self):
        self.put_calls = []

    def listdir_attr(self, path):
        if not Path(path).is_dir():
            raise FileNotFoundError(path)
        return [
            type("A", (), {"filename": p.name, "st_size": p.stat().st_size})()
            for p in Path(path).iterdir()
        ]

    def put(self, local, remote, callback=None, confirm=True):
        self.put_calls.append(Path(remote).name)
        shutil.copyfile(local, remote)
        if callback is not None:  # paramiko calls it per block; once at the end is enough here
            callback(Path(remote).stat().st_size, Path(remote).stat().st_size)
        return Path(remote).stat()

    def posix_rename(self, old, new):
        Path(old).rename(new)


runs: list[list[str]] = []


def node_run(argv, stdin):
    """The push's one node command, run here by this machine's python3."""
    runs.append(argv)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def test_push_sends_missing_cut_short_and_corrupt_files_in_one_node_command(tmp_path):
    home, node = tmp_path / "home", tmp_path / "node"
    home.mkdir()
    node.mkdir()
    files = []
    for name, size in (("a.whl", 10), ("b.whl", 20), ("c.whl", 30), ("d.whl", 40)):
        (home / name).write_bytes(b"x" * size)
        files.append(home / name)
    (node / "a.whl").write_bytes(b"x" * 10)
    (node / "b.whl").write_bytes(b"x" * 3)  # an earlier push cut short
    (node / "d.whl").write_bytes(b"x" * 39 + b"y")  # same size, one byte differs
    (node / "c.whl.part").write_bytes(b"x" * 7)  # an interrupted push
    (node / "other.whl").write_bytes(b"kept")  # another spec's wheel
    sftp = DirSFTP()
    runs.clear()
    assert wheelhouse.push(sftp, str(node), files, node_run) == (3, 90, 1)
    assert len(runs) == 1
    assert sftp.put_calls == ["b.whl.part", "c.whl.part", "d.whl.part"]
    assert sorted(p.name for p in node.iterdir()) == [
        "a.whl",
        "b.whl",
        "c.whl",
        "d.whl",
        "other.whl",
    ]
    assert (node / "d.whl").read_bytes() == b"x" * 40
    assert wheelhouse.push(sftp, str(node), files, node_run) == (0, 0, 0)
    assert len(runs) == 2  # converged: the one command, nothing sent


def test_push_to_a_missing_directory_sends_everything(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"a")
    found = wheelsums.parse(node_run(*wheelsums.node_command(str(tmp_path / "none"), ["a.whl"])))
    assert found == wheelsums.Found()


# -- env-export's pure half (ddpfleet.envexport): the other venv-side piece of issue 3 ---------

CONDA_EXPORT = """name: ddp
channels:
  - pytorch
  - nvidia
dependencies:
  - python=3.10.14=h955ad1f_0
  - pytorch=2.5.1=py3.10_cuda11.8_cudnn9.1.0_0
  - pip:
    - Jupyter_Server==2.14.2
prefix: /opt/miniconda3/envs/ddp
"""


def snap(node: str, torch: str = "2.13.0+cpu", **packages: str):
    pkgs = {"filelock": "3.16.1", "jupyterlab": "4.3.0", **packages}
    freeze = "".join(f"{k}=={v}\n" for k, v in pkgs.items())
    facts = {"python": "3.11.2", "torch": torch, "cuda": None, "nccl": None}
    return Snapshot(node, "venv", "/opt/ddpfleet/venv", facts, pkgs, freeze)


def test_parse_freeze_normalizes_names_and_keeps_urls():
    text = (
        "# a comment\nFoo_Bar==1.0\nbaz @ file:///w/baz-2.0-py3-none-any.whl\n"
        "-e git+https://x/y.git#egg=y\n"
    )
    assert parse_freeze(text) == {"foo-bar": "1.0", "baz": "file:///w/baz-2.0-py3-none-any.whl"}


def test_parse_conda_export_includes_the_pip_section():
    assert parse_conda_export(CONDA_EXPORT) == {
        "python": "3.10.14=h955ad1f_0",
        "pytorch": "2.5.1=py3.10_cuda11.8_cudnn9.1.0_0",
        "jupyter-server": "2.14.2",
    }


def test_differences_put_torch_first_then_only_the_packages_that_differ():
    snaps = {
        "node0": snap("node0"),
        "node1": snap("node1", torch="2.5.1", filelock="3.15.0", numpy="2.1.0"),
    }
    assert differences(snaps) == [
        ("torch", "2.13.0+cpu", "2.5.1"),
        ("filelock", "3.16.1", "3.15.0"),
        ("numpy", "-", "2.1.0"),
    ]


def test_identical_nodes_say_so_with_their_torch(capsys):
    snaps = {"node0": snap("node0"), "node1": snap("node1")}
    assert differences(snaps) == []
    report.console.print(render(snaps))
    out = capsys.readouterr().out
    assert "all nodes identical: torch 2.13.0+cpu, CUDA none, NCCL none, python 3.11.2" in out


def test_node_errors_are_reported_after_the_comparison(capsys):
    report.console.print(render({"node0": snap("node0"), "node1": NodeError("node1", "no env")}))
    assert "node1: no env" in capsys.readouterr().out


def test_documents_venv_yaml_and_conda_export_as_is():
    doc = yaml.safe_load(document(snap("node0")))
    assert doc["torch"] == "2.13.0+cpu" and "filelock==3.16.1" in doc["pip"]
    facts = {"python": "3.10.14", "torch": "2.5.1", "cuda": "11.8", "nccl": "2.21.5"}
    conda = document(
        Snapshot("node0", "conda", "/opt/miniconda3/envs/ddp", facts, {}, CONDA_EXPORT)
    )
    assert conda.endswith(CONDA_EXPORT) and "# torch 2.5.1, CUDA 11.8, NCCL 2.21.5" in conda
    assert yaml.safe_load(conda)["name"] == "ddp"


def test_pip_gets_the_index_from_its_environment_and_errors_mask_the_password():
    url = "http://u:SECRET@127.0.0.1:9/simple"
    show_env = [sys.executable, "-c", "import os; print(os.environ['PIP_INDEX_URL'])"]
    assert wheelhouse._pip(show_env, url).strip() == url
    fail = [sys.executable, "-c", "import os, sys; sys.exit('no index at ' + os.environ['X'])"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("X", url)
        with pytest.raises(DdpfleetError) as e:
            wheelhouse._pip(fail, url)
    assert "SECRET" not in str(e.value) and "http://u:***@127.0.0.1:9/simple" in str(e.value)


def test_a_credentialed_index_never_reaches_argv_progress_or_errors(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        wheelhouse, "_pip", lambda argv, index_url="": calls.append((argv, index_url)) or ""
    )  # pip that saves nothing
    spec = Spec("torch==2.13.0", "https://u:SECRET@pkgs.example/simple", ())
    progress = []
    with pytest.raises(DdpfleetError) as e:
        wheelhouse.fetch(tmp_path, spec, Target.from_probe(PROBE), progress.append)
    assert calls[0][1] == spec.index_url  # pip still gets it, through PIP_INDEX_URL
    shown = [str(e.value), *progress, *(" ".join(argv) for argv, _ in calls)]
    assert not [s for s in shown if "SECRET" in s]
    assert "PIP_INDEX_URL='https://u:***@pkgs.example/simple'" in str(e.value)
