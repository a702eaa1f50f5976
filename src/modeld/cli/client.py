"""A small blocking client of a running ``modeld serve`` (the standard library only).

Used by ``modeld status|ps|load|unload|run``; usable from scripts too::

    client = ModeldClient("http://127.0.0.1:8080")
    for record in client.infer({"model": "m.gguf", "prompt": "Hi"}):
        print(record.get("text", ""), end="")

Errors::

    ClientError
    ├── ServerUnreachable    nothing answers at the URL (refused, unknown host, timeout)
    └── ServerError          modeld answered with an error (status, code, message)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Generator, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["ClientError", "EventStream", "ModeldClient", "ServerError", "ServerUnreachable"]

DEFAULT_TIMEOUT_S = 30.0


class ClientError(Exception):
    """Base of the client's errors; ``str()`` is a message for a person."""


class ServerUnreachable(ClientError):
    pass


class ServerError(ClientError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


class ModeldClient:
    """One connection per call; ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ClientError(f"not an http(s) URL: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s

    # ----------------------------------------------------------------- calls

    def status(self) -> dict[str, Any]:
        return self._json("GET", "/status")

    def load(self, model_id: str, pin: bool | None = None) -> dict[str, Any]:
        """Load (and warm) a model; waits as long as the load takes."""
        body = {} if pin is None else {"pin": pin}
        return self._json("POST", f"/models/{quote(model_id, safe='')}/load", body, wait=True)

    def unload(self, model_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/models/{quote(model_id, safe='')}/instance")

    def infer(self, body: dict[str, Any]) -> Generator[dict[str, Any]]:
        """The NDJSON records of a streamed ``POST /infer``, the terminal one last.

        Closing the iterator early closes the connection, which cancels the generation.
        """
        connection, response = self._open("POST", "/infer", {**body, "stream": True}, None)
        try:
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerUnreachable(
                f"the connection to {self.url} broke mid-stream ({exc!r}; did the server stop?)"
            ) from exc
        finally:
            connection.close()

    def events(self) -> EventStream:
        """``GET /events``, subscribed before this returns (nothing after it is missed)."""
        connection, response = self._open("GET", "/events", None, None)
        stream = EventStream(connection, response)
        try:
            first = response.readline()  # ": connected", sent once the server subscribed
        except OSError as exc:
            connection.close()
            raise ServerUnreachable(f"the connection to {self.url} broke: {exc}") from exc
        if not first.startswith(b":"):
            connection.close()
            raise ClientError(f"/events at {self.url} did not start with a comment line")
        response.readline()  # the blank line that ends it
        return stream

    # ----------------------------------------------------------------- plumbing

    def _json(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, wait: bool = False
    ) -> dict[str, Any]:
        """One JSON call; ``wait`` lifts the read timeout (the server bounds the wait)."""
        connection, response = self._open(method, path, body, None if wait else self._timeout_s)
        try:
            data = json.loads(response.read() or b"{}")
        except OSError as exc:
            raise ServerUnreachable(f"the connection to {self.url} broke: {exc}") from exc
        finally:
            connection.close()
        if not isinstance(data, dict):
            raise ClientError(f"{path}: expected a JSON object from {self.url}")
        return data

    def _open(
        self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the request; return the connection and a 2xx response (else raise).

        Connecting is bounded by the client's timeout; ``timeout_s`` bounds each read
        after that (None: as long as the server takes, which bounds it by its own limits).
        """
        connection_class = (
            http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        )
        connection = connection_class(self._host, self._port, timeout=self._timeout_s)
        headers = {"Accept": "application/json", "User-Agent": "modeld-cli"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(timeout_s)
            connection.request(method, self._prefix + path, payload, headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ServerUnreachable(f"cannot reach modeld at {self.url}: {_reason(exc)}") from exc
        if response.status >= 300:
            error = _error_of(response)
            connection.close()
            raise error
        return connection, response


class EventStream:
    """Server-Sent Events as ``(kind, data)``; :meth:`close` may be called from another
    thread and ends an iteration blocked waiting for the next event."""

    def __init__(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        self._connection = connection
        self._response = response
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        kind, data = "message", list[str]()
        try:
            while line := self._response.readline():
                text = line.decode("utf-8").rstrip("\r\n")
                if not text:
                    if data:
                        yield kind, json.loads("\n".join(data))
                    kind, data = "message", []
                elif text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].lstrip())
        except (OSError, ValueError):
            if not self._closed.is_set():
                raise
        finally:
            self._connection.close()

    def close(self) -> None:
        self._closed.set()
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is `modeld serve` running there?)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _error_of(response: http.client.HTTPResponse) -> ServerError:
    raw = response.read()
    try:
        detail = json.loads(raw)["error"]
        return ServerError(response.status, str(detail["code"]), str(detail["message"]))
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()[:200] or response.reason
        return ServerError(response.status, "http_error", text)
