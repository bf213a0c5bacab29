"""
The courier: the SMTP transport (relayd.delivery's ``Transport``). One
``deliver`` call is one attempt: one message, one ``Destination`` (an
ordered list of next hops), one result per recipient.

It chooses where to connect (an ``mx`` next hop expands to its MX hosts'
addresses; a configured hop that failed recently is tried last), opens
sessions (relayd.smtpclient) with the hop's TLS (relayd.tls) and password
(relayd.secret), and keeps them for reuse. It never errbacks for a network
or SMTP outcome: refused connections, timeouts, lost connections and every
reply become a ``RecipientResult``. Logging is the scheduler's job; the
courier only returns what happened, TLS sessions opened included.

Several messages per connection: after a clean transaction the session is
kept idle for ``reuseTime`` seconds; the next ``deliver`` to the same next
hop takes it (RSET is not needed after a completed transaction). After
``REUSE_TIME_LIMIT`` seconds since it connected (or ``reuseCountLimit``
transactions, when one is given), a session is closed instead (as Postfix
does).
"""

from __future__ import annotations

import ipaddress
import random as _random
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Callable, Mapping, Sequence

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure

from relayd import maillog, resolve
from relayd.config import Config, NextHop
from relayd.delivery import AttemptResult, Destination, RecipientResult, TLSInfo
from relayd.envelope import Status
from relayd.secret import Secret, deliverySecrets
from relayd.smtpclient import (
    CHUNK_SIZE,
    HopRefused,
    OutboundSession,
    SessionBroken,
    SessionFactory,
    Timeouts,
    paramValue,
)
from relayd.tcp import ConnectingReactor
from relayd.tls import clientTLSOptions, isAddressLiteral

# How long a session stays open after a transaction, waiting for another
# message to the same next hop (Postfix's smtp_connection_cache_time_limit).
REUSE_TIME = 2.0

# A session is not kept this many seconds after it connected (Postfix's
# smtp_connection_reuse_time_limit, 300s by default): one connection does
# not carry a busy queue for ever, and a hop's DNS or load-balancer changes
# get noticed. Nor after this many transactions, 0 meaning no limit (as
# Postfix's smtp_connection_reuse_count_limit, 0 by default): a count
# would close a connection every few milliseconds while a backlog drains.
REUSE_COUNT_LIMIT = 0
REUSE_TIME_LIMIT = 300.0

# How long a next hop that failed (before accepting MAIL) is tried last:
# the next attempts go to the hosts that work without waiting for it.
FAILED_HOP_TIME = 300.0


def _connectFailureText(hop: NextHop, reason: Failure) -> str:
    """Postfix's wording for a failed connection."""
    host = hop.host
    if hop.address:
        where = f"{host}[{hop.address}]:{hop.port}"
    elif isAddressLiteral(host):
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
        osError = exc.osError if isinstance(exc, error.ConnectError) else None
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
    recipientParams: Mapping[str, Mapping[str, str]] | None = None
    # Needs SMTPUTF8 (RFC 6531): only for a next hop that offers it.
    smtputf8: bool = False
    _eightBit: bool | None = None
    # For the scheduler's log: the TLS sessions this attempt opened,
    # (relay, TLSInfo), and the bugs its sessions met.
    tlsSessions: list[tuple[str, TLSInfo]] = field(default_factory=list)
    localErrors: list[Failure] = field(default_factory=list)

    def withLog(self, result: AttemptResult) -> AttemptResult:
        if not (self.tlsSessions or self.localErrors or result.tlsSessions or result.localErrors):
            return result  # nothing to add, nor to take away: no copy
        return replace(result, tlsSessions=tuple(self.tlsSessions),
                       localErrors=tuple(self.localErrors))

    async def hasEightBit(self, chunkSize: int, runInThread: Callable[..., defer.Deferred]) -> bool:
        """
        Whether the body has a byte over 127: read (through ``runInThread``)
        at most once per attempt, and only when a hop lacks 8BITMIME.
        Raises ``OSError`` when the spooled body cannot be read.
        """
        if self._eightBit is None:
            if getattr(self.openBody, "inMemory", False):  # no file: no thread
                runInThread = defer.maybeDeferred
            self._eightBit = await runInThread(_hasEightBit, self.openBody, chunkSize)
        return self._eightBit


class Courier:
    """
    Makes delivery attempts. One ``deliver`` call = one attempt over an
    ``Destination`` (an ``mx`` next hop among its hops expands to its MX
    hosts' addresses): the next one is tried when a connection fails,
    the greeting, hello, STARTTLS or AUTH is refused, TLS fails, or the
    conversation breaks before MAIL is accepted; once a hop accepted MAIL,
    its answers stand.

    ``passwords`` maps each ``password_file`` path to its ``Secret`` (read
    with ``deliverySecrets`` at start, and by ``reconfigure`` on reload);
    ``localAddresses`` returns the
    (address, port) pairs relayd listens on: when relayd is one of the MX
    hosts only the better ones are tried, and when it is (among) the best
    the mail bounces instead of looping.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        heloName: str,
        timeouts: Timeouts = Timeouts(),
        endpointFactory: Callable[[IReactorTime, NextHop, Timeouts], IStreamClientEndpoint] | None = None,
        chunkSize: int = CHUNK_SIZE,
        resolver: IResolver | None = None,
        passwords: dict[str, Secret] | None = None,
        localAddresses: Callable[[], Sequence[tuple[str, int]]] = lambda: (),
        reuseTime: float = REUSE_TIME,
        reuseCountLimit: int = REUSE_COUNT_LIMIT,
        reuseTimeLimit: float = REUSE_TIME_LIMIT,
        addressLimit: int | None = None,
        shuffle: Callable[[list], None] | None = None,
        tlsOptions: Callable[[NextHop], IOpenSSLClientConnectionCreator] | None = None,
        runInThread: Callable[..., defer.Deferred] | None = None,
        readInThread: Callable[..., defer.Deferred] | None = None,
    ):
        self._reactor = reactor
        # Blocking work off the reactor thread (tests: inline); the spooled
        # bodies are read through ``readInThread`` (default: the same).
        self._runInThread = runInThread or defer.maybeDeferred
        self._readInThread = readInThread or self._runInThread
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
        # Tests give the connection creators; else they are made once per hop (_tlsCreator).
        self._tlsOptions = tlsOptions
        self._creators: dict[tuple, IOpenSSLClientConnectionCreator] = {}
        self._idle: dict[NextHop, list[OutboundSession]] = {}
        # An open session's idle deadline, armed at its first release and
        # moved at each later one; it runs on while the session carries a
        # message (``_expire`` then leaves it alone): moving a timer costs
        # less than a new one per message and cancelling it.
        self._idleTimers: dict[OutboundSession, IDelayedCall] = {}
        # Next hop -> until when it is tried after the others.
        self._failedUntil: dict[NextHop, float] = {}

    def prepareReload(self, config: Config) -> Callable[[], None]:
        """A reload's reading (in a thread): the delivery password and CA files; returns what applies them."""
        secrets = deliverySecrets(config)
        return lambda: self._reconfigure(config, *secrets)

    def reconfigure(self, config: Config) -> None:
        """A reload read and applied at once."""
        self.prepareReload(config)()

    def _reconfigure(self, config: Config, passwords: dict[str, Secret], brokenCaFiles: set[str],
                     problems: list[str]) -> None:
        """
        A reload: the new HELO name, timeouts and delivery passwords for new
        connections; idle ones are closed. A password_file or ca_file that
        cannot be read now keeps what was loaded before (one error line
        each). The resolver reconfigures itself.
        """
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
        destination: Destination,
        sender: str,
        mailParams: dict[str, str | None],
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
        recipientParams: Mapping[str, Mapping[str, str]] | None = None,
        smtputf8: bool = False,
    ) -> defer.Deferred[AttemptResult]:
        started = self._reactor.seconds()
        recipients = list(recipients)
        message = _Message(sender, mailParams, recipients, openBody, size, recipientParams,
                           smtputf8=smtputf8)
        d = defer.ensureDeferred(self._deliver(list(destination.hops), message, started))

        def localFailure(failure: Failure) -> AttemptResult:
            # A bug, not an outcome: keep the message queued (the
            # scheduler logs the failure).
            text = f"delivery failed locally: {failure.value.__class__.__name__}"
            return AttemptResult(
                "none",
                tuple(RecipientResult(r, 0, "4.3.0", text, Status.DEFERRED) for r in recipients),
                self._reactor.seconds() - started,
                0.0,
                localErrors=(failure,),
            )

        return d.addErrback(localFailure)

    async def _deliver(self, hops, message: _Message, started):
        recipients = message.recipients
        if not hops:
            return AttemptResult(
                "none",
                self._everyone(recipients, 0, "4.3.5", "no next hop is configured", Status.DEFERRED),
                0.0,
                0.0,
            )
        outcome = None
        for hop in self._order(hops):
            if hop.mx:
                targets = await self._mxTargets(hop, recipients, started)
                if isinstance(targets, AttemptResult):
                    return targets
            else:
                targets = [hop]
            for target in targets:
                outcome = await self._tryHop(target, message, started)
                self._remember(target, outcome)
                if outcome.final:
                    return message.withLog(outcome.result)
        return message.withLog(outcome.result)

    def _order(self, hops: list[NextHop]) -> list[NextHop]:
        """Hops that failed recently go last (kept in their order), never dropped."""
        if not self._failedUntil:
            return hops  # nothing failed lately: as configured
        now = self._reactor.seconds()
        for key, until in list(self._failedUntil.items()):
            if until <= now:
                del self._failedUntil[key]
        return sorted(hops, key=lambda hop: not hop.mx and hop in self._failedUntil)

    def _remember(self, target: NextHop, outcome: _HopOutcome) -> None:
        if target.address is not None:
            # An MX host's address: _order only reorders configured hops
            # (MX order comes from DNS at each attempt).
            return
        if outcome.final:
            if self._failedUntil:
                self._failedUntil.pop(target, None)
        else:
            self._failedUntil[target] = self._reactor.seconds() + FAILED_HOP_TIME

    def _everyone(self, recipients, code, dsn, text, status):
        return tuple(RecipientResult(r, code, dsn, text, status) for r in recipients)

    # -- MX ------------------------------------------------------------------------

    async def _mxTargets(self, route: NextHop, recipients, started) -> list[NextHop] | AttemptResult:
        """The MX hosts' addresses for ``route`` (an ``mx`` hop), or why there are none."""
        def unroutable(code, dsn, text, status):
            return AttemptResult("none", self._everyone(recipients, code, dsn, text, status),
                                 self._reactor.seconds() - started, 0.0)

        if self.resolver is None:
            return unroutable(0, "4.3.5", "MX delivery has no resolver configured", Status.DEFERRED)
        found = await resolve.mailTargets(self.resolver, route.host, self.addressLimit,
                                          self._shuffle)
        if isinstance(found, resolve.Unroutable):
            return unroutable(found.code, found.dsn, found.text,
                              Status.BOUNCED if found.permanent else Status.DEFERRED)
        targets = found.targets
        for i, t in enumerate(targets):
            if self._isLocal(t.address, route.port):
                # As Postfix: relayd is one of the MX hosts, so only the
                # better ones (lower preference) are tried; when relayd is
                # (among) the best, the mail would come back here.
                targets = tuple(x for x in targets[:i] if x.preference < t.preference)
                if not targets:
                    return unroutable(554, "5.4.6",
                                      f"mail for {route.host} loops back to myself "
                                      f"({t.host}[{t.address}]:{route.port})", Status.BOUNCED)
                break
        return [
            replace(route, host=t.host, address=t.address, mx=False)
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

    async def _tlsCreator(self, target: NextHop) -> IOpenSSLClientConnectionCreator:
        """The TLS connection creator for ``target``, made at its first connection and kept."""
        if self._tlsOptions is not None:
            return self._tlsOptions(target)
        key = (target.host, target.tls, target.verify, target.caFile)
        creator = self._creators.get(key)
        if creator is None:
            # Making one reads the hop's CA file, or the system's CA store
            # (a few hundred certificates): in a thread, not on the reactor.
            creator = await self._runInThread(clientTLSOptions, target.host, target.tls,
                                              target.verify, target.caFile)
            creator = self._creators.setdefault(key, creator)
        return creator

    async def _open(self, target: NextHop, message: _Message, started: float):
        """A ready session to ``target``, or the ``_HopOutcome`` saying why not."""
        seconds = self._reactor.seconds
        recipients = message.recipients
        credentials = None
        if target.username is not None:
            password = self.passwords.get(target.passwordFile)
            if password is None:
                return _HopOutcome(AttemptResult("none", self._everyone(
                    recipients, 0, "4.3.5",
                    f"no password loaded from {target.passwordFile} for {target.host}", Status.DEFERRED),
                    seconds() - started, 0.0), final=False)
            credentials = (target.username, password)
        creator = None
        try:
            if target.tls != "none":
                creator = await self._tlsCreator(target)
        except (OSError, ValueError) as e:
            return _HopOutcome(AttemptResult("none", self._everyone(
                recipients, 0, "4.7.5", f"cannot set up TLS for {target.host}: {e}", Status.DEFERRED),
                seconds() - started, 0.0), final=False)
        session = OutboundSession(
            self._reactor, self.heloName, self.timeouts, target.host, self._chunkSize,
            tls=target.tls, tlsOptions=lambda: creator, credentials=credentials,
            runInThread=self._readInThread,
        )
        try:
            endpoint = self._endpointFactory(self._reactor, target, self.timeouts)
            if target.tls == "implicit":
                endpoint = wrapClientTLS(creator, endpoint)
            connecting = endpoint.connect(SessionFactory(lambda: session))
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
                    self._everyone(recipients, 0, "4.4.1", _connectFailureText(target, failure), Status.DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )

        try:
            await session.whenReady()
        except (HopRefused, SessionBroken) as e:
            message.localErrors.extend(session.localErrors)
            await session.quit()
            if target.tls == "may" and session.tlsFailed:
                # Opportunistic TLS that cannot be negotiated: plaintext on
                # a new connection, as Postfix does; never for required TLS.
                return await self._open(replace(target, tls="none"), message, started)
            return _HopOutcome(
                AttemptResult(
                    session.relay,
                    self._everyone(recipients, e.code, e.dsn, e.text, Status.DEFERRED),
                    seconds() - started,
                    0.0,
                ),
                final=False,
            )
        if session.tlsInfo is not None:
            message.tlsSessions.append((session.relay, session.tlsInfo))
        return session

    async def _tryHop(self, target: NextHop, message: _Message, started: float,
                      reuse: bool = True):
        seconds = self._reactor.seconds
        recipients = message.recipients
        key = target
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
            refusal = await self._refusal(session, message)
        except OSError as e:
            # As when the body cannot be read during DATA (_transaction):
            # keep the message queued; another hop could not read it either.
            session.quit()
            text = f"cannot read the queued message: {e.strerror or e}"
            return _HopOutcome(
                AttemptResult(session.relay, self._everyone(recipients, 0, "4.3.0", text, Status.DEFERRED),
                              connectSeconds, 0.0),
                final=True,
            )
        if refusal is not None:
            self._release(key, session)
            code, dsn, text = refusal
            return _HopOutcome(
                AttemptResult(session.relay, self._everyone(recipients, code, dsn, text, Status.BOUNCED),
                              connectSeconds, 0.0),
                final=True,
            )

        transactionStarted = seconds()
        outcome = await session.messageOutcome(message.sender, message.mailParams, recipients,
                                               message.openBody, message.size,
                                               recipientParams=message.recipientParams,
                                               smtputf8=message.smtputf8)
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

    async def _refusal(self, session: OutboundSession, message: _Message) -> tuple[int, str, str] | None:
        """
        Why this message must not be sent to this peer at all (a bounce), or
        None. Raises ``OSError`` when the body had to be read and cannot be.
        """
        if message.smtputf8 and "SMTPUTF8" not in session.capabilities:
            # RFC 6531 section 3.2: a UTF-8 local part or header cannot be
            # downgraded; Postfix's words.
            return (553, "5.6.7",
                    f"SMTPUTF8 is required, but was not offered by host {session.peerName}")
        size = message.size
        limit = session.sizeLimit()
        if limit is not None and size > limit:
            return (552, "5.3.4",
                    f"message size {size} exceeds size limit {limit} of server {session.peerName}")
        if "8BITMIME" not in session.capabilities:
            body = paramValue(message.mailParams, "BODY")
            declared = body is not None and body.upper() == "8BITMIME"
            if declared or await message.hasEightBit(self._chunkSize, self._readInThread):
                what = "BODY=8BITMIME" if declared else "8-bit bytes in the body"
                return (554, "5.6.3",
                        f"message has 8-bit content ({what}), but host {session.peerName} does "
                        "not support 8BITMIME; relayd does not convert it")
        return None

    # -- idle connections ------------------------------------------------------------

    def _takeIdle(self, key: NextHop) -> OutboundSession | None:
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            if session.usable():
                return session
            self._cancelIdleTimer(session)
        return None

    def _release(self, key: NextHop, session: OutboundSession) -> None:
        """
        Keep a usable session for the next message to the same hop, briefly,
        unless it reached a reuse limit.
        """
        worn = ((self.reuseCountLimit > 0 and session.transactions >= self.reuseCountLimit)
                or self._reactor.seconds() - session.connectedAt >= self.reuseTimeLimit)
        if self.reuseTime <= 0 or worn or not session.usable():
            self._cancelIdleTimer(session)
            session.quit()
            return
        timer = self._idleTimers.get(session)
        if timer is not None and timer.active():
            timer.reset(self.reuseTime)
        else:
            self._idleTimers[session] = self._reactor.callLater(
                self.reuseTime, self._expire, key, session)
        self._idle.setdefault(key, []).append(session)

    def _cancelIdleTimer(self, session: OutboundSession) -> None:
        timer = self._idleTimers.pop(session, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _forget(self, key: NextHop, session: OutboundSession) -> None:
        self._cancelIdleTimer(session)
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self._idle.pop(key, None)

    def _expire(self, key: NextHop, session: OutboundSession) -> None:
        del self._idleTimers[session]
        if session in self._idle.get(key, ()):
            self._forget(key, session)
            session.quit()
        # else it carries a message now: its next release arms a new deadline.

    def closeIdle(self) -> defer.Deferred:
        """QUIT every idle session; fires when all are closed (at shutdown)."""
        closing = []
        for key in list(self._idle):
            for session in list(self._idle.get(key, [])):
                self._cancelIdleTimer(session)
                closing.append(session.quit())
            self._idle.pop(key, None)
        return defer.DeferredList(closing, consumeErrors=True)


def _endpointFor(reactor: IReactorTime, target: NextHop, timeouts: Timeouts) -> IStreamClientEndpoint:
    """
    An MX host's address as is (IPv4 or IPv6); a configured host by name,
    IPv4 and IPv6 (Happy Eyeballs).
    """
    # Connections made through it send each write at once (relayd.tcp).
    reactor = ConnectingReactor(reactor)
    address = target.address
    if address:
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        return kind(reactor, address, target.port, timeout=timeouts.connect)
    return HostnameEndpoint(reactor, target.host, target.port, timeout=timeouts.connect)