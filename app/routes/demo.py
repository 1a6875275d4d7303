"""The demo page at / and its two static files: plain HTML, CSS and JavaScript, no build step and
nothing fetched from elsewhere, so the page works on a service without internet access.

The files are small and sent whole: a Range header is ignored (RFC 9110 allows it), since
Starlette's FileResponse answers a malformed or unsatisfiable one in plain text."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
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


def whole_file(path: Path, media_type: str, headers: dict[str, str]) -> Response:
    return Response(path.read_bytes(), media_type=media_type, headers=headers)


@router.get("/")
async def demo_page() -> Response:
    return whole_file(STATIC_DIR / "index.html", "text/html; charset=utf-8", PAGE_HEADERS)


@router.get("/static/samples/{name}")
async def demo_sample(name: str) -> Response:
    if name not in SAMPLES:
        raise AssetNotFound(f"no sample named {name!r}")
    return whole_file(STATIC_DIR / "samples" / name, SAMPLES[name], {"Cache-Control": "max-age=3600"})


@router.get("/static/{name}")
async def demo_asset(name: str) -> Response:
    if name not in ASSETS:
        raise AssetNotFound(f"no static file named {name!r}")
    return whole_file(STATIC_DIR / name, ASSETS[name], {"Cache-Control": "no-cache"})
