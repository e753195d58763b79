"""`pymta dkim keygen` as the README runs it, and the DKIM/ARC plugins' options."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pymta import admin
from pymta.config.options import PluginContext
from pymta.dkim.keys import parse_private_key
from pymta.dkim.signer import SignOptions, header_list
from pymta.plugin_api import OptionError
from pymta.policy.arc import ARCPolicy
from pymta.policy.dkim_sign import DKIMSign

PYMTA = str(Path(sys.executable).parent / "pymta")


def keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYMTA, "dkim", "keygen", *args], capture_output=True, text=True)


def test_keygen_as_in_the_readme(tmp_path):
    out = tmp_path / "dkim"
    out.mkdir()
    rsa_run = keygen("example.org", "2026r", "--out", str(out))
    ed_run = keygen("example.org", "2026e", "--ed25519", "--out", str(out))
    assert rsa_run.returncode == 0 and ed_run.returncode == 0, rsa_run.stderr + ed_run.stderr
    for selector, kind in (("2026r", "rsa"), ("2026e", "ed25519")):
        path = out / f"example.org.{selector}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = parse_private_key(path.read_bytes())
        run = rsa_run if kind == "rsa" else ed_run
        line = run.stdout.splitlines()[-1]
        assert line.startswith(f'{selector}._domainkey.example.org. IN TXT ( "v=DKIM1; k={kind}; p=')
        strings = re.findall(r'"([^"]*)"', line)
        assert all(len(s) <= 255 for s in strings)
        assert "".join(strings) == key.dns_record()
    assert parse_private_key((out / "example.org.2026r.key").read_bytes()).bits == 2048


def test_keygen_refuses_to_overwrite_and_bad_input(tmp_path, capsys):
    assert admin.main(["dkim", "keygen", "example.org", "s1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert admin.main(["dkim", "keygen", "example.org", "s1", "--ed25519",
                       "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == \
        f"pymta dkim: {tmp_path}/example.org.s1.key exists; remove it or choose another selector\n"
    assert admin.main(["dkim", "keygen", "example.org", "bad selector", "--out", str(tmp_path)]) == 1
    assert "is not a sequence of DNS labels" in capsys.readouterr().err
    assert admin.main(["dkim", "keygen", "example.org", "s2", "--bits", "1024",
                       "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "pymta dkim: --bits 1024: at least 2048\n"


def context(tmp_path) -> PluginContext:
    return PluginContext(hostname="mx.example.org", domains=("example.org",),
                         config_dir=str(tmp_path))


def key_file(tmp_path, name: str, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return name


def short_rsa_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pems():
    from pymta.dkim.keys import generate_key
    return {"rsa": generate_key(), "ed": generate_key(ed25519_key=True)}


def test_key_table_errors_name_the_entry(tmp_path, pems):
    good = key_file(tmp_path, "good.key", pems["rsa"])
    cases = [
        ([{"domain": "example.org", "selector": "s1", "key": key_file(tmp_path, "open.key",
                                                                      pems["rsa"], 0o644)}],
         "keys[0].key", "open.key is readable by every user; chmod 600 it"),
        ([{"domain": "example.org", "selector": "s1", "key": good},
          {"domain": "example.org", "selector": "s2", "key": key_file(tmp_path, "short.key",
                                                                      short_rsa_key())}],
         "keys[1].key", "RSA key of 1024 bits; at least 2048 are needed"),
        ([{"domain": "example.org", "selector": "a b", "key": good}],
         "keys[0].selector", "not a DNS label sequence: 'a b'"),
        ([{"domain": "example.org", "selector": "s1", "key": "missing.key"}],
         "keys[0].key", "cannot read"),
        ([{"domain": "example.org", "selector": "s1", "key": key_file(tmp_path, "junk.key",
                                                                      b"junk")}],
         "keys[0].key", "neither a PEM private key nor a base64 Ed25519 seed"),
        ([{"domain": "example.org", "selecter": "s1", "key": good}],
         "keys[0].selector", "required option missing"),
        ([], "keys", "expected a non-empty array"),
    ]
    for keys, where, problem in cases:
        with pytest.raises(OptionError) as e:
            DKIMSign({"keys": keys}, context(tmp_path))
        assert e.value.key == where and problem in e.value.problem, (where, str(e.value))


def test_sign_options(tmp_path, pems):
    rsa_file = key_file(tmp_path, "r.key", pems["rsa"])
    ed_file = key_file(tmp_path, "e.key", pems["ed"])
    table = [{"domain": "example.org", "selector": "r", "key": rsa_file},
             {"domain": "example.org", "selector": "e", "key": ed_file},
             {"domain": "lists.example.org", "selector": "l", "key": rsa_file}]
    plugin = DKIMSign({"keys": table}, context(tmp_path))
    assert [k.selector for k in plugin.keys_for("example.org")] == ["r", "e"]
    assert [k.selector for k in plugin.keys_for("news.example.org")] == ["r", "e"]
    assert [k.selector for k in plugin.keys_for("a.lists.example.org")] == ["l"]
    assert plugin.keys_for("example.net") == []
    strict = DKIMSign({"keys": table, "subdomains": False}, context(tmp_path))
    assert strict.keys_for("news.example.org") == []
    with pytest.raises(OptionError, match="must list 'from'"):
        DKIMSign({"keys": table, "headers": ["to", "subject"]}, context(tmp_path))
    with pytest.raises(OptionError, match="'received' must not be signed"):
        DKIMSign({"keys": table, "headers": ["from", "received"]}, context(tmp_path))
    oversigned = DKIMSign({"keys": table, "oversign": ["from", "to"], "expire": "7d"},
                          context(tmp_path))
    assert oversigned.options.expire == 7 * 86400
    fields = [(b"From", b"a"), (b"To", b"b"), (b"Received", b"x"), (b"Subject", b"s")]
    assert header_list(fields, oversigned.options) == [b"from", b"to", b"subject", b"from", b"to"]
    assert header_list(fields, SignOptions()) == [b"from", b"to", b"subject", b"from"]


def test_arc_seal_key_must_be_rsa(tmp_path, pems):
    ed_file = key_file(tmp_path, "e.key", pems["ed"])
    with pytest.raises(OptionError) as e:
        ARCPolicy({"seal": {"domain": "example.org", "selector": "a", "key": ed_file}},
                  PluginContext("mx.example.org", (), str(tmp_path), resolver=object()))
    assert (e.value.key, e.value.problem) == ("seal.key", f"{tmp_path}/e.key: ARC seals with RSA "
                                                          "keys only")


def test_dkimpys_ed25519_key_format_is_read():
    """dknewkey writes an Ed25519 key as its 32-byte seed in base64."""
    import base64
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    parsed = parse_private_key(base64.b64encode(seed) + b"\n")
    assert parsed.algorithm == "ed25519-sha256" and parsed.dkimpy_key == base64.b64encode(seed)


def test_the_documented_etc_tables_load(tmp_path, pems):
    """The commented DKIM, DMARC and ARC tables of etc/pymta.toml, uncommented, load."""
    from twisted.internet.testing import MemoryReactor

    from pymta.config.loader import load_config
    from pymta.policy.dkim_verify import DKIMVerify
    from pymta.policy.dmarc import DMARCPolicy

    text = (Path(__file__).resolve().parent.parent / "etc" / "pymta.toml").read_text()
    start = text.index("# --- DKIM, DMARC and ARC")
    end = text.index("# [backends.NAME]", start)
    lines = []
    for line in text[start:end].splitlines():
        if re.match(r"# (\[plugins\.\w+\]|[a-z_]+ = |  \{ |\])", line):
            lines.append(line[2:])
    tables = "\n".join(lines)
    assert tables.count("[plugins.") == 4
    suffix_list = re.search(r'public_suffix_list = "([^"]+)"', tables)[1]
    if not os.path.exists(suffix_list):          # Debian's publicsuffix package absent
        tables = tables.replace(f'public_suffix_list = "{suffix_list}"', "")
    (tmp_path / "dkim").mkdir()
    key_file(tmp_path, "dkim/example.org.2026r.key", pems["rsa"])
    key_file(tmp_path, "dkim/example.org.2026e.key", pems["ed"])
    config_file = tmp_path / "pymta.toml"
    config_file.write_text('[server]\nhostname = "mx.example.org"\n[spool]\ndirectory = "spool"\n'
                           '[stages]\ndata = ["dkim_sign", "dkim_verify", "dmarc", "arc", '
                           '"authres"]\n' + tables)
    config = load_config(str(config_file), MemoryReactor())
    kinds = [type(p.obj) for p in config.stages["data"]]
    assert kinds[:4] == [DKIMSign, DKIMVerify, DMARCPolicy, ARCPolicy]
    signer = config.stages["data"][0].obj
    assert [k.selector for k in signer.keys] == ["2026r", "2026e"]
    assert signer.options.expire == 7 * 86400
    assert config.stages["data"][3].obj.seal.selector == "2026r"
