"""The library API: load a bundle, caption images, and the encode/step pieces a scheduler needs.

Both pieces run as tf.functions with fixed input signatures, and batches are padded up to a few
bucket sizes so that each shape's kernels are prepared once, at warm-up, not on a live request.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import captioning.backbones  # noqa: E402,F401  (registers the custom layers for safe loading)
from captioning.artifacts import ArtifactError, verify_bundle  # noqa: E402
from captioning.config import ModelConfig  # noqa: E402
from captioning.decoding import DecodeOptions, Caption, new_search  # noqa: E402
from captioning.model import DecoderStep  # noqa: E402
from captioning.tokenizer import Tokenizer  # noqa: E402

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def bucket_for(batch: int) -> int:
    """The smallest bucket that holds `batch` rows (batches over the largest are split by callers)."""
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    raise ValueError(f"batch of {batch} exceeds the largest bucket {BATCH_BUCKETS[-1]}")


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.zeros((rows - array.shape[0],) + array.shape[1:], dtype=array.dtype)
    return np.concatenate([array, padding])


class Captioner:
    def __init__(self, encoder: keras.Model, decoder: keras.Model, tokenizer: Tokenizer, config: ModelConfig,
                 manifest: dict | None = None):
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self.manifest = manifest or {}
        self.num_positions, self.state_size = encoder.output.shape[1], encoder.output.shape[2]
        side = int(round(self.num_positions ** 0.5))
        self.grid_shape = (side, self.num_positions // side)
        size = config.image_size
        self._encode = tf.function(
            lambda images: encoder(tf.cast(images, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
        )
        self._step = tf.function(
            DecoderStep(decoder),
            input_signature=[
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, self.state_size], tf.float32),
                tf.TensorSpec([None, self.num_positions, self.state_size], tf.float32),
            ],
        )

    @classmethod
    def load(cls, bundle: str | Path) -> "Captioner":
        bundle = Path(bundle)
        manifest = verify_bundle(bundle)
        try:
            config = ModelConfig.load(bundle / "config.json")
            tokenizer = Tokenizer.load(bundle / "vocab.json")
            encoder = keras.saving.load_model(bundle / "encoder.keras", compile=False, safe_mode=True)
            decoder = keras.saving.load_model(bundle / "decoder.keras", compile=False, safe_mode=True)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{bundle}: could not load the bundle: {exc}") from exc
        if len(tokenizer) != config.vocab_size:
            raise ArtifactError(f"{bundle}: vocabulary has {len(tokenizer)} words, config says {config.vocab_size}")
        return cls(encoder, decoder, tokenizer, config, manifest)

    # --- the pieces a scheduler drives -------------------------------------------------------

    def prepare(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Any PIL image or HxWx3 uint8 array -> the model's uint8 input [S, S, 3]."""
        size = self.config.image_size
        if isinstance(image, np.ndarray):
            if image.shape == (size, size, 3) and image.dtype == np.uint8:
                return image
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> features [B, N, D], padded to a bucket internally."""
        rows = images.shape[0]
        return self._encode(_pad_rows(images, bucket_for(rows))).numpy()[:rows]

    def step(self, tokens: np.ndarray, state: np.ndarray, features: np.ndarray):
        """One decoder step for B rows -> (log_probs [B, V], new state [B, D], attention [B, N])."""
        rows = tokens.shape[0]
        bucket = bucket_for(rows)
        log_probs, new_state, attention = self._step(
            _pad_rows(tokens.astype(np.int32, copy=False), bucket),
            _pad_rows(state, bucket),
            _pad_rows(features, bucket),
        )
        return log_probs.numpy()[:rows], new_state.numpy()[:rows], attention.numpy()[:rows]

    def zero_state(self, rows: int) -> np.ndarray:
        return np.zeros((rows, self.state_size), dtype=np.float32)

    def max_steps(self, options: DecodeOptions) -> int:
        """Tokens to generate at most: a caption cut at the limit has no <end>."""
        trained = self.config.max_length - 2
        words = trained if options.max_length is None else min(options.max_length, trained)
        return words

    def warmup(self, buckets: tuple[int, ...] = BATCH_BUCKETS) -> None:
        """Runs every bucket shape once, so no live request pays for kernel preparation."""
        size = self.config.image_size
        for rows in buckets:
            features = self.encode(np.zeros((rows, size, size, 3), np.uint8))
            self.step(np.zeros(rows, np.int32), self.zero_state(rows), features)

    # --- offline captioning --------------------------------------------------------------------

    def caption(self, images, options: DecodeOptions = DecodeOptions(), batch_size: int = 32) -> list[list[Caption]]:
        """Captions for each image (n-best lists, best first). Images: PIL images or uint8 arrays."""
        options.validate()
        results: list[list[Caption]] = []
        per_batch = max(1, batch_size // options.width)
        for start in range(0, len(images), per_batch):
            chunk = np.stack([self.prepare(image) for image in images[start : start + per_batch]])
            results.extend(self._caption_batch(chunk, options))
        return results

    def _caption_batch(self, images: np.ndarray, options: DecodeOptions) -> list[list[Caption]]:
        searches = [new_search(options, self.max_steps(options)) for _ in range(len(images))]
        width = options.width
        features = np.repeat(self.encode(images), width, axis=0)
        state = self.zero_state(len(features))
        tokens = np.concatenate([s.start_tokens() for s in searches])
        active = list(range(len(searches)))
        while active:
            rows = np.concatenate([np.arange(i * width, (i + 1) * width) for i in active])
            log_probs, new_state, attention = self.step(tokens[rows], state[rows], features[rows])
            still_active = []
            for n, i in enumerate(active):
                mine = slice(n * width, (n + 1) * width)
                next_tokens, parents = searches[i].advance(log_probs[mine], attention[mine])
                tokens[i * width : (i + 1) * width] = next_tokens
                state[i * width : (i + 1) * width] = new_state[mine][parents]
                if not searches[i].finished:
                    still_active.append(i)
            active = still_active
        return [search.results(self.tokenizer) for search in searches]
