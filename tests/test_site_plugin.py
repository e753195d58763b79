"""The example site plugin etc/plugins/vip_tag.py, called directly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor
from zope.interface.verify import verifyObject

import pymta.plugins
from pymta.config.errors import ConfigError, OptionError
from pymta.config.loader import load_config
from pymta.config.options import PluginContext
from pymta.interfaces import IMessageFilter, IRecipientPolicy
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Kind, Verdict

ETC = Path(__file__).resolve().parent.parent / "etc"
SESSION = Session(client_ip="192.0.2.1", client_port=40000)


def load_example_module():
    spec = importlib.util.spec_from_file_location("vip_tag_example", ETC / "plugins" / "vip_tag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vip_tag = load_example_module()


@pytest.fixture
def etc_context():
    return PluginContext("mx.example.org", ("example.org",), str(ETC))


class FakeMessage:
    size = 0

    def headers(self):
        return []


def tag(plugin, sender: str) -> Verdict:
    return plugin.check_message(SESSION, Transaction(sender=sender), FakeMessage())


def test_vip_sender_gets_the_header(etc_context):
    plugin = vip_tag.VipTagger({"senders": "vip-senders"}, etc_context)
    assert verifyObject(IMessageFilter, plugin)
    verdict = tag(plugin, "ceo@example.org")
    assert verdict.kind is Kind.DUNNO          # later filters still run
    assert verdict.headers == (("X-VIP", "yes"),)
    assert tag(plugin, "CEO@Example.ORG").headers == (("X-VIP", "yes"),)
    assert tag(plugin, "board@example.com").headers == (("X-VIP", "yes"),)   # line with a comment


def test_other_senders_get_nothing(etc_context):
    plugin = vip_tag.VipTagger({"senders": "vip-senders"}, etc_context)
    assert tag(plugin, "intern@example.org") is DUNNO
    assert tag(plugin, "") is DUNNO            # the null sender (bounces)


def test_senders_file_relative_to_config_dir(tmp_path):
    (tmp_path / "vips").write_text("# nobody else\nvip@example.org\n")
    plugin = vip_tag.VipTagger({"senders": "vips"}, PluginContext("h", (), str(tmp_path)))
    assert plugin.senders_file == str(tmp_path / "vips")
    assert plugin.senders == {"vip@example.org"}


@pytest.mark.parametrize("options, file_text, key, problem", [
    ({}, None, "senders", "required option missing"),
    ({"senders": "missing"}, None, "senders", "cannot read "),
    ({"senders": "vips", "sender": "x"}, "a@b\n", "sender", "unknown key (did you mean 'senders'?)"),
    ({"senders": 3}, None, "senders", "expected a string, got integer 3"),
    ({"senders": "vips"}, "ok@example.org\nnot an address\n", "senders",
     "line 2: expected one address (user@domain) per line, got 'not an address'"),
])
def test_vip_option_errors(tmp_path, options, file_text, key, problem):
    if file_text is not None:
        (tmp_path / "vips").write_text(file_text)
    with pytest.raises(OptionError) as info:
        vip_tag.VipTagger(options, PluginContext("h", (), str(tmp_path)))
    assert info.value.key == key and problem in info.value.problem


def test_blocked_recipients(tmp_path):
    (tmp_path / "blocked").write_text("old-ceo@example.org  # left\n")
    plugin = vip_tag.BlockedRecipients({"file": "blocked"}, PluginContext("h", (), str(tmp_path)))
    assert verifyObject(IRecipientPolicy, plugin)
    verdict = plugin.check_recipient(SESSION, Transaction(sender="x@example.com"), "Old-CEO@example.org")
    assert verdict == Verdict.reject("<Old-CEO@example.org>: Recipient address rejected: Access denied",
                                     550, "5.7.1")
    assert plugin.check_recipient(SESSION, Transaction(sender=""), "ceo@example.org") is DUNNO


@pytest.fixture
def restore_import_state():
    saved_path = list(sys.path)
    saved_plugin_path = list(pymta.plugins.__path__)
    yield
    sys.path[:] = saved_path
    pymta.plugins.__path__[:] = saved_plugin_path
    sys.modules.pop("vip_tag", None)


def test_loaded_through_the_config_with_both_examples(tmp_path, restore_import_state):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "vip_tag.py").write_bytes((ETC / "plugins" / "vip_tag.py").read_bytes())
    (tmp_path / "vips").write_text("vip@example.org\n")
    (tmp_path / "blocked").write_text("gone@example.org\n")
    (tmp_path / "pymta.toml").write_text("""
[server]
domains = ["example.org"]
plugin_path = ["plugins"]
[stages]
rcpt = ["blocked", "localdomain"]
data = ["vip"]
[plugins.vip]
use = "vip_tag:VipTagger"
senders = "vips"
[plugins.blocked]
use = "vip_tag:BlockedRecipients"
file = "blocked"
""")
    config = load_config(str(tmp_path / "pymta.toml"), MemoryReactor())
    blocked, localdomain = (p.obj for p in config.stages["rcpt"])
    assert blocked.check_recipient(SESSION, None, "gone@example.org").kind is Kind.REJECT
    vip = config.stages["data"][0].obj
    assert tag(vip, "vip@example.org").headers == (("X-VIP", "yes"),)


def test_bad_option_is_reported_with_file_and_table(tmp_path, restore_import_state):
    (tmp_path / "pymta.toml").write_text(f"""
[server]
plugin_path = ["{ETC / 'plugins'}"]
[stages]
data = ["vip"]
[plugins.vip]
use = "vip_tag:VipTagger"
sendres = "vip-senders"
""")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "pymta.toml"), MemoryReactor())
    assert str(info.value) == (f"{tmp_path / 'pymta.toml'}: plugins.vip.senders: required option "
                               "missing (is 'sendres' a misspelling of it?)")
