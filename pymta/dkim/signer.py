"""DKIM-Signature fields for a message (RFC 6376 5, RFC 8463): blocking code for a thread.

:func:`sign_message` reads a message once: its header section for dkimpy,
its body streamed through :class:`~pymta.dkim.canonical.BodyHash`
(relaxed/relaxed, SHA-256, shared by every key), and returns one field
value per key.  dkimpy then selects and canonicalizes the header fields and
makes the RSA or Ed25519 signature (``DomainSigner.gen_header``, what its
own ``sign`` and its ARC sealing call); only the body hash is not dkimpy's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import dkim
import dkim.crypto
import nacl.encoding
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy

from pymta.dkim.canonical import BodyHash
from pymta.dkim.keys import ED25519, PrivateKey
from pymta.dkim.message import body_chunks, for_dkimpy, read_header_section

__all__ = ["SigningKey", "SignOptions", "sign_message", "RECOMMENDED_HEADERS", "HEADER"]

HEADER = "DKIM-Signature"

#: RFC 6376 5.4.1: the header fields a signature should cover (as dkimpy lists them)
RECOMMENDED_HEADERS = tuple(name.decode("ascii") for name in dkim.DKIM.SHOULD)
#: fields never signed (RFC 6376 5.4: they are changed or added on the way)
NEVER_SIGNED = tuple(name.decode("ascii") for name in dkim.DKIM.SHOULD_NOT)


@dataclass(frozen=True)
class SigningKey:
    """One entry of the key table: sign mail of ``domain`` with ``selector``'s key."""

    domain: str
    selector: str
    key: PrivateKey
    path: str


@dataclass(frozen=True)
class SignOptions:
    #: fields to sign when present, lower case
    headers: tuple[str, ...] = tuple(h.lower() for h in RECOMMENDED_HEADERS)
    #: fields signed once more than present, so that none can be added (From at least)
    oversign: tuple[str, ...] = ("from",)
    #: seconds from signing to x= (None: no x= tag)
    expire: float | None = None


def header_list(fields: list[tuple[bytes, bytes]], options: SignOptions) -> list[bytes]:
    """The h= list: each wanted field as often as present, then the oversigned ones once more."""
    wanted = set(options.headers) | set(options.oversign)
    names = [name.lower() for name, _ in fields if name.lower().decode("ascii", "replace") in wanted]
    return names + [name.encode("ascii") for name in options.oversign]


def _dkimpy_key(key: PrivateKey):
    if key.algorithm == ED25519:
        return nacl.signing.SigningKey(key.dkimpy_key, encoder=nacl.encoding.Base64Encoder)
    return dkim.crypto.parse_pem_private_key(key.dkimpy_key)


def sign_message(fp: BinaryIO, keys: Sequence[SigningKey], options: SignOptions,
                 now: float | None = None) -> list[str]:
    """One DKIM-Signature field value per key (folded, CRLF-free at the end), in order."""
    header = read_header_section(fp)
    body_hash = BodyHash("relaxed", "sha256")
    for chunk in body_chunks(fp):
        body_hash.feed(chunk)
    bh = body_hash.b64digest()
    timestamp = int(time.time() if now is None else now)
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    values = []
    for entry in keys:
        signer = dkim.DKIM(for_dkimpy(header), signature_algorithm=entry.key.algorithm.encode())
        include = header_list(signer.headers, options)
        fields = [
            (b"v", b"1"),
            (b"a", entry.key.algorithm.encode()),
            (b"c", b"relaxed/relaxed"),
            (b"d", entry.domain.encode("ascii")),
            (b"s", entry.selector.encode("ascii")),
            (b"t", str(timestamp).encode()),
        ]
        if options.expire is not None:
            fields.append((b"x", str(timestamp + int(options.expire)).encode()))
        fields += [(b"h", b" : ".join(include)), (b"bh", bh),   # folds at the spaces
                   (b"b", b"0" * 60)]      # as dkimpy: b= on a line of its own
        signer.hasher = dkim.HASH_ALGORITHMS[entry.key.algorithm.encode()]
        value = signer.gen_header(fields, include, canon, HEADER.encode(), _dkimpy_key(entry.key))
        values.append(value.decode("ascii").rstrip("\r\n").lstrip(" "))
    return values
