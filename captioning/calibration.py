"""Caption confidence as a calibrated probability of being right.

The decoder's raw confidence is the geometric-mean token probability of the caption. It ranks
captions sensibly but is not a probability of anything: wording choices ("a" or "one", "there is"
or not) spread probability over equally true captions. `Calibration` maps it to the probability
that the caption is correct, fitted once on the validation split against the grounded checker
(training/calibrate.py), and stored in the bundle as calibration.json:

    calibrated = sigmoid(slope * mean_token_log_prob + bias)

that is temperature scaling (1 / slope) with a bias, on the caption's mean token log-probability,
fitted by logistic regression (Platt scaling). Both the offline Captioner and the service apply it.
A second fit, on captions decoded with mirror_view, serves those (`Calibration.mirror_view`).
Grounded decoding (captioning.grounding) knows more than the log-probability: whether the caption
agrees with the scene head's reading of the image. A caption that agrees is right far more often
than one with the same log-probability that does not, so grounded captions get two fits of their
own, one per answer (`Calibration.agreeing`, `.disagreeing`).

The captions of an n-best below the first are mostly other wordings of the same scene: their
log-probability is lower because the model spread it over wordings, not because they are wrong
(default/5's second beam caption: right 0.955 of the time, the greedy fit said 0.59). So they
have fits of their own too (`*_lower`: beam, sample, and grounded by answer), fitted on the n-best
below the first. `for_caption` picks the fit for a caption; a fit missing from the file (a bundle
calibrated before it existed) falls back to the greedy one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "calibration.json"
METHOD = "platt_mean_token_log_prob"


@dataclass(frozen=True)
class Calibration:
    slope: float
    bias: float
    fitted_on: str = ""  # e.g. "shapes_wide/val, 1000 images, greedy"
    # Fitted on captions decoded with mirror_view (captioning.mirror), whose averaged log-probabilities
    # are a little less sure of right answers; None: this calibration serves both.
    mirror_view: Calibration | None = None
    # Fitted on grounded beam captions that agree with the scene head's reading, and on those that
    # do not; None (bundles calibrated before round 34, or without a head): the greedy fit serves them.
    agreeing: Calibration | None = None
    disagreeing: Calibration | None = None
    # Fitted on the captions of an n-best below the first: of a beam search, of a sampler, and of a
    # grounded beam by answer. None: the fit of the first caption's decoding serves them.
    beam_lower: Calibration | None = None
    sample_lower: Calibration | None = None
    agreeing_lower: Calibration | None = None
    disagreeing_lower: Calibration | None = None

    def apply(self, raw_confidence: float) -> float:
        mean_log_prob = math.log(max(raw_confidence, 1e-12))
        z = self.slope * mean_log_prob + self.bias
        return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0

    def for_caption(
        self, strategy: str, mirror_view: bool, rank: int = 0, agrees_with_scene: bool | None = None
    ) -> Calibration:
        """The fit for a caption: the strategy that decoded it, its place in the n-best (0 the
        first), and a grounded caption's answer (None for any other). The fits below the first
        caption and the grounded ones were made without the mirror view, and serve it too."""
        lower = rank > 0
        if agrees_with_scene is not None:
            fits = {True: (self.agreeing, self.agreeing_lower), False: (self.disagreeing, self.disagreeing_lower)}
            fit = fits[agrees_with_scene][lower]
        else:
            fit = {"beam": self.beam_lower, "sample": self.sample_lower}.get(strategy) if lower else None
        if fit is not None:
            return fit
        return self.mirror_view if mirror_view and self.mirror_view is not None else self

    def save(self, path: str | Path) -> None:
        values = {"method": METHOD, **_parameters(self)}
        for name in VARIANTS:
            if getattr(self, name) is not None:
                values[name] = _parameters(getattr(self, name))
        Path(path).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        values = json.loads(Path(path).read_text())
        if values.get("method") != METHOD:
            raise ValueError(f"{path}: unknown calibration method {values.get('method')!r}")
        variants = {name: _from_parameters(values[name], path) for name in VARIANTS if values.get(name) is not None}
        return dataclasses.replace(_from_parameters(values, path), **variants)


# The fits for other decodings, by field name.
VARIANTS = (
    "mirror_view",
    "agreeing",
    "disagreeing",
    "beam_lower",
    "sample_lower",
    "agreeing_lower",
    "disagreeing_lower",
)


def _parameters(calibration: Calibration) -> dict:
    return {"slope": calibration.slope, "bias": calibration.bias, "fitted_on": calibration.fitted_on}


def _from_parameters(values: dict, path) -> Calibration:
    slope, bias = float(values["slope"]), float(values["bias"])
    if not (math.isfinite(slope) and math.isfinite(bias)):
        raise ValueError(f"{path}: calibration parameters must be finite numbers")
    return Calibration(slope, bias, str(values.get("fitted_on", "")))


def fit_calibration(raw_confidences, correct, fitted_on: str = "", l2: float = 1e-3, steps: int = 50) -> Calibration:
    """Logistic regression of `correct` (0/1) on log(raw confidence), by Newton's method."""
    x = np.log(np.clip(np.asarray(raw_confidences, np.float64), 1e-12, 1.0))
    y = np.asarray(correct, np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("need one correctness label per confidence, and at least one")
    design = np.stack([x, np.ones_like(x)], axis=1)
    weights = np.array([1.0, 0.0])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ weights, -500, 500)))
        gradient = design.T @ (p - y) + l2 * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-9:
            break
    return Calibration(float(weights[0]), float(weights[1]), fitted_on)


def expected_calibration_error(confidences, correct, bins: int = 10) -> float:
    """ECE: the gap |accuracy - mean confidence| per equal-width confidence bin, weighted by the
    bin's share of the captions."""
    confidences = np.asarray(confidences, np.float64)
    correct = np.asarray(correct, np.float64)
    if confidences.size == 0:
        raise ValueError("no confidences")
    index = np.minimum((confidences * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidences[members].mean())
    return float(error)
