"""Client names: PTR confirmed by A/AAAA (FCrDNS), the hosts file first, "unknown" otherwise.

Unit tests run the real resolver against the loopback DNS server; the end-to-end
test connects to a real twistd pymta from 127.0.0.2, whose name only that DNS
server knows, and from 127.0.0.1, named by the configured hosts file.
"""

from __future__ import annotations

import ipaddress
import os
import smtplib
import socket
import time

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from pymta.dns.resolver import DNSError, DNSResolver
from pymta.dns.reverse import ClientNames, parse_hosts, well_formed_host_name
from conftest import BACKEND_TOML
from dnsserver import zone_fixture
from fakesmtp import run_reactor

ZONE = {
    # confirmed: PTR -> name -> A back to the address
    "7.2.0.192.in-addr.arpa": [("PTR", "mail.client.test")],
    "mail.client.test": [("A", "192.0.2.7"), ("A", "192.0.2.8")],
    # the name leads elsewhere
    "9.2.0.192.in-addr.arpa": [("PTR", "liar.test")],
    "liar.test": [("A", "198.51.100.1")],
    # several names: the first does not lead back, the second does
    "10.2.0.192.in-addr.arpa": [("PTR", "other.test"), ("PTR", "second.client.test")],
    "other.test": [("A", "198.51.100.2")],
    "second.client.test": [("A", "192.0.2.10")],
    # a name that must never reach a log line or a header
    "11.2.0.192.in-addr.arpa": [("PTR", "bad\\032name.test")],
    # the forward lookup times out
    "12.2.0.192.in-addr.arpa": [("PTR", "slow.client.test")],
    "slow.client.test": [("TIMEOUT", None)],
    # the reverse lookup fails
    "13.2.0.192.in-addr.arpa": [("SERVFAIL", None)],
    # IPv6, confirmed by AAAA
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [("PTR", "v6.client.test")],
    "v6.client.test": [("AAAA", "2001:db8::1")],
    # the end-to-end client on 127.0.0.2
    "2.0.0.127.in-addr.arpa": [("PTR", "sender.client.test")],
    "sender.client.test": [("A", "127.0.0.2")],
}


dns = zone_fixture(ZONE)


def names_of(dns, addresses, hosts_file=None, timeout=1.0):
    """{address: name} through a ClientNames on a real resolver and reactor; and the log lines."""
    lines: list[str] = []

    def observe(event):
        if event.get("log_namespace") == "pymta.dns.reverse":
            from twisted.logger import formatEvent
            lines.append(formatEvent(event))

    @defer.inlineCallbacks
    def test(reactor):
        resolver = DNSResolver([f"127.0.0.1:{dns.port}"], timeout=timeout, attempts=1, reactor=reactor)
        names = ClientNames(resolver, hosts_file)
        found = {}
        for address in addresses:
            found[address] = yield names.lookup(address)
        return found

    globalLogPublisher.addObserver(observe)
    try:
        return run_reactor(test), lines
    finally:
        globalLogPublisher.removeObserver(observe)


def test_a_name_is_the_clients_only_when_it_leads_back_to_its_address(dns):
    found, lines = names_of(dns, ["192.0.2.7", "192.0.2.9", "192.0.2.10", "192.0.2.99"])
    assert found == {
        "192.0.2.7": "mail.client.test",       # PTR, and A holds the address
        "192.0.2.9": "unknown",                # the PTR name points elsewhere
        "192.0.2.10": "second.client.test",    # the first PTR name fails, the second leads back
        "192.0.2.99": "unknown",               # no PTR (NXDOMAIN)
    }
    assert "hostname liar.test does not resolve to address 192.0.2.9" in lines
    assert "hostname other.test does not resolve to address 192.0.2.10" in lines


def test_ipv6_and_ipv4_mapped_addresses(dns):
    found, _ = names_of(dns, ["2001:db8::1", "::ffff:192.0.2.7"])
    assert found == {"2001:db8::1": "v6.client.test", "::ffff:192.0.2.7": "mail.client.test"}


def test_dns_trouble_and_malformed_names_give_unknown(dns):
    started = time.monotonic()
    found, lines = names_of(dns, ["192.0.2.11", "192.0.2.12", "192.0.2.13", "not an address"],
                            timeout=0.5)
    assert found == {"192.0.2.11": "unknown", "192.0.2.12": "unknown", "192.0.2.13": "unknown",
                     "not an address": "unknown"}
    assert time.monotonic() - started < 5               # one timeout of 0.5 s, not a hang
    assert any("ignoring malformed host name" in line and "192.0.2.11" in line for line in lines)
    assert any("cannot confirm its host name slow.client.test" in line and "timeout" in line
               for line in lines)
    assert any("192.0.2.13: reverse lookup failed" in line and "SERVFAIL" in line for line in lines)


def test_the_hosts_file_comes_first_and_is_reread(dns, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n192.0.2.7 Gateway.Local.Test gw  # trailing\n"
                     "2001:db8::1 six.local.test\n127.0.0.1 loop.local.test\n")
    before = len(dns.queries())
    found, _ = names_of(dns, ["192.0.2.7", "2001:db8::1", "127.0.0.1", "127.0.0.9", "::1"],
                        hosts_file=str(hosts))
    assert found == {"192.0.2.7": "gateway.local.test", "2001:db8::1": "six.local.test",
                     "127.0.0.1": "loop.local.test",
                     "127.0.0.9": "unknown",       # asked of DNS: no PTR
                     "::1": "localhost"}           # not listed: localhost, never asked of DNS
    asked = {name for name, _ in dns.queries()[before:]}
    assert "9.0.0.127.in-addr.arpa" in asked
    assert not asked & {ipaddress.ip_address(a).reverse_pointer
                        for a in ("192.0.2.7", "2001:db8::1", "127.0.0.1", "::1")}

    names = ClientNames(object(), str(hosts))             # a resolver that must not be used
    names._hosts.check_interval = 0
    hosts.write_text("192.0.2.7 renamed.local.test\n")
    os.utime(hosts, (time.time() + 5, time.time() + 5))
    assert names.lookup("192.0.2.7").result == "renamed.local.test"


def test_parse_hosts_and_host_name_syntax(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.1 first.test\n10.0.0.1 second.test\nbad line\n"
                     "10.0.0.2\n10.0.0.3 under_score.test.\n300.1.1.1 nope.test\n"
                     "fe80::1%eth0 link.test\n10.0.0.4 inj\x1bected.test\n")
    assert parse_hosts(str(hosts)) == {"10.0.0.1": "first.test", "10.0.0.3": "under_score.test",
                                       "fe80::1": "link.test"}
    for good in ("a", "mail.example.org", "x-1.example", "_dmarc.example"):
        assert well_formed_host_name(good), good
    for bad in ("", "a..b", "-a.test", "a-.test", "a b.test", "a/b", "x" * 64 + ".test", "é.test",
                "a.test\r\nX-Injected: 1"):
        assert not well_formed_host_name(bad), bad


def _local_address_usable(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def test_end_to_end_log_and_received_use_the_confirmed_name(dns, make_server, tmp_path):
    assert _local_address_usable("127.0.0.2"), "this test needs 127.0.0.2 on the loopback interface"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 me.local.test\n")
    srv = make_server(BACKEND_TOML + f"""
[dns]
nameservers = ["127.0.0.1:{dns.port}"]
timeout = "1s"
attempts = 1
hosts_file = "{hosts}"
""")
    body = b"Subject: names\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", srv.port, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("a@example.org", ["bob@example.test"], body)
    with smtplib.SMTP("127.0.0.1", srv.port) as client:
        client.sendmail("a@example.org", ["carol@example.test"], body)
    [from_dns] = srv.delivered("bob@example.test")
    [from_hosts] = srv.delivered("carol@example.test")
    assert b"(sender.client.test [127.0.0.2])" in from_dns.split(b"\r\n\r\n")[0]
    assert b"(me.local.test [127.0.0.1])" in from_hosts.split(b"\r\n\r\n")[0]
    log = srv.log_text()
    assert "connect from sender.client.test[127.0.0.2]" in log
    assert "client=sender.client.test[127.0.0.2]" in log
    assert "connect from me.local.test[127.0.0.1]" in log


def test_reverse_lookup_off_names_every_client_unknown(make_server):
    srv = make_server(BACKEND_TOML + "\n[dns]\nreverse_lookup = false\n")
    with smtplib.SMTP("127.0.0.1", srv.port) as client:
        client.sendmail("a@example.org", ["bob@example.test"], b"Subject: x\r\n\r\nx\r\n")
    [message] = srv.delivered("bob@example.test")
    assert b"(unknown [127.0.0.1])" in message
    assert "connect from unknown[127.0.0.1]" in srv.log_text()


class ScriptedResolver:
    """ptr/a answers from dicts; a value that is an Exception fails the lookup."""

    def __init__(self, ptr, a):
        self.answers = {"PTR": ptr, "A": a}

    def _answer(self, rtype, name):
        value = self.answers[rtype].get(name, [])
        return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)

    def ptr(self, name):
        return self._answer("PTR", name)

    def a(self, name):
        return self._answer("A", name)


def test_non_ascii_and_address_like_ptr_names_give_unknown_without_a_traceback():
    from twisted.names import dns as twisted_dns
    from pymta.dns.resolver import _host_text
    assert _host_text(twisted_dns.Name(b"\xffbad.Test.")) == "\\xffbad.test"
    resolver = ScriptedResolver(
        {"7.2.0.192.in-addr.arpa": ["\\xffbad.test", "192.0.2.7"]},
        {"192.0.2.7": ["192.0.2.7"]})
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert ClientNames(resolver, None).lookup("192.0.2.7").result == "unknown"
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "pymta.dns.reverse"]
    assert len(mine) == 2 and all(e["log_level"].name == "warn" and "malformed" in e["log_format"]
                                  for e in mine)
    assert not [e for e in events if e.get("log_failure") is not None]
    assert not well_formed_host_name("192.0.2.7") and not well_formed_host_name("host.123")


def test_forward_lookups_of_several_names_run_at_once():
    pending = {}

    class Slow(ScriptedResolver):
        def a(self, name):
            pending[name] = defer.Deferred()
            return pending[name]
    resolver = Slow({"7.2.0.192.in-addr.arpa": ["one.test", "two.test", "three.test"]}, {})
    found = []
    ClientNames(resolver, None).lookup("192.0.2.7").addBoth(found.append)
    assert sorted(pending) == ["one.test", "three.test", "two.test"]      # all asked already
    pending["three.test"].callback(["192.0.2.7"])
    pending["two.test"].callback(["192.0.2.7"])
    assert found == []                                  # the first name's answer comes first
    pending["one.test"].errback(DNSError("one.test", "A", "timeout"))
    assert found == ["two.test"]
