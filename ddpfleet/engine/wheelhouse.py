"""Wheels for nodes without internet: the controller downloads, the node installs --no-index.

    target = Target.from_probe(facts)          # the node's python + platform (one probe)
    files = fetch(cache_root, spec, target)    # pip download once per (platform, spec), cached
    sent = push(sftp, "/var/cache/ddpfleet/wheelhouse", files, run)  # what the node lacks

The controller's cache is <inventory dir>/.ddpfleet/wheelhouse/<tag>/, tag like
cp311-manylinux_2_36_x86_64. Each spec leaves a manifest there (spec-<hash>.txt, the wheel names
pip chose), so a later run for the same spec needs neither pip nor the network. The node keeps one
flat directory; a file is sent when its name is missing there or its SHA-256 differs (one command
on the node per push, which also removes interrupted uploads: ddpfleet.wheelsums). Wheels there
that the spec does not name stay: another spec or env on the node may use them.

pip evaluates environment markers against the controller's Python, not --python-version
(pypa/pip#11010): a controller on the node's minor version gives the exact set.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ddpfleet import progress
from ddpfleet.engine import wheelsums
from ddpfleet.errors import DdpfleetError
from ddpfleet.hygiene import mask_url, mask_urls, state_dir

# Oldest glibc a manylinux wheel may ask for, per architecture (PEP 600 / pip's own list).
MANYLINUX_FLOOR = {"x86_64": 5, "i686": 5}
MANYLINUX_DEFAULT_FLOOR = 17
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
SAVED = re.compile(r"^\s*(?:Saved|File was already downloaded) (.+\.whl)\s*$", re.MULTILINE)
# What a node's probe may report, as TARGET_PY prints it: the ABI and platform name a directory of
# the controller's cache, so each is a plain token (a compromised node's '../..' is refused).
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
REPORTED = {
    "base_py": (re.compile(r"\d{1,3}\.\d{1,3}"), "a Python version like 3.11"),
    "base_impl": (re.compile(r"[a-z][a-z0-9_]{0,31}"), "an implementation like cp"),
    "base_abi": (re.compile(_TOKEN), "an ABI tag like cp311"),
    "base_plat": (re.compile(_TOKEN), "a platform like linux-x86_64"),
    "base_glibc": (re.compile(r"(\d{1,3}(\.\d{1,4}){1,2})?"), "a glibc version like 2.36"),
}

# Run by the node's python3 (stdlib only); prints what pip download needs to know, e.g.
#   base_python=3.11.2  base_py=3.11  base_impl=cp  base_abi=cp311
#   base_plat=linux-x86_64  base_glibc=2.36  base_ensurepip=1
TARGET_PY = """
import importlib.util, os, sys, sysconfig
v, name = sys.version_info, sys.implementation.name
impl = "cp" if name == "cpython" else name
try:
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")[2]
except (ValueError, OSError):
    glibc = ""
print("base_python=%d.%d.%d" % v[:3])
print("base_py=%d.%d" % (v[0], v[1]))
print("base_impl=" + impl)
print("base_abi=%s%d%d%s" % (impl, v[0], v[1], getattr(sys, "abiflags", "")))
print("base_plat=" + sysconfig.get_platform())
print("base_glibc=" + glibc)
print("base_ensurepip=%d" % (importlib.util.find_spec("ensurepip") is not None))
"""


@dataclass(frozen=True)
class Spec:
    """What goes into an env: torch (from index_url; '' = pip's own configuration), then the rest
    from pip's default index."""

    torch: str
    index_url: str
    packages: tuple[str, ...]

    @property
    def requirements(self) -> list[str]:
        return [self.torch, *self.packages]

    def digest(self) -> str:
        text = json.dumps(
            {"torch": self.torch, "index_url": self.index_url, "packages": list(self.packages)},
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Target:
    """A node's interpreter and platform, as pip download's --python-version/--abi/--platform."""

    python: str  # '3.11'
    impl: str  # 'cp'
    abi: str  # 'cp311'
    platform: str  # sysconfig.get_platform(): 'linux-x86_64'
    glibc: str  # '2.36'; '' when not glibc (musl, macOS)

    @classmethod
    def from_probe(cls, facts: Mapping[str, str], node: str = "node") -> Target:
        """The target a node's TARGET_PY answer describes; every value checked (REPORTED)."""
        missing = [k for k in ("base_py", "base_impl", "base_abi", "base_plat") if not facts.get(k)]
        if missing:
            raise DdpfleetError(
                f"{node}'s python3 did not report {', '.join(missing)}; "
                "is python3 (>= 3.8) installed on the node?"
            )
        for key, (shape, what) in REPORTED.items():
            value = facts.get(key, "")
            if not shape.fullmatch(value) or ".." in value:
                raise DdpfleetError(
                    f"{node}: python3 reported {key}={value!r}, not {what}; refused (these "
                    "values name the controller's wheel cache dir): check the node's python3"
                )
        return cls(
            facts["base_py"],
            facts["base_impl"],
            facts["base_abi"],
            facts["base_plat"],
            facts.get("base_glibc", ""),
        )

    @property
    def platforms(self) -> list[str]:
        return platform_tags(self.platform, self.glibc)

    @property
    def tag(self) -> str:
        """The cache directory's name: 'cp311-manylinux_2_36_x86_64'."""
        return f"{self.abi}-{self.platforms[0]}"


def platform_tags(plat: str, glibc: str) -> list[str]:
    """Wheel platform tags a node accepts, best first, as pip computes them on the node.

    >>> platform_tags("linux-x86_64", "2.17")[:3]
    ['manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux_2_16_x86_64']
    """
    system, _, arch = plat.partition("-")
    arch = arch.replace("-", "_").replace(".", "_")
    if system != "linux":
        return [plat.replace("-", "_").replace(".", "_")]
    tags = []
    major, _, minor = glibc.partition(".")
    if major == "2" and minor.isdigit():
        floor = MANYLINUX_FLOOR.get(arch, MANYLINUX_DEFAULT_FLOOR)
        for m in range(int(minor), floor - 1, -1):
            tags.append(f"manylinux_2_{m}_{arch}")
            legacy = LEGACY_MANYLINUX.get(m)
            if legacy and (m == 17 or arch in MANYLINUX_FLOOR):
                tags.append(f"{legacy}_{arch}")
    return tags + [f"linux_{arch}"]


# -- the controller's cache ------------------------------------------------------------------


def download_commands(
    spec: Spec, target: Target, dest: Path, python: str = sys.executable
) -> list[tuple[list[str], str]]:
    """pip download (argv, index URL) pairs: torch from its index first, then the rest (torch
    again, so a package that needs torch resolves to the one already in dest, not PyPI's default
    build). The index URL ('' = pip's own configuration) goes to pip as PIP_INDEX_URL: it may
    carry credentials, and an argv is visible in ps to every user of the controller."""
    base = [
        python,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--implementation",
        target.impl,
        "--python-version",
        target.python,
        "--abi",
        target.abi,
    ]
    for tag in target.platforms:
        base += ["--platform", tag]
    if not spec.index_url:
        return [(base + spec.requirements, "")]
    commands = [(base + [spec.torch], spec.index_url)]
    if spec.packages:
        commands.append((base + ["--find-links", str(dest)] + spec.requirements, ""))
    return commands


def saved_wheels(pip_output: str) -> list[str]:
    """Wheel file names pip download saved or found already there, in order, once each."""
    names = [posixpath.basename(m.strip()) for m in SAVED.findall(pip_output)]
    return list(dict.fromkeys(names))


def fetch(
    cache_root: Path,
    spec: Spec,
    target: Target,
    on_progress: Callable[[str], None] = lambda text: None,
) -> list[Path]:
    """The wheels `spec` needs on `target`, downloaded once into the cache (per-tag lock, so
    nodes of one platform, in threads or in two bootstraps, download it once)."""
    tag_dir = cache_root / target.tag
    state_dir(tag_dir)
    manifest = tag_dir / f"spec-{spec.digest()[:16]}.txt"
    with open(tag_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = _from_manifest(manifest)
        if files is None:
            names: list[str] = []
            for argv, index in download_commands(spec, target, tag_dir):
                source = mask_url(index) if index else "pip's index"
                on_progress(f"pip download for {target.tag} from {source}")
                names += saved_wheels(_pip(argv, index))
            if not names:
                with_index = f"PIP_INDEX_URL={shlex.quote(mask_url(index))} " if index else ""
                raise DdpfleetError(
                    f"controller: pip download for {target.tag} named no wheels; "
                    f"run it by hand: {with_index}{shlex.join(argv)}"
                )
            files = [tag_dir / n for n in dict.fromkeys(names)]
            manifest.write_text("".join(f"{f.name}\n" for f in files))
    return files


def _from_manifest(manifest: Path) -> list[Path] | None:
    if not manifest.is_file():
        return None
    files = [manifest.parent / n for n in manifest.read_text().split()]
    return files if files and all(f.is_file() for f in files) else None


def _pip(argv: list[str], index_url: str = "") -> str:
    env = {**os.environ, "PIP_INDEX_URL": index_url} if index_url else None
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        # pip masks passwords in URLs it prints; masked again in case an old pip does not.
        tail = mask_urls("\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:]))
        raise DdpfleetError(f"controller: pip download failed (exit {proc.returncode}): {tail}")
    return proc.stdout


# -- the node's copy -------------------------------------------------------------------------


class Pushed(NamedTuple):
    """What a push did: wheels sent, their bytes, interrupted uploads (.part) it removed."""

    files: int
    bytes: int
    removed: int


def push(
    sftp,
    remote_dir: str,
    files: Iterable[Path],
    run: Callable[[list[str], str], str],
    on_progress: Callable[[str], None] = lambda text: None,
    node: str = "node",
) -> Pushed:
    """Copy the files the node lacks, or holds other bytes of, into remote_dir over SFTP.
    `run(argv, stdin) -> stdout` runs the one command that asks the node for its digests (and
    removes interrupted uploads first: ddpfleet.wheelsums). A long push shows its bytes, rate and
    time left under the node's name (ddpfleet.progress).

    Each file lands under a .part name and is renamed, so an interrupted push leaves no wheel
    that looks complete.
    """
    local = {f.name: f for f in files}
    digests = wheelsums.local_digests(local.values())
    found = wheelsums.parse(run(*wheelsums.node_command(remote_dir, sorted(local))))
    todo = wheelsums.stale(digests, found.digests)
    sizes = {n: local[n].stat().st_size for n in todo}
    sent = 0
    with progress.transfer(node, "wheelhouse", sum(sizes.values())) as bytes_out:
        for i, name in enumerate(todo, 1):
            on_progress(f"wheelhouse: sending {name} ({i}/{len(todo)})")
            part = posixpath.join(remote_dir, name + ".part")
            put = sftp.put(str(local[name]), part, callback=_counter(bytes_out), confirm=True)
            sent += put.st_size
            sftp.posix_rename(part, posixpath.join(remote_dir, name))
    return Pushed(len(todo), sent, len(found.removed))


def _counter(bytes_out: progress.Transfer) -> Callable[[int, int], None]:
    """sftp.put's callback (bytes of this file so far, its size) as advances of the whole push."""
    last = 0

    def seen(done: int, _size: int) -> None:
        nonlocal last
        bytes_out.advance(done - last)
        last = done

    return seen
