"""
Server TLS: the certificate chain and key from PEM files, one context
factory shared by every listener, reloadable without dropping sessions.

``ServerTLS.getContext()`` is called by Twisted for every new TLS session
(STARTTLS or implicit), so swapping the context in ``reload`` gives new
sessions the new certificate while running ones keep theirs. A certificate
that does not load, or a key that does not match it, leaves the running one
in place (TWISTED-NOTES §2).

The certificate file may hold the whole chain, leaf first; every
certificate in it is served (Twisted's ``ssl:`` endpoint would serve only
the leaf).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from relayd import maillog

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

    def reconfigure(self, config) -> None:
        """A reload: the tls section's files read again; a broken one keeps the running certificate."""
        if config.tls is None:
            return
        try:
            self.reload(config.tls)
        except TLSSetupError as e:
            maillog.daemonEvent(f"reload: keeping the running TLS certificate: {e}",
                                level=maillog.LogLevel.error)


def wrapImplicit(tls: ServerTLS, factory):
    """The factory of an implicit-TLS listener (port 465): TLS from the first byte."""
    return TLSMemoryBIOFactory(tls, False, factory)


def sessionDescription(transport) -> tuple[str, str, int] | None:
    """
    (protocol version, cipher name, cipher bits) of the TLS session on
    ``transport``, or None when there is none. Works behind the haproxy
    wrapper too, where ISSLTransport is not provided (TWISTED-NOTES §8).
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
