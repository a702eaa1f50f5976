"""Settings, from four sources with one precedence: flag > ``MODELD_*`` env > TOML file > default.

Every setting is a field of :class:`Settings`; the command line and the environment are
derived from the fields, so a new setting is one line here.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from modeld.engine.cpu_cores import usable_cores
from modeld.errors import ConfigError
from modeld.settings.keep_alive import DEFAULT_KEEP_ALIVE, KeepAlive, explain_validation_error
from modeld.settings.per_model import (
    NO_MODEL_SETTINGS,
    ContextTokens,
    GpuLayers,
    ModelSettings,
    ResolvedModel,
    Threads,
    check_models_table,
    flatten_table,
    template_file,
)
from modeld.sizes import MIB
from modeld.types import LoopKind

__all__ = ["Settings", "add_settings_arguments", "bool_flags", "load_settings"]

ENV_PREFIX = "MODELD_"


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models_dir: Path = Path("~/models/llm")
    vram_budget_mb: Annotated[int, msgspec.Meta(ge=1)] | None = None
    vram_margin_mb: Annotated[int, msgspec.Meta(ge=0)] = 512
    default_model: str | None = None
    max_queue_depth: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 32
    max_wait_ms: Annotated[int, msgspec.Meta(ge=0)] = 30_000
    max_inflight: PositiveInt | None = None
    infer_timeout: Annotated[float, msgspec.Meta(gt=0)] | None = 600.0
    load_timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    log_level: str = "info"
    n_ctx: ContextTokens = 4096
    n_batch: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 512
    n_gpu_layers: GpuLayers = -1
    threads: Threads | None = None
    prewarm_default: bool = False
    cors_origins: list[str] = []
    allowed_hosts: list[str] = []
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = MIB
    body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    token_loop: LoopKind = LoopKind.C
    # the longest a streaming reader waits while a fast model's tokens gather (0: a chunk
    # per drain, as each token comes)
    stream_max_gap_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 50
    no_mmap: bool = False
    demo: bool = False
    state_dir: Path | None = None  # default: $XDG_STATE_HOME/modeld or ~/.local/state/modeld
    probe_load: bool = True
    api_key: str | None = None
    api_key_file: Path | None = None
    metrics_need_key: bool = False
    prompt_reuse: bool = True
    # the prompt cache's memory tier (None: 1/8 of the budget up to 1 GiB on CPU, 1 GiB of
    # host memory on GPU; 0 turns the whole cache off) and its disk tier (0: none)
    prompt_cache_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    prompt_cache_disk_mb: Annotated[int, msgspec.Meta(ge=0)] = 2048
    prompt_cache_dir: Path | None = None  # default: <state dir>/prompt-cache
    models: dict[str, ModelSettings] = {}  # [models."<id>"] tables: file only
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE  # idle instances unload after it
    # what GET /api/version reports: the Ollama API level modeld speaks (clients check it)
    ollama_version: Annotated[str, msgspec.Meta(pattern=r"^\d+\.\d+\.\d+$")] = "0.11.0"

    def __post_init__(self) -> None:
        check_models_table(self.models)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser()

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
        return Path(base).expanduser() / "modeld"

    @property
    def n_threads(self) -> int:
        """Each model's threads unless it sets its own: ``threads``, else the cores this
        process may use (its affinity and container quota, not the host's count)."""
        return self.threads or usable_cores()

    def threads_pinned(self, model_id: str) -> bool:
        """Whether ``model_id``'s threads are set (globally or for it): the thread
        budget then gives it that many whatever else runs (see
        :mod:`modeld.scheduling.threads`)."""
        return self.threads is not None or self.model(model_id).threads is not None

    def model(self, model_id: str) -> ModelSettings:
        """``model_id``'s own settings (all "as the global setting" when it has none)."""
        return self.models.get(model_id, NO_MODEL_SETTINGS)

    def resolve(self, name: str) -> ResolvedModel:
        """The model ``name`` (an id or an alias) stands for, with its settings in force.

        No check of the id: the caller decides what an unsafe one means."""
        model_id = self.resolve_model_name(name)
        return ResolvedModel.of(
            model_id,
            self.model(model_id),
            n_ctx=self.n_ctx,
            threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            keep_alive=self.keep_alive,
        )

    def resolve_model_name(self, name: str) -> str:
        """The model id an alias stands for; any other name as it is."""
        for model_id, settings in self.models.items():
            if name in settings.aliases:
                return model_id
        return name


_FIELDS: dict[str, Any] = {f.name: f for f in msgspec.structs.fields(Settings)}
_FILE_ONLY = frozenset({"models"})  # tables: no flag or environment variable


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(name: str) -> bool:
    return _FIELDS[name].type is bool


def _is_list(name: str) -> bool:
    return typing.get_origin(_FIELDS[name].type) is list


def bool_flags(name: str) -> tuple[str, str]:
    """The flag that sets a boolean setting and the one that clears it.

    A setting named ``no_x`` is set by ``--no-x`` and cleared by ``--x``: argparse's
    BooleanOptionalAction would read ``--no-x`` as the negative of ``--x`` and leave it false.
    """
    if name.startswith("no_"):
        return _flag(name), _flag(name.removeprefix("no_"))
    return _flag(name), "--no-" + _flag(name).removeprefix("--")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (two per boolean); absent flags fall through to env and file."""
    parser.add_argument("--config", type=Path, help="TOML file with settings", default=None)
    for name in _FIELDS.keys() - _FILE_ONLY:
        flag = _flag(name)
        if _is_bool(name):
            set_flag, clear_flag = bool_flags(name)
            for option, value in ((set_flag, True), (clear_flag, False)):
                parser.add_argument(
                    option, dest=name, action="store_const", const=value, default=argparse.SUPPRESS
                )
        else:
            help_text = "comma-separated list" if _is_list(name) else None
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text)


def _from_text(name: str, raw: str) -> object:
    """Env vars and flags are strings; turn them into what the field's type decodes."""
    if _is_list(name):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if _is_bool(name):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(f"{name}: expected a boolean, got {raw!r}", field=name)
    if raw.strip().lower() in {"none", ""} and _FIELDS[name].default is None:
        return None
    return raw


def load_settings(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the sources. Raises :class:`ConfigError` naming the bad setting."""
    env = os.environ if env is None else env
    flags = dict(flags or {})
    file_path = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG") or config_file
    merged: dict[str, object] = {}
    if file_path:
        merged.update(_read_toml(Path(str(file_path))))
    for name in _FIELDS.keys() - _FILE_ONLY:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            merged[name] = _from_text(name, raw)
    for name, value in flags.items():
        if name not in _FIELDS or name in _FILE_ONLY:
            raise ConfigError(f"unknown setting {name!r}", field=name)
        merged[name] = _from_text(name, value) if isinstance(value, str) else value
    try:
        return msgspec.convert(merged, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {explain_validation_error(str(exc))}") from exc


def _decode_path(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    section = data.get("modeld", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [modeld] must be a table")
    settings = dict(section)
    if section is not data and "models" in data:  # [models."<id>"] beside [modeld]
        settings.setdefault("models", data["models"])
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}", field=unknown[0])
    if "models" in settings:
        settings["models"] = _models_tables(path, settings["models"])
    return settings


def _models_tables(path: Path, models: object) -> dict[str, ModelSettings]:
    """``[models."<id>"]`` tables as :class:`ModelSettings`, each error naming its table;
    a template file named relative to the config file is taken relative to it."""
    if not isinstance(models, dict):
        raise ConfigError(f'config file {path}: models must be tables [models."<id>"]')
    shaped: dict[str, ModelSettings] = {}
    for model_id, table in models.items():
        where = f'config file {path}: [models."{model_id}"]'
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table", field="models")
        table = flatten_table(table)
        chat_template = table.get("chat_template")
        if isinstance(chat_template, str):
            file = template_file(chat_template)
            if file is not None and not file.is_absolute():
                table["chat_template"] = str(path.parent / file)
        try:
            shaped[model_id] = msgspec.convert(table, ModelSettings)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: {exc}", field="models") from None
    return shaped
