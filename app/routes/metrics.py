"""Prometheus scrape endpoint (kept out of the OpenAPI schema)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.metrics import render_latest

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    payload, content_type = render_latest()
    return Response(payload, media_type=content_type)
