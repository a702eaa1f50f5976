"""modeld on Ray Serve: many replicas, each one ``ModelManager``, behind one endpoint.

Needs the ``ray`` extra (``pip install 'modeld[ray]'``); ``import modeld`` never imports
Ray. Run it with Ray's own tools::

    serve run modeld.ray:app_builder models_dir=/models num_replicas=2 vram_budget_mb=8192

See docs/scale-out.md for routing, the reconciliation with Ray's multiplexing, and cost.
"""

from __future__ import annotations

try:
    import ray.serve  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "modeld.ray needs Ray Serve: pip install 'modeld[ray]' (ray[serve]==2.60.0)"
    ) from exc

from modeld.ray.app import RayOptions, app_builder, build_app, parse_args

__all__ = ["RayOptions", "app_builder", "build_app", "parse_args"]
