"""
Dialogues for submission security over StringTransport: STARTTLS, implicit
TLS, AUTH PLAIN/LOGIN, relay policy and limits. Exact bytes in, exact
replies out, and what was or was not queued.

Passwords are checked by relayd's real checker and password file (bcrypt
at the lowest cost, so the suite stays fast); only the thread pool is a
stand-in that runs the check at once, or holds it until the test says so.
"""

from __future__ import annotations

import base64

import pytest
from passlib.hash import bcrypt
from twisted.cred.portal import Portal
from twisted.internet import address, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import config, server
from relayd.auth import PasswordFile, PasswordFileChecker, Realm, Verifier
from tests.dialogue import Dialogue
from tests.test_server import MemorySpool

HOSTNAME = "relay.test"
PASSWORDS = {"alice@example.com": "alice-secret", "printer": "printer-secret",
             "long": "l" * 60}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}".encode())


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS and then looks like a TLS session."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tlsContext = None
        self.beforeTLS = b""

    def startTLS(self, contextFactory):
        self.tlsContext = contextFactory
        self.beforeTLS = self.value()

    def getHandle(self):
        return FakeTLSConnection() if self.tlsContext is not None or self.implicit else None

    implicit = False


class FakeTLSConnection:
    def get_protocol_version_name(self):
        return "TLSv1.3"

    def get_cipher_name(self):
        return "TLS_AES_256_GCM_SHA384"

    def get_cipher_bits(self):
        return 256


class InlinePool:
    """Runs the verification at once, or holds it while ``hold`` is set."""

    def __init__(self):
        self.hold = False
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        if self.hold:
            self.held.append((onResult, f, args, kw))
            return
        self._run(onResult, f, args, kw)

    def _run(self, onResult, f, args, kw):
        try:
            result = f(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def release(self):
        held, self.held = self.held, []
        for item in held:
            self._run(*item)


class InlineReactor:
    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


def writePasswordFile(path, users=PASSWORDS):
    path.write_text("".join(f"{u}:{bcrypt.using(rounds=4).hash(p)}\n" for u, p in users.items()))


def makeConfig(tmp_path, extra: str = "", limits: str = "", trusted='["127.0.0.0/8"]'):
    text = f"""
hostname: {HOSTNAME}
listeners:
  - {{endpoint: "tcp:587", tls: starttls, auth: required}}
tls: {{certificate: cert.pem, key: key.pem}}
auth:
  password_file: {tmp_path / "passwd"}
  senders: {{printer: ["scanner@example.com", "@example.org"]}}
  failure_limit: 3
  failure_window: 10m
{extra}
relay: {{trusted_networks: {trusted}}}
limits: {{recipients: 100{limits}}}
queue: {{directory: {tmp_path / "spool"}}}
delivery: {{smarthosts: [{{host: 192.0.2.1, tls: none}}]}}
"""
    return config.parse(text, str(tmp_path / "relayd.yaml"))


class Harness(Dialogue):
    def __init__(self, tmp_path, **configArgs):
        writePasswordFile(tmp_path / "passwd")
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = MemorySpool()
        self.spool.directory = str(tmp_path)  # for the free-space check at MAIL
        self.queued = []
        self.pool = InlinePool()
        self.config = makeConfig(tmp_path, **configArgs)
        verifier = Verifier(PasswordFile(str(tmp_path / "passwd")), self.config.auth.cache)
        self.portal = Portal(Realm(self.config.auth),
                             [PasswordFileChecker(verifier, InlineReactor(), self.pool)])
        self.tls = object()  # the context factory is only handed to startTLS here
        self.factory = server.SubmissionFactory(
            self.config, self.spool, lambda w, e: w.commit(e), self.queued.append, self.clock,
            portal=self.portal, tls=self.tls)

    def connect(self, tls="starttls", auth="required", peer="192.0.2.50", plaintextAuth=False,
                endpoint="tcp:587"):
        listener = config.Listener(endpoint, tls, auth, plaintextAuth)
        self.transport = TLSStringTransport(
            peerAddress=address.IPv4Address("TCP", peer, 40000),
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", 587))
        self.transport.implicit = tls == "implicit"
        self.proto = self.factory.forListener(listener).buildProtocol(None)
        self.proto.makeConnection(self.transport)
        return self.take()


    def startTLS(self) -> None:
        assert self.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
        assert self.transport.tlsContext is self.tls

    def login(self, user="alice@example.com", password=None):
        password = PASSWORDS[user] if password is None else password
        return self.send(b"AUTH PLAIN " + plain(user, password) + b"\r\n")

    def ready(self, user="alice@example.com", **kw):
        """Connected, TLS, EHLO, and logged in as ``user``."""
        self.connect(**kw)
        self.startTLS()
        self.send(b"EHLO client.test\r\n")
        assert self.login(user) == ["235 2.7.0 Authentication successful"]


@pytest.fixture
def hs(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [e["log_line"] for e in events if "log_line" in e]
    globalLogPublisher.removeObserver(events.append)


EHLO_PLAIN = ["250-relay.test", "250-PIPELINING", "250-SIZE 10000000", "250-STARTTLS",
              "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250 DSN"]
EHLO_TLS = ["250-relay.test", "250-PIPELINING", "250-SIZE 10000000", "250-AUTH PLAIN LOGIN",
            "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250 DSN"]


# STARTTLS


def test_starttls_advertised_before_tls_and_auth_only_after(hs):
    hs.connect()
    assert hs.send(b"EHLO client.test\r\n") == EHLO_PLAIN
    hs.startTLS()
    assert hs.send(b"EHLO client.test\r\n") == EHLO_TLS


def test_commands_pipelined_behind_starttls_are_discarded(hs, logged):
    """CVE-2011-0411: the RSET injected in plaintext is never answered, in or out of TLS."""
    hs.connect()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"STARTTLS\r\nRSET\r\n") == ["220 2.0.0 Ready to start TLS"]
    assert hs.transport.tlsContext is hs.tls
    # The next bytes are the first ones out of the TLS session.
    assert hs.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]
    assert any("discarded 6 bytes sent after STARTTLS" in line for line in logged())


def test_starttls_forgets_helo_envelope_and_auth(hs):
    # A trusted client on an optional listener starts a transaction in plaintext.
    hs.connect(auth="optional", peer="127.0.0.1")
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["250 2.1.0 Ok"]
    hs.startTLS()
    assert hs.send(b"RCPT TO:<b@example.org>\r\n") == ["503 5.5.1 Error: need MAIL command"]
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["503 5.5.1 Error: send HELO/EHLO first"]


def test_plaintext_auth_does_not_survive_starttls(tmp_path):
    hs = Harness(tmp_path)
    hs.connect(auth="required", endpoint="tcp:2525:interface=127.0.0.1", plaintextAuth=True)
    hs.send(b"EHLO client.test\r\n")
    assert hs.login() == ["235 2.7.0 Authentication successful"]
    hs.startTLS()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"MAIL FROM:<alice@example.com>\r\n") == ["530 5.7.0 Authentication required"]


@pytest.mark.parametrize("tls, first, command, reply", [
    ("starttls", True, b"STARTTLS\r\n", "503 5.5.1 Error: TLS already active"),
    ("starttls", False, b"STARTTLS now\r\n", "501 5.5.4 Syntax: STARTTLS"),
    ("implicit", False, b"STARTTLS\r\n", "503 5.5.1 Error: TLS already active"),
    ("none", False, b"STARTTLS\r\n", "502 5.5.1 Error: command not implemented"),
])
def test_starttls_refusals(hs, tls, first, command, reply):
    hs.connect(tls=tls, auth="none")
    hs.send(b"EHLO client.test\r\n")
    if first:
        hs.startTLS()
    hs.transport.tlsContext = None
    assert hs.send(command) == [reply]
    assert hs.transport.tlsContext is None


def test_implicit_tls_advertises_auth_and_no_starttls(hs):
    assert hs.connect(tls="implicit") == ["220 relay.test ESMTP relayd"]
    assert hs.send(b"EHLO client.test\r\n") == EHLO_TLS


def test_stalled_handshake_is_aborted_without_a_reply(hs):
    hs.connect(tls="implicit")
    hs.take()
    hs.clock.advance(hs.config.limits.commandTimeout)
    assert hs.transport.value() == b""
    assert hs.proto._closing


def test_idle_session_times_out(hs):
    hs.connect()
    hs.send(b"EHLO client.test\r\n")
    hs.clock.advance(hs.config.limits.commandTimeout)
    assert hs.take() == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert hs.transport.disconnecting


# AUTH: when and how


def test_auth_before_tls_is_refused(hs):
    hs.connect()
    hs.send(b"EHLO client.test\r\n")
    assert hs.login() == ["538 5.7.11 Encryption required for requested authentication mechanism"]


def test_mail_before_auth_on_required_listener_even_from_trusted_network(hs):
    hs.connect(peer="127.0.0.1")
    hs.startTLS()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["530 5.7.0 Authentication required"]


def test_optional_listener_relays_for_trusted_networks_only(hs):
    hs.connect(auth="optional", peer="127.0.0.1")
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    assert hs.send(b"RCPT TO:<b@example.org>\r\n") == ["250 2.1.5 Ok"]
    hs.connect(auth="optional", peer="192.0.2.50")
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    assert hs.send(b"RCPT TO:<b@example.org>\r\n") == [
        "554 5.7.1 <b@example.org>: Relay access denied"]


def test_auth_plain_then_message_is_queued_with_identity_and_received_header(hs, logged):
    hs.ready()
    assert hs.send(b"MAIL FROM:<alice@example.com> AUTH=alice+40example.com\r\n") == ["250 2.1.0 Ok"]
    assert hs.send(b"RCPT TO:<bob@example.org>\r\n") == ["250 2.1.5 Ok"]
    assert hs.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    out = hs.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert out[0].startswith("250 2.0.0 Ok: queued as ")
    (envelope, body), = hs.spool.committed.values()
    assert envelope.authIdentity == "alice@example.com"
    assert "AUTH" not in envelope.mailParams  # the client's claim is not passed on
    header = body.split(b"\r\n")[:4]
    assert header[1] == b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
    assert header[2].startswith(b"\tby relay.test (relayd) with ESMTPSA id ")
    assert b"alice" not in body.split(b"\r\n\r\n")[0]  # received_header_user defaults to false
    assert any(line.endswith("client=unknown[192.0.2.50], sasl_method=PLAIN, "
                             "sasl_username=alice@example.com") for line in logged())


def test_received_header_names_the_user_when_configured(tmp_path):
    hs = Harness(tmp_path, extra="  received_header_user: true")
    hs.ready()
    hs.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    hs.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    (_, body), = hs.spool.committed.values()
    assert body.split(b"\r\n")[2] == b"\t(Authenticated sender: alice@example.com)"


def test_auth_plain_with_empty_initial_response_prompts(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"AUTH PLAIN\r\n") == ["334 "]
    assert hs.send(plain("alice@example.com", "alice-secret") + b"\r\n") == [
        "235 2.7.0 Authentication successful"]


def test_auth_login(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert hs.send(b64(b"printer") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert hs.send(b64(b"printer-secret") + b"\r\n") == ["235 2.7.0 Authentication successful"]


def test_auth_login_with_initial_response(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(b"AUTH LOGIN " + b64(b"printer") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert hs.send(b64(b"wrong") + b"\r\n") == [
        "535 5.7.8 Error: authentication failed: authentication failure"]


@pytest.mark.parametrize("before, command, reply", [
    (b"", b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n",
     "503 5.5.1 Error: send HELO/EHLO first"),
    (b"HELO c\r\n", b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n",
     "503 5.5.1 Error: send EHLO first"),
    (b"EHLO c\r\n", b"AUTH CRAM-MD5\r\n", "504 5.5.4 Unsupported authentication mechanism"),
    (b"EHLO c\r\n", b"AUTH\r\n", "501 5.5.4 Syntax: AUTH mechanism"),
    (b"EHLO c\r\n", b"AUTH PLAIN not!base64\r\n", "501 5.5.2 Error: invalid base64 data"),
    (b"EHLO c\r\n", b"AUTH PLAIN " + b64(b"alice-no-nuls") + b"\r\n",
     "501 5.5.2 Error: malformed authentication response"),
    (b"EHLO c\r\n", b"AUTH PLAIN =\r\n", "501 5.5.2 Error: malformed authentication response"),
    (b"EHLO c\r\nAUTH PLAIN\r\n", b"*\r\n", "501 5.7.0 Authentication aborted"),
    (b"EHLO c\r\nAUTH LOGIN\r\n", b"*\r\n", "501 5.7.0 Authentication aborted"),
    (b"EHLO c\r\nAUTH PLAIN\r\n", b"A" * 3000 + b"\r\n",
     "500 5.5.6 Authentication Exchange line is too long"),
    (b"EHLO c\r\n", b"AUTH PLAIN " + b"A" * 3000 + b"\r\n",
     "500 5.5.6 Authentication Exchange line is too long"),
])
def test_auth_protocol_errors(hs, before, command, reply):
    hs.connect()
    hs.startTLS()
    hs.send(before)
    assert hs.send(command) == [reply]
    # The session is still in sync and not authenticated.
    assert hs.proto.authLogin is None
    assert hs.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_auth_during_a_transaction(hs):
    hs.connect(auth="optional", peer="127.0.0.1")
    hs.startTLS()
    hs.send(b"EHLO c\r\nMAIL FROM:<>\r\n")
    assert hs.login() == ["503 5.5.1 Error: MAIL transaction in progress"]


def test_unreadable_password_file_is_a_temporary_failure(hs, tmp_path, logged):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    (tmp_path / "passwd").unlink()
    assert hs.login() == ["454 4.7.0 Temporary authentication failure"]
    assert not hs.factory.authThrottle.blocked("192.0.2.50")
    assert any("SASL PLAIN authentication not checked" in line for line in logged())


def test_non_ascii_initial_response(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    assert hs.send("AUTH PLAIN caf\u00e9\r\n".encode()) == ["501 5.5.2 Error: invalid base64 data"]


def test_auth_twice(hs):
    hs.ready()
    assert hs.login() == ["503 5.5.1 Error: already authenticated"]


def test_auth_not_enabled_on_listener(hs):
    hs.connect(auth="none")
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    assert hs.login() == ["503 5.5.1 Error: authentication not enabled"]


@pytest.mark.parametrize("response, reply", [
    (plain("alice@example.com", "alice-secret", authzid="bob@example.com"),
     "535 5.7.8 Error: authentication failed: authorization identity must be empty or the login"),
    (plain("alice@example.com", "alice-secret", authzid="alice@example.com"),
     "235 2.7.0 Authentication successful"),
    (plain("alice@example.com", ""), "535 5.7.8 Error: authentication failed: authentication failure"),
    (plain("", "alice-secret"), "535 5.7.8 Error: authentication failed: authentication failure"),
    (plain("nobody@example.com", "x"), "535 5.7.8 Error: authentication failed: authentication failure"),
    (plain("alice@example.com", "x" * 73),
     "535 5.7.8 Error: authentication failed: password longer than 72 bytes"),
    (plain("nobody", "x" * 200),
     "535 5.7.8 Error: authentication failed: password longer than 72 bytes"),
    (b64(b"\0alice@example.com\0alice-secret\0extra"),
     "501 5.5.2 Error: malformed authentication response"),
])
def test_plain_responses(hs, response, reply):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"AUTH PLAIN " + response + b"\r\n") == [reply]


def test_failure_log_line_escapes_the_user_name(hs, logged):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    hs.send(b"AUTH PLAIN " + plain("eve\r\nwarning: forged", "x") + b"\r\n")
    assert ("warning: unknown[192.0.2.50]: SASL PLAIN authentication failed: authentication "
            "failure, sasl_username=eve\\x0d\\x0awarning: forged") in logged()


def test_repeated_failures_lock_the_address_out_for_the_window(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    failed = "535 5.7.8 Error: authentication failed: authentication failure"
    assert hs.login(password="bad1") == [failed]
    assert hs.login(password="bad2") == [failed]
    assert hs.login(password="bad3") == [
        failed, "421 4.7.0 relay.test Error: too many failed authentications; try again later"]
    assert hs.transport.disconnecting
    # A new session from the same address, even with the right password.
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    assert hs.login() == ["421 4.7.0 relay.test Error: too many failed authentications; try again later"]
    assert hs.transport.disconnecting
    # Another address is not affected; the locked one is free after the window.
    hs.ready(peer="192.0.2.51")
    hs.clock.advance(600)
    hs.ready()


def test_pipelined_commands_wait_for_the_password_check(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    hs.pool.hold = True
    assert hs.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n"
                   b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nNOOP\r\n") == []
    hs.pool.release()
    assert hs.take() == ["235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok",
                         "250 2.0.0 Ok"]


def test_connection_lost_during_password_check(hs):
    hs.connect()
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    hs.pool.hold = True
    hs.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\nNOOP\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("gone")))
    hs.pool.release()
    assert hs.take() == []


# Relay policy


def test_login_without_senders_entry_may_send_only_as_itself(hs):
    hs.ready()
    assert hs.send(b"MAIL FROM:<bob@example.com>\r\n") == [
        "553 5.7.1 <bob@example.com>: Sender address rejected: not owned by you"]
    assert hs.send(b"MAIL FROM:<ALICE@example.com>\r\n") == ["250 2.1.0 Ok"]
    assert hs.send(b"RSET\r\nMAIL FROM:<>\r\n") == ["250 2.0.0 Ok", "250 2.1.0 Ok"]


@pytest.mark.parametrize("sender, reply", [
    ("scanner@example.com", "250 2.1.0 Ok"),
    ("anyone@example.org", "250 2.1.0 Ok"),
    ("anyone@sub.example.org", "553 5.7.1 <anyone@sub.example.org>: Sender address rejected: not owned by you"),
    ("printer@example.com", "553 5.7.1 <printer@example.com>: Sender address rejected: not owned by you"),
    ("", "250 2.1.0 Ok"),
])
def test_senders_entry_binds_the_login(hs, sender, reply):
    hs.ready(user="printer")
    assert hs.send(f"MAIL FROM:<{sender}>\r\n".encode()) == [reply]


@pytest.mark.parametrize("recipient, reply", [
    ("a%b@example.com", "554 5.7.1 <a%b@example.com>: Relay access denied"),
    ('"a@b"@example.com', '554 5.7.1 <"a@b"@example.com>: Relay access denied'),
    ("b!a@example.com", "554 5.7.1 <b!a@example.com>: Relay access denied"),
    ("@hop.example:a@example.com", "501 5.1.3 Bad recipient address syntax"),
    ("a@b@example.com", "501 5.1.3 Bad recipient address syntax"),
    ("bob@example.org", "250 2.1.5 Ok"),
])
def test_routing_tricks_never_relay(hs, recipient, reply):
    hs.ready()
    hs.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert hs.send(f"RCPT TO:<{recipient}>\r\n".encode()) == [reply]


# Limits


def test_messages_per_user_per_hour(tmp_path):
    hs = Harness(tmp_path, limits=", messages_per_user_per_hour: 2")
    hs.ready()
    for _ in range(2):
        hs.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert hs.send(b"Subject: x\r\n\r\nx\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
    assert hs.send(b"MAIL FROM:<alice@example.com>\r\n") == [
        "450 4.7.1 Error: too many messages from you in the last hour; try again later"]
    hs.clock.advance(3600)
    hs.ready()
    assert hs.send(b"MAIL FROM:<alice@example.com>\r\n") == ["250 2.1.0 Ok"]


def test_errors_per_session(tmp_path):
    hs = Harness(tmp_path, limits=", errors: 3")
    hs.connect()
    assert hs.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n") == [
        "500 5.5.2 Error: command not recognized", "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized", "421 4.7.0 relay.test Error: too many errors"]
    assert hs.transport.disconnecting


def test_greeting_delay_refuses_clients_that_talk_first(tmp_path):
    hs = Harness(tmp_path, limits=", greeting_delay: 5s")
    assert hs.connect() == []
    assert hs.send(b"EHLO bot\r\n") == ["554 5.5.1 Error: SMTP protocol synchronization"]
    assert hs.transport.disconnecting
    assert hs.connect() == []
    hs.clock.advance(5)
    assert hs.take() == ["220 relay.test ESMTP relayd"]
    assert hs.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_ehlo_name_cannot_inject_a_header(hs):
    hs.connect()
    hs.startTLS()
    assert hs.send(b"EHLO evil\nX-Injected: yes\r\n") == [
        "500 5.5.2 Error: bare <CR> or <LF> in command",
        # A header line as a command: the client is not speaking SMTP.
        "221 2.7.0 Error: I can break rules, too. Goodbye."]
    assert hs.proto.heloName is None
