"""Delivery: the scheduler (retries, bounces) and the local backends, maildir and mbox."""
