"""POST /admin/reload: apply the model repository now, optionally with a new version policy
(a rollback is a pin: {"version_policy": "specific:1"}). Needs the API key; without API_KEY set
it is disabled (403), since anyone could otherwise swap the served model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from app.dependencies import get_settings
from app.errors import ApiError, NotReady, error_responses
from app.model_repository import NoServableVersion, VersionPolicy
from app.settings import Settings

router = APIRouter(prefix="/admin", tags=["admin"])


class AdminDisabled(ApiError):
    status_code, code = 403, "admin_disabled"


class ReloadRefused(ApiError):
    status_code, code = 409, "reload_refused"


class ReloadRequest(BaseModel):
    version_policy: str | None = Field(
        None,
        max_length=1024,
        description="Replaces MODEL_VERSION_POLICY until the next restart: latest:N, specific:V[,V...] or all "
        "(at most 1024 characters: the policy is echoed in the answer and in the log).",
        examples=["specific:1"],
    )


class ReloadResult(BaseModel):
    model: str
    policy: str
    served: list[int] = Field(description="Versions served after the reload; the highest answers unversioned requests.")
    loaded: list[int]
    unloaded: list[int] = Field(description="Retired; each finishes its in-flight requests, then frees its memory.")
    refused: dict[int, str] = Field(
        description="Versions that failed verification, loading or warm-up, and why: in this reload, or earlier "
        "with their files unchanged since (they are not tried again until the files change)."
    )


@router.post(
    "/reload",
    response_model=ReloadResult,
    responses=error_responses(400, 403, 409, 422, 503),
    summary="Load new model versions now (and optionally change the version policy)",
)
async def reload_models(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResult:
    if settings.api_key is None:
        raise AdminDisabled("set API_KEY to enable the admin endpoints")
    models = request.app.state.models
    if models is None:
        raise NotReady("the model is not loaded yet", 5)
    policy = None
    if body is not None and body.version_policy is not None:
        try:
            policy = VersionPolicy.parse(body.version_policy)
        except ValueError as exc:
            raise ReloadRefused(str(exc)) from None
    if not models.source.reloadable:
        raise ReloadRefused("ARTIFACTS_DIR names one bundle: there is no repository to reload")
    try:
        report = await models.reload(policy)
    except NoServableVersion as exc:
        raise ReloadRefused(str(exc)) from None
    return ReloadResult(
        model=models.name,
        policy=str(models.policy),
        served=report.served,
        loaded=report.loaded,
        unloaded=report.unloaded,
        refused={**models.refused, **report.refused},
    )
