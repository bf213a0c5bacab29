"""
Durability: mail accepted while the smarthost is down survives a restart of
relayd and is delivered, exactly once, when the smarthost comes back.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.harness import exitStatusHint, makeMessage

pytestmark = pytest.mark.integration


def test_queued_mail_survives_outage_and_restart(sink, startRelayd):
    daemon = startRelayd(sink.port)

    # The path works before the outage.
    first = daemon.submit(makeMessage("before the outage", ["one"]))
    sink.waitForMessages(1, daemon.describe)
    daemon.waitForLog(rf"\b{first}: removed\b")

    sink.stop()
    queued = {}
    for n in range(3):
        subject = f"during the outage {n}"
        queued[subject] = daemon.submit(makeMessage(subject, [f"message {n}"]))
    # relayd tried and deferred each of them (the smarthost refuses connections).
    for qid in queued.values():
        daemon.waitForLog(rf"\b{qid}: to=<bob@remote\.test>, .*\bstatus=deferred\b")

    code = daemon.terminate()
    assert code == 0, f"after SIGTERM: {exitStatusHint(code)}\n{daemon.describe()}"
    assert len(sink.messages()) == 1

    restartedAt = daemon.logOffset()
    daemon.start()
    sink.start()
    for qid in queued.values():
        daemon.waitForLog(rf"\b{qid}: to=<bob@remote\.test>, .*\bstatus=sent\b", since=restartedAt)
        daemon.waitForLog(rf"\b{qid}: removed\b", since=restartedAt)

    delivered = sink.waitForMessages(4, daemon.describe)
    subjects = [
        re.search(rb"\r\nSubject: ([^\r\n]*)\r\n", d.content).group(1).decode()
        for d in delivered
    ]
    assert sorted(subjects) == sorted(["before the outage", *queued]), (
        f"each message must arrive exactly once; the sink got {subjects}")
