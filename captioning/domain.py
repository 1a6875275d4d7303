"""Out-of-domain detection: is an image like the ones the model was trained on?

Two tests, both fitted on the training images only (training/fit_domain.py), each giving a ratio
that is <= 1 for an image like them:

  - encoder features: the encoder's feature grid [N, D] pooled into one vector (mean and standard
    deviation over the N positions), scored by its Mahalanobis distance d from a Gaussian fitted to
    the training images (mean, covariance shrunk towards a scaled identity); ratio d / threshold,
    the threshold a margin over the distances of held-out validation images;
  - image statistics of the model's input, after the resize (`image_statistics`): how much of the
    image stands out from the background, how much of that is one of the six named colours, how
    busy the background is, strong edges away from named colours, fine-grain (high-frequency) energy.
    Each has an interval spanning the training images (0.1%-99.9% quantiles, widened); the ratio
    is the largest |x - centre| / half-width.

    domain_score = 2 ** -(max(ratios) ** 2)     1 typical, 0.5 at the edge of the domain
    in_domain    = domain_score >= 0.5

The pooled encoder features alone separate photographs poorly (measured: docs/MODEL.md): the
encoder learnt to ignore textures and backgrounds, which is what makes it robust in its domain.
Stored in the bundle as domain.npz (plain arrays, read with allow_pickle=False) and verified by
the manifest like every other file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "domain.npz"


NAMED_COLOURS = np.array(
    [(225, 35, 35), (40, 200, 60), (45, 95, 245), (245, 225, 40), (170, 60, 220), (255, 140, 20)], np.float64
)  # red green blue yellow purple orange
STATISTICS = ("foreground_share", "named_colour_share", "background_residual", "stray_edges", "high_frequency")
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour that counts as foreground
NAMED_DISTANCE = 80.0  # RGB distance to a named colour that counts as that colour


@functools.cache
def _named_colour_table() -> np.ndarray:
    """For every 24-bit RGB value (r << 16 | g << 8 | b): is it within NAMED_DISTANCE of a named
    colour? 16 MiB, built once; a look-up per pixel is ~6x cheaper than the distances. Only the
    cube around each colour can be within reach, so only it is computed: 0.03 s against 0.3 s for
    the whole table per colour, on the way to the service's readiness (its first request)."""
    table = np.zeros((256, 256, 256), bool)
    reach = int(np.ceil(NAMED_DISTANCE)) - 1  # farther along any one channel is out of reach
    for colour in NAMED_COLOURS.astype(np.int32):
        low, high = np.maximum(colour - reach, 0), np.minimum(colour + reach, 255) + 1
        red, green, blue = (np.arange(lo, hi, dtype=np.int32) - c for lo, hi, c in zip(low, high, colour))
        squared = (red**2)[:, None, None] + (green**2)[None, :, None] + (blue**2)[None, None, :]
        table[low[0] : high[0], low[1] : high[1], low[2] : high[2]] |= squared < NAMED_DISTANCE**2
    return table.reshape(-1)


def _channel_max(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(values[..., 0], values[..., 1]), values[..., 2])


STATISTICS_CHUNK = 8  # images per vectorised pass: the temporaries stay in the CPU cache (measured 1.7x faster than 32)


def image_statistics(images: np.ndarray, frame: int = 0) -> np.ndarray:
    """uint8 model inputs [B, S, S, 3] -> [B, len(STATISTICS)] (see the module docstring), of the
    image without `frame` pixels at each edge (the background is then read just inside them).
    Vectorised over the batch, in chunks: the service computes it for every encoded batch."""
    pixels = np.asarray(images)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected images [B, S, S, 3], got shape {pixels.shape}")
    if frame:
        pixels = pixels[:, frame:-frame, frame:-frame]
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if len(pixels) <= STATISTICS_CHUNK:
        return _statistics(pixels)
    return np.concatenate(
        [_statistics(pixels[start : start + STATISTICS_CHUNK]) for start in range(0, len(pixels), STATISTICS_CHUNK)]
    )


def _statistics(pixels: np.ndarray) -> np.ndarray:
    image = pixels.astype(np.float32)
    batch, height, width = pixels.shape[:3]
    ring = np.concatenate(
        [
            image[:, :2].reshape(batch, -1, 3),
            image[:, -2:].reshape(batch, -1, 3),
            image[:, :, :2].reshape(batch, -1, 3),
            image[:, :, -2:].reshape(batch, -1, 3),
        ],
        axis=1,
    )
    background = np.median(ring, axis=1)
    # The distance channel by channel, in place: 6x faster than an einsum over the channel axis
    # (which numpy runs as a naive loop) and the same float32 sums, bit for bit.
    from_background = np.zeros(image.shape[:3], np.float32)
    for channel in range(3):
        offset = image[..., channel] - background[:, channel, None, None]
        offset *= offset
        from_background += offset
    np.sqrt(from_background, out=from_background)
    foreground = from_background > FOREGROUND_DISTANCE

    wide = pixels.astype(np.int32)
    named = _named_colour_table()[(wide[..., 0] << 16) | (wide[..., 1] << 8) | wide[..., 2]]

    area = height * width
    foreground_count = foreground.sum(axis=(1, 2))
    named_share = np.where(
        foreground_count >= 4, (named & foreground).sum(axis=(1, 2)) / np.maximum(foreground_count, 1), 1.0
    )
    background_count = area - foreground_count
    residual = np.where(
        background_count > 0,
        np.where(foreground, 0.0, from_background).sum(axis=(1, 2)) / np.maximum(background_count, 1),
        255.0,
    )
    step_x = _channel_max(np.abs(np.diff(wide, axis=2)))[:, :-1, :]
    step_y = _channel_max(np.abs(np.diff(wide, axis=1)))[:, :, :-1]
    near_named = named[:, :-1, :-1] | named[:, 1:, :-1] | named[:, :-1, 1:] | named[:, 1:, 1:]
    stray = (((step_x > 60) | (step_y > 60)) & ~near_named).mean(axis=(1, 2))
    rows = image[:, :, :-2] + image[:, :, 1:-1] + image[:, :, 2:]  # the 3x3 box mean, separably
    box = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9
    high_frequency = np.abs(image[:, 1:-1, 1:-1] - box).mean(axis=(1, 2, 3))
    return np.stack([foreground_count / area, named_share, residual, stray, high_frequency], axis=1).astype(np.float64)


def pool_features(features: np.ndarray) -> np.ndarray:
    """Encoder features [B, N, D] -> pooled [B, 2D]: mean and standard deviation over positions."""
    features = np.asarray(features, np.float64)
    return np.concatenate([features.mean(axis=1), features.std(axis=1)], axis=1)


@dataclass(frozen=True)
class DomainModel:
    mean: np.ndarray  # [F] pooled encoder features
    precision: np.ndarray  # [F, F], the inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance at which the encoder ratio is 1
    statistics_low: np.ndarray  # [len(STATISTICS)] the in-domain interval of each image statistic
    statistics_high: np.ndarray
    frame: int = 0  # pixels at each edge the statistics leave out (0 in bundles fitted before it existed)

    def image_statistics(self, images: np.ndarray) -> np.ndarray:
        """The statistics this model's intervals were fitted on."""
        return image_statistics(images, self.frame)

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        centred = np.asarray(pooled, np.float64) - self.mean
        # (centred @ precision) row-wise dot centred: a BLAS matmul; the equivalent three-operand
        # einsum runs as one naive loop, 8x slower at a batch of 32 (this runs on every encoded batch).
        return np.sqrt(np.maximum(((centred @ self.precision) * centred).sum(axis=1), 0.0))

    def statistics_ratio(self, statistics: np.ndarray) -> np.ndarray:
        centre = (self.statistics_low + self.statistics_high) / 2
        half = np.maximum((self.statistics_high - self.statistics_low) / 2, 1e-9)
        return (np.abs(statistics - centre) / half).max(axis=1)

    def scores(self, features: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Encoder features [B, N, D] and the model inputs [B, S, S, 3] -> domain scores [B] in (0, 1]."""
        return self.combined_scores(pool_features(features), self.image_statistics(images))

    def combined_scores(self, pooled: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """The same from pooled features and self.image_statistics() computed apart: the engine's encoder
        pools in its graph (FeatureSlots.encode), and a thread of its own computes the statistics."""
        ratio = np.maximum(self.distances(pooled) / self.threshold, self.statistics_ratio(statistics))
        return np.exp2(-np.minimum(ratio**2, 1000.0))

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            precision=self.precision,
            threshold=np.array(self.threshold),
            statistics_low=self.statistics_low,
            statistics_high=self.statistics_high,
            frame=np.array(self.frame),
        )

    @classmethod
    def load(cls, path: str | Path) -> DomainModel:
        with np.load(path, allow_pickle=False) as data:
            mean, precision, threshold = data["mean"], data["precision"], float(data["threshold"])
            low, high = data["statistics_low"], data["statistics_high"]
            frame = int(data["frame"]) if "frame" in data.files else 0
        if (
            not 0 <= frame < MAX_FRAME
            or mean.ndim != 1
            or precision.shape != (mean.size, mean.size)
            or not threshold > 0
            or low.shape != (len(STATISTICS),)
            or high.shape != low.shape
        ):
            raise ValueError(f"{path}: malformed domain model")
        return cls(
            mean.astype(np.float64),
            precision.astype(np.float64),
            threshold,
            low.astype(np.float64),
            high.astype(np.float64),
            frame,
        )


IN_DOMAIN_SCORE = 0.5
MAX_FRAME = 16  # pixels at each edge the statistics may leave out


def fit_domain(
    train_pooled: np.ndarray,
    held_out_pooled: np.ndarray,
    train_statistics: np.ndarray,
    *,
    quantile: float = 0.995,
    margin: float = 1.5,
    shrinkage: float = 0.05,
    statistics_quantile: float = 0.001,
    widen: float = 0.25,
    frame: int = 0,
) -> DomainModel:
    """A Gaussian on the training images' pooled features (threshold: `margin` times the `quantile`
    of the held-out in-domain images' distances), and per image statistic the training images'
    [statistics_quantile, 1 - statistics_quantile] interval widened by `widen` of its width each
    way, except below the foreground share: an image with nothing standing out has no objects.
    `frame`: what train_statistics were computed with (image_statistics), kept with the model."""
    if not 0 <= frame < MAX_FRAME:
        raise ValueError(f"frame must be in [0, {MAX_FRAME}), got {frame}")
    train_pooled = np.asarray(train_pooled, np.float64)
    if train_pooled.ndim != 2 or train_pooled.shape[0] < 2:
        raise ValueError("need pooled features of at least two training images")
    mean = train_pooled.mean(axis=0)
    covariance = np.cov(train_pooled, rowvar=False)
    # Shrinking towards a scaled identity keeps the inverse stable for directions the training
    # images barely vary in (dead ReLU units), instead of calling any change there infinitely far.
    scale = np.trace(covariance) / covariance.shape[0]
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    precision = np.linalg.inv(covariance)
    statistics = np.asarray(train_statistics, np.float64)
    low, high = (
        np.quantile(statistics, statistics_quantile, axis=0),
        np.quantile(statistics, 1 - statistics_quantile, axis=0),
    )
    width = high - low
    low, high = low - widen * width, high + widen * width
    low[0] = 0.5 * np.quantile(statistics[:, 0], statistics_quantile)
    model = DomainModel(mean, precision, 1.0, low, high, frame)
    held_out = model.distances(held_out_pooled)
    return DomainModel(mean, precision, float(margin * np.quantile(held_out, quantile)), low, high, frame)
