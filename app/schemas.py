"""Request and response models: the public contract, as /openapi.json shows it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Generous static bound for the schema; the model's own trained maximum caps it further.
MAX_CAPTION_WORDS = 100
MAX_CAPTIONS = 10


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code, e.g. `invalid_image`.")
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(BaseModel):
    """The one shape of every error response."""

    error: ErrorDetail
    request_id: str | None = Field(description="Echoes the X-Request-ID response header.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"code": "invalid_image", "message": "..."}, "request_id": "4f1c..."}]
        }
    )


class CaptionQuery(BaseModel):
    """Decoding options for POST /caption (query parameters)."""

    max_length: int | None = Field(
        None, ge=1, le=MAX_CAPTION_WORDS,
        description="Most words in the caption; capped at what the model was trained for.",
    )
    strategy: Literal["greedy", "beam", "sample"] = Field(
        "greedy", description="greedy: one caption; beam: beam search; sample: top-k sampling."
    )
    beam_size: int = Field(
        3, ge=1, le=MAX_CAPTIONS, description="Beams kept (strategy=beam); raised to num_captions if smaller."
    )
    num_captions: int = Field(
        1, ge=1, le=MAX_CAPTIONS,
        description="Captions returned, best first (beam and sample; greedy always returns one).",
    )


class CaptionCandidate(BaseModel):
    text: str
    confidence: float = Field(ge=0.0, le=1.0, description="Geometric-mean token probability.")
    log_prob: float = Field(description="Summed log-probability of the generated tokens (<= 0).")


class ModelRef(BaseModel):
    name: str
    version: str


class ImageInfo(BaseModel):
    width: int = Field(description="Width in pixels after EXIF orientation.")
    height: int = Field(description="Height in pixels after EXIF orientation.")
    format: str = Field(description="Detected from the bytes, e.g. PNG, JPEG.")


class Timing(BaseModel):
    decode: float = Field(description="Decoding and resizing the upload, ms.")
    queue: float = Field(description="Waiting for the inference worker, ms.")
    inference: float = Field(description="Encoding and decoding the caption, ms.")
    total: float = Field(description="From the request's arrival to the response, ms.")


class CaptionResponse(BaseModel):
    caption: str = Field(description="The best caption (same as captions[0].text).")
    captions: list[CaptionCandidate] = Field(description="Best first; one entry for greedy decoding.")
    model: ModelRef
    image: ImageInfo
    timing_ms: Timing
    request_id: str


class HealthStatus(BaseModel):
    status: Literal["alive", "ready"]


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    created: str | None = None
    backbone: str
    image_size: int
    vocabulary_size: int
    max_caption_words: int = Field(description="Longest caption the model was trained to produce.")
    feature_grid: tuple[int, int] = Field(description="Attention grid (rows, columns).")
    dataset: DatasetInfo
    metrics: dict[str, Any] = Field(description="Evaluation results recorded in the manifest.")
    training_command: str | None = None
    libraries: dict[str, str] = Field(default_factory=dict)
