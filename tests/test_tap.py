"""tap.py's reload: what a SIGHUP changes at once, what waits for a restart, what a bad file keeps."""

from __future__ import annotations

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


AUTH_CONFIG = """\
hostname: relay.example
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: none, auth: required, plaintext_auth: true}}
auth:
  password_file: {passwd}
  senders: {{alice: ["alice@example.com"], printer: ["@example.com"]}}
queue: {{directory: spool}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 2526, tls: none}}]
"""


def test_start_and_reload_warn_about_unusable_entries_and_dead_senders(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "printer:$2y$05$F9e6KRzYAKXoytB07fLqaebMseKE5q3Wl6hZeqIeR6qK5olCQybd.\n"
        "bob:$apr1$VnCaeS6Y$9dUCrUPqfYNL8SBOnqYw./\n"
        "alice@example.com:{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=\n")
    path = tmp_path / "relayd.yaml"
    path.write_text(AUTH_CONFIG.format(passwd=passwd))
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
        started = list(lines)
        del lines[:]
        relay.reload()
    finally:
        globalLogPublisher.removeObserver(observer)
    expected = [
        f"warning: auth.password_file {passwd}: line 2: bob: apr1 (htpasswd -m) is not "
        "supported, so bob can never log in; reset with relayd-passwd add bob",
        f"warning: auth.password_file {passwd}: line 3: alice@example.com: {{SHA}} (htpasswd -s) "
        "is not supported, so alice@example.com can never log in; reset with relayd-passwd add "
        "alice@example.com",
        f"warning: auth.senders.alice: {passwd} has no login 'alice', so this entry never applies",
    ]
    assert [l for l in started if "warning" in l] == expected
    assert [l for l in lines if "warning" in l] == expected
    assert "VnCaeS6Y" not in "".join(started + lines)


def test_password_file_edited_while_running_is_warned_about_when_reread(tmp_path):
    from relayd.auth import RECHECK_INTERVAL

    passwd = tmp_path / "passwd"
    passwd.write_text("printer:$2y$05$F9e6KRzYAKXoytB07fLqaebMseKE5q3Wl6hZeqIeR6qK5olCQybd.\n")
    path = tmp_path / "relayd.yaml"
    path.write_text(AUTH_CONFIG.format(passwd=passwd).replace(
        'senders: {alice: ["alice@example.com"], printer: ["@example.com"]}',
        'senders: {printer: ["@example.com"]}'))

    class Reactor:
        """Runs callFromThread at once (the test is the only thread)."""

        def callFromThread(self, f, *args):
            f(*args)

        def __getattr__(self, name):
            return getattr(reactor, name)

    relay = tap.makeService({"loaded": config.load(str(path))}, Reactor())
    # An admin adds bob with htpasswd -m while the daemon runs.
    passwd.write_text(passwd.read_text() + "bob:$apr1$VnCaeS6Y$9dUCrUPqfYNL8SBOnqYw./\n")
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        relay.passwords._checked -= RECHECK_INTERVAL  # a second later: the next AUTH re-reads it
        relay.passwords.lookup("bob")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert lines == [f"warning: auth.password_file {passwd}: line 2: bob: apr1 (htpasswd -m) is not "
                     "supported, so bob can never log in; reset with relayd-passwd add bob"]
