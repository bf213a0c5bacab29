"""
Every SMTP reply relayd's server sends, named once, with its enhanced status code.

A reply's text may hold ``{name}`` fields, filled by ``Reply.format``.
Values put into a reply are the server's own (queue ids, limits, the
hostname) or addresses that already passed the address grammar, never raw
client bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str | None
    text: str

    def format(self, **fields) -> "Reply":
        return Reply(self.code, self.enhanced, self.text.format(**fields))

    def toBytes(self) -> bytes:
        """The reply on the wire; a multi-line text becomes NNN- continuation lines."""
        # Built once per reply: the named replies go out several times per message.
        wire = self.__dict__.get("_wire")
        if wire is None:
            lines = self.text.split("\n")
            out = []
            for i, line in enumerate(lines):
                sep = "-" if i < len(lines) - 1 else " "
                prefix = f"{self.enhanced} " if self.enhanced else ""
                out.append(f"{self.code}{sep}{prefix}{line}\r\n")
            wire = "".join(out).encode("ascii", "replace")
            object.__setattr__(self, "_wire", wire)  # frozen: the fields, not this cache
        return wire

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"


# Connection
GREETING = Reply(220, None, "{hostname} ESMTP relayd")
CLOSING = Reply(221, "2.0.0", "Bye")
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Error: too many errors")

# Commands in general
RESET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
HELO_OK = Reply(250, None, "{hostname}")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_TEXT = Reply(214, "2.0.0", "See RFC 5321")
COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
# EXPN, ETRN and BDAT: known verbs relayd does not offer (RFC 5321 section 4.2.4).
COMMAND_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
# An HTTP or proxy request line, or a header line, sent as a command: the
# client is not speaking SMTP (or sends a body as commands), so it gets one
# closing reply in Postfix's words, without echoing anything it sent.
NON_SMTP_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Error: bad characters in command")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: {verb} hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: {verb}")
BAD_SENDER_ADDRESS = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_ADDRESS = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported option: {name}")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Bad parameter value: {name}")
# RFC 3461 section 4: each DSN parameter at most once per command (and so
# every other parameter); answered as Postfix does, a syntax error.
DUPLICATE_PARAMETER = Reply(501, "5.5.4", "Duplicate parameter: {name}")
PARAMETER_TOO_LONG = Reply(501, "5.5.4", "Parameter value too long: {name}")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")

# Envelope
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
MESSAGE_TOO_BIG_DECLARED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: Relay access denied")
NO_POSTMASTER = Reply(550, "5.1.1", "<{address}>: Recipient address rejected: no postmaster address is configured")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")

# DATA
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queueId}")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_NEWLINE_DATA = Reply(550, "5.5.2", "Error: bare <CR> or <LF> in message; see RFC 5321 section 2.3.8")
DATA_LINE_TOO_LONG = Reply(550, "5.5.2", "Error: line longer than 998 characters in message")
COMMIT_FAILED = Reply(451, "4.3.0", "Error: queue file write error")
# Received: headers (relayd's own counted) reached limits.hop_count: a mail
# loop. RFC 3463's "routing loop detected" (Postfix answers 5.4.0).
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops")
NUL_IN_MESSAGE = Reply(550, "5.6.0", "Error: NUL character in message")

# Not offered on this listener
STARTTLS_NOT_OFFERED = Reply(502, "5.5.1", "Error: command not implemented")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")

# STARTTLS (RFC 3207)
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
PREGREET = Reply(554, "5.5.1", "Error: SMTP protocol synchronization")

# AUTH (RFC 4954)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_CHALLENGE = Reply(334, None, "{challenge}")
AUTH_NEED_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Error: invalid base64 data")
AUTH_MALFORMED = Reply(501, "5.5.2", "Error: malformed authentication response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed: authentication failure")
AUTH_PASSWORD_TOO_LONG = Reply(535, "5.7.8", "Error: authentication failed: password longer than 72 bytes")
AUTH_AUTHZID = Reply(535, "5.7.8", "Error: authentication failed: authorization identity must be empty or the login")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_THROTTLED = Reply(421, "4.7.0", "{hostname} Error: too many failed authentications; try again later")

# Sender binding and per-user rate
SENDER_NOT_OWNED = Reply(553, "5.7.1", "<{address}>: Sender address rejected: not owned by you")
USER_RATE_EXCEEDED = Reply(450, "4.7.1", "Error: too many messages from you in the last hour; try again later")

# Connection limits
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Error: too many connections")
TOO_MANY_CONNECTIONS_FROM_CLIENT = Reply(421, "4.7.0", "{hostname} Error: too many connections from your address")
# An intake process asked the process that keeps the limits, which did not answer in time.
LIMITS_NOT_ANSWERING = Reply(421, "4.3.0", "{hostname} Error: temporary failure, try again later")
