"""The sender-authentication plugins through the config loader, and the etc/ example tables."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

from pymta.config.errors import ConfigError
from pymta.config.loader import load_config
from pymta.policy.authres import AuthenticationResults
from pymta.policy.dnsbl import DNSBL
from pymta.policy.greylist import Greylist
from pymta.policy.ratelimit import RateLimit
from pymta.policy.spf import SPFPolicy

ETC = Path(__file__).resolve().parent.parent / "etc" / "pymta.toml"

STAGES = """
[stages]
connect = ["ratelimit", "dnsbl"]
helo = ["spf"]
mail = ["ratelimit", "spf"]
rcpt = ["ratelimit", "localdomain"]
data = ["spf", "authres"]
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "pymta.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(str(path), MemoryReactor()), path


def documented_tables() -> str:
    """The commented-out plugin tables of the sender-authentication part of etc/pymta.toml."""
    text = ETC.read_text()
    start = text.index("# --- Sender authentication")
    end = min(text.index("# [backends.NAME]", start), text.index("# --- DKIM", start))
    lines = []
    for line in text[start:end].splitlines():
        match = re.match(r"# (\[plugins\.\w+\]|[a-z_]+ = .*)$", line)
        if match:
            lines.append(match.group(1))
    return "\n".join(lines)


def test_documented_example_tables_load(tmp_path):
    tables = documented_tables()
    assert tables.count("[plugins.") == 5          # ratelimit, dnsbl, spf, authres, greylist
    config, _ = load(tmp_path, '[server]\nhostname = "mx.example.org"\n[spool]\ndirectory = "spool"\n'
                     + STAGES.replace('rcpt = ["ratelimit", ', 'rcpt = ["ratelimit", "greylist", ')
                     + tables)
    kinds = {stage: [type(p.obj) for p in config.stages[stage]]
             for stage in ("connect", "helo", "mail", "rcpt", "data")}
    assert kinds == {"connect": [RateLimit, DNSBL], "helo": [SPFPolicy], "mail": [RateLimit, SPFPolicy],
                     "rcpt": [RateLimit, Greylist, kinds["rcpt"][2]],
                     "data": [SPFPolicy, AuthenticationResults]}
    spf = config.stages["helo"][0].obj
    assert spf is config.stages["mail"][1].obj is config.stages["data"][0].obj   # one instance
    assert spf.checker.lookup is config.resolver                                # the shared resolver
    assert spf.actions["fail"] == "reject_if_minus_all" and spf.receiver == "mx.example.org"
    assert config.stages["connect"][1].obj.zones[0].name == "zen.spamhaus.org"


def test_short_names_without_tables(tmp_path):
    config, _ = load(tmp_path, """
        [spool]
        directory = "spool"
        [stages]
        helo = ["spf"]
        mail = ["spf"]
        data = ["spf", "authres"]
        """)
    assert isinstance(config.stages["mail"][0].obj, SPFPolicy)


@pytest.mark.parametrize("extra, key, problem", [
    ('[stages]\nmail = ["spf"]\n[plugins.spf]\non_fail = "bounce"\n', "plugins.spf.on_fail",
     "expected one of 'reject_if_minus_all', 'reject', 'defer', 'accept', got string 'bounce'"),
    ('[stages]\nmail = ["spf"]\n[plugins.spf]\ntimeout = "soon"\n', "plugins.spf.timeout", ""),
    ('[stages]\nrcpt = ["spf"]\n', "stages.rcpt[0]", "does not provide IRecipientPolicy"),
    ('[stages]\nconnect = ["dnsbl"]\n', "plugins.dnsbl.zones", "required option missing"),
    ('[stages]\nconnect = ["bl"]\n[plugins.bl]\nuse = "dnsbl"\nzones = [{zone = "x.example", codes = ["x"]}]\n',
     "plugins.bl.zones[0].codes[0]", "not an IPv4 address or network"),
    ('[stages]\nconnect = ["ratelimit"]\n[plugins.ratelimit]\nwindow = "-1m"\n',
     "plugins.ratelimit.window", ""),
    ('[stages]\ndata = ["authres"]\n[plugins.authres]\nauthserv_id = "a b"\n',
     "plugins.authres.authserv_id", "not a valid authserv-id"),
])
def test_config_errors_name_the_key(tmp_path, extra, key, problem):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[spool]\ndirectory = "spool"\n' + extra)
    message = str(info.value)
    assert f": {key}: " in message and problem in message and "\n" not in message
