"""
The process split without processes: two intake workers' sessions
(SubmissionFactory with relayd.worker's RemoteLimits) asking one master
(relayd.master's LimitsOwner behind WorkerLink) over a channel whose
answers arrive only when the test delivers them, so every asynchronous
path of the server runs as it does across real processes.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from relayd import channel, config, server
from relayd.envelope import Envelope, Recipient
from relayd.limits import SessionCounts
from relayd.master import LimitsOwner, Worker, WorkerLink, WorkerPool
from relayd.worker import MasterLink, RemoteLimits, announcedCommit
from tests.test_server_security import Harness as SecurityHarness, plain


class Channel:
    """A worker's link to the master: commands are answered when ``deliver()`` runs."""

    def __init__(self, masterSide: WorkerLink) -> None:
        self.master = masterSide
        self.transport = object()
        self.pending: list = []
        self.sent: list = []

    def callRemote(self, command, **arguments):
        self.sent.append((command, arguments))
        responder = {
            channel.Admit: self.master.admit, channel.Left: self.master.left,
            channel.StartCheck: self.master.startCheck,
            channel.CheckEnded: self.master.checkEnded, channel.Failed: self.master.failed,
            channel.Committing: self.master.committing, channel.Queued: self.master.queued,
        }[command]
        if not command.requiresAnswer:
            self.pending.append((responder, arguments, None))
            return None
        d = defer.Deferred()
        self.pending.append((responder, arguments, d))
        return d

    def deliver(self) -> None:
        while self.pending:
            responder, arguments, d = self.pending.pop(0)
            answer = responder(**arguments)
            if d is not None:
                d.callback(answer)


class FakeScheduler:
    def __init__(self):
        self.envelopes = {}

    def add(self, envelope):
        self.envelopes[envelope.queueId] = envelope


class FakeSpool:
    def __init__(self):
        self.stored = {}

    def load(self, queueId):
        if queueId not in self.stored:
            raise FileNotFoundError(queueId)
        return self.stored[queueId]


class Split:
    """One master and two workers' factories built on SecurityHarness (auth.failure_limit: 3)."""

    def __init__(self, tmp_path, limits=""):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.harnesses = [SecurityHarness(tmp_path, limits=limits) for _ in range(2)]
        cfg = self.harnesses[0].config
        self.owner = LimitsOwner(cfg, self.clock, server._throttleSettings)
        self.broadcasts = []
        self.scheduler = FakeScheduler()
        self.spool = FakeSpool()
        self.pool = WorkerPool(2, None, self.clock, [], lambda: None, self.owner,
                               self.scheduler, self.spool, defer.maybeDeferred)
        self.workers = []
        self.channels = []
        for number, hs in enumerate(self.harnesses, 1):
            worker = Worker(number, self.clock.seconds())
            masterSide = WorkerLink(self.pool, worker)
            worker.link = masterSide
            self.pool.workers[number] = worker
            link = Channel(masterSide)
            limits = RemoteLimits(link, hs.clock, cfg, server._throttleSettings)
            hs.factory = server.SubmissionFactory(
                hs.config, hs.spool, lambda w, e: w.commit(e), hs.queued.append, hs.clock,
                portal=hs.portal, tls=hs.tls, limits=limits)
            self.workers.append(worker)
            self.channels.append(link)
        # Blocks announced by the master reach every worker.
        self.pool.broadcast = self._broadcast
        self.owner.broadcast = self._broadcast

    def _broadcast(self, command, **arguments):
        self.broadcasts.append((command, arguments))
        for hs in self.harnesses:
            throttle = hs.factory.authThrottle
            if command is channel.BlockStarted:
                throttle.block(arguments["address"], arguments["until"])
            elif command is channel.BlockLifted:
                throttle.unblock(arguments["address"])

    def deliver(self):
        for link in self.channels:
            link.deliver()


def connect(hs, peer="192.0.2.50"):
    """A session on ``hs``, connected; its first replies (none until the master answers)."""
    return hs.connect(tls="none", plaintextAuth=True, peer=peer)


@pytest.mark.parametrize("events, total, perClient", [
    # (worker, address, +1 admit / -1 left / 0 worker gone; expected answer)
    ([("a", "x", 1, ""), ("b", "x", 1, ""), ("a", "x", 1, "connections_per_client")], 3, 2),
    ([("a", "x", 1, ""), ("b", "y", 1, ""), ("b", "z", 1, "connections")], 2, 5),
    ([("a", "x", 1, ""), ("a", "x", -1, None), ("b", "x", 1, ""), ("b", "x", 1, "")], 3, 2),
    ([("a", "x", 1, ""), ("a", "y", 1, ""), ("a", None, 0, None), ("b", "x", 1, ""),
      ("b", "y", 1, "")], 2, 1),
    # A left() for a session this worker never had is ignored.
    ([("a", "x", 1, ""), ("b", "x", -1, None), ("b", "x", 1, "connections_per_client")], 5, 1),
])
def test_session_counts(events, total, perClient):
    counts = SessionCounts(total, perClient)
    for worker, addr, change, expected in events:
        if change == 1:
            assert counts.admit(worker, addr) == expected
        elif change == -1:
            counts.left(worker, addr)
        else:
            counts.forget(worker)


def test_connections_per_client_count_across_workers_and_wait_for_the_master(tmp_path):
    split = Split(tmp_path, limits=", connections_per_client: 2")
    first, second = split.harnesses
    assert connect(first) == []  # no banner before the master has answered
    assert first.transport.producerState == "paused"
    split.deliver()
    assert first.take() == ["220 relay.test ESMTP relayd"]
    connect(second)
    split.deliver()
    assert second.take() == ["220 relay.test ESMTP relayd"]
    connect(first)
    split.deliver()
    assert first.take() == ["421 4.7.0 relay.test Error: too many connections "
                            "from your address"]
    assert split.owner.sessions.total == 2


def test_a_session_gone_before_its_admission_is_given_back(tmp_path):
    split = Split(tmp_path)
    hs = split.harnesses[0]
    connect(hs)
    hs.proto.connectionLost(Failure(Exception("gone")))
    split.deliver()  # the answer: admitted; the worker says at once that it has left
    split.deliver()
    assert split.owner.sessions.total == 0
    assert hs.factory.sessions == set()


def test_auth_failures_count_across_workers_and_the_block_reaches_both(tmp_path):
    split = Split(tmp_path)
    first, second = split.harnesses
    for hs, guesses in ((first, 2), (second, 1)):
        for _ in range(guesses):
            connect(hs)
            split.deliver()
            hs.take()
            hs.send(b"EHLO client.test\r\n")
            # Nothing is answered (nor read) until the master has counted the check.
            assert hs.send(b"AUTH PLAIN " + plain("alice@example.com", "wrong") + b"\r\nNOOP\r\n") == []
            split.deliver()  # StartCheck; the password check runs inline
            split.deliver()  # CheckEnded
            out = hs.take()
            assert out[0] == "535 5.7.8 Error: authentication failed: authentication failure"
    # The third failure started the block: 421 after its 535, and in the other worker too.
    assert out[1:] == ["421 4.7.0 relay.test Error: too many failed authentications; "
                       "try again later"]
    assert [c for c, _ in split.broadcasts] == [channel.BlockStarted]
    connect(first)
    split.deliver()
    first.take()
    first.send(b"EHLO client.test\r\n")
    assert first.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n") == [
        "421 4.7.0 relay.test Error: too many failed authentications; try again later"]
    # relayctl unblock, in the master, lifts it in the workers.
    assert split.owner.unblock("192.0.2.50") is True
    assert not first.factory.authThrottle.blocked("192.0.2.50")


def test_checks_in_flight_of_a_dead_worker_are_given_back(tmp_path):
    split = Split(tmp_path)
    owner = split.owner
    worker = split.workers[0]
    link = worker.link
    assert link.admit(address="192.0.2.9") == {"refusal": ""}
    for _ in range(3):  # failure_limit 3: three checks may be in flight at once
        assert link.startCheck(address="192.0.2.9") == {"allowed": True}
    assert split.workers[1].link.startCheck(address="192.0.2.9") == {"allowed": False}
    split.pool.release(worker)
    assert owner.sessions.total == 0
    assert split.workers[1].link.startCheck(address="192.0.2.9") == {"allowed": True}


def test_what_a_dead_worker_was_committing_is_scheduled_if_it_reached_the_spool(tmp_path):
    split = Split(tmp_path)
    worker = split.workers[0]
    committed = Envelope(queueId="K1JT6AX430N2XCS8", sender="a@example.com",
                         recipients=[Recipient(address="b@example.org")], arrival=0.0)
    split.spool.stored[committed.queueId] = committed
    worker.link.committing(queueId=committed.queueId)
    worker.link.committing(queueId="K1JT6AXKM7N3763A")  # died before its commit ended
    split.pool.release(worker)
    assert list(split.scheduler.envelopes) == [committed.queueId]


def test_queued_schedules_once_and_counts_the_login(tmp_path):
    split = Split(tmp_path)
    link = split.workers[1].link
    envelope = Envelope(queueId="K1JT6AY8Y4J9ZVR8", sender="a@example.com",
                        recipients=[Recipient(address="b@example.org")], arrival=0.0)
    split.spool.stored[envelope.queueId] = envelope
    link.queued(queueId=envelope.queueId, login="alice@example.com")
    link.queued(queueId=envelope.queueId, login="alice@example.com")
    assert list(split.scheduler.envelopes) == [envelope.queueId]
    assert len(split.owner.messageRate._recent("alice@example.com")) == 2


def test_the_250_waits_for_the_master_to_know_the_queue_id():
    order = []
    announced = defer.Deferred()
    written = defer.Deferred()

    class Link:
        def committing(self, queueId):
            order.append(("committing", queueId))
            return announced

    commit = announcedCommit(Link(), lambda w, e: written)
    result = commit(None, Envelope(queueId="K1JT6AZ8TFHT9N14", sender="", recipients=[], arrival=0.0))
    result.addCallback(lambda _: order.append("done"))
    written.callback(None)
    assert order == [("committing", "K1JT6AZ8TFHT9N14")]
    announced.callback({})
    assert order[-1] == "done"


def test_a_failed_commit_is_reported_even_when_the_master_knows_the_id():
    written = defer.Deferred()
    commit = announcedCommit(type("L", (), {"committing": lambda self, q: defer.succeed({})})(),
                             lambda w, e: written)
    result = commit(None, Envelope(queueId="K1JT6AZ8TFHT9N14", sender="", recipients=[], arrival=0.0))
    failures = []
    result.addErrback(failures.append)
    written.errback(OSError(28, "No space left on device"))
    assert failures and failures[0].check(OSError)


def test_a_worker_whose_master_is_gone_refuses_and_stops():
    stopped = []
    link = MasterLink(task.Clock(), lost=lambda: stopped.append(True), parse=config.parse)
    cfg = config.parse('hostname: relay.test.example\nlisteners: [{endpoint: "tcp:25", '
                       'tls: none, auth: none}]\nqueue: {directory: /s}\n', "x.yaml")
    link.limits = RemoteLimits(link, task.Clock(), cfg, server._throttleSettings)
    results = []
    link.limits.admission.admit("192.0.2.1").addCallback(results.append)
    link.limits.throttle.startCheck("192.0.2.1").addCallback(results.append)
    assert results == [server.replies.SHUTTING_DOWN, False]


@pytest.mark.parametrize("text, expected", [
    ("auto", "auto"), ("1", 1), ("4", 4),
])
def test_processes_setting(text, expected):
    cfg = config.parse('hostname: relay.test.example\nlisteners: [{endpoint: "tcp:25", '
                       f'tls: none, auth: none}}]\nqueue: {{directory: /s}}\nprocesses: {text}\n', "x.yaml")
    assert cfg.processes == expected


@pytest.mark.parametrize("text", ["0", "65", "two", "1.5", "true"])
def test_processes_setting_refuses(text):
    with pytest.raises(config.ConfigError) as info:
        config.parse('hostname: relay.test.example\nlisteners: [{endpoint: "tcp:25", '
                     f'tls: none, auth: none}}]\nqueue: {{directory: /s}}\nprocesses: {text}\n', "x.yaml")
    assert str(info.value).startswith(
        'x.yaml: processes: expected "auto" or a whole number from 1 to 64, got ')


@pytest.mark.parametrize("processes, cores, expected", [
    ("auto", 2, 2), ("auto", None, 1), ("auto", 256, 64), (1, 8, 1), (3, 1, 3),
])
def test_process_count(processes, cores, expected):
    assert config.processCount(processes, cores) == expected


def test_the_default_is_one_process():
    cfg = config.parse('hostname: relay.test.example\nlisteners: [{endpoint: "tcp:25", '
                       'tls: none, auth: none}]\nqueue: {directory: /s}\n', "x.yaml")
    assert cfg.processes == 1


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def closeStdin(self):
        pass

    def signalProcess(self, name):
        self.signals.append(name)


class SpawningReactor(task.Clock):
    """A clock that records spawned workers and adopted channels."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.adopted = []

    def spawnProcess(self, processProtocol, executable, args, env, childFDs):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((processProtocol, args, childFDs, process))
        return process

    def adoptStreamConnection(self, fd, family, factory):
        self.adopted.append(factory.buildProtocol(None))


def startedPool(tmp_path, logged=None):
    reactor = SpawningReactor()
    reactor.advance(1_800_000_000)
    cfg = SecurityHarness(tmp_path).config
    owner = LimitsOwner(cfg, reactor, server._throttleSettings)
    pool = WorkerPool(2, lambda number, fds: ["python", "-m", "relayd.worker", str(number)],
                      reactor, [], lambda: 7, owner, FakeScheduler(), FakeSpool(),
                      defer.maybeDeferred)
    pool.startService()
    return reactor, pool


def test_a_dead_worker_is_started_again_and_a_stopping_daemon_drains_them(tmp_path):
    from twisted.internet.error import ProcessDone, ProcessTerminated

    reactor, pool = startedPool(tmp_path)
    assert [args[-1] for _, args, _, _ in reactor.spawned] == ["1", "2"]
    # The channel and the spool's lock are inherited at fixed descriptors.
    assert reactor.spawned[0][2][4] == 7
    reactor.advance(60)
    first = reactor.spawned[0][0]
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    reactor.advance(0)
    assert [args[-1] for _, args, _, _ in reactor.spawned] == ["1", "2", "1"]
    assert sorted(pool.workers) == [1, 2]
    stopped = []
    pool.shutdown(30).addCallback(stopped.append)
    assert [p.signals for _, _, _, p in reactor.spawned[1:]] == [["TERM"], ["TERM"]]
    for protocol_, _, _, _ in reactor.spawned[1:]:
        protocol_.processEnded(Failure(ProcessDone(0)))
    assert stopped == [None]
    reactor.advance(60)
    assert len(reactor.spawned) == 3  # none started during the stop


def test_a_worker_whose_reactor_stops_answering_is_killed(tmp_path):
    reactor, pool = startedPool(tmp_path)
    for link in reactor.adopted:
        link.transport = object()
        link.callRemote = lambda command, **kw: defer.Deferred()  # never answered
    assert pool.alive()
    reactor.pump([2.0] * 16)
    assert [p.signals for _, _, _, p in reactor.spawned] == [["KILL"], ["KILL"]]
    assert not pool.alive()


def test_a_worker_runs_with_the_masters_running_config_not_the_file(tmp_path):
    """A worker started after the file was broken still gets what the master runs."""
    split = Split(tmp_path)
    running = split.harnesses[0].config
    split.pool.config = running
    worker = split.workers[0]
    got = []
    link = MasterLink(task.Clock(), lost=lambda: None, parse=config.parse)
    link.transport = object()
    pages = []

    def callRemote(command, **arguments):
        assert command is channel.RunningConfig
        pages.append(arguments["offset"])
        return defer.succeed(worker.link.runningConfig(**arguments))

    link.callRemote = callRemote
    (tmp_path / "relayd.yaml").write_text("no_such_key: 1\n")
    link.runningConfig().addCallback(got.append)
    assert got[0].limits == running.limits and got[0].listeners == running.listeners
    assert got[0].auth == running.auth and got[0].hostname == running.hostname


def test_running_config_comes_in_pages(tmp_path):
    split = Split(tmp_path)
    split.pool.config = split.harnesses[0].config
    split.pool._configText = "x" * (channel.CONFIG_PAGE * 2 + 5)
    link = split.workers[0].link
    answers = [link.runningConfig(offset=o) for o in (0, channel.CONFIG_PAGE, 2 * channel.CONFIG_PAGE)]
    assert [len(a["text"]) for a in answers] == [channel.CONFIG_PAGE, channel.CONFIG_PAGE, 5]
    assert {a["total"] for a in answers} == {channel.CONFIG_PAGE * 2 + 5}


def test_a_written_message_gets_its_250_when_the_master_is_gone():
    """The next master's recovery schedules it: a 4xx would have the client send it twice."""
    written = defer.Deferred()
    gone = type("L", (), {"committing": lambda self, q: defer.fail(ConnectionError("gone"))})()
    result = announcedCommit(gone, lambda w, e: written)(
        None, Envelope(queueId="K1JT6AZ8TFHT9N14", sender="", recipients=[], arrival=0.0))
    outcomes = []
    result.addBoth(outcomes.append)
    written.callback(None)
    assert outcomes == [None]


def test_a_workers_forwarded_log_events_are_published_in_the_masters_log(tmp_path):
    """
    With twistd --logfile, workers send their events (JSON, a line each) on
    stdout, and the master logs them into its own file: in any pieces,
    with the worker's time and pid; a runaway line is dropped, not kept.
    """
    from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher

    from relayd import master

    reactor, pool = startedPool(tmp_path)
    process = reactor.spawned[0][0]
    events = [{"log_format": "{log_line}", "log_line": f"line {n}", "log_time": 1234.5 + n,
               "log_level": LogLevel.info, "log_namespace": "relayd/smtpd",
               "log_system": "relayd/smtpd#info pid 4242"} for n in range(3)]
    data = b"".join(eventAsJSON(e).encode() + b"\n" for e in events)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        process.childDataReceived(1, data[:7])
        process.childDataReceived(1, data[7:-30])
        assert [e.get("log_line") for e in seen if "log_line" in e] == ["line 0", "line 1"]
        process.childDataReceived(1, data[-30:])
        process.childDataReceived(1, b"x" * (master.MAX_EVENT_LINE + 1))
        process.childDataReceived(1, b"more of the runaway line\n" + data)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    forwarded = [e for e in seen if "log_line" in e]
    assert [e["log_line"] for e in forwarded] == ["line 0", "line 1", "line 2"] * 2
    assert {e["log_system"] for e in forwarded} == {"relayd/smtpd#info pid 4242"}
    # Marked, so the master's metrics leave it to the worker's own batches.
    assert {e["forwarded_from"] for e in forwarded} == {reactor.spawned[0][3].pid}
    assert [e["log_time"] for e in forwarded[:3]] == [1234.5, 1235.5, 1236.5]
    assert forwarded[0]["log_level"] is LogLevel.info
    assert not [e for e in seen if "not a log event" in str(e.get("log_line", e.get("text")))]


def test_workers_forward_their_log_only_for_twistds_logfile():
    from relayd.master import workerCommand

    assert workerCommand("/etc/relayd.yaml", None, "/var/log/relayd.log").forwardsLog
    for logger, logfile in ((None, None), (None, "-"), ("relayd.logformat.syslogSocket", None),
                            ("relayd.logformat.syslogSocket", "/var/log/relayd.log")):
        command = workerCommand("/etc/relayd.yaml", logger, logfile)
        assert not command.forwardsLog
        assert "--log-events" not in command(1, [5])
    argv = workerCommand("/etc/relayd.yaml", None, "/var/log/relayd.log")(1, [5])
    assert "--log-events" in argv and "--logfile" not in argv


# The master does not answer: sessions end in bounded time with a 4xx.


def test_a_session_gets_a_4xx_and_ends_when_the_master_does_not_answer_admit(tmp_path):
    from relayd.worker import ANSWER_TIMEOUT

    split = Split(tmp_path)
    hs = split.harnesses[0]
    assert connect(hs) == []
    hs.clock.advance(ANSWER_TIMEOUT - 0.5)
    assert hs.take() == []
    hs.clock.advance(0.5)
    assert hs.take() == ["421 4.3.0 relay.test Error: temporary failure, try again later"]
    hs.clock.advance(60)
    assert hs.transport.disconnecting
    # The late answer counted a session the worker refused: it is given back.
    split.deliver()
    assert split.owner.sessions.total == 0
    assert hs.factory.sessions == set()


def test_an_auth_check_gets_a_4xx_and_ends_when_the_master_does_not_answer(tmp_path):
    from relayd.worker import ANSWER_TIMEOUT

    split = Split(tmp_path)
    hs = split.harnesses[0]
    connect(hs)
    split.deliver()
    hs.take()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n") == []
    hs.clock.advance(ANSWER_TIMEOUT)
    assert hs.take() == ["421 4.3.0 relay.test Error: temporary failure, try again later"]
    hs.clock.advance(60)
    assert hs.transport.disconnecting
    # The check the master counted in flight (answered too late) is ended.
    split.deliver()
    assert not split.workers[0].checks
    assert split.owner.throttle.startCheck("192.0.2.50")


def test_a_master_that_answers_in_time_is_waited_for(tmp_path):
    from relayd.worker import ANSWER_TIMEOUT

    split = Split(tmp_path)
    hs = split.harnesses[0]
    connect(hs)
    hs.clock.advance(ANSWER_TIMEOUT - 1)
    split.deliver()
    hs.clock.advance(ANSWER_TIMEOUT)
    assert hs.take() == ["220 relay.test ESMTP relayd"]
    assert split.owner.sessions.total == 1


# Who owns a message: the worker that commits it makes its first attempt.


class SlotScheduler(FakeScheduler):
    """The master's scheduler as the channel uses it: slots per destination, limit ``free``."""

    def __init__(self, free):
        super().__init__()
        self.free = free
        self.taken = []

    def takeSlots(self, domains):
        if self.free <= 0:
            return None
        self.free -= 1
        self.taken.append(tuple(domains))
        return tuple(domains)

    def freeSlots(self, destinations):
        self.free += 1


def envelopeFor(queueId, login=None):
    return Envelope(queueId=queueId, sender="a@example.com", authIdentity=login,
                    recipients=[Recipient(address="b@example.org")], arrival=0.0)


def test_a_worker_that_dies_between_commit_and_delivery_leaves_it_to_the_master(tmp_path):
    split = Split(tmp_path)
    split.pool.scheduler = SlotScheduler(free=5)
    worker = split.workers[0]
    envelope = envelopeFor("K1JT6AX430N2XCS8")
    assert worker.link.committing(queueId=envelope.queueId, domains=["example.org"]) == {
        "allowed": True}
    split.spool.stored[envelope.queueId] = envelope  # committed; its attempt not ended
    worker.process = type("P", (), {"signalProcess": lambda self, s: None})()
    split.pool.release(worker)  # the channel closed: the process may still be exiting
    assert split.pool.scheduler.envelopes == {}
    assert split.pool.scheduler.free == 5 - 1
    split.pool.exited(worker, Failure(Exception("killed")).value)
    assert list(split.pool.scheduler.envelopes) == [envelope.queueId]
    assert split.pool.scheduler.free == 5  # its slot given back


def test_a_deferred_first_attempt_ends_up_in_the_masters_schedule(tmp_path):
    split = Split(tmp_path)
    split.pool.scheduler = SlotScheduler(free=5)
    link = split.workers[1].link
    envelope = envelopeFor("K1JT6AY8Y4J9ZVR8", login="alice@example.com")
    assert link.committing(queueId=envelope.queueId, login="alice@example.com",
                           domains=["example.org"]) == {"allowed": True}
    split.spool.stored[envelope.queueId] = envelope
    assert split.pool.scheduler.envelopes == {}  # the worker's, for now
    link.attemptEnded(queueId=envelope.queueId, kept=True)
    assert list(split.pool.scheduler.envelopes) == [envelope.queueId]
    assert split.pool.scheduler.free == 5
    assert len(split.owner.messageRate._recent("alice@example.com")) == 1
    # A delivered one is forgotten: nothing to schedule, even if the worker dies later.
    delivered = envelopeFor("K1JT6AZ8TFHT9N14")
    link.committing(queueId=delivered.queueId, domains=["example.org"])
    link.attemptEnded(queueId=delivered.queueId, kept=False)
    split.pool.release(split.workers[1])
    assert list(split.pool.scheduler.envelopes) == [envelope.queueId]


def test_without_a_free_slot_the_worker_hands_the_message_to_the_master(tmp_path):
    split = Split(tmp_path)
    split.pool.scheduler = SlotScheduler(free=1)
    link = split.workers[0].link
    first, second = envelopeFor("K1JT6AX430N2XCS8"), envelopeFor("K1JT6AXKM7N3763A")
    assert link.committing(queueId=first.queueId, domains=["example.org"])["allowed"] is True
    assert split.workers[1].link.committing(
        queueId=second.queueId, domains=["example.org"])["allowed"] is False
    split.spool.stored[second.queueId] = second
    split.workers[1].link.queued(queueId=second.queueId)
    assert list(split.pool.scheduler.envelopes) == [second.queueId]


def test_the_worker_attempts_what_it_was_allowed_and_keeps_the_rest_waiting_for_a_slot():
    from relayd.worker import FirstAttempts

    sent = []
    refusedIds = {"K1JT6AXKM7N3763A"}
    slotsLater = []

    class Link:
        def committingWithSlots(self, envelope):
            sent.append(("committing", envelope.queueId))
            return defer.succeed(envelope.queueId not in refusedIds)

        def startAttempt(self, envelope):
            sent.append(("start-attempt", envelope.queueId))
            return defer.succeed(bool(slotsLater))

        def ended(self, queueId, kept):
            sent.append(("ended", queueId, kept))

        def notice(self, envelope):
            sent.append(("queued", envelope.queueId))

    class Sched:
        running = True

        def __init__(self):
            self.added, self.forgotten, self.active = [], [], []

        def add(self, envelope):
            self.added.append(envelope.queueId)
            self.active.append(envelope.queueId)

        def activeIds(self):
            return list(self.active)

        def forgetBody(self, queueId):
            self.forgotten.append(queueId)

    sched = Sched()
    written = {}
    attempts = FirstAttempts(Link(), sched, lambda w, e: written.setdefault(e.queueId, defer.Deferred()))
    allowed, refused, broken = (envelopeFor(q) for q in
                                ("K1JT6AX430N2XCS8", "K1JT6AXKM7N3763A", "K1JT6AY8Y4J9ZVR8"))
    for envelope in (allowed, refused, broken):
        attempts.commit(None, envelope).addCallbacks(lambda _, e=envelope: attempts.queued(e),
                                                     lambda f: None)
    written[allowed.queueId].callback(None)
    written[refused.queueId].callback(None)
    written[broken.queueId].errback(OSError(28, "No space left on device"))
    assert sched.added == [allowed.queueId]
    # Nothing committed: the slots go back and the master forgets the id.
    assert ("ended", broken.queueId, False) in sent
    # Every slot taken: the refused one waits in the worker's line (asked once, refused).
    assert list(attempts.line) == [refused]
    assert ("queued", refused.queueId) not in sent
    # The worker's own attempt ends: the waiting one asks again and gets the slot.
    # (The scheduler says so from inside the attempt, while it still counts as active.)
    slotsLater.append(True)
    attempts.ended(allowed.queueId, False)
    sched.active.remove(allowed.queueId)
    assert sent[-2:] == [("ended", allowed.queueId, False), ("start-attempt", refused.queueId)]
    assert sched.added == [allowed.queueId, refused.queueId]
    assert not attempts.line


def test_a_waiting_message_goes_to_the_master_when_no_attempt_of_the_worker_will_end():
    from relayd.worker import FirstAttempts

    sent = []

    class Link:
        def committingWithSlots(self, envelope):
            return defer.succeed(False)

        def notice(self, envelope):
            sent.append(("queued", envelope.queueId))

    class Sched:
        running = True

        def activeIds(self):
            return []

        def forgetBody(self, queueId):
            sent.append(("forgot", queueId))

    attempts = FirstAttempts(Link(), Sched(), lambda w, e: defer.succeed(None))
    envelope = envelopeFor("K1JT6AX430N2XCS8")
    attempts.commit(None, envelope).addCallback(lambda _: attempts.queued(envelope))
    assert sent == [("forgot", envelope.queueId), ("queued", envelope.queueId)]
    assert not attempts.line


def test_a_commit_and_the_end_of_a_check_wait_for_the_master_in_bounded_time():
    """The 250 of a committed message, and the answer to AUTH, come even from a stuck master."""
    from relayd.worker import ANSWER_TIMEOUT

    clock = task.Clock()
    link = MasterLink(clock, lost=lambda: None, parse=config.parse)
    link.transport = object()
    asked = []
    link.callRemote = lambda command, **kw: asked.append(command) or defer.Deferred()
    written = defer.Deferred()
    outcomes = []
    announcedCommit(link, lambda w, e: written)(
        None, Envelope(queueId="K1JT6AZ8TFHT9N14", sender="", recipients=[], arrival=0.0)
    ).addBoth(outcomes.append)
    cfg = config.parse('hostname: relay.test.example\nlisteners: [{endpoint: "tcp:25", '
                       'tls: none, auth: none}]\nqueue: {directory: /s}\n', "x.yaml")
    link.limits = RemoteLimits(link, clock, cfg, server._throttleSettings)
    link.limits.throttle.checkEnded("192.0.2.1", failed=True).addBoth(outcomes.append)
    written.callback(None)
    clock.advance(ANSWER_TIMEOUT - 1)
    assert outcomes == [] and asked == [channel.Committing, channel.CheckEnded]
    clock.advance(1)
    assert outcomes == [None, None]


def test_heartbeats_come_often_enough_for_the_watchdog():
    from relayd.master import HEARTBEAT, heartbeatInterval

    assert heartbeatInterval(None) == HEARTBEAT
    assert heartbeatInterval(30.0) == HEARTBEAT
    assert heartbeatInterval(1.0) == 0.25


def test_a_worker_is_alive_for_the_watchdog_only_if_it_answered_within_its_window(tmp_path):
    reactor, pool = startedPool(tmp_path)
    answers = {}
    for number, link in zip((1, 2), reactor.adopted):
        link.transport = object()

        def callRemote(command, number=number, **kw):
            d = defer.Deferred()
            answers.setdefault(number, []).append(d)
            return d

        link.callRemote = callRemote
    reactor.advance(2.0)
    for ds in answers.values():
        ds.pop().callback({"sessions": 0})
    assert pool.alive(1.0)
    # Worker 2's reactor is blocked: its pings wait.
    reactor.advance(2.0)
    answers[1].pop().callback({"sessions": 0})
    assert not pool.alive(1.0)
    assert pool.alive()  # not yet long enough to be killed
    answers[2].pop().callback({"sessions": 0})
    assert pool.alive(1.0)


def test_the_daemon_is_ready_once_every_worker_accepts(tmp_path):
    reactor, pool = startedPool(tmp_path)
    ready = []
    pool.whenAccepting().addCallback(ready.append)
    reactor.adopted[0].accepting()
    reactor.adopted[0].accepting()
    assert ready == []
    reactor.adopted[1].accepting()
    assert ready == [None]
    assert pool.whenAccepting().called


def test_a_gone_workers_gauges_leave_the_page(tmp_path):
    from relayd.metrics import MetricsRegistry

    reactor, pool = startedPool(tmp_path)
    pool.metrics = registry = MetricsRegistry()
    opened = [{"name": "relayd_connections_open", "labels": ["tcp:25"], "amount": 2.0},
              {"name": "relayd_connections_total", "labels": ["tcp:25"], "amount": 2.0}]
    for link in reactor.adopted:
        link.metricUpdates(opened)
    gauge = lambda: registry.registry.get_sample_value("relayd_connections_open", {"listener": "tcp:25"})
    assert gauge() == 4
    pool.release(pool.workers[1])
    assert gauge() == 2
    assert registry.registry.get_sample_value("relayd_connections_total", {"listener": "tcp:25"}) == 4


def test_a_batch_read_after_its_worker_was_released_is_not_counted(tmp_path):
    """The process can end before its channel is read to the end: its gauge share stays gone."""
    from relayd.metrics import MetricsRegistry

    reactor, pool = startedPool(tmp_path)
    pool.metrics = registry = MetricsRegistry()
    link = reactor.adopted[0]
    link.metricUpdates([{"name": "relayd_connections_open", "labels": ["tcp:25"], "amount": 1.0}])
    pool.release(pool.workers[1])
    link.metricUpdates([{"name": "relayd_connections_open", "labels": ["tcp:25"], "amount": 1.0}])
    assert registry.registry.get_sample_value("relayd_connections_open", {"listener": "tcp:25"}) == 0
