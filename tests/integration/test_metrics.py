"""
The Prometheus page of the real daemon (metrics.endpoint), scraped over
HTTP after a known sequence of sessions and parsed with prometheus_client's
own parser: every count equals what was done, and equals what the log says.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    HOST,
    HOSTNAME,
    RETRY_MAX,
    RETRY_MIN,
    SHUTDOWN_GRACE,
    SMTP_TIMEOUT,
    DELIVERY_DEADLINE,
    Relayd,
    Sink,
    addUser,
    freePort,
    makeMessage,
    waitUntil,
    writeChain,
)
from tests.integration.test_processes import greet, onlyWorker, servingPids, waitForWorkers, workers

pytestmark = pytest.mark.integration

USER = "alice@client.test"
PASSWORD = "correct horse battery"
DEAD_DOMAIN = "down.test"


class MetricsRelayd(Relayd):
    """
    relayd with a plain listener for the trusted loopback (self.port), a
    STARTTLS + AUTH one (self.submissionPort), a route to a port nothing
    listens on for DEAD_DOMAIN, and the metrics page on self.metricsPort.
    """

    def __init__(self, directory: Path, smarthostPort: int,
                 processCount: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.processCount = processCount
        self.submissionPort = freePort()
        self.metricsPort = freePort()
        self.deadPort = freePort()
        self.ca = writeChain(directory)
        self.passwordFile = directory / "passwd"
        addUser(self.passwordFile, USER, PASSWORD)
        super().__init__(directory, smarthostPort)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "tcp:{self.port}:interface={HOST}", tls: none, auth: none}}\n'
            f'  - {{endpoint: "tcp:{self.submissionPort}:interface={HOST}", tls: starttls, auth: required}}\n'
            f"tls: {{certificate: cert.pem, key: key.pem}}\n"
            f"auth: {{password_file: passwd}}\n"
            f"queue:\n"
            f"  directory: {self.spool}\n"
            f"  retry: {{min: {RETRY_MIN}, max: {RETRY_MAX}}}\n"
            f"delivery:\n"
            f"  smarthosts: [{{host: {HOST}, port: {smarthostPort}, tls: none}}]\n"
            f"  routes:\n"
            f"    {DEAD_DOMAIN}: [{{host: localhost, port: {self.deadPort}, tls: none}}]\n"
            f'metrics: {{endpoint: "tcp:{self.metricsPort}:interface={HOST}"}}\n'
            f"shutdown_grace: {SHUTDOWN_GRACE}\n"
            # None: as RELAYD_TEST_PROCESSES says (the harness adds it).
            + (f"processes: {self.processCount}\n" if self.processCount else "")
        )

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """Every sample on the page: (name, sorted labels) -> value."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metricsPort}/metrics",
                                    timeout=SMTP_TIMEOUT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def sequence(daemon: "MetricsRelayd") -> None:
    """
    Six sessions: two messages from the trusted loopback and one to the
    route that is down (plain listener), one with two refused recipients,
    then over STARTTLS a failed AUTH and a good AUTH with a message
    (submission listener). Four messages accepted, three delivered.
    """
    for i in range(2):
        daemon.submit(makeMessage(f"metrics {i}", ["body"]))
    daemon.submit(makeMessage("metrics down", ["body"]), recipients=(f"bob@{DEAD_DOMAIN}",))
    # An unknown RCPT parameter, an empty address.
    with daemon.connect() as client:
        client.ehlo()
        client.mail("alice@client.test")
        assert client.docmd("RCPT TO:<bob@remote.test> FOO=BAR")[0] == 555
        assert client.docmd("RCPT TO:<>")[0] == 501
    context = ssl.create_default_context()
    daemon.ca.configure_trust(context)
    for password in ("wrong", PASSWORD):
        with smtplib.SMTP(HOST, daemon.submissionPort, local_hostname="client.test",
                          timeout=SMTP_TIMEOUT) as client:
            client.starttls(context=context)
            client.ehlo()
            # One AUTH PLAIN (login() would try LOGIN after a failed PLAIN).
            client.user, client.password = USER, password
            try:
                client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError:
                continue
            client.sendmail(USER, ["carol@remote.test"], makeMessage("metrics auth", ["body"]))


def settledScrape(daemon: "MetricsRelayd", sent: int = 0, queued: int | None = None,
                  deferred: int = 0) -> dict:
    """
    A scrape once every session has closed and the counts have reached
    the log's (and ``sent`` recipients were delivered, ``deferred`` ones
    deferred, and ``queued`` messages are left in the queue): with intake
    workers, a worker's counts reach the page a moment after its log
    lines, and a sent message leaves the queue a moment after its
    ``status=sent`` line.
    """
    plain = f"tcp:{daemon.port}:interface={HOST}"
    submission = f"tcp:{daemon.submissionPort}:interface={HOST}"

    def settled():
        samples = daemon.scrape()
        log = daemon.log()
        connects = len(re.findall(r"\] connect from ", log))
        # Each process's log thread writes its lines a moment after the
        # events, which the test compares with the page's counts.
        if len(re.findall(r"status=sent", log)) < sent:
            return None
        total = sum(value(samples, "relayd_connections_total", listener=l) or 0
                    for l in (plain, submission))
        if (total == connects
                and not value(samples, "relayd_connections_open", listener=plain)
                and not value(samples, "relayd_connections_open", listener=submission)
                and (value(samples, "relayd_recipients_total", status="sent", route=HOST) or 0)
                >= sent
                # A worker's first attempt to the dead route may end after
                # its last session: the queue's count (the master's own)
                # can be there before the worker's batch with the deferral.
                and (value(samples, "relayd_recipients_total", status="deferred", route="localhost")
                     or 0) >= deferred
                and (queued is None or sum(value(samples, "relayd_queue_messages", state=state) or 0
                                           for state in ("active", "deferred")) == queued)):
            return samples
        return None

    return waitUntil(settled, DELIVERY_DEADLINE,
                     f"every session closed and counted, and {sent} recipients sent",
                     daemon.describe)


def acceptedBacklog(daemon: "MetricsRelayd") -> None:
    """
    With intake workers, the master's socket takes connections (the
    harness's probes) before the workers accept them: a greeting from each
    worker, while the other is stopped, comes after whatever waited before it.
    """
    waitForWorkers(daemon)
    for number in (1, 2):
        with onlyWorker(daemon, number):
            sock, banner = greet(daemon.port)
            sock.close()
            assert banner.startswith(b"220"), banner


def delta(before, after, name, **labels) -> float:
    return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)


@pytest.mark.parametrize("processCount", [1, 2])
def test_a_known_sequence_of_sessions_is_counted(tmp_path, processes, twistd, processCount):
    """
    The sequence once per intake process (with two, once in each worker
    while the other is stopped): every count is the sequence's times the
    number of processes, on the one page the master serves.
    """
    sink = Sink(tmp_path / "sink")
    processes.append(sink)
    sink.start()
    daemon = MetricsRelayd(tmp_path / "relayd", sink.port, processCount)
    processes.append(daemon)
    daemon.start()
    plain = f"tcp:{daemon.port}:interface={HOST}"
    submission = f"tcp:{daemon.submissionPort}:interface={HOST}"
    # The harness's probes of the port at start-up are counted before: a
    # greeting on a new connection comes after every connection queued before it.
    if processCount > 1:
        acceptedBacklog(daemon)
    else:
        sock, banner = greet(daemon.port)
        sock.close()
        assert banner.startswith(b"220"), banner
    before = settledScrape(daemon)
    assert value(before, "relayd_connections_total", listener=submission) is None
    assert value(before, "relayd_auth_total", result="success") == 0
    since = daemon.logOffset()

    if processCount == 1:
        sequence(daemon)
    else:
        for number in (1, 2):
            with onlyWorker(daemon, number):
                sequence(daemon)
        # Both workers served sessions (the log's pids say which did).
        assert set(servingPids(daemon, since)) == {str(p) for p in workers(daemon).values()}

    n = processCount
    sink.waitForMessages(3 * n, daemon.describe)
    daemon.waitForLog(rf"to=<bob@{re.escape(DEAD_DOMAIN)}>.*status=deferred")
    samples = settledScrape(daemon, sent=3 * n, queued=n, deferred=n)

    def counted(name, **labels):
        return delta(before, samples, name, **labels)

    assert counted("relayd_connections_total", listener=plain) == 4 * n
    assert counted("relayd_connections_total", listener=submission) == 2 * n
    assert value(samples, "relayd_connections_open", listener=plain) == 0
    assert value(samples, "relayd_connections_open", listener=submission) == 0
    assert counted("relayd_messages_accepted_total") == 4 * n
    assert counted("relayd_rejects_total", stage="RCPT", reason="unknown_parameter") == n
    assert counted("relayd_rejects_total", stage="RCPT", reason="bad_recipient_address") == n
    assert counted("relayd_auth_total", result="success") == n
    assert counted("relayd_auth_total", result="failure") == n
    assert counted("relayd_tls_sessions_total", direction="inbound", version="TLSv1.3") == 2 * n
    assert counted("relayd_recipients_total", status="sent", route=HOST) == 3 * n
    assert counted("relayd_recipients_total", status="deferred", route="localhost") >= n
    assert value(samples, "relayd_recipients_total", status="bounced", route=HOST) is None
    # The deferred messages are the queue; their age grows from their arrival.
    assert value(samples, "relayd_queue_messages", state="deferred") + value(
        samples, "relayd_queue_messages", state="active") == n
    assert value(samples, "relayd_queue_messages", state="held") == 0
    assert value(samples, "relayd_queue_oldest_message_age_seconds", state="held") == 0
    # Each attempt timed: one per message to the smarthost, at least one per message to the
    # dead route; each commit timed, in whichever process committed it.
    assert counted("relayd_delivery_attempt_duration_seconds_count", route=HOST) == 3 * n
    assert counted("relayd_delivery_attempt_duration_seconds_count", route="localhost") >= n
    assert counted("relayd_spool_commit_duration_seconds_count") == 4 * n
    # The log says the same.
    log = daemon.log(since)
    assert len(re.findall(r"\] connect from ", log)) == 6 * n
    assert len(re.findall(r": reject: RCPT from", log)) == 2 * n
    assert len(re.findall(r"status=sent", log)) == 3 * n
    assert len(re.findall(r"SASL PLAIN authentication failed", log)) == n
    assert len(re.findall(r"SASL PLAIN authentication succeeded", log)) == n


def test_a_killed_worker_takes_its_open_connections_off_the_page(tmp_path, processes, twistd):
    """
    Connections held open in worker 1, which is then killed (SIGKILL, so
    it says nothing): the page stops counting them, and counts the
    connections of the worker started in its place.
    """
    daemon = MetricsRelayd(tmp_path / "relayd", freePort(), 2)
    processes.append(daemon)
    daemon.start()
    numbers = waitForWorkers(daemon)
    plain = f"tcp:{daemon.port}:interface={HOST}"

    def openConnections(expected):
        return waitUntil(lambda: value(daemon.scrape(), "relayd_connections_open",
                                       listener=plain) == expected or None,
                         DELIVERY_DEADLINE, f"{expected} connections open on the page",
                         daemon.describe)

    held = []
    try:
        with onlyWorker(daemon, 1) as pid:
            for _ in range(3):
                sock, banner = greet(daemon.port)
                assert banner.startswith(b"220"), banner
                held.append(sock)
            openConnections(3)
            os.kill(pid, signal.SIGKILL)
            daemon.waitForLog(rf"worker 1 \(pid {pid}\) killed by SIGKILL; starting it again")
        openConnections(0)
        waitUntil(lambda: workers(daemon)[1] != numbers[1] or None, 30,
                  "worker 1 was not started again", daemon.describe)
        waitForWorkers(daemon)
        # The worker in its place counts from nothing; the gauge is never below zero.
        with onlyWorker(daemon, 1):
            sock, banner = greet(daemon.port)
            assert banner.startswith(b"220"), banner
            held.append(sock)
            openConnections(1)
        assert value(daemon.scrape(), "relayd_connections_total", listener=plain) >= 4
    finally:
        for sock in held:
            sock.close()
    openConnections(0)


def test_the_page_is_only_metrics(tmp_path, processes, twistd):
    """Other paths are 404, a request with a body is dropped, and the page carries no *_created noise."""
    daemon = MetricsRelayd(tmp_path / "relayd", freePort())
    processes.append(daemon)
    daemon.start()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{HOST}:{daemon.metricsPort}/", timeout=SMTP_TIMEOUT)
    assert info.value.code == 404
    request = urllib.request.Request(f"http://{HOST}:{daemon.metricsPort}/metrics",
                                     data=b"x" * 1000, method="POST")
    with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
        urllib.request.urlopen(request, timeout=SMTP_TIMEOUT)
    samples = daemon.scrape()
    assert not [name for name, _ in samples if name.endswith("_created")]


def http_client_errors():
    import http.client
    return http.client.HTTPException
