"""
``relayctl``: see and steer relayd's queue, with Postfix's verbs.

    relayctl [-c CONFIG] list [--json]        the queue, like mailq (JSON: one object a line)
    relayctl [-c CONFIG] show ID [--body] [--json]
    relayctl [-c CONFIG] flush [ID ...]       try now (all, or the named messages)
    relayctl [-c CONFIG] hold ID ...          stop trying until released
    relayctl [-c CONFIG] release ID ...
    relayctl [-c CONFIG] delete ID ...        remove without notice (logged)
    relayctl [-c CONFIG] bounce ID ...        give up now: return to the sender
    relayctl [-c CONFIG] requeue [ID ...]     forget the backoff and the hold, try now

``list`` and ``show`` read the spool directly (envelope files are only ever
replaced by atomic renames, so no lock is needed) and work whether or not
the daemon runs; when it runs they also mark what it is delivering right
now. The other verbs ask the daemon over its control socket
(relayd.control), so a change never races the scheduler; they fail with a
clear line when the daemon is not running.

The client side of AMP is a few lines over a blocking socket: no reactor
for a command that sends one request and reads one answer.

Exit status: 0 done; 1 something failed (unknown id, daemon not running,
permission); 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import TextIO

from twisted.protocols import amp

from relayd import config as configModule
from relayd import control, scheduler
from relayd.envelope import PENDING, Envelope, isQueueId
from relayd.queue import QUEUE, Spool

PROG = "relayctl"
DEFAULT_CONFIG = "/etc/relayd/relayd.yaml"
# How long to wait for the daemon: connect and answer (a local socket).
TIMEOUT = 10.0

OK, FAILED_STATUS, USAGE = 0, 1, 2


class Failure(Exception):
    """One line for stderr; exit 1."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


# The daemon, over AMP on a blocking socket


class NotRunning(Failure):
    pass


def _recvExactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise Failure("relayd closed the control connection without answering")
        data += chunk
    return data


def _readBox(sock: socket.socket) -> dict[bytes, bytes]:
    box: dict[bytes, bytes] = {}
    while True:
        (length,) = struct.unpack("!H", _recvExactly(sock, 2))
        if length == 0:
            return box
        key = _recvExactly(sock, length)
        (length,) = struct.unpack("!H", _recvExactly(sock, 2))
        box[key] = _recvExactly(sock, length)


def callDaemon(path: str, command: type[amp.Command], timeout: float = TIMEOUT, **arguments):
    """Send one AMP command to the daemon's control socket and return the parsed answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"relayd is not running (nothing answers on {path}); flush, hold, release, "
                "delete, bounce and requeue need the daemon; list and show work without it"
            ) from None
        except PermissionError:
            raise Failure(f"permission denied on {path}: run relayctl as the relayd user or root") from None
        except socket.timeout:
            raise Failure(f"relayd does not answer on {path} (timed out after {timeout:g} s)") from None
        except OSError as e:
            # A path component that is a file, a path too long for AF_UNIX...:
            # one line like the others, and list/show carry on without the daemon.
            raise Failure(f"cannot connect to relayd on {path}: {e.strerror or e}") from None
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = b"1"
        try:
            sock.sendall(box.serialize())
            answer = _readBox(sock)
        except socket.timeout:
            raise Failure(f"relayd did not answer on {path} within {timeout:g} s") from None
        except OSError as e:
            raise Failure(f"control connection to {path} failed: {e.strerror or e}") from None
    finally:
        sock.close()
    if b"_error" in answer:
        description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
        raise Failure(f"relayd refused the request: {description or 'unknown error'}")
    return command.parseResponse(answer, None)


# Reading the spool


def loadQueue(directory: str) -> tuple[list[Envelope], list[str]]:
    """Every committed envelope (by arrival) and the ids that could not be read."""
    spool = Spool(directory)
    try:
        ids = spool.ids()
    except PermissionError:
        raise Failure(f"cannot read the queue {os.path.join(directory, QUEUE)}: permission denied "
                      "(run relayctl as the relayd user or root)") from None
    except FileNotFoundError:
        return [], []
    envelopes, unreadable = [], []
    for queueId in ids:
        try:
            envelopes.append(spool.load(queueId))
        except FileNotFoundError:
            continue  # delivered or removed since the listing
        except PermissionError:
            raise Failure(f"cannot read {queueId}: permission denied "
                          "(run relayctl as the relayd user or root)") from None
        except (ValueError, OSError):
            unreadable.append(queueId)
    envelopes.sort(key=lambda e: (e.arrival, e.queueId))
    return envelopes, unreadable


def activeIds(path: str) -> set[str] | None:
    """What the daemon is delivering now; None when it is not running."""
    try:
        return set(callDaemon(path, control.Status, timeout=3.0)["active"])
    except Failure:
        return None


def queueName(envelope: Envelope, active: set[str]) -> str:
    if envelope.queueId in active:
        return "active"
    if envelope.hold:
        return "hold"
    return "deferred" if envelope.attempts else "incoming"


def _arrival(t: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S", time.localtime(t))


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else "-"


def _size(envelope: Envelope, directory: str) -> int:
    if envelope.size:
        return envelope.size
    try:
        return Spool(directory).bodySize(envelope.queueId)
    except (OSError, ValueError):
        return 0


# Where senders and recipients start: after "ID* SIZE Arrival-time  ".
_RECIPIENT_COLUMN = 16 + 1 + 1 + 8 + 1 + 19 + 2


def listQueue(cfg, args, out: TextIO) -> int:
    envelopes, unreadable = loadQueue(cfg.queue.directory)
    active = activeIds(cfg.queue.controlSocketPath) or set()
    if args.json:
        for e in envelopes:
            out.write(json.dumps({
                "queue_name": queueName(e, active),
                "queue_id": e.queueId,
                "arrival_time": int(e.arrival),
                "message_size": _size(e, cfg.queue.directory),
                "sender": e.sender,
                "attempts": e.attempts,
                "next_attempt": int(e.nextAttempt),
                "recipients": [
                    {"address": r.address, "state": r.state, "dsn": r.dsn,
                     **({"delay_reason": r.reply} if r.state == PENDING and r.reply else {})}
                    for r in e.recipients if r.state == PENDING
                ],
            }) + "\n")
        return OK
    if not envelopes:
        out.write("Mail queue is empty\n")
        return OK
    out.write(f"{'-Queue ID-':<17} {'--Size--':>8} {'---Arrival Time----':<19}  -Sender/Recipient-------\n")
    total = 0
    for e in envelopes:
        size = _size(e, cfg.queue.directory)
        total += size
        mark = {"active": "*", "hold": "!"}.get(queueName(e, active), " ")
        out.write(f"{e.queueId}{mark} {size:>8} {_arrival(e.arrival)}  {e.sender or 'MAILER-DAEMON'}\n")
        lastReason = None
        for r in e.recipients:
            if r.state != PENDING:
                continue
            if r.reply and r.reply != lastReason:
                out.write(f"({r.reply})\n")
                lastReason = r.reply
            out.write(f"{'':{_RECIPIENT_COLUMN}}{r.address}\n")
        out.write("\n")
    count = len(envelopes)
    out.write(f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.\n")
    for queueId in unreadable:
        out.write(f"{PROG}: warning: {queueId}: envelope cannot be read\n")
    return OK


def showMessage(cfg, args, out: TextIO) -> int:
    queueId = _queueId(args.id)
    spool = Spool(cfg.queue.directory)
    try:
        e = spool.load(queueId)
    except FileNotFoundError:
        raise Failure(f"{queueId}: no such message in the queue") from None
    except PermissionError:
        raise Failure(f"cannot read {queueId}: permission denied (run relayctl as the relayd user or root)") from None
    except ValueError as error:
        raise Failure(f"{queueId}: envelope cannot be read: {error}") from None
    active = activeIds(cfg.queue.controlSocketPath) or set()
    if args.json:
        out.write(json.dumps({**e.toJSON(), "queue_name": queueName(e, active)}, indent=1) + "\n")
    else:
        rows = [
            ("Queue ID", e.queueId),
            ("Queue", queueName(e, active)),
            ("Sender", f"<{e.sender}>"),
            ("Arrival", _when(e.arrival)),
            ("Size", f"{_size(e, cfg.queue.directory)} bytes"),
            ("Client", f"{e.clientName}[{e.clientAddress}], helo={e.helo}"
                       + (f", sasl_username={e.authIdentity}" if e.authIdentity else "")),
            ("Attempts", str(e.attempts)),
            ("Next attempt", "on hold" if e.hold else _when(e.nextAttempt)),
        ]
        if e.lastError:
            rows.append(("Last error", e.lastError))
        if e.notice:
            rows.append(("Notice", f"{e.notice} (written by relayd)"))
        for name, value in rows:
            out.write(f"{name + ':':<14}{value}\n")
        out.write("Recipients:\n")
        for r in e.recipients:
            detail = f"  dsn={r.dsn}" if r.dsn else ""
            detail += f"  last attempt {_when(r.lastAttempt)}" if r.lastAttempt else ""
            detail += f"  ({r.reply})" if r.reply else ""
            out.write(f"  {r.address}  {r.state}{detail}\n")
        if e.history:
            out.write("History:\n")
            for h in e.history:
                out.write(f"  {_when(h.get('time'))}  to=<{h.get('recipient')}>, relay={h.get('relay')}, "
                          f"dsn={h.get('dsn')}, status={h.get('status')} ({h.get('reply')})\n")
    if args.body:
        out.write("\n")
        out.flush()
        try:
            with spool.openBody(queueId) as f:
                data = f.read()
        except OSError as error:
            raise Failure(f"{queueId}: cannot read the body: {error.strerror or error}") from None
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            out.write(data.decode("utf-8", "replace"))
    return OK


def _queueId(text: str) -> str:
    queueId = text.upper()
    if not isQueueId(queueId):
        raise Failure(f"{text!r} is not a queue id (16 characters, as `relayctl list` shows)")
    return queueId


def _batches(ids: list[str]):
    for i in range(0, len(ids), control.MAX_IDS_PER_CALL):
        yield ids[i : i + control.MAX_IDS_PER_CALL]


def changeQueue(cfg, args, out: TextIO, err: TextIO) -> int:
    command = {
        "flush": control.Flush, "hold": control.Hold, "release": control.Release,
        "delete": control.Delete, "bounce": control.Bounce, "requeue": control.Requeue,
    }[args.verb]
    ids = [_queueId(i) for i in args.ids]
    path = cfg.queue.controlSocketPath
    status = OK
    if not ids:
        answer = callDaemon(path, command, ids=[])
        count = answer["count"]
        what = scheduler.FLUSHED if args.verb == "flush" else scheduler.REQUEUED
        out.write(f"{count} message{'s' if count != 1 else ''} {what}\n")
        # The whole queue is answered with a count and the messages that failed.
        for outcome in answer["outcomes"]:
            err.write(f"{PROG}: {outcome['id']}: {outcome['outcome']}\n")
            status = FAILED_STATUS
        unlisted = answer.get("unlisted") or 0
        if unlisted:
            err.write(f"{PROG}: and {unlisted} more message{'s' if unlisted != 1 else ''} "
                      "whose envelope could not be written\n")
            status = FAILED_STATUS
        return status
    for batch in _batches(ids):
        answer = callDaemon(path, command, ids=batch)
        for outcome in answer["outcomes"]:
            if outcome["ok"]:
                out.write(f"{outcome['id']}: {outcome['outcome']}\n")
            else:
                err.write(f"{PROG}: {outcome['id']}: {outcome['outcome']}\n")
                status = FAILED_STATUS
    return status


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, add_help=True,
                     description="See and steer relayd's queue (Postfix's verbs).")
    parser.add_argument("-c", "--config", default=os.environ.get("RELAYD_CONFIG", DEFAULT_CONFIG),
                        help=f"relayd's configuration file (default $RELAYD_CONFIG or {DEFAULT_CONFIG})")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    p = verbs.add_parser("list", help="the queue, like mailq")
    p.add_argument("--json", action="store_true", help="one JSON object per message and line")
    p = verbs.add_parser("show", help="one message: envelope, recipients, delivery history")
    p.add_argument("id")
    p.add_argument("--body", action="store_true", help="also print the message as queued")
    p.add_argument("--json", action="store_true")
    for verb, needsIds, text in (
        ("flush", False, "try now (every message when no id is given)"),
        ("hold", True, "stop trying until released"),
        ("release", True, "release from hold and try now"),
        ("delete", True, "remove without telling the sender (logged)"),
        ("bounce", True, "give up now and return to the sender"),
        ("requeue", False, "forget backoff and hold, try now (every message when no id is given)"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("ids", nargs="+" if needsIds else "*", metavar="ID")
    return parser


def run(argv: list[str], out: TextIO, err: TextIO) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.verb:
            raise _UsageError("a verb is required: list, show, flush, hold, release, delete, bounce, requeue")
    except _UsageError as e:
        err.write(f"{PROG}: {e}; see {PROG} --help\n")
        return USAGE
    try:
        try:
            cfg = configModule.load(args.config)
        except configModule.ConfigError as e:
            raise Failure(str(e)) from None
        if args.verb == "list":
            return listQueue(cfg, args, out)
        if args.verb == "show":
            return showMessage(cfg, args, out)
        return changeQueue(cfg, args, out, err)
    except Failure as e:
        out.flush()
        err.write(f"{PROG}: {e}\n")
        return FAILED_STATUS
    except BrokenPipeError:
        return FAILED_STATUS


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
