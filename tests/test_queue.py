"""Tests for relayd.queue: durability, crash recovery and failure clean-up of the spool."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
import zlib

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from relayd import queue
from relayd.envelope import FORMAT_VERSION, Envelope, Recipient, Status, newQueueId
from relayd.queue import Spool

BODY = b"Received: from x\r\nSubject: hi\r\n\r\n" + b"line with \xe9 8bit\r\n.dot\r\n" * 500


def makeEnvelope(queueId: str | None = None, arrival: float = 1_700_000_000.0) -> Envelope:
    return Envelope(
        queueId=queueId or newQueueId(),
        sender="alice@example.com",
        recipients=[Recipient("a@example.org"), Recipient("b@example.org", {"NOTIFY": "NEVER"})],
        arrival=arrival,
        size=len(BODY),
        mailParams={"BODY": "8BITMIME", "SIZE": str(len(BODY))},
        clientAddress="127.0.0.1",
        clientName="localhost",
        helo="client.example.com",
    )


def store(spool: Spool, envelope: Envelope, body: bytes = BODY) -> None:
    writer = spool.begin(envelope.queueId)
    for start in range(0, len(body), 1000):
        writer.write(body[start:start + 1000])
    writer.commit(envelope)


def storePair(spool: Spool, envelope: Envelope, body: bytes = BODY) -> None:
    """A message as relayd queued it before one file per message: ``<id>.eml`` and ``<id>.env``."""
    queueDir = os.path.join(spool.directory, "queue")
    with open(os.path.join(queueDir, envelope.queueId + ".eml"), "wb") as f:
        f.write(body)
    with open(os.path.join(queueDir, envelope.queueId + ".env"), "wb") as f:
        f.write(queue.encodeEnvelope(envelope))


def setStoredEnvelope(queueDir, queueId: str, raw: bytes, where: str) -> None:
    """
    Store ``raw`` as the envelope of a queued message: in its message file's
    trailer (the file rewritten around it, the trailer itself valid), in
    its update file, or in the older layout's envelope file.
    """
    if where == "update":
        (queueDir / (queueId + ".upd")).write_bytes(raw)
    elif where == "pair":
        (queueDir / (queueId + ".env")).write_bytes(raw)
    else:
        path = queueDir / (queueId + ".msg")
        content = path.read_bytes()
        _, bodyLength, _, _ = queue.TRAILER.unpack(content[-queue.TRAILER.size:])
        path.write_bytes(content[:bodyLength] + queue.encodeMessageEnd(bodyLength, raw))


def listing(directory) -> dict[str, list[str]]:
    return {name: sorted(os.listdir(directory / name)) for name in ("tmp", "queue", "quarantine")}


@pytest.fixture
def spool(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    assert spool.recover() == []
    return spool


@pytest.fixture
def logged():
    """The text of every log event emitted during the test."""
    lines: list[str] = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def test_commitSurvivesRestart(spool, tmp_path):
    """What one process committed, the next one recovers, envelope and body alike."""
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY[:10])
    writer.write(BODY[10:])
    assert writer.size == len(BODY)
    writer.commit(envelope)

    again = Spool(str(tmp_path / "spool"))
    assert again.recover() == [envelope]
    assert again.load(envelope.queueId) == envelope
    with again.openBody(envelope.queueId) as f:
        assert f.read() == BODY
    assert again.bodySize(envelope.queueId) == len(BODY)
    assert again.ids() == [envelope.queueId]
    assert listing(tmp_path / "spool")["tmp"] == []


def test_permissions(tmp_path):
    """Mail is private: directories 0700 and files 0600, whatever the umask."""
    old = os.umask(0o022)
    try:
        spool = Spool(str(tmp_path / "spool"))
        spool.recover()
        envelope = makeEnvelope()
        store(spool, envelope)
        spool.update(envelope)
    finally:
        os.umask(old)
    root = tmp_path / "spool"
    for directory in (root, root / "tmp", root / "queue", root / "quarantine"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    names = os.listdir(root / "queue")
    assert sorted(names) == sorted([envelope.queueId + ".msg", envelope.queueId + ".upd"])
    for name in names:
        assert stat.S_IMODE(os.stat(root / "queue" / name).st_mode) == 0o600, name


def test_recoverReturnsByArrival(spool):
    late = makeEnvelope(arrival=2_000.0)
    early = makeEnvelope(arrival=1_000.0)
    store(spool, late)
    store(spool, early)
    assert [e.queueId for e in spool.recover()] == [early.queueId, late.queueId]


def test_abortLeavesNothing(spool, tmp_path):
    writer = spool.begin(newQueueId())
    writer.write(BODY)
    writer.abort()
    writer.abort()  # idempotent
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}
    assert spool.recover() == []


def test_uncommittedWriteRemovedAtRecovery(spool, tmp_path, logged):
    """
    A writer that neither committed nor aborted (the process died) leaves
    nothing after recovery, and that is no news worth a warning.
    """
    writer = spool.begin(newQueueId())
    writer.write(BODY)
    writer.writeOut(writer.takeBuffered())
    assert Spool(str(tmp_path / "spool")).recover() == []
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}
    assert logged == []


def test_a_message_is_written_in_tmp_and_renamed_into_the_queue_as_one_file(
        spool, tmp_path, monkeypatch):
    """
    The body goes to tmp/<id>.msg; the commit appends the envelope and the
    trailer and renames that one file into queue/: one rename per message.
    """
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)
    writer.writeOut(writer.takeBuffered())
    assert listing(tmp_path / "spool") == {
        "tmp": [envelope.queueId + ".msg"], "queue": [], "quarantine": []}
    assert spool.ids() == []
    renamed = []
    realRename = os.rename

    def rename(source, target):
        renamed.append((os.path.relpath(source, tmp_path / "spool"),
                        os.path.relpath(target, tmp_path / "spool")))
        realRename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    writer.commit(envelope)
    monkeypatch.undo()
    msg = envelope.queueId + ".msg"
    assert renamed == [(os.path.join("tmp", msg), os.path.join("queue", msg))]
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [msg], "quarantine": []}
    assert spool.ids() == [envelope.queueId]
    with spool.openBody(envelope.queueId) as f:
        assert f.read() == BODY
    # The file: the body, the envelope, then the trailer giving both lengths.
    content = (tmp_path / "spool" / "queue" / msg).read_bytes()
    encoded = queue.encodeEnvelope(envelope)
    assert content == BODY + encoded + queue.TRAILER.pack(
        queue.TRAILER_TAG, len(BODY), len(encoded), zlib.crc32(encoded))


def test_leftoverTmpFilesRemoved(spool, tmp_path):
    tmp = tmp_path / "spool" / "tmp"
    (tmp / (newQueueId() + ".eml")).write_bytes(b"partial")
    (tmp / (newQueueId() + ".msg")).write_bytes(b"partial")
    (tmp / (newQueueId() + ".upd.1a2b3c4d")).write_bytes(b"{}")
    (tmp / (newQueueId() + ".env.1a2b3c4d")).write_bytes(b"{}")
    (tmp / "whatever").write_bytes(b"x")
    assert spool.recover() == []
    assert os.listdir(tmp) == []


def test_bodyWithoutEnvelopeRemoved(spool, tmp_path, logged):
    """
    The older layout wrote bodies straight into queue/: a crash before a
    commit's rename left a body alone, which is not a message, and every
    message being received when the daemon stopped leaves one, so it goes
    without a warning.
    """
    committed = makeEnvelope()
    store(spool, committed)
    orphan = newQueueId()
    (tmp_path / "spool" / "queue" / (orphan + ".eml")).write_bytes(BODY)

    assert spool.recover() == [committed]
    assert listing(tmp_path / "spool")["queue"] == [committed.queueId + ".msg"]
    assert logged == []


def test_an_update_file_without_its_message_is_removed_quietly(spool, tmp_path, logged):
    """
    A removal unlinks the message file, then its update file: a crash in
    between leaves the update file alone, which recovery removes as
    routine, where an older layout's envelope without body is quarantined.
    """
    kept, removed = makeEnvelope(), makeEnvelope()
    store(spool, kept)
    store(spool, removed)
    removed.attempts = 1
    spool.update(removed)
    os.unlink(tmp_path / "spool" / "queue" / (removed.queueId + ".msg"))

    assert Spool(str(tmp_path / "spool")).recover() == [kept]
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [kept.queueId + ".msg"], "quarantine": []}
    assert logged == []


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda env: b"{not json", "envelope is not JSON"),
        (lambda env: json.dumps({**env.toJSON(), "version": 99}).encode(), "unsupported envelope version 99"),
        (lambda env: json.dumps({**env.toJSON(), "recipients": [{"address": "x"}]}).encode(), "envelope lacks 'state'"),
        (lambda env: json.dumps({**env.toJSON(), "arrival": None}).encode(), "invalid envelope"),
        (lambda env: json.dumps({**env.toJSON(), "queue_id": newQueueId()}).encode(), "envelope belongs to queue id"),
        (lambda env: b"\xff\xfe", "envelope is not"),
        (lambda env: b"[]", "envelope is not a JSON object"),
    ],
)
@pytest.mark.parametrize("where", ["trailer", "update", "pair"])
def test_corruptEnvelopeQuarantined(spool, tmp_path, logged, corrupt, reason, where):
    good = makeEnvelope()
    store(spool, good)
    bad = makeEnvelope()
    (storePair if where == "pair" else store)(spool, bad)
    setStoredEnvelope(tmp_path / "spool" / "queue", bad.queueId, corrupt(bad), where)

    assert spool.recover() == [good]
    files = {"trailer": [".msg"], "update": [".msg", ".upd"], "pair": [".eml", ".env"]}[where]
    assert listing(tmp_path / "spool")["quarantine"] == [bad.queueId + suffix for suffix in files]
    assert listing(tmp_path / "spool")["queue"] == [good.queueId + ".msg"]
    quarantined = [line for line in logged if line.startswith(f"{bad.queueId}: quarantined: ")]
    assert len(quarantined) == 1
    assert reason in quarantined[0]
    with pytest.raises(FileNotFoundError):
        spool.load(bad.queueId)


def _withField(path: tuple, value: object):
    """The stored envelope with one field (a key path into its JSON) replaced."""
    def corrupt(env: Envelope) -> bytes:
        data = env.toJSON()
        data["history"] = [{"time": 1_700_000_100.0, "recipient": "a@example.org",
                            "relay": "mx[192.0.2.1]:25", "dsn": "4.0.0", "status": "deferred",
                            "reply": "451 later"}]
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        # Python's json writes NaN and Infinity, as a buggy writer might.
        return json.dumps(data).encode()
    return corrupt


@pytest.mark.parametrize("path, value, reason", [
    (("arrival",), float("nan"), "arrival is nan, expected a time from 1970 to 9999"),
    (("arrival",), float("inf"), "arrival is inf, expected a time from 1970 to 9999"),
    (("arrival",), -1.0, "arrival is -1.0, expected a time from 1970 to 9999"),
    (("arrival",), 1e300, "arrival is 1e+300, expected a time from 1970 to 9999"),
    (("arrival",), "1700000000", "arrival is '1700000000', expected a time in seconds"),
    (("next_attempt",), float("nan"), "next_attempt is nan, expected a time from 1970 to 9999"),
    (("next_attempt",), float("-inf"), "next_attempt is -inf, expected a time from 1970 to 9999"),
    (("next_attempt",), True, "next_attempt is True, expected a time in seconds"),
    (("recipients", 0, "last_attempt"), float("nan"),
     "last_attempt is nan, expected a time from 1970 to 9999"),
    (("history", 0, "time"), float("inf"), "history time is inf, expected a time from 1970 to 9999"),
    (("history", 0, "time"), "yesterday", "history time is 'yesterday', expected a time in seconds"),
    (("history", 0, "reply"), 451, "history reply is 451, expected a string or null"),
    (("hold",), "false", "hold is 'false', expected true or false"),
    (("hold",), 0, "hold is 0, expected true or false"),
    (("warned",), "true", "warned is 'true', expected true or false"),
    (("attempts",), 1.5, "attempts is 1.5, expected a whole number from 0"),
    (("attempts",), "2", "attempts is '2', expected a whole number from 0"),
    (("attempts",), -1, "attempts is -1, expected a whole number from 0"),
    (("size",), float("nan"), "size is nan, expected a whole number from 0"),
    (("client_address",), ["x"], "client_address is not a string"),
    (("client_name",), None, "client_name is not a string"),
    (("helo",), 7, "helo is not a string"),
    (("auth_identity",), 7, "auth_identity is 7, expected a string or null"),
    (("last_error",), {"a": 1}, "last_error is {'a': 1}, expected a string or null"),
    (("recipients", 0, "dsn"), 5, "dsn is 5, expected a string or null"),
    (("recipients", 0, "reply"), ["x"], "reply is ['x'], expected a string or null"),
    (("recipients", 0, "relay"), 1.0, "relay is 1.0, expected a string or null"),
    (("recipients", 0, "state"), ["pending"], "unknown recipient state ['pending']"),
    (("recipients",), {"a": 1}, "recipients is not a list"),
    (("recipients", 0), "a@example.org", "a recipient is not a JSON object"),
    (("version",), True, "unsupported envelope version True"),
    (("hold",), "x" * 1000, "hold is 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..., expected true or false"),
])
def test_mistypedFieldQuarantinedWithReason(spool, tmp_path, logged, path, value, reason):
    """
    Each field of a stored envelope is checked for its type and, for
    times, finiteness and range: a bad one is quarantined with a reason
    naming the field, in one log line, and the rest of the queue loads.
    """
    test_corruptEnvelopeQuarantined(spool, tmp_path, logged, _withField(path, value),
                                    f"quarantined: invalid envelope: {reason}", "trailer")


def test_envelopeWithoutBodyQuarantined(spool, tmp_path, logged):
    """The older layout: an envelope was committed beside its body, so one alone is damage."""
    good = makeEnvelope()
    store(spool, good)
    bad = makeEnvelope()
    storePair(spool, bad)
    os.unlink(tmp_path / "spool" / "queue" / (bad.queueId + ".eml"))

    assert spool.recover() == [good]
    assert listing(tmp_path / "spool")["quarantine"] == [bad.queueId + ".env"]
    assert f"{bad.queueId}: quarantined: message body is missing" in logged


def test_quarantineKeepsEarlierEntry(spool, tmp_path):
    """A second quarantine of the same id does not overwrite the first."""
    bad = makeEnvelope()
    queueDir = tmp_path / "spool" / "queue"
    for content in (b"first", b"second"):
        store(spool, bad)
        bad.attempts += 1
        spool.update(bad)
        (queueDir / (bad.queueId + ".upd")).write_bytes(content)
        assert spool.recover() == []
    quarantine = tmp_path / "spool" / "quarantine"
    assert sorted(os.listdir(quarantine)) == sorted(
        [bad.queueId + ".msg", bad.queueId + ".upd", bad.queueId + ".msg.1", bad.queueId + ".upd.1"]
    )
    assert (quarantine / (bad.queueId + ".upd")).read_bytes() == b"first"
    assert (quarantine / (bad.queueId + ".upd.1")).read_bytes() == b"second"


def test_foreignFilesLeftAlone(spool, tmp_path, logged):
    envelope = makeEnvelope()
    store(spool, envelope)
    queueDir = tmp_path / "spool" / "queue"
    (queueDir / "README").write_text("hands off")
    (queueDir / (envelope.queueId + ".env.bak")).write_text("old")
    (queueDir / "lowercaseid00000.env").write_text("{}")

    assert spool.recover() == [envelope]
    assert (queueDir / "README").read_text() == "hands off"
    assert (queueDir / (envelope.queueId + ".env.bak")).read_text() == "old"
    assert (queueDir / "lowercaseid00000.env").read_text() == "{}"
    assert spool.ids() == [envelope.queueId]
    warnings = [line for line in logged if "foreign file" in line]
    assert len(warnings) == 3
    assert any(line.endswith("README") for line in warnings)
    assert listing(tmp_path / "spool")["quarantine"] == []


def test_updateSeenByRecovery(spool, tmp_path):
    envelope = makeEnvelope()
    store(spool, envelope)
    envelope.recipients[0].state = Status.SENT
    envelope.recipients[0].dsn = "2.0.0"
    envelope.attempts = 1
    envelope.nextAttempt = 1_700_000_300.0
    spool.update(envelope)

    assert spool.load(envelope.queueId) == envelope
    recovered = Spool(str(tmp_path / "spool")).recover()
    assert recovered == [envelope]
    assert [r.state for r in recovered[0].recipients] == [Status.SENT, Status.DEFERRED]
    with spool.openBody(envelope.queueId) as f:
        assert f.read() == BODY
    assert listing(tmp_path / "spool")["tmp"] == []


def test_updateIsAtomic(spool, tmp_path, monkeypatch):
    """If the replacing rename fails, the previous envelope stays whole and no temp file remains."""
    envelope = makeEnvelope()
    store(spool, envelope)

    def failingReplace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", failingReplace)
    envelope.attempts = 5
    with pytest.raises(OSError) as info:
        spool.update(envelope)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()

    assert spool.load(envelope.queueId).attempts == 0
    assert listing(tmp_path / "spool")["tmp"] == []
    assert [e.attempts for e in Spool(str(tmp_path / "spool")).recover()] == [0]


def test_updateOfRemovedMessageRefused(spool, tmp_path):
    """An update racing a removal must not resurrect an envelope without a body."""
    envelope = makeEnvelope()
    store(spool, envelope)
    spool.remove(envelope.queueId)
    with pytest.raises(FileNotFoundError):
        spool.update(envelope)
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_remove(spool, tmp_path):
    kept = makeEnvelope()
    gone = makeEnvelope()
    store(spool, kept)
    store(spool, gone)
    spool.remove(gone.queueId)
    spool.remove(gone.queueId)  # already gone: fine
    assert spool.ids() == [kept.queueId]
    with pytest.raises(FileNotFoundError):
        spool.openBody(gone.queueId)
    assert Spool(str(tmp_path / "spool")).recover() == [kept]


@pytest.mark.parametrize("layout, updated, expected", [
    ("one file", False, [".msg"]),  # the common case: one unlink
    ("one file", True, [".msg", ".upd"]),
    ("pair", False, [".env", ".eml"]),
    ("pair", True, [".env", ".eml"]),
])
def test_removeDeletesTheCommitPointFirst(spool, tmp_path, monkeypatch, layout, updated, expected):
    envelope = makeEnvelope()
    (store if layout == "one file" else storePair)(spool, envelope)
    assert spool.recover() == [envelope]
    if updated:
        envelope.attempts = 1
        spool.update(envelope)
    unlinked = []
    realUnlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: (unlinked.append(os.path.basename(path)), realUnlink(path)))
    spool.remove(envelope.queueId)
    assert unlinked == [envelope.queueId + suffix for suffix in expected]
    monkeypatch.undo()
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_an_update_file_written_by_another_process_is_removed_too(spool, tmp_path):
    """The master removes what an intake worker updated: it learnt of the update file by loading it."""
    envelope = makeEnvelope()
    store(spool, envelope)
    envelope.attempts = 1
    spool.update(envelope)
    master = Spool(str(tmp_path / "spool"))
    assert master.load(envelope.queueId) == envelope
    master.remove(envelope.queueId)
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


@pytest.mark.parametrize("failing", ["fsync", "write"])
def test_commitOutOfSpace(spool, tmp_path, monkeypatch, failing):
    """A full disk at commit: ENOSPC reaches the caller (452 4.3.1) and nothing is left behind."""
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        # The write of the body with the envelope.
        monkeypatch.setattr(os, "write", full)
        monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError) as info:
        writer.commit(envelope)
    monkeypatch.undo()

    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}
    writer.abort()  # still harmless
    assert Spool(str(tmp_path / "spool")).recover() == []


def test_directoryFsyncFailureRemovesCommittedFiles(spool, tmp_path, monkeypatch):
    """Even the last step failing means no 250, so the message must not stay to be delivered."""
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)
    monkeypatch.setattr(queue.DirectorySync, "_fsync", lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as info:
        writer.commit(envelope)
    assert info.value.errno == errno.EIO
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_writeFailureReportedAtCommit(spool, tmp_path, monkeypatch):
    """
    A write error while the client is still sending is kept for commit,
    the moment the server can answer.
    """
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)

    def full(*args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    writer.write(BODY)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        writer.writeOut(writer.takeBuffered())
    writer.write(BODY)
    writer.writeOut(writer.takeBuffered())
    assert writer.size == 2 * len(BODY) and writer.buffered == 0
    with pytest.raises(OSError) as info:
        writer.commit(envelope)
    assert info.value.errno == errno.EDQUOT
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_commitWithWrongEnvelopeRefused(spool, tmp_path):
    writer = spool.begin(newQueueId())
    writer.write(BODY)
    with pytest.raises(ValueError):
        writer.commit(makeEnvelope())
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_writerClosedAfterCommit(spool):
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.commit(envelope)
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.commit(envelope)
    writer.abort()  # a committed message is not taken back by abort
    assert spool.ids() == [envelope.queueId]
    assert spool.bodySize(envelope.queueId) == 0


def test_idCollisionRefused(spool):
    """O_EXCL: a second writer for the same id, or an id already in the queue, is refused."""
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    with pytest.raises(FileExistsError):
        spool.begin(envelope.queueId)
    writer.write(BODY)
    writer.commit(envelope)
    with pytest.raises(FileExistsError):
        spool.begin(envelope.queueId)
    with spool.openBody(envelope.queueId) as f:
        assert f.read() == BODY


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "0123456789abcdef", "0123456789ABCDEF/"])
def test_badIdsRefused(spool, bad):
    for call in (spool.begin, spool.remove, spool.load, spool.openBody, spool.bodySize):
        with pytest.raises(ValueError):
            call(bad)


def test_commitFsyncsBodyEnvelopeAndDirectory(spool, tmp_path, monkeypatch):
    """
    Durable before 250: the message file (body and envelope, complete) is
    fsynced once, then the queue directory entry.
    """
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)

    synced = []
    realFsync = os.fsync

    def recordingFsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, os.path.getsize(target) if os.path.isfile(target) else None))
        realFsync(fd)

    monkeypatch.setattr(os, "fsync", recordingFsync)
    writer.commit(envelope)

    root = tmp_path / "spool"
    encoded = json.dumps(envelope.toJSON(), separators=(",", ":"))
    assert synced == [
        (str(root / "tmp" / (envelope.queueId + ".msg")), len(BODY) + len(encoded) + queue.TRAILER.size),
        (str(root / "queue"), None),
    ]


def test_queue_directory_is_opened_once_for_its_fsyncs_and_again_after_a_failed_one(
        spool, tmp_path, monkeypatch):
    queueDirectory = str(tmp_path / "spool" / "queue")
    real = {name: getattr(os, name) for name in ("open", "fsync")}
    opened, synced = [], []
    failNext = []

    def open_(path, flags, *args, **kwargs):
        if str(path) == queueDirectory:
            opened.append(path)
        return real["open"](path, flags, *args, **kwargs)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == queueDirectory:
            synced.append(fd)
            if failNext:
                failNext.pop()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real["fsync"](fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    for _ in range(3):
        store(spool, makeEnvelope())
    assert len(opened) == 1 and len(synced) == 3
    failNext.append(True)
    with pytest.raises(OSError):
        store(spool, makeEnvelope())
    store(spool, makeEnvelope())
    monkeypatch.undo()
    assert len(opened) == 2 and len(synced) == 5
    assert len(spool.ids()) == 4


def test_commit_writes_the_whole_file_fsyncs_it_once_and_names_it_only_then(spool, tmp_path, monkeypatch):
    """
    The envelope and trailer are written before the one fsync (no thread
    beside it), nothing is renamed into queue/ before it has ended, and
    queue/ is fsynced after the rename.
    """
    import threading

    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)
    events: list[tuple[str, str]] = []
    threads = set()
    real = {name: getattr(os, name) for name in ("write", "writev", "fsync", "rename")}

    def name(fd):
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def write(fd, data):
        events.append(("write", name(fd)))
        return real["write"](fd, data)

    def writev(fd, buffers):
        events.append(("write", name(fd)))
        return real["writev"](fd, buffers)

    def fsync(fd):
        threads.add(threading.get_ident())
        events.append(("fsync", name(fd)))
        real["fsync"](fd)
        events.append(("synced", name(fd)))

    def rename(source, target):
        events.append(("rename", os.path.basename(target)))
        real["rename"](source, target)

    for call, f in (("write", write), ("writev", writev), ("fsync", fsync), ("rename", rename)):
        monkeypatch.setattr(os, call, f)
    monkeypatch.setattr(queue.DirectorySync, "_fsync", lambda self: events.append(("fsync directory", os.path.basename(self.path))))
    writer.commit(envelope)
    monkeypatch.undo()

    msg = envelope.queueId + ".msg"
    # The body still in memory and the envelope with its trailer: one write.
    assert events == [("write", msg), ("fsync", msg), ("synced", msg),
                      ("rename", msg), ("fsync directory", "queue")]
    assert threads == {threading.get_ident()}
    assert [e.queueId for e in Spool(str(tmp_path / "spool")).recover()] == [envelope.queueId]


def test_a_failed_fsync_fails_the_commit_and_leaves_nothing(spool, tmp_path, monkeypatch):
    envelope = makeEnvelope()
    writer = spool.begin(envelope.queueId)
    writer.write(BODY)
    realFsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".msg"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        realFsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        writer.commit(envelope)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_updateDoesNotFsync(spool, monkeypatch):
    envelope = makeEnvelope()
    store(spool, envelope)
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    envelope.attempts = 1
    spool.update(envelope)
    assert calls == []
    assert spool.load(envelope.queueId).attempts == 1


def test_loadRejectsCorruptEnvelope(spool, tmp_path):
    envelope = makeEnvelope()
    store(spool, envelope)
    setStoredEnvelope(tmp_path / "spool" / "queue", envelope.queueId, b"{}", "update")
    with pytest.raises(ValueError):
        spool.load(envelope.queueId)


def test_second_writer_is_locked_out(tmp_path):
    first = Spool(str(tmp_path / "spool"))
    first.lock()
    second = Spool(str(tmp_path / "spool"))
    with pytest.raises(BlockingIOError):
        second.lock()


# Who may use the spool: an entry the daemon may not read, a root daemon on another user's spool


def test_an_unreadable_entry_is_an_error_with_the_fix_and_stays_queued(spool, tmp_path, logged, monkeypatch):
    good, unreadable = makeEnvelope(), makeEnvelope()
    store(spool, good)
    store(spool, unreadable)
    blocked = str(tmp_path / "spool" / "queue" / (unreadable.queueId + ".msg"))
    realOpen = os.open

    def openAsAnotherUser(path, *args, **kwargs):  # what 0600 root files give the relayd user
        if str(path) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return realOpen(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", openAsAnotherUser)
    assert spool.recover() == [good]
    assert spool.unreadable == [unreadable.queueId]
    assert spool.quarantined == []
    files = listing(tmp_path / "spool")
    assert files["quarantine"] == []
    assert unreadable.queueId + ".msg" in files["queue"]
    [line] = [l for l in logged if l.startswith(unreadable.queueId)]
    assert line.startswith(f"{unreadable.queueId}: error: cannot read {blocked}")
    assert "Permission denied" in line and f"chown -R " in line and str(tmp_path / "spool") in line


def test_an_unreadable_body_is_found_at_start_up_too(spool, tmp_path, logged, monkeypatch):
    """The older layout: the body is a file of its own, checked at recovery too."""
    entry = makeEnvelope()
    storePair(spool, entry)
    monkeypatch.setattr(spool, "openBody", lambda queueId: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", "the body")))
    assert spool.recover() == []
    assert spool.unreadable == [entry.queueId] and spool.quarantined == []


def test_a_root_daemon_refuses_a_spool_that_belongs_to_another_user(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    if os.geteuid() == 0:
        os.chown(directory, 65534, 65534)  # nobody
    owner = queue.userName(directory.stat().st_uid)
    problem = queue.ownershipProblem(str(directory), euid=0)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"{directory} belongs to {owner} and relayd runs as root")
    assert f"run relayd as {owner}" in problem and f"chown -R root: {directory}" in problem
    # Not root: the daemon's own files are its own; a missing directory is created by it.
    assert queue.ownershipProblem(str(directory), euid=directory.stat().st_uid or 1000) is None
    assert queue.ownershipProblem(str(tmp_path / "missing"), euid=0) is None


def test_a_root_daemon_may_use_roots_spool(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs a directory owned by root (CI runs as root)")
    assert queue.ownershipProblem(str(directory), euid=0) is None


# The quarantine, put back


@pytest.mark.parametrize("layout, envelopeFile, files", [
    ("one file", ".upd", [".msg", ".upd"]),
    ("pair", ".env", [".eml", ".env"]),
])
def test_a_repaired_quarantined_entry_is_restored_after_a_second_check(spool, tmp_path, layout, envelopeFile, files):
    entry = makeEnvelope()
    if layout == "one file":
        store(spool, entry)
        spool.update(entry)
    else:
        storePair(spool, entry)
    envelopePath = tmp_path / "spool" / "queue" / (entry.queueId + envelopeFile)
    good = envelopePath.read_bytes()
    envelopePath.write_bytes(b"{not json")
    assert spool.recover() == []
    assert spool.quarantinedIds() == [entry.queueId]

    with pytest.raises(ValueError, match="envelope is not JSON"):
        spool.restore(entry.queueId)
    assert spool.quarantineFiles(entry.queueId) == [entry.queueId + suffix for suffix in files]

    (tmp_path / "spool" / "quarantine" / (entry.queueId + envelopeFile)).write_bytes(good)
    assert spool.examineQuarantined(entry.queueId) == entry
    assert spool.restore(entry.queueId) == entry
    assert spool.quarantinedIds() == []
    assert sorted(os.listdir(tmp_path / "spool" / "queue")) == [entry.queueId + suffix for suffix in files]
    assert spool.load(entry.queueId) == entry
    assert spool.openBody(entry.queueId).read() == BODY
    with pytest.raises(FileNotFoundError):
        spool.restore(entry.queueId)
    spool.remove(entry.queueId)
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_a_quarantined_message_file_with_a_damaged_trailer_is_not_restored(spool, tmp_path):
    entry = makeEnvelope()
    store(spool, entry)
    path = tmp_path / "spool" / "queue" / (entry.queueId + ".msg")
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    assert spool.recover() == []
    with pytest.raises(ValueError, match="no trailer"):
        spool.restore(entry.queueId)
    (tmp_path / "spool" / "quarantine" / (entry.queueId + ".msg")).write_bytes(whole)
    assert spool.restore(entry.queueId) == entry
    assert spool.openBody(entry.queueId).read() == BODY


def test_restore_refuses_an_entry_without_body_or_an_id_in_the_queue(spool, tmp_path):
    entry = makeEnvelope()
    storePair(spool, entry)
    os.unlink(tmp_path / "spool" / "queue" / (entry.queueId + ".eml"))
    spool.recover()
    with pytest.raises(ValueError, match="message body is missing"):
        spool.restore(entry.queueId)

    for layout, suffixes in ((store, (".msg",)), (storePair, (".env", ".eml"))):
        twin = makeEnvelope()
        layout(spool, twin)
        quarantine = tmp_path / "spool" / "quarantine"
        for suffix in suffixes:
            (quarantine / (twin.queueId + suffix)).write_bytes(
                (tmp_path / "spool" / "queue" / (twin.queueId + suffix)).read_bytes())
        with pytest.raises(FileExistsError):
            spool.restore(twin.queueId)


def test_spool_written_before_the_status_enum_loads_and_is_written_back_alike(spool, tmp_path):
    """The spool keeps the first format's words for recipient states: pending, sent, failed."""
    stored = makeEnvelope().toJSON()
    stored["recipients"] = [
        {"address": "a@example.org", "params": {}, "state": "sent", "dsn": "2.0.0",
         "reply": "250 ok", "last_attempt": 1_700_000_100.0, "relay": "mx[192.0.2.1]:25"},
        {"address": "b@example.org", "params": {}, "state": "pending", "dsn": "4.0.0",
         "reply": "451 later", "last_attempt": 1_700_000_100.0, "relay": "mx[192.0.2.1]:25"},
        {"address": "c@example.org", "params": {}, "state": "failed", "dsn": "5.1.1",
         "reply": "550 no", "last_attempt": 1_700_000_100.0, "relay": "mx[192.0.2.1]:25"},
    ]
    stored["history"] = [{"time": 1_700_000_100.0, "recipient": "b@example.org",
                          "relay": "mx[192.0.2.1]:25", "dsn": "4.0.0", "status": "deferred",
                          "reply": "451 later"}]
    envelope = Envelope.fromJSON(json.loads(json.dumps(stored)))
    assert [r.state for r in envelope.recipients] == [Status.SENT, Status.DEFERRED, Status.BOUNCED]
    assert envelope.pending() == [envelope.recipients[1]]
    assert json.loads(json.dumps(envelope.toJSON())) == stored


# -- group commit and per-message order -----------------------------------------


def holdFirstDirectoryFsync(monkeypatch):
    """
    queue/'s fsyncs recorded ("start", "end") in a list; the first one
    waits, once it has started (``firstStarted``), until the test sets
    ``releaseFirst``. Returns (syncs, firstStarted, releaseFirst).
    """
    import threading

    syncs: list[str] = []
    firstStarted, releaseFirst = threading.Event(), threading.Event()

    def fsyncDirectory(path):
        syncs.append("start")
        if len(syncs) == 1:
            firstStarted.set()
            assert releaseFirst.wait(10)
        syncs.append("end")

    monkeypatch.setattr(queue.DirectorySync, "_fsync", lambda self: fsyncDirectory(self.path))
    return syncs, firstStarted, releaseFirst


def test_commits_waiting_during_a_directory_fsync_share_the_next_one(tmp_path, monkeypatch):
    """
    A commit never counts on an fsync of queue/ that started before its
    renames; those that arrive during one all wait for the next, which
    covers them together.
    """
    import threading

    syncs, firstStarted, releaseFirst = holdFirstDirectoryFsync(monkeypatch)
    directory = queue.DirectorySync(str(tmp_path))
    answered = []
    lateReturned = []

    def sync(name):
        directory.sync()
        answered.append((name, len(syncs)))

    def syncLater(name):
        directory.syncLater(lambda outcome: answered.append((name, len(syncs), outcome)))
        lateReturned.append(name)

    # The first runs the fsync (and the next one) in its thread.
    first = threading.Thread(target=syncLater, args=("first",))
    first.start()
    assert firstStarted.wait(10)
    later = [threading.Thread(target=syncLater, args=(f"later{i}",)) for i in range(2)]
    for t in later:
        t.start()
    for t in later:
        t.join(10)
    # A blocking caller waits in its thread for its fsync.
    blocking = threading.Thread(target=sync, args=("blocking",))
    blocking.start()
    deadline = time.monotonic() + 10
    while len(directory._next) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Nobody is answered on the fsync under way, and the late ones that do
    # not block did not wait for theirs: their threads are free.
    assert sorted(lateReturned) == ["later0", "later1"]
    assert answered == [] and syncs == ["start"] and blocking.is_alive()
    releaseFirst.set()
    for t in (first, blocking):
        t.join(10)
    # Two fsyncs for four commits; the three late ones only after the second
    # ended, answered together.
    assert syncs == ["start", "end", "start", "end"]
    assert answered[0] == ("first", 2, None)
    assert sorted(answered[1:]) == [("blocking", 4), ("later0", 4, None), ("later1", 4, None)]


def test_a_failed_directory_fsync_fails_every_commit_it_covers(tmp_path, monkeypatch):
    monkeypatch.setattr(queue.DirectorySync, "_fsync",
                        lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    directory = queue.DirectorySync(str(tmp_path))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            directory.sync()
        assert info.value.errno == errno.EIO
    outcomes = []
    directory.syncLater(outcomes.append)
    assert [o.errno for o in outcomes] == [errno.EIO]
    assert directory._next == [] and not directory._running  # nothing kept


def test_a_commit_waiting_for_the_directory_fsync_holds_no_spool_thread(spool, tmp_path, monkeypatch):
    """
    commitInLane: a commit whose files are in place frees its thread while
    it waits for the fsync of queue/ that covers it, and is answered, through
    the spool's ``deliver``, only once that fsync has ended; those that
    arrive during an fsync are answered together, in one ``deliver``.
    """
    import threading

    from twisted.internet import defer

    syncs, firstStarted, releaseFirst = holdFirstDirectoryFsync(monkeypatch)
    delivered = []
    spool.queueDirectorySync.deliver = lambda f, *args: (delivered.append(len(syncs)), f(*args))
    threadsHeld = []  # one entry per call running in a thread

    def callInThread(f, *args):
        def run():
            threadsHeld.append(f)
            try:
                f(*args)
            finally:
                threadsHeld.remove(f)

        threading.Thread(target=run).start()

    lanes = queue.MessageLanes()
    writers = [spool.receive(newQueueId()) for _ in range(4)]
    for writer in writers:
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
    answered = []
    first = queue.commitInLane(lanes, writers[0], makeEnvelope(writers[0].queueId), callInThread)
    first.addCallback(lambda _: answered.append(("first", len(syncs))))
    assert firstStarted.wait(10)
    for i, writer in enumerate(writers[1:]):
        queue.commitInLane(lanes, writer, makeEnvelope(writer.queueId), callInThread).addCallback(
            lambda _, i=i: answered.append((f"later{i}", len(syncs))))
    deadline = time.monotonic() + 10
    while len(spool.queueDirectorySync._next) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    while len(threadsHeld) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Only the thread running the fsync is held; nobody is answered yet,
    # and each message's lane stays busy until its commit is.
    assert len(threadsHeld) == 1 and answered == [] and len(spool.queueDirectorySync._next) == 3
    assert all(lanes.busy(w.queueId) for w in writers)
    releaseFirst.set()
    while len(answered) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answered[0] == ("first", 2)
    assert sorted(answered[1:]) == [("later0", 4), ("later1", 4), ("later2", 4)]
    assert delivered == [2, 4]  # one hand-over per fsync of queue/
    assert not any(lanes.busy(w.queueId) for w in writers)
    assert sorted(spool.ids()) == sorted(w.queueId for w in writers)


def test_a_failed_directory_fsync_in_a_lane_removes_the_message(spool, monkeypatch):
    monkeypatch.setattr(queue.DirectorySync, "_fsync",
                        lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    writer = spool.receive(newQueueId())
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    failures = []
    queue.commitInLane(queue.MessageLanes(), writer, makeEnvelope(writer.queueId)).addErrback(failures.append)
    assert [f.value.errno for f in failures] == [errno.EIO]
    assert spool.ids() == [] and os.listdir(os.path.join(spool.directory, queue.QUEUE)) == []


def test_a_failed_write_in_a_lane_fails_the_commit_and_leaves_nothing(spool, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    writer = spool.receive(newQueueId())
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    lanes = queue.MessageLanes()
    failures = []
    queue.commitInLane(lanes, writer, makeEnvelope(writer.queueId)).addErrback(failures.append)
    monkeypatch.undo()
    assert [f.value.errno for f in failures] == [errno.ENOSPC]
    assert not lanes.busy(writer.queueId)
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


def test_message_lanes_run_one_call_at_a_time_per_message_in_order():
    from twisted.internet import defer

    jobs = []

    def runInThread(f, *args):
        d = defer.Deferred()
        jobs.append((f, args, d))
        return d

    def run(index=0):
        f, args, d = jobs.pop(index)
        d.callback(f(*args))

    lanes = queue.MessageLanes(runInThread)
    done = []
    a1 = lanes.run("A", done.append, "a1")
    a2 = lanes.run("A", done.append, "a2")
    b1 = lanes.run("B", done.append, "b1")
    # a2 waits for a1; b1, another message, does not.
    assert [args for _, args, _ in jobs] == [("a1",), ("b1",)]
    run(1)
    assert done == ["b1"] and b1.called and not lanes.busy("B")
    run(0)
    assert done == ["b1", "a1"] and a1.called and not a2.called
    assert [args for _, args, _ in jobs] == [("a2",)]
    run(0)
    assert done == ["b1", "a1", "a2"] and a2.called and not lanes.busy("A")


def test_a_failing_call_does_not_stop_its_lane():
    lanes = queue.MessageLanes()
    failures = []
    lanes.run("A", lambda: 1 / 0).addErrback(failures.append)
    assert lanes.run("A", lambda: "next").result == "next"
    assert failures[0].check(ZeroDivisionError)


def test_a_body_committed_in_one_piece_is_kept_for_the_first_delivery(spool):
    small = makeEnvelope()
    writer = spool.begin(small.queueId)
    writer.write(BODY[:10])
    writer.write(BODY[10:])
    writer.commit(small)
    assert writer.body == BODY
    pieces = makeEnvelope()
    writer = spool.begin(pieces.queueId)
    writer.write(BODY)
    writer.writeOut(writer.takeBuffered())
    writer.write(BODY)
    writer.commit(pieces)
    assert writer.body is None  # part of it is only on disk
    with spool.openBody(pieces.queueId) as f:
        assert f.read() == BODY + BODY

# An envelope exactly as the first format (version 1, before DSN) wrote it.
FORMAT_1_ENVELOPE = (
    '{"version": 1, "queue_id": "0000000000000001", "sender": "alice@example.com", '
    '"mail_params": {"BODY": "8BITMIME"}, "recipients": [{"address": "a@example.org", '
    '"params": {}, "state": "sent", "dsn": "2.0.0", "reply": "250 ok", "last_attempt": '
    '1700000100.0, "relay": "mx[192.0.2.1]:25"}, {"address": "b@example.org", "params": {}, '
    '"state": "pending", "dsn": null, "reply": null, "last_attempt": null, "relay": null}], '
    '"arrival": 1700000000.0, "size": 42, "client_address": "192.0.2.9", "client_name": '
    '"laptop.example", "helo": "laptop", "auth_identity": "alice", "attempts": 1, '
    '"next_attempt": 1700000300.0, "last_error": "451 later", "hold": false, "warned": true, '
    '"notice": null, "history": [{"time": 1700000100.0, "recipient": "a@example.org", '
    '"relay": "mx[192.0.2.1]:25", "dsn": "2.0.0", "status": "sent", "reply": "250 ok"}]}'
)


def test_a_format_1_spool_still_loads_without_dsn_requests(spool, tmp_path):
    """A spool written before DSN recovers: no RET, ENVID, NOTIFY or ORCPT; rewritten in the current format."""
    queueDir = tmp_path / "spool" / "queue"
    (queueDir / "0000000000000001.eml").write_bytes(b"Subject: old\r\n\r\nbody\r\n")
    (queueDir / "0000000000000001.env").write_text(FORMAT_1_ENVELOPE)
    [envelope] = spool.recover()
    assert (envelope.queueId, envelope.sender, envelope.attempts, envelope.warned) == (
        "0000000000000001", "alice@example.com", 1, True)
    assert [r.state for r in envelope.recipients] == [Status.SENT, Status.DEFERRED]
    assert (envelope.ret, envelope.envid) == (None, None)
    assert [(r.notify, r.orcpt) for r in envelope.recipients] == [(None, None), (None, None)]
    spool.update(envelope)
    rewritten = json.loads((queueDir / "0000000000000001.env").read_text())
    assert rewritten == {**json.loads(FORMAT_1_ENVELOPE), "version": FORMAT_VERSION}


def test_dsn_requests_survive_the_spool(spool):
    envelope = makeEnvelope()
    envelope.ret, envelope.envid = "HDRS", "QQ+2B314"
    envelope.recipients[0].notify = ("SUCCESS", "DELAY")
    envelope.recipients[0].orcpt = "rfc822;a+2Bb@example.org"
    envelope.recipients[1].notify = ("NEVER",)
    store(spool, envelope)
    assert spool.load(envelope.queueId) == envelope
    assert spool.recover() == [envelope]


@pytest.mark.parametrize("path, value, reason", [
    (("version",), 99, "unsupported envelope version 99"),
    (("version",), 1.0, "unsupported envelope version 1.0"),
    (("ret",), "ALL", "ret is 'ALL', expected FULL, HDRS or null"),
    (("envid",), 7, "envid is 7, expected a string or null"),
    (("dkim",), 5, "dkim is 5, expected ASCII header fields or null"),
    (("recipients", 0, "notify"), "NEVER", "notify is 'NEVER', expected a list of NEVER"),
    (("recipients", 0, "notify"), [], "notify is [], expected a list of NEVER"),
    (("recipients", 0, "notify"), ["SOMETIMES"], "notify is ['SOMETIMES'], expected a list of NEVER"),
    (("recipients", 0, "orcpt"), ["rfc822;a@b"], "orcpt is ['rfc822;a@b'], expected a string or null"),
])
def test_mistyped_dsn_field_quarantined_with_reason(spool, tmp_path, logged, path, value, reason):
    test_corruptEnvelopeQuarantined(spool, tmp_path, logged, _withField(path, value),
                                    f"quarantined: invalid envelope: {reason}", "trailer")


# -- short calls batched into thread jobs


class HeldJobs:
    """A runInThread whose jobs wait until the test ends them, in order."""

    def __init__(self):
        from twisted.internet import defer
        self.defer = defer
        self.jobs = []

    def __call__(self, f, *args):
        d = self.defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def finishFirst(self):
        f, args, d = self.jobs.pop(0)
        d.callback(f(*args))


def test_calls_asked_for_while_a_job_runs_go_together_in_the_next_job():
    held = HeldJobs()
    batches = queue.ThreadBatches(held, jobs=1)
    ran, answers = [], []
    first = batches.run(ran.append, "a")
    assert len(held.jobs) == 1  # a lone call starts at once
    rest = [batches.run(ran.append, name) for name in "bcd"]
    assert len(held.jobs) == 1  # the others wait for it
    held.finishFirst()
    first.addCallback(answers.append)
    assert ran == ["a"] and len(held.jobs) == 1  # then all three in one job
    held.finishFirst()
    assert ran == ["a", "b", "c", "d"] and held.jobs == []
    for d in rest:
        d.addCallback(answers.append)
    assert answers == [None] * 4


def test_a_call_that_fails_in_a_batch_leaves_the_others_alone():
    held = HeldJobs()
    batches = queue.ThreadBatches(held, jobs=1)
    batches.run(lambda: None)
    outcomes = []

    def broken():
        raise OSError(errno.EROFS, "Read-only file system")

    for d in (batches.run(lambda: "one"), batches.run(broken), batches.run(lambda: "three")):
        d.addCallbacks(outcomes.append, lambda f: outcomes.append(f.value.strerror))
    held.finishFirst()
    held.finishFirst()
    assert outcomes == ["one", "Read-only file system", "three"]


def test_batches_run_side_by_side_up_to_their_jobs():
    held = HeldJobs()
    batches = queue.ThreadBatches(held, jobs=2)
    for name in "abcde":
        batches.run(lambda: name)
    assert len(held.jobs) == 2
    held.finishFirst()
    assert len(held.jobs) == 2
    _, (calls,), _ = held.jobs[-1]
    assert len(calls) == 3  # c, d and e in one job


def test_removing_the_envelope_takes_the_message_out_and_leaves_the_body_to_recovery(tmp_path):
    """The older layout: its envelope is the commit point, the body goes afterwards (or at recovery)."""
    spool = Spool(str(tmp_path))
    spool.recover()
    queueId = newQueueId()
    storePair(spool, Envelope(queueId=queueId, sender="a@example.com",
                              recipients=[Recipient("b@example.org")], arrival=time.time(), size=20))
    assert spool.removeEnvelope(queueId) is True
    assert spool.ids() == []
    assert (tmp_path / "queue" / (queueId + queue.BODY_SUFFIX)).exists()
    assert spool.recover() == []
    assert not (tmp_path / "queue" / (queueId + queue.BODY_SUFFIX)).exists()
    spool.removeBody(queueId)  # already gone: nothing to do


# -- one file per message, and the older two-file layout beside it


def test_an_update_file_supersedes_the_trailer_which_stays_as_committed(spool, tmp_path):
    envelope = makeEnvelope()
    store(spool, envelope)
    path = tmp_path / "spool" / "queue" / (envelope.queueId + ".msg")
    committed = path.read_bytes()
    envelope.attempts, envelope.lastError = 1, "451 4.3.0 later"
    spool.update(envelope)
    assert path.read_bytes() == committed  # never rewritten: the body is not copied again
    assert (path.parent / (envelope.queueId + ".upd")).read_bytes() == queue.encodeEnvelope(envelope)
    assert spool.load(envelope.queueId).attempts == 1
    assert Spool(str(tmp_path / "spool")).load(envelope.queueId) == envelope
    assert Spool(str(tmp_path / "spool")).recover() == [envelope]
    envelope.attempts = 2
    spool.update(envelope)
    assert Spool(str(tmp_path / "spool")).recover()[0].attempts == 2


def test_the_body_reader_stops_where_the_envelope_begins(spool, tmp_path):
    body = b"Subject: x\r\n\r\n" + b"0123456789\r\n" * 1000
    envelope = makeEnvelope()
    store(spool, envelope, body)
    path = tmp_path / "spool" / "queue" / (envelope.queueId + ".msg")
    assert path.stat().st_size > len(body)
    assert spool.bodySize(envelope.queueId) == len(body)
    with spool.openBody(envelope.queueId) as f:
        pieces = []
        while True:
            piece = f.read(777)
            if not piece:
                break
            pieces.append(piece)
        assert b"".join(pieces) == body
        assert f.read() == b"" and f.read(10) == b""
    with spool.openBody(envelope.queueId) as f:
        assert f.readline() == b"Subject: x\r\n"
        assert f.read() == body[len(b"Subject: x\r\n"):]
    buffer = bytearray(len(body) + 100)
    with spool.openBody(envelope.queueId) as f:
        assert f.readinto(buffer) == len(body)
    with spool.openBody(envelope.queueId) as f:
        assert list(f)[-1] == b"0123456789\r\n"
    # What a delivery reads, a notice returns and relayctl shows: the body alone.
    from relayd import bounce
    assert bounce.readOriginal(lambda: spool.openBody(envelope.queueId), 10 ** 6) == (body, True)


def test_an_empty_body_reads_as_empty(spool):
    envelope = makeEnvelope()
    store(spool, envelope, b"")
    assert spool.bodySize(envelope.queueId) == 0
    with spool.openBody(envelope.queueId) as f:
        assert f.read() == b""
    assert spool.recover() == [envelope]


@pytest.mark.parametrize("damage, reason", [
    (lambda content: content[:-1], "no trailer"),
    (lambda content: content[:100], "no trailer"),
    (lambda content: b"", "truncated (0 bytes, no trailer)"),
    (lambda content: content[:1000] + content[-queue.TRAILER.size:], "truncated or damaged: its trailer describes"),
    (lambda content: content[:-queue.TRAILER.size - 3] + b"XYZ" + content[-queue.TRAILER.size:],
     "envelope is damaged (checksum mismatch)"),
    (lambda content: content[:-queue.TRAILER.size] + queue.TRAILER.pack(
        b"relayd\x00\x09", *queue.TRAILER.unpack(content[-queue.TRAILER.size:])[1:]),
     "format version 9, this relayd reads 1"),
])
def test_a_message_file_with_a_damaged_trailer_is_quarantined(spool, tmp_path, logged, damage, reason):
    good, bad = makeEnvelope(), makeEnvelope()
    store(spool, good)
    store(spool, bad)
    bad.attempts = 1
    spool.update(bad)  # a good update file does not save a damaged message file
    path = tmp_path / "spool" / "queue" / (bad.queueId + ".msg")
    path.write_bytes(damage(path.read_bytes()))

    assert Spool(str(tmp_path / "spool")).recover() == [good]
    assert listing(tmp_path / "spool")["quarantine"] == [bad.queueId + ".msg", bad.queueId + ".upd"]
    [line] = [line for line in logged if line.startswith(f"{bad.queueId}: quarantined: ")]
    assert reason in line
    assert spool.quarantineFiles(bad.queueId) == [bad.queueId + ".msg", bad.queueId + ".upd"]


def test_a_mixed_spool_is_recovered_updated_read_and_removed(tmp_path):
    """
    A spool an older relayd left (``.eml`` + ``.env``) beside new messages:
    everything comes back, each is updated and read in its own layout, and
    removal leaves nothing.
    """
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    old, new = makeEnvelope(arrival=1_000.0), makeEnvelope(arrival=2_000.0)
    storePair(spool, old, b"Subject: old\r\n\r\nold body\r\n")
    store(spool, new, b"Subject: new\r\n\r\nnew body\r\n")

    daemon = Spool(str(tmp_path / "spool"))
    assert daemon.recover() == [old, new]
    assert daemon.ids() == sorted([old.queueId, new.queueId])
    for envelope in (old, new):
        envelope.attempts = 3
        daemon.update(envelope)
    queueDir = tmp_path / "spool" / "queue"
    assert sorted(os.listdir(queueDir)) == sorted(
        [old.queueId + ".eml", old.queueId + ".env", new.queueId + ".msg", new.queueId + ".upd"])
    assert [e.attempts for e in Spool(str(tmp_path / "spool")).recover()] == [3, 3]
    with daemon.openBody(old.queueId) as f:
        assert f.read() == b"Subject: old\r\n\r\nold body\r\n"
    with daemon.openBody(new.queueId) as f:
        assert f.read() == b"Subject: new\r\n\r\nnew body\r\n"
    assert daemon.bodySize(old.queueId) == len(b"Subject: old\r\n\r\nold body\r\n")

    assert daemon.removeEnvelope(old.queueId) is True  # its body is left for removeBody
    assert daemon.removeEnvelope(new.queueId) is False  # gone whole
    assert sorted(os.listdir(queueDir)) == [old.queueId + ".eml"]
    daemon.removeBody(old.queueId)
    assert os.listdir(queueDir) == []


def test_a_message_file_beside_an_older_envelope_of_the_same_id_is_quarantined(spool, tmp_path, logged):
    twin = makeEnvelope()
    store(spool, twin)
    (tmp_path / "spool" / "queue" / (twin.queueId + ".env")).write_bytes(queue.encodeEnvelope(twin))
    assert spool.recover() == []
    assert listing(tmp_path / "spool")["quarantine"] == [twin.queueId + ".env", twin.queueId + ".msg"]
    assert any("both a message file and an older envelope" in line for line in logged)


def test_a_writer_refuses_an_id_queued_in_either_layout(spool, tmp_path):
    for layout in (store, storePair):
        envelope = makeEnvelope()
        layout(spool, envelope)
        assert [e.queueId for e in spool.recover()][-1] == envelope.queueId  # as a daemon starts
        with pytest.raises(FileExistsError):
            spool.begin(envelope.queueId)
        writer = spool.receive(envelope.queueId)  # the file made lazily: refused at the commit
        writer.write(b"x")
        with pytest.raises(FileExistsError):
            writer.commit(envelope)
        assert listing(tmp_path / "spool")["tmp"] == []
        assert spool.openBody(envelope.queueId).read() == BODY


def test_a_commit_looks_for_the_older_layout_only_while_the_spool_may_hold_it(tmp_path, monkeypatch):
    """
    Nothing writes ``.eml`` files any more: once recovery has found none,
    a commit no longer checks that its id is free in that layout; a spool
    with older messages, or one that got one back from quarantine, still does.
    """
    looked: list[str] = []
    realLexists = os.path.lexists

    def lexists(path):
        looked.append(os.path.basename(path))
        return realLexists(path)

    def commitLooksFor() -> list[str]:
        envelope = makeEnvelope()
        looked.clear()
        monkeypatch.setattr(os.path, "lexists", lexists)
        try:
            store(spool, envelope)
        finally:
            monkeypatch.undo()
        return sorted(name.rpartition(".")[2] for name in looked)

    spool = Spool(str(tmp_path / "spool"))
    assert commitLooksFor() == ["eml", "msg"]  # not recovered yet: anything may be there
    assert len(spool.recover()) == 1
    assert commitLooksFor() == ["msg"]

    older = makeEnvelope()
    storePair(spool, older)
    assert len(Spool(str(tmp_path / "spool")).recover()) == 3
    withPairs = Spool(str(tmp_path / "spool"))
    assert len(withPairs.recover()) == 3
    spool = withPairs
    assert commitLooksFor() == ["eml", "msg"]

    # An older message put back from quarantine brings the check back.
    damaged = tmp_path / "spool" / "queue" / (older.queueId + ".env")
    good = damaged.read_bytes()
    damaged.write_bytes(b"{not json")
    spool = Spool(str(tmp_path / "spool"))
    assert len(spool.recover()) == 3
    assert commitLooksFor() == ["msg"]
    (tmp_path / "spool" / "quarantine" / (older.queueId + ".env")).write_bytes(good)
    spool.restore(older.queueId)
    assert commitLooksFor() == ["eml", "msg"]


def test_an_update_between_an_older_messages_two_removals_is_refused(spool, tmp_path):
    """Its envelope is gone, its body not yet: the update must not bring the envelope back."""
    envelope = makeEnvelope()
    storePair(spool, envelope)
    assert spool.recover() == [envelope]
    assert spool.removeEnvelope(envelope.queueId) is True
    with pytest.raises(FileNotFoundError):
        spool.update(envelope)
    spool.removeBody(envelope.queueId)
    assert listing(tmp_path / "spool") == {"tmp": [], "queue": [], "quarantine": []}


@pytest.mark.parametrize("layout, expected", [
    ("one file", [".upd", ".msg"]),
    ("pair", [".eml", ".env"]),
])
def test_quarantine_moves_the_commit_point_last(spool, tmp_path, monkeypatch, layout, expected):
    envelope = makeEnvelope()
    if layout == "one file":
        store(spool, envelope)
        spool.update(envelope)
        setStoredEnvelope(tmp_path / "spool" / "queue", envelope.queueId, b"{", "update")
    else:
        storePair(spool, envelope)
        setStoredEnvelope(tmp_path / "spool" / "queue", envelope.queueId, b"{", "pair")
    moved = []
    realRename = os.rename
    monkeypatch.setattr(os, "rename", lambda source, target: (
        moved.append(os.path.basename(source)), realRename(source, target)))
    assert spool.recover() == []
    assert moved == [envelope.queueId + suffix for suffix in expected]
