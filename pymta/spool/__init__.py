"""The durable spool: the commit point (the delivery scheduler works from it)."""

from pymta.spool.message import MessageView, SpooledMessage
from pymta.spool.queueid import is_queue_id, new_queue_id
from pymta.spool.queuefile import SpoolError
from pymta.spool.store import Spool
from pymta.spool.writer import SpoolWriter

__all__ = ["Spool", "SpoolWriter", "SpoolError", "SpooledMessage", "MessageView",
           "new_queue_id", "is_queue_id"]
