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
