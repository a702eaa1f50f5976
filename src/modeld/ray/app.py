"""Building the Serve application: settings by name in, ingress + replicas out.

``app_builder`` is what Ray's CLI and config files call
(``serve run modeld.ray:app_builder models_dir=/models num_replicas=2``); ``build_app``
is the same for Python callers that already hold a :class:`~modeld.settings.config.Settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from modeld.errors import ConfigError
from modeld.ray.ingress import ModelIngress
from modeld.ray.replica import ModelReplica
from modeld.ray.router import ResidentModelRouter
from modeld.settings.config import Settings, load_settings

__all__ = ["INGRESS_DEPLOYMENT", "REPLICA_DEPLOYMENT", "RayOptions", "app_builder", "build_app"]

INGRESS_DEPLOYMENT = "ModelIngress"
REPLICA_DEPLOYMENT = "ModelReplica"
# What a replica needs after Ray's drain to close its instances (seconds on top of
# --shutdown-grace, which is how long Ray waits for running streams).
_CLOSE_ALLOWANCE_S = 15.0


class RayOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What Ray needs beyond modeld's own settings; every other argument is a setting."""

    num_replicas: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    # Ray's per-replica concurrency cap; high, so that modeld's own queues (429 with
    # Retry-After) decide, not a silent queue in Ray.
    max_ongoing_requests: Annotated[int, msgspec.Meta(ge=1)] = 1000
    num_cpus_per_replica: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    num_gpus_per_replica: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    routing_stats_period_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    spill_queue_len: Annotated[int, msgspec.Meta(ge=1)] = 4


_RAY_OPTION_NAMES = frozenset(f.name for f in msgspec.structs.fields(RayOptions))


def parse_args(args: Mapping[str, object]) -> tuple[Settings, RayOptions]:
    """Split and validate builder arguments. Raises :class:`ConfigError` naming the bad
    argument; ``MODELD_*`` variables and a ``config`` TOML file apply as in ``modeld serve``."""
    ray_args = {k: v for k, v in args.items() if k in _RAY_OPTION_NAMES}
    modeld_args = {k: v for k, v in args.items() if k not in _RAY_OPTION_NAMES}
    try:
        options = msgspec.convert(ray_args, RayOptions, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}", field=_field_of(exc)) from None
    return load_settings(modeld_args), options


def app_builder(args: dict[str, str]) -> Application:
    """The application for ``serve run`` / a Serve config file's ``import_path``."""
    settings, options = parse_args(args)
    return build_app(settings, options)


def build_app(settings: Settings, options: RayOptions | None = None) -> Application:
    """An ingress in front of ``options.num_replicas`` replicas, each one ModelManager."""
    options = options or RayOptions()
    graceful_s = settings.shutdown_grace + _CLOSE_ALLOWANCE_S
    router: dict[str, Any] = {
        "request_router_class": ResidentModelRouter,
        "request_router_kwargs": {"spill_queue_len": options.spill_queue_len},
        "request_routing_stats_period_s": options.routing_stats_period_s,
    }
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": options.num_cpus_per_replica,
            "num_gpus": options.num_gpus_per_replica,
        },
        request_router_config=RequestRouterConfig(**router),
        graceful_shutdown_timeout_s=graceful_s,
        graceful_shutdown_wait_loop_s=0.5,
    )(ModelReplica)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=options.max_ongoing_requests * options.num_replicas,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=graceful_s,
        graceful_shutdown_wait_loop_s=0.5,
    )(serve.ingress()(ModelIngress))
    return ingress.bind(replica.bind(settings), settings)


def _field_of(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    marker = "at `$."
    return text[text.index(marker) + len(marker) :].rstrip("`") if marker in text else None
