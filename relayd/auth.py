"""
SMTP AUTH for relayd: the password file, the twisted.cred checker and
realm, the avatar of an authenticated user, sender binding, failure
throttling and the per-user message rate.

Verification runs in a dedicated thread pool (never on the reactor, and
never in the reactor's own pool, which also resolves host names). Hashes are
checked with libpass's CryptContext: bcrypt (``$2y$`` from Apache's
``htpasswd -B`` included), sha512-crypt and argon2. bcrypt and argon2 release
the GIL while they hash; libpass's sha512-crypt is pure Python where the
``crypt`` module is gone (Python 3.13), so it holds the GIL and slows the
reactor while it runs: prefer bcrypt or argon2 (see bench/auth_bench.py).

An unknown user costs what a wrong password costs: the password is verified
against a hash from the file (the first entry) and the result thrown away.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from passlib.context import CryptContext
from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import Attribute, Interface, implementer

from relayd import idn, maillog


# The schemes relayd verifies. The first is what relayd-passwd writes.
SCHEMES = ("bcrypt", "sha512_crypt", "argon2")
# bcrypt looks at 72 bytes only; bcrypt 5 refuses longer passwords.
BCRYPT_MAX_PASSWORD = 72
# Logins in the file: anything printable but ":" and whitespace.
_LOGIN = re.compile(r"[^\s:\x00-\x1f\x7f]{1,255}")
# Stat the file at most this often (seconds), so a storm of AUTHs does not
# become a storm of stat() calls.
RECHECK_INTERVAL = 1.0

# Stand-in hash for an empty file, so an unknown user still costs a bcrypt
# verification (bcrypt, cost 12, of a random password).
_FALLBACK_DUMMY = "$2b$12$nQ7AsHi9K0mQBXJtBqWs7e87GK46BXomIWw.H6bVQpFV9221eiuRy"


def cryptContext() -> CryptContext:
    return CryptContext(schemes=list(SCHEMES), default=SCHEMES[0])


def isValidLogin(login: str) -> bool:
    return bool(_LOGIN.fullmatch(login))


class PasswordTooLong(error.UnauthorizedLogin):
    """The password is longer than bcrypt can check (72 bytes)."""


class PasswordFileError(Exception):
    """The password file cannot be read; AUTH answers 454 (temporary)."""


class CheckAbandoned(Exception):
    """The client left before its password check started: no check, no verdict."""


class ClientCredentials(credentials.UsernamePassword):
    """
    A login and password from an SMTP session. ``abandon()`` (the client
    has gone) makes a check still waiting for a thread end without
    verifying anything, so a client that disconnects cannot queue up
    password hashing for others to wait behind.
    """

    def __init__(self, username: bytes, password: bytes):
        super().__init__(username, password)
        self._abandoned = threading.Event()

    def abandon(self) -> None:
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def __repr__(self) -> str:
        return f"<ClientCredentials {self.username!r}>"


@dataclass(frozen=True)
class FileIdentity:
    inode: int
    size: int
    mtime: int  # nanoseconds


class PasswordFile:
    """
    ``user:hash`` lines (htpasswd format; ``#`` comments and blank lines
    allowed). Re-read when its inode, size or mtime changes, checked at most
    once a second, or at once after ``invalidate()`` (SIGHUP). Thread-safe:
    lookups run in the verification threads.
    """

    def __init__(self, path: str, now: Callable[[], float] = time.monotonic):
        self.path = path
        self._now = now
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._dummy: str | None = None
        self._identity: FileIdentity | None = None
        self._checked = float("-inf")
        self.skipped: list[int] = []  # line numbers of malformed lines at the last read
        self.unusable: list[UnusableEntry] = []  # entries no password can match, at the last read
        # Called (in the reading thread) after a re-read noticed by itself,
        # not one asked for with load(): tap.py logs what is wrong in it.
        self.changed: Callable[[], None] | None = None

    def invalidate(self) -> None:
        with self._lock:
            self._checked = float("-inf")

    def load(self) -> None:
        """Read now (start-up, SIGHUP); raises PasswordFileError."""
        with self._lock:
            self._refresh(force=True)

    def prepareReload(self, config) -> Callable[[], None]:
        """
        A reload's reading (in a thread): auth.password_file again (a new
        path too). Returns what applies it on the reactor thread; a broken
        file keeps the last read.
        """
        if config.auth is None:
            return lambda: None
        path = config.auth.passwordFile
        try:
            reading = readPasswordFile(path)
        except PasswordFileError as e:
            problem = f"reload: auth.password_file {e}"

            def keep() -> None:
                self.path = path
                maillog.daemonEvent(problem, level=maillog.LogLevel.error)

            return keep

        def apply() -> None:
            with self._lock:
                self.path = path
                self._install(reading, self._now())
            warnPasswordFile(self, config.auth)

        return apply

    def reconfigure(self, config) -> None:
        """A reload read and applied at once."""
        self.prepareReload(config)()

    def logins(self) -> frozenset[str]:
        """The logins of the last read."""
        with self._lock:
            return frozenset(self._entries)

    def lookup(self, login: str) -> tuple[str | None, str | None]:
        """The login's hash (or None), and a real hash of the file to verify against for an unknown login."""
        with self._lock:
            reread = self._refresh(force=False)
            found = self._entries.get(login), self._dummy
        if reread and self.changed is not None:
            self.changed()  # outside the lock: it may read this file's state
        return found

    def _refresh(self, force: bool) -> bool:
        """Re-read the file if it changed (or ``force``); True if it was read."""
        now = self._now()
        if not force and self._identity is not None and now - self._checked < RECHECK_INTERVAL:
            return False
        identity = _fileIdentity(self.path)
        self._checked = now
        if identity == self._identity and not force:
            return False
        self._install(readPasswordFile(self.path, identity), now)
        return True

    def _install(self, reading: "PasswordReading", now: float) -> None:
        self._entries, self.skipped, self.unusable = reading.entries, reading.skipped, reading.unusable
        self._dummy, self._identity, self._checked = reading.dummy, reading.identity, now


@dataclass(frozen=True)
class PasswordReading:
    """One read of a password file."""

    identity: FileIdentity
    entries: dict[str, str]
    skipped: list[int]
    unusable: list["UnusableEntry"]
    # A real hash of the file, verified against for unknown logins.
    dummy: str | None


def _fileIdentity(path: str) -> FileIdentity:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PasswordFileError(f"{path}: {e.strerror}") from None
    return FileIdentity(st.st_ino, st.st_size, st.st_mtime_ns)


def readPasswordFile(path: str, identity: FileIdentity | None = None) -> PasswordReading:
    """Read and parse ``path`` (``identity``: its stat, when already taken); raises PasswordFileError."""
    if identity is None:
        identity = _fileIdentity(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PasswordFileError(f"{path}: {e.strerror}") from None
    entries, skipped = parsePasswordFile(data)
    # The stand-in for unknown logins must cost what a real check costs:
    # a locked ("!") or broken entry fails at once and would tell an
    # attacker which logins exist.
    context = cryptContext()
    dummy = next((h for h in entries.values() if context.identify(h, required=False)), None)
    return PasswordReading(identity, entries, skipped, unusableEntries(data), dummy)


def warnPasswordFile(passwords: "PasswordFile", auth=None) -> None:
    """
    What in the password file cannot work, one warning each: a line that is
    not login:hash (a typo), an entry whose hash scheme relayd cannot verify
    (that login can never log in), an auth.senders entry for a login the
    file does not have.
    """
    if passwords.skipped:
        maillog.daemonEvent(f"warning: auth.password_file {passwords.path}: {skippedLines(passwords.skipped)}",
                            level=maillog.LogLevel.warn)
    for entry in passwords.unusable:
        maillog.daemonEvent(f"warning: auth.password_file {entry.describe(passwords.path)}",
                            level=maillog.LogLevel.warn)
    if auth is not None:
        for problem in sendersWithoutLogin(auth.senders, passwords.logins(), passwords.path):
            maillog.daemonEvent(f"warning: {problem}", level=maillog.LogLevel.warn)


def skippedLines(numbers: list[int]) -> str:
    """What an admin is told about lines of the password file that were not read."""
    return f"line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} skipped (not login:hash)"


def sendersWithoutLogin(senders: tuple[tuple[str, tuple[str, ...]], ...],
                        logins: frozenset[str] | set[str], path: str) -> list[str]:
    """
    auth.senders entries for logins the password file does not have: dead
    entries, usually a login written differently ("alice" for
    "alice@example.com"), as "<key.path>: <why>" lines.
    """
    return [f"auth.senders.{login}: {path} has no login {login!r}, so this entry never applies"
            for login, _ in senders if login not in logins]


def parsePasswordFile(data: bytes) -> tuple[dict[str, str], list[int]]:
    """Entries of an htpasswd-format file, and the numbers of lines that were skipped."""
    entries: dict[str, str] = {}
    skipped: list[int] = []
    for number, login, hashed in _passwordLines(data, skipped):
        entries[login] = hashed
    return entries, skipped


@dataclass(frozen=True)
class UnusableEntry:
    """A line of the password file whose login can never log in (never holds the hash)."""

    line: int
    login: str
    reason: str

    def describe(self, path: str) -> str:
        return (f"{path}: line {self.line}: {self.login}: {self.reason}, so {self.login} "
                f"can never log in; reset with relayd-passwd add {self.login}")


# Schemes htpasswd and other tools write that relayd does not verify, by
# the hash's prefix: what an admin is told instead of a silent 535.
_UNSUPPORTED_PREFIXES = (
    ("$apr1$", "apr1 (htpasswd -m) is not supported"),
    ("{SHA}", "{SHA} (htpasswd -s) is not supported"),
    ("$1$", "md5-crypt ($1$) is not supported"),
    ("$5$", "sha256-crypt (htpasswd -2) is not supported"),
)
# Conventional marks of a disabled account ("!hash", "*"): deliberate, not a mistake.
_LOCK_MARKS = ("!", "*")


def schemeProblem(hashed: str) -> str | None:
    """
    Why a stored hash can never match (an unsupported or unrecognised
    scheme), "locked" for a deliberately disabled entry, or None when
    relayd verifies it. Never quotes the hash.
    """
    if hashed.startswith(_LOCK_MARKS):
        return "locked"
    if cryptContext().identify(hashed, required=False):
        return None
    for prefix, reason in _UNSUPPORTED_PREFIXES:
        if hashed.startswith(prefix):
            return reason
    if re.fullmatch(r"[./0-9A-Za-z]{13}", hashed):
        return "crypt (htpasswd -d) is not supported"
    return ("not a hash relayd knows (bcrypt, sha512-crypt or argon2); "
            "plaintext (htpasswd -p) is not supported")


def unusableEntries(data: bytes) -> list[UnusableEntry]:
    """Entries whose scheme relayd cannot verify (locked entries are deliberate: left out)."""
    found = []
    for number, login, hashed in _passwordLines(data, []):
        reason = schemeProblem(hashed)
        if reason is not None and reason != "locked":
            found.append(UnusableEntry(number, login, reason))
    return found


def _passwordLines(data: bytes, skipped: list[int]):
    """(line number, login, hash) of each entry; numbers of malformed lines go to ``skipped``."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(number)
            continue
        login, sep, hashed = text.partition(":")
        if not sep or not isValidLogin(login) or not hashed.strip():
            skipped.append(number)
            continue
        yield number, login, hashed.strip()


class Verifier:
    """
    Checks one login and password against the password file (blocking;
    run it in a thread). Optionally remembers successes for ``cacheSeconds``,
    keyed by an HMAC (with a per-process random key) of the login, the
    stored hash and the password: a changed password or a removed user
    misses the cache as soon as the file is re-read, and the cache never
    holds anything a fast offline guess could use without the process key.
    """

    def __init__(self, passwords: PasswordFile, cacheSeconds: float = 0.0,
                 now: Callable[[], float] = time.monotonic):
        self.passwords = passwords
        self.cacheSeconds = cacheSeconds
        self._now = now
        self._context = cryptContext()
        self._cacheKey = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}
        self._cacheLock = threading.Lock()

    def verify(self, login: str, password: str) -> bool:
        """True or False; raises PasswordTooLong or PasswordFileError."""
        stored, dummy = self.passwords.lookup(login)
        encoded = password.encode("utf-8")
        if stored is None:
            if dummy is None:
                dummy = _FALLBACK_DUMMY
            if len(encoded) > BCRYPT_MAX_PASSWORD and self._isBcrypt(dummy):
                raise PasswordTooLong()
            self._safeVerify(password, dummy)
            return False
        if len(encoded) > BCRYPT_MAX_PASSWORD and self._isBcrypt(stored):
            raise PasswordTooLong()
        key = None
        if self.cacheSeconds > 0:
            key = hmac.new(self._cacheKey, b"\0".join(
                (login.encode("utf-8"), stored.encode("utf-8"), encoded)), hashlib.sha256).digest()
            with self._cacheLock:
                until = self._cache.get(key)
                if until is not None and until > self._now():
                    return True
        ok = self._safeVerify(password, stored)
        if ok and key is not None:
            with self._cacheLock:
                now = self._now()
                if len(self._cache) > 10_000:
                    self._cache = {k: t for k, t in self._cache.items() if t > now}
                self._cache[key] = now + self.cacheSeconds
        return ok

    def _isBcrypt(self, hashed: str) -> bool:
        return hashed.startswith(("$2a$", "$2b$", "$2y$"))

    def _safeVerify(self, password: str, hashed: str) -> bool:
        try:
            return self._context.verify(password, hashed)
        except (ValueError, TypeError):
            # An unknown or broken hash in the file: never a match.
            return False

    def clearCache(self) -> None:
        with self._cacheLock:
            self._cache.clear()

    def reconfigure(self, config) -> None:
        """A reload: the new auth.cache; what was remembered is forgotten."""
        if config.auth is not None:
            self.cacheSeconds = config.auth.cache
            self.clearCache()


@implementer(checkers.ICredentialsChecker)
class PasswordFileChecker:
    """
    twisted.cred checker for PLAIN and LOGIN (IUsernamePassword): the
    verification runs in ``pool``; the avatar id is the login (str).
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, verifier: Verifier, reactor, pool):
        self.verifier = verifier
        self.reactor = reactor
        self.pool = pool

    def requestAvatarId(self, creds):
        try:
            login = creds.username.decode("utf-8") if isinstance(creds.username, bytes) else creds.username
            password = creds.password.decode("utf-8") if isinstance(creds.password, bytes) else creds.password
        except UnicodeDecodeError:
            return _failed(error.UnauthorizedLogin())
        if not login or not password or not isValidLogin(login):
            # An empty password never succeeds, whatever the file says.
            return _failed(error.UnauthorizedLogin())

        def check():
            if getattr(creds, "abandoned", False):
                raise CheckAbandoned()
            if not self.verifier.verify(login, password):
                raise error.UnauthorizedLogin()
            return login

        return deferToThreadPool(self.reactor, self.pool, check)


def _failed(exc):
    return defer.fail(exc)


class IRelayClient(Interface):
    """What a session's avatar may do: relay to a recipient, send as a sender."""

    login = Attribute("The AUTH login, or None")

    def mayRelay(recipient: str) -> bool:
        """Whether mail to this recipient may be relayed."""

    def maySend(sender: str) -> bool:
        """Whether this MAIL FROM address may be used."""


@implementer(IRelayClient)
@dataclass(frozen=True)
class AuthenticatedUser:
    """The avatar of a client that passed AUTH: it relays, from its own senders only."""

    login: str
    senders: tuple[str, ...] | None  # None: no auth.senders entry

    def mayRelay(self, recipient: str) -> bool:
        return True

    def maySend(self, sender: str) -> bool:
        return senderAllowed(sender, self.login, self.senders)


@implementer(portal.IRealm)
class Realm:
    """Avatars for authenticated logins, with their auth.senders binding."""

    def __init__(self, auth):
        self.auth = auth  # the auth section: its senders

    def reconfigure(self, config) -> None:
        """A reload: auth.senders as of now, for the logins that authenticate after it."""
        self.auth = config.auth

    def sendersFor(self, login: str) -> tuple[str, ...] | None:
        return self.auth.sendersFor(login) if self.auth is not None else None

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IRelayClient not in interfaces:
            raise NotImplementedError("relayd's realm only provides IRelayClient")
        return IRelayClient, AuthenticatedUser(avatarId, self.sendersFor(avatarId)), lambda: None


# Policy (pure functions)

_LOGIN_MAILBOX = re.compile(r"[^@\s]+@[^@\s]+")


def hasRoutingTricks(address: str) -> bool:
    """
    Percent hacks, bang paths, quoted "@", source routes, several "@": ways
    to make the next hop relay further. None of them is ever relayed.
    """
    if address.startswith("@") or ":" in address.split("@", 1)[0]:
        return True
    local, at, domain = address.rpartition("@")
    if not at:
        return "!" in address or "%" in address
    return "@" in local or "%" in local or "!" in local or '"' in local


def senderAllowed(sender: str, login: str, entries: tuple[str, ...] | None) -> bool:
    """
    May ``login`` use MAIL FROM:<sender>? The null sender always; with an
    auth.senders entry, the listed addresses (any case) and @domains; without
    one, only the login itself when it is an address. Never an address with
    routing tricks.
    """
    if sender == "":
        return True
    if hasRoutingTricks(sender) or not _LOGIN_MAILBOX.fullmatch(sender):
        return False
    # Domains compared as A-labels: the config holds them so.
    wanted = idn.comparable(sender)
    if entries is None:
        return _LOGIN_MAILBOX.fullmatch(login) is not None and idn.comparable(login) == wanted
    domain = "@" + wanted.rpartition("@")[2].rstrip(".")
    for entry in entries:
        entry = entry.lower()
        if entry.startswith("@"):
            if entry == domain:
                return True
        elif entry == wanted:
            return True
    return False


class FailureThrottle:
    """
    Failed AUTHs per client IP within a sliding window. An IP that reaches
    ``limit`` failures is blocked: AUTH from it gets 421 until the failures
    that made the block have aged out of the window. A block is a fact of
    its own, kept with its end time, so a reload that changes the limit or
    the window neither lifts nor creates blocks; an admin can lift one
    (``unblock``, relayctl unblock).

    Checks in flight count against the limit: an IP may have at most
    ``limit`` minus its recent failures being verified at once, so parallel
    guesses from many connections cannot get past it.
    """

    MAX_TRACKED = 100_000  # bounded memory under a wide distributed attack

    def __init__(self, clock, limit: int, window: float):
        self.clock = clock
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}  # address -> blocked until (clock time)
        self._inFlight: dict[str, int] = {}

    def _recent(self, address: str) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blockedUntil(self, address: str) -> float | None:
        """When the block on ``address`` ends, or None if it is not blocked."""
        until = self._blocked.get(address)
        if until is not None and until <= self.clock.seconds():
            del self._blocked[address]
            return None
        return until

    def blocked(self, address: str) -> bool:
        return self.blockedUntil(address) is not None

    def mayCheck(self, address: str) -> bool:
        """Whether a password check for ``address`` may start now."""
        if self.blocked(address):
            return False
        times = self._recent(address)
        return (len(times) if times else 0) + self._inFlight.get(address, 0) < self.limit

    def startCheck(self, address: str) -> bool:
        """Count a check in flight; False (nothing counted) when it may not start."""
        if not self.mayCheck(address):
            return False
        self._inFlight[address] = self._inFlight.get(address, 0) + 1
        return True

    def checkEnded(self, address: str, failed: bool) -> float | None:
        """
        End a check counted by ``startCheck``; record its failure. The end
        of the block when this failure started one, else None.
        """
        left = self._inFlight.get(address, 0) - 1
        if left > 0:
            self._inFlight[address] = left
        else:
            self._inFlight.pop(address, None)
        return self.failed(address) if failed else None

    def failed(self, address: str) -> float | None:
        """Record a failure; the end of the block when it started one, else None."""
        times = self._recent(address)
        if times is None:
            if len(self._failures) >= self.MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))
            times = self._failures[address] = deque()
        times.append(self.clock.seconds())
        if len(times) < self.limit:
            return None
        # Blocked until enough of these failures have aged out of the window.
        until = times[-self.limit] + self.window
        already = self.blockedUntil(address)
        if already is not None:
            self._blocked[address] = max(already, until)
            return None
        if len(self._blocked) >= self.MAX_TRACKED:
            self._expireBlocks()
            if len(self._blocked) >= self.MAX_TRACKED:
                self._blocked.pop(next(iter(self._blocked)))
        self._blocked[address] = until
        return until

    def _expireBlocks(self) -> None:
        now = self.clock.seconds()
        for address in [a for a, until in self._blocked.items() if until <= now]:
            del self._blocked[address]

    def blockedClients(self) -> list[tuple[str, float]]:
        """Every blocked address and when its block ends, soonest end first."""
        self._expireBlocks()
        return sorted(self._blocked.items(), key=lambda item: (item[1], item[0]))

    def unblock(self, address: str) -> bool:
        """Lift the block on ``address`` and forget its failures; whether it was blocked."""
        wasBlocked = self.blocked(address)
        self._blocked.pop(address, None)
        self._failures.pop(address, None)
        return wasBlocked


class MessageRate:
    """Messages queued per login in the last hour (a leaked password must not flood the smarthost)."""

    WINDOW = 3600.0

    def __init__(self, clock, limit: int):
        self.clock = clock
        self.limit = limit
        self._sent: dict[str, deque[float]] = {}

    def _recent(self, login: str) -> deque[float]:
        times = self._sent.setdefault(login, deque())
        horizon = self.clock.seconds() - self.WINDOW
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def exceeded(self, login: str) -> bool:
        return len(self._recent(login)) >= self.limit

    def queued(self, login: str) -> None:
        self._recent(login).append(self.clock.seconds())

    def exceededUntil(self, login: str) -> float | None:
        """While ``login`` is over the limit: when it will be under it again; else None."""
        times = self._recent(login)
        if len(times) < self.limit:
            return None
        return times[-self.limit] + self.WINDOW

    def exceededLogins(self) -> list[tuple[str, float]]:
        """Every login over the limit now, with when it will be under it again."""
        found = []
        for login in list(self._sent):
            until = self.exceededUntil(login)
            if until is not None:
                found.append((login, until))
        return found

