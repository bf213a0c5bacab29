"""
The SMTP client: one connection to a next hop, from the greeting to QUIT.

relayd speaks SMTP to the next hop with its own client (``OutboundSession``,
on ``LineReceiver``) rather than Twisted's ``ESMTPClient``/``ESMTPSender``:
those dot-stuff each chunk on its own (a ``.`` at a chunk boundary ends DATA
early: message smuggling), drop the EHLO capabilities, send no MAIL
parameters, do not pipeline, and never fire their result when the server
hangs up mid-session over an endpoint (docs/twisted-traps.rst, "The SMTP
client").

TLS and AUTH (``OutboundSession._afterHello``): ``starttls`` and ``implicit``
require TLS (any failure defers the hop, never plaintext); ``may`` uses
STARTTLS when offered, without verification, and falls back to plaintext
only when it is not offered or the handshake fails (then on a new
connection, like Postfix: relayd.courier does that). After the 220 to
STARTTLS every byte already received is discarded (a man-in-the-middle's
injected replies) and EHLO is sent again. AUTH PLAIN or LOGIN runs only
over TLS; a refused login defers.

Every reply becomes a ``RecipientResult`` (relayd.delivery); choosing the
next hop, keeping sessions for reuse and MX lookups are relayd.courier's.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Coroutine, Mapping, Sequence

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import dsn, idn
from relayd.config import DeliveryTimeouts
from relayd.delivery import RecipientResult, TLSInfo, classify
from relayd.envelope import Status
from relayd.secret import Secret
from relayd.tcp import setNoDelay
from relayd.tls import tlsFailureText, tlsInfo


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

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


# Per-stage limits in seconds (RFC 5321 / Postfix defaults): the config's
# delivery.timeouts, passed in as they are.
Timeouts = DeliveryTimeouts


@dataclass(frozen=True)
class ServerReply:
    """One complete (possibly multi-line) SMTP reply from the server relayd talks to."""

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
                 status: Status = Status.DEFERRED):
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

    def __init__(self, reply: ServerReply | None, text: str, dsn: str | None = None):
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


def _readFirst(openBody: Callable[[], BinaryIO], size: int) -> tuple[BinaryIO | None, bytes]:
    """Open the body and read its first piece (blocking): see ``_readNext``."""
    return _readNext(openBody(), size)


def _readNext(body: BinaryIO, size: int) -> tuple[BinaryIO | None, bytes]:
    """
    Up to ``size`` bytes of ``body`` (blocking), and ``body``, or None once
    its end is reached and it is closed: a body shorter than a piece costs
    one call.
    """
    try:
        chunk = body.read(size)
    except BaseException:
        body.close()
        raise
    if len(chunk) < size:  # a spooled body is a regular file: a short read is its end
        body.close()
        return None, chunk
    return body, chunk


def _closeQuietly(body: BinaryIO) -> None:
    try:
        body.close()
    except OSError:
        pass


@implementer(IPushProducer)
class _BodyProducer:
    """
    Sends the spooled body piece by piece: each piece is read through
    ``runInThread`` (the file system never on the reactor thread), the next
    one only while the transport wants more. ``prefetch`` reads the first
    piece before ``start``, while DATA waits for its 354; ``discard`` closes
    the body of a transaction that ended before its body went out.
    """

    def __init__(self, session: "OutboundSession", openBody: Callable[[], BinaryIO], chunkSize: int,
                 runInThread: Callable[..., defer.Deferred]):
        self._session = session
        self._openBody = openBody
        self._body: BinaryIO | None = None
        self._chunkSize = chunkSize
        # A body held in memory (relayd.scheduler.InMemoryBody) needs no thread.
        self._runInThread = (defer.maybeDeferred if getattr(openBody, "inMemory", False)
                             else runInThread)
        self._stuffer = DotStuffer(MAX_LINE)
        self.done: defer.Deferred = defer.Deferred()
        self._finished = False
        self._paused = False
        self._reading = False
        self._started = False
        self._pumping = False
        # Prefetched: the first read's outcome waits here until ``start``.
        self._held = False
        self._early: tuple | None = None

    def prefetch(self) -> None:
        self._held = True
        self._pump()

    def start(self) -> None:
        self._held = False
        early, self._early = self._early, None
        if early is None:
            self._pump()
        elif isinstance(early[0], Failure):
            self._readFailed(early[0])
        else:
            self._read(early[0])

    def discard(self) -> None:
        """The transaction ended before the body was sent: close what was opened."""
        self._early = None
        self.stopProducing()

    def _pump(self) -> None:
        # A read that completes at once (tests) loops here instead of nesting.
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self._reading or self._paused or self._finished or self._early is not None):
                self._reading = True
                if self._started:
                    d = self._runInThread(_readNext, self._body, self._chunkSize)
                else:
                    self._started = True
                    d = self._runInThread(_readFirst, self._openBody, self._chunkSize)
                d.addCallbacks(self._read, self._readFailed)
        finally:
            self._pumping = False

    def _read(self, result: tuple[BinaryIO | None, bytes]) -> None:
        self._reading = False
        body, chunk = result
        self._body = body
        if self._finished:  # stopped meanwhile
            self._close()
            return
        if self._held:
            self._early = (result,)
            return
        self._session._bodyProgress()
        transport = self._session.transport
        data = b""
        if chunk:
            try:
                data = self._stuffer.transform(chunk)
            except LineTooLong as e:
                self._fail(e)
                return
        if body is None:
            self._finished = True
            # The last chunk and the final dot in one send.
            transport.write(data + self._stuffer.finish())
            transport.unregisterProducer()
            self.done.callback(None)
            return
        if data:
            transport.write(data)
        self._pump()

    def _readFailed(self, failure: Failure) -> None:
        self._reading = False
        if self._held and not self._finished:
            self._early = (failure,)
            return
        if not self._finished:
            self._fail(failure.value)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self._close()

    def _fail(self, exc: BaseException) -> None:
        self._finished = True
        self._close()
        self._session.transport.unregisterProducer()
        self.done.errback(exc)

    def _close(self) -> None:
        # A read in progress hands the file back to _read, which closes it.
        body, self._body = self._body, None
        if body is not None and not self._reading:
            self._runInThread(_closeQuietly, body)


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
        reactor: IReactorTime,
        heloName: str,
        timeouts: Timeouts = Timeouts(),
        hostName: str = "",
        chunkSize: int = CHUNK_SIZE,
        tls: str = "none",
        tlsOptions: Callable[[], IOpenSSLClientConnectionCreator | None] | None = None,
        credentials: tuple[str, Secret] | None = None,
        runInThread: Callable[..., defer.Deferred] | None = None,
    ):
        self._reactor = reactor
        # Reads the spooled body off the reactor thread (tests: inline).
        self._runInThread = runInThread or defer.maybeDeferred
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
        self._timer: IDelayedCall | None = None
        self._timerStage = "greeting"  # what _timer's deadline is for
        self._broken: SessionBroken | None = None
        # Bugs met in a reply handler (the session was then aborted).
        self.localErrors: list[Failure] = []
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
        if isinstance(peer, (IPv4Address, IPv6Address)):
            self.peerAddress, self.peerPort = peer.host, peer.port
        self.connectedAt = self._reactor.seconds()
        self._expect("greeting", self.timeouts.greeting).addCallback(self._greeted).addErrback(
            self._readyFailed, "greeting"
        )

    def handshakeCompleted(self) -> None:
        self.tlsActive = True
        self._tlsStarting = False
        self.tlsInfo = tlsInfo(self.transport, self.hostName)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        self._connected = False
        if self._broken is None and self._tlsStarting and not self.tlsActive:
            self.tlsFailed = True
            self._broken = SessionBroken(
                "tls",
                f"TLS handshake with {self.peerName} failed: {tlsFailureText(reason)}",
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
        reply = ServerReply(code, tuple(self._replyLines))
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
        if self._waiters:
            head = self._waiters[0]
            self._setTimer(head.timeout, head.stage)
        else:
            self._cancelTimer()

    def _setTimer(self, timeout: float, stage: str) -> None:
        """The one deadline: ``timeout`` seconds from now, for ``stage``."""
        self._timerStage = stage
        if self._timer is not None and self._timer.active():
            # Moved, not cancelled and made anew: a deadline per reply.
            self._timer.reset(timeout)
        else:
            self._timer = self._reactor.callLater(timeout, self._deadlinePassed)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _deadlinePassed(self) -> None:
        self._timedOut(self._timerStage)

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

    def _ask(self, stage: str, command: bytes, handler: Callable[[ServerReply], None]) -> None:
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

    def _greeted(self, reply: ServerReply) -> None:
        if reply.code // 100 != 2:
            self._refused(
                reply, f"host {self.peerName} refused to talk to me: {reply.text()}"
            )
            return
        self._sendEhlo()

    def _ehloAnswered(self, reply: ServerReply) -> None:
        if reply.code // 100 == 2:
            self.capabilities = parseCapabilities(reply)
            self._afterHello()
        elif reply.code in (500, 501, 502, 504, 550) and not self._starttlsTried:
            # After STARTTLS the hop already spoke ESMTP: no HELO fallback.
            self._ask("helo", b"HELO " + self.heloName.encode("ascii"), self._heloAnswered)
        else:
            self._refused(reply, self._saidText(reply, "ehlo"))

    def _heloAnswered(self, reply: ServerReply) -> None:
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

    def _starttlsAnswered(self, reply: ServerReply) -> None:
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

    def _loginStep(self, reply: ServerReply, answers: list[bytes]) -> None:
        if reply.code != 334 or not answers:
            self._authAnswered(reply)
            return
        self._ask("auth", answers[0], lambda nextReply: self._loginStep(nextReply, answers[1:]))

    def _authAnswered(self, reply: ServerReply) -> None:
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

    def _refused(self, reply: ServerReply | None, text: str, dsn: str | None = None) -> None:
        if not self._ready.called:
            self._ready.errback(HopRefused(reply, text, dsn))
        self.quit()

    def _readyFailed(self, failure: Failure, stage: str) -> None:
        if not failure.check(HopRefused, SessionBroken):
            # Raised by a reply handler (a bug, or a name OpenSSL cannot
            # take for SNI): without this whenReady would never fire and the
            # attempt would hang. The hop is dropped and deferred instead,
            # and the failure kept for the log (the scheduler writes it).
            self.localErrors.append(failure)
            if self._broken is None:
                self._broken = SessionBroken(
                    stage, f"local error with {self.peerName} while {_STAGE_TEXT[stage]}: "
                    f"{failure.value.__class__.__name__}", "4.3.0")
            self._abort(stage, self._broken.text)
            return
        if not self._ready.called:
            self._ready.errback(failure)

    def _saidText(self, reply: ServerReply, stage: str) -> str:
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
        body = paramValue(mailParams, "BODY")
        if body is not None and body.upper() == "8BITMIME" and "8BITMIME" in self.capabilities:
            params.append(b"BODY=8BITMIME")
        return params + self._dsnParameters(mailParams, dsn.MAIL_PARAMETERS)

    def rcptParameters(self, rcptParams: Mapping[str, str] | None) -> list[bytes]:
        """RCPT TO parameters the peer understands: NOTIFY and ORCPT if it speaks DSN."""
        return self._dsnParameters(rcptParams, dsn.RCPT_PARAMETERS)

    def _dsnParameters(self, params, names: Sequence[str]) -> list[bytes]:
        # RFC 3461 section 5.2: passed on unchanged to a next hop that
        # advertises DSN, dropped for one that does not (the scheduler then
        # sends the "relayed" notice a SUCCESS request asks for).
        if "DSN" not in self.capabilities:
            return []
        found = []
        for name in names:
            value = paramValue(params, name)
            # Validated when the client sent them; a value that could
            # split the command (read back from a damaged spool) is dropped.
            if value and not any(c <= " " or c == "\x7f" for c in value):
                if name == "ORCPT" and not value.isascii() and "SMTPUTF8" not in self.capabilities:
                    value = dsn.asciiOrcpt(value)
                found.append(f"{name}={value}".encode("utf-8"))
        return found

    # -- a transaction -------------------------------------------------------

    def sendMessage(
        self,
        sender: str,
        mailParams: dict,
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
        recipientParams: Mapping[str, Mapping[str, str]] | None = None,
        smtputf8: bool = False,
    ) -> defer.Deferred:
        """
        Send one message; fires with a ``MessageOutcome`` (never errbacks for
        an SMTP or network outcome). May be called again once it fired.
        ``recipientParams`` are each recipient's RCPT parameters, by address.

        ``smtputf8``: the message needs SMTPUTF8; with a peer that offers it,
        MAIL carries it and the addresses go as they are; otherwise their
        domains go as A-labels, and an address with a UTF-8 local part is
        refused here (5.6.7).

        Recipients refused with "too many recipients" (452 4.5.3) go out in
        another transaction on the same connection at once, as RFC 5321
        section 4.5.3.1.10 asks, for as long as each transaction makes
        progress.
        """
        return defer.ensureDeferred(
            self.messageOutcome(sender, mailParams, recipients, openBody, size,
                                recipientParams, smtputf8))

    def messageOutcome(
        self,
        sender: str,
        mailParams: dict,
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
        recipientParams: Mapping[str, Mapping[str, str]] | None = None,
        smtputf8: bool = False,
    ) -> Coroutine[Any, Any, MessageOutcome]:
        """``sendMessage`` as a coroutine, for a caller that awaits it: no Deferred in between."""
        utf8 = smtputf8 and "SMTPUTF8" in self.capabilities
        return self._transactions(sender, mailParams, list(recipients), openBody, size,
                                  recipientParams or {}, utf8)

    async def _transactions(self, sender, mailParams, recipients, openBody, size, recipientParams,
                            utf8):
        indexes = list(range(len(recipients)))
        final: dict[int, RecipientResult] = {}
        mailAccepted = False
        while True:
            subset = [recipients[i] for i in indexes]
            outcome = await self._transaction(sender, mailParams, subset, openBody, size,
                                              recipientParams, utf8)
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

    async def _transaction(self, sender, mailParams, recipients, openBody, size, recipientParams,
                           utf8=False):
        self.transactions += 1
        outcomes: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        overflow: list[int] = []
        mailAccepted = False
        unclaimed: list[defer.Deferred] = []
        producer: _BodyProducer | None = None

        def remaining(broken: SessionBroken) -> MessageOutcome:
            for i, address in enumerate(recipients):
                if i not in outcomes or i in accepted:
                    outcomes[i] = RecipientResult(
                        address, broken.code, broken.dsn, broken.text, broken.status
                    )
            return MessageOutcome(
                tuple(outcomes[i] for i in range(len(recipients))), mailAccepted, True
            )

        def everyone(reply: ServerReply, stage: str, indexes) -> None:
            for i in indexes:
                outcomes[i] = self._result(recipients[i], reply, stage)

        # An address with CR, LF or angle brackets would inject commands.
        if not _safeAddress(sender):
            text = "sender address is not valid on the wire"
            return MessageOutcome(
                tuple(RecipientResult(r, 553, "5.1.7", text, Status.BOUNCED) for r in recipients),
                False,
                False,
            )
        wireSender = wireAddress(sender, utf8)
        if wireSender is None:
            return MessageOutcome(
                tuple(RecipientResult(r, 553, "5.6.7", _needsSmtputf8Text("sender", self.peerName),
                                      Status.BOUNCED) for r in recipients),
                False,
                False,
            )
        wireRecipients: dict[int, bytes] = {}
        for i, address in enumerate(recipients):
            wire = wireAddress(address, utf8)
            if not _safeAddress(address):
                outcomes[i] = RecipientResult(
                    address, 553, "5.1.3", "recipient address is not valid on the wire", Status.BOUNCED
                )
            elif wire is None:
                outcomes[i] = RecipientResult(
                    address, 553, "5.6.7", _needsSmtputf8Text("recipient", self.peerName),
                    Status.BOUNCED)
            else:
                wireRecipients[i] = wire
        wanted = [i for i in range(len(recipients)) if i not in outcomes]
        if not wanted:
            return MessageOutcome(self._ordered(outcomes, recipients), False, False)

        try:
            if self._needsReset:
                self._send(b"RSET")
                await self._expect("rset", self.timeouts.mail)
                self._needsReset = False
            mail = b"MAIL FROM:<" + wireSender + b">"
            params = self.mailParameters(mailParams, size) + smtputf8Parameter(utf8)
            if params:
                mail += b" " + b" ".join(params)
            rcpts = [b" ".join([b"RCPT TO:<" + wireRecipients[i] + b">",
                                *self.rcptParameters(recipientParams.get(recipients[i]))])
                     for i in wanted]
            dataD = None
            if "PIPELINING" in self.capabilities:
                # DATA goes in the same group as MAIL and RCPT (RFC 2920
                # allows it last): one round trip per message fewer.
                self._send(mail, *rcpts, b"DATA")
                # The body is read meanwhile, ready when 354 comes.
                producer = self._prefetchBody(openBody)
                mailD = self._expect("mail", self.timeouts.mail)
                rcptDs = [self._expect("rcpt", self.timeouts.rcpt) for _ in rcpts]
                dataD = self._expect("data", self.timeouts.dataInit)
                # Claim every pipelined reply, even after MAIL failed; any
                # left unread when the session breaks are silenced below.
                unclaimed.extend(rcptDs)
                unclaimed.append(dataD)
                mailReply = await mailD
                mailAccepted = mailReply.code // 100 == 2
                self._needsReset = mailAccepted
                for i, d in zip(wanted, rcptDs):
                    reply = await d
                    if mailAccepted:
                        self._recordRcpt(i, recipients, reply, outcomes, accepted, overflow)
                dataReply = await dataD
                if dataReply.code == 354 and not (mailAccepted and accepted):
                    # DATA accepted with no one to send to: RFC 2920 3.1
                    # says to end it with a lone dot (an empty message).
                    self._send(b".")
                    await self._expect("dot", self.timeouts.dataDone)
                    self._needsReset = False
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

            if dataD is None:
                self._send(b"DATA")
                producer = self._prefetchBody(openBody)
                dataReply = await self._expect("data", self.timeouts.dataInit)
            if dataReply.code != 354:
                if dataReply.code // 100 == 2:
                    # Not a valid answer to DATA: nothing was sent, try again later.
                    dataReply = ServerReply(451, dataReply.lines)
                everyone(dataReply, "data", accepted)
                return MessageOutcome(self._ordered(outcomes, recipients), True, False,
                                      tuple(overflow))

            sending, producer = producer, None
            await self._sendBody(sending)
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
                f"({MAX_LINE}); not sent", "5.6.0", 554, Status.BOUNCED,
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
            if producer is not None:
                producer.discard()

    def _recordRcpt(self, i, recipients, reply, outcomes, accepted, overflow) -> None:
        if reply.code // 100 == 2:
            accepted.append(i)
        else:
            if reply.code // 100 == 3:
                reply = ServerReply(451, reply.lines)
            if isTooManyRecipients(reply):
                overflow.append(i)
                if reply.code // 100 == 5:
                    # RFC 5321 4.5.3.1.10: an old 552 here is temporary.
                    reply = ServerReply(452, reply.lines)
            outcomes[i] = self._result(recipients[i], reply, "rcpt")

    @staticmethod
    def _ordered(outcomes, recipients) -> tuple[RecipientResult, ...]:
        return tuple(outcomes[i] for i in range(len(recipients)))

    def _result(self, address: str, reply: ServerReply, stage: str) -> RecipientResult:
        status = classify(reply.code)
        if status == Status.SENT:
            text = reply.text()
        else:
            text = self._saidText(reply, stage)
        return RecipientResult(address, reply.code, reply.enhancedCode(), text, status,
                               notifyPassedOn=status is Status.SENT and "DSN" in self.capabilities)

    def _prefetchBody(self, openBody: Callable[[], BinaryIO]) -> _BodyProducer:
        producer = _BodyProducer(self, openBody, self.chunkSize, self._runInThread)
        producer.prefetch()
        return producer

    def _sendBody(self, producer: _BodyProducer) -> defer.Deferred:
        self._producer = producer

        def finished(result):
            self._producer = None
            return result

        producer.done.addBoth(finished)
        self._bodyProgress()
        self.transport.registerProducer(producer, True)
        producer.start()
        return producer.done

    def _bodyProgress(self) -> None:
        """The transport took the last chunk: restart the data-block clock."""
        self._setTimer(self.timeouts.dataBlock, "body")

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


def isTooManyRecipients(reply: ServerReply) -> bool:
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


def parseCapabilities(reply: ServerReply) -> dict[str, str]:
    """EHLO reply lines after the first -> {KEYWORD: parameters}."""
    capabilities: dict[str, str] = {}
    for line in reply.lines[1:]:
        text = line.decode("ascii", "replace").strip()
        if not text:
            continue
        keyword, _, value = text.partition(" ")
        capabilities[keyword.upper()] = value.strip()
    return capabilities


def wireAddress(address: str, smtputf8: bool) -> bytes | None:
    """
    An address as MAIL FROM or RCPT TO carries it: as it is in a SMTPUTF8
    transaction, else with its domain in A-labels; None when it cannot be
    written without SMTPUTF8 (UTF-8 in its local part).
    """
    if smtputf8:
        return address.encode("utf-8")
    converted = idn.asciiAddress(address)
    return None if converted is None else converted.encode("ascii")


def smtputf8Parameter(smtputf8: bool) -> list[bytes]:
    """The MAIL parameter of a SMTPUTF8 transaction (RFC 6531 section 3.4)."""
    return [b"SMTPUTF8"] if smtputf8 else []


def _needsSmtputf8Text(which: str, peerName: str) -> str:
    return f"{which} address needs SMTPUTF8, but host {peerName} does not offer it"


def _safeAddress(address: str) -> bool:
    return not any(c in address for c in "\r\n<>\x00")


def paramValue(params: dict, name: str) -> str | None:
    for key, value in (params or {}).items():
        if key.upper() == name:
            return value if value is not None else ""
    return None


class SessionFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], OutboundSession]):
        self._build = build

    def buildProtocol(self, addr):
        return self._build()
