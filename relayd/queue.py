"""
The durable spool: every accepted message lives here until it leaves the queue.

Layout under the spool directory (all directories 0700, all files 0600)::

    tmp/                 messages and updates being written; emptied at start-up
    queue/<id>.msg       a message: the canonical CRLF body, then its envelope
                         as compact JSON (Envelope.toJSON()), then a trailer
                         of fixed size (TRAILER: tag and format version, the
                         body's and the envelope's length, the envelope's
                         CRC-32), so a reader finds the envelope from the end;
                         never changed once committed
    queue/<id>.upd       the envelope as updated after the commit (JSON),
                         superseding the one in the message file
    queue/<id>.eml       the older layout (before one file per message): the
    queue/<id>.env       body, and the envelope; still recovered, delivered,
                         updated and removed, never written for a new message
    quarantine/          committed entries that could not be read back
                         (``restore`` puts one back after a re-check)

Files are created by the daemon's user, readable by it alone: the spool
must always be used by the same user. A root daemon refuses a spool that
belongs to someone else (``ownershipProblem``), and an entry the daemon is
not allowed to read is an error naming the fix, left where it is, never
quarantined: it is intact, only its owner is wrong.

One file per message, because creating and unlinking a directory entry is
most of what a message costs the file system: a commit is one file, one
fsync and one rename, a delivered message one unlink. The envelope changes
after delivery attempts while the body never does, so an update goes to an
update file beside the message (a few hundred bytes, an atomic rename)
instead of rewriting the message, and a lost update can only repeat a
delivery, never damage the body (bench/spool_format.py measures the
layouts).

A message file's presence in ``queue/`` is the commit point. A commit is
durable before it returns, so the server may answer 250 afterwards: the
body is written to ``tmp/<id>.msg`` as it arrives, the commit appends the
envelope and the trailer, fsyncs the file, renames it into ``queue/``, then
the directory is fsynced. Updates are atomic renames without fsync: a crash
may bring back an older state and repeat a delivery, but never loses a
message. A removal unlinks the message file first (the message is gone),
then its update file if it has one; recovery deletes an update file without
its message as routine. In the older layout the envelope was the commit
point: an ``.env`` without its ``.eml`` is damage and quarantined, an
``.eml`` without its ``.env`` an unfinished write, deleted.

Commits that are ready at the same moment share one directory fsync
(``DirectorySync``, group commit): each is still answered only after an
fsync of the directory that started after its own renames. The daemon's
commits (``commitInLane``) do not hold a thread while they wait for it.

Everything here is synchronous and blocking; the caller decides which thread
runs it. relayd runs whatever touches the file system (begin, writing the
body out, commit, abort, update, remove) in the spool's threads, one call
at a time per message (``MessageLanes``); ``SpoolWriter.write`` only fills
a buffer in memory and runs on the reactor thread. Filesystem failures
surface as plain ``OSError`` so the server can map ENOSPC/EDQUOT to 452 and
anything else to 451; a malformed queue id is a ``ValueError``.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pwd
import secrets
import struct
import threading
import weakref
import zlib
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet import defer
from twisted.python.failure import Failure

from relayd import maillog
from relayd.envelope import Envelope, isQueueId

# A message: the body, its envelope and a trailer in one file (the layout
# since 2026; see the module docstring).
MESSAGE_SUFFIX = ".msg"
# A message's envelope as updated after its commit; supersedes the trailer's.
UPDATE_SUFFIX = ".upd"
# The older layout, still read, delivered and removed: body and envelope
# in two files.
BODY_SUFFIX = ".eml"
ENVELOPE_SUFFIX = ".env"

# The last bytes of a message file: a tag (name and format version), the
# body's length, the envelope's length and the envelope's CRC-32.
TRAILER = struct.Struct(">8sQII")
TRAILER_TAG = b"relayd\x00\x01"

TMP = "tmp"
QUEUE = "queue"
QUARANTINE = "quarantine"

# The daemon's spool threads: calls that may wait for the disk at once.
# With 4, commits at 200 msg/s on a busy machine queued for a free thread
# longer than they took to run.
SPOOL_THREADS = 8

_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _checkId(queueId: str) -> str:
    # Also what keeps a queue id from naming a path outside the spool.
    if not isinstance(queueId, str) or not isQueueId(queueId):
        raise ValueError(f"not a queue id: {maillog.printable(queueId)!r}")
    return queueId


def encodeEnvelope(envelope: Envelope) -> bytes:
    """The envelope file's content; cheap, so callers may take it on the reactor thread."""
    return json.dumps(envelope.toJSON(), separators=(",", ":")).encode("ascii")


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _writeAllOf(fd: int, parts: list[bytes]) -> None:
    """``_writeAll`` of the parts one after the other, in one system call when the kernel takes them all."""
    written = os.writev(fd, parts)
    if written < sum(map(len, parts)):
        _writeAll(fd, b"".join(parts)[written:])


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, _DIRECTORY_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """
    Group commit: every request is answered once an fsync of ``path`` that
    started after it has ended, with that fsync's outcome (None, or the
    exception it raised). One fsync runs at a time; the requests that
    arrive meanwhile are all covered by the next one.

    ``syncLater(done)`` does not wait for that: when an fsync is under way
    it only adds ``done`` to the next one's list and returns, so the thread
    is free at once; otherwise the calling thread runs the fsync itself,
    and then the next ones for as long as requests keep arriving during
    them. Every ``done`` one fsync covers is called together through
    ``deliver`` (``reactor.callFromThread`` in the daemon: one wake-up of
    the reactor for the whole group, and no thread parked waiting for it).
    ``sync()`` is the blocking form, for callers that hold their thread
    anyway. Only the thread running the fsyncs uses the directory's
    descriptor, which stays open (``_fsync``).
    """

    def __init__(self, path: str, deliver: Callable[..., object] | None = None) -> None:
        self.path = path
        # Runs the answers of the requests made through ``syncLater``.
        self.deliver = deliver or _callNow
        self._lock = threading.Lock()
        self._running = False
        # (done, delivered) of the requests made since the running fsync started.
        self._next: list[tuple[Callable[[BaseException | None], object], bool]] = []
        # The directory's descriptor, opened by the first fsync (``_fsync``).
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None

    def sync(self) -> None:
        finished = threading.Event()
        outcomes: list[BaseException | None] = []

        def done(outcome: BaseException | None) -> None:
            outcomes.append(outcome)
            finished.set()

        self._request(done, delivered=False)
        finished.wait()
        if outcomes[0] is not None:
            raise outcomes[0]

    def syncLater(self, done: Callable[[BaseException | None], object]) -> None:
        self._request(done, delivered=True)

    def _request(self, done, delivered: bool) -> None:
        with self._lock:
            self._next.append((done, delivered))
            if self._running:
                return  # the thread running the current fsync runs the next
            # This thread runs the fsyncs until nobody waits: a blocking
            # caller returns, and commitInLane's thread is free, only then;
            # both are answered right after their own fsync.
            self._running = True
        try:
            while True:
                with self._lock:
                    # Taken before the fsync starts: it covers exactly these.
                    covered, self._next = self._next, []
                    if not covered:
                        self._running = False
                        return
                try:
                    self._fsync()
                    outcome = None
                except Exception as e:
                    outcome = e
                self._answer(covered, outcome)
        except BaseException:
            with self._lock:
                self._running = False  # the next request runs what is left
            raise

    def _fsync(self) -> None:
        """
        One fsync of the directory. Its descriptor stays open from the
        first on: an open and a close fewer per fsync, each a wait for the
        GIL in a busy daemon. After a failure the next fsync opens it anew.
        """
        if self._fd is None:
            fd = os.open(self.path, _DIRECTORY_FLAGS)
            self._closer = weakref.finalize(self, os.close, fd)
            self._fd = fd
        try:
            os.fsync(self._fd)
        except BaseException:
            self._fd = None
            try:
                self._closer()
            except OSError:
                pass  # the fsync's error is the one to report
            raise

    def _answer(self, covered, outcome: BaseException | None) -> None:
        delivered = []
        for done, viaDeliver in covered:
            if viaDeliver:
                delivered.append(done)
            else:
                done(_ownCopy(outcome))
        if delivered:
            self.deliver(_answerAll, delivered, outcome)


def _ownCopy(outcome: BaseException | None) -> BaseException | None:
    # Each caller its own exception (tracebacks).
    if isinstance(outcome, OSError):
        return OSError(outcome.errno, outcome.strerror, outcome.filename)
    return outcome


def _answerAll(callbacks, outcome: BaseException | None) -> None:
    for done in callbacks:
        done(_ownCopy(outcome))


class MessageLanes:
    """
    One lane per message: ``run(queueId, f, *args)`` runs the blocking call
    ``f(*args)`` through ``runInThread`` after every call queued for the
    same message before it has ended, and returns its Deferred. Different
    messages run side by side. Keeps a body's writes, its commit or abort,
    and its envelope's later updates and removal in the order they were
    asked for, although each runs in whichever spool thread is free.
    """

    def __init__(self, runInThread: Callable[..., defer.Deferred] | None = None) -> None:
        self._runInThread = runInThread or defer.maybeDeferred
        # queue id -> fires when the last call queued for it has ended.
        self._tails: dict[str, defer.Deferred] = {}

    def run(self, queueId: str, f: Callable, *args) -> defer.Deferred:
        return self.runStep(queueId, lambda: self._runInThread(f, *args))

    def runStep(self, queueId: str, start: Callable[[], defer.Deferred]) -> defer.Deferred:
        """
        ``run`` for a step that starts its own work: ``start()`` is called
        once the lane is free and returns a Deferred that fires when the
        step has ended; the lane stays busy until then.
        """
        previous = self._tails.get(queueId)
        ended: defer.Deferred = defer.Deferred()
        self._tails[queueId] = ended

        def release(outcome):
            if self._tails.get(queueId) is ended:
                del self._tails[queueId]
            ended.callback(None)
            return outcome

        if previous is None:
            d = defer.maybeDeferred(start)
        else:
            d = defer.Deferred()
            previous.addCallback(lambda _: defer.maybeDeferred(start).chainDeferred(d))
        return d.addBoth(release)

    def busy(self, queueId: str) -> bool:
        """Whether calls for ``queueId`` are queued or running."""
        return queueId in self._tails


def commitInLane(lanes: MessageLanes, writer: SpoolWriter, envelope: Envelope,
                 callInThread: Callable[..., object] | None = None) -> defer.Deferred:
    """
    ``writer.commit(envelope)`` as a step of the message's lane, its files
    written in a spool thread (``callInThread``; default: at once, in the
    calling thread). The thread is not held while the commit waits for
    its fsync of queue/ (``DirectorySync.syncLater``), and the outcome
    comes back through the spool's ``deliver`` alone: one hand-over for
    every commit that fsync covers. The Deferred fires once the message is
    committed; on failure nothing of it is left and it fails with the
    error. The lane is busy until then.
    """
    directory = writer._spool.queueDirectorySync

    def start() -> defer.Deferred:
        finished: defer.Deferred = defer.Deferred()

        def synced(outcome: BaseException | None) -> None:
            if outcome is None:
                writer.committed()
                finished.callback(None)
                return
            # The files named in queue/ go (in a thread: unlink waits for the
            # disk too) before anything else of this message's lane.
            lanes.run(writer.queueId, writer.abort).addErrback(
                lambda f: maillog.queueWarning(
                    writer.queueId, f"cannot remove an uncommitted message: {f.value}"))
            finished.errback(outcome)

        def place() -> None:
            try:
                writer.place(envelope)
            except BaseException:
                directory.deliver(finished.errback, Failure())
                return
            directory.syncLater(synced)

        (callInThread or _callNow)(place)
        return finished

    return lanes.runStep(writer.queueId, start)


def _callNow(f: Callable, *args) -> None:
    f(*args)


def _parseEnvelope(queueId: str, raw: bytes) -> Envelope:
    """
    Parse a stored envelope named ``queueId``; any way it can be wrong is a
    ValueError whose message says why (it becomes the quarantine reason).
    """
    try:
        envelope = Envelope.fromJSON(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        if isinstance(e, KeyError):
            raise ValueError(f"envelope lacks {e.args[0]!r}") from None
        if isinstance(e, json.JSONDecodeError):
            raise ValueError(f"envelope is not JSON ({e.msg} at byte {e.pos})") from None
        if isinstance(e, UnicodeDecodeError):
            raise ValueError("envelope is not UTF-8 text") from None
        raise ValueError(f"invalid envelope: {e}") from None
    if envelope.queueId != queueId:
        raise ValueError(f"envelope belongs to queue id {envelope.queueId}")
    return envelope


def userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def permissionFix(directory: str, uid: int | None = None) -> str:
    """What to run when the daemon (running as ``uid``) may not use files in its spool."""
    user = userName(os.geteuid() if uid is None else uid)
    return f"relayd runs as {user}: chown -R {user}: {directory}, then restart relayd"


def ownershipProblem(directory: str, euid: int | None = None) -> str | None:
    """
    Why a daemon running as ``euid`` must not use ``directory``, or None.
    Root's files there (0600 root) would be unreadable to the directory's
    owner, the user the daemon normally runs as, at its next start.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    try:
        owner = os.stat(directory).st_uid
    except OSError:
        return None  # missing: created by this daemon; unusable: lock() says why
    if owner == 0:
        return None
    user = userName(owner)
    return (f"{directory} belongs to {user} and relayd runs as root, which would leave mail "
            f"{user} cannot read: run relayd as {user} (User={user} in the systemd unit), "
            f"or chown -R root: {directory} to run it as root from now on")


def spoolProblems(directory: str) -> list[str]:
    """
    What would keep a daemon running as this process's user from using
    ``directory``, each as "DIRECTORY...: what; fix", without changing
    anything (``relayd check-config``). The daemon meets the same problems
    in ``lock`` and ``recover``.
    """
    problem = ownershipProblem(directory)
    if problem is not None:
        return [problem]
    if not os.path.lexists(directory):
        parent = os.path.dirname(os.path.abspath(directory))
        if os.access(parent, os.W_OK | os.X_OK):
            return []  # the daemon creates it
        return [f"{directory}: does not exist, and {parent} does not let {userName(os.geteuid())} "
                f"create it: install -d -o {userName(os.geteuid())} -m 0700 {directory}"]
    if not os.path.isdir(directory):
        return [f"{directory}: not a directory"]
    for path in (directory, *(os.path.join(directory, name) for name in (TMP, QUEUE, QUARANTINE))):
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            return [f"{directory}: {path}: Permission denied; {permissionFix(directory)}"]
    lockPath = os.path.join(directory, "lock")
    if os.path.lexists(lockPath) and not os.access(lockPath, os.R_OK | os.W_OK):
        return [f"{directory}: {lockPath}: Permission denied; {permissionFix(directory)}"]
    unreadable: dict[str, str] = {}  # queue id -> its first unreadable file
    queueDirectory = os.path.join(directory, QUEUE)
    if os.path.isdir(queueDirectory):
        for name in sorted(os.listdir(queueDirectory)):
            path = os.path.join(queueDirectory, name)
            try:
                open(path, "rb").close()
            except PermissionError:
                unreadable.setdefault(name.split(".", 1)[0], path)
            except OSError:
                continue  # gone since the listing, or not ours: recovery says
    if unreadable:
        count = len(unreadable)
        return [f"{directory}: {count} queued message{'s' if count > 1 else ''} cannot be read "
                f"(the first: {next(iter(unreadable.values()))}: Permission denied) and would not "
                f"be sent; {permissionFix(directory)}"]
    return []


def encodeMessageEnd(bodyLength: int, envelope: bytes) -> bytes:
    """What follows a body of ``bodyLength`` bytes in its message file: the encoded envelope, then the trailer."""
    return envelope + TRAILER.pack(TRAILER_TAG, bodyLength, len(envelope), zlib.crc32(envelope))


def _readTrailer(fd: int) -> tuple[int, int, int]:
    """
    ``(body length, envelope length, envelope CRC-32)`` from the trailer of
    the message file open as ``fd``; ValueError saying what is wrong (a
    quarantine reason) when the trailer does not describe the file.
    """
    size = os.fstat(fd).st_size
    if size < TRAILER.size:
        raise ValueError(f"message file is truncated ({size} bytes, no trailer)")
    tag, bodyLength, envelopeLength, checksum = TRAILER.unpack(
        os.pread(fd, TRAILER.size, size - TRAILER.size))
    if tag != TRAILER_TAG:
        if tag[:-1] == TRAILER_TAG[:-1]:
            raise ValueError(f"message file has format version {tag[-1]}, "
                             f"this relayd reads {TRAILER_TAG[-1]}")
        raise ValueError("message file has no trailer (truncated or damaged)")
    if bodyLength + envelopeLength + TRAILER.size != size:
        raise ValueError(f"message file is truncated or damaged: its trailer describes "
                         f"{bodyLength + envelopeLength + TRAILER.size} bytes, it has {size}")
    return bodyLength, envelopeLength, checksum


def _readMessageEnd(fd: int) -> tuple[int, bytes]:
    """``(body length, encoded envelope)`` of the message file open as ``fd``; ValueError as ``_readTrailer``."""
    bodyLength, envelopeLength, checksum = _readTrailer(fd)
    raw = os.pread(fd, envelopeLength, bodyLength)
    if len(raw) != envelopeLength or zlib.crc32(raw) != checksum:
        raise ValueError("message file's envelope is damaged (checksum mismatch)")
    return bodyLength, raw


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


class _BodyReader(io.RawIOBase):
    """The first ``length`` bytes of the file open as ``fd``: a message file's body. Owns ``fd``."""

    def __init__(self, fd: int, length: int) -> None:
        self._fd = fd
        self._position = 0
        self.length = length

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self._position)
        if count <= 0:
            return 0
        with memoryview(buffer) as view:
            read = os.preadv(self._fd, [view[:count]], self._position)
        self._position += read
        return read

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class SpoolWriter:
    """
    One message being received: the body goes to ``tmp/<id>.msg`` and
    becomes part of the queue only through ``commit``, which appends its
    envelope and trailer and renames the file into ``queue/``.

    ``write`` only adds to a buffer in memory (``buffered`` bytes), so the
    reactor thread may call it; ``takeBuffered`` hands the buffer's bytes
    to ``writeOut``, which writes them to the file (blocking). ``commit``
    writes what is still buffered. A write error (a full disk while the
    client is still sending) is remembered and raised by ``commit``, which
    is when the server can answer anyway.
    """

    def __init__(self, spool: Spool, queueId: str, create: bool = True) -> None:
        self.queueId = queueId
        self.size = 0
        self.buffered = 0
        self._buffer: list[bytes] = []
        # After a commit: the whole body, if it was still all in memory then
        # (nothing written out in pieces); the first delivery may send it
        # from there instead of reading the file back.
        self.body: bytes | None = None
        self._wroteOut = False
        self._written = 0  # body bytes in the file
        self._spool = spool
        self._temporary = spool._path(TMP, queueId + MESSAGE_SUFFIX)
        self._message = spool._path(QUEUE, queueId + MESSAGE_SUFFIX)
        # Paths this writer created and has to remove if it does not commit.
        self._created: list[str] = []
        self._error: OSError | None = None
        self._finished = False
        self._placedBody: bytes | None = None  # ``body`` once ``committed``
        self._fd: int | None = None
        if create:
            try:
                self._file()
            except BaseException:
                self._finish()
                raise

    def _file(self) -> int:
        """
        The message file's descriptor, creating the file first if need be
        (blocking). FileExistsError if the id is in use: being received
        (O_EXCL in tmp/) or queued.
        """
        if self._fd is None:
            self._spool._prepareOnce()
            self._fd = os.open(self._temporary, _CREATE_FLAGS, _FILE_MODE)
            self._created.append(self._temporary)
            # Never renamed over a queued message: as long as this file is
            # in tmp/, no other writer can take the id (O_EXCL), so one
            # queued under it now is the last that can be. The older
            # layout's body is looked for only while the spool may hold
            # that layout: new messages never use it.
            suffixes = (MESSAGE_SUFFIX, BODY_SUFFIX) if self._spool.mayHoldPairs else (MESSAGE_SUFFIX,)
            for suffix in suffixes:
                path = self._spool._path(QUEUE, self.queueId + suffix)
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "queue id in use", path)
        return self._fd

    def write(self, data: bytes) -> None:
        """Add ``data`` to the body: memory only, never a system call."""
        if self._finished:
            raise ValueError(f"{self.queueId}: writer is already committed or aborted")
        self.size += len(data)
        if self._error is None and data:
            self._buffer.append(data)
            self.buffered += len(data)

    def takeBuffered(self) -> bytes:
        """The bytes written since the last take, for ``writeOut``; empties the buffer."""
        buffer, self._buffer = self._buffer, []
        self.buffered = 0
        return buffer[0] if len(buffer) == 1 else b"".join(buffer)

    def writeOut(self, data: bytes) -> None:
        """Write ``data`` (from ``takeBuffered``) to the message file; blocking."""
        if self._error is not None or self._finished or not data:
            return
        self._wroteOut = True
        try:
            _writeAll(self._file(), data)
            self._written += len(data)
        except OSError as e:
            self._error = e  # write() stops buffering; commit raises it

    def commit(self, envelope: Envelope) -> None:
        """
        Make the message durable and visible to ``Spool.recover``; blocking.
        On any failure nothing of this message is left behind and the error
        is raised again (an OSError from the filesystem, as is).
        """
        self.place(envelope)
        try:
            self._spool.queueDirectorySync.sync()
        except BaseException:
            self._finish()
            raise
        self.committed()

    def place(self, envelope: Envelope) -> None:
        """
        ``commit`` up to the fsync of queue/ (blocking): the message file,
        complete and fsynced, is named in queue/, and the message is
        committed once an fsync of queue/ that started afterwards has
        succeeded; then call ``committed``, or ``abort`` (which removes it)
        if it failed. On failure here nothing is left behind, as with
        ``commit``.
        """
        if self._finished:
            raise ValueError(f"{self.queueId}: writer is already committed or aborted")
        try:
            if envelope.queueId != self.queueId:
                raise ValueError(
                    f"{self.queueId}: envelope belongs to queue id {envelope.queueId}"
                )
            whole = not self._wroteOut
            rest = self.takeBuffered()
            if self._error is not None:
                raise self._error
            fd = self._file()
            self._fd = None
            try:
                # The body's rest and the message's end in one write: each
                # system call here is one more wait for the GIL afterwards.
                self._written += len(rest)
                _writeAllOf(fd, [rest, encodeMessageEnd(self._written, encodeEnvelope(envelope))])
                os.fsync(fd)
            finally:
                os.close(fd)
            # Only now, all of it on disk, is the message named in queue/:
            # the commit point.
            os.rename(self._temporary, self._message)
            self._created = [self._message]
        except BaseException:
            self._finish()
            raise
        self._placedBody = rest if whole else None

    def committed(self) -> None:
        """The fsync of queue/ after ``place`` succeeded: the message is committed (memory only)."""
        self._created = []
        self._finished = True
        self.body, self._placedBody = self._placedBody, None

    def abort(self) -> None:
        """Forget the message: remove whatever was written. Safe to call twice."""
        if not self._finished:
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._buffer = []
        self.buffered = 0
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # the file is removed anyway
        self._cleanUp()

    def _cleanUp(self) -> None:
        for path in self._created:
            try:
                _unlinkQuietly(path)
            except OSError as e:
                maillog.queueWarning(
                    self.queueId, f"cannot remove {path}: {e.strerror or e}"
                )
        self._created = []


class Spool:
    """
    The queue directory. The daemon is its only writer; call ``recover``
    once at start-up before anything else.
    """

    def __init__(self, directory: str, deliver: Callable[..., object] | None = None) -> None:
        self.directory = directory
        # Commits ready at the same moment share one fsync of queue/;
        # ``deliver`` (the daemon's reactor.callFromThread) runs what
        # ``commitInLane`` does once it has ended.
        self.queueDirectorySync = DirectorySync(self._path(QUEUE), deliver)
        self._prepared = False
        self._lockFile = None
        # (queue id, reason) of every entry recover() moved to quarantine/,
        # for the postmaster's notice.
        self.quarantined: list[tuple[str, str]] = []
        # Queue ids recover() was not allowed to read (left in queue/).
        self.unreadable: list[str] = []
        # Messages this Spool has seen with an update file (written or
        # loaded), and messages in the older two-file layout: what their
        # removal has to unlink besides the message file.
        self._updated: set[str] = set()
        self._pairs: set[str] = set()
        # Whether queue/ may hold a message in the older layout, whose id a
        # new message must not take: until ``recover`` has listed none.
        self.mayHoldPairs = True

    def lock(self) -> None:
        """
        Become the spool's only writer: an exclusive flock on ``lock``,
        held until the process exits. A second daemon on the same spool
        gets BlockingIOError (relayctl reads without it).
        """
        self._prepare()
        path = self._path("lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lockFile = fd

    def lockDescriptor(self) -> int | None:
        """
        The descriptor that holds the lock: the intake workers inherit it,
        so the spool stays locked while any process of this daemon runs.
        """
        return self._lockFile

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def _prepare(self) -> None:
        """Create the directories that are missing, 0700 whatever the umask."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=_DIRECTORY_MODE, exist_ok=True)
            os.chmod(self.directory, _DIRECTORY_MODE)
        for name in (TMP, QUEUE, QUARANTINE):
            path = self._path(name)
            try:
                os.mkdir(path, _DIRECTORY_MODE)
            except FileExistsError:
                continue
            os.chmod(path, _DIRECTORY_MODE)
        self._prepared = True

    # -- start-up

    def recover(self) -> list[Envelope]:
        """
        Bring the directory to a clean state after a stop or a crash and
        return the committed envelopes, oldest arrival first.

        Unfinished writes (everything in ``tmp/``, a body without envelope,
        an update file left by a removal cut short) are deleted; a committed
        entry that cannot be read back is moved to ``quarantine/`` and
        logged. Files that are not ours are left alone. Never raises for
        the contents of the queue.
        """
        self._prepare()
        self._emptyTmp()

        found: dict[str, set[str]] = {
            suffix: set() for suffix in (MESSAGE_SUFFIX, UPDATE_SUFFIX, BODY_SUFFIX, ENVELOPE_SUFFIX)}
        for name in sorted(os.listdir(self._path(QUEUE))):
            stem, dot, suffix = name.rpartition(".")
            if dot and isQueueId(stem) and "." + suffix in found:
                found["." + suffix].add(stem)
            else:
                maillog.queueWarning(
                    None, f"ignoring foreign file {self._path(QUEUE, name)}"
                )
        messages, updates = found[MESSAGE_SUFFIX], found[UPDATE_SUFFIX]
        bodies, envelopes = found[BODY_SUFFIX], found[ENVELOPE_SUFFIX]

        # Routine leftovers, removed as quietly as a file in tmp/: an update
        # file whose message is gone (a removal unlinks the message first),
        # and an older layout's body without envelope (written straight into
        # queue/, still being received when the daemon stopped).
        leftovers = [(queueId, UPDATE_SUFFIX, "update file") for queueId in updates - messages]
        leftovers += [(queueId, BODY_SUFFIX, "message body")
                      for queueId in bodies - envelopes - messages]
        for queueId, suffix, what in sorted(leftovers):
            try:
                os.unlink(self._path(QUEUE, queueId + suffix))
            except OSError as e:
                maillog.queueWarning(
                    queueId, f"cannot remove uncommitted {what}: {e.strerror or e}"
                )

        recovered = []
        for queueId in sorted(messages | envelopes):
            if queueId in messages and (queueId in envelopes or queueId in bodies):
                self._quarantine(queueId, "both a message file and an older envelope or body")
                continue
            if queueId not in messages and queueId not in bodies:
                self._quarantine(queueId, "message body is missing")
                continue
            try:
                if queueId in messages:
                    envelope = self._loadMessage(queueId, updated=queueId in updates)
                else:
                    envelope = self._loadPair(queueId)
                    self.openBody(queueId).close()  # delivery must be able to read it too
            except PermissionError as e:
                self._unreadableEntry(queueId, e)
            except OSError as e:
                self._quarantine(queueId, f"cannot read {e.filename or 'envelope'}: {e.strerror or e}")
            except ValueError as e:
                self._quarantine(queueId, str(e))
            else:
                recovered.append(envelope)
        # Nothing writes the older layout any more but ``restore``: unless a
        # body of it is still queued, new ids need not be looked for there.
        self.mayHoldPairs = any(os.path.lexists(self._path(QUEUE, queueId + BODY_SUFFIX))
                                for queueId in bodies)
        recovered.sort(key=lambda envelope: (envelope.arrival, envelope.queueId))
        return recovered

    def _emptyTmp(self) -> None:
        with os.scandir(self._path(TMP)) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        raise IsADirectoryError(errno.EISDIR, "is a directory")
                    os.unlink(entry.path)
                except OSError as e:
                    maillog.queueWarning(
                        None, f"cannot remove unfinished write {entry.path}: {e.strerror or e}"
                    )

    def _unreadableEntry(self, queueId: str, error: PermissionError) -> None:
        """An entry the daemon may not read: intact, so left in place, with the fix."""
        self.unreadable.append(queueId)
        path = error.filename or self._path(QUEUE, queueId)
        try:
            owner = f" (owned by {userName(os.stat(path).st_uid)})"
        except OSError:
            owner = ""
        maillog.queueError(queueId, f"cannot read {path}{owner}: {error.strerror or error}; "
                                    f"not queued, left in place: {permissionFix(self.directory)}")

    def _quarantine(self, queueId: str, reason: str) -> None:
        """Move the files of an unreadable entry aside, keeping them for a human."""
        maillog.quarantined(queueId, reason)
        self.quarantined.append((queueId, reason))
        self._updated.discard(queueId)
        self._pairs.discard(queueId)
        # Each layout's commit point last: cut short by a crash, the entry
        # is still queued and quarantined again at the next start, where a
        # file left without its commit point would be deleted as a leftover.
        for suffix in (UPDATE_SUFFIX, BODY_SUFFIX, MESSAGE_SUFFIX, ENVELOPE_SUFFIX):
            source = self._path(QUEUE, queueId + suffix)
            if not os.path.lexists(source):
                continue
            target = self._path(QUARANTINE, queueId + suffix)
            serial = 0
            while os.path.lexists(target):
                serial += 1
                target = self._path(QUARANTINE, f"{queueId}{suffix}.{serial}")
            try:
                os.rename(source, target)
            except OSError as e:
                maillog.queueWarning(
                    queueId, f"cannot move {source} to quarantine: {e.strerror or e}"
                )

    # -- quarantine (relayctl quarantine list|show|restore)

    def quarantinedIds(self) -> list[str]:
        """Queue ids with a file in quarantine/ (``<id>.env``, ``<id>.eml``, ``<id>.env.1``...), sorted."""
        found = set()
        for name in os.listdir(self._path(QUARANTINE)):
            stem = name.split(".", 1)[0]
            if isQueueId(stem):
                found.add(stem)
        return sorted(found)

    def quarantineFiles(self, queueId: str) -> list[str]:
        """The names of ``queueId``'s files in quarantine/."""
        _checkId(queueId)
        return sorted(n for n in os.listdir(self._path(QUARANTINE))
                      if n.split(".", 1)[0] == queueId)

    def examineQuarantined(self, queueId: str) -> Envelope:
        """
        The quarantined entry, checked as recovery checks a queued one:
        ValueError saying what is wrong, FileNotFoundError if there is none,
        PermissionError if this user may not read it.
        """
        _checkId(queueId)
        paths = {suffix: self._path(QUARANTINE, queueId + suffix)
                 for suffix in (MESSAGE_SUFFIX, UPDATE_SUFFIX, ENVELOPE_SUFFIX, BODY_SUFFIX)}
        present = {suffix for suffix, path in paths.items() if os.path.lexists(path)}
        if not present:
            raise FileNotFoundError(errno.ENOENT, "not in quarantine", paths[MESSAGE_SUFFIX])
        if MESSAGE_SUFFIX in present:
            if present & {ENVELOPE_SUFFIX, BODY_SUFFIX}:
                raise ValueError("both a message file and an older envelope or body")
            return self._loadMessage(queueId, UPDATE_SUFFIX in present, QUARANTINE)
        if UPDATE_SUFFIX in present:
            raise ValueError("the message file is missing")
        if ENVELOPE_SUFFIX not in present:
            raise ValueError("the envelope is missing")
        if BODY_SUFFIX not in present:
            raise ValueError("the message body is missing")
        with open(paths[ENVELOPE_SUFFIX], "rb") as f:
            envelope = _parseEnvelope(queueId, f.read())
        open(paths[BODY_SUFFIX], "rb").close()
        return envelope

    def restore(self, queueId: str) -> Envelope:
        """
        Put a quarantined entry back into the queue after checking it again
        (the errors of ``examineQuarantined``; FileExistsError if the id is
        queued). The commit point (the message file, or the older layout's
        envelope) last, durably.
        """
        envelope = self.examineQuarantined(queueId)
        for suffix in (MESSAGE_SUFFIX, UPDATE_SUFFIX, ENVELOPE_SUFFIX, BODY_SUFFIX):
            path = self._path(QUEUE, queueId + suffix)
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "already in the queue", path)
        for suffix in (UPDATE_SUFFIX, BODY_SUFFIX, MESSAGE_SUFFIX, ENVELOPE_SUFFIX):
            source = self._path(QUARANTINE, queueId + suffix)
            if not os.path.lexists(source):
                continue
            if suffix == BODY_SUFFIX:
                self.mayHoldPairs = True  # before the id is taken in queue/
            os.rename(source, self._path(QUEUE, queueId + suffix))
            if suffix == UPDATE_SUFFIX:
                self._updated.add(queueId)
            elif suffix == BODY_SUFFIX:
                self._pairs.add(queueId)
        _fsyncDirectory(self._path(QUEUE))
        _fsyncDirectory(self._path(QUARANTINE))
        return envelope

    # -- receiving

    def begin(self, queueId: str) -> SpoolWriter:
        """
        Start writing a new message. FileExistsError if the id is in use,
        in ``tmp/`` or in the queue: the caller retries with a new id.
        """
        _checkId(queueId)
        return SpoolWriter(self, queueId)

    def receive(self, queueId: str) -> SpoolWriter:
        """
        ``begin`` without a system call: the body's file is created by the
        writer's first ``writeOut`` or by its ``commit`` (FileExistsError
        there), so a message that fits the writer's buffer costs its commit
        alone.
        """
        _checkId(queueId)
        return SpoolWriter(self, queueId, create=False)

    def _prepareOnce(self) -> None:
        if not self._prepared:
            self._prepare()

    # -- delivery

    def update(self, envelope: Envelope) -> None:
        """
        Replace a committed envelope atomically, without fsync: after a
        crash the previous state may come back and a delivery be repeated.
        FileNotFoundError if the message is not (or no longer) in the queue.
        """
        self.writeEnvelope(envelope.queueId, encodeEnvelope(envelope))

    def writeEnvelope(self, queueId: str, raw: bytes) -> None:
        """``update`` with the envelope already encoded (``encodeEnvelope``): a snapshot taken earlier."""
        _checkId(queueId)
        # Only beside a message still queued: an update racing a removal
        # must not leave an envelope behind.
        if queueId not in self._pairs and os.path.exists(self._path(QUEUE, queueId + MESSAGE_SUFFIX)):
            suffix = UPDATE_SUFFIX  # the message file stays as committed
        elif os.path.exists(self._path(QUEUE, queueId + ENVELOPE_SUFFIX)):
            self._pairs.add(queueId)
            suffix = ENVELOPE_SUFFIX
        else:
            path = self._path(QUEUE, queueId + MESSAGE_SUFFIX)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        target = self._path(QUEUE, queueId + suffix)
        temporary = self._path(TMP, f"{queueId}{suffix}.{secrets.token_hex(4)}")
        fd = os.open(temporary, _CREATE_FLAGS, _FILE_MODE)
        try:
            try:
                _writeAll(fd, raw)
            finally:
                os.close(fd)
            if suffix == UPDATE_SUFFIX:
                self._updated.add(queueId)  # before it may exist: a removal then unlinks it
            os.replace(temporary, target)
        except BaseException:
            try:
                _unlinkQuietly(temporary)
            except OSError:
                pass
            raise

    def remove(self, queueId: str) -> None:
        """Take a message out of the queue: its commit point first, so a crash half-way leaves no message."""
        if self.removeEnvelope(queueId):
            self.removeBody(queueId)

    def removeEnvelope(self, queueId: str) -> bool:
        """
        ``remove``'s step that counts: once it returns the message is out of
        the queue. For a message file that is all (with its update file, if
        it has one). True for a message in the older layout: its body is
        left, for ``removeBody`` (or recovery, which deletes it as an
        unfinished write).
        """
        _checkId(queueId)
        if queueId not in self._pairs:
            try:
                os.unlink(self._path(QUEUE, queueId + MESSAGE_SUFFIX))
            except FileNotFoundError:
                # Not a message file: the older layout, if anything.
                if not os.path.lexists(self._path(QUEUE, queueId + BODY_SUFFIX)):
                    _unlinkQuietly(self._path(QUEUE, queueId + ENVELOPE_SUFFIX))
                    self._unlinkUpdate(queueId)
                    return False
                self._pairs.add(queueId)
            else:
                self._unlinkUpdate(queueId)
                return False
        _unlinkQuietly(self._path(QUEUE, queueId + ENVELOPE_SUFFIX))
        return True

    def _unlinkUpdate(self, queueId: str) -> None:
        if queueId in self._updated:
            _unlinkQuietly(self._path(QUEUE, queueId + UPDATE_SUFFIX))
            self._updated.discard(queueId)

    def forget(self, queueId: str) -> None:
        """What this Spool knows of a message another process removes in the end (memory only)."""
        self._updated.discard(queueId)
        self._pairs.discard(queueId)

    def removeBody(self, queueId: str) -> None:
        """The older layout's body: only after ``removeEnvelope`` returned True."""
        _checkId(queueId)
        _unlinkQuietly(self._path(QUEUE, queueId + BODY_SUFFIX))
        self._pairs.discard(queueId)

    def load(self, queueId: str) -> Envelope:
        """The committed envelope; FileNotFoundError if absent, ValueError if unreadable."""
        _checkId(queueId)
        if queueId not in self._pairs:
            try:
                return self._loadMessage(queueId)
            except FileNotFoundError:
                pass
        return self._loadPair(queueId)

    def _loadMessage(self, queueId: str, updated: bool | None = None, where: str = QUEUE) -> Envelope:
        """
        A message file's envelope: its update file's if there is one (None:
        look for it), else its trailer's, which is checked in any case.
        FileNotFoundError if there is no message file.
        """
        fd = os.open(self._path(where, queueId + MESSAGE_SUFFIX), _READ_FLAGS)
        try:
            _, raw = _readMessageEnd(fd)
        finally:
            os.close(fd)
        if updated is not False:
            try:
                with open(self._path(where, queueId + UPDATE_SUFFIX), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                updated = False
            else:
                updated = True
        envelope = _parseEnvelope(queueId, raw)
        if where == QUEUE:
            if updated:
                self._updated.add(queueId)
            else:
                self._updated.discard(queueId)
        return envelope

    def _loadPair(self, queueId: str) -> Envelope:
        """The older layout's envelope."""
        with open(self._path(QUEUE, queueId + ENVELOPE_SUFFIX), "rb") as f:
            raw = f.read()
        envelope = _parseEnvelope(queueId, raw)
        self._pairs.add(queueId)
        return envelope

    def openBody(self, queueId: str, where: str = QUEUE) -> BinaryIO:
        """
        The canonical CRLF body (not dot-stuffed), opened for binary
        reading: of a queued message, or of a quarantined one (``where``).
        """
        _checkId(queueId)
        if queueId not in self._pairs:
            try:
                fd = os.open(self._path(where, queueId + MESSAGE_SUFFIX), _READ_FLAGS)
            except FileNotFoundError:
                pass
            else:
                try:
                    length, _, _ = _readTrailer(fd)
                except BaseException:
                    os.close(fd)
                    raise
                return io.BufferedReader(_BodyReader(fd, length))
        return open(self._path(where, queueId + BODY_SUFFIX), "rb")

    def bodySize(self, queueId: str) -> int:
        _checkId(queueId)
        with self.openBody(queueId) as body:
            if isinstance(body.raw, _BodyReader):
                return body.raw.length
            return os.fstat(body.fileno()).st_size

    def ids(self) -> list[str]:
        """The committed queue ids (those with a message file or an envelope), sorted."""
        found = set()
        for name in os.listdir(self._path(QUEUE)):
            stem, dot, suffix = name.rpartition(".")
            if dot and "." + suffix in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX) and isQueueId(stem):
                found.add(stem)
        return sorted(found)


class ThreadBatches:
    """
    Short blocking calls (removing a delivered message, reading a small
    body) run in batches: ``run(f, *args)`` answers like ``runInThread``,
    but a call asked for while ``jobs`` batches are running waits for one
    of them to end, then runs with every other call that waited, one after
    the other in one thread job, and their outcomes come back to the
    reactor thread in one hand-over. Waking a sleeping thread and waking
    the reactor again cost more than the unlink or the read itself; under
    load one job covers many messages, and a lone call still starts at
    once. Each call gets its own outcome: one that fails leaves the others
    alone.
    """

    def __init__(self, runInThread: Callable[..., defer.Deferred] | None = None, jobs: int = 1) -> None:
        self._runInThread = runInThread or defer.maybeDeferred
        self._jobs = jobs
        self._running = 0
        self._waiting: list[tuple[defer.Deferred, Callable, tuple]] = []

    def run(self, f: Callable, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((d, f, args))
        if self._running < self._jobs:
            self._startBatch()
        return d

    def _startBatch(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running += 1
        calls = [(f, args) for _, f, args in batch]
        self._runInThread(_runEach, calls).addBoth(self._ended, [d for d, _, _ in batch])

    def _ended(self, outcomes, deferreds: list[defer.Deferred]) -> None:
        self._running -= 1
        if isinstance(outcomes, Failure):  # the job itself could not run (a stopped pool)
            outcomes = [(False, outcomes)] * len(deferreds)
        for d, (ok, value) in zip(deferreds, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        # Calls asked for by those callbacks join the ones that waited.
        if self._waiting and self._running < self._jobs:
            self._startBatch()


def _runEach(calls: list[tuple[Callable, tuple]]) -> list[tuple[bool, object]]:
    """Blocking, in a thread: each call's result, or its Failure."""
    outcomes: list[tuple[bool, object]] = []
    for f, args in calls:
        try:
            outcomes.append((True, f(*args)))
        except BaseException:
            outcomes.append((False, Failure()))
    return outcomes
