"""Liveness and readiness probes. Neither touches the model nor needs an API key. Both answer HEAD
too (FastAPI adds it to no route): some load balancers probe with it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.dependencies import service_ready
from app.errors import NOT_READY_RETRY_AFTER_S, NotReady, error_responses
from app.schemas import HealthStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=HealthStatus, summary="The process is up and serving HTTP")
async def live() -> HealthStatus:
    return HealthStatus(status="alive")


@router.get(
    "/ready",
    response_model=HealthStatus,
    responses=error_responses(503),
    summary="Model loaded, warmed up and the inference worker running",
)
async def ready(request: Request) -> HealthStatus:
    if not service_ready(request):
        stopping = request.app.state.stopping
        raise NotReady(
            "shutting down" if stopping else "starting: loading or warming up the model", NOT_READY_RETRY_AFTER_S
        )
    return HealthStatus(status="ready")


# HEAD on both, outside the schema (one operation per route there; an operation ID each).
router.add_api_route("/live", live, methods=["HEAD"], response_model=HealthStatus, include_in_schema=False)
router.add_api_route("/ready", ready, methods=["HEAD"], response_model=HealthStatus, include_in_schema=False)
