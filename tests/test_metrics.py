"""
relayd.metrics: which mail-log event moves which series (a table), label
values that no sender chooses, the queue gauges, the timers, the page.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from relayd import maillog, metrics, replies
from relayd.config import NextHop
from relayd.delivery import Destination
from relayd.route import mxHop


def events(call) -> list[dict]:
    """The events one maillog call emits."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        call()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return seen


def updates(call) -> list:
    return [u for e in events(call) for u in metrics.updatesFor(e)]


L = "tcp:587"


@pytest.mark.parametrize("call, expected", [
    (lambda: maillog.connected("unknown", "192.0.2.1", L),
     [("relayd_connections_total", (L,), 1), ("relayd_connections_open", (L,), 1)]),
    (lambda: maillog.disconnected("unknown", "192.0.2.1", listener=L),
     [("relayd_connections_open", (L,), -1)]),
    (lambda: maillog.rejected(None, "RCPT", "unknown", "192.0.2.1",
                              str(replies.RELAY_DENIED.format(address="x@evil.example")),
                              "a@b.example", "x@evil.example", "helo"),
     [("relayd_rejects_total", ("RCPT", "relay_denied"), 1)]),
    (lambda: maillog.messageQueued("4F2A9C31B7AAAAAA", "a@b.example", 100, 2),
     [("relayd_messages_accepted_total", (), 1)]),
    (lambda: maillog.saslAccepted("unknown", "192.0.2.1", "PLAIN", "alice"),
     [("relayd_auth_total", ("success",), 1)]),
    (lambda: maillog.saslFailed("unknown", "192.0.2.1", "PLAIN", "authentication failure", "alice"),
     [("relayd_auth_total", ("failure",), 1)]),
    (lambda: maillog.tlsAccepted("unknown", "192.0.2.1", "TLSv1.3", "TLS_AES_256_GCM_SHA384", 256),
     [("relayd_tls_sessions_total", ("inbound", "TLSv1.3"), 1)]),
    (lambda: maillog.tlsConnection("mx.example[192.0.2.9]:25", "Verified", "TLSv1.2", "X", 128),
     [("relayd_tls_sessions_total", ("outbound", "TLSv1.2"), 1)]),
    (lambda: maillog.delivery("4F2A9C31B7AAAAAA", "b@x.example", "mx.x.example[192.0.2.9]:25", 1,
                              (0, 0, 0.5, 0.5), "4.4.1", "deferred", "refused", route="mx"),
     [("relayd_recipients_total", ("deferred", "mx"), 1)]),
    (lambda: maillog.delivery("4F2A9C31B7AAAAAA", "b@x.example", "none", 1,
                              (0, 0, 0.5, 0.5), "2.0.0", "sent", "ok", route="smtp.example.net"),
     [("relayd_recipients_total", ("sent", "smtp.example.net"), 1)]),
    (lambda: maillog.expired("4F2A9C31B7AAAAAA", "a@b.example"),
     [("relayd_messages_expired_total", (), 1)]),
    (lambda: maillog.dkimSigned("4F2A9C31B7AAAAAA", "example.com", ("r1", "e1")),
     [("relayd_dkim_messages_total", ("signed",), 1)]),
    (lambda: maillog.dkimUnsigned("4F2A9C31B7AAAAAA", "From: <a@b> is not an address login x may use"),
     [("relayd_dkim_messages_total", ("unsigned",), 1)]),
    # Events that are logged but not counted.
    (lambda: maillog.removed("4F2A9C31B7AAAAAA"), []),
    (lambda: maillog.daemonEvent("daemon started"), []),
])
def test_which_event_moves_which_series(call, expected):
    assert updates(call) == expected


def test_a_sender_cannot_choose_a_label_value():
    """An address, a HELO name or a peer's TLS version string never becomes a label value."""
    found = updates(lambda: (
        maillog.rejected(None, "RCPT", "unknown", "192.0.2.1",
                         "554 5.7.1 <a@b>: something no table has", "x@y", "a@b", "helo"),
        maillog.tlsAccepted("unknown", "192.0.2.1", "TLSv9 <script>", "X", 1),
    ))
    assert found == [("relayd_rejects_total", ("RCPT", "other"), 1),
                     ("relayd_tls_sessions_total", ("inbound", "other"), 1)]


@pytest.mark.parametrize("reply, name", [
    (replies.RELAY_DENIED.format(address="a@b.example"), "relay_denied"),
    (replies.TOO_MANY_RECIPIENTS, "too_many_recipients"),
    (replies.AUTH_FAILED, "auth_failed"),
])
def test_reply_names(reply, name):
    assert metrics.replyName(str(reply)) == name


@pytest.mark.parametrize("destination, name", [
    (Destination((mxHop("example.org"),)), "mx"),
    (Destination((NextHop("smtp.example.net", 587, "starttls"),
                  NextHop("backup.example.net", 465, "implicit"))), "smtp.example.net"),
])
def test_destination_names(destination, name):
    assert destination.name == name


class E:
    def __init__(self, queueId, arrival, hold=False):
        self.queueId, self.arrival, self.hold = queueId, arrival, hold


def test_queue_snapshot():
    queue = [E("A", 100), E("B", 50), E("C", 10, hold=True), E("D", 70)]
    assert metrics.queueSnapshot(queue, ["D"], now=200) == {
        "active": (1, 130), "deferred": (2, 150), "held": (1, 190)}
    assert metrics.queueSnapshot([], [], now=200) == {
        "active": (0, 0.0), "deferred": (0, 0.0), "held": (0, 0.0)}


def scrape(registry_metrics) -> dict:
    body, contentType = registry_metrics.render(None)
    assert contentType.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_observer_counts_what_the_log_says_and_the_page_shows_it():
    m = metrics.MetricsRegistry()
    m.addQueue(lambda: {"deferred": (3, 42.0)})
    publisher = LogPublisher(m.observer())
    log = Logger(namespace="relayd/smtpd", observer=publisher)
    log.info("{log_line}", log_line="connect from x", event="connected", listener=L)
    log.info("{log_line}", log_line="connect from x", event="connected", listener=L)
    log.info("{log_line}", log_line="disconnect from x", event="disconnected", listener=L)
    # An event outside relayd's namespaces is never counted.
    Logger(namespace="other", observer=publisher).info("x", event="connected", listener=L)
    samples = scrape(m)
    assert samples[("relayd_connections_total", (("listener", L),))] == 2
    assert samples[("relayd_connections_open", (("listener", L),))] == 1
    assert samples[("relayd_queue_messages", (("state", "deferred"),))] == 3
    assert samples[("relayd_queue_messages", (("state", "held"),))] == 0
    assert samples[("relayd_queue_oldest_message_age_seconds", (("state", "deferred"),))] == 42
    assert samples[("relayd_auth_total", (("result", "failure"),))] == 0
    assert not [n for n, _ in samples if n.endswith("_created")]


def test_updates_from_another_process_apply_as_our_own():
    """What a worker computes with updatesFor can be applied by the process serving the page."""
    here, there = metrics.MetricsRegistry(), metrics.MetricsRegistry()
    event = {"log_namespace": "relayd/smtpd", "event": "saslFailed"}
    here.apply(metrics.updatesFor(event))
    there.apply(metrics.updatesFor(event))
    here.apply(metrics.updatesFor(event))
    assert scrape(here)[("relayd_auth_total", (("result", "failure"),))] == 2


def test_attempts_are_timed_by_route():
    clock = task.Clock()
    m = metrics.MetricsRegistry()
    pending = defer.Deferred()

    class Courier:
        heloName = "relay.example"

        def deliver(self, destination, *args):
            return pending

    timed = metrics.TimedTransport(Courier(), m, clock)
    assert timed.heloName == "relay.example"
    result = []
    timed.deliver(Destination((mxHop("example.org"),)), "a@b", {}, ["c@d"], None, 1).addCallback(
        result.append)
    clock.advance(7)
    pending.callback("result")
    assert result == ["result"]
    samples = scrape(m)
    assert samples[("relayd_delivery_attempt_duration_seconds_count", (("route", "mx"),))] == 1
    assert samples[("relayd_delivery_attempt_duration_seconds_sum", (("route", "mx"),))] == 7
    assert samples[("relayd_delivery_attempt_duration_seconds_bucket",
                    (("le", "5.0"), ("route", "mx")))] == 0
    assert samples[("relayd_delivery_attempt_duration_seconds_bucket",
                    (("le", "10.0"), ("route", "mx")))] == 1


def test_the_page_renders_on_the_calling_thread_and_negotiates_openmetrics():
    m = metrics.MetricsRegistry()
    m.timedCommit(0.003)
    page = metrics.MetricsPage(m)
    request = DummyRequest([b""])
    body = page.render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b"relayd_spool_commit_duration_seconds_count 1.0" in body
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
    body = page.render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# Intake workers: batches to the master, one registry for the daemon

LISTENER_UPDATES = [("relayd_connections_total", (L,), 1), ("relayd_connections_open", (L,), 1)]


def batchTo(sent, clock, **kwargs):
    def send(updates):
        sent.append(updates)
        return defer.succeed(None)

    return metrics.UpdateBatch(send, clock, **kwargs)


def test_a_batch_adds_up_each_series_and_goes_after_the_interval():
    clock, sent = task.Clock(), []
    batch = batchTo(sent, clock)
    for _ in range(3):
        batch.apply(LISTENER_UPDATES)
    batch.apply([("relayd_connections_open", (L,), -1)])
    batch.timedCommit(0.002)
    batch.timedCommit(0.004)
    clock.advance(metrics.FLUSH_INTERVAL - 0.01)
    assert sent == []
    clock.advance(0.01)
    assert sent == [[("relayd_connections_total", (L,), 3), ("relayd_connections_open", (L,), 2),
                     ("relayd_spool_commit_duration_seconds", (), 0.002),
                     ("relayd_spool_commit_duration_seconds", (), 0.004)]]
    # Nothing waits, nothing is sent, no timer runs.
    clock.advance(10)
    assert len(sent) == 1 and not clock.getDelayedCalls()
    # A gauge whose changes add up to nothing still goes (its series appears).
    batch.apply([("relayd_connections_open", ("tcp:25",), 1), ("relayd_connections_open", ("tcp:25",), -1)])
    clock.advance(metrics.FLUSH_INTERVAL)
    assert sent[1] == [("relayd_connections_open", ("tcp:25",), 0)]


def test_what_a_batch_holds_is_bounded_it_goes_at_once_when_full():
    clock, sent = task.Clock(), []
    batch = batchTo(sent, clock, limit=10)
    for i in range(25):
        batch.timedCommit(i / 1000)
        assert len(batch) < 10
    assert [len(b) for b in sent] == [10, 10]
    # The same series again and again is one entry: it never fills a batch.
    for _ in range(1000):
        batch.apply([("relayd_auth_total", ("failure",), 1)])
    assert len(sent) == 2 and len(batch) == 6
    clock.advance(metrics.FLUSH_INTERVAL)
    assert sent[2][0] == ("relayd_auth_total", ("failure",), 1000) and len(sent[2]) == 6
    # Long label values fill it by size too.
    batch = batchTo(sent, clock, limitBytes=1000)
    for i in range(10):
        batch.apply([("relayd_connections_total", (f"tcp:{i}:" + "x" * 200,), 1)])
    assert len(sent) == 5 and len(sent[3]) == 4 and len(sent[4]) == 4


def test_a_batch_the_master_cannot_take_is_dropped_not_kept():
    clock = task.Clock()
    batch = metrics.UpdateBatch(lambda updates: defer.fail(ConnectionError("gone")), clock)
    batch.apply(LISTENER_UPDATES)
    done = []
    batch.flush().addBoth(done.append)
    assert done == [None] and len(batch) == 0


def test_the_daemons_registry_adds_up_every_worker_and_forgets_a_gone_ones_gauges():
    m = metrics.MetricsRegistry()
    one, two = object(), object()
    m.apply(metrics.updatesFor({"log_namespace": "relayd/smtp", "event": "delivery",
                                "status": "sent", "route": "mx"}))
    m.applyFrom(one, LISTENER_UPDATES * 3 + [("relayd_auth_total", ("failure",), 2)])
    m.applyFrom(two, LISTENER_UPDATES + [("relayd_connections_open", (L,), -1),
                                         ("relayd_auth_total", ("failure",), 1),
                                         ("relayd_spool_commit_duration_seconds", (), 0.01)])
    samples = scrape(m)
    assert samples[("relayd_connections_total", (("listener", L),))] == 4
    assert samples[("relayd_connections_open", (("listener", L),))] == 3
    assert samples[("relayd_auth_total", (("result", "failure"),))] == 3
    assert samples[("relayd_recipients_total", (("route", "mx"), ("status", "sent")))] == 1
    assert samples[("relayd_spool_commit_duration_seconds_count", ())] == 1
    # Worker one is killed with its three connections open: they close with it.
    m.forget(one)
    samples = scrape(m)
    assert samples[("relayd_connections_open", (("listener", L),))] == 0
    assert samples[("relayd_connections_total", (("listener", L),))] == 4
    assert samples[("relayd_auth_total", (("result", "failure"),))] == 3
    m.forget(one)
    assert scrape(m)[("relayd_connections_open", (("listener", L),))] == 0
    # Its successor starts from nothing.
    m.applyFrom(object(), LISTENER_UPDATES)
    assert scrape(m)[("relayd_connections_open", (("listener", L),))] == 1


def test_updates_the_registry_has_no_series_for_are_left_out():
    m = metrics.MetricsRegistry()
    m.applyFrom(object(), [("no_such_metric", (), 1), ("relayd_auth_total", (), 1),
                           ("relayd_auth_total", ("failure", "extra"), 1),
                           ("relayd_auth_total", ("failure",), -5),
                           ("relayd_auth_total", ("success",), 1)])
    samples = scrape(m)
    assert samples[("relayd_auth_total", (("result", "failure"),))] == 0
    assert samples[("relayd_auth_total", (("result", "success"),))] == 1


def test_a_workers_batch_crosses_the_channel_and_reaches_the_masters_page(tmp_path):
    """Worker side (MasterLink.sendMetrics) to master side (WorkerLink) through AMP's encoding."""
    from twisted.protocols import amp

    from relayd import channel
    from relayd.master import Worker, WorkerLink
    from relayd.worker import MasterLink

    registry = metrics.MetricsRegistry()
    pool = type("Pool", (), {"metrics": registry})()
    workerOne, workerTwo = Worker(1, 0.0), Worker(2, 0.0)
    masterSides = {1: WorkerLink(pool, workerOne), 2: WorkerLink(pool, workerTwo)}

    def linkFor(number):
        link = MasterLink(task.Clock(), lost=lambda: None, parse=None)
        link.transport = object()

        def callRemote(command, **arguments):
            assert command is channel.MetricUpdates
            # As the bytes go: AMP's own encoding and parsing, no socket.
            wire = command.makeArguments(arguments, None).serialize()
            received = []
            reader = amp.BinaryBoxProtocol(type("R", (), {
                "ampBoxReceived": lambda self, box: received.append(box),
                "startReceivingBoxes": lambda self, sender: None})())
            reader.dataReceived(wire)
            return defer.succeed(masterSides[number].metricUpdates(
                **command.parseArguments(received[0], None)))

        link.callRemote = callRemote
        return link

    clock = task.Clock()
    batches = [metrics.UpdateBatch(linkFor(n).sendMetrics, clock) for n in (1, 2)]
    batches[0].apply(LISTENER_UPDATES * 2)
    batches[1].apply(LISTENER_UPDATES)
    batches[1].timedCommit(0.25)
    clock.advance(metrics.FLUSH_INTERVAL)
    samples = scrape(registry)
    assert samples[("relayd_connections_total", (("listener", L),))] == 3
    assert samples[("relayd_connections_open", (("listener", L),))] == 3
    assert samples[("relayd_spool_commit_duration_seconds_sum", ())] == 0.25
    registry.forget(workerOne)
    assert scrape(registry)[("relayd_connections_open", (("listener", L),))] == 1


@pytest.mark.parametrize("label", ["tcp:587", "é" * 2000])
def test_a_full_batch_fits_in_one_amp_value(label):
    from twisted.protocols import amp

    from relayd import channel

    clock, sent = task.Clock(), []
    batch = batchTo(sent, clock)
    while not sent:
        batch.timedAttempt(label, 0.5)
    updates = [{"name": n, "labels": list(ls), "amount": a} for n, ls, a in sent[0]]
    box = channel.MetricUpdates.makeArguments({"updates": updates}, None)
    assert len(box[b"updates"]) <= amp.MAX_VALUE_LENGTH
