"""tap.py's reload: what a SIGHUP changes at once, what waits for a restart, what a bad file keeps."""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

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


def reloadNow(relay):
    """relay.reload() with its reading done inline (no thread pool runs here); its outcome."""
    relay.readInThread = lambda f, *args: defer.maybeDeferred(f, *args)
    outcomes = []
    relay.reload().addBoth(outcomes.append)
    [outcome] = outcomes
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


def reloadLines(relay):
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        reloadNow(relay)
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


def test_relayctl_sees_the_sessions_throttle_and_a_reload_keeps_its_blocks(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    throttle = relay.factory.authThrottle
    assert relay.namedServices["control"].throttle is throttle
    while throttle.failed("192.0.2.4") is None:
        pass
    blocks = throttle.blockedClients()
    reloadLines(relay)
    assert relay.factory.authThrottle is throttle and throttle.blockedClients() == blocks


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
        reloadNow(relay)
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


def test_with_several_processes_the_master_serves_the_metrics_of_every_worker(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    path.write_text(path.read_text() + "processes: 2\nmetrics: {}\n")
    relay = tap.makeService({"loaded": config.load(str(path))})
    assert "metrics" in relay.namedServices
    # The workers' batches are applied to the registry the page shows.
    assert relay.workers.metrics is relay.namedServices["metrics"].metrics


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
        reloadNow(relay)
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


# -- one reload path --------------------------------------------------------------------

EVERY_COMPONENT = """\
hostname: {hostname}
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: starttls, auth: required}}
tls: {{certificate: {cert}, key: {key}}}
auth:
  password_file: {passwd}
  senders: {{printer: ["{sender}"]}}
  cache: {cache}
limits: {{client_name_timeout: {nameTimeout}, recipients: {recipients}}}
queue: {{directory: spool, retry: {{min: {retryMin}, max: 1h}}}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 2526, username: relay, password_file: {secret}}}]
  timeouts: {{mail: {mailTimeout}}}
  dns: {{servers: ["{dnsServer}"]}}
"""


def _reachable(root):
    """Every relayd object reachable from ``root`` through attributes, containers and closures."""
    seen, found, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method
            todo.append(obj.__self__)
        elif callable(obj) and getattr(obj, "__closure__", None):
            todo.extend(cell.cell_contents for cell in obj.__closure__)
        elif type(obj).__module__.startswith("relayd") and hasattr(obj, "__dict__"):
            found.append(obj)
            todo.extend(vars(obj).values())
    return found


def _sections(loaded):
    """The config and every section object in it (the listeners aside: a restart applies them)."""
    found, todo = [], [loaded]
    while todo:
        obj = todo.pop()
        if isinstance(obj, config.Listener) or obj is loaded.listeners:
            continue
        found.append(obj)
        for attribute, _ in config.keysOf(type(obj)):
            value = getattr(obj, attribute)
            if isinstance(value, config._Schema):
                todo.append(value)
    return found


def test_sighup_reaches_every_component_that_holds_settings(tmp_path):
    """
    Every object makeService builds that can be reconfigured is in the
    Relay's one reload list, a reload changes what each of them uses, and
    afterwards nothing in the daemon still holds the old configuration.
    """
    from tests.test_tls import writeChain

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _, cert1, key1 = writeChain(tmp_path / "one")
    _, cert2, key2 = writeChain(tmp_path / "two", name="two.example")
    printer = "printer:$2y$05$F9e6KRzYAKXoytB07fLqaebMseKE5q3Wl6hZeqIeR6qK5olCQybd.\n"
    (tmp_path / "passwd1").write_text(printer)
    (tmp_path / "passwd2").write_text(printer)
    (tmp_path / "secret1").write_text("first\n")
    (tmp_path / "secret2").write_text("second\n")
    path = tmp_path / "relayd.yaml"
    one = dict(hostname="one.example", cert=cert1, key=key1, passwd=tmp_path / "passwd1",
               sender="@one.example", cache="0s", nameTimeout="5s", recipients=100,
               retryMin="5m", secret=tmp_path / "secret1", mailTimeout="5m",
               dnsServer="127.0.0.1:5301")
    two = dict(hostname="two.example", cert=cert2, key=key2, passwd=tmp_path / "passwd2",
               sender="@two.example", cache="1m", nameTimeout="2s", recipients=7,
               retryMin="1m", secret=tmp_path / "secret2", mailTimeout="7s",
               dnsServer="127.0.0.1:5302")
    path.write_text(EVERY_COMPONENT.format(**one))
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    old = relay.config

    reconfigurable = [o for o in _reachable(relay) if callable(getattr(o, "reconfigure", None))]
    assert {type(o).__name__ for o in reconfigurable} >= {
        "SubmissionFactory", "Scheduler", "ServerTLS", "PasswordFile", "Verifier", "Realm",
        "ConfiguredResolver", "ClientNames", "Courier"}
    for component in reconfigurable:
        assert any(component is r for r in relay.reloadable), type(component).__name__

    path.write_text(EVERY_COMPONENT.format(**two))
    assert reloadLines(relay) == [f"reload: configuration {path} applied"]

    components = {type(c).__name__: c for c in relay.reloadable}
    assert components["SubmissionFactory"].config.limits.recipients == 7
    assert components["Scheduler"].settings.queue.retry.min == 60
    assert components["ServerTLS"].certificatePath == cert2
    assert components["PasswordFile"].path == str(tmp_path / "passwd2")
    assert components["Verifier"].cacheSeconds == 60
    assert components["Realm"].sendersFor("printer") == ("@two.example",)
    assert components["ConfiguredResolver"].resolver.servers == [("127.0.0.1", 5302)]
    assert components["ClientNames"].timeout == 2
    courier = components["Courier"]
    assert courier.heloName == "two.example"
    assert courier.timeouts.mail == 7
    assert courier.passwords[str(tmp_path / "secret2")].reveal() == "second"
    # Nothing still reads the settings the reload replaced.
    stale = {id(s) for s in _sections(old)}
    holders = [type(o).__name__ for o in _reachable(relay)
               if any(id(v) in stale for v in vars(o).values())]
    assert holders == []


def test_reload_returns_its_outcome_between_reloading_and_ready(tmp_path):
    """What relayctl reload reports, with RELOADING=1 before and READY=1 after, failed or not."""
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    sent = []

    class Notify:
        def reloading(self):
            sent.append("RELOADING=1")

        def reloaded(self):
            sent.append("READY=1")

    relay.notify = Notify()
    write(path, hostname="two.example")
    assert reloadNow(relay) == (True, f"reload: configuration {path} applied")
    path.write_text(path.read_text() + "no_such_key: 1\n")
    ok, text = reloadNow(relay)
    assert not ok and text.startswith("reload failed, keeping the running configuration: ")
    assert sent == ["RELOADING=1", "READY=1"] * 2


def test_metrics_section_wires_the_page_and_counting(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    path.write_text(path.read_text() + 'metrics: {endpoint: "tcp:0:interface=127.0.0.1"}\n')
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    assert "metrics" in relay.namedServices and "notify" in relay.namedServices
    assert type(relay.scheduler.transport).__name__ == "TimedTransport"
    write(path)
    plain = tap.makeService({"loaded": config.load(str(path))}, reactor)
    assert "metrics" not in plain.namedServices
    assert plain.scheduler.transport is plain.courier


def test_a_metrics_endpoint_change_needs_a_restart(tmp_path):
    path = tmp_path / "relayd.yaml"
    write(path)
    relay = tap.makeService({"loaded": config.load(str(path))}, reactor)
    path.write_text(path.read_text() + "metrics: {}\n")
    assert reloadLines(relay) == [f"reload: configuration {path} applied; metrics changed and "
                                  "need a restart"]
    assert relay.config.metrics is None


def test_eight_spool_calls_can_wait_for_the_disk_at_once():
    """
    A commit holds its spool thread through two waits for the disk: eight
    of them (and removals) wait side by side instead of queueing behind four.
    """
    import threading

    pool, _ = tap._spoolThreads(reactor)
    pool.start()
    try:
        # Each call waits until eight are waiting: fewer threads never get there.
        waiting = threading.Barrier(8, timeout=10)
        met = []
        for _ in range(8):
            pool.callInThread(lambda: met.append(waiting.wait()))
        pool.stop()  # returns once every call has ended
    finally:
        if pool.started:
            pool.stop()
    assert sorted(met) == list(range(8))
