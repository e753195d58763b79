"""Outbound SMTP: the client protocol, connection pool, MX routing, relay and smarthost backends."""
