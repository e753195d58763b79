"""The TOML config loader: defaults, etc/pymta.toml, every error, plugin discovery."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

import pymta.plugins
from pymta.config.durations import format_duration, parse_duration
from pymta.config.errors import ConfigError, OptionError
from pymta.config.loader import default_config, load_config
from pymta.config.model import Limits, Listener, Retry, Route
from pymta.config.options import Options, PluginContext
from pymta.config.plugins import discover_plugins
from pymta.delivery.maildir import MaildirBackend
from pymta.delivery.mbox import MboxBackend
from pymta.policy.recipients import AliasMap, LocalDomainRecipients, StaticRecipients
from pymta.delivery.scheduler import DeliveryScheduler
from pymta.spool.writer import MEMORY_BODY_LIMIT
from pymta.tap import build_service

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"
from pymta.plugins import builtin as _builtin  # noqa: E402

# every short name pymta ships with (other issues keep adding some)
BUILTIN_NAMES = sorted(v.name for v in vars(_builtin).values()
                       if isinstance(v, _builtin.PluginRegistration))


@pytest.fixture(autouse=True)
def isolated_import_state(tmp_path):
    """Undo what loading a config does to sys.path, the plugin package path and sys.modules."""
    saved_path = list(sys.path)
    saved_plugin_path = list(pymta.plugins.__path__)
    saved_modules = set(sys.modules)
    yield
    sys.path[:] = saved_path
    pymta.plugins.__path__[:] = saved_plugin_path
    for name in set(sys.modules) - saved_modules:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if module_file.startswith(str(tmp_path)) or module_file.startswith(str(ETC)):
            del sys.modules[name]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str):
    return load_config(str(write(tmp_path / "pymta.toml", text)), MemoryReactor())


def config_error(tmp_path: Path, text: str, key: str, problem: str) -> str:
    """Load ``text``; assert a one-line ConfigError '<file>: <key>: ...<problem>...'."""
    path = write(tmp_path / "pymta.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), MemoryReactor())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message, message
    assert info.value.source == str(path) and info.value.key == key
    return message


# -- defaults ---------------------------------------------------------------

def test_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = default_config(MemoryReactor())
    assert config.source == "<embedded default>"
    assert config.hostname == socket.getfqdn()
    assert config.domains == ("localhost",)
    assert config.listeners == (Listener("mx", "tcp:2525:interface=127.0.0.1", "mx"),)
    assert config.spool_dir == str(tmp_path / "var" / "spool")
    assert config.spool_sync == "fsync"
    assert config.spool_memory_limit == MEMORY_BODY_LIMIT == 64 * 1024
    assert config.spool_disk_work == "process"
    assert config.limits == Limits() and config.retry == Retry()
    assert config.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                       ipaddress.ip_network("::1/128"))
    assert config.is_trusted("127.0.0.1") and config.is_trusted("::1")
    assert not config.is_trusted("192.0.2.1")
    assert set(config.stages) == {"auth", "connect", "helo", "mail", "rcpt", "data"}
    assert [p.name for p in config.stages["rcpt"]] == ["localdomain"]
    assert isinstance(config.stages["rcpt"][0].obj, LocalDomainRecipients)
    assert all(config.stages[s] == () for s in ("auth", "connect", "helo", "mail", "data"))
    assert list(config.backends) == ["local"]
    assert isinstance(config.backends["local"], MaildirBackend)
    assert config.backends["local"].base == str(tmp_path / "var" / "mail")
    assert config.routes == (Route("localhost", "local"),)
    assert config.route_for("alice@localhost") == "local"


def test_empty_file_takes_defaults_relative_to_its_directory(tmp_path):
    config = load(tmp_path / "conf", "")
    assert config.source == str(tmp_path / "conf" / "pymta.toml")
    assert config.spool_dir == str(tmp_path / "conf" / "var" / "spool")
    assert config.backends["local"].base == str(tmp_path / "conf" / "var" / "mail")
    assert config.limits == Limits()


def test_values_are_read(tmp_path):
    config = load(tmp_path, """
        [server]
        hostname = "MX.Example.ORG"
        domains = ["Example.ORG", "bücher.example", "example.org."]
        trusted_networks = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
        [spool]
        directory = "/srv/spool"
        sync = "syncfs"
        [[listeners]]
        endpoint = "tcp:25"
        [[listeners]]
        name = "sub"
        endpoint = "tcp6:587:interface=\\\\:\\\\:1"
        role = "mx"
        [limits]
        max_recipients = 50
        idle_timeout = "2m"
        data_timeout = 90
        bare_newlines = "reject"
        pregreet_wait = 1.5
        [queue]
        retry_initial = "1m"
        retry_max = "1h"
        lifetime = "2d"
        concurrency = 3
    """)
    assert config.hostname == "mx.example.org"
    assert config.domains == ("example.org", "xn--bcher-kva.example")
    assert config.is_trusted("192.0.2.99") and config.is_trusted("2001:db8::5")
    assert config.is_trusted("198.51.100.7") and not config.is_trusted("198.51.100.8")
    assert config.spool_dir == "/srv/spool" and config.spool_sync == "syncfs"
    assert config.listeners == (Listener("listener-0", "tcp:25", "mx"),
                                Listener("sub", "tcp6:587:interface=\\:\\:1", "mx"))
    assert config.limits == Limits(max_recipients=50, idle_timeout=120.0, data_timeout=90.0,
                                   bare_newlines="reject", pregreet_wait=1.5)
    assert config.retry == Retry(initial=60.0, maximum=3600.0, lifetime=172800.0, concurrency=3)
    assert config.routes == (Route("example.org", "local"), Route("xn--bcher-kva.example", "local"))


def test_example_config_loads(tmp_path):
    config = load_config(str(ETC / "pymta.toml"), MemoryReactor())
    assert config.domains == ("example.org", "example.net", "localhost")
    assert [p.name for p in config.stages["rcpt"]] == ["aliases", "localdomain"]
    assert isinstance(config.stages["rcpt"][0].obj, AliasMap)
    assert [(p.name, p.use, type(p.obj).__name__) for p in config.stages["data"]] == [
        ("vip", "vip_tag:VipTagger", "VipTagger")]
    assert isinstance(config.backends["local"], MaildirBackend)
    assert isinstance(config.backends["mbox"], MboxBackend)
    assert config.route_for("bob@example.org") == "mbox"
    assert config.route_for("alice@example.org") == "local"
    assert config.route_for("alice@example.net") == "local"
    assert config.route_for("root@localhost") == "mbox"
    assert config.route_for("someone@elsewhere.example") is None
    assert "interface=127.0.0.1" in config.listeners[0].endpoint
    assert int(config.listeners[0].endpoint.split(":")[1]) >= 1024


def test_example_config_documents_every_key():
    text = (ETC / "pymta.toml").read_text(encoding="utf-8")
    keys = {"hostname", "domains", "trusted_networks", "plugin_path", "directory", "sync",
            "memory_limit", "disk_work",
            "name", "endpoint", "role", "retry_initial", "retry_max", "lifetime", "concurrency",
            "connect", "helo", "mail", "rcpt", "data", "use", "match", "backend",
            "file", "recipient_delimiter", "unmatched", "addresses", "senders", "base",
            "auth", "starttls", "auth_plaintext", "require_tls", "require_auth",
            "certificate", "key", "chain", "min_version", "ciphers"}
    keys |= {f.name for f in __import__("dataclasses").fields(Limits)}
    missing = [k for k in sorted(keys) if not re.search(rf"^#? ?{k} = ", text, re.MULTILINE)]
    assert missing == []
    for table in ("[server]", "[spool]", "[[listeners]]", "[limits]", "[queue]", "[stages]",
                  "[plugins.", "[backends.", "[[routes]]"):
        assert table in text


class ThreadedMemoryReactor(MemoryReactor):
    """A MemoryReactor that lends the spool an (unstarted) thread pool."""

    def getThreadPool(self) -> ThreadPool:
        return ThreadPool(0, 1, "test")


@pytest.mark.parametrize("setting, expected", [
    ("", MEMORY_BODY_LIMIT), ("memory_limit = 0", 0), ("memory_limit = 1048576", 1048576)])
def test_spool_memory_limit_reaches_the_spool(tmp_path, setting, expected):
    path = write(tmp_path / "pymta.toml", f"[spool]\ndirectory = 'spool'\n{setting}\n")
    reactor = ThreadedMemoryReactor()
    config = load_config(str(path), reactor)
    assert config.spool_memory_limit == expected
    service = build_service(config, reactor)
    [scheduler] = [s for s in service if isinstance(s, DeliveryScheduler)]
    assert scheduler.spool.directory == str(tmp_path / "spool")
    assert scheduler.spool.memory_limit == expected


@pytest.mark.parametrize("setting, in_a_process", [
    ("", True), ("disk_work = 'process'", True), ("disk_work = 'threads'", False)])
def test_spool_disk_work_chooses_the_worker_process_or_threads(tmp_path, setting, in_a_process):
    path = write(tmp_path / "pymta.toml", f"[spool]\ndirectory = 'spool'\n{setting}\n")
    reactor = ThreadedMemoryReactor()
    service = build_service(load_config(str(path), reactor), reactor)
    [scheduler] = [s for s in service if isinstance(s, DeliveryScheduler)]
    assert (scheduler.spool._worker is not None) is in_a_process
    assert service.worker is scheduler.spool._worker


@pytest.mark.parametrize("setting, in_a_process", [("", True), ("disk_work = 'threads'", False)])
def test_the_local_backends_are_given_the_disk_worker(tmp_path, setting, in_a_process):
    path = write(tmp_path / "pymta.toml", f"[spool]\ndirectory = 'spool'\n{setting}\n")
    reactor = ThreadedMemoryReactor()
    config = load_config(str(path), reactor)
    service = build_service(config, reactor)
    [backend] = config.backends.values()                    # the default maildir
    assert backend._worker is (service.worker if in_a_process else None)


# -- durations and options ----------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (30, 30.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0),
    ("5d", 432000.0), ("1w", 604800.0), ("1h30m", 5400.0), (" 2M ", 120.0), (0, 0.0)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "-5s", "5x", -1, True, [5], "1.2.3s"])
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_format_duration():
    assert [format_duration(s) for s in (300, 90, 3600, 432000, 1.5)] == ["5m", "90s", "1h", "5d", "1.5s"]


def test_options_reader(tmp_path):
    context = PluginContext("mx.example.org", ("example.org",), str(tmp_path))
    opts = Options({"file": "x/y", "n": 3, "on": True, "wait": "5m", "names": ["a"], "ratio": 2})
    assert opts.path("file", context) == str(tmp_path / "x" / "y")
    assert opts.int("n", minimum=1) == 3
    assert opts.bool("on") is True
    assert opts.duration("wait") == 300.0
    assert opts.list_str("names") == ["a"]
    assert opts.float("ratio") == 2.0
    assert opts.str("absent", default="dflt") == "dflt"
    assert opts.path("absent_path", context, default="rel") == str(tmp_path / "rel")
    opts.finish()


@pytest.mark.parametrize("options, read, key, problem", [
    ({}, lambda o: o.str("file"), "file", "required option missing"),
    ({"n": "abc"}, lambda o: o.int("n"), "n", "expected an integer, got string 'abc'"),
    ({"n": True}, lambda o: o.int("n"), "n", "expected an integer, got boolean true"),
    ({"n": 0}, lambda o: o.int("n", minimum=1), "n", "must be at least 1, got 0"),
    ({"n": 9}, lambda o: o.int("n", maximum=5), "n", "must be at most 5, got 9"),
    ({"x": 1}, lambda o: o.float("x", above=1), "x", "must be greater than 1, got 1"),
    ({"b": "yes"}, lambda o: o.bool("b"), "b", "expected true or false, got string 'yes'"),
    ({"s": 5}, lambda o: o.str("s"), "s", "expected a string, got integer 5"),
    ({"s": ""}, lambda o: o.str("s"), "s", "must not be empty"),
    ({"s": "c"}, lambda o: o.str("s", choices=("a", "b")), "s", "expected one of 'a', 'b', got string 'c'"),
    ({"l": "a"}, lambda o: o.list_str("l"), "l", "expected an array of strings, got string 'a'"),
    ({"l": ["a", 2]}, lambda o: o.list_str("l"), "l[1]", "expected a string, got integer 2"),
    ({"d": "soon"}, lambda o: o.duration("d"), "d", "expected a duration"),
    ({"d": "0s"}, lambda o: o.duration("d", above=0), "d", "must be greater than 0s, got 0s"),
])
def test_options_errors(options, read, key, problem):
    with pytest.raises(OptionError) as info:
        read(Options(options))
    assert info.value.key == key
    assert problem in info.value.problem


def test_options_finish_names_unknown_key_with_suggestion():
    opts = Options({"file": "a", "recipient_delimter": "+"})
    opts.str("file")
    opts.str("recipient_delimiter", default="+")
    with pytest.raises(OptionError) as info:
        opts.finish()
    assert info.value.key == "recipient_delimter"
    assert info.value.problem == ("unknown key (did you mean 'recipient_delimiter'?); "
                                  "known keys: file, recipient_delimiter")


# -- file-level errors --------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config file: no such file")):
        load_config(str(path), MemoryReactor())


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="config file: is a directory"):
        load_config(str(tmp_path), MemoryReactor())


def test_unreadable_file(tmp_path):
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "pymta.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config file: cannot read: Not a directory")):
        load_config(str(path), MemoryReactor())


def test_toml_syntax_error_has_line_and_column(tmp_path):
    message = config_error(tmp_path, "[server]\nhostname = mx.example.org\n",
                           "line 2, column 12", "TOML syntax error: Invalid value")
    assert "(at line" not in message


def test_not_utf8(tmp_path):
    path = tmp_path / "pymta.toml"
    path.write_bytes(b"[server]\nhostname = \"\xff\"\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: line 2: not valid UTF-8")):
        load_config(str(path), MemoryReactor())


# -- key errors -----------------------------------------------------------------------

@pytest.mark.parametrize("text, key, problem", [
    ("[limit]\nmax_recipients = 5\n", "limit", "unknown key (did you mean 'limits'?)"),
    ("[limits]\nmax_recipient = 5\n", "limits.max_recipient",
     "unknown key (did you mean 'max_recipients'?)"),
    ("[server]\nhostnme = 'x'\n", "server.hostnme", "unknown key (did you mean 'hostname'?)"),
    ("[stages]\nrpct = []\n", "stages.rpct", "unknown key (did you mean 'rcpt'?)"),
    ("limits = 5\n", "limits", "expected a table, got integer 5"),
    ("[limits]\nmax_recipients = 'abc'\n", "limits.max_recipients",
     "expected an integer, got string 'abc'"),
    ("[limits]\nmax_recipients = 0\n", "limits.max_recipients", "must be at least 1, got 0"),
    ("[limits]\nmax_message_size = 1.5\n", "limits.max_message_size", "expected an integer, got float 1.5"),
    ("[limits]\nbare_newlines = 'keep'\n", "limits.bare_newlines",
     "expected one of 'reject', 'normalize', got string 'keep'"),
    ("[limits]\nidle_timeout = '5 minutes'\n", "limits.idle_timeout",
     "expected a duration such as 30 (seconds), \"30s\", \"5m\", \"4h\" or \"5d\", got string '5 minutes'"),
    ("[limits]\ndata_timeout = 0\n", "limits.data_timeout", "must be greater than 0s, got 0s"),
    ("[queue]\nconcurrency = 0\n", "queue.concurrency", "must be at least 1, got 0"),
    ("[queue]\nretry_initial = '2h'\nretry_max = '1h'\n", "queue.retry_max",
     "must be at least retry_initial (2h), got 1h"),
    ("[spool]\nsync = 'sync'\n", "spool.sync", "expected one of 'fsync', 'syncfs', got string 'sync'"),
    ("[spool]\ndisk_work = 'fork'\n", "spool.disk_work",
     "expected one of 'process', 'threads', got string 'fork'"),
    ("[spool]\ndirectory = 7\n", "spool.directory", "expected a string, got integer 7"),
    ("[spool]\nmemory_limit = -1\n", "spool.memory_limit", "must be at least 0, got -1"),
    ("[spool]\nmemory_limit = '64k'\n", "spool.memory_limit", "expected an integer, got string '64k'"),
    ("[spool]\nmemory_limit = 1.5\n", "spool.memory_limit", "expected an integer, got float 1.5"),
    ("[spool]\nmemory_limit = true\n", "spool.memory_limit", "expected an integer, got boolean true"),
    ("[spool]\nmemory_limt = 0\n", "spool.memory_limt", "unknown key (did you mean 'memory_limit'?)"),
    ("[server]\ndomains = 'example.org'\n", "server.domains",
     "expected an array of strings, got string 'example.org'"),
    ("[server]\ndomains = ['example.org', 'exa mple.org']\n", "server.domains[1]",
     "invalid domain 'exa mple.org'"),
    ("[server]\nhostname = 'mx_1.example.org'\n", "server.hostname",
     "invalid host name 'mx_1.example.org': Codepoint U+005F"),
    ("[server]\ntrusted_networks = ['127.0.0.0/8', '10.0.0.1/8']\n", "server.trusted_networks[1]",
     "not a network in CIDR notation: 10.0.0.1/8 has host bits set"),
    ("[server]\ntrusted_networks = ['10.0.0.0/33']\n", "server.trusted_networks[0]",
     "not a network in CIDR notation"),
    ("[server]\ntrusted_networks = ['localhost']\n", "server.trusted_networks[0]",
     "not a network in CIDR notation"),
    ("[server]\nplugin_path = ['no-such-dir']\n", "server.plugin_path[0]", "no such directory: "),
    ("[listeners]\nendpoint = 'tcp:25'\n", "listeners",
     "expected an array of tables ([[listeners]] sections), got table"),
    ("listeners = []\n", "listeners", "at least one listener is required"),
    ("[[listeners]]\nname = 'mx'\n", "listeners[0].endpoint", "required option missing"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nrole = 'relay'\n", "listeners[0].role",
     "expected one of 'mx', 'submission', 'submissions', got string 'relay'"),
    ("[[listeners]]\nendpoint = 'tcp:25'\n[[listeners]]\nendpoint = 'foo:25'\n",
     "listeners[1].endpoint", "invalid endpoint 'foo:25': Unknown endpoint type: 'foo'"),
    ("[[listeners]]\nendpoint = 'tcp:notaport'\n", "listeners[0].endpoint",
     "invalid endpoint 'tcp:notaport': invalid literal for int()"),
    ("[[listeners]]\nendpoint = 'systemd:domain=INET:index=7'\n", "listeners[0].endpoint",
     "no socket inherited from systemd"),
    ("[[listeners]]\nname = 'a'\nendpoint = 'tcp:25'\n[[listeners]]\nname = 'a'\nendpoint = 'tcp:26'\n",
     "listeners[1].name", "duplicate listener name 'a' (also listeners[0])"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nport = 25\n", "listeners[0].port", "unknown key"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_protocol = true\n", "listeners[0].proxy_networks",
     "proxy_protocol = true needs proxy_networks: the addresses of the load balancers"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_protocol = true\nproxy_networks = []\n",
     "listeners[0].proxy_networks", "proxy_protocol = true needs proxy_networks"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_networks = ['10.0.0.0/8']\n",
     "listeners[0].proxy_networks", "set, but proxy_protocol is not true"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_protocol = true\nproxy_networks = ['10.0.0.1/8']\n",
     "listeners[0].proxy_networks[0]", "not a network in CIDR notation: 10.0.0.1/8 has host bits set"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_protocol = 'yes'\n", "listeners[0].proxy_protocol",
     "expected true or false"),
    ("[[listeners]]\nendpoint = 'tcp:25'\nproxy_protocol = true\nproxy_networks = ['10.0.0.0/8']\n"
     "proxy_timeout = 0\n", "listeners[0].proxy_timeout", "must be greater than"),
    ("[[listeners]]\nendpoint = 'haproxy:tcp:25'\n", "listeners[0].endpoint",
     "the haproxy: endpoint accepts a PROXY header from any peer; use the plain endpoint with "
     "proxy_protocol = true and proxy_networks = [...]"),
])
def test_key_errors(tmp_path, text, key, problem):
    config_error(tmp_path, text, key, problem)


def test_proxy_protocol_listener(tmp_path):
    config = load_config(str(write(tmp_path / "pymta.toml", """
        [[listeners]]
        name = "lb"
        endpoint = "tcp:25"
        proxy_protocol = true
        proxy_networks = ["10.0.0.5/32", "2001:db8::/64"]
        proxy_timeout = "3s"
        """)), MemoryReactor())
    [lb] = config.listeners
    assert lb.proxy_protocol and lb.proxy_timeout == 3.0
    assert [str(n) for n in lb.proxy_networks] == ["10.0.0.5/32", "2001:db8::/64"]
    [default] = load_config(str(write(tmp_path / "pymta.toml", "[[listeners]]\nendpoint = 'tcp:25'\n")),
                            MemoryReactor()).listeners
    assert (default.proxy_protocol, default.proxy_networks, default.proxy_timeout) == (False, (), 5.0)


def test_endpoint_check_does_not_listen(tmp_path):
    reactor = MemoryReactor()
    load_config(str(write(tmp_path / "pymta.toml", "[[listeners]]\nendpoint = 'tcp:25'\n")), reactor)
    assert reactor.tcpServers == []


# -- plugins and stages --------------------------------------------------------------

SITE_MODULE = '''
from zope.interface import implementer
from pymta.config.options import Options
from pymta.interfaces import IMessageFilter, IRecipientPolicy
from pymta.verdict import DUNNO

created = []

@implementer(IRecipientPolicy, IMessageFilter)
class Both:
    def __init__(self, options, context):
        opts = Options(options)
        self.level = opts.int("level", default=1)
        opts.finish()
        self.context = context
        created.append(self)
    def check_recipient(self, session, transaction, recipient):
        return DUNNO
    def check_message(self, session, transaction, message):
        return DUNNO

@implementer(IMessageFilter)
class NoCheck:
    def __init__(self, options, context):
        pass

class Undeclared:
    def __init__(self, options, context):
        pass
    def check_message(self, session, transaction, message):
        return DUNNO

@implementer(IMessageFilter)
class WrongSignature:
    def __init__(self, options, context):
        pass
    def check_message(self, message):
        return DUNNO

def broken(options, context):
    raise RuntimeError("boom")

NOT_CALLABLE = 42
'''


@pytest.fixture
def site_dir(tmp_path):
    """A plugin_path directory holding the module ``sitemod``."""
    write(tmp_path / "site" / "sitemod.py", SITE_MODULE)
    return tmp_path / "site"


def site_config(body: str) -> str:
    return "[server]\nplugin_path = ['site']\n" + textwrap.dedent(body)


def test_dotted_path_plugin_with_options_and_context(tmp_path, site_dir):
    config = load(tmp_path, site_config("""
        [stages]
        rcpt = ["both", "localdomain"]
        data = ["both"]
        [plugins.both]
        use = "sitemod:Both"
        level = 3
    """))
    rcpt_instance = config.stages["rcpt"][0]
    assert rcpt_instance.name == "both" and rcpt_instance.use == "sitemod:Both"
    assert config.stages["data"][0].obj is rcpt_instance.obj      # created once
    assert len(sys.modules["sitemod"].created) == 1
    assert rcpt_instance.obj.level == 3
    context = rcpt_instance.obj.context
    assert context.config_dir == str(tmp_path) and context.domains == ("localhost",)
    assert context.resolve_path("x") == str(tmp_path / "x")
    assert context.reactor is not None
    assert str(site_dir) == sys.path[0]


def test_dotted_path_with_dots_only_and_builtin_module(tmp_path):
    config = load(tmp_path, """
        [stages]
        rcpt = ["users"]
        [plugins.users]
        use = "pymta.policy.recipients.StaticRecipients"
        addresses = ["a@localhost"]
    """)
    assert isinstance(config.stages["rcpt"][0].obj, StaticRecipients)


def test_short_names_are_discovered():
    discovery = discover_plugins()
    assert set(BUILTIN_NAMES) <= set(discovery.registrations)
    assert discovery.registrations["static"].load() is StaticRecipients
    assert discovery.duplicates == set()


def test_short_name_plugin_with_table(tmp_path):
    config = load(tmp_path, """
        [server]
        domains = ["example.org"]
        [stages]
        rcpt = ["users"]
        [plugins.users]
        use = "static"
        addresses = ["alice@example.org"]
    """)
    assert isinstance(config.stages["rcpt"][0].obj, StaticRecipients)


def test_table_without_use_takes_its_name(tmp_path):
    config = load(tmp_path, """
        [stages]
        rcpt = ["localdomain"]
        [plugins.localdomain]
        recipient_delimiter = "-"
    """)
    assert config.stages["rcpt"][0].obj.delimiters == "-"


@pytest.mark.parametrize("body, key, problem", [
    ("[stages]\nrcpt = ['aliasmapp']\n", "stages.rcpt[0]",
     "unknown plugin 'aliasmapp' (did you mean 'aliasmap'?); known: " + ", ".join(BUILTIN_NAMES)
     + "; no [plugins.aliasmapp] table defines it either"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'nope'\n", "plugins.x.use",
     "unknown plugin 'nope'; known: aliasmap"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nfile = 'a'\n", "plugins.x",
     "unknown plugin 'x'; known: " + ", ".join(BUILTIN_NAMES) + "; the table has no "
     "'use' key, so its name was taken as the plugin name"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 5\n", "plugins.x.use",
     "expected a plugin name or 'module:Factory', got integer 5"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'no_such_module_here:X'\n", "plugins.x.use",
     "cannot import module 'no_such_module_here' for 'no_such_module_here:X': no such module"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:Nope'\n", "plugins.x.use",
     "module 'sitemod' has no attribute 'Nope'"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:Bothh'\n", "plugins.x.use",
     "module 'sitemod' has no attribute 'Bothh' (did you mean 'Both'?)"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:Both.nope'\n", "plugins.x.use",
     "object 'sitemod:Both' has no attribute 'nope'"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:NOT_CALLABLE'\n", "plugins.x.use",
     "'sitemod:NOT_CALLABLE' is not callable"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = ':X'\n", "plugins.x.use", "invalid dotted path ':X'"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:Both'\nlevel = 'high'\n", "plugins.x.level",
     "expected an integer, got string 'high'"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:Both'\nlevl = 2\n", "plugins.x.levl",
     "unknown key (did you mean 'level'?); known keys: level"),
    ("[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'sitemod:broken'\n", "plugins.x",
     "plugin 'sitemod:broken' failed to start: RuntimeError: boom"),
    ("[stages]\nrcpt = ['aliasmap']\n", "plugins.aliasmap.file", "required option missing"),
    ("[stages]\nrcpt = ['localdomain']\n[plugins.localdomain]\nbogus = 1\n", "plugins.localdomain.bogus",
     "unknown key; known keys: recipient_delimiter"),
    ("[stages]\ndata = ['vip']\n[plugins.vip]\nuse = 'sitemod:NoCheck'\n", "plugins.vip",
     "plugin 'sitemod:NoCheck' does not provide IMessageFilter: "
     "The check_message attribute was not provided"),
    ("[stages]\ndata = ['vip']\n[plugins.vip]\nuse = 'sitemod:Undeclared'\n", "plugins.vip",
     "plugin 'sitemod:Undeclared' does not provide IMessageFilter: it does not declare the "
     "interface (add @implementer(IMessageFilter) to its class)"),
    ("[stages]\ndata = ['vip']\n[plugins.vip]\nuse = 'sitemod:WrongSignature'\n", "plugins.vip",
     "plugin 'sitemod:WrongSignature' does not provide IMessageFilter: The check_message method "
     "does not match the interface"),
    ("[stages]\nrcpt = ['localdomain']\ndata = ['localdomain']\n", "stages.data[0]",
     "plugin 'localdomain' does not provide IMessageFilter"),
    ("[stages]\nrcpt = ['localdomain', 'localdomain']\n", "stages.rcpt[1]",
     "'localdomain' is listed twice in this stage"),
    ("[stages]\nrcpt = 'localdomain'\n", "stages.rcpt", "expected an array of strings"),
    ("[plugins.spf]\nuse = 'static'\n", "plugins.spf",
     "defined but not listed in any [stages] list (add it to a stage or remove the table)"),
    ("[plugins]\nspf = 'static'\n", "plugins.spf", "expected a table, got string 'static'"),
])
def test_plugin_errors(tmp_path, site_dir, body, key, problem):
    config_error(tmp_path, site_config(body), key, problem)


def test_plugin_module_failing_to_import(tmp_path):
    write(tmp_path / "site" / "needsdep.py", "import no_such_dependency_xyz\n")
    write(tmp_path / "site" / "badsyntax.py", "def f(:\n")
    body = "[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'needsdep:X'\n"
    config_error(tmp_path, site_config(body), "plugins.x.use",
                 "importing module 'needsdep' for 'needsdep:X' failed: ModuleNotFoundError: "
                 "No module named 'no_such_dependency_xyz'")
    body = "[stages]\nrcpt = ['x']\n[plugins.x]\nuse = 'badsyntax:X'\n"
    config_error(tmp_path, site_config(body), "plugins.x.use",
                 "importing module 'badsyntax' for 'badsyntax:X' failed: SyntaxError:")


def test_plugin_error_in_its_own_file_is_reported_as_is(tmp_path):
    write(tmp_path / "aliases", "alice@example.org alice\n")
    path = write(tmp_path / "pymta.toml", """
        [stages]
        rcpt = ["aliases"]
        [plugins.aliases]
        use = "aliasmap"
        file = "aliases"
    """)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), MemoryReactor())
    assert str(info.value).startswith(f"{tmp_path / 'aliases'}: line 1: expected 'address: target")


# -- backends and routes ---------------------------------------------------------------

TWO_BACKENDS = """
[server]
domains = ["example.org", "example.net"]
[backends.local]
use = "maildir"
base = "mail"
[backends.boxes]
use = "mbox"
base = "mbox"
"""


def test_routes(tmp_path):
    config = load(tmp_path, TWO_BACKENDS + """
        [[routes]]
        match = "Bob@Example.ORG"
        backend = "boxes"
        [[routes]]
        match = "*"
        backend = "local"
    """)
    assert config.routes == (Route("bob@example.org", "boxes"), Route("*", "local"))
    assert config.backends["local"].base == str(tmp_path / "mail")


@pytest.mark.parametrize("body, key, problem", [
    ("", "routes", "[[routes]] are required when more than one backend is defined (backends: local, boxes)"),
    ("[[routes]]\nmatch = 'example.org'\nbackend = 'lcoal'\n", "routes[0].backend",
     "no backend named 'lcoal' (did you mean 'local'?); defined: local, boxes"),
    ("[[routes]]\nmatch = 'example.org'\nbackend = 'local'\n", "routes",
     "no route for local domain 'example.net' (add a [[routes]] entry with match = \"example.net\" or \"*\")"),
    ("[[routes]]\nmatch = 'a@b@'\nbackend = 'local'\n", "routes[0].match",
     "expected \"*\", \"domain\", \"@domain\" or \"user@domain\""),
    ("[[routes]]\nbackend = 'local'\n", "routes[0].match", "required option missing"),
    ("[[routes]]\nmatch = '*'\nbackend = 'local'\nprio = 1\n", "routes[0].prio", "unknown key"),
    ("routes = 'local'\n", "routes", "expected an array of tables ([[routes]] sections)"),
])
def test_route_errors(tmp_path, body, key, problem):
    # a top-level key must come before the first table header
    text = body + TWO_BACKENDS if body.startswith("routes =") else TWO_BACKENDS + body
    config_error(tmp_path, text, key, problem)


RELAY_BACKENDS = """
[server]
domains = ["example.org", "example.net"]
[backends.local]
use = "maildir"
base = "mail"
[backends.out]
use = "relay"
[backends.hub]
use = "smarthost"
host = "hub.example:25"
"""


@pytest.mark.parametrize("routes, key, domain, backend", [
    # the README trap: "*" to the relay and no local route at all
    ([("*", "out")], "routes[0]", "example.org", "out"),
    # one local domain routed, the other falls through to "*"
    ([("example.org", "local"), ("*", "hub")], "routes[1]", "example.net", "hub"),
    # single addresses are not the domain's route: the rest of example.net is relayed
    ([("example.org", "local"), ("postmaster@example.net", "local"),
      ("alice@example.net", "local"), ("*", "out")], "routes[3]", "example.net", "out"),
    # a route to a local backend after "*" comes too late
    ([("*", "out"), ("example.org", "local"), ("example.net", "local")], "routes[0]",
     "example.org", "out"),
])
def test_local_domain_relayed_through_star_is_an_error(tmp_path, routes, key, domain, backend):
    text = RELAY_BACKENDS + "".join(f"[[routes]]\nmatch = '{m}'\nbackend = '{b}'\n"
                                    for m, b in routes)
    config_error(tmp_path, text, key,
                 f"local domain '{domain}' would be relayed: this route (match = \"*\") sends it "
                 f"to backend '{backend}', which passes mail on to other servers; add a route for "
                 "it to a local backend before this one, or name it in a route (match = "
                 f"\"{domain}\") if relaying it is intended")


@pytest.mark.parametrize("routes", [
    # the local domains first, then everything else out
    [("example.org", "local"), ("@example.net", "local"), ("*", "out")],
    # a domain named explicitly may be relayed (an internal hub), by domain or address
    [("example.org", "hub"), ("postmaster@example.net", "local"), ("example.net", "out"),
     ("*", "out")],
    [("user@example.org", "out"), ("example.org", "local"), ("example.net", "local"),
     ("*", "hub")],
])
def test_local_domains_routed_locally_or_by_name_load(tmp_path, routes):
    text = RELAY_BACKENDS + "".join(f"[[routes]]\nmatch = '{m}'\nbackend = '{b}'\n"
                                    for m, b in routes)
    config = load(tmp_path, text)
    assert [(r.match, r.backend) for r in config.routes] == routes


def test_the_only_backend_relaying_local_domains_is_an_error(tmp_path):
    config_error(tmp_path, "[backends.out]\nuse = 'relay'\n", "routes",
                 "local domain 'localhost' would be relayed by backend 'out', the only backend "
                 "(no [[routes]]); add a local backend (maildir, mbox) and [[routes]]: the local "
                 "domains to it, then match = \"*\" to this one")


def test_relay_backends_declare_the_remote_delivery_marker(tmp_path):
    from pymta.interfaces import IDeliveryBackend, IRemoteDelivery
    config = load(tmp_path, RELAY_BACKENDS + "[[routes]]\nmatch = '*'\nbackend = 'local'\n")
    assert IRemoteDelivery.providedBy(config.backends["out"])
    assert IRemoteDelivery.providedBy(config.backends["hub"])
    assert not IRemoteDelivery.providedBy(config.backends["local"])
    assert IDeliveryBackend.providedBy(config.backends["out"])


@pytest.mark.parametrize("body, key, problem", [
    ("[backends.local]\nuse = 'localdomain'\n", "backends.local",
     "plugin 'localdomain' does not provide IDeliveryBackend"),
    ("[backends.local]\nuse = 'maildir'\n", "backends.local.base", "is required"),
    ("[backends.local]\nbase = 'mail'\n", "backends.local",
     "unknown plugin 'local'"),
    ("[backends]\nlocal = 'maildir'\n", "backends.local", "expected a table, got string 'maildir'"),
])
def test_backend_errors(tmp_path, body, key, problem):
    config_error(tmp_path, body, key, problem)


# -- drop-in discovery (twisted.plugin) -------------------------------------------------

DROP_IN = '''
from zope.interface import implementer
from pymta.interfaces import IRecipientPolicy
from pymta.plugins.builtin import PluginRegistration
from pymta.verdict import Verdict

@implementer(IRecipientPolicy)
class OnlyAlice:
    def __init__(self, options, context):
        self.options = options
    def check_recipient(self, session, transaction, recipient):
        return Verdict.accept() if recipient.startswith("alice@") else Verdict.reject()

only_alice = PluginRegistration("only_alice", "pymta.plugins.mysite:OnlyAlice", "site check")
'''


@pytest.fixture
def drop_in_root(tmp_path, monkeypatch):
    """tmp/pymta/plugins/ (no __init__.py) with tmp on sys.path."""
    root = tmp_path / "droproot"
    (root / "pymta" / "plugins").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("pymta.plugins.mysite", None)


def test_drop_in_module_is_discovered_by_short_name(tmp_path, drop_in_root):
    write(drop_in_root / "pymta" / "plugins" / "mysite.py", DROP_IN)
    assert "only_alice" in discover_plugins().registrations
    config = load(tmp_path, """
        [stages]
        rcpt = ["only_alice"]
        [plugins.only_alice]
        note = "kept"
    """)
    plugin = config.stages["rcpt"][0].obj
    assert type(plugin).__name__ == "OnlyAlice" and plugin.options == {"note": "kept"}
    assert plugin.check_recipient(None, None, "alice@localhost").kind.value == "accept"


def test_drop_in_survives_unwritable_cache(tmp_path, drop_in_root, monkeypatch):
    write(drop_in_root / "pymta" / "plugins" / "mysite.py", DROP_IN)

    def refuse(self, content, ext=b".new"):
        raise PermissionError(13, "Permission denied", self.path)

    monkeypatch.setattr(FilePath, "setContent", refuse)
    assert "only_alice" in discover_plugins().registrations
    assert not (drop_in_root / "pymta" / "plugins" / "dropin.cache").exists()


def test_broken_drop_in_is_named_in_unknown_plugin_error(tmp_path, drop_in_root):
    write(drop_in_root / "pymta" / "plugins" / "mysite.py", DROP_IN.replace("class OnlyAlice:", "class OnlyAlice"))
    message = config_error(tmp_path, "[stages]\nrcpt = ['only_alice']\n", "stages.rcpt[0]",
                           "unknown plugin 'only_alice'")
    assert "plugin modules that failed to import: " in message
    assert "mysite.py" in message and "SyntaxError" in message


def test_duplicate_short_name_is_refused_when_used(tmp_path, drop_in_root):
    write(drop_in_root / "pymta" / "plugins" / "mysite.py",
          "from pymta.plugins.builtin import PluginRegistration\n"
          "static = PluginRegistration('static', 'pymta.plugins.mysite:X')\n")
    assert "static" in discover_plugins().duplicates
    config_error(tmp_path, "[stages]\nrcpt = ['static']\n", "stages.rcpt[0]",
                 "plugin short name 'static' is registered by more than one module")


def test_plugin_path_drop_in_directory(tmp_path):
    """A pymta/plugins directory under a plugin_path entry is searched too."""
    write(tmp_path / "site" / "pymta" / "plugins" / "sitedrop.py",
          DROP_IN.replace("pymta.plugins.mysite", "pymta.plugins.sitedrop")
                 .replace('"only_alice"', '"site_only_alice"'))
    try:
        config = load(tmp_path, "[server]\nplugin_path = ['site']\n[stages]\nrcpt = ['site_only_alice']\n")
        assert type(config.stages["rcpt"][0].obj).__name__ == "OnlyAlice"
    finally:
        sys.modules.pop("pymta.plugins.sitedrop", None)


def test_plugin_context_provides_interface(tmp_path):
    from zope.interface.verify import verifyObject

    from pymta.interfaces import IPluginContext
    context = PluginContext("mx.example.org", ("example.org",), str(tmp_path), MemoryReactor())
    assert verifyObject(IPluginContext, context)
    assert context.resolve_path("/abs/x") == "/abs/x"
    assert context.resolve_path("a/../b") == str(tmp_path / "b")
    assert os.path.isabs(context.resolve_path("~/x"))


def test_client_name_lookup_settings(tmp_path):
    assert load(tmp_path, "").dns.reverse_lookup is True
    assert load(tmp_path, "").dns.hosts_file == "/etc/hosts"
    write(tmp_path / "my-hosts", "192.0.2.1 gw.example.org\n")
    config = load(tmp_path, '[dns]\nreverse_lookup = false\nhosts_file = "my-hosts"\n')
    assert config.dns.reverse_lookup is False and config.dns.hosts_file == str(tmp_path / "my-hosts")
    assert load(tmp_path, '[dns]\nhosts_file = ""\n').dns.hosts_file == ""
    config_error(tmp_path, '[dns]\nhosts_file = "missing-hosts"\n', "dns.hosts_file",
                 f"no such file: {tmp_path / 'missing-hosts'}")
    config_error(tmp_path, '[dns]\nreverse_lookup = "yes"\n', "dns.reverse_lookup", "expected")


def test_dns_budget_and_cache_settings(tmp_path):
    dns = load(tmp_path, "").dns
    assert (dns.session_budget, dns.cache_entries, dns.failure_ttl) == (10.0, 10000, 30.0)
    config = load(tmp_path, '[dns]\nsession_budget = "2s"\ncache_entries = 0\nfailure_ttl = 0\n')
    assert (config.dns.session_budget, config.dns.cache_entries, config.dns.failure_ttl) == (2.0, 0, 0.0)
    assert config.resolver.cache.entries == 0 and config.resolver.cache.failure_ttl == 0
    config_error(tmp_path, '[dns]\nsession_budget = "soon"\n', "dns.session_budget", "expected a duration")
    config_error(tmp_path, '[dns]\ncache_entries = -1\n', "dns.cache_entries", "")
    config_error(tmp_path, '[dns]\nfailure_ttl = "2h"\n', "dns.failure_ttl", "")


def test_an_unreadable_hosts_file_is_a_config_error(tmp_path):
    if os.geteuid() == 0:
        hosts = tmp_path / "a-directory"          # root reads any file: make it unreadable otherwise
        hosts.mkdir()
        problem = "cannot read it"
    else:
        hosts = write(tmp_path / "hosts", "192.0.2.1 a.test\n")
        hosts.chmod(0)
        problem = "cannot read it (Permission denied)"
    config_error(tmp_path, f'[dns]\nhosts_file = "{hosts}"\n', "dns.hosts_file", problem)
