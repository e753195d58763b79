"""STARTTLS and AUTH on outbound connections: levels may / encrypt / verify, credentials."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import ssl

from certs import make_cert
from dnsserver import zone_fixture
from fakesmtp import BREAK_TLS, DEFAULT_EHLO, FakeSMTP, run_reactor
from relaykit import relay, smarthost, spooled

ZONE = {"tls.test": [("MX", (10, "mx.tls.test"))], "mx.tls.test": [("A", "127.0.0.1")]}


dns = zone_fixture(ZONE)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    good = make_cert(directory, "good", "mx.tls.test")
    wrong_name = make_cert(directory, "wrong", "somebody-else.test")
    return {"good": good, "wrong": wrong_name}


def server_tls(cert):
    pem, key = cert
    return ssl.DefaultOpenSSLContextFactory(str(key), str(pem))


def deliver(tmp_path, make_backend, cert=None, ehlo=None, setup=None, address="bob@tls.test"):
    def test(reactor):
        server = FakeSMTP(reactor, ehlo=ehlo, tls_options=server_tls(cert) if cert else None)
        if setup:
            setup(server)
        backend = make_backend(reactor, server.port_number)
        message = spooled(tmp_path, address)
        d = backend.deliver(message, message.envelope.recipients)
        return d.addCallback(lambda results: (results[0], server))
    return run_reactor(test)


def test_opportunistic_tls_encrypts_when_offered(tmp_path, dns, certs):
    result, server = deliver(tmp_path, lambda r, port: relay(r, tmp_path, port, dns.nameserver),
                             cert=certs["wrong"])      # "may" does not check the certificate
    assert result.status == "delivered"
    assert server.messages[0].tls
    assert server.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]


def test_verify_accepts_a_certificate_for_the_mx_name_from_a_trusted_ca(tmp_path, dns, certs):
    def backend(reactor, port):
        return relay(reactor, tmp_path, port, dns.nameserver, ca_file=str(certs["good"][0]),
                     tls_policy={"tls.test": "verify"})
    result, server = deliver(tmp_path, backend, cert=certs["good"])
    assert result.status == "delivered", result.summary()
    assert server.messages[0].tls


@pytest.mark.parametrize("served, trusted", [("wrong", "wrong"), ("good", "wrong")],
                         ids=["name mismatch", "untrusted issuer"])
def test_verify_refuses_a_bad_certificate(tmp_path, dns, certs, served, trusted):
    def backend(reactor, port):
        return relay(reactor, tmp_path, port, dns.nameserver, ca_file=str(certs[trusted][0]),
                     tls_policy={"tls.test": "verify"})
    result, server = deliver(tmp_path, backend, cert=certs[served])
    assert result.status == "deferred"
    assert "TLS" in result.text and result.enhanced.startswith("4.")
    assert server.messages == [] and "MAIL" not in server.verbs()


def test_required_tls_that_is_not_offered_defers(tmp_path, dns):
    result, server = deliver(tmp_path, lambda r, port: relay(r, tmp_path, port, dns.nameserver,
                                                              tls="encrypt"))
    assert (result.status, result.enhanced) == ("deferred", "4.7.4")
    assert "TLS is required, but was not offered" in result.text
    assert "MAIL" not in server.verbs()


def test_opportunistic_tls_refused_continues_in_plaintext(tmp_path, dns, certs):
    result, server = deliver(tmp_path, lambda r, port: relay(r, tmp_path, port, dns.nameserver),
                             cert=certs["good"],
                             setup=lambda s: s.on("STARTTLS", b"454 4.7.0 TLS not available\r\n"))
    assert result.status == "delivered"
    assert not server.messages[0].tls
    assert len(server.connections) == 1


def test_opportunistic_tls_with_a_failed_handshake_is_retried_in_plaintext(tmp_path, dns, certs):
    result, server = deliver(tmp_path, lambda r, port: relay(r, tmp_path, port, dns.nameserver),
                             cert=certs["good"], setup=lambda s: s.on("STARTTLS", BREAK_TLS))
    assert result.status == "delivered", result.summary()
    assert len(server.connections) == 2
    assert not server.messages[0].tls


# -- AUTH ---------------------------------------------------------------------------------------

AUTH_EHLO = DEFAULT_EHLO + ["AUTH PLAIN LOGIN"]


def test_auth_plain_to_a_smarthost_over_tls(tmp_path, certs):
    result, server = deliver(tmp_path, lambda r, port: smarthost(
        r, tmp_path, port, tls="encrypt", username="relay-user", password="s3cret"),
        cert=certs["good"], ehlo=AUTH_EHLO)
    assert result.status == "delivered"
    auth = [c for c in server.commands if c.startswith(b"AUTH")]
    assert auth == [b"AUTH PLAIN " + base64.b64encode(b"\0relay-user\0s3cret")]
    assert server.verbs().index("STARTTLS") < server.verbs().index("AUTH")


def test_credentials_never_go_out_in_plaintext_unless_allowed(tmp_path):
    result, server = deliver(tmp_path, lambda r, port: smarthost(
        r, tmp_path, port, username="relay-user", password="s3cret"), ehlo=AUTH_EHLO)
    assert result.status == "deferred"
    assert "without TLS" in result.text
    assert not any(c.startswith(b"AUTH") for c in server.commands)
    assert "MAIL" not in server.verbs()

    result, server = deliver(tmp_path, lambda r, port: smarthost(
        r, tmp_path, port, username="relay-user", password="s3cret", auth_without_tls=True),
        ehlo=AUTH_EHLO)
    assert result.status == "delivered"
    assert any(c.startswith(b"AUTH PLAIN") for c in server.commands)


def test_rejected_credentials_defer(tmp_path):
    result, server = deliver(tmp_path, lambda r, port: smarthost(
        r, tmp_path, port, username="u", password="wrong", auth_without_tls=True),
        ehlo=AUTH_EHLO, setup=lambda s: s.on("AUTH", b"535 5.7.8 authentication failed\r\n"))
    assert (result.status, result.enhanced) == ("deferred", "4.7.8")
    assert "SASL authentication failed" in result.text
    assert "MAIL" not in server.verbs()


def test_smarthost_password_file_and_option_errors(tmp_path):
    from pymta.config.errors import OptionError
    from relaykit import context

    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    backend = smarthost(None, tmp_path, 25, username="u", password_file=str(secret))
    assert backend.credentials.password == "from-file"
    for options, key in [({"username": "u"}, "password"),
                         ({"password": "p"}, "username"),
                         ({"host": "bad:port"}, "host"),
                         ({"tls": "sometimes"}, "tls"),
                         ({"tls": "verify", "ca_file": str(tmp_path / "missing.pem")}, "ca_file")]:
        from pymta.relay.backend import SmarthostBackend
        with pytest.raises(OptionError) as raised:
            SmarthostBackend({"host": "mx.example:25", **options}, context(None, tmp_path))
        assert raised.value.key == key


@pytest.mark.parametrize("mode", [0o644, 0o604])
def test_a_world_readable_smarthost_password_file_is_refused(tmp_path, mode):
    """As the AUTH password file: a secret readable by every local user is not used."""
    from pymta.config.errors import OptionError
    from pymta.relay.backend import SmarthostBackend
    from relaykit import context

    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(mode)
    with pytest.raises(OptionError) as raised:
        SmarthostBackend({"host": "mx.example:25", "username": "u", "password_file": str(secret)},
                         context(None, tmp_path))
    assert raised.value.key == "password_file"
    assert raised.value.problem == (f"{secret} is world-readable (mode {mode:04o}); "
                                    "the password is a secret: chmod 600 it")
    secret.chmod(0o640)                        # group-readable is fine, as for AUTH
    SmarthostBackend({"host": "mx.example:25", "username": "u", "password_file": str(secret)},
                     context(None, tmp_path))


def test_a_world_readable_smarthost_password_file_stops_startup_with_one_line(tmp_path):
    import subprocess
    from conftest import TWISTD, free_port
    secret = tmp_path / "relay-secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    config = tmp_path / "pymta.toml"
    config.write_text(f"""
[[listeners]]
name = "mx"
endpoint = "tcp:{free_port()}:interface=127.0.0.1"

[backends.out]
use = "smarthost"
host = "smtp.example.net:587"
username = "relay-user"
password_file = "relay-secret"
""")
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(config)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "configuration error" in line]
    assert len(errors) == 1, lines
    assert str(config) in errors[0] and "password_file" in errors[0]
    assert f"{secret} is world-readable (mode 0644)" in errors[0]
    assert "Traceback" not in r.stdout + r.stderr
