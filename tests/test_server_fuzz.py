"""
A Hypothesis fuzz test of the SMTP dialogue: commands, parameters, SASL
responses, message bodies and raw bytes, cut into reads at arbitrary
points, with the client reading its replies or not, time passing, and
queue commits finishing late or failing.

Derandomized with a fixed number of examples, so CI runs the same
dialogues every time. After each read and at the end of each example:

* no traceback: no exception out of the session, no failure logged;
* every reply line is ``NNN`` + space or dash, CRLF-terminated;
* the session's buffers are within their bounds, read from its own
  counters (unsent replies, pending input, partial line, DATA buffer);
* no message queued that the client did not complete (each needs its own
  ``<CR><LF>.<CR><LF>``);
* once the client has read everything and nothing is pending, no complete
  command waits unanswered; and, whatever happened, the session has ended
  after the longest timeout plus CLOSE_GRACE.
"""

from __future__ import annotations

import base64
import errno
import gc
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from relayd import server
from tests.test_server_hostile import HostileHarness, plain

REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][^\r\n]*\r\n")
TERMINATOR = re.compile(rb"(?=\r\n\.\r\n)")

VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP", b"QUIT",
         b"STARTTLS", b"AUTH", b"BDAT", b"ehlo", b"mail from:<a@example.com>"]
ARGUMENTS = [
    b"", b"client.test", b"c", b"FROM:<alice@example.com>", b"FROM:<>", b"FROM:<a@example.com> SIZE=100",
    b"FROM:<a@example.com> SIZE=99999999999999999999999", b"FROM:<a@example.com> BODY=8BITMIME",
    b"FROM:<a@example.com> AUTH=<>", b"FROM:<a@example.com> RET=FULL", b"FROM:alice",
    b"TO:<bob@example.org>", b"TO:<postmaster>", b"TO:<a%b@example.com>", b"TO:<>",
    b"TO:<b@example.org> NOTIFY=NEVER", b"PLAIN", b"LOGIN", b"CRAM-MD5", b"PLAIN =",
    b"PLAIN " + plain("alice@example.com", "alice-secret"),
    b"PLAIN " + plain("alice@example.com", "wrong"),
    b"PLAIN " + plain("alice@example.com", "alice-secret", authzid="bob"),
    b"LOGIN " + base64.b64encode(b"printer"), b"x" * 600, "jörg".encode(), b"\x00\xff",
]
SASL = [plain("alice@example.com", "alice-secret"), plain("nobody", "x"),
        base64.b64encode(b"printer"), base64.b64encode(b"printer-secret"), b"*", b"=", b"!!"]
BODIES = [b"Subject: x\r\n\r\nbody\r\n", b"..\r\n", b".x\r\n", b"\r\n.\r\n", b"x" * 1200 + b"\r\n",
          b"bare\nlf\r\n", b"a\rb\r\n", b"From: a\r\n X: folded\r\n", b".\r\nQUIT\r\n"]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]
# Well-formed steps, so that examples also get through STARTTLS, AUTH and DATA.
SCRIPTS = [
    b"STARTTLS\r\n",
    b"EHLO c\r\nAUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n",
    b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
    b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
    b"EHLO c\r\nAUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n"
    b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
]
REPEATED = [b"NOOP\r\n", b"EHLO c\r\n", b"HELP\r\n", b"RSET\r\n", b"X\r\n", b"NOOP"]

line = st.builds(lambda verb, argument, ending: verb + (b" " + argument if argument else b"") + ending,
                 st.sampled_from(VERBS), st.sampled_from(ARGUMENTS) | st.binary(max_size=20),
                 st.sampled_from(ENDINGS))
piece = st.one_of(
    st.sampled_from(SCRIPTS),
    st.sampled_from(SCRIPTS),
    line,
    st.builds(lambda r, e: r + e, st.sampled_from(SASL), st.sampled_from(ENDINGS)),
    st.sampled_from(BODIES),
    st.binary(max_size=40),
    # Enough at once to push replies, queued input or a partial line to their bounds.
    st.builds(lambda r, n: r * n, st.sampled_from(REPEATED), st.sampled_from([50, 3_000, 15_000])),
    st.builds(lambda n: b"y" * n, st.sampled_from([1_000, 5_000, 70_000])),
)
# What happens after each read: the client reads its replies or not, time
# passes, a pending commit finishes or fails.
between = st.tuples(st.booleans(), st.sampled_from([0, 0, 0, 1, 30, 301]),
                    st.sampled_from([None, None, "commit", "fail"]))

LISTENERS = [("starttls", "required"), ("implicit", "required"), ("none", "none"),
             ("starttls", "optional"), ("none", "optional")]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def loggedFailures():
    """Failures logged through twisted.logger, over every example."""
    events = []

    def observer(event):
        if "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    # An unhandled error in a Deferred is logged only when it is collected:
    # once for all examples (a full collection per example costs seconds).
    gc.collect()
    globalLogPublisher.removeObserver(observer)
    assert events == [], [e["log_failure"].getTraceback() for e in events]


def checkBounds(session) -> None:
    tls = session.listener.tls == "implicit"
    assert session.unsentReplyBytes <= (server.MAX_UNSENT_TLS if tls else server.MAX_UNSENT)
    assert session.repliesWrittenWhileBlocked <= server.MAX_UNSENT - server.SOCKET_BUFFER
    assert session.pendingInputBytes <= server.MAX_HELD_INPUT
    assert session.dataBufferBytes <= server.MAX_DATA_HELD
    if not (session._busy or session._writeBlocked or session._closing):
        assert session.partialLineBytes <= server.MAX_UNTERMINATED


@settings(derandomize=True, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pieces=st.lists(piece, min_size=1, max_size=12), data=st.data(),
       listener=st.sampled_from(LISTENERS), trusted=st.booleans(), asyncCommit=st.booleans())
def test_smtp_dialogue_fuzz(directory, loggedFailures, pieces, data, listener, trusted, asyncCommit):
    hs = HostileHarness(directory)
    pending: list[defer.Deferred] = []
    if asyncCommit:
        def commit(writer, envelope):
            d = defer.Deferred()
            d.addCallback(lambda _: writer.commit(envelope))
            pending.append(d)
            return d

        hs.factory.commit = commit
    runDialogue(hs, pieces, data, listener, trusted, pending)
    assert loggedFailures == [], [e["log_failure"].getTraceback() for e in loggedFailures]


def runDialogue(hs, pieces, data, listener, trusted, pending):
    tls, auth = listener
    hs.connect(tls=tls, auth=auth, peer="127.0.0.1" if trusted else "192.0.2.50")
    session, socket = hs.proto, hs.transport
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))
    reads = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    received = bytearray(socket.read())

    def settle(outcome):
        while pending:
            d = pending.pop(0)
            if outcome == "commit":
                d.callback(None)
            else:
                d.errback(OSError(errno.EIO, "Input/output error"))

    for chunk in reads:
        if chunk and not socket.disconnecting:
            session.dataReceived(chunk)
        checkBounds(session)
        if session._writeBlocked:
            event("replies backed up: session stopped reading")
        clientReads, seconds, commitOutcome = data.draw(between, label="then")
        if clientReads:
            received += socket.read()
        if seconds:
            hs.clock.advance(seconds)
        if commitOutcome:
            settle(commitOutcome)
        checkBounds(session)

    # The client reads everything and every commit finishes.
    for _ in range(100):
        settle("commit")
        chunk = socket.read()
        received += chunk
        if not chunk and not pending:
            break
    checkBounds(session)
    assert REPLY_LINE.sub(b"", bytes(received)) == b"", bytes(received)[-300:]
    if not (session._busy or session._writeBlocked or session._closing or session._lost):
        assert session._data is not None or b"\n" not in session._inbox, "a command waits unanswered"
    assert len(hs.spool.committed) <= len(TERMINATOR.findall(stream))
    if hs.spool.committed:
        event("message queued")
    if session.authLogin:
        event("authenticated")
    if socket.disconnecting:
        event("session closed before the end")

    # Whatever state it is in, the session ends in bounded time.
    limits = hs.config.limits
    hs.clock.advance(max(limits.commandTimeout, limits.dataTimeout) + 1)
    settle("commit")
    hs.clock.advance(server.CLOSE_GRACE)
    assert socket.disconnecting and socket.aborted or session._lost
