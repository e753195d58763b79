"""The SMTP protocol, sans-I/O: bytes in, events out; answers in, bytes out.

Nothing in this package imports Twisted or touches a socket.
"""
