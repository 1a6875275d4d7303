"""The demo page at / and its two static files: plain HTML, CSS and JavaScript, no build step and
nothing fetched from elsewhere, so the page works on a service without internet access.

The files are small and sent whole: a Range header is ignored (RFC 9110 allows it), since
Starlette's FileResponse answers a malformed or unsatisfiable one in plain text."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# An explicit list, not a directory mount: nothing else under app/ can be served by accident.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Scenes to try in one click (written by `python -m training demo-samples`); same rule: a fixed list.
SAMPLES = {
    "dark.png": "image/png",
    "white.png": "image/png",
    "coloured.png": "image/png",
    "textured.png": "image/png",
    "tiny.png": "image/png",
    "photo-like.jpg": "image/jpeg",
    "not-a-scene.png": "image/png",
}
# The page talks to this service only; uploads are previewed from blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class AssetNotFound(ApiError):
    status_code, code = 404, "not_found"


def whole_file(request: Request, path: Path, media_type: str, headers: dict[str, str]) -> Response:
    """The file with an ETag of its content: a browser revalidating (`no-cache`) gets 304 when it
    holds the same bytes."""
    content = path.read_bytes()
    tag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {**headers, "ETag": tag}
    if tag in [value.strip().removeprefix("W/") for value in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/")
async def demo_page(request: Request) -> Response:
    return whole_file(request, STATIC_DIR / "index.html", "text/html; charset=utf-8", PAGE_HEADERS)


@router.get("/static/samples/{name}")
async def demo_sample(request: Request, name: str) -> Response:
    if name not in SAMPLES:
        raise AssetNotFound(f"no sample named {name!r}")
    return whole_file(request, STATIC_DIR / "samples" / name, SAMPLES[name], {"Cache-Control": "max-age=3600"})


@router.get("/static/{name}")
async def demo_asset(request: Request, name: str) -> Response:
    if name not in ASSETS:
        raise AssetNotFound(f"no static file named {name!r}")
    return whole_file(request, STATIC_DIR / name, ASSETS[name], {"Cache-Control": "no-cache"})
