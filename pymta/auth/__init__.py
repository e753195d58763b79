"""SMTP AUTH credentials: ``twisted.cred`` checkers for the ``auth`` stage.

The server answers AUTH PLAIN / LOGIN through a ``twisted.cred`` Portal whose
checkers are the plugins listed in ``[stages] auth``; each provides
``twisted.cred.checkers.ICredentialsChecker``.  The built-in one is
``passwdfile`` (:mod:`pymta.auth.passwdfile`), whose file ``pymta passwd``
maintains.
"""
