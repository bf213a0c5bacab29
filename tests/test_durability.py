"""
Accepting mail safely when storage runs short, and the postmaster address:
real spool on disk, the real server factory, dialogues over StringTransport.
"""

from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from relayd import config, queue, server
from relayd.queue import Spool
from tests.dialogue import Dialogue


def makeConfig(tmp_path, extra="", queueExtra=""):
    text = (
        "hostname: relay.test\n"
        'listeners: [{endpoint: "tcp:2525", tls: none, auth: none}]\n'
        f"queue:\n  directory: {tmp_path / 'spool'}\n{queueExtra}"
        "delivery: {smarthosts: [{host: smtp.example.net, tls: none}]}\n"
        "limits: {message_size: 1MB}\n"
        f"{extra}"
    )
    return config.parse(text, str(tmp_path / "relayd.yaml"))


class Session(Dialogue):
    def __init__(self, tmp_path, peer="127.0.0.1", **kw):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = Spool(str(tmp_path / "spool"))
        self.spool.recover()
        self.queued = []
        self.factory = server.SubmissionFactory(
            config=makeConfig(tmp_path, **kw), spool=self.spool,
            commit=lambda writer, envelope: writer.commit(envelope),
            messageQueued=self.queued.append, clock=self.clock)
        self.transport = StringTransport(
            peerAddress=address.IPv4Address("TCP", peer, 40000),
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", 2525))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.take()
        assert self.send(b"EHLO client.test\r\n")[-1].startswith("250 ")


    def submit(self, rcpt=b"bob@example.org") -> list[str]:
        replies = self.send(b"MAIL FROM:<alice@example.com>\r\n")
        if replies != ["250 2.1.0 Ok"]:
            return replies
        assert self.send(b"RCPT TO:<%s>\r\n" % rcpt) == ["250 2.1.5 Ok"]
        assert self.send(b"DATA\r\n")[0].startswith("354")
        return self.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")


@pytest.fixture
def logLines():
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("failing", ["fsync", "rename"])
def test_full_disk_at_commit_is_452_and_leaves_nothing_then_recovers(tmp_path, monkeypatch, logLines, failing):
    s = Session(tmp_path)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(queue.os, failing, full)
    assert s.submit() == ["452 4.3.1 Insufficient system storage"]
    monkeypatch.undo()
    assert s.queued == []
    assert Spool(str(tmp_path / "spool")).recover() == []
    assert any("queue file write error: No space left on device" in l for l in logLines)
    # Space is back: the same session is accepted again.
    [reply] = s.submit()
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert [e.queueId for e in Spool(str(tmp_path / "spool")).recover()] == [reply.split()[-1]]


def test_other_commit_error_is_451(tmp_path, monkeypatch):
    s = Session(tmp_path)

    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(queue.os, "fsync", broken)
    assert s.submit() == ["451 4.3.0 Error: queue file write error"]


def test_free_space_reserve_refuses_mail_until_space_is_back(tmp_path, logLines):
    s = Session(tmp_path)
    free = [1_000_000]
    s.factory.freeBytes = lambda path: free[0]
    # The default reserve: 1.5 x limits.message_size (1 MB) = 1.5 MB.
    assert s.submit() == ["452 4.3.1 Insufficient system storage"]
    assert any("not enough free space in mail queue: 1000000 bytes < 1500000 bytes" in l for l in logLines)
    assert any(l.startswith("NOQUEUE: reject: MAIL from") and "452 4.3.1" in l for l in logLines)
    free[0] = 1_500_000
    assert s.submit()[0].startswith("250 2.0.0 Ok: queued as ")


def test_free_space_reserve_setting(tmp_path):
    s = Session(tmp_path, queueExtra="  free_space_reserve: 0\n")
    s.factory.freeBytes = lambda path: 0
    assert s.submit()[0].startswith("250 2.0.0")
    s = Session(tmp_path, queueExtra="  free_space_reserve: 10MB\n")
    s.factory.freeBytes = lambda path: 9_999_999
    assert s.submit() == ["452 4.3.1 Insufficient system storage"]


def test_real_free_space_probe(tmp_path):
    assert server.spoolFreeBytes(str(tmp_path)) > 0


@pytest.mark.parametrize("rcpt", [b"postmaster", b"Postmaster", b"POSTMASTER@relay.test", b"postmaster@Relay.Test."])
def test_postmaster_is_accepted_from_anyone(tmp_path, rcpt):
    s = Session(tmp_path, peer="203.0.113.5", extra="postmaster: admin@example.net\n")
    [reply] = s.submit(rcpt)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [envelope] = s.queued
    assert [r.address for r in envelope.recipients] == ["admin@example.net"]


@pytest.mark.parametrize("rcpt, expected", [
    (b"postmaster@example.org", "554 5.7.1 <postmaster@example.org>: Relay access denied"),
    (b"postmistress", "501 5.1.3 Bad recipient address syntax"),
])
def test_other_domains_postmaster_is_not_ours(tmp_path, rcpt, expected):
    s = Session(tmp_path, peer="203.0.113.5", extra="postmaster: admin@example.net\n")
    assert s.send(b"MAIL FROM:<alice@example.com>\r\n") == ["250 2.1.0 Ok"]
    assert s.send(b"RCPT TO:<%s>\r\n" % rcpt) == [expected]


def test_postmaster_without_configured_address_is_refused(tmp_path):
    s = Session(tmp_path, peer="203.0.113.5")
    assert s.send(b"MAIL FROM:<>\r\n") == ["250 2.1.0 Ok"]
    assert s.send(b"RCPT TO:<postmaster>\r\n") == [
        "550 5.1.1 <postmaster>: Recipient address rejected: no postmaster address is configured"]


def test_free_space_is_measured_once_a_second_while_it_is_above_the_reserve(tmp_path):
    s = Session(tmp_path)
    measured = []
    s.factory.freeBytes = lambda path: measured.append(path) or 10**12
    for _ in range(3):
        assert s.submit()[0].startswith("250 2.0.0")
    assert len(measured) == 1  # not a statvfs per message
    s.clock.advance(server.FREE_SPACE_INTERVAL)
    assert s.submit()[0].startswith("250 2.0.0")
    assert len(measured) == 2
