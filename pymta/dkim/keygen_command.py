"""``pymta dkim keygen``: make a DKIM signing key and print its DNS record.

::

    pymta dkim keygen example.org 2026r                 # RSA, 2048 bits
    pymta dkim keygen example.org 2026e --ed25519 --out /etc/pymta/dkim

writes ``DIR/DOMAIN.SELECTOR.key`` (PEM, mode 0600, never over an existing
file) and prints the TXT record to publish at ``SELECTOR._domainkey.DOMAIN``
in zone-file form, cut into strings of at most 255 characters.
"""

from __future__ import annotations

import argparse
import os

from pymta.admin import EXIT_OK, CommandError
from pymta.addresses import normalize_domain
from pymta.dkim.keys import MIN_RSA_BITS, generate_key, parse_private_key, txt_strings
from pymta.dkim.keytable import valid_selector
from pymta.filesync import fsync_directory

__all__ = ["register", "run", "zone_line"]

KEY_MODE = 0o600


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dkim", help="DKIM keys (dkim_sign plugin)",
                                   description="Manage DKIM signing keys.")
    verbs = parser.add_subparsers(title="verbs", dest="verb", metavar="VERB", required=True)
    keygen = verbs.add_parser(
        "keygen", help="make a signing key and print its DNS TXT record",
        description="Write a new private key to DIR/DOMAIN.SELECTOR.key (mode 0600) and print "
                    "the TXT record to publish at SELECTOR._domainkey.DOMAIN.")
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    keygen.add_argument("selector", metavar="SELECTOR", help="the selector (s=), e.g. 2026r")
    keygen.add_argument("--ed25519", action="store_true",
                        help="an Ed25519 key (RFC 8463) instead of RSA")
    keygen.add_argument("--bits", type=int, default=MIN_RSA_BITS,
                        help=f"RSA key size (default and least {MIN_RSA_BITS})")
    keygen.add_argument("--out", metavar="DIR", default=".",
                        help="directory for the key file (default: the current one)")
    keygen.set_defaults(run=run)


def zone_line(selector: str, domain: str, record: str) -> str:
    """The record as a zone-file line: ``NAME IN TXT ( "..." "..." )``."""
    strings = " ".join(f'"{s}"' for s in txt_strings(record))
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def run(args: argparse.Namespace) -> int:
    try:
        domain = normalize_domain(args.domain)
    except ValueError as e:
        raise CommandError(f"{args.domain!r} is not a domain name: {e}") from None
    selector = args.selector
    if not valid_selector(selector):
        raise CommandError(f"selector {selector!r} is not a sequence of DNS labels")
    if not args.ed25519 and args.bits < MIN_RSA_BITS:
        raise CommandError(f"--bits {args.bits}: at least {MIN_RSA_BITS}")
    if not os.path.isdir(args.out):
        raise CommandError(f"directory {args.out} does not exist")
    path = os.path.join(args.out, f"{domain}.{selector}.key")
    pem = generate_key(ed25519_key=args.ed25519, bits=args.bits)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    except FileExistsError:
        raise CommandError(f"{path} exists; remove it or choose another selector") from None
    except OSError as e:
        raise CommandError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    fsync_directory(args.out)
    key = parse_private_key(pem)
    print(f"# wrote {path}; publish this record, then add the key to [plugins.dkim_sign] keys:")
    print(zone_line(selector, domain, key.dns_record()))
    return EXIT_OK
