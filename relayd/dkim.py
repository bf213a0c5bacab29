"""
DKIM signing (RFC 6376; Ed25519 keys, RFC 8463) for the ``From:`` domains
in the ``dkim:`` section, with dkimpy: relayd writes no crypto and no
canonicalization of its own.

When: just before a message's first delivery attempt, never before the
250, and never in the daemon's own process: dkimpy canonicalizes and signs
in pure Python, holding the interpreter lock for up to a second on a large
message (RSA's modular exponentiation alone takes milliseconds), which
would stall every session on the reactor thread. A spool thread hands the
message to a small pool of worker processes and waits for the signature. The signature covers the spooled message,
which is exactly what the courier sends (relayd's own Received: header
first, CRLF line endings, dot-stuffing undone by the next hop, 8-bit bytes
passed on as they are or the hop refused, never converted). The
DKIM-Signature fields are stored in the envelope before the first byte goes
out, so every attempt (retries, the next MX) sends the same signed bytes,
and a message signed before a key rotation keeps its signature. Signing at
delivery keeps the reply to DATA free of an RSA operation and of hashing up
to limits.message_size, and covers the notices relayd writes itself.

Who: mail from relay.trusted_networks (and relayd's own notices) is signed
for any configured domain; an authenticated client's only when its
``From:`` address is one its login may use in MAIL FROM (auth.senders), so
no login gets a forged ``From:`` signed. Such mail is sent unsigned, with a
log line saying why.
"""

from __future__ import annotations

import base64
import email.utils
import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import dkim as dkimpy
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer
from twisted.logger import Logger

from relayd import maillog
from relayd.auth import senderAllowed
from relayd.config import domainALabel

log = Logger()

RSA_MIN_BITS = 2048
RSA_KEYGEN_BITS = 2048
KEY_TYPES = ("rsa", "ed25519")

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"


class KeyProblem(Exception):
    """A key file that cannot be used; the text is one line naming the config file and key."""


@dataclass(frozen=True)
class PrivateKey:
    """A signing key as read from its file; the secret half never shows in a repr."""

    kind: str  # "rsa" or "ed25519"
    bits: int
    # The form dkimpy signs with: PKCS#1 PEM (RSA) or the base64 seed (Ed25519).
    secret: bytes = field(repr=False)
    publicKey: str  # base64, as the p= tag of the DNS record

    @property
    def algorithm(self) -> str:
        return RSA_SHA256 if self.kind == "rsa" else ED25519_SHA256

    def record(self) -> str:
        """The DNS TXT record to publish at SELECTOR._domainkey.DOMAIN."""
        return f"v=DKIM1; k={self.kind}; p={self.publicKey}"


@dataclass(frozen=True)
class SigningKey:
    domain: str  # lower-case A-labels
    selector: str
    key: PrivateKey


def parsePrivateKey(data: bytes) -> PrivateKey:
    """
    An RSA or Ed25519 private key in PEM (PKCS#8, or PKCS#1 for RSA, as
    openssl and opendkim-genkey write them), or an Ed25519 seed in base64
    (dkimpy's dknewkey). ValueError saying what the data is otherwise.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("the key is encrypted; relayd needs it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        key = _base64Seed(data)
        if key is None:
            raise ValueError("expected an RSA or Ed25519 private key in PEM, got something else") \
                from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(f"expected an RSA key of at least {RSA_MIN_BITS} bits, got "
                             f"{key.key_size} bits (RFC 8301)")
        secret = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return PrivateKey("rsa", key.key_size, secret, base64.b64encode(public).decode("ascii"))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        return PrivateKey("ed25519", 256, base64.b64encode(seed),
                          base64.b64encode(public).decode("ascii"))
    raise ValueError(f"expected an RSA or Ed25519 private key, got {type(key).__name__.lstrip('_')}")


def _base64Seed(data: bytes) -> ed25519.Ed25519PrivateKey | None:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        return None
    if len(raw) != 32:
        return None
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def readPrivateKey(path: str) -> PrivateKey:
    """The key in ``path``: OSError if it cannot be read, ValueError if it is no usable key."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    return parsePrivateKey(data)


def newPrivateKey(kind: str) -> bytes:
    """A new private key of ``kind`` ("rsa": 2048 bits, or "ed25519") as PKCS#8 PEM."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEYGEN_BITS)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key type {kind!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def recordName(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def splitRecord(record: str, size: int = 255) -> list[str]:
    """A TXT record's text as the character-strings of at most 255 bytes a zone file needs."""
    return [record[i:i + size] for i in range(0, len(record), size)] or [""]


def parseRecord(text: str) -> dict[str, str]:
    """The tags of a DKIM key record ("v=DKIM1; k=rsa; p=..."), whitespace removed (RFC 6376 3.2)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(), "".join(value.split()))
    return tags


def recordMatches(published: str, key: PrivateKey) -> str | None:
    """None when the published record holds ``key``'s public key, else what differs."""
    tags = parseRecord(published)
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"v={tags['v']}, expected DKIM1"
    kind = tags.get("k", "rsa")
    if kind != key.kind:
        return f"k={kind}, but the key is {key.kind}"
    if not tags.get("p"):
        return "p= is empty (the key is revoked)"
    if tags["p"] != key.publicKey:
        return "p= holds another public key"
    return None


def loadKeys(config) -> dict[str, tuple[SigningKey, ...]]:
    """Every key of config.dkim read: From: domain -> its keys. KeyProblem for the first that fails."""
    found: dict[str, list[SigningKey]] = {}
    if config.dkim is None:
        return {}
    for keyPath, domain, selector, path in config.dkim.keyFiles():
        try:
            key = readPrivateKey(path)
        except OSError as e:
            raise KeyProblem(f"{config.path}: {keyPath}: cannot read {path}: "
                             f"{e.strerror or e}") from None
        except ValueError as e:
            raise KeyProblem(f"{config.path}: {keyPath}: {path}: {e}") from None
        found.setdefault(domain, []).append(SigningKey(domain, selector, key))
    return {domain: tuple(keys) for domain, keys in found.items()}


def keyProblems(config) -> list[str]:
    """What would stop the daemon from loading config.dkim's keys (relayd check-config)."""
    try:
        loadKeys(config)
    except KeyProblem as e:
        return [str(e)]
    return []


# The message --------------------------------------------------------------------


def _headerBlock(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def fromAddress(message: bytes) -> tuple[str | None, str | None]:
    """
    (the ``From:`` address with its domain as lower-case A-labels, None)
    or (None, why there is not exactly one).
    """
    try:
        headers, _ = dkimpy.rfc822_parse(_headerBlock(message))
    except dkimpy.MessageFormatError:
        return None, "the header is malformed"
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None, f"{len(values)} From: fields"
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None, "the From: field is not UTF-8"
    addresses = [address for _, address in email.utils.getaddresses(["".join(text.splitlines())])
                 if address]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None, "the From: field does not hold one address"
    local, _, domain = addresses[0].rpartition("@")
    aLabel = domainALabel(domain)
    if not local or aLabel is None:
        return None, "the From: address has no valid domain"
    return f"{local}@{aLabel}", None


def signerDomain(address: str | None, login: str | None, auth, domains) -> tuple[str | None, str | None]:
    """
    Which configured domain signs mail with ``From: address`` submitted by
    ``login`` (None: trusted network, or relayd itself): (domain, None), or
    (None, why not; None when the domain simply has no key).
    """
    if address is None:
        return None, None
    domain = address.rpartition("@")[2]
    if domain not in domains:
        return None, None
    if login is not None:
        entries = auth.sendersFor(login) if auth is not None else None
        if auth is None or not senderAllowed(address, login, entries):
            return None, f"From: <{address}> is not an address login {login} may use"
    return domain, None


def signedFields(names: list[bytes], headers: tuple[str, ...], oversign: tuple[str, ...]) -> list[bytes]:
    """
    The h= list for a header whose field names are ``names``: each name of
    ``headers`` as often as it appears, each of ``oversign`` once more.
    """
    counts = Counter(name.lower() for name in names)
    extra = {name.lower() for name in oversign}
    listed: list[str] = []
    for name in (*headers, *oversign):
        if name.lower() not in listed:
            listed.append(name.lower())
    out: list[bytes] = []
    for name in listed:
        encoded = name.encode("ascii")
        out += [encoded] * (counts[encoded] + (1 if name in extra else 0))
    return out


def sign(message: bytes, keys: tuple[SigningKey, ...], settings, now: float | None = None) -> bytes:
    """
    The DKIM-Signature fields (CRLF lines, the first key's on top) that
    ``keys`` give ``message``, per the dkim section ``settings``.
    Blocking, CPU-bound: run it in a thread. dkimpy's exceptions pass.
    """
    parsed = dkimpy.DKIM(message, linesep=b"\r\n")
    include = signedFields([name for name, _ in parsed.headers], settings.headers,
                           settings.oversign)
    header, body = settings.canonicalization.split("/")
    fields = []
    for signing in keys:
        fields.append(parsed.sign(
            signing.selector.encode("ascii"), signing.domain.encode("ascii"),
            signing.key.secret, signature_algorithm=signing.key.algorithm.encode("ascii"),
            canonicalize=(header.encode("ascii"), body.encode("ascii")),
            include_headers=include))
    return b"".join(fields)


@dataclass(frozen=True)
class Outcome:
    """What signing one queued message came to."""

    fields: bytes = b""  # the DKIM-Signature fields to send first (empty: unsigned)
    domain: str | None = None
    selectors: tuple[str, ...] = ()
    reason: str | None = None  # why it is not signed, when that is worth a log line


def signQueued(message: bytes, login: str | None, auth, keys, settings) -> Outcome:
    """Decide and sign (blocking): ``keys`` maps From: domain -> its SigningKeys."""
    address, malformed = fromAddress(message)
    domain, refused = signerDomain(address, login, auth, keys)
    if domain is None:
        return Outcome(reason=refused or (malformed and f"{malformed}, nothing to sign for"))
    try:
        fields = sign(message, keys[domain], settings)
    except dkimpy.DKIMException as e:
        return Outcome(reason=f"dkimpy cannot sign it: {e}")
    return Outcome(fields, domain, tuple(k.selector for k in keys[domain]))


# The daemon's signer ------------------------------------------------------------


class Signer:
    """
    The keys of the dkim section and ``sign``, which the scheduler calls
    before a message's first delivery attempt. ``runInThread(f, *args)``
    reads the message off the reactor thread; the signing runs in one of
    ``workers`` processes (started at the first message, ended by
    ``stop``), at most ``workers`` messages at a time, so no spool thread
    waits for it and at most that many messages are held in memory; with
    ``workers`` 0 (unit tests) the thread signs itself. ``callFromThread``
    (the reactor's) brings a worker's answer back. A reload reads every key
    file again (in a thread); if one fails, the running keys stay and an
    error line says which.
    """

    def __init__(self, config, runInThread: Callable[..., defer.Deferred], workers: int = 0,
                 callFromThread: Callable[..., None] | None = None):
        self.runInThread = runInThread
        self.callFromThread = callFromThread
        self.settings = config.dkim
        self.auth = config.auth
        self.keys = loadKeys(config)  # KeyProblem stops the start
        self.workers = workers
        self._limit = defer.DeferredSemaphore(max(1, workers))
        self._executor: ProcessPoolExecutor | None = None

    def reconfigure(self, config) -> defer.Deferred:
        self.auth = config.auth

        def loaded(keys) -> None:
            self.settings, self.keys = config.dkim, keys
            if keys:
                count = sum(len(k) for k in keys.values())
                maillog.daemonEvent(f"reload: DKIM keys read: {count} for {len(keys)} domain"
                                    f"{'s' if len(keys) > 1 else ''} ("
                                    + ", ".join(f"{d} s={','.join(k.selector for k in keys[d])}"
                                                for d in keys) + ")")

        def failed(failure) -> None:
            failure.trap(KeyProblem)
            maillog.daemonEvent(f"reload: {failure.getErrorMessage()}; keeping the running "
                                f"DKIM keys", level=maillog.LogLevel.error)

        return self.runInThread(loadKeys, config).addCallbacks(loaded, failed)

    def stop(self) -> None:
        """End the worker processes (at the daemon's stop)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def sign(self, envelope, openBody: Callable[[], BinaryIO]) -> defer.Deferred:
        """
        Decide and sign ``envelope``'s message once: sets ``envelope.dkim``
        (the fields, or "" for unsigned) and logs. Fires True when the
        envelope gained a signature to store. A failure to read or sign the
        message leaves ``envelope.dkim`` unset, for the next attempt.
        """
        keys, settings, auth = self.keys, self.settings, self.auth
        if not keys or settings is None:
            return defer.succeed(False)

        def done(outcome: Outcome) -> bool:
            envelope.dkim = outcome.fields.decode("ascii")
            if outcome.fields:
                maillog.dkimSigned(envelope.queueId, outcome.domain, outcome.selectors)
                return True
            if outcome.reason:
                maillog.dkimUnsigned(envelope.queueId, outcome.reason)
            return False

        def broke(failure) -> bool:
            what = "read the message" if failure.check(OSError) else "sign"
            maillog.dkimUnsigned(envelope.queueId, f"cannot {what} now: "
                                 f"{failure.getErrorMessage() or failure.type.__name__}")
            return False

        args = (envelope.authIdentity, auth, keys, settings)
        d = self._limit.run(self._signed, openBody, args)
        return d.addCallbacks(done, broke)

    def _signed(self, openBody, args) -> defer.Deferred:
        def read() -> bytes:
            with openBody() as f:
                return f.read()

        if not self.workers:
            return self.runInThread(lambda: signQueued(read(), *args))
        return self.runInThread(read).addCallback(self._inWorker, args)

    def _inWorker(self, message: bytes, args) -> defer.Deferred:
        if self._executor is None:
            # forkserver: workers do not start as copies of the daemon
            # (its threads, sockets and signal handlers).
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("forkserver"))
        executor = self._executor
        result: defer.Deferred = defer.Deferred()

        def settle(future) -> None:
            error = future.exception()
            if error is None:
                result.callback(future.result())
                return
            if isinstance(error, BrokenProcessPool) and self._executor is executor:
                self._executor = None  # a worker died (killed): new ones for the next message
            result.errback(error)

        future = executor.submit(signQueued, message, *args)
        future.add_done_callback(lambda f: self.callFromThread(settle, f))
        return result


# Sending ------------------------------------------------------------------------


class _Prefixed(io.RawIOBase):
    """``prefix`` then the rest of ``body``, as one binary file."""

    def __init__(self, prefix: bytes, body: BinaryIO):
        self._prefix = memoryview(prefix)
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._body.readinto(buffer)

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


def withSignature(fields: str | None, openBody: Callable[[], BinaryIO]) -> Callable[[], BinaryIO]:
    """``openBody`` with the stored DKIM-Signature fields in front, when there are any."""
    if not fields:
        return openBody
    prefix = fields.encode("ascii")
    return lambda: io.BufferedReader(_Prefixed(prefix, openBody()))
