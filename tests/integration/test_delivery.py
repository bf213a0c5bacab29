"""
Outbound delivery against real servers on loopback: aiosmtpd with STARTTLS,
implicit TLS and AUTH (certificates from a trustme CA), a fake server that
injects a reply before the TLS handshake, a DNS server under the test's
control (tests/dnsserver.py) for MX delivery, and Postfix's smtp-sink. The
courier runs with the real reactor in a subprocess (runScenario); the last
test runs the whole daemon (twistd relayd) with MX delivery.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import threading

import pytest

from tests.integration.harness import HOST, Relayd, makeMessage, waitUntil
from tests.test_courier import freePort, runScenario, waitForPort

pytestmark = pytest.mark.integration

SMTP_SINK = "/usr/sbin/smtp-sink"
PASSWORD = "s3cret-pa55"


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def caFile(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def serverContext(ca, *names):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


class Capture:
    """aiosmtpd handler: records envelopes; RCPT limit for the 452 case."""

    def __init__(self, rcptLimit=None):
        self.envelopes = []
        self.rcptLimit = rcptLimit
        self.auths = []
        self.peers = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        if self.rcptLimit is not None and len(envelope.rcpt_tos) >= self.rcptLimit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope, session.ssl is not None, session.authenticated))
        self.peers.append(session.peer)
        return "250 2.0.0 Ok: captured"

    def authenticator(self, server, session, envelope, mechanism, data):
        from aiosmtpd.smtp import AuthResult

        self.auths.append(mechanism)
        ok = data.login == b"relay" and data.password == PASSWORD.encode()
        # handled=False: aiosmtpd itself answers 535 to a failure.
        return AuthResult(success=ok, handled=ok)


@pytest.fixture
def aiosmtpd(ca):
    """Factory: a running aiosmtpd Controller on 127.0.0.1; stopped at teardown."""
    controllerModule = pytest.importorskip("aiosmtpd.controller")
    started = []

    def start(handler, names=("127.0.0.1",), implicit=False, **smtp):
        context = serverContext(ca, *names)
        port = freePort()
        kwargs = dict(hostname=HOST, port=port, server_hostname="upstream.test")
        if implicit:
            kwargs["ssl_context"] = context
        else:
            kwargs["tls_context"] = context
        controller = controllerModule.Controller(
            handler, authenticator=handler.authenticator, **kwargs, **smtp)
        controller.start()
        started.append(controller)
        return port

    yield start
    for controller in started:
        controller.stop()


def password(tmp_path):
    path = tmp_path / "upstream.secret"
    path.write_text(PASSWORD + "\n")
    return str(path)


# -- TLS and AUTH to a smarthost ----------------------------------------------------


def test_starttls_and_auth_to_smarthost(tmp_path, aiosmtpd, caFile):
    handler = Capture()
    port = aiosmtpd(handler, require_starttls=True, auth_required=True, auth_require_tls=True)
    secret = password(tmp_path)
    attempt = runScenario(tmp_path, [{"host": HOST, "port": port, "tls": "starttls", "caFile": caFile,
                                      "username": "relay", "passwordFile": secret}],
                          passwords={secret: PASSWORD})
    [r] = attempt["results"]
    assert (r["status"], r["text"]) == ("sent", "250 2.0.0 Ok: captured")
    assert attempt["relay"] == f"{HOST}[{HOST}]:{port}"
    [(envelope, encrypted, authenticated)] = handler.envelopes
    assert encrypted and authenticated
    assert handler.auths == ["PLAIN"]
    [tlsLine] = [l for l in attempt["log"] if "TLS connection established" in l]
    assert tlsLine.startswith(f"Verified TLS connection established to {HOST}[{HOST}]:{port}: TLSv1.")
    assert PASSWORD not in json.dumps(attempt)


def test_implicit_tls_and_auth_login(tmp_path, aiosmtpd, caFile):
    handler = Capture()
    # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; the whole
    # connection is TLS here.
    port = aiosmtpd(handler, implicit=True, auth_required=True, auth_require_tls=False,
                    auth_exclude_mechanism=["PLAIN"])
    secret = password(tmp_path)
    attempt = runScenario(tmp_path, [{"host": HOST, "port": port, "tls": "implicit", "caFile": caFile,
                                      "username": "relay", "passwordFile": secret}],
                          passwords={secret: PASSWORD})
    assert attempt["results"][0]["status"] == "sent", attempt["results"]
    assert handler.auths == ["LOGIN"]
    assert handler.envelopes[0][2] is True
    assert any(l.startswith("Verified TLS connection established") for l in attempt["log"])


def test_wrong_password_defers_after_one_try(tmp_path, aiosmtpd, caFile):
    handler = Capture()
    port = aiosmtpd(handler, require_starttls=True, auth_required=True)
    secret = password(tmp_path)
    attempt = runScenario(tmp_path, [{"host": HOST, "port": port, "tls": "starttls", "caFile": caFile,
                                      "username": "relay", "passwordFile": secret}],
                          passwords={secret: "wrong"})
    [r] = attempt["results"]
    assert r["status"] == "deferred"
    assert r["dsn"].startswith("4.7."), r
    assert r["text"].startswith(f"SASL authentication failed; server {HOST}[{HOST}] said: 535")
    assert handler.auths == ["PLAIN"]  # never retried
    assert handler.envelopes == []


def test_certificate_for_another_name_defers_and_never_sends_plaintext(tmp_path, aiosmtpd, caFile):
    handler = Capture()
    port = aiosmtpd(handler, names=("other.example",))
    attempt = runScenario(tmp_path, [{"host": HOST, "port": port, "tls": "starttls", "caFile": caFile}])
    [r] = attempt["results"]
    assert (r["status"], r["dsn"]) == ("deferred", "4.7.5")
    assert r["text"].startswith(f"TLS handshake with {HOST}[{HOST}] failed:")
    assert handler.envelopes == []


def test_untrusted_certificate_fails_over_to_next_smarthost(tmp_path, aiosmtpd, caFile):
    bad, good = Capture(), Capture()
    badPort = aiosmtpd(bad)
    goodPort = aiosmtpd(good)
    attempt = runScenario(tmp_path, [
        {"host": HOST, "port": badPort, "tls": "starttls"},  # system CAs: the test CA is unknown
        {"host": HOST, "port": goodPort, "tls": "starttls", "caFile": caFile},
    ])
    assert attempt["relay"] == f"{HOST}[{HOST}]:{goodPort}"
    assert attempt["results"][0]["status"] == "sent"
    assert bad.envelopes == [] and len(good.envelopes) == 1


def test_opportunistic_tls_encrypts_without_verification(tmp_path, aiosmtpd):
    handler = Capture()
    port = aiosmtpd(handler, names=("other.example",))
    attempt = runScenario(tmp_path, [{"host": HOST, "port": port, "tls": "may"}])
    assert attempt["results"][0]["status"] == "sent"
    assert handler.envelopes[0][1] is True
    assert any(l.startswith("Untrusted TLS connection established") for l in attempt["log"]), attempt["log"]


def test_required_tls_not_offered_defers(tmp_path, smtpSinkPlain):
    attempt = runScenario(tmp_path, [{"host": HOST, "port": smtpSinkPlain, "tls": "starttls"}])
    [r] = attempt["results"]
    assert (r["status"], r["dsn"]) == ("deferred", "4.7.4")
    assert r["text"] == f"TLS is required, but was not offered by host {HOST}[{HOST}]"


@pytest.fixture
def smtpSinkPlain():
    """smtp-sink without STARTTLS (-e: no ESMTP extensions but EHLO works)."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("Postfix's smtp-sink is not installed")
    port = freePort()
    args = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"{HOST}:{port}", "5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waitForPort(port, proc)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


# -- STARTTLS response injection ----------------------------------------------------------


class InjectingServer(threading.Thread):
    """
    Answers STARTTLS with "220 ready" and an injected "250 fake" in the same
    packet, then really starts TLS. A client that read the injected line as
    the EHLO reply would see no AUTH and fail; one that discards it
    authenticates and delivers.
    """

    def __init__(self, context):
        super().__init__(daemon=True)
        self.context = context
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.commands = []
        self.error = None

    def run(self):
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(20)
            reader = conn.makefile("rb")
            conn.sendall(b"220 mitm.test ESMTP\r\n")
            self.commands.append(reader.readline())
            conn.sendall(b"250-mitm.test\r\n250 STARTTLS\r\n")
            self.commands.append(reader.readline())
            conn.sendall(b"220 ready\r\n250 fake\r\n")
            tls = self.context.wrap_socket(conn, server_side=True)
            reader = tls.makefile("rb")
            replies = {b"EHLO": b"250-mitm.test\r\n250 AUTH PLAIN\r\n", b"AUTH": b"235 2.7.0 ok\r\n",
                       b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n",
                       b"QUIT": b"221 bye\r\n"}
            while True:
                line = reader.readline()
                if not line:
                    break
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == b"DATA":
                    tls.sendall(replies[verb])
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    tls.sendall(b"250 2.0.0 stored\r\n")
                    continue
                tls.sendall(replies.get(verb, b"500 what\r\n"))
                if verb == b"QUIT":
                    break
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.listener.close()


def test_reply_injected_before_tls_handshake_is_discarded(tmp_path, ca, caFile):
    server = InjectingServer(serverContext(ca, "127.0.0.1"))
    server.start()
    secret = password(tmp_path)
    attempt = runScenario(tmp_path, [{"host": HOST, "port": server.port, "tls": "starttls",
                                      "caFile": caFile, "username": "relay", "passwordFile": secret}],
                          passwords={secret: PASSWORD})
    server.join(30)
    assert server.error is None, server.error
    assert attempt["results"][0]["status"] == "sent", attempt["results"]
    verbs = [c.split()[0].upper() for c in server.commands]
    assert verbs[:5] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH", b"MAIL"]
    assert base64.b64decode(server.commands[3].split()[2]) == b"\0relay\0" + PASSWORD.encode()


# -- per-recipient results -----------------------------------------------------------


def test_too_many_recipients_go_in_another_transaction(tmp_path, aiosmtpd):
    handler = Capture(rcptLimit=2)
    port = aiosmtpd(handler)
    recipients = [f"r{i}@example.org" for i in range(5)]
    attempt = runScenario(tmp_path, [[HOST, port]], recipients)
    assert [r["status"] for r in attempt["results"]] == ["sent"] * 5
    assert [e.rcpt_tos for e, _, _ in handler.envelopes] == [
        recipients[0:2], recipients[2:4], recipients[4:5]]


def test_eight_bit_body_to_peer_without_8bitmime_bounces(tmp_path):
    server = socket.create_server((HOST, 0))
    port = server.getsockname()[1]
    seen = []

    def serve():
        conn, _ = server.accept()
        conn.settimeout(20)
        reader = conn.makefile("rb")
        conn.sendall(b"220 old.test ESMTP\r\n")
        while True:
            line = reader.readline()
            if not line:
                break
            seen.append(line)
            if line.upper().startswith(b"EHLO"):
                conn.sendall(b"250-old.test\r\n250 PIPELINING\r\n")
            elif line.upper().startswith(b"QUIT"):
                conn.sendall(b"221 bye\r\n")
                break
            else:
                conn.sendall(b"250 ok\r\n")
        conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    attempt = runScenario(tmp_path, [[HOST, port]], body="Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode())
    thread.join(30)
    [r] = attempt["results"]
    assert (r["status"], r["dsn"], r["code"]) == ("bounced", "5.6.3", 554)
    assert "does not support 8BITMIME" in r["text"]
    assert not any(l.upper().startswith(b"MAIL") for l in seen)


# -- MX delivery through a DNS server under the test's control -------------------------


@pytest.fixture
def mxDns(dnsServer):
    """Factory: tests/dnsserver.py serving a zone; returns [host, port]."""
    return lambda zone: [HOST, dnsServer(zone)]


@pytest.fixture
def sinkPort(aiosmtpd):
    handler = Capture()
    return handler, aiosmtpd(handler)


def zone(sinkAddress="127.0.0.1"):
    return {
        "mx.test": {"MX": [[10, "mx1.mx.test"], [20, "mx2.mx.test"]]},
        "mx1.mx.test": {"A": ["127.0.0.66"]},  # nothing listens there: fail over
        "mx2.mx.test": {"A": [sinkAddress]},
        "afallback.test": {"A": [sinkAddress]},
        "null.test": {"MX": [[0, ""]]},
        "servfail.test": "SERVFAIL",
        "empty.test": {},
    }


def test_mx_delivery_in_preference_order_with_failover(tmp_path, mxDns, sinkPort):
    handler, port = sinkPort
    dns = mxDns(zone())
    attempt = runScenario(tmp_path, [{"mx": "mx.test", "port": port, "tls": "may"}],
                          ["a@mx.test", "b@mx.test"], dns=[dns])
    assert attempt["relay"] == f"mx2.mx.test[127.0.0.1]:{port}"
    assert [r["status"] for r in attempt["results"]] == ["sent", "sent"]
    assert handler.envelopes[0][0].rcpt_tos == ["a@mx.test", "b@mx.test"]
    assert handler.envelopes[0][1] is True  # opportunistic STARTTLS was used


def test_a_record_fallback_without_mx(tmp_path, mxDns, sinkPort):
    handler, port = sinkPort
    attempt = runScenario(tmp_path, [{"mx": "afallback.test", "port": port}], ["a@afallback.test"],
                          dns=[mxDns(zone())])
    assert attempt["relay"] == f"afallback.test[127.0.0.1]:{port}"
    assert attempt["results"][0]["status"] == "sent"


@pytest.mark.parametrize("domain, status, dsn", [
    ("null.test", "bounced", "5.1.10"),
    ("nxdomain.test", "bounced", "5.1.2"),
    ("servfail.test", "deferred", "4.4.3"),
    ("empty.test", "bounced", "5.4.4"),
])
def test_dns_outcomes(tmp_path, mxDns, domain, status, dsn):
    attempt = runScenario(tmp_path, [{"mx": domain, "port": 25}], [f"a@{domain}"],
                          dns=[mxDns(zone())])
    [r] = attempt["results"]
    assert (attempt["relay"], r["status"], r["dsn"]) == ("none", status, dsn)


def test_mx_pointing_at_relayd_itself_bounces(tmp_path, mxDns, sinkPort):
    handler, port = sinkPort
    attempt = runScenario(tmp_path, [{"mx": "afallback.test", "port": port}], ["a@afallback.test"],
                          dns=[mxDns(zone())], local=[["0.0.0.0", port]])
    [r] = attempt["results"]
    assert (r["status"], r["dsn"]) == ("bounced", "5.4.6")
    assert handler.envelopes == []


@pytest.mark.parametrize("selfPreference, status", [(20, "sent"), (10, "bounced")])
def test_relayd_as_backup_mx(tmp_path, mxDns, sinkPort, selfPreference, status):
    # relayd "listens" on 127.0.0.2 only: the sink on 127.0.0.1 is another host.
    handler, port = sinkPort
    backup = {
        "backup.test": {"MX": [[10, "primary.backup.test"], [selfPreference, "self.backup.test"]]},
        "primary.backup.test": {"A": ["127.0.0.1"]},
        "self.backup.test": {"A": ["127.0.0.2"]},
    }
    attempt = runScenario(tmp_path, [{"mx": "backup.test", "port": port}], ["a@backup.test"],
                          dns=[mxDns(backup)], local=[["127.0.0.2", port]])
    [r] = attempt["results"]
    assert r["status"] == status
    if status == "sent":
        assert attempt["relay"] == f"primary.backup.test[127.0.0.1]:{port}"
        assert [e.rcpt_tos for e, _, _ in handler.envelopes] == [["a@backup.test"]]
    else:
        # relayd shares the best preference: the mail would come back.
        assert r["dsn"] == "5.4.6"
        assert handler.envelopes == []


def test_two_messages_share_one_connection(tmp_path, aiosmtpd):
    handler = Capture()
    port = aiosmtpd(handler)
    attempt = runScenario(tmp_path, [[HOST, port]], messages=2)
    assert [a["results"][0]["status"] for a in attempt["attempts"]] == ["sent", "sent"]
    assert len(handler.peers) == 2
    assert handler.peers[0] == handler.peers[1]  # the same client port: one connection


# -- the daemon: MX delivery end to end -------------------------------------------------


def test_daemon_delivers_by_mx_and_logs_the_relay(tmp_path, processes, twistd, mxDns, sinkPort):
    handler, port = sinkPort
    dns = mxDns(zone())
    daemon = Relayd(tmp_path / "relayd", port)
    extra = (f"  mx_port: {port}\n"
             f"  dns: {{servers: [\"{dns[0]}:{dns[1]}\"], timeout: 3s}}\n")
    text = daemon.configText(port).replace(
        f"  smarthosts:\n    - host: {HOST}\n      port: {port}\n      tls: none\n", extra)
    daemon.writeConfig(text)
    processes.append(daemon)
    daemon.start()
    queueId = daemon.submit(makeMessage("mx", ["hello"]), recipients=("bob@mx.test", "eve@null.test"))
    daemon.waitForLog(rf"{queueId}: to=<bob@mx\.test>, relay=mx2\.mx\.test\[127\.0\.0\.1\]:{port}, .*status=sent")
    daemon.waitForLog(rf"{queueId}: to=<eve@null\.test>, relay=none, .*dsn=5\.1\.10, status=bounced")
    assert [e.rcpt_tos for e, _, _ in handler.envelopes] == [["bob@mx.test"]]
    # Stopped here, before the upstream: relayd QUITs its idle connection.
    assert daemon.terminate() == 0
