"""
The C{relayd} command: administrative subcommands beside the daemon
(which runs as C{twistd relayd}).

Each subcommand is a function taking the parsed arguments and returning an
exit status; add one by writing it and registering it in L{_COMMANDS}.
Errors an admin can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, TextIO

from relayd import config

PROG = "relayd"

# Exit statuses.
OK = 0
FAILED = 1
USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """
    An ArgumentParser whose usage errors are one line ("relayd: ...; usage:
    ...") instead of argparse's usage block, so scripts and humans see the
    problem at a glance.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def checkConfig(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """
    Load a config file as the daemon would; print the effective config if
    it is valid, the one-line reason if not.
    """
    try:
        loaded = config.load(args.file)
    except config.ConfigError as e:
        stderr.write(f"{PROG}: {e}\n")
        return FAILED
    # Warnings name risky but valid settings; they do not change the status.
    for warning in config.warnings(loaded):
        stderr.write(f"{PROG}: warning: {args.file}: {warning}\n")
    for warning in _passwordFileWarnings(loaded):
        stderr.write(f"{PROG}: warning: {warning}\n")
    stdout.write(loaded.toYAML())
    return OK


def _passwordFileWarnings(loaded: config.Config) -> list[str]:
    """
    What the daemon would warn about in auth.password_file: entries no
    password can match (an unsupported hash scheme) and auth.senders
    entries for logins it does not have. A file that cannot be read gives
    nothing here (the daemon refuses to start on it).
    """
    from relayd.auth import parsePasswordFile, sendersWithoutLogin, skippedLines, unusableEntries

    if loaded.auth is None:
        return []
    path = loaded.auth.passwordFile
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    entries, skipped = parsePasswordFile(data)
    found = [f"{path}: {skippedLines(skipped)}"] if skipped else []
    found += [entry.describe(path) for entry in unusableEntries(data)]
    found += [f"{loaded.path}: {problem}"
              for problem in sendersWithoutLogin(loaded.auth.senders, set(entries), path)]
    return found


# name: (function, argument synopsis, help, argument setup)
_COMMANDS: dict[
    str,
    tuple[
        Callable[[argparse.Namespace, TextIO, TextIO], int],
        str,
        str,
        Callable[[argparse.ArgumentParser], None],
    ],
] = {
    "check-config": (
        checkConfig,
        "FILE",
        "validate a config file and print the effective configuration",
        lambda p: p.add_argument("file", metavar="FILE", help="the YAML config file"),
    ),
}


def _usage() -> str:
    return " | ".join(
        f"{PROG} {name} {synopsis}".rstrip()
        for name, (_, synopsis, _, _) in _COMMANDS.items()
    )


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("relayd")
    except metadata.PackageNotFoundError:
        import relayd

        return relayd.__version__


def makeParser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="relayd administration commands")
    parser.add_argument("--version", action="store_true", help="print relayd's version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (function, _, help, setup) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help, description=help)
        setup(sub)
        sub.set_defaults(function=function)
    return parser


def run(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    Run one command line (without the program name); return the exit status.
    """
    parser = makeParser()
    try:
        args = parser.parse_args(list(argv))
        if args.version:
            stdout.write(f"{PROG} {version()}\n")
            return OK
        if args.command is None:
            raise _UsageError("no command given")
    except _UsageError as e:
        stderr.write(f"{PROG}: {' '.join(str(e).split())}; usage: {_usage()}\n")
        return USAGE
    return args.function(args, stdout, stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """
    The console script's entry point.
    """
    sys.exit(run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
