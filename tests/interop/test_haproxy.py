"""
Two relayd instances, each with its own spool, behind a real HAProxy
(Debian's haproxy, TCP mode, PROXY protocol v2, SMTP health checks with
check-send-proxy), all on loopback. Clients connect from their own
loopback addresses (127.0.0.2, 127.0.0.3, ...) and HAProxy from
127.0.0.1, the only address in the instances' proxy_from: so a log line
or a decision that saw the balancer instead of the client would show
127.0.0.1.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import threading
import time

import pytest

from tests.integration.harness import (
    DELIVERY_DEADLINE, HOST, HOSTNAME, SMTP_TIMEOUT, makeMessage, waitUntil,
)
from tests.interop.peers import HAPROXY, PASSWORD, USER, HAProxy, SubmissionRelayd, missing

pytestmark = pytest.mark.integration

FAILURE_LIMIT = 2


@pytest.fixture
def cluster(tmp_path, processes, sink):
    """Two started relayd instances behind a started HAProxy; (haproxy, [relayd, relayd])."""
    if missing(HAPROXY):
        pytest.skip(f"{HAPROXY} not installed (Debian package haproxy; .ci/run installs it)")
    relays = []
    for name in ("relayd1", "relayd2"):
        relay = SubmissionRelayd(tmp_path / name, f"{{host: {HOST}, port: {sink.port}, tls: none}}",
                                 proxyFrom=f"{HOST}/32", auth=f"failure_limit: {FAILURE_LIMIT}")
        processes.append(relay)
        relays.append(relay.start())
        # The harness's "is it listening" probe sent no header: logged
        # before a test looks (intake workers accept it once they run).
        relay.waitForLog(r"dropped connection from unknown\[127\.0\.0\.1\]: "
                         r"connection closed before the PROXY header")
    balancer = HAProxy(tmp_path / "haproxy", [(HOST, r.port) for r in relays])
    processes.append(balancer)
    balancer.start()
    return balancer, relays


def clientContext(relays) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for relay in relays:
        relay.ca.configure_trust(context)
    return context


def connect(balancer, source: str) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, balancer.port, local_hostname="client.test", timeout=SMTP_TIMEOUT,
                        source_address=(source, 0))


def submit(balancer, relays, source: str, message: bytes) -> str:
    """STARTTLS, AUTH and one message through the balancer; the queue id."""
    with connect(balancer, source) as client:
        client.starttls(context=clientContext(relays))
        client.login(USER, PASSWORD)
        client.mail(USER)
        code, reply = client.rcpt("bob@remote.test")
        assert code == 250, (code, reply)
        code, reply = client.data(message)
        assert code == 250, (code, reply)
        return re.search(rb"queued as ([0-9A-Z]{16})", reply).group(1).decode()


def failedAuth(balancer, relays, source: str) -> tuple[int, bytes]:
    """One session with a wrong password; the reply to AUTH (a 421 ends the session)."""
    client = connect(balancer, source)
    try:
        client.starttls(context=clientContext(relays))
        client.ehlo()
        token = base64.b64encode(f"\0{USER}\0wrong password".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {token}")
    finally:
        client.close()


def whichRelay(relays, qid: str):
    """
    The one instance that logged taking message ``qid``. Its log thread
    writes the line a moment after the event, which may be after the 250.
    """
    def logged():
        return [r for r in relays if re.search(rf"\b{qid}: client=", r.log())] or None

    [relay] = waitUntil(logged, DELIVERY_DEADLINE, f"an instance logging {qid}: client=")
    return relay


def test_balancing_real_client_addresses_and_auth_throttle_per_client(cluster, sink):
    balancer, relays = cluster
    offsets = [r.logOffset() for r in relays]

    # Round robin: four messages from 127.0.0.2 land on both instances,
    # each logging the client's address, never the balancer's.
    sent = {}
    for n in range(4):
        message = makeMessage(f"balanced {n}", [f"message {n}"])
        sent[submit(balancer, relays, "127.0.0.2", message)] = message
    landed = {qid: whichRelay(relays, qid) for qid in sent}
    assert {id(r) for r in landed.values()} == {id(r) for r in relays}, landed
    for qid, relay in landed.items():
        relay.waitForLog(rf"\b{qid}: client=unknown\[127\.0\.0\.2\], sasl_method=PLAIN, "
                         rf"sasl_username={re.escape(USER)}$")
    arrived = {m.content[m.content.index(b"Subject:"):]: m for m in sink.waitForMessages(4)}
    for qid, message in sent.items():
        got = arrived[message[message.index(b"Subject:"):]]
        assert re.match(rb"Received: from client\.test \(unknown \[127\.0\.0\.2\]\)", got.content), got.content[:200]
        assert f"(relayd) with ESMTPSA id {qid}".encode() in got.content

    # 127.0.0.3 guesses passwords: each instance blocks it by its own
    # address after FAILURE_LIMIT failures...
    answers = [failedAuth(balancer, relays, "127.0.0.3") for _ in range(2 * FAILURE_LIMIT + 2)]
    assert [code for code, _ in answers[:2 * FAILURE_LIMIT]] == [535] * (2 * FAILURE_LIMIT), answers
    assert [code for code, _ in answers[-2:]] == [421, 421], answers
    assert all(b"4.7.0 " in reply and b"too many failed authentications" in reply
               for _, reply in answers[-2:]), answers
    for relay, offset in zip(relays, offsets):
        relay.waitForLog(r"warning: unknown\[127\.0\.0\.3\]: SASL PLAIN authentication failed", since=offset)
    # ...while 127.0.0.2 keeps working through the same balancer, on both.
    more = [submit(balancer, relays, "127.0.0.2", makeMessage(f"after {n}", ["still fine"]))
            for n in range(2)]
    assert {id(whichRelay(relays, qid)) for qid in more} == {id(r) for r in relays}

    for relay, offset in zip(relays, offsets):
        log = relay.log(offset)
        assert not re.search(r"connect from \S+\[127\.0\.0\.1\]", log), relay.describe()
        assert "[127.0.0.1]: SASL" not in log, relay.describe()
        # HAProxy's health checks (a v2 LOCAL header each second) are not clients.
        assert "dropped connection" not in log, relay.describe()
    assert " is DOWN" not in balancer.log(), balancer.describe()


class Submitter(threading.Thread):
    """
    Submits ``count`` messages through the balancer from ``source``, one per
    session, retrying a message (bounded) when the session breaks or gets
    a 4xx: an instance going away is a client's problem to retry, never a
    lost message. ``acknowledged`` maps each Message-ID that got a 250 to
    the message.
    """

    def __init__(self, balancer, relays, source: str, count: int) -> None:
        super().__init__(daemon=True)
        self.balancer, self.relays, self.source, self.count = balancer, relays, source, count
        self.acknowledged: dict[bytes, bytes] = {}
        self.retries = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for n in range(self.count):
                message = makeMessage(f"from {self.source} number {n}", [f"body {n}"])
                messageId = re.search(rb"Message-ID: (<[^>]+>)", message).group(1)
                for attempt in range(50):
                    if self.stop.is_set():
                        return
                    try:
                        submit(self.balancer, self.relays, self.source, message)
                    except (OSError, smtplib.SMTPException, AssertionError):
                        self.retries += 1
                        time.sleep(0.2)
                        continue
                    self.acknowledged[messageId] = message
                    break
                else:
                    raise AssertionError(f"{self.source}: message {n} not accepted in 50 tries")
        except BaseException as e:  # reported by the test
            self.error = e


def test_stopping_an_instance_loses_no_acknowledged_message(cluster, sink):
    balancer, relays = cluster
    first, second = relays
    submitters = [Submitter(balancer, relays, source, 12) for source in ("127.0.0.2", "127.0.0.4")]
    for s in submitters:
        s.start()
    try:
        def acknowledged() -> int:
            return sum(len(s.acknowledged) for s in submitters)

        waitUntil(lambda: acknowledged() >= 4, 60, "4 messages acknowledged")
        # SIGTERM: the instance finishes its sessions and stops; HAProxy's
        # health check takes it out, the clients carry on through the other.
        assert first.terminate() == 0, first.describe()
        balancer.waitForLog(r"Server relays/relayd1 is DOWN")
        mark = acknowledged()
        waitUntil(lambda: acknowledged() >= mark + 4, 60, "4 more messages acknowledged")
        first.start()
        # Back in: the health check (v2 LOCAL, then EHLO) passes again.
        balancer.waitForLog(r"Server relays/relayd1 is UP")
        # SIGKILL: a crash of the other instance in the middle of the traffic.
        mark = acknowledged()
        waitUntil(lambda: acknowledged() >= mark + 2, 60, "2 more messages acknowledged")
        second.process.kill()
        second.process.wait(10)
        mark = acknowledged()
        waitUntil(lambda: acknowledged() >= mark + 2, 60, "2 more messages acknowledged")
        second.start()
        for s in submitters:
            s.join(120)
            assert not s.is_alive(), f"submitter {s.source} did not finish"
            assert s.error is None, s.error
    finally:
        for s in submitters:
            s.stop.set()

    sent = {mid: m for s in submitters for mid, m in s.acknowledged.items()}
    assert len(sent) == 24

    def delivered() -> dict:
        found = {}
        for m in sink.messages():
            match = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", m.content)
            found.setdefault(match.group(1), m)
        return found

    got = waitUntil(lambda: delivered() if set(sent) <= set(delivered()) else None, 120,
                    "every acknowledged message at the sink",
                    lambda: f"missing: {sorted(set(sent) - set(delivered()))}")
    for messageId, message in sent.items():
        content = got[messageId].content
        assert content.endswith(message), messageId
