"""
Starting the daemon the way an admin does: ``twistd relayd`` is found from
the installed package, and a config mistake stops it at once with one line
saying which file and which key.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.harness import childEnvironment, freePort, relaydConfig

pytestmark = pytest.mark.integration

# Bounded: a daemon that starts despite the bad config is killed and fails the test.
EXIT_DEADLINE = 20


def runTwistd(twistd, cwd, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(twistd), *args], cwd=cwd, capture_output=True,
                              stdin=subprocess.DEVNULL, env=childEnvironment(),
                              timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"twistd {' '.join(args)} was still running after {EXIT_DEADLINE} s; "
            f"stdout: {e.stdout!r} stderr: {e.stderr!r}") from None


def test_plugin_is_installed(twistd, tmp_path):
    result = runTwistd(twistd, tmp_path, "--help")
    assert result.returncode == 0, result
    assert b"relayd" in result.stdout, (
        "`twistd --help` does not list the relayd plugin: is twisted/plugins/relayd_plugin.py "
        "installed into site-packages?\n" + result.stdout.decode(errors="replace"))


def test_bad_config_exits_nonzero_with_one_line_naming_file_and_key(twistd, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        relaydConfig(port=freePort(), spool=tmp_path / "spool", smarthostPort=freePort())
        + "limits:\n  message_size: 10 parsecs\n")
    result = runTwistd(twistd, tmp_path, "-n", "--pidfile=", "relayd", "--config", str(config))
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0, f"exit status 0 for a bad config; stderr: {stderr}"
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert str(config) in lines[0], f"the error must name the file: {lines[0]!r}"
    assert "limits.message_size" in lines[0], f"the error must name the key: {lines[0]!r}"


def test_missing_config_option_exits_nonzero(twistd, tmp_path):
    result = runTwistd(twistd, tmp_path, "-n", "--pidfile=", "relayd")
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, f"exit status 0 without --config:\n{output}"
    assert "--config" in output, f"the message must say --config is needed:\n{output}"


def test_relayd_version_is_the_installed_packages(twistd, tmp_path):
    import json

    result = subprocess.run([str(twistd.parent / "relayd"), "--version"], capture_output=True,
                            text=True, cwd=tmp_path, env=childEnvironment(), timeout=EXIT_DEADLINE)
    # What pip installed, as pip itself reports it.
    installed = subprocess.run([str(twistd.parent / "python"), "-m", "pip", "list", "--format=json",
                                "--disable-pip-version-check"], capture_output=True, text=True,
                               env=childEnvironment(), timeout=120)
    version = {p["name"]: p["version"] for p in json.loads(installed.stdout)}["relayd"]
    assert (result.returncode, result.stdout, result.stderr) == (0, f"relayd {version}\n", "")


PLUGIN_CACHE = 'python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"'


def test_readme_and_unit_rewrite_the_plugin_cache_after_every_install_and_upgrade():
    # A stale cache after an upgrade: the daemon (user relayd) cannot
    # rewrite it and twistd logs "Unable to write to plugin cache ... 13".
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.rst").read_text()
    production = readme.split("Installing for production\n=====", 1)[1].split("\n=====", 1)[0]
    commands = [l.strip() for l in production.splitlines()
                if l.startswith("    ") and not l.strip().startswith("#")]
    installs = [i for i, c in enumerate(commands) if "pip install" in c]
    assert installs, "no pip install in the README's production steps"
    for i in installs:
        assert PLUGIN_CACHE in commands[i + 1], f"after {commands[i]!r}: {commands[i + 1]!r}"
    assert "Upgrading\n" in readme, "the README has no upgrade steps"
    upgrade = readme.split("Upgrading\n", 1)[1].split("\n    The ", 1)[0]
    steps = [l.strip() for l in upgrade.splitlines() if l.startswith("        ")]
    installs = [i for i, c in enumerate(steps) if "pip install" in c]
    assert installs, f"no pip install in the upgrade steps: {steps}"
    for i in installs:
        assert PLUGIN_CACHE in steps[i + 1], f"after {steps[i]!r}: {steps[i + 1]!r}"
    unit = (root / "systemd" / "relayd.service").read_text()
    assert PLUGIN_CACHE in unit and "after every install or\n# upgrade" in unit


def test_file_limit_too_low_for_the_config_refuses_to_start(twistd, tmp_path):
    """
    Started under a hard RLIMIT_NOFILE of 256, a config whose connections
    need more exits at once with one line saying so, before listening.
    """
    import resource

    port = freePort()
    config = tmp_path / "relayd.yaml"
    config.write_text(
        relaydConfig(port=port, spool=tmp_path / "spool", smarthostPort=freePort())
        + "limits:\n  connections: 100\n")

    def lowLimit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    try:
        result = subprocess.run(
            [str(twistd), "-n", "--pidfile=", "relayd", "--config", str(config)], cwd=tmp_path,
            capture_output=True, stdin=subprocess.DEVNULL, env=childEnvironment(),
            timeout=EXIT_DEADLINE, preexec_fn=lowLimit)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"relayd started under a file limit of 256: {e.stderr!r}") from None
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert lines == [
        f"relayd: {config}: limits.connections: 100 connections (with delivery.concurrency 20) "
        "need 485 open files (64 + listeners + 3 x connections + 6 x concurrency), but the file "
        "limit (RLIMIT_NOFILE) is 256; raise LimitNOFILE= in the systemd unit (or ulimit -n), "
        "or lower limits.connections"], stderr


def test_readme_creates_the_relayd_user_without_a_login_shell():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.rst").read_text()
    useradd = [l.strip() for l in readme.splitlines() if l.strip().startswith("useradd ")]
    assert useradd, "the README creates no relayd user"
    for line in useradd:
        assert "--system" in line and "--shell /usr/sbin/nologin" in line, line
