"""Metadata of the served model, from its manifest and config."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.dependencies import get_captioner
from app.errors import error_responses
from app.schemas import DatasetInfo, ModelInfo
from captioning.artifacts import bundle_digest

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelInfo, responses=error_responses(503), summary="The served model")
async def model_info(captioner: Annotated[object, Depends(get_captioner)]) -> ModelInfo:
    return describe_model(captioner)


def describe_model(captioner) -> ModelInfo:
    manifest, config = captioner.manifest, captioner.config
    training = manifest.get("training") or {}
    dataset = manifest.get("dataset") or training.get("dataset") or {}
    return ModelInfo(
        name=str(manifest.get("name", "unknown")),
        version=str(manifest.get("version", "unknown")),
        bundle=manifest.get("bundle"),
        created=manifest.get("created"),
        digest=bundle_digest(manifest),
        backbone=config.backbone,
        image_size=config.image_size,
        vocabulary_size=config.vocab_size,
        max_caption_words=config.max_length - 2,  # max_length counts <start> and <end>
        feature_grid=tuple(captioner.grid_shape),
        mirror_view=captioner.mirror_permutation is not None,
        grounded=captioner.scene_head is not None,
        object_reader=captioner.object_reader is not None,
        dataset=DatasetInfo(**dataset) if isinstance(dataset, dict) else DatasetInfo(name=str(dataset)),
        metrics=manifest.get("metrics") or {},
        training_command=manifest.get("training_command") or training.get("command"),
        training_warnings=[str(warning) for warning in training.get("warnings") or []],
        libraries={str(k): str(v) for k, v in (manifest.get("libraries") or {}).items()},
    )
