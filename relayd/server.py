"""
The SMTP submission server: a hardened subclass of Twisted's ESMTP.

relayd owns the input path (docs/twisted-traps.rst, "1. The ESMTP server's
input path"): one reader takes the raw bytes, splits commands itself and,
while a step is asynchronous (the queue commit after DATA), keeps later
pipelined input queued, so replies go out in order and a body is never read
as commands (Twisted #8126). The DATA
reader scans raw chunks for CRLF.CRLF, the only end of data, and works on
whole chunks with bytes methods so its cost grows with bytes, not lines.

Every reply comes from relayd.replies; every log line from relayd.maillog.
"""

from __future__ import annotations

import binascii
import errno
import functools
import os
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid

from OpenSSL import SSL
from twisted.cred import credentials
from twisted.cred import error as credError
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import dsn, idn, maillog, replies
from relayd.auth import (CheckAbandoned, ClientCredentials, FailureThrottle, IRelayClient,
                         MessageRate, PasswordTooLong, hasRoutingTricks)
from relayd.config import DEFAULT_AUTH_FAILURE_LIMIT, DEFAULT_AUTH_FAILURE_WINDOW, Listener
from relayd.tls import sessionDescription
from relayd.envelope import Envelope, Recipient, newQueueId
from relayd.queue import MessageLanes
from relayd.replies import Reply
from relayd.tcp import setNoDelay

log = Logger()

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512
# Extensions lengthen MAIL and RCPT lines (RFC 5321 §4.5.3.1.4): DSN by
# 100 octets for RET and ENVID, by 500 for NOTIFY and ORCPT (RFC 3461 §4).
# The address and the parameter keywords still fit a line of 512, so a
# reply that echoes one stays within MAX_REPLY.
EXTENDED_LINE = {b"MAIL ": 100, b"RCPT ": 500}
MAX_PATH = {"FROM": MAX_COMMAND_LINE - len("MAIL FROM:<>\r\n"),
            "TO": MAX_COMMAND_LINE - len("RCPT TO:<>\r\n")}
# An unterminated command line past this closes the session (bounded memory).
MAX_UNTERMINATED = 4096
# RFC 5322 §2.1.1: at most 998 characters before the CRLF.
MAX_DATA_LINE = 998
# AUTH command and SASL response lines (RFC 4954 §4 allows more, but no
# PLAIN/LOGIN response of a login and a password needs it).
MAX_AUTH_LINE = 2048
SASL_MECHANISMS = ("PLAIN", "LOGIN")
# The LOGIN mechanism's prompts (base64 of "Username:" and "Password:").
_LOGIN_USERNAME = "VXNlcm5hbWU6"
_LOGIN_PASSWORD = "UGFzc3dvcmQ6"
# What a listener without explicit settings is (tests, the foundation).
DEFAULT_LISTENER = Listener(endpoint="tcp:0", tls="none", auth="none")
# While a commit or password check is pending, input beyond this pauses the transport.
MAX_QUEUED_INPUT = 256 * 1024
# What one read from a socket can add at once (Twisted's TCP transports read
# at most 64 KiB per call; a TLS layer hands on what one read decrypts, plus
# at most one partial record left from before).
MAX_READ = 64 * 1024
# Input held (queued commands and a partial line) past which a session is
# aborted. Reading stops long before -- at MAX_QUEUED_INPUT, or as soon as
# replies back up -- and what was already read can add at most two reads:
# only a transport that does not honour pauseProducing gets here.
MAX_HELD_INPUT = MAX_QUEUED_INPUT + 2 * MAX_READ
# A session that is closing (QUIT, timeout, refusal, shutdown, error) gets
# this long to hand over its last replies; then it is aborted. A client that
# never reads, or never completes its TLS handshake, cannot hold its
# connection open past it.
CLOSE_GRACE = 5.0

# What one session holds in memory at most, by kind (README.rst,
# "Submission security", states the sums).
# Twisted's socket transport pauses its producer past this many unsent bytes
# (FileDescriptor.bufferSize).
SOCKET_BUFFER = 64 * 1024
# The longest reply: a command's argument (at most 512 octets) echoed in a
# reply text, or the EHLO list.
MAX_REPLY = 1024
# Unsent replies: the socket's bound, the reply that crossed it, and the few
# a step already under way may still write (a commit's 250 or an AUTH
# verdict, then a 421).
MAX_UNSENT = SOCKET_BUFFER + 4 * MAX_REPLY
# A TLS layer also collects small writes (up to 64,000 bytes) before it
# encrypts them, and the flush that crosses the socket's bound is one such
# collection; 1 KiB covers the records' overhead.
TLS_WRITE_AGGREGATION = 64_000
MAX_UNSENT_TLS = MAX_UNSENT + TLS_WRITE_AGGREGATION + 1024
# A body goes to its file in pieces of about this size, each written in a
# spool thread; a smaller message is written whole by its commit.
BODY_WRITE_CHUNK = 64 * 1024
# Pieces of one body queued for the file at most: past this, reading from
# the client pauses until the disk has caught up (a fast client cannot make
# a session hold more than MAX_BODY_WRITES * (BODY_WRITE_CHUNK + MAX_READ)).
MAX_BODY_WRITES = 4
# How old the spool's free space measurement may be before a MAIL starts a
# new one (a measurement below the reserve is always repeated).
FREE_SPACE_INTERVAL = 1.0
# Header block held in memory to look for Message-ID/Date before writing.
MAX_HEADER_BLOCK = 256 * 1024
# What the DATA reader holds between reads: the header block and a partial
# line (two bytes of the previous line's end kept for the terminator search).
MAX_DATA_HELD = MAX_HEADER_BLOCK + MAX_DATA_LINE + 4
# Every buffer of a session at its bound together.
MAX_SESSION_MEMORY = MAX_UNSENT + MAX_HELD_INPUT + MAX_DATA_HELD
MAX_SESSION_MEMORY_TLS = MAX_UNSENT_TLS + MAX_HELD_INPUT + MAX_DATA_HELD

_HELO_NAME = re.compile(rb"[\x21-\x7e]{1,255}")
_PARAM_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
_HOSTNAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
_PATH_MAILBOX = re.compile(rf"{_LOCAL}@{_DOMAIN}")
# RFC 6531 section 3.3: with SMTPUTF8, atext and qtext also take any
# non-ASCII character; the domain is then checked as its A-labels.
_UTF8_ATOM = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
_UTF8_LOCAL = re.compile(
    rf'{_UTF8_ATOM}(?:\.{_UTF8_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
_ASCII_DOMAIN = re.compile(_DOMAIN)
_DIGITS = re.compile(r"[0-9]{1,20}")  # str.isdigit() also takes "²" and other scripts' digits
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_HAS_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:")
_HAS_DATE = re.compile(rb"(?im)^date[ \t]*:")
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")
# Verbs of other protocols sent to an SMTP port: HTTP request lines and the
# proxy CONNECT (Postfix's smtpd_forbidden_commands default is CONNECT GET
# POST; the other HTTP methods are no likelier to be SMTP), and POP3/FTP
# logins. A client sending one is not speaking SMTP (a browser or a proxy
# scanner, or a cross-protocol attack through one): one reply, then closed.
_NON_SMTP_VERBS = frozenset({
    b"CONNECT", b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
    b"USER", b"PASS",
})
# Logged as the verb alone: what follows may be a password.
_SECRET_ARGUMENT_VERBS = frozenset({b"PASS"})


class CommandSyntaxError(Exception):
    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


# Both parse the address (ipaddress is pure Python): remembered for the
# addresses seen most recently, as most connections come from a few clients.
@functools.lru_cache(maxsize=1024)
def normalizeAddress(host: str) -> str:
    """The client's IP as relayd logs and judges it: ``::ffff:a.b.c.d`` is ``a.b.c.d``."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@functools.lru_cache(maxsize=1024)
def isTrusted(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks if net.version == ip.version)


@implementer(IRelayClient)
@dataclass(frozen=True)
class TrustedNetworkClient:
    """The avatar of a client whose address is in relay.trusted_networks: it may relay."""

    login = None

    def mayRelay(self, recipient: str) -> bool:
        return True

    def maySend(self, sender: str) -> bool:
        return True


@implementer(IRelayClient)
@dataclass(frozen=True)
class AnonymousClient:
    """The avatar of any other client without AUTH: it may not relay."""

    login = None

    def mayRelay(self, recipient: str) -> bool:
        return False

    def maySend(self, sender: str) -> bool:
        return True


def parsePath(text: str, keyword: str, smtputf8: bool = False) -> tuple[str, dict[str, str | None]]:
    """
    Parse ``FROM:<addr> PARAM=value ...`` (or ``TO:``) into the address
    without brackets and its parameters, upper-cased keywords. UTF-8 in the
    address needs SMTPUTF8: on this MAIL, or (``smtputf8``) on the
    transaction's. Raises CommandSyntaxError with the reply to send.
    """
    syntax = replies.SYNTAX_MAIL if keyword == "FROM" else replies.SYNTAX_RCPT
    badAddress = replies.BAD_SENDER_ADDRESS if keyword == "FROM" else replies.BAD_RECIPIENT_ADDRESS
    head, sep, rest = text.partition(":")
    if not sep or head.strip().upper() != keyword:
        raise CommandSyntaxError(syntax)
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise CommandSyntaxError(syntax)
    end = rest.find(">")
    if end < 0:
        raise CommandSyntaxError(syntax)
    address = rest[1:end]
    if len(address) > MAX_PATH[keyword]:
        # As long as the line would be without extension parameters.
        raise CommandSyntaxError(replies.LINE_TOO_LONG)
    if not address.isascii():
        if not (smtputf8 or (keyword == "FROM" and _declaresSmtputf8(rest[end + 1:]))):
            raise CommandSyntaxError(replies.NON_ASCII_ADDRESS)
        if not isUtf8Mailbox(address):
            raise CommandSyntaxError(badAddress)
    elif address and not _PATH_MAILBOX.fullmatch(address) and not (
            keyword == "TO" and address.lower() == "postmaster"):
        raise CommandSyntaxError(badAddress)
    params: dict[str, str | None] = {}
    for token in rest[end + 1 :].split():
        key, eq, value = token.partition("=")
        if not _PARAM_KEYWORD.fullmatch(key) or len(key) > MAX_PATH[keyword]:
            raise CommandSyntaxError(syntax)
        if key.upper() in params:
            raise CommandSyntaxError(replies.DUPLICATE_PARAMETER.format(name=key.upper()))
        params[key.upper()] = value if eq else None
    return address, params


def _declaresSmtputf8(parameters: str) -> bool:
    return any(token.partition("=")[0].upper() == "SMTPUTF8" for token in parameters.split())


def isUtf8Mailbox(address: str) -> bool:
    """
    An RFC 6531 mailbox with UTF-8 in it: the extended local part grammar,
    a domain IDNA2008 accepts (or an ASCII one), no control characters,
    and RFC 5321's length limits counted in octets (a UTF-8 character takes
    up to four: fewer characters than an ASCII address may have).
    """
    local, at, domain = address.rpartition("@")
    if (not at or not _UTF8_LOCAL.fullmatch(local) or idn.hasRefusedCharacters(address)
            or not idn.withinLengthLimits(address)):
        return False
    try:
        asciiDomain = idn.toAscii(domain)
    except idn.IDNError:
        return domain.startswith("[") and _ASCII_DOMAIN.fullmatch(domain) is not None
    return _ASCII_DOMAIN.fullmatch(asciiDomain) is not None


def needsSmtputf8(sender: str, recipients, header: bytes | None) -> bool:
    """
    Whether a message of a transaction that declared SMTPUTF8 can only go to
    a next hop that offers it: UTF-8 in a local part, or in the header
    block (None: too big to hold, so it may have some). UTF-8 only in
    domains is not enough: those are sent as A-labels.
    """
    return (header is None or not header.isascii() or idn.hasUtf8LocalPart(sender)
            or any(idn.hasUtf8LocalPart(r.address) for r in recipients))


@dataclass
class Transaction:
    """One MAIL ... DATA transaction of a session."""

    queueId: str
    sender: str
    mailParams: dict[str, str | None]
    recipients: list[Recipient] = field(default_factory=list)
    # MAIL's DSN parameters (relayd.dsn), validated.
    ret: str | None = None
    envid: str | None = None
    # MAIL carried SMTPUTF8 (RFC 6531): UTF-8 addresses and headers allowed.
    smtputf8: bool = False


@implementer(IHandshakeListener, IPushProducer)
class SubmissionServer(smtp.ESMTP):
    """
    One SMTP session. The factory passes in the policy (trusted networks,
    limits), the spool and the commit function, and the session tracker;
    ``listener`` says whether this port offers STARTTLS, is TLS from the
    first byte, and whether AUTH is off, optional or required.

    The session is the producer of its replies, registered with its
    transport: when the transport holds more unsent bytes than it wants
    (Twisted's socket buffer past 64 KiB, or a TLS layer that cannot send
    yet) it pauses the session, which then stops reading and answering
    until the client has read its replies, and drops a client that stays
    that way longer than limits.command_timeout.
    """

    noisy = False

    def __init__(self, factory: "SubmissionFactory", listener: Listener = DEFAULT_LISTENER):
        super().__init__()
        self.factory = factory
        self.listener = listener
        self.timeout = factory.config.limits.commandTimeout
        self.callLater = factory.clock.callLater
        self._inbox = bytearray()
        self._busy = False  # an asynchronous step (commit, password check) is pending
        self._readingPaused = False  # transport.pauseProducing() is in force
        self._producing = False  # registered as the transport's producer
        self._writeBlocked = False  # the transport paused us: replies are backed up
        self._writtenWhileBlocked = 0  # reply bytes written since the transport paused us
        self._stallTimer = None  # drops a client that does not read its replies
        self._closeTimer = None  # aborts a session whose close does not complete
        self._savedTimeout: float | None = None
        self._check: ClientCredentials | None = None  # the password check in flight
        self.lastVerb = "CONNECT"  # for "timeout after X" and "lost connection after X", as Postfix logs them
        self._processing = False
        self._closing = False  # reply sent that ends the session; ignore input
        self._shutdownRequested = False
        self._data: _DataReader | None = None
        self._bodyWrites = 0  # pieces of the body queued for its file or being written
        self.heloName: str | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.errors = 0
        self.clientAddress = "unknown"
        self.clientName = "unknown"
        self.avatar: IRelayClient = AnonymousClient()
        self.connectAvatar: IRelayClient = self.avatar
        self.trusted = False
        # TLS: on since connect (implicit) or since STARTTLS; the handshake
        # is pending until the first decrypted bytes (or handshakeCompleted).
        self.secure = False
        self._handshaking = False
        # AUTH: the login and mechanism once authenticated; the exchange in
        # progress (mechanism, login so far) while it waits for a response line.
        self.authLogin: str | None = None
        self.authMethod: str | None = None
        self._sasl: tuple[str, bytes | None] | None = None
        self._greeting = None  # the delayed greeting's call, while it waits
        self._naming = None  # the client name lookup, while the banner waits for it
        self._admitting = None  # the admission's answer, when another process counts sessions
        self._lost = False

    # Connection

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.clientAddress = normalizeAddress(str(peer) if host is None else host)
        # Until the name is confirmed, and for good when it is not: Postfix's "unknown".
        self.clientName = "unknown"
        # Trust is the address's alone, never the name's.
        self.trusted = isTrusted(self.clientAddress, self.factory.config.relay.trustedNetworks)
        # auth: required binds everyone on the listener, trusted networks too.
        relays = self.trusted and self.listener.auth != "required"
        self.avatar = self.connectAvatar = TrustedNetworkClient() if relays else AnonymousClient()
        if self.listener.tls == "implicit":
            self.secure = self._handshaking = True
        refusal = self.factory.sessionStarted(self)
        if isinstance(refusal, defer.Deferred):
            # The master process counts the sessions of every process:
            # nothing is read from the client until it has answered.
            self._admitting = refusal
            self.transport.pauseProducing()
            refusal.addCallback(self._admitted)
            refusal.addErrback(lambda f: log.failure("admitting a client", f))
            return
        self._admitted(refusal)

    def _admitted(self, refusal: Reply | None) -> None:
        """The session may go on (``refusal`` None), or says why not and closes."""
        if self._admitting is not None:
            self._admitting = None
            if self._lost:
                return
            self.transport.resumeProducing()
        if refusal is not None:
            # Refused at once, without a DNS lookup: a flood costs no queries.
            maillog.connected(self.clientName, self.clientAddress, self.listener.endpoint)
            # On an implicit-TLS port the 421 waits for a handshake that a
            # silent client never starts; _close's timer aborts the
            # connection after CLOSE_GRACE. Waiting that little (rather than
            # aborting at once) lets a real client over the limit read why
            # it was refused, and a refused session holds no slot meanwhile.
            self.reply(refusal)
            self._close()
            return
        self.setTimeout(self.timeout)
        if not self._handshaking:
            self._registerProducer()
        # As Postfix: the name first (bounded by limits.client_name_timeout),
        # so "connect from" and every later line carry it; nothing is read
        # from the client meanwhile.
        if self.factory.clientNames is None:
            self._named(None)
            return
        naming = self.factory.clientNames(self.clientAddress)
        if not naming.called:
            self._naming = naming
            self.transport.pauseProducing()
        naming.addCallback(self._named)

    def _named(self, found) -> None:
        """The client's name is known (or "unknown"): log the connection, then greet."""
        paused, self._naming = self._naming is not None, None
        if self._lost:
            return
        if found is not None:
            self.clientName = found.name
            if found.warning:
                maillog.smtpdWarning(found.warning)
        maillog.connected(self.clientName, self.clientAddress, self.listener.endpoint)
        if paused:
            self.transport.resumeProducing()
        if self._closing:  # the daemon began stopping meanwhile: 421 sent already
            return
        delay = self.factory.config.limits.greetingDelay
        if delay > 0:
            self._greeting = self.callLater(delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greeting = None
        self.reply(_greetingReply(self.factory.hostname))

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        session = sessionDescription(self.transport)
        if session is not None:
            maillog.tlsAccepted(self.clientName, self.clientAddress, *session)
        self._registerProducer()

    # Backpressure: the session as its transport's producer

    def _registerProducer(self) -> None:
        # Only once TLS is up: before the handshake a TLS transport pauses
        # its producer for every write it must hold, and a session that
        # stopped reading then would never receive the handshake itself.
        # Across STARTTLS, Twisted moves the registration into the TLS layer.
        if self._producing or self._closing or self._lost:
            return
        self._producing = True
        self.transport.registerProducer(self, True)

    def _unregisterProducer(self) -> None:
        # Before loseConnection: with a producer registered, neither a socket
        # nor a TLS layer ever completes a close.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        """The transport's unsent bytes passed its bound: stop reading and answering."""
        if self._writeBlocked or self._lost or self._closing:
            return
        self._writeBlocked = True
        # Not idle but stalled: the stall timer decides, with its own log line.
        self._savedTimeout = self.timeOut
        self.setTimeout(None)
        self._stallTimer = self.callLater(self.factory.config.limits.commandTimeout,
                                          self._writeStalled)
        self._updateReading()

    def resumeProducing(self) -> None:
        """The client has read its replies: carry on with what it sent."""
        if not self._writeBlocked:
            return
        self._writeBlocked = False
        self._writtenWhileBlocked = 0
        self._cancelTimer("_stallTimer")
        if self._lost or self._closing:
            return
        self.setTimeout(self._savedTimeout)
        self._updateReading()
        self._process()

    def stopProducing(self) -> None:
        """The connection is gone; connectionLost does the cleaning up."""

    def _writeStalled(self) -> None:
        self._stallTimer = None
        maillog.notReading(self.lastVerb, self.clientName, self.clientAddress,
                           self.unsentReplyBytes, self.factory.config.limits.commandTimeout)
        self._abort()

    def _updateReading(self) -> None:
        """Read from the client unless replies are backed up or too much input waits for a pending step."""
        if self._lost or self._closing:
            return
        pause = (self._writeBlocked or self._bodyWrites >= MAX_BODY_WRITES
                 or (self._busy and len(self._inbox) > MAX_QUEUED_INPUT))
        if pause and not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()
        elif not pause and self._readingPaused:
            self._readingPaused = False
            self.transport.resumeProducing()

    def _cancelTimer(self, name: str) -> None:
        timer = getattr(self, name)
        setattr(self, name, None)
        if timer is not None and timer.active():
            timer.cancel()

    # What the session holds in memory, for tests and bounds

    @property
    def unsentReplyBytes(self) -> int:
        """Replies written and not yet handed to the kernel, as the socket's public buffer shows (unsentBytes)."""
        return unsentBytes(self.transport) if self.transport is not None else 0

    @property
    def repliesWrittenWhileBlocked(self) -> int:
        """
        Reply bytes written since the transport said its buffer was full
        (pauseProducing): the few a step already under way may still write,
        at most MAX_UNSENT - SOCKET_BUFFER.
        """
        return self._writtenWhileBlocked

    @property
    def pendingInputBytes(self) -> int:
        """Input read and not yet handled: queued commands and a partial line (at most MAX_HELD_INPUT)."""
        return len(self._inbox)

    @property
    def partialLineBytes(self) -> int:
        """The unterminated command line at the end of the input (at most MAX_UNTERMINATED when handled)."""
        if self._data is not None:
            return 0
        return len(self._inbox) - (self._inbox.rfind(b"\n") + 1)

    @property
    def dataBufferBytes(self) -> int:
        """Body bytes the DATA reader holds (a partial line, the header block)."""
        return self._data.heldBytes if self._data is not None else 0

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._inbox.clear()
        if self._check is not None:
            # Not started yet: it never will be; started: its verdict still counts.
            self._check.abandon()
        self._cancelTimer("_stallTimer")
        self._cancelTimer("_closeTimer")
        if self._naming is not None or self._admitting is not None:
            # Gone before its name was known (or before it was admitted):
            # still one connect line per disconnect.
            self._naming = None
            maillog.connected(self.clientName, self.clientAddress, self.listener.endpoint)
        if self._greeting is not None and self._greeting.active():
            self._greeting.cancel()
        if self._handshaking and reason is not None and reason.check(SSL.Error):
            maillog.tlsHandshakeFailed(self.clientName, self.clientAddress, _sslReason(reason.value))
        if not self._closing and self.lastVerb == "AUTH":
            # Gone in the middle of AUTH: a guess that did not wait for its
            # answer. Postfix logs this line after any command; relayd only
            # here, where it marks an attack (fail2ban's postfix filter
            # matches it in aggressive mode) and not a health check.
            maillog.lostConnection(self.lastVerb, self.clientName, self.clientAddress)
        self.setTimeout(None)
        if self._data is not None:
            self._discard(self._data.writer)
            self._data = None
        self.factory.sessionEnded(self)
        maillog.disconnected(self.clientName, self.clientAddress, listener=self.listener.endpoint)

    def timeoutConnection(self) -> None:
        if self._handshaking:
            # Nothing can be said to a client stuck in the handshake.
            self._abort()
            return
        self.reply(replies.IDLE_TIMEOUT.format(hostname=self.factory.hostname))
        self._close()

    def reply(self, reply: Reply) -> None:
        data = reply.toBytes()
        if self._writeBlocked:
            self._writtenWhileBlocked += len(data)
        self.transport.write(data)

    def sendCode(self, code, message=b""):
        # Twisted's own code paths must not reach the wire unnoticed: every
        # reply of relayd goes through reply(). Kept only as a loud guard.
        raise RuntimeError("relayd sends replies through SubmissionServer.reply")

    def _stopSession(self) -> bool:
        """Stop reading, answering and timing the session; False if it is already gone."""
        if self._lost:
            return False
        self._closing = True
        self._inbox.clear()
        self.setTimeout(None)
        self._cancelTimer("_stallTimer")
        # With a producer registered, neither a socket nor a TLS layer ever
        # completes a close.
        self._unregisterProducer()
        return True

    def _close(self) -> None:
        """Close after the replies written so far; abort if that takes longer than CLOSE_GRACE."""
        if not self._stopSession():
            return
        self.transport.loseConnection()
        if self._closeTimer is None:
            self._closeTimer = self.callLater(CLOSE_GRACE, self._closeOverdue)

    def _closeOverdue(self) -> None:
        self._closeTimer = None
        if not self._lost:
            self.transport.abortConnection()

    def _abort(self) -> None:
        """Drop the connection now, without a word (a client that cannot be answered)."""
        if self._stopSession():
            self.transport.abortConnection()

    def shutdown(self) -> None:
        """The daemon is stopping: say 421 now, or right after the data/commit in progress."""
        self._shutdownRequested = True
        self._shutdownIfDue()

    def _shutdownIfDue(self) -> bool:
        """421 4.3.2 and close, once a requested shutdown finds nothing in progress."""
        if (self._shutdownRequested and not self._busy and self._data is None
                and not self._closing):
            self.reply(replies.SHUTTING_DOWN.format(hostname=self.factory.hostname))
            self._close()
            return True
        return False

    # The input path

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._lost:
            return
        if self._handshaking:
            # Decrypted bytes: the handshake is done (handshakeCompleted is
            # not forwarded behind the haproxy wrapper).
            self._handshaking = False
            self._registerProducer()
        if self._greeting is not None:
            # Talking before the banner: a bot that does not wait for replies.
            self._greeting.cancel()
            self._greeting = None
            maillog.rejected(None, "CONNECT", self.clientName, self.clientAddress,
                             str(replies.PREGREET), None, None, None)
            self.reply(replies.PREGREET)
            self._close()
            return
        if not self._writeBlocked:
            self.resetTimeout()
        self._inbox += data
        if len(self._inbox) > MAX_HELD_INPUT:
            maillog.smtpdWarning(
                f"{maillog.hostAddr(self.clientName, self.clientAddress)}: {len(self._inbox)} bytes "
                f"of input held while reading was paused; connection dropped")
            return self._abort()
        self._process()

    def _process(self) -> None:
        # A commit that completes synchronously resumes input from inside
        # this loop; the outer loop then simply carries on.
        if self._processing or self._lost:
            return
        self._processing = True
        try:
            self._processInbox()
        finally:
            self._processing = False

    def _processInbox(self) -> None:
        inbox = self._inbox
        while inbox and not self._busy and not self._closing and not self._writeBlocked:
            if self._data is not None:
                if self._bodyWrites >= MAX_BODY_WRITES:
                    break  # the disk is behind: wait for a piece to be written
                rest = self._data.feed(inbox)  # copies what it keeps
                inbox.clear()
                if rest is None:
                    self._writeBodyOut()
                    continue
                inbox += rest
                self._endOfData()
                continue
            end = inbox.find(b"\n")
            if end < 0:
                if len(inbox) > MAX_UNTERMINATED:
                    self.reply(replies.LINE_TOO_LONG)
                    self._close()
                return
            line = bytes(inbox[: end + 1])
            del inbox[: end + 1]
            self._commandLine(line)
        self._updateReading()

    def _resume(self) -> None:
        self._busy = False
        if self._lost:
            return
        self._updateReading()
        if self._shutdownIfDue():
            return
        self._process()

    def _commandLine(self, raw: bytes) -> None:
        if self._sasl is not None:
            return self._saslLine(raw)
        # Before any other check, so a long or LF-only request line is caught too.
        words = raw[:maillog.NON_SMTP_LOGGED].split(None, 1)
        if words and words[0].upper() not in self._commands and _isNonSmtpVerb(words[0]):
            return self._nonSmtpCommand(raw, words[0])
        # An AUTH initial response may be longer than a command.
        head = raw[:5].upper()
        isAuth = head == b"AUTH "
        limit = MAX_AUTH_LINE if isAuth else MAX_COMMAND_LINE + EXTENDED_LINE.get(head, 0)
        if len(raw) > limit:
            return self._error(replies.AUTH_LINE_TOO_LONG if isAuth else replies.LINE_TOO_LONG)
        line = self._withoutLineEnding(raw)
        if line is None:
            return self._error(replies.BARE_NEWLINE_COMMAND)
        if _CONTROL_BYTES.search(line):
            return self._error(replies.BAD_CHARACTERS)
        verb, _, rest = line.strip().partition(b" ")
        verb = verb.upper()
        handler = self._commands.get(verb)
        if handler is None:
            self.lastVerb = "UNKNOWN"
            return self._error(replies.COMMAND_UNRECOGNIZED)
        self.lastVerb = verb.decode("ascii")
        try:
            text = rest.strip().decode("utf-8")
        except UnicodeDecodeError:
            return self._error(replies.BAD_CHARACTERS)
        handler(self, text)

    def _nonSmtpCommand(self, raw: bytes, verb: bytes) -> None:
        """Postfix's answer to smtpd_forbidden_commands and header lines: log, one reply, close."""
        # A header line is logged by its name only (Authorization: ...).
        whole = verb.upper() in _NON_SMTP_VERBS and verb.upper() not in _SECRET_ARGUMENT_VERBS
        shown = raw[:maillog.NON_SMTP_LOGGED] if whole else verb
        maillog.nonSmtpCommand(self.clientName, self.clientAddress,
                               shown.rstrip(b"\r\n").decode("latin-1"))
        self.reply(replies.NON_SMTP_COMMAND)
        self._close()

    def _withoutLineEnding(self, raw: bytes) -> bytes | None:
        """The line without its CRLF; None when a bare CR or LF makes it unacceptable."""
        if raw.endswith(b"\r\n"):
            line = raw[:-2]
        elif self.trusted:
            # Printers and scripts on trusted networks end lines with LF.
            line = raw[:-1]
        else:
            return None
        if b"\r" in line or b"\n" in line:
            return None
        return line

    def _error(self, reply: Reply) -> None:
        self.errors += 1
        self.reply(reply)
        if self.errors >= self.factory.config.limits.errors:
            self.reply(replies.TOO_MANY_ERRORS.format(hostname=self.factory.hostname))
            self._close()

    # Commands

    def do_HELO(self, rest: str) -> None:
        self._hello(rest, "HELO", esmtp=False)

    def do_EHLO(self, rest: str) -> None:
        self._hello(rest, "EHLO", esmtp=True)

    def _hello(self, rest: str, verb: str, esmtp: bool) -> None:
        # Only printable ASCII without spaces: nothing can reach the Received
        # header or a log line through the HELO name (docs/twisted-traps.rst,
        # "1. The ESMTP server's input path").
        if not _HELO_NAME.fullmatch(rest.encode("utf-8", "replace")):
            return self._error(replies.SYNTAX_HELO.format(verb=verb))
        self.heloName = rest
        self.esmtp = esmtp
        self._resetTransaction()
        hostname = self.factory.hostname
        if not esmtp:
            return self.reply(replies.HELO_OK.format(hostname=hostname))
        self.reply(_ehloReply(hostname, self.factory.config.limits.messageSize,
                              self._offersSTARTTLS(), self._offersAUTH()))

    def _offersSTARTTLS(self) -> bool:
        return self.listener.tls == "starttls" and not self.secure and self.factory.tls is not None

    def _offersAUTH(self) -> bool:
        return (self.listener.auth != "none" and self.factory.portal is not None
                and (self.secure or self.listener.plaintextAuth))

    def do_MAIL(self, rest: str) -> None:
        if self.heloName is None:
            return self._error(replies.NEED_HELO)
        if self.transaction is not None:
            return self._error(replies.NESTED_MAIL)
        if self.listener.auth == "required" and self.authLogin is None:
            return self._reject("MAIL", replies.AUTH_REQUIRED, sender=None, recipient=None)
        try:
            sender, params = parsePath(rest, "FROM")
        except CommandSyntaxError as e:
            return self._reject("MAIL", e.reply, sender=None, recipient=None)
        problem = self._checkMailParams(params)
        if problem is not None:
            return self._reject("MAIL", problem, sender=sender, recipient=None)
        params.pop("AUTH", None)
        ret, envid = params.pop("RET", None), params.pop("ENVID", None)
        smtputf8 = "SMTPUTF8" in params
        params.pop("SMTPUTF8", None)
        if not self.avatar.maySend(sender):
            return self._reject("MAIL", replies.SENDER_NOT_OWNED.format(address=sender),
                                sender=sender, recipient=None)
        if self.authLogin is not None and self.factory.messageRate.exceeded(self.authLogin):
            return self._reject("MAIL", replies.USER_RATE_EXCEEDED, sender=sender, recipient=None)
        if self.factory.lowOnSpace():
            return self._reject("MAIL", replies.INSUFFICIENT_STORAGE, sender=sender, recipient=None)
        self.transaction = Transaction(queueId=newQueueId(), sender=sender, mailParams=params,
                                       ret=ret, envid=envid, smtputf8=smtputf8)
        self.reply(replies.SENDER_OK)

    def _checkMailParams(self, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _DIGITS.fullmatch(value):
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
                if int(value) > self.factory.config.limits.messageSize:
                    return replies.MESSAGE_TOO_BIG_DECLARED
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
                params[key] = value.upper()
            elif key == "AUTH":
                # RFC 4954 §5: accepted, and not trusted: relayd records its
                # own AUTH identity and never passes a client's claim on.
                if value is None or not (value == "<>" or dsn.isXtext(value)):
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
            elif key == "RET":
                ret = dsn.parseRet(value)
                if ret is None:
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
                params[key] = ret
            elif key == "ENVID":
                if value is not None and len(value) > dsn.ENVID_LIMIT:
                    return replies.PARAMETER_TOO_LONG.format(name=key)
                if dsn.parseEnvid(value) is None:
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
            elif key == "SMTPUTF8":
                if value is not None:  # RFC 6531 section 3.4: a keyword without a value
                    return replies.BAD_PARAMETER_VALUE.format(name=key)
            else:
                return replies.UNKNOWN_PARAMETER.format(name=key)
        return None

    def do_RCPT(self, rest: str) -> None:
        txn = self.transaction
        if txn is None:
            return self._error(replies.NEED_MAIL)
        try:
            address, params = parsePath(rest, "TO", smtputf8=txn.smtputf8)
        except CommandSyntaxError as e:
            return self._reject("RCPT", e.reply, sender=txn.sender, recipient=None)
        if not address:
            return self._reject("RCPT", replies.BAD_RECIPIENT_ADDRESS, sender=txn.sender, recipient="")
        problem, notify, orcpt = self._checkRcptParams(params, txn.smtputf8)
        if problem is not None:
            return self._reject("RCPT", problem, sender=txn.sender, recipient=address)
        if isPostmaster(address, self.factory.hostname):
            # RFC 5321 section 4.5.1: accepted from anyone, for the configured address.
            postmaster = self.factory.config.postmaster
            if postmaster is None:
                return self._reject("RCPT", replies.NO_POSTMASTER.format(address=address),
                                    sender=txn.sender, recipient=address)
            address = postmaster
        elif hasRoutingTricks(address) or not self.avatar.mayRelay(address):
            return self._reject("RCPT", replies.RELAY_DENIED.format(address=address),
                                sender=txn.sender, recipient=address)
        if len(txn.recipients) >= self.factory.config.limits.recipients:
            return self._reject("RCPT", replies.TOO_MANY_RECIPIENTS, sender=txn.sender, recipient=address)
        if not txn.recipients:
            # Logged at the first accepted recipient, as Postfix does when it
            # opens the queue file: pflogsumm counts each client= line as a
            # message received, so a transaction refused at every RCPT
            # must not produce one.
            maillog.clientAccepted(txn.queueId, self.clientName, self.clientAddress,
                                   self.authMethod, self.authLogin)
        txn.recipients.append(Recipient(address=address, notify=notify, orcpt=orcpt))
        self.reply(replies.RECIPIENT_OK)

    def _checkRcptParams(self, params: dict[str, str | None], smtputf8: bool = False
                         ) -> tuple[Reply | None, tuple[str, ...] | None, str | None]:
        """The reply to the first bad or unknown parameter, else None; NOTIFY's words; ORCPT."""
        notify = orcpt = None
        for key, value in params.items():
            if key == "NOTIFY":
                notify = dsn.parseNotify(value)
                if notify is None:
                    return replies.BAD_PARAMETER_VALUE.format(name=key), None, None
            elif key == "ORCPT":
                if value is not None and len(value) > dsn.ORCPT_LIMIT:
                    return replies.PARAMETER_TOO_LONG.format(name=key), None, None
                # RFC 6533: utf-8; with UTF-8 in it needs a SMTPUTF8 transaction.
                orcpt = dsn.parseOrcpt(value, smtputf8)
                if orcpt is None:
                    return replies.BAD_PARAMETER_VALUE.format(name=key), None, None
            else:
                return replies.UNKNOWN_PARAMETER.format(name=key), None, None
        return None, notify, orcpt

    def _reject(self, stage: str, reply: Reply, sender: str | None, recipient: str | None,
                queueId: str | None = None) -> None:
        # Envelope rejects log NOQUEUE, as Postfix does (nothing is queued
        # yet) and as fail2ban's postfix filters expect; only a message
        # refused at its end carries its queue id.
        maillog.rejected(
            queueId,
            stage, self.clientName, self.clientAddress, str(reply), sender, recipient,
            self.heloName, proto="ESMTP" if self.esmtp else "SMTP",
        )
        self._error(reply)

    def do_DATA(self, rest: str) -> None:
        txn = self.transaction
        if rest:
            return self._error(replies.SYNTAX_NO_ARGUMENTS.format(verb="DATA"))
        if txn is None:
            return self._error(replies.NEED_MAIL)
        if not txn.recipients:
            return self._error(replies.NEED_RCPT)
        # No system call here: the body's file is made by its first piece
        # written out or by the commit, in a spool thread.
        writer = self.factory.spool.receive(txn.queueId)
        self._data = _DataReader(
            writer=writer,
            maxSize=self.factory.config.limits.messageSize,
            normalizeNewlines=self.trusted,
            receivedHeader=self.receivedHeaderFor(txn).encode(
                "utf-8" if txn.smtputf8 else "ascii", "replace"),
            hostname=self.factory.hostname,
            now=self.factory.clock.seconds(),
            hopLimit=self.factory.config.limits.hopCount,
        )
        self.setTimeout(self.factory.config.limits.dataTimeout)
        self.reply(replies.START_DATA)

    def _writeBodyOut(self) -> None:
        """Hand the body's buffered bytes to a spool thread once there are enough of them."""
        writer = self._data.writer
        if writer.buffered < BODY_WRITE_CHUNK:
            return
        self._bodyWrites += 1
        d = self.factory.lanes.run(writer.queueId, writer.writeOut, writer.takeBuffered())
        d.addErrback(lambda f: log.failure("writing a message body", f))
        d.addBoth(self._bodyWritten)

    def _bodyWritten(self, _: object) -> None:
        self._bodyWrites -= 1
        if self._lost or self._closing:
            return
        self._updateReading()
        self._process()

    def _discard(self, writer) -> None:
        """
        Forget a body that will not be committed: removing its file waits
        too, so in a thread, after the pieces of it still being written.
        """
        self.factory.lanes.run(writer.queueId, writer.abort).addErrback(
            lambda f: log.failure("discarding a message body", f))

    def receivedHeaderFor(self, txn: Transaction) -> str:
        """
        Postfix's shape: from HELO (name [ip]) [(using TLS...)] [(Authenticated
        sender: login)] by host (relayd) with ESMTP[S][A] id ID [for <rcpt>];
        date. RFC 3848's protocol names; the login only with
        auth.received_header_user (it is half of a credential).
        """
        proto = "SMTP"
        if self.esmtp:
            # RFC 6531 section 3.7.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA.
            proto = (("UTF8SMTP" if txn.smtputf8 else "ESMTP") + ("S" if self.secure else "")
                     + ("A" if self.authLogin else ""))
        forClause = ""
        if len(txn.recipients) == 1:
            # A-labels where they suffice: relayd's own header field makes
            # no message need SMTPUTF8 that does not already.
            address = txn.recipients[0].address
            forClause = f"\r\n\tfor <{idn.asciiAddress(address) or address}>"
        extra = ""
        session = sessionDescription(self.transport) if self.secure else None
        if session is not None:
            version, cipher, bits = session
            extra += f"\r\n\t(using {_headerSafe(version)} with cipher {_headerSafe(cipher)} ({bits}/{bits} bits))"
        authConfig = self.factory.config.auth
        if self.authLogin and authConfig is not None and authConfig.receivedHeaderUser:
            extra += f"\r\n\t(Authenticated sender: {_headerSafe(self.authLogin)})"
        return (
            f"Received: from {self.heloName} ({self.clientName} [{self.clientAddress}]){extra}\r\n"
            f"\tby {self.factory.hostname} (relayd) with {proto} id {txn.queueId}{forClause};\r\n"
            f"\t{headerDate(self.factory.clock.seconds())}\r\n"
        )

    def _endOfData(self) -> None:
        self.lastVerb = "END-OF-MESSAGE"
        self.setTimeout(self.factory.config.limits.commandTimeout)
        reader, self._data = self._data, None
        txn = self.transaction
        self.transaction = None
        if reader.problem is not None:
            self._discard(reader.writer)
            self._reject("END-OF-MESSAGE", reader.problem, sender=txn.sender, recipient=None,
                         queueId=txn.queueId)
            return self._afterData()
        envelope = Envelope(
            queueId=txn.queueId,
            sender=txn.sender,
            mailParams=txn.mailParams,
            recipients=txn.recipients,
            arrival=self.factory.clock.seconds(),
            size=reader.writer.size,
            clientAddress=self.clientAddress,
            clientName=self.clientName,
            helo=self.heloName or "",
            authIdentity=self.authLogin,
            ret=txn.ret,
            envid=txn.envid,
            smtputf8=txn.smtputf8 and needsSmtputf8(txn.sender, txn.recipients, reader.header),
        )
        envelope.nextAttempt = envelope.arrival
        self._busy = True
        d = defer.maybeDeferred(self.factory.commit, reader.writer, envelope)
        d.addCallbacks(self._committed, self._commitFailed, callbackArgs=(envelope, reader.writer),
                       errbackArgs=(envelope,))
        d.addErrback(lambda f: log.failure("end of data", f))

    def _committed(self, _: object, envelope: Envelope, writer) -> None:
        maillog.messageQueued(envelope.queueId, envelope.sender, envelope.size, len(envelope.recipients))
        if envelope.authIdentity:
            self.factory.messageRate.queued(envelope.authIdentity)
        if not self._closing:
            self.reply(replies.QUEUED.format(queueId=envelope.queueId))
        body = getattr(writer, "body", None)
        if body is not None:
            self.factory.bodyKept(envelope.queueId, body)
        self.factory.messageQueued(envelope)
        self._afterData()

    def _commitFailed(self, failure: Failure, envelope: Envelope) -> None:
        error = failure.value
        reason = getattr(error, "strerror", None) or str(error)
        maillog.queueWarning(envelope.queueId, f"queue file write error: {reason}")
        if not self._closing:
            self.reply(_storageReply(error))
        self._afterData()

    def _afterData(self) -> None:
        if self._busy:
            self._resume()
        else:
            self._shutdownIfDue()

    def do_RSET(self, rest: str) -> None:
        self._resetTransaction()
        self.reply(replies.RESET_OK)

    def _resetTransaction(self) -> None:
        self.transaction = None

    def do_NOOP(self, rest: str) -> None:
        self.reply(replies.NOOP_OK)

    def do_VRFY(self, rest: str) -> None:
        self.reply(replies.VRFY_CANNOT)

    def do_HELP(self, rest: str) -> None:
        self.reply(replies.HELP_TEXT)

    def do_EXPN(self, rest: str) -> None:
        # Mailing lists are not relayd's to expand, nor to reveal.
        self._error(replies.COMMAND_NOT_IMPLEMENTED)

    def do_ETRN(self, rest: str) -> None:
        # RFC 1985 queue runs are for a site's own backup MX, not a submission relay.
        self._error(replies.COMMAND_NOT_IMPLEMENTED)

    def do_BDAT(self, rest: str) -> None:
        # CHUNKING is never offered. A BDAT's chunk follows it at once,
        # without waiting for this reply (RFC 3030), and cannot be told
        # from commands: reading on would run a message body as commands.
        maillog.smtpdWarning(f"{maillog.hostAddr(self.clientName, self.clientAddress)}: "
                             "BDAT without CHUNKING offered; connection closed")
        self.reply(replies.COMMAND_NOT_IMPLEMENTED)
        self._close()

    def do_QUIT(self, rest: str) -> None:
        self.reply(replies.CLOSING)
        self._close()

    # STARTTLS (RFC 3207)

    def do_STARTTLS(self, rest: str) -> None:
        if self.secure:
            # A second STARTTLS, or STARTTLS on an implicit-TLS port: TLS
            # inside TLS would break the session.
            return self._error(replies.TLS_ALREADY_ACTIVE)
        if not self._offersSTARTTLS():
            return self._error(replies.STARTTLS_NOT_OFFERED)
        if rest:
            return self._error(replies.SYNTAX_NO_ARGUMENTS.format(verb="STARTTLS"))
        self.reply(replies.STARTTLS_READY)
        # Whatever the client pipelined behind STARTTLS came in plaintext
        # and may be an attacker's injection (CVE-2011-0411): never run it.
        if self._inbox:
            maillog.smtpdWarning(
                f"{maillog.hostAddr(self.clientName, self.clientAddress)}: "
                f"discarded {len(self._inbox)} bytes sent after STARTTLS before the TLS handshake")
            self._inbox.clear()
        self.transport.startTLS(self.factory.tls)
        self.secure = self._handshaking = True
        # RFC 3207 §4.2: forget everything learnt in plaintext.
        self._resetSession()

    def _resetSession(self) -> None:
        self.heloName = None
        self.esmtp = False
        self._resetTransaction()
        self.avatar = self.connectAvatar
        self.authLogin = self.authMethod = None
        self._sasl = None

    # AUTH (RFC 4954, PLAIN RFC 4616, LOGIN)

    def do_AUTH(self, rest: str) -> None:
        if self.listener.auth == "none" or self.factory.portal is None:
            return self._error(replies.AUTH_NOT_ENABLED)
        if not (self.secure or self.listener.plaintextAuth):
            return self._error(replies.AUTH_NEED_TLS)
        if self.heloName is None:
            return self._error(replies.NEED_HELO)
        if not self.esmtp:
            # AUTH is an ESMTP extension: after HELO it was never offered.
            return self._error(replies.NEED_EHLO)
        if self.authLogin is not None:
            return self._error(replies.AUTH_ALREADY)
        if self.transaction is not None:
            return self._error(replies.AUTH_IN_TRANSACTION)
        if not self.factory.authThrottle.mayCheck(self.clientAddress):
            return self._throttled()
        mechanism, _, initial = rest.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism or " " in initial:
            return self._error(replies.AUTH_SYNTAX)
        if mechanism not in SASL_MECHANISMS:
            return self._error(replies.AUTH_UNKNOWN_MECHANISM)
        if not initial:
            self._sasl = (mechanism, None)
            challenge = "" if mechanism == "PLAIN" else _LOGIN_USERNAME
            return self.reply(replies.AUTH_CHALLENGE.format(challenge=challenge))
        # RFC 4954 §4: "=" is an empty initial response.
        self._saslResponse(mechanism, None, b"" if initial == "=" else initial.encode("utf-8"))

    def _saslLine(self, raw: bytes) -> None:
        mechanism, login = self._sasl
        self._sasl = None
        if len(raw) > MAX_AUTH_LINE:
            return self._error(replies.AUTH_LINE_TOO_LONG)
        line = self._withoutLineEnding(raw)
        if line is None:
            return self._error(replies.BARE_NEWLINE_COMMAND)
        if line.strip() == b"*":
            return self._error(replies.AUTH_CANCELLED)
        self._saslResponse(mechanism, login, line.strip())

    def _saslResponse(self, mechanism: str, login: bytes | None, encoded: bytes) -> None:
        try:
            data = binascii.a2b_base64(encoded, strict_mode=True) if encoded else b""
        except (binascii.Error, ValueError):
            return self._error(replies.AUTH_BAD_BASE64)
        if mechanism == "LOGIN":
            if login is None:
                self._sasl = (mechanism, data)
                return self.reply(replies.AUTH_CHALLENGE.format(challenge=_LOGIN_PASSWORD))
            return self._verify(mechanism, login, data)
        parts = data.split(b"\0")
        if len(parts) != 3:
            return self._error(replies.AUTH_MALFORMED)
        authzid, login, password = parts
        if authzid and authzid != login:
            return self._authFailed(Failure(credError.UnauthorizedLogin()), mechanism,
                                    login, replies.AUTH_AUTHZID, checked=False)
        self._verify(mechanism, login, password)

    def _verify(self, mechanism: str, login: bytes, password: bytes) -> None:
        if self._lost or self._closing:
            return  # never a password check for a client that is gone
        creds = ClientCredentials(login, password)
        del password
        # Counted in flight from here, so parallel guesses from many
        # connections cannot get past auth.failure_limit. The throttle may
        # live in the master process: then its answer comes later.
        self._busy = True
        d = defer.maybeDeferred(self.factory.authThrottle.startCheck, self.clientAddress)
        d.addCallback(self._checkAllowed, mechanism, login, creds)
        d.addErrback(lambda f: log.failure("AUTH", f))

    def _checkAllowed(self, allowed: bool | Reply, mechanism: str, login: bytes,
                      creds: ClientCredentials) -> None:
        if isinstance(allowed, Reply):
            # The process that counts the checks did not answer in time.
            self._busy = False
            if not self._lost:
                self.reply(allowed.format(hostname=self.factory.hostname))
                self._close()
            return
        if not allowed:
            self._busy = False
            if not self._lost:
                self._throttled()
            return
        if self._lost or self._closing:
            # Gone while the master answered: end the check it counted.
            self._busy = False
            self.factory.authThrottle.checkEnded(self.clientAddress, failed=False)
            return
        self._check = creds
        d = self.factory.portal.login(creds, None, IRelayClient)
        d.addBoth(self._checked, mechanism, login)
        d.addErrback(lambda f: log.failure("AUTH", f))

    def _checked(self, result, mechanism: str, login: bytes) -> None:
        """The verdict of a password check: counted and logged even when the client has gone."""
        self._check = None
        abandoned = isinstance(result, Failure) and result.check(CheckAbandoned) is not None
        failed = (not abandoned and isinstance(result, Failure)
                  and result.check(credError.UnauthorizedLogin) is not None)
        d = defer.maybeDeferred(self.factory.authThrottle.checkEnded, self.clientAddress,
                                failed=failed)
        d.addCallback(self._checkCounted, result, mechanism, login, abandoned)
        d.addErrback(lambda f: log.failure("AUTH", f))

    def _checkCounted(self, until: float | None, result, mechanism: str, login: bytes,
                      abandoned: bool) -> None:
        """The throttle has counted the check's verdict (``until``: the block it started)."""
        if abandoned:
            pass
        elif isinstance(result, Failure):
            self._authFailed(result, mechanism, login, blockedUntil=until)
        else:
            self._authenticated(result, mechanism)
        if not self._lost:
            self._resume()

    def _authenticated(self, result, mechanism: str) -> None:
        _, avatar, _ = result
        if self._lost:
            return
        self.avatar = avatar
        self.authLogin = avatar.login
        self.authMethod = mechanism
        maillog.saslAccepted(self.clientName, self.clientAddress, mechanism, avatar.login)
        self.reply(replies.AUTH_OK)

    def _authFailed(self, failure: Failure, mechanism: str, login: bytes,
                    reply: Reply = replies.AUTH_FAILED, blockedUntil: float | None = None,
                    checked: bool = True) -> None:
        """
        Log a failed AUTH, and answer it while the client is there. A check
        that ran is already counted (``blockedUntil`` says whether that
        failure started a block); a refusal without a check is counted here.
        """
        if not failure.check(credError.UnauthorizedLogin):
            # The password file is unreadable, a thread died: not the
            # client's fault, and not a reason to lock it out.
            maillog.smtpdWarning(
                f"{maillog.hostAddr(self.clientName, self.clientAddress)}: SASL {mechanism} "
                f"authentication not checked: {maillog.printable(failure.getErrorMessage())}")
            if not self._lost:
                self.reply(replies.AUTH_TEMPORARY)
            return
        reason = "authentication failure"
        if failure.check(PasswordTooLong):
            reply, reason = replies.AUTH_PASSWORD_TOO_LONG, "password longer than 72 bytes"
        maillog.saslFailed(self.clientName, self.clientAddress, mechanism, reason,
                           login.decode("utf-8", "replace"))
        if not checked:
            counted = defer.maybeDeferred(self.factory.authThrottle.failed, self.clientAddress)
            # Counted in the master process: input waits for its answer.
            later = not counted.called
            self._busy = self._busy or later
            counted.addCallback(self._failureCounted, reply, later)
            counted.addErrback(lambda f: log.failure("AUTH", f))
            return
        self._failureCounted(blockedUntil, reply, False)

    def _failureCounted(self, blockedUntil: float | None, reply: Reply, resume: bool) -> None:
        throttle = self.factory.authThrottle
        if blockedUntil is not None:
            maillog.authBlocked(self.clientName, self.clientAddress, throttle.limit,
                                throttle.window, blockedUntil)
        if self._lost:
            return
        self._error(reply)
        if throttle.blocked(self.clientAddress) and not self._closing:
            self._throttled()
        if resume:
            self._resume()

    def _throttled(self) -> None:
        self.reply(replies.AUTH_THROTTLED.format(hostname=self.factory.hostname))
        self._close()

    _commands: dict[bytes, Callable[["SubmissionServer", str], None]] = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": do_DATA,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"VRFY": do_VRFY,
        b"HELP": do_HELP,
        b"EXPN": do_EXPN,
        b"ETRN": do_ETRN,
        b"BDAT": do_BDAT,
        b"QUIT": do_QUIT,
        b"STARTTLS": do_STARTTLS,
        b"AUTH": do_AUTH,
    }


def unsentBytes(transport) -> int:
    """
    Bytes the socket under ``transport`` (through the haproxy and TLS
    wrappers) holds and has not handed to the kernel yet, as far as its
    public attributes show: FileDescriptor's ``dataBuffer`` past ``offset``.
    A lower bound: the latest writes and a TLS layer's own buffers are not
    visible without Twisted's private attributes, which relayd does not read.
    For the log line and the tests only; backpressure itself goes through
    the producer interface.
    """
    for _ in range(8):  # wrappers: haproxy, TLS; never a cycle in practice
        if isinstance(transport, TLSMemoryBIOProtocol) or not hasattr(transport, "dataBuffer"):
            inner = getattr(transport, "transport", None)
            if inner is None:
                return 0
            transport = inner
            continue
        return max(0, len(transport.dataBuffer) - getattr(transport, "offset", 0))
    return 0


@functools.lru_cache(maxsize=16)
def _greetingReply(hostname: str) -> Reply:
    # The same for every session: made (and its bytes built) once.
    return replies.GREETING.format(hostname=hostname)


@functools.lru_cache(maxsize=16)
def _ehloReply(hostname: str, messageSize: int, starttls: bool, auth: bool) -> Reply:
    """The EHLO reply: the same for every session that is offered the same things."""
    lines = [hostname, "PIPELINING", f"SIZE {messageSize}"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(SASL_MECHANISMS))
    lines += ["8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
    return Reply(250, None, "\n".join(lines))


def _isNonSmtpVerb(verb: bytes) -> bool:
    """An HTTP, proxy or POP3 verb, or a header name (``Host:``, ``Subject:``) sent as a command."""
    return verb.upper() in _NON_SMTP_VERBS or _HEADER_NAME.match(verb) is not None


def _headerSafe(text: str) -> str:
    """Text for a Received comment: printable ASCII without parentheses or backslashes."""
    return "".join(c if "\x21" <= c <= "\x7e" and c not in "()\\" else "?" for c in text)


def _sslReason(error: BaseException) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        return "; ".join(str(e[-1]) for e in error.args[0] if e) or "handshake failed"
    return str(error) or type(error).__name__


def isPostmaster(address: str, hostname: str) -> bool:
    """
    ``postmaster`` (any case, no domain) or ``postmaster@<our hostname>``:
    the address RFC 5321 section 4.5.1 requires every SMTP server to accept.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    return local.lower() == "postmaster" and domain.rstrip(".").lower() == hostname.lower()


# (second, its RFC 5322 date): the last one formatted.
_lastHeaderDate: list[tuple[int, str]] = [(-1, "")]


def headerDate(seconds: float) -> str:
    """
    ``formatdate(seconds, localtime=True)``, formatted once per second: the
    Received and Date headers of every message of that second share it.
    """
    second = int(seconds)
    cached = _lastHeaderDate[0]  # one read: another thread may replace it
    if cached[0] == second:
        return cached[1]
    text = formatdate(second, localtime=True)
    _lastHeaderDate[0] = (second, text)
    return text


def spoolFreeBytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _storageReply(error: BaseException) -> Reply:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return replies.INSUFFICIENT_STORAGE
    return replies.COMMIT_FAILED


class _DataReader:
    """
    Reads one message body: finds CRLF.CRLF in raw chunks, undoes
    dot-stuffing, applies the CR/LF policy, the line and size limits, the
    hop limit and the NUL ban, and writes the canonical CRLF body (Received
    header first, Message-ID and Date added at the end of the header block
    only where missing).

    ``feed`` returns None while the body goes on, or the bytes after the
    terminator (the next pipelined commands) once it has ended.
    ``problem`` is the reply to send instead of 250 when the body broke a
    rule; the rest of the body is then read and thrown away.
    """

    def __init__(self, writer, maxSize: int, normalizeNewlines: bool,
                 receivedHeader: bytes, hostname: str, now: float, hopLimit: int):
        self.writer = writer
        self.now = now
        self.maxSize = maxSize
        # Received: headers, relayd's own counted, at which a message is a loop.
        self.hopLimit = hopLimit
        self.normalizeNewlines = normalizeNewlines
        self.hostname = hostname
        self.problem: Reply | None = None
        self.clientBytes = 0
        # The client's header block once read whole; None while it is not,
        # and for good when it is too big to hold.
        self.header: bytes | None = None
        # buf[0:2] are the two bytes before the unprocessed part; buf[1] is
        # always the LF that ended the previous line (the DATA command's
        # CRLF at first), so a terminator at the very start is found too.
        self._buf = bytearray(b"\r\n")
        self._scanFrom = 0
        self._head: bytearray | None = bytearray()  # header block until its end is known
        writer.write(receivedHeader)

    @property
    def heldBytes(self) -> int:
        """Bytes held between reads: the current partial line and the header block so far."""
        return len(self._buf) + (len(self._head) if self._head is not None else 0)

    def feed(self, chunk: bytes | bytearray) -> bytes | None:
        buf = self._buf
        buf += chunk
        end = buf.find(b"\r\n.\r\n", self._scanFrom)
        if end >= 0:
            with memoryview(buf) as view:  # one copy per piece, not two
                rest = bytes(view[end + 5 :])
                lines = bytes(view[2 : end + 2])
            self._lines(lines)
            self._finishHead()
            self._buf = bytearray()
            return rest
        last = buf.rfind(b"\n")
        if last >= 2:
            with memoryview(buf) as view:
                lines = bytes(view[2 : last + 1])
            self._lines(lines)
            del buf[: last - 1]
        if len(buf) > MAX_DATA_LINE + 4:
            # One line longer than the limit and still going: keep only
            # what a terminator could start with.
            self._fail(replies.DATA_LINE_TOO_LONG)
            del buf[2:-1]
            buf[0:2] = b"xx"
        self._scanFrom = max(0, len(buf) - 4)
        return None

    def _fail(self, reply: Reply) -> None:
        if self.problem is None:
            self.problem = reply
        self._head = None

    def _lines(self, region: bytes) -> None:
        """Complete lines, each ending in LF, starting at a line start."""
        if self.problem is not None:
            return
        self.clientBytes += len(region)
        if self.clientBytes > self.maxSize:
            return self._fail(replies.MESSAGE_TOO_BIG)
        if b"\0" in region:
            # Never relayed (some MTAs end a line or a string at a NUL, so
            # the next hops would not all see the same message), and refused
            # rather than removed: removing would change a body that may be
            # signed, behind the sender's back.
            return self._fail(replies.NUL_IN_MESSAGE)
        crlf = region.count(b"\r\n")
        if region.count(b"\n") != crlf or region.count(b"\r") != crlf:
            if not self.normalizeNewlines:
                return self._fail(replies.BARE_NEWLINE_DATA)
            region = region.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if len(region) > MAX_DATA_LINE + 2 and max(map(len, region.split(b"\n"))) > MAX_DATA_LINE + 1:
            return self._fail(replies.DATA_LINE_TOO_LONG)
        if b"\n." in region or region.startswith(b"."):
            # RFC 5321 §4.5.2: the first dot of a line starting with one goes.
            region = (b"\n" + region).replace(b"\n.", b"\n")[1:]
        if self._head is not None:
            # Only the new piece is searched (cost per byte, not per line):
            # it starts at a line start and what is held ends in a newline.
            blank = region.startswith(b"\r\n") or b"\n\r\n" in region
            self._head += region
            if blank or len(self._head) > MAX_HEADER_BLOCK:
                self._finishHead()
            return
        self.writer.write(region)

    def _finishHead(self) -> None:
        """Write the held header block with Message-ID/Date added where missing."""
        head, self._head = self._head, None
        if head is None or self.problem is not None:
            return
        headerEnd = _headerBlockEnd(head)
        header = bytes(head[:headerEnd])
        # Bounded: the header block held is at most MAX_HEADER_BLOCK plus a line.
        if len(_RECEIVED.findall(header)) + 1 >= self.hopLimit:
            return self._fail(replies.TOO_MANY_HOPS)
        added = b""
        if headerEnd == len(head) and len(head) > MAX_HEADER_BLOCK:
            # A header block too big to hold: pass it on unchanged rather
            # than insert fields in the middle of it.
            self.writer.write(bytes(head))
            return
        self.header = header
        if not _HAS_MESSAGE_ID.search(header):
            added += f"Message-ID: {make_msgid(domain=self.hostname)}\r\n".encode("ascii")
        if not _HAS_DATE.search(header):
            added += f"Date: {headerDate(self.now)}\r\n".encode("ascii")
        rest = bytes(head[headerEnd:])
        if added and rest and not rest.startswith(b"\r\n"):
            # The body had no blank line after its headers (or no headers):
            # keep it a body rather than turning its first line into a header.
            added += b"\r\n"
        self.writer.write(header + added + rest)


def _headerBlockEnd(head: bytes) -> int:
    """Offset of the end of the header block: the first line that is neither a field nor a continuation."""
    pos = 0
    length = len(head)
    while pos < length:
        nl = head.find(b"\n", pos)
        if nl < 0:
            return pos
        line = head[pos:nl + 1]
        if line in (b"\r\n", b"\n"):
            return pos
        if line[:1] in (b" ", b"\t"):
            if pos == 0:
                return 0
        elif not _HEADER_NAME.match(line):
            return pos
        pos = nl + 1
    return pos


def _throttleSettings(config) -> tuple[int, float]:
    """auth.failure_limit and failure_window, or their defaults where AUTH is off."""
    if config.auth is not None:
        return config.auth.failureLimit, config.auth.failureWindow
    return DEFAULT_AUTH_FAILURE_LIMIT, DEFAULT_AUTH_FAILURE_WINDOW


class SubmissionFactory(protocol.ServerFactory):
    noisy = False

    """
    Builds sessions for every listener and keeps the set of live ones, for
    the connection limits and for shutdown. ``commit(writer, envelope)``
    makes a message durable (a Deferred, run in a thread by tap.py);
    ``messageQueued(envelope)`` hands it to the scheduler, after
    ``bodyKept(queueId, body)`` for a body the commit wrote in one piece
    (the scheduler may send it from memory; by default it is dropped).
    ``runInThread(f, *args)`` runs the other blocking spool calls (creating
    a body's file, measuring free space) off the reactor thread and returns
    a Deferred; tests run them inline. ``lanes`` (relayd.queue.MessageLanes
    over the same threads) runs a body's writes and its removal in order;
    ``commit`` must use the same lanes.
    """

    def __init__(self, config, spool, commit, messageQueued, clock, portal=None, tls=None,
                 clientNames=None, runInThread=None, limits=None, lanes=None, bodyKept=None):
        self.config = config
        # address -> Deferred[ClientName] (relayd.resolve.ClientNames.lookup),
        # firing within limits.client_name_timeout; None: every client "unknown".
        self.clientNames = clientNames
        self.spool = spool
        self.commit = commit
        self.runInThread = runInThread or defer.maybeDeferred
        self.lanes = lanes or MessageLanes(self.runInThread)
        self.messageQueued = messageQueued
        self.bodyKept = bodyKept or (lambda queueId, body: None)
        self.clock = clock
        # twisted.cred portal for AUTH (None: AUTH is off everywhere) and
        # the server's TLS context factory (None: no TLS listener).
        self.portal = portal
        self.tls = tls
        # ``limits``: the counters of another process (an intake worker's
        # view of the master's); None: this process counts everything.
        self.admission = getattr(limits, "admission", None)
        self.authThrottle = (limits.throttle if limits is not None
                             else FailureThrottle(clock, *_throttleSettings(config)))
        self.messageRate = (limits.messageRate if limits is not None
                            else MessageRate(clock, config.limits.messagesPerUserPerHour))
        # Sessions waiting for the admission's answer: True while the client is there.
        self._admitting: dict[SubmissionServer, bool] = {}
        self.sessions: set[SubmissionServer] = set()
        self.refused: set[SubmissionServer] = set()  # told 421, closing
        self._perClient: dict[str, int] = {}
        self._drained: list[defer.Deferred] = []
        # Free bytes on the spool's file system as last measured (None:
        # not yet, or the measurement failed) and whether one is running.
        self._freeSpace: int | None = None
        self._measuredAt = 0.0
        self._measuring = False

    @property
    def hostname(self) -> str:
        return self.config.hostname

    # Free bytes on the spool's file system; replaced in tests.
    freeBytes = staticmethod(spoolFreeBytes)

    def lowOnSpace(self) -> bool:
        """
        Below queue.free_space_reserve: MAIL gets 452 4.3.1 so no message
        fills the disk midway. statvfs runs in a thread: the answer goes by
        the latest measurement, and a MAIL starts the next one when that is
        older than FREE_SPACE_INTERVAL or was below the reserve (not one
        per message under load).
        """
        reserve = self.config.freeSpaceReserve()
        if reserve <= 0:
            return False
        if (self._freeSpace is None or self._freeSpace < reserve
                or self.clock.seconds() - self._measuredAt >= FREE_SPACE_INTERVAL):
            self._measureFreeSpace()
        free = self._freeSpace
        if free is None:
            return False  # cannot tell (yet); the commit still answers 452 on ENOSPC
        if free < reserve:
            maillog.notEnoughSpace(free, reserve)
            return True
        return False

    def _measureFreeSpace(self) -> None:
        if self._measuring:
            return
        self._measuring = True
        self._measuredAt = self.clock.seconds()

        def measured(free: int) -> None:
            self._freeSpace = free

        def failed(failure: Failure) -> None:
            failure.trap(OSError)
            self._freeSpace = None

        def done(result):
            self._measuring = False
            return result

        d = self.runInThread(self.freeBytes, self.spool.directory)
        d.addCallbacks(measured, failed).addBoth(done)
        d.addErrback(lambda f: log.failure("measuring the spool's free space", f))

    def buildProtocol(self, addr) -> SubmissionServer:
        return SubmissionServer(self)

    def forListener(self, listener: Listener) -> "ListenerFactory":
        """The factory for one configured listener (its TLS and AUTH policy)."""
        return ListenerFactory(self, listener)

    def reconfigure(self, config) -> None:
        """A reloaded config: new limits and throttling apply to new events."""
        self.config = config
        self.authThrottle.limit, self.authThrottle.window = _throttleSettings(config)
        self.messageRate.limit = config.limits.messagesPerUserPerHour

    def sessionStarted(self, session: SubmissionServer) -> Reply | None:
        """
        Count the session; the refusal to send when a limit is reached. A
        refused session is not counted: it only says 421 and closes (within
        CLOSE_GRACE), and must not keep others out meanwhile.
        """
        if self.admission is not None:
            return self._admit(session)
        limits = self.config.limits
        count = self._perClient.get(session.clientAddress, 0)
        if len(self.sessions) + 1 > limits.connections:
            self.refused.add(session)
            return replies.TOO_MANY_CONNECTIONS.format(hostname=self.hostname)
        if count + 1 > limits.connectionsPerClient:
            self.refused.add(session)
            return replies.TOO_MANY_CONNECTIONS_FROM_CLIENT.format(hostname=self.hostname)
        self.sessions.add(session)
        self._perClient[session.clientAddress] = count + 1
        return None

    def _admit(self, session: SubmissionServer) -> defer.Deferred:
        """Ask the process that counts every session; the refusal to send, or None."""
        self._admitting[session] = True

        def answered(refusal):
            present = self._admitting.pop(session, False)
            if refusal is None:
                if not present:  # gone meanwhile: it never started
                    self.admission.left(session.clientAddress)
                    return None
                self.sessions.add(session)
                return None
            self.refused.add(session)
            return refusal.format(hostname=self.hostname)

        return self.admission.admit(session.clientAddress).addCallback(answered)

    def sessionEnded(self, session: SubmissionServer) -> None:
        self.refused.discard(session)
        if session in self._admitting:
            self._admitting[session] = False
            return
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if self.admission is not None:
            self.admission.left(session.clientAddress)
            if not self.sessions:
                self._drainedNow()
            return
        count = self._perClient.get(session.clientAddress, 1) - 1
        if count > 0:
            self._perClient[session.clientAddress] = count
        else:
            self._perClient.pop(session.clientAddress, None)
        if not self.sessions:
            self._drainedNow()

    def _drainedNow(self) -> None:
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def shutdown(self, grace: float) -> defer.Deferred:
        """
        Ask every session to end (421 4.3.2 now, or after the message in
        progress); after ``grace`` seconds abort what is left. Fires when no
        session is left.
        """
        for session in list(self.sessions):
            session.shutdown()
        if not self.sessions:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)

        def abortLeft() -> None:
            for session in list(self.sessions):
                session.transport.abortConnection()

        timer = self.clock.callLater(grace, abortLeft)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d


class ListenerFactory(protocol.ServerFactory):
    """Sessions of one listener: the shared SubmissionFactory with this listener's policy."""

    noisy = False

    def __init__(self, shared: SubmissionFactory, listener: Listener):
        self.shared = shared
        self.listener = listener

    def buildProtocol(self, addr) -> SubmissionServer:
        return SubmissionServer(self.shared, self.listener)
