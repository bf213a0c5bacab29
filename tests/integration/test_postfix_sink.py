"""relayd delivers to a real MTA's SMTP server: Postfix's smtp-sink."""

from __future__ import annotations

import re

import pytest

from tests.integration.harness import HOST, makeMessage, waitUntil

pytestmark = pytest.mark.integration


def test_delivery_to_postfix_smtp_sink(postfixSink, startRelayd):
    daemon = startRelayd(postfixSink.port)
    body = [".a first line with a dot", ".", "..", "end"]
    qid = daemon.submit(makeMessage("to smtp-sink", body), sender="alice@client.test",
                        recipients=("carol@remote.test",))
    daemon.waitForLog(
        rf"\b{qid}: to=<carol@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
        rf"{postfixSink.port}, .*\bdsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok\)")
    daemon.waitForLog(rf"\b{qid}: removed\b")

    dumps = waitUntil(lambda: postfixSink.dumps() or None, 10, "smtp-sink wrote no dump file")
    assert len(dumps) == 1
    # smtp-sink writes its dump with LF line endings.
    dump = dumps[0]
    assert b"X-Mail-Args: <alice@client.test>" in dump
    assert b"X-Rcpt-Args: <carol@remote.test>" in dump
    assert b"\nSubject: to smtp-sink\n" in dump
    assert b"\n\n" + "\n".join(body).encode() + b"\n" in dump, dump
