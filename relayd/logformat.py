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
    syslog identifier. This is what systemd/relayd.service uses. Without
    the socket (no syslog daemon, a chroot) the lines go to stderr, after
    one warning; ``RELAYD_SYSLOG_SOCKET`` names another socket.
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
DEFAULT_SYSLOG_SOCKET = "/dev/log"


def syslogSocketObserver(path: str = DEFAULT_SYSLOG_SOCKET, pid: int | None = None,
                         localtime: Callable[[float], time.struct_time] = time.localtime,
                         fallback: IO[str] | None = None) -> ILogObserver:
    """
    Datagrams to the local syslog socket, one per line of an event.

    When the socket is missing or refuses a datagram, lines go to
    ``fallback`` (the process's real stderr, which systemd puts in the
    journal) rather than nowhere, after one warning line that says why;
    once the socket takes a datagram again, another line says so. Not
    ``sys.stderr``: twistd points that at the log itself, so lines written
    there would come back to this observer and be lost.
    """
    processId = os.getpid() if pid is None else pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    out = fallback if fallback is not None else sys.__stderr__
    failing = False

    def warn(text: str) -> None:
        out.write(f"relayd: warning: {text}\n")

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        nonlocal failing
        severity = _SEVERITY.get(event.get("log_level"), 6)
        stamp = time.strftime("%b %e %H:%M:%S", localtime(event.get("log_time", time.time())))
        head = f"<{_FACILITY_MAIL * 8 + severity}>{stamp} relayd/{_service(event)}[{processId}]: "
        for line in _text(event).split("\n"):
            data = (head + line).encode("utf-8", "backslashreplace")
            try:
                sock.sendto(data, path)
            except OSError as e:
                if not failing:
                    failing = True
                    warn(f"syslog socket {path}: {e.strerror or e}; logging to stderr until it "
                         "takes lines again")
                out.write(head + line + "\n")
                out.flush()
            else:
                if failing:
                    failing = False
                    warn(f"syslog socket {path} takes lines again; logging there")
                    out.flush()

    return observe


def syslogSocket() -> ILogObserver:
    return syslogSocketObserver(os.environ.get("RELAYD_SYSLOG_SOCKET") or DEFAULT_SYSLOG_SOCKET)


def syslogStdout() -> ILogObserver:
    return syslogObserver(sys.stdout)


def jsonStdout() -> ILogObserver:
    return jsonObserver(sys.stdout)
