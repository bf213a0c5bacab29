"""
relayd between real Postfix instances (Debian's postfix, run privately on
loopback by the test): Postfix in front of relayd as the local MTA that
forwards everything to the company relay, and Postfix behind relayd as a
smarthost that requires STARTTLS and SASL (Cyrus sasldb2). Each test checks
the message that arrives at the last hop (envelope, header, body) and the
log lines on both sides.
"""

from __future__ import annotations

import re
import signal
import smtplib
import ssl

import pytest

from tests.integration.harness import (
    DELIVERY_DEADLINE, HOST, HOSTNAME, SMTP_TIMEOUT, makeMessage, waitUntil,
)
from tests.integration.test_relayctl import relayctl
from tests.interop.peers import (
    PASSWORD,
    SASLPASSWD2,
    USER,
    SubmissionRelayd,
    arrivedIntact,
    missing,
)

pytestmark = pytest.mark.integration

SMARTHOST_USER = "relay@smarthost.test.example"
SMARTHOST_PASSWORD = "smarthost secret 1"


def sendTo(port: int, message: bytes, sender: str = USER,
           recipients: tuple[str, ...] = ("bob@remote.test",)) -> bytes:
    """Plain SMTP to a Postfix smtpd (it trusts mynetworks); its 250 reply to DATA."""
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=SMTP_TIMEOUT) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, (code, reply)
        code, reply = client.data(message)
        assert code == 250, (code, reply)
        return reply


def startRelay(tmp_path, processes, smarthost: str) -> SubmissionRelayd:
    relay = SubmissionRelayd(tmp_path / "relayd", smarthost)
    processes.append(relay)
    return relay.start()


def test_postfix_in_front_forwards_through_relayd_with_verified_tls_and_auth(
        tmp_path, processes, sink, startPostfix):
    relay = startRelay(tmp_path, processes, f"{{host: {HOST}, port: {sink.port}, tls: none}}")
    front = startPostfix("front", {})
    secrets = front.path("sasl_passwd")
    secrets.write_text(f"[{HOST}]:{relay.port} {USER}:{PASSWORD}\n")
    secrets.chmod(0o600)
    front.configure(
        relayhost=f"[{HOST}]:{relay.port}",
        smtp_sasl_auth_enable="yes",
        smtp_sasl_password_maps=f"texthash:{secrets}",
        smtp_sasl_security_options="noanonymous",
        # secure: the certificate must chain to the test CA and name the
        # relay ("encrypt" would take any certificate).
        smtp_tls_security_level="secure",
        smtp_tls_CAfile=str(relay.directory / "ca.pem"),
        smtp_tls_secure_cert_match=HOSTNAME,
        smtp_tls_loglevel="1",
    )
    front.start()

    sent = makeMessage("from the web server", ["Hello from Postfix.", ".leading dot", "end"])
    reply = sendTo(front.port, sent)
    frontId = re.search(rb"queued as ([0-9A-F]+)", reply).group(1).decode()

    handOver = front.waitForLog(
        rf"{frontId}: to=<bob@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:{relay.port},"
        rf" .*dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as ([0-9A-Z]{{16}})\)")
    relayId = handOver.group(1)
    front.waitForLog(rf"Verified TLS connection established to {re.escape(HOST)}\[{re.escape(HOST)}\]:{relay.port}")
    relay.waitForLog(rf"\b{relayId}: client=\S*\[{re.escape(HOST)}\], sasl_method=(PLAIN|LOGIN), "
                     rf"sasl_username={re.escape(USER)}$")
    relay.waitForLog(rf"\b{relayId}: to=<bob@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
                     rf"{sink.port}, .*status=sent")
    relay.waitForLog(rf"\b{relayId}: removed\b")

    [arrived] = sink.waitForMessages(1)
    assert arrived.envelope["mail_from"] == USER
    assert arrived.envelope["rcpt_tos"] == ["bob@remote.test"]
    relayReceived, frontReceived = arrivedIntact(arrived.content, sent, 2)
    assert re.match(rb"Received: from front\.test\.example \(\S+ \[127\.0\.0\.1\]\)\r\n"
                    rb"\t\(using TLSv1\.[23] with cipher ", relayReceived), relayReceived
    assert f"(relayd) with ESMTPSA id {relayId}".encode() in relayReceived
    assert b"by front.test.example (Postfix) with ESMTP id " + frontId.encode() in frontReceived
    # Once: nothing else arrives, the front queue is empty.
    front.waitForLog(rf"{frontId}: removed")
    assert len(sink.messages()) == 1


@pytest.fixture
def smarthost(sink, startPostfix):
    """A Postfix smarthost on loopback: STARTTLS and SASL (sasldb2) required, relaying to the sink."""
    absent = missing(SASLPASSWD2)
    if absent:
        pytest.skip(f"{absent[0]} not installed (Debian package sasl2-bin; .ci/run installs it)")
    import trustme

    ca = trustme.CA()
    instance = startPostfix("smarthost", {})
    ca.issue_cert(HOST, "smarthost.test.example").private_key_and_cert_chain_pem.write_to_path(
        str(instance.path("chain.pem")))
    ca.cert_pem.write_to_path(str(instance.path("ca.pem")))
    instance.path("ca.pem").chmod(0o644)
    user, realm = SMARTHOST_USER.split("@")
    instance.enableSaslServer(user, realm, SMARTHOST_PASSWORD)
    instance.configure(
        relayhost=f"[{HOST}]:{sink.port}",
        smtpd_tls_chain_files=str(instance.path("chain.pem")),
        smtpd_tls_security_level="encrypt",
        smtpd_tls_auth_only="yes",
        smtpd_tls_loglevel="1",
        smtpd_relay_restrictions="permit_sasl_authenticated, reject",
    )
    return instance.start()


def relayToSmarthost(tmp_path, processes, smarthost, password: str) -> SubmissionRelayd:
    secret = tmp_path / "smarthost.secret"
    secret.write_text(password + "\n")
    return startRelay(
        tmp_path, processes,
        f"{{host: {HOST}, port: {smarthost.port}, tls: starttls, verify: true, "
        f"ca_file: {smarthost.path('ca.pem')}, username: {SMARTHOST_USER}, "
        f"password_file: {secret}}}")


def submit(relay: SubmissionRelayd, message: bytes) -> str:
    """Submission with STARTTLS and AUTH (smtplib); the queue id."""
    context = ssl.create_default_context()
    relay.ca.configure_trust(context)
    with relay.connect() as client:
        client.starttls(context=context)
        client.login(USER, PASSWORD)
        client.mail(USER)
        assert client.rcpt("bob@remote.test")[0] == 250
        code, reply = client.data(message)
        assert code == 250, (code, reply)
        return re.search(rb"queued as ([0-9A-Z]{16})", reply).group(1).decode()


def smarthostDelivery(relay, smarthost, qid, status: str) -> re.Match:
    return relay.waitForLog(
        rf"\b{qid}: to=<bob@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
        rf"{smarthost.port}, .*status={status} \((.*)\)$")


def test_postfix_smarthost_requires_tls_and_sasl_and_a_wrong_password_defers(
        tmp_path, processes, sink, smarthost):
    relay = relayToSmarthost(tmp_path, processes, smarthost, SMARTHOST_PASSWORD)
    sent = makeMessage("to the smarthost", ["Through Postfix.", "..two dots", "end"])
    qid = submit(relay, sent)
    delivered = smarthostDelivery(relay, smarthost, qid, "sent")
    smarthostId = re.search(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", delivered.group(1)).group(1)
    relay.waitForLog(rf"Verified TLS connection established to {re.escape(HOST)}\[{re.escape(HOST)}\]:"
                     rf"{smarthost.port}: TLSv1\.[23] ")
    smarthost.waitForLog(rf"{smarthostId}: client=\S+\[127\.0\.0\.1\], sasl_method=(PLAIN|LOGIN), "
                         rf"sasl_username={re.escape(SMARTHOST_USER)}$")
    smarthost.waitForLog(rf"{smarthostId}: to=<bob@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
                         rf"{sink.port}, .*status=sent")
    [arrived] = sink.waitForMessages(1)
    assert arrived.envelope["mail_from"] == USER
    assert arrived.envelope["rcpt_tos"] == ["bob@remote.test"]
    smarthostReceived, relayReceived = arrivedIntact(arrived.content, sent, 2)
    assert b"by smarthost.test.example (Postfix) with ESMTPSA id " + smarthostId.encode() in smarthostReceived
    assert f"by {HOSTNAME} (relayd) with ESMTPSA id {qid}".encode() in relayReceived

    # A wrong password: the attempt is deferred, the message stays queued,
    # and relayd never tries again without TLS or without AUTH.
    (tmp_path / "smarthost.secret").write_text("not the password\n")
    offset = relay.logOffset()
    relay.signal(signal.SIGHUP)
    relay.waitForLog(r"reload: configuration .* applied", since=offset)
    second = makeMessage("wrong password", ["Stays queued."])
    qid2 = submit(relay, second)
    refused = smarthostDelivery(relay, smarthost, qid2, "deferred")
    assert "dsn=4.7.8, " in refused.group(0), refused.group(0)
    assert "said: 535 5.7.8 " in refused.group(1), refused.group(0)
    smarthost.waitForLog(r"warning: \S+\[127\.0\.0\.1\]: SASL (PLAIN|LOGIN) authentication failed")
    assert relayctl(relay, "flush").returncode == 0
    relay.waitForLog(rf"\b{qid2}: to=<bob@remote\.test>, .*status=deferred", since=refused.end())
    # Postfix's disconnect line counts each session's commands: every
    # session relayd held started TLS, and none sent mail after a failed AUTH.
    # Postfix writes that line once the session has closed, through its log
    # daemon: it may come after relayd's own line about the attempt.
    def sessionLines() -> list[str]:
        return re.findall(r"smtpd\[\d+\]: disconnect from .* ehlo=.*$", smarthost.log(), re.MULTILINE)

    sessions = waitUntil(
        lambda: (lambda found: found if sum("auth=0/1 " in s for s in found) >= 2 else None)(
            sessionLines()),
        DELIVERY_DEADLINE, "Postfix's disconnect lines of the two sessions with a failed AUTH",
        smarthost.describe)
    assert len(sessions) >= 3, smarthost.describe()
    for session in sessions:
        assert "starttls=1 " in session, session
        assert "auth=1 " in session or "mail=" not in session, session
    assert sum("auth=0/1 " in session for session in sessions) >= 2, sessions
    assert len(sink.messages()) == 1
    shown = relayctl(relay, "list")
    assert qid2 in shown.stdout, shown.stdout + shown.stderr

    # The right password again (SIGHUP): the queued message goes out.
    (tmp_path / "smarthost.secret").write_text(SMARTHOST_PASSWORD + "\n")
    offset = relay.logOffset()
    relay.signal(signal.SIGHUP)
    relay.waitForLog(r"reload: configuration .* applied", since=offset)
    assert relayctl(relay, "flush").returncode == 0
    relay.waitForLog(rf"\b{qid2}: to=<bob@remote\.test>, .*status=sent", since=offset)
    _, again = sink.waitForMessages(2)
    arrivedIntact(again.content, second, 2)


def test_postfix_smarthost_down_defers_and_delivers_once_it_is_back(
        tmp_path, processes, sink, smarthost):
    relay = relayToSmarthost(tmp_path, processes, smarthost, SMARTHOST_PASSWORD)
    smarthost.stop()
    sent = makeMessage("smarthost down", ["Waits in the queue."])
    qid = submit(relay, sent)
    relay.waitForLog(rf"\b{qid}: to=<bob@remote\.test>, relay=none, .*dsn=4\.4\.1, status=deferred "
                     rf"\(connect to {re.escape(HOST)}\[{re.escape(HOST)}\]:{smarthost.port}: "
                     rf"Connection refused\)$")
    assert relayctl(relay, "list").stdout.count(qid) == 1

    smarthost.start()
    offset = relay.logOffset()
    assert relayctl(relay, "flush").returncode == 0
    delivered = relay.waitForLog(rf"\b{qid}: to=<bob@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
                                 rf"{smarthost.port}, .*status=sent \((.*)\)$", since=offset)
    smarthostId = re.search(r"queued as ([0-9A-F]+)", delivered.group(1)).group(1)
    smarthost.waitForLog(rf"{smarthostId}: client=\S+\[127\.0\.0\.1\], sasl_method=(PLAIN|LOGIN), "
                         rf"sasl_username={re.escape(SMARTHOST_USER)}$")
    relay.waitForLog(rf"\b{qid}: removed\b", since=offset)
    [arrived] = sink.waitForMessages(1)
    assert arrived.envelope["mail_from"] == USER
    arrivedIntact(arrived.content, sent, 2)
