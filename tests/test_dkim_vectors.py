"""dkimpy's own test vectors through pymta's wrapper (pymta.dkim), and the streamed body
canonicalization checked against dkimpy's whole-body one.

The vectors (tests/data/dkimpy, with their licence) are signed and verified both ways:
what pymta signs verifies with dkimpy alone (which hashes the body itself), and what
dkimpy signs, in every canonicalization and with l=, verifies with pymta's verifier
(which hashes the body streamed, in pieces).
"""

from __future__ import annotations

import io
from pathlib import Path

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.dkim.canonical import BodyCanonicalizer, BodyHash
from pymta.dkim.keys import parse_private_key
from pymta.dkim.signer import SignOptions, SigningKey, sign_message
from pymta.dkim.verifier import KeyRecords, parse_signatures, verify_signatures

DATA = Path(__file__).parent / "data" / "dkimpy"

# RFC 8463 A.2: the key records of the example in A.3 (rfc6376.signed.msg)
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com":
        ["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="],
    "test._domainkey.football.example.com":
        ["v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5q"
         "hdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4"
         "hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB"],
}


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def crlf(message: bytes) -> bytes:
    """A vector file's lines with CRLF ends, as the spool holds a message."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def verify(message: bytes, records: dict) -> list:
    fp = io.BytesIO(message)
    header, parsed = parse_signatures(fp)
    return verify_signatures(header, fp, parsed, KeyRecords(records))


RSA_KEY = parse_private_key(data("2048_testkey.key"))
ED_KEY = parse_private_key(data("ed25519test.key"))
RECORDS = {"test._domainkey.example.com": [data("2048_testkey_wo_markers.pub.txt").decode().strip()],
           "ed._domainkey.example.com": [data("ed25519test.dns").decode().strip()]}


def test_rfc8463_example_verifies_both_signatures():
    results = verify(crlf(data("rfc6376.signed.msg")), RFC8463_KEYS)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "brisbane", "ed25519-sha256"), ("pass", "test", "rsa-sha256")]
    assert results[0].properties()[:2] == (("header.d", "football.example.com"),
                                           ("header.s", "brisbane"))


def test_rfc8463_example_with_a_changed_body_fails():
    tampered = crlf(data("rfc6376.signed.msg")).replace(b"We lost the game", b"We won the game")
    assert [r.result for r in verify(tampered, RFC8463_KEYS)] == ["fail", "fail"]
    assert verify(tampered, RFC8463_KEYS)[0].reason == "body hash did not verify"


def test_rfc8463_example_with_a_changed_header_fails_the_signature():
    tampered = crlf(data("rfc6376.signed.msg")).replace(b"Is dinner ready?", b"Is lunch ready?")
    results = verify(tampered, RFC8463_KEYS)
    assert [(r.result, r.reason) for r in results] == [("fail", "signature did not verify")] * 2


def test_dns_answers_decide_temperror_and_permerror():
    from pymta.dns.resolver import DNSError
    message = crlf(data("rfc6376.signed.msg"))
    records = {"brisbane._domainkey.football.example.com":
               DNSError("brisbane._domainkey.football.example.com", "TXT", "timeout"),
               "test._domainkey.football.example.com": []}
    assert [(r.result, r.reason) for r in verify(message, records)] == [
        ("temperror", "key lookup: timeout"),
        ("permerror", "no key record at test._domainkey.football.example.com")]
    revoked = {name: ["v=DKIM1; p="] for name in RFC8463_KEYS}
    assert [r.result for r in verify(message, revoked)] == ["fail", "fail"]


@pytest.mark.parametrize("vector", ["test.message", "message.mbox"])
@pytest.mark.parametrize("key, selector", [(RSA_KEY, "test"), (ED_KEY, "ed")])
def test_what_pymta_signs_verifies_with_dkimpy_alone(vector, key, selector):
    message = crlf(data(vector))
    [value] = sign_message(io.BytesIO(message), [SigningKey("example.com", selector, key, "")],
                           SignOptions(expire=3600))
    signed = b"DKIM-Signature: " + value.encode() + b"\r\n" + message
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: RECORDS[
        name.decode().rstrip(".")][0].encode())
    assert verify(signed, RECORDS)[0].result == "pass"     # (message.mbox has a second one)


@pytest.mark.parametrize("vector", ["test.message", "message.mbox", "rfc6376.signed.msg"])
@pytest.mark.parametrize("canonicalize", [(b"simple", b"simple"), (b"relaxed", b"simple"),
                                          (b"simple", b"relaxed"), (b"relaxed", b"relaxed")])
@pytest.mark.parametrize("length", [False, True])
def test_what_dkimpy_signs_verifies_with_pymta(vector, canonicalize, length):
    message = crlf(data(vector))
    signature = dkim.sign(message, b"test", b"example.com", data("2048_testkey.key"),
                          canonicalize=canonicalize, length=length,
                          include_headers=[b"from", b"to", b"subject"])
    [result] = verify(signature + message, RECORDS)[:1]
    assert result.result == "pass"
    if length:     # l=: what follows the signed length may change
        extended = signature + message + b"appended by a mailing list\r\n"
        assert verify(extended, RECORDS)[0].result == "pass"


def canonical_in_pieces(method: str, body: bytes, cuts: list[int]) -> bytes:
    canonicalizer = BodyCanonicalizer(method)
    out, start = [], 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        out.append(canonicalizer.feed(body[start:cut]))
        start = cut
    out.append(canonicalizer.end())
    return b"".join(out)


LINES = st.lists(st.sampled_from([b"", b" ", b"\t", b"a", b"b c", b"  x  ", b"\r", b"y\t"]),
                 max_size=8).map(b"".join)
BODIES = st.lists(LINES, max_size=10).flatmap(
    lambda lines: st.sampled_from([b"\r\n", b"\n"]).map(lambda end: end.join(lines)))


@settings(max_examples=400, deadline=None)
@given(body=BODIES, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_streamed_canonicalization_equals_dkimpys(body, cuts):
    message = b"From: a@example.com\r\n\r\n" + body
    _, dkimpy_body = dkim.rfc822_parse(message)
    assert canonical_in_pieces("relaxed", body, cuts) == Relaxed.canonicalize_body(dkimpy_body)
    assert canonical_in_pieces("simple", body, cuts) == Simple.canonicalize_body(dkimpy_body)


def test_body_hash_limit_counts_canonical_octets():
    body_hash = BodyHash("relaxed", "sha256", limit=5)
    body_hash.feed(b"ab  c\r\n")
    body_hash.feed(b"more\r\n")
    import hashlib
    assert body_hash.digest() == hashlib.sha256(b"ab c\r").digest() and body_hash.length == 5


def test_rsa_sha1_is_policy_unless_allowed():
    message = crlf(data("test.message"))
    signed = dkim.sign(message, b"test", b"example.com", data("2048_testkey.key"),
                       signature_algorithm=b"rsa-sha1", include_headers=[b"from", b"subject"])
    signed += message
    [result] = verify(signed, RECORDS)
    assert (result.result, result.reason) == ("policy", "rsa-sha1 is not accepted (RFC 8301)")
    fp = io.BytesIO(signed)
    header, parsed = parse_signatures(fp, allow_sha1=True)
    assert [r.result for r in verify_signatures(header, fp, parsed, KeyRecords(RECORDS))] == ["pass"]


def test_a_signature_that_does_not_sign_from_is_permerror():
    message = crlf(data("test.message"))
    signature = dkim.sign(message, b"test", b"example.com", data("2048_testkey.key"),
                          include_headers=[b"from", b"subject"])
    unsigned_from = signature.replace(b"h=from : subject", b"h=subject")
    [result] = verify(unsigned_from + message, RECORDS)
    assert (result.result, result.reason) == ("permerror", "the From field is not signed")


def test_a_header_section_over_the_limit_is_a_result_not_a_crash():
    from pymta.dkim.arc import parse_chain, verify_chain
    huge = b"X-Filler: " + b"x" * 900 + b"\r\n"
    message = huge * 1200 + b"From: a@example.com\r\n\r\nbody\r\n"
    fp = io.BytesIO(message)
    header, parsed = parse_signatures(fp)
    assert [(p.result.result, p.result.reason) for p in parsed] == [
        ("permerror", "header section longer than 1048576 bytes")]
    chain = parse_chain(io.BytesIO(message))
    assert verify_chain(chain, None, KeyRecords()).result == "fail"
