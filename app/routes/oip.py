"""The Open Inference Protocol v2 REST API (KServe v2, Triton HTTP), beside POST /caption.

    GET  /v2                                          server metadata
    GET  /v2/health/live | /v2/health/ready           liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]             model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready       model readiness
    POST /v2/models/{name}[/versions/{v}]/infer       captions

Infer takes the encoded images as the BYTES input tensor `image` (shape [B]): in JSON each element
is the image's base64 string; with the binary tensor data extension (binary_data_size, and the
Inference-Header-Content-Length header) the raw bytes follow the JSON, each element prefixed by
its 4-byte little-endian length. Decoding options (the query parameters of /caption: strategy,
beam_size, num_captions, ...) go in the request's `parameters`. Outputs: caption (BYTES [B]),
captions (BYTES [B, n]), scores (FP32 [B, n], log-probabilities; NaN for a caption grounded
decoding wrote from the scene), confidence (FP32 [B, n]); where the model has a domain check,
in_domain (BOOL [B]) and domain_score (FP32 [B]); where it has a scene head and the request asks
for grounded=true, agrees_with_scene and written_from_scene (BOOL [B, n]). A request that names no
outputs gets every one it can have; each is returned in binary when asked (output parameter
binary_data, or binary_data_output).

Every image goes through the service's own caption path (caption_image: the same decoding, limits,
engine and deadline as /caption). Errors have the protocol's shape, {"error": "message"}, with the
status codes /caption would use.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from app.dependencies import caller_of, get_settings, note_version, service_for, service_ready
from app.errors import (
    OIP_PREFIX,
    ApiError,
    ClientDisconnected,
    InvalidParameters,
    NotReady,
    TooManyImages,
    UploadTooLarge,
    error_response,
)
from app.model_repository import ServedModel
from app.schemas import CaptionFields, CaptionQuery
from app.service import decode_options
from app.settings import Settings
from captioning.decoding import DecodeOptions

INPUT_NAME = "image"
# Every output, its datatype, and whether it has a value per image ([B]) or per caption ([B, n]).
OUTPUTS = {
    "caption": ("BYTES", "image"),
    "captions": ("BYTES", "caption"),
    "scores": ("FP32", "caption"),
    "confidence": ("FP32", "caption"),
    "in_domain": ("BOOL", "image"),  # models with a domain check
    "domain_score": ("FP32", "image"),
    "agrees_with_scene": ("BOOL", "caption"),  # models with a scene head, grounded=true
    "written_from_scene": ("BOOL", "caption"),  # likewise
}
DOMAIN_OUTPUTS = ("in_domain", "domain_score")
GROUNDED_OUTPUTS = ("agrees_with_scene", "written_from_scene")
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIGITS = 18  # a version or a header length longer than this is refused (int() stops at 4300)


def plain_number(text: str) -> bool:
    """ASCII digits, and few of them: int() also takes "+5", "1_0", " 7 " and Arabic digits, and
    str.isdigit() takes "³", which int() refuses."""
    return text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS


# Request parameters the protocol or tritonclient may send that are not decoding options.
PROTOCOL_PARAMETERS = {"binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end"}
DECODING_PARAMETERS = set(CaptionQuery.model_fields)


class OipError(ApiError):
    status_code, code = 400, "bad_request"


class ModelNotFound(ApiError):
    status_code, code = 404, "not_found"


class OipErrorBody(BaseModel):
    error: str


def oip_errors(*status_codes: int) -> dict:
    """OpenAPI `responses=` entries for errors in the protocol's shape."""
    return {status: {"model": OipErrorBody, "description": HTTPStatus(status).phrase} for status in status_codes}


class OipRoute(APIRoute):
    """Answers a request that fails validation with the protocol's 400, not FastAPI's 422. Every
    other error of these routes reaches the app's handlers, whose app.errors.error_response gives
    the protocol's shape to any path under /v2, with its error code counted and logged."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def oip_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(request, 400, "bad_request", describe_problems(exc.errors()))

        return oip_handler


def describe_problems(errors) -> str:
    """pydantic's errors as one line: "where: what; ..." (the first five; "what" alone at the top level)."""
    problems = ((".".join(map(str, e.get("loc", ()))), e.get("msg")) for e in list(errors)[:5])
    return "; ".join(f"{where}: {what}" if where else what for where, what in problems)


public_router = APIRouter(prefix=OIP_PREFIX, tags=["open inference protocol"], route_class=OipRoute)
router = APIRouter(prefix=f"{OIP_PREFIX}/models", tags=["open inference protocol"], route_class=OipRoute)


def protected(options: dict) -> dict:
    """create_app's API-key options without its error schema (these routes answer the OIP shape)."""
    return {key: value for key, value in options.items() if key == "dependencies"}


# --- health and metadata ---------------------------------------------------------------------


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


@public_router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="image-captioner", version=request.app.version, extensions=["binary_tensor_data"])


@public_router.get("/health/live", summary="The server is live")
async def server_live() -> dict:
    return {}


@public_router.get("/health/ready", responses=oip_errors(503), summary="The server is ready for inference")
async def server_ready(request: Request) -> dict:
    if not service_ready(request):
        raise NotReady("the server is not ready", 5)
    return {}


async def _lease(request: Request, name: str, version: str | None) -> AsyncIterator[ServedModel]:
    """The model version a path names (the highest served when it names none), leased for the
    request, so that a hot swap lets it finish on this version."""
    models = request.app.state.models
    if models is None:
        raise NotReady("the model is not loaded yet", 5)
    if name != models.name:
        shown = name if len(name) <= 64 else name[:64] + "..."  # the path is the client's: not echoed whole
        raise ModelNotFound(f"unknown model '{shown}'; this server serves '{models.name}'")
    served = models.served
    if version is not None and not plain_number(version):
        raise ModelNotFound(f"model '{name}' has no version '{version[:40]}': versions are positive integers")
    if version is not None and int(version) not in served:
        raise ModelNotFound(
            f"model '{name}' version '{version}' is not served (served versions: "
            f"{', '.join(map(str, sorted(served))) or 'none'})"
        )
    model = models.acquire(int(version) if version is not None else None)
    note_version(request, model)
    try:
        yield model
    finally:
        model.release()


async def leased_model(request: Request, model_name: str) -> AsyncIterator[ServedModel]:
    async for model in _lease(request, model_name, None):
        yield model


async def leased_version(request: Request, model_name: str, model_version: str) -> AsyncIterator[ServedModel]:
    async for model in _lease(request, model_name, model_version):
        yield model


LeasedModel = Annotated[ServedModel, Depends(leased_model)]
LeasedVersion = Annotated[ServedModel, Depends(leased_version)]


METADATA_ERRORS = oip_errors(400, 401, 404, 422, 503)  # (422 replaces FastAPI's default entry)
INFER_ERRORS = oip_errors(400, 401, 404, 408, 413, 415, 422, 429, 503, 504)


def model_metadata(model: ServedModel, models) -> ModelMetadata:
    return ModelMetadata(
        name=model.name,
        versions=[str(v) for v in sorted(models.served)],
        platform="tensorflow_keras",
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=name, datatype=OUTPUTS[name][0], shape=output_shape(name, -1, -1))
            for name in model_outputs(model)
        ],
    )


def output_shape(name: str, images: int, width: int) -> list[int]:
    return [images] if OUTPUTS[name][1] == "image" else [images, width]


def model_outputs(model: ServedModel) -> list[str]:
    """The outputs this model can give: the domain's where it has a domain check, the grounded ones
    where it has a scene head (and the request asks for grounded decoding)."""
    captioner = model.captioner
    return [
        name
        for name in OUTPUTS
        if (name not in DOMAIN_OUTPUTS or captioner.domain is not None)
        and (name not in GROUNDED_OUTPUTS or captioner.scene_head is not None)
    ]


@router.get("/{model_name}", response_model=ModelMetadata, responses=METADATA_ERRORS, summary="Model metadata")
async def get_model_metadata(request: Request, model: LeasedModel) -> ModelMetadata:
    return model_metadata(model, request.app.state.models)


@router.get(
    "/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=METADATA_ERRORS,
    summary="Model version metadata",
)
async def get_model_version_metadata(request: Request, model: LeasedVersion) -> ModelMetadata:
    return model_metadata(model, request.app.state.models)


@router.get("/{model_name}/ready", response_model=ModelReady, responses=METADATA_ERRORS, summary="Model readiness")
async def get_model_ready(request: Request, model: LeasedModel) -> ModelReady:
    return model_ready(request, model)


@router.get(
    "/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=METADATA_ERRORS,
    summary="Model version readiness",
)
async def get_model_version_ready(request: Request, model: LeasedVersion) -> ModelReady:
    return model_ready(request, model)


def model_ready(request: Request, model: ServedModel) -> ModelReady:
    if not (service_ready(request) and model.engine.ready and not model.retired):
        raise NotReady(f"model '{model.name}' version {model.version} is not ready", 5)
    return ModelReady(name=model.name, version=str(model.version), ready=True)


# --- infer -----------------------------------------------------------------------------------


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


INFER_DESCRIPTION = (
    "An inference request (JSON, or JSON followed by binary tensor data whose JSON length is the "
    "Inference-Header-Content-Length header) with the BYTES input `image`; see docs/OIP.md."
)


@router.post(
    "/{model_name}/infer",
    responses=INFER_ERRORS,
    summary="Caption images (BYTES tensor `image`)",
    description=INFER_DESCRIPTION,
)
async def infer(request: Request, model: LeasedModel, settings: Annotated[Settings, Depends(get_settings)]) -> Response:
    return await run_inference(request, model, settings)


@router.post(
    "/{model_name}/versions/{model_version}/infer",
    responses=INFER_ERRORS,
    summary="Caption images with one model version",
    description=INFER_DESCRIPTION,
)
async def infer_version(
    request: Request, model: LeasedVersion, settings: Annotated[Settings, Depends(get_settings)]
) -> Response:
    return await run_inference(request, model, settings)


async def run_inference(request: Request, model: ServedModel, settings: Settings) -> Response:
    if not (service_ready(request) and model.engine.ready):
        raise NotReady("the model is not ready", 5)
    try:
        body = await request.body()
    except ClientDisconnect:  # as on /caption: a 499 in the log and metrics, not a 500 and a traceback
        raise ClientDisconnected("the client disconnected while sending the request") from None
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    if header.count(b",") >= settings.oip_max_json_items:
        # Parsing builds a Python object per value, on the event loop: 3.5 million empty ones in a
        # 10 MB body stalled it for seconds. A real request holds a few dozen (images are strings).
        raise OipError(f"the inference request's JSON holds more than {settings.oip_max_json_items} values")
    try:
        inference = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise OipError(f"invalid inference request: {describe_problems(exc.errors())}") from None
    options = decoding(inference.parameters)
    requested = requested_outputs(inference, model, options)  # before any inference is spent on the request
    images = input_images(inference, binary, settings)
    results = await caption_images(request, images, options, settings, model)
    return inference_response(model, inference, requested, results)


def requested_outputs(inference: InferenceRequest, model: ServedModel, options: DecodeOptions) -> list[RequestOutput]:
    """The outputs to answer: those named, each one this model and these options can give, or all of those."""
    outputs = model_outputs(model)
    available = [name for name in outputs if name not in GROUNDED_OUTPUTS or options.grounded]
    if inference.outputs is None:
        return [RequestOutput(name=name) for name in available]
    names = [output.name for output in inference.outputs]
    grounded_named = [name for name in GROUNDED_OUTPUTS if name in names and name in outputs]
    if grounded_named and not options.grounded:
        verb = "is" if len(grounded_named) == 1 else "are"
        raise OipError(
            f"{', '.join(grounded_named)} {verb} answered for grounded decoding: add the parameter grounded=true"
        )
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise OipError(f"unknown outputs {unknown[:5]}; this model has {available}")
    if len(set(names)) < len(names):  # each would be answered once more: a request could ask for 10 MB of copies
        raise OipError(f"an output is requested more than once; this model has {available}")
    return inference.outputs


async def caption_images(
    request: Request, images: list[bytes], options: DecodeOptions, settings: Settings, model: ServedModel
) -> list[CaptionFields]:
    """The images through the service's own caption path (CaptionService: the same limits, decoding
    and engine as /captions, on the leased version); the first image's error fails the request, as
    the protocol has no per-image status."""
    for data in images:
        if len(data) > settings.max_upload_bytes:
            raise UploadTooLarge(settings.max_upload_bytes)
    service = service_for(request, model)
    outcomes = await service.caption_many(images, options, caller_of(request))
    for outcome in outcomes:
        if isinstance(outcome, ApiError):
            raise outcome
    return outcomes


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON inference header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    if not plain_number(header_length):
        raise OipError(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}")
    length = int(header_length)
    if not 0 <= length <= len(body):
        raise OipError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    return body[:length], body[length:]


def elements_up_to(shape: list[int], most: int) -> int:
    """A tensor's element count, or most + 1 once it is known to pass `most`: the product of a
    client's dimensions is never formed whole (one of 4300 digits or more cannot even be printed)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > most:
            return most + 1
    return count


def shape_text(shape: list[int], most_chars: int = 80) -> str:
    """A client's shape for an error message, cut short: each dimension may have thousands of digits."""
    if len(shape) <= 16 and all(dim.bit_length() < 64 for dim in shape) and len(str(shape)) <= most_chars:
        return str(shape)
    return f"[{len(shape)} dimensions, too long to show]"


def input_images(inference: InferenceRequest, binary: bytes, settings: Settings) -> list[bytes]:
    """The encoded images of the `image` input, from JSON (base64) or the binary section."""
    names = [tensor.name for tensor in inference.inputs]
    if names != [INPUT_NAME]:
        raise OipError(f"expected one input named '{INPUT_NAME}', got {names}")
    tensor = inference.inputs[0]
    if tensor.datatype != "BYTES":
        raise OipError(f"input '{INPUT_NAME}' must have datatype BYTES, got {tensor.datatype}")
    shape = shape_text(tensor.shape)
    if any(dim < 0 for dim in tensor.shape):
        raise OipError(f"input '{INPUT_NAME}' has an invalid shape {shape}")
    most = settings.max_images_per_request
    count = elements_up_to(tensor.shape, most)
    if count < 1:
        raise OipError(f"input '{INPUT_NAME}' holds no image (shape {shape})")
    if count > most:
        raise TooManyImages(f"more than {most} images sent (shape {shape}); the limit is {most} per request")
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != len(binary):  # not isinstance: True is an int too
            raise OipError(f"binary_data_size of '{INPUT_NAME}' is {size}, but {len(binary)} bytes follow the JSON")
        elements = deserialize_bytes(binary, most=count)
    elif binary:
        raise OipError("binary data follows the JSON, but no input has binary_data_size")
    elif tensor.data is None:
        raise OipError(f"input '{INPUT_NAME}' has neither data nor binary_data_size")
    else:
        elements = [_from_base64(element) for element in _flatten(tensor.data)]
    if len(elements) != count:
        raise OipError(f"input '{INPUT_NAME}' has shape {shape} but holds {len(elements)} elements")
    return elements


def decoding(parameters: dict[str, Any]) -> DecodeOptions:
    """The request's decoding parameters -> DecodeOptions, validated as /caption's query is."""
    unknown = set(parameters) - DECODING_PARAMETERS - PROTOCOL_PARAMETERS
    if unknown:
        raise InvalidParameters(
            f"unknown parameters {sorted(unknown)}; decoding parameters are "
            f"{sorted(DECODING_PARAMETERS - {'attention'})}"
        )
    given = {name: value for name, value in parameters.items() if name in DECODING_PARAMETERS}
    if given.get("attention"):
        raise InvalidParameters("attention is not available through this protocol; use POST /caption")
    try:
        # Strict: JSON has types, and `"seed": true` or `"max_length": 1.0` is a client's mistake,
        # not seed 1 (a query string's values are all text, so /caption parses them as FastAPI does).
        query = CaptionQuery.model_validate(given, strict=True)
    except ValidationError as exc:
        raise InvalidParameters(describe_problems(exc.errors())) from None
    return decode_options(query)


def inference_response(
    model: ServedModel, inference: InferenceRequest, requested: list[RequestOutput], results: list[CaptionFields]
) -> Response:
    width = max(len(result.captions) for result in results)
    rows = [result.captions + [None] * (width - len(result.captions)) for result in results]
    values = {  # flattened; per caption padded where an image got fewer captions than the widest
        "caption": [result.captions[0].text for result in results],
        "in_domain": [bool(result.in_domain) for result in results],
        "domain_score": [float("nan") if r.domain_score is None else r.domain_score for r in results],
        "captions": [c.text if c else "" for row in rows for c in row],
        # NaN: no caption at that rank, or one written from the scene (no decoder score)
        "scores": [c.log_prob if c and c.log_prob is not None else float("nan") for row in rows for c in row],
        "confidence": [c.confidence if c else 0.0 for row in rows for c in row],
        "agrees_with_scene": [bool(c and c.agrees_with_scene) for row in rows for c in row],
        "written_from_scene": [bool(c and c.written_from_scene) for row in rows for c in row],
    }
    all_binary = bool(inference.parameters.get("binary_data_output", False))
    outputs, chunks = [], []
    for output in requested:
        datatype = OUTPUTS[output.name][0]
        data = values[output.name]
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": datatype,
            "shape": output_shape(output.name, len(rows), width),
        }
        if output.parameters.get("binary_data", all_binary):
            raw = binary_tensor(data, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [_json_float(x) for x in data] if datatype == "FP32" else data
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if inference.id is not None:
        body["id"] = inference.id
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))}
    )


def binary_tensor(data: list, datatype: str) -> bytes:
    """An output tensor in the binary extension's layout: BYTES length-prefixed, FP32 little-endian,
    BOOL one byte each."""
    if datatype == "BYTES":
        return serialize_bytes(data)
    return np.asarray(data, "<f4" if datatype == "FP32" else np.bool_).tobytes()


def serialize_bytes(elements: list[str | bytes]) -> bytes:
    """BYTES tensor -> binary: each element a 4-byte little-endian length, then its bytes."""
    parts = []
    for element in elements:
        raw = element.encode() if isinstance(element, str) else element
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, most: int | None = None) -> list[bytes]:
    """binary -> BYTES elements; stops at `most` + 1 (enough to say the shape is wrong: millions of
    zero-length elements fit in a few megabytes)."""
    elements, offset = [], 0
    while offset < len(raw) and (most is None or len(elements) <= most):
        if offset + 4 > len(raw):
            raise OipError("binary BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise OipError("binary BYTES data ends inside an element")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


# A browser's FileReader.readAsDataURL() gives "data:image/png;base64,...".
DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,", re.ASCII)


def _from_base64(element: Any) -> bytes:
    """Standard base64 (RFC 4648), also as a data URL or wrapped in lines, as `base64` without -w0
    and MIME encoders write it; other characters are refused, not skipped."""
    if not isinstance(element, str):
        raise OipError(f"in JSON, each '{INPUT_NAME}' element must be the image's base64 string")
    prefix = DATA_URL.match(element)
    # Line breaks only (str.replace runs in C, as fast as the decode): a space or any other
    # character outside the alphabet is still refused.
    text = (element[prefix.end() :] if prefix else element).replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise OipError(
            f"an '{INPUT_NAME}' element is not valid base64 (standard alphabet with + and /, padded with =; send "
            "the image base64-encoded, or use binary data)"
        ) from None


def _flatten(data: list[Any]) -> list[Any]:
    flat = []
    for element in data:
        flat.extend(_flatten(element) if isinstance(element, list) else [element])
    return flat


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
