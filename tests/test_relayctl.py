"""relayctl without a daemon: reading the spool, and the errors an admin sees."""

from __future__ import annotations

import io
import json
import re

import pytest

from relayd.cli import relayctl
from relayd.envelope import Envelope, Recipient, Status
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
    a.recipients[1].state = Status.SENT
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


def test_show_dsn_parameters(setup):
    """RET and ENVID (decoded) per message, NOTIFY and ORCPT (decoded) per recipient."""
    spool, configPath = setup
    env = put(spool, "0000000000000001", rcpts=("bob@example.org", "carol@example.org"),
              ret="HDRS", envid="batch+2B7")
    env.recipients[0].notify = ("SUCCESS", "FAILURE")
    env.recipients[0].orcpt = "rfc822;bob+2Bx@example.org"
    spool.update(env)
    status, out, err = run(configPath, "show", "0000000000000001")
    assert status == 0 and err == ""
    assert "DSN:          ret=HDRS, envid=batch+7\n" in out
    assert ("  bob@example.org  pending  notify=SUCCESS,FAILURE  orcpt=rfc822;bob+x@example.org\n"
            in out)
    assert "  carol@example.org  pending\n" in out
    shown = json.loads(run(configPath, "show", "0000000000000001", "--json")[1])
    assert (shown["ret"], shown["envid"]) == ("HDRS", "batch+2B7")
    assert shown["recipients"][0]["notify"] == ["SUCCESS", "FAILURE"]
    assert shown["recipients"][0]["orcpt"] == "rfc822;bob+2Bx@example.org"


def test_show_says_when_a_message_needs_smtputf8(setup):
    spool, configPath = setup
    put(spool, "0000000000000001", sender="jörg@example.com", smtputf8=True)
    put(spool, "0000000000000002")
    _, out, _ = run(configPath, "show", "0000000000000001")
    assert "SMTPUTF8:     required (UTF-8 in a local part or the header)\n" in out
    assert "Sender:       <jörg@example.com>\n" in out
    _, out, _ = run(configPath, "show", "0000000000000002")
    assert "SMTPUTF8" not in out
    _, out, _ = run(configPath, "show", "0000000000000001", "--json")
    assert json.loads(out)["smtputf8"] is True


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


@pytest.mark.parametrize("args", [("blocked",), ("unblock", "192.0.2.4")])
def test_blocks_need_the_daemon(setup, args):
    status, out, err = run(setup[1], *args)
    assert (status, out) == (1, "")
    assert err.startswith("relayctl: relayd is not running (nothing answers on ")
    assert "unblock and reload need the daemon" in err


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


def test_list_and_show_read_both_spool_layouts(setup):
    """
    A spool an older relayd left (``.eml`` + ``.env``) beside messages in
    one file: both listed, sized and shown with exactly their bodies.
    """
    import os

    from relayd.queue import encodeEnvelope
    spool, configPath = setup
    new = put(spool, "0000000000000001")
    new.size = 0  # the size listed is then the body's, as read from the spool
    spool.update(new)
    old = Envelope(queueId="0000000000000002", sender="old@example.com",
                   recipients=[Recipient("bob@example.org")], arrival=1_700_000_000.0, size=0)
    oldBody = b"Subject: old layout\r\n\r\nold\r\n"
    queueDir = os.path.join(spool.directory, "queue")
    with open(os.path.join(queueDir, "0000000000000002.eml"), "wb") as f:
        f.write(oldBody)
    with open(os.path.join(queueDir, "0000000000000002.env"), "wb") as f:
        f.write(encodeEnvelope(old))
    status, out, _ = run(configPath, "list", "--json")
    sizes = {entry["queue_id"]: entry["message_size"] for entry in map(json.loads, out.splitlines())}
    assert status == 0 and sizes == {
        new.queueId: len(b"Subject: hello\r\n\r\nbody\r\n"), old.queueId: len(oldBody)}
    for queueId, body in ((new.queueId, b"Subject: hello\r\n\r\nbody\r\n"), (old.queueId, oldBody)):
        out = io.BytesIO()

        class Out(io.StringIO):
            buffer = out

        status = relayctl.run(["-c", configPath, "show", queueId, "--body"], Out(), io.StringIO())
        assert status == 0 and out.getvalue() == body


# blocked / unblock: the daemon's answers come from a ControlProtocol over memory


@pytest.fixture
def daemonThrottle(setup, monkeypatch):
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from relayd import control
    from relayd.auth import FailureThrottle
    from tests.test_control import ask

    clock = task.Clock()
    clock.advance(1_800_000_000)
    throttle = FailureThrottle(clock, limit=1, window=900)
    proto = control.ControlProtocol(scheduler=None, throttle=throttle)
    transport = StringTransport()
    proto.makeConnection(transport)
    monkeypatch.setattr(relayctl, "callDaemon",
                        lambda path, command, **arguments: ask(proto, transport, command, **arguments))
    monkeypatch.setattr(relayctl.control, "MAX_BLOCKED_PER_CALL", 2)
    monkeypatch.setattr(control, "MAX_BLOCKED_PER_CALL", 2)
    return throttle, setup[1]


def test_blocked_and_unblock(daemonThrottle):
    throttle, configPath = daemonThrottle
    assert run(configPath, "blocked") == (0, "No client is blocked\n", "")
    for address in ("192.0.2.4", "2001:db8::1", "192.0.2.5"):
        throttle.failed(address)
    status, out, err = run(configPath, "blocked")
    # Three addresses over pages of two.
    until = relayctl._when(1_800_000_900)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"192.0.2.4    AUTH blocked until {until}",
        f"192.0.2.5    AUTH blocked until {until}",
        f"2001:db8::1  AUTH blocked until {until}",
    ]
    status, out, _ = run(configPath, "blocked", "--json")
    assert json.loads(out.splitlines()[0]) == {"address": "192.0.2.4", "blocked_until": 1_800_000_900}
    assert run(configPath, "unblock", "192.0.2.4", "192.0.2.9") == (
        1, "192.0.2.4: unblocked\n", "relayctl: 192.0.2.9: not blocked\n")
    assert run(configPath, "unblock", "relay.example") == (
        1, "", "relayctl: 'relay.example' is not an IP address\n")
    assert [a for a, _ in throttle.blockedClients()] == ["192.0.2.5", "2001:db8::1"]


# Selecting messages: ALL, --sender, --recipient (postsuper -d ALL)


@pytest.mark.parametrize("address, wanted, matches", [
    ("alice@example.com", "alice@example.com", True),
    ("Alice@Example.COM", "<alice@example.com>", True),
    ("alice@example.com", "bob@example.com", False),
    ("alice@example.com", "@example.com", True),
    ("alice@example.com", "@EXAMPLE.com", True),
    ("alice@sub.example.com", "@example.com", False),
    ("alice@example.com.evil.test", "@example.com", False),
    ("", "<>", True),
    ("", "", True),
    ("alice@example.com", "<>", False),
    ("", "@example.com", False),
])
def test_addressMatches(address, wanted, matches):
    assert relayctl.addressMatches(address, wanted) is matches


class FakeDaemon:
    """Stands in for callDaemon: records each request, answers every id done."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, command, timeout=None, **arguments):
        self.calls.append((command.__name__, list(arguments["ids"])))
        return {"outcomes": [{"id": i, "ok": True, "outcome": "done"} for i in arguments["ids"]],
                "count": 0}


@pytest.fixture
def selectionQueue(setup, monkeypatch):
    spool, configPath = setup
    put(spool, "0000000000000001", sender="spam@bad.example", rcpts=("a@one.example",))
    put(spool, "0000000000000002", sender="spam@bad.example", rcpts=("b@two.example",), hold=True)
    put(spool, "0000000000000003", sender="alice@good.example", rcpts=("c@two.example",))
    e = put(spool, "0000000000000004", sender="", rcpts=("d@two.example", "e@one.example"))
    e.recipients[0].state = Status.SENT  # delivered: no longer selects the message by recipient
    spool.update(e)
    daemon = FakeDaemon()
    monkeypatch.setattr(relayctl, "callDaemon", daemon)
    return configPath, daemon


@pytest.mark.parametrize("args, calls", [
    (("delete", "ALL"), [("Delete", ["0000000000000001", "0000000000000002", "0000000000000003",
                                     "0000000000000004"])]),
    (("delete", "--sender", "spam@bad.example"), [("Delete", ["0000000000000001", "0000000000000002"])]),
    (("bounce", "--sender", "@bad.example", "--recipient", "@two.example"),
     [("Bounce", ["0000000000000002"])]),
    (("hold", "--recipient", "@two.example"), [("Hold", ["0000000000000003"])]),  # 2 is held already
    (("release", "ALL"), [("Release", ["0000000000000002"])]),
    (("delete", "--sender", "<>"), [("Delete", ["0000000000000004"])]),
    (("delete", "--recipient", "d@two.example"), []),  # delivered already
    (("flush", "--recipient", "@one.example"), [("Flush", ["0000000000000001", "0000000000000004"])]),
    (("flush", "--sender", "spam@bad.example"), [("Flush", ["0000000000000001"])]),  # 2 is held
    (("requeue", "--sender", "spam@bad.example"), [("Requeue", ["0000000000000001", "0000000000000002"])]),
    # Every message of flush/requeue is the daemon's own "all" (a count back).
    (("requeue", "ALL"), [("Requeue", [])]),
])
def test_selection_picks_messages_from_the_spool(selectionQueue, args, calls):
    configPath, daemon = selectionQueue
    status, out, err = run(configPath, *args)
    assert (status, err) == (0, ""), err
    assert daemon.calls == calls
    if not calls:
        assert out == "no message in the queue matches\n"


def test_selection_goes_through_the_batches(selectionQueue, monkeypatch):
    configPath, daemon = selectionQueue
    monkeypatch.setattr(relayctl.control, "MAX_IDS_PER_CALL", 3)
    status, out, err = run(configPath, "delete", "ALL")
    assert status == 0
    assert daemon.calls == [("Delete", ["0000000000000001", "0000000000000002", "0000000000000003"]),
                            ("Delete", ["0000000000000004"])]
    assert out.count(": done\n") == 4


def test_selection_message_gone_meanwhile_is_not_a_failure(selectionQueue, monkeypatch):
    configPath, _ = selectionQueue

    def gone(path, command, timeout=None, **arguments):
        return {"outcomes": [{"id": i, "ok": False, "outcome": relayctl.control.UNKNOWN}
                             for i in arguments["ids"]], "count": 0}

    monkeypatch.setattr(relayctl, "callDaemon", gone)
    status, out, err = run(configPath, "delete", "--sender", "alice@good.example")
    assert (status, out, err) == (0, "0000000000000003: gone from the queue meanwhile\n", "")
    # Named ids stay strict: an unknown id is an error.
    status, out, err = run(configPath, "delete", "0000000000000003")
    assert status == 1 and err == "relayctl: 0000000000000003: no such message in the queue\n"


@pytest.mark.parametrize("args, message", [
    (("delete",), "delete needs queue ids, ALL, --sender or --recipient"),
    (("hold", "ALL", "0000000000000001"), "give queue ids, or ALL / --sender / --recipient, not both"),
    (("delete", "--sender", "x@y.z", "0000000000000001"),
     "give queue ids, or ALL / --sender / --recipient, not both"),
])
def test_selection_usage_errors(tmp_path, args, message):
    # Checked before the config is read: this one does not even exist.
    status, out, err = run(str(tmp_path / "missing.yaml"), *args)
    assert (status, out, err) == (2, "", f"relayctl: {message}; see relayctl --help\n")


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
    path = f"{spool.directory}/queue/0000000000000002.upd"  # supersedes the committed envelope
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
