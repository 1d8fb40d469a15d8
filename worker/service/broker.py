"""A Redis transport that drops an undecodable queue item instead of dying on it.

kombu's Redis channel decodes each popped item as JSON inside its event loop; one
item that is not JSON (a stray LPUSH, a bug in another producer) raises out of
the loop and takes the whole worker down. Here such an item is logged and
dropped: it was already popped, so nothing else is lost, and the worker serves on.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

# Not a message: bad JSON (ValueError), or JSON that is not a kombu envelope.
UNDECODABLE = (ValueError, TypeError, KeyError, AttributeError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except UNDECODABLE as exc:
            _dropped(exc)
            raise Empty() from None

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except UNDECODABLE as exc:
            _dropped(exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel


def _dropped(exc: BaseException) -> None:
    log.error("dropped a broker message that is not a valid message (%s: %s)",
              type(exc).__name__, exc)


def install() -> None:
    """Make redis:// and rediss:// broker URLs use this transport."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
