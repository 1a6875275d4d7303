"""Service configuration, read from environment variables (no prefix) by pydantic-settings.

Every field below is one environment variable of the same name in upper case, e.g.
``MAX_UPLOAD_BYTES=5000000``. Invalid values stop start-up with pydantic's message naming the
variable. See the README's configuration table for the same list with defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
BatchingMode = Literal["continuous", "static", "none"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- where and how to serve --------------------------------------------------------------
    artifacts_dir: Path = Field(Path("model_artifacts/default"), description="Model bundle to serve.")
    host: str = Field("127.0.0.1", description="Interface to bind; the Docker image sets 0.0.0.0.")
    port: int = Field(8000, ge=1, le=65535)
    log_level: LogLevel = "INFO"
    api_key: SecretStr | None = Field(
        None, description="When set, /caption and /model require it (Authorization: Bearer or X-API-Key)."
    )

    # --- request limits ----------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted image file.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest width*height, checked before decoding.")
    min_image_side: int = Field(8, ge=1, description="Smallest accepted width and height.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline per /caption request, queueing included.")
    decode_concurrency: int = Field(4, ge=1, description="Uploads decoded at once (bounds decode memory).")
    max_images_per_request: int = Field(16, ge=1, description="Most images in one POST /captions request.")

    # --- inference engine (app.engine) -------------------------------------------------------
    batching_mode: BatchingMode = "continuous"
    max_batch_size: int = Field(32, ge=1, le=64, description="Decode slots / images per batch.")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="Static batching: wait this long to fill a batch.")
    max_queue_size: int = Field(256, ge=1, description="Admitted requests waiting; beyond it 503 + Retry-After.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time to finish in-flight requests on SIGTERM.")
    inference_threads: int = Field(
        0, ge=0, description="TensorFlow intra-op threads; 0: one fewer than the CPUs, leaving one to the event loop."
    )

    encode_ahead: bool = Field(
        True, description="Continuous batching: encode images in a thread of their own (else inline, before a step)."
    )
    inference_nice: int = Field(
        0, ge=0, le=19, description="Nice value of the model's threads (0: same priority as the event loop)."
    )
    compile_cache_dir: Path | None = Field(
        Path.home() / ".cache" / "captioning-xla",
        description="XLA's persistent compilation cache (start-up reuses compiled batch shapes); empty: off.",
    )

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _empty_path_means_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", "batching_mode", mode="before")
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
