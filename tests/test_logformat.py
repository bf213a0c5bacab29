"""The --logger observers: syslog lines, syslog datagrams and JSON, as tools read them."""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time

import pytest
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from zope.interface import provider

from relayd import logformat, maillog

STAMP = 1_796_012_830.5  # Mon Nov 30 2026, 04:27:10 UTC


def utc(seconds):
    return time.gmtime(seconds)


def emitThrough(observer, emit):
    """Run maillog functions with ``observer`` listening on the global publisher."""
    globalLogPublisher.addObserver(observer)
    try:
        emit()
    finally:
        globalLogPublisher.removeObserver(observer)


def fixedTime(observer):
    def observe(event):
        event["log_time"] = STAMP
        observer(event)
    return observe


def test_syslog_lines_name_the_service_as_program():
    out = io.StringIO()
    observer = logformat.syslogObserver(out, hostname="relay.example.com", pid=4242, localtime=utc)
    emitThrough(fixedTime(observer), lambda: (
        maillog.messageQueued("K1EXDXNM43F1XEF6", "a@example.com", 421, 1),
        maillog.delivery("K1EXDXNM43F1XEF6", "b@example.org", "smtp.example.net[192.0.2.7]:587",
                         0.42, (0.01, 0, 0.2, 0.21), "2.0.0", "sent", "250 2.0.0 Ok"),
    ))
    assert out.getvalue().splitlines() == [
        "Nov 30 04:27:10 relay relayd/qmgr[4242]: K1EXDXNM43F1XEF6: from=<a@example.com>, size=421, nrcpt=1 (queue active)",
        "Nov 30 04:27:10 relay relayd/smtp[4242]: K1EXDXNM43F1XEF6: to=<b@example.org>, "
        "relay=smtp.example.net[192.0.2.7]:587, delay=0.42, delays=0.01/0/0.2/0.21, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok)",
    ]


def test_syslog_multi_line_event_repeats_the_prefix():
    out = io.StringIO()
    observer = logformat.syslogObserver(out, hostname="relay", pid=1, localtime=utc)
    log = Logger(namespace="twisted", observer=fixedTime(observer))
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("unexpected")
    lines = out.getvalue().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("Nov 30 04:27:10 relay relayd/daemon[1]: ") for line in lines)
    assert "ValueError: boom" in lines[-1]


def test_syslog_socket_sends_mail_facility_datagrams(tmp_path):
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    try:
        observer = logformat.syslogSocketObserver(path, pid=7, localtime=utc)
        emitThrough(fixedTime(observer), lambda: (
            maillog.removed("K1EXDXNM43F1XEF6"),
            maillog.smtpdWarning("unknown[192.0.2.4]: something"),
        ))
        first = server.recv(4096).decode()
        second = server.recv(4096).decode()
    finally:
        server.close()
    # facility mail (2) * 8 + info (6) = 22; warning (4) = 20
    assert first == "<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF6: removed"
    assert second == "<20>Nov 30 04:27:10 relayd/smtpd[7]: warning: unknown[192.0.2.4]: something"


def test_syslog_socket_missing_falls_back_to_stderr_with_one_warning(tmp_path):
    path = tmp_path / "log"
    err = io.StringIO()
    observer = logformat.syslogSocketObserver(str(path), pid=7, localtime=utc, fallback=err)
    emitThrough(fixedTime(observer), lambda: (
        maillog.removed("K1EXDXNM43F1XEF6"), maillog.removed("K1EXDXNM43F1XEF7")))
    assert err.getvalue() == (
        f"relayd: warning: syslog socket {path}: No such file or directory; logging to stderr "
        "until it takes lines again\n"
        "<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF6: removed\n"
        "<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF7: removed\n")
    # syslog comes back (rsyslog restarted): lines go there again, one note says so.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        emitThrough(fixedTime(observer), lambda: maillog.removed("K1EXDXNM43F1XEF8"))
        assert server.recv(4096).decode() == "<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF8: removed"
    finally:
        server.close()
    assert err.getvalue().splitlines()[-1] == (
        f"relayd: warning: syslog socket {path} takes lines again; logging there")


def test_syslog_socket_fallback_is_the_real_stderr_not_twistds_redirected_one(monkeypatch):
    # twistd replaces sys.stderr with a file that logs what is written to
    # it: a fallback through it would loop back into the failing observer.
    redirected = io.StringIO()
    monkeypatch.setattr("sys.stderr", redirected)
    real = io.StringIO()
    monkeypatch.setattr("sys.__stderr__", real)
    observer = logformat.syslogSocketObserver("/nonexistent/relayd-test/log", pid=7, localtime=utc)
    emitThrough(fixedTime(observer), lambda: maillog.removed("K1EXDXNM43F1XEF6"))
    assert redirected.getvalue() == ""
    assert real.getvalue().endswith("<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF6: removed\n")


def test_json_lines_carry_the_event_fields():
    out = io.StringIO()
    emitThrough(fixedTime(logformat.jsonObserver(out)), lambda: maillog.delivery(
        "K1EXDXNM43F1XEF6", "b@example.org", "none", 30, (0.01, 0, 30, 0), "4.4.1", "deferred",
        "connect to smtp.example.net[192.0.2.7]:587: Connection refused"))
    record = json.loads(out.getvalue())
    assert record["time"] == STAMP
    assert record["service"] == "smtp"
    assert record["level"] == "info"
    assert record["queue_id"] == "K1EXDXNM43F1XEF6"
    assert record["to"] == "b@example.org"
    assert record["status"] == "deferred"
    assert record["dsn"] == "4.4.1"
    assert record["text"].startswith("K1EXDXNM43F1XEF6: to=<b@example.org>, relay=none, delay=30,")


def test_mail_log_events_are_the_events_logger_emit_makes():
    # maillog hands its events to the observer itself (Logger.emit's level
    # check is a fifth of a line's cost): the same event, fields in the same
    # order, so the JSON log is unchanged.
    seen = []
    emitThrough(seen.append, lambda: maillog.delivery(
        "K1EXDXNM43F1XEF6", "b@example.org", "mx[192.0.2.7]:25", 1.5, (0.01, 0, 0.5, 1), "2.0.0",
        "sent", "250 ok", route="smarthost"))
    ours = seen.pop()
    logger = Logger(namespace="relayd/smtp")
    emitThrough(seen.append, lambda: logger.emit(
        LogLevel.info, "{log_line}", log_line=ours["log_line"], service="smtp",
        queue_id="K1EXDXNM43F1XEF6", event="delivery", to="b@example.org", relay="mx[192.0.2.7]:25",
        delay=1.5, dsn="2.0.0", status="sent", reply="250 ok", route="smarthost"))
    theirs = seen.pop()
    for event in (ours, theirs):
        assert event.pop("log_time") == pytest.approx(time.time(), abs=60)
        assert isinstance(event.pop("log_logger"), Logger)
    assert list(ours.items()) == list(theirs.items())
    assert ours["log_line"].startswith("K1EXDXNM43F1XEF6: to=<b@example.org>, relay=mx[192.0.2.7]:25,")
    assert ours["log_namespace"] == "relayd/smtp" and ours["log_level"] is LogLevel.info


# -- the writer thread: the logging thread never writes -----------------------------


class RecordingStream:
    """A stream that records each write with the thread that made it."""

    def __init__(self):
        self.writes: list[tuple[str, threading.Thread]] = []

    def write(self, text):
        self.writes.append((text, threading.current_thread()))

    def flush(self):
        pass

    def text(self):
        return "".join(text for text, _ in self.writes)


@pytest.mark.parametrize("entryPoint", ["syslogStdout", "jsonStdout"])
def test_twistd_observers_write_in_a_thread_of_their_own_in_order(monkeypatch, entryPoint):
    out = RecordingStream()
    monkeypatch.setattr(sys, "stdout", out)
    observer = getattr(logformat, entryPoint)()
    try:
        emitThrough(observer, lambda: [maillog.removed(f"K1EXDXNM43F1XE{i:02d}") for i in range(50)])
        assert observer.writer.flush()
    finally:
        observer.writer.close()
    lines = out.text().splitlines()
    assert [("K1EXDXNM43F1XE%02d: removed" % i) in line for i, line in enumerate(lines)] == [True] * 50
    assert threading.current_thread() not in {thread for _, thread in out.writes}


def test_syslog_socket_observer_for_twistd_sends_in_a_thread(tmp_path, monkeypatch):
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    senders = []
    realSendto = socket.socket.sendto

    class Recording(socket.socket):
        def sendto(self, *args):
            senders.append(threading.current_thread())
            return realSendto(self, *args)

    monkeypatch.setattr(logformat.socket, "socket", Recording)
    observer = logformat.syslogSocketObserver(path, pid=7, localtime=utc, threaded=True)
    try:
        emitThrough(fixedTime(observer), lambda: maillog.removed("K1EXDXNM43F1XEF6"))
        assert server.recv(4096).decode() == "<22>Nov 30 04:27:10 relayd/qmgr[7]: K1EXDXNM43F1XEF6: removed"
    finally:
        observer.writer.close()
        server.close()
    assert senders and threading.current_thread() not in senders


def test_a_stuck_log_drops_counted_events_and_says_so_where_the_gap_is():
    unblock = threading.Event()
    written = []

    def write(batch):
        unblock.wait(10)
        written.extend(batch)

    writer = logformat.LineWriter(write, lambda count: f"dropped {count}", maxPending=3, patience=0.01)
    try:
        for i in range(10):  # 1 being written, 3 queued, then a short wait, then counted drops
            writer(f"line {i}")
        unblock.set()
        assert writer.flush()
        writer("line 10")
        assert writer.flush()
    finally:
        writer.close()
    # Never more than one wait per stall, never a silent loss, and the order kept.
    kept = [w for w in written if w.startswith("line")]
    assert kept == sorted(kept, key=lambda w: int(w.split()[1]))
    notices = [w for w in written if w.startswith("dropped")]
    assert notices and sum(int(n.split()[1]) for n in notices) + len(kept) == 11
    # Each notice stands where its gap is: the lines around it are in order
    # and some line numbers are missing right there.
    for notice in notices:
        at = written.index(notice)
        before = int(written[at - 1].split()[1])
        after = int(written[at + 1].split()[1])
        assert after > before + 1
    assert written[-1] == "line 10"


def test_close_writes_what_is_pending():
    written = []
    writer = logformat.LineWriter(written.extend, lambda count: f"dropped {count}")
    for i in range(100):
        writer(i)
    writer.close()
    assert written == list(range(100))


def test_the_syslog_socket_observer_twistd_gets_is_the_threaded_one():
    observer = logformat.syslogSocket()
    try:
        assert isinstance(observer.writer, logformat.LineWriter)
    finally:
        observer.writer.close()


def test_twisted_udp_port_chatter_of_dns_queries_is_left_out_of_the_log():
    # Every DNS query (client names, MX) opens and closes a UDP port, which
    # Twisted logs through its legacy log whatever the protocol's noisy flag.
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacyLog

    seen = []

    @provider(ILogObserver)
    def record(event):
        seen.append(event)

    record.writer = None
    observer = logformat.withoutChatter(record)
    globalLogPublisher.addObserver(observer)
    try:
        legacyLog.msg("DNSDatagramProtocol starting on 4242")
        legacyLog.msg("(UDP Port 4242 Closed)")
        legacyLog.msg("ListenerFactory starting on 2525")
        legacyLog.msg("something else happened")
    finally:
        globalLogPublisher.removeObserver(observer)
    texts = [e.get("log_text") for e in seen]
    assert "DNSDatagramProtocol starting on 4242" not in texts
    assert "(UDP Port 4242 Closed)" not in texts
    assert "something else happened" in texts
    assert "ListenerFactory starting on 2525" in texts  # a listener starts once: kept


def test_lines_of_one_second_share_one_formatted_stamp_and_mail_lines_are_not_reformatted(monkeypatch):
    """The per-message cost of a log line: no strftime per line, no format parsing of maillog's lines."""
    converted = []

    def countingUtc(seconds):
        converted.append(seconds)
        return time.gmtime(seconds)

    formatted = []
    realEventAsText = logformat.eventAsText
    monkeypatch.setattr(logformat, "eventAsText",
                        lambda event, **kw: (formatted.append(event), realEventAsText(event, **kw))[1])
    out = io.StringIO()
    observer = logformat.syslogObserver(out, hostname="relay", pid=1, localtime=countingUtc)
    emitThrough(fixedTime(observer), lambda: [
        maillog.messageQueued("K1EXDXNM43F1XEF6", "a@example.com", 421, 1) for _ in range(3)])
    observer({"log_format": "Twisted's {what}", "what": "own line", "log_time": STAMP + 1,
              "log_namespace": "x"})
    lines = out.getvalue().splitlines()
    assert lines[0] == ("Nov 30 04:27:10 relay relayd/qmgr[1]: K1EXDXNM43F1XEF6: "
                        "from=<a@example.com>, size=421, nrcpt=1 (queue active)")
    assert lines[:3] == [lines[0]] * 3
    assert lines[3] == "Nov 30 04:27:11 relay relayd/daemon[1]: Twisted's own line"
    assert converted == [int(STAMP), int(STAMP) + 1]  # once per second
    assert [e["log_format"] for e in formatted] == ["Twisted's {what}"]
