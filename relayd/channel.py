"""
The local channel between the master process and its intake workers: AMP
commands over a socketpair the master creates for each worker (no path in
the file system, so nothing but the two processes can reach it).

Worker to master, on the intake path:
  ``Admit``       may this client address have a session (after its PROXY
                  header)? the master counts ``limits.connections`` and
                  ``connections_per_client`` over every process;
  ``Left``        a session admitted by ``Admit`` has ended;
  ``StartCheck``  may a password check for this address start now (the
                  AUTH failure throttle, with checks in flight counted)?
  ``CheckEnded``  a check started by ``StartCheck`` has ended (failed or not);
  ``Failed``      an AUTH failure that needed no check (authzid mismatch);
  ``Committing``  a message is about to be committed: if the worker dies
                  from here on, the master looks for it in the spool. With
                  the recipients' ``domains``, it also asks whether the
                  worker may make the first delivery attempt itself:
                  allowed, the master counts the slots it takes against
                  ``delivery.concurrency`` and ``destination_concurrency``
                  (and the message against ``messages_per_user_per_hour``,
                  for ``login``). Not allowed, the worker keeps the
                  message in its own line for a slot (``StartAttempt``)
                  or sends ``Queued`` once the commit is done;
  ``StartAttempt`` a message in that line asks again, when one of the
                  worker's attempts has ended: allowed, as for
                  ``Committing``; not allowed, it waits on (or is handed
                  over with ``Queued`` when the worker has no attempt left);
  ``Queued``      the message is committed: the master loads its envelope
                  from the spool and schedules it (also for the notices a
                  worker writes);
  ``AttemptEnded`` a message the worker was allowed to attempt is done
                  with: its slots are free, and it is gone from the spool
                  (delivered, or its commit failed: ``kept`` false) or
                  written back and the master's from now on (``kept``).

  ``MetricUpdates`` a batch of metric updates (relayd.metrics.UpdateBatch),
                  applied by the master to the daemon's one registry;
  ``Accepting``   the worker's listeners accept: the daemon is ready once
                  every worker has said so.

  ``RunningConfig``  the master's running configuration, as YAML, a page
                  at a time: what a worker runs with, at its start and at
                  each reload, whatever the file says by then.

Master to worker:
  ``Ping``        the heartbeat: answered by the worker's reactor thread;
  ``StallWorker`` for tests only (RELAYD_TEST_HOOKS=1): block the worker's
                  reactor thread, to show that the watchdog notices;
  ``ConfigChanged`` the master has applied a new configuration: fetch it;
  ``BlockStarted`` / ``BlockLifted``  the AUTH block list changed;
  ``RateLimited`` a login reached ``messages_per_user_per_hour`` until then.

Addresses are normalized client IP addresses; times are the master's clock
seconds (every process reads the same wall clock).
"""

from __future__ import annotations

from twisted.protocols import amp

# Admit's answers: admitted, or which limit refused the session.
ADMITTED = ""
REFUSED_CONNECTIONS = "connections"
REFUSED_PER_CLIENT = "connections_per_client"


class Admit(amp.Command):
    commandName = b"admit"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"refusal", amp.Unicode())]


class Left(amp.Command):
    commandName = b"left"
    arguments = [(b"address", amp.Unicode())]
    requiresAnswer = False


class StartCheck(amp.Command):
    commandName = b"start-check"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"allowed", amp.Boolean())]


class CheckEnded(amp.Command):
    """The answer: when the block this failure started ends (absent: no new block)."""

    commandName = b"check-ended"
    arguments = [(b"address", amp.Unicode()), (b"failed", amp.Boolean())]
    response = [(b"blockedUntil", amp.Float(optional=True))]


class Failed(amp.Command):
    commandName = b"failed"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"blockedUntil", amp.Float(optional=True))]


class Committing(amp.Command):
    commandName = b"committing"
    arguments = [(b"queueId", amp.Unicode()), (b"login", amp.Unicode(optional=True)),
                 (b"domains", amp.ListOf(amp.Unicode(), optional=True))]
    response = [(b"allowed", amp.Boolean(optional=True))]


# The most bytes of recipient domains a Committing carries (within one
# AMP value); a message with more is handed to the master after its commit.
DOMAINS_BYTES = 60_000
assert DOMAINS_BYTES < amp.MAX_VALUE_LENGTH


class Queued(amp.Command):
    commandName = b"queued"
    arguments = [(b"queueId", amp.Unicode()), (b"login", amp.Unicode(optional=True))]
    requiresAnswer = False


class StartAttempt(amp.Command):
    commandName = b"start-attempt"
    arguments = [(b"queueId", amp.Unicode()), (b"domains", amp.ListOf(amp.Unicode()))]
    response = [(b"allowed", amp.Boolean())]


class AttemptEnded(amp.Command):
    commandName = b"attempt-ended"
    arguments = [(b"queueId", amp.Unicode()), (b"kept", amp.Boolean())]
    requiresAnswer = False


class MetricUpdates(amp.Command):
    """relayd.metrics updates (metric, label values, amount), one batch (bounded by UpdateBatch)."""

    commandName = b"metric-updates"
    arguments = [(b"updates", amp.AmpList([(b"name", amp.Unicode()),
                                           (b"labels", amp.ListOf(amp.Unicode())),
                                           (b"amount", amp.Float())]))]
    response = []


class Accepting(amp.Command):
    commandName = b"accepting"
    arguments = []
    requiresAnswer = False


# Characters per RunningConfig page: at most 4 bytes of UTF-8 each, within one AMP value.
CONFIG_PAGE = 16_000
assert CONFIG_PAGE * 4 < amp.MAX_VALUE_LENGTH


class RunningConfig(amp.Command):
    commandName = b"running-config"
    arguments = [(b"offset", amp.Integer())]
    response = [(b"text", amp.Unicode()), (b"total", amp.Integer()), (b"path", amp.Unicode())]


class Ping(amp.Command):
    commandName = b"ping"
    arguments = []
    response = [(b"sessions", amp.Integer())]


class StallWorker(amp.Command):
    """For tests only: the worker's reactor thread sleeps ``seconds`` (refused unless enabled)."""

    commandName = b"test-stall"
    arguments = [(b"seconds", amp.Float())]
    response = []
    errors = {ValueError: b"NOT_ENABLED"}


class ConfigChanged(amp.Command):
    commandName = b"config-changed"
    arguments = []
    response = []


class BlockStarted(amp.Command):
    commandName = b"blocked"
    arguments = [(b"address", amp.Unicode()), (b"until", amp.Float())]
    requiresAnswer = False


class BlockLifted(amp.Command):
    commandName = b"unblocked"
    arguments = [(b"address", amp.Unicode())]
    requiresAnswer = False


class RateLimited(amp.Command):
    commandName = b"rate-limited"
    arguments = [(b"login", amp.Unicode()), (b"until", amp.Float())]
    requiresAnswer = False


class Quiet(amp.AMP):
    """AMP without its log lines for every connection made and lost."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
