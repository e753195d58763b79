"""A loopback authoritative DNS server for the tests (twisted.names, in a subprocess).

Zones are given as a dict  {name: [(type, value), ...]}  with values:
  A/AAAA: "192.0.2.1" / "2001:db8::1"   MX: (preference, "host")   TXT: "text" or ["part", "part"]
  CNAME/PTR/NS: "target"   and the special type "SERVFAIL" (any value) or "TIMEOUT" (never answers).
A record may carry a TTL as a third item, ("A", "127.0.0.2", 5); the default is 60 seconds.
Names not listed get NXDOMAIN.  ``queries()`` lists the (name, type) questions received so far.
Usage::

    with LoopbackDNS({"example.test": [("MX", (10, "mx.example.test"))], ...}) as dns:
        config nameservers = [f"127.0.0.1:{dns.port}"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


class LoopbackDNS:
    def __init__(self, zone: dict[str, list[tuple[str, object]]]) -> None:
        self.zone = zone
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LoopbackDNS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LoopbackDNS":
        fd, self._zonefile = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({k: [list(rec) for rec in recs] for k, recs in self.zone.items()}, f)
        self._querylog = self._zonefile + ".queries"
        open(self._querylog, "w").close()
        self.proc = subprocess.Popen([sys.executable, __file__, self._zonefile, self._querylog],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"DNS server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        if getattr(self, "_zonefile", None):
            os.unlink(self._zonefile)
            self._zonefile = None
        if getattr(self, "_querylog", None):
            os.unlink(self._querylog)
            self._querylog = None

    def queries(self) -> list[tuple[str, str]]:
        """The (name, type) of every question the server received, in order."""
        with open(self._querylog) as f:
            return [tuple(line.rstrip("\n").split(" ", 1)) for line in f if line.strip()]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def zone_fixture(zone: dict):
    """A module-scoped pytest fixture named ``dns``: a LoopbackDNS serving ``zone`` to the
    module's tests.  Use as ``dns = zone_fixture(ZONE)`` at module level."""
    import pytest

    @pytest.fixture(scope="module", name="dns")
    def dns_fixture():
        with LoopbackDNS(zone) as server:
            yield server
    return dns_fixture


def _serve(zonefile: str, querylog: str | None = None) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import dns, error, server

    with open(zonefile) as f:
        zone = {k.lower().rstrip("."): v for k, v in json.load(f).items()}
    log = open(querylog, "a", buffering=1) if querylog else None

    def payload(rtype: str, value, ttl: int = 60):
        if rtype == "A":
            return dns.Record_A(value, ttl)
        if rtype == "AAAA":
            return dns.Record_AAAA(value, ttl)
        if rtype == "MX":
            return dns.Record_MX(value[0], value[1].encode(), ttl)
        if rtype == "TXT":
            parts = value if isinstance(value, list) else [value]
            return dns.Record_TXT(*[p.encode("latin-1") for p in parts], ttl=ttl)
        if rtype == "CNAME":
            return dns.Record_CNAME(value.encode(), ttl)
        if rtype == "PTR":
            return dns.Record_PTR(value.encode(), ttl)
        if rtype == "NS":
            return dns.Record_NS(value.encode(), ttl)
        raise ValueError(rtype)

    class ZoneResolver:
        def query(self, query, timeout=None):
            name = query.name.name.decode().lower().rstrip(".")
            if log is not None:
                log.write(f"{name} {dns.QUERY_TYPES.get(query.type, query.type)}\n")
            records = zone.get(name)
            if records is None:
                return defer.fail(error.DomainError(name))
            kinds = {rec[0] for rec in records}
            if "TIMEOUT" in kinds:
                return defer.Deferred()          # never answers
            if "SERVFAIL" in kinds:
                return defer.fail(RuntimeError(f"SERVFAIL for {name}"))  # answered as SERVFAIL
            answers = []
            wanted = dns.QUERY_TYPES.get(query.type, dns.EXT_QUERIES.get(query.type, ""))
            for rtype, value, *rest in records:
                if rtype == wanted or query.type == dns.ALL_RECORDS or rtype == "CNAME":
                    ttl = rest[0] if rest else 60
                    rr = payload(rtype, value, ttl)
                    answers.append(dns.RRHeader(query.name.name, rr.TYPE, dns.IN, ttl, rr, auth=True))
            return defer.succeed((answers, [], []))

    factory = server.DNSServerFactory(authorities=[ZoneResolver()])
    from twisted.internet.error import CannotListenError
    for _ in range(50):          # UDP and TCP on the same port number: retry if TCP's is taken
        protocol = dns.DNSDatagramProtocol(factory)
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        try:
            reactor.listenTCP(port.getHost().port, factory, interface="127.0.0.1")
            break
        except CannotListenError:
            port.stopListening()
    else:
        raise RuntimeError("no free port for both UDP and TCP")
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)


class SilentNameserver:
    """A nameserver that never answers: a loopback UDP socket that reads and drops.

    It stands for an unreachable one (a resolver that is down, a firewall
    dropping port 53) and counts what it was asked: ``queries()`` lists the
    (name, type) of every question received, in order.  Runs in a thread of
    the test process.  Usage::

        with SilentNameserver() as ns:
            config nameservers = [ns.nameserver]
    """

    def __init__(self) -> None:
        import socket
        import threading
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stopped = threading.Event()
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._queries: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._drop, name="silent-dns", daemon=True)

    def __enter__(self) -> "SilentNameserver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._sock.close()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queries(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._queries)

    def _drop(self) -> None:
        from twisted.names import dns
        while not self._stopped.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            message = dns.Message()
            try:
                message.fromStr(data)
            except Exception:
                continue
            with self._lock:
                for q in message.queries:
                    self._queries.append((q.name.name.decode("ascii", "replace").lower(),
                                          dns.QUERY_TYPES.get(q.type, str(q.type))))
