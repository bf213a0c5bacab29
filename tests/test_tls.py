"""
relayd.tls: the server's certificate chain and key, the minimum TLS
version, and reloading (a broken new certificate keeps the old one).
Real handshakes are in tests/integration/test_submission_security.py.
"""

from __future__ import annotations

import pytest
import trustme
from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet import protocol

from relayd import tls


def writeChain(directory, name="relay.test"):
    """A leaf issued by an intermediate: cert.pem holds leaf + intermediate."""
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(name, "127.0.0.1")
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return ca, str(cert), str(key)


def test_loads_a_chain_file(tmp_path):
    _, cert, key = writeChain(tmp_path)
    server = tls.ServerTLS(cert, key)
    assert isinstance(server.getContext(), SSL.Context)


def test_minimum_version_13_refuses_tls12(tmp_path):
    _, cert, key = writeChain(tmp_path)
    # set_options(0) changes nothing and returns the options in force.
    options13 = tls.ServerTLS(cert, key, "1.3").getContext().set_options(0)
    assert options13 & SSL.OP_NO_TLSv1_2
    options12 = tls.ServerTLS(cert, key, "1.2").getContext().set_options(0)
    assert not options12 & SSL.OP_NO_TLSv1_2
    assert options12 & SSL.OP_NO_TLSv1_1
    assert options12 & SSL.OP_NO_COMPRESSION


@pytest.mark.parametrize("case, message", [
    ("missing-cert", "tls.certificate {dir}/none.pem: cannot read it: No such file or directory"),
    ("missing-key", "tls.key {dir}/none.pem: cannot read it: No such file or directory"),
    ("key-as-cert", "tls.certificate {dir}/key.pem: no PEM certificate in it"),
    ("cert-as-key", "tls.key {dir}/cert.pem: not a valid PEM private key ("),
    ("other-key", "tls.key {dir}/other-key.pem: does not match tls.certificate {dir}/cert.pem ("),
])
def test_setup_errors_are_one_line_without_key_material(tmp_path, case, message):
    _, cert, key = writeChain(tmp_path)
    other = trustme.CA().issue_cert("other.test")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    paths = {
        "missing-cert": (str(tmp_path / "none.pem"), key),
        "missing-key": (cert, str(tmp_path / "none.pem")),
        "key-as-cert": (key, key),
        "cert-as-key": (cert, cert),
        "other-key": (cert, str(tmp_path / "other-key.pem")),
    }[case]
    with pytest.raises(tls.TLSSetupError) as info:
        tls.ServerTLS(*paths)
    text = str(info.value)
    assert text.startswith(message.format(dir=tmp_path))
    assert "\n" not in text and "PRIVATE KEY" not in text


def test_reload_swaps_the_context_and_keeps_it_on_failure(tmp_path):
    _, cert, key = writeChain(tmp_path, "old.test")
    server = tls.ServerTLS(cert, key)
    old = server.getContext()
    # A broken replacement: the running certificate stays.
    (tmp_path / "cert.pem").write_text("garbage")
    with pytest.raises(tls.TLSSetupError):
        server.reload()
    assert server.getContext() is old
    # A good replacement: new sessions get the new context.
    writeChain(tmp_path, "new.test")
    server.reload()
    assert server.getContext() is not old


def test_wrapImplicit_serves_tls_from_the_first_byte(tmp_path):
    _, cert, key = writeChain(tmp_path)
    factory = protocol.ServerFactory()
    wrapped = tls.wrapImplicit(tls.ServerTLS(cert, key), factory)
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory is factory


def test_sessionDescription_without_tls():
    class Plain:
        def getHandle(self):
            return object()

    assert tls.sessionDescription(Plain()) is None
