"""Caption text metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr, and the leave-one-out human line.

The scores come from pycocoevalcap's scorers, but the text is not run through its PTBTokenizer
(a Java process per call): candidates and references are standardised as the model's tokenizer
reads them (lower case, punctuation stripped, whitespace collapsed) and split on whitespace. The
model is then judged on the words it can produce, and punctuation in a reference cannot cost it.
Scores are therefore close to, but not identical with, numbers from the COCO evaluation server.

`cider` is pycocoevalcap's Cider, which is CIDEr-D (Gaussian length penalty, clipped counts, x10).
Its document frequencies come from the references being scored, so it needs a few images with
different captions: on a single image every n-gram is in every "document" and CIDEr is 0.

METEOR runs in a Java process that loads a paraphrase table at start-up (~15 s on a small machine).
Without Java it is skipped with a warning and reported as None; `CaptionScorer` keeps one process
for all the scoring of an evaluation and ends it on close.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence

from captioning.tokenizer import standardize

logger = logging.getLogger(__name__)

METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
METEOR_SHUTDOWN_SECONDS = 10

Candidates = Mapping[Hashable, str]
References = Mapping[Hashable, Sequence[str]]


class CaptionScorer:
    """The pycocoevalcap scorers, with METEOR's Java process kept open between calls.

    Use it as a context manager (or call `close`) so the JVM ends with the evaluation. The process
    starts in the constructor and loads in the background, so creating the scorer before captioning
    hides most of METEOR's start-up time.
    """

    def __init__(self, meteor: bool = True):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
        self._meteor = _start_meteor() if meteor else None

    @property
    def has_meteor(self) -> bool:
        return self._meteor is not None

    def score(self, candidates: Candidates, references: References) -> dict[str, float | None]:
        """Corpus scores of one candidate per image against that image's references."""
        references_by_id, candidates_by_id = _prepare(candidates, references)
        bleu, _ = self._bleu.compute_score(references_by_id, candidates_by_id, verbose=0)
        rouge_l, _ = self._rouge.compute_score(references_by_id, candidates_by_id)
        cider, _ = self._cider.compute_score(references_by_id, candidates_by_id)
        scores = {f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
        scores.update(
            meteor=self._meteor_score(references_by_id, candidates_by_id), rouge_l=float(rouge_l), cider=float(cider)
        )
        return {name: scores[name] for name in METRIC_NAMES}

    def _meteor_score(self, references_by_id, candidates_by_id) -> float | None:
        if self._meteor is None:
            return None
        try:
            meteor, _ = self._meteor.compute_score(references_by_id, candidates_by_id)
        except (OSError, ValueError) as error:  # the JVM died (memory?) or answered garbage
            logger.warning("METEOR failed (%s); it is skipped from here on", error)
            self.close()
            return None
        return float(meteor)

    def close(self) -> None:
        """Ends the METEOR process: EOF on its input, then a kill if it does not exit in time."""
        if self._meteor is None:
            return
        process = self._meteor.meteor_p
        self._meteor = None
        try:
            process.stdin.close()
        except OSError:  # already broken: the process is gone or going
            pass
        try:
            process.wait(timeout=METEOR_SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            stream.close()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _start_meteor():
    if shutil.which("java") is None:
        logger.warning("Java is not installed: METEOR is skipped (install a Java runtime to compute it)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        return Meteor()
    except OSError as error:
        logger.warning("could not start METEOR's Java process (%s): METEOR is skipped", error)
        return None


def _prepare(candidates: Candidates, references: References):
    """pycocoevalcap's input: {id: [standardised refs]}, {id: [standardised candidate]}."""
    if not candidates:
        raise ValueError("no captions to score")
    if set(candidates) != set(references):
        raise ValueError("candidates and references must cover the same images")
    empty = [image_id for image_id, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference captions, e.g. {empty[0]!r}")
    references_by_id = {i: [standardize(r) for r in references[i]] for i in candidates}
    candidates_by_id = {i: [standardize(candidates[i])] for i in candidates}
    return references_by_id, candidates_by_id


def caption_metrics(candidates: Candidates, references: References, *, meteor: bool = True) -> dict[str, float | None]:
    """bleu_1..bleu_4, meteor (None without Java), rouge_l and cider of one caption per image."""
    with CaptionScorer(meteor) as scorer:
        return scorer.score(candidates, references)


def leave_one_out_rounds(references: References) -> list[tuple[dict, dict]]:
    """The rounds of a leave-one-out evaluation: (held-out caption per image, the other references).

    Round k holds out reference k of every image. There are as many rounds as the fewest references
    any image has (5 for shapes and COCO), so every round covers the same images; an image with more
    (some COCO images have 6 or 7) keeps its extra ones among the references of every round. Images
    with a single reference cannot take part and are left out.
    """
    usable = {image_id: list(refs) for image_id, refs in references.items() if len(refs) >= 2}
    if not usable:
        return []
    rounds = min(len(refs) for refs in usable.values())
    return [
        ({i: refs[k] for i, refs in usable.items()}, {i: refs[:k] + refs[k + 1 :] for i, refs in usable.items()})
        for k in range(rounds)
    ]


def leave_one_out_metrics(
    references: References,
    candidates: Candidates | None = None,
    *,
    scorer: CaptionScorer | None = None,
    meteor: bool = True,
) -> dict | None:
    """Metrics averaged over the leave-one-out rounds; None when no image has two references.

    Without `candidates` each held-out reference is scored against the others: how well one human
    agrees with the rest, the line a model has to beat. With `candidates` the model's caption is
    scored against the same reduced reference sets, so the two are compared on equal footing (with
    all references the model would have one more to match, which raises BLEU in particular).

    Every round is scored as its own corpus, CIDEr's document frequencies included (computed from
    that round's references): this is how the human CIDEr line is usually reported, and it keeps
    each round an ordinary evaluation with one fewer reference per image.
    """
    rounds = leave_one_out_rounds(references)
    if not rounds:
        return None
    own_scorer = scorer is None
    scorer = CaptionScorer(meteor) if own_scorer else scorer
    try:
        per_round = []
        for held_out, others in rounds:
            scored = held_out if candidates is None else {i: candidates[i] for i in held_out}
            per_round.append(scorer.score(scored, others))
    finally:
        if own_scorer:
            scorer.close()
    averaged = {name: _mean([r[name] for r in per_round]) for name in METRIC_NAMES}
    return {**averaged, "rounds": len(rounds), "num_images": len(rounds[0][0])}


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None if any round lacks the metric (METEOR stopped part-way)."""
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)
