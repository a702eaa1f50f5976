"""API keys: once one is configured, every route but the open ones needs one.

Keys come from ``--api-key`` / ``MODELD_API_KEY`` (one key) and ``--api-key-file`` (one
``name:key`` per line, or a bare key; ``#`` starts a comment). A request presents its
key as ``Authorization: Bearer <key>`` (what OpenAI clients send, and Ollama clients
can) or ``X-API-Key: <key>``. Keys are compared as SHA-256 digests with
``hmac.compare_digest``, against every configured key without stopping at a match, so
the time taken says nothing about how much of a key was right. A missing or wrong key
gets 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``.

The check is pure ASGI and sits inside the request-context middleware (so a 401 still
has its ``X-Request-ID`` and access log line) and inside CORS (so preflights, which
carry no credentials, are answered). Routes are protected by default: only
:data:`OPEN_PATHS` (and ``/metrics`` unless ``--metrics-need-key``) are open, so a
route added later is covered without an edit here. The key used is recorded in the
request's context (``key_id``): its name from the key file, or ``sha256:`` and the first
eight hex digits of its digest, never the key.

The keys follow the settings in force: after a config reload (which validates the keys
before it applies anything) the next request is checked against the new ones.
``GET /`` is open too: a browser's navigation to the status page cannot carry a key; the
page asks for one and sends it with every request it makes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from modeld.api.context import context_of
from modeld.api.errors import ErrorShape
from modeld.errors import ConfigError, Unauthorized
from modeld.settings.config import Settings

__all__ = ["OPEN_PATHS", "ApiKey", "ApiKeyMiddleware", "load_api_keys", "open_paths"]

# /api/version: Ollama clients probe it before anything else, often without a key, and
# it tells nothing but the version string modeld reports (--ollama-version).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/api/version"})
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512
_KEY = re.compile(r"[!-~]+")  # visible ASCII, no spaces
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CHALLENGE = 'Bearer realm="modeld"'


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    digest: bytes = b""

    def __repr__(self) -> str:  # never the digest either
        return f"ApiKey({self.key_id!r})"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def make_key(key: str, name: str | None, where: str) -> ApiKey:
    """Raises :class:`ConfigError` (without the key in the message) for a bad key."""
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not _KEY.fullmatch(key):
        raise ConfigError(
            f"{where}: an API key must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} visible ASCII "
            "characters without spaces",
            field="api_key",
        )
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: key name {name[:64]!r} is not [A-Za-z0-9._-]{{1,64}}")
    digest = _digest(key)
    return ApiKey(name or f"sha256:{digest.hex()[:8]}", digest)


def load_api_keys(settings: Settings) -> tuple[ApiKey, ...]:
    """The configured keys (none: authentication is off). Raises :class:`ConfigError`."""
    keys: list[ApiKey] = []
    if settings.api_key:
        keys.append(make_key(settings.api_key, None, "api_key"))
    if settings.api_key_file is not None:
        keys.extend(_read_key_file(Path(settings.api_key_file).expanduser()))
    names = [key.key_id for key in keys]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"api_key_file: key name {duplicated[0]!r} is used twice")
    return tuple(keys)


def _read_key_file(path: Path) -> Iterable[ApiKey]:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"api_key_file {path.name}: cannot read it ({exc})") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the API key file can be read by other users", file=path.name)
    found = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, key = line.partition(":")
        if not separator:
            name, key = "", line
        found.append(make_key(key.strip(), name.strip() or None, f"api_key_file line {number}"))
    if not found:
        raise ConfigError(f"api_key_file {path.name}: it holds no key")
    return found


def open_paths(settings: Settings) -> frozenset[str]:
    return OPEN_PATHS if settings.metrics_need_key else OPEN_PATHS | {"/metrics"}


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None


class ApiKeyMiddleware:
    """Refuses a request to a protected path without a configured key (pure ASGI).

    ``settings`` returns the settings in force; the keys are loaded again whenever it
    returns a new object (a reload). Should that fail (the file changed again since the
    reload validated it), the previous keys stay in force and the failure is logged.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Callable[[], Settings],
        error_shape_for: Callable[[str], ErrorShape] = lambda path: ErrorShape(),
    ) -> None:
        self.app = app
        self._settings = settings
        self._error_shape_for = error_shape_for
        self._keys_of: Settings | None = None
        self.keys: tuple[ApiKey, ...] = ()
        self.open_paths = OPEN_PATHS
        self._follow(settings())

    def _follow(self, settings: Settings) -> None:
        try:
            keys = load_api_keys(settings)
        except ConfigError as exc:
            if self._keys_of is None:
                raise
            logger.error("API keys could not be read again; the previous keys stay", error=str(exc))
        else:
            self.keys, self.open_paths = keys, open_paths(settings)
        self._keys_of = settings

    def key_id(self, presented: str) -> str | None:
        """The id of the key matching ``presented``; every key is compared."""
        digest = _digest(presented)
        matched = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and matched is None:
                matched = key.key_id
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self._settings()
        if settings is not self._keys_of:
            self._follow(settings)
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_key(Headers(scope=scope))
        key_id = self.key_id(presented) if presented else None
        if key_id is None:
            await self._refuse(scope, receive, send, missing=presented is None)
            return
        context_of(scope).key_id = key_id
        # The audit log (modeld.observability.audit.requester) still reads the key id
        # from scope["state"]: the one string key left, until it reads the context.
        scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, missing: bool) -> None:
        if missing:
            error = Unauthorized("an API key is required: Authorization: Bearer <key>")
            challenge = _CHALLENGE
        else:
            error = Unauthorized("the API key is not valid")
            challenge = f'{_CHALLENGE}, error="invalid_token"'
        response = self._error_shape_for(str(scope["path"])).response(error, context_of(scope))
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)
