"""
DKIM end to end: messages go through the real daemon (twistd relayd) to a
capturing next hop (tests/integration/sink.py), and the bytes that arrive
are verified against the published keys by dkimpy and by OpenDKIM's
opendkim-testmsg, each signature on its own (RSA and Ed25519, two selectors
at once). The keys are published by tests/dnsserver.py: on a loopback port
for dkimpy, and for opendkim-testmsg (which asks the system resolver) on
127.0.0.1:53 of a network namespace of its own, with a resolv.conf
bind-mounted in a mount namespace of its own, so nothing outside the test
sees either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import dkim as dkimpy
import dns.nameserver
import dns.resolver
import pytest

from relayd import dkim
from tests.integration.harness import (
    HOST, HOSTNAME, Relayd, addUser, freePort, makeMessage,
)
from tests.test_dkim_cli import freeUDPPort

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DNS_SERVER = ROOT / "tests" / "dnsserver.py"
OPENDKIM_TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
PASSWORD = "alice's password"
# Bounds the namespace helper's whole run (opendkim-testmsg on a handful of messages).
OPENDKIM_DEADLINE = 120


def signatureFields(message: bytes) -> list[bytes]:
    """The DKIM-Signature fields at the top of ``message``, each with its folded lines."""
    return re.findall(rb"DKIM-Signature:.*?\r\n(?![ \t])", message[:message.find(b"\r\n\r\n") + 2],
                      re.S)


def withoutSignatures(message: bytes) -> bytes:
    for field in signatureFields(message):
        message = message.replace(field, b"", 1)
    return message


def tags(field: bytes) -> dict[str, str]:
    return dkim.parseRecord(field.decode().split(":", 1)[1])


class DNS:
    """tests/dnsserver.py on a loopback port, publishing ``zone``."""

    def __init__(self, zone: dict) -> None:
        self.zone = zone
        self.port = freeUDPPort()
        self.process = subprocess.Popen(
            [sys.executable, str(DNS_SERVER), "--port", str(self.port), "--zone", json.dumps(zone)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert b"listening" in self.process.stdout.readline()

    def txt(self, name: bytes, timeout: float = 5) -> bytes:
        """dkimpy's dnsfunc: the record as published, looked up over DNS."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(HOST, self.port)]
        resolver.lifetime = timeout
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(answer[0].strings)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def dkimpyVerdicts(message: bytes, published: DNS) -> list[bool]:
    """dkimpy's verdict on each signature of ``message``, top first."""
    verifier = dkimpy.DKIM(message)
    verdicts = []
    for i in range(len(signatureFields(message))):
        try:
            verdicts.append(verifier.verify(i, dnsfunc=published.txt))
        except dkimpy.ValidationError:
            verdicts.append(False)
    return verdicts


NAMESPACE_HELPER = r"""
import json, subprocess, sys, time
import dns.resolver
work, zone, python, dnsserver, testmsg = sys.argv[1:6]
names = json.loads(sys.argv[6])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open(work + "/resolv.conf", "w") as f:
    f.write("nameserver 127.0.0.1\n")
subprocess.run(["mount", "--bind", work + "/resolv.conf", "/etc/resolv.conf"], check=True)
server = subprocess.Popen([python, dnsserver, "--port", "53", "--zone", zone],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    resolver = dns.resolver.Resolver()
    resolver.lifetime = 1
    for _ in range(100):  # until the server answers (bounded)
        try:
            resolver.resolve(names[0], "TXT")
            break
        except Exception:
            time.sleep(0.1)
    results = {}
    for path in sys.argv[7:]:
        with open(path, "rb") as f:
            done = subprocess.run([testmsg], stdin=f, capture_output=True, timeout=60)
        results[path] = [done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")]
    print(json.dumps(results))
finally:
    server.terminate()
    server.wait(10)
"""


def opendkimVerdicts(tmp_path: Path, zone: dict, messages: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    """
    opendkim-testmsg's exit status and output for each message (name ->
    bytes), looking the keys up in ``zone`` through the system resolver,
    inside namespaces of its own.
    """
    if os.geteuid() != 0:
        pytest.skip("opendkim-testmsg asks the system resolver: the test needs root for a "
                    "private network and mount namespace (CI runs as root)")
    if not os.access(OPENDKIM_TESTMSG, os.X_OK):
        pytest.skip(f"{OPENDKIM_TESTMSG} is not installed (Debian package opendkim-tools; "
                    ".ci/run installs it)")
    work = tmp_path / "opendkim"
    work.mkdir()
    paths = []
    for name, data in messages.items():
        path = work / f"{name}.eml"
        path.write_bytes(data)
        paths.append(str(path))
    helper = work / "verify.py"
    helper.write_text(NAMESPACE_HELPER)
    done = subprocess.run(
        ["unshare", "--mount", "--net", sys.executable, str(helper), str(work), json.dumps(zone),
         sys.executable, str(DNS_SERVER), OPENDKIM_TESTMSG, json.dumps(sorted(zone)), *paths],
        capture_output=True, text=True, timeout=OPENDKIM_DEADLINE)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    return {Path(p).stem: tuple(v) for p, v in found.items()}


def eachSignatureAlone(message: bytes) -> list[bytes]:
    """One copy of ``message`` per signature, with only that one (the others are not in h=)."""
    fields = signatureFields(message)
    rest = withoutSignatures(message)
    return [field + rest for field in fields]


# The daemon ------------------------------------------------------------------------


class DKIMRelayd(Relayd):
    """A loopback listener with optional AUTH, alice bound to alice@example.com, and dkim:."""

    dkimSection = ""

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "tcp:{self.port}:interface={HOST}", tls: none, auth: optional,'
            f" plaintext_auth: true}}\n"
            f"auth: {{password_file: passwd, senders: {{alice: [alice@example.com]}}}}\n"
            f"queue: {{directory: {self.spool}, retry: {{min: 1s, max: 2s}}}}\n"
            f"delivery: {{smarthosts: [{{host: {HOST}, port: {smarthostPort}, tls: none}}]}}\n"
            f"shutdown_grace: 5s\n"
            f"{self.dkimSection}"
        )


def keys(directory: Path, *specs: tuple[str, str]) -> dict[str, dkim.PrivateKey]:
    """New keys (selector, kind) written as SELECTOR.example.com.key."""
    found = {}
    for selector, kind in specs:
        data = dkim.newPrivateKey(kind)
        (directory / f"{selector}.example.com.key").write_bytes(data)
        found[selector] = dkim.parsePrivateKey(data)
    return found


def dkimSection(*selectors: str) -> str:
    entries = "".join(f"      - {{selector: {s}, key: {s}.example.com.key}}\n" for s in selectors)
    return f"dkim:\n  domains:\n    example.com:\n{entries}"


def zoneFor(published: dict[str, dkim.PrivateKey]) -> dict:
    return {dkim.recordName(s, "example.com"): {"TXT": [k.record()]} for s, k in published.items()}


def startDaemon(tmp_path, processes, sinkPort, selectors, published) -> DKIMRelayd:
    directory = tmp_path / "relayd"
    directory.mkdir()
    (directory / "passwd").touch()
    addUser(directory / "passwd", "alice", PASSWORD)
    published.update(keys(directory, *selectors))
    DKIMRelayd.dkimSection = dkimSection(*(s for s, _ in selectors))
    daemon = DKIMRelayd(directory, sinkPort)
    processes.append(daemon)
    return daemon.start()


def send(daemon: Relayd, message: bytes, sender: str = "alice@example.com",
         login: bool = False, eightBit: bool = False) -> str:
    with daemon.connect() as client:
        client.ehlo()
        if login:
            client.login("alice", PASSWORD)
        options = ["BODY=8BITMIME"] if eightBit else []
        code, reply = client.mail(sender, options)
        assert code == 250, reply
        assert client.rcpt("bob@remote.test")[0] == 250
        code, reply = client.data(message)
        assert code == 250, (code, reply, daemon.describe())
        return reply.decode().rsplit(" ", 1)[1]


def message(subject: str, lines: list[str], sender: str = "alice@example.com") -> bytes:
    return makeMessage(subject, lines, sender=sender)


def test_signed_mail_verifies_with_dkimpy_and_opendkim_after_the_daemon(tmp_path, processes, sink):
    published: dict[str, dkim.PrivateKey] = {}
    daemon = startDaemon(tmp_path, processes, sink.port, [("r1", "rsa"), ("e1", "ed25519")],
                         published)
    eightBit = ("From: Alice <alice@example.com>\r\nTo: bob@remote.test\r\nSubject: caf\u00e9\r\n"
                "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nMessage-ID: <8bit@example.com>\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n"
                "Gr\u00fc\u00dfe aus K\u00f6ln, \u65e5\u672c\u8a9e  and  trailing  space \r\n"
                "\r\n\r\n").encode("utf-8")
    dots = [".", "..", ".leading", "...three", "a.", " .", ".\t", "", ".", "end."]
    big = ["%06d %s" % (i, "0123456789abcdefghijklmnopqrstuvwxyz " * 2) for i in range(12_800)]
    submitted = {
        "plain": message("plain", ["Hello,", "", "a plain message.  Two  spaces.", ""]),
        "eightbit": eightBit,
        "dots": message("dot heavy", dots),
        "big": message("one megabyte", big),
    }
    assert len(submitted["big"]) > 1_000_000
    ids = {name: send(daemon, data, eightBit=(name == "eightbit"))
           for name, data in submitted.items()}
    unsignedIds = {
        "nokey": send(daemon, message("no key", ["x"], sender="carol@other.example"),
                      sender="carol@other.example"),
        "forged": send(daemon, message("forged", ["x"], sender="ceo@example.com"), login=True),
    }
    ids["login"] = send(daemon, message("login", ["signed for alice"]), login=True)
    submitted["login"] = message("login", ["signed for alice"])
    received = sink.waitForMessages(len(ids) + len(unsignedIds), daemon.describe)
    bySubject = {}
    for delivered in received:
        subject = re.search(rb"(?m)^Subject: (.*)\r$", delivered.content).group(1)
        bySubject[subject] = delivered.content
    arrived = {name: bySubject[re.search(rb"(?m)^Subject: (.*)\r$", data).group(1)]
               for name, data in submitted.items()}

    dnsServer = DNS(zoneFor(published))
    try:
        for name, data in arrived.items():
            fields = signatureFields(data)
            assert [tags(f)["s"] for f in fields] == ["r1", "e1"], name
            assert [tags(f)["a"] for f in fields] == ["rsa-sha256", "ed25519-sha256"]
            assert all(tags(f)["c"] == "relaxed/relaxed" and tags(f)["d"] == "example.com"
                       for f in fields)
            # What was signed is what arrived: the signatures, relayd's
            # Received: field, then the submitted message byte for byte.
            rest = withoutSignatures(data)
            assert rest.startswith(b"Received: from client.test") and f"by {HOSTNAME} (relayd)".encode() in rest
            assert rest.endswith(submitted[name]), name
            assert dkimpyVerdicts(data, dnsServer) == [True, True], name
            assert dkimpyVerdicts(eachSignatureAlone(data)[1], dnsServer) == [True], name
            # The receiver's view: a changed body or an added From: fails.
            assert dkimpyVerdicts(data[:-4] + b"X\r\n\r\n", dnsServer) == [False, False], name
        for name in ("nokey", "forged"):
            subject = b"no key" if name == "nokey" else b"forged"
            assert signatureFields(bySubject[subject]) == [], name
    finally:
        dnsServer.stop()

    log = daemon.log()
    for name in ("plain", "eightbit", "dots", "big", "login"):
        assert re.search(rf"(?m){ids[name]}: dkim=signed d=example\.com s=r1,e1$", log), name
    assert f"{unsignedIds['nokey']}: dkim=" not in log
    assert (f"{unsignedIds['forged']}: dkim=unsigned (From: <ceo@example.com> is not an address "
            f"login alice may use)") in log

    alone = {f"{name}-{i}": copy for name, data in arrived.items()
             for i, copy in enumerate(eachSignatureAlone(data))}
    tampered = {"tampered-0": eachSignatureAlone(arrived["plain"])[0].replace(b"plain message",
                                                                               b"plain messagE")}
    verdicts = opendkimVerdicts(tmp_path, zoneFor(published), {**alone, **tampered})
    for name in alone:
        assert verdicts[name] == (0, ""), (name, verdicts[name])
    assert verdicts["tampered-0"][0] != 0 and "signature" in verdicts["tampered-0"][1].lower()


def test_key_rotation_on_reload_signs_new_mail_while_queued_mail_keeps_its_signature(
        tmp_path, processes, sink):
    import signal

    published: dict[str, dkim.PrivateKey] = {}
    sink.stop()  # the next hop is down: the first message waits in the queue, signed
    daemon = startDaemon(tmp_path, processes, sink.port, [("r1", "rsa"), ("e1", "ed25519")],
                         published)
    before = send(daemon, message("before rotation", ["queued across the reload"]))
    daemon.waitForLog(rf"{before}: dkim=signed d=example\.com s=r1,e1$")
    daemon.waitForLog(rf"{before}: to=<bob@remote\.test>.*status=deferred")

    published.update(keys(daemon.directory, ("n1", "ed25519")))
    offset = daemon.logOffset()
    daemon.writeConfig(daemon.configText(sink.port).replace(
        dkimSection("r1", "e1"), dkimSection("n1")))
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"reload: DKIM keys read: 1 for 1 domain \(example\.com s=n1\)", since=offset)
    after = send(daemon, message("after rotation", ["signed with the new selector"]))
    daemon.waitForLog(rf"{after}: dkim=signed d=example\.com s=n1$")
    sink.start()
    received = sink.waitForMessages(2, daemon.describe)
    bySubject = {re.search(rb"(?m)^Subject: (.*)\r$", d.content).group(1): d.content
                 for d in received}
    old, new = bySubject[b"before rotation"], bySubject[b"after rotation"]
    assert [tags(f)["s"] for f in signatureFields(old)] == ["r1", "e1"]
    assert [tags(f)["s"] for f in signatureFields(new)] == ["n1"]
    assert len(re.findall(rf"{before}: dkim=signed", daemon.log())) == 1  # signed once

    dnsServer = DNS(zoneFor(published))
    try:
        assert dkimpyVerdicts(old, dnsServer) == [True, True]
        assert dkimpyVerdicts(new, dnsServer) == [True]
    finally:
        dnsServer.stop()
    verdicts = opendkimVerdicts(tmp_path, zoneFor(published), {
        "old-0": eachSignatureAlone(old)[0], "old-1": eachSignatureAlone(old)[1], "new-0": new})
    assert verdicts == {"old-0": (0, ""), "old-1": (0, ""), "new-0": (0, "")}


def test_a_bad_key_stops_the_start_with_one_line(tmp_path, twistd):
    directory = tmp_path / "relayd"
    directory.mkdir()
    (directory / "passwd").touch()
    (directory / "r1.example.com.key").write_text("not a key\n")
    DKIMRelayd.dkimSection = dkimSection("r1")
    daemon = DKIMRelayd(directory, freePort())
    done = subprocess.run(daemon.command(), cwd=directory, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode != 0
    assert done.stderr == (f"relayd: {daemon.configPath}: dkim.domains.example.com[0].key: "
                           f"{directory}/r1.example.com.key: expected an RSA or Ed25519 private "
                           "key in PEM, got something else\n")
