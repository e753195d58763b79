"""The control channel: a local UNIX socket speaking Twisted AMP, and ``pymta queue``.

:mod:`.commands` are the typed AMP commands and errors; :mod:`.service`
is the server's side (listening on ``[control] socket``, changes made by the
scheduler); :mod:`.client` and :mod:`.queue_command` are the admin's side.
:mod:`.queueview` is what both sides say about a queued message (pure).
"""
