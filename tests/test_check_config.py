"""``pymta check-config`` and ``pymta plugins``, run as an administrator runs them.

check-config loads a file as start-up does: the tests compare its error line
with the one ``twistd pymta`` prints for the same file, and read the
effective configuration it prints back with ``tomllib`` and the real loader.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, TWISTD

PYMTA = str(Path(sys.executable).parent / "pymta")


def pymta(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYMTA, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def startup_error(config: Path) -> subprocess.CompletedProcess:
    """What ``twistd pymta`` says about ``config`` when it refuses to start."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(config)],
                          capture_output=True, text=True, cwd=config.parent, timeout=60)


@pytest.fixture
def etc(tmp_path) -> Path:
    """A copy of etc/ (the example config, its site plugin and map files)."""
    shutil.copytree(ROOT / "etc", tmp_path / "etc")
    return tmp_path / "etc"


def test_example_config_checks_and_prints_every_default(etc):
    result = pymta("check-config", str(etc / "pymta.toml"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = tomllib.loads(result.stdout)
    # given in the file
    assert printed["server"]["hostname"] == "mx.example.org"
    assert printed["stages"]["rcpt"] == ["aliases", "localdomain"]
    # defaults filled in, by the loader and by the plugins themselves
    assert printed["limits"]["plugin_timeout"] == "30s"
    assert printed["dns"]["failure_ttl"] == "30s"
    assert printed["listeners"][0]["proxy_timeout"] == "5s"
    assert printed["listeners"][0]["require_auth"] is False
    assert printed["plugins"]["localdomain"] == {"use": "localdomain", "recipient_delimiter": "+"}
    assert printed["plugins"]["aliases"]["unmatched"] == "reject"
    assert printed["backends"]["relay"]["quit_timeout"] == "1m"
    # paths as the server uses them
    assert printed["plugins"]["vip"]["senders"] == str(etc / "vip-senders")
    assert printed["spool"]["directory"] == str(etc.parent / "var" / "spool")
    assert [r["backend"] for r in printed["routes"]] == ["mbox", "local", "local", "mbox"]


def test_printed_configuration_loads_to_the_same_configuration(etc):
    first = pymta("check-config", str(etc / "pymta.toml"))
    again = etc / "effective.toml"
    again.write_text(first.stdout)
    second = pymta("check-config", str(again))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]


def test_diff_shows_only_what_differs_from_the_defaults(etc):
    result = pymta("check-config", "--diff", str(etc / "pymta.toml"))
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["server"] == {"hostname": "mx.example.org",
                                 "domains": ["example.org", "example.net", "localhost"],
                                 "plugin_path": [str(etc / "plugins")]}
    assert "limits" not in printed and "dns" not in printed and "queue" not in printed
    assert printed["stages"] == {"rcpt": ["aliases", "localdomain"], "data": ["vip"]}
    # the example sets relay's options to their defaults: only its use is left
    assert printed["backends"]["relay"] == {"use": "relay"}
    assert printed["backends"]["provider"] == {"use": "smarthost",
                                               "host": "smtp.provider.example:587",
                                               "tls": "encrypt"}
    assert printed["plugins"]["aliases"] == {"use": "aliasmap", "file": str(etc / "aliases"),
                                             "domains": ["example.net"]}
    assert "localdomain" not in printed["plugins"]     # its table only repeats the default


def test_diff_of_a_file_that_sets_nothing_is_empty(tmp_path):
    config = tmp_path / "pymta.toml"
    config.write_text('[limits]\nmax_errors = 20\nidle_timeout = "300"\n')
    result = pymta("check-config", "--diff", str(config))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout) == {}
    full = tomllib.loads(pymta("check-config", str(config)).stdout)
    assert full["limits"]["idle_timeout"] == "5m"
    assert full["listeners"] == [{"name": "mx", "endpoint": "tcp:2525:interface=127.0.0.1",
                                  "role": "mx", "starttls": False, "auth": False,
                                  "auth_plaintext": False, "require_tls": False,
                                  "require_auth": False, "proxy_protocol": False,
                                  "proxy_networks": [], "proxy_timeout": "5s"}]


def test_inline_secrets_are_not_printed(tmp_path):
    config = tmp_path / "pymta.toml"
    config.write_text(textwrap.dedent("""\
        [server]
        domains = ["example.org"]
        [backends.local]
        use = "maildir"
        base = "mail"
        [backends.provider]
        use = "smarthost"
        host = "smtp.provider.example:587"
        username = "mx@example.org"
        password = "s3cret-Passw0rd"
        [[routes]]
        match = "example.org"
        backend = "local"
        [[routes]]
        match = "*"
        backend = "provider"
        """))
    for args in (["check-config"], ["check-config", "--diff"]):
        result = pymta(*args, str(config))
        assert result.returncode == 0, result.stderr
        assert "s3cret" not in result.stdout
        assert '# password = "********" (a secret: not shown)' in result.stdout
        assert tomllib.loads(result.stdout)["backends"]["provider"]["username"] == "mx@example.org"


BROKEN_PLUGIN = '''\
from zope.interface import implementer
from pymta.plugin_api import IRecipientPolicy


@implementer(IRecipientPolicy)
class NoMethod:
    """Declares the interface but has no check_recipient."""

    def __init__(self, options, context):
        pass
'''


def _unreadable(path: Path) -> None:
    """A file the loader cannot read (as root a directory stands in for it: root reads any file)."""
    if os.geteuid() == 0:
        path.mkdir()
    else:
        path.write_text("alice@example.org: bob@example.org\n")
        path.chmod(0)


ERRORS = {
    "bad key": ("[limits]\nmax_recipents = 5\n",
                "limits.max_recipents: unknown key (did you mean 'max_recipients'?)"),
    "bad type": ('[limits]\nmax_recipients = "many"\n',
                 "limits.max_recipients: expected an integer, got string 'many'"),
    "unknown plugin": ('[stages]\nrcpt = ["aliasmapp"]\n',
                       "stages.rcpt[0]: unknown plugin 'aliasmapp' (did you mean 'aliasmap'?)"),
    "verifyObject": ('[server]\nplugin_path = ["plugins"]\n[stages]\nrcpt = ["broken"]\n'
                     '[plugins.broken]\nuse = "broken_site:NoMethod"\n',
                     "plugins.broken: plugin 'broken_site:NoMethod' does not provide "
                     "IRecipientPolicy: The check_recipient attribute was not provided"),
    "unreadable file": ('[stages]\nrcpt = ["aliases"]\n[plugins.aliases]\nuse = "aliasmap"\n'
                        'file = "aliases"\n', "plugins.aliases.file: cannot read "),
}


@pytest.mark.parametrize("kind", ERRORS)
def test_each_kind_of_error_is_the_startup_line(tmp_path, kind):
    text, problem = ERRORS[kind]
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "broken_site.py").write_text(BROKEN_PLUGIN)
    _unreadable(tmp_path / "aliases")
    config = tmp_path / "pymta.toml"
    config.write_text(text + f'[spool]\ndirectory = "{tmp_path / "spool"}"\n')
    result = pymta("check-config", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"pymta: configuration error: {config}: {problem}"), line
    started = startup_error(config)
    assert started.returncode == 1
    assert line in started.stderr.splitlines()
    assert not (tmp_path / "spool").exists()


def test_missing_config_file(tmp_path):
    result = pymta("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert result.stderr == f"pymta: configuration error: {tmp_path / 'nope.toml'}: config file: no such file\n"


# -- pymta plugins ---------------------------------------------------------------------

def blocks(text: str) -> dict[str, str]:
    """The listing as {plugin name: its block}."""
    found: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.startswith(" "):
            name = line.split(": ", 1)[0]
            found[name] = ""
        found[name] += line + "\n"
    return found


def test_plugins_lists_every_short_name():
    result = pymta("plugins")
    assert result.returncode == 0, result.stderr
    listed = blocks(result.stdout)
    for name in ("localdomain", "static", "aliasmap", "maildir", "mbox", "relay", "smarthost",
                 "passwdfile", "sender_login", "spf", "authres", "dnsbl", "ratelimit"):
        assert name in listed
    spf = listed["spf"]
    assert "interfaces: IHeloPolicy, IMessageFilter, ISenderPolicy" in spf
    assert f"source:     {ROOT / 'pymta' / 'policy' / 'spf.py'}" in spf
    assert "used by" not in spf                        # no config given


SITE_DROP_IN = '''\
from pymta.plugins.builtin import PluginRegistration

vip_tagger = PluginRegistration("viptag", "vip_tag:VipTagger", "The example VIP tagger, by short name")
'''


def test_plugins_with_a_config_names_its_users(etc):
    # a drop-in short name on the config's plugin_path, beside the example's dotted path
    (etc / "plugins" / "pymta" / "plugins").mkdir(parents=True)
    (etc / "plugins" / "pymta" / "plugins" / "site_names.py").write_text(SITE_DROP_IN)
    config = etc / "pymta.toml"
    config.write_text(config.read_text().replace(
        'data = ["vip"]', 'data = ["vip", "tagger"]\nmail = ["tagger"]').replace(
        "[plugins.vip]\n", '[plugins.tagger]\nuse = "viptag"\nsenders = "vip-senders"\n\n[plugins.vip]\n'))
    config.write_text(config.read_text().replace("mail = []", ""))
    result = pymta("plugins", "--config", str(config))
    assert result.returncode == 1
    assert "plugins.tagger: plugin 'viptag' does not provide ISenderPolicy" in result.stderr

    config.write_text(config.read_text().replace('mail = ["tagger"]', ""))
    result = pymta("plugins", "--config", str(config))
    assert result.returncode == 0, result.stderr
    listed = blocks(result.stdout)
    dotted = listed["vip_tag:VipTagger"]
    assert "interfaces: IMessageFilter" in dotted
    assert f"source:     {etc / 'plugins' / 'vip_tag.py'}" in dotted
    assert "used by:    plugins.vip (stages data)" in dotted
    short = listed["viptag"]
    assert "The example VIP tagger, by short name" in short
    assert "factory:    vip_tag:VipTagger" in short
    assert "used by:    plugins.tagger (stages data)" in short
    assert "used by:    plugins.aliases (stages rcpt)" in listed["aliasmap"]
    assert "used by:    backends.local" in listed["maildir"]
    assert "used by:    backends.provider" in listed["smarthost"]
    assert "used by:    -" in listed["spf"]


# -- every README snippet: the printed configuration loads to the same one ---------------

from test_readme_snippets import (SNIPPETS, complete, isolated_import_state,  # noqa: E402,F401
                                  sockets_from_systemd, workspace)


@pytest.mark.parametrize("line, snippet", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_effective_configuration_of_each_readme_snippet_round_trips(tmp_path, line, snippet):
    from twisted.internet.testing import MemoryReactor

    from pymta.config.effective import effective_document, load_recorded
    from pymta.config.toml_text import dumps

    config_file = workspace(tmp_path)
    config_file.write_text(complete(snippet, tmp_path / "spool"), encoding="utf-8")
    printed = {}
    for changed_only in (False, True):
        config, recorder = load_recorded(str(config_file), MemoryReactor())
        printed[changed_only] = dumps(effective_document(config, recorder, changed_only=changed_only))
        tomllib.loads(printed[changed_only])
    (tmp_path / "elsewhere").mkdir()
    # the full configuration means the same wherever it is; the --diff one beside the
    # original (the defaults it leaves out may be paths relative to the config file)
    for changed_only, again in ((False, tmp_path / "elsewhere" / "effective.toml"),
                                (True, tmp_path / "diff.toml")):
        again.write_text(printed[changed_only])
        config, recorder = load_recorded(str(again), MemoryReactor())
        assert dumps(effective_document(config, recorder)) == printed[False]


URL_PLUGIN = '''\
from zope.interface import implementer
from pymta.plugin_api import IRecipientPolicy, Options


@implementer(IRecipientPolicy)
class Lookup:
    def __init__(self, options, context):
        opts = Options(options)
        self.url = opts.str("url")
        self.api_token = opts.str("api_token", default="")
        opts.finish()

    def check_recipient(self, session, transaction, recipient):
        return None
'''


def test_passwords_in_urls_and_secret_options_of_site_plugins_are_hidden(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "lookup_site.py").write_text(URL_PLUGIN)
    config = tmp_path / "pymta.toml"
    config.write_text(textwrap.dedent("""\
        [server]
        plugin_path = ["plugins"]
        [stages]
        rcpt = ["lookup", "localdomain"]
        [plugins.lookup]
        use = "lookup_site:Lookup"
        url = "redis://pymta:Very-Secret1@db.example.org:6379/0"
        api_token = "tok-12345"
        """))
    result = pymta("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "Very-Secret1" not in result.stdout and "tok-12345" not in result.stdout
    lookup = tomllib.loads(result.stdout)["plugins"]["lookup"]
    assert lookup == {"use": "lookup_site:Lookup", "url": "redis://pymta:********@db.example.org:6379/0"}
    assert '# api_token = "********" (a secret: not shown)' in result.stdout
