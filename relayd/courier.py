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

Hooks for later work (deliberately not implemented yet):
- STARTTLS: ``OutboundSession._afterHello`` is where the capability check and
  the TLS upgrade go (clear the line buffer before starting TLS, then EHLO
  again and replace ``capabilities``).
- AUTH: also in ``_afterHello``, after TLS, using ``capabilities["AUTH"]``.
- Several messages per connection: ``sendMessage`` may be called again after
  its Deferred fired; it sends RSET first when the last transaction was left
  open.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"

# Size of one read from the spooled body (and so of one transport write).
CHUNK_SIZE = 64 * 1024

# How long to wait for the 221 after QUIT before dropping the connection: the
# transaction is over by then, so waiting longer only holds a socket.
QUIT_TIMEOUT = 5.0

# Longest reply line accepted from a server (RFC 5321 says 512; be lenient).
MAX_REPLY_LINE = 8192

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


@dataclass(frozen=True)
class Timeouts:
    """Per-stage limits in seconds (Postfix's smtp_*_timeout defaults)."""

    connect: float = 30.0
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    dataInit: float = 120.0
    dataBlock: float = 180.0
    dataDone: float = 600.0


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

    def __init__(self) -> None:
        self._atLineStart = True
        self._pendingCR = False

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
        data = data.replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._atLineStart and data.startswith(b"."):
            data = b"." + data
        self._atLineStart = data.endswith(b"\r\n")
        return data


class SessionBroken(Exception):
    """
    The conversation ended without a usable reply (timeout, lost connection,
    unparsable reply). ``stage`` says what was being done.
    """

    def __init__(self, stage: str, text: str, dsn: str = "4.4.2", code: int = 0):
        super().__init__(text)
        self.stage = stage
        self.text = text
        self.dsn = dsn
        self.code = code


class HopRefused(Exception):
    """The hop answered, but not with a usable greeting or hello."""

    def __init__(self, reply: Reply, text: str):
        super().__init__(text)
        self.reply = reply
        self.text = text


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
}

_IN_REPLY_TO = {
    "ehlo": "EHLO",
    "helo": "HELO",
    "mail": "MAIL FROM",
    "rcpt": "RCPT TO",
    "data": "DATA",
    "dot": "end of DATA",
    "rset": "RSET",
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


@implementer(IPullProducer)
class _BodyProducer:
    """Reads the spooled body chunk by chunk as the transport drains."""

    def __init__(self, session: "OutboundSession", body: BinaryIO, chunkSize: int):
        self._session = session
        self._body = body
        self._chunkSize = chunkSize
        self._stuffer = DotStuffer()
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
            transport.write(self._stuffer.transform(chunk))
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


class OutboundSession(LineReceiver):
    """
    One SMTP client connection: greeting, EHLO (HELO after a 5xx to EHLO),
    then transactions with ``sendMessage`` and finally ``quit``.

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
    ):
        self._reactor = reactor
        self.heloName = heloName
        self.timeouts = timeouts
        self.hostName = hostName
        self.chunkSize = chunkSize
        self.peerAddress = ""
        self.peerPort = 0
        # Upper-cased keyword -> parameter text (b"" when none); empty after HELO.
        self.capabilities: dict[str, str] = {}
        self.esmtp = False
        self._waiters: list[_Waiter] = []
        self._replyLines: list[bytes] = []
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
        self._connected = True
        peer = self.transport.getPeer()
        self.peerAddress = getattr(peer, "host", "") or ""
        self.peerPort = getattr(peer, "port", 0) or 0
        self._expect("greeting", self.timeouts.greeting).addCallbacks(
            self._greeted, self._readyFailed
        )

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        self._connected = False
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
        if not isLast:
            return
        reply = Reply(code, tuple(self._replyLines))
        self._replyLines = []
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

    def _greeted(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            self._refused(
                reply, f"host {self.peerName} refused to talk to me: {reply.text()}"
            )
            return
        self._send(b"EHLO " + self.heloName.encode("ascii"))
        self._expect("ehlo", self.timeouts.greeting).addCallbacks(
            self._ehloAnswered, self._readyFailed
        )

    def _ehloAnswered(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.esmtp = True
            self.capabilities = parseCapabilities(reply)
            self._afterHello()
        elif reply.code in (500, 501, 502, 504, 550):
            self._send(b"HELO " + self.heloName.encode("ascii"))
            self._expect("helo", self.timeouts.greeting).addCallbacks(
                self._heloAnswered, self._readyFailed
            )
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
        The session is usable. STARTTLS (when the hop's tls mode asks for it)
        and AUTH will go here: both must run before ``whenReady`` fires.
        """
        self._ready.callback(self)

    def _refused(self, reply: Reply, text: str) -> None:
        if not self._ready.called:
            self._ready.errback(HopRefused(reply, text))
        self.quit()

    def _readyFailed(self, failure: Failure) -> None:
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
        """
        return defer.ensureDeferred(
            self._transaction(sender, mailParams, list(recipients), openBody, size)
        )

    async def _transaction(self, sender, mailParams, recipients, openBody, size):
        outcomes: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        mailAccepted = False
        unclaimed: list[defer.Deferred] = []

        def remaining(broken: SessionBroken) -> MessageOutcome:
            for i, address in enumerate(recipients):
                if i not in outcomes or i in accepted:
                    outcomes[i] = RecipientResult(
                        address, broken.code, broken.dsn, broken.text, DEFERRED
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
                        self._recordRcpt(i, recipients, reply, outcomes, accepted)
            else:
                self._send(mail)
                mailReply = await self._expect("mail", self.timeouts.mail)
                mailAccepted = mailReply.code // 100 == 2
                self._needsReset = mailAccepted
                if mailAccepted:
                    for i, rcpt in zip(wanted, rcpts):
                        self._send(rcpt)
                        reply = await self._expect("rcpt", self.timeouts.rcpt)
                        self._recordRcpt(i, recipients, reply, outcomes, accepted)
            if not mailAccepted:
                everyone(mailReply, "mail", wanted)
                return MessageOutcome(self._ordered(outcomes, recipients), False, False)
            if not accepted:
                return MessageOutcome(self._ordered(outcomes, recipients), True, False)

            self._send(b"DATA")
            dataReply = await self._expect("data", self.timeouts.dataInit)
            if dataReply.code != 354:
                if dataReply.code // 100 == 2:
                    # Not a valid answer to DATA: nothing was sent, try again later.
                    dataReply = Reply(451, dataReply.lines)
                everyone(dataReply, "data", accepted)
                return MessageOutcome(self._ordered(outcomes, recipients), True, False)

            await self._sendBody(openBody)
            final = await self._expect("dot", self.timeouts.dataDone)
            self._needsReset = False
            everyone(final, "dot", accepted)
            return MessageOutcome(self._ordered(outcomes, recipients), True, False)
        except SessionBroken as broken:
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

    def _recordRcpt(self, i, recipients, reply, outcomes, accepted) -> None:
        if reply.code // 100 == 2:
            accepted.append(i)
        else:
            if reply.code // 100 == 3:
                reply = Reply(451, reply.lines)
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
        return self._whenClosed()

    def _whenClosed(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self._closed.called:
            d.callback(None)
        else:
            self._closed.addBoth(lambda r: (d.callback(None), r)[1])
        return d


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


def _connectFailureText(hop: Any, reason: Failure) -> str:
    """Postfix's wording for a failed connection."""
    host = hop.host
    where = f"{host}[{host}]:{hop.port}" if _isAddressLiteral(host) else f"{host}:{hop.port}"
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


class Courier:
    """
    Makes delivery attempts. One ``deliver`` call = one attempt over an
    ordered list of next hops: the next hop is tried when a connection fails,
    the greeting or hello is refused, or the conversation breaks before MAIL
    is accepted; once a hop accepted MAIL, its answers stand.
    """

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        timeouts: Timeouts = Timeouts(),
        endpointFactory: Callable[[Any, Any, Timeouts], Any] | None = None,
        chunkSize: int = CHUNK_SIZE,
    ):
        self._reactor = reactor
        self.heloName = heloName
        self.timeouts = timeouts
        self._endpointFactory = endpointFactory or _hostnameEndpoint
        self._chunkSize = chunkSize

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
                tuple(
                    RecipientResult(r, 0, "4.3.5", "no next hop is configured", DEFERRED)
                    for r in recipients
                ),
                0.0,
                0.0,
            )
        outcome = None
        for hop in hops:
            outcome = await self._tryHop(hop, sender, mailParams, recipients, openBody, size, started)
            if outcome.final:
                break
        return outcome.result

    def _everyone(self, recipients, code, dsn, text, status):
        return tuple(RecipientResult(r, code, dsn, text, status) for r in recipients)

    async def _tryHop(self, hop, sender, mailParams, recipients, openBody, size, started):
        seconds = self._reactor.seconds
        session = OutboundSession(
            self._reactor, self.heloName, self.timeouts, hop.host, self._chunkSize
        )
        try:
            endpoint = self._endpointFactory(self._reactor, hop, self.timeouts)
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
                    self._everyone(recipients, 0, "4.4.1", _connectFailureText(hop, failure), DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )

        try:
            await session.whenReady()
        except (HopRefused, SessionBroken) as e:
            await session.quit()
            if isinstance(e, HopRefused):
                reply = e.reply
                dsn = reply.enhancedCode()
                if dsn[0] != "4":
                    dsn = "4" + dsn[1:]  # a refusing greeting is temporary
                code = reply.code
            else:
                code, dsn = e.code, e.dsn
            return _HopOutcome(
                AttemptResult(
                    session.relay,
                    self._everyone(recipients, code, dsn, e.text, DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )
        connectSeconds = seconds() - started

        limit = session.sizeLimit()
        if limit is not None and size > limit:
            await session.quit()
            text = f"message size {size} exceeds size limit {limit} of server {session.peerName}"
            return _HopOutcome(
                AttemptResult(
                    session.relay,
                    self._everyone(recipients, 552, "5.3.4", text, BOUNCED),
                    connectSeconds,
                    0.0,
                ),
                final=True,
            )

        transactionStarted = seconds()
        message = await session.sendMessage(sender, mailParams, recipients, openBody, size)
        transmitSeconds = seconds() - transactionStarted
        await session.quit()
        return _HopOutcome(
            AttemptResult(session.relay, message.results, connectSeconds, transmitSeconds),
            final=message.mailAccepted or not message.broken,
        )


def _hostnameEndpoint(reactor: Any, hop: Any, timeouts: Timeouts) -> Any:
    """IPv4 and IPv6 (Happy Eyeballs) to the hop's name or address."""
    from twisted.internet.endpoints import HostnameEndpoint

    return HostnameEndpoint(reactor, hop.host, hop.port, timeout=timeouts.connect)
