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

Each of them formats an event on the thread that logs it and hands the
finished lines to a ``LineWriter``: one thread of its own writes them, in
order, so the reactor thread never waits for a pipe, a file or the syslog
socket. Its queue is bounded; what happens when it is full is said there.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
import sys
import threading
import time
from typing import IO, Callable

from twisted.logger import ILogObserver, LogLevel, eventAsText
from zope.interface import provider

# Events from Twisted itself (no relayd service) are logged under this name.
_DAEMON = "daemon"


def _service(event: dict) -> str:
    return event.get("service") or _DAEMON


def _text(event: dict) -> str:
    if event.get("log_format") == "{log_line}" and "log_failure" not in event:
        # relayd.maillog's events carry their finished line: no formatting.
        line = event.get("log_line")
        if isinstance(line, str):
            return line.rstrip("\n")
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False,
                       includeSystem=False)
    return text.rstrip("\n")


class _SecondStamp:
    """
    ``time.strftime(format, localtime(t))``, formatted once per second:
    every line logged in that second shares it.
    """

    def __init__(self, format: str, localtime: Callable[[float], time.struct_time]):
        self._format = format
        self._localtime = localtime
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, t: float) -> str:
        second = int(t)
        last = self._last  # one read: observers run on every thread that logs
        if last[0] == second:
            return last[1]
        text = time.strftime(self._format, self._localtime(second))
        self._last = (second, text)
        return text


def syslogObserver(out: IO[str], hostname: str | None = None, pid: int | None = None,
                   localtime: Callable[[float], time.struct_time] = time.localtime) -> ILogObserver:
    """Lines in syslog's format; a multi-line event (a traceback) repeats the prefix on each line."""
    host = (hostname or socket.gethostname()).split(".")[0]
    processId = os.getpid() if pid is None else pid
    stamps = _SecondStamp("%b %e %H:%M:%S", localtime)

    def lines(event: dict) -> str:
        stamp = stamps(event.get("log_time", time.time()))
        prefix = f"{stamp} {host} relayd/{_service(event)}[{processId}]: "
        return "".join(prefix + line + "\n" for line in _text(event).split("\n"))

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        out.write(lines(event))
        out.flush()

    observe.format = lines
    return observe


def jsonObserver(out: IO[str]) -> ILogObserver:
    """One JSON object per event and line; fields that are not JSON become strings."""

    def line(event: dict) -> str:
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
        return json.dumps(record, default=str, separators=(",", ":")) + "\n"

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        out.write(line(event))
        out.flush()

    observe.format = line
    return observe


# RFC 3164 severities, by twisted.logger level; facility mail (2).
_SEVERITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}
_FACILITY_MAIL = 2
DEFAULT_SYSLOG_SOCKET = "/dev/log"

# Whether this process says when the syslog socket fails and takes lines
# again. An intake worker does not (relayd.worker sets it): the master
# writes to the same socket and falls back to the same stderr, and says it
# once for the daemon.
socketWarnings = True


def syslogSocketObserver(path: str = DEFAULT_SYSLOG_SOCKET, pid: int | None = None,
                         localtime: Callable[[float], time.struct_time] = time.localtime,
                         fallback: IO[str] | None = None, threaded: bool = False) -> ILogObserver:
    """
    Datagrams to the local syslog socket, one per line of an event.

    When the socket is missing or refuses a datagram, lines go to
    ``fallback`` (the process's real stderr, which systemd puts in the
    journal) rather than nowhere, after one warning line that says why;
    once the socket takes a datagram again, another line says so. Not
    ``sys.stderr``: twistd points that at the log itself, so lines written
    there would come back to this observer and be lost.

    ``threaded``: sent by a LineWriter's thread (``observe.writer``), as a
    full socket buffer blocks the sender.
    """
    processId = os.getpid() if pid is None else pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    out = fallback if fallback is not None else sys.__stderr__
    failing = False
    stamps = _SecondStamp("%b %e %H:%M:%S", localtime)

    def warn(text: str) -> None:
        if socketWarnings:
            out.write(f"relayd: warning: {text}\n")

    def datagrams(event: dict) -> list[tuple[bytes, str]]:
        severity = _SEVERITY.get(event.get("log_level"), 6)
        stamp = stamps(event.get("log_time", time.time()))
        head = f"<{_FACILITY_MAIL * 8 + severity}>{stamp} relayd/{_service(event)}[{processId}]: "
        return [((head + line).encode("utf-8", "backslashreplace"), head + line)
                for line in _text(event).split("\n")]

    def send(lines: list[tuple[bytes, str]]) -> None:
        nonlocal failing
        for data, text in lines:
            try:
                sock.sendto(data, path)
            except OSError as e:
                if not failing:
                    failing = True
                    warn(f"syslog socket {path}: {e.strerror or e}; logging to stderr until it "
                         "takes lines again")
                out.write(text + "\n")
                out.flush()
            else:
                if failing:
                    failing = False
                    warn(f"syslog socket {path} takes lines again; logging there")
                    out.flush()

    deliver: Callable[[list[tuple[bytes, str]]], None] = send
    writer = None
    if threaded:
        writer = LineWriter(lambda batch: [send(lines) for lines in batch],
                            lambda count: datagrams(_droppedEvent(count)), name="relayd-syslog")
        deliver = writer

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        deliver(datagrams(event))

    observe.writer = writer
    return observe


# Events waiting for the writer thread (a few MB of log at most).
MAX_PENDING_EVENTS = 10_000
# How long a thread that logs waits for room in a full queue before events
# are dropped (and counted): once per stall of the writer, not per event.
FULL_QUEUE_PATIENCE = 1.0
# How long the writer lets a batch gather once woken: one wake-up (and one
# write) per batch instead of a thread switch per event.
BATCH_LINGER = 0.01
# At exit (and before a fork), how long the remaining events may take.
FLUSH_DEADLINE = 5.0


class LineWriter:
    """
    Log events written by one thread of its own, in the order they were
    handed in, in batches: ``write(items)`` gets a list of them.

    When the queue is full (the log is slower than the mail, or stuck), the
    thread that logs waits up to ``patience`` seconds for room: slowing down
    is better than losing lines. If there is still no room, events are
    dropped and counted, at once and without waiting again, until the
    writer takes the queue; ``droppedNotice(count)`` is then written where
    the gap is, so nothing is ever lost silently.
    """

    def __init__(self, write: Callable[[list], None], droppedNotice: Callable[[int], object],
                 maxPending: int = MAX_PENDING_EVENTS, patience: float = FULL_QUEUE_PATIENCE,
                 linger: float = BATCH_LINGER, name: str = "relayd-log"):
        self._write = write
        self._droppedNotice = droppedNotice
        self._maxPending = maxPending
        self._patience = patience
        self._linger = linger
        self._name = name
        self._pending: list = []
        self._dropped = 0
        self._writing = False
        self._stopping = False
        self._start()
        atexit.register(self.close)
        # twistd forks to daemonize after it made the observers: the child
        # needs a writer thread of its own, and nothing pending twice.
        os.register_at_fork(before=self.flush, after_in_child=self._start)

    def _start(self) -> None:
        self._changed = threading.Condition()
        self._writing = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def __call__(self, item: object) -> None:
        with self._changed:
            if not self._dropped:
                if len(self._pending) >= self._maxPending:
                    self._changed.wait_for(lambda: len(self._pending) < self._maxPending,
                                           self._patience)
                if len(self._pending) < self._maxPending:
                    self._pending.append(item)
                    if len(self._pending) == 1:
                        self._changed.notify_all()  # the writer waits for this one
                    return
            self._dropped += 1

    def _run(self) -> None:
        changed = self._changed
        while True:
            with changed:
                changed.wait_for(lambda: self._pending or self._stopping)
                stopping = self._stopping
            if not stopping:
                time.sleep(self._linger)
            with changed:
                batch, self._pending = self._pending, []
                dropped, self._dropped = self._dropped, 0
                self._writing = True
                changed.notify_all()  # room for a thread waiting to log
            if dropped:
                batch.append(self._droppedNotice(dropped))
            if batch:
                try:
                    self._write(batch)
                except Exception as e:  # a closed stdout: say so where it can still be seen
                    try:
                        sys.__stderr__.write(f"relayd: cannot write to the log: {e}\n")
                    except Exception:
                        pass
            with changed:
                self._writing = False
                changed.notify_all()  # for flush()
                if stopping and not self._pending:
                    return

    def flush(self, timeout: float = FLUSH_DEADLINE) -> bool:
        """Wait until everything handed in so far is written; False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._writing, timeout)

    def close(self, timeout: float = FLUSH_DEADLINE) -> None:
        """Write what is pending (within ``timeout``) and end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)


def _droppedEvent(count: int) -> dict:
    return {"log_format": "warning: {count} log events dropped: the log writer fell behind",
            "count": count, "log_level": LogLevel.warn, "log_time": time.time(),
            "log_namespace": "relayd/daemon"}


class _StreamWrites:
    """Writes text to a stream and flushes it, for a LineWriter."""

    def __init__(self, out: IO[str]):
        self.out = out

    def __call__(self, texts: list[str]) -> None:
        self.out.write("".join(texts))
        self.out.flush()


class _PerThreadBuffer:
    """A stream that keeps what each thread writes apart until that thread takes it."""

    def __init__(self):
        self._local = threading.local()

    def write(self, text: str) -> None:
        parts = getattr(self._local, "parts", None)
        if parts is None:
            parts = self._local.parts = []
        parts.append(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        parts = getattr(self._local, "parts", None)
        if not parts:
            return ""
        self._local.parts = []
        return "".join(parts)


def threadedObserver(makeObserver: Callable[[IO[str]], ILogObserver], out: IO[str],
                     name: str = "relayd-log") -> ILogObserver:
    """
    ``makeObserver(stream)``'s lines, formatted on the thread that logs and
    written to ``out`` by a LineWriter's thread (``observe.writer``). An
    observer with a ``format(event)`` (syslogObserver's, jsonObserver's)
    is asked for its text directly; any other writes it into a per-thread
    buffer, taken from there.
    """
    buffer = _PerThreadBuffer()
    inner = makeObserver(buffer)
    formatted = getattr(inner, "format", None)
    if formatted is None:
        def formatted(event: dict) -> str:
            inner(event)
            return buffer.take()

    writer = LineWriter(_StreamWrites(out), lambda count: formatted(_droppedEvent(count)),
                        name=name)

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        text = formatted(event)
        if text:
            writer(text)

    observe.writer = writer
    return observe


# Twisted's UDP port logs its start and stop unconditionally, and every DNS
# query (client names, MX lookups) uses a port of its own: two lines per
# query that say nothing to an admin.
_UDP_PORT_CHATTER = re.compile(r"(?:DNSDatagramProtocol starting on \d+|\(UDP Port \d+ Closed\))")


def isChatter(event: dict) -> bool:
    """Whether ``event`` is Twisted's per-query UDP port start/stop line."""
    return (event.get("log_namespace") == "log_legacy"
            and _UDP_PORT_CHATTER.fullmatch(event.get("log_text", "")) is not None)


def withoutChatter(observer: ILogObserver) -> ILogObserver:
    """``observer`` without Twisted's per-query UDP port lines."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        if not isChatter(event):
            observer(event)

    observe.writer = observer.writer
    return observe


def syslogSocket() -> ILogObserver:
    return withoutChatter(syslogSocketObserver(
        os.environ.get("RELAYD_SYSLOG_SOCKET") or DEFAULT_SYSLOG_SOCKET, threaded=True))


def syslogStdout() -> ILogObserver:
    return withoutChatter(threadedObserver(syslogObserver, sys.stdout))


def jsonStdout() -> ILogObserver:
    return withoutChatter(threadedObserver(jsonObserver, sys.stdout))
