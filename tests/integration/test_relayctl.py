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
import time
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


def test_bulk_verbs_select_by_sender_and_all(tmp_path, processes, twistd):
    # The smarthost is down: everything stays queued.
    sink = Sink(tmp_path / "sink")
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    spam = [daemon.submit(makeMessage(f"spam {i}", ["x"], sender="spam@bad.test"),
                          sender="spam@bad.test") for i in range(2)]
    good = daemon.submit(makeMessage("good", ["y"]), sender="alice@client.test")
    for qid in spam + [good]:
        daemon.waitForLog(rf"{qid}: to=<bob@remote\.test>.*status=deferred")

    # (A retry may be under way at that moment: the outcome then says so after these words.)
    out = ok(daemon, "hold", "--sender", "@bad.test")
    assert sorted(line[:len("0123456789ABCDEF: placed on hold")] for line in out.splitlines()) == sorted(
        f"{qid}: placed on hold" for qid in spam), out
    held = {json.loads(line)["queue_id"] for line in ok(daemon, "list", "--json").splitlines()
            if json.loads(line)["queue_name"] == "hold"}
    assert held == set(spam)

    out = ok(daemon, "delete", "ALL")
    assert sorted(line[:len("0123456789ABCDEF: removed")] for line in out.splitlines()) == sorted(
        f"{qid}: removed" for qid in spam + [good]), out
    assert ok(daemon, "list") == "Mail queue is empty\n"
    for qid in spam + [good]:
        daemon.waitForLog(rf"{qid}: removed by admin")


def test_readme_quick_start_relayctl_line_works_from_the_checkout(twistd):
    # The quick start runs relayd with etc/relayd.local.yaml; relayctl's
    # default (/etc/relayd/relayd.yaml) is not that file.
    readme = (ROOT / "README.rst").read_text()
    quickStart = readme.split("Quick start\n===========", 1)[1].split("\n====", 1)[0]
    lines = [l.strip() for l in quickStart.splitlines() if l.strip().startswith(".venv/bin/relayctl ")]
    assert lines, "the README's quick start shows no .venv/bin/relayctl command"
    args = lines[0].split()[1:]
    assert args[:2] == ["-c", "etc/relayd.local.yaml"]
    result = subprocess.run([str(twistdPath().parent / "relayctl"), *args], capture_output=True,
                            text=True, timeout=60, env=childEnvironment(), cwd=ROOT)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == "Mail queue is empty\n" or result.stdout.startswith("-Queue ID-")


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


def test_quarantine_list_show_and_restore_put_a_message_back_into_delivery(tmp_path, processes, twistd):
    sink = Sink(tmp_path / "sink")  # down at first: the message stays queued
    processes.append(sink)
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    assert ok(daemon, "quarantine", "list") == "Quarantine is empty\n"
    qid = daemon.submit(makeMessage("quarantine", ["back from quarantine"]))
    daemon.waitForLog(rf"{qid}: to=<bob@remote\.test>.*status=deferred")
    assert daemon.terminate() == 0

    envelopePath = daemon.spool / "queue" / f"{qid}.upd"  # written after the deferral
    good = envelopePath.read_bytes()
    envelopePath.write_bytes(b"{broken")
    before = daemon.logOffset()
    daemon.start()
    daemon.waitForLog(rf"{qid}: quarantined: envelope is not JSON", since=before)
    assert ok(daemon, "list") == "Mail queue is empty\n"

    listing = ok(daemon, "quarantine", "list")
    assert listing.startswith(f"{qid}\n    broken: envelope is not JSON"), listing
    assert "1 quarantined entry" in listing
    shown = ok(daemon, "quarantine", "show", qid)
    assert shown.startswith("Quarantine:   broken: envelope is not JSON"), shown
    assert f"{qid}.msg" in shown and f"{qid}.upd" in shown
    refused = relayctl(daemon, "quarantine", "restore", qid)
    assert refused.returncode == 1 and refused.stderr.startswith(
        f"relayctl: {qid}: not restored: envelope is not JSON"), refused

    # Repaired by hand: the check passes, the daemon takes it back and delivers it.
    (daemon.spool / "quarantine" / f"{qid}.upd").write_bytes(good)
    listing = ok(daemon, "quarantine", "list")
    assert re.match(rf"{qid}  .*  alice@client\.test  \(1 pending\)\n    restorable", listing), listing
    assert "Subject: quarantine" in ok(daemon, "quarantine", "show", qid, "--body")
    sink.start()
    assert ok(daemon, "quarantine", "restore", qid) == f"{qid}: restored from quarantine\n"
    daemon.waitForLog(rf"{qid}: restored from quarantine", since=before)
    [delivered] = sink.waitForMessages(1, daemon.describe)
    assert b"back from quarantine" in delivered.content
    assert ok(daemon, "quarantine", "list") == "Quarantine is empty\n"
    again = relayctl(daemon, "quarantine", "restore", qid)
    assert again.returncode == 1 and "not in quarantine" in again.stderr


def test_a_spool_an_older_relayd_left_is_listed_and_delivered_beside_new_messages(tmp_path, processes, twistd):
    """
    An upgrade: messages queued as ``.eml`` + ``.env`` pairs stay in the
    queue beside the daemon's one-file messages (``.msg``, ``.upd`` once
    deferred); relayctl lists both, the next start recovers both, and both
    are delivered and leave the queue, with no quarantine. Leftovers of
    crashes in either layout (an update file or an older body alone) go
    quietly.
    """
    from relayd.envelope import Envelope, Recipient, newQueueId
    from relayd.queue import encodeEnvelope

    sink = Sink(tmp_path / "sink")  # down at first: the new message stays queued
    processes.append(sink)
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    new = daemon.submit(makeMessage("new layout", ["one file"]))
    daemon.waitForLog(rf"{new}: to=<bob@remote\.test>.*status=deferred")
    assert daemon.terminate() == 0
    queueDir = daemon.spool / "queue"
    assert sorted(p.name for p in queueDir.iterdir()) == [f"{new}.msg", f"{new}.upd"]

    body = makeMessage("old layout", ["two files"]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    now = time.time()
    old = Envelope(queueId=newQueueId(now), sender="old@client.test", recipients=[Recipient("bob@remote.test")],
                   arrival=now, size=len(body), clientAddress="127.0.0.1",
                   clientName="localhost", helo="client.test", nextAttempt=now)
    (queueDir / f"{old.queueId}.eml").write_bytes(body)
    (queueDir / f"{old.queueId}.env").write_bytes(encodeEnvelope(old))
    leftovers = [queueDir / f"{newQueueId()}.upd", queueDir / f"{newQueueId()}.eml"]
    for path in leftovers:
        path.write_bytes(b"left by a crash")
    for path in queueDir.iterdir():
        path.chmod(0o600)

    listing = ok(daemon, "list")
    assert old.queueId in listing and new in listing and "2 Requests" in listing, listing
    assert b"two files" in relayctl(daemon, "show", old.queueId, "--body").stdout.encode()
    assert "one file" in ok(daemon, "show", new, "--body")

    sink.start()
    before = daemon.logOffset()
    daemon.start()
    delivered = sink.waitForMessages(2, daemon.describe)
    assert sorted(b"two files" in d.content for d in delivered) == [False, True]
    assert sorted(d.envelope["mail_from"] for d in delivered) == ["alice@client.test", "old@client.test"]
    for queueId in (old.queueId, new):
        daemon.waitForLog(rf"{queueId}: removed", since=before)
    assert sorted(p.name for p in queueDir.iterdir()) == [], daemon.describe()
    assert "quarantined" not in daemon.log(before) and "warning" not in daemon.log(before), daemon.describe()
