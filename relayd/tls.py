"""
TLS, both ways. Server TLS: the certificate chain and key from PEM files,
one context factory shared by every listener, reloadable without dropping
sessions. Client TLS (at the end): the connection creator for a next hop,
verified or opportunistic, and what a handshake gave for the log line.

``ServerTLS.getContext()`` is called by Twisted for every new TLS session
(STARTTLS or implicit), so swapping the context in ``reload`` gives new
sessions the new certificate while running ones keep theirs. A certificate
that does not load, or a key that does not match it, leaves the running one
in place (docs/twisted-traps.rst, "2. STARTTLS and implicit TLS").

The certificate file may hold the whole chain, leaf first; every
certificate in it is served (Twisted's ``ssl:`` endpoint would serve only
the leaf).
"""

from __future__ import annotations

import ipaddress
import re
import weakref
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import error, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory, ITransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import maillog
from relayd.delivery import TLSInfo

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)

_MIN_VERSIONS = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


class TLSSetupError(Exception):
    """A certificate or key that cannot be used; the text is one line for the admin."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{what} {path}: cannot read it: {e.strerror}") from None


def certificateOptions(certificatePath: str, keyPath: str, minVersion: str = "1.2"
                       ) -> ssl.CertificateOptions:
    """
    Options serving the chain in ``certificatePath`` with the key in
    ``keyPath``; TLS ``minVersion`` or later, Twisted's modern cipher list,
    no compression, no session tickets across reloads. Raises TLSSetupError.
    """
    blocks = _PEM_CERTIFICATE.findall(_read(certificatePath, "tls.certificate"))
    if not blocks:
        raise TLSSetupError(f"tls.certificate {certificatePath}: no PEM certificate in it")
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except Exception as e:
        raise TLSSetupError(f"tls.certificate {certificatePath}: not a valid certificate ({_why(e)})") from None
    keyData = _read(keyPath, "tls.key")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except Exception as e:
        # Never the key material itself, only the library's complaint.
        raise TLSSetupError(f"tls.key {keyPath}: not a valid PEM private key ({_why(e)})") from None
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=_MIN_VERSIONS[minVersion],
            enableSessions=False,
        )
        # Build the context now: a key that does not match the certificate
        # fails here, at load or reload, not at the first client.
        options.getContext()
    except Exception as e:
        raise TLSSetupError(
            f"tls.key {keyPath}: does not match tls.certificate {certificatePath} ({_why(e)})") from None
    return options


def _why(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS context, for STARTTLS (``transport.startTLS(tls)``)
    and implicit-TLS listeners (``wrapImplicit``).
    """

    def __init__(self, certificatePath: str, keyPath: str, minVersion: str = "1.2"):
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.minVersion = minVersion
        self._options = certificateOptions(certificatePath, keyPath, minVersion)

    @classmethod
    def fromConfig(cls, tlsConfig) -> "ServerTLS":
        return cls(tlsConfig.certificate, tlsConfig.key, tlsConfig.minVersion)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def reload(self, tlsConfig=None) -> None:
        """
        Load the (possibly new) files; on success new sessions use them. On
        failure raise TLSSetupError and keep serving the old certificate.
        """
        certificatePath = tlsConfig.certificate if tlsConfig else self.certificatePath
        keyPath = tlsConfig.key if tlsConfig else self.keyPath
        minVersion = tlsConfig.minVersion if tlsConfig else self.minVersion
        options = certificateOptions(certificatePath, keyPath, minVersion)
        self._options = options
        self.certificatePath, self.keyPath, self.minVersion = certificatePath, keyPath, minVersion

    def prepareReload(self, config) -> Callable[[], None]:
        """
        A reload's reading (in a thread): the tls section's files. Returns
        what applies it on the reactor thread: new sessions get the new
        certificate; a broken one keeps the running certificate.
        """
        tlsConfig = config.tls
        if tlsConfig is None:
            return lambda: None
        try:
            options = certificateOptions(tlsConfig.certificate, tlsConfig.key, tlsConfig.minVersion)
        except TLSSetupError as e:
            problem = f"reload: keeping the running TLS certificate: {e}"
            return lambda: maillog.daemonEvent(problem, level=maillog.LogLevel.error)

        def apply() -> None:
            self._options = options
            self.certificatePath, self.keyPath = tlsConfig.certificate, tlsConfig.key
            self.minVersion = tlsConfig.minVersion

        return apply

    def reconfigure(self, config) -> None:
        """A reload read and applied at once."""
        self.prepareReload(config)()


def wrapImplicit(tls: ServerTLS, factory):
    """The factory of an implicit-TLS listener (port 465): TLS from the first byte."""
    return TLSMemoryBIOFactory(tls, False, factory)


def sessionDescription(transport) -> tuple[str, str, int] | None:
    """
    (protocol version, cipher name, cipher bits) of the TLS session on
    ``transport``, or None when there is none. Works behind the haproxy
    wrapper too, where ISSLTransport is not provided (docs/twisted-traps.rst,
    "2. STARTTLS and implicit TLS").
    """
    try:
        handle = transport.getHandle()
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
        bits = handle.get_cipher_bits()
    except Exception:
        return None
    if not version or not cipher:
        return None
    return version, cipher, bits or 0


# -- client TLS: connecting to next hops ---------------------------------------


def isAddressLiteral(host: str) -> bool:
    """Whether ``host`` is an IP address (no SNI, and the certificate must name the address)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def loadTrustRoot(caFile: str | None):
    """The system CA store, or every certificate in ``caFile``."""
    if caFile is None:
        return ssl.platformTrust()
    with open(caFile, "rb") as f:
        blocks = _PEM_CERTIFICATE.findall(f.read())
    if not blocks:
        raise ValueError(f"{caFile}: no PEM certificate in the file")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


# Opportunistic connections -> did every certificate of the chain verify so
# far? (Twisted owns app_data.)
_chainStates: "weakref.WeakKeyDictionary[SSL.Connection, bool]" = weakref.WeakKeyDictionary()


def _recordVerification(connection, certificate, errno, depth, ok) -> bool:
    if not ok and connection in _chainStates:
        _chainStates[connection] = False
    return True  # opportunistic: encrypt anyway


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """
    Encryption with SNI and no verification (``tls: may``, or ``verify:
    false``): the handshake succeeds whatever the certificate, and the
    result of the chain and name checks is kept for the log line.
    """

    def __init__(self, hostname: str, caFile: str | None = None):
        self.hostname = hostname
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_options(SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION)
        if caFile is not None:
            context.load_verify_locations(caFile)
        else:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER, _recordVerification)
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        _chainStates[connection] = True
        if self.hostname and not isAddressLiteral(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_connect_state()
        return connection


def clientTLSOptions(hostname: str, tls: str, verify: bool, caFile: str | None):
    """
    The connection creator for a hop: verified (service_identity host name
    check against the system CAs or ``caFile``) for ``starttls`` and
    ``implicit`` with ``verify``, otherwise opportunistic.
    """
    if tls in ("starttls", "implicit") and verify:
        return ssl.optionsForClientTLS(hostname, trustRoot=loadTrustRoot(caFile))
    return OpportunisticTLS(hostname, caFile if tls != "may" else None)


def tlsInfo(transport: ITransport, hostName: str) -> TLSInfo | None:
    try:
        connection = transport.getHandle()
        protocol = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits() or 0
    except Exception:
        return None
    chainVerified = _chainStates.get(connection)
    if chainVerified is None:
        trust = "Verified"  # optionsForClientTLS completes only when verified
    elif not chainVerified:
        trust = "Untrusted"
    else:
        try:
            if isAddressLiteral(hostName):
                verify_ip_address(connection, hostName)
            else:
                verify_hostname(connection, hostName)
            trust = "Verified"
        except (VerificationError, Exception):
            trust = "Trusted"
    return TLSInfo(protocol or "", cipher or "", bits, trust)


def tlsFailureText(reason: Failure) -> str:
    exc = reason.value
    if isinstance(exc, SSL.Error):
        details = []
        for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
            if isinstance(item, tuple) and item and item[-1]:
                details.append(str(item[-1]))
        return ", ".join(details) or str(exc) or "TLS error"
    if exc.__class__.__name__ == "VerificationError":
        return "the certificate does not match the host name"
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return "the server closed the connection"
    return str(exc) or exc.__class__.__name__
