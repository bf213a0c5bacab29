"""
Load and validate relayd's YAML configuration into frozen, per-section objects.

The YAML keys are the public contract admins rely on, so loading is strict:
unknown keys, duplicate keys, YAML 1.1 surprises (``no`` meaning false,
``010`` meaning 8, ``1:30`` meaning 90) and keys whose feature is not built
yet are all refused, never ignored. Every problem becomes one
``ConfigError`` whose text is a single line naming the file and the key path:

    /etc/relayd/relayd.yaml: queue.lifetime: expected a duration like "5d", got "5 days"

Validation stops at the first problem: one clear line beats a page of
follow-on errors.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Union

import yaml
from twisted.internet.endpoints import serverFromString
from yaml.nodes import MappingNode, Node, SequenceNode

from relayd import idn

__all__ = [
    "ConfigError",
    "Config",
    "Listener",
    "Relay",
    "Limits",
    "Retry",
    "Queue",
    "NextHop",
    "DeliveryTimeouts",
    "DNS",
    "Delivery",
    "load",
    "parse",
    "parseDuration",
    "formatDuration",
    "parseSize",
    "formatSize",
    "SECRET_KEYS",
    "TLS",
    "Auth",
    "isLoopbackEndpoint",
    "isProxyEndpoint",
    "warnings",
    "DKIM",
    "DKIMSelector",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LISTENER_TLS_MODES = ("none", "starttls", "implicit")
LISTENER_AUTH_POLICIES = ("none", "optional", "required")
NEXTHOP_TLS_MODES = ("none", "may", "starttls", "implicit")

TLS_MIN_VERSIONS = ("1.2", "1.3")

# Each key's default is in its section's schema below; these are shared.
# Postfix refuses MAIL below 1.5 x message_size_limit of free queue space.
FREE_SPACE_FACTOR = 1.5
CONTROL_SOCKET_NAME = "control.sock"
# Failed AUTHs per client IP within the window (the server's default
# throttle where there is no auth section).
DEFAULT_AUTH_FAILURE_LIMIT = 5
DEFAULT_AUTH_FAILURE_WINDOW = 15 * 60.0
MAX_CLIENT_NAME_TIMEOUT = 60.0
DEFAULT_NEXTHOP_TLS = "starttls"
# MX hosts rarely have certificates for their names: opportunistic by default.
DEFAULT_MX_TLS = "may"
DEFAULT_MX_PORT = 25
DNS_PORT = 53

# Longest duration any key takes: a year is beyond every sensible timeout,
# retry or queue lifetime, and keeps whole seconds exact in a float (so
# check-config prints back what it read) and a timer's date far from overflow.
MAX_DURATION = 365 * 86400.0
# Largest size any key takes (1000GB): far beyond any message or reserve.
MAX_SIZE = 10**12
# Most digits of a number in the file: more than any value relayd takes, and
# far below Python's limit on converting digits (ValueError past 4300).
MAX_DIGITS = 18
# Deepest nesting of lists and mappings the YAML reader accepts. relayd's
# deepest key (delivery.routes.DOMAIN[0].host) is 6 levels down; the bound
# keeps every recursive step of reading and checking far from Python's
# recursion limit, whatever the file holds.
MAX_NESTING = 32

# Keys whose values toYAML() masks, wherever they appear. Passwords are never
# in the YAML itself (only the paths of the files holding them, which an
# admin needs to see); the hook is here so a future secret key cannot leak.
SECRET_KEYS = frozenset({"password", "secret"})
# Stand-in keys toYAML() turns into comment lines (no config key looks like this).
_COMMENT_KEY = "__relayd_comment_"
_MASK = "********"


class ConfigError(Exception):
    """
    A configuration problem, as one line: "<file>: <key.path>: <problem>".
    """


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
    in decreasing order, each at most once), or None if ``text`` is not one.
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
        total += _wholeNumber(number) * scale
    return float(total)


def _wholeNumber(digits: str) -> int:
    """
    The value of a digit string; one of more than MAX_DIGITS significant
    digits reads as 10**MAX_DIGITS, over every bound, so a number of any
    length is refused by its bound rather than by int()'s digit limit.
    """
    if len(digits.lstrip("0")) > MAX_DIGITS:
        return 10**MAX_DIGITS
    return int(digits)


def formatDuration(seconds: float) -> str:
    """
    The shortest ``parseDuration`` form of a whole number of seconds.
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
            return _wholeNumber(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return None


def formatSize(size: int) -> int | str:
    """
    The largest unit that expresses ``size`` exactly, preferring decimal
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
    A SafeLoader with a YAML 1.2-like core schema: only ``true``/``false`` are
    booleans, integers are plain decimal, no timestamps, no sexagesimal
    numbers, no merge keys. Everything else stays a string, so
    ``tls: no`` reaches validation as the string "no" and is refused there
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


class LongNumber:
    """
    A number in the file with more than MAX_DIGITS digits: no key takes
    one, so it stays unconverted and validation refuses it where it is.
    """

    def __init__(self, digits: int) -> None:
        self.digits = digits


_DECIMAL_RE = re.compile(r"-?[0-9]+\Z")


# An explicit tag (!!bool, !!int, !!float) can put any text in front of these
# constructors: text they cannot read stays a string, for validation to refuse
# with its key path.


def _bool(self: StrictLoader, node: Node) -> bool | str:
    text = self.construct_scalar(node)
    return {"true": True, "false": False}.get(text, text)


def _int(self: StrictLoader, node: Node) -> int | str | LongNumber:
    text = self.construct_scalar(node)
    if not _DECIMAL_RE.match(text):
        return text
    digits = len(text.lstrip("-").lstrip("0"))
    if digits > MAX_DIGITS:
        return LongNumber(digits)
    return int(text)


def _float(self: StrictLoader, node: Node) -> float | str:
    text = self.construct_scalar(node)
    try:
        return float(text)
    except ValueError:
        return text


def _composeNode(self: StrictLoader, parent: Node | None, index: object) -> Node:
    depth = getattr(self, "_depth", 0) + 1
    if depth > MAX_NESTING:
        mark = self.peek_event().start_mark
        raise ConfigError(
            f"line {mark.line + 1}, column {mark.column + 1}: expected lists and mappings "
            f"nested at most {MAX_NESTING} deep, got deeper ones"
        )
    self._depth = depth
    try:
        return yaml.composer.Composer.compose_node(self, parent, index)
    finally:
        self._depth = depth - 1


# Only the core schema's types: a date, bytes or a set never reaches a key.
StrictLoader.yaml_constructors = {
    tag: constructor
    for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
    if tag is None or tag in (
        "tag:yaml.org,2002:null", "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map")
}
StrictLoader.add_constructor("tag:yaml.org,2002:bool", _bool)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", _float)
StrictLoader.compose_node = _composeNode


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
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        tag = re.search(r"tag '([^']*)'", e.problem or "")
        found = _quote(tag.group(1).replace("tag:yaml.org,2002:", "!!")) if tag else "another tag"
        raise ConfigError(
            f"{path}: {where}: expected plain values (strings, numbers, true/false, lists, "
            f"mappings), got the tag {found}"
        ) from None
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
    if isinstance(value, LongNumber):
        return f"a number of {value.digits} digits"
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
        if seconds > MAX_DURATION:
            raise _expected(
                path, f"a duration of at most {formatDuration(MAX_DURATION)}", value
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
    if size > MAX_SIZE:
        raise _expected(path, f"a size of at most {formatSize(MAX_SIZE)}", value)
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


def _domainName(value: object, path: str, expected: str, written: str | None = None) -> str:
    """
    A DNS name written in ASCII (kept as written) or with U-labels (turned
    into A-labels, IDNA2008): what is looked up and compared is A-labels.
    An invalid U- or A-label is refused with the idna package's reason;
    ``written`` is the whole value as the error shows it, when ``value`` is
    only its domain.
    """
    if not isinstance(value, str) or not value:
        raise _expected(path, expected, value)
    try:
        name = idn.toAscii(value)
    except idn.IDNError as e:
        raise _Problem(path, f"expected {expected}, got {_quote(written or value)}, which is not a valid "
                             f"international domain name (IDNA2008: {e})") from None
    if not _isDNSName(name):
        raise _expected(path, expected, value)
    return value if value.isascii() else name
def isDNSName(value: str) -> bool:
    """Whether ``value`` is an ASCII DNS name (LDH labels, dots between them)."""
    return isinstance(value, str) and _isDNSName(value)


def _hostname(value: object, path: str) -> str:
    # Top-level domains begin with a letter: a last label that does not is
    # an IP address or a date ("2001-01-01"), not a name for HELO.
    if not isinstance(value, str) or not _isDNSName(value) or not value.rsplit(".", 1)[-1][
            0].isalpha():
        raise _expected(path, 'a DNS name like "relay.example.com"', value)
    return value


def _host(value: object, path: str) -> str:
    expected = 'a host name or IP address like "smtp.example.net"'
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    return _domainName(value, path, expected)


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
    Why ``description`` is not a server endpoint string relayd can listen
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
    if kind in ("tcp", "tcp6"):
        bare = re.search(r"interface=([0-9A-Fa-f]*:[0-9A-Fa-f:.]*)(?::|\Z)", description)
        if bare is not None:
            try:
                ipaddress.IPv6Address(bare.group(1))
            except ValueError:
                pass
            else:
                escaped = bare.group(1).replace(":", "\\:")
                return (f"the colons of an IPv6 address must be escaped: interface={escaped} "
                        "(in YAML, inside single quotes)")
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


# Scalars ---------------------------------------------------------------------


def isProxyEndpoint(description: str) -> bool:
    """A haproxy:<endpoint> listener: every connection starts with a PROXY header."""
    return _splitEndpoint(description)[0] == "haproxy"


def _proxyNetwork(value: object, path: str) -> Network:
    expected = 'a network like "192.0.2.10/32" or "2001:db8::10/128" (your balancers)'
    if not isinstance(value, str):
        raise _expected(path, expected, value)
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise _expected(path, expected + " without host bits", value) from None
    if network.prefixlen == 0:
        raise _Problem(
            path,
            f"expected your balancers' addresses, got {_quote(value)}, which lets anyone "
            "claim any client address (and relay as a trusted network)",
        )
    return network


def isLoopbackEndpoint(description: str) -> bool:
    """
    Whether only this machine can reach a listener: tcp/tcp6 bound to a
    loopback interface, or a UNIX socket. haproxy: and systemd: endpoints
    carry remote clients, so they never count.
    """
    kind, args, kwargs = _splitEndpoint(description)
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    interface = kwargs.get("interface", args[2] if len(args) > 2 else "")
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(path, "true or false", value)
    return value


def _sizeOrZero(value: object, path: str) -> int:
    if value == 0 and not isinstance(value, bool):
        return 0
    return _size(value, path)


def _address(value: object, path: str) -> str:
    expected = 'a mail address like "postmaster@example.com"'
    if not isinstance(value, str):
        raise _expected(path, expected, value)
    local, at, domain = value.rpartition("@")
    if not at or not local or not local.isascii() or any(
        c.isspace() or c in '<>()[]\\,;:"' or not c.isprintable() for c in local
    ):
        raise _expected(path, expected, value)
    return f"{local}@{_domainName(domain, path, expected, written=value)}"


def _server(value: object, path: str) -> tuple[str, int]:
    expected = 'a DNS server address like "192.0.2.53", "127.0.0.1:5353" or "[::1]:5353"'
    if isinstance(value, str):
        host, port = value, str(DNS_PORT)
        match = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})", value) or re.fullmatch(
            r"([^:]+):([0-9]{1,5})", value)
        if match:
            host, port = match.groups()
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = None
        if address is not None and 1 <= int(port) <= 65535:
            return address, int(port)
    raise _expected(path, expected, value)


def _formatServer(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



# --------------------------------------------------------------------------
# The schema: every key described once
#
# Each section is a frozen dataclass whose fields carry their YAML key
# (``setting``): the key's name, converter, default, how it prints, whether
# it is secret, and the comment printed where it is computed or unset.
# Parsing, the unknown-key check, defaults, the printed effective config
# (toYAML) and the example-file test are all derived from these fields.
# Rules that tie keys together are each section's ``check``. A new key is
# one field here, plus its commented line in etc/relayd.yaml (a test checks
# that every key of the schema is there).


@dataclass(frozen=True)
class Key:
    """One YAML key of a section."""

    name: str
    # (value, key path) -> value; with ``withBase``, also the config file's
    # directory (relative paths and sections holding them).
    convert: Callable[..., Any] | None = None
    withBase: bool = False
    required: bool = False
    expected: str = ""  # what a missing required key should have been
    section: type | None = None  # a nested section, parsed by its own schema
    optional: bool = False  # a nested section that may be absent (None)
    items: type | None = None  # the section type of a list's (or mapping's) entries
    show: Callable[[Any], Any] | None = None  # value -> what toYAML prints
    shown: Callable[[Any], bool] | None = None  # whether it applies, given its section
    # Printed as a comment instead of the key where the value is None or empty:
    unset: str | None = None  # what not setting it means
    computed: Callable[[Any, Any], tuple[str, str]] | None = None  # (section, config) -> (value, how)
    secret: bool = False
    notSupported: tuple[str, str] | None = None  # (what, why) it is refused for now


def setting(name: str, convert: Callable[..., Any] | None = None, default: Any = MISSING, *,
            factory: Any = MISSING, compare: bool = True, **described: Any) -> Any:
    """The dataclass field for YAML key ``name`` (see ``Key``)."""
    section = described.get("section")
    required = default is MISSING and factory is MISSING and section is None
    if section is not None and not described.get("optional") and factory is MISSING:
        factory = section
    metadata = {"key": Key(name, convert, required=required, **described)}
    if default is MISSING and factory is MISSING:
        return field(metadata=metadata)
    if section is not None and factory is section and not _constructible(section):
        # A section with required keys: absent, it is read as empty, so
        # the problem reported is its first missing key.
        return field(kw_only=True, metadata=metadata)
    return field(default=default, default_factory=factory, compare=compare, metadata=metadata)


def _constructible(cls: type) -> bool:
    return all(f.default is not MISSING or f.default_factory is not MISSING or not f.init
               for f in fields(cls))


def duration(name: str, minimum: float, default: Any, **described: Any) -> Any:
    return setting(name, _duration(minimum), default, show=formatDuration, **described)


def size(name: str, default: Any, **described: Any) -> Any:
    return setting(name, _sizeOrZero, default, show=formatSize, **described)


def pathSetting(name: str, default: Any = MISSING, **described: Any) -> Any:
    """A file or directory; relative to the config file's directory."""
    return setting(name, _relativePath, default, withBase=True, **described)


def _relativePath(value: object, path: str, baseDirectory: str) -> str:
    return os.path.normpath(os.path.join(baseDirectory, _string(value, path)))


class _Schema:
    """A section of the config; ``check`` holds the rules that tie its keys together."""

    what: ClassVar[str] = "a mapping"

    def check(self, section: "_Section") -> None:
        pass


@functools.cache
def keysOf(cls: type) -> tuple[tuple[str, Key], ...]:
    """(attribute, ``Key``) of each key of section ``cls``, in the order they are known and printed."""
    return tuple((f.name, f.metadata["key"]) for f in fields(cls) if "key" in f.metadata)


def schemaKeys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every key path of the schema ("queue.retry.min"; list entries as "listeners[].tls")."""
    found = []
    for _, k in keysOf(cls or Config):
        path = f"{prefix}{k.name}"
        found.append(path)
        if k.section is not None:
            found.extend(schemaKeys(k.section, path + "."))
        if k.items is not None:
            found.extend(schemaKeys(k.items, path + "[]."))
    return found


def _convert(k: Key, value: object, path: str, baseDirectory: str) -> Any:
    if k.section is not None:
        return _parseSection(k.section, value, path, baseDirectory)
    if k.withBase:
        return k.convert(value, path, baseDirectory)
    return k.convert(value, path)


def _parseSection(cls: type, value: object, path: str, baseDirectory: str,
                  leaveOut: tuple[str, ...] = (), given: dict | None = None) -> Any:
    """Read the mapping ``value`` at key path ``path`` into section ``cls``."""
    keys = [(a, k) for a, k in keysOf(cls) if k.name not in leaveOut]
    section = _Section(value, path, [k.name for _, k in keys], cls.what)
    for _, k in keys:
        if k.notSupported is not None and k.name in section:
            raise _notSupported(section.at(k.name), *k.notSupported)
    values = dict(given or {})
    for attribute, k in keys:
        if k.notSupported is not None:
            continue
        if k.name in section:
            values[attribute] = _convert(k, section.value[k.name], section.at(k.name), baseDirectory)
        elif k.required:
            raise _missing(section.at(k.name), k.expected)
        elif k.section is not None and not k.optional:
            values[attribute] = _parseSection(k.section, {}, section.at(k.name), baseDirectory)
    parsed = cls(**values)
    parsed.check(section)
    return parsed


def _tree(parsed: Any, config: Any, comment: Callable[[str], dict]) -> dict:
    """A section as the plain YAML tree toYAML prints."""
    tree: dict = {}
    for attribute, k in keysOf(type(parsed)):
        value = getattr(parsed, attribute)
        if k.notSupported is not None or (k.shown is not None and not k.shown(parsed)):
            continue
        if value is None or value == ():
            if k.computed is not None:
                shown, how = k.computed(parsed, config)
                tree.update(comment(f"{k.name}: {shown}  (computed: {how})"))
                continue
            if k.unset is not None:
                tree.update(comment(f"{k.name}:  (not set: {k.unset})"))
                continue
            if value is None:
                continue
        if k.secret:
            tree[k.name] = _MASK
        elif k.show is not None:
            tree[k.name] = k.show(value)
        else:
            tree[k.name] = _plain(value, config, comment)
    return tree


def _plain(value: Any, config: Any, comment: Callable[[str], dict]) -> Any:
    if isinstance(value, _Schema):
        return _tree(value, config, comment)
    if isinstance(value, (tuple, list)):
        return [_plain(v, config, comment) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, config, comment) for k, v in value.items()}
    return value


# Converters of the keys that are more than a scalar -----------------------------


def _listeners(value: object, path: str) -> tuple[Listener, ...]:
    items = _list(value, path, "a list of at least one listener", allowEmpty=False)
    listeners = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        listener = _parseSection(Listener, item, f"{path}[{index}]", "")
        if listener.endpoint in seen:
            raise _Problem(
                f"{path}[{index}].endpoint",
                f"expected each endpoint once, got {_quote(listener.endpoint)} again "
                f"(also {path}[{seen[listener.endpoint]}])",
            )
        seen[listener.endpoint] = index
        listeners.append(listener)
    return tuple(listeners)


def _networks(value: object, path: str) -> tuple[Network, ...]:
    items = _list(value, path, "a list of networks", allowEmpty=True)
    return tuple(_network(item, f"{path}[{i}]") for i, item in enumerate(items))


def _proxyNetworks(value: object, path: str) -> tuple[Network, ...]:
    items = _list(value, path, "a list of the balancers' networks", allowEmpty=False)
    return tuple(_proxyNetwork(item, f"{path}[{i}]") for i, item in enumerate(items))


def _clientNameTimeout(value: object, path: str) -> float:
    seconds = _duration(0)(value, path)
    if seconds > MAX_CLIENT_NAME_TIMEOUT:
        raise _Problem(path, f"expected at most {formatDuration(MAX_CLIENT_NAME_TIMEOUT)} (the "
                       f"banner waits for it), got {formatDuration(seconds)}")
    return seconds


def _minVersion(value: object, path: str) -> str:
    # YAML reads an unquoted 1.2 as a number; both spellings mean the same.
    text = str(value) if isinstance(value, float) else value
    if text not in TLS_MIN_VERSIONS:
        raise _expected(path, 'one of "1.2", "1.3"', value)
    return text


_SENDER_ENTRY_EXAMPLE = 'an address like "alice@example.com" or a domain like "@example.com"'


def _senderEntry(value: object, path: str) -> str:
    if isinstance(value, str) and value.startswith("@"):
        return "@" + _domainName(value[1:], path, _SENDER_ENTRY_EXAMPLE, written=value).lower()
    try:
        return _address(value, path)
    except _Problem as e:
        if "IDNA2008" in e.message:
            raise
        raise _expected(path, _SENDER_ENTRY_EXAMPLE, value) from None


def _senders(value: object, path: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise _expected(path, "a mapping of login to a list of addresses and @domains", value)
    out = []
    for login, entries in value.items():
        loginPath = _join(path, login)
        if not isinstance(login, str) or not login:
            raise _expected(loginPath, "a login name", login)
        items = _list(entries, loginPath, "a list of addresses and @domains", allowEmpty=True)
        out.append((login, tuple(_senderEntry(e, f"{loginPath}[{i}]") for i, e in enumerate(items))))
    return tuple(out)


def _servers(value: object, path: str) -> tuple[tuple[str, int], ...]:
    items = _list(value, path, "a list of DNS server addresses", allowEmpty=False)
    return tuple(_server(item, f"{path}[{i}]") for i, item in enumerate(items))


def _smarthosts(value: object, path: str, baseDirectory: str) -> tuple[NextHop, ...]:
    items = _list(value, path, "a list of smarthosts (empty: MX delivery)", allowEmpty=True)
    return tuple(_nextHop(item, f"{path}[{i}]", baseDirectory) for i, item in enumerate(items))


def _routes(value: object, path: str, baseDirectory: str) -> dict[str, tuple[NextHop, ...]]:
    if not isinstance(value, dict):
        raise _expected(path, 'a mapping of recipient domain (or "*") to a list of next hops', value)
    routes: dict[str, tuple[NextHop, ...]] = {}
    written: dict[str, str] = {}
    for key, hops in value.items():
        keyPath = _join(path, key)
        expected = 'a recipient domain like "example.org", or "*"'
        domain = key
        if key != "*":
            # Keyed by A-labels, as relayd.route looks recipient domains up.
            domain = _domainName(key, keyPath, expected).lower()
        if domain in routes:
            same = "" if written[domain] == key else f" (the same domain as {_quote(written[domain])})"
            raise _Problem(keyPath, f"expected each domain once, got {_quote(key)} again{same}")
        written[domain] = key
        items = _list(hops, keyPath, "a list of at least one next hop", allowEmpty=False)
        parsed = tuple(
            _nextHop(item, f"{keyPath}[{i}]", baseDirectory, inRoute=True)
            for i, item in enumerate(items)
        )
        if any(h.mx for h in parsed) and len(parsed) > 1:
            raise _Problem(keyPath, "expected an mx entry alone in its list, got it with other hops")
        routes[domain] = parsed
    return routes


_VERIFIED_TLS = ("starttls", "implicit")


def _nextHop(value: object, path: str, baseDirectory: str = "", inRoute: bool = False) -> NextHop:
    """
    One next hop. Its keys are NextHop's schema; which of them apply, and
    the port's and tls's defaults, depend on each other, so it is read here.
    """
    keys = {k.name: k for _, k in keysOf(NextHop) if inRoute or k.name != "mx"}
    section = _Section(value, path, keys, NextHop.what)

    def get(name: str, default: Any) -> Any:
        return section.get(name, lambda v, p: _convert(keys[name], v, p, baseDirectory), default)

    mx = get("mx", False)
    if mx:
        for key in ("host", "port", "username", "password_file"):
            if key in section:
                raise _Problem(
                    section.at(key),
                    f"expected no {key} in an mx entry (it delivers to the domain's MX hosts "
                    "on delivery.mx_port, without AUTH)",
                )
        host, port = "", 0
        tls = section.get("tls", _choice(("none", "may", "starttls")), DEFAULT_MX_TLS)
    else:
        host = section.require("host", keys["host"].convert, keys["host"].expected)
        tls = get("tls", DEFAULT_NEXTHOP_TLS)
        port = get("port", 465 if tls == "implicit" else 25)
    for key in ("verify", "ca_file"):
        if key in section and tls not in _VERIFIED_TLS:
            raise _Problem(
                section.at(key),
                f"expected only with tls: starttls or implicit (tls: {tls} never verifies "
                "a certificate), got it with tls: " + tls,
            )
    hop = NextHop(host=host, port=port, tls=tls, verify=get("verify", True),
                  caFile=get("ca_file", None), username=get("username", None),
                  passwordFile=get("password_file", None), mx=mx)
    if hop.username is not None:
        if tls not in _VERIFIED_TLS:
            raise _Problem(
                section.at("username"),
                f"expected only with tls: starttls or implicit (the password must never cross "
                f"the network unencrypted), got it with tls: {tls}",
            )
        if hop.passwordFile is None:
            raise _missing(section.at("password_file"), "the file holding the password for username")
    elif hop.passwordFile is not None:
        raise _missing(section.at("username"), "the user name that goes with password_file")
    return hop



# DKIM -------------------------------------------------------------------------

DKIM_CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
# Signed where present (RFC 6376 section 5.4.1's list, less what changes in transit).
DKIM_SIGNED_HEADERS = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID",
    "Content-Description", "Resent-Date", "Resent-From", "Resent-Sender", "Resent-To",
    "Resent-Cc", "Resent-Message-ID", "In-Reply-To", "References", "List-Id",
    "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe",
    "List-Post", "List-Owner", "List-Archive",
)
# Signed once more than they appear, so that none can be added on the way.
DKIM_OVERSIGNED_HEADERS = (
    "From", "Subject", "Date", "To", "Cc", "Message-ID", "MIME-Version", "Content-Type",
)
# Fields a hop adds or changes (RFC 6376 section 5.4): a signature over them breaks.
_DKIM_UNSIGNABLE = frozenset({"received", "return-path", "dkim-signature", "bcc", "resent-bcc",
                              "comments", "keywords"})
_HEADER_NAME_RE = re.compile(r"[!-9;-~]+\Z")


def domainALabel(domain: str) -> str | None:
    """
    A domain as relayd compares it: lower-case A-labels (IDNA 2008, UTS 46
    mapping), without a final dot; None when it is not a domain name.
    """
    try:
        converted = idn.toAscii(domain.rstrip("."))
    except idn.IDNError:
        return None
    return converted if _isDNSName(converted) else None


def _dkimSelectors(value: object, path: str, baseDirectory: str) -> tuple["DKIMSelector", ...]:
    items = _list(value, path, "a list of at least one {selector, key}", allowEmpty=False)
    parsed = tuple(_parseSection(DKIMSelector, item, f"{path}[{i}]", baseDirectory)
                   for i, item in enumerate(items))
    seen: dict[str, int] = {}
    for i, entry in enumerate(parsed):
        if entry.selector in seen:
            raise _Problem(f"{path}[{i}].selector",
                           f"expected each selector once, got {_quote(entry.selector)} again "
                           f"(also {path}[{seen[entry.selector]}])")
        seen[entry.selector] = i
    return parsed


def _dkimDomains(value: object, path: str, baseDirectory: str) -> dict[str, tuple["DKIMSelector", ...]]:
    if not isinstance(value, dict) or not value:
        raise _expected(path, 'a mapping of From: domain to a list of {selector, key}', value)
    domains: dict[str, tuple[DKIMSelector, ...]] = {}
    for domain, selectors in value.items():
        keyPath = _join(path, domain)
        name = domainALabel(domain) if isinstance(domain, str) else None
        if name is None:
            raise _expected(keyPath, 'a domain like "example.com"', domain)
        if name in domains:
            raise _Problem(keyPath, f"expected each domain once, got {_quote(domain)} again "
                           f"(as {name})")
        domains[name] = _dkimSelectors(selectors, keyPath, baseDirectory)
    return domains


def _dkimSelector(value: object, path: str) -> str:
    if not isinstance(value, str) or not _isDNSName(value):
        raise _expected(path, 'a selector like "2026a" (letters, digits, "-", dots between labels)',
                        value)
    return value.lower()


def _headerNames(value: object, path: str) -> tuple[str, ...]:
    items = _list(value, path, "a list of header field names", allowEmpty=True)
    names: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not _HEADER_NAME_RE.match(item):
            raise _expected(f"{path}[{i}]", 'a header field name like "Subject"', item)
        if item.lower() in _DKIM_UNSIGNABLE:
            raise _Problem(f"{path}[{i}]", f"expected a field a signature may cover, got "
                           f"{_quote(item)} (it is added or changed on the way)")
        if item.lower() not in (n.lower() for n in names):
            names.append(item)
    return tuple(names)


# --------------------------------------------------------------------------
# Configuration objects


@dataclass(frozen=True)
class Listener(_Schema):
    what: ClassVar[str] = "a mapping with endpoint, tls and auth"

    endpoint: str = setting("endpoint", _endpoint, expected=_ENDPOINT_EXAMPLE)
    tls: str = setting("tls", _choice(LISTENER_TLS_MODES),
                       expected="one of " + ", ".join(LISTENER_TLS_MODES))
    auth: str = setting("auth", _choice(LISTENER_AUTH_POLICIES),
                        expected="one of " + ", ".join(LISTENER_AUTH_POLICIES))
    # AUTH without TLS; only allowed on loopback-only listeners.
    plaintextAuth: bool = setting("plaintext_auth", _boolean, False,
                                  shown=lambda l: l.plaintextAuth)
    # haproxy: endpoints only (required there): who may send the PROXY header.
    proxyFrom: tuple[Network, ...] = setting(
        "proxy_from", _proxyNetworks, (), show=lambda networks: [str(n) for n in networks],
        shown=lambda l: l.proxied)

    @property
    def loopback(self) -> bool:
        return isLoopbackEndpoint(self.endpoint)

    @property
    def proxied(self) -> bool:
        """Behind a PROXY-protocol balancer (a haproxy:<endpoint> listener)."""
        return isProxyEndpoint(self.endpoint)

    @property
    def innerEndpoint(self) -> str:
        """The endpoint relayd itself listens on: without the haproxy: prefix."""
        return self.endpoint.partition(":")[2] if self.proxied else self.endpoint

    def check(self, section: _Section) -> None:
        if self.proxied and "proxy_from" not in section:
            raise _missing(section.at("proxy_from"),
                           "a list of the balancers' networks (who may send the PROXY header)")
        if not self.proxied and "proxy_from" in section:
            raise _Problem(
                section.at("proxy_from"),
                f"expected no proxy_from on a listener without the PROXY protocol, got one "
                f"({_quote(self.endpoint)} is not a haproxy:<endpoint>)",
            )
        if self.plaintextAuth and not self.loopback:
            raise _Problem(
                section.at("plaintext_auth"),
                f"expected false on a listener other clients can reach, got true "
                f"({_quote(self.endpoint)} is not bound to a loopback interface or a UNIX socket)",
            )
        if self.auth != "none" and self.tls == "none" and not self.plaintextAuth:
            if self.loopback:
                raise _Problem(
                    section.at("auth"),
                    f"expected none without TLS, got {_quote(self.auth)} (passwords would cross "
                    "in plaintext; set tls, or plaintext_auth: true on this loopback listener)",
                )
            raise _Problem(
                section.at("auth"),
                f"expected none without TLS, got {_quote(self.auth)} (passwords would cross the "
                "network in plaintext; set tls: starttls or tls: implicit)",
            )


@dataclass(frozen=True)
class TLS(_Schema):
    # PEM: the certificate, then its chain (all served)
    certificate: str = pathSetting("certificate", expected="the PEM certificate (chain) file")
    key: str = pathSetting("key", expected="the PEM private key file")
    minVersion: str = setting("min_version", _minVersion, "1.2")


@dataclass(frozen=True)
class Auth(_Schema):
    passwordFile: str = pathSetting("password_file", expected="the password file (htpasswd format)")
    # login -> addresses ("alice@example.com") and domains ("@example.org")
    # it may use in MAIL FROM; a login without an entry may use only itself,
    # when it is an address.
    senders: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        "senders", _senders, (), show=lambda s: {name: list(entries) for name, entries in s})
    failureLimit: int = setting("failure_limit", _integer(1), DEFAULT_AUTH_FAILURE_LIMIT)
    failureWindow: float = duration("failure_window", 1, DEFAULT_AUTH_FAILURE_WINDOW)
    # How long a verified password is remembered (0: never).
    cache: float = duration("cache", 0, 0.0)
    receivedHeaderUser: bool = setting("received_header_user", _boolean, False)

    def sendersFor(self, login: str) -> tuple[str, ...] | None:
        for name, entries in self.senders:
            if name == login:
                return entries
        return None


@dataclass(frozen=True)
class Relay(_Schema):
    trustedNetworks: tuple[Network, ...] = setting(
        "trusted_networks", _networks,
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        show=lambda networks: [str(n) for n in networks])


@dataclass(frozen=True)
class Limits(_Schema):
    messageSize: int = setting("message_size", _size, 10_000_000, show=formatSize)
    recipients: int = setting("recipients", _integer(1), 100)
    connections: int = setting("connections", _integer(1), 100)
    connectionsPerClient: int = setting("connections_per_client", _integer(1), 20)
    messagesPerUserPerHour: int = setting("messages_per_user_per_hour", _integer(1), 200)
    errors: int = setting("errors", _integer(1), 20)  # Postfix's smtpd_hard_error_limit
    commandTimeout: float = duration("command_timeout", 1, 5 * 60.0)  # RFC 5321 4.5.3.2.7
    # RFC 5321 4.5.3.2.6 (DATA termination)
    dataTimeout: float = duration("data_timeout", 1, 10 * 60.0)
    greetingDelay: float = duration("greeting_delay", 0, 0.0)
    # The client's name (PTR, confirmed by A/AAAA) is looked up before the
    # banner, as Postfix does; the banner waits at most this long, then the
    # name is "unknown" (0: no lookup).
    clientNameTimeout: float = setting("client_name_timeout", _clientNameTimeout, 5.0,
                                       show=formatDuration)
    # Received: headers, relayd's own counted, at which a message is refused
    # as a mail loop (554 5.4.6); Postfix's hopcount_limit. At least 2, so a
    # message that has not been relayed before always passes.
    hopCount: int = setting("hop_count", _integer(2), 50)


@dataclass(frozen=True)
class Retry(_Schema):
    min: float = duration("min", 1, 5 * 60.0)  # seconds
    max: float = duration("max", 1, 60 * 60.0)  # seconds

    def check(self, section: _Section) -> None:
        if self.min > self.max:
            raise _Problem(
                section.path,
                f"expected min <= max, got min {formatDuration(self.min)} > max "
                f"{formatDuration(self.max)}",
            )


@dataclass(frozen=True)
class Queue(_Schema):
    directory: str = pathSetting("directory", expected="the spool directory path")
    # Seconds; then the sender gets a bounce (Postfix's maximal_queue_lifetime).
    lifetime: float = duration("lifetime", 1, 5 * 86400.0)
    # Seconds; None: no "delayed" notice.
    delayWarning: float | None = duration("delay_warning", 1, None,
                                          unset='no "delayed" notice is sent')
    retry: Retry = setting("retry", section=Retry)
    # Bytes of free space below which MAIL gets 452 4.3.1; None means
    # FREE_SPACE_FACTOR x limits.message_size (see Config.freeSpaceReserve).
    # Computed defaults are comments: written as keys they would stop
    # following limits.message_size and queue.directory.
    freeSpaceReserve: int | None = size(
        "free_space_reserve", None, computed=lambda queue, config: (
            formatSize(config.freeSpaceReserve()),
            f"{FREE_SPACE_FACTOR:g} x limits.message_size"))
    # Largest original returned whole in a bounce; bigger ones: headers only
    # (Postfix's bounce_size_limit).
    bounceSizeLimit: int = size("bounce_size_limit", 50_000)
    # The admin channel (relayctl); None means <directory>/control.sock.
    controlSocket: str | None = pathSetting(
        "control_socket", None, computed=lambda queue, config: (
            queue.controlSocketPath, f"{CONTROL_SOCKET_NAME} in queue.directory"))

    @property
    def controlSocketPath(self) -> str:
        return self.controlSocket or os.path.join(self.directory, CONTROL_SOCKET_NAME)

    def check(self, section: _Section) -> None:
        if self.delayWarning is not None and self.delayWarning >= self.lifetime:
            raise _Problem(
                section.at("delay_warning"),
                f"expected less than queue.lifetime ({formatDuration(self.lifetime)}), got "
                f"{formatDuration(self.delayWarning)}, so the notice could never be sent",
            )


def _verified(hop: NextHop) -> bool:
    return hop.tls in _VERIFIED_TLS


@dataclass(frozen=True)
class NextHop(_Schema):
    """
    One entry of delivery.smarthosts or delivery.routes, and the next hop
    delivery connects to (relayd.route, relayd.courier). ``mx`` means "the
    recipient domain's MX hosts, with this TLS policy": in the config such
    an entry (routes only) has no host and uses delivery.mx_port; the
    router puts the domain in ``host``. ``address`` (no config key) is set
    only on an MX host found in DNS: connect there; ``host`` is the name
    its certificate must carry. The password is never here: only the path
    of the file holding it.
    """

    what: ClassVar[str] = "a mapping with host, port and tls"

    host: str = setting("host", _host,
                        expected='a host name or IP address like "smtp.example.net"',
                        shown=lambda hop: not hop.mx)
    port: int = setting("port", _port, shown=lambda hop: not hop.mx)
    tls: str = setting("tls", _choice(NEXTHOP_TLS_MODES))
    verify: bool = setting("verify", _boolean, True, shown=_verified)
    caFile: str | None = pathSetting("ca_file", None, shown=_verified)
    username: str | None = setting("username", _string, None)
    passwordFile: str | None = pathSetting("password_file", None)
    mx: bool = setting("mx", _boolean, False, shown=lambda hop: hop.mx)
    address: str | None = None


@dataclass(frozen=True)
class DeliveryTimeouts(_Schema):
    """
    Seconds; the keys of delivery.timeouts. RFC 5321 section 4.5.3.2
    (connect: Postfix's smtp_connect_timeout).
    """

    connect: float = duration("connect", 1, 30.0)
    greeting: float = duration("greeting", 1, 300.0)
    mail: float = duration("mail", 1, 300.0)
    rcpt: float = duration("rcpt", 1, 300.0)
    dataInit: float = duration("data_init", 1, 120.0)
    dataBlock: float = duration("data_block", 1, 180.0)
    dataDone: float = duration("data_done", 1, 600.0)


@dataclass(frozen=True)
class DNS(_Schema):
    """Where MX and A/AAAA queries go: () means the servers in /etc/resolv.conf."""

    servers: tuple[tuple[str, int], ...] = setting(
        "servers", _servers, (), unset="the name servers in /etc/resolv.conf",
        show=lambda servers: [_formatServer(s) for s in servers])
    timeout: float = duration("timeout", 1, 10.0)


@dataclass(frozen=True)
class Delivery(_Schema):
    smarthosts: tuple[NextHop, ...] = setting("smarthosts", _smarthosts, (), withBase=True,
                                              items=NextHop)
    concurrency: int = setting("concurrency", _integer(1), 20)
    # Postfix's default_destination_concurrency_limit.
    destinationConcurrency: int = setting("destination_concurrency", _integer(1), 20)
    mxPort: int = setting("mx_port", _port, DEFAULT_MX_PORT)
    # Lower-cased recipient domain (or "*") -> next hops, tried in order.
    routes: dict[str, tuple[NextHop, ...]] = setting("routes", _routes, factory=dict,
                                                     withBase=True, items=NextHop)
    timeouts: DeliveryTimeouts = setting("timeouts", section=DeliveryTimeouts)
    dns: DNS = setting("dns", section=DNS)

    def passwordFiles(self) -> list[tuple[str, str]]:
        """(key path, file) of every password_file, for reading at start and reload."""
        found = []
        for i, hop in enumerate(self.smarthosts):
            if hop.passwordFile:
                found.append((f"delivery.smarthosts[{i}].password_file", hop.passwordFile))
        for domain, hops in self.routes.items():
            for i, hop in enumerate(hops):
                if hop.passwordFile:
                    found.append((f"delivery.routes.{domain}[{i}].password_file", hop.passwordFile))
        return found


# Where the Prometheus page listens when the metrics section gives no endpoint.
DEFAULT_METRICS_ENDPOINT = "tcp:9125:interface=127.0.0.1"


def _metricsEndpoint(value: object, path: str) -> str:
    value = _endpoint(value, path)
    if _splitEndpoint(value)[0] == "haproxy":
        raise _Problem(path, f"expected an endpoint like {_quote(DEFAULT_METRICS_ENDPOINT)}, got "
                       f"{_quote(value)} (the PROXY protocol is for SMTP listeners)")
    return value


@dataclass(frozen=True)
class Metrics(_Schema):
    """The Prometheus /metrics page (plain HTTP; keep it on loopback or a private network)."""

    endpoint: str = setting("endpoint", _metricsEndpoint, DEFAULT_METRICS_ENDPOINT)


@dataclass(frozen=True)
class DKIMSelector(_Schema):
    """One signing key of a From: domain: published as SELECTOR._domainkey.DOMAIN."""

    what: ClassVar[str] = "a mapping with selector and key"

    selector: str = setting("selector", _dkimSelector, expected='a selector like "2026a"')
    # RSA (2048 bits or more) or Ed25519, PEM; read at start and on reload.
    key: str = pathSetting("key", expected="the private key file (relayd dkim keygen writes one)")


@dataclass(frozen=True)
class DKIM(_Schema):
    """
    Signing: From: domain (lower-case A-labels) -> its selectors, each of
    which adds a DKIM-Signature; the fields and canonicalization apply to all.
    """

    domains: dict[str, tuple[DKIMSelector, ...]] = setting(
        "domains", _dkimDomains, withBase=True, items=DKIMSelector,
        expected="a mapping of From: domain to a list of {selector, key}")
    canonicalization: str = setting("canonicalization", _choice(DKIM_CANONICALIZATIONS),
                                    "relaxed/relaxed")
    headers: tuple[str, ...] = setting("headers", _headerNames, DKIM_SIGNED_HEADERS, show=list)
    oversign: tuple[str, ...] = setting("oversign", _headerNames, DKIM_OVERSIGNED_HEADERS,
                                        show=list)

    def check(self, section: _Section) -> None:
        if "from" not in {n.lower() for n in self.headers + self.oversign}:
            raise _Problem(section.at("headers"), "expected a list that includes From (a "
                           "signature must cover it, RFC 6376 section 5.4), got none")

    def keyFiles(self) -> list[tuple[str, str, str, str]]:
        """(key path, domain, selector, file) of every key, in the config's order."""
        return [(f"dkim.domains.{domain}[{i}].key", domain, entry.selector, entry.key)
                for domain, entries in self.domains.items() for i, entry in enumerate(entries)]


@dataclass(frozen=True)
class Config(_Schema):
    what: ClassVar[str] = "a mapping of settings"

    path: str  # the file it was read from: not a key
    hostname: str = setting("hostname", _hostname, expected='a DNS name like "relay.example.com"')
    listeners: tuple[Listener, ...] = setting("listeners", _listeners, items=Listener,
                                              expected="a list of at least one listener")
    tls: TLS | None = setting("tls", None, None, section=TLS, optional=True)
    auth: Auth | None = setting("auth", None, None, section=Auth, optional=True)
    relay: Relay = setting("relay", section=Relay)
    limits: Limits = setting("limits", section=Limits)
    queue: Queue = setting("queue", section=Queue)
    # Receives double bounces and quarantine notices, and RCPT TO:<postmaster>.
    postmaster: str | None = setting(
        "postmaster", _address, None,
        unset="double bounces and quarantine notices are logged and dropped; "
              "RCPT TO:<postmaster> gets 550 5.1.1")
    delivery: Delivery = setting("delivery", section=Delivery)
    # DKIM signing; None: mail leaves unsigned.
    dkim: DKIM | None = setting("dkim", None, None, section=DKIM, optional=True,
                                unset="mail leaves unsigned")
    # None: no metrics page.
    metrics: Metrics | None = setting("metrics", None, None, section=Metrics, optional=True,
                                      unset="no Prometheus page")
    shutdownGrace: float = duration("shutdown_grace", 0, 30.0)

    def check(self, section: _Section) -> None:
        for index, listener in enumerate(self.listeners):
            if listener.tls != "none" and self.tls is None:
                raise _Problem("tls", f"expected a section with certificate and key, as "
                               f"listeners[{index}] has tls: {listener.tls}, got nothing")
            if listener.auth != "none" and self.auth is None:
                raise _Problem("auth", f"expected a section with password_file, as "
                               f"listeners[{index}] has auth: {listener.auth}, got nothing")

    def freeSpaceReserve(self) -> int:
        """Bytes of free spool space below which MAIL is answered 452 4.3.1 (0: off)."""
        if self.queue.freeSpaceReserve is not None:
            return self.queue.freeSpaceReserve
        return int(FREE_SPACE_FACTOR * self.limits.messageSize)

    def toYAML(self) -> str:
        """
        The effective configuration: every key with its value, defaults
        filled in, durations and sizes in human form, secrets masked. The
        result loads back into an equal ``Config``, so ``relayd check-config``
        output can serve as a config file. Computed defaults and unset
        optional keys are comments, with what they mean.
        """
        comments: list[str] = []

        def comment(text: str) -> dict[str, str]:
            comments.append(text)
            return {f"{_COMMENT_KEY}{len(comments) - 1}": ""}

        tree = _tree(self, self, comment)
        header = f"# effective configuration from {self.path}\n"
        text = yaml.safe_dump(
            maskSecrets(tree),
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=1000,
        )
        # Each stand-in key becomes its comment line, at its key's indentation.
        return header + re.sub(
            rf"(?m)^( *){_COMMENT_KEY}(\d+): .*$",
            lambda m: f"{m.group(1)}# {comments[int(m.group(2))]}", text)


def maskSecrets(tree: Any) -> Any:
    """
    A copy of a plain YAML tree with the value of every key in
    ``SECRET_KEYS`` replaced by a mask, at any depth.
    """
    if isinstance(tree, dict):
        return {
            k: (_MASK if k in SECRET_KEYS and v is not None else maskSecrets(v))
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [maskSecrets(v) for v in tree]
    return tree


def _config(tree: object, path: str) -> Config:
    if tree is None:
        raise _Problem("(top level)", "expected a mapping of settings, got an empty file")
    baseDirectory = os.path.dirname(os.path.abspath(path))
    return _parseSection(Config, tree, "", baseDirectory, given={"path": path})



# --------------------------------------------------------------------------
# Entry points


def parse(text: str, path: str) -> Config:
    """
    Validate configuration ``text``; ``path`` names it in errors and anchors
    relative paths (the queue directory) at its directory.
    """
    tree = _readYAML(text, path)
    try:
        return _config(tree, path)
    except _Problem as p:
        raise ConfigError(f"{path}: {p.path}: {p.message}") from None


def warnings(loaded: Config) -> list[str]:
    """
    Risky but valid settings, as "<key.path>: <why>" lines (relayd
    check-config prints them; they do not stop the daemon).
    """
    found = []
    for index, listener in enumerate(loaded.listeners):
        if listener.tls == "none" and listener.auth == "none" and not listener.loopback:
            found.append(
                f"listeners[{index}]: neither TLS nor AUTH on {_quote(listener.endpoint)}, "
                "which other machines can reach: only relay.trusted_networks can relay "
                "through it, and their mail crosses the network in plaintext")
    for index, network in enumerate(loaded.relay.trustedNetworks):
        widest = 8 if network.version == 4 else 32
        if network.prefixlen < widest:
            found.append(
                f"relay.trusted_networks[{index}]: {_quote(str(network))} is wider than a "
                f"/{widest}: every address in it may relay without AUTH")
    return found


def load(path: str) -> Config:
    """
    Read, parse and validate the configuration file at ``path``.
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
