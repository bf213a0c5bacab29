"""
``relayd dkim``: make a DKIM key and its DNS record, and check what is
published against the keys the config names.

    relayd dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--out DIR]
    relayd dkim check [--config FILE] [--selector SELECTOR] DOMAIN

keygen writes ``SELECTOR.DOMAIN.key`` (PKCS#8 PEM, mode 0600, never over an
existing file) and prints the TXT record for the zone on stdout. check looks
up ``SELECTOR._domainkey.DOMAIN`` for every selector of the domain in the
config's ``dkim.domains``, through ``delivery.dns.servers`` when set (else
/etc/resolv.conf), and prints one line per selector; it exits 0 only when
every record matches its key.
"""

from __future__ import annotations

import argparse
import os
from typing import TextIO

import dns.exception
import dns.nameserver
import dns.resolver

from relayd import config as configModule
from relayd import dkim
from relayd.cli.common import DEFAULT_CONFIG, FAILED, OK, Refusal

PROG = "relayd"


def keyFileName(selector: str, domain: str) -> str:
    return f"{selector}.{domain}.key"


def zoneLine(selector: str, domain: str, record: str) -> str:
    """The record as a zone file line, split into the 255-byte strings DNS needs."""
    strings = " ".join(f'"{part}"' for part in dkim.splitRecord(record))
    return f"{dkim.recordName(selector, domain)}. IN TXT ( {strings} )"


def _domain(text: str) -> str:
    domain = configModule.domainALabel(text)
    if domain is None:
        raise Refusal(f"DOMAIN: expected a domain like example.com, got {text!r}")
    return domain


def _selector(text: str) -> str:
    if not configModule.isDNSName(text):
        raise Refusal(f"SELECTOR: expected a selector like 2026a (letters, digits, '-', dots "
                      f"between labels), got {text!r}")
    return text.lower()


def keygen(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        domain = _domain(args.domain)
        selector = _selector(args.selector)
        path = os.path.join(args.out, keyFileName(selector, domain))
        data = dkim.newPrivateKey(args.type)
        key = dkim.parsePrivateKey(data)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise Refusal(f"{path} exists; relayd never overwrites a key (remove it, or pick "
                          f"another selector)") from None
        except OSError as e:
            raise Refusal(f"cannot create {path}: {e.strerror or e}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except Refusal as e:
        stderr.write(f"{PROG}: {e}\n")
        return FAILED
    stderr.write(f"{PROG}: wrote {path} ({key.kind}, {key.bits} bits); publish this TXT record, "
                 f"then add {{selector: \"{selector}\", key: {os.path.abspath(path)}}} under "
                 f"dkim.domains.{domain}\n")
    stdout.write(zoneLine(selector, domain, key.record()) + "\n")
    return OK


def lookupRecord(name: str, servers, timeout: float) -> tuple[str | None, str | None]:
    """(the DKIM record published at ``name``, None) or (None, why there is none)."""
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout
    try:
        answer = resolver.resolve(name, "TXT")
    except dns.resolver.NXDOMAIN:
        return None, "no such name (NXDOMAIN): the record is not published"
    except dns.resolver.NoAnswer:
        return None, "no TXT record at this name: the record is not published"
    except dns.exception.Timeout:
        return None, f"lookup failed: no answer within {timeout:g} s"
    except dns.exception.DNSException as e:
        return None, f"lookup failed: {e}"
    texts = [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]
    records = [t for t in texts if dkim.parseRecord(t).get("p") is not None]
    if not records:
        return None, "no DKIM record (no p= tag) among the TXT records at this name"
    if len(records) > 1:
        return None, f"{len(records)} DKIM records at this name; receivers need exactly one"
    return records[0], None


def check(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        try:
            loaded = configModule.load(args.config)
        except configModule.ConfigError as e:
            raise Refusal(str(e)) from None
        domain = _domain(args.domain)
        if loaded.dkim is None or domain not in loaded.dkim.domains:
            raise Refusal(f"{loaded.path}: dkim.domains has no {domain}, so nothing signs "
                          f"for it")
        entries = [(i, e) for i, e in enumerate(loaded.dkim.domains[domain])
                   if args.selector is None or e.selector == args.selector.lower()]
        if not entries:
            raise Refusal(f"{loaded.path}: dkim.domains.{domain} has no selector {args.selector}")
        keys = []
        for i, entry in entries:
            try:
                keys.append((entry, dkim.readPrivateKey(entry.key)))
            except OSError as e:
                raise Refusal(f"{loaded.path}: dkim.domains.{domain}[{i}].key: cannot read "
                              f"{entry.key}: {e.strerror or e}") from None
            except ValueError as e:
                raise Refusal(f"{loaded.path}: dkim.domains.{domain}[{i}].key: {entry.key}: "
                              f"{e}") from None
    except Refusal as e:
        stderr.write(f"{PROG}: {e}\n")
        return FAILED
    dnsConfig = loaded.delivery.dns
    allMatch = True
    for entry, key in keys:
        name = dkim.recordName(entry.selector, domain)
        published, problem = lookupRecord(name, dnsConfig.servers, dnsConfig.timeout)
        if published is not None:
            difference = dkim.recordMatches(published, key)
            if difference is None:
                stdout.write(f"{name}: matches {entry.key} ({key.kind}, {key.bits} bits)\n")
                continue
            problem = f"does not match {entry.key}: {difference}"
        allMatch = False
        stdout.write(f"{name}: {problem}; publish: {zoneLine(entry.selector, domain, key.record())}\n")
    return OK if allMatch else FAILED


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    return args.dkimFunction(args, stdout, stderr)


def setup(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="dkimCommand", metavar="ACTION",
                                    parser_class=type(parser))
    actions.required = True
    make = actions.add_parser("keygen", help="write a new private key and print its TXT record",
                              description="write SELECTOR.DOMAIN.key (mode 0600) and print the "
                                          "TXT record to publish")
    make.add_argument("domain", metavar="DOMAIN")
    make.add_argument("selector", metavar="SELECTOR")
    make.add_argument("--type", choices=dkim.KEY_TYPES, default="rsa",
                      help="rsa (2048 bits, the default) or ed25519")
    make.add_argument("--out", metavar="DIR", default=".",
                      help="the directory to write the key to (default: the current one)")
    make.set_defaults(dkimFunction=keygen)
    compare = actions.add_parser("check", help="compare the published TXT records with the keys",
                                 description="look up each selector's TXT record of DOMAIN and "
                                             "say whether it matches the configured key")
    compare.add_argument("domain", metavar="DOMAIN")
    compare.add_argument("-c", "--config", default=os.environ.get("RELAYD_CONFIG", DEFAULT_CONFIG),
                         help=f"relayd's configuration file (default $RELAYD_CONFIG or "
                              f"{DEFAULT_CONFIG})")
    compare.add_argument("--selector", metavar="SELECTOR", help="check only this selector")
    compare.set_defaults(dkimFunction=check)
