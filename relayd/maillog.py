"""
The mail log: one function per event, one log line per event.

Each line starts with the queue id (or ``NOQUEUE``), in Postfix's wording and
field order, so pflogsumm, fail2ban and existing dashboards read it. Events
go through twisted.logger with the service (``smtpd``, ``qmgr``, ``smtp``,
``bounce``, ``relayd``) as the logger namespace ``relayd/<service>`` and the
fields flat on the event (``queue_id``, ``to``, ``status``, ...), so a JSON
observer gets the same facts as the text line.

Every event that relayd's metrics count (relayd.metrics) also carries its
name as the field ``event`` (``connected``, ``delivery``, ...): the counters
are fed from these very events, so the log and the metrics never disagree.

Anything that came from a client or a peer goes through ``printable`` first:
no log line can be forged by a CR, LF or control character in an address,
a HELO name or a remote reply. Secrets are never passed here.
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel

NOQUEUE = "NOQUEUE"

_loggers: dict[str, Logger] = {}


def _logger(service: str) -> Logger:
    log = _loggers.get(service)
    if log is None:
        log = _loggers[service] = Logger(namespace=f"relayd/{service}")
    return log


def printable(value: object) -> str:
    """Escape what could forge or garble a log line (controls, DEL, non-ASCII)."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def seconds(value: float) -> str:
    """Postfix's way of writing a delay: two decimals at most, no trailing zeros."""
    if value < 0:
        value = 0.0
    if value >= 100:
        return str(int(round(value)))
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def hostAddr(name: str, address: str) -> str:
    return f"{printable(name)}[{printable(address)}]"


def _emit(service: str, queueId: str | None, text: str, level=LogLevel.info, **fields) -> None:
    # The event Logger.emit(level, "{log_line}", ...) makes, keys in the same
    # order (the JSON log keeps it), handed to the logger's observer
    # directly: Logger.emit first checks the level against every LogLevel
    # (sorting them), a fifth of the cost of a line, and the levels here are
    # always LogLevel's own.
    log = _logger(service)
    event = {"log_line": f"{queueId}: {text}" if queueId else text, "service": service,
             "queue_id": queueId, **fields}
    event.update(log_logger=log, log_level=level, log_namespace=log.namespace,
                 log_source=log.source, log_format="{log_line}", log_time=time.time())
    log.observer(event)


# smtpd


def connected(clientName: str, clientAddress: str, listener: str | None = None) -> None:
    """``connect from host[ip]``; ``listener`` is the endpoint as configured (not logged in the text)."""
    _emit("smtpd", None, f"connect from {hostAddr(clientName, clientAddress)}",
          event="connected", client_name=clientName, client_address=clientAddress,
          listener=listener)


def disconnected(clientName: str, clientAddress: str, commands: str = "",
                 listener: str | None = None) -> None:
    tail = f" {commands}" if commands else ""
    _emit("smtpd", None, f"disconnect from {hostAddr(clientName, clientAddress)}{tail}",
          event="disconnected", client_name=clientName, client_address=clientAddress,
          listener=listener)


def clientAccepted(queueId: str, clientName: str, clientAddress: str,
                   saslMethod: str | None = None, saslUsername: str | None = None) -> None:
    text = f"client={hostAddr(clientName, clientAddress)}"
    if saslMethod:
        text += f", sasl_method={printable(saslMethod)}, sasl_username={printable(saslUsername or '')}"
    _emit("smtpd", queueId, text, client_name=clientName, client_address=clientAddress,
          sasl_method=saslMethod, sasl_username=saslUsername)


def rejected(queueId: str | None, stage: str, clientName: str, clientAddress: str,
             reply: str, sender: str | None, recipient: str | None, helo: str | None,
             proto: str = "ESMTP") -> None:
    """``NOQUEUE: reject: RCPT from host[ip]: 554 5.7.1 <rcpt>: Relay access denied; from=<> to=<> proto=ESMTP helo=<>``"""
    text = f"reject: {stage} from {hostAddr(clientName, clientAddress)}: {printable(reply)};"
    if sender is not None:
        text += f" from=<{printable(sender)}>"
    if recipient is not None:
        text += f" to=<{printable(recipient)}>"
    text += f" proto={proto}"
    if helo:
        text += f" helo=<{printable(helo)}>"
    _emit("smtpd", queueId or NOQUEUE, text, event="rejected", stage=stage, client_name=clientName,
          client_address=clientAddress, reply=reply, sender=sender, recipient=recipient)


def saslFailed(clientName: str, clientAddress: str, method: str, reason: str,
               username: str) -> None:
    """``warning: host[ip]: SASL PLAIN authentication failed: authentication failure, sasl_username=alice`` (fail2ban's postfix-sasl filter)."""
    _emit("smtpd", None,
          f"warning: {hostAddr(clientName, clientAddress)}: SASL {printable(method)} authentication "
          f"failed: {printable(reason)}, sasl_username={printable(username)}",
          level=LogLevel.warn, event="saslFailed", client_name=clientName,
          client_address=clientAddress, sasl_method=method, sasl_username=username)


def saslAccepted(clientName: str, clientAddress: str, method: str, username: str) -> None:
    """``host[ip]: SASL PLAIN authentication succeeded, sasl_username=alice``: the counterpart of saslFailed."""
    _emit("smtpd", None,
          f"{hostAddr(clientName, clientAddress)}: SASL {printable(method)} authentication "
          f"succeeded, sasl_username={printable(username)}",
          event="saslAccepted", client_name=clientName, client_address=clientAddress,
          sasl_method=method, sasl_username=username)


def lostConnection(verb: str, clientName: str, clientAddress: str) -> None:
    """``lost connection after AUTH from host[ip]``: the client left without QUIT, as Postfix words it."""
    _emit("smtpd", None, f"lost connection after {printable(verb)} from {hostAddr(clientName, clientAddress)}",
          client_name=clientName, client_address=clientAddress, command=verb)


def notReading(verb: str, clientName: str, clientAddress: str, unsent: int, timeout: float) -> None:
    """``timeout after NOOP from host[ip]: replies not read ...``: the session was dropped."""
    _emit("smtpd", None,
          f"timeout after {printable(verb)} from {hostAddr(clientName, clientAddress)}: replies not "
          f"read for {seconds(timeout)}s ({unsent} bytes unsent); connection dropped",
          level=LogLevel.warn, client_name=clientName, client_address=clientAddress,
          command=verb, unsent=unsent)


def when(t: float) -> str:
    """A point in time as relayd logs and prints it: ``2026-12-01 15:45:00 +0000`` (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


def authBlocked(clientName: str, clientAddress: str, limit: int, window: float, until: float) -> None:
    """
    ``warning: SASL authentication failure limit exceeded: 5 in 900s from
    host[ip]; AUTH blocked until ...``, once per block (the wording of
    Postfix's anvil warnings: what, how many, from whom).
    """
    _emit("smtpd", None,
          f"warning: SASL authentication failure limit exceeded: {limit} in {seconds(window)}s "
          f"from {hostAddr(clientName, clientAddress)}; AUTH blocked until {when(until)}",
          level=LogLevel.warn, client_name=clientName, client_address=clientAddress,
          blocked_until=until)


def tlsAccepted(clientName: str, clientAddress: str, protocol: str, cipher: str, bits: int) -> None:
    """
    ``Anonymous TLS connection established from host[ip]: TLSv1.3 with cipher X (256/256 bits)``,
    Postfix's smtpd line (its smtpd_tls_loglevel 1) for a client's TLS session.
    """
    _emit("smtpd", None,
          f"Anonymous TLS connection established from {hostAddr(clientName, clientAddress)}: "
          f"{printable(protocol)} with cipher {printable(cipher)} ({bits}/{bits} bits)",
          event="tlsAccepted", client_name=clientName, client_address=clientAddress,
          tls_protocol=protocol, tls_cipher=cipher)


def tlsHandshakeFailed(clientName: str, clientAddress: str, reason: str) -> None:
    """``SSL_accept error from host[ip]: reason``, as Postfix words it."""
    _emit("smtpd", None, f"SSL_accept error from {hostAddr(clientName, clientAddress)}: {printable(reason)}",
          level=LogLevel.warn, client_name=clientName, client_address=clientAddress)


# At most this much of a non-SMTP command is logged, as Postfix does (%.100s).
NON_SMTP_LOGGED = 100


def nonSmtpCommand(clientName: str, clientAddress: str, line: str) -> None:
    """
    ``warning: non-SMTP command from host[ip]: GET / HTTP/1.1``, in Postfix's
    words, which log tools and ban rules written for Postfix look for; at
    most NON_SMTP_LOGGED characters of the line, escaped.
    """
    shown = printable(line[:NON_SMTP_LOGGED])
    _emit("smtpd", None,
          f"warning: non-SMTP command from {hostAddr(clientName, clientAddress)}: {shown}",
          level=LogLevel.warn, client_name=clientName, client_address=clientAddress,
          command=shown)


def smtpdWarning(text: str) -> None:
    _emit("smtpd", None, f"warning: {text}", level=LogLevel.warn)


def proxyDropped(peerAddress: str, reason: str) -> None:
    """
    ``warning: dropped connection from unknown[ip]: not in proxy_from`` on a
    PROXY-protocol listener: the connection (from ``peerAddress``, the
    balancer or whoever connected) never became a session.
    """
    _emit("smtpd", None, f"warning: dropped connection from {hostAddr('unknown', peerAddress)}: "
          f"{printable(reason)}", level=LogLevel.warn, client_address=peerAddress, reason=reason)


# qmgr


def messageQueued(queueId: str, sender: str, size: int, nrcpt: int) -> None:
    _emit("qmgr", queueId, f"from=<{printable(sender)}>, size={size}, nrcpt={nrcpt} (queue active)",
          event="messageQueued", sender=sender, size=size, nrcpt=nrcpt)


def removed(queueId: str) -> None:
    _emit("qmgr", queueId, "removed")


def expired(queueId: str, sender: str) -> None:
    _emit("qmgr", queueId, f"from=<{printable(sender)}>, status=expired, returned to sender",
          event="expired", sender=sender, status="expired")


def quarantined(queueId: str, reason: str) -> None:
    _emit("qmgr", queueId, f"quarantined: {printable(reason)}", level=LogLevel.error, reason=reason)


def queueWarning(queueId: str | None, text: str) -> None:
    _emit("qmgr", queueId, f"warning: {printable(text)}", level=LogLevel.warn)


def queueError(queueId: str | None, text: str) -> None:
    """Something an admin must fix (a queue file the daemon cannot read), not a warning."""
    _emit("qmgr", queueId, f"error: {printable(text)}", level=LogLevel.error)


def queueFileFailed(queueId: str, action: str, reason: str) -> None:
    """
    Recording an attempt's outcome in the spool failed (read-only spool,
    EMFILE): ``action`` is "update" or "remove". The message stays queued
    and is tried again at its next attempt time.
    """
    _emit("qmgr", queueId, f"warning: cannot {action} the queue file: {printable(reason)}; "
          "message kept in the queue, next attempt as scheduled", level=LogLevel.warn,
          action=action, reason=reason)


# dkim (the signing before a message's first delivery attempt, relayd.dkim)


def dkimSigned(queueId: str, domain: str, selectors: tuple[str, ...]) -> None:
    """``4F2A9C31B7: dkim=signed d=example.com s=2026r,2026e`` (one line, every selector)."""
    _emit("dkim", queueId, f"dkim=signed d={printable(domain)} s={printable(','.join(selectors))}",
          event="dkim", dkim="signed", domain=domain, selectors=list(selectors))


def dkimUnsigned(queueId: str, reason: str) -> None:
    """A message a configured domain could have signed, sent unsigned: why."""
    _emit("dkim", queueId, f"dkim=unsigned ({printable(reason)})", level=LogLevel.warn,
          event="dkim", dkim="unsigned", reason=reason)


def notEnoughSpace(freeBytes: int, reserve: int) -> None:
    """MAIL refused with 452 4.3.1: the spool's file system is below the reserve."""
    _emit("smtpd", None, f"warning: not enough free space in mail queue: {freeBytes} bytes < "
          f"{reserve} bytes (queue.free_space_reserve)", level=LogLevel.warn,
          free_bytes=freeBytes, reserve=reserve)


# bounce (notices relayd writes itself)

_NOTICE_WORDS = {
    "bounce": "sender non-delivery notification",
    "delay": "sender delay notification",
    "2bounce": "postmaster non-delivery notification",
    "quarantine": "postmaster quarantine notification",
    "relayed": "sender delivery status notification",
}


def noticeQueued(queueId: str | None, kind: str, noticeId: str) -> None:
    """``<id>: sender non-delivery notification: <newid>``, as Postfix's bounce service logs it."""
    _emit("bounce", queueId, f"{_NOTICE_WORDS[kind]}: {noticeId}", kind=kind, notice_id=noticeId)


def noticeDiscarded(queueId: str, reason: str) -> None:
    """A failure that produces no notice (mail from <> with no postmaster, a failed double bounce)."""
    _emit("bounce", queueId, f"discarded undeliverable notice: {printable(reason)}",
          level=LogLevel.warn, reason=reason)


def noticeFailed(queueId: str, reason: str, retried: bool = True) -> None:
    retry = ", will retry" if retried else ""
    _emit("bounce", queueId, f"warning: cannot queue notification{retry}: {printable(reason)}",
          level=LogLevel.warn, reason=reason)


# admin (relayctl, through the control socket)


def adminAction(queueId: str, action: str) -> None:
    """``<id>: removed by admin``, ``<id>: placed on hold by admin``, ..."""
    _emit("admin", queueId, f"{action} by admin", action=action)


def clientUnblocked(clientAddress: str) -> None:
    """``192.0.2.4: AUTH block lifted by admin`` (relayctl unblock)."""
    _emit("admin", None, f"{printable(clientAddress)}: AUTH block lifted by admin",
          client_address=clientAddress, action="unblocked")


# smtp (delivery)


def delivery(queueId: str, recipient: str, relay: str, delay: float,
             delays: tuple[float, float, float, float], dsn: str, status: str,
             reply: str, route: str | None = None) -> None:
    """
    One recipient's result for one attempt:
    ``to=<b@x>, relay=host[ip]:port, delay=30, delays=0.01/0/30/0, dsn=4.4.1, status=deferred (reply)``.
    ``status`` is ``sent``, ``deferred`` or ``bounced``; ``route`` names the
    destination by configuration alone (``Destination.name``), never by a
    recipient's domain.
    """
    text = (
        f"to=<{printable(recipient)}>, relay={printable(relay)}, delay={seconds(delay)}, "
        f"delays={'/'.join(seconds(d) for d in delays)}, dsn={dsn}, status={status} "
        f"({printable(reply)})"
    )
    _emit("smtp", queueId, text, event="delivery", to=recipient, relay=relay, delay=delay,
          dsn=dsn, status=status, reply=reply, route=route)


def tlsConnection(relay: str, trust: str, protocol: str, cipher: str, bits: int) -> None:
    """
    ``Verified TLS connection established to host[ip]:port: TLSv1.3 with cipher X (256/256 bits)``
    (Postfix's wording; ``trust`` is Verified, Trusted or Untrusted).
    """
    text = (f"{trust} TLS connection established to {printable(relay)}: "
            f"{printable(protocol)} with cipher {printable(cipher)} ({bits}/{bits} bits)")
    _emit("smtp", None, text, event="tlsConnection", relay=relay, tls_trust=trust, tls_protocol=protocol,
          tls_cipher=cipher)


# the daemon itself


def daemonEvent(text: str, level=LogLevel.info, **fields) -> None:
    _emit("relayd", None, printable(text), level=level, **fields)
