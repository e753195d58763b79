"""DKIM (RFC 6376, RFC 8463 Ed25519), DMARC (RFC 7489) and ARC (RFC 8617) on dkimpy.

dkimpy (the maintained reference implementation) does the header work:
parsing signatures, header canonicalization and selection, the RSA and
Ed25519 signatures themselves.  The body is hashed here, streamed from the
spool in small pieces (:mod:`pymta.dkim.canonical`), because dkimpy works
on the whole message in memory with regular expressions that hold the GIL
for seconds on a large message; and DNS is asked through pymta's shared
asynchronous resolver before dkimpy runs, never by dkimpy itself.

- :mod:`~pymta.dkim.canonical`: streamed body canonicalization and hash
- :mod:`~pymta.dkim.message`: the header section and the body of a message
- :mod:`~pymta.dkim.author`: the author domain (RFC5322.From)
- :mod:`~pymta.dkim.keys`: private keys and the DNS records of their public halves
- :mod:`~pymta.dkim.keytable`: the key table option of the signing plugins
- :mod:`~pymta.dkim.signer`: DKIM-Signature fields for a message
- :mod:`~pymta.dkim.verifier`: results per DKIM-Signature
- :mod:`~pymta.dkim.prefetch`: TXT records fetched before dkimpy runs
- :mod:`~pymta.dkim.blocking`: the thread pool for the blocking work
- :mod:`~pymta.dkim.dmarc`: DMARC records, alignment, policy
- :mod:`~pymta.dkim.arc`: ARC chain verification and sealing
- :mod:`~pymta.dkim.keygen_command`: ``pymta dkim keygen``

The plugins built on it live in :mod:`pymta.policy` (``dkim_sign``,
``dkim_verify``, ``dmarc``, ``arc``).
"""
