"""
A recording SMTP server for the integration tests: relayd's smarthost.

Run as a separate process so that relayd talks to a real server over a real
socket, and so that a test can stop it (an outage) and start it again.
Every accepted message is written as ``<dir>/<n>.eml`` holding the exact
DATA bytes the client sent (dot-unstuffed, CRLF kept, nothing added), with
its envelope in ``<dir>/<n>.json`` beside it. Both are written to a
temporary name and renamed, and the ``.json`` comes last, so a reader that
sees ``<n>.json`` sees the whole message.

Usage: python sink.py --port PORT --directory DIR [--host 127.0.0.1] [--dsn] [--no-smtputf8]

With ``--dsn`` it advertises DSN (RFC 3461) and accepts its parameters;
either way the ``.json`` holds the MAIL and RCPT arguments exactly as sent
(``mail_command``, ``rcpt_commands``), as aiosmtpd's option lists are
upper-cased. It offers SMTPUTF8 (RFC 6531), as aiosmtpd's Controller does
by default, unless ``--no-smtputf8`` is given.

Numbering continues from the files already in DIR, so a restarted sink does
not overwrite what an earlier one received. Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class RecordingSMTP(SMTP):
    """
    aiosmtpd's server with its line limit raised: the sink records what the
    relay sends, it does not judge it (a long line must reach the test, not
    be refused here with an unrelated error).
    """

    line_length_limit = 1 << 20
    dsn = False

    def _getparams(self, params):
        # aiosmtpd refuses every parameter it does not know (555); the DSN
        # ones are taken here, and recorded from the raw arguments below.
        found = super()._getparams(params)
        if self.dsn and found is not None:
            for name in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                found.pop(name, None)
        return found

    async def smtp_MAIL(self, arg):
        await super().smtp_MAIL(arg)
        if self.envelope.mail_from is not None and not hasattr(self.envelope, "mail_command"):
            self.envelope.mail_command = arg

    async def smtp_RCPT(self, arg):
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if len(self.envelope.rcpt_tos) > before:
            self.envelope.__dict__.setdefault("rcpt_commands", []).append(arg)


class Recorder:
    """aiosmtpd handler that stores each message's bytes and envelope."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        existing = [
            int(name.split(".")[0])
            for name in os.listdir(directory)
            if name.endswith(".json") and name.split(".")[0].isdigit()
        ]
        self._next = max(existing, default=0) + 1

    def _write(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.directory, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(self.directory, name))

    async def handle_DATA(self, server, session, envelope) -> str:
        with self._lock:
            number = self._next
            self._next += 1
        self._write(f"{number}.eml", envelope.original_content)
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "mail_command": getattr(envelope, "mail_command", None),
            "rcpt_commands": getattr(envelope, "rcpt_commands", []),
            "peer": list(session.peer) if session.peer else None,
            "helo": session.host_name,
            "received_at": time.time(),
            "size": len(envelope.original_content),
        }
        self._write(f"{number}.json", json.dumps(meta, indent=1).encode("utf-8"))
        return f"250 2.0.0 Ok: stored as {number}"


class Advertiser:
    """Adds DSN to the EHLO reply (aiosmtpd's handle_EHLO hook)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-DSN", responses[-1]]


class DSNRecorder(Recorder, Advertiser):
    pass


class SinkController(Controller):
    dsn = False

    def factory(self):
        server = RecordingSMTP(self.handler, **self.SMTP_kwargs)
        server.dsn = self.dsn
        return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--dsn", action="store_true", help="advertise and accept DSN")
    parser.add_argument("--no-smtputf8", dest="smtputf8", action="store_false",
                        help="do not offer SMTPUTF8")
    args = parser.parse_args(argv)

    os.makedirs(args.directory, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    controller = SinkController(
        (DSNRecorder if args.dsn else Recorder)(args.directory),
        hostname=args.host,
        port=args.port,
        server_hostname="sink.test",
        ready_timeout=10.0,
        enable_SMTPUTF8=args.smtputf8,
    )
    controller.dsn = args.dsn
    controller.start()
    print(f"sink: listening on {args.host}:{args.port}, writing to {args.directory}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        controller.stop()
    print("sink: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
