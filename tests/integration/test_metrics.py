"""
The Prometheus page of the real daemon (metrics.endpoint), scraped over
HTTP after a known sequence of sessions and parsed with prometheus_client's
own parser: every count equals what was done, and equals what the log says.
"""

from __future__ import annotations

import re
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

    def __init__(self, directory: Path, smarthostPort: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
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
            # One process, whatever RELAYD_TEST_PROCESSES says: with intake
            # workers a metrics section stops the start (not collected across them).
            f"processes: 1\n"
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


def test_a_known_sequence_of_sessions_is_counted(tmp_path, processes, twistd):
    sink = Sink(tmp_path / "sink")
    processes.append(sink)
    sink.start()
    daemon = MetricsRelayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    plain = f"tcp:{daemon.port}:interface={HOST}"
    submission = f"tcp:{daemon.submissionPort}:interface={HOST}"

    before = daemon.scrape()
    assert value(before, "relayd_connections_total", listener=submission) is None
    assert value(before, "relayd_auth_total", result="success") == 0

    # 1-2: two messages from the trusted loopback, delivered by the smarthost.
    for i in range(2):
        daemon.submit(makeMessage(f"metrics {i}", ["body"]))
    # 3: one message to the route that is down (deferred).
    daemon.submit(makeMessage("metrics down", ["body"]), recipients=(f"bob@{DEAD_DOMAIN}",))
    # 4: a session with two refused recipients (an unknown RCPT parameter, an empty address).
    with daemon.connect() as client:
        client.ehlo()
        client.mail("alice@client.test")
        assert client.docmd("RCPT TO:<bob@remote.test> FOO=BAR")[0] == 555
        assert client.docmd("RCPT TO:<>")[0] == 501
    # 5: STARTTLS and a failed AUTH; 6: STARTTLS and a good AUTH with a message.
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

    sink.waitForMessages(3, daemon.describe)
    daemon.waitForLog(rf"to=<bob@{re.escape(DEAD_DOMAIN)}>.*status=deferred")

    def settled():
        samples = daemon.scrape()
        if value(samples, "relayd_connections_open", listener=plain) == 0 and value(
                samples, "relayd_connections_open", listener=submission) == 0 and value(
                samples, "relayd_recipients_total", status="sent", route=HOST) == 3:
            return samples
        return None

    samples = waitUntil(settled, DELIVERY_DEADLINE, "every session closed and 3 recipients sent",
                        daemon.describe)
    # Four sessions, and the harness's probes of the port at start-up.
    assert value(samples, "relayd_connections_total", listener=plain) >= 4
    assert value(samples, "relayd_connections_total", listener=submission) == 2
    assert value(samples, "relayd_messages_accepted_total") == 4
    assert value(samples, "relayd_rejects_total", stage="RCPT", reason="unknown_parameter") == 1
    assert value(samples, "relayd_rejects_total", stage="RCPT", reason="bad_recipient_address") == 1
    assert value(samples, "relayd_auth_total", result="success") == 1
    assert value(samples, "relayd_auth_total", result="failure") == 1
    assert value(samples, "relayd_tls_sessions_total", direction="inbound", version="TLSv1.3") == 2
    assert value(samples, "relayd_recipients_total", status="deferred", route="localhost") >= 1
    assert value(samples, "relayd_recipients_total", status="bounced", route=HOST) is None
    # The deferred message is the queue; its age grows from its arrival.
    assert value(samples, "relayd_queue_messages", state="deferred") + value(
        samples, "relayd_queue_messages", state="active") == 1
    assert value(samples, "relayd_queue_messages", state="held") == 0
    assert value(samples, "relayd_queue_oldest_message_age_seconds", state="held") == 0
    # Each attempt timed: 3 to the smarthost (one per message), at least one to the dead route.
    assert value(samples, "relayd_delivery_attempt_duration_seconds_count", route=HOST) == 3
    assert value(samples, "relayd_delivery_attempt_duration_seconds_count", route="localhost") >= 1
    assert value(samples, "relayd_spool_commit_duration_seconds_count") == 4
    # The log says the same.
    log = daemon.log()
    assert len(re.findall(r"\] connect from ", log)) == value(
        samples, "relayd_connections_total", listener=plain) + 2
    assert len(re.findall(r": reject: RCPT from", log)) == 2
    assert len(re.findall(r"status=sent", log)) == 3
    assert len(re.findall(r"SASL PLAIN authentication failed", log)) == 1
    assert len(re.findall(r"SASL PLAIN authentication succeeded", log)) == 1


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
