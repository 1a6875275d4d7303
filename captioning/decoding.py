"""Decoding strategies as small state machines over rows of next-token log-probabilities.

A `Search` owns `width` decode slots (1 for greedy, beam_size for beam search, num_captions for
sampling). Whoever runs the model (the offline `Captioner` or the service's batching engine) feeds
it the log-probabilities of its slots each step; the search answers with the tokens to feed next
and, for each slot, the slot whose GRU state it continues (beam search reorders its beams).
Strategies know nothing about batching; the engines know nothing about strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from captioning.tokenizer import END_ID, PAD_ID, START_ID

STRATEGIES = ("greedy", "beam", "sample")
MAX_BEAM_SIZE = 10


@dataclass(frozen=True)
class DecodeOptions:
    strategy: str = "greedy"
    beam_size: int = 3
    num_captions: int = 1
    max_length: int | None = None  # most words in a caption; None: what the model was trained for
    min_length: int = 1  # <end> is not chosen before this many words (as generation libraries do); 0: no floor
    temperature: float = 1.0
    top_k: int = 10
    seed: int | None = None
    length_penalty: float = 1.0  # beam scores are log_prob / num_tokens ** length_penalty
    return_attention: bool = False
    mirror_view: bool = False  # decode the image with its left-right mirror (captioning.mirror)
    grounded: bool = False  # rerank the candidates by the model's own reading of the scene (captioning.grounding)

    def validate(self) -> DecodeOptions:
        """Raises ValueError naming the first invalid value or combination."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("max_length must be at least 1")
        if self.min_length < 0:
            raise ValueError("min_length must be at least 0")
        if self.max_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length cannot exceed max_length")
        if self.num_captions < 1:
            raise ValueError("num_captions must be at least 1")
        if self.strategy == "greedy" and self.num_captions != 1:
            raise ValueError("greedy decoding gives one caption; use strategy=beam or sample for more")
        if self.grounded and self.strategy != "beam":
            raise ValueError("grounded reranks a beam search's candidates; use strategy=beam")
        if self.strategy == "beam":
            if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
                raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
            if self.num_captions > self.beam_size:
                raise ValueError("num_captions cannot exceed beam_size")
        if self.strategy == "sample":
            if self.num_captions > MAX_BEAM_SIZE:
                raise ValueError(f"num_captions must be at most {MAX_BEAM_SIZE}")
            if not self.temperature > 0:
                raise ValueError("temperature must be positive")
            if self.top_k < 1:
                raise ValueError("top_k must be at least 1")
        return self

    @property
    def views(self) -> int:
        """Images the search reads: the image, and its mirror with mirror_view."""
        return 2 if self.mirror_view else 1

    @property
    def candidates(self) -> int:
        """Captions one image's search holds: 1 greedy, beam_size beams, or num_captions samples."""
        return {"greedy": 1, "beam": self.beam_size, "sample": self.num_captions}[self.strategy]

    @property
    def width(self) -> int:
        """Decoder rows one image occupies: the strategy's decode slots, once per view."""
        return self.candidates * self.views


@dataclass
class Caption:
    text: str
    tokens: list[str]
    log_prob: float | None  # summed over the generated tokens, <end> included when produced; None: not decoded
    confidence: float  # geometric-mean token probability, in [0, 1]; calibrated by Captioner.results
    attention: list[list[float]] | None = None  # per word: weights over the feature grid
    raw_confidence: float | None = None  # the geometric mean, kept when `confidence` is calibrated
    agrees_with_scene: bool | None = None  # grounded decoding: nothing in it contradicts the model's reading
    written_from_scene: bool = False  # grounded decoding: written from the reading, not by the decoder


_NOT_WORDS = (PAD_ID, START_ID, END_ID)


@dataclass
class _Hypothesis:
    token_ids: list[int] = field(default_factory=list)
    log_prob: float = 0.0
    attention: list[np.ndarray] = field(default_factory=list)
    ended: bool = False

    def extend(self, token: int, log_prob: float, attention: np.ndarray | None) -> _Hypothesis:
        return _Hypothesis(
            self.token_ids + [token],
            self.log_prob + log_prob,
            self.attention + [attention] if attention is not None else self.attention,
            token == END_ID,
        )

    @property
    def words(self) -> int:
        """Tokens that become words (the tokenizer drops <pad>, <start> and <end>)."""
        return sum(token not in _NOT_WORDS for token in self.token_ids)

    def score(self, length_penalty: float) -> float:
        return self.log_prob / max(len(self.token_ids), 1) ** length_penalty


class Search:
    """Base class: subclasses set `width` and implement `advance`."""

    width: int

    def view_of_row(self) -> np.ndarray:
        """Which of the search's images each of its rows reads (all the one image; a
        captioning.mirror.MirrorSearch reads two)."""
        return np.zeros(self.width, dtype=np.int64)

    def __init__(self, options: DecodeOptions, max_steps: int):
        self.options = options
        self.max_steps = max_steps  # tokens generated at most, <end> included
        self.steps = 0
        self.finished = False

    def start_tokens(self) -> np.ndarray:
        return np.full(self.width, START_ID, dtype=np.int32)

    def advance(self, log_probs: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log_probs [width, V], attention [width, N] -> (next tokens [width], parent slots [width])."""
        raise NotImplementedError

    def hypotheses(self) -> list[_Hypothesis]:
        raise NotImplementedError

    def results(self, tokenizer) -> list[Caption]:
        """The num_captions best captions; with grounded, every candidate (one per slot), for the
        reranking to choose from (Captioner.results)."""
        captions = []
        for hyp in self.hypotheses()[: self.width if self.options.grounded else self.options.num_captions]:
            words = tokenizer.decode(hyp.token_ids)
            attention = None
            if self.options.return_attention:
                # Paired token by token: decode() drops <end> and any special token (<pad>, <start>)
                # an untrained model may emit mid-caption, and each word must keep its own row.
                attention = [
                    np.round(a, 5).tolist()
                    for token, a in zip(hyp.token_ids, hyp.attention)
                    if tokenizer.decode([token])
                ]
            confidence = math.exp(hyp.log_prob / max(len(hyp.token_ids), 1))
            captions.append(Caption(" ".join(words), words, float(hyp.log_prob), float(confidence), attention))
        return captions

    def _without_early_end(self, log_probs: np.ndarray, rows: list[_Hypothesis]) -> np.ndarray:
        """log_probs with <end> ruled out for the rows that have fewer than min_length words, so a
        caption is never empty; the same array (no copy) when no row needs it, so answers that
        already had enough words are unchanged. Scores keep the model's own log-probabilities."""
        short = [row for row, hyp in enumerate(rows) if hyp.words < self.options.min_length]
        if not short:
            return log_probs
        masked = log_probs.copy()
        masked[short, END_ID] = -np.inf
        return masked

    def _attention(self, attention: np.ndarray, row: int) -> np.ndarray | None:
        return attention[row].astype(np.float32) if self.options.return_attention else None


class GreedySearch(Search):
    width = 1

    def __init__(self, options: DecodeOptions, max_steps: int):
        super().__init__(options, max_steps)
        self.hypothesis = _Hypothesis()

    def advance(self, log_probs, attention):
        token = int(np.argmax(self._without_early_end(log_probs, [self.hypothesis])[0]))
        self.advance_to(token, float(log_probs[0, token]), attention[0])
        return np.array([token], dtype=np.int32), np.zeros(1, dtype=np.int64)

    def takes(self, token: int) -> bool:
        """Whether a batched caller's plain argmax is this search's choice too: it is unless it
        would end the caption before min_length words (then advance() picks the next best)."""
        return token != END_ID or self.hypothesis.words >= self.options.min_length

    def advance_to(self, token: int, log_prob: float, attention: np.ndarray) -> None:
        """advance() with the argmax already taken: a batched caller takes it for all its greedy
        rows in one call (same choice, same log-probability; see takes())."""
        self.hypothesis = self.hypothesis.extend(
            token, log_prob, attention.astype(np.float32) if self.options.return_attention else None
        )
        self.steps += 1
        self.finished = self.hypothesis.ended or self.steps >= self.max_steps

    def advance_many(self, tokens: np.ndarray, log_probs: np.ndarray, attention: np.ndarray) -> bool:
        """Takes the tokens a multi-step greedy call chose for this row ([K], [K], [K, N]), up to
        the end of the caption; True when the search has finished (what follows is discarded)."""
        for step in range(len(tokens)):
            self.advance_to(int(tokens[step]), float(log_probs[step]), attention[step])
            if self.finished:
                return True
        return False

    def hypotheses(self):
        return [self.hypothesis]


class SampleSearch(Search):
    """Independent top-k samples with temperature, as the reference lab decoded; seeded, so repeatable."""

    def __init__(self, options: DecodeOptions, max_steps: int):
        super().__init__(options, max_steps)
        self.width = options.num_captions
        self.rng = np.random.default_rng(options.seed)
        self.samples = [_Hypothesis() for _ in range(self.width)]

    def advance(self, log_probs, attention):
        tokens = np.full(self.width, END_ID, dtype=np.int32)
        k = min(self.options.top_k, log_probs.shape[1])
        allowed = self._without_early_end(log_probs, self.samples)
        if allowed is log_probs:
            allowed = log_probs.copy()
        # <pad> and <start> are not words: drawn (a high temperature with a large top_k gives them
        # weight), they count in the score and vanish from the text, an empty caption at worst.
        allowed[:, [PAD_ID, START_ID]] = -np.inf
        for row, hyp in enumerate(self.samples):
            if hyp.ended:
                continue
            # In token order: the draw then depends only on which tokens are the k likeliest, not
            # on the order argpartition returns them in, which two programs' log-probabilities a
            # rounding error apart (the service's batched step, the offline one) can change.
            candidates = np.sort(np.argpartition(-allowed[row], k - 1)[:k])
            logits = allowed[row, candidates] / self.options.temperature
            weights = np.exp(logits - logits.max())
            token = int(self.rng.choice(candidates, p=weights / weights.sum()))
            self.samples[row] = hyp.extend(token, float(log_probs[row, token]), self._attention(attention, row))
            tokens[row] = token
        self.steps += 1
        self.finished = all(h.ended for h in self.samples) or self.steps >= self.max_steps
        return tokens, np.arange(self.width)

    def hypotheses(self):
        return sorted(self.samples, key=lambda h: h.log_prob, reverse=True)


class BeamSearch(Search):
    """Beam search with length normalisation; returns the n best finished hypotheses."""

    def __init__(self, options: DecodeOptions, max_steps: int):
        super().__init__(options, max_steps)
        self.width = options.beam_size
        # Only beam 0 is live at the start, so the first expansion has no duplicates.
        self.beams = [_Hypothesis()] + [_Hypothesis(log_prob=-math.inf) for _ in range(self.width - 1)]
        self.done: list[_Hypothesis] = []

    def advance(self, log_probs, attention):
        k = self.width
        allowed = self._without_early_end(log_probs, self.beams)
        totals = np.array([b.log_prob for b in self.beams])[:, None] + allowed  # [k, V]
        flat = totals.ravel()
        best = np.argpartition(-flat, 2 * k - 1)[: 2 * k] if flat.size > 2 * k else np.arange(flat.size)
        best = best[np.argsort(-flat[best], kind="stable")]
        live: list[tuple[_Hypothesis, int]] = []
        for rank, index in enumerate(best):
            parent, token = divmod(int(index), log_probs.shape[1])
            if not np.isfinite(flat[index]):
                continue
            hyp = self.beams[parent].extend(token, float(log_probs[parent, token]), self._attention(attention, parent))
            if hyp.ended:
                # An ending counts only if it ranks among the k best continuations: a weaker one
                # would fill the finished list and stop the search before better live beams end
                # (and a beam of 1 would no longer be greedy).
                if rank < k:
                    self.done.append(hyp)
            elif len(live) < k:
                live.append((hyp, parent))
        self.steps += 1
        if self.steps >= self.max_steps:
            self.done.extend(h for h, _ in live)  # cut at the length limit
        self.finished = self.steps >= self.max_steps or not live or self._live_beams_cannot_win(live)
        while len(live) < k:  # keep the slot count fixed; padding beams are never expanded
            live.append((_Hypothesis(log_prob=-math.inf), 0))
        self.beams = [h for h, _ in live]
        tokens = np.array([h.token_ids[-1] if h.token_ids else END_ID for h in self.beams], dtype=np.int32)
        return tokens, np.array([p for _, p in live], dtype=np.int64)

    def _live_beams_cannot_win(self, live: list[tuple[_Hypothesis, int]]) -> bool:
        """True once k hypotheses have ended and no live beam scores better, now, than the k-th
        best of them. Stopping at the first k endings instead would cut off a longer caption
        whose per-token score is still ahead. (Exact for length_penalty=0, since log-probabilities
        only fall; a heuristic otherwise, as in common toolkits.)"""
        if len(self.done) < self.width:
            return False
        penalty = self.options.length_penalty
        kth_best = sorted((h.score(penalty) for h in self.done), reverse=True)[self.width - 1]
        return max(h.score(penalty) for h, _ in live) <= kth_best

    def hypotheses(self):
        penalty = self.options.length_penalty
        return sorted(self.done, key=lambda h: h.score(penalty), reverse=True)


def new_search(options: DecodeOptions, max_steps: int) -> Search:
    kind = {"greedy": GreedySearch, "beam": BeamSearch, "sample": SampleSearch}[options.strategy]
    return kind(options, max_steps)
