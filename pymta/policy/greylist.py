"""The ``greylist`` plugin (RFC 6647): a first attempt from an unknown triplet is deferred.

A triplet is (client network, envelope sender, recipient); the client
network is the client's /24 for IPv4 and /64 for IPv6 (RFC 6647 4.1: a
sending site retries from another address of the same pool).  The first
attempt of a triplet gets ``451 4.7.1``; a retry after ``delay`` (5 min)
and within ``retry_window`` (2 days) of the first attempt passes, and the
triplet is then remembered for ``pass_ttl`` (35 days, renewed by each
use).  A retry later than the window starts again.  A client network whose
mail has passed ``auto_whitelist`` times (5; 0 = off) skips greylisting
(RFC 6647 4.3), like postgrey's auto-whitelist.

Never greylisted: authenticated sessions, trusted networks (unless
``exempt_trusted = false``), clients in ``skip_networks``, and senders
whose domain is in ``skip_spf_pass`` when the ``spf`` plugin (listed in the
mail stage before it) found ``spf=pass`` for the envelope sender, so that
big senders which retry from other pools are not delayed.

List it in the rcpt stage before the recipient validators (a validator's
accept ends the stage, so a greylist after it would never run)::

    [stages]
    rcpt = ["greylist", "localdomain"]

    [plugins.greylist]
    delay = "5m"
    retry_window = "2d"
    auto_whitelist = 5
    skip_spf_pass = ["gmail.com", "outlook.com"]

With ``[shared] redis`` set, triplets and counts are kept in Redis (one
atomic script per decision), so that every node shares one greylist;
each node keeps what it learns in memory too and decides from that while
Redis cannot answer (see :mod:`pymta.shared_state`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.authresults import NOTES_KEY as AUTH_RESULTS
from pymta.plugin_api import (DUNNO, IRecipientPolicy, Options, OptionError, Session, Transaction,
                              Verdict, domain_key, format_duration, split_address)

__all__ = ["Greylist", "GreylistTable", "GreylistRules", "SHARED_GREYLIST_SCRIPT",
           "client_network"]

log = Logger(namespace="pymta.greylist")

#: the decisions, as the table and the Redis script name them
NEW, EARLY, PASSED, KNOWN, WHITELISTED = "new", "early", "passed", "known", "whitelisted"
#: the transaction note that says this message already counted for the auto-whitelist
_COUNTED = "greylist.counted"


@dataclass(frozen=True)
class GreylistRules:
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    pass_ttl: float = 35 * 86400.0
    auto_whitelist: int = 5


def client_network(ip: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The network a client address is greylisted as (its /24 or /64)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class GreylistTable:
    """The greylist in memory: triplets and client counts, bounded, least recently used go first.

    The same decisions as :data:`SHARED_GREYLIST_SCRIPT` (tests run both on
    the same cases).  ``decide`` returns (decision, seconds since the first
    attempt).
    """

    def __init__(self, rules: GreylistRules, max_entries: int = 100_000) -> None:
        self.rules = rules
        self.max_entries = max_entries
        #: triplet -> [first attempt, passed?, expires]
        self._triplets: OrderedDict[str, list] = OrderedDict()
        #: client network -> [passes, expires]
        self._clients: OrderedDict[str, list] = OrderedDict()

    def __len__(self) -> int:
        return len(self._triplets)

    def decide(self, triplet: str, client: str, now: float, count: bool) -> tuple[str, float]:
        rules = self.rules
        if rules.auto_whitelist:
            entry = self._live(self._clients, client, now)
            if entry is not None and entry[0] >= rules.auto_whitelist:
                return WHITELISTED, 0.0
        entry = self._live(self._triplets, triplet, now)
        if entry is None or (not entry[1] and now - entry[0] > rules.delay + rules.retry_window):
            self.remember(triplet, now, False, now)
            return NEW, 0.0
        first, passed = entry[0], entry[1]
        if not passed and now - first < rules.delay:
            return EARLY, now - first
        self.remember(triplet, first, True, now)
        if count:
            self.count_pass(client, now)
        return (KNOWN if passed else PASSED), now - first

    def remember(self, triplet: str, first: float, passed: bool, now: float) -> None:
        """Keep a triplet as first seen at ``first`` (and passed, or not yet)."""
        rules = self.rules
        expires = now + rules.pass_ttl if passed else first + rules.delay + rules.retry_window
        self._put(self._triplets, triplet, [first, passed, expires])

    def count_pass(self, client: str, now: float, at_least: int = 0) -> None:
        """One more message from ``client`` passed (at least ``at_least`` so far)."""
        if not self.rules.auto_whitelist:
            return
        entry = self._live(self._clients, client, now)
        if entry is None:
            entry = self._put(self._clients, client, [0, 0.0])
        entry[0] = max(entry[0] + 1, at_least)
        entry[1] = now + self.rules.pass_ttl

    def _live(self, table: OrderedDict, key: str, now: float) -> list | None:
        entry = table.get(key)
        if entry is None:
            return None
        if entry[-1] < now:            # as in Redis: a key lives until its expiry time included
            del table[key]
            return None
        table.move_to_end(key)
        return entry

    def _put(self, table: OrderedDict, key: str, entry: list) -> list:
        table[key] = entry
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)
        return entry


#: the same decision in Redis, atomically.  KEYS: triplet, client network.
#: ARGV: now, delay, retry window, pass TTL, auto-whitelist count, count (1/0).
#: A triplet is "first:passed" (passed 0/1); a client network a count.
SHARED_GREYLIST_SCRIPT = """
local now, delay, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pass_ttl, awl, count = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if awl > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= awl then
  return {'whitelisted', '0'}
end
local entry = redis.call('GET', KEYS[1])
local first, passed
if entry then
  local sep = string.find(entry, ':')
  first, passed = tonumber(string.sub(entry, 1, sep - 1)), string.sub(entry, sep + 1)
end
if not entry or (passed == '0' and now - first > delay + window) then
  redis.call('SET', KEYS[1], ARGV[1] .. ':0', 'EX', math.ceil(delay + window))
  return {'new', '0'}
end
if passed == '0' and now - first < delay then
  return {'early', tostring(now - first)}
end
redis.call('SET', KEYS[1], entry:sub(1, string.find(entry, ':')) .. '1', 'EX', math.ceil(pass_ttl))
if count == 1 and awl > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], math.ceil(pass_ttl))
end
if passed == '1' then return {'known', tostring(now - first)} end
return {'passed', tostring(now - first)}
"""


@implementer(IRecipientPolicy)
class Greylist:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.rules = GreylistRules(
            delay=opts.duration("delay", default=GreylistRules.delay, minimum=0),
            retry_window=opts.duration("retry_window", default=GreylistRules.retry_window, above=0),
            pass_ttl=opts.duration("pass_ttl", default=GreylistRules.pass_ttl, above=0),
            auto_whitelist=opts.int("auto_whitelist", default=GreylistRules.auto_whitelist, minimum=0))
        self.ipv4_prefix = opts.int("ipv4_prefix", default=24, minimum=8, maximum=32)
        self.ipv6_prefix = opts.int("ipv6_prefix", default=64, minimum=16, maximum=128)
        self.exempt_trusted = opts.bool("exempt_trusted", default=True)
        self.skip_networks = []
        for index, text in enumerate(opts.list_str("skip_networks", default=[])):
            try:
                self.skip_networks.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as e:
                raise OptionError(f"skip_networks[{index}]", f"not a network in CIDR notation: {e}") \
                    from None
        self.skip_spf_pass = frozenset(domain_key(d) for d in opts.list_str("skip_spf_pass", default=[]))
        max_entries = opts.int("max_entries", default=100_000, minimum=1)
        opts.finish()
        self.table = GreylistTable(self.rules, max_entries)
        #: pymta.shared_state.SharedState when [shared] redis is set
        self.shared = getattr(context, "shared", None)
        self._clock = time.time

    # -- IRecipientPolicy ---------------------------------------------------------
    def check_recipient(self, session: Session, transaction: Transaction,
                        recipient: str) -> Verdict | defer.Deferred:
        if self._exempt(session, transaction):
            return DUNNO
        client = client_network(session.client_ip, self.ipv4_prefix, self.ipv6_prefix)
        triplet = _triplet_key(client, transaction.sender, recipient)
        count = not transaction.notes.get(_COUNTED)
        now = self._clock()
        if self.shared is None or not self.shared.available:
            return self._verdict(*self.table.decide(triplet, client, now, count),
                                 session, transaction, recipient, client)
        rules = self.rules
        d = self.shared.run(SHARED_GREYLIST_SCRIPT,
                            [self.shared.key("grey", "t", triplet), self.shared.key("grey", "c", client)],
                            [repr(now), repr(rules.delay), repr(rules.retry_window), repr(rules.pass_ttl),
                             str(rules.auto_whitelist), "1" if count else "0"])

        def shared(result: Any) -> Verdict:
            decision, age = _text(result[0]), float(_text(result[1]))
            # what this node learns is kept in memory too, should Redis go away
            if decision == WHITELISTED:
                self.table.count_pass(client, now, at_least=rules.auto_whitelist)
            else:
                self.table.remember(triplet, now - age, decision in (PASSED, KNOWN), now)
                if decision in (PASSED, KNOWN) and count:
                    self.table.count_pass(client, now)
            return self._verdict(decision, age, session, transaction, recipient, client)

        def without_redis(_failure) -> Verdict:
            return self._verdict(*self.table.decide(triplet, client, now, count),
                                 session, transaction, recipient, client)
        return d.addCallbacks(shared, without_redis)

    # -- helpers --------------------------------------------------------------------
    def _exempt(self, session: Session, transaction: Transaction) -> bool:
        if session.auth_user is not None or (self.exempt_trusted and session.trusted):
            return True
        if self.skip_networks:
            address = ipaddress.ip_address(session.client_ip)
            if any(address in network for network in self.skip_networks):
                return True
        return bool(self.skip_spf_pass) and self._spf_pass_listed(transaction)

    def _spf_pass_listed(self, transaction: Transaction) -> bool:
        """Did SPF pass for the envelope sender, and is its domain on skip_spf_pass?"""
        if not transaction.sender:
            return False
        domain = domain_key(split_address(transaction.sender)[1])
        if domain not in self.skip_spf_pass:
            return False
        return any(result.method == "spf" and result.result == "pass"
                   and ("smtp.mailfrom", transaction.sender) in result.properties
                   for result in transaction.notes.get(AUTH_RESULTS, ()))

    def _verdict(self, decision: str, age: float, session: Session, transaction: Transaction,
                 recipient: str, client: str) -> Verdict:
        if decision in (PASSED, KNOWN, WHITELISTED):
            transaction.notes[_COUNTED] = True
            if decision == PASSED:
                log.info("greylist: passed [{ip}] from=<{sender}> to=<{rcpt}> after {age}",
                         ip=session.client_ip, sender=transaction.sender, rcpt=recipient,
                         age=format_duration(round(age)))
            return DUNNO
        wait = max(1, round(self.rules.delay - age))
        log.info("greylist: {decision} [{ip}] from=<{sender}> to=<{rcpt}>, retry in {wait} s",
                 decision="deferred first attempt" if decision == NEW else "deferred early retry",
                 ip=session.client_ip, sender=transaction.sender, rcpt=recipient, wait=wait)
        return Verdict.defer(f"Greylisted: first delivery attempt from {client} for <{recipient}>; "
                             f"please try again in {wait} seconds", 451, "4.7.1")


def _triplet_key(client: str, sender: str, recipient: str) -> str:
    """A short fixed-size key for (network, sender, recipient), addresses compared case-blind."""
    text = "\0".join((client, sender.lower(), recipient.lower()))
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
