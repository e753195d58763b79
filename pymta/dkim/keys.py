"""DKIM private keys: reading them, making them, and the DNS record of their public half.

A key file is PEM (``openssl genrsa``, ``openssl genpkey -algorithm ed25519``,
PKCS#1 or PKCS#8) or, for Ed25519, dkimpy's own format (the 32-byte seed in
base64, as ``dknewkey --ktype ed25519`` writes it).  :func:`load_private_key`
turns either into what dkimpy signs with; RSA keys under 2048 bits are
refused (RFC 8301 allows 1024, but they are breakable and receivers
distrust them).  The public half comes from the ``cryptography`` package
(which pyOpenSSL already brings).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = ["PrivateKey", "load_private_key", "parse_private_key", "generate_key",
           "KeyError_", "MIN_RSA_BITS", "txt_strings"]

MIN_RSA_BITS = 2048
RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"


class KeyError_(Exception):
    """A key file that cannot be used: the message says why."""


@dataclass(frozen=True)
class PrivateKey:
    """A signing key as dkimpy takes it, and the DNS record of its public half."""

    #: the DKIM a= value: "rsa-sha256" or "ed25519-sha256"
    algorithm: str
    #: what dkimpy's sign() takes: PKCS#1 PEM (RSA) or the base64 seed (Ed25519)
    dkimpy_key: bytes
    #: the p= value of the key record (base64)
    public: str
    bits: int

    @property
    def key_type(self) -> str:
        return "rsa" if self.algorithm == RSA else "ed25519"

    def dns_record(self) -> str:
        """The TXT record text for ``SELECTOR._domainkey.DOMAIN`` (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k={self.key_type}; p={self.public}"


def parse_private_key(data: bytes) -> PrivateKey:
    """The key in ``data`` (PEM, or a base64 Ed25519 seed); :class:`KeyError_` if unusable."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except TypeError:
            raise KeyError_("the key is encrypted (a passphrase is not supported)") from None
        except (ValueError, serialization.UnsupportedAlgorithm) as e:
            raise KeyError_(f"not a readable PEM private key ({e})") from None
    else:
        try:
            seed = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise KeyError_("neither a PEM private key nor a base64 Ed25519 seed of 32 bytes")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyError_(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are needed")
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return PrivateKey(RSA, pem, base64.b64encode(der).decode("ascii"), key.key_size)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return PrivateKey(ED25519, base64.b64encode(seed), base64.b64encode(raw).decode("ascii"),
                          256)
    raise KeyError_(f"a {type(key).__name__.lstrip('_')} key; DKIM signs with RSA or Ed25519")


def load_private_key(path: str) -> PrivateKey:
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except OSError as e:
        raise KeyError_(f"cannot read {path}: {e.strerror}") from None
    return parse_private_key(data)


def generate_key(ed25519_key: bool = False, bits: int = MIN_RSA_BITS) -> bytes:
    """A new private key as PEM (PKCS#8)."""
    if ed25519_key:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt_strings(text: str, size: int = 255) -> list[str]:
    """``text`` cut into the character-strings of one TXT record (at most 255 octets each)."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
