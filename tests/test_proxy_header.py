"""The PROXY protocol header parser (pymta.smtp.proxy): v1, v2, every split of the input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pymta.smtp.proxy import (NEED_DATA, V1_MAX_LENGTH, V2_MAX_PAYLOAD, V2_SIGNATURE, ProxyHeader,
                              ProxyHeaderError, parse_header, v1_header, v2_header)


def feed(chunks):
    """What a reader that gets ``chunks`` one after the other sees: (result, rest) or the error."""
    buffer = b""
    for index, chunk in enumerate(chunks):
        buffer += chunk
        try:
            result = parse_header(buffer)
        except ProxyHeaderError as e:
            return "error", type(e)
        if result is not NEED_DATA:
            return result, buffer[result.length:] + b"".join(chunks[index + 1:])
    return NEED_DATA, buffer


# ------------------------------------------------------------------ v1
def test_v1_tcp4_and_tcp6():
    h = parse_header(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n")
    assert h == ProxyHeader(1, 44, ("192.0.2.7", 56324), ("198.51.100.1", 25))
    h = parse_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 587\r\n")
    assert h == ProxyHeader(1, 46, ("2001:db8::7", 65535), ("2001:db8::1", 587))


def test_v1_unknown_means_the_sockets_own_address():
    assert parse_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15)
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse_header(line) == ProxyHeader(1, len(line))


def test_v1_longest_header_is_accepted_and_one_more_byte_is_not():
    longest = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert parse_header(longest).length == len(longest) == 104
    # the spec's worst case: UNKNOWN followed by two such addresses and ports
    assert parse_header(longest.replace(b"TCP6", b"UNKNOWN")).length == V1_MAX_LENGTH == 107
    unknown = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert parse_header(unknown).length == V1_MAX_LENGTH
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        parse_header(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n")
    # no CRLF yet, and already too long to be a header: refused without waiting for more
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        parse_header(b"PROXY TCP4 " + b"1" * 200)


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "fields"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25 x\r\n", "fields"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 56324 25\r\n", "fields"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 25\r\n", "not an TCP4 address"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 25\r\n", "not an TCP6 address"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25\r\n", "not an TCP6 address"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 25\r\n", "not an TCP4 address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa1 25\r\n", "non-ASCII"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n", "unknown protocol"),
    (b"PROXY TCP4 192.0.2.7\n198.51.100.1 1 25\r\n", "bare CR or LF"),
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 25\r\n", "bare CR or LF"),
    (b"proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n", "not a PROXY"),
    (b"PROXYTCP4 192.0.2.7 198.51.100.1 1 25\r\n", "not a PROXY"),
    (b"EHLO client.example\r\n", "not a PROXY"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY"),    # a TLS ClientHello
])
def test_v1_malformed(line, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(line)


def test_v1_prefixes_need_more():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
    for end in range(len(line)):
        assert parse_header(line[:end]) is NEED_DATA


# ------------------------------------------------------------------ v2
def test_v2_inet_inet6_and_tlvs_skipped():
    h = v2_header(("192.0.2.7", 56324), ("198.51.100.1", 25))
    assert len(h) == 16 + 12
    assert parse_header(h + b"EHLO") == ProxyHeader(2, 28, ("192.0.2.7", 56324), ("198.51.100.1", 25))
    tlvs = b"\x01\x00\x02h2" + b"\x05\x00\x04abcd"       # ALPN, UNIQUE_ID
    h = v2_header(("2001:db8::7", 1), ("2001:db8::1", 465), tlvs)
    assert parse_header(h) == ProxyHeader(2, 16 + 36 + len(tlvs), ("2001:db8::7", 1), ("2001:db8::1", 465))


def test_v2_local_is_the_proxys_own_connection():
    assert parse_header(v2_header(None)) == ProxyHeader(2, 16)
    # LOCAL with an address block (HAProxy health checks may send one): skipped
    h = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x11, 12) + bytes(12)
    assert parse_header(h + b"x") == ProxyHeader(2, 28)


def test_v2_unspec_and_unix_use_the_socket_address():
    assert parse_header(V2_SIGNATURE + b"\x21\x00\x00\x00") == ProxyHeader(2, 16)
    unix = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216)
    assert parse_header(unix) == ProxyHeader(2, 16 + 216)


@pytest.mark.parametrize("header, why", [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family"),
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "unknown address family"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "too short"),
    (V2_SIGNATURE + b"\x21\x21\x00\x20" + bytes(32), "too short"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "datagram"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_PAYLOAD + 1), "at most"),
    (b"\r\n\r\n\x00\r\nQUIT\r", "not a PROXY"),
    (b"\r\n\r\nEHLO x\r\n", "not a PROXY"),
])
def test_v2_malformed(header, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(header)


def test_v2_longest_accepted():
    h = v2_header(("192.0.2.7", 1), tlvs=b"\x04" + struct.pack("!H", V2_MAX_PAYLOAD - 15) +
                  bytes(V2_MAX_PAYLOAD - 15))
    assert len(h) == 16 + V2_MAX_PAYLOAD
    assert parse_header(h).length == len(h)
    assert parse_header(h[:-1]) is NEED_DATA


def test_empty_input_needs_more():
    assert parse_header(b"") is NEED_DATA


# ----------------------------------------------------- every split, hypothesis
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(0, 65535)
endpoint = st.one_of(st.tuples(ipv4, port), st.tuples(ipv6, port))
pair = endpoint.flatmap(lambda src: st.tuples(
    st.just(src), st.tuples(ipv6 if ":" in src[0] else ipv4, port)))
tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(
    lambda t: bytes([t[0]]) + struct.pack("!H", len(t[1])) + t[1])


@st.composite
def header_cases(draw):
    """(header bytes, the ProxyHeader expected) for v1 and v2, PROXY and LOCAL/UNKNOWN."""
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local"]))
    if kind == "v1-unknown":
        h = v1_header(None)
        return h, ProxyHeader(1, len(h))
    if kind == "v2-local":
        h = v2_header(None, tlvs=b"".join(draw(st.lists(tlv, max_size=3))))
        return h, ProxyHeader(2, len(h))
    src, dst = draw(pair)
    if kind == "v1":
        h = v1_header(src, dst)
        version = 1
    else:
        h = v2_header(src, dst, b"".join(draw(st.lists(tlv, max_size=3))))
        version = 2
    norm = lambda e: (str(ipaddress.ip_address(e[0])), e[1])
    return h, ProxyHeader(version, len(h), norm(src), norm(dst))


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=300)
@given(header_cases(), st.binary(max_size=30), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_gives_the_header_and_the_bytes_after_it(case, after, cuts):
    header, expected = case
    result, rest = feed(splits(header + after, cuts))
    assert result == expected
    assert rest == after


@given(header_cases(), st.binary(max_size=30))
def test_every_split_point_gives_the_same_answer(case, after):
    header, expected = case
    data = header + after
    for cut in range(len(data) + 1):
        assert feed([data[:cut], data[cut:]]) == (expected, after)


@settings(max_examples=500)
@given(st.binary(max_size=120), st.lists(st.integers(0, 200), max_size=6))
def test_arbitrary_bytes_never_crash_and_splitting_changes_nothing(data, cuts):
    whole = feed([data])
    assert feed(splits(data, cuts)) == whole


@settings(max_examples=300)
@given(header_cases(), st.integers(0, 200), st.integers(0, 255))
def test_a_corrupted_header_is_an_error_or_a_header_never_a_crash(case, position, byte):
    header, _ = case
    data = bytearray(header)
    data[position % len(data)] = byte
    data = bytes(data)
    whole = feed([data])
    for cut in range(len(data) + 1):
        assert feed([data[:cut], data[cut:]]) == whole
