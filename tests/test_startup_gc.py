"""
After start-up, the cyclic garbage collector leaves alone what start-up
loaded (the recovered queue above all): its full passes would otherwise scan
every queued message again, the reactor stopped meanwhile. The daemon's
service runs in a subprocess, so the freeze stays out of the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60

CONFIG = """\
hostname: relay.test
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: none, auth: none}}
queue: {{directory: {spool}, retry: {{min: 1h, max: 1h}}}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 9, tls: none}}]
"""


def scenarioMain(configPath: str) -> None:
    """Start the daemon's service from ``configPath``; print what the collector still tracks."""
    import gc

    from twisted.internet import defer, task

    from relayd import config, tap
    from relayd.envelope import Envelope

    async def main(reactor):
        relay = tap.makeService({"loaded": config.load(configPath)}, reactor)
        relay.startService()
        tracked = sum(1 for o in gc.get_objects() if isinstance(o, Envelope))
        print(json.dumps({"queued": relay.scheduler.queueLength(), "trackedEnvelopes": tracked,
                          "frozen": gc.get_freeze_count()}))
        await relay.stopService()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def test_the_queue_loaded_at_start_up_is_left_out_of_garbage_collection(tmp_path):
    from relayd.envelope import Envelope, Recipient, newQueueId
    from relayd.queue import Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    for _ in range(3):
        envelope = Envelope(queueId=newQueueId(), sender="a@example.com",
                            recipients=[Recipient("b@example.org")], arrival=1_700_000_000.0,
                            size=20, clientAddress="127.0.0.1", clientName="localhost", helo="c")
        writer = spool.begin(envelope.queueId)
        writer.write(b"Subject: hi\r\n\r\nhello\r\n")
        writer.commit(envelope)
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(CONFIG.format(spool=tmp_path / "spool"))
    code = ("import sys; from tests.test_startup_gc import scenarioMain; "
            "scenarioMain(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(configPath)],
                          cwd=ROOT, capture_output=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["queued"] == 3
    assert result["trackedEnvelopes"] == 0 and result["frozen"] > 0, result
