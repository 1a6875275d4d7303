"""Model configuration: plain values, saved as config.json beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# How an encoder may be served (captioning.inference); here, free of TensorFlow, so that the service
# can resolve its ENCODER_PRECISION setting before TensorFlow is imported (app.resources).
ENCODER_PRECISIONS = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # see captioning.backbones.BACKBONES
    weights: str | None = None  # None, "imagenet", or a path to a local weights file
    trainable_backbone: bool = True
    image_size: int = 64  # square input, pixels
    attention_dim: int = 256  # encoder projection size == GRU units (dot-product attention)
    embedding_dim: int = 128
    attention: str = "luong"  # "luong" (dot product) or "bahdanau" (additive)
    vocab_size: int = 64  # set from the tokenizer when training starts
    max_length: int = 32  # tokens per caption, counting <start> and <end>
    dropout: float = 0.0
    input_feeding: bool = False  # the GRU also reads the previous step's attention context (captioning.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
