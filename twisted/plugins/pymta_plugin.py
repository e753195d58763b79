"""twistd plugin: makes ``twistd pymta`` start the mail transfer agent."""

from twisted.application.service import ServiceMaker

pymta = ServiceMaker(
    "pymta",
    "pymta.tap",
    "A mail transfer agent: ESMTP server, durable spool, local delivery",
    "pymta",
)
