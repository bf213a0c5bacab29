"""
Load and validate relayd's YAML configuration into frozen, per-section objects.

The YAML keys are the public contract admins rely on, so loading is strict:
unknown keys, duplicate keys, YAML 1.1 surprises (``no`` meaning false,
``010`` meaning 8, ``1:30`` meaning 90) and keys whose feature is not built
yet are all refused, never ignored. Every problem becomes one
L{ConfigError} whose text is a single line naming the file and the key path:

    /etc/relayd/relayd.yaml: queue.lifetime: expected a duration like "5d", got "5 days"

Validation stops at the first problem: one clear line beats a page of
follow-on errors.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

__all__ = [
    "ConfigError",
    "Config",
    "Listener",
    "Relay",
    "Limits",
    "Retry",
    "Queue",
    "NextHop",
    "Delivery",
    "load",
    "parse",
    "parseDuration",
    "formatDuration",
    "parseSize",
    "formatSize",
    "SECRET_KEYS",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LISTENER_TLS_MODES = ("none", "starttls", "implicit")
LISTENER_AUTH_POLICIES = ("none", "optional", "required")
NEXTHOP_TLS_MODES = ("none", "may", "starttls", "implicit")

# What is built today; everything else in the *_MODES tuples is refused as
# "not supported yet" so a config never silently downgrades.
_BUILT_LISTENER_TLS = ("none",)
_BUILT_LISTENER_AUTH = ("none",)
_BUILT_NEXTHOP_TLS = ("none",)

DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
DEFAULT_MESSAGE_SIZE = 10_000_000
DEFAULT_RECIPIENTS = 100
DEFAULT_CONNECTIONS = 100
DEFAULT_CONNECTIONS_PER_CLIENT = 20
DEFAULT_RETRY_MIN = 5 * 60.0
DEFAULT_RETRY_MAX = 60 * 60.0
DEFAULT_CONCURRENCY = 20
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_NEXTHOP_TLS = "starttls"

# Keys whose values toYAML() masks, wherever they appear. Nothing secret is
# configurable yet; the hook is here so the first one cannot leak.
SECRET_KEYS = frozenset({"password", "password_file", "secret"})
_MASK = "********"


class ConfigError(Exception):
    """
    A configuration problem, as one line: "<file>: <key.path>: <problem>".
    """


# --------------------------------------------------------------------------
# Configuration objects


@dataclass(frozen=True)
class Listener:
    endpoint: str
    tls: str
    auth: str


@dataclass(frozen=True)
class Relay:
    trustedNetworks: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_NETWORKS
    )


@dataclass(frozen=True)
class Limits:
    messageSize: int = DEFAULT_MESSAGE_SIZE
    recipients: int = DEFAULT_RECIPIENTS
    connections: int = DEFAULT_CONNECTIONS
    connectionsPerClient: int = DEFAULT_CONNECTIONS_PER_CLIENT


@dataclass(frozen=True)
class Retry:
    min: float = DEFAULT_RETRY_MIN  # seconds
    max: float = DEFAULT_RETRY_MAX  # seconds


@dataclass(frozen=True)
class Queue:
    directory: str
    retry: Retry = field(default_factory=Retry)


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int
    tls: str


@dataclass(frozen=True)
class Delivery:
    smarthosts: tuple[NextHop, ...]
    concurrency: int = DEFAULT_CONCURRENCY


@dataclass(frozen=True)
class Config:
    path: str
    hostname: str
    listeners: tuple[Listener, ...]
    relay: Relay
    limits: Limits
    queue: Queue
    delivery: Delivery
    shutdownGrace: float = DEFAULT_SHUTDOWN_GRACE

    def toYAML(self) -> str:
        """
        The effective configuration: every key with its value, defaults
        filled in, durations and sizes in human form, secrets masked. The
        result loads back into an equal L{Config}, so C{relayd check-config}
        output can serve as a config file.
        """
        tree = {
            "hostname": self.hostname,
            "listeners": [
                {"endpoint": l.endpoint, "tls": l.tls, "auth": l.auth}
                for l in self.listeners
            ],
            "relay": {
                "trusted_networks": [str(n) for n in self.relay.trustedNetworks],
            },
            "limits": {
                "message_size": formatSize(self.limits.messageSize),
                "recipients": self.limits.recipients,
                "connections": self.limits.connections,
                "connections_per_client": self.limits.connectionsPerClient,
            },
            "queue": {
                "directory": self.queue.directory,
                "retry": {
                    "min": formatDuration(self.queue.retry.min),
                    "max": formatDuration(self.queue.retry.max),
                },
            },
            "delivery": {
                "concurrency": self.delivery.concurrency,
                "smarthosts": [
                    {"host": h.host, "port": h.port, "tls": h.tls}
                    for h in self.delivery.smarthosts
                ],
            },
            "shutdown_grace": formatDuration(self.shutdownGrace),
        }
        header = f"# effective configuration from {self.path}\n"
        return header + yaml.safe_dump(
            maskSecrets(tree),
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=1000,
        )


def maskSecrets(tree: Any) -> Any:
    """
    A copy of a plain YAML tree with the value of every key in
    L{SECRET_KEYS} replaced by a mask, at any depth.
    """
    if isinstance(tree, dict):
        return {
            k: (_MASK if k in SECRET_KEYS and v is not None else maskSecrets(v))
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [maskSecrets(v) for v in tree]
    return tree


# --------------------------------------------------------------------------
# Durations and sizes

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"(?:[0-9]+[dhms])+\Z")
_DURATION_PART_RE = re.compile(r"([0-9]+)([dhms])")

_SIZE_UNITS = {
    "B": 1,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}
_SIZE_RE = re.compile(r"([0-9]+)(B|kB|MB|GB|KiB|MiB|GiB)\Z")


def parseDuration(text: str) -> float | None:
    """
    Seconds for a duration like "30s", "5m", "4h", "5d" or "1h30m" (units
    in decreasing order, each at most once), or None if C{text} is not one.
    A bare number is refused: "30" could mean seconds or minutes.
    """
    if not isinstance(text, str) or not _DURATION_RE.match(text):
        return None
    total = 0
    previous = None
    for number, unit in _DURATION_PART_RE.findall(text):
        scale = _DURATION_UNITS[unit]
        if previous is not None and scale >= previous:
            return None
        previous = scale
        total += int(number) * scale
    return float(total)


def formatDuration(seconds: float) -> str:
    """
    The shortest L{parseDuration} form of a whole number of seconds.
    """
    remaining = int(seconds)
    if remaining == 0:
        return "0s"
    parts = []
    for unit, scale in _DURATION_UNITS.items():
        count, remaining = divmod(remaining, scale)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parseSize(value: object) -> int | None:
    """
    Bytes for a size: a whole number of bytes, or "25MB" (10^6) / "10MiB"
    (2^20) with units B, kB, MB, GB, KiB, MiB, GiB; None if not a size.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return None


def formatSize(size: int) -> int | str:
    """
    The largest unit that expresses C{size} exactly, preferring decimal
    units (what Postfix admins think in); plain bytes otherwise.
    """
    if size > 0:
        for unit in ("GB", "GiB", "MB", "MiB", "kB", "KiB"):
            scale = _SIZE_UNITS[unit]
            if size % scale == 0:
                return f"{size // scale}{unit}"
    return size


# --------------------------------------------------------------------------
# Strict YAML


class StrictLoader(yaml.SafeLoader):
    """
    A SafeLoader with a YAML 1.2-like core schema: only C{true}/C{false} are
    booleans, integers are plain decimal, no timestamps, no sexagesimal
    numbers, no merge keys. Everything else stays a string, so
    C{tls: no} reaches validation as the string "no" and is refused there
    with a useful message instead of silently becoming False.
    """


StrictLoader.yaml_implicit_resolvers = {}
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf")
)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^-?(?:0|[1-9][0-9]*)$"), list("-0123456789")
)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)$"),
    list("-0123456789"),
)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|)$"), ["~", "n", ""]
)


def _bool(self: StrictLoader, node: Node) -> bool:
    return self.construct_scalar(node) == "true"


def _int(self: StrictLoader, node: Node) -> int:
    return int(self.construct_scalar(node))


StrictLoader.add_constructor("tag:yaml.org,2002:bool", _bool)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _int)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _checkDuplicates(node: Node, path: str, seen: set[int]) -> None:
    """
    Refuse a mapping that sets one key twice; PyYAML silently keeps the
    last, which hides the typo an admin most needs to see.
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        first: dict[object, Node] = {}
        for keyNode, valueNode in node.value:
            key = keyNode.value if isinstance(keyNode.value, str) else id(keyNode)
            keyPath = _join(path, keyNode.value if isinstance(key, str) else "?")
            if key in first:
                raise ConfigError(
                    f"{keyPath}: expected each key once, got it again on line "
                    f"{_line(keyNode)} (first on line {_line(first[key])})"
                )
            first[key] = keyNode
            _checkDuplicates(valueNode, keyPath, seen)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _checkDuplicates(item, f"{path}[{index}]", seen)


def _readYAML(text: str, path: str) -> object:
    try:
        loader = StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _checkDuplicates(node, "", set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = e.problem or "invalid YAML"
        if e.context and e.context.startswith("while") and e.context_mark:
            detail = f"{e.context} from line {e.context_mark.line + 1}: {detail}"
        elif e.context:
            detail = f"{e.context}, {detail}"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError(
            f"{path}: {where}: expected valid YAML, got a syntax error ({_oneLine(detail)})"
        ) from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise ConfigError(
            f"{path}: line {line}: expected printable text, got character "
            f"#x{ord(e.character) if isinstance(e.character, str) else e.character:04x}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: expected valid YAML, got {_oneLine(str(e))}") from None


# --------------------------------------------------------------------------
# Rendering for messages


def _oneLine(text: str) -> str:
    return " ".join(text.split())


def _quote(text: str, limit: int = 80) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def _describe(value: object) -> str:
    """How a found value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return f"a {type(value).__name__}"


_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")


def _join(path: str, key: object) -> str:
    name = key if isinstance(key, str) and _SIMPLE_KEY_RE.match(key) else (
        _quote(key) if isinstance(key, str) else _describe(key)
    )
    return f"{path}.{name}" if path else str(name)


# --------------------------------------------------------------------------
# Validation


class _Problem(Exception):
    """One validation failure: the key path and what is wrong there."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message


def _expected(path: str, expected: str, value: object) -> _Problem:
    return _Problem(path, f"expected {expected}, got {_describe(value)}")


def _missing(path: str, expected: str) -> _Problem:
    if "required" not in expected:
        expected += " (required)"
    return _Problem(path, f"expected {expected}, got nothing")


def _notSupported(path: str, what: str, why: str) -> _Problem:
    return _Problem(path, f"this {what} is not supported yet ({why}); remove it")


class _Section:
    """
    A mapping being validated: hands out values by key, remembers which
    keys were read, and refuses the rest as unknown.
    """

    def __init__(self, value: object, path: str, known: Iterable[str], what: str = "a mapping") -> None:
        if not isinstance(value, dict):
            raise _expected(path or "(top level)", what, value)
        self.value = value
        self.path = path
        self.known = tuple(known)
        for key in value:
            keyPath = _join(path, key)
            if not isinstance(key, str):
                raise _expected(keyPath, "a key name", key)
            if key not in self.known:
                guess = difflib.get_close_matches(key, self.known, n=1)
                hint = f" (did you mean {_quote(guess[0])}?)" if guess else ""
                raise _Problem(
                    keyPath,
                    "expected one of the keys " + ", ".join(self.known)
                    + f", got unknown key {_quote(key)}{hint}",
                )

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def __contains__(self, key: str) -> bool:
        return key in self.value

    def get(self, key: str, parse: Callable[[object, str], Any], default: Any) -> Any:
        if key not in self.value:
            return default
        return parse(self.value[key], self.at(key))

    def require(self, key: str, parse: Callable[[object, str], Any], expected: str) -> Any:
        if key not in self.value:
            raise _missing(self.at(key), expected)
        return parse(self.value[key], self.at(key))


def _integer(low: int, high: int | None = None) -> Callable[[object, str], int]:
    def parse(value: object, path: str) -> int:
        if high is None:
            expected = f"a whole number of at least {low}"
        else:
            expected = f"a whole number from {low} to {high}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, expected, value)
        if value < low or (high is not None and value > high):
            raise _expected(path, expected, value)
        return value

    return parse


_port = _integer(1, 65535)


def _duration(minimum: float) -> Callable[[object, str], float]:
    def parse(value: object, path: str) -> float:
        seconds = parseDuration(value)  # type: ignore[arg-type]
        example = '"5d"' if path.endswith("lifetime") else '"30s" or "5m"'
        if seconds is None:
            raise _expected(path, f"a duration like {example}", value)
        if seconds < minimum:
            raise _expected(
                path, f"a duration of at least {formatDuration(minimum)}", value
            )
        return seconds

    return parse


def _size(value: object, path: str) -> int:
    size = parseSize(value)
    if size is None:
        raise _expected(
            path,
            'a size like "25MB" or "10MiB" (units B, kB, MB, GB, KiB, MiB, GiB) '
            "or a whole number of bytes",
            value,
        )
    if size < 1:
        raise _expected(path, "a size of at least 1 byte", value)
    return size


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(value: object, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _expected(path, "one of " + ", ".join(choices), value)
        return value

    return parse


_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _isDNSName(value: str) -> bool:
    if not value or len(value) > 253:
        return False
    return all(_LABEL_RE.match(label) for label in value.split("."))


def _hostname(value: object, path: str) -> str:
    # An all-numeric last label is an IP address, not a name for HELO.
    if not isinstance(value, str) or not _isDNSName(value) or value.rsplit(".", 1)[-1].isdigit():
        raise _expected(path, 'a DNS name like "relay.example.com"', value)
    return value


def _host(value: object, path: str) -> str:
    if isinstance(value, str):
        if _isDNSName(value):
            return value
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise _expected(path, 'a host name or IP address like "smtp.example.net"', value)


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _expected(path, "a non-empty string", value)
    return value


def _list(value: object, path: str, what: str, allowEmpty: bool) -> list:
    if not isinstance(value, list) or (not value and not allowEmpty):
        raise _expected(path, what, value)
    return value


# Endpoint strings -----------------------------------------------------------

_ENDPOINT_EXAMPLE = 'a Twisted server endpoint string like "tcp:587:interface=127.0.0.1"'
_ENDPOINT_TYPES = {
    # type: (positional argument names, keyword argument names)
    "tcp": (("port", "backlog", "interface"),),
    "tcp6": (("port", "backlog", "interface"),),
    "unix": (("address", "mode", "backlog", "lockfile"),),
    "systemd": (("domain", "index", "name"),),
}
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _splitEndpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint string the way Twisted's parser does: fields on ":",
    "key=value" for keyword arguments, backslash escapes either.
    """
    fields: list[list[str]] = [[""]]
    escaped = False
    for ch in description:
        if escaped:
            fields[-1][-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append([""])
        elif ch == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += ch
    kind = fields[0][0] if len(fields[0]) == 1 else "=".join(fields[0])
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for f in fields[1:]:
        if len(f) == 1:
            args.append(f[0])
        else:
            kwargs[f[0]] = f[1]
    return kind, args, kwargs


class _StandInReactor:
    """
    Just enough of a reactor for endpoint parsers to build an endpoint
    object; nothing listens.
    """


def _endpointDetail(description: str, nested: bool = False) -> str | None:
    """
    Why C{description} is not a server endpoint string relayd can listen
    on, or None if it is.
    """
    kind, args, kwargs = _splitEndpoint(description)
    if kind == "haproxy" and not nested:
        inner = description.partition(":")[2]
        if not inner:
            return 'haproxy needs an inner endpoint, as in "haproxy:tcp:25"'
        return _endpointDetail(inner, nested=True)
    if kind in ("ssl", "tls"):
        return f'"{kind}" endpoints are not used; TLS is set by the listener\'s tls key'
    if kind not in _ENDPOINT_TYPES:
        return (
            f"unknown endpoint type {_quote(kind)}; relayd listens on tcp, tcp6, "
            "unix, systemd or haproxy:<endpoint>"
        )
    (names,) = _ENDPOINT_TYPES[kind]
    if len(args) > len(names):
        return f"too many fields for {kind}"
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            return f"unknown option {_quote(key)} for {kind} (options: {', '.join(names)})"
        if key in values:
            return f"{key} given twice"
        values[key] = value
    if kind in ("tcp", "tcp6"):
        if "port" not in values:
            return "no port number"
        if not re.fullmatch(r"[0-9]{1,5}", values["port"]) or int(values["port"]) > 65535:
            return f"port {_quote(values['port'])} is not a number from 0 to 65535"
        if "interface" in values:
            try:
                address = ipaddress.ip_address(values["interface"])
            except ValueError:
                return f"interface {_quote(values['interface'])} is not an IP address"
            if kind == "tcp6" and address.version != 6:
                return f"tcp6 interface {_quote(values['interface'])} is not an IPv6 address"
    elif kind == "unix":
        if not values.get("address"):
            return "no socket path"
    elif kind == "systemd":
        # systemd's descriptors exist only when systemd starts relayd, so
        # check the form here; the daemon checks the descriptor at start.
        if values.get("domain") not in _SYSTEMD_DOMAINS:
            return "domain must be one of " + ", ".join(_SYSTEMD_DOMAINS)
        if ("index" in values) == ("name" in values):
            return "give exactly one of index or name"
        if "index" in values and not values["index"].isdigit():
            return f"index {_quote(values['index'])} is not a number"
        return None
    if "backlog" in values and not values["backlog"].isdigit():
        return f"backlog {_quote(values['backlog'])} is not a number"

    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_StandInReactor(), description)
    except Exception as e:  # any parser complaint is the admin's to fix
        return _oneLine(str(e)) or type(e).__name__
    return None


def _endpoint(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _expected(path, _ENDPOINT_EXAMPLE, value)
    detail = _endpointDetail(value)
    if detail is not None:
        raise _Problem(
            path, f"expected {_ENDPOINT_EXAMPLE}, got {_quote(value)} ({detail})"
        )
    return value


# Networks -------------------------------------------------------------------


def _network(value: object, path: str) -> Network:
    expected = 'a network like "192.0.2.0/24" or "2001:db8::/32"'
    if not isinstance(value, str):
        raise _expected(path, expected, value)
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise _expected(path, expected, value) from None
        raise _Problem(
            path,
            f"expected a network without host bits, got {_quote(value)} "
            f"(did you mean {_quote(str(loose))}?)",
        ) from None
    if network.prefixlen == 0:
        raise _Problem(
            path,
            f"expected your own networks, got {_quote(value)}, which lets the "
            "whole internet relay (an open relay)",
        )
    return network


# Sections ---------------------------------------------------------------------


def _listener(value: object, path: str) -> Listener:
    section = _Section(value, path, ("endpoint", "tls", "auth"), "a mapping with endpoint, tls and auth")
    endpoint = section.require("endpoint", _endpoint, _ENDPOINT_EXAMPLE)
    tls = section.require("tls", _choice(LISTENER_TLS_MODES), "one of " + ", ".join(LISTENER_TLS_MODES))
    if tls not in _BUILT_LISTENER_TLS:
        raise _Problem(section.at("tls"), f'{_quote(tls)} is not supported yet (only "none")')
    auth = section.require(
        "auth", _choice(LISTENER_AUTH_POLICIES), "one of " + ", ".join(LISTENER_AUTH_POLICIES)
    )
    if auth not in _BUILT_LISTENER_AUTH:
        raise _Problem(section.at("auth"), f'{_quote(auth)} is not supported yet (only "none")')
    return Listener(endpoint=endpoint, tls=tls, auth=auth)


def _listeners(value: object, path: str) -> tuple[Listener, ...]:
    items = _list(value, path, "a list of at least one listener", allowEmpty=False)
    listeners = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        listener = _listener(item, f"{path}[{index}]")
        if listener.endpoint in seen:
            raise _Problem(
                f"{path}[{index}].endpoint",
                f"expected each endpoint once, got {_quote(listener.endpoint)} again "
                f"(also {path}[{seen[listener.endpoint]}])",
            )
        seen[listener.endpoint] = index
        listeners.append(listener)
    return tuple(listeners)


def _relay(value: object, path: str) -> Relay:
    section = _Section(value, path, ("trusted_networks",))

    def networks(value: object, path: str) -> tuple[Network, ...]:
        items = _list(value, path, "a list of networks", allowEmpty=True)
        return tuple(_network(item, f"{path}[{i}]") for i, item in enumerate(items))

    return Relay(trustedNetworks=section.get("trusted_networks", networks, Relay().trustedNetworks))


def _limits(value: object, path: str) -> Limits:
    section = _Section(
        value, path, ("message_size", "recipients", "connections", "connections_per_client")
    )
    return Limits(
        messageSize=section.get("message_size", _size, DEFAULT_MESSAGE_SIZE),
        recipients=section.get("recipients", _integer(1), DEFAULT_RECIPIENTS),
        connections=section.get("connections", _integer(1), DEFAULT_CONNECTIONS),
        connectionsPerClient=section.get(
            "connections_per_client", _integer(1), DEFAULT_CONNECTIONS_PER_CLIENT
        ),
    )


def _retry(value: object, path: str) -> Retry:
    section = _Section(value, path, ("min", "max"))
    retry = Retry(
        min=section.get("min", _duration(1), DEFAULT_RETRY_MIN),
        max=section.get("max", _duration(1), DEFAULT_RETRY_MAX),
    )
    if retry.min > retry.max:
        raise _Problem(
            path,
            f"expected min <= max, got min {formatDuration(retry.min)} > max "
            f"{formatDuration(retry.max)}",
        )
    return retry


def _queue(value: object, path: str, baseDirectory: str) -> Queue:
    section = _Section(value, path, ("directory", "lifetime", "retry"))
    directory = section.require("directory", _string, "the spool directory path")
    directory = os.path.normpath(os.path.join(baseDirectory, directory))
    if "lifetime" in section:
        section.get("lifetime", _duration(1), None)
        raise _notSupported(
            section.at("lifetime"), "key", "bounces come later; mail is retried until delivered"
        )
    return Queue(directory=directory, retry=section.get("retry", _retry, Retry()))


def _nextHop(value: object, path: str) -> NextHop:
    section = _Section(
        value,
        path,
        ("host", "port", "tls", "verify", "ca_file", "username", "password_file"),
        "a mapping with host, port and tls",
    )
    host = section.require("host", _host, 'a host name or IP address like "smtp.example.net"')
    tls = section.get("tls", _choice(NEXTHOP_TLS_MODES), None)
    if tls is None:
        raise _Problem(
            section.at("tls"),
            f'the default {_quote(DEFAULT_NEXTHOP_TLS)} is not supported yet (only "none"); '
            "set tls: none explicitly",
        )
    if tls not in _BUILT_NEXTHOP_TLS:
        raise _Problem(
            section.at("tls"),
            f'{_quote(tls)} is not supported yet (only "none"); set tls: none explicitly',
        )
    port = section.get("port", _port, 465 if tls == "implicit" else 25)
    for key in ("verify", "ca_file"):
        if key in section:
            raise _notSupported(section.at(key), "key", "TLS to smarthosts comes later")
    for key in ("username", "password_file"):
        if key in section:
            raise _notSupported(section.at(key), "key", "AUTH to smarthosts comes later")
    return NextHop(host=host, port=port, tls=tls)


def _delivery(value: object, path: str) -> Delivery:
    section = _Section(value, path, ("smarthosts", "concurrency", "mx_port", "routes"))
    if "mx_port" in section:
        section.get("mx_port", _port, None)
        raise _notSupported(section.at("mx_port"), "key", "MX delivery comes later")
    if "routes" in section:
        raise _notSupported(section.at("routes"), "section", "per-domain routes come later")
    smarthostsExpected = "a list of at least one smarthost (required until MX delivery is built)"

    def smarthosts(value: object, path: str) -> tuple[NextHop, ...]:
        items = _list(value, path, smarthostsExpected, allowEmpty=False)
        return tuple(_nextHop(item, f"{path}[{i}]") for i, item in enumerate(items))

    return Delivery(
        smarthosts=section.require("smarthosts", smarthosts, smarthostsExpected),
        concurrency=section.get("concurrency", _integer(1), DEFAULT_CONCURRENCY),
    )


_TOP_KEYS = (
    "hostname",
    "listeners",
    "tls",
    "auth",
    "relay",
    "limits",
    "queue",
    "postmaster",
    "delivery",
    "metrics",
    "shutdown_grace",
)


def _config(tree: object, path: str) -> Config:
    if tree is None:
        raise _Problem("(top level)", "expected a mapping of settings, got an empty file")
    top = _Section(tree, "", _TOP_KEYS, "a mapping of settings")
    for key, why in (
        ("tls", "TLS comes later"),
        ("auth", "SMTP AUTH comes later"),
        ("postmaster", "bounces come later"),
        ("metrics", "metrics come later"),
    ):
        if key in top:
            raise _notSupported(key, "section" if key in ("tls", "auth", "metrics") else "key", why)
    baseDirectory = os.path.dirname(os.path.abspath(path))
    return Config(
        path=path,
        hostname=top.require("hostname", _hostname, 'a DNS name like "relay.example.com"'),
        listeners=top.require("listeners", _listeners, "a list of at least one listener"),
        relay=top.get("relay", _relay, Relay()),
        limits=top.get("limits", _limits, Limits()),
        # queue and delivery hold required keys: a missing section is
        # reported as its first missing key.
        queue=_queue(top.value.get("queue", {}), "queue", baseDirectory),
        delivery=_delivery(top.value.get("delivery", {}), "delivery"),
        shutdownGrace=top.get("shutdown_grace", _duration(0), DEFAULT_SHUTDOWN_GRACE),
    )


# --------------------------------------------------------------------------
# Entry points


def parse(text: str, path: str) -> Config:
    """
    Validate configuration C{text}; C{path} names it in errors and anchors
    relative paths (the queue directory) at its directory.
    """
    tree = _readYAML(text, path)
    try:
        return _config(tree, path)
    except _Problem as p:
        raise ConfigError(f"{path}: {p.path}: {p.message}") from None


def load(path: str) -> Config:
    """
    Read, parse and validate the configuration file at C{path}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{path}: cannot read the file: {reason}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: expected UTF-8 text, got byte 0x{data[e.start]:02x}"
        ) from None
    return parse(text, path)
