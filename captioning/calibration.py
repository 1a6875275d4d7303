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
than one with the same log-probability that does not, so grounded captions get fits of their own
by answer.

The captions of an n-best below the first are mostly other wordings of the same scene: their
log-probability is lower because the model spread it over wordings, not because they are wrong
(default/5's second beam caption: right 0.955 of the time, the greedy fit said 0.59), and how
often they are right depends on their rank and on how many candidates there were (the third of
three grounded captions that disagrees is right 0.20 of the time, the third of ten 0.78). So an
n-best of the width the fits were made on (`Calibration.ranked_width`, 3: the default beam) has
fits by rank (`Calibration.ranks`): a beam's, a sampler's, and a grounded beam's by answer.
`for_caption` picks the fit for a caption; any other width, and a bundle calibrated before
these fits existed, gets the greedy (or mirror) fit, as every caption did before.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
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
    # The fits of the captions of an n-best of ranked_width candidates (a beam's width, a sampler's
    # samples) by rank (0 the first; None where a rank had too few captions to fit), for each kind
    # in RANKED_KINDS; a kind absent, or another width: the greedy (or mirror) fit serves it.
    ranks: dict[str, tuple[Calibration | None, ...]] = field(default_factory=dict, hash=False)
    ranked_width: int = 0

    def apply(self, raw_confidence: float) -> float:
        mean_log_prob = math.log(max(raw_confidence, 1e-12))
        z = self.slope * mean_log_prob + self.bias
        return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0

    def for_caption(
        self,
        strategy: str,
        mirror_view: bool,
        width: int = 1,
        rank: int = 0,
        agrees_with_scene: bool | None = None,
    ) -> Calibration:
        """The fit for a caption: the strategy that decoded it, its n-best's width (candidates per
        image: beam_size, or num_captions samples) and its place in it (0 the first), and a
        grounded caption's answer (None for any other). A rank without a fit of its own takes the
        nearest one before it. An n-best of another width than ranked_width has no rank fits, but
        for a grounded first caption, whose answer's fit serves any width. The first caption of a
        mirror-view n-best takes the mirror fit (a grounded one: its answer's); the other rank fits
        were made without the mirror view and serve it too."""
        kind = ANSWER_KINDS.get(agrees_with_scene, strategy)
        fits = self.ranks.get(kind, ())
        if width != self.ranked_width:
            fits = fits[:1] if agrees_with_scene is not None and rank == 0 else ()
        if mirror_view and agrees_with_scene is None and rank == 0:
            fits = ()
        for fit in reversed(fits[: rank + 1]):
            if fit is not None:
                return fit
        return self.mirror_view if mirror_view and self.mirror_view is not None else self

    def save(self, path: str | Path) -> None:
        values = {"method": METHOD, **_parameters(self)}
        if self.mirror_view is not None:
            values["mirror_view"] = _parameters(self.mirror_view)
        if self.ranks:
            values["ranked_width"] = self.ranked_width
            values["ranks"] = {
                kind: [None if fit is None else _parameters(fit) for fit in fits] for kind, fits in self.ranks.items()
            }
        Path(path).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        values = json.loads(Path(path).read_text())
        if values.get("method") != METHOD:
            raise ValueError(f"{path}: unknown calibration method {values.get('method')!r}")
        mirror = values.get("mirror_view")
        ranks = values.get("ranks") or {}
        if not set(ranks) <= set(RANKED_KINDS):
            raise ValueError(f"{path}: unknown n-best kinds {sorted(set(ranks) - set(RANKED_KINDS))}")
        return dataclasses.replace(
            _from_parameters(values, path),
            mirror_view=None if mirror is None else _from_parameters(mirror, path),
            ranks={
                kind: tuple(None if fit is None else _from_parameters(fit, path) for fit in fits)
                for kind, fits in ranks.items()
            },
            ranked_width=int(values.get("ranked_width", 0)),
        )


RANKED_KINDS = ("beam", "sample", "grounded_agreeing", "grounded_disagreeing")  # Calibration.ranks' keys
ANSWER_KINDS = {True: "grounded_agreeing", False: "grounded_disagreeing"}  # a grounded caption's, by its answer


def calibrated_answer(caption) -> bool | None:
    """The answer a caption (captioning.decoding.Caption) is calibrated by, in fitting and in
    serving alike: whether a grounded caption agrees with the model's reading; None for any other.
    A caption written from the reading counts as disagreeing: it stands first where none of the
    decoder's candidates agreed, and its confidence is the displaced candidate's, so it is fitted
    and served with those first captions (captioning.grounding.written_caption)."""
    return False if caption.written_from_scene else caption.agrees_with_scene


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
