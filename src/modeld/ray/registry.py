"""Which request router this process made for a deployment, for the ingress to read.

It lives apart from :mod:`modeld.ray.router` because Ray pickles a request router's own
module by value: state kept there would be a copy in each process, not shared.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from modeld.ray.routing import ReplicaView

__all__ = ["RouterView", "register_router", "router_for"]


class RouterView(Protocol):
    def views(self) -> Sequence[ReplicaView]: ...


_routers: dict[tuple[str, str], RouterView] = {}
_lock = threading.Lock()


def register_router(app_name: str, deployment: str, router: RouterView) -> None:
    with _lock:
        _routers[(app_name, deployment)] = router


def router_for(app_name: str, deployment: str) -> RouterView | None:
    """The router this process made for a deployment (a handle makes it lazily, when it
    sends its first request)."""
    with _lock:
        return _routers.get((app_name, deployment))
