"""The demo page at / and its two static files: plain HTML, CSS and JavaScript, no build step and
nothing fetched from elsewhere, so the page works on a service without internet access."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

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


@router.get("/")
async def demo_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/samples/{name}")
async def demo_sample(name: str) -> FileResponse:
    if name not in SAMPLES:
        raise AssetNotFound(f"no sample named {name!r}")
    return FileResponse(
        STATIC_DIR / "samples" / name, media_type=SAMPLES[name], headers={"Cache-Control": "max-age=3600"}
    )


@router.get("/static/{name}")
async def demo_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise AssetNotFound(f"no static file named {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
