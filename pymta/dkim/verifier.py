"""Verify every DKIM-Signature of a message (RFC 6376 6) with dkimpy, DNS asked beforehand.

Three steps, so that no step blocks the reactor and dkimpy never asks DNS:

1. :func:`parse_signatures` (blocking, for a thread) reads the header
   section and lets dkimpy parse and check each signature's tags; it gives
   the key record names to look up (``selector._domainkey.domain``);
2. the caller looks those up through pymta's resolver (asynchronous) and
   hands the answers in as a :class:`KeyRecords`;
3. :func:`verify_signatures` (blocking, for a thread) hashes the body once,
   streamed, for every (canonicalization, hash, l=) the signatures need,
   compares each ``bh=``, and lets dkimpy check the header signature with a
   ``dnsfunc`` that answers from the prefetched records.

Each signature gets a :class:`SignatureResult` with an RFC 8601 result:
``pass``, ``fail`` (signature or body hash wrong, key revoked),
``policy`` (rsa-sha1, RFC 8301), ``temperror`` (DNS trouble) or
``permerror`` (a broken signature, no key record, an unusable key).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import BinaryIO

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from pymta.dkim.canonical import BodyHash
from pymta.dkim.message import (HeaderSectionError, body_chunks, for_dkimpy,
                                read_header_section)

__all__ = ["ParsedSignature", "SignatureResult", "KeyRecords", "parse_signatures",
           "verify_signatures", "key_name", "body_hash_key", "MIN_KEY_BITS"]

#: RFC 8301 3.2: verifiers must not accept RSA keys under 1024 bits
MIN_KEY_BITS = 1024


def key_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}".lower()


@dataclass
class SignatureResult:
    """The outcome of one DKIM-Signature field."""

    result: str                  # pass, fail, policy, neutral, temperror, permerror
    domain: str = ""             # d=
    selector: str = ""           # s=
    b: str = ""                  # the start of b= (header.b, RFC 6008)
    algorithm: str = ""          # a=
    reason: str | None = None

    def properties(self) -> tuple[tuple[str, str], ...]:
        """The Authentication-Results properties (RFC 8601 2.7.1, RFC 6008)."""
        props = []
        if self.domain:
            props.append(("header.d", self.domain))
        if self.selector:
            props.append(("header.s", self.selector))
        if self.algorithm:
            props.append(("header.a", self.algorithm))
        if self.b:
            props.append(("header.b", self.b))
        return tuple(props)


@dataclass
class ParsedSignature:
    """One DKIM-Signature as dkimpy parsed it, waiting for its key and body hash."""

    index: int
    result: SignatureResult
    #: None once the signature has a final result (a syntax problem)
    tags: dict[bytes, bytes] | None = None

    @property
    def key_name(self) -> str | None:
        if self.tags is None:
            return None
        return key_name(self.result.selector, self.result.domain)


@dataclass
class KeyRecords:
    """The prefetched key records: name -> list of TXT texts, or a DNSError."""

    answers: dict[str, object] = field(default_factory=dict)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name`` from the prefetched answers."""
        answer = self.answers.get(name.decode("ascii", "replace").rstrip(".").lower())
        if isinstance(answer, list) and answer:
            return answer[0].encode("latin-1")
        return None


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _b_start(tags: dict[bytes, bytes]) -> str:
    return _text(re.sub(rb"\s+", b"", tags.get(b"b", b"")))[:8]


def parse_signatures(fp: BinaryIO, limit: int = 10, allow_sha1: bool = False
                     ) -> tuple[bytes, list[ParsedSignature]]:
    """The header section and each DKIM-Signature (the first ``limit``), parsed and checked."""
    try:
        header = read_header_section(fp)
    except HeaderSectionError as e:
        return b"", [ParsedSignature(0, SignatureResult("permerror", reason=str(e)))]
    try:
        message = dkim.DKIM(for_dkimpy(header))
    except dkim.DKIMException as e:
        if b"dkim-signature" not in header.lower():
            return header, []
        return header, [ParsedSignature(0, SignatureResult("permerror", reason=f"header: {e}"))]
    count = sum(1 for name, _ in message.headers if name.lower() == b"dkim-signature")
    parsed = []
    for index in range(min(count, limit)):
        raw = [v for n, v in message.headers if n.lower() == b"dkim-signature"][index]
        result = SignatureResult("permerror")
        try:
            tags = parse_tag_value(raw)
            result.domain = _text(tags.get(b"d", b"")).lower()
            result.selector = _text(tags.get(b"s", b""))
            result.algorithm = _text(tags.get(b"a", b""))
            result.b = _b_start(tags)
            prep = message.verify_headerprep(index)      # dkimpy's checks of the tags
        except (dkim.DKIMException, InvalidTagValueList) as e:
            result.reason = f"signature: {e}"
            parsed.append(ParsedSignature(index, result))
            continue
        tags, include_headers, _fields = prep
        if b"from" not in include_headers:
            result.reason = "the From field is not signed"
        elif tags[b"a"] == b"rsa-sha1" and not allow_sha1:
            result.result, result.reason = "policy", "rsa-sha1 is not accepted (RFC 8301)"
        else:
            parsed.append(ParsedSignature(index, result, tags))
            continue
        parsed.append(ParsedSignature(index, result))
    return header, parsed


def _key_problem(name: str, answer: object) -> tuple[str, str] | None:
    """(result, reason) when the key record of ``name`` cannot be used, else None."""
    if not isinstance(answer, list):
        reason = getattr(answer, "reason", None) or str(answer)
        temporary = getattr(answer, "temporary", True)
        return ("temperror" if temporary else "permerror"), f"key lookup: {reason}"
    if not answer:
        return "permerror", f"no key record at {name}"
    try:
        tags = parse_tag_value(answer[0].encode("latin-1"))
    except InvalidTagValueList as e:
        return "permerror", f"key record {name}: {e}"
    if tags.get(b"p", None) == b"":
        return "fail", f"key {name} revoked"
    try:
        _pk, bits, _ktag, _tlsrpt = dkim.evaluate_pk(name, answer[0])
    except (dkim.DKIMException, binascii.Error, ValueError) as e:
        return "permerror", f"key record {name}: {e}"
    if _ktag == b"rsa" and bits < MIN_KEY_BITS:
        return "policy", f"key {name} has {bits} bits, fewer than {MIN_KEY_BITS}"
    return None


def body_hash_key(tags: dict[bytes, bytes]) -> tuple[str, str, int | None]:
    canon = tags.get(b"c", b"simple/simple").split(b"/")
    body = canon[1] if len(canon) > 1 else b"simple"
    hash_name = tags[b"a"].split(b"-")[-1]
    limit = int(tags[b"l"]) if b"l" in tags else None
    return _text(body), _text(hash_name), limit


def verify_signatures(header: bytes, fp: BinaryIO, parsed: list[ParsedSignature],
                      keys: KeyRecords) -> list[SignatureResult]:
    """Each signature's result; ``fp`` is at the start of the body."""
    waiting = []
    for sig in parsed:
        if sig.tags is None:
            continue
        problem = _key_problem(sig.key_name, keys.answers.get(sig.key_name, []))
        if problem:
            sig.result.result, sig.result.reason = problem
            continue
        waiting.append(sig)
    hashes: dict[tuple, BodyHash] = {}
    for sig in waiting:
        wanted = body_hash_key(sig.tags)
        if wanted not in hashes:
            hashes[wanted] = BodyHash(*wanted)
    if hashes:
        for chunk in body_chunks(fp):
            for body_hash in hashes.values():
                body_hash.feed(chunk)
    digests = {wanted: body_hash.digest() for wanted, body_hash in hashes.items()}
    for sig in waiting:
        _verify_one(header, sig, digests[body_hash_key(sig.tags)], keys)
    return [sig.result for sig in parsed]


def _verify_one(header: bytes, sig: ParsedSignature, body_digest: bytes, keys: KeyRecords) -> None:
    result = sig.result
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", sig.tags[b"bh"]))
    except (binascii.Error, ValueError):
        result.result, result.reason = "permerror", "bh= is not base64"
        return
    if expected != body_digest:
        result.result, result.reason = "fail", "body hash did not verify"
        return
    message = dkim.DKIM(for_dkimpy(header), minkey=MIN_KEY_BITS)
    try:
        tags, include_headers, fields = message.verify_headerprep(sig.index)
        del tags[b"bh"]                  # checked above, over the streamed body
        ok = message.verify_sig(tags, include_headers, fields[sig.index], keys.dnsfunc)
    except dkim.DKIMException as e:
        result.result, result.reason = "permerror", str(e)
        return
    if ok:
        result.result, result.reason = "pass", None
    else:
        result.result, result.reason = "fail", "signature did not verify"
