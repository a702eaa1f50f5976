"""The audit log: one JSON line at info per administrative action (load, unload, pin,
cancel, reload, ...), saying who asked, what, and how it ended.

``who`` is the API key's id when the request carried a valid key (the auth middleware
puts it in ``scope["state"]["key_id"]``), never the key itself; otherwise
``anonymous``. ``client`` is the peer address, so an anonymous action can still be traced
to a host.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from loguru import logger

from modeld.errors import ModeldError

__all__ = ["AuditRecord", "audit", "audited", "requester"]

ANONYMOUS = "anonymous"


def requester(scope: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(who, client)`` for an ASGI scope: the key id (or ``anonymous``) and the peer."""
    key_id = scope.get("state", {}).get("key_id")
    peer = scope.get("client")
    client = f"{peer[0]}:{peer[1]}" if peer else None
    return (str(key_id) if key_id else ANONYMOUS), client


def audit(action: str, target: str | None, who: str, outcome: str, **details: object) -> None:
    """Write one audit line. ``outcome`` is ``ok`` or the error code that ended it."""
    logger.info(
        "audit", audit=True, action=action, target=target, who=who, outcome=outcome, **details
    )


class AuditRecord:
    """What an :func:`audited` block may refine before its line is written: the action
    (once the request's body says what it is) and more details."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.details: dict[str, object] = {}


@contextmanager
def audited(
    action: str, target: str | None, scope: Mapping[str, Any] | None, **details: object
) -> Iterator[AuditRecord]:
    """One audit line for the block, written when it ends: ``ok``, the
    :class:`ModeldError`'s code, ``cancelled`` (the request's task was cancelled, e.g.
    the client left), or ``internal_error``. The exception propagates unchanged.

    ``scope`` is the request's ASGI scope; None for an action that came from no request
    (a signal), whose ``who`` is then given in ``details``.
    """
    who, client = requester(scope) if scope is not None else (str(details.pop("who")), None)
    record = AuditRecord(action)
    outcome = "internal_error"
    try:
        yield record
        outcome = "ok"
    except ModeldError as exc:
        outcome = exc.code
        raise
    except Exception:
        raise  # a bug: internal_error
    except BaseException:
        outcome = "cancelled"  # asyncio's CancelledError, trio's Cancelled: not errors
        raise
    finally:
        audit(record.action, target, who, outcome, client=client, **details, **record.details)
