"""Every ```toml snippet in README.md loads, as written, through the real config loader.

How a snippet is completed (it shows one feature, not a whole file):

* a ``[server]`` table gets ``hostname = "mx.example.org"`` and ``domains =
  ["example.org"]`` unless the snippet sets them: the keys are inserted right
  after the snippet's own ``[server]`` header, or a ``[server]`` table is
  appended when it has none;
* a ``[spool]`` table pointing into the temp directory is appended (no
  snippet has one);
* nothing else: the snippet's text is otherwise used byte for byte, and
  the keys it leaves out take the loader's defaults.

The files the snippets name, relative to the config file, are created in
the temp directory for every snippet: ``users`` (an empty password file,
mode 0600), ``sender-logins`` (an empty map), ``tls/cert.pem`` and
``tls/key.pem`` (a self-signed pair), ``provider.secret`` (mode 0600),
``plugins/`` (a copy of ``etc/plugins``), ``vip-senders``, ``aliases`` (the
README's own ```aliases block, tested further in tests/test_aliases.py) and the
DKIM keys ``dkim/example.org.2026r.key`` (RSA) and ``dkim/example.org.2026e.key``
(Ed25519).  A socket named ``mx`` counts as inherited from systemd (the socket
activation snippet).

Routing: in every snippet that defines routes, each local domain and its
postmaster reach a backend that delivers here, never a relay or smarthost
(``IRemoteDelivery``).  The shell snippets are not run here; the
``pymta passwd`` lines are exercised by tests/test_admin_passwd.py.
"""

from __future__ import annotations

import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

import pymta.plugins
from certs import make_cert
from pymta.config.loader import load_config
from pymta.dkim.keys import generate_key
from pymta.interfaces import IRemoteDelivery

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

BASE_SERVER = {"hostname": '"mx.example.org"', "domains": '["example.org"]'}

_FENCE = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)


def toml_snippets() -> list[tuple[int, str]]:
    """(line number, text) of every ```toml block in README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m[1]) for m in _FENCE.finditer(text)]


SNIPPETS = toml_snippets()


def complete(snippet: str, spool: Path) -> str:
    """The snippet completed as the module docstring says."""
    parsed = tomllib.loads(snippet)
    missing = [f"{key} = {value}" for key, value in BASE_SERVER.items()
               if key not in parsed.get("server", {})]
    header = re.search(r"^\[server\][^\n]*\n", snippet, re.M)
    if header:
        text = snippet[:header.end()] + "".join(f"{line}\n" for line in missing) \
            + snippet[header.end():]
    else:
        text = snippet + "\n[server]\n" + "".join(f"{line}\n" for line in missing)
    assert "[spool]" not in snippet
    return text + f'\n[spool]\ndirectory = "{spool}"\n'


def workspace(directory: Path) -> Path:
    """The files the snippets refer to; returns the config file's path."""
    (directory / "users").write_text("")
    (directory / "users").chmod(0o600)
    (directory / "sender-logins").write_text("")
    tls = directory / "tls"
    tls.mkdir()
    pem, key = make_cert(tls, "cert")
    key.rename(tls / "key.pem")
    (directory / "provider.secret").write_text("secret\n")
    (directory / "provider.secret").chmod(0o600)
    shutil.copytree(ROOT / "etc" / "plugins", directory / "plugins")
    shutil.copy(ROOT / "etc" / "vip-senders", directory / "vip-senders")
    [aliases] = re.findall(r"^```aliases\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    (directory / "aliases").write_text(aliases, encoding="utf-8")
    (directory / "aliases").chmod(0o644)
    (directory / "dkim").mkdir()
    for name, ed25519 in (("example.org.2026r", False), ("example.org.2026e", True)):
        (directory / "dkim" / f"{name}.key").write_bytes(generate_key(ed25519_key=ed25519))
        (directory / "dkim" / f"{name}.key").chmod(0o600)
    return directory / "pymta.toml"


@pytest.fixture(autouse=True)
def sockets_from_systemd(monkeypatch):
    """Sockets named as in the socket-activation snippet, as if systemd had passed them
    (``systemd:domain=INET:name=mx`` endpoints are only parsed here, never listened on)."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs
    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([3], ("mx",)))


@pytest.fixture(autouse=True)
def isolated_import_state():
    """Undo what loading a config with plugin_path does to sys.path and the plugin path."""
    saved_path = list(sys.path)
    saved_plugin_path = list(pymta.plugins.__path__)
    saved_modules = set(sys.modules)
    yield
    sys.path[:] = saved_path
    pymta.plugins.__path__[:] = saved_plugin_path
    for name in set(sys.modules) - saved_modules:
        if name == "vip_tag":
            del sys.modules[name]


def test_the_readme_has_the_snippets_this_test_expects():
    texts = [text for _, text in SNIPPETS]
    assert len(texts) >= 5, "README.md lost its ```toml snippets?"
    assert any('use = "relay"' in text for text in texts)


@pytest.mark.parametrize("line, snippet", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_snippet_loads_and_keeps_local_mail_local(tmp_path, line, snippet):
    config_file = workspace(tmp_path)
    config_file.write_text(complete(snippet, tmp_path / "spool"), encoding="utf-8")
    config = load_config(str(config_file), MemoryReactor())
    for domain in config.domains:
        for address in (f"alice@{domain}", f"postmaster@{domain}"):
            backend = config.route_for(address)
            assert backend is not None, f"README.md:{line}: no route for {address}"
            assert not IRemoteDelivery.providedBy(config.backends[backend]), (
                f"README.md:{line}: {address} is routed to the relaying backend {backend!r}")


def test_the_relay_snippet_relays_only_other_domains(tmp_path):
    [(line, snippet)] = [(n, text) for n, text in SNIPPETS if 'use = "relay"' in text]
    config_file = workspace(tmp_path)
    config_file.write_text(complete(snippet, tmp_path / "spool"), encoding="utf-8")
    config = load_config(str(config_file), MemoryReactor())
    assert config.domains == ("example.org",)
    assert config.route_for("alice@example.org") == "local"
    assert config.route_for("postmaster@example.org") == "local"
    assert config.route_for("bob@partner.example") == "provider"
    assert config.route_for("carol@elsewhere.example") == "relay"
    assert IRemoteDelivery.providedBy(config.backends["relay"])
    assert IRemoteDelivery.providedBy(config.backends["provider"])


# -- the site plugin example (```python) ------------------------------------------

_PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_the_site_plugin_example_runs_as_written():
    """The README's plugin example, executed as written: it imports only
    pymta.plugin_api, verifies against its interface, and does what it says."""
    from zope.interface.verify import verifyObject

    from pymta.interfaces import IRecipientPolicy
    from pymta.session import Session, Transaction
    from pymta.verdict import Kind

    [snippet] = [m[1] for m in _PYTHON_FENCE.finditer(README.read_text(encoding="utf-8"))
                 if "pymta.plugin_api" in m[1]]
    imported = {m[1] for m in re.finditer(r"^(?:from|import) (\S+)", snippet, re.M)}
    assert imported <= {"zope.interface", "pymta.plugin_api"}, imported
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    plugin = namespace["VipOnly"]({"domain": "Example.ORG"}, None)
    assert verifyObject(IRecipientPolicy, plugin)
    session = Session(client_ip="192.0.2.1", client_port=1, listener="mx", role="mx")
    txn = Transaction(sender="a@example.net")
    check = plugin.check_recipient
    assert check(session, txn, "bob@example.org").kind is Kind.REJECT
    assert check(session, txn, "bob@EXAMPLE.org.").kind is Kind.REJECT
    assert check(session, txn, "vip-bob@example.org").decided is False
    assert check(session, txn, "bob@elsewhere.example").decided is False
