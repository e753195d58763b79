"""The shipped etc/pymta.toml and its example site plugin, end to end over SMTP."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import time

import pytest

from conftest import ROOT, TWISTD, PymtaServer, free_port


@pytest.fixture
def etc_server(tmp_path):
    etc = tmp_path / "etc"
    shutil.copytree(ROOT / "etc", etc)
    port = free_port()
    config = etc / "pymta.toml"
    config.write_text(config.read_text().replace("tcp:2525:", f"tcp:{port}:"))
    server = PymtaServer.from_config(config, port).start()
    yield server, tmp_path / "var"
    server.stop()


def _wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(path.glob("*")) if path.is_dir() else []
        if files:
            return [f.read_bytes() for f in files]
        time.sleep(0.05)
    return []


def test_vip_sender_tagged_by_site_plugin(etc_server):
    server, var = etc_server
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("CEO@example.org", ["alice@example.org"], b"Subject: from the ceo\r\n\r\nhi\r\n")
        s.sendmail("someone@example.org", ["carol@example.org"], b"Subject: ordinary\r\n\r\nhi\r\n")
    [vip] = _wait_for(var / "mail" / "example.org" / "alice" / "new")
    assert b"\r\nX-VIP: yes\r\n" in vip.split(b"\r\n\r\n")[0] + b"\r\n"
    [plain] = _wait_for(var / "mail" / "example.org" / "carol" / "new")
    assert b"X-VIP" not in plain


def test_aliases_and_routes_from_example(etc_server):
    server, var = etc_server
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        assert s.sendmail("x@example.org", ["sales@example.net"], b"Subject: sales\r\n\r\nq\r\n") == {}
        s.mail("x@example.org")
        code, text = s.rcpt("nobody@example.net")
        assert (code, text[:5]) == (550, b"5.1.1")
    [alice] = _wait_for(var / "mail" / "example.org" / "alice" / "new")
    assert b"Delivered-To: alice@example.org\r\n" in alice
    # bob@example.org is routed to the mbox backend
    mbox = var / "mbox" / "example.org" / "bob"
    deadline = time.monotonic() + 10
    while not (mbox.exists() and b"Subject: sales\n" in mbox.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"Subject: sales\n" in mbox.read_bytes()


@pytest.mark.parametrize("mistake, expected", [
    ("[limits]\nmax_recipents = 5\n", "limits.max_recipents: unknown key"),
    ("[limits]\nmax_recipients = \"many\"\n", "limits.max_recipients: expected an integer"),
    ("[stages]\nrcpt = [\"nosuchplugin\"]\n", "nosuchplugin"),
    ("[stages]\ndata = [\"bad\"]\n[plugins.bad]\nuse = \"test_policies:NotAPlugin\"\n",
     "does not provide IMessageFilter"),
])
def test_bad_config_stops_startup_with_one_line(tmp_path, mistake, expected):
    config = tmp_path / "broken.toml"
    config.write_text(f'[server]\nplugin_path = ["{ROOT / "tests" / "plugins"}"]\n' + mistake)
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(config)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    errors = [l for l in lines if "configuration error" in l]
    assert len(errors) == 1, lines
    assert str(config) in errors[0] and expected in errors[0]
    assert "Traceback" not in r.stdout + r.stderr


def test_missing_config_file(tmp_path):
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(tmp_path / "nope.toml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "nope.toml" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_one_clear_line(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "p.toml"
        config.write_text(f'[[listeners]]\nname = "mx"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
        r = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(config)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"pymta: cannot listen: listeners 'mx' (tcp:{port}:interface=127.0.0.1)" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
