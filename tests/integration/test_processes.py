"""
The daemon with ``processes: 2``: a master and two intake workers sharing
the listening sockets. What an admin checks: mail is accepted and
delivered; killing one worker loses no acknowledged message and the
worker comes back; the connection and AUTH limits count across both
workers; SIGHUP reaches the workers; SIGTERM stops every process.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import threading
import time
from collections import Counter

import pytest

from tests.integration.harness import (
    DELIVERY_DEADLINE,
    HOST,
    SMTP_TIMEOUT,
    Relayd,
    makeMessage,
    waitUntil,
)
from tests.integration.test_crash import SUBJECT, Client
from tests.integration.test_log_tools import SyslogSocketRelayd
from tests.integration.test_submission_security import PASSWORD, USER, SecureRelayd

pytestmark = pytest.mark.integration

WORKER_STARTED = re.compile(r"worker (\d+) \(pid (\d+)\) started")


class SplitRelayd(Relayd):
    """relayd with ``processes: 2`` (and any further settings in ``extra``)."""

    extra = ""

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return super().configText(smarthostPort, trustedNetworks,
                                  extra=extra + self.extra + "processes: 2\n")


class SecureSplitRelayd(SecureRelayd):
    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return super().configText(smarthostPort, trustedNetworks) + "processes: 2\n"


def workers(daemon: Relayd) -> dict[int, int]:
    """Worker number -> pid of the latest start of each, from the log."""
    found: dict[int, int] = {}
    for number, pid in WORKER_STARTED.findall(daemon.log()):
        found[int(number)] = int(pid)
    return found


def waitForWorkers(daemon: Relayd) -> dict[int, int]:
    """Both workers started and accepting on the port (each has said so)."""
    def ready():
        found = workers(daemon)
        log = daemon.log()
        return len(found) == 2 and all(
            re.search(rf"pid {pid}\]:? worker {n} accepting connections|"
                      rf"\[{pid}\]: worker {n} accepting connections", log)
            for n, pid in found.items()) or None

    waitUntil(ready, 30, "two workers did not start accepting", daemon.describe)
    return workers(daemon)


def isRunning(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def parentOf(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().split(") ", 1)[1].split()[1])


def greet(port: int) -> tuple[socket.socket, bytes]:
    """A connection held open, and its first reply line."""
    sock = socket.create_connection((HOST, port), timeout=SMTP_TIMEOUT)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


@contextlib.contextmanager
def onlyWorker(daemon: Relayd, number: int):
    """Every other worker stopped (SIGSTOP), so worker ``number`` accepts every new connection."""
    others = [pid for n, pid in workers(daemon).items() if n != number]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield workers(daemon)[number]
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def connectedTo(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP connection to ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False


def servingPids(daemon: Relayd, since: int) -> Counter:
    """How many "connect from" lines each process wrote after ``since``."""
    return Counter(re.findall(r"pid (\d+)\] connect from", daemon.log(since)))


@pytest.fixture
def split(tmp_path, processes, twistd, sink):
    daemon = SplitRelayd(tmp_path / "relayd", sink.port, trustedNetworks=["127.0.0.0/8"])
    processes.append(daemon)
    return daemon


def test_two_processes_accept_and_deliver(split, sink):
    split.start()
    pids = waitForWorkers(split)
    master = split.process.pid
    for pid in pids.values():
        assert isRunning(pid) and parentOf(pid) == master
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"relayd.worker" in f.read()
    for n in range(6):
        split.submit(makeMessage(f"split {n}", [f"line {n}"]))
    delivered = sink.waitForMessages(6, split.describe)
    assert sorted(SUBJECT_OF(d.content) for d in delivered) == [f"split {n}" for n in range(6)]
    assert split.terminate() == 0
    for pid in pids.values():
        waitUntil(lambda: not isRunning(pid) or None, 10, f"worker {pid} still runs")


def SUBJECT_OF(content: bytes) -> str:
    return re.search(rb"^Subject: (.*)\r$", content, re.M).group(1).decode()


def test_sigkill_of_one_worker_loses_nothing_acknowledged_and_it_comes_back(split, sink):
    split.start()
    waitForWorkers(split)
    stop = threading.Event()
    clients = [Client(n, split.port, stop) for n in range(4)]
    for c in clients:
        c.start()
    kills = 0
    try:
        for round in range(3):
            time.sleep(1.0)
            number, pid = sorted(workers(split).items())[round % 2]
            os.kill(pid, signal.SIGKILL)
            kills += 1
            split.waitForLog(rf"worker {number} \(pid {pid}\) killed by SIGKILL; starting it again",
                             deadline=20)
            waitUntil(lambda: workers(split).get(number) != pid or None, 20,
                      f"worker {number} was not started again", split.describe)
        time.sleep(1.0)
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    assert split.running, "the master died with a worker"
    queueDir = split.spool / "queue"
    waitUntil(lambda: not list(queueDir.glob("*.msg")) or None, DELIVERY_DEADLINE,
              "the queue did not drain", split.describe)
    outcomes: dict[str, str] = {}
    for c in clients:
        outcomes.update(c.outcomes)
    arrived = Counter()
    for delivered in sink.messages():
        arrived[SUBJECT.search(delivered.content).group(1).decode()] += 1
    got250 = {t for t, o in outcomes.items() if o == "250"}
    missing = got250 - set(arrived)
    print(f"\nworker kills: {kills}; sessions {len(outcomes)}, 250s {len(got250)}, "
          f"arrivals {sum(arrived.values())}")
    assert got250 and not missing, f"{len(missing)} acknowledged message(s) never arrived"
    assert set(arrived) <= set(outcomes)


def test_connections_per_client_counts_across_workers(split):
    split.extra = "limits: {connections_per_client: 11}\n"
    split.writeConfig(split.configText(split.smarthostPort, ["127.0.0.0/8"]))
    split.start()
    waitForWorkers(split)
    since = split.logOffset()
    held = []
    try:
        # Six sessions in worker 1, five in worker 2: eleven in all, the limit.
        for number, count in ((1, 6), (2, 5)):
            with onlyWorker(split, number):
                for _ in range(count):
                    sock, line = greet(split.port)
                    held.append(sock)
                    assert line.startswith(b"220 "), line
        for number in (1, 2):
            with onlyWorker(split, number):
                sock, line = greet(split.port)
                held.append(sock)
                assert line == (b"421 4.7.0 relay.test.example Error: too many connections "
                                b"from your address\r\n"), (number, line)
        assert len(servingPids(split, since)) == 2, split.log(since)
    finally:
        for sock in held:
            sock.close()
    # Closed sessions are given back: a new one is admitted.
    waitUntil(lambda: greet(split.port)[1].startswith(b"220 ") or None, 10,
              "no session admitted after the others closed", split.describe)


def test_auth_failures_count_across_workers(tmp_path, processes, twistd, sink):
    daemon = SecureSplitRelayd(tmp_path / "relayd", sink.port)  # auth.failure_limit: 3
    processes.append(daemon)
    daemon.start()
    waitForWorkers(daemon)
    since = daemon.logOffset()
    guess = "PLAIN " + base64.b64encode(b"\0mallory\0guess").decode()

    def oneGuess() -> int:
        client = smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                                  context=daemon.clientContext())
        try:
            client.ehlo()
            return client.docmd("AUTH", guess)[0]
        finally:
            client.close()

    # Two failures through worker 1, the third through worker 2 (auth.failure_limit: 3).
    with onlyWorker(daemon, 1):
        assert [oneGuess(), oneGuess()] == [535, 535]
    with onlyWorker(daemon, 2):
        assert oneGuess() == 535
        daemon.waitForLog(r"warning: SASL authentication failure limit exceeded: 3 in \S+ "
                          r"from unknown\[127\.0\.0\.1\]; AUTH blocked until", since=since,
                          deadline=10)
        assert oneGuess() == 421
    # The block holds in the other worker too.
    with onlyWorker(daemon, 1):
        assert oneGuess() == 421
    assert len(servingPids(daemon, since)) == 2, daemon.log(since)


def test_sighup_reaches_every_worker(split):
    split.start()
    pids = waitForWorkers(split)
    since = split.logOffset()
    split.writeConfig(split.configPath.read_text().replace(
        "hostname: relay.test.example", "hostname: renamed.test.example"))
    split.signal(signal.SIGHUP)
    for pid in pids.values():
        split.waitForLog(rf"pid {pid}\] reload: configuration .* applied", since=since, deadline=20)
    for number in (1, 2):
        with onlyWorker(split, number):
            sock, line = greet(split.port)
            sock.close()
        assert line.startswith(b"220 renamed.test.example "), (number, line)


class SyslogSplitRelayd(SplitRelayd):
    def command(self) -> list[str]:
        command = super().command()
        return command[:3] + ["--logger", "relayd.logformat.syslogStdout"] + command[3:]


def test_workers_log_through_the_masters_logger_with_their_pid(tmp_path, processes, twistd, sink):
    daemon = SyslogSplitRelayd(tmp_path / "relayd", sink.port, trustedNetworks=["127.0.0.0/8"])
    processes.append(daemon)
    daemon.start()
    pids = waitForWorkers(daemon)
    since = daemon.logOffset()
    with onlyWorker(daemon, 2) as pid:
        daemon.submit(makeMessage("syslog", ["one"]))
    # The worker that accepted the message makes its first attempt too.
    daemon.waitForLog(rf"relayd/smtp\[{pid}\]: \w+: to=<bob@remote\.test>.*status=sent",
                      since=since)
    log = daemon.log(since)
    assert re.search(rf"relayd/smtpd\[{pid}\]: connect from unknown\[127\.0\.0\.1\]", log), log
    assert pids[2] == pid


SKIPPED_LINES = re.compile(r"warning: auth\.password_file \S+: lines? [\d, ]+ skipped \(not login:hash\)")


def test_password_file_problems_are_logged_once_for_the_daemon(tmp_path, processes, twistd, sink):
    """
    What is wrong in the password file is one line per problem for the
    whole daemon: the master's at start and on SIGHUP; an edit noticed
    without a reload, worker 1's (another worker notices it too, silently).
    """
    daemon = SecureSplitRelayd(tmp_path / "relayd", sink.port)
    with open(daemon.passwordFile, "a") as f:
        f.write("a line that is not login:hash\n")
    processes.append(daemon)
    daemon.start()
    # Each worker has read the file by the time it accepts.
    pids = waitForWorkers(daemon)
    assert SKIPPED_LINES.findall(daemon.log()) == [
        f"warning: auth.password_file {daemon.passwordFile}: line 2 skipped (not login:hash)"
    ], daemon.log()

    since = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"\[relayd/relayd#info\] reload: configuration .* applied", since=since)
    for pid in pids.values():
        daemon.waitForLog(rf"pid {pid}\] reload: configuration .* applied", since=since, deadline=20)
    assert len(SKIPPED_LINES.findall(daemon.log(since))) == 1, daemon.log(since)

    # Edited without a reload: each worker re-reads it at its next AUTH
    # (at most once a second).
    time.sleep(1.1)
    since = daemon.logOffset()
    with open(daemon.passwordFile, "a") as f:
        f.write("another such line\n")

    def logIn() -> None:
        with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                              context=daemon.clientContext()) as client:
            client.login(USER, PASSWORD)

    with onlyWorker(daemon, 2):
        logIn()
    with onlyWorker(daemon, 1):
        logIn()
    daemon.waitForLog(r"lines 2, 3 skipped", since=since, deadline=10)
    assert len(SKIPPED_LINES.findall(daemon.log(since))) == 1, daemon.log(since)


class SyslogSocketSplitRelayd(SyslogSocketRelayd):
    """Logging to the syslog socket as the systemd unit does, with two intake workers."""

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return super().configText(smarthostPort, trustedNetworks, extra + "processes: 2\n")


def test_a_missing_syslog_socket_is_one_warning_for_the_daemon(tmp_path, processes, twistd, sink,
                                                               monkeypatch):
    """Every process falls back to stderr; the master alone says so."""
    socketPath = tmp_path / "no-syslog" / "log"
    monkeypatch.setenv("RELAYD_SYSLOG_SOCKET", str(socketPath))
    daemon = SyslogSocketSplitRelayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    pids = waitForWorkers(daemon)
    for number, pid in pids.items():
        with onlyWorker(daemon, number):
            queueId = daemon.submit(makeMessage(f"through {pid}", ["body"]))
        daemon.waitForLog(rf"relayd/smtpd\[{pid}\]: {queueId}: client=")
    assert daemon.terminate() == 0
    warnings = [line for line in daemon.log().splitlines() if "syslog socket" in line]
    assert warnings == [f"relayd: warning: syslog socket {socketPath}: No such file or directory; "
                        "logging to stderr until it takes lines again"], daemon.log()


class LogfileSplitRelayd(SplitRelayd):
    """Logging to a file of twistd's (``--logfile``), which twistd rotates on SIGUSR1."""

    def __init__(self, directory, smarthostPort, trustedNetworks=None) -> None:
        super().__init__(directory, smarthostPort, trustedNetworks)
        self.logPath = directory / "twistd.log"

    def command(self) -> list[str]:
        command = super().command()
        return command[:3] + ["--logfile", str(self.logPath)] + command[3:]


TWISTD_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")


def test_with_logfile_every_workers_lines_land_whole_in_the_file_twistd_rotates(
        tmp_path, processes, twistd, sink):
    daemon = LogfileSplitRelayd(tmp_path / "relayd", sink.port, trustedNetworks=["127.0.0.0/8"])
    processes.append(daemon)
    daemon.start()
    pids = waitForWorkers(daemon)

    def submitThroughEach(subject: str) -> dict[int, str]:
        sent = {}
        for number, pid in pids.items():
            others = [p for p in pids.values() if p != pid]
            for other in others:
                os.kill(other, signal.SIGSTOP)
            try:
                sent[pid] = daemon.submit(makeMessage(f"{subject} {number}", ["body"]))
            finally:
                for other in others:
                    os.kill(other, signal.SIGCONT)
        for pid, queueId in sent.items():
            daemon.waitForLog(rf"pid {pid}\] {queueId}: client=", deadline=20)
        return sent

    before = submitThroughEach("before")
    # Lines from the master and both workers at once: none is lost.
    many = [daemon.submit(makeMessage(f"many {n}", ["body"])) for n in range(10)]
    sink.waitForMessages(12, daemon.describe)
    for queueId in many:
        daemon.waitForLog(rf"\] {queueId}: client=", deadline=20)
        daemon.waitForLog(rf"\] {queueId}: removed", deadline=20)
    rotated = daemon.logPath.with_name(daemon.logPath.name + ".1")
    daemon.signal(signal.SIGUSR1)  # twistd's rotation: the file becomes twistd.log.1
    waitUntil(rotated.exists, 10, f"twistd did not rotate {daemon.logPath}", daemon.describe)
    after = submitThroughEach("after")

    old, new = rotated.read_text(), daemon.logPath.read_text()
    for pid, queueId in before.items():
        assert re.search(rf"pid {pid}\] {queueId}: client=", old), old
    for pid, queueId in after.items():
        assert not re.search(rf"{queueId}: client=", old)
    # Every line whole, in twistd's format (none written over by another process).
    for text in (old, new):
        lines = text.splitlines()
        assert lines and all(TWISTD_LINE.match(line) for line in lines), text


    assert pids[2] == pid != daemon.process.pid


def test_a_worker_killed_during_its_first_attempt_leaves_the_message_to_the_master(
        tmp_path, processes, twistd, sink):
    daemon = SyslogSplitRelayd(tmp_path / "relayd", sink.port, trustedNetworks=["127.0.0.0/8"])
    processes.append(daemon)
    daemon.start()
    waitForWorkers(daemon)
    # The next hop stops answering: the worker's first attempt hangs.
    os.kill(sink.process.pid, signal.SIGSTOP)
    try:
        since = daemon.logOffset()
        with onlyWorker(daemon, 1) as pid:
            queueId = daemon.submit(makeMessage("orphan", ["mid-delivery"]))
        daemon.waitForLog(rf"relayd/qmgr\[{pid}\]: {queueId}: from=<", since=since)
        # The worker that accepted it is delivering it (connected to the next hop).
        waitUntil(lambda: connectedTo(pid, sink.port) or None, 20,
                  "the worker did not start the first attempt", daemon.describe)
        os.kill(pid, signal.SIGKILL)
        daemon.waitForLog(rf"worker 1 \(pid {pid}\) killed by SIGKILL; starting it again",
                          deadline=20)
    finally:
        os.kill(sink.process.pid, signal.SIGCONT)
    [delivered] = sink.waitForMessages(1, daemon.describe)
    assert b"mid-delivery" in delivered.content
    # Delivered by the master, which took the dead worker's message over.
    daemon.waitForLog(rf"relayd/smtp\[{daemon.process.pid}\]: {queueId}: to=<bob@remote\.test>"
                      r".*status=sent", since=since)
