"""``GET /``: the live status page for a browser; other clients get what they always got.

The page is one file shipped in the package (``status_page.html``: plain HTML, CSS and a
little JavaScript, nothing fetched from elsewhere). Its inline script and style are
allowed by hash in the Content-Security-Policy, so nothing else can run on the page.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["status_page", "wants_html"]

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


@cache
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (read once, on first use)."""
    page = resources.files("modeld.api").joinpath("status_page.html").read_bytes()
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for tag, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    policy = (
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; "
        f"script-src {' '.join(hashes[b'script'])}; style-src {' '.join(hashes[b'style'])}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy


def wants_html(accept: str) -> bool:
    """Whether ``Accept`` names ``text/html`` and prefers it at least as much as JSON.

    Browsers ask for ``text/html,...,*/*;q=0.8``; curl, httpx and scripts ask for
    ``*/*`` or ``application/json`` and so keep getting JSON.
    """
    quality: dict[str, float] = {}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(q, quality.get(media, 0.0))
    html = quality.get("text/html", 0.0)
    return html > 0 and html >= quality.get("application/json", 0.0)


async def status_page(request: Request) -> Response:
    if not wants_html(request.headers.get("accept", "")):
        raise HTTPException(404)  # what JSON clients got before the page existed
    page, policy = _page()
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Response(page, headers=headers, media_type="text/html; charset=utf-8")
