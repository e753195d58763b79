"""The PROXY protocol header (HAProxy's, versions 1 and 2), sans-I/O.

A load balancer in front of the server sends one header before anything
else on the connection, naming the client it accepted the connection from.
:func:`parse_header` looks at the bytes received so far and says one of:

- :data:`NEED_DATA`: the bytes are a proper beginning of a header, send more;
- a :class:`ProxyHeader`: the header, and how many bytes it took (what follows
  belongs to the next protocol, SMTP);
- raises :class:`ProxyHeaderError`: these bytes are not a valid header.

Version 1 is a text line, ``PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\\r\\n``
(``TCP6`` with IPv6 addresses, or ``UNKNOWN`` and anything up to the line
end), at most 107 bytes with its CRLF.  Version 2 is binary: a 12-byte
signature, version/command, family/transport, a 16-bit length, the addresses
and then type-length-value fields, which are skipped.

``source is None`` (v1 ``UNKNOWN``, v2 ``LOCAL`` such as a health check, or
v2 with an address family other than IPv4/IPv6) means: the connection is the
proxy's own, use the socket's peer address.

Reference: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107                       # the longest valid v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
#: longest v2 address block + TLVs accepted; the format allows 65535, HAProxy's own
#: headers are a few hundred bytes at most (addresses, ALPN, SNI, unique id, SSL)
V2_MAX_PAYLOAD = 4096

# v2 commands, address families and transports
LOCAL, PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
UNSPEC, STREAM, DGRAM = 0x0, 0x1, 0x2
_V2_ADDRESS_LENGTH = {AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header (the message says why, for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    #: 1 or 2
    version: int
    #: bytes of the header, from the first; what follows is the next protocol's
    length: int
    #: (address, port) of the client the proxy accepted, or None: use the socket's peer
    source: tuple[str, int] | None = None
    #: (address, port) the client connected to on the proxy, or None
    destination: tuple[str, int] | None = None


def parse_header(data: bytes) -> ProxyHeader | _NeedData:
    """What the bytes received so far are; see the module docstring."""
    if not data:
        return NEED_DATA
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("not a PROXY protocol header")


# ----------------------------------------------------------------------- v1
def _parse_v1(data: bytes) -> ProxyHeader | _NeedData:
    head = data[:len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX_LENGTH} bytes")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise ProxyHeaderError("v1 header with a bare CR or LF")
        return NEED_DATA
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1 header with a bare CR or LF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header with non-ASCII bytes") from None
    fields = text.split(" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(version=1, length=length)
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1 header with {len(fields)} fields, not 6: {text!r}")
    _, proto, src, dst, sport, dport = fields
    if proto == "TCP4":
        kind = ipaddress.IPv4Address
    elif proto == "TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyHeaderError(f"v1 header with unknown protocol {proto[:10]!r}")
    return ProxyHeader(version=1, length=length,
                       source=(_v1_address(kind, src, proto), _v1_port(sport)),
                       destination=(_v1_address(kind, dst, proto), _v1_port(dport)))


def _v1_address(kind, text: str, proto: str) -> str:
    try:
        address = kind(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {text[:45]!r} is not an {proto} address") from None
    if kind is ipaddress.IPv6Address and address.scope_id:
        raise ProxyHeaderError(f"v1 header: {text[:45]!r} is not an {proto} address")
    return str(address)


def _v1_port(text: str) -> int:
    # decimal, no sign, no leading zero (the spec: "a 5-digits max number")
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()) or \
            (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: {text[:10]!r} is not a port number")
    return int(text)


# ----------------------------------------------------------------------- v2
def _parse_v2(data: bytes) -> ProxyHeader | _NeedData:
    head = data[:len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < V2_FIXED_LENGTH:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError(f"v2 header with version {data[12] >> 4}")
        return NEED_DATA
    version_command, family_transport, payload_length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (LOCAL, PROXY):
        raise ProxyHeaderError(f"v2 header with unknown command {command:#x}")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > AF_UNIX or transport > DGRAM:
        raise ProxyHeaderError(f"v2 header with unknown address family/transport {family_transport:#04x}")
    if payload_length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header of {payload_length} bytes after the first 16 "
                               f"(at most {V2_MAX_PAYLOAD} accepted)")
    needed = _V2_ADDRESS_LENGTH.get(family, 0)
    if command == PROXY and payload_length < needed:
        raise ProxyHeaderError(f"v2 header: {payload_length} bytes is too short for "
                               f"its address family ({needed} needed)")
    length = V2_FIXED_LENGTH + payload_length
    if len(data) < length:
        return NEED_DATA
    if command == LOCAL:
        return ProxyHeader(version=2, length=length)
    if transport == DGRAM:
        raise ProxyHeaderError("v2 header for a datagram (UDP) connection on a stream listener")
    if transport == UNSPEC or family not in (AF_INET, AF_INET6):
        return ProxyHeader(version=2, length=length)       # addresses not for us: the socket's
    body = data[V2_FIXED_LENGTH:length]
    if family == AF_INET:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack_from("!HH", body, 8)
    else:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack_from("!HH", body, 32)
    # the TLVs after the addresses (ALPN, SNI, unique id, SSL, ...) are skipped
    return ProxyHeader(version=2, length=length, source=(str(src), sport),
                       destination=(str(dst), dport))


# ------------------------------------------------------------- for the tests
def v1_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 header naming ``source`` (``PROXY UNKNOWN`` when None)."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    destination = destination or (("::1", 25) if ":" in source[0] else ("127.0.0.1", 25))
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY naming ``source``, or LOCAL when None; ``tlvs`` appended."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | LOCAL, 0, len(tlvs)) + tlvs
    address = ipaddress.ip_address(source[0])
    destination = destination or (("::1", 25) if address.version == 6 else ("127.0.0.1", 25))
    family = AF_INET6 if address.version == 6 else AF_INET
    body = (address.packed + ipaddress.ip_address(destination[0]).packed
            + struct.pack("!HH", source[1], destination[1]) + tlvs)
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | PROXY, family << 4 | STREAM, len(body)) + body
