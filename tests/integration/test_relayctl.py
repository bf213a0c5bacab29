"""
relayctl against the real daemon: every verb while it runs, then what still
works (list, show) and what says so clearly (the rest) once it is stopped.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Relayd, Sink, childEnvironment, makeMessage, twistdPath

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def relayctl(daemon: Relayd, *args: str) -> subprocess.CompletedProcess:
    """The console script installed beside the twistd under test, else the module from this tree."""
    script = twistdPath().parent / "relayctl"
    env = childEnvironment()
    if script.exists():
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "relayd.cli.relayctl"]
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(command + ["-c", str(daemon.configPath), *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=daemon.directory)


def ok(daemon: Relayd, *args: str) -> str:
    result = relayctl(daemon, *args)
    assert result.returncode == 0, f"relayctl {' '.join(args)}: {result.returncode}\n{result.stderr}\n{daemon.describe()}"
    assert result.stderr == ""
    return result.stdout


def test_every_verb_against_a_running_daemon_then_stopped(tmp_path, processes, twistd):
    # The smarthost is down at first, so everything stays queued.
    sink = Sink(tmp_path / "sink")
    processes.append(sink)
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()

    ids = {}
    for name in ("held", "bounced", "deleted"):
        ids[name] = daemon.submit(makeMessage(f"relayctl {name}", ["body"]))
    for qid in ids.values():
        daemon.waitForLog(rf"{qid}: to=<bob@remote\.test>.*status=deferred")

    listing = ok(daemon, "list")
    for qid in ids.values():
        assert re.search(rf"^{qid}[ *] +\d+ \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d  alice@client\.test$",
                         listing, re.M), listing
    assert re.search(r"^\(.*Connection refused.*\)$", listing, re.M), listing
    assert re.search(r"^ {48}bob@remote\.test$", listing, re.M), listing
    assert listing.rstrip().endswith("Kbytes in 3 Requests."), listing
    rows = [json.loads(line) for line in ok(daemon, "list", "--json").splitlines()]
    assert sorted(r["queue_id"] for r in rows) == sorted(ids.values())
    assert all(r["sender"] == "alice@client.test" and r["recipients"][0]["address"] == "bob@remote.test"
               for r in rows)

    shown = ok(daemon, "show", ids["held"], "--body")
    assert f"Queue ID:     {ids['held']}" in shown
    assert re.search(r"^  bob@remote\.test  pending  dsn=4\.\d\.\d", shown, re.M), shown
    assert "History:" in shown and "status=deferred" in shown
    assert "Subject: relayctl held" in shown
    unknown = relayctl(daemon, "show", "0000000000000000")
    assert unknown.returncode == 1
    assert unknown.stderr == "relayctl: 0000000000000000: no such message in the queue\n"

    before = daemon.logOffset()
    # (An attempt may be in progress: retries come every few seconds here.)
    assert re.fullmatch(rf"{ids['held']}: placed on hold( \(.*\))?\n{ids['bounced']}: placed on hold( \(.*\))?\n",
                        ok(daemon, "hold", ids["held"], ids["bounced"]))
    daemon.waitForLog(rf"{ids['held']}: placed on hold by admin", since=before)
    assert re.search(rf"^{ids['held']}! ", ok(daemon, "list"), re.M)

    result = relayctl(daemon, "delete", ids["deleted"], "0000000000000000")
    assert result.returncode == 1
    assert re.fullmatch(rf"{ids['deleted']}: removed( \(an attempt in progress may still deliver it\))?\n",
                        result.stdout)
    assert result.stderr == "relayctl: 0000000000000000: no such message in the queue\n"
    daemon.waitForLog(rf"{ids['deleted']}: removed by admin", since=before)
    assert ids["deleted"] not in ok(daemon, "list")

    assert ok(daemon, "bounce", ids["bounced"]) == f"{ids['bounced']}: returned to sender\n"
    notice = daemon.waitForLog(rf"{ids['bounced']}: sender non-delivery notification: ([0-9A-Z]{{16}})",
                               since=before).group(1)
    daemon.waitForLog(rf"{ids['bounced']}: removed$", since=before)

    # The smarthost comes back: flush sends the bounce now, not at its next retry.
    sink.start()
    flushed = ok(daemon, "flush")
    assert re.fullmatch(r"\d+ messages? scheduled for delivery now\n", flushed), flushed
    [delivered] = sink.waitForMessages(1, daemon.describe)
    assert delivered.envelope["mail_from"] in ("", "<>")  # aiosmtpd records the null sender as "<>"
    assert delivered.envelope["rcpt_tos"] == ["alice@client.test"]
    report = email.message_from_bytes(delivered.content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    _, status, original = report.iter_parts()
    blocks = status.get_payload()
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.0.0"
    assert original.get_payload()[0]["Subject"] == "relayctl bounced"
    daemon.waitForLog(rf"{notice}: removed$", since=before)

    # The held message stays until released; release delivers it.
    assert ok(daemon, "release", ids["held"]) == f"{ids['held']}: released from hold\n"
    sink.waitForMessages(2, daemon.describe)
    daemon.waitForLog(rf"{ids['held']}: removed$", since=before)
    assert ok(daemon, "list") == "Mail queue is empty\n"

    # requeue: a held message goes back to the schedule at once.
    last = daemon.submit(makeMessage("relayctl requeue", ["body"]))
    sink.stop()
    # (The message may already be delivered before the sink stopped.)
    held = relayctl(daemon, "hold", last)
    if held.returncode == 0:
        sink.start()
        assert ok(daemon, "requeue", last) == f"{last}: requeued\n"
        daemon.waitForLog(rf"{last}: requeued by admin", since=before)
        daemon.waitForLog(rf"{last}: removed$", since=before)
    else:
        assert "no such message" in held.stderr
        sink.start()
    assert ok(daemon, "requeue") == "0 messages requeued\n"

    # Stopped: list and show read the spool; the rest say the daemon is not running.
    sink.stop()
    kept = daemon.submit(makeMessage("relayctl stopped", ["body"]))
    ok(daemon, "hold", kept)
    assert daemon.terminate() == 0
    assert re.search(rf"^{kept}! ", ok(daemon, "list"), re.M)
    assert f"Queue ID:     {kept}" in ok(daemon, "show", kept)
    for verb in ("flush", "hold", "release", "delete", "bounce", "requeue"):
        result = relayctl(daemon, verb, kept)
        assert result.returncode == 1, verb
        assert result.stderr.startswith("relayctl: relayd is not running (nothing answers on "), result.stderr
        assert result.stderr.count("\n") == 1
    assert not (daemon.spool / "control.sock").exists()

    # Usage errors: one line, status 2; a bad id: one line, status 1.
    result = relayctl(daemon, "hold")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    result = relayctl(daemon, "show", "not-an-id")
    assert result.returncode == 1
    assert result.stderr == "relayctl: 'not-an-id' is not a queue id (16 characters, as `relayctl list` shows)\n"


def test_raw_client_with_thousands_of_ids_gets_an_error_not_a_dropped_connection(
        tmp_path, processes, twistd):
    """
    Over the real control socket: a request naming 3,000 ids is answered
    with one AMP error, the connection carries the next request, and the
    daemon logs no traceback.
    """
    import socket
    import struct

    sink = Sink(tmp_path / "sink")
    processes.append(sink)
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    before = daemon.logOffset()

    def pair(key: bytes, value: bytes) -> bytes:
        return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value

    ids = b"".join(struct.pack("!H", 16) + f"{i:016d}".encode() for i in range(3000))
    from relayd.cli.relayctl import _readBox

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.spool / "control.sock"))
        sock.sendall(pair(b"_command", b"hold") + pair(b"_ask", b"1") + pair(b"ids", ids) + b"\0\0")
        answer = _readBox(sock)
        assert answer[b"_error_code"] == b"TOO_MANY_IDS", answer
        assert b"at most 250" in answer[b"_error_description"]
        sock.sendall(pair(b"_command", b"status") + pair(b"_ask", b"2") + b"\0\0")
        answer = _readBox(sock)
        assert answer[b"_answer"] == b"2" and answer[b"messages"] == b"0"
    ok(daemon, "list")
    log = daemon.log(before)
    assert "Traceback" not in log and "Unhandled" not in log, log
