"""modeld on Ray Serve: many replicas, each one ``ModelManager``, behind one endpoint.

Needs the ``ray`` extra (``pip install 'modeld[ray]'``); ``import modeld`` never imports
Ray, and neither do this package's pure parts (``routing``, ``cluster``, ``bridge``).
Run it with Ray's own tools::

    serve run modeld.ray:app_builder models_dir=/models num_replicas=2 vram_budget_mb=8192

See docs/scale-out.md for routing, the reconciliation with Ray's multiplexing, and cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modeld.ray.app import RayOptions, app_builder, build_app, parse_args

__all__ = ["RayOptions", "app_builder", "build_app", "parse_args"]


def __getattr__(name: str) -> Any:
    """Ray is imported on first use of the application builders, with a clear message."""
    if name not in __all__:
        raise AttributeError(f"module 'modeld.ray' has no attribute {name!r}")
    try:
        from modeld.ray import app
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "ray":
            raise ImportError(
                "modeld.ray needs Ray Serve: pip install 'modeld[ray]' (ray[serve]==2.60.0)"
            ) from exc
        raise
    return getattr(app, name)
