"""
One delivery attempt: one message, one ordered list of next hops, one result
per recipient.

relayd speaks SMTP to the next hop with its own client (``OutboundSession``,
on ``LineReceiver``) rather than Twisted's ``ESMTPClient``/``ESMTPSender``:
those dot-stuff each chunk on its own (a ``.`` at a chunk boundary ends DATA
early: message smuggling), drop the EHLO capabilities, send no MAIL
parameters, do not pipeline, and never fire their result when the server
hangs up mid-session over an endpoint (TWISTED-NOTES.md section 4).

The courier never errbacks for a network or SMTP outcome: refused
connections, timeouts, lost connections and every reply become a
``RecipientResult`` whose ``status`` is sent, deferred or bounced. Logging is
the scheduler's job; the courier only returns what happened.

TLS and AUTH (``OutboundSession._afterHello``): ``starttls`` and ``implicit``
require TLS (any failure defers the hop, never plaintext); ``may`` uses
STARTTLS when offered, without verification, and falls back to plaintext
only when it is not offered or the handshake fails (then on a new
connection, like Postfix). After the 220 to STARTTLS every byte already
received is discarded (a man-in-the-middle's injected replies) and EHLO is
sent again. AUTH PLAIN or LOGIN runs only over TLS; a refused login defers.

Several messages per connection: after a clean transaction the session is
kept idle for ``reuseTime`` seconds; the next ``deliver`` to the same next
hop takes it (RSET is not needed after a completed transaction). After
``REUSE_COUNT_LIMIT`` transactions or ``REUSE_TIME_LIMIT`` seconds since it
connected, a session is closed instead (as Postfix does).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import random as _random
import weakref
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Callable, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IPullProducer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import maillog
from relayd.config import DeliveryTimeouts
from relayd.tcp import setNoDelay

SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"

# Size of one read from the spooled body (and so of one transport write).
CHUNK_SIZE = 64 * 1024

# How long to wait for the 221 after QUIT before dropping the connection: the
# transaction is over by then, so waiting longer only holds a socket.
QUIT_TIMEOUT = 5.0

# Longest reply line accepted from a server (RFC 5321 says 512; be lenient).
MAX_REPLY_LINE = 8192

# Most lines and bytes (text after the code, summed over the lines) of one
# reply. A real EHLO reply has 5 to 20 lines and well under 1 KiB; the
# longest real replies (multi-line 5xx explanations) a few dozen lines. The
# caps leave room for 50 times that, and bound what one next hop can make
# relayd hold for a session: one reply of at most 64 KiB plus one partial
# line. Over either cap the connection is aborted and the hop deferred.
MAX_REPLY_LINES = 1000
MAX_REPLY_BYTES = 64 * 1024

# RFC 5321 section 4.5.3.1.6: 998 octets of text before the CRLF.
MAX_LINE = 998

# How long a session stays open after a transaction, waiting for another
# message to the same next hop (Postfix's smtp_connection_cache_time_limit).
REUSE_TIME = 2.0

# A session is not kept after this many transactions or this many seconds
# since it connected (Postfix's smtp_connection_reuse_count_limit and
# smtp_connection_reuse_time_limit): one connection does not carry a busy
# queue for ever, and a hop's DNS or load-balancer changes get noticed.
REUSE_COUNT_LIMIT = 100
REUSE_TIME_LIMIT = 300.0

# How long a next hop that failed (before accepting MAIL) is tried last:
# the next attempts go to the hosts that work without waiting for it.
FAILED_HOP_TIME = 300.0

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def classify(code: int) -> str:
    """
    The status an SMTP reply code means for a recipient: 2xx sent, 5xx
    bounced, anything else (4xx, and codes that are no final answer at all)
    deferred, so that nothing unexpected ever bounces or counts as delivered.
    """
    if 200 <= code < 300:
        return SENT
    if 500 <= code < 600:
        return BOUNCED
    return DEFERRED


# Per-stage limits in seconds (RFC 5321 / Postfix defaults): the config's
# delivery.timeouts, passed in as they are.
Timeouts = DeliveryTimeouts


@dataclass(frozen=True)
class RecipientResult:
    """
    What happened to one recipient. ``code`` is the remote reply code; 0
    when no reply applies (connection failure, timeout, lost connection:
    always deferred); 552 / 553 for the courier's own refusals (message
    over the peer's SIZE limit, an address unsafe to write). ``status`` is
    authoritative: it equals ``classify(code)`` except that a refusing
    greeting or EHLO (even 5xx) is deferred, as Postfix does.
    """

    address: str
    code: int
    dsn: str
    text: str
    status: str


@dataclass(frozen=True)
class AttemptResult:
    relay: str
    results: tuple[RecipientResult, ...]
    connectSeconds: float
    transmitSeconds: float


@dataclass(frozen=True)
class Reply:
    """One complete (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[bytes, ...]

    def enhancedCode(self) -> str:
        """
        The RFC 3463 code from the reply text when it carries one of the
        right class, else one derived from the reply code.
        """
        first = self.lines[0] if self.lines else b""
        match = _ENHANCED.match(first)
        if match and int(match.group(1)) == self.code // 100:
            return match.group(0).decode("ascii")
        return _derivedCode(self.code)

    def text(self) -> str:
        """The reply as Postfix logs it: code, then the lines joined by spaces."""
        body = b" ".join(line.strip() for line in self.lines).decode(
            "utf-8", "replace"
        )
        return f"{self.code} {body}".rstrip()


def _derivedCode(code: int) -> str:
    klass = code // 100
    return f"{klass}.0.0" if klass in (2, 4, 5) else "4.0.0"


def parseReplyLine(line: bytes) -> tuple[int, bool, bytes] | None:
    """
    ``(code, isLast, text)`` for one reply line (``250-x`` continues,
    ``250 x`` or ``250`` ends), or None when the line is not a reply line.
    """
    if len(line) < 3 or not line[:3].isdigit():
        return None
    separator = line[3:4]
    if separator not in (b"", b" ", b"-"):
        return None
    code = int(line[:3])
    if not 200 <= code < 600:
        return None
    return code, separator != b"-", line[4:]


class DotStuffer:
    """
    The DATA transform, stateful across chunks: bare LF and bare CR become
    CRLF, and a ``.`` at the start of any line (including the first line,
    and a line whose CRLF ended the previous chunk) is doubled. Each chunk
    costs a few ``bytes.replace`` calls, independent of its line count.
    """

    def __init__(self, maxLine: int | None = None) -> None:
        self._atLineStart = True
        self._pendingCR = False
        self._maxLine = maxLine
        self._lineLength = 0

    def transform(self, chunk: bytes) -> bytes:
        if self._pendingCR:
            chunk = b"\r" + chunk
            self._pendingCR = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF split across chunks.
            chunk = chunk[:-1]
            self._pendingCR = True
        return self._stuff(chunk)

    def finish(self) -> bytes:
        """The rest of the body and the end-of-data terminator."""
        tail = b""
        if self._pendingCR:
            self._pendingCR = False
            tail = self._stuff(b"\r")
        return tail + (b".\r\n" if self._atLineStart else b"\r\n.\r\n")

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._maxLine is not None:
            self._checkLines(data)
        data = data.replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._atLineStart and data.startswith(b"."):
            data = b"." + data
        self._atLineStart = data.endswith(b"\r\n")
        return data

    def _checkLines(self, data: bytes) -> None:
        """
        Refuse (``LineTooLong``) before a line over ``maxLine`` octets is
        ever written: the intake refuses them, so one here means a damaged
        spool file, and folding would change a signed message.
        """
        last = data.rfind(b"\n")
        if last < 0:
            self._lineLength += len(data)
        else:
            first = data.find(b"\n")
            longest = self._lineLength + first
            if last > first:
                longest = max(longest, max(map(len, data[first + 1:last].split(b"\n"))))
            if longest > self._maxLine:
                raise LineTooLong(longest)
            self._lineLength = len(data) - last - 1
        if self._lineLength > self._maxLine:
            raise LineTooLong(self._lineLength)


class LineTooLong(Exception):
    """The body holds a line longer than SMTP allows."""

    def __init__(self, length: int):
        super().__init__(length)
        self.length = length


class SessionBroken(Exception):
    """
    The conversation ended without a usable reply (timeout, lost connection,
    unparsable reply). ``stage`` says what was being done.
    """

    def __init__(self, stage: str, text: str, dsn: str = "4.4.2", code: int = 0,
                 status: str = DEFERRED):
        super().__init__(text)
        self.stage = stage
        self.text = text
        self.dsn = dsn
        self.code = code
        self.status = status


class HopRefused(Exception):
    """
    The hop answered, but is not usable for this delivery: greeting, hello,
    STARTTLS or AUTH refused, or TLS/AUTH required and not offered. Always
    temporary for the message (the next hop, or a later attempt, may do).
    """

    def __init__(self, reply: Reply | None, text: str, dsn: str | None = None):
        super().__init__(text)
        self.reply = reply
        self.text = text
        self.code = reply.code if reply is not None else 0
        dsn = dsn or (reply.enhancedCode() if reply is not None else "4.0.0")
        # A refusing hop is temporary for the message, as in Postfix.
        self.dsn = "4" + dsn[1:] if dsn[0] != "4" else dsn


# Stage names: what Postfix says "while ..." for each.
_STAGE_TEXT = {
    "greeting": "receiving the initial server greeting",
    "ehlo": "performing the EHLO handshake",
    "helo": "performing the HELO handshake",
    "mail": "sending MAIL FROM",
    "rcpt": "sending RCPT TO",
    "rset": "sending RSET",
    "data": "sending DATA command",
    "body": "sending message body",
    "dot": "sending end of data -- message may be sent more than once",
    "quit": "sending QUIT",
    "starttls": "sending STARTTLS",
    "tls": "performing the TLS handshake",
    "auth": "authenticating",
}

_IN_REPLY_TO = {
    "ehlo": "EHLO",
    "helo": "HELO",
    "mail": "MAIL FROM",
    "rcpt": "RCPT TO",
    "data": "DATA",
    "dot": "end of DATA",
    "rset": "RSET",
    "starttls": "STARTTLS",
    "auth": "AUTH",
}


@dataclass
class _Waiter:
    stage: str
    deferred: defer.Deferred
    timeout: float


@dataclass(frozen=True)
class MessageOutcome:
    """
    The result of one transaction on a session. ``mailAccepted`` says
    whether the hop took responsibility for the envelope (its results then
    stand); when it is False and ``broken`` is True the courier may try the
    next hop.
    """

    results: tuple[RecipientResult, ...]
    mailAccepted: bool
    broken: bool
    # Indexes of recipients refused with "too many recipients" (452 4.5.3):
    # to be sent in another transaction at once.
    overflow: tuple[int, ...] = ()


@implementer(IPullProducer)
class _BodyProducer:
    """Reads the spooled body chunk by chunk as the transport drains."""

    def __init__(self, session: "OutboundSession", body: BinaryIO, chunkSize: int):
        self._session = session
        self._body = body
        self._chunkSize = chunkSize
        self._stuffer = DotStuffer(MAX_LINE)
        self.done: defer.Deferred = defer.Deferred()
        self._finished = False

    def resumeProducing(self) -> None:
        if self._finished:
            return
        self._session._bodyProgress()
        try:
            chunk = self._body.read(self._chunkSize)
        except OSError as e:
            self._fail(e)
            return
        transport = self._session.transport
        if chunk:
            try:
                data = self._stuffer.transform(chunk)
            except LineTooLong as e:
                self._fail(e)
                return
            transport.write(data)
            return
        self._finished = True
        self._close()
        transport.write(self._stuffer.finish())
        transport.unregisterProducer()
        self.done.callback(None)

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self._close()

    def _fail(self, exc: Exception) -> None:
        self._finished = True
        self._close()
        self._session.transport.unregisterProducer()
        self.done.errback(exc)

    def _close(self) -> None:
        try:
            self._body.close()
        except OSError:
            pass


@dataclass(frozen=True)
class TLSInfo:
    """What the handshake gave: for the log line (Postfix's wording)."""

    protocol: str
    cipher: str
    bits: int
    # "Verified" (chain and name), "Trusted" (chain only), "Untrusted".
    trust: str


@implementer(IHandshakeListener)
class OutboundSession(LineReceiver):
    """
    One SMTP client connection: greeting, EHLO (HELO after a 5xx to EHLO),
    STARTTLS and EHLO again, AUTH, then transactions with ``sendMessage``
    and finally ``quit``.

    ``tls`` is the hop's mode; ``tlsOptions`` makes the connection creator
    for STARTTLS; ``credentials`` is ``(username, Secret)`` or None.

    Every reply wait has a deadline on the given reactor; when one passes
    the connection is aborted and every wait in progress fails with
    ``SessionBroken``. ``connectionLost`` fails them too, so no Deferred is
    ever left hanging.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        timeouts: Timeouts = Timeouts(),
        hostName: str = "",
        chunkSize: int = CHUNK_SIZE,
        tls: str = "none",
        tlsOptions: Callable[[], Any] | None = None,
        credentials: tuple[str, "Secret"] | None = None,
    ):
        self._reactor = reactor
        self.tlsMode = tls
        self._tlsOptions = tlsOptions
        self._credentials = credentials
        # True once a TLS handshake completed on this connection.
        self.tlsActive = False
        self.tlsInfo: TLSInfo | None = None
        # The handshake (implicit, or after the 220 to STARTTLS) is under way.
        self._tlsStarting = tls == "implicit"
        # The handshake failed (so a "may" hop can be retried in plaintext).
        self.tlsFailed = False
        self._starttlsTried = False
        self.authenticated = False
        self.heloName = heloName
        self.timeouts = timeouts
        self.hostName = hostName
        self.chunkSize = chunkSize
        self.peerAddress = ""
        self.peerPort = 0
        # Upper-cased keyword -> parameter text (b"" when none); empty after HELO.
        self.capabilities: dict[str, str] = {}
        # For the courier's reuse limits: when the connection was made, and
        # how many transactions it has carried.
        self.connectedAt = 0.0
        self.transactions = 0
        self._waiters: list[_Waiter] = []
        self._replyLines: list[bytes] = []
        self._replyBytes = 0
        self._replyCode: int | None = None
        self._timer: Any = None
        self._broken: SessionBroken | None = None
        self._connected = False
        self._needsReset = False
        self._producer: _BodyProducer | None = None
        self._ready: defer.Deferred = defer.Deferred()
        self._closed: defer.Deferred = defer.Deferred()
        self._quitting = False
        self._aborted = False

    # -- names ------------------------------------------------------------

    @property
    def peerName(self) -> str:
        """``host[ip]`` as Postfix writes it."""
        return f"{self.hostName or self.peerAddress}[{self.peerAddress}]"

    @property
    def relay(self) -> str:
        """``host[ip]:port`` for the log's relay= field."""
        return f"{self.peerName}:{self.peerPort}"

    # -- connection events -------------------------------------------------

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self._connected = True
        peer = self.transport.getPeer()
        self.peerAddress = getattr(peer, "host", "") or ""
        self.peerPort = getattr(peer, "port", 0) or 0
        self.connectedAt = self._reactor.seconds()
        self._expect("greeting", self.timeouts.greeting).addCallback(self._greeted).addErrback(
            self._readyFailed, "greeting"
        )

    def handshakeCompleted(self) -> None:
        self.tlsActive = True
        self._tlsStarting = False
        self.tlsInfo = _tlsInfo(self.transport, self.hostName)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        self._connected = False
        if self._broken is None and self._tlsStarting and not self.tlsActive:
            self.tlsFailed = True
            self._broken = SessionBroken(
                "tls",
                f"TLS handshake with {self.peerName} failed: {_tlsFailureText(reason)}",
                "4.7.5",
            )
        if self._broken is None:
            stage = self._waiters[0].stage if self._waiters else self._currentStage()
            self._broken = SessionBroken(
                stage, f"lost connection with {self.peerName} while {_STAGE_TEXT[stage]}"
            )
        self._failAll()
        self._closed.callback(None)

    def _failAll(self) -> None:
        """Fail every wait in progress with ``self._broken``."""
        broken = self._broken
        self._cancelTimer()
        waiters, self._waiters = self._waiters, []
        producer, self._producer = self._producer, None
        if producer is not None and not producer.done.called:
            producer.stopProducing()
            producer.done.errback(broken)
        for waiter in waiters:
            waiter.deferred.errback(broken)
        if not self._ready.called:
            self._ready.errback(broken)

    def _currentStage(self) -> str:
        if self._producer is not None:
            return "body"
        if self._quitting:
            return "quit"
        return "greeting" if not self._ready.called else "mail"

    # -- replies -----------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._aborted:
            # The rest of a read that arrived before the abort.
            return
        parsed = parseReplyLine(line)
        if parsed is None or (
            self._replyCode is not None and parsed[0] != self._replyCode
        ):
            self._abort(
                "malformed", f"{self.peerName} sent a malformed reply: "
                + line[:100].decode("utf-8", "replace")
            )
            return
        code, isLast, text = parsed
        self._replyCode = code
        self._replyLines.append(text)
        self._replyBytes += len(text)
        if len(self._replyLines) > MAX_REPLY_LINES or self._replyBytes > MAX_REPLY_BYTES:
            over = (f"{MAX_REPLY_LINES} lines" if len(self._replyLines) > MAX_REPLY_LINES
                    else f"{MAX_REPLY_BYTES} bytes")
            self._replyLines, self._replyBytes = [], 0
            self._abort("malformed", f"{self.peerName} sent a reply of more than {over}")
            return
        if not isLast:
            return
        reply = Reply(code, tuple(self._replyLines))
        self._replyLines = []
        self._replyBytes = 0
        self._replyCode = None
        if not self._waiters:
            # Unsolicited (e.g. a 421 before closing): the close will tell.
            return
        waiter = self._waiters.pop(0)
        self._armForHead()
        waiter.deferred.callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort("malformed", f"{self.peerName} sent a reply line that is too long")

    def _expect(self, stage: str, timeout: float) -> defer.Deferred:
        """A Deferred for the next unclaimed reply; its deadline runs from
        when it becomes the first reply awaited."""
        d: defer.Deferred = defer.Deferred()
        if self._broken is not None:
            d.errback(self._broken)
            return d
        self._waiters.append(_Waiter(stage, d, timeout))
        if len(self._waiters) == 1:
            self._armForHead()
        return d

    def _armForHead(self) -> None:
        self._cancelTimer()
        if self._waiters:
            head = self._waiters[0]
            self._timer = self._reactor.callLater(
                head.timeout, self._timedOut, head.stage
            )

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self, stage: str) -> None:
        self._timer = None
        self._abort(
            stage,
            f"conversation with {self.peerName} timed out while {_STAGE_TEXT[stage]}",
        )

    def _abort(self, stage: str, text: str) -> None:
        """Fail everything in progress with ``text`` and drop the connection."""
        if self._broken is None:
            if stage == "malformed":
                stage = self._waiters[0].stage if self._waiters else self._currentStage()
            self._broken = SessionBroken(stage, text)
        self._dropConnection()
        self._failAll()

    def _dropConnection(self) -> None:
        if self._connected and not self._aborted:
            self._aborted = True
            self.transport.abortConnection()

    def _send(self, *commands: bytes) -> None:
        """Write commands in one write (one segment when pipelining)."""
        self.transport.write(b"".join(c + b"\r\n" for c in commands))

    # -- greeting and hello --------------------------------------------------

    def whenReady(self) -> defer.Deferred:
        """Fires when the hop greeted and answered EHLO/HELO; fails with
        ``HopRefused`` or ``SessionBroken``."""
        return self._ready

    def _ask(self, stage: str, command: bytes, handler: Callable[[Reply], None]) -> None:
        """
        Send one command before the session is ready and pass its reply to
        ``handler``; a failure, even one raised by the handler, ends in
        ``_readyFailed`` so that ``whenReady`` always fires.
        """
        self._send(command)
        self._expect(stage, self.timeouts.greeting).addCallback(handler).addErrback(
            self._readyFailed, stage
        )

    def _sendEhlo(self) -> None:
        self._ask("ehlo", b"EHLO " + self.heloName.encode("ascii"), self._ehloAnswered)

    def _greeted(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            self._refused(
                reply, f"host {self.peerName} refused to talk to me: {reply.text()}"
            )
            return
        self._sendEhlo()

    def _ehloAnswered(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.capabilities = parseCapabilities(reply)
            self._afterHello()
        elif reply.code in (500, 501, 502, 504, 550) and not self._starttlsTried:
            # After STARTTLS the hop already spoke ESMTP: no HELO fallback.
            self._ask("helo", b"HELO " + self.heloName.encode("ascii"), self._heloAnswered)
        else:
            self._refused(reply, self._saidText(reply, "ehlo"))

    def _heloAnswered(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.capabilities = {}
            self._afterHello()
        else:
            self._refused(reply, self._saidText(reply, "helo"))

    def _afterHello(self) -> None:
        """
        EHLO (or HELO) answered: STARTTLS when the mode asks for it, then
        AUTH when the hop has credentials, then the session is ready.
        """
        if self.tlsMode in ("starttls", "may") and not self.tlsActive and not self._starttlsTried:
            if "STARTTLS" in self.capabilities:
                self._starttlsTried = True
                self._ask("starttls", b"STARTTLS", self._starttlsAnswered)
                return
            if self.tlsMode == "starttls":
                self._refused(None, f"TLS is required, but was not offered by host {self.peerName}",
                              "4.7.4")
                return
        if self._credentials is not None and not self.authenticated:
            self._authenticate()
            return
        self._ready.callback(self)

    def _starttlsAnswered(self, reply: Reply) -> None:
        if reply.code != 220:
            if self.tlsMode == "may":
                # Opportunistic: the session is still good in plaintext.
                self._afterHello()
                return
            self._refused(reply, f"TLS is required, but host {self.peerName} refused to start "
                                 f"TLS: {reply.text()}")
            return
        # Whatever arrived after the 220 was sent before the handshake, in
        # plaintext: a man-in-the-middle's injection, never a reply to trust.
        self.clearLineBuffer()
        self._replyLines, self._replyBytes, self._replyCode = [], 0, None
        self._tlsStarting = True
        self.transport.startTLS(self._tlsOptions())
        self.capabilities = {}
        self._sendEhlo()

    # -- AUTH ----------------------------------------------------------------

    def _authenticate(self) -> None:
        if not self.tlsActive:
            # Never reached through the config (username needs starttls or
            # implicit), but a password must never cross in plaintext.
            self._refused(None, f"not sending credentials to {self.peerName} without TLS", "4.7.0")
            return
        mechanisms = self.capabilities.get("AUTH", "").upper().split()
        username, password = self._credentials
        user = username.encode("utf-8")
        if "PLAIN" in mechanisms:
            response = base64.b64encode(b"\0" + user + b"\0" + password.reveal().encode("utf-8"))
            self._ask("auth", b"AUTH PLAIN " + response, self._authAnswered)
        elif "LOGIN" in mechanisms:
            answers = [base64.b64encode(user), base64.b64encode(password.reveal().encode("utf-8"))]
            self._ask("auth", b"AUTH LOGIN", lambda reply: self._loginStep(reply, answers))
        else:
            offered = " ".join(mechanisms) or "none"
            self._refused(None, f"host {self.peerName} offers no SASL mechanism relayd uses "
                                f"(PLAIN, LOGIN; offered: {offered}); not sending without "
                                "authentication", "4.7.0")

    def _loginStep(self, reply: Reply, answers: list[bytes]) -> None:
        if reply.code != 334 or not answers:
            self._authAnswered(reply)
            return
        self._ask("auth", answers[0], lambda nextReply: self._loginStep(nextReply, answers[1:]))

    def _authAnswered(self, reply: Reply) -> None:
        if reply.code == 235:
            self.authenticated = True
            self._afterHello()
            return
        if reply.code == 334:
            # A challenge where none is expected: cancel the exchange.
            self._send(b"*")
            self._expect("auth", self.timeouts.greeting).addErrback(lambda f: None)
        # Never retried (with an empty authzid or otherwise): one refused
        # login is one failed login in the server's log.
        self._refused(reply, f"SASL authentication failed; server {self.peerName} said: "
                             f"{reply.text()}", reply.enhancedCode() if reply.code // 100 != 2 else "4.7.0")

    def _refused(self, reply: Reply | None, text: str, dsn: str | None = None) -> None:
        if not self._ready.called:
            self._ready.errback(HopRefused(reply, text, dsn))
        self.quit()

    def _readyFailed(self, failure: Failure, stage: str) -> None:
        if not failure.check(HopRefused, SessionBroken):
            # Raised by a reply handler (a bug, or a name OpenSSL cannot
            # take for SNI): without this whenReady would never fire and the
            # attempt would hang. The hop is dropped and deferred instead.
            from twisted.logger import Logger

            Logger().failure("SMTP client error with {peer}", failure, peer=self.peerName)
            if self._broken is None:
                self._broken = SessionBroken(
                    stage, f"local error with {self.peerName} while {_STAGE_TEXT[stage]}: "
                    f"{failure.value.__class__.__name__}", "4.3.0")
            self._abort(stage, self._broken.text)
            return
        if not self._ready.called:
            self._ready.errback(failure)

    def _saidText(self, reply: Reply, stage: str) -> str:
        return (
            f"host {self.peerName} said: {reply.text()} "
            f"(in reply to {_IN_REPLY_TO[stage]} command)"
        )

    # -- capabilities --------------------------------------------------------

    def sizeLimit(self) -> int | None:
        """The peer's SIZE limit in bytes, or None when it has none."""
        value = self.capabilities.get("SIZE")
        if value is None:
            return None
        try:
            limit = int(value.split()[0]) if value.strip() else 0
        except ValueError:
            return None
        return limit or None

    def mailParameters(self, mailParams: dict, size: int) -> list[bytes]:
        """MAIL FROM parameters the peer understands."""
        params = []
        if "SIZE" in self.capabilities:
            params.append(b"SIZE=%d" % size)
        body = _paramValue(mailParams, "BODY")
        if body is not None and body.upper() == "8BITMIME" and "8BITMIME" in self.capabilities:
            params.append(b"BODY=8BITMIME")
        return params

    # -- a transaction -------------------------------------------------------

    def sendMessage(
        self,
        sender: str,
        mailParams: dict,
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
    ) -> defer.Deferred:
        """
        Send one message; fires with a ``MessageOutcome`` (never errbacks for
        an SMTP or network outcome). May be called again once it fired.

        Recipients refused with "too many recipients" (452 4.5.3) go out in
        another transaction on the same connection at once, as RFC 5321
        section 4.5.3.1.10 asks, for as long as each transaction makes
        progress.
        """
        return defer.ensureDeferred(
            self._transactions(sender, mailParams, list(recipients), openBody, size)
        )

    async def _transactions(self, sender, mailParams, recipients, openBody, size):
        indexes = list(range(len(recipients)))
        final: dict[int, RecipientResult] = {}
        mailAccepted = False
        while True:
            subset = [recipients[i] for i in indexes]
            outcome = await self._transaction(sender, mailParams, subset, openBody, size)
            mailAccepted = mailAccepted or outcome.mailAccepted
            for j, r in enumerate(outcome.results):
                final[indexes[j]] = r
            progress = len(outcome.overflow) < len(subset)
            if not outcome.overflow or outcome.broken or not outcome.mailAccepted or not progress:
                # Leftovers keep their 452 result: deferred, tried next time.
                return MessageOutcome(
                    tuple(final[i] for i in range(len(recipients))), mailAccepted, outcome.broken
                )
            indexes = [indexes[j] for j in outcome.overflow]

    async def _transaction(self, sender, mailParams, recipients, openBody, size):
        self.transactions += 1
        outcomes: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        overflow: list[int] = []
        mailAccepted = False
        unclaimed: list[defer.Deferred] = []

        def remaining(broken: SessionBroken) -> MessageOutcome:
            for i, address in enumerate(recipients):
                if i not in outcomes or i in accepted:
                    outcomes[i] = RecipientResult(
                        address, broken.code, broken.dsn, broken.text, broken.status
                    )
            return MessageOutcome(
                tuple(outcomes[i] for i in range(len(recipients))), mailAccepted, True
            )

        def everyone(reply: Reply, stage: str, indexes) -> None:
            for i in indexes:
                outcomes[i] = self._result(recipients[i], reply, stage)

        # An address with CR, LF or angle brackets would inject commands.
        if not _safeAddress(sender):
            text = "sender address is not valid on the wire"
            return MessageOutcome(
                tuple(RecipientResult(r, 553, "5.1.7", text, BOUNCED) for r in recipients),
                False,
                False,
            )
        for i, address in enumerate(recipients):
            if not _safeAddress(address):
                outcomes[i] = RecipientResult(
                    address, 553, "5.1.3", "recipient address is not valid on the wire", BOUNCED
                )
        wanted = [i for i in range(len(recipients)) if i not in outcomes]
        if not wanted:
            return MessageOutcome(self._ordered(outcomes, recipients), False, False)

        try:
            if self._needsReset:
                self._send(b"RSET")
                await self._expect("rset", self.timeouts.mail)
                self._needsReset = False
            mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">"
            params = self.mailParameters(mailParams, size)
            if params:
                mail += b" " + b" ".join(params)
            rcpts = [b"RCPT TO:<" + recipients[i].encode("utf-8") + b">" for i in wanted]
            if "PIPELINING" in self.capabilities:
                self._send(mail, *rcpts)
                mailD = self._expect("mail", self.timeouts.mail)
                rcptDs = [self._expect("rcpt", self.timeouts.rcpt) for _ in rcpts]
                # Claim every pipelined reply, even after MAIL failed; any
                # left unread when the session breaks are silenced below.
                unclaimed.extend(rcptDs)
                mailReply = await mailD
                mailAccepted = mailReply.code // 100 == 2
                self._needsReset = mailAccepted
                for i, d in zip(wanted, rcptDs):
                    reply = await d
                    if mailAccepted:
                        self._recordRcpt(i, recipients, reply, outcomes, accepted, overflow)
            else:
                self._send(mail)
                mailReply = await self._expect("mail", self.timeouts.mail)
                mailAccepted = mailReply.code // 100 == 2
                self._needsReset = mailAccepted
                if mailAccepted:
                    for i, rcpt in zip(wanted, rcpts):
                        self._send(rcpt)
                        reply = await self._expect("rcpt", self.timeouts.rcpt)
                        self._recordRcpt(i, recipients, reply, outcomes, accepted, overflow)
            if not mailAccepted:
                everyone(mailReply, "mail", wanted)
                return MessageOutcome(self._ordered(outcomes, recipients), False, False)
            if not accepted:
                return MessageOutcome(self._ordered(outcomes, recipients), True, False,
                                      tuple(overflow))

            self._send(b"DATA")
            dataReply = await self._expect("data", self.timeouts.dataInit)
            if dataReply.code != 354:
                if dataReply.code // 100 == 2:
                    # Not a valid answer to DATA: nothing was sent, try again later.
                    dataReply = Reply(451, dataReply.lines)
                everyone(dataReply, "data", accepted)
                return MessageOutcome(self._ordered(outcomes, recipients), True, False,
                                      tuple(overflow))

            await self._sendBody(openBody)
            final = await self._expect("dot", self.timeouts.dataDone)
            self._needsReset = False
            everyone(final, "dot", accepted)
            return MessageOutcome(self._ordered(outcomes, recipients), True, False,
                                  tuple(overflow))
        except SessionBroken as broken:
            return remaining(broken)
        except LineTooLong as e:
            # Nothing past the long line was written: end the connection
            # without a final dot so the peer discards the partial message.
            broken = SessionBroken(
                "body", f"message has a line of {e.length} octets, longer than SMTP allows "
                f"({MAX_LINE}); not sent", "5.6.0", 554, BOUNCED,
            )
            self._broken = self._broken or broken
            self._abort("body", broken.text)
            return remaining(broken)
        except OSError as e:
            # The spooled body could not be read: what is on the wire is
            # incomplete, so the connection must go without a final dot.
            broken = SessionBroken(
                "body", f"cannot read the queued message: {e.strerror or e}", "4.3.0"
            )
            self._broken = self._broken or broken
            self._abort("body", broken.text)
            return remaining(broken)
        finally:
            for d in unclaimed:
                d.addErrback(lambda f: None)

    def _recordRcpt(self, i, recipients, reply, outcomes, accepted, overflow) -> None:
        if reply.code // 100 == 2:
            accepted.append(i)
        else:
            if reply.code // 100 == 3:
                reply = Reply(451, reply.lines)
            if isTooManyRecipients(reply):
                overflow.append(i)
                if reply.code // 100 == 5:
                    # RFC 5321 4.5.3.1.10: an old 552 here is temporary.
                    reply = Reply(452, reply.lines)
            outcomes[i] = self._result(recipients[i], reply, "rcpt")

    @staticmethod
    def _ordered(outcomes, recipients) -> tuple[RecipientResult, ...]:
        return tuple(outcomes[i] for i in range(len(recipients)))

    def _result(self, address: str, reply: Reply, stage: str) -> RecipientResult:
        status = classify(reply.code)
        if status == SENT:
            text = reply.text()
        else:
            text = self._saidText(reply, stage)
        return RecipientResult(address, reply.code, reply.enhancedCode(), text, status)

    def _sendBody(self, openBody: Callable[[], BinaryIO]) -> defer.Deferred:
        body = openBody()
        producer = _BodyProducer(self, body, self.chunkSize)
        self._producer = producer

        def finished(result):
            self._producer = None
            return result

        producer.done.addBoth(finished)
        self._bodyProgress()
        self.transport.registerProducer(producer, False)
        return producer.done

    def _bodyProgress(self) -> None:
        """The transport took the last chunk: restart the data-block clock."""
        self._cancelTimer()
        self._timer = self._reactor.callLater(
            self.timeouts.dataBlock, self._timedOut, "body"
        )

    # -- the end ---------------------------------------------------------------

    def quit(self) -> defer.Deferred:
        """
        Say QUIT and close; fires (never fails) once the connection is gone,
        at most ``QUIT_TIMEOUT`` seconds later.
        """
        if self._connected and not self._quitting and self._broken is None:
            self._quitting = True
            self._send(b"QUIT")
            d = self._expect("quit", QUIT_TIMEOUT)
            d.addCallbacks(lambda _: self.transport.loseConnection(), lambda f: None)
        elif not self._quitting:
            self._dropConnection()
        return self.whenClosed()

    def usable(self) -> bool:
        """Connected, ready and not broken: another transaction may start."""
        return (self._connected and self._broken is None and not self._quitting
                and self._ready.called and self._producer is None and not self._waiters)

    def whenClosed(self) -> defer.Deferred:
        """Fires (never fails) once the connection is gone."""
        d: defer.Deferred = defer.Deferred()
        if self._closed.called:
            d.callback(None)
        else:
            self._closed.addBoth(lambda r: (d.callback(None), r)[1])
        return d


def isTooManyRecipients(reply: Reply) -> bool:
    """
    A RCPT reply meaning "this transaction has enough recipients": 452 (or
    552, RFC 821's code) with enhanced code x.5.3, or with no enhanced code
    and the words "too many recipients".
    """
    if reply.code not in (452, 552):
        return False
    first = reply.lines[0] if reply.lines else b""
    match = _ENHANCED.match(first)
    if match:
        return match.group(2, 3) == (b"5", b"3")
    return b"too many recipients" in b" ".join(reply.lines).lower()


def parseCapabilities(reply: Reply) -> dict[str, str]:
    """EHLO reply lines after the first -> {KEYWORD: parameters}."""
    capabilities: dict[str, str] = {}
    for line in reply.lines[1:]:
        text = line.decode("ascii", "replace").strip()
        if not text:
            continue
        keyword, _, value = text.partition(" ")
        capabilities[keyword.upper()] = value.strip()
    return capabilities


def _safeAddress(address: str) -> bool:
    return not any(c in address for c in "\r\n<>\x00")


def _paramValue(params: dict, name: str) -> str | None:
    for key, value in (params or {}).items():
        if key.upper() == name:
            return value if value is not None else ""
    return None


def _isAddressLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], OutboundSession]):
        self._build = build

    def buildProtocol(self, addr):
        return self._build()


class Secret:
    """A password: kept out of every repr, str and log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def readPassword(path: str) -> Secret:
    """
    The password in ``path``: its first line without the line ending (so
    ``echo secret > file`` works). Raises ``ValueError`` naming only the
    file when it is empty, ``OSError`` when it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise ValueError(f"{path}: the password file is empty")
    return Secret(line.decode("utf-8"))


# -- TLS ----------------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def deliverySecrets(config: Any) -> tuple[dict[str, Secret], set[str], list[str]]:
    """
    Every delivery password_file read (path -> Secret), the ca_files that
    cannot be loaded, and the problems as "key path: reason" (the reason
    names the file, never its content).
    """
    passwords, brokenCaFiles, problems = {}, set(), []
    for keyPath, path in config.delivery.passwordFiles():
        try:
            passwords[path] = readPassword(path)
        except OSError as e:
            problems.append(f"{keyPath}: cannot read {path}: {e.strerror or e}")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{keyPath}: {path}: {'not UTF-8' if isinstance(e, UnicodeDecodeError) else 'the file is empty'}")
    hops = list(config.delivery.smarthosts) + [
        h for hops in config.delivery.routes.values() for h in hops]
    for caFile in sorted({h.caFile for h in hops if h.caFile}):
        try:
            loadTrustRoot(caFile)
        except Exception as e:  # OSError, or any complaint about the PEM content
            brokenCaFiles.add(caFile)
            problems.append(f"ca_file {caFile}: {getattr(e, 'strerror', None) or e}")
    return passwords, brokenCaFiles, problems


def loadTrustRoot(caFile: str | None):
    """The system CA store, or every certificate in ``caFile``."""
    from twisted.internet import ssl

    if caFile is None:
        return ssl.platformTrust()
    with open(caFile, "rb") as f:
        blocks = _PEM_CERTIFICATE.findall(f.read())
    if not blocks:
        raise ValueError(f"{caFile}: no PEM certificate in the file")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


# Opportunistic connections -> did every certificate of the chain verify so
# far? (Twisted owns app_data.)
_chainStates: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _recordVerification(connection, certificate, errno, depth, ok) -> bool:
    if not ok and connection in _chainStates:
        _chainStates[connection] = False
    return True  # opportunistic: encrypt anyway


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """
    Encryption with SNI and no verification (``tls: may``, or ``verify:
    false``): the handshake succeeds whatever the certificate, and the
    result of the chain and name checks is kept for the log line.
    """

    def __init__(self, hostname: str, caFile: str | None = None):
        from OpenSSL import SSL

        self.hostname = hostname
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_options(SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION)
        if caFile is not None:
            context.load_verify_locations(caFile)
        else:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER, _recordVerification)
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        _chainStates[connection] = True
        if self.hostname and not _isAddressLiteral(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_connect_state()
        return connection


def clientTLSOptions(hostname: str, tls: str, verify: bool, caFile: str | None):
    """
    The connection creator for a hop: verified (service_identity host name
    check against the system CAs or ``caFile``) for ``starttls`` and
    ``implicit`` with ``verify``, otherwise opportunistic.
    """
    if tls in ("starttls", "implicit") and verify:
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(hostname, trustRoot=loadTrustRoot(caFile))
    return OpportunisticTLS(hostname, caFile if tls != "may" else None)


def _tlsInfo(transport: Any, hostName: str) -> TLSInfo | None:
    try:
        connection = transport.getHandle()
        protocol = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits() or 0
    except Exception:
        return None
    chainVerified = _chainStates.get(connection)
    if chainVerified is None:
        trust = "Verified"  # optionsForClientTLS completes only when verified
    elif not chainVerified:
        trust = "Untrusted"
    else:
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        try:
            if _isAddressLiteral(hostName):
                verify_ip_address(connection, hostName)
            else:
                verify_hostname(connection, hostName)
            trust = "Verified"
        except (VerificationError, Exception):
            trust = "Trusted"
    return TLSInfo(protocol or "", cipher or "", bits, trust)


def _tlsFailureText(reason: Failure) -> str:
    from OpenSSL import SSL

    exc = reason.value
    if isinstance(exc, SSL.Error):
        details = []
        for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
            if isinstance(item, tuple) and item and item[-1]:
                details.append(str(item[-1]))
        return ", ".join(details) or str(exc) or "TLS error"
    if exc.__class__.__name__ == "VerificationError":
        return "the certificate does not match the host name"
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return "the server closed the connection"
    return str(exc) or exc.__class__.__name__


# -- the courier -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """
    One place to connect to: a configured host (resolved by the endpoint),
    or an MX host's ``address``. ``host`` names it in logs and is the name
    its certificate must carry.
    """

    host: str
    port: int
    tls: str = "none"
    verify: bool = True
    caFile: str | None = None
    username: str | None = None
    passwordFile: str | None = None
    address: str | None = None

    @classmethod
    def of(cls, hop: Any) -> "Target":
        if isinstance(hop, Target):
            return hop
        return cls(
            hop.host, hop.port, getattr(hop, "tls", "none"), getattr(hop, "verify", True),
            getattr(hop, "caFile", None), getattr(hop, "username", None),
            getattr(hop, "passwordFile", None), getattr(hop, "address", None),
        )


def _connectFailureText(hop: Any, reason: Failure) -> str:
    """Postfix's wording for a failed connection."""
    host = hop.host
    address = getattr(hop, "address", None)
    if address:
        where = f"{host}[{address}]:{hop.port}"
    elif _isAddressLiteral(host):
        where = f"{host}[{host}]:{hop.port}"
    else:
        where = f"{host}:{hop.port}"
    exc = reason.value
    if isinstance(exc, error.DNSLookupError):
        return f"Host or domain name not found. Name service error for name={host}: {exc}"
    if isinstance(exc, error.ConnectionRefusedError):
        why = "Connection refused"
    elif isinstance(exc, (defer.CancelledError, error.TimeoutError, error.ConnectingCancelledError)):
        why = "Connection timed out"
    else:
        osError = getattr(exc, "osError", None)
        why = str(osError) if osError else (str(exc) or exc.__class__.__name__)
    return f"connect to {where}: {why}"


@dataclass(frozen=True)
class _HopOutcome:
    result: AttemptResult
    final: bool  # False: the courier may try the next hop


def _hasEightBit(openBody: Callable[[], BinaryIO], chunkSize: int = CHUNK_SIZE) -> bool:
    with openBody() as body:
        while True:
            chunk = body.read(chunkSize)
            if not chunk:
                return False
            if not chunk.isascii():
                return True


@dataclass
class _Message:
    """One ``deliver`` call's message, shared by every hop it tries."""

    sender: str
    mailParams: dict
    recipients: list[str]
    openBody: Callable[[], BinaryIO]
    size: int
    _eightBit: bool | None = None

    def hasEightBit(self, chunkSize: int) -> bool:
        """
        Whether the body has a byte over 127: read at most once per attempt,
        and only when a hop lacks 8BITMIME. Raises ``OSError`` when the
        spooled body cannot be read.
        """
        if self._eightBit is None:
            self._eightBit = _hasEightBit(self.openBody, chunkSize)
        return self._eightBit


class Courier:
    """
    Makes delivery attempts. One ``deliver`` call = one attempt over an
    ordered list of next hops (an ``MXRoute`` among them expands to its
    MX hosts' addresses): the next one is tried when a connection fails,
    the greeting, hello, STARTTLS or AUTH is refused, TLS fails, or the
    conversation breaks before MAIL is accepted; once a hop accepted MAIL,
    its answers stand.

    ``passwords`` maps each ``password_file`` path to its ``Secret`` (read
    with ``deliverySecrets`` at start, and by ``reconfigure`` on reload); ``localAddresses`` returns the
    (address, port) pairs relayd listens on: when relayd is one of the MX
    hosts only the better ones are tried, and when it is (among) the best
    the mail bounces instead of looping.
    """

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        timeouts: Timeouts = Timeouts(),
        endpointFactory: Callable[[Any, Any, Timeouts], Any] | None = None,
        chunkSize: int = CHUNK_SIZE,
        resolver: Any = None,
        passwords: dict[str, Secret] | None = None,
        localAddresses: Callable[[], Sequence[tuple[str, int]]] = lambda: (),
        reuseTime: float = REUSE_TIME,
        reuseCountLimit: int = REUSE_COUNT_LIMIT,
        reuseTimeLimit: float = REUSE_TIME_LIMIT,
        addressLimit: int | None = None,
        shuffle: Callable[[list], None] | None = None,
        tlsOptions: Callable[[Target], Any] | None = None,
    ):
        from relayd import resolve

        self._reactor = reactor
        self.heloName = heloName
        self.timeouts = timeouts
        self._endpointFactory = endpointFactory or _endpointFor
        self._chunkSize = chunkSize
        self.resolver = resolver
        self.passwords = dict(passwords or {})
        self.localAddresses = localAddresses
        self.reuseTime = reuseTime
        self.reuseCountLimit = reuseCountLimit
        self.reuseTimeLimit = reuseTimeLimit
        self.addressLimit = addressLimit or resolve.ADDRESS_LIMIT
        self._shuffle = shuffle or _random.shuffle
        self._tlsOptions = tlsOptions or self._cachedTLSOptions
        self._creators: dict[tuple, Any] = {}
        self._idle: dict[tuple, list[tuple[OutboundSession, Any]]] = {}
        # Pool key -> until when that target is tried after the others.
        self._failedUntil: dict[tuple, float] = {}

    def reconfigure(self, config: Any) -> None:
        """
        A reload: the new HELO name, timeouts and delivery passwords for new
        connections; idle ones are closed. A password_file or ca_file that
        cannot be read now keeps what was loaded before (one error line
        each). The resolver reconfigures itself.
        """
        passwords, brokenCaFiles, problems = deliverySecrets(config)
        for problem in problems:
            maillog.daemonEvent(f"reload: {problem}; keeping what was loaded before",
                                level=maillog.LogLevel.error)
        self.heloName = config.hostname
        self.timeouts = config.delivery.timeouts
        self.passwords = {**self.passwords, **passwords}
        self._creators = {key: creator for key, creator in self._creators.items()
                          if key[3] in brokenCaFiles}
        self.closeIdle()

    def deliver(
        self,
        hops: Sequence[Any],
        sender: str,
        mailParams: dict,
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
    ) -> defer.Deferred:
        started = self._reactor.seconds()
        recipients = list(recipients)
        d = defer.ensureDeferred(
            self._deliver(list(hops), sender, mailParams, recipients, openBody, size, started)
        )

        def localFailure(failure: Failure) -> AttemptResult:
            # A bug, not an outcome: keep the message queued.
            from twisted.logger import Logger

            Logger().failure("delivery attempt failed locally", failure)
            text = f"delivery failed locally: {failure.value.__class__.__name__}"
            return AttemptResult(
                "none",
                tuple(RecipientResult(r, 0, "4.3.0", text, DEFERRED) for r in recipients),
                self._reactor.seconds() - started,
                0.0,
            )

        return d.addErrback(localFailure)

    async def _deliver(self, hops, sender, mailParams, recipients, openBody, size, started):
        if not hops:
            return AttemptResult(
                "none",
                self._everyone(recipients, 0, "4.3.5", "no next hop is configured", DEFERRED),
                0.0,
                0.0,
            )
        message = _Message(sender, mailParams, recipients, openBody, size)
        outcome = None
        for hop in self._order(hops):
            if _isMXRoute(hop):
                targets = await self._mxTargets(hop, recipients, started)
                if isinstance(targets, AttemptResult):
                    return targets
            else:
                targets = [Target.of(hop)]
            for target in targets:
                outcome = await self._tryHop(target, message, started)
                self._remember(target, outcome)
                if outcome.final:
                    return outcome.result
        return outcome.result

    def _order(self, hops: list) -> list:
        """Hops that failed recently go last (kept in their order), never dropped."""
        now = self._reactor.seconds()
        for key, until in list(self._failedUntil.items()):
            if until <= now:
                del self._failedUntil[key]
        return sorted(hops, key=lambda hop: not _isMXRoute(hop)
                      and _poolKey(Target.of(hop)) in self._failedUntil)

    def _remember(self, target: Target, outcome: "_HopOutcome") -> None:
        if target.address is not None:
            # An MX host's address: _order only reorders configured hops
            # (MX order comes from DNS at each attempt).
            return
        key = _poolKey(target)
        if outcome.final:
            self._failedUntil.pop(key, None)
        else:
            self._failedUntil[key] = self._reactor.seconds() + FAILED_HOP_TIME

    def _everyone(self, recipients, code, dsn, text, status):
        return tuple(RecipientResult(r, code, dsn, text, status) for r in recipients)

    # -- MX ------------------------------------------------------------------------

    async def _mxTargets(self, route: Any, recipients, started) -> list[Target] | AttemptResult:
        from relayd import resolve

        def unroutable(code, dsn, text, status):
            return AttemptResult("none", self._everyone(recipients, code, dsn, text, status),
                                 self._reactor.seconds() - started, 0.0)

        if self.resolver is None:
            return unroutable(0, "4.3.5", "MX delivery has no resolver configured", DEFERRED)
        found = await resolve.mailTargets(self.resolver, route.domain, self.addressLimit,
                                          self._shuffle)
        if isinstance(found, resolve.Unroutable):
            return unroutable(found.code, found.dsn, found.text,
                              BOUNCED if found.permanent else DEFERRED)
        targets = found.targets
        for i, t in enumerate(targets):
            if self._isLocal(t.address, route.port):
                # As Postfix: relayd is one of the MX hosts, so only the
                # better ones (lower preference) are tried; when relayd is
                # (among) the best, the mail would come back here.
                targets = tuple(x for x in targets[:i] if x.preference < t.preference)
                if not targets:
                    return unroutable(554, "5.4.6",
                                      f"mail for {route.domain} loops back to myself "
                                      f"({t.host}[{t.address}]:{route.port})", BOUNCED)
                break
        return [
            Target(t.host, route.port, route.tls, route.verify, route.caFile, address=t.address)
            for t in targets
        ]

    def _isLocal(self, address: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        for localAddress, localPort in self.localAddresses():
            if localPort != port:
                continue
            try:
                local = ipaddress.ip_address(localAddress or "0.0.0.0")
            except ValueError:
                continue
            if local == ip or (local.is_unspecified and (ip.is_loopback or ip.is_unspecified)):
                return True
        return False

    # -- one target ----------------------------------------------------------------

    def _cachedTLSOptions(self, target: Target):
        key = (target.host, target.tls, target.verify, target.caFile)
        creator = self._creators.get(key)
        if creator is None:
            creator = self._creators[key] = clientTLSOptions(
                target.host, target.tls, target.verify, target.caFile)
        return creator

    async def _open(self, target: Target, message, started):
        """A ready session to ``target``, or the ``_HopOutcome`` saying why not."""
        seconds = self._reactor.seconds
        recipients = message.recipients
        credentials = None
        if target.username is not None:
            password = self.passwords.get(target.passwordFile)
            if password is None:
                return _HopOutcome(AttemptResult("none", self._everyone(
                    recipients, 0, "4.3.5",
                    f"no password loaded from {target.passwordFile} for {target.host}", DEFERRED),
                    seconds() - started, 0.0), final=False)
            credentials = (target.username, password)
        creator = None
        try:
            if target.tls != "none":
                creator = self._tlsOptions(target)
        except (OSError, ValueError) as e:
            return _HopOutcome(AttemptResult("none", self._everyone(
                recipients, 0, "4.7.5", f"cannot set up TLS for {target.host}: {e}", DEFERRED),
                seconds() - started, 0.0), final=False)
        session = OutboundSession(
            self._reactor, self.heloName, self.timeouts, target.host, self._chunkSize,
            tls=target.tls, tlsOptions=lambda: creator, credentials=credentials,
        )
        try:
            endpoint = self._endpointFactory(self._reactor, target, self.timeouts)
            if target.tls == "implicit":
                from twisted.internet.endpoints import wrapClientTLS

                endpoint = wrapClientTLS(creator, endpoint)
            connecting = endpoint.connect(_SessionFactory(lambda: session))
            guard = self._reactor.callLater(self.timeouts.connect, connecting.cancel)
            try:
                await connecting
            finally:
                if guard.active():
                    guard.cancel()
        except Exception:
            failure = Failure()
            return _HopOutcome(
                AttemptResult(
                    "none",
                    self._everyone(recipients, 0, "4.4.1", _connectFailureText(target, failure), DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )

        try:
            await session.whenReady()
        except (HopRefused, SessionBroken) as e:
            await session.quit()
            if target.tls == "may" and session.tlsFailed:
                # Opportunistic TLS that cannot be negotiated: plaintext on
                # a new connection, as Postfix does; never for required TLS.
                return await self._open(replace(target, tls="none"), message, started)
            return _HopOutcome(
                AttemptResult(
                    session.relay,
                    self._everyone(recipients, e.code, e.dsn, e.text, DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )
        if session.tlsInfo is not None:

            info = session.tlsInfo
            maillog.tlsConnection(session.relay, info.trust, info.protocol, info.cipher, info.bits)
        return session

    async def _tryHop(self, target: Target, message, started, reuse: bool = True):
        seconds = self._reactor.seconds
        recipients = message.recipients
        key = _poolKey(target)
        session = self._takeIdle(key) if reuse else None
        reused = session is not None
        if session is None:
            opened = await self._open(target, message, started)
            if isinstance(opened, _HopOutcome):
                return opened
            session = opened
            # Once per session (not per release): out of the pool when it closes.
            session.whenClosed().addCallback(lambda _: self._forget(key, session))
        connectSeconds = seconds() - started

        try:
            refusal = self._refusal(session, message)
        except OSError as e:
            # As when the body cannot be read during DATA (_transaction):
            # keep the message queued; another hop could not read it either.
            session.quit()
            text = f"cannot read the queued message: {e.strerror or e}"
            return _HopOutcome(
                AttemptResult(session.relay, self._everyone(recipients, 0, "4.3.0", text, DEFERRED),
                              connectSeconds, 0.0),
                final=True,
            )
        if refusal is not None:
            self._release(key, session)
            code, dsn, text = refusal
            return _HopOutcome(
                AttemptResult(session.relay, self._everyone(recipients, code, dsn, text, BOUNCED),
                              connectSeconds, 0.0),
                final=True,
            )

        transactionStarted = seconds()
        outcome = await session.sendMessage(message.sender, message.mailParams, recipients,
                                            message.openBody, message.size)
        if reused and not outcome.mailAccepted:
            # The idle connection may have been closed (or timed out) by the
            # peer meanwhile: the answer counts only from a fresh one.
            session.quit()
            return await self._tryHop(target, message, started, reuse=False)
        transmitSeconds = seconds() - transactionStarted
        self._release(key, session)
        return _HopOutcome(
            AttemptResult(session.relay, outcome.results, connectSeconds, transmitSeconds),
            final=outcome.mailAccepted or not outcome.broken,
        )

    def _refusal(self, session: OutboundSession, message: _Message) -> tuple[int, str, str] | None:
        """
        Why this message must not be sent to this peer at all (a bounce), or
        None. Raises ``OSError`` when the body had to be read and cannot be.
        """
        size = message.size
        limit = session.sizeLimit()
        if limit is not None and size > limit:
            return (552, "5.3.4",
                    f"message size {size} exceeds size limit {limit} of server {session.peerName}")
        if "8BITMIME" not in session.capabilities:
            body = _paramValue(message.mailParams, "BODY")
            declared = body is not None and body.upper() == "8BITMIME"
            if declared or message.hasEightBit(self._chunkSize):
                what = "BODY=8BITMIME" if declared else "8-bit bytes in the body"
                return (554, "5.6.3",
                        f"message has 8-bit content ({what}), but host {session.peerName} does "
                        "not support 8BITMIME; relayd does not convert it")
        return None

    # -- idle connections ------------------------------------------------------------

    def _takeIdle(self, key: tuple) -> OutboundSession | None:
        sessions = self._idle.get(key)
        while sessions:
            session, timer = sessions.pop()
            if timer.active():
                timer.cancel()
            if session.usable():
                return session
        return None

    def _release(self, key: tuple, session: OutboundSession) -> None:
        """
        Keep a usable session for the next message to the same hop, briefly,
        unless it reached a reuse limit.
        """
        worn = (session.transactions >= self.reuseCountLimit
                or self._reactor.seconds() - session.connectedAt >= self.reuseTimeLimit)
        if self.reuseTime <= 0 or worn or not session.usable():
            session.quit()
            return
        timer = self._reactor.callLater(self.reuseTime, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, timer))

    def _forget(self, key: tuple, session: OutboundSession) -> None:
        sessions = self._idle.get(key, [])
        for entry in list(sessions):
            if entry[0] is session:
                sessions.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
        if not sessions:
            self._idle.pop(key, None)

    def _expire(self, key: tuple, session: OutboundSession) -> None:
        self._forget(key, session)
        session.quit()

    def closeIdle(self) -> defer.Deferred:
        """QUIT every idle session; fires when all are closed (at shutdown)."""
        closing = []
        for key in list(self._idle):
            for session, timer in list(self._idle.get(key, [])):
                if timer.active():
                    timer.cancel()
                closing.append(session.quit())
            self._idle.pop(key, None)
        return defer.DeferredList(closing, consumeErrors=True)


def _isMXRoute(hop: Any) -> bool:
    from relayd.route import MXRoute

    return isinstance(hop, MXRoute)


def _poolKey(target: Target) -> tuple:
    return (target.host, target.address, target.port, target.tls, target.verify,
            target.caFile, target.username)


def _endpointFor(reactor: Any, target: Any, timeouts: Timeouts) -> Any:
    """
    An MX host's address as is (IPv4 or IPv6); a configured host by name,
    IPv4 and IPv6 (Happy Eyeballs).
    """
    from twisted.internet.endpoints import (
        HostnameEndpoint,
        TCP4ClientEndpoint,
        TCP6ClientEndpoint,
    )

    address = getattr(target, "address", None)
    if address:
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        return kind(reactor, address, target.port, timeout=timeouts.connect)
    return HostnameEndpoint(reactor, target.host, target.port, timeout=timeouts.connect)
