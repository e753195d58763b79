"""Delivery backends: maildir, mbox (and later lmtp, relay)."""
