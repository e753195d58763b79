"""ARC (RFC 8617): verify a message's chain and seal it, with dkimpy's ARC support.

Verifying follows :mod:`pymta.dkim.verifier`: :func:`parse_chain` (blocking,
for a thread) finds the ARC sets and the key records they need; the caller
fetches those through pymta's resolver; :func:`verify_chain` (blocking)
hashes the body once, streamed, and lets dkimpy's ``ARC.verify`` check
every seal and message signature, with the prefetched key records and
those body hashes (:class:`_StreamedBodyARC`): dkimpy sees only the header
section.

Sealing (:func:`seal_message`) is dkimpy's ``ARC.sign`` on the whole message
in memory: callers bound the size (it holds the GIL for about 30 ms per MiB,
see bench/dkim_sign.py for dkimpy's signing).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import BinaryIO

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from pymta.authresults import authserv_id_of
from pymta.dkim.canonical import BodyHash
from pymta.dkim.message import (HeaderSectionError, body_chunks, for_dkimpy,
                                read_header_section)
from pymta.dkim.signer import SigningKey
from pymta.dkim.verifier import MIN_KEY_BITS, KeyRecords, body_hash_key, key_name

__all__ = ["ChainResult", "ParsedChain", "parse_chain", "verify_chain", "seal_message",
           "SEAL_FIELDS", "SealRefused"]

SEAL_FIELDS = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")


class SealRefused(Exception):
    """dkimpy will not add an ARC set to this message (the reason is the message)."""


@dataclass(frozen=True)
class ChainResult:
    """``arc=`` of Authentication-Results: pass, fail, none or temperror."""

    result: str
    instance: int = 0
    reason: str | None = None


@dataclass
class ParsedChain:
    header: bytes
    instance: int
    key_names: list[str]
    body_hashes: list[tuple[str, str, int | None]]
    problem: str | None = None


class _StreamedBodyARC(dkim.ARC):
    """dkimpy's ARC verifier for a message given as its header section only: each
    ARC-Message-Signature's ``bh=`` is checked against a body hash computed beforehand."""

    def __init__(self, message: bytes, body_hashes: dict, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.body_hashes = body_hashes

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        if b"bh" in sig:
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except (binascii.Error, ValueError):
                return False
            if self.body_hashes.get(body_hash_key(sig)) != expected:
                return False
            sig = dict(sig)
            del sig[b"bh"]
        return super().verify_sig(sig, include_headers, sig_header, dnsfunc)


def parse_chain(fp: BinaryIO) -> ParsedChain:
    """The ARC sets of the message at ``fp``: highest instance, key records, body hashes."""
    try:
        header = read_header_section(fp)
    except HeaderSectionError as e:
        return ParsedChain(b"", 0, [], [], str(e))
    try:
        arc = dkim.ARC(for_dkimpy(header))
    except dkim.DKIMException as e:
        return ParsedChain(header, 0, [], [], f"header: {e}")
    instance, fields = arc.sorted_arc_headers()
    if instance < 1 and any(name.lower() in dkim.ARC.ARC_HEADERS for name, _ in arc.headers):
        # RFC 8617 5.2: sets that are there but not numbered 1 to 50 are a broken chain
        return ParsedChain(header, 0, [], [], "ARC header fields without a valid instance")
    names, hashes = [], []
    for _i, (name, value) in fields:
        if name.lower() not in (b"arc-seal", b"arc-message-signature"):
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue                        # dkimpy reports it when verifying
        if b"s" in tags and b"d" in tags:
            names.append(key_name(tags[b"s"].decode("ascii", "replace"),
                                  tags[b"d"].decode("ascii", "replace")))
        if name.lower() == b"arc-message-signature" and b"a" in tags:
            tags.setdefault(b"c", b"relaxed/relaxed")
            try:
                hashes.append(body_hash_key(tags))
            except (ValueError, KeyError):
                continue
    return ParsedChain(header, instance, sorted(set(names)), sorted(set(hashes), key=repr))


def verify_chain(chain: ParsedChain, fp: BinaryIO, keys: KeyRecords) -> ChainResult:
    """The chain's result; ``fp`` is at the start of the body."""
    if chain.problem:
        return ChainResult("fail", chain.instance, chain.problem)
    if chain.instance == 0:
        return ChainResult("none")
    for name in chain.key_names:
        answer = keys.answers.get(name, [])
        if not isinstance(answer, list) and getattr(answer, "temporary", True):
            return ChainResult("temperror", chain.instance,
                               f"key lookup: {getattr(answer, 'reason', answer)}")
    hashers = {}
    for wanted in chain.body_hashes:
        try:
            hashers[wanted] = BodyHash(*wanted)
        except ValueError:
            continue
    for chunk in body_chunks(fp):
        for hasher in hashers.values():
            hasher.feed(chunk)
    digests = {wanted: hasher.digest() for wanted, hasher in hashers.items()}
    arc = _StreamedBodyARC(for_dkimpy(chain.header), digests, minkey=MIN_KEY_BITS)
    try:
        cv, _results, reason = arc.verify(dnsfunc=keys.dnsfunc)
    except dkim.DKIMException as e:
        return ChainResult("fail", chain.instance, str(e))
    if cv == dkim.CV_Pass:
        return ChainResult("pass", chain.instance)
    return ChainResult("fail", chain.instance, reason)


def _without_our_results(message: bytes, authserv_id: str) -> bytes:
    """``message`` without incoming Authentication-Results fields of ``authserv_id`` (forged
    or from an earlier pass; the authres plugin drops them from the stored message too)."""
    fp = io.BytesIO(message)
    header = read_header_section(fp)
    fields: list[list[bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    ours = authserv_id.lower()
    kept = []
    for field in fields:
        name, _, value = b"".join(field).partition(b":")
        if name.strip().lower() == b"authentication-results" and \
                (authserv_id_of(value.decode("utf-8", "replace")) or "").lower() == ours:
            continue
        kept.extend(field)
    return b"".join(kept) + message[len(header):]


def seal_message(message: bytes, key: SigningKey, authserv_id: str, results: str,
                 now: float | None = None) -> list[tuple[str, str]]:
    """The ARC set (name, value) for the next instance, from the Authentication-Results
    ``results`` (the value after the authserv-id, unfolded); [] when dkimpy ends the chain
    instead (a previous instance without a chain result); :class:`SealRefused` when dkimpy
    cannot seal it."""
    sealed = (f"Authentication-Results: {authserv_id}; {results}\r\n").encode() \
        + _without_our_results(message, authserv_id)
    try:
        arc = dkim.ARC(sealed, signature_algorithm=b"rsa-sha256")
        lines = arc.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                         key.key.dkimpy_key, authserv_id.encode("ascii"),
                         timestamp=int(now) if now is not None else None)
    except dkim.DKIMException as e:
        # e.g. the next instance would pass RFC 8617's limit of 50, or the incoming sets
        # are too broken to build on: the message goes on without a set of ours
        raise SealRefused(str(e)) from None
    out = []
    for line in lines:
        name, _, value = line.decode("ascii").partition(":")
        out.append((name, value.strip(" ").rstrip("\r\n")))
    return out
