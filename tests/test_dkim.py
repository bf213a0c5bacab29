"""
DKIM signing (relayd.dkim): the dkim section, key files, who gets signed,
the h= list, signatures that dkimpy verifies, and the scheduler signing a
message once before its first delivery attempt (task.Clock, no threads).
"""

from __future__ import annotations

import base64
import io
import os

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from relayd import dkim
from relayd.config import ConfigError
from relayd.envelope import Envelope, Recipient
from relayd.scheduler import Scheduler
from tests.builders import testConfig
from tests.test_scheduler import FakeCourier, FakeSpool, result

# Made once: RSA key generation is slow.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def writeKey(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def dkimConfig(tmp_path, domains=None, **more):
    if domains is None:
        domains = {"example.com": [
            {"selector": "r1", "key": writeKey(tmp_path / "r1.key", pem(RSA_KEY))},
            {"selector": "e1", "key": writeKey(tmp_path / "e1.key", pem(ED_KEY))}]}
    return testConfig(path=str(tmp_path / "relayd.yaml"), dkim={"domains": domains, **more})


def records(keys) -> dict[bytes, bytes]:
    """The TXT records a zone would publish for ``keys`` (dkimpy's dnsfunc form)."""
    return {f"{k.selector}._domainkey.{k.domain}.".encode(): k.key.record().encode()
            for ks in keys.values() for k in ks}


def verifyAll(message: bytes, published: dict[bytes, bytes]) -> list[bool]:
    verifier = dkimpy.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(verifier.verify(i, dnsfunc=lambda name, timeout=5: published[name]))
        except dkimpy.ValidationError:  # a body hash that does not match
            results.append(False)
    return results


MESSAGE = (b"Received: from client (unknown [127.0.0.1])\r\n\tby relay.test (relayd) with ESMTP id X;"
           b" Mon, 1 Jan 2024 12:00:00 +0000\r\n"
           b"From: Alice <alice@example.com>\r\nTo: bob@remote.test\r\nSubject: hello\r\n"
           b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"caf\xc3\xa9  with  spaces \r\n.leading dot\r\n\r\n")


# The dkim section ----------------------------------------------------------------


def test_domains_are_lower_case_a_labels_and_defaults_apply(tmp_path):
    loaded = testConfig(dkim={"domains": {
        "Example.COM": [{"selector": "R1", "key": "r1.key"}],
        "bücher.example": [{"selector": "s", "key": "/k"}]}})
    assert list(loaded.dkim.domains) == ["example.com", "xn--bcher-kva.example"]
    assert loaded.dkim.domains["example.com"][0].selector == "r1"
    assert loaded.dkim.domains["example.com"][0].key == "/etc/relayd/r1.key"
    assert loaded.dkim.canonicalization == "relaxed/relaxed"
    for name in ("From", "Subject", "Date", "To", "Cc", "Message-ID", "MIME-Version",
                 "Content-Type"):
        assert name in loaded.dkim.oversign
    assert testConfig().dkim is None


@pytest.mark.parametrize("section, problem", [
    ({}, "dkim.domains: expected a mapping of From: domain to a list of {selector, key} "
         "(required), got nothing"),
    ({"domains": {}}, "dkim.domains: expected a mapping of From: domain to a list of "
                      "{selector, key}, got an empty mapping"),
    ({"domains": {"not a domain": [{"selector": "s", "key": "/k"}]}},
     'dkim.domains."not a domain": expected a domain like "example.com", got "not a domain"'),
    ({"domains": {"example.com": []}},
     "dkim.domains.example.com: expected a list of at least one {selector, key}, got an empty list"),
    ({"domains": {"example.com": [{"selector": "s", "key": "/k"}, {"selector": "S", "key": "/j"}]}},
     'dkim.domains.example.com[1].selector: expected each selector once, got "s" again '
     "(also dkim.domains.example.com[0])"),
    ({"domains": {"example.com": [{"selector": "s_1", "key": "/k"}]}},
     "dkim.domains.example.com[0].selector: expected a selector like \"2026a\""),
    ({"domains": {"example.com": [{"selector": "s"}]}},
     "dkim.domains.example.com[0].key: expected the private key file"),
    ({"domains": {"example.com": [{"selector": "s", "key": "/k"}]}, "headers": ["Received"]},
     'dkim.headers[0]: expected a field a signature may cover, got "Received"'),
    ({"domains": {"example.com": [{"selector": "s", "key": "/k"}]}, "headers": ["Subject"],
      "oversign": []},
     "dkim.headers: expected a list that includes From"),
    ({"domains": {"example.com": [{"selector": "s", "key": "/k"}]}, "canonicalization": "loose"},
     "dkim.canonicalization: expected one of relaxed/relaxed, relaxed/simple, simple/relaxed, "
     "simple/simple"),
    ({"domains": {"Example.com": [{"selector": "s", "key": "/k"}],
                  "example.COM": [{"selector": "t", "key": "/k"}]}},
     'dkim.domains.example.COM: expected each domain once, got "example.COM" again'),
])
def test_bad_dkim_sections_are_one_line_naming_file_and_key(section, problem):
    with pytest.raises(ConfigError) as info:
        testConfig(dkim=section)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("/etc/relayd/relayd.yaml: " + problem), text


# Key files -----------------------------------------------------------------------


def test_key_formats_relayd_reads():
    for data, kind in [
        (pem(RSA_KEY), "rsa"),
        (pem(RSA_KEY, serialization.PrivateFormat.TraditionalOpenSSL), "rsa"),
        (pem(ED_KEY), "ed25519"),
        # dkimpy's dknewkey: the Ed25519 seed in base64
        (base64.b64encode(ED_KEY.private_bytes(serialization.Encoding.Raw,
                                               serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption())) + b"\n", "ed25519"),
    ]:
        key = dkim.parsePrivateKey(data)
        assert key.kind == kind
        assert "secret" not in repr(key) and key.secret.decode() not in repr(key)
    rsaKey = dkim.parsePrivateKey(pem(RSA_KEY))
    public = RSA_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert rsaKey.record() == "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    assert rsaKey.bits == 2048


@pytest.mark.parametrize("data, problem", [
    (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
     "expected an RSA key of at least 2048 bits, got 1024 bits"),
    (RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.BestAvailableEncryption(b"pw")),
     "the key is encrypted"),
    (pem(ec.generate_private_key(ec.SECP256R1())), "expected an RSA or Ed25519 private key, got"),
    (b"hello\n", "expected an RSA or Ed25519 private key in PEM, got something else"),
    (b"", "expected an RSA or Ed25519 private key in PEM"),
])
def test_unusable_keys_say_why(data, problem):
    with pytest.raises(ValueError) as info:
        dkim.parsePrivateKey(data)
    assert str(info.value).startswith(problem)


def test_a_missing_or_bad_key_is_one_line_naming_file_key_and_path(tmp_path):
    loaded = dkimConfig(tmp_path, {"example.com": [
        {"selector": "a", "key": writeKey(tmp_path / "a.key", pem(ED_KEY))},
        {"selector": "b", "key": str(tmp_path / "missing.key")}]})
    with pytest.raises(dkim.KeyProblem) as info:
        dkim.loadKeys(loaded)
    assert str(info.value) == (f"{tmp_path}/relayd.yaml: dkim.domains.example.com[1].key: "
                               f"cannot read {tmp_path}/missing.key: No such file or directory")
    (tmp_path / "missing.key").write_bytes(b"junk")
    assert dkim.keyProblems(loaded) == [
        f"{tmp_path}/relayd.yaml: dkim.domains.example.com[1].key: {tmp_path}/missing.key: "
        "expected an RSA or Ed25519 private key in PEM, got something else"]


def test_record_matches_table():
    key = dkim.parsePrivateKey(pem(ED_KEY))
    other = dkim.parsePrivateKey(pem(ed25519.Ed25519PrivateKey.generate()))
    assert dkim.recordMatches(key.record(), key) is None
    # Whitespace inside p= and the tags' order do not matter (RFC 6376 3.2).
    assert dkim.recordMatches(f"k=ed25519; p={key.publicKey[:10]} {key.publicKey[10:]}", key) is None
    assert dkim.recordMatches(other.record(), key) == "p= holds another public key"
    assert dkim.recordMatches(f"v=DKIM1; p={key.publicKey}", key) == "k=rsa, but the key is ed25519"
    assert dkim.recordMatches("v=DKIM1; k=ed25519; p=", key) == "p= is empty (the key is revoked)"


# Who is signed -------------------------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    (b"From: Alice <alice@Example.COM>\r\n", ("alice@example.com", None)),
    (b"From: alice@example.com (Alice)\r\n", ("alice@example.com", None)),
    (b"From: =?utf-8?q?Al=C3=AFce?=\r\n <alice@example.com>\r\n", ("alice@example.com", None)),
    ("From: Jörg <jörg@bücher.example>\r\n".encode(), ("jörg@xn--bcher-kva.example", None)),
    (b"To: bob@remote.test\r\n", (None, "0 From: fields")),
    (b"From: a@example.com\r\nFrom: b@example.com\r\n", (None, "2 From: fields")),
    (b"From: a@example.com, b@example.com\r\n", (None, "the From: field does not hold one address")),
    (b"From: undisclosed\r\n", (None, "the From: field does not hold one address")),
    (b"From: a@exa_mple.com\r\n", (None, "the From: address has no valid domain")),
    (b"From: a@example.com\xff\r\n", (None, "the From: field is not UTF-8")),
])
def test_from_address_table(header, expected):
    assert dkim.fromAddress(header + b"Subject: s\r\n\r\nbody\r\n") == expected


class Auth:
    def __init__(self, senders):
        self.senders = senders

    def sendersFor(self, login):
        return self.senders.get(login)


DOMAINS = {"example.com": (), "xn--bcher-kva.example": ()}


@pytest.mark.parametrize("address, login, senders, expected", [
    # trusted networks and relayd's own notices: any configured domain
    ("anyone@example.com", None, None, ("example.com", None)),
    ("jörg@xn--bcher-kva.example", None, None, ("xn--bcher-kva.example", None)),
    # no key for the domain: unsigned, nothing to say
    ("alice@other.example", None, None, (None, None)),
    ("alice@other.example", "alice", {"alice": ("@other.example",)}, (None, None)),
    (None, None, None, (None, None)),
    # a login: the From: address must be one it may use in MAIL FROM
    ("alice@example.com", "alice", {"alice": ("alice@example.com",)}, ("example.com", None)),
    ("ceo@example.com", "alice", {"alice": ("@example.com",)}, ("example.com", None)),
    ("ceo@example.com", "alice", {"alice": ("alice@example.com",)},
     (None, "From: <ceo@example.com> is not an address login alice may use")),
    ("alice@example.com", "mallory", {"alice": ("@example.com",)},
     (None, "From: <alice@example.com> is not an address login mallory may use")),
    # without an auth.senders entry a login may use only itself, as an address
    ("alice@example.com", "alice@example.com", {}, ("example.com", None)),
    ("bob@example.com", "alice@example.com", {},
     (None, "From: <bob@example.com> is not an address login alice@example.com may use")),
])
def test_signer_domain_table(address, login, senders, expected):
    auth = Auth(senders) if senders is not None else None
    assert dkim.signerDomain(address, login, auth, DOMAINS) == expected


def test_a_login_is_never_signed_once_auth_is_gone():
    assert dkim.signerDomain("alice@example.com", "alice", None, DOMAINS) == (
        None, "From: <alice@example.com> is not an address login alice may use")


@pytest.mark.parametrize("names, headers, oversign, expected", [
    # each signed field as often as it appears, the oversigned once more
    ([b"From", b"To", b"Subject", b"X-Mailer"], ("From", "To", "Subject"), ("From",),
     [b"from", b"from", b"to", b"subject"]),
    ([b"Received", b"From", b"Cc", b"cc"], ("From", "Cc"), ("From", "Cc", "Reply-To"),
     [b"from", b"from", b"cc", b"cc", b"cc", b"reply-to"]),
    ([b"From"], ("From",), (), [b"from"]),
    ([b"Subject"], ("Subject",), ("From",), [b"subject", b"from"]),
])
def test_signed_fields_table(names, headers, oversign, expected):
    assert dkim.signedFields(names, headers, oversign) == expected


# Signing -------------------------------------------------------------------------


def test_both_key_types_sign_one_message_and_dkimpy_verifies_both(tmp_path):
    loaded = dkimConfig(tmp_path)
    keys = dkim.loadKeys(loaded)
    fields = dkim.sign(MESSAGE, keys["example.com"], loaded.dkim)
    signed = fields + MESSAGE
    assert verifyAll(signed, records(keys)) == [True, True]
    text = fields.decode()
    assert "a=rsa-sha256" in text and "a=ed25519-sha256" in text
    assert text.index("s=r1;") < text.index("s=e1;")  # the config's order, first on top
    assert "c=relaxed/relaxed" in text
    h = "".join(text.split("h=")[1].split(";")[0].split())
    assert h.startswith("from:from:subject:subject:date:date:message-id:message-id:to:to:cc:"
                        "mime-version:mime-version:content-type:content-type"), h
    # one byte of the body changed: the signatures fail
    assert verifyAll(signed.replace(b"leading dot", b"leading dog"), records(keys)) == [False, False]
    # an added Subject (oversigned) breaks them too
    assert verifyAll(fields + b"Subject: forged\r\n" + MESSAGE, records(keys)) == [False, False]


def test_sign_queued_decides_per_login_and_domain(tmp_path):
    loaded = dkimConfig(tmp_path)
    keys = dkim.loadKeys(loaded)
    auth = Auth({"alice": ("alice@example.com",), "bob": ("bob@example.com",)})
    outcome = dkim.signQueued(MESSAGE, "alice", auth, keys, loaded.dkim)
    assert (outcome.domain, outcome.selectors) == ("example.com", ("r1", "e1"))
    assert verifyAll(outcome.fields + MESSAGE, records(keys)) == [True, True]
    refused = dkim.signQueued(MESSAGE, "bob", auth, keys, loaded.dkim)
    assert refused == dkim.Outcome(reason="From: <alice@example.com> is not an address login bob may use")
    other = dkim.signQueued(MESSAGE.replace(b"alice@example.com", b"alice@other.example"),
                            None, None, keys, loaded.dkim)
    assert other == dkim.Outcome()
    noFrom = dkim.signQueued(MESSAGE.replace(b"From:", b"X-From:"), None, None, keys, loaded.dkim)
    assert noFrom == dkim.Outcome(reason="0 From: fields, nothing to sign for")


def test_with_signature_sends_the_fields_then_the_body():
    opened = []

    def openBody():
        f = io.BytesIO(b"Subject: x\r\n\r\nbody\r\n")
        opened.append(f)
        return f

    assert dkim.withSignature("", openBody) is openBody
    assert dkim.withSignature(None, openBody) is openBody
    with dkim.withSignature("DKIM-Signature: v=1\r\n", openBody)() as f:
        assert f.read(5) == b"DKIM-"
        assert f.read() == b"Signature: v=1\r\nSubject: x\r\n\r\nbody\r\n"
    assert opened[-1].closed


# The scheduler signs once, before the first attempt ------------------------------


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def captured():
    lines = []

    def observer(event):
        if event.get("log_namespace", "").startswith("relayd/"):
            lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    return lines, lambda: globalLogPublisher.removeObserver(observer)


class BodyCourier(FakeCourier):
    """Also keeps the bytes each attempt would send, and the size it was told."""

    def __init__(self, clock):
        super().__init__(clock)
        self.sent = []

    def deliver(self, hops, sender, mailParams, recipients, openBody, size, **more):
        with openBody() as f:
            self.sent.append((f.read(), size))
        return super().deliver(hops, sender, mailParams, recipients, openBody, size, **more)


def schedulerWith(loaded, spool, courier, clock, signer):
    s = Scheduler(spool, courier, loaded, clock, random=lambda: 0.5, runInThread=inline,
                  signer=signer)
    s.startService()
    return s


def test_signed_once_before_the_first_attempt_and_kept_after_a_key_rotation(tmp_path):
    loaded = dkimConfig(tmp_path)
    signer = dkim.Signer(loaded, inline)
    keys = signer.keys
    clock = task.Clock()
    spool, courier = FakeSpool(), BodyCourier(clock)
    spool.bodies["Q"] = MESSAGE
    envelope = Envelope(queueId="0123456789ABCDEF", sender="alice@example.com",
                        recipients=[Recipient("bob@remote.test")], arrival=0.0, size=len(MESSAGE))
    spool.bodies[envelope.queueId] = MESSAGE
    courier.script = [[450]]  # the first attempt is deferred
    lines, stop = captured()
    try:
        s = schedulerWith(loaded, spool, courier, clock, signer)
        s.add(envelope)
        # the deferred attempt's update stores the signature it sent
        assert spool.events == [("update", envelope.queueId)]
        assert spool.stored[envelope.queueId].dkim == envelope.dkim
        first, size = courier.sent[0]
        assert first == envelope.dkim.encode() + MESSAGE and size == len(first)
        assert verifyAll(first, records(keys)) == [True, True]
        assert [l for l in lines if "dkim=" in l] == [
            f"{envelope.queueId}: dkim=signed d=example.com s=r1,e1"]
        # a reload rotates to a new selector; the queued message keeps its signature
        newKey = writeKey(tmp_path / "n1.key", pem(ed25519.Ed25519PrivateKey.generate()))
        rotated = dkimConfig(tmp_path, {"example.com": [{"selector": "n1", "key": newKey}]})
        signer.reconfigure(rotated)
        assert list(signer.keys) == ["example.com"] and signer.keys["example.com"][0].selector == "n1"
        courier.script = [[250]]
        clock.advance(3600)
        second, _ = courier.sent[1]
        assert second == first
        assert len([l for l in lines if "dkim=signed" in l]) == 1
        # a new message gets the new selector
        fresh = Envelope(queueId="0123456789ABCDEG", sender="alice@example.com",
                         recipients=[Recipient("bob@remote.test")], arrival=clock.seconds(),
                         size=len(MESSAGE), nextAttempt=clock.seconds())
        spool.bodies[fresh.queueId] = MESSAGE
        courier.script = [[250]]
        s.add(fresh)
        assert "s=n1;" in fresh.dkim and "s=r1;" not in fresh.dkim
    finally:
        stop()


def test_a_message_delivered_at_its_first_attempt_is_signed_without_an_envelope_write(tmp_path):
    # Its removal stays one unlink: no update file is written for the signature.
    loaded = dkimConfig(tmp_path)
    signer = dkim.Signer(loaded, inline)
    clock = task.Clock()
    spool, courier = FakeSpool(), BodyCourier(clock)
    envelope = Envelope(queueId="0123456789ABCDEF", sender="alice@example.com",
                        recipients=[Recipient("bob@remote.test")], arrival=0.0, size=len(MESSAGE))
    spool.bodies[envelope.queueId] = MESSAGE
    courier.script = [[250]]
    schedulerWith(loaded, spool, courier, clock, signer).add(envelope)
    sent, size = courier.sent[0]
    assert sent == envelope.dkim.encode() + MESSAGE and size == len(sent)
    assert verifyAll(sent, records(signer.keys)) == [True, True]
    assert spool.events == [("remove", envelope.queueId)]


def test_unsigned_mail_is_sent_as_it_is_and_the_refusal_is_logged(tmp_path):
    loaded = testConfig(path=str(tmp_path / "relayd.yaml"),
                        auth={"password_file": "/p", "senders": {"bob": ["@other.example"]}},
                        dkim={"domains": {"example.com": [
                            {"selector": "e1", "key": writeKey(tmp_path / "e1.key", pem(ED_KEY))}]}})
    signer = dkim.Signer(loaded, inline)
    clock = task.Clock()
    spool, courier = FakeSpool(), BodyCourier(clock)
    envelope = Envelope(queueId="0123456789ABCDEF", sender="bob@other.example",
                        recipients=[Recipient("carol@remote.test")], arrival=0.0,
                        size=len(MESSAGE), authIdentity="bob")
    spool.bodies[envelope.queueId] = MESSAGE
    courier.script = [[250]]
    lines, stop = captured()
    try:
        schedulerWith(loaded, spool, courier, clock, signer).add(envelope)
    finally:
        stop()
    assert courier.sent == [(MESSAGE, len(MESSAGE))]
    assert envelope.dkim == ""
    assert [l for l in lines if "dkim=" in l] == [
        f"{envelope.queueId}: dkim=unsigned (From: <alice@example.com> is not an address "
        f"login bob may use)"]


def test_without_a_dkim_section_nothing_is_read_or_stored(tmp_path):
    loaded = testConfig()
    signer = dkim.Signer(loaded, lambda *a: pytest.fail("no thread work without keys"))
    clock = task.Clock()
    spool, courier = FakeSpool(), BodyCourier(clock)
    envelope = Envelope(queueId="0123456789ABCDEF", sender="a@example.com",
                        recipients=[Recipient("b@remote.test")], arrival=0.0, size=len(MESSAGE))
    spool.bodies[envelope.queueId] = MESSAGE
    courier.script = [[250]]
    schedulerWith(loaded, spool, courier, clock, signer).add(envelope)
    assert courier.sent == [(MESSAGE, len(MESSAGE))] and envelope.dkim is None


def test_a_reload_with_a_bad_key_keeps_the_running_keys(tmp_path):
    loaded = dkimConfig(tmp_path)
    signer = dkim.Signer(loaded, inline)
    broken = dkimConfig(tmp_path, {"example.com": [{"selector": "x",
                                                    "key": str(tmp_path / "gone.key")}]})
    lines, stop = captured()
    try:
        signer.reconfigure(broken)
    finally:
        stop()
    assert [k.selector for k in signer.keys["example.com"]] == ["r1", "e1"]
    assert lines == [f"reload: {tmp_path}/relayd.yaml: dkim.domains.example.com[0].key: cannot "
                     f"read {tmp_path}/gone.key: No such file or directory; keeping the running "
                     f"DKIM keys"]


def test_the_signature_survives_the_envelope_file(tmp_path):
    envelope = Envelope(queueId="0123456789ABCDEF", sender="a@example.com",
                        recipients=[Recipient("b@remote.test")], arrival=0.0,
                        dkim="DKIM-Signature: v=1; a=ed25519-sha256;\r\n b=xyz\r\n")
    assert Envelope.fromJSON(envelope.toJSON()).dkim == envelope.dkim
    old = envelope.toJSON()
    del old["dkim"]  # written before relayd signed
    assert Envelope.fromJSON(old).dkim is None
    with pytest.raises(ValueError, match="dkim is"):
        Envelope.fromJSON({**envelope.toJSON(), "dkim": 5})


def test_the_daemon_refuses_to_start_on_a_bad_key_with_one_line(tmp_path, capsys):
    from relayd import tap

    (tmp_path / "r1.key").write_bytes(b"not a key")
    path = tmp_path / "relayd.yaml"
    path.write_text(
        "hostname: relay.test\n"
        "listeners: [{endpoint: 'tcp:0:interface=127.0.0.1', tls: none, auth: none}]\n"
        f"queue: {{directory: {tmp_path / 'spool'}}}\n"
        "dkim: {domains: {example.com: [{selector: r1, key: r1.key}]}}\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit):
        tap.makeService(options, reactor=task.Clock())
    err = capsys.readouterr().err
    assert err == (f"relayd: {path}: dkim.domains.example.com[0].key: {tmp_path}/r1.key: "
                   "expected an RSA or Ed25519 private key in PEM, got something else\n")


def test_check_config_names_a_bad_key_as_the_daemon_would(tmp_path):
    from relayd import tap

    loaded = dkimConfig(tmp_path, {"example.com": [{"selector": "r1",
                                                    "key": str(tmp_path / "nope.key")}]})
    assert f"{tmp_path}/relayd.yaml: dkim.domains.example.com[0].key: cannot read " \
           f"{tmp_path}/nope.key: No such file or directory" in tap.startupProblems(loaded)
