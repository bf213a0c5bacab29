"""tap.py's reload: what a SIGHUP changes at once, what waits for a restart, what a bad file keeps."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from relayd import config, tap

CONFIG = """\
hostname: {hostname}
listeners:
  - {{endpoint: "tcp:{port}:interface=127.0.0.1", tls: none, auth: none}}
queue: {{directory: {spool}, retry: {{min: {retryMin}, max: 1h}}}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 2526, tls: none}}]
"""


def write(path, **values):
    defaults = dict(hostname="one.example", port=2525, spool="spool", retryMin="5m")
    path.write_text(CONFIG.format(**{**defaults, **values}))


def reloadLines(relay):
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        relay.reload()
    finally:
        globalLogPublisher.removeObserver(observer)
    return [l for l in lines if "reload" in l]


def test_reload_applies_live_settings_and_names_what_needs_a_restart(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    spool = relay.config.queue.directory

    write(path, hostname="two.example", retryMin="1m", port=2600, spool="elsewhere")
    lines = reloadLines(relay)

    # Live: the banner and Received name, the HELO name upstream, the retry timing.
    assert relay.factory.config.hostname == "two.example"
    assert relay.courier.heloName == "two.example"
    assert relay.scheduler.settings.queue.retry.min == 60
    # Restart only: the running values stay, and the log says so.
    assert relay.config.queue.directory == spool
    assert relay.config.listeners[0].endpoint == "tcp:2525:interface=127.0.0.1"
    # (The control socket lives in the spool directory by default.)
    assert lines == [f"reload: configuration {path} applied; listeners, queue.directory, "
                     "queue.control_socket changed and need a restart"]
    # A second reload of the same file still reports it: nothing was applied.
    assert reloadLines(relay) == lines


def test_reload_of_a_broken_file_keeps_the_running_configuration(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    running = relay.config
    path.write_text(path.read_text() + "no_such_key: 1\n")
    lines = reloadLines(relay)
    assert relay.config is running and relay.factory.config is running
    assert len(lines) == 1
    assert lines[0].startswith("reload failed, keeping the running configuration: ")
    assert str(path) in lines[0] and "no_such_key" in lines[0]


@pytest.mark.parametrize("addition, problem", [
    ("relay: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested at most"),
    ("limits: {connections: " + "9" * 5000 + "}\n", "a number of 5000 digits"),
    ("shutdown_grace: " + "9" * 5000 + "d\n", "at most 365d"),
])
def test_reload_of_a_hostile_file_is_one_line(tmp_path, addition, problem):
    """
    A file that used to raise (RecursionError, int's digit limit) on SIGHUP
    gives one error line naming the file; the running configuration stays.
    """
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    running = relay.config
    path.write_text(path.read_text() + addition)
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        relay.reload()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert relay.config is running
    assert len(lines) == 1
    assert lines[0].startswith(f"reload failed, keeping the running configuration: {path}: ")
    assert problem in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("listeners, connections, concurrency, needed", [
    (1, 100, 20, 64 + 1 + 300 + 120),   # the defaults: well under the usual 1024
    (3, 100, 20, 64 + 3 + 300 + 120),
    (1, 1, 1, 64 + 1 + 3 + 6),
    (2, 20000, 100, 64 + 2 + 60000 + 600),  # a busy public port 25: LimitNOFILE=65536
])
def test_files_needed_table(listeners, connections, concurrency, needed):
    assert tap.filesNeeded(listeners, connections, concurrency) == needed


INF = -1


@pytest.mark.parametrize("soft, hard, needed, plan", [
    (1024, 524288, 485, (524288, True)),    # systemd's default: soft raised to hard
    (1024, 1024, 485, (1024, True)),
    (1024, 1024, 1025, (1024, False)),      # the hard limit cannot hold it: refuse
    (256, 4096, 4096, (4096, True)),
    (256, 4096, 4097, (4096, False)),
    (1024, INF, 5000, (5000, True)),        # no hard limit: raise the soft one as needed
    (8192, INF, 5000, (8192, True)),
    (INF, INF, 5000, (INF, True)),
])
def test_file_limit_plan_table(soft, hard, needed, plan):
    assert tap.fileLimitPlan(soft, hard, needed, infinity=INF) == plan


def test_start_raises_the_soft_file_limit_to_the_hard_one(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    calls = []
    tap.raiseFileLimit(config.load(str(path)), getrlimit=lambda which: (1024, 65536),
                       setrlimit=lambda which, limits: calls.append((which, limits)))
    import resource
    assert calls == [(resource.RLIMIT_NOFILE, (65536, 65536))]


def test_start_is_refused_when_the_hard_file_limit_is_too_low(tmp_path, capsys):
    path = tmp_path / "relayd.yaml"
    write(path)
    path.write_text(path.read_text() + "limits: {connections: 1000}\n")
    loaded = config.load(str(path))
    with pytest.raises(SystemExit) as info:
        tap.raiseFileLimit(loaded, getrlimit=lambda which: (1024, 2048),
                           setrlimit=lambda which, limits: pytest.fail("must not be called"))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == (
        f"relayd: {path}: limits.connections: 1000 connections (with delivery.concurrency 20) "
        "need 3185 open files (64 + listeners + 3 x connections + 6 x concurrency), but the "
        "file limit (RLIMIT_NOFILE) is 2048; raise LimitNOFILE= in the systemd unit (or "
        "ulimit -n), or lower limits.connections\n")


def test_reload_that_needs_more_files_than_the_limit_is_refused(tmp_path, monkeypatch):
    import resource

    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    running = relay.config
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4096, 4096))
    path.write_text(path.read_text() + "limits: {connections: 2000}\n")
    lines = reloadLines(relay)
    assert relay.config is running
    assert len(lines) == 1
    assert lines[0].startswith(f"reload failed, keeping the running configuration: {path}: "
                               "limits.connections: 2000 connections")
