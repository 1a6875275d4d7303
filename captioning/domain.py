"""Out-of-domain detection: is an image like the ones the model was trained on?

The encoder's features of an image [N, D] are pooled into one vector (the mean and the standard
deviation over the N grid positions: what is there, and how much it varies across the image).
`DomainModel` holds a Gaussian fitted to those vectors over the training images (mean and a
shrunk covariance, training/fit_domain.py) and scores an image by its Mahalanobis distance d
from it:

    domain_score = 2 ** -((d / threshold) ** 2)      1 at the centre, 0.5 at the threshold
    in_domain    = domain_score >= 0.5                 (d <= threshold)

The threshold is a margin over the distances of held-out in-domain (validation) images, so nearly
every image the model was trained to caption is accepted. Stored in the bundle as domain.npz
(plain arrays, read with allow_pickle=False) and verified by the manifest like every other file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "domain.npz"


def pool_features(features: np.ndarray) -> np.ndarray:
    """Encoder features [B, N, D] -> pooled [B, 2D]: mean and standard deviation over positions."""
    features = np.asarray(features, np.float64)
    return np.concatenate([features.mean(axis=1), features.std(axis=1)], axis=1)


@dataclass(frozen=True)
class DomainModel:
    mean: np.ndarray  # [F]
    precision: np.ndarray  # [F, F], the inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance at which domain_score is 0.5

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        centred = np.asarray(pooled, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("bf,fg,bg->b", centred, self.precision, centred), 0.0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Encoder features [B, N, D] -> domain scores [B] in (0, 1]."""
        ratio = self.distances(pool_features(features)) / self.threshold
        return np.exp2(-np.minimum(ratio**2, 1000.0))

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean, precision=self.precision, threshold=np.array(self.threshold))

    @classmethod
    def load(cls, path: str | Path) -> "DomainModel":
        with np.load(path, allow_pickle=False) as data:
            mean, precision, threshold = data["mean"], data["precision"], float(data["threshold"])
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or not threshold > 0:
            raise ValueError(f"{path}: malformed domain model")
        return cls(mean.astype(np.float64), precision.astype(np.float64), threshold)


IN_DOMAIN_SCORE = 0.5


def fit_domain(train_pooled: np.ndarray, held_out_pooled: np.ndarray, *, quantile: float = 0.995,
               margin: float = 1.25, shrinkage: float = 0.05) -> DomainModel:
    """A Gaussian on the training images' pooled features; the threshold is `margin` times the
    `quantile` of the held-out in-domain images' distances."""
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
    model = DomainModel(mean, precision, 1.0)
    held_out = model.distances(held_out_pooled)
    return DomainModel(mean, precision, float(margin * np.quantile(held_out, quantile)))
