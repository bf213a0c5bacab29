"""
Installing from a checkout, as the README's production steps do: the
checkout is left as it was (no build/, no *.egg-info), and a stale build
directory cannot put a deleted module back into the package.
"""

from __future__ import annotations

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
