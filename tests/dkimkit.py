"""Helpers of the DKIM/DMARC tests: keys, their DNS records for LoopbackDNS, two pymtas."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from argon2 import PasswordHasher

from conftest import BACKEND_TOML, PymtaServer, free_port, routes_toml
from pymta.dkim.keys import generate_key, parse_private_key, txt_strings

HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
PASSWORD = "correct horse"


def write_key(directory: Path, name: str, ed25519: bool = False):
    """A new key in ``directory/name.key`` (0600) and its PrivateKey."""
    pem = generate_key(ed25519_key=ed25519)
    path = directory / f"{name}.key"
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    return path, parse_private_key(pem)


def key_zone(selector: str, domain: str, key) -> dict:
    return {f"{selector}._domainkey.{domain}": [("TXT", txt_strings(key.dns_record()))]}


def signing_sender(workdir: Path, nameserver: str, receiver_port: int, keys_toml: str,
                   data_stage: str = '["dkim_sign"]', sign_options: str = "") -> PymtaServer:
    """pymta for local.test users (AUTH on a second, plaintext listener; nothing trusted),
    relaying everything else by MX to ``receiver_port``, signing with ``keys_toml``."""
    workdir.mkdir(exist_ok=True)
    (workdir / "passwd").write_text(f"alice:{HASHER.hash(PASSWORD)}\n")
    os.chmod(workdir / "passwd", 0o600)
    server = PymtaServer(workdir, domains=("local.test",), server_toml="trusted_networks = []",
                         extra_toml=f"""
[dns]
nameservers = ["{nameserver}"]
timeout = "1s"
attempts = 1
""" + BACKEND_TOML + textwrap.dedent(f"""
[backends.out]
use = "relay"
port = {receiver_port}

[stages]
auth = ["users"]
data = {data_stage}

[plugins.users]
use = "passwdfile"
file = "passwd"

[plugins.dkim_sign]
keys = {keys_toml}
{sign_options}
""") + routes_toml(("local.test", "local"), ("*", "out")))
    server.submission_port = free_port()
    with open(server.config, "a") as f:
        f.write(f"""
[[listeners]]
name = "submission"
endpoint = "tcp:{server.submission_port}:interface=127.0.0.1"
role = "mx"
auth = true
auth_plaintext = true
""")
    return server


def verifying_receiver(workdir: Path, nameserver: str, data_stage: str, extra: str = "") -> PymtaServer:
    """pymta for remote.test that trusts nobody and checks with ``data_stage``."""
    workdir.mkdir(exist_ok=True)
    return PymtaServer(workdir, domains=("remote.test",), server_toml="trusted_networks = []",
                       extra_toml=f"""
[dns]
nameservers = ["{nameserver}"]
timeout = "1s"
attempts = 1
""" + BACKEND_TOML + textwrap.dedent(f"""
[stages]
mail = ["spf"]
data = {data_stage}
{extra}
"""))


def header_fields(message: bytes, name: str) -> list[str]:
    """The unfolded values of the fields called ``name`` in ``message``."""
    import email
    import email.policy
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [" ".join(v.split()) for v in parsed.get_all(name, [])]


def dnsfunc_from_zone(zone: dict):
    """A dkimpy ``dnsfunc`` answering TXT questions from a LoopbackDNS zone dict."""
    def dnsfunc(name: bytes, timeout: float = 5):
        for rtype, value, *_ in zone.get(name.decode().rstrip("."), ()):
            if rtype == "TXT":
                return "".join(value if isinstance(value, list) else [value]).encode()
        return None
    return dnsfunc
