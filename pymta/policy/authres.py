"""Authentication-Results (RFC 8601): pymta's own verdicts in one header field.

Checks record what they found as :class:`~pymta.authresults.AuthResult`
items in ``transaction.notes["auth_results"]``
(:func:`~pymta.plugin_api.add_auth_result`); the ``authres`` plugin, listed
last in the data stage, writes them as one field::

    Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=user@example.org

and removes every incoming Authentication-Results field that claims our
authserv-id (RFC 8601 section 5: a forged claim that we checked something),
by position, through ``Verdict.drop_headers``.  Fields of other authserv-ids
are kept.  SPF records its result at MAIL time, so the plugin's place among
the data-stage plugins does not matter for SPF; the data-stage checks
(``dkim_verify``, ``dmarc``, ``arc``) record theirs when they run, so they
are listed before it.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from pymta.authresults import (HEADER, NOTES_KEY, AuthResult, authserv_id_of,
                               format_authentication_results, valid_authserv_id)
from pymta.plugin_api import IMessageFilter, Kind, OptionError, Options, Verdict

__all__ = ["AuthenticationResults"]

@implementer(IMessageFilter)
class AuthenticationResults:
    """The ``authres`` plugin (data stage); options ``authserv_id``, ``remove_forged``."""

    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.authserv_id = opts.str("authserv_id", default=context.hostname)
        self.remove_forged = opts.bool("remove_forged", default=True)
        opts.finish()
        if not valid_authserv_id(self.authserv_id):
            raise OptionError("authserv_id", f"not a valid authserv-id (a domain name or token): "
                                             f"{self.authserv_id!r}")
        self._ours = self.authserv_id.lower()

    def forged_positions(self, headers: list[tuple[str, str]]) -> tuple[int, ...]:
        """Positions of incoming Authentication-Results fields that claim our authserv-id."""
        return tuple(index for index, (name, value) in enumerate(headers)
                     if name.lower() == HEADER.lower()
                     and (authserv_id_of(value) or "").lower() == self._ours)

    def results_for(self, session: Any, transaction: Any) -> list[AuthResult]:
        results = list(transaction.notes.get(NOTES_KEY, ()))
        if session.auth_user:
            results.insert(0, AuthResult("auth", "pass", (("smtp.auth", session.auth_user),)))
        return results

    def check_message(self, session, transaction, message) -> Verdict:
        drop = self.forged_positions(message.headers()) if self.remove_forged else ()
        value = format_authentication_results(self.authserv_id, self.results_for(session, transaction))
        return Verdict(Kind.DUNNO, headers=((HEADER, value),), drop_headers=drop)

