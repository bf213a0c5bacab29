"""
The ``relayd`` command: administrative subcommands beside the daemon
(which runs as ``twistd relayd``).

Each subcommand is a function taking the parsed arguments and returning an
exit status; add one by writing it and registering it in ``_COMMANDS``.
Errors an admin can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from importlib import metadata
from typing import Callable, Sequence, TextIO

import relayd
from relayd import config, tap
from relayd.auth import parsePasswordFile, sendersWithoutLogin, skippedLines, unusableEntries
from relayd.cli import dkim as dkimCommand
from relayd.cli.common import FAILED, OK, USAGE, OneLineParser, Refusal, UsageError

PROG = "relayd"

def _filesProblems(path: str) -> list[str]:
    """Load the config and open every file it names, as this process's user (the daemon's words)."""
    try:
        loaded = config.load(path)
    except config.ConfigError as e:
        return [str(e)]
    return tap.startupProblems(loaded)


def _asUser(user: str, work: Callable[[], list[str]]) -> list[str]:
    """
    ``work()`` in a child process that has dropped to ``user``'s uid, gid
    and supplementary groups, as systemd's User= does: the kernel, not an
    access() check made as root, says what that user may open.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Refusal(f"--user {user}: no such user") from None
    if os.geteuid() == entry.pw_uid:
        return work()
    if os.geteuid() != 0:
        raise Refusal(f"--user {user}: only root can check as another user; "
                       f"run check-config as root or as {user}")
    groups = os.getgrouplist(user, entry.pw_gid)
    # Everything the check needs was imported with this module (relayd.tap
    # imports the rest) while the venv is certainly readable; the child only
    # opens the files under test.
    sys.stdout.flush()
    sys.stderr.flush()
    readEnd, writeEnd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(readEnd)
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            answer = {"problems": work()}
        except BaseException as e:  # anything at all: reported, never a traceback
            answer, status = {"error": f"{type(e).__name__}: {e}"}, 1
        try:
            data = json.dumps(answer).encode("utf-8")
            while data:
                data = data[os.write(writeEnd, data):]
        finally:
            os._exit(status)
    os.close(writeEnd)
    chunks = []
    while True:
        chunk = os.read(readEnd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(readEnd)
    os.waitpid(pid, 0)
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise Refusal(f"--user {user}: the check as {user} ended without an answer") from None
    if "error" in answer:
        raise Refusal(f"--user {user}: the check as {user} failed: {answer['error']}")
    return answer["problems"]


def checkConfig(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """
    Load a config file as the daemon would, then open every file it names
    (as ``--user``, or as whoever runs this); print the effective config if
    all is well, one line per problem if not, as the daemon words it.
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
    try:
        if args.user:
            problems = _asUser(args.user, lambda: _filesProblems(args.file))
        else:
            problems = _filesProblems(args.file)
    except Refusal as e:
        stderr.write(f"{PROG}: {e}\n")
        return FAILED
    for problem in problems:
        stderr.write(f"{PROG}: {problem}\n")
    if problems:
        return FAILED
    stdout.write(loaded.toYAML())
    return OK


def _passwordFileWarnings(loaded: config.Config) -> list[str]:
    """
    What the daemon would warn about in auth.password_file: entries no
    password can match (an unsupported hash scheme) and auth.senders
    entries for logins it does not have. A file that cannot be read gives
    nothing here (the daemon refuses to start on it).
    """
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


def _checkConfigArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", metavar="USER",
                        help="open the files as this user, the one the daemon runs as "
                             "(User= in the systemd unit); needs root")
    parser.add_argument("file", metavar="FILE", help="the YAML config file")


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
        "[--user USER] FILE",
        "validate a config file, open every file it names, print the effective configuration",
        _checkConfigArguments,
    ),
    "dkim": (
        dkimCommand.run,
        "keygen DOMAIN SELECTOR [--type rsa|ed25519] [--out DIR] | "
        f"{PROG} dkim check [--config FILE] [--selector SELECTOR] DOMAIN",
        "DKIM: write a new key and its DNS record (keygen); compare the published records "
        "with the configured keys (check)",
        dkimCommand.setup,
    ),
}


def _usage() -> str:
    return " | ".join(
        f"{PROG} {name} {synopsis}".rstrip()
        for name, (_, synopsis, _, _) in _COMMANDS.items()
    )


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    try:
        return metadata.version("relayd")
    except metadata.PackageNotFoundError:
        return relayd.__version__


def makeParser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="relayd administration commands")
    parser.add_argument("--version", action="store_true", help="print relayd's version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
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
            raise UsageError("no command given")
    except UsageError as e:
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
