"""miniconda: a pinned Miniconda (or Miniforge), its SHA-256 checked on the node before it runs.

A converged node costs one probe: `PREFIX/bin/conda --version` and the ToS marker. Otherwise:

1. the installer reaches the node as <download_dir>/<name>.part: downloaded there (curl or wget)
   or, when `installer` is a controller path, uploaded over SFTP (nodes without internet);
2. its SHA-256 is checked on the node; a mismatch deletes it and nothing runs;
3. `bash installer -b -p PREFIX`, with -u over a half-installed prefix (a directory the
   installer made whose bin/conda is missing or broken): -u unpacks over it and keeps envs/;
4. Anaconda's Terms of Service (flavor miniconda) are accepted only when the inventory says
   `accept_tos: true`, and only where the conda has the ToS plugin (conda-anaconda-tos in
   conda-meta/, conda >= 24.11; the pinned 24.9.2 has no `conda tos`): `conda tos accept
   --system` covers every account on the node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ddpfleet.engine import rootfiles
from ddpfleet.engine.roles import Step, changed, failed, load_role, ok, skipped
from ddpfleet.envs import TOS_PLUGIN_PROBE
from ddpfleet.hygiene import mask_url, mask_urls
from ddpfleet.shell import sh

ORDER = 30  # before conda_env, which makes its envs with this conda
SECTION = "miniconda"
FLAVORS = ("miniconda", "miniforge")
TOS_CHANNELS = ("https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r")
TOS_MARKER = "conda-meta/.ddpfleet-tos-accepted"
TOS_HINT = (
    "set `miniconda: {accept_tos: true}` to accept Anaconda's Terms of Service for "
    "repo.anaconda.com, or `miniconda: {flavor: miniforge}` for conda-forge, which needs no consent"
)

# $1 prefix, $2 the verified installer's path. The installer is only hashed when conda does
# not work, so a converged node pays for one `conda --version`.
PROBE = (
    r"""
p=$1 f=$2
if v=$("$p/bin/conda" --version 2>/dev/null); then
  echo "conda=$v"
else
  if [ -e "$p" ]; then
    echo prefix=1
    [ -z "$(ls -A "$p" 2>/dev/null)" ] && echo empty=1
    for m in conda-meta _conda pkgs condabin bin/conda; do
      [ -e "$p/$m" ] && { echo conda_like=1; break; }
    done
  fi
  [ -f "$f" ] && echo "installer=$(sha256sum "$f" | cut -c1-64)"
  if command -v curl >/dev/null; then echo fetch=curl
  elif command -v wget >/dev/null; then echo fetch=wget; fi
fi
[ -f "$p/conda-meta/.ddpfleet-tos-accepted" ] && echo tos=1
"""
    + TOS_PLUGIN_PROBE
    + """
true
"""
)

# $1 the fetched file, $2 where the verified installer goes, $3 the expected SHA-256.
VERIFY = r"""
got=$(sha256sum "$1" | cut -c1-64)
if [ "$got" != "$3" ]; then rm -f "$1"; echo "$got"; exit 5; fi
mv -f "$1" "$2"
"""

# $1 the expected SHA-256, $2 the installer, then its arguments. Checked and run in one command:
# the file bash runs is the one just checked, with no second round trip to swap it in between.
INSTALL = r"""
sum=$1; shift
printf '%s  %s\n' "$sum" "$1" | sha256sum -c --status - || {
  echo "sha256 of $1 is not $sum: not run" >&2; exit 5; }
exec bash "$@"
"""


def applies(cfg: Mapping[str, Any], host) -> bool:
    """Only for python_env.manager: conda (the conda_env role's setting)."""
    return load_role("conda_env").config(host.inventory, host.node)["manager"] == "conda"


class Installer:
    """Which installer, where it comes from, and the hash it must have."""

    def __init__(self, source: str, sha256: str, root: Path):
        self.sha256 = str(sha256).strip().lower()
        self.url = source if re.match(r"https?://", source) else ""
        self.path = None if self.url else (root / Path(source).expanduser())
        self.name = source.rstrip("/").rsplit("/", 1)[-1]

    @property
    def where(self) -> str:
        """For reasons and errors: a URL's password masked."""
        return mask_url(self.url) if self.url else str(self.path)


def installer_for(cfg: Mapping[str, Any], arch: str, root: Path) -> Installer | str:
    """The installer the settings ask for, or why they cannot work (said before any change)."""
    flavor = cfg["flavor"]
    if flavor not in FLAVORS:
        return f"miniconda.flavor: {flavor!r} is not one of {', '.join(FLAVORS)}"
    if cfg["installer"]:
        found = Installer(str(cfg["installer"]), cfg["sha256"] or "", root)
    else:
        pin = (cfg["pins"] or {}).get(flavor, {}).get(arch)
        if not pin:
            return (
                f"no pinned {flavor} installer for {arch}: set miniconda.installer and "
                "miniconda.sha256 (from the release's published hashes)"
            )
        found = Installer(pin["url"], pin["sha256"], root)
    if not re.fullmatch(r"[0-9a-f]{64}", found.sha256):
        return (
            f"miniconda.sha256 must be the installer's 64-hex-digit SHA-256 "
            f"(sha256sum {found.name}), got {found.sha256 or 'nothing'}"
        )
    if re.search(r"[\s\x00-\x1f\x7f]", found.url):  # it goes into curl's config, a line
        return f"miniconda.installer: {found.where!r} has spaces or control characters"
    if found.path is not None and not found.path.is_file():
        return f"miniconda.installer: {found.path} not found on the controller"
    return found


# -- apply -------------------------------------------------------------------------------------


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    installer = installer_for(cfg, host.facts.get("arch", ""), host.inventory.root)
    if isinstance(installer, str):
        yield failed("installer", installer)
        return
    prefix = cfg["prefix"]
    remote = f"{cfg['download_dir']}/{installer.name}"
    state = host.probe(sh(PROBE, prefix, remote))
    if state.get("conda"):
        yield ok("install", f"{state['conda']} at {prefix}")
        yield _tos(host, cfg, state)
        return
    if state.get("prefix") and not (state.get("conda_like") or state.get("empty")):
        yield failed(
            "install",
            f"{prefix} exists and is not a conda install: move it away or set miniconda.prefix",
        )
        return
    fetched = _fetch(host, installer, remote, state)
    yield fetched
    if fetched.status == "failed":
        return
    installed = _install(host, cfg, remote, state, installer.sha256)
    yield installed
    if installed.status == "failed":
        return
    if not host.check:  # what the installer put there: has its conda the ToS plugin?
        state = host.probe(sh(PROBE, prefix, remote))
    yield _tos(host, cfg, state)


def _fetch(host, installer: Installer, remote: str, state: Mapping[str, str]) -> Step:
    if state.get("installer") == installer.sha256:
        return ok("installer", f"{remote} already on the node (sha256 ok)")
    how = "upload" if installer.path else "download"
    return host.changed(
        "installer",
        f"{how} {installer.where} and check its sha256",
        lambda: _send(host, installer, remote, state, how),
    )


def _send(host, installer: Installer, remote: str, state: Mapping[str, str], how: str) -> Step:
    part = remote + ".part"
    host.change(["mkdir", "-p", remote.rsplit("/", 1)[0]])
    if installer.path is not None:
        _upload(host, installer.path, part)
    else:
        problem = _download(host, installer.url, part, state.get("fetch", ""))
        if problem:
            return failed("installer", problem)
    result = host.change(sh(VERIFY, part, remote, installer.sha256), check=False)
    if not result.ok:
        return failed(
            "installer",
            f"sha256 mismatch for {installer.name}: expected "
            f"{installer.sha256}, got {result.stdout.strip()}; deleted it on the node, "
            "nothing was run. Check miniconda.sha256 and the installer",
        )
    return changed("installer", f"{how}ed {installer.where} to {remote}; sha256 ok")


def _download(host, url: str, part: str, tool: str) -> str:
    """Fetch on the node; '' when done, else why (nodes often have no route out). The URL goes on
    stdin, never the argv: it may carry credentials, and an argv is visible in ps on the node."""
    if tool == "wget":
        argv, stdin = ["wget", "-q", "-O", part, "-i", "-"], url + "\n"
    elif tool == "curl":
        quoted = url.replace("\\", "\\\\").replace('"', '\\"')  # curl's config syntax
        argv = ["curl", "-fsSL", "--retry", "3", "-o", part, "-K", "-"]
        stdin = f'url = "{quoted}"\n'
    else:
        return (
            "neither curl nor wget on the node: install one, or set miniconda.installer "
            "to a controller path to upload it"
        )
    result = host.change(argv, stdin=stdin, check=False, timeout=1800)
    if result.ok:
        return ""
    host.change(["rm", "-f", part])
    tail = mask_urls((result.stderr or result.stdout).strip()[-200:])
    return (
        f"{tool} could not download {mask_url(url)} on the node (exit {result.exit_code}: "
        f"{tail}); "
        "for nodes without internet set miniconda.installer to a file on the controller, "
        "which is uploaded"
    )


def _upload(host, local: Path, remote: str) -> None:
    """Streamed over the node's SFTP channel (an installer is ~100 MB)."""
    host.on_progress(f"upload {local.name}")
    if host.sudo:  # SFTP is the login user's: through a private temp dir, installed as root
        rootfiles.install_file(host.conn, local, remote)
    else:
        host.conn.sftp().put(str(local), remote)


def _install(
    host, cfg: Mapping[str, Any], remote: str, state: Mapping[str, str], sha256: str
) -> Step:
    prefix = cfg["prefix"]
    repair = bool(state.get("prefix"))
    why = (
        f"{prefix} is half-installed (bin/conda missing or broken): ran the installer "
        "with -u over it"
        if repair
        else f"installed into {prefix}"
    )
    return host.changed(
        "install",
        f"run bash {remote} -b -p {prefix}" + (" -u (half-installed prefix)" if repair else ""),
        lambda: _run_installer(host, prefix, remote, sha256, repair, why),
    )


def _run_installer(host, prefix: str, remote: str, sha256: str, repair: bool, why: str) -> Step:
    host.change(
        sh(INSTALL, sha256, remote, "-b", "-p", prefix, *(["-u"] if repair else [])), timeout=1800
    )
    check = host.run([f"{prefix}/bin/conda", "--version"], check=False)
    if not check.ok:
        tail = (check.stderr or check.stdout).strip()[-300:]
        return failed(
            "install", f"the installer finished but {prefix}/bin/conda --version fails: {tail}"
        )
    host.change(["rm", "-f", remote])
    return changed("install", f"{check.stdout.strip()}: {why}")


def _tos(host, cfg: Mapping[str, Any], state: Mapping[str, str]) -> Step:
    if cfg["flavor"] == "miniforge":
        return ok("terms of service", "miniforge: conda-forge only, nothing to accept")
    if not cfg["accept_tos"]:
        return skipped(
            "terms of service",
            "not accepted (miniconda.accept_tos is false): "
            f"conda_env will refuse repo.anaconda.com channels; {TOS_HINT}",
        )
    if state.get("tos"):
        return ok("terms of service", "accepted for pkgs/main and pkgs/r (--system)")
    if not state.get("tos_plugin") and not host.check:
        return ok(
            "terms of service",
            "this conda has no ToS plugin (conda-anaconda-tos, conda >= 24.11): nothing to "
            "accept; conda_env uses Anaconda's channels as miniconda.accept_tos says",
        )
    return host.changed(
        "terms of service", "accept for pkgs/main and pkgs/r (--system)", lambda: _accept(host, cfg)
    )


def _accept(host, cfg: Mapping[str, Any]) -> Step:
    conda, notes = f"{cfg['prefix']}/bin/conda", []
    for channel in TOS_CHANNELS:
        argv = [conda, "tos", "accept", "--override-channels", "--channel", channel, "--system"]
        result = host.change(argv, check=False)
        if result.ok:
            continue
        out = result.stderr + result.stdout
        if "No command 'conda tos'" in out or "invalid choice: 'tos'" in out:
            notes = ["this conda has no ToS plugin: nothing to accept"]  # conda < 24.11
            break
        return failed(
            "terms of service", f"conda tos accept --channel {channel} failed: {out.strip()[-300:]}"
        )
    host.put(f"{cfg['prefix']}/{TOS_MARKER}", "\n".join(TOS_CHANNELS) + "\n")
    return changed(
        "terms of service",
        notes[0]
        if notes
        else "accepted for pkgs/main and pkgs/r (--system), as miniconda.accept_tos says",
    )
