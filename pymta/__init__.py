"""pymta: a mail transfer agent on Twisted."""

__version__ = "0.1.0"
