"""Request and response models: the public contract, as /openapi.json shows it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Generous static bound for the schema; the model's own trained maximum caps it further.
MAX_CAPTION_WORDS = 100
MAX_CAPTIONS = 10
# Beyond these, sampling is just greedy or uniform (and a tiny temperature overflows).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 10.0
MAX_TOP_K = 1000
MAX_SEED = 2**32 - 1


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
    """Decoding options for POST /caption and POST /captions (query parameters).

    Combinations are refused with 422 `invalid_parameters` when they ask for something impossible
    or contradictory (see STRATEGY_ONLY_PARAMETERS and captioning.decoding.DecodeOptions.validate):
    num_captions > 1 with greedy, num_captions > beam_size, or a parameter of another strategy
    given explicitly (beam_size without strategy=beam; temperature, top_k or seed without
    strategy=sample).
    """

    # An unknown parameter is refused (422), as OIP refuses one: a typo (`num_caption=3`) silently
    # ignored would answer something other than what was asked.
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["greedy", "beam", "sample"] = Field(
        "greedy",
        description="greedy: the most likely word at each step, one caption; beam: beam search "
        "with length normalisation, n-best; sample: top-k sampling with temperature, n independent samples.",
    )
    # beam_size, temperature and top_k declare no default here: a client or SDK that sends every
    # parameter's declared default (Swagger UI's "Try it out", openapi-python-client) would send a
    # beam_size with strategy=greedy, which is refused. Their defaults are DecodeOptions'.
    beam_size: int | None = Field(
        None, ge=1, le=MAX_CAPTIONS, description="Beams kept (strategy=beam only; default 3)."
    )
    num_captions: int = Field(
        1,
        ge=1,
        le=MAX_CAPTIONS,
        description="Captions returned, best first (with grounded, those that agree with the model's reading "
        "of the image first): at most beam_size (beam) or any (sample); greedy gives one.",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        le=MAX_CAPTION_WORDS,
        description="Most words in a caption; capped at what the model was trained for.",
    )
    temperature: float | None = Field(
        None,
        allow_inf_nan=False,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Sharpens (<1) or flattens (>1) the sampling distribution (strategy=sample only; default 1.0).",
    )
    top_k: int | None = Field(
        None, ge=1, le=MAX_TOP_K, description="Sample from the k likeliest words (strategy=sample only; default 10)."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Makes sampling repeatable (strategy=sample only; 0 to 4294967295); random when absent.",
    )
    attention: bool = Field(
        False,
        description="Add each word's attention weights over the feature grid, and the grid's size.",
    )
    mirror_view: bool = Field(
        False,
        description="Decode the image together with its left-right mirror: each word is chosen from the two "
        "views' averaged probabilities ('left' and 'right' swapped for the mirror), with any strategy, for twice "
        "the compute. It fixed errors on small and degraded objects for earlier default models; on the "
        "current one it changes accuracy little (docs/MODEL.md). For models whose scenes mean the same "
        "mirrored, as the default model's do.",
    )
    grounded: bool = Field(
        False,
        description="Rerank the beam_size candidates of a beam search by the model's own reading of the "
        "image: a classifier on each cell of its feature grid names the object there, and captions that "
        "contradict that reading, or leave one of its objects out, go after those that do not. The default "
        "model's captions are right more often this way (docs/MODEL.md, 'Grounded reranking'); it needs "
        "strategy=beam and a model with a scene head (GET /model: grounded).",
    )


# Parameters that only mean something for one strategy: giving one explicitly with another
# strategy is a contradiction, refused rather than silently ignored.
STRATEGY_ONLY_PARAMETERS = {"beam_size": "beam", "temperature": "sample", "top_k": "sample", "seed": "sample"}


class WordAttention(BaseModel):
    word: str
    attention: list[float] = Field(
        description="Weights over the feature grid, row-major (attention_grid.height x attention_grid.width), "
        "summing to about 1."
    )


class CaptionCandidate(BaseModel):
    text: str
    confidence: float = Field(
        ge=0.0,
        le=1.0,
        description="Estimated probability that the caption is right: the "
        "geometric-mean token probability, calibrated on held-out images when the model "
        "bundle has a calibration (docs/MODEL.md): in an n-best of 3, by a fit for each rank, and with "
        "grounded=true for captions that agree with the model's reading of the scene and those that do not.",
    )
    log_prob: float | None = Field(
        None,
        description="Summed log-probability of the generated tokens (<= 0); with mirror_view, of the two views' "
        "average, the distribution the words were chosen from. Absent only for a caption written from the scene "
        "(written_from_scene): the decoder did not generate it.",
    )
    words: list[WordAttention] | None = Field(
        None, description="Only with attention=true: each word of `text` with its attention weights."
    )
    agrees_with_scene: bool | None = Field(
        None,
        description="Only with grounded=true: whether nothing in the caption contradicts the model's own reading "
        "of the image's objects, and it names all of them.",
    )
    written_from_scene: bool | None = Field(
        None,
        description="Only with grounded=true: true for a caption the service wrote from the model's reading of "
        "the scene rather than the decoder: when no candidate agreed with the reading, but the best one named "
        'the same objects by colour (docs/MODEL.md, "Reading the cells, and captions written from the reading"). '
        "It has no log_prob and no attention, and its confidence is calibrated as a first caption none of whose "
        "candidates agreed with the reading.",
    )


class AttentionGrid(BaseModel):
    height: int = Field(description="Rows of the feature grid the attention weights cover.")
    width: int = Field(description="Columns of the feature grid.")


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


class CaptionFields(BaseModel):
    """What one captioned image gets, in POST /caption's response and in each POST /captions result."""

    caption: str = Field(description="The best caption (same as captions[0].text).")
    captions: list[CaptionCandidate] = Field(description="Best first; one entry for greedy decoding.")
    attention_grid: AttentionGrid | None = Field(None, description="Only with attention=true.")
    in_domain: bool | None = Field(
        None,
        description="Whether the image looks like what the model was trained on (domain_score >= 0.5); "
        "captions of an out-of-domain image are likely wrong. Absent when the model has no domain check.",
    )
    domain_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Likeness to the training images: 1 typical, 0.5 the in-domain threshold, "
        "near 0 unlike anything the model has seen (docs/MODEL.md).",
    )
    model: ModelRef
    image: ImageInfo
    timing_ms: Timing


class CaptionResponse(CaptionFields):
    request_id: str


class ImageCaptioned(CaptionFields):
    index: int = Field(description="Position of the image in the request, from 0.")
    filename: str | None = Field(description="The file name the client sent, if any.")
    ok: Literal[True] = True


class ImageFailed(BaseModel):
    index: int = Field(description="Position of the image in the request, from 0.")
    filename: str | None = Field(description="The file name the client sent, if any.")
    ok: Literal[False] = False
    error: ErrorDetail = Field(description="Why this image got no caption; the codes of the single-image errors.")


class BatchCaptionResponse(BaseModel):
    results: list[ImageCaptioned | ImageFailed] = Field(description="One per uploaded image, in upload order.")
    request_id: str


class HealthStatus(BaseModel):
    status: Literal["alive", "ready"]


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None


class ModelInfo(BaseModel):
    name: str = Field(description="The repository model's name (MODEL_NAME), or the bundle's with ARTIFACTS_DIR.")
    version: str = Field(description="The repository version that answers (the bundle's own with ARTIFACTS_DIR).")
    bundle: ModelRef | None = Field(None, description="The name and version the bundle's manifest records.")
    created: str | None = None
    digest: str = Field(
        description="sha256 of the bundle's file checksums: the same for the same weights whatever their name "
        "or version, different when any file differs (two versions, or a version re-pointed, told apart)."
    )
    backbone: str
    image_size: int
    vocabulary_size: int
    max_caption_words: int = Field(description="Longest caption the model was trained to produce.")
    feature_grid: tuple[int, int] = Field(description="Attention grid (rows, columns).")
    mirror_view: bool = Field(
        description="Whether the model can decode with mirror_view=true (its vocabulary has both words of each "
        "mirrored pair, or neither)."
    )
    grounded: bool = Field(
        description="Whether the model can decode with grounded=true (its bundle has a scene head, scene_head.npz)."
    )
    object_reader: bool = Field(
        False,
        description="Whether grounded decoding reads each object's shape again from the picture (its bundle has "
        "an object reader, object_reader.keras).",
    )
    dataset: DatasetInfo
    metrics: dict[str, Any] = Field(description="Evaluation results recorded in the manifest.")
    training_command: str | None = None
    training_warnings: list[str] = Field(
        default_factory=list,
        description="What training warned about its data (skipped records, cut captions, validation images that "
        "are training images), as recorded in the manifest.",
    )
    libraries: dict[str, str] = Field(default_factory=dict)
