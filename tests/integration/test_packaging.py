"""
Installing from a checkout, as the README's production steps do: the
checkout is left as it was (no build/, no *.egg-info), and a stale build
directory cannot put a deleted module back into the package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.harness import childEnvironment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_pip_from_a_checkout_leaves_no_build_directory(tmp_path):
    checkout = tmp_path / "relayd"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".git"))
    # What an older setuptools build leaves behind: a module deleted since.
    stale = checkout / "build" / "lib" / "relayd"
    stale.mkdir(parents=True)
    (stale / "deleted_since.py").write_text("raise ImportError('stale')\n")
    before = sorted(p.relative_to(checkout) for p in checkout.rglob("*"))

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--quiet", "-w", str(tmp_path / "wheels"), str(checkout)],
        capture_output=True, text=True, timeout=600, env=childEnvironment())
    assert result.returncode == 0, result.stdout + result.stderr

    after = sorted(p.relative_to(checkout) for p in checkout.rglob("*"))
    assert after == before, f"the build wrote into the checkout: {sorted(set(after) - set(before))}"
    [wheel] = (tmp_path / "wheels").glob("relayd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "relayd/server.py" in names and "twisted/plugins/relayd_plugin.py" in names
    assert "relayd/deleted_since.py" not in names


SECURITY_EXPOSURE = 3.4  # systemd-analyze security of the unit before Type=notify; never worse


def _analyzable(tmp_path: Path) -> Path:
    """The unit with its programs pointed at /bin/true: verify checks that they exist."""
    unit = (ROOT / "systemd" / "relayd.service").read_text()
    for program in ("twistd", "relayctl"):
        unit = unit.replace(f"/opt/relayd/venv/bin/{program}", "/bin/true")
    path = tmp_path / "relayd.service"
    path.write_text(unit)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_the_unit_verifies_cleanly_and_is_no_less_hardened(tmp_path):
    unit = _analyzable(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))
    assert exposure <= SECURITY_EXPOSURE, result.stdout


def test_the_unit_waits_for_ready_feeds_a_watchdog_and_reloads_through_relayctl():
    settings = {}
    for line in (ROOT / "systemd" / "relayd.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"]
    assert settings["ExecReload"].endswith("/bin/relayctl -c /etc/relayd/relayd.yaml reload")
