"""
Log observers for twistd's ``--logger`` option.

twistd's own format (``2026-11-30T05:05:30+0000 [relayd/smtp#info] ...``)
is readable but no mail tool parses it. These observers write relayd's
events in the two forms tools do read:

``relayd.logformat.syslogStdout``
    syslog's line format with relayd's service as the program name,
    ``Nov 30 05:05:30 relay relayd/smtp[4242]: 4F2A9C31B7: to=<...>, ...``:
    what pflogsumm (``--syslog-name=relayd``) and fail2ban's postfix
    filters (with ``_daemon = relayd/smtpd``) read.
``relayd.logformat.syslogSocket``
    the same lines as datagrams to the local syslog socket (``/dev/log``,
    facility ``mail``), as Postfix logs: rsyslog files them in
    /var/log/mail.log and journald keeps ``relayd/smtp`` etc. as the
    syslog identifier. This is what systemd/relayd.service uses.
``relayd.logformat.jsonStdout``
    one JSON object per line: ``time``, ``service``, ``level``, ``text``
    and the event's own fields (``queue_id``, ``to``, ``status``, ...).

Use: ``twistd -n --pidfile= --logger relayd.logformat.syslogStdout relayd --config FILE``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import IO, Callable

from twisted.logger import ILogObserver, LogLevel, eventAsText
from zope.interface import provider

# Events from Twisted itself (no relayd service) are logged under this name.
_DAEMON = "daemon"


def _service(event: dict) -> str:
    return event.get("service") or _DAEMON


def _text(event: dict) -> str:
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False,
                       includeSystem=False)
    return text.rstrip("\n")


def syslogObserver(out: IO[str], hostname: str | None = None, pid: int | None = None,
                   localtime: Callable[[float], time.struct_time] = time.localtime) -> ILogObserver:
    """Lines in syslog's format; a multi-line event (a traceback) repeats the prefix on each line."""
    host = (hostname or socket.gethostname()).split(".")[0]
    processId = os.getpid() if pid is None else pid

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        stamp = time.strftime("%b %e %H:%M:%S", localtime(event.get("log_time", time.time())))
        prefix = f"{stamp} {host} relayd/{_service(event)}[{processId}]: "
        out.write("".join(prefix + line + "\n" for line in _text(event).split("\n")))
        out.flush()

    return observe


def jsonObserver(out: IO[str]) -> ILogObserver:
    """One JSON object per event and line; fields that are not JSON become strings."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {
            "time": event.get("log_time"),
            "service": _service(event),
            "level": getattr(level, "name", str(level)),
            "text": _text(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in ("service", "format") and key not in record:
                record[key] = value
        out.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        out.flush()

    return observe


# RFC 3164 severities, by twisted.logger level; facility mail (2).
_SEVERITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}
_FACILITY_MAIL = 2


def syslogSocketObserver(path: str = "/dev/log", pid: int | None = None,
                         localtime: Callable[[float], time.struct_time] = time.localtime) -> ILogObserver:
    """
    Datagrams to the local syslog socket, one per line of an event. When
    the socket is missing or refuses a datagram, the line goes to stderr
    rather than nowhere.
    """
    processId = os.getpid() if pid is None else pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        severity = _SEVERITY.get(event.get("log_level"), 6)
        stamp = time.strftime("%b %e %H:%M:%S", localtime(event.get("log_time", time.time())))
        head = f"<{_FACILITY_MAIL * 8 + severity}>{stamp} relayd/{_service(event)}[{processId}]: "
        for line in _text(event).split("\n"):
            data = (head + line).encode("utf-8", "backslashreplace")
            try:
                sock.sendto(data, path)
            except OSError:
                sys.stderr.write(head + line + "\n")

    return observe


def syslogSocket() -> ILogObserver:
    return syslogSocketObserver()


def syslogStdout() -> ILogObserver:
    return syslogObserver(sys.stdout)


def jsonStdout() -> ILogObserver:
    return jsonObserver(sys.stdout)
