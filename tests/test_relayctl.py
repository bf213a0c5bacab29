"""relayctl without a daemon: reading the spool, and the errors an admin sees."""

from __future__ import annotations

import io
import json
import re

import pytest

from relayd.cli import relayctl
from relayd.envelope import SENT, Envelope, Recipient
from relayd.queue import Spool


def writeConfig(tmp_path, queueExtra=""):
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(
        "hostname: relay.test\n"
        'listeners: [{endpoint: "tcp:2525", tls: none, auth: none}]\n'
        f"queue: {{directory: spool{queueExtra}}}\n"
        "delivery: {smarthosts: [{host: smtp.example.net, tls: none}]}\n")
    return str(configPath)


@pytest.fixture
def setup(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    return spool, writeConfig(tmp_path)


def put(spool, queueId, sender="alice@example.com", rcpts=("bob@example.org",), **kw):
    env = Envelope(queueId=queueId, sender=sender, recipients=[Recipient(r) for r in rcpts],
                   arrival=1_700_000_000.0, size=2048, **kw)
    writer = spool.begin(queueId)
    writer.write(b"Subject: hello\r\n\r\nbody\r\n")
    writer.commit(env)
    return env


def run(configPath, *args):
    out, err = io.StringIO(), io.StringIO()
    status = relayctl.run(["-c", configPath, *args], out, err)
    return status, out.getvalue(), err.getvalue()


def test_empty_queue(setup):
    spool, configPath = setup
    assert run(configPath, "list") == (0, "Mail queue is empty\n", "")


def test_list_like_mailq(setup):
    spool, configPath = setup
    a = put(spool, "0000000000000001", rcpts=("bob@example.org", "carol@example.org"), attempts=2)
    a.recipients[0].reply = "451 4.3.0 try again later"
    a.recipients[0].dsn = "4.3.0"
    a.recipients[1].state = SENT
    spool.update(a)
    put(spool, "0000000000000002", sender="", hold=True)
    status, out, err = run(configPath, "list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert re.fullmatch(r"0000000000000001      2048 \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d  alice@example\.com", lines[1])
    assert lines[2] == "(451 4.3.0 try again later)"
    assert lines[3] == " " * 48 + "bob@example.org"
    assert "carol@example.org" not in out  # delivered: not listed
    assert lines[5].startswith("0000000000000002! ") and lines[5].endswith("  MAILER-DAEMON")
    assert lines[-1] == "-- 4 Kbytes in 2 Requests."


def test_list_json(setup):
    spool, configPath = setup
    put(spool, "0000000000000001", hold=True)
    status, out, _ = run(configPath, "list", "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["queue_id"] == "0000000000000001" and row["queue_name"] == "hold"
    assert row["message_size"] == 2048 and row["sender"] == "alice@example.com"
    assert row["recipients"] == [{"address": "bob@example.org", "state": "pending", "dsn": None}]


def test_show(setup):
    spool, configPath = setup
    put(spool, "0000000000000001")
    status, out, err = run(configPath, "show", "0000000000000001")
    assert status == 0 and err == ""
    assert "Queue ID:     0000000000000001\n" in out
    assert "Queue:        incoming\n" in out
    assert "  bob@example.org  pending\n" in out
    status, out, err = run(configPath, "show", "0000000000000001", "--json")
    assert json.loads(out)["queue_id"] == "0000000000000001"


def test_show_unknown_and_bad_id(setup):
    spool, configPath = setup
    assert run(configPath, "show", "0000000000000009") == (
        1, "", "relayctl: 0000000000000009: no such message in the queue\n")
    status, _, err = run(configPath, "show", "../../etc/passwd")
    assert status == 1 and "is not a queue id" in err


@pytest.mark.parametrize("verb", ["flush", "hold", "release", "delete", "bounce", "requeue"])
def test_changes_need_the_daemon(setup, verb):
    spool, configPath = setup
    put(spool, "0000000000000001")
    status, out, err = run(configPath, verb, "0000000000000001")
    assert status == 1 and out == ""
    assert err.startswith("relayctl: relayd is not running (nothing answers on ")
    assert err.endswith("list and show work without it\n")


def test_config_error_is_one_line(tmp_path):
    status, out, err = run(str(tmp_path / "missing.yaml"), "list")
    assert status == 1 and err.count("\n") == 1 and err.startswith("relayctl: ")


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["hold"], ["show"]])
def test_usage(setup, args):
    spool, configPath = setup
    status, out, err = run(configPath, *args)
    assert status == 2 and err.count("\n") == 1 and err.startswith("relayctl: ")


@pytest.mark.parametrize("socketPath, reason", [
    ("{tmp}/a-file/control.sock", "Not a directory"),
    ("{tmp}/" + "x" * 120 + "/control.sock", "AF_UNIX path too long"),
])
def test_unusable_socket_path_is_one_line_and_list_still_works(tmp_path, socketPath, reason):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    (tmp_path / "a-file").write_text("")
    path = socketPath.format(tmp=tmp_path)
    configPath = writeConfig(tmp_path, f", control_socket: '{path}'")
    put(spool, "0000000000000001")
    status, out, err = run(configPath, "hold", "0000000000000001")
    assert (status, out) == (1, "")
    assert err == f"relayctl: cannot connect to relayd on {path}: {reason}\n"
    status, out, err = run(configPath, "list")
    assert status == 0 and err == "" and out.startswith("-Queue ID-")
    status, out, err = run(configPath, "show", "0000000000000001")
    assert status == 0 and err == "" and "Queue:        incoming\n" in out


def test_whole_queue_requeue_reports_what_could_not_be_written(setup, monkeypatch):
    spool, configPath = setup
    answer = {"count": 1, "outcomes": [{"id": "0000000000000002", "ok": False,
                                        "outcome": "cannot write the queue: No space left on device"}]}
    monkeypatch.setattr(relayctl, "callDaemon", lambda path, command, **kw: answer)
    assert run(configPath, "requeue") == (
        1, "1 message requeued\n",
        "relayctl: 0000000000000002: cannot write the queue: No space left on device\n")


def test_size_falls_back_to_the_body_file(setup):
    spool, configPath = setup
    env = put(spool, "0000000000000001")
    env.size = 0
    spool.update(env)
    status, out, _ = run(configPath, "list", "--json")
    assert json.loads(out)["message_size"] == len(b"Subject: hello\r\n\r\nbody\r\n")


@pytest.mark.parametrize("field, value", [
    ("arrival", float("nan")), ("next_attempt", float("inf")), ("hold", "false"),
    ("attempts", "3"), ("history", [{"time": "yesterday"}]),
])
@pytest.mark.parametrize("listing", [("list",), ("list", "--json")])
def test_list_and_show_survive_a_mistyped_envelope(setup, field, value, listing):
    """
    One damaged envelope (NaN, Infinity, a string for a boolean) is listed
    as unreadable; the rest of the queue is listed as usual, and show
    names what is wrong in one line.
    """
    spool, configPath = setup
    put(spool, "0000000000000001")
    bad = put(spool, "0000000000000002")
    path = f"{spool.directory}/queue/0000000000000002.env"
    data = {**bad.toJSON(), field: value}
    with open(path, "w") as f:
        json.dump(data, f)
    status, out, err = run(configPath, *listing)
    assert status == 0
    assert "0000000000000001" in out
    if listing == ("list",):
        assert out.endswith("relayctl: warning: 0000000000000002: envelope cannot be read\n")
    status, out, err = run(configPath, "show", "0000000000000002")
    assert status == 1 and out == ""
    assert err.startswith("relayctl: 0000000000000002: envelope cannot be read: invalid envelope: ")
    assert err.count("\n") == 1
