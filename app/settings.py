"""Service configuration, read from environment variables (no prefix) by pydantic-settings.

Every field below is one environment variable of the same name in upper case, e.g.
``MAX_UPLOAD_BYTES=5000000``. Invalid values stop start-up with pydantic's message naming the
variable. See the README's configuration table for the same list with defaults.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A version policy as MODEL_VERSION_POLICY and POST /admin/reload take it (ASCII digits only: int()
# would take '٧' too).
VERSION_POLICY_PATTERN = r"^\s*(latest:\s*[1-9][0-9]*|specific:\s*[1-9][0-9]*(\s*,\s*[1-9][0-9]*)*|all)\s*$"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
BatchingMode = Literal["continuous", "static", "none"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- where and how to serve --------------------------------------------------------------
    model_repository: Path = Field(Path("model_artifacts"), description="Models as <name>/<version>/ bundles.")
    model_name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The repository model served (its versions by MODEL_VERSION_POLICY).",
    )
    model_version_policy: str = Field(
        "latest:1",
        pattern=VERSION_POLICY_PATTERN,
        description="Versions served: latest:N, specific:V1,V2 (a pin) or all; unversioned requests go to the highest.",
    )
    model_poll_interval_s: float = Field(
        10.0, ge=0, description="How often the repository is checked for new versions; 0: only POST /admin/reload."
    )
    artifacts_dir: Path | None = Field(
        None,
        description="One bundle to serve instead of the repository (no versions, no reload), or one "
        "model's directory of versions.",
    )
    host: str = Field("127.0.0.1", description="Interface to bind; the Docker image sets 0.0.0.0.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    log_level: LogLevel = Field("INFO", description="Threshold of the JSON log lines on stderr.")
    api_key: SecretStr | None = Field(
        None, description="When set, /caption and /model require it (Authorization: Bearer or X-API-Key)."
    )
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins whose web pages may call the API from a browser (CORS), e.g. "
        "https://app.example.com; * for any. Unset: none (same-origin pages, such as the demo page, need none).",
    )

    # --- request limits ----------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted image file.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest width*height, checked before decoding.")
    min_image_side: int = Field(8, ge=1, description="Smallest accepted width and height.")
    max_jpeg_scans: int = Field(
        100, ge=1, description="Most scans in a JPEG (a progressive decode walks the image once per scan)."
    )
    max_tiff_strips: int = Field(
        16_384,
        ge=1,
        description="Most strips or tiles in a TIFF beyond one per 1024 pixels, read from its header before the file "
        "is opened (Pillow builds an object for each when it opens the file and walks them all to decode: a 4 MB "
        "file of a million one-row strips took seconds and 300 MB). A picture of a row a strip, as libtiff writes "
        "rows of 4 KB or more, passes up to 16384 rows whatever its width, and beyond when its rows are 1024 "
        "pixels or more.",
    )
    max_tiff_tags: int = Field(
        1024,
        ge=16,
        description="Most entries in a TIFF's first directory, read before the file is opened (Pillow reads each "
        "in Python: 21,000 junk entries in 254 kB cost 0.2 s on the event loop). Real files carry tens.",
    )
    max_png_text_bytes: int = Field(
        2 * 2**20,
        ge=1024,
        description="Most bytes a PNG's text chunks (metadata: tEXt, zTXt, iTXt) may take once inflated; Pillow "
        "inflates them all when it opens the file (a 186 kB file carried 63 MB). Applies to the whole process.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline per /caption request, queueing included.")
    decode_concurrency: int = Field(4, ge=1, description="Worker threads decoding uploads (a bounded pool).")
    max_images_per_request: int = Field(16, ge=1, description="Most images in one POST /captions request.")
    oip_max_json_items: int = Field(
        4096,
        ge=64,
        description="Most JSON values (counted by commas) in an OIP inference request's JSON; more is 400 before it "
        "is parsed (millions of empty values in a 10 MB body stalled the event loop for seconds).",
    )
    out_of_domain: Literal["caption", "reject"] = Field(
        "caption",
        description="Images the model's domain check flags: captioned anyway (flagged in_domain=false) "
        "or refused with 422 out_of_domain.",
    )

    # --- hostile clients (docs/HARDENING.md) -------------------------------------------------
    decode_memory_mb: int = Field(
        512,
        ge=1,
        description="Memory budget for decoding, weighted by each image's pixels and bit depth "
        "(known from its header); decodes past it wait, and one image larger than the whole budget is refused "
        "(422 image_too_large). Under a container memory limit it is lowered to what the limit leaves once "
        "twice the warmed-up process's anonymous memory is counted (at least 32 MiB); the ready log record says "
        "what applies.",
    )
    malloc_arenas: int = Field(
        0,
        ge=0,
        description="Cap on glibc malloc arenas (like MALLOC_ARENA_MAX): less memory kept per thread, "
        "but a slower model under load (2 cost ~15% captions/s in one A/B); 0 leaves glibc's default.",
    )
    max_concurrent_uploads: int = Field(
        64,
        ge=1,
        description="Request bodies being read at once; past it a POST gets 503 + Retry-After at once.",
    )
    max_uploads_per_client: int = Field(
        16,
        ge=0,
        description="Request bodies one client address may have being read at once; past it a POST gets 429 + "
        "Retry-After, so one client's idle uploads cannot hold every MAX_CONCURRENT_UPLOADS slot. The address is "
        "the one uvicorn gives: behind a proxy, list the proxy in FORWARDED_ALLOW_IPS so that it is the client's, "
        "not the proxy's (every client would share the proxy's). 0: no limit per client.",
    )
    upload_memory_mb: int = Field(
        128,
        ge=1,
        description="Request body bytes held at once, all requests together, counted as they arrive and held "
        "until the answer is sent (a body waits for decode memory and the model); past it a POST gets 503 + "
        "Retry-After, at the door or while its body arrives. One request alone may hold more (up to "
        "MAX_UPLOAD_BYTES). The process holds up to about twice this while bodies are joined and read.",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time for a request body to arrive, plus its size at MIN_UPLOAD_BYTES_PER_S; past it, 408.",
    )
    min_upload_bytes_per_s: int = Field(
        50_000,
        ge=1,
        description="Slowest accepted upload rate beyond BODY_TIMEOUT_S (a 10 MB body gets 200 s more).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's headers must arrive within this of the connection (or of the request's "
        "first byte, or of any byte between requests); else the connection is closed (408 JSON if part of a "
        "request came). Against slowloris.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line plus headers; beyond it 431 JSON and the connection is closed.",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="While an answer waits in the connection's write buffer, the client must take some of it "
        "within this; else the connection is aborted (nginx's send_timeout).",
    )
    max_pipelined_requests: int = Field(
        32,
        ge=1,
        description="Requests a connection may send ahead of their answers (HTTP pipelining) beyond the running "
        "one; the next gets 503 JSON `too_many_pipelined` in its turn and the connection closes after it.",
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="An idle keep-alive connection is closed after this long. Behind a proxy or load "
        "balancer that pools connections, set it above the proxy's idle timeout (nginx and AWS ALB: 60 s), "
        "or a request the proxy sends as the server closes fails as a 502.",
    )

    # --- inference engine (app.engine) -------------------------------------------------------
    batching_mode: BatchingMode = Field(
        "continuous", description="continuous (step-level batching), static (request-level) or none."
    )
    max_batch_size: int = Field(32, ge=1, le=64, description="Decode slots / images per batch.")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="Static batching: wait this long to fill a batch.")
    max_queue_size: int = Field(
        256,
        ge=1,
        description="Admitted requests not yet decoding (queued, being encoded or encoded ahead), per served "
        "model version; beyond it 503 + Retry-After.",
    )
    client_queue_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Part of MAX_QUEUE_SIZE one client address may hold with its images waiting in the engine, "
        "so that one client's flood cannot fill the queue for everyone; counted as places, an image queued or "
        "being captioned, of which it holds at most this share of MAX_QUEUE_SIZE plus MAX_BATCH_SIZE (a lone client "
        "still fills a batch). Past it, that client's "
        "next request waits at the door up to 1 s for one of its images to be answered, then gets 429 "
        "too_many_queued + Retry-After; images of requests already let in wait for a place (within the request's "
        "deadline) instead of being refused. The address is as for MAX_UPLOADS_PER_CLIENT (behind a proxy, list it "
        "in FORWARDED_ALLOW_IPS); requests with no address are not limited. 1: no limit per client.",
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time to finish in-flight requests on SIGTERM.")
    inference_threads: int = Field(
        0,
        ge=0,
        description="TensorFlow intra-op threads; 0: one fewer than the CPUs this process may use (its affinity and "
        "its container's CPU quota, rounded up), leaving one to the event loop.",
    )
    max_encode_batch: int = Field(
        32, ge=1, description="Continuous batching: most images per encoder call (capped at MAX_BATCH_SIZE)."
    )
    greedy_steps_per_call: int = Field(
        8,  # as captioning.captioner.GREEDY_STEPS, the offline path's (docs/ENGINE-HISTORY.md, round 20)
        ge=1,
        le=8,
        description="Greedy decoding: decoder steps per compiled call while every active row is greedy (multi-step "
        "decoding; rows join and leave between calls). 1: one step per call.",
    )
    freeze_gc: bool = Field(
        True,
        description="After warm-up, freeze the model's objects out of Python's cyclic garbage collector.",
    )
    encode_ahead: bool = Field(
        True, description="Continuous batching: encode images in a thread of their own (else inline, before a step)."
    )
    encoder_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The image encoder's arithmetic, its batch normalisation folded into the convolutions either way: "
        "bfloat16 about halves the encoder's time on CPUs with native bfloat16 (AVX512_BF16, AMX) and rarely changes "
        "a caption; auto: bfloat16 on such a CPU without a GPU, else float32 (app.resources.encoder_precision).",
    )
    inference_nice: int = Field(
        0, ge=0, le=19, description="Nice value of the model's threads (0: same priority as the event loop)."
    )
    compile_cache_dir: Path | None = Field(
        Path("~/.cache/captioning-xla"),
        description="XLA's persistent compilation cache (start-up reuses compiled batch shapes); empty: off.",
    )

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _empty_path_means_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", "batching_mode", "encoder_precision", mode="before")
    @classmethod
    def _normalise_case(cls, value: object, info) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_means_none(cls, value: object) -> object:
        # `API_KEY=` in a compose file or .env means "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value


def misspelt_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it resembles) for environment variables that are not settings but
    nearly spell one (`MAX_UPLOAD_BYTE`): ignored as they are, the setting keeps its default
    without a word."""
    names = [name.upper() for name in Settings.model_fields]
    found = []
    for variable in environ:
        upper = variable.upper()
        if upper in names:
            continue
        close = difflib.get_close_matches(upper, names, n=1, cutoff=0.85)
        if close:
            found.append((variable, close[0]))
    return sorted(found)
