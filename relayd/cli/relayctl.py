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
    relayctl [-c CONFIG] blocked [--json]     client addresses AUTH is blocked for, until when
    relayctl [-c CONFIG] unblock ADDRESS ...  lift those blocks (logged)
    relayctl [-c CONFIG] quarantine list      entries recovery could not read, and why
    relayctl [-c CONFIG] quarantine show ID [--body]
    relayctl [-c CONFIG] quarantine restore ID ...   check again, put back into the queue
    relayctl [-c CONFIG] reload               re-read the configuration; returns when applied
                                              or refused, and says which (systemd's ExecReload=)

Instead of ids, each of these takes ``ALL`` (every message, as
``postsuper -d ALL``) and/or ``--sender ADDRESS`` / ``--recipient ADDRESS``
(an address, ``@domain``, or ``<>``): the messages are picked from the
spool as ``list`` reads it, then changed in batches like named ids.

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
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from typing import TextIO

from twisted.protocols import amp

from relayd import config as configModule
from relayd import control, dsn, scheduler
from relayd.cli.common import (
    DEFAULT_CONFIG, FAILED, OK, USAGE, OneLineParser, Refusal, UsageError,
)
from relayd.envelope import STORED_STATES, Envelope, Status, isQueueId
from relayd.queue import QUARANTINE, QUEUE, Spool, permissionFix

PROG = "relayctl"
# How long to wait for the daemon: connect and answer (a local socket).
TIMEOUT = 10.0
# A reload re-reads every file the config names (passwords, certificates).
RELOAD_TIMEOUT = 60.0

# The daemon, over AMP on a blocking socket


class NotRunning(Refusal):
    pass


def _recvExactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise Refusal("relayd closed the control connection without answering")
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
                "delete, bounce, requeue, quarantine restore, blocked, unblock and reload need the "
                "daemon; list and show work without it"
            ) from None
        except PermissionError:
            raise Refusal(f"permission denied on {path}: run relayctl as the relayd user or root") from None
        except socket.timeout:
            raise Refusal(f"relayd does not answer on {path} (timed out after {timeout:g} s)") from None
        except OSError as e:
            # A path component that is a file, a path too long for AF_UNIX...:
            # one line like the others, and list/show carry on without the daemon.
            raise Refusal(f"cannot connect to relayd on {path}: {e.strerror or e}") from None
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = b"1"
        try:
            sock.sendall(box.serialize())
            answer = _readBox(sock)
        except socket.timeout:
            raise Refusal(f"relayd did not answer on {path} within {timeout:g} s") from None
        except OSError as e:
            raise Refusal(f"control connection to {path} failed: {e.strerror or e}") from None
    finally:
        sock.close()
    if b"_error" in answer:
        description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
        raise Refusal(f"relayd refused the request: {description or 'unknown error'}")
    return command.parseResponse(answer, None)


# Reading the spool


def loadQueue(directory: str) -> tuple[list[Envelope], list[str]]:
    """Every committed envelope (by arrival) and the ids that could not be read."""
    spool = Spool(directory)
    try:
        ids = spool.ids()
    except PermissionError:
        raise Refusal(f"cannot read the queue {os.path.join(directory, QUEUE)}: permission denied "
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
            raise Refusal(f"cannot read {queueId}: permission denied "
                          "(run relayctl as the relayd user or root)") from None
        except (ValueError, OSError):
            unreadable.append(queueId)
    envelopes.sort(key=lambda e: (e.arrival, e.queueId))
    return envelopes, unreadable


def activeIds(path: str) -> set[str] | None:
    """What the daemon is delivering now; None when it is not running."""
    try:
        return set(callDaemon(path, control.DaemonStatus, timeout=3.0)["active"])
    except Refusal:
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
                    {"address": r.address, "state": STORED_STATES[r.state], "dsn": r.dsn,
                     **({"delay_reason": r.reply} if r.state is Status.DEFERRED and r.reply else {})}
                    for r in e.recipients if r.state is Status.DEFERRED
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
            if r.state is not Status.DEFERRED:
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
        raise Refusal(f"{queueId}: no such message in the queue") from None
    except PermissionError:
        raise Refusal(f"cannot read {queueId}: permission denied (run relayctl as the relayd user or root)") from None
    except ValueError as error:
        raise Refusal(f"{queueId}: envelope cannot be read: {error}") from None
    active = activeIds(cfg.queue.controlSocketPath) or set()
    if args.json:
        out.write(json.dumps({**e.toJSON(), "queue_name": queueName(e, active)}, indent=1) + "\n")
    else:
        _describe(e, queueName(e, active), cfg.queue.directory, out)
    if args.body:
        _writeBody(spool, QUEUE, queueId, out)
    return OK


def _writeBody(spool: Spool, where: str, queueId: str, out: TextIO) -> None:
    out.write("\n")
    out.flush()
    try:
        with spool.openBody(queueId, where) as f:
            data = f.read()
    except OSError as error:
        raise Refusal(f"{queueId}: cannot read the body: {error.strerror or error}") from None
    except ValueError as error:
        raise Refusal(f"{queueId}: cannot read the body: {error}") from None
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode("utf-8", "replace"))


def _describe(e: Envelope, queue: str, directory: str, out: TextIO) -> None:
    """``show``'s rows for one envelope."""
    rows = [
        ("Queue ID", e.queueId),
        ("Queue", queue),
        ("Sender", f"<{e.sender}>"),
        ("Arrival", _when(e.arrival)),
        ("Size", f"{_size(e, directory)} bytes"),
        ("Client", f"{e.clientName}[{e.clientAddress}], helo={e.helo}"
                   + (f", sasl_username={e.authIdentity}" if e.authIdentity else "")),
        ("Attempts", str(e.attempts)),
        ("Next attempt", "on hold" if e.hold else _when(e.nextAttempt)),
    ]
    if e.lastError:
        rows.append(("Last error", e.lastError))
    if e.notice:
        rows.append(("Notice", f"{e.notice} (written by relayd)"))
    if e.ret is not None or e.envid is not None:
        # ENVID decoded from xtext, as a notice's Original-Envelope-Id shows it.
        rows.append(("DSN", ", ".join(
            ([f"ret={e.ret}"] if e.ret is not None else [])
            + ([f"envid={dsn.originalEnvelopeId(e.envid)}"] if e.envid is not None else []))))
    if e.smtputf8:
        rows.append(("SMTPUTF8", "required (UTF-8 in a local part or the header)"))
    for name, value in rows:
        out.write(f"{name + ':':<14}{value}\n")
    out.write("Recipients:\n")
    for r in e.recipients:
        detail = f"  notify={','.join(r.notify)}" if r.notify is not None else ""
        detail += f"  orcpt={dsn.originalRecipient(r.orcpt)}" if r.orcpt is not None else ""
        detail += f"  dsn={r.dsn}" if r.dsn else ""
        detail += f"  last attempt {_when(r.lastAttempt)}" if r.lastAttempt else ""
        detail += f"  ({r.reply})" if r.reply else ""
        out.write(f"  {r.address}  {STORED_STATES[r.state]}{detail}\n")
    if e.history:
        out.write("History:\n")
        for h in e.history:
            out.write(f"  {_when(h.get('time'))}  to=<{h.get('recipient')}>, relay={h.get('relay')}, "
                      f"dsn={h.get('dsn')}, status={h.get('status')} ({h.get('reply')})\n")


def _queueId(text: str) -> str:
    queueId = text.upper()
    if not isQueueId(queueId):
        raise Refusal(f"{text!r} is not a queue id (16 characters, as `relayctl list` shows)")
    return queueId


def _batches(ids: list[str]):
    for i in range(0, len(ids), control.MAX_IDS_PER_CALL):
        yield ids[i : i + control.MAX_IDS_PER_CALL]


# The queue-id argument that selects every message (postsuper -d ALL).
ALL = "ALL"


def addressMatches(address: str, wanted: str) -> bool:
    """
    ``wanted`` is an address (any case), ``@domain`` (that domain only, not
    its subdomains) or ``<>``/empty for the null sender.
    """
    wanted = wanted.strip()
    if wanted.startswith("<") and wanted.endswith(">"):
        wanted = wanted[1:-1]
    if not wanted:
        return address == ""
    address, wanted = address.lower(), wanted.lower()
    if wanted.startswith("@"):
        return "@" in address and "@" + address.rpartition("@")[2].rstrip(".") == wanted.rstrip(".")
    return address == wanted


def selected(envelope: Envelope, verb: str, sender: str | None, recipient: str | None) -> bool:
    """
    Whether a selection (ALL, --sender, --recipient: every given one must
    match) takes this message: recipients are those still pending; release
    takes only held messages, hold and flush only the others (as flush of
    the whole queue).
    """
    if verb == "release" and not envelope.hold:
        return False
    if verb in ("hold", "flush") and envelope.hold:
        return False
    if sender is not None and not addressMatches(envelope.sender, sender):
        return False
    if recipient is not None and not any(
            r.state is Status.DEFERRED and addressMatches(r.address, recipient) for r in envelope.recipients):
        return False
    return True


def _selection(cfg, args) -> list[str]:
    """The queue ids that ALL/--sender/--recipient select, from the spool as list reads it."""
    envelopes, _ = loadQueue(cfg.queue.directory)
    return [e.queueId for e in envelopes if selected(e, args.verb, args.sender, args.recipient)]


def _selecting(args) -> bool:
    """Whether the command selects messages (ALL, --sender, --recipient) instead of naming them."""
    return args.sender is not None or args.recipient is not None or ALL in args.ids


def _checkSelection(args) -> None:
    """Usage errors of a per-message verb's arguments, before anything is read."""
    if _selecting(args) and any(i != ALL for i in args.ids):
        raise UsageError("give queue ids, or ALL / --sender / --recipient, not both")
    if not _selecting(args) and not args.ids and args.verb not in ("flush", "requeue"):
        raise UsageError(f"{args.verb} needs queue ids, ALL, --sender or --recipient")


def changeQueue(cfg, args, out: TextIO, err: TextIO) -> int:
    command = {
        "flush": control.Flush, "hold": control.Hold, "release": control.Release,
        "delete": control.Delete, "bounce": control.Bounce, "requeue": control.Requeue,
    }[args.verb]
    selecting = _selecting(args)
    everything = selecting and args.sender is None and args.recipient is None
    if everything and args.verb in ("flush", "requeue"):
        args.ids = []  # the daemon's own "every message", answered with a count
        selecting = False
    ids = _selection(cfg, args) if selecting else [_queueId(i) for i in args.ids]
    path = cfg.queue.controlSocketPath
    status = OK
    if selecting and not ids:
        out.write("no message in the queue matches\n")
        return OK
    if not ids:
        answer = callDaemon(path, command, ids=[])
        count = answer["count"]
        what = scheduler.FLUSHED if args.verb == "flush" else scheduler.REQUEUED
        out.write(f"{count} message{'s' if count != 1 else ''} {what}\n")
        # The whole queue is answered with a count and the messages that failed.
        for outcome in answer["outcomes"]:
            err.write(f"{PROG}: {outcome['id']}: {outcome['outcome']}\n")
            status = FAILED
        unlisted = answer.get("unlisted") or 0
        if unlisted:
            err.write(f"{PROG}: and {unlisted} more message{'s' if unlisted != 1 else ''} "
                      "whose envelope could not be written\n")
            status = FAILED
        return status
    for batch in _batches(ids):
        answer = callDaemon(path, command, ids=batch)
        for outcome in answer["outcomes"]:
            if outcome["ok"]:
                out.write(f"{outcome['id']}: {outcome['outcome']}\n")
            elif selecting and outcome["outcome"] == control.UNKNOWN:
                # Delivered or removed between the listing and the request.
                out.write(f"{outcome['id']}: gone from the queue meanwhile\n")
            else:
                err.write(f"{PROG}: {outcome['id']}: {outcome['outcome']}\n")
                status = FAILED
    return status


def listBlocked(cfg, args, out: TextIO) -> int:
    """Every client address AUTH is blocked for, and until when."""
    path = cfg.queue.controlSocketPath
    clients: list[dict] = []
    total = None
    while total is None or len(clients) < total:
        answer = callDaemon(path, control.Blocked, start=len(clients))
        total = answer["total"]
        if not answer["clients"]:
            break  # blocks ended while paging
        clients += answer["clients"]
    if args.json:
        for c in clients:
            out.write(json.dumps({"address": c["address"], "blocked_until": int(c["until"])}) + "\n")
        return OK
    if not clients:
        out.write("No client is blocked\n")
        return OK
    width = max(len(c["address"]) for c in clients)
    for c in clients:
        out.write(f"{c['address']:<{width}}  AUTH blocked until {_when(c['until'])}\n")
    return OK


def unblock(cfg, args, out: TextIO, err: TextIO) -> int:
    status = OK
    for text in args.addresses:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise Refusal(f"{text!r} is not an IP address") from None
    for text in args.addresses:
        answer = callDaemon(cfg.queue.controlSocketPath, control.Unblock, address=text)
        if answer["wasBlocked"]:
            out.write(f"{answer['address']}: unblocked\n")
        else:
            err.write(f"{PROG}: {answer['address']}: not blocked\n")
            status = FAILED
    return status


# The quarantine: entries start-up recovery could not read, kept for a human


def _examine(spool: Spool, queueId: str) -> tuple[Envelope | None, str]:
    """The quarantined envelope if it reads, and what a restore would find."""
    try:
        return spool.examineQuarantined(queueId), "restorable: it reads correctly now"
    except FileNotFoundError:
        raise Refusal(f"{queueId}: not in quarantine") from None
    except PermissionError as e:
        return None, f"cannot read {e.filename}: {e.strerror}; {permissionFix(spool.directory)}"
    except ValueError as e:
        return None, f"broken: {e}"


def _quarantineSpool(cfg) -> Spool:
    spool = Spool(cfg.queue.directory)
    if not os.path.isdir(os.path.join(spool.directory, QUARANTINE)):
        raise Refusal(f"{os.path.join(spool.directory, QUARANTINE)} does not exist "
                      "(relayd creates it at its first start)")
    return spool


def quarantineList(cfg, args, out: TextIO) -> int:
    spool = _quarantineSpool(cfg)
    try:
        ids = spool.quarantinedIds()
    except PermissionError:
        raise Refusal(f"cannot read {os.path.join(spool.directory, QUARANTINE)}: permission denied "
                      "(run relayctl as the relayd user or root)") from None
    if not ids:
        out.write("Quarantine is empty\n")
        return OK
    for queueId in ids:
        envelope, verdict = _examine(spool, queueId)
        if envelope is not None:
            out.write(f"{queueId}  {_arrival(envelope.arrival)}  "
                      f"{envelope.sender or 'MAILER-DAEMON'}  ({len(envelope.pending())} pending)\n")
        else:
            out.write(f"{queueId}\n")
        out.write(f"    {verdict}\n")
    out.write(f"-- {len(ids)} quarantined entr{'ies' if len(ids) != 1 else 'y'} in "
              f"{os.path.join(spool.directory, QUARANTINE)}; "
              f"relayctl quarantine restore ID puts one back\n")
    return OK


def quarantineShow(cfg, args, out: TextIO) -> int:
    spool = _quarantineSpool(cfg)
    queueId = _queueId(args.id)
    envelope, verdict = _examine(spool, queueId)
    out.write(f"{'Quarantine:':<14}{verdict}\n")
    out.write(f"{'Files:':<14}{', '.join(spool.quarantineFiles(queueId))}\n")
    if envelope is not None:
        _describe(envelope, "quarantine", cfg.queue.directory, out)
    if args.body:
        _writeBody(spool, QUARANTINE, queueId, out)
    return OK


def quarantineRestore(cfg, args, out: TextIO, err: TextIO) -> int:
    ids = [_queueId(i) for i in args.ids]
    status = OK
    for batch in _batches(ids):
        answer = callDaemon(cfg.queue.controlSocketPath, control.QuarantineRestore, ids=batch)
        for outcome in answer["outcomes"]:
            if outcome["ok"]:
                out.write(f"{outcome['id']}: {outcome['outcome']}\n")
            else:
                err.write(f"{PROG}: {outcome['id']}: {outcome['outcome']}\n")
                status = FAILED
    return status


def reload(cfg, args, out: TextIO, err: TextIO) -> int:
    """Ask the daemon to reload and wait for the outcome: 0 applied, 1 refused (the old config runs on)."""
    answer = callDaemon(cfg.queue.controlSocketPath, control.Reload, timeout=RELOAD_TIMEOUT)
    if answer["ok"]:
        out.write(f"{answer['message']}\n")
        return OK
    err.write(f"{PROG}: {answer['message']}\n")
    return FAILED


def _parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, add_help=True,
                     description="See and steer relayd's queue (Postfix's verbs).")
    parser.add_argument("-c", "--config", default=os.environ.get("RELAYD_CONFIG", DEFAULT_CONFIG),
                        help=f"relayd's configuration file (default $RELAYD_CONFIG or {DEFAULT_CONFIG})")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
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
        p.add_argument("ids", nargs="*", metavar="ID",
                       help=f"queue ids, or {ALL} for every message" + (
                           "" if needsIds else " (the default)"))
        p.add_argument("--sender", metavar="ADDRESS",
                       help="only messages from this address (@domain: that domain; <> the null sender)")
        p.add_argument("--recipient", metavar="ADDRESS",
                       help="only messages with this pending recipient (@domain: that domain)")
    p = verbs.add_parser("blocked", help="client addresses AUTH is blocked for (auth.failure_limit), and until when")
    p.add_argument("--json", action="store_true", help="one JSON object per address and line")
    p = verbs.add_parser("unblock", help="lift the AUTH block on client addresses")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p = verbs.add_parser("quarantine", help="queue entries recovery could not read: list, show, restore")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    actions.add_parser("list", help="every quarantined entry and what is wrong with it")
    q = actions.add_parser("show", help="one quarantined entry")
    q.add_argument("id")
    q.add_argument("--body", action="store_true", help="also print the message")
    q = actions.add_parser("restore", help="check again and put back into the queue (needs the daemon)")
    q.add_argument("ids", nargs="+", metavar="ID")
    verbs.add_parser("reload", help="re-read the configuration; wait until it is applied or refused")
    return parser


def run(argv: list[str], out: TextIO, err: TextIO) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.verb:
            raise UsageError("a verb is required: list, show, flush, hold, release, delete, bounce, "
                              "requeue, blocked, unblock, quarantine, reload")
        if args.verb == "quarantine" and not args.action:
            raise UsageError("quarantine needs an action: list, show ID, restore ID...")
        if args.verb in ("flush", "hold", "release", "delete", "bounce", "requeue"):
            _checkSelection(args)
    except UsageError as e:
        err.write(f"{PROG}: {e}; see {PROG} --help\n")
        return USAGE
    try:
        try:
            cfg = configModule.load(args.config)
        except configModule.ConfigError as e:
            if args.verb == "reload":
                # The daemon would refuse it too; it runs on as it was.
                raise Refusal(f"reload refused, relayd keeps its running configuration: {e}") from None
            raise Refusal(str(e)) from None
        if args.verb == "reload":
            return reload(cfg, args, out, err)
        if args.verb == "list":
            return listQueue(cfg, args, out)
        if args.verb == "show":
            return showMessage(cfg, args, out)
        if args.verb == "blocked":
            return listBlocked(cfg, args, out)
        if args.verb == "unblock":
            return unblock(cfg, args, out, err)
        if args.verb == "quarantine":
            if args.action == "list":
                return quarantineList(cfg, args, out)
            if args.action == "show":
                return quarantineShow(cfg, args, out)
            return quarantineRestore(cfg, args, out, err)
        return changeQueue(cfg, args, out, err)
    except Refusal as e:
        out.flush()
        err.write(f"{PROG}: {e}\n")
        return FAILED
    except BrokenPipeError:
        return FAILED


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
