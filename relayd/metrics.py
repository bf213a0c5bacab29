"""
Prometheus metrics: counters from the mail log's own events, queue gauges
read from the scheduler, and the ``/metrics`` page on ``metrics.endpoint``.

The counters are fed by the events relayd.maillog emits (each carries its
name in the field ``event``): ``updatesFor`` turns one event into metric
updates, a pure function tested as a table, and ``MetricsRegistry.apply`` applies
them. So a line in the log and a count in the metrics come from one call
and can never disagree. The updates are plain tuples
``(metric, label values, amount)``: a process that does not serve the page
can compute them and hand them to the one that does, whose ``MetricsRegistry``
applies them as if they were its own.

With intake workers (``processes`` above 1) the master serves the one page:
each worker counts its own events into an ``UpdateBatch``, which sends them
to the master over the worker's channel, added up, at most every
FLUSH_INTERVAL (or sooner when a batch is full); the master applies them
to its registry beside its own (delivery, the queue). What a worker adds
to a gauge (connections open) leaves with it when it is gone.

Every label value is the configuration's (a listener's endpoint, a route's
host, ``mx``) or relayd's own vocabulary (a reply's name, a status, a TLS
version): never something a client or a peer chose, so no sender can make
the series grow.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import ILogObserver, Logger
from twisted.protocols import policies
from twisted.web import http, resource, server
from zope.interface import provider

from relayd import replies
from relayd.tcp import setNoDelay

log = Logger()

# (metric name, label values, amount): one change to one series.
Update = tuple[str, tuple[str, ...], float]

# Queue states as the gauges label them: being delivered now, waiting for
# their next attempt (the first one too), on hold.
QUEUE_STATES = ("active", "deferred", "held")
# Recipient results, in the log's words (status=sent/deferred/bounced).
RECIPIENT_STATUSES = ("sent", "deferred", "bounced")
DKIM_RESULTS = ("signed", "unsigned")
OTHER = "other"

# Seconds; attempts wait for timeouts of minutes, commits for a disk.
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# The series that are gauges (a level, not a count): a process that ends
# takes its share of them along (MetricsRegistry.forget).
GAUGES = frozenset({"relayd_connections_open"})
HISTOGRAMS = frozenset({"relayd_delivery_attempt_duration_seconds",
                        "relayd_spool_commit_duration_seconds"})

# An intake worker's updates on their way to the master (UpdateBatch): sent
# at most this long after the first one waits, or at once when a batch has
# MAX_BATCH entries or about MAX_BATCH_BYTES of names and labels (well
# within one AMP value of 64 kB).
FLUSH_INTERVAL = 0.5
MAX_BATCH = 100
MAX_BATCH_BYTES = 32_000

# The /metrics page: a scraper's request has no body, few headers, and
# gets its answer at once; these bound what anything else can hold.
HTTP_TIMEOUT = 30
HTTP_CONNECTIONS = 16


def _replyPatterns() -> list[tuple[re.Pattern, str]]:
    """Every named reply of relayd.replies as a pattern of its text (fields match anything)."""
    found = []
    for name, reply in vars(replies).items():
        if not isinstance(reply, replies.Reply):
            continue
        pieces = re.split(r"\{\w+\}", str(reply))
        pattern = re.compile(".*".join(re.escape(p) for p in pieces) + r"\Z", re.DOTALL)
        found.append((sum(len(p) for p in pieces), pattern, name.lower()))
    # The most literal text first, so a reply is named by its most specific pattern.
    return [(pattern, name) for _, pattern, name in sorted(found, key=lambda f: (-f[0], f[2]))]


_REPLY_PATTERNS = _replyPatterns()


def replyName(text: str) -> str:
    """The lower-cased name in relayd.replies of a reply as sent (``relay_denied``), or ``other``."""
    for pattern, name in _REPLY_PATTERNS:
        if pattern.match(text):
            return name
    return OTHER


def _tlsVersion(value: object) -> str:
    # OpenSSL's protocol names (TLSv1.2, TLSv1.3); anything else is one value.
    text = str(value or "")
    return text if re.fullmatch(r"(TLSv1(\.[0-3])?|SSLv3)", text) else OTHER


def updatesFor(event: Mapping) -> list[Update]:
    """What one mail-log event changes in the metrics (nothing for events that are not counted)."""
    kind = event.get("event")
    if kind is None or not str(event.get("log_namespace", "")).startswith("relayd/"):
        return []
    if kind == "connected":
        listener = event.get("listener") or OTHER
        return [("relayd_connections_total", (listener,), 1),
                ("relayd_connections_open", (listener,), 1)]
    if kind == "disconnected":
        return [("relayd_connections_open", (event.get("listener") or OTHER,), -1)]
    if kind == "rejected":
        return [("relayd_rejects_total", (str(event.get("stage")), replyName(str(event.get("reply")))), 1)]
    if kind == "messageQueued":
        return [("relayd_messages_accepted_total", (), 1)]
    if kind == "saslAccepted":
        return [("relayd_auth_total", ("success",), 1)]
    if kind == "saslFailed":
        return [("relayd_auth_total", ("failure",), 1)]
    if kind == "tlsAccepted":
        return [("relayd_tls_sessions_total", ("inbound", _tlsVersion(event.get("tls_protocol"))), 1)]
    if kind == "tlsConnection":
        return [("relayd_tls_sessions_total", ("outbound", _tlsVersion(event.get("tls_protocol"))), 1)]
    if kind == "delivery":
        status = event.get("status")
        if status not in RECIPIENT_STATUSES:
            status = OTHER
        return [("relayd_recipients_total", (status, event.get("route") or OTHER), 1)]
    if kind == "expired":
        return [("relayd_messages_expired_total", (), 1)]
    if kind == "dkim":
        result = event.get("dkim")
        return [("relayd_dkim_messages_total", (result if result in DKIM_RESULTS else OTHER,), 1)]
    return []


def queueSnapshot(envelopes: Iterable, active: Iterable[str], now: float) -> dict[str, tuple[int, float]]:
    """
    Per queue state: (messages, age in seconds of the oldest one; 0 when
    there is none). ``active``: the ids being delivered now.
    """
    active = set(active)
    counts = {state: 0 for state in QUEUE_STATES}
    oldest: dict[str, float] = {}
    for envelope in envelopes:
        if envelope.queueId in active:
            state = "active"
        elif envelope.hold:
            state = "held"
        else:
            state = "deferred"
        counts[state] += 1
        if state not in oldest or envelope.arrival < oldest[state]:
            oldest[state] = envelope.arrival
    return {state: (counts[state], max(0.0, now - oldest[state]) if state in oldest else 0.0)
            for state in QUEUE_STATES}


class QueueCollector:
    """The queue gauges, computed at each scrape from ``snapshot()`` (queueSnapshot's result)."""

    def __init__(self, snapshot: Callable[[], dict[str, tuple[int, float]]]) -> None:
        self.snapshot = snapshot

    def describe(self):
        return [GaugeMetricFamily("relayd_queue_messages", "Messages in the queue, by state",
                                  labels=["state"]),
                GaugeMetricFamily("relayd_queue_oldest_message_age_seconds",
                                  "Age of the oldest message in the queue, by state (0: none)",
                                  labels=["state"])]

    def collect(self):
        snapshot = self.snapshot()
        size, age = self.describe()
        for state in QUEUE_STATES:
            count, oldest = snapshot.get(state, (0, 0.0))
            size.add_metric([state], count)
            age.add_metric([state], oldest)
        yield size
        yield age


class UpdateSink:
    """What takes updates (``apply``): the log observer and the timers built on it."""

    def apply(self, updates: Iterable[Update]) -> None:
        raise NotImplementedError

    def observer(self) -> ILogObserver:
        """A twisted.logger observer that counts the mail log's events."""

        @provider(ILogObserver)
        def observe(event: dict) -> None:
            updates = updatesFor(event)
            if updates:
                self.apply(updates)

        return observe

    def timedAttempt(self, route: str, seconds: float) -> None:
        self.apply([("relayd_delivery_attempt_duration_seconds", (route,), seconds)])

    def timedCommit(self, seconds: float) -> None:
        self.apply([("relayd_spool_commit_duration_seconds", (), seconds)])


class MetricsRegistry(UpdateSink):
    """
    relayd's metrics in a registry of their own (not prometheus_client's
    global one, which would also expose the Python process's).

    With intake workers, the master's registry is the daemon's: each
    worker's batches are applied with ``applyFrom(worker, ...)``, which
    remembers the worker's share of every gauge, and ``forget(worker)``
    takes that share away when the worker is gone (killed, too), so its
    open connections do not stay counted. Counters keep what every worker
    counted.
    """

    def __init__(self) -> None:
        # No *_created series: a start time per series that dashboards do
        # not use doubles the page (a process-wide switch of prometheus_client).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self._metrics = {m._name: m for m in (
            Counter("relayd_connections", "Client connections accepted, by listener",
                    ["listener"], registry=r),
            Gauge("relayd_connections_open", "Client connections open now, by listener",
                  ["listener"], registry=r),
            Counter("relayd_messages_accepted", "Messages accepted and queued", registry=r),
            Counter("relayd_rejects", "Commands refused with a logged reject (Postfix's "
                    "'reject:' lines), by SMTP stage and reply name", ["stage", "reason"],
                    registry=r),
            Counter("relayd_recipients", "Recipient results of delivery attempts, by status "
                    "and route (mx, or the route's first configured host)", ["status", "route"],
                    registry=r),
            Counter("relayd_messages_expired", "Messages returned at the end of queue.lifetime",
                    registry=r),
            Counter("relayd_dkim_messages", "Messages of a DKIM domain, signed or sent unsigned",
                    ["result"], registry=r),
            Counter("relayd_auth", "SMTP AUTH attempts, by result", ["result"], registry=r),
            Counter("relayd_tls_sessions", "TLS sessions, by direction and protocol version",
                    ["direction", "version"], registry=r),
            Histogram("relayd_delivery_attempt_duration_seconds",
                      "Duration of one delivery attempt to one destination, by route",
                      ["route"], buckets=ATTEMPT_BUCKETS, registry=r),
            Histogram("relayd_spool_commit_duration_seconds",
                      "Duration of committing an accepted message to the spool (written and fsynced)",
                      buckets=COMMIT_BUCKETS, registry=r),
        )}
        # Counters are registered without their _total suffix.
        self._metrics = {(f"{n}_total" if isinstance(m, Counter) else n): m
                         for n, m in self._metrics.items()}
        for result in ("success", "failure"):
            self._metrics["relayd_auth_total"].labels(result)

        # Per source (an intake worker): its net share of each gauge series.
        self._shares: dict[object, dict[tuple[str, tuple[str, ...]], float]] = {}

    def apply(self, updates: Iterable[Update]) -> None:
        """Apply updates: counters and gauges move by the amount, histograms observe it."""
        for name, labels, amount in updates:
            metric = self._metrics[name]
            series = metric.labels(*labels) if labels else metric
            if isinstance(metric, Histogram):
                series.observe(amount)
            else:
                series.inc(amount)

    def applyFrom(self, source: object, updates: Iterable[Update]) -> None:
        """
        Another process's updates, as if they were this one's. An update
        this registry has no series for (an unknown name, a wrong number
        of labels, a counter going down) is left out.
        """
        shares = self._shares.setdefault(source, {})
        for name, labels, amount in updates:
            labels = tuple(labels)
            if name not in self._metrics:
                continue
            try:
                # prometheus_client refuses a wrong label count and a counter going down.
                self.apply([(name, labels, amount)])
            except ValueError:
                continue
            if name in GAUGES:
                key = (name, labels)
                shares[key] = shares.get(key, 0) + amount

    def forget(self, source: object) -> None:
        """``source`` is gone: its share of every gauge goes with it."""
        for (name, labels), amount in self._shares.pop(source, {}).items():
            if amount:
                self.apply([(name, labels, -amount)])

    def addQueue(self, snapshot: Callable[[], dict[str, tuple[int, float]]]) -> None:
        self.registry.register(QueueCollector(snapshot))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when asked) and its content type."""
        encoder, contentType = choose_encoder(accept)
        return encoder(self.registry), contentType


class TimedTransport:
    """A delivery transport that times each attempt (call to result) for the histogram."""

    def __init__(self, transport, metrics: MetricsRegistry, clock) -> None:
        self.transport = transport
        self.metrics = metrics
        self.clock = clock

    def deliver(self, destination, *args, **kwargs):
        started = self.clock.seconds()

        def timed(result):
            self.metrics.timedAttempt(destination.name, self.clock.seconds() - started)
            return result

        return self.transport.deliver(destination, *args, **kwargs).addCallback(timed)

    def __getattr__(self, name):
        return getattr(self.transport, name)


class UpdateBatch(UpdateSink):
    """
    An intake worker's metric updates on their way to the master, which
    serves the daemon's one page: ``send(updates)`` (a Deferred) carries a
    batch over the worker's channel. Updates to the same counter or gauge
    series are added up while they wait; histogram observations wait one
    by one. A batch goes at most FLUSH_INTERVAL after its first update, or
    at once when it reaches MAX_BATCH entries or MAX_BATCH_BYTES: what
    waits is bounded, and the channel carries one command per batch, never
    one per event.
    """

    def __init__(self, send: Callable[[list[Update]], defer.Deferred], clock,
                 interval: float = FLUSH_INTERVAL, limit: int = MAX_BATCH,
                 limitBytes: int = MAX_BATCH_BYTES) -> None:
        self.send = send
        self.clock = clock
        self.interval = interval
        self.limit = limit
        self.limitBytes = limitBytes
        self._sums: dict[tuple[str, tuple[str, ...]], float] = {}
        self._observations: list[Update] = []
        self._bytes = 0
        self._timer = None

    def __len__(self) -> int:
        """Entries waiting: series with a sum, and observations."""
        return len(self._sums) + len(self._observations)

    def apply(self, updates: Iterable[Update]) -> None:
        for name, labels, amount in updates:
            key = (name, tuple(labels))
            if name in HISTOGRAMS:
                self._observations.append((name, key[1], amount))
            elif key in self._sums:
                self._sums[key] += amount
                continue
            else:
                self._sums[key] = amount
            # About what AMP writes for the entry: its values and their keys and lengths.
            self._bytes += len(name) + sum(len(label.encode()) + 2 for label in key[1]) + 64
            if len(self) >= self.limit or self._bytes >= self.limitBytes:
                self.flush()
            elif self._timer is None:
                self._timer = self.clock.callLater(self.interval, self.flush)

    def flush(self) -> defer.Deferred:
        """Send what waits now; fires once the master has it (or could not be told)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        # A gauge whose changes added up to nothing is sent too: the series appears.
        batch = [(name, labels, amount) for (name, labels), amount in self._sums.items()
                 ] + self._observations
        self._sums, self._observations, self._bytes = {}, [], 0
        if not batch:
            return defer.succeed(None)
        d = defer.maybeDeferred(self.send, batch)
        d.addErrback(self._notTaken)
        return d

    @staticmethod
    def _notTaken(failure) -> None:
        # A master that is gone cannot be told: its successor starts counting anew.
        if not failure.check(ConnectionError, error.ConnectionClosed):
            log.failure("sending metric updates to the master", failure)


class MetricsService(service.MultiService):
    """
    Counting and serving: the log observer on ``publisher`` while running,
    and ``listener`` (the page's listening service) as its child.
    """

    name = "metrics"

    def __init__(self, metrics: MetricsRegistry, publisher, listener: service.Service) -> None:
        super().__init__()
        self.metrics = metrics
        self.publisher = publisher
        self._observer = metrics.observer()
        listener.setServiceParent(self)

    def startService(self) -> None:
        self.publisher.addObserver(self._observer)
        super().startService()

    def stopService(self):
        self.publisher.removeObserver(self._observer)
        return super().stopService()


# The /metrics page ---------------------------------------------------------------


class MetricsPage(resource.Resource):
    """
    ``GET /metrics``, rendered on the reactor thread from in-memory values
    only (no file system call): the queue gauges read the scheduler's
    state, which only that thread may read. prometheus_client's own
    Twisted resource would collect in a thread of the global reactor's
    pool instead.
    """

    isLeaf = True

    def __init__(self, metrics: MetricsRegistry) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        accept = request.getHeader(b"accept")
        body, contentType = self.metrics.render(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return body


class _Request(server.Request):
    def gotLength(self, length) -> None:
        # A scrape has no body; anything else would be buffered (past 100 kB
        # in a temporary file, on the reactor thread): refused by closing.
        if length is None or length > 0:
            self.channel.transport.abortConnection()
        super().gotLength(0)


class _Channel(http.HTTPChannel):
    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        super().connectionMade()


class _QuietSite(server.Site):
    protocol = _Channel
    requestFactory = _Request

    def log(self, request) -> None:
        """No access log: a scrape every few seconds is not an event."""


class _Limited(policies.WrappingFactory):
    """At most ``limit`` connections at once; more are closed at once."""

    noisy = False

    def __init__(self, factory, limit: int) -> None:
        super().__init__(factory)
        self.limit = limit

    def buildProtocol(self, addr):
        if len(self.protocols) >= self.limit:
            return None
        return super().buildProtocol(addr)


def metricsSite(metrics: MetricsRegistry, reactor) -> policies.WrappingFactory:
    """The HTTP factory for ``metrics.endpoint``: ``/metrics`` and nothing else (404)."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    site = _QuietSite(root, timeout=HTTP_TIMEOUT, reactor=reactor)
    site.noisy = False
    return _Limited(site, HTTP_CONNECTIONS)


__all__ = ("MetricsPage", "MetricsRegistry", "MetricsService", "QueueCollector", "TimedTransport",
           "UpdateBatch", "UpdateSink", "metricsSite", "queueSnapshot", "replyName", "updatesFor")
