"""Reloading the configuration while the server runs (SIGHUP); see :mod:`pymta.reload.reloader`."""
