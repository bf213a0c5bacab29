"""
The reactor thread never waits on the disk: every file system call on a
message's way through relayd (creating its body file, committing it,
removing it after delivery or after a rejection, measuring free space)
runs in the spool's threads.

The first tests drive a session whose thread runner the test controls;
the last runs the daemon's service as tap.py wires it, with the real
reactor in a subprocess, and records the thread of every file system call
while one message is accepted and delivered and one is refused; another
does the same during a reload (the config, certificate, password, CA and
hosts files it reads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import address, defer, task
from twisted.internet.testing import StringTransport

from relayd import server
from relayd import queue
from relayd.queue import MessageLanes, Spool
from tests.dialogue import Dialogue
from tests.test_durability import makeConfig

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60


class HeldThreads:
    """A thread runner whose jobs run only when the test says so, in order."""

    def __init__(self):
        self.jobs: list[tuple] = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _ in self.jobs]

    def runNext(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def runAll(self) -> None:
        while self.jobs:
            self.runNext()


class Session(Dialogue):
    def __init__(self, tmp_path, threads=None, spool=None):
        self.threads = threads or HeldThreads()
        if spool is None:
            spool = Spool(str(tmp_path / "spool"))
            spool.recover()
        self.spool = spool
        self.queued = []
        # As tap.py wires it: the commit follows the body's writes in its lane.
        lanes = MessageLanes(self.threads)
        self.factory = server.SubmissionFactory(
            config=makeConfig(tmp_path), spool=self.spool,
            commit=lambda writer, envelope: lanes.run(writer.queueId, writer.commit, envelope),
            messageQueued=self.queued.append, clock=task.Clock(), runInThread=self.threads,
            lanes=lanes)
        self.transport = StringTransport(
            peerAddress=address.IPv4Address("TCP", "127.0.0.1", 40000),
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", 2525))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.take()
        assert self.send(b"EHLO client.test\r\n")[-1].startswith("250 ")

    def tmpFiles(self) -> list[str]:
        """Files of messages not committed: in tmp/ (the queue holds committed messages alone)."""
        return os.listdir(os.path.join(self.spool.directory, "tmp"))


def test_a_small_body_stays_in_memory_until_its_commit_makes_the_file_in_a_thread(tmp_path):
    s = Session(tmp_path)
    assert s.send(b"MAIL FROM:<alice@example.com>\r\n") == ["250 2.1.0 Ok"]
    assert s.threads.names() == ["spoolFreeBytes"]  # statvfs, not on the reactor thread
    s.threads.runAll()
    assert s.send(b"RCPT TO:<bob@example.org>\r\n") == ["250 2.1.5 Ok"]
    # A client that does not wait for the 354: the body must not run as
    # commands, and the pipelined command waits for the 250.
    replies = s.send(b"DATA\r\nSubject: x\r\n\r\nRSET\r\n.\r\nNOOP\r\n")
    assert [r[:3] for r in replies] == ["354"]
    # One thread call for the whole message: create, write, fsync, rename.
    assert s.threads.names() == ["commit"] and s.tmpFiles() == []
    s.threads.runNext()
    assert [r[:3] for r in s.take()] == ["250", "250"]
    [envelope] = s.queued
    with s.spool.openBody(envelope.queueId) as f:
        body = f.read()
    assert b"Subject: x\r\n" in body and body.endswith(b"\r\n\r\nRSET\r\n")


def test_a_refused_body_is_removed_in_a_thread(tmp_path):
    s = Session(tmp_path)
    s.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    s.threads.runAll()
    s.take()
    # A line over 998 characters, after a first piece written out: refused
    # at the end of data, nothing kept.
    piece = (b"y" * 78 + b"\r\n") * (server.BODY_WRITE_CHUNK // 80 + 1)
    s.send(b"Subject: x\r\n\r\n" + piece)
    assert s.threads.names() == ["writeOut"]
    s.threads.runAll()
    assert s.tmpFiles() != []
    assert s.send(b"x" * 1200 + b"\r\n.\r\n")[0].startswith("550 5.5.2")
    assert s.threads.names() == ["abort"] and s.tmpFiles() != []
    s.threads.runAll()
    assert s.tmpFiles() == [] and s.queued == []


@pytest.mark.parametrize("ending", ["lost", "timeout"])
def test_a_session_gone_while_its_body_is_written_leaves_no_file(tmp_path, ending):
    s = Session(tmp_path)
    s.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    s.threads.runAll()
    s.take()
    s.send(b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (2 * server.BODY_WRITE_CHUNK // 80 + 1))
    assert s.threads.names() == ["writeOut"]
    if ending == "lost":
        s.proto.connectionLost(None)
    else:
        s.factory.clock.advance(s.factory.config.limits.dataTimeout + 1)
        assert s.take()[0].startswith("421 ") and s.transport.disconnecting
        s.proto.connectionLost(None)
    s.threads.runAll()  # the pieces are written, then removed (abort, in its lane)
    assert s.tmpFiles() == []
    assert s.take() == []


def test_a_large_body_is_written_in_threads_in_order_and_a_fast_client_is_paused(tmp_path):
    s = Session(tmp_path)
    s.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    s.threads.runAll()
    s.take()
    s.proto.dataReceived(b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n")
    assert s.tmpFiles() == []  # nothing written yet: no file
    line = b"x" * 78 + b"\r\n"
    piece = line * (server.BODY_WRITE_CHUNK // len(line) + 1)
    body = b"Subject: big\r\n\r\n" + line
    # The client sends faster than the disk writes: nothing is written on
    # the reactor thread, and past MAX_BODY_WRITES pieces reading pauses.
    while s.transport.producerState != "paused":
        s.proto.dataReceived(piece)
        body += piece
        assert len(body) < 20 * server.BODY_WRITE_CHUNK, "reading never paused"
    assert len(body) <= (server.MAX_BODY_WRITES + 1) * (server.BODY_WRITE_CHUNK + server.MAX_READ)
    # One write in a thread, the others queued behind it in the message's lane.
    assert s.threads.names() == ["writeOut"] and len(s.factory.lanes._tails) == 1
    assert s.tmpFiles() == []  # the first write (in a thread) makes the file
    assert s.proto.pendingInputBytes == 0  # held in the writes, not in the inbox
    s.proto.dataReceived(b"Subject: still\r\n")  # a read under way when paused: kept
    assert s.proto.pendingInputBytes > 0
    s.threads.runNext()
    assert s.transport.producerState == "producing"
    s.proto.dataReceived(b".\r\n")
    # The commit waits in the message's lane behind the writes queued before it.
    assert s.threads.names() == ["writeOut"] and s.take() == []
    ran = []
    while s.threads.jobs:
        ran.append(s.threads.names()[0])
        s.threads.runNext()
    assert ran == ["writeOut"] * (server.MAX_BODY_WRITES - 1) + ["commit"]
    assert [r[:3] for r in s.take()] == ["250"]
    [envelope] = s.queued
    with s.spool.openBody(envelope.queueId) as f:
        stored = f.read()
    assert stored.endswith(body[len(b"Subject: big\r\n"):] + b"Subject: still\r\n")


class RealThreads(HeldThreads):
    """Held jobs, then run side by side in real threads; their Deferreds fire here, in job order."""

    def runTogether(self) -> None:
        import threading

        jobs, self.jobs = self.jobs, []
        outcomes: list = [None] * len(jobs)

        def work(i, f, args):
            try:
                outcomes[i] = (True, f(*args))
            except Exception as e:
                outcomes[i] = (False, e)

        running = [threading.Thread(target=work, args=(i, f, args)) for i, (f, args, _) in enumerate(jobs)]
        for t in running:
            t.start()
        for t in running:
            t.join(DEADLINE)
        for (ok, value), (_, _, d) in zip(outcomes, jobs):
            d.callback(value) if ok else d.errback(value)


def test_every_250_follows_the_fsyncs_of_its_body_envelope_and_directory(tmp_path, monkeypatch):
    """
    Group commit: commits ready together share a directory fsync, but each
    250 is written only after its body and envelope were fsynced, renamed,
    and a directory fsync that started after its envelope's rename ended.
    """
    import threading

    events: list[tuple] = []
    lock = threading.Lock()
    realFsync, realRename = os.fsync, os.rename
    realSyncDirectory = queue.DirectorySync._fsync
    sessions: list[Session] = []
    directoryFsyncs = 0
    everyoneRenamed = threading.Event()

    def record(*event):
        with lock:
            events.append(event)

    def fsync(fd):
        realFsync(fd)
        record("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))

    def rename(source, target):
        realRename(source, target)
        record("rename", os.path.basename(str(target)))
        if sum(1 for e in events if e[0] == "rename" and e[1].endswith(".msg")) == 3:
            everyoneRenamed.set()

    def syncDirectory(directory):
        nonlocal directoryFsyncs
        directoryFsyncs += 1
        if directoryFsyncs == 1:
            # The first commit's fsync of queue/ waits until the other two
            # renamed their messages: they must wait for another fsync.
            assert everyoneRenamed.wait(DEADLINE)
        record("directory fsync start", directoryFsyncs)
        realSyncDirectory(directory)
        record("directory fsync end", directoryFsyncs)

    threads = RealThreads()
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    for _ in range(3):
        s = Session(tmp_path, threads=threads, spool=spool)
        s.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        threads.runAll()  # the free space measurement
        s.take()
        sessions.append(s)
    for i, s in enumerate(sessions):
        s.proto.dataReceived(b"Subject: %d\r\n\r\nhello\r\n.\r\n" % i)
    assert threads.names() == ["commit"] * 3
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(queue.DirectorySync, "_fsync", syncDirectory)
    for s in sessions:
        s.transport.write = (lambda s: lambda data: (record("reply", s.proto, bytes(data)),
                                                     StringTransport.write(s.transport, data)))(s)
    threads.runTogether()
    monkeypatch.undo()

    assert directoryFsyncs == 2  # three commits, one directory fsync for the last two
    for s in sessions:
        [envelope] = s.queued
        queueId = envelope.queueId
        position = {e: i for i, e in enumerate(events)}
        [reply] = [e for e in events if e[0] == "reply" and e[1] is s.proto]
        assert reply[2].startswith(b"250 ") and queueId.encode() in reply[2]
        # The message file (body, envelope, trailer) fsynced, once, before
        # it is named in queue/, which makes the message.
        assert [e for e in events if e[0] == "fsync" and e[1].startswith(queueId)] == [
            ("fsync", queueId + ".msg")]
        order = [position[("fsync", queueId + ".msg")], position[("rename", queueId + ".msg")]]
        assert order == sorted(order)
        covering = [e for e in events[order[-1]:position[reply]] if e[0] == "directory fsync start"]
        assert covering, f"{queueId}: 250 without a directory fsync after its rename"
        assert ("directory fsync end", covering[0][1]) in events[order[-1]:position[reply]]


# -- the daemon as wired by tap.py, real reactor in a subprocess -------------------

# Every os function relayd's file system work goes through; read and write
# count on regular files only (the reactor's own waker is a pipe).
WATCHED = ("open", "unlink", "rename", "replace", "fsync", "stat", "lstat", "statvfs", "mkdir",
           "scandir", "listdir", "read", "write", "pread", "preadv", "fstat")
LATER = "later@example.org"  # the sink defers this recipient


def scenarioMain(configPath: str, sinkPort: int) -> None:
    """
    Start relayd's service, send it one message to deliver, one it refuses
    (a line too long), one large one (its body written in pieces during
    DATA) and one the sink defers (its envelope rewritten); wait until the
    first and third reached the sink and left the queue; hold, release,
    then delete the deferred one as relayctl would; print every watched os
    call (and every builtin open) as [function, thread is the reactor's, path].
    """
    import builtins
    import io
    import smtplib
    import stat
    import threading

    from aiosmtpd.controller import Controller
    from twisted.internet import threads

    from relayd import config, tap

    calls = []
    watching = threading.Event()
    reactorThread = threading.current_thread()
    realFstat = os.fstat

    def regular(fd) -> bool:
        try:
            return stat.S_ISREG(realFstat(fd).st_mode)
        except OSError:
            return False

    def watched(name, original):
        def call(*args, **kwargs):
            if watching.is_set() and (name not in ("read", "write", "fstat") or regular(args[0])):
                calls.append([name, threading.current_thread() is reactorThread,
                              str(args[0]) if args else ""])
            return original(*args, **kwargs)
        return call

    for name in WATCHED:
        setattr(os, name, watched(name, getattr(os, name)))
    builtins.open = io.open = watched("builtins.open", builtins.open)

    class Sink:
        received = 0

        async def handle_RCPT(self, server, session, envelope, address, options):
            if address == LATER:
                return "451 4.3.0 try later"
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"

        async def handle_DATA(self, server, session, envelope):
            Sink.received += 1
            return "250 2.0.0 Ok"

    sink = Controller(Sink(), hostname="127.0.0.1", port=sinkPort)
    sink.start()
    large = b"Subject: large\r\n\r\n" + (b"x" * 78 + b"\r\n") * 5000

    def submit(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("alice@example.com", ["bob@example.org"],
                            b"Subject: one\r\n\r\nhello\r\n")
            try:
                client.sendmail("alice@example.com", ["bob@example.org"],
                                b"Subject: two\r\n\r\n" + b"x" * 1200 + b"\r\n")
            except smtplib.SMTPDataError as e:
                assert e.smtp_code == 550, e
            client.sendmail("alice@example.com", ["bob@example.org"], large)
            client.sendmail("alice@example.com", [LATER], b"Subject: four\r\n\r\nlater\r\n")

    async def main(reactor):
        reactor.callLater(DEADLINE / 2, reactor.stop)  # a hang ends with no output
        relay = tap.makeService({"loaded": config.load(configPath)}, reactor)
        relay.startService()
        port = relay.listeners[0].port.getHost().port
        watching.set()  # start-up (recovery, the lock) may use the reactor thread
        await threads.deferToThread(submit, port)
        scheduler = relay.scheduler
        while (Sink.received < 2 or scheduler.queueLength() != 1
               or scheduler.activeIds() or not any(e.attempts for e in scheduler.envelopes.values())):
            await task.deferLater(reactor, 0.05, lambda: None)
        [deferred] = scheduler.envelopes
        for request in (scheduler.hold, scheduler.release, scheduler.hold, scheduler.delete):
            await request(deferred)
        await task.deferLater(reactor, 0.2, lambda: None)  # the refused body's removal
        watching.clear()
        print(json.dumps(calls))
        await relay.stopService()

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    finally:
        sink.stop()


CONFIG = """\
hostname: relay.test
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: none, auth: none}}
relay: {{trusted_networks: ["127.0.0.0/8"]}}
limits: {{client_name_timeout: 0s}}  # no DNS: the tests stay on loopback
queue: {{directory: {spool}}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: {sinkPort}, tls: none}}]
"""


def test_no_file_system_call_on_the_reactor_thread_while_a_message_is_accepted_and_delivered(tmp_path):
    pytest.importorskip("aiosmtpd.controller")
    from tests.test_courier import freePort

    sinkPort = freePort()
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(CONFIG.format(spool=tmp_path / "spool", sinkPort=sinkPort))
    code = ("import sys; from tests.test_reactor_thread import scenarioMain; "
            "scenarioMain(sys.argv[1], int(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(configPath), str(sinkPort)],
                          cwd=ROOT, capture_output=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    calls = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    spool = str(tmp_path / "spool")
    # The test watches what it should: the bodies created, written during
    # DATA and committed (fsync, pread and write take a descriptor), the
    # delivered ones read (the large one from its file) and removed, the
    # deferred one's envelope rewritten (after its attempt, hold, release)
    # and removed by the admin...
    inThreads = {name for name, onReactor, path in calls
                 if not onReactor and (path.startswith(spool) or name in ("fsync", "pread", "preadv", "write"))}
    assert inThreads >= {"fsync", "open", "rename", "statvfs", "unlink", "write",
                         "replace", "pread", "preadv"}
    bodyWrites = [c for c in calls if c[0] == "write"]
    assert len(bodyWrites) > 4  # the large body went out in pieces, not only at its commit
    replaced = [c for c in calls if c[0] == "replace"]
    assert len(replaced) >= 4  # after the attempt, hold, release, hold
    # ...and none of it on the reactor thread.
    assert [c for c in calls if c[1]] == []


def reloadScenarioMain(configPath: str, watchedDir: str, process: str = "daemon") -> None:
    """
    Start the daemon's service from ``configPath`` (``process`` "worker":
    an intake worker's, as its master would start it), then reload it with
    every file system call watched; print each as [function, thread is the
    reactor's, path], and the reload's outcome.
    """
    import builtins
    import io
    import threading

    from relayd import config, tap

    calls = []
    watching = threading.Event()
    reactorThread = threading.current_thread()

    def watched(name, original):
        def call(*args, **kwargs):
            if watching.is_set():
                calls.append([name, threading.current_thread() is reactorThread,
                              str(args[0]) if args else ""])
            return original(*args, **kwargs)
        return call

    for name in ("open", "stat", "lstat", "scandir", "listdir"):
        setattr(os, name, watched(name, getattr(os, name)))
    builtins.open = io.open = watched("builtins.open", builtins.open)

    async def worker(reactor):
        import socket

        from relayd.worker import MasterLink

        reactor.callLater(DEADLINE / 2, reactor.stop)  # a hang ends with no output
        link = MasterLink(reactor, lost=lambda: None, parse=config.parse)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        listening.setblocking(False)
        old = config.load(configPath)
        relay = tap.makeWorker(old, reactor, link, [listening.detach()], 1)
        relay.startService()
        # A worker is given the master's configuration, already read.
        new = config.load(configPath)
        watching.set()
        await defer.maybeDeferred(relay.reload, new)
        watching.clear()
        applied = relay.config is not old and relay.config == new
        print(json.dumps({"calls": calls, "outcome": [applied, "worker"]}))
        await relay.stopService()

    async def main(reactor):
        reactor.callLater(DEADLINE / 2, reactor.stop)  # a hang ends with no output
        relay = tap.makeService({"loaded": config.load(configPath)}, reactor)
        relay.startService()
        watching.set()
        outcome = await relay.reload()
        watching.clear()
        print(json.dumps({"calls": calls, "outcome": list(outcome)}))
        await relay.stopService()

    scenario = worker if process == "worker" else main
    task.react(lambda reactor: defer.ensureDeferred(scenario(reactor)))


RELOAD_CONFIG = """\
hostname: relay.test
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: starttls, auth: required}}
tls: {{certificate: {dir}/cert.pem, key: {dir}/key.pem}}
auth: {{password_file: {dir}/passwd}}
relay: {{trusted_networks: ["127.0.0.0/8"]}}
limits: {{client_name_timeout: 0s}}  # no DNS: the tests stay on loopback
queue: {{directory: {dir}/spool}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 9, tls: starttls, ca_file: {dir}/ca.pem, username: relay, password_file: {dir}/secret}}]
"""


@pytest.mark.parametrize("process", ["daemon", "worker"])
def test_a_reload_reads_its_files_in_a_thread_not_on_the_reactor_thread(tmp_path, process):
    """The daemon's reload, and an intake worker's (given the master's configuration)."""
    trustme = pytest.importorskip("trustme")
    from passlib.hash import bcrypt

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "passwd").write_text(f"alice:{bcrypt.using(rounds=4).hash('pw')}\n")
    (tmp_path / "secret").write_text("upstream\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(RELOAD_CONFIG.format(dir=tmp_path))
    code = ("import sys; from tests.test_reactor_thread import reloadScenarioMain; "
            "reloadScenarioMain(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, str(configPath), str(tmp_path), process],
                          cwd=ROOT, capture_output=True, timeout=DEADLINE,
                          env={**os.environ, "RELAYD_HOSTS_FILE": str(tmp_path / "hosts")})
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    calls = result["calls"]
    read = {Path(path).name for name, onReactor, path in calls if name == "builtins.open"}
    # The test watches what it should: the reload read the config (a
    # worker's is read by its master), the certificate and its key, the
    # password file, the delivery secret and CA file, and the hosts file...
    if process == "worker":
        assert result["outcome"] == [True, "worker"]
        assert read >= {"cert.pem", "key.pem", "passwd", "secret", "ca.pem", "hosts"}
    else:
        assert result["outcome"] == [True, f"reload: configuration {configPath} applied"]
        assert read >= {"relayd.yaml", "cert.pem", "key.pem", "passwd", "secret", "ca.pem", "hosts"}
    # ...and none of it on the reactor thread.
    assert [c for c in calls if c[1]] == []
