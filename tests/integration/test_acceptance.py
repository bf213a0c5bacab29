"""
The acceptance test: mail submitted from a trusted client reaches the
smarthost byte for byte, and the daemon logs each step in Postfix's words.

One daemon and one sink serve the whole module: the messages are submitted
once, and each test checks one thing a user would check about them.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

import pytest

from tests.integration.harness import (
    HOST,
    HOSTNAME,
    Delivered,
    Relayd,
    Sink,
    assertSameBytes,
    fieldName,
    makeMessage,
    splitMessage,
    twistdPath,
)

pytestmark = pytest.mark.integration


@dataclass
class Submission:
    name: str
    sender: str
    recipient: str
    message: bytes
    hasIds: bool  # the message carries its own Message-ID: and Date:
    queueId: str = ""


def largeBody(size: int) -> list[str]:
    """About ``size`` bytes of numbered 78-character lines (dot lines included)."""
    lines = []
    total = 0
    n = 0
    while total < size:
        # Every 1000th line starts with a dot, so stuffing is exercised
        # across the client's and the relay's buffer boundaries too.
        prefix = "." if n % 1000 == 999 else ""
        line = f"{prefix}{n:09d} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 2
        lines.append(line[:78])
        total += 80
        n += 1
    return lines


def submissions() -> list[Submission]:
    def one(name: str, body: list[str], hasIds: bool) -> Submission:
        sender, recipient = f"{name}-sender@client.test", f"{name}@remote.test"
        message = makeMessage(f"acceptance {name}", body, messageId=hasIds, date=hasIds,
                              sender=sender, recipient=recipient)
        return Submission(name, sender, recipient, message, hasIds)

    return [
        one("small", ["Hello Bob,", "", "a small message without Message-ID or Date.",
                      "-- ", "Alice"], hasIds=False),
        one("dots", [".the first body line starts with a dot",
                     "the next line is a single dot:", ".",
                     "and this one is two dots:", "..", "...", ". a dot and a space",
                     "the last line is a single dot too:", "."], hasIds=True),
        one("large", largeBody(5_000_000), hasIds=True),
    ]


@dataclass
class Batch:
    daemon: Relayd
    sink: Sink
    submitted: dict[str, Submission]
    delivered: list[Delivered]

    def deliveredFor(self, name: str) -> Delivered:
        subject = f"\r\nSubject: acceptance {name}\r\n".encode()
        found = [d for d in self.delivered if subject in d.content.split(b"\r\n\r\n", 1)[0] + b"\r\n"]
        assert len(found) == 1, f"{name}: expected exactly one delivered copy, got {len(found)}"
        return found[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    if not twistdPath().exists():
        pytest.fail(f"{twistdPath()} does not exist: run the tests with `make test`")
    base = tmp_path_factory.mktemp("acceptance")
    sink = Sink(base / "sink")
    daemon = Relayd(base / "relayd", sink.port)
    try:
        sink.start()
        # Started inside the try: a daemon that fails its start-up checks
        # (after its process was spawned) is still stopped below.
        daemon.start()
        subs = submissions()
        for sub in subs:
            sub.queueId = daemon.submit(sub.message, sender=sub.sender, recipients=(sub.recipient,))
        delivered = sink.waitForMessages(len(subs), daemon.describe)
        # Wait until relayd has finished with every message, so that a
        # duplicate delivery would have shown up by now.
        for sub in subs:
            daemon.waitForLog(rf"\b{sub.queueId}: removed\b")
        yield Batch(daemon, sink, {s.name: s for s in subs}, sink.messages())
    finally:
        print(daemon.describe())
        daemon.kill()
        sink.stop()


NAMES = ["small", "dots", "large"]


def test_each_submission_gets_its_own_queue_id(batch):
    ids = [s.queueId for s in batch.submitted.values()]
    assert len(set(ids)) == len(ids), ids


def test_each_message_is_delivered_exactly_once(batch):
    assert len(batch.delivered) == len(batch.submitted), (
        f"sink holds {len(batch.delivered)} messages for {len(batch.submitted)} submitted")
    for name in NAMES:
        batch.deliveredFor(name)


@pytest.mark.parametrize("name", NAMES)
def test_envelope_is_relayed(batch, name):
    sub, got = batch.submitted[name], batch.deliveredFor(name)
    assert got.envelope["mail_from"] == sub.sender
    assert got.envelope["rcpt_tos"] == [sub.recipient]


@pytest.mark.parametrize("name", NAMES)
def test_content_arrives_unchanged_but_for_relayd_headers(batch, name):
    """
    The delivered message is the submitted one with relayd's Received: on
    top, and Message-ID:/Date: added only where the client sent none.
    """
    sub, got = batch.submitted[name], batch.deliveredFor(name)
    fields, rest = splitMessage(got.content)
    sentFields, sentRest = splitMessage(sub.message)

    received = fields.pop(0)
    assert fieldName(received) == b"received", f"first header field is not Received: {received[:200]!r}"
    assert HOSTNAME.encode() in received, f"Received: does not name {HOSTNAME}: {received!r}"

    for header, valid in ((b"message-id", r"\s*<[^<>@\s]+@[^<>@\s]+>\s*"), (b"date", None)):
        sentCount = sum(fieldName(f) == header for f in sentFields)
        matching = [f for f in fields if fieldName(f) == header]
        if sub.hasIds:
            assert len(matching) == sentCount == 1, (
                f"{header.decode()}: the client sent one, the sink got {len(matching)}")
        else:
            assert sentCount == 0
            assert len(matching) == 1, (
                f"{header.decode()}: the client sent none, relayd must add exactly one; got {matching!r}")
            added = matching[0]
            value = added.split(b":", 1)[1].decode("ascii")
            if valid is not None:
                assert re.fullmatch(valid, value), f"added field is malformed: {added!r}"
            else:
                assert email.utils.parsedate_to_datetime(value.strip()) is not None, added
            fields.remove(added)

    assertSameBytes(b"".join(fields), b"".join(sentFields), f"{name}: header fields")
    assertSameBytes(rest, sentRest, f"{name}: body")


@pytest.mark.parametrize("name", NAMES)
def test_log_tells_the_story_of_each_message(batch, name):
    sub, daemon = batch.submitted[name], batch.daemon
    qid = re.escape(sub.queueId)
    log = daemon.log()
    expected = [
        rf"\b{qid}: client=[^\s\[]*\[127\.0\.0\.1\]",
        rf"\b{qid}: from=<{re.escape(sub.sender)}>, size=\d+, nrcpt=1 \(queue active\)",
        rf"\b{qid}: to=<{re.escape(sub.recipient)}>, "
        rf"relay={re.escape(HOST)}\[{re.escape(HOST)}\]:{batch.sink.port}, .*\bstatus=sent\b",
        rf"\b{qid}: removed\b",
    ]
    for pattern in expected:
        assert re.search(pattern, log), f"no log line matching {pattern!r}\n{daemon.describe()}"
    # The events are logged in the order they happened.
    positions = [re.search(p, log).start() for p in expected]
    assert positions == sorted(positions), f"log lines out of order for {sub.queueId}"
