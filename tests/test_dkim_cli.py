"""
``relayd dkim keygen`` and ``relayd dkim check``: the key file and the record
keygen prints, and check against a real DNS server (tests/dnsserver.py on
loopback, reached through delivery.dns.servers).
"""

from __future__ import annotations

import io
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import dkim
from relayd.cli.main import run
from tests.conftest import freeUDPPort

ROOT = Path(__file__).resolve().parent.parent


def relayd(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(list(args), out, err)
    return status, out.getvalue(), err.getvalue()


def publishedText(zoneLine: str) -> str:
    """The TXT text of a zone line ( "a" "b" ) as a resolver hands it back: the strings joined."""
    return "".join(re.findall(r'"([^"]*)"', zoneLine))


@pytest.mark.parametrize("kind, bits", [("rsa", 2048), ("ed25519", 256)])
def test_keygen_writes_an_owner_only_key_and_prints_its_record(tmp_path, kind, bits):
    status, out, err = relayd("dkim", "keygen", "Example.COM", "2026a", "--type", kind,
                              "--out", str(tmp_path))
    assert status == 0, err
    path = tmp_path / "2026a.example.com.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = dkim.readPrivateKey(str(path))
    assert (key.kind, key.bits) == (kind, bits)
    line = out.strip()
    assert "\n" not in line
    assert line.startswith("2026a._domainkey.example.com. IN TXT ( \"v=DKIM1; k=" + kind)
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line))
    assert dkim.recordMatches(publishedText(line), key) is None
    assert err == (f"relayd: wrote {path} ({kind}, {bits} bits); publish this TXT record, then "
                   f"add {{selector: \"2026a\", key: {path}}} under dkim.domains.example.com\n")


def test_keygen_defaults_to_rsa_in_the_current_directory_and_takes_idn_domains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, _ = relayd("dkim", "keygen", "bücher.example", "s1")
    assert status == 0
    assert dkim.readPrivateKey(str(tmp_path / "s1.xn--bcher-kva.example.key")).kind == "rsa"
    assert out.startswith("s1._domainkey.xn--bcher-kva.example. IN TXT")


@pytest.mark.parametrize("args, error", [
    (["dkim", "keygen", "exa mple.com", "s1"],
     "relayd: DOMAIN: expected a domain like example.com, got 'exa mple.com'\n"),
    (["dkim", "keygen", "example.com", "s_1"],
     "relayd: SELECTOR: expected a selector like 2026a (letters, digits, '-', dots between "
     "labels), got 's_1'\n"),
    (["dkim", "keygen", "example.com", "s1", "--out", "/nonexistent/dir"],
     "relayd: cannot create /nonexistent/dir/s1.example.com.key: No such file or directory\n"),
])
def test_keygen_refuses_bad_arguments_with_one_line(args, error):
    status, out, err = relayd(*args)
    assert (status, out, err) == (1, "", error)


@pytest.mark.parametrize("args, start", [
    (["dkim"], "relayd: the following arguments are required: ACTION; usage: "),
    (["dkim", "keygen", "example.com"], "relayd: the following arguments are required: SELECTOR; "),
    (["dkim", "keygen", "example.com", "s1", "--type", "dsa"],
     "relayd: argument --type: invalid choice: 'dsa' (choose from 'rsa', 'ed25519'); "),
    (["dkim", "rotate"], "relayd: argument ACTION: invalid choice: 'rotate'"),
])
def test_dkim_usage_errors_are_one_line(args, start):
    status, out, err = relayd(*args)
    assert status == 2 and out == ""
    assert err.startswith(start) and err.count("\n") == 1, err
    assert "relayd dkim keygen DOMAIN SELECTOR" in err


def test_keygen_never_overwrites_a_key(tmp_path):
    assert relayd("dkim", "keygen", "example.com", "s1", "--out", str(tmp_path))[0] == 0
    before = (tmp_path / "s1.example.com.key").read_bytes()
    status, out, err = relayd("dkim", "keygen", "example.com", "s1", "--out", str(tmp_path))
    assert (status, out) == (1, "")
    assert err == (f"relayd: {tmp_path}/s1.example.com.key exists; relayd never overwrites a key "
                   "(remove it, or pick another selector)\n")
    assert (tmp_path / "s1.example.com.key").read_bytes() == before


# check -----------------------------------------------------------------------------





def keysAndConfig(tmp_path, dnsPort):
    for selector, kind in (("r1", "rsa"), ("e1", "ed25519"), ("x1", "ed25519")):
        assert relayd("dkim", "keygen", "example.com", selector, "--type", kind,
                      "--out", str(tmp_path))[0] == 0
    path = tmp_path / "relayd.yaml"
    path.write_text(
        "hostname: relay.test\n"
        "listeners: [{endpoint: 'tcp:2525', tls: none, auth: none}]\n"
        f"queue: {{directory: {tmp_path / 'spool'}}}\n"
        f"delivery: {{dns: {{servers: ['127.0.0.1:{dnsPort}'], timeout: 3s}}}}\n"
        "dkim:\n  domains:\n    example.com:\n"
        "      - {selector: r1, key: r1.example.com.key}\n"
        "      - {selector: e1, key: e1.example.com.key}\n"
        "      - {selector: x1, key: x1.example.com.key}\n")
    return path, {s: dkim.readPrivateKey(str(tmp_path / f"{s}.example.com.key"))
                  for s in ("r1", "e1", "x1")}


def test_check_says_which_records_match_their_keys(tmp_path, dnsServer):
    # The zone is filled in once the keys exist: the server is started after them.
    port = freeUDPPort()
    path, keys = keysAndConfig(tmp_path, port)
    other = dkim.parsePrivateKey(dkim.newPrivateKey("ed25519"))
    zone = {"r1._domainkey.example.com": {"TXT": [keys["r1"].record()]},
            "e1._domainkey.example.com": {"TXT": [other.record()]}}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "dnsserver.py"), "--port", str(port),
         "--zone", json.dumps(zone)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert b"listening" in proc.stdout.readline()
        status, out, err = relayd("dkim", "check", "--config", str(path), "example.com")
        only, onlyOut, _ = relayd("dkim", "check", "-c", str(path), "--selector", "r1",
                                  "EXAMPLE.com")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (status, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == f"r1._domainkey.example.com: matches {tmp_path}/r1.example.com.key (rsa, 2048 bits)"
    assert lines[1].startswith(f"e1._domainkey.example.com: does not match {tmp_path}/e1.example.com.key: "
                               "p= holds another public key; publish: e1._domainkey.example.com. IN TXT")
    assert lines[2].startswith("x1._domainkey.example.com: no such name (NXDOMAIN): the record is "
                               "not published; publish: x1._domainkey.example.com. IN TXT")
    assert len(lines) == 3
    # the RSA record, longer than 255 bytes, came back as several strings and still matched
    assert len(keys["r1"].record()) > 255
    assert (only, onlyOut.count("\n")) == (0, 1)


def test_check_refuses_what_it_cannot_check_with_one_line(tmp_path, dnsServer):
    port = dnsServer({})
    path, _ = keysAndConfig(tmp_path, port)
    status, out, err = relayd("dkim", "check", "--config", str(path), "other.example")
    assert (status, out) == (1, "")
    assert err == f"relayd: {path}: dkim.domains has no other.example, so nothing signs for it\n"
    status, _, err = relayd("dkim", "check", "--config", str(path), "--selector", "zz", "example.com")
    assert err == f"relayd: {path}: dkim.domains.example.com has no selector zz\n"
    (tmp_path / "e1.example.com.key").unlink()
    status, _, err = relayd("dkim", "check", "--config", str(path), "example.com")
    assert err == (f"relayd: {path}: dkim.domains.example.com[1].key: cannot read "
                   f"{tmp_path}/e1.example.com.key: No such file or directory\n")
    status, _, err = relayd("dkim", "check", "--config", str(tmp_path / "none.yaml"), "example.com")
    assert err == f"relayd: {tmp_path}/none.yaml: cannot read the file: No such file or directory\n"
