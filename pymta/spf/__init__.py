"""Sender Policy Framework (RFC 7208): record parsing, macros and check_host().

Pure logic over an abstract asynchronous DNS lookup (:class:`SPFLookup`), so
that the RFC 7208 test suite drives it from zone data and the server from the
shared :class:`pymta.dns.resolver.DNSResolver`.  The MTA policy around it is
:mod:`pymta.policy.spf`.
"""

from pymta.spf.check import (RESULTS, SPFChecker, SPFLookup, SPFResult, check_host,
                             identity)
from pymta.spf.record import Record, SPFSyntaxError, parse_record

__all__ = ["RESULTS", "SPFChecker", "SPFLookup", "SPFResult", "check_host", "identity",
           "Record", "SPFSyntaxError", "parse_record"]
