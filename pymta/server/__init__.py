"""The Twisted layer of the SMTP server: a thin adapter around pymta.smtp."""
