"""miniconda: node state in (one probe's answer), steps and commands out."""

from __future__ import annotations

import hashlib
from types import MappingProxyType, SimpleNamespace

import pytest

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from tests.roles.fakehost import FACTS, FakeHost, apply

ROLE = load_role("miniconda").module
PINS = load_role("miniconda").defaults["pins"]
PREFIX = "/opt/miniconda3"
URL = PINS["miniconda"]["x86_64"]["url"]
SHA = PINS["miniconda"]["x86_64"]["sha256"]
NAME = URL.rsplit("/", 1)[-1]


def installs(remote: str, *flags: str, sha: str = SHA) -> str:
    """The install command: the sha256 check and `bash installer` in one node command."""
    return ROLE.sh(ROLE.INSTALL, sha, remote, "-b", "-p", PREFIX, *flags)


REMOTE = f"/var/cache/ddpfleet/{NAME}"
CONVERGED = {"conda": "conda 24.9.2"}
FRESH = {"fetch": "curl"}


def text(state: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in state.items())


def node(
    state: dict[str, str], check=False, verify=(0, ""), facts=FACTS, tos=(0, ""), root=None
) -> FakeHost:
    return FakeHost(
        answers=[
            (r"ddpfleet-tos-accepted", 0, text(state)),  # the probe
            (r"sha256sum \"\$1\"", verify[0], verify[1]),  # VERIFY
            (r"bin/conda --version", 0, "conda 24.9.2\n"),
            (r"bin/conda tos accept", tos[0], tos[1]),
        ],
        facts=facts,
        check=check,
        inventory=SimpleNamespace(root=root or "/nonexistent"),
    )


def run(h: FakeHost, **cfg):
    steps, _ = apply("miniconda", h, **cfg)
    return [(s.name, s.status) for s in steps], steps


def test_converged_node_costs_one_probe_and_changes_nothing():
    h = node(CONVERGED)
    statuses, steps = run(h)
    assert statuses == [("install", "ok"), ("terms of service", "skipped")]
    assert steps[0].reason == f"conda 24.9.2 at {PREFIX}"
    assert h.changes == [] and h.written == {} and len(h.ran) == 1


def test_converged_with_consent_given_is_all_ok():
    h = node({**CONVERGED, "tos": "1"})
    statuses, _ = run(h, accept_tos=True)
    assert statuses == [("install", "ok"), ("terms of service", "ok")]
    assert h.changes == []


def test_fresh_node_downloads_verifies_then_installs():
    h = node(FRESH)
    statuses, steps = run(h)
    assert statuses == [
        ("installer", "changed"),
        ("install", "changed"),
        ("terms of service", "skipped"),
    ]
    assert h.changes[0] == "mkdir -p /var/cache/ddpfleet"
    # The URL on stdin as curl config, not on the argv (ps on the node shows argvs to all).
    assert h.changes[1] == f"curl -fsSL --retry 3 -o {REMOTE}.part -K -"
    assert h.stdin[h.changes[1]] == f'url = "{URL}"\n'
    assert "sha256sum" in h.changes[2] and SHA in h.changes[2]
    assert h.changes[3] == installs(REMOTE)
    assert "sha256sum -c" in h.changes[3] and 'exec bash "$@"' in h.changes[3]
    assert h.changes[4] == f"rm -f {REMOTE}"
    assert steps[1].reason == f"conda 24.9.2: installed into {PREFIX}"


def test_wget_when_the_node_has_no_curl():
    h = node({"fetch": "wget"})
    run(h)
    assert h.changes[1] == f"wget -q -O {REMOTE}.part -i -"
    assert h.stdin[h.changes[1]] == URL + "\n"


def test_failed_download_points_at_uploading_from_the_controller():
    h = node(FRESH)
    h.answers.insert(0, (r"^curl ", 7, "curl: (7) Failed to connect"))
    statuses, steps = run(h)
    assert statuses == [("installer", "failed")]
    assert "miniconda.installer" in steps[0].reason and "exit 7" in steps[0].reason
    assert h.changes[-1] == f"rm -f {REMOTE}.part"
    assert not any("exec bash" in c for c in h.changes)


def test_checksum_mismatch_refuses_before_executing_anything():
    h = node(FRESH, verify=(5, "0" * 64 + "\n"))
    statuses, steps = run(h)
    assert statuses == [("installer", "failed")]
    assert not any("exec bash" in c for c in h.changes)
    verify = h.changes[-1]
    assert 'rm -f "$1"' in verify  # the script deletes the file on a mismatch
    assert f"expected {SHA}, got {'0' * 64}" in steps[0].reason
    assert "nothing was run" in steps[0].reason


def test_local_installer_is_uploaded_not_downloaded(tmp_path):
    local = tmp_path / "Miniconda3-standin.sh"
    local.write_bytes(b"#!/bin/sh\necho hi\n")
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    h = node(FRESH, root=tmp_path)
    statuses, _ = run(h, installer="Miniconda3-standin.sh", sha256=sha)
    remote = "/var/cache/ddpfleet/Miniconda3-standin.sh"
    assert h.written[f"{remote}.part"] == local.read_bytes()
    assert not any("curl" in c or "wget" in c for c in h.changes)
    assert installs(remote, sha=sha) in h.changes
    assert statuses[0] == ("installer", "changed")


def test_installer_setting_without_sha256_is_refused_before_the_node_is_asked(tmp_path):
    h = node(FRESH, root=tmp_path)
    statuses, steps = run(h, installer="https://example.org/Miniconda3-x.sh")
    assert statuses == [("installer", "failed")]
    assert "miniconda.sha256" in steps[0].reason and h.ran == []


def test_arch_without_a_pin_names_the_settings_to_use():
    h = node(FRESH, facts=MappingProxyType({**FACTS, "arch": "ppc64le"}))
    statuses, steps = run(h)
    assert statuses == [("installer", "failed")]
    assert "no pinned miniconda installer for ppc64le" in steps[0].reason


def test_aarch64_gets_the_pinned_miniconda_2492():
    h = node(FRESH, facts=MappingProxyType({**FACTS, "arch": "aarch64"}))
    run(h)
    url = "https://repo.anaconda.com/miniconda/Miniconda3-py310_24.9.2-0-Linux-aarch64.sh"
    assert any(url in c for c in h.ran + list(h.stdin.values())), h.ran
    assert any("5d022f16ecb01d33ac8c85a87a0a8dccfb025dc90b20dbd56c4b9ae8f9727578" in c
               for c in h.ran)  # fmt: skip


def test_installer_already_on_the_node_is_not_fetched_again():
    h = node({**FRESH, "installer": SHA})
    statuses, _ = run(h)
    assert statuses[0] == ("installer", "ok")
    assert not any("curl" in c for c in h.changes)


@pytest.mark.parametrize("marker", ["conda_like", "empty"])
def test_half_installed_prefix_is_repaired_with_u(marker):
    h = node({**FRESH, "prefix": "1", marker: "1"})
    statuses, steps = run(h)
    assert ("install", "changed") in statuses
    assert installs(REMOTE, "-u") in h.changes
    assert "half-installed" in steps[1].reason


def test_a_prefix_that_is_not_conda_is_left_alone():
    h = node({**FRESH, "prefix": "1"})
    statuses, steps = run(h)
    assert statuses == [("install", "failed")]
    assert "not a conda install" in steps[0].reason and h.changes == []


def test_no_tos_consent_unless_asked():
    h = node(FRESH)
    statuses, steps = run(h)
    assert ("terms of service", "skipped") in statuses
    assert not any("tos accept" in c for c in h.changes)
    assert "accept_tos: true" in steps[-1].reason and "flavor: miniforge" in steps[-1].reason


def test_consent_accepts_both_channels_system_wide_once():
    h = node({"conda": "conda 25.5.1", "tos_plugin": "1"})  # a conda with the ToS plugin
    statuses, _ = run(h, accept_tos=True)
    assert statuses[-1] == ("terms of service", "changed")
    base = f"{PREFIX}/bin/conda tos accept --override-channels --channel"
    assert [c for c in h.changes if "tos accept" in c] == [
        f"{base} https://repo.anaconda.com/pkgs/main --system",
        f"{base} https://repo.anaconda.com/pkgs/r --system",
    ]
    assert f"{PREFIX}/conda-meta/.ddpfleet-tos-accepted" in h.written


def test_conda_without_the_tos_plugin_has_nothing_to_accept():
    """The pinned 24.9.2 has no `conda tos` (argparse's invalid choice): detected from
    conda-meta, not by running it and reading the error."""
    h = node(CONVERGED)  # the probe found no conda-anaconda-tos in conda-meta
    statuses, steps = run(h, accept_tos=True)
    assert statuses[-1] == ("terms of service", "ok")
    assert "no ToS plugin" in steps[-1].reason
    assert not any("tos" in c for c in h.ran[1:]) and h.written == {}


def test_a_fresh_install_is_probed_again_for_the_tos_plugin():
    h = node(FRESH)
    statuses, _ = run(h, accept_tos=True)
    probes = [c for c in h.ran if "conda-anaconda-tos" in c]
    assert len(probes) == 2  # before the install, and after it: what did the installer bring?
    assert statuses[-1] == ("terms of service", "ok")


def test_a_plugin_that_fails_to_accept_says_so():
    h = node({"conda": "conda 25.5.1", "tos_plugin": "1"}, tos=(1, "CondaHTTPError: HTTP 000"))
    statuses, steps = run(h, accept_tos=True)
    assert statuses[-1] == ("terms of service", "failed") and "HTTP 000" in steps[-1].reason


def test_miniforge_uses_its_pin_and_needs_no_consent():
    h = node(FRESH)
    statuses, _ = run(h, flavor="miniforge", accept_tos=True)
    assert PINS["miniforge"]["x86_64"]["url"] in h.stdin[h.changes[1]]
    assert statuses[-1] == ("terms of service", "ok")
    assert not any("tos" in c for c in h.changes)


def test_unknown_flavor_is_refused():
    statuses, steps = run(node(FRESH), flavor="anaconda")
    assert statuses == [("installer", "failed")] and "miniforge" in steps[0].reason


def test_check_reports_what_would_change_and_changes_nothing():
    h = node(FRESH, check=True)
    statuses, steps = run(h, accept_tos=True)
    assert statuses == [
        ("installer", "changed"),
        ("install", "changed"),
        ("terms of service", "changed"),
    ]
    assert all(s.reason.startswith("would") for s in steps)
    assert h.changes == [] and h.written == {} and len(h.ran) == 1


def test_applies_only_to_the_conda_manager(tmp_path):
    (tmp_path / "inventory.yaml").write_text(
        "python_env: {manager: venv}\nnodes:\n  node0: {host: 10.9.0.10}\n"
    )
    venv = inv.load(tmp_path / "inventory.yaml", check_files=False)
    for inventory, expected in ((venv, False),):
        h = SimpleNamespace(inventory=inventory, node=inventory.nodes[0])
        assert ROLE.applies({}, h) is expected
    (tmp_path / "inventory.yaml").write_text("nodes:\n  node0: {host: 10.9.0.10}\n")
    conda = inv.load(tmp_path / "inventory.yaml", check_files=False)
    assert ROLE.applies({}, SimpleNamespace(inventory=conda, node=conda.nodes[0])) is True


def test_installer_url_credentials_stay_off_the_argv_and_out_of_reasons():
    url = "https://u:SECRET@mirror.example/Miniconda3-standin.sh"
    h = node(FRESH)
    h.answers.insert(0, (r"^curl ", 22, f"curl: (22) {url}: 404"))
    statuses, steps = run(h, installer=url, sha256=SHA)
    assert statuses == [("installer", "failed")]
    assert not [c for c in h.changes if "SECRET" in c]
    assert "SECRET" not in steps[0].reason and "u:***@mirror.example" in steps[0].reason
    assert "SECRET" in next(iter(h.stdin.values()))  # curl still gets it, on stdin


def test_installer_url_with_a_newline_is_refused_before_anything_runs():
    h = node(FRESH)
    statuses, steps = run(h, installer="https://x/a.sh\noutput = /etc/passwd", sha256=SHA)
    assert statuses == [("installer", "failed")]
    assert "control characters" in steps[0].reason and h.ran == []
